"""Verifiers: each built-in's verdicts, the sandboxed unit-test runner's limits, configuration errors."""

import math

import pytest

from llmctl.core.rl.verifiers import VERIFIERS, Verdict, build_verifiers, extract_code, parse_number, score
from llmctl.errors import ConfigError, DataError, UsageError


def _verify(name, completions, records, prompts=None, **settings):
    verifier = VERIFIERS.get(name)(**settings)
    return verifier.verify(prompts or [""] * len(completions), completions, records)


def test_exact_match_normalises_as_eval_does():
    got = _verify("exact_match", [" Paris ", "paris", "Lyon"], [{"answer": "Paris"}] * 3)
    assert got == [Verdict(1.0, "correct"), Verdict(0.0, "wrong"), Verdict(0.0, "wrong")]
    assert _verify("exact_match", ["paris!"], [{"answer": "Paris"}], ignore_case=True,
                   ignore_punctuation=True) == [Verdict(1.0, "correct")]
    with pytest.raises(DataError, match="lacks the field 'answer'"):
        _verify("exact_match", ["x"], [{"target": "x"}])


def test_regex_takes_the_chosen_match_and_group():
    records = [{"answer": "42"}] * 3
    completions = ["so #### 42", "#### 41 then #### 42", "no marker 42"]
    assert [v.reason for v in _verify("regex", completions, records, pattern=r"#### (\d+)")] == \
        ["correct", "correct", "no_answer"]
    assert _verify("regex", completions[1:2], records[:1], pattern=r"#### (\d+)", match=0)[0].reason == "wrong"
    with pytest.raises(ConfigError, match="pattern"):
        VERIFIERS.get("regex")(pattern="(")


def test_number_compares_the_last_number_numerically():
    assert parse_number("1,234.5 and then -7") == -7.0 and parse_number("none") is None
    got = _verify("number", [" 12", "it is 1,200.0", "-3", "twelve", "7 no 8"],
                  [{"answer": "12"}, {"answer": 1200}, {"answer": "-3"}, {"answer": "12"}, {"answer": "7"}])
    assert [v.reason for v in got] == ["correct", "correct", "correct", "no_answer", "wrong"]
    assert [v.reward for v in got] == [1, 1, 1, 0, 0]


def reward_length(prompts, completions, answer, **columns):
    """A TRL-style reward function (prompts, completions, dataset columns as lists)."""
    return [None if c == "skip" else len(c) / 10 + (a == "x") for c, a in zip(completions, answer)]


def test_function_is_called_as_trl_calls_reward_functions():
    got = _verify("function", ["abc", "skip", "abcdefghij"], [{"answer": "x"}, {"answer": "y"}, {"answer": "y"}],
                  prompts=["p"] * 3, entry_point="test_verifiers:reward_length")
    assert got[0] == Verdict(1.3, "scored") and math.isnan(got[1].reward) and got[2].reward == 1.0
    for bad in ("nomodule", "no_such_module_xyz:f", "test_verifiers:missing"):
        with pytest.raises(ConfigError):
            VERIFIERS.get("function")(entry_point=bad)


def test_unit_tests_run_in_the_sandbox_with_time_and_memory_limits():
    tests = {"tests": "assert add(2, 3) == 5"}
    completions = [
        "```python\ndef add(a, b):\n    return a + b\n```\nDone.",  # passes (code from the fence)
        "def add(a, b):\n    return a - b\n",  # fails its test
        "def add(a, b):\n    while True:\n        pass\nadd(1, 2)\n",  # runs out of time
        "def add(a, b):\n    return a + b\nblob = bytearray(400 * 2**20)\n",  # runs out of memory
    ]
    got = _verify("unit_tests", completions, [tests] * 4, timeout=1.0, memory_mb=200)
    assert [v.reason for v in got] == ["passed", "failed", "timeout", "memory"]
    assert [v.reward for v in got] == [1.0, 0.0, 0.0, 0.0]
    assert extract_code("text\n```py\nx = 1\n```") == "x = 1\n" and extract_code("x = 2") == "x = 2"


def test_build_and_score_weighted_verifiers():
    bound = build_verifiers({"number": {"weight": 2}, "exact_match": {}})
    assert [(b.name, b.weight) for b in bound] == [("number", 2.0), ("exact_match", 1.0)]
    rewards, reasons = score(bound, ["p", "p"], ["5", "the answer is 5"], [{"answer": "5"}] * 2)
    assert rewards == [[1.0, 1.0], [1.0, 0.0]] and reasons == [["correct", "correct"], ["correct", "wrong"]]
    with pytest.raises(UsageError, match="did you mean 'number'"):
        build_verifiers({"numbr": {}})
    with pytest.raises(ConfigError, match="unknown setting"):
        build_verifiers({"number": {"feild": "x"}})
    with pytest.raises(ConfigError, match="mapping"):
        build_verifiers({})
    assert VERIFIERS.entry_point_group == "llmctl.verifiers"


def test_reward_model_scores_equal_transformers_sequence_classifier(tmp_path):
    """A transformers LlamaForSequenceClassification as a verifier: the same scores, padded rows included."""
    import shutil

    import torch
    import transformers

    from conftest import tiny_llama

    (tmp_path / "base").mkdir()
    base = tiny_llama(tmp_path / "base", ["two plus three is five. " * 20], vocab=120, context=64, scale=1.0)
    config = transformers.AutoConfig.from_pretrained(base)
    config.num_labels, config.pad_token_id = 1, 2
    torch.manual_seed(0)
    classifier = transformers.LlamaForSequenceClassification(config).eval()
    classifier.save_pretrained(tmp_path / "rm")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(base / name, tmp_path / "rm" / name)
    prompts, completions = ["two plus three is", "two plus", "three"], [" five.", " three is five", " is"]
    [verifier] = build_verifiers({"reward_model": {"path": str(tmp_path / "rm"), "batch_size": 2}})
    ours = [v.reward for v in verifier.verifier.verify(prompts, completions, [{}] * 3)]
    tok = transformers.AutoTokenizer.from_pretrained(base)
    with torch.no_grad():
        theirs = [classifier(**tok(p + c, return_tensors="pt", add_special_tokens=False)).logits[0, 0].item()
                  for p, c in zip(prompts, completions)]
    assert ours == pytest.approx(theirs, abs=1e-5) and len(set(ours)) == 3
    with pytest.raises(ConfigError, match="give path"):
        build_verifiers({"reward_model": {}})
