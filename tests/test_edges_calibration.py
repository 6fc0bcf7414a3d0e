"""Edge cases of the two calibration samplers and the block-by-block calibration run.

The samplers are checked against the stream built by hand from a word-level vocabulary (one id
per word, so every expected window can be written down) and against the documented draw:
GPTQ-style seeded offsets with replacement for `quantize`, distinct offsets for `prune`.
"""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from _recorder import Recorder

from llmctl.core.data import Corpus
from llmctl.errors import DataError

WORDS = [f"w{i}" for i in range(40)]


def word_tok(eos: bool = True):
    """A `Tok` whose ids are the word numbers + 1 (0 is <eos>, when there is one); like Llama's,
    it adds a BOS (id 42) when asked for special tokens, which calibration must not ask for."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    from llmctl.core.tokenizer import Tok

    vocab = {"<eos>": 0, **{w: i + 1 for i, w in enumerate(WORDS)}, "<unk>": len(WORDS) + 1, "<bos>": len(WORDS) + 2}
    inner = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    inner.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    inner.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", len(WORDS) + 2)])
    return Tok(inner, {"eos_token": "<eos>" if eos else None})


def jsonl(path, docs: list[list[int]]):
    """A JSONL corpus whose documents are the given word numbers; returns its path as str."""
    path.write_text("".join(json.dumps({"text": " ".join(WORDS[i] for i in doc)}) + "\n" for doc in docs))
    return str(path)


DOCS = [[0, 1, 2], [3, 4], [5, 6, 7, 8], [9], [10, 11, 12, 13, 14]]


def stream_of(docs, eos: bool = True) -> list[int]:
    return [t for doc in docs for t in [i + 1 for i in doc] + ([0] if eos else [])]


def is_window(row: torch.Tensor, stream: list[int]) -> int:
    """The offset of `row` in `stream` (asserting there is one)."""
    row = row.tolist()
    starts = [s for s in range(len(stream) - len(row) + 1) if stream[s:s + len(row)] == row]
    assert starts, (row, stream)
    return starts[0]


# --- quantize: calibration_windows ----------------------------------------------------------------


def test_windows_are_seeded_offsets_into_the_eos_joined_stream(tmp_path):
    from llmctl.core.quant.calibration import calibration_windows

    path = jsonl(tmp_path / "c.jsonl", DOCS)
    stream = stream_of(DOCS)
    ids, record = calibration_windows([path], word_tok(), samples=6, seq_len=4, seed=3)
    starts = torch.randint(0, len(stream) - 4 + 1, (6,), generator=torch.Generator().manual_seed(3))
    want = torch.tensor([stream[s:s + 4] for s in starts.tolist()])
    assert ids.dtype == torch.long and torch.equal(ids, want)
    assert record == {"files": [path], "tokens": len(stream), "samples": 6, "seq_len": 4, "seed": 3,
                      "sha256": hashlib.sha256(want.numpy().tobytes()).hexdigest()}
    other, other_record = calibration_windows([path], word_tok(), samples=6, seq_len=4, seed=4)
    assert not torch.equal(other, ids) and other_record["sha256"] != record["sha256"]
    default, default_record = calibration_windows([path], word_tok(), samples=6, seq_len=4)
    assert default_record["seed"] == 0 and torch.equal(default, calibration_windows([path], word_tok(), 6, 4, 0)[0])


def test_a_window_as_long_as_the_stream_is_the_whole_stream(tmp_path):
    from llmctl.core.quant.calibration import calibration_windows

    path = jsonl(tmp_path / "c.jsonl", DOCS)
    stream = stream_of(DOCS)
    ids, record = calibration_windows([path], word_tok(), samples=3, seq_len=len(stream))
    assert ids.tolist() == [stream] * 3 and record["tokens"] == len(stream)
    with pytest.raises(DataError, match=rf"has {len(stream)} tokens, fewer than one window of --seq-len {len(stream) + 1}"):
        calibration_windows([path], word_tok(), samples=1, seq_len=len(stream) + 1)


def test_windows_reach_both_ends_of_the_stream(tmp_path):
    """Over many draws, the first and the last possible offsets both occur (and nothing past them)."""
    from llmctl.core.quant.calibration import calibration_windows

    path = jsonl(tmp_path / "c.jsonl", DOCS)
    stream = stream_of(DOCS)
    ids, _ = calibration_windows([path], word_tok(), samples=400, seq_len=len(stream) - 2, seed=0)
    assert {is_window(row, stream) for row in ids} == {0, 1, 2}


def test_without_an_eos_token_documents_are_simply_concatenated(tmp_path):
    from llmctl.core.quant.calibration import calibration_windows

    path = jsonl(tmp_path / "c.jsonl", DOCS)
    stream = stream_of(DOCS, eos=False)
    ids, record = calibration_windows([path], word_tok(eos=False), samples=2, seq_len=len(stream))
    assert ids.tolist() == [stream, stream] and record["tokens"] == len(stream)


def test_reading_stops_once_both_max_tokens_and_the_windows_are_covered(tmp_path, monkeypatch):
    """Batches are read until the stream holds max(max_tokens, samples × seq_len) tokens."""
    from llmctl.core.quant.calibration import calibration_windows

    batches = [[" ".join(WORDS[5 * b:5 * b + 5])] for b in range(6)]  # 5 words + EOS = 6 tokens each
    monkeypatch.setattr(Corpus, "batches", lambda self, max_chars=1 << 20: iter(batches))
    path = jsonl(tmp_path / "c.jsonl", [[0]])
    tokens = lambda **kw: calibration_windows([path], word_tok(), **kw)[1]["tokens"]  # noqa: E731
    assert tokens(samples=4, seq_len=4, max_tokens=10) == 18  # 16 windowed tokens: three batches
    assert tokens(samples=1, seq_len=4, max_tokens=10) == 12  # max_tokens 10: two batches
    assert tokens(samples=1, seq_len=4, max_tokens=12) == 12  # exactly reached: stops there
    assert tokens(samples=1, seq_len=4, max_tokens=1000) == 36  # never reached: everything


# --- prune: calibration_tokens ---------------------------------------------------------------------


def test_prune_windows_are_distinct_seeded_offsets(tmp_path):
    from llmctl.core.prune.calibration import calibration_tokens

    path = jsonl(tmp_path / "c.jsonl", DOCS)
    stream = stream_of(DOCS)
    ids = calibration_tokens([path], word_tok(), samples=5, seq_len=3, seed=2)
    starts = torch.randperm(len(stream) - 3 + 1, generator=torch.Generator().manual_seed(2))[:5]
    assert torch.equal(ids, torch.tensor([stream[s:s + 3] for s in starts.tolist()]))
    assert len({is_window(row, stream) for row in ids}) == 5  # (no two share an offset)
    assert not torch.equal(calibration_tokens([path], word_tok(), samples=5, seq_len=3, seed=5), ids)
    assert torch.equal(calibration_tokens([path], word_tok(), samples=5, seq_len=3),
                       calibration_tokens([path], word_tok(), samples=5, seq_len=3, seed=0))


def test_prune_gives_every_window_once_when_the_text_holds_fewer_than_asked(tmp_path):
    from llmctl.core.prune.calibration import calibration_tokens

    path = jsonl(tmp_path / "c.jsonl", DOCS)
    stream = stream_of(DOCS)
    ids = calibration_tokens([path], word_tok(), samples=100, seq_len=len(stream) - 3)
    assert sorted(is_window(row, stream) for row in ids) == [0, 1, 2, 3]
    whole = calibration_tokens([path], word_tok(eos=False), samples=2, seq_len=len(stream_of(DOCS, eos=False)))
    assert whole.tolist() == [stream_of(DOCS, eos=False)]
    with pytest.raises(DataError, match=rf"holds {len(stream)} tokens, fewer than one window of seq_len={len(stream) + 1} "
                       r"\(give more text or a smaller seq_len\)$"):
        calibration_tokens([path], word_tok(), samples=1, seq_len=len(stream) + 1)


def test_prune_reads_four_times_the_windows_and_draws_from_those_only(tmp_path, monkeypatch):
    """Reading stops once 4 × samples × seq_len tokens are in; offsets are drawn over those only."""
    from llmctl.core.prune.calibration import calibration_tokens

    batches = [[" ".join(WORDS[5 * b:5 * b + 5])] for b in range(6)]  # 6 tokens each with EOS
    read, drawn, randperm = [], [], torch.randperm

    def batched(self, max_chars=1 << 20):
        for batch in batches:
            read.append(batch)
            yield batch

    monkeypatch.setattr(Corpus, "batches", batched)
    monkeypatch.setattr(torch, "randperm", lambda n, **kw: drawn.append(n) or randperm(n, **kw))
    path = jsonl(tmp_path / "c.jsonl", [[0]])
    stream = stream_of([list(range(5 * b, 5 * b + 5)) for b in range(6)])
    for samples, seq_len, batches_read, offsets in ((4, 2, 6, 31), (2, 3, 4, 22), (1, 6, 4, 19), (9, 9, 6, 28)):
        read.clear(), drawn.clear()
        ids = calibration_tokens([path], word_tok(), samples=samples, seq_len=seq_len)
        assert (len(read), drawn) == (batches_read, [offsets]), (samples, seq_len)
        assert all(is_window(row, stream) < offsets for row in ids)


# --- for_each_block ---------------------------------------------------------------------------------


def test_each_block_sees_the_output_of_the_blocks_before_it_as_changed():
    from llmctl.core.model import ModelConfig
    from llmctl.core.model.build import build_model
    from llmctl.core.model.layerwise import LayerwiseRun
    from llmctl.core.prune.calibration import for_each_block

    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=50, hidden_size=16, num_layers=3, num_heads=2, num_kv_heads=2,
                                    intermediate_size=32, max_seq_len=16)).eval()
    tokens = torch.randint(0, 50, (2, 8))
    seen, report = [], Recorder()

    def visit(i, block, inputs, ctx):
        seen.append((i, block, inputs.clone()))
        if i == 0:
            with torch.no_grad():
                block.mlp.down_proj.weight.zero_()

    last = for_each_block(model, tokens, visit, report, description="score")
    run = LayerwiseRun(model, tokens)  # block 0 is now changed: the reference run sees it
    want = [run.hidden.clone()]
    for _ in range(3):
        want.append(run.step().clone())
    assert [i for i, _, _ in seen] == [0, 1, 2] and all(b is model.model.layers[i] for i, b, _ in seen)
    for (_, _, got), expected in zip(seen, want):
        torch.testing.assert_close(got, expected)
    torch.testing.assert_close(last, want[3])
    assert report.steps() == [("progress", "score", 3, "layer"), ("advance", 1), ("advance", 1), ("advance", 1)]
