"""Verifiers and corpora at their edges: each verifier's verdicts, reasons and whole error
lines; regexes without groups and matches out of range; tolerances met exactly; reward
functions called with TRL's keyword arguments; the sandboxed program and its limits as
given; reward models without a pad id or with pad id 0, against transformers."""

import dataclasses
import shutil

import pytest

from llmctl.core.rl.verifiers import VERIFIERS, Verdict, build_verifiers, score
from llmctl.errors import ConfigError, DataError


def _verify(name, completions, records, prompts=None, **settings):
    verifier = VERIFIERS.get(name)(**settings)
    return verifier.verify(prompts or [""] * len(completions), completions, records)


# -- exact_match, regex, number -----------------------------------------------------------------
@pytest.mark.parametrize("name, settings", [("exact_match", {}), ("regex", {"pattern": "x"}), ("number", {}),
                                            ("unit_tests", {"field": "answer"})])
def test_a_missing_field_is_named_with_the_verifier_and_the_records_fields(name, settings):
    with pytest.raises(DataError) as e:
        _verify(name, ["x"], [{"target": "1", "question": "q"}], **settings)
    assert str(e.value) == f"verifier {name}: a record lacks the field 'answer' (it has question, target)"


def test_exact_match_ignores_articles_when_asked():
    """SQuAD's `normalize_answer` drops a/an/the; only `ignore_articles` turns that on here."""
    records = [{"answer": "Eiffel Tower"}] * 2
    completions = ["the Eiffel Tower", "an Eiffel Tower"]
    assert _verify("exact_match", completions, records) == [Verdict(0.0, "wrong")] * 2
    assert _verify("exact_match", completions, records, ignore_articles=True) == [Verdict(1.0, "correct")] * 2


def test_regex_without_groups_takes_the_whole_match_and_out_of_range_matches_are_no_answer():
    regex = VERIFIERS.get("regex")
    assert regex(pattern=r"-?\d+").extract("3 then -4") == "-4"
    assert regex(pattern=r"-?\d+", match=0).extract("3 then -4") == "3"
    assert regex(pattern=r"-?\d+", match=1).extract("only 3") is None  # one past the last
    assert regex(pattern=r"-?\d+", match=-2).extract("only 3") is None
    assert regex(pattern=r"answer: (\d*)").extract("answer: ") == ""  # matched, its group empty
    assert regex(pattern=r"(a)|(b)").extract("b") == "b"  # the first non-empty group
    got = _verify("regex", ["only 3", "answer: ", "7"], [{"answer": "3"}, {"answer": "3"}, {"answer": "7"}],
                  pattern=r"answer: (\d*)|^(\d+)$")
    assert got == [Verdict(0.0, "no_answer"), Verdict(0.0, "wrong"), Verdict(1.0, "correct")]
    with pytest.raises(ConfigError) as e:
        regex(pattern="")
    assert str(e.value) == "verifier regex: give a pattern"


def test_number_tolerance_is_inclusive_and_a_fieldless_number_is_named():
    records = [{"answer": "12"}] * 3
    got = _verify("number", ["12.5", "12.75", "11.5"], records, tolerance=0.5)
    assert [v.reason for v in got] == ["correct", "wrong", "correct"]
    assert _verify("number", ["12", "12.000001"], records[:2], tolerance=0.0) == \
        [Verdict(1.0, "correct"), Verdict(0.0, "wrong")]
    with pytest.raises(DataError) as e:
        _verify("number", ["12"], [{"answer": "n/a"}])
    assert str(e.value) == "verifier number: field 'answer' holds no number: 'n/a'"


# -- function ------------------------------------------------------------------------------------
CALLS = []


def strict_reward(prompts, completions, answer, tag):
    """A reward function with no **kwargs: any extra column is a TypeError."""
    CALLS.append({"prompts": prompts, "completions": completions, "answer": answer, "tag": tag})
    return [None if c == "skip" else float(c == a) for c, a in zip(completions, answer)]


def two_rewards(prompts, completions, **columns):
    return [1.0, 0.0]


class Grader:
    @staticmethod
    def reward(prompts, completions, **columns):
        return [len(p) for p in prompts]


def test_function_gets_trls_keyword_arguments():
    """TRL (GRPOTrainer._calculate_rewards) passes every record key but prompt, completion and
    completion_ids as a list beside `prompts` and `completions`."""
    CALLS.clear()
    records = [{"prompt": "p1", "completion": "ref", "completion_ids": [7], "answer": "4", "tag": "a"},
               {"prompt": "p2", "completion": "ref", "completion_ids": [8], "answer": "5", "tag": "b"}]
    got = _verify("function", ["4", "skip"], records, prompts=["p1", "p2"],
                  entry_point="test_edges_verifiers_corpus:strict_reward")
    assert got[0] == Verdict(1.0, "scored") and got[1].reason == "none" and got[1].reward != got[1].reward
    assert CALLS == [{"prompts": ["p1", "p2"], "completions": ["4", "skip"], "answer": ["4", "5"], "tag": ["a", "b"]}]
    [bound] = build_verifiers({"function": {"entry_point": "test_edges_verifiers_corpus:Grader.reward"}})
    assert score([bound], ["ab", "abcd"], ["x", "y"], [{}, {}]) == ([[2.0], [4.0]], [["scored"], ["scored"]])
    with pytest.raises(DataError) as e:
        _verify("function", ["a", "b", "c"], [{}] * 3, entry_point="test_edges_verifiers_corpus:two_rewards")
    assert str(e.value) == "verifier function test_edges_verifiers_corpus:two_rewards: 2 rewards for 3 completions"


@pytest.mark.parametrize("entry_point, message", [
    (":strict_reward", "verifier function: entry_point must be 'module:function', not ':strict_reward'"),
    ("test_edges_verifiers_corpus:", "verifier function: entry_point must be 'module:function', "
                                     "not 'test_edges_verifiers_corpus:'"),
    ("math:pi", "verifier function: math:pi is not callable"),
    ("math:nothing", "verifier function: cannot load math:nothing: module 'math' has no attribute 'nothing'"),
])
def test_function_refusals_are_whole_lines(entry_point, message):
    with pytest.raises(ConfigError) as e:
        VERIFIERS.get("function")(entry_point=entry_point)
    assert str(e.value) == message


# -- unit_tests ----------------------------------------------------------------------------------
def test_unit_tests_program_limits_and_workers_are_as_given(monkeypatch):
    """The program is prompt (only with include_prompt, only a text prompt) + code + tests; the
    limits and worker count reach the sandbox."""
    import llmctl.core.sandbox as sandbox

    seen = []

    def run_many(programs, limits, workers=None):
        seen.append((programs, limits, workers))
        return [sandbox.Result("passed", 0, "", "", 0.0)] * len(programs)

    monkeypatch.setattr(sandbox, "run_many", run_many)
    prompts = ["def helper(): pass\n", [{"role": "user", "content": "hi"}]]
    completions = ["```python\nx = 1\n```", "y = 2"]
    records = [{"tests": "assert x"}, {"tests": "assert y"}]
    _verify("unit_tests", completions, records, prompts, timeout=1.5, memory_mb=300, workers=3)
    _verify("unit_tests", completions, records, prompts, include_prompt=True)
    (plain, limits, workers), (with_prompt, _, default_workers) = seen
    assert plain == ["x = 1\n\n\nassert x\n", "y = 2\n\nassert y\n"]
    assert with_prompt == ["def helper(): pass\nx = 1\n\n\nassert x\n", "y = 2\n\nassert y\n"]
    assert limits == sandbox.Limits(timeout=1.5, memory_mb=300) and workers == 3 and default_workers is None


def test_a_program_killed_by_a_signal_is_killed_not_failed():
    got = _verify("unit_tests", ["import os\nos.abort()\n", "raise SystemExit(3)\n"], [{"tests": ""}] * 2)
    assert got == [Verdict(0.0, "killed"), Verdict(0.0, "failed")]


# -- build_verifiers and score -------------------------------------------------------------------
class Plain:
    """A plugin verifier that is not a dataclass: its settings go to its constructor unchecked."""

    def __init__(self, scale=1.0):
        self.scale = scale

    def verify(self, prompts, completions, records):
        return [Verdict(self.scale * len(p), "scored") for p in prompts]


@dataclasses.dataclass
class NoSettings:
    def verify(self, prompts, completions, records):
        return [Verdict(1.0, "correct")] * len(completions)


def test_build_verifiers_plugins_and_whole_refusals(monkeypatch):
    VERIFIERS.names()  # plugins loaded first, so these stay the only additions
    monkeypatch.setitem(VERIFIERS._items, "plain_test", Plain)
    monkeypatch.setitem(VERIFIERS._items, "nosettings_test", NoSettings)
    [bound] = build_verifiers({"plain_test": {"scale": 2.0, "weight": 3}})
    assert (bound.name, bound.weight, bound.verifier.scale) == ("plain_test", 3.0, 2.0)
    assert score([bound], ["ab", "abc"], ["", ""], [{}, {}]) == ([[4.0], [6.0]], [["scored"], ["scored"]])
    refusals = [
        ({}, "objective_args.verifiers: a mapping of verifier name → settings, e.g. {number: {}}"),
        ({"nosettings_test": {"x": 1}}, "objective_args.verifiers.nosettings_test: unknown setting(s) x; "
                                        "it takes none (and weight)"),
        ({"number": {"feild": 1, "b": 2}}, "objective_args.verifiers.number: unknown setting(s) b, feild; "
                                          "it takes field, tolerance (and weight)"),
        ({"regex": {"pattern": 5}}, "objective_args.verifiers.regex: first argument must be string or compiled pattern"),
    ]
    for spec, message in refusals:
        with pytest.raises(ConfigError) as e:
            build_verifiers(spec)
        assert str(e.value) == message


# -- reward_model --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """A tiny LlamaForSequenceClassification (random score head) and its base's tokenizer."""
    import torch
    import transformers

    from conftest import tiny_llama

    root = tmp_path_factory.mktemp("rm")
    (root / "base").mkdir()
    base = tiny_llama(root / "base", ["two plus three is five. " * 20], vocab=120, context=64, scale=1.0)
    config = transformers.AutoConfig.from_pretrained(base)
    config.num_labels = 1
    torch.manual_seed(0)
    return base, transformers.LlamaForSequenceClassification(config).eval()


@pytest.mark.parametrize("pad", [None, 0])
def test_reward_model_without_a_pad_id_or_with_pad_id_zero_equals_transformers(classifier, pad, tmp_path):
    """Without a pad id rows go one at a time (a padded batch would read the padding); pad id 0
    pads with 0, not with a stand-in."""
    import torch
    import transformers

    base, model = classifier
    model.config.pad_token_id = pad
    model.save_pretrained(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(base / name, tmp_path / name)
    prompts, completions = ["two plus three is", "two", "three plus"], [" five.", " plus three is five", " two"]
    [bound] = build_verifiers({"reward_model": {"path": str(tmp_path)}})
    got = bound.verifier.verify(prompts, completions, [{}] * 3)
    tok = transformers.AutoTokenizer.from_pretrained(base)
    with torch.no_grad():
        want = [model(**tok(p + c, return_tensors="pt", add_special_tokens=False)).logits[0, 0].item()
                for p, c in zip(prompts, completions)]
    assert [v.reward for v in got] == pytest.approx(want, abs=1e-5) and len(set(want)) == 3
    assert {v.reason for v in got} == {"scored"}


def test_reward_model_refuses_a_directory_without_config_and_a_model_without_a_score_head(classifier, tmp_path):
    base, _ = classifier
    with pytest.raises(ConfigError) as e:
        build_verifiers({"reward_model": {"path": str(tmp_path)}})
    assert str(e.value) == f"verifier reward_model: give path=CHECKPOINT, a reward model directory (not '{tmp_path}')"
    [bound] = build_verifiers({"reward_model": {"path": str(base)}})
    with pytest.raises(ConfigError) as e:
        bound.verifier.verify(["p"], ["c"], [{}])
    assert str(e.value) == f"verifier reward_model: {base} has no score head (not a reward model)"
