"""Verifiers and corpora at their edges: each verifier's verdicts, reasons and whole error
lines; regexes without groups and matches out of range; tolerances met exactly; reward
functions called with TRL's keyword arguments; the sandboxed program and its limits as
given; reward models without a pad id or with pad id 0, against transformers. Corpora: which
files a directory or a recursive glob holds, `.jsonl.gz`, gzip on stdin, JSONL in lists of 1024,
the byte count as reading goes (streamed, not read whole), invalid UTF-8 summed over files, files
closed and stdin left open, and every refusal's whole line; `iter_jsonl` and `read_stdin`.
Merge searches: the objective's parsing, orientation and calls, the recipe paths, and the (1+λ)
evolution strategy and greedy soup against transcriptions of their rules, with the merges and
evals replaced by a recorder (their own tests run them for real)."""

import dataclasses
import errno
import gzip
import io
import json
import random
import shutil
import sys
from pathlib import Path

import pytest

import llmctl.core.data.corpus as corpus_module
import llmctl.core.merge.search as search
from llmctl.core.data.corpus import Corpus, expand_sources, iter_jsonl, read_stdin
from llmctl.core.rl.verifiers import VERIFIERS, Verdict, build_verifiers, score
from llmctl.errors import ConfigError, DataError, UsageError


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
        ({"regex": {"pattern": 5}},
         "objective_args.verifiers.regex: first argument must be string or compiled pattern"),
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


# -- corpora -------------------------------------------------------------------------------------
def _error(fn, *args, kind=DataError) -> str:
    with pytest.raises(kind) as e:
        fn(*args)
    return str(e.value)


def test_a_directory_holds_corpus_files_by_their_last_suffix_and_globs_recurse(tmp_path):
    for name in ("notes.v2.txt", "data.2024.jsonl", "x.v2.txt.gz", "plain.md", ".hidden.txt", "skip.txt.bak",
                 "s/b.txt", "s/t/c.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    assert expand_sources([str(tmp_path)]) == [str(tmp_path / n) for n in (
        "data.2024.jsonl", "notes.v2.txt", "plain.md", "s/b.txt", "s/t/c.txt", "x.v2.txt.gz")]
    assert expand_sources([f"{tmp_path}/s/**/*.txt"]) == [str(tmp_path / "s/b.txt"), str(tmp_path / "s/t/c.txt")]
    assert _error(expand_sources, [str(tmp_path / "nope-X.txt")]) == f"{tmp_path}/nope-X.txt: no such file or directory"
    assert _error(expand_sources, [], kind=UsageError) == "no corpus given (a file, directory, glob or - for stdin)"


def test_jsonl_gz_records_come_in_lists_of_1024_with_the_bytes_read_so_far(tmp_path):
    path = tmp_path / "a.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.writelines(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(2500))
    corpus = Corpus([str(path)])
    assert corpus.total_bytes == path.stat().st_size
    lists = [docs for _, doc_lists in corpus.files() for docs in doc_lists]
    assert [len(d) for d in lists] == [1024, 1024, 452] and lists[2][-1] == "doc 2499"
    assert corpus.stats.documents == 2500 and corpus.stats.bytes == path.stat().st_size


def test_bytes_are_counted_as_files_are_read_and_text_is_streamed(tmp_path, monkeypatch):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("one\n\ntwo\n")
    b.write_text("three\n")
    corpus = Corpus([str(a), str(b)])
    assert corpus.total_bytes == a.stat().st_size + b.stat().st_size
    seen = [corpus.stats.bytes for _, doc_lists in corpus.files() for _ in doc_lists]
    assert seen == [a.stat().st_size] * 2 + [a.stat().st_size + b.stat().st_size]  # a's last paragraph at its end
    big = tmp_path / "big.txt"
    big.write_text("paragraph of text\n\n" * 20000)
    monkeypatch.setattr(corpus_module, "CHUNK_CHARS", 1000)
    corpus = Corpus([str(big)])
    _, doc_lists = next(corpus.files())
    first = next(doc_lists)  # the paragraphs of the first 1000 characters, the file not read whole
    assert first == ["paragraph of text"] * 52 and 0 < corpus.stats.bytes < big.stat().st_size / 2
    doc_lists.close()


def test_invalid_utf8_is_summed_over_files_and_lone_surrogates_at_both_ends(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"a\xff\n")
    (tmp_path / "b.txt").write_bytes(b"b\xfe\xfe\n")
    corpus = Corpus([str(tmp_path)])
    assert list(corpus.documents()) == ["a\ufffd", "b\ufffd\ufffd"] and corpus.stats.invalid_utf8 == 3
    (tmp_path / "s.jsonl").write_text(json.dumps({"text": "a\udfff\ue000\ud800b"}) + "\n")
    corpus = Corpus([str(tmp_path / "s.jsonl")])
    assert list(corpus.documents()) == ["a\ufffd\ue000\ufffdb"] and corpus.stats.invalid_utf8 == 2


def test_gzip_on_stdin_is_read_and_named_stdin(monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(gzip.compress(b"six\n\nseven\n"))))
    corpus = Corpus(["-"])
    assert [(name, [d for docs in lists for d in docs]) for name, lists in corpus.files()] == \
        [("<stdin>", ["six", "seven"])]
    assert not sys.stdin.buffer.closed  # stdin is not ours to close
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(gzip.compress(b"hello world" * 99)[:-30])))
    assert _error(lambda: list(Corpus(["-"]).documents())) == \
        "<stdin>: cannot read (Compressed file ended before the end-of-stream marker was reached)"


def test_files_are_closed_and_read_errors_are_one_line(tmp_path, monkeypatch):
    path = tmp_path / "a.txt"
    path.write_text("one\n")
    opened = []

    def tracking_open(name, mode="r"):
        opened.append(open(name, mode))
        return opened[-1]

    monkeypatch.setattr(corpus_module, "open", tracking_open, raising=False)
    assert list(Corpus([str(path)]).documents()) == ["one"] and opened[0].closed

    class Failing(io.RawIOBase):
        def readinto(self, buffer):
            raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(corpus_module, "open", lambda name, mode="r": Failing(), raising=False)
    assert _error(lambda: list(Corpus([str(path)]).documents())) == f"{path}: cannot read (Input/output error)"
    corpus = Corpus([str(path)])
    monkeypatch.setattr(corpus_module, "open", lambda name, mode="r": open(tmp_path / "gone.txt", mode),
                        raising=False)
    assert _error(lambda: list(corpus.documents())) == f"{path}: cannot read (No such file or directory)"


def test_jsonl_refusals_are_whole_lines(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"text": "a"}\n{"text": 1}\n')
    assert _error(lambda: list(Corpus([str(path)]).documents())) == f"{path}:2: field 'text' is int, not text"
    path.write_bytes(b'{"a": 1}\n\n[1]\n')
    assert _error(lambda: list(iter_jsonl(path))) == f"{path}:3: expected a JSON object per line"
    path.write_bytes(b'{"a": 1}\n{"a": "\xff"}\n')
    assert _error(lambda: list(iter_jsonl(path))) == \
        f"{path}:2: not UTF-8 text (byte 0xff at offset 7); convert it first, e.g. iconv -t UTF-8"
    path.write_bytes(b'{"a": 1}\n{oops\n')
    assert _error(lambda: list(iter_jsonl(path))) == f"{path}:2: invalid JSON (Expecting property name enclosed " \
        "in double quotes)"
    path.write_bytes(b'{"a": 1}\n\n{"a": "\xc3\xa9"}\n')
    assert list(iter_jsonl(path)) == [(1, {"a": 1}), (3, {"a": "\u00e9"})]


def test_read_stdin_checks_utf8_from_bytes_or_from_a_text_only_stdin(monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("h\u00e9llo".encode())))
    assert read_stdin() == "h\u00e9llo"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"ab\xffc")))
    message = "stdin: not UTF-8 text (byte 0xff at offset 2); convert it first, e.g. iconv -t UTF-8"
    assert _error(read_stdin) == message
    monkeypatch.setattr(sys, "stdin", io.StringIO("h\u00e9llo"))  # no .buffer
    assert read_stdin() == "h\u00e9llo"
    monkeypatch.setattr(sys, "stdin", io.StringIO("ab\udcffc"))  # a byte 0xff kept by surrogateescape
    assert _error(read_stdin) == message


# -- merge searches ------------------------------------------------------------------------------
def test_objective_is_parsed_whole_and_scores_oriented(tmp_path, monkeypatch):
    import llmctl.core.evaluate.runner as runner
    import llmctl.core.evaluate.tasks as tasks

    (tmp_path / "val.txt").write_text("x")
    spec = {"task": "perplexity", "data": "val.txt", "metric": "nll", "limit": 3}
    got = search.Objective.parse(spec, "s.yaml", relative_to=tmp_path, device="cpu", dtype="float32")
    assert got == search.Objective("perplexity", [str(tmp_path / "val.txt")], "nll", 3, "cpu", "float32")
    assert search.Objective.parse({"task": "t", "data": ["a", "b"]}, "s").data == ["a", "b"]
    refusals = [({"task": "t", "zeta": 1, "beta": 2}, "s.yaml: evaluation: unknown key 'beta'"),
                ({"task": "t", "data": [5]}, "s.yaml: evaluation.data: a model must be a checkpoint path, found 5"),
                ({"data": "x"}, "s.yaml: evaluation: expected a mapping with a 'task'")]
    for bad, message in refusals:
        assert _error(search.Objective.parse, bad, "s.yaml", kind=ConfigError) == message

    calls = []
    monkeypatch.setattr(tasks, "load_tasks", lambda names, overrides: calls.append((names, overrides)) or ["T"])

    def evaluate(checkpoints, task_list, **kw):
        calls.append((checkpoints, task_list, kw))
        return {str(checkpoints[0]): {"T": {"perplexity": 5.0, "acc": 0.25, "bits_per_byte": 2.0}}}

    monkeypatch.setattr(runner, "evaluate", evaluate)
    objective = search.Objective("t", ["d"], None, 3, "cpu", "bfloat16")
    assert objective.score("ck") == -5.0 and calls == [
        (["t"], {"data": ["d"], "limit": 3}), (["ck"], ["T"], {"device": "cpu", "dtype": "bfloat16", "record": False})]
    for metric, want in (("acc", 0.25), ("bits_per_byte", -2.0)):
        objective.metric = metric
        assert objective.score("ck") == want
    objective.metric = "f1"
    assert _error(objective.score, "ck", kind=ConfigError) == \
        "evaluation: task t has no metric 'f1' (it reports perplexity, acc, bits_per_byte)"
    assert objective.evaluations == 3


def test_search_paths_start_from_the_recipes_value_in_range_and_set_through_lists(tmp_path):
    recipe = {"models": [{"model": "a"}, {"model": "b", "parameters": {"weight": 0.25}}], "parameters": {"t": 2}}
    start = search._start
    assert start(recipe, "models.1.parameters.weight", 0.0, 1.0) == 0.25
    assert start(recipe, "models.1.parameters.weight", 0.25, 0.5) == 0.25  # both bounds are in range
    assert start(recipe, "models.1.parameters.weight", 0.0, 0.25) == 0.25
    assert start(recipe, "parameters.t", 0.0, 1.0) == 0.5 and type(start(recipe, "parameters.t", 0, 4)) is float
    assert start(recipe, "parameters.t", 3.0, 4.0) == 3.5 and start(recipe, "models.0.model", 1.0, 2.0) == 1.5
    assert start(recipe, "models.0.parameters.weight", -1.0, 2.0) == 0.5
    search._set(recipe, "models.0.parameters.weight", 0.5, "s")  # a missing mapping is made
    search._set(recipe, "models.1", 0.75, "s")
    assert recipe == {"models": [{"model": "a", "parameters": {"weight": 0.5}}, 0.75], "parameters": {"t": 2}}
    assert _error(search._set, recipe, "models.7.weight", 0.0, "s", kind=ConfigError) == \
        "s: search path 'models.7.weight' does not name a place in the recipe"


@pytest.fixture
def recorded_merges(monkeypatch):
    """`merge` replaced by writing the recipe (and its keywords) to the output directory; recipes
    stay raw dicts (with the parsed recipe's `models()`, which the output check reads)."""
    merges = []

    def merge(recipe, out, **kw):
        Path(out).mkdir()
        (Path(out) / "recipe.json").write_text(json.dumps(recipe))
        merges.append((recipe, kw))
        return {"out": str(out)}

    monkeypatch.setattr(search, "merge", merge)
    monkeypatch.setattr(search, "parse_recipe", lambda raw, where, relative_to=None: RawRecipe(raw))
    return merges


class RawRecipe(dict):
    def models(self) -> list[str]:
        return [m["model"] if isinstance(m, dict) else m for m in self.get("models", [])]


class RecipeObjective:
    """Scores a recorded merge by a function of its recipe (or a candidate by name)."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def score(self, checkpoint):
        path = Path(checkpoint) / "recipe.json"
        value = self.fn(json.loads(path.read_text()) if path.exists() else str(checkpoint))
        self.calls.append(value)
        return value


def _es_by_hand(f, start, bounds, budget, population, sigma, seed):
    """The (1+λ) evolution strategy of `evolve`'s docstring, written out: the points scored in order."""
    rng, best = random.Random(seed), dict(start)
    best_score, scored = f(best), [dict(start)]
    while len(scored) < budget:
        children = []
        for _ in range(min(population, budget - len(scored))):
            child = {p: min(hi, max(lo, best[p] + rng.gauss(0, sigma) * (hi - lo))) for p, (lo, hi) in bounds.items()}
            children.append(child)
            scored.append(child)
        top = max(children, key=f)
        if f(top) > best_score:
            best, best_score, sigma = top, f(top), sigma * 1.5
        else:
            sigma *= 0.7
    return scored, best


def _target(point):
    return -(point["models.1.parameters.weight"] - 0.3) ** 2 - (point["parameters.t"] - 1.9) ** 2


@pytest.mark.parametrize("f, budget, population, sigma, seed", [
    (_target, 9, 3, 0.5, 5),  # the last generation cut to the budget; a clamp is hit
    (_target, 13, 4, 0.1, 1),
    (lambda point: 0.0, 7, 2, 0.25, 0),  # a flat objective: a tie is no improvement
])
def test_evolve_is_the_one_plus_lambda_strategy_written_out(recorded_merges, tmp_path, f, budget, population, sigma,
                                                            seed):
    recipe = {"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 1.0}},
                                                   {"model": "b", "parameters": {"weight": 0.9}}]}
    bounds = {"models.1.parameters.weight": (0.0, 1.0), "parameters.t": (-2.0, 2.0)}

    def of_recipe(r):
        return f({"models.1.parameters.weight": r["models"][1]["parameters"]["weight"],
                  "parameters.t": r["parameters"]["t"]})

    spec = {"recipe": recipe, "search": {k: list(v) for k, v in bounds.items()}, "evaluation": {"task": "x"},
            "budget": budget, "population": population, "sigma": sigma, "seed": seed}
    result = search.evolve(spec, RecipeObjective(of_recipe), tmp_path / "out")
    start = {"models.1.parameters.weight": 0.9, "parameters.t": 0.0}
    points, best = _es_by_hand(f, start, bounds, budget, population, sigma, seed)
    history = recorded_merges[-1][1]["record"]["history"]
    assert [h["point"] for h in history] == points and result["best"] == best and result["evaluations"] == budget
    assert result["score"] == f(best) == max(h["score"] for h in history)
    assert recorded_merges[-1][0] == result["recipe"] and result["recipe"]["parameters"]["t"] == best["parameters.t"]
    assert [kw["seed"] for _, kw in recorded_merges] == [seed] * (budget + 1)
    assert not list(tmp_path.glob(".out.merge-*"))
    if budget == 9:
        assert any(v in (lo, hi) for p in points for k, (lo, hi) in bounds.items() for v in [p[k]])


def test_greedy_soup_keeps_a_candidate_only_when_the_soup_strictly_improves(recorded_merges, tmp_path):
    alone = {"a": 1.0, "b": 3.0, "c": 2.0, "d": 0.5}
    soups = {("b", "c"): 3.0, ("a", "b"): 3.5, ("a", "b", "d"): 4.0}  # c ties the soup: not kept

    def fn(r):
        if isinstance(r, str):
            return alone[r]
        return soups[tuple(sorted(m["model"] for m in r["models"]))]

    raw = {"merge_method": "greedy_soup", "models": ["a", "b", "c", "d"], "evaluation": {"task": "x"},
           "dtype": "float32"}
    result = search.greedy_soup(raw, RecipeObjective(fn), tmp_path / "out")
    assert result["kept"] == ["b", "a", "d"] and result["score"] == 4.0
    assert result["trials"] == [{"model": "c", "score": 3.0, "kept": False}, {"model": "a", "score": 3.5, "kept": True},
                                {"model": "d", "score": 4.0, "kept": True}]
    final, kw = recorded_merges[-1]
    assert final == {"merge_method": "linear", "dtype": "float32",
                     "models": [{"model": m, "parameters": {"weight": 1.0}} for m in ("b", "a", "d")]}
    assert kw["record"]["individual_scores"] == alone and kw["record"]["search"] == "greedy_soup"
