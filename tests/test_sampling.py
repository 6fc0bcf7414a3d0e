"""Logits processors match transformers' on the same logits; stream detokenizer and stop strings."""

from dataclasses import replace

import pytest
import torch

from transformers.generation.logits_process import (  # noqa: E402
    MinPLogitsWarper,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from llmctl.core.generate import GenerationConfig  # noqa: E402
from llmctl.core.generate.sampling import (  # noqa: E402
    PROCESSORS,
    History,
    MinP,
    NoRepeatNGram,
    RepetitionPenalty,
    Temperature,
    TopK,
    TopP,
    TypicalP,
    build_processors,
)
from llmctl.core.generate.stream import Detokenizer, Sequence, StopMatcher  # noqa: E402
from llmctl.errors import UsageError  # noqa: E402

V = 50


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(3, V, generator=g) * 3
    ids = torch.randint(0, V, (3, 12), generator=g)
    ids[0, 6:9] = ids[0, 0:3]  # a repeated trigram for no-repeat-ngram
    ids[0, 10:12] = ids[0, 0:2]  # the row ends with its first bigram: the trigram's last token is banned
    return ids, scores


@pytest.mark.parametrize(
    "ours, theirs",
    [
        (Temperature(0.7), TemperatureLogitsWarper(0.7)),
        (TopK(7), TopKLogitsWarper(7)),
        (TopP(0.8), TopPLogitsWarper(0.8)),
        (TopP(0.3, min_keep=3), TopPLogitsWarper(0.3, min_tokens_to_keep=3)),
        (TopP(0.01), TopPLogitsWarper(0.01)),  # one token left: the default min_keep decides
        (MinP(0.1), MinPLogitsWarper(0.1)),
        (MinP(0.9), MinPLogitsWarper(0.9)),
        (TypicalP(0.6), TypicalLogitsWarper(0.6)),
        (TypicalP(0.05), TypicalLogitsWarper(0.05)),
        (RepetitionPenalty(1.4), RepetitionPenaltyLogitsProcessor(1.4)),
        (RepetitionPenalty(0.7), RepetitionPenaltyLogitsProcessor(0.7)),  # < 1 favours repeats
        (NoRepeatNGram(3), NoRepeatNGramLogitsProcessor(3)),
        (NoRepeatNGram(2), NoRepeatNGramLogitsProcessor(2)),
        (NoRepeatNGram(1), NoRepeatNGramLogitsProcessor(1)),
    ],
    ids=lambda p: type(p).__name__,
)
def test_processors_match_transformers(batch, ours, theirs):
    ids, scores = batch
    expected = theirs(ids, scores.clone())
    assert not torch.equal(expected, scores)  # the setting changes these scores: the comparison says something
    if isinstance(ours, NoRepeatNGram):
        assert torch.isinf(expected[0]).any()  # row 0 repeats an n-gram prefix
    got = ours(scores.clone(), History(ids.tolist(), V))
    assert torch.equal(torch.isinf(got), torch.isinf(expected))
    torch.testing.assert_close(got, expected)


def test_frequency_and_presence_penalties_count_generated_tokens_only():
    h = History([[1, 2]], 6)  # prompt
    h.append([3])
    h.append([3])
    h.append([1])
    scores = torch.zeros(1, 6)
    freq = PROCESSORS.get("frequency_penalty")(0.5)(scores, h)
    pres = PROCESSORS.get("presence_penalty")(0.5)(scores, h)
    assert freq.tolist() == [[0, -0.5, 0, -1.0, 0, 0]]
    assert pres.tolist() == [[0, -0.5, 0, -0.5, 0, 0]]


@pytest.mark.parametrize("built", [("seen", "counts"), ("seen",), ("counts",)])
def test_incremental_history_matches_rebuilt(built):
    """Whichever views a processor built before decoding, appends keep them current."""
    h = History([[1, 2], [3]], 8, prompt_lens=[2, 1])
    for view in built:
        getattr(h, view)()
    for step in ([4, 4], [5, 1]):
        h.append(step)
    fresh = History(h.rows, 8, prompt_lens=[2, 1])
    assert torch.equal(h.seen(), fresh.seen()) and torch.equal(h.counts(), fresh.counts())


def test_min_new_tokens_blocks_eos_until_reached():
    p = PROCESSORS.get("min_new_tokens")(2, [0])
    h = History([[5, 6]], 4)
    assert p(torch.zeros(1, 4), h)[0, 0] == -float("inf")
    h.append([1])
    h.append([2])
    assert p(torch.zeros(1, 4), h)[0, 0] == 0


def test_build_processors_only_active_and_ordered():
    assert build_processors(GenerationConfig(), sampling=False) == []
    cfg = GenerationConfig(temperature=0.7, top_k=5, top_p=0.9, repetition_penalty=1.2)
    names = [type(p).__name__ for p in build_processors(cfg, sampling=True)]
    assert names == ["RepetitionPenalty", "Temperature", "TopK", "TopP"]  # transformers' order
    assert [type(p).__name__ for p in build_processors(cfg, sampling=False)] == ["RepetitionPenalty"]


def test_every_setting_reaches_its_processor():
    cfg = GenerationConfig(temperature=0.7, top_k=5, top_p=0.9, min_p=0.05, typical_p=0.8, repetition_penalty=1.2,
                           frequency_penalty=0.4, presence_penalty=0.3, no_repeat_ngram_size=2, min_new_tokens=3,
                           eos_ids=[0, 7])
    values = {type(p).__name__: vars(p) for p in build_processors(cfg, sampling=True)}
    assert values == {
        "RepetitionPenalty": {"penalty": 1.2}, "FrequencyPenalty": {"alpha": 0.4}, "PresencePenalty": {"alpha": 0.3},
        "NoRepeatNGram": {"n": 2}, "MinNewTokens": {"min_new": 3, "eos_ids": [0, 7]},
        "Temperature": {"temperature": 0.7}, "TopK": {"k": 5}, "TopP": {"p": 0.9, "min_keep": 1},
        "MinP": {"min_p": 0.05, "min_keep": 1}, "TypicalP": {"mass": 0.8, "min_keep": 1},
    }
    beams = {type(p).__name__: vars(p) for p in build_processors(replace(cfg, num_beams=2, top_k=1), sampling=True)}
    assert beams["TopK"] == {"k": 3}  # a beam keeps 1 + len(eos) tokens
    assert beams["TopP"]["min_keep"] == beams["MinP"]["min_keep"] == beams["TypicalP"]["min_keep"] == 3


@pytest.mark.parametrize("row", [[5], [5, 5], [5, 6], [5, 6, 5], [5, 6, 5, 6, 5]])
def test_no_repeat_ngram_on_short_rows_matches_transformers(row):
    scores = torch.zeros(1, 8)
    for n in (1, 2, 3):
        expected = NoRepeatNGramLogitsProcessor(n)(torch.tensor([row]), scores.clone())
        torch.testing.assert_close(NoRepeatNGram(n)(scores.clone(), History([row], 8)), expected)


def test_processor_registry_reports_unknown_name():
    with pytest.raises(UsageError, match="did you mean 'top_p'"):
        PROCESSORS.get("top_q")


@pytest.mark.parametrize("cls, arg, flag", [
    (TopP, 0.0, "--top-p"), (TopP, 1.01, "--top-p"), (TypicalP, 1.5, "--typical-p"), (TypicalP, 0.0, "--typical-p"),
    (Temperature, -1.0, "--temperature"), (Temperature, 0.0, "--temperature"), (RepetitionPenalty, 0.0, "--repetition-penalty"),
    (MinP, -0.1, "--min-p"), (MinP, 1.5, "--min-p"), (NoRepeatNGram, 0, "--no-repeat-ngram"),
])
def test_out_of_range_settings_are_usage_errors(cls, arg, flag):
    with pytest.raises(UsageError, match=f"^{flag} must be .*, got {arg}$"):
        cls(arg)


@pytest.mark.parametrize("cls, arg", [(TopP, 1.0), (MinP, 0.0), (MinP, 1.0), (RepetitionPenalty, 0.5), (TypicalP, 0.99)])
def test_settings_at_the_edge_of_their_range_are_accepted(cls, arg):
    cls(arg)


# -- streaming ----------------------------------------------------------------------------

def _byte_tok():
    """ids are raw UTF-8 bytes; decode like a byte-level BPE (incomplete chars → U+FFFD)."""
    return lambda ids: bytes(ids).decode("utf-8", errors="replace")


def test_detokenizer_emits_whole_characters_only():
    text = "héllo 世界 🎉!"
    detok = Detokenizer(_byte_tok())
    pieces = [detok.push(b) for b in text.encode()]
    assert "".join(pieces) + detok.flush() == text
    assert all("\ufffd" not in p for p in pieces)
    assert "世" in pieces and "🎉" in pieces  # a multi-byte char arrives in one piece


def test_detokenizer_keeps_spacing_from_context():
    vocab = {0: "▁Hello", 1: "▁world", 2: "!"}

    def decode(ids):  # sentencepiece-like: leading space of the first piece is stripped
        return "".join(vocab[i] for i in ids).replace("▁", " ").lstrip(" ")

    detok = Detokenizer(decode, context=[0])
    assert detok.push(1) + detok.push(2) == " world!"


@pytest.mark.parametrize(
    "stops, expected", [(["STOP"], "abc "), (["xyz", " S"], "abc"), (["nothing"], "abc STOP here")]
)
def test_stop_strings_across_token_boundaries(stops, expected):
    chunks = ["ab", "c S", "T", "OP", " here"]
    matcher, out, stopped = StopMatcher(stops), [], False
    for c in chunks:
        text, stopped = matcher.push(c)
        out.append(text)
        if stopped:
            break
    if not stopped:
        out.append(matcher.flush())
    assert "".join(out) == expected


def test_stop_matcher_holds_back_only_possible_prefixes():
    m = StopMatcher(["</s>"])
    assert m.push("hi <") == ("hi ", False)
    assert m.push("/b") == ("</b", False)


def test_sequence_finish_reasons():
    decode = _byte_tok()
    seen = []
    s = Sequence(decode, [65], max_new_tokens=10, eos_ids=[0], stops=["cd"], on_text=seen.append)
    for t in b"abcde":
        if s.push(t):
            break
    assert (s.text, s.finish_reason, s.tokens) == ("ab", "stop", list(b"abcd"))
    assert "".join(seen) == "ab"
    s = Sequence(decode, [65], max_new_tokens=10, eos_ids=[0])
    assert not s.push(ord("x")) and s.push(0)
    assert (s.text, s.finish_reason, s.tokens) == ("x", "eos", [ord("x"), 0])
    s = Sequence(decode, [65], max_new_tokens=2)
    s.push(ord("x")), s.push(ord("y"))
    assert (s.text, s.finish_reason) == ("xy", "length")


def test_sequence_flushes_partial_stop_prefix_at_length():
    s = Sequence(_byte_tok(), [65], max_new_tokens=3, stops=["zzz"])
    for t in b"azz":
        s.push(t)
    assert (s.text, s.finish_reason) == ("azz", "length")

