"""Preference data: records in TRL's conventions → padded token rows with completion masks.

    encoder = PreferenceEncoder(tokenizer, paired=True)
    rows, stats = encode_preferences(paths, encoder, length=seq_len + 1)

A paired record (DPO, IPO, SimPO, ORPO, reward models) is
`{"prompt": …, "chosen": …, "rejected": …}`: strings, or lists of messages (TRL's
conversational form: the prompt's turns, then the assistant's answer as a list of messages).
An unpaired record (KTO) is `{"prompt": …, "completion": …, "label": true|false}`.

Each completion is encoded with the prompt by `SFTEncoder` (the SFT chat templates and loss
masks), so mask[t] marks the completion's tokens (its EOS or end-of-turn included). Rows are
int64 `[N, 2, 2, length]`: two sequences per record, each its ids and mask, right-padded —
chosen then rejected, or for KTO the example then its KL counterpart (the prompt with the
previous record's completion, TRL's mismatched pairs for the KL estimate), the example's mask
holding its label: 1 desirable, 2 undesirable (`DESIRABLE`, `UNDESIRABLE`). A sequence
longer than `length` is cut at the end; a record with a completion cut away is dropped (counted).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from llmctl.core.data.sft import Example, SFTEncoder, read_records
from llmctl.errors import DataError

PAIRED = ("prompt", "chosen", "rejected")
UNPAIRED = ("prompt", "completion", "label")
DESIRABLE, UNDESIRABLE = 1, 2  # KTO: the example's mask values


@dataclass
class PreferenceStats:
    records: int = 0
    truncated: int = 0  # sequences cut to the row length
    dropped: int = 0  # records whose completion was cut away
    longest: int = 0  # tokens in the longest sequence, before cutting
    desirable: int = 0  # KTO: records labelled true

    def describe(self, paired: bool) -> str:
        text = f"{self.records} {'pairs' if paired else 'examples'}, longest sequence {self.longest} tokens"
        if not paired:
            text += f", {self.desirable} desirable / {self.records - self.desirable} undesirable"
        if self.truncated or self.dropped:
            text += f"; {self.truncated} sequences cut to seq_len, {self.dropped} records dropped (completion cut away)"
        return text


class PreferenceEncoder:
    """Record → (sequences [Example, …], label or None); `paired` chooses the record form."""

    def __init__(self, tokenizer, *, paired: bool = True, template: str | None = None):
        self.sft = SFTEncoder(tokenizer, train_on="completion", template=template)
        self.paired = paired

    def __call__(self, record: dict, where: str) -> tuple[list[Example], bool | None]:
        keys = PAIRED if self.paired else UNPAIRED
        missing = [k for k in keys if k not in record]
        if missing:
            raise DataError(f"{where}: a {'preference pair' if self.paired else 'KTO'} record needs "
                            f"{', '.join(repr(k) for k in keys)} (missing {', '.join(missing)})")
        label = None
        if not self.paired:
            label = record["label"]
            if not isinstance(label, bool):
                raise DataError(f"{where}: field 'label' must be true or false, not {label!r}")
        answers = keys[1:3] if self.paired else keys[1:2]
        return [self.sft({"prompt": record["prompt"], "completion": record[k]}, f"{where} ({k})")
                for k in answers], label


def encode_preferences(paths: list[Path], encoder: PreferenceEncoder, length: int, pad_id: int):
    """(rows int64 [N, 2, 2, length], PreferenceStats) for every record of `paths`."""
    import torch

    stats = PreferenceStats()
    kept: list[tuple[list[Example], bool | None]] = []
    for path in paths:
        for where, record in read_records(path):
            sequences, label = encoder(record, where)
            stats.records += 1
            stats.longest = max(stats.longest, *(len(s.ids) for s in sequences))
            if any(not any(s.mask[:length]) for s in sequences):
                stats.dropped += 1
                continue
            stats.desirable += bool(label)
            kept.append((sequences, label))
    if not stats.records:
        raise DataError(f"{', '.join(map(str, paths))}: no records")
    if not kept:
        raise DataError(f"every record's completion is cut away by seq_len={length - 1}; raise seq_len")
    if not encoder.paired:  # the KL counterpart: this prompt, the previous record's completion (TRL's rotation)
        kept = [([seqs[0], _mismatched(seqs[0], kept[i - 1][0][0])], label)
                for i, (seqs, label) in enumerate(kept)]
    rows = torch.full((len(kept), 2, 2, length), 0, dtype=torch.long)
    rows[:, :, 0] = pad_id
    for i, (sequences, label) in enumerate(kept):
        for k, seq in enumerate(sequences):
            n = min(len(seq.ids), length)
            stats.truncated += len(seq.ids) > length
            rows[i, k, 0, :n] = torch.tensor(seq.ids[:n])
            rows[i, k, 1, :n] = torch.tensor(seq.mask[:n], dtype=torch.long)
        if label is False:
            rows[i, 0, 1] *= UNDESIRABLE
    return rows, stats


def _mismatched(example: Example, other: Example) -> Example:
    """`example`'s prompt followed by `other`'s completion."""
    start, other_start = example.mask.index(True), other.mask.index(True)
    end = len(other.mask) - other.mask[::-1].index(True)
    completion = other.ids[other_start:end]
    return Example(example.ids[:start] + completion, [False] * start + [True] * len(completion))
