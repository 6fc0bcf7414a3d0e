"""Supervised finetuning data: records in TRL's conventions → token rows with loss masks.

    encoder = SFTEncoder(tokenizer, train_on="completion")
    examples = [encoder(record, where) for where, record in read_records(path)]
    rows, stats = pack(examples, length=seq_len + 1, pad_id=0)     # or pad(...)

A record (a JSONL line, or an element of a `.json` array) is one of
- `{"text": …}`: the loss is on every token;
- `{"prompt": …, "completion": …}`: strings, or lists of messages (TRL's conversational form);
- `{"messages": [{"role": …, "content": …}, …]}`: rendered with the chat template.

With `train_on="completion"` the loss is on the completion only, and for chats on the
assistant turns only. Those spans are derived from the rendered template, not from the
message strings: assistant turn i spans from the end of the conversation up to it rendered
with the generation prompt to the end of the conversation through it, and a token carries
loss when it starts inside such a span (so the template's end-of-turn marker is learned).

An example is `ids` plus `mask` (token t is predicted); its first token never is. Rows hold
`length` tokens: `pack` puts consecutive examples in one row with a document id each (the
model attends within a document only, positions restart), `pad` one example per row. Longer
examples are cut to `length` (counted in the stats).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from llmctl.errors import DataError

TRAIN_ON = ("completion", "all")


@dataclass
class Example:
    ids: list[int]
    mask: list[bool]  # mask[t]: token t carries loss


@dataclass
class Stats:
    """What the data became, for the summary before training."""

    examples: int = 0
    tokens: list[int] = field(default_factory=list)  # per example, before truncation
    loss_tokens: int = 0
    truncated: int = 0
    dropped: int = 0  # no loss token left after truncation
    rows: int = 0
    fill: float = 0.0  # share of row positions holding tokens

    def summary(self) -> dict[str, Any]:
        n = self.tokens
        return {"examples": self.examples, "tokens": sum(n), "tokens_per_example":
                {"min": min(n), "mean": round(sum(n) / len(n), 1), "max": max(n)} if n else None,
                "loss_tokens": self.loss_tokens, "truncated": self.truncated, "dropped": self.dropped,
                "rows": self.rows, "fill": round(self.fill, 3)}


def read_records(path: str | Path) -> Iterator[tuple[str, dict]]:
    """("file:line" or "file[i]", record) for a JSONL file or a `.json` array of objects."""
    from llmctl.core.data.corpus import iter_jsonl

    path = Path(path)
    if path.suffix != ".json":
        for line, record in iter_jsonl(path):
            yield f"{path}:{line}", record
        return
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a JSON array of records ({exc})") from None
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON array of records")
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise DataError(f"{path}[{i}]: expected a JSON object")
        yield f"{path}[{i}]", record


class SFTEncoder:
    """Turns records into `Example`s with `tokenizer` (a `Tok`) and a chat template (Jinja source;
    default the tokenizer's)."""

    def __init__(self, tokenizer, *, train_on: str = "completion", template: str | None = None):
        if train_on not in TRAIN_ON:
            raise DataError(f"train_on must be one of {', '.join(TRAIN_ON)}, not {train_on!r}")
        self.tok, self.train_on = tokenizer, train_on
        self.template = template or tokenizer.chat_template
        self.eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []

    def __call__(self, record: dict, where: str) -> Example:
        if "messages" in record:
            return self._chat(_messages(record["messages"], where, "messages"), where)
        if "prompt" in record and "completion" in record:
            prompt, completion = record["prompt"], record["completion"]
            if isinstance(prompt, list) or isinstance(completion, list):
                prompt = _messages(prompt, where, "prompt")
                return self._chat(prompt + _messages(completion, where, "completion"), where, first=len(prompt))
            return self._pair(_text(prompt, where, "prompt"), _text(completion, where, "completion"))
        if "text" in record:
            ids = self.tok.encode(_text(record["text"], where, "text"), add_special_tokens=True) + self.eos
            return Example(ids, [False] + [True] * (len(ids) - 1))
        raise DataError(f"{where}: a record needs 'text', 'prompt' and 'completion', or 'messages' "
                        f"(it has {', '.join(sorted(record)) or 'no fields'})")

    def _pair(self, prompt: str, completion: str) -> Example:
        p = self.tok.encode(prompt, add_special_tokens=True)
        c = self.tok.encode(completion) + self.eos
        learn_prompt = self.train_on == "all"
        return Example(p + c, [False] + [learn_prompt] * (len(p) - 1) + [True] * len(c))

    def _render(self, messages: list[dict], generation_prompt: bool, where: str) -> str:
        from llmctl.core.chat_templates import render_chat
        from llmctl.errors import UsageError

        if self.template is None:
            raise DataError(f"{where}: chat records need a chat template: the tokenizer has none "
                            "(give chat_template=NAME|FILE)")
        try:
            return render_chat(self.template, messages, self.tok.special_tokens, generation_prompt)
        except UsageError as exc:
            raise DataError(f"{where}: {exc}") from None

    def _chat(self, messages: list[dict], where: str, first: int = 0) -> Example:
        """Render and tokenize a conversation; the loss on assistant turns from `first` on."""
        text = self._render(messages, False, where)
        spans = []
        for i, message in enumerate(messages):
            if i < first or message.get("role") != "assistant":
                continue
            before, through = self._render(messages[:i], True, where), self._render(messages[: i + 1], False, where)
            if not (through.startswith(before) and text.startswith(through)):
                raise DataError(f"{where}: the chat template does not render this conversation turn by turn "
                                f"(turn {i + 1} changes what precedes it), so assistant turns cannot be masked; "
                                "use train_on=all")
            spans.append((len(before), len(through)))
        if not spans and self.train_on == "completion":
            raise DataError(f"{where}: no assistant message to learn")
        encoding = self.tok.inner.encode(text, add_special_tokens=False)
        if self.train_on == "all":
            mask = [True] * len(encoding.ids)
        else:
            mask = [any(s <= start < e for s, e in spans) for start, _ in encoding.offsets]
        if mask:
            mask[0] = False
        return Example(list(encoding.ids), mask)


def _text(value: Any, where: str, key: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{key}' is {type(value).__name__}, not text")
    return value


def _messages(value: Any, where: str, key: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field '{key}' must be a non-empty list of messages")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: {key}[{i}] must be an object with string 'role' and 'content'")
    return value


def encode_files(paths: list[Path], encoder: SFTEncoder) -> list[Example]:
    """Every record of `paths`, encoded (DataError naming file and line on a bad record)."""
    examples = [encoder(record, where) for path in paths for where, record in read_records(path)]
    if not examples:
        raise DataError(f"{', '.join(map(str, paths))}: no records")
    return examples


def _fit(examples: list[Example], length: int, stats: Stats) -> list[Example]:
    out = []
    for ex in examples:
        stats.examples += 1
        stats.tokens.append(len(ex.ids))
        if len(ex.ids) > length:
            stats.truncated += 1
            ex = Example(ex.ids[:length], ex.mask[:length])
        if not any(ex.mask):
            stats.dropped += 1
            continue
        stats.loss_tokens += sum(ex.mask)
        out.append(ex)
    return out


def pack(examples: list[Example], length: int, pad_id: int, packing: bool = True):
    """(rows: int64 tensor (N, 3, length) of ids, mask, document id; Stats). With `packing`,
    consecutive examples share a row while they fit; otherwise one example per row."""
    import torch

    stats = Stats()
    fitted = _fit(examples, length, stats)
    if not fitted:
        raise DataError("no example has a token to learn (all prompt, or cut away by seq_len)")
    rows, current, filled = [], [], 0
    for ex in fitted:
        if current and (not packing or filled + len(ex.ids) > length):
            rows.append(current)
            current, filled = [], 0
        current.append(ex)
        filled += len(ex.ids)
    rows.append(current)
    out = torch.full((len(rows), 3, length), 0, dtype=torch.long)
    out[:, 0] = pad_id
    used = 0
    for r, row in enumerate(rows):
        at = 0
        for doc, ex in enumerate(row):
            n = len(ex.ids)
            out[r, 0, at:at + n] = torch.tensor(ex.ids)
            out[r, 1, at:at + n] = torch.tensor(ex.mask, dtype=torch.long)
            out[r, 2, at:at + n] = doc
            at += n
        out[r, 2, at:] = len(row)  # padding: a document of its own
        used += at
    stats.rows, stats.fill = len(rows), used / (len(rows) * length)
    return out, stats
