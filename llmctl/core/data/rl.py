"""RL prompts: records with a `prompt` (a string, or TRL's list of messages) plus whatever
their verifiers read (e.g. `answer`, `tests`).

    records = read_prompts([Path("train.jsonl")])     # [{"prompt": …, "answer": …}, …]

Prompts are encoded as `generate` encodes them (`core.generate.encode_prompt`).
"""

from __future__ import annotations

from pathlib import Path

from llmctl.errors import DataError


def read_prompts(paths: list[Path]) -> list[dict]:
    """Every record of `paths` (JSONL, or a `.json` array); DataError naming the place of a bad one."""
    from llmctl.core.data.sft import _messages, read_records

    records = []
    for path in paths:
        for where, record in read_records(path):
            prompt = record.get("prompt")
            if prompt is None:
                fields = ", ".join(sorted(record)) or "no fields"
                raise DataError(f"{where}: an RL record needs a 'prompt' (it has {fields})")
            if not isinstance(prompt, str):
                _messages(prompt, where, "prompt")
            elif not prompt:
                raise DataError(f"{where}: empty prompt")
            records.append(record)
    if not records:
        raise DataError(f"{', '.join(map(str, paths))}: no records")
    return records

