"""Edges of the distillation criterion, the chunked loss, strided perplexity and multiple choice
that the parity tests miss (found by mutation testing): the criterion against TRL's GKD loss, the
chunked gradient under a scaled loss, perplexity's defaults, bounds, files and progress against the
transformers perplexity loop, the rolling task and multiple choice against lm-eval's own metrics."""

from __future__ import annotations

import json
import math
import re
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from _recorder import Recorder
from llmctl.core.distill.criterion import Criterion

V, H = 11, 6


class _Student(nn.Module):
    """The two things `Criterion` asks of a model: `head` (features -> logits) and `cfg.vocab_size`."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.head = nn.Linear(H, V, bias=False)
        nn.init.normal_(self.head.weight, std=1.5)
        self.cfg = SimpleNamespace(vocab_size=V)


def _batch(labelled: int, seed: int = 0):
    """Features [2, 4, H] and labels with `labelled` positions not -100."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.full((2, 4), -100)
    labels.view(-1)[torch.randperm(8, generator=g)[:labelled]] = torch.randint(0, V, (labelled,), generator=g)
    return torch.randn(2, 4, H, generator=g), torch.randn(2, 4, H, generator=g), labels


def _gkd(student_logits, teacher_logits, labels, beta, temperature):
    from trl.experimental.gkd import GKDTrainer

    return GKDTrainer.generalized_jsd_loss(student_logits, teacher_logits, labels=labels, beta=beta,
                                           temperature=temperature)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("labelled", [0, 1, 5])
def test_criterion_is_t_squared_times_trls_gkd_loss(beta, labelled):
    """TRL's `GKDTrainer.generalized_jsd_loss` (masked, summed over positions, divided by the count of
    labelled ones, at least 1) times T²: the loss alone when "ce" has no weight; the CE part is the
    student's masked cross-entropy; one labelled position is that position's divergence, none is 0."""
    student, teacher = _Student(0), _Student(1).requires_grad_(False)
    features, t_features, labels = _batch(labelled)
    T = 2.0
    crit = Criterion({"jsd": 0.7}, temperature=T, beta=beta, chunk_rows=3)
    total, parts = crit(student, SimpleNamespace(features=features), labels, teacher=teacher,
                        teacher_out=SimpleNamespace(features=t_features))
    s, t = student.head(features), teacher.head(t_features)
    reference = T * T * _gkd(s, t, labels, beta, T)
    assert parts["jsd"].item() == pytest.approx(reference.item(), rel=1e-5, abs=1e-7)
    assert total.item() == pytest.approx(0.7 * reference.item(), rel=1e-5, abs=1e-7)
    ce = F.cross_entropy(s.reshape(-1, V), labels.reshape(-1), reduction="sum") / max(labelled, 1)
    assert parts["ce"].item() == pytest.approx(ce.item(), rel=1e-5, abs=1e-7)
    if labelled:
        assert total.item() > 0
        (grad,) = torch.autograd.grad(0.7 * reference, student.head.weight)
        total.backward()
        assert torch.allclose(student.head.weight.grad, grad, atol=1e-6)


def test_criterion_refusals_name_what_is_missing():
    student = _Student(0)
    features, _, labels = _batch(3)
    out = SimpleNamespace(features=features, hidden_states=[features])
    with pytest.raises(ValueError, match="^a logit loss needs the teacher's outputs or its stored top-k$"):
        Criterion({"forward_kl": 1.0})(student, out, labels)
    ids = torch.zeros(2, 4, 2, dtype=torch.long)
    hidden = r"^a hidden-state loss needs the teacher online \(not stored top-k outputs\)$"
    with pytest.raises(ValueError, match=hidden):
        Criterion({"hidden_mse": 1.0}, layer_map=[(0, 0)])(student, out, labels, topk=(ids, torch.zeros(2, 4, 2)))


# -- fused_chunks ---------------------------------------------------------------------------------


def _chunked_ce(rows: int, n: int = 5, scale: float = 1.0):
    """`fused_chunks` over a linear head's cross-entropy (mean over `n` rows, `rows` at a time), scaled
    by `scale` before the backward pass (as gradient accumulation does): (total, parts, (feature and head
    gradients), (the unchunked loss, its head gradient), the chunks computed)."""
    from llmctl.core.distill.chunked import fused_chunks

    torch.manual_seed(3)
    features, head = torch.randn(n, H, requires_grad=True), nn.Linear(H, V, bias=False)
    targets, seen = torch.randint(0, V, (n,)), []

    def compute(chunk, start, stop):
        seen.append((start, min(stop, n)))
        loss = F.cross_entropy(head(chunk), targets[start:stop], reduction="sum") / n
        return loss, loss.detach()[None]

    total, parts = fused_chunks(compute, features, list(head.parameters()), rows)
    (total * scale).backward()
    direct = F.cross_entropy(head(features.detach()), targets) * scale
    expected = torch.autograd.grad(direct, head.weight)[0]
    return total, parts, (features.grad, head.weight.grad), (direct, expected), seen


def test_fused_chunks_gradient_is_scaled_by_the_upstream_gradient():
    """A loss scaled after the chunks (1/grad_accum, a loss weight) scales the stored gradients."""
    total, parts, (_, head_grad), (direct, expected), _ = _chunked_ce(2, scale=0.25)
    assert (total * 0.25).item() == pytest.approx(direct.item(), rel=1e-6)
    assert parts.item() == pytest.approx(total.item())
    assert torch.allclose(head_grad, expected, atol=1e-7)


@pytest.mark.parametrize("rows", [0, 1])
def test_fused_chunks_of_one_row_and_one_position(rows):
    """`rows` 0 or 1 makes one row at a time (no larger chunk); a single position is a batch like any other."""
    assert _chunked_ce(rows)[-1] == [(i, i + 1) for i in range(5)]
    total, _, (feature_grad, head_grad), (direct, expected), seen = _chunked_ce(rows, n=1)
    assert seen == [(0, 1)] and total.item() == pytest.approx(direct.item(), rel=1e-6)
    assert torch.allclose(head_grad, expected, atol=1e-7) and feature_grad.shape == (1, H)


def test_fused_chunks_refuses_no_positions():
    from llmctl.core.distill.chunked import fused_chunks

    with pytest.raises(ValueError, match="^no positions to compute a loss over$"):
        fused_chunks(lambda *a: None, torch.zeros(0, H), [], 4)


# -- strided perplexity ---------------------------------------------------------------------------

from test_eval import TEXT, hf_dir, hf_model, hf_strided_nll, lm, tok  # noqa: E402, F401  (the tiny HF Llama)


def _text(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_bytes(text.encode())
    return path


def test_perplexity_defaults_are_the_context_and_half_of_it(lm, hf_model, tok, tmp_path):  # noqa: F811
    """No --max-length: the model's context (64); no --stride: half the window, at least 1 (the
    transformers perplexity-guide loop with those windows)."""
    from llmctl.core.evaluate.perplexity import perplexity

    for text, kwargs, (max_length, stride) in [(TEXT[:300], {}, (64, 32)), (TEXT[:300], {"max_length": 40}, (40, 20)),
                                               (TEXT[:40], {"max_length": 2}, (2, 1))]:
        data = _text(tmp_path, "t.txt", text)
        nll, count = hf_strided_nll(hf_model, tok.encode(text), max_length, stride)
        result = perplexity(lm, [data], **kwargs)
        assert result["tokens"] == count and result["nll"] == pytest.approx(nll / count, rel=1e-4), kwargs


def test_perplexity_of_several_files_sums_their_windows(lm, hf_model, tok, tmp_path):  # noqa: F811
    """Each file is windowed on its own (no window spans two files); the NLL, tokens, bytes and words add
    up, and a batch left over from one file is scored before the next."""
    from llmctl.core.evaluate.perplexity import perplexity

    texts = [TEXT[:170], "Zürich — naïve café.\r\n" * 3, TEXT[200:260]]
    paths = [_text(tmp_path, f"{i}.txt", t) for i, t in enumerate(texts)]
    runs = [hf_strided_nll(hf_model, tok.encode(t), 32, 12) for t in texts]
    nll, count = sum(n for n, _ in runs), sum(c for _, c in runs)
    result = perplexity(lm, paths, max_length=32, stride=12)
    n_bytes, words = sum(len(t.encode()) for t in texts), sum(len(t.split()) for t in texts)
    assert result["tokens"] == count
    assert result["nll"] == pytest.approx(nll / count, rel=1e-4)
    assert result["bits_per_byte"] == pytest.approx(nll / n_bytes / math.log(2), rel=1e-4)
    assert result["word_perplexity"] == pytest.approx(math.exp(nll / words), rel=1e-4)


def test_perplexity_windows_and_files_are_checked_with_their_messages(lm, tmp_path):  # noqa: F811
    from llmctl.core.evaluate.perplexity import perplexity
    from llmctl.errors import DataError, UsageError

    data = _text(tmp_path, "t.txt", TEXT[:80])
    for max_length, stride in [(2, 1), (2, 2), (64, 64), (64, 1)]:  # the bounds allowed
        assert perplexity(lm, [data], max_length=max_length, stride=stride)["tokens"] > 0
    for max_length, message in [(1, "--max-length 1: expected 2 … 64 (the model's context)"),
                                (65, "--max-length 65: expected 2 … 64 (the model's context)")]:
        with pytest.raises(UsageError, match=f"^{re.escape(message)}$"):
            perplexity(lm, [data], max_length=max_length)
    for stride in (33, -1):
        with pytest.raises(UsageError, match=f"^--stride {stride}: expected 1 … --max-length \\(32\\)$"):
            perplexity(lm, [data], max_length=32, stride=stride)
    with pytest.raises(UsageError, match="^the perplexity task needs --data FILE$"):
        perplexity(lm, [])
    with pytest.raises(DataError, match=f"^data file {re.escape(str(tmp_path / 'no.txt'))}: no such file$"):
        perplexity(lm, [data, tmp_path / "no.txt"])
    empty = _text(tmp_path, "e.txt", "")
    with pytest.raises(DataError, match=f"^no tokens to score in {re.escape(f'{empty}, {empty}')} "
                                        r"\(empty or a single token\)$"):
        perplexity(lm, [empty, empty])


def test_read_chunks_cuts_before_unindented_lines_once_a_chunk_is_full(tmp_path):
    """A chunk ends once it holds `chunk_chars` or more, and only before a line that starts with a
    non-space; the text, CR LF included, comes back unchanged; bytes are UTF-8 bytes; an invalid byte
    is replaced, not an error."""
    from llmctl.core.evaluate.perplexity import TextStats, read_chunks

    def chunks(text: str | bytes, size: int):
        path = tmp_path / "c.txt"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        stats = TextStats()
        return list(read_chunks(path, stats, size)), (stats.bytes, stats.words)

    assert chunks("abc\nd\n", 4) == (["abc\n", "d\n"], (6, 2))  # full at exactly 4
    assert chunks("ab\nc\nd\n", 4) == (["ab\nc\n", "d\n"], (7, 3))
    assert chunks("aaaa\n\n b\n\tc\nd\n", 4) == (["aaaa\n\n b\n\tc\n", "d\n"], (14, 4))
    assert chunks("abc\nde\nf\n", 4) == (["abc\n", "de\nf\n"], (9, 3))  # a new chunk counts from 0
    assert chunks("é a\r\nb c\r\n", 2) == (["é a\r\n", "b c\r\n"], (11, 4))
    assert chunks(b"ok \xff bad\n", 100) == (["ok \ufffd bad\n"], (11, 3))


def test_exp_saturates_where_float_exp_would_overflow():
    from llmctl.core.evaluate.perplexity import _exp

    assert _exp(708.9) == math.exp(708.9) and _exp(709.9) == math.inf and _exp(1e6) == math.inf
    assert _exp(-1.0) == math.exp(-1.0)


def test_perplexity_task_reads_data_from_the_working_directory_else_the_task_folder(lm, tmp_path,  # noqa: F811
                                                                                   monkeypatch):
    from llmctl.core.evaluate.perplexity import perplexity
    from llmctl.core.evaluate.tasks import Task, load_task

    (tmp_path / "task").mkdir()
    (tmp_path / "cwd").mkdir()
    (tmp_path / "task" / "ppl.yaml").write_text("type: perplexity\ndata: [a.txt, b.txt]\nmax_length: 32\nstride: 5\n")
    a, b = _text(tmp_path / "task", "a.txt", TEXT[:90]), _text(tmp_path / "task", "b.txt", TEXT[90:200])
    cwd_b = _text(tmp_path / "cwd", "b.txt", TEXT[300:330])
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.setattr(Task, "report", Recorder())
    result = load_task(str(tmp_path / "task" / "ppl.yaml")).run(lm)
    assert result == perplexity(lm, [a, cwd_b], max_length=32, stride=5)  # b.txt: the working directory's
    assert result != perplexity(lm, [a, b], max_length=32, stride=5)
    assert result != perplexity(lm, [a, cwd_b], max_length=32)
    assert Task.report.calls[0][:2] == ("progress", "perplexity")  # the runner's reporter reaches it


def test_rolling_task_metrics_are_lm_evals_aggregations(lm, tmp_path):  # noqa: F811
    """lm-eval's wikitext metrics: `weighted_perplexity` over (log-likelihood, words) and (…, bytes),
    `bits_per_byte` over (…, bytes); the token perplexity over the documents' tokens."""
    from lm_eval.api.metrics import bits_per_byte, weighted_perplexity

    from llmctl.core.evaluate.tasks import load_task
    from llmctl.errors import DataError

    docs = [TEXT[:150], "Zürich — naïve café.", TEXT[150:170]]
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs))
    (tmp_path / "wiki.yaml").write_text("type: loglikelihood_rolling\ndataset: {path: docs.jsonl}\n")
    result = load_task(str(tmp_path / "wiki.yaml")).run(lm)
    scores = [s.logprob for s in lm.loglikelihood_rolling([lm.encode(d) for d in docs])]
    tokens = sum(len(lm.encode(d)) for d in docs)
    words = list(zip(scores, [len(d.split()) for d in docs]))
    n_bytes = list(zip(scores, [len(d.encode()) for d in docs]))
    assert result == pytest.approx({
        "word_perplexity": weighted_perplexity(words), "byte_perplexity": weighted_perplexity(n_bytes),
        "bits_per_byte": bits_per_byte(n_bytes), "token_perplexity": math.exp(-sum(scores) / tokens),
        "tokens": tokens, "examples": 3}, rel=1e-5, nan_ok=True)
    (tmp_path / "docs.jsonl").write_text(json.dumps({"text": ""}))
    (tmp_path / "empty.yaml").write_text("type: loglikelihood_rolling\nname: wiki\ndataset: {path: docs.jsonl}\n")
    with pytest.raises(DataError, match="^task wiki: the documents are empty$"):
        load_task(str(tmp_path / "empty.yaml")).run(lm)


def test_strided_windows_come_as_soon_as_a_window_is_full():
    """Streaming: a window is yielded once its last token has arrived, not at the end of the stream."""
    from llmctl.core.evaluate.perplexity import strided_windows

    arrived = []

    def chunks():
        for i in range(0, 20, 4):
            arrived.append(i + 4)
            yield list(range(i, i + 4))

    windows = []
    for row, n in strided_windows(chunks(), 8, 4):
        windows.append(row)
        assert arrived[-1] == row[-1] + 1, (row, arrived)  # no chunk read beyond the window's end
    assert windows == [list(range(i, i + 8)) for i in range(0, 13, 4)]


def test_one_word_and_one_token_documents(lm, hf_model, tok, tmp_path):  # noqa: F811
    """A file of one word: word perplexity over 1 word; a rolling document of one token is scored."""
    from lm_eval.api.metrics import bits_per_byte, weighted_perplexity

    from llmctl.core.evaluate.perplexity import perplexity
    from llmctl.core.evaluate.tasks import load_task

    text = "Sentence:"
    nll, count = hf_strided_nll(hf_model, tok.encode(text), 64, 32)
    assert count >= 1
    result = perplexity(lm, [_text(tmp_path, "w.txt", text)])
    assert result["word_perplexity"] == pytest.approx(math.exp(nll), rel=1e-4)
    assert len(lm.encode("a")) == 1
    (tmp_path / "docs.jsonl").write_text(json.dumps({"text": "a"}))
    (tmp_path / "one.yaml").write_text("type: loglikelihood_rolling\ndataset: {path: docs.jsonl}\n")
    result = load_task(str(tmp_path / "one.yaml")).run(lm)
    (score,) = lm.loglikelihood_rolling([lm.encode("a")])
    assert result["tokens"] == 1
    for key in ("word_perplexity", "byte_perplexity"):  # one word, one byte
        assert result[key] == pytest.approx(weighted_perplexity([(score.logprob, 1)]))
    assert result["bits_per_byte"] == pytest.approx(bits_per_byte([(score.logprob, 1)]))


def test_progress_counts_the_bytes_read_and_the_windows_scored(lm, tmp_path, monkeypatch):  # noqa: F811
    """Perplexity: one bar in bytes over all files, moved after each chunk read and at each file's end,
    with the tokens scored so far; the rolling task: a bar of windows, advanced to its total."""
    from llmctl.core.evaluate import perplexity as ppl
    from llmctl.core.evaluate.tasks import Task, load_task

    monkeypatch.setattr(ppl, "CHUNK_CHARS", 50)
    paths = [_text(tmp_path, "a.txt", TEXT[:170]), _text(tmp_path, "b.txt", TEXT[170:300])]
    sizes = [p.stat().st_size for p in paths]
    chunks = [list(ppl.read_chunks(p, ppl.TextStats(), 50)) for p in paths]
    report = Recorder()
    result = ppl.perplexity(lm, paths, max_length=32, report=report)
    assert report.calls[0] == ("progress", "perplexity", sum(sizes), "B")
    updates = [c[1] for c in report.calls[1:]]
    assert all(set(u) == {"completed", "tokens"} and isinstance(u["tokens"], int) for u in updates)
    read = [sum(sizes[:i]) + sum(len(c) for c in chunks[i][:k + 1]) for i in range(2) for k in range(len(chunks[i]))]
    ends = [sizes[0], sum(sizes)]
    assert [u["completed"] for u in updates] == read[:len(chunks[0])] + ends[:1] + read[len(chunks[0]):] + ends[1:]
    assert updates[-1]["tokens"] == result["tokens"] and 0 < updates[len(chunks[0])]["tokens"] < result["tokens"]

    (tmp_path / "docs.jsonl").write_text(json.dumps({"text": TEXT[:300]}))
    (tmp_path / "wiki.yaml").write_text("type: loglikelihood_rolling\nname: wiki\ndataset: {path: docs.jsonl}\n")
    task = load_task(str(tmp_path / "wiki.yaml"))
    monkeypatch.setattr(Task, "report", report)
    report.calls.clear()
    task.run(lm)
    assert report.calls[0] == ("progress", "wiki", None, "window")
    (total,) = [c[1]["total"] for c in report.calls if c[0] == "update"]
    assert total > 1 and sum(c[1] for c in report.calls if c[0] == "advance") == total


# -- multiple choice ------------------------------------------------------------------------------


def _mc_task(tmp_path, rows, extra: str = "", name: str = "mc"):
    from llmctl.core.evaluate.tasks import load_task

    (tmp_path / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / f"{name}.yaml").write_text(f"type: multiple_choice\nname: {name}\ndataset: {{path: {name}.jsonl}}\n"
                                           f"prompt: \"Q: {{{{ q }}}}\\nA:\"\nchoices: options\ngold: label\n{extra}")
    return load_task(str(tmp_path / f"{name}.yaml"))


def test_multiple_choice_scores_logs_and_groups_each_document(lm, tmp_path, monkeypatch):  # noqa: F811
    """Documents of 2, 3 and 2 choices: each document's log-likelihoods are its own requests' (lm-eval's
    `context + " " + choice`), the sample log holds them, TruthfulQA's mc2 is lm-eval's
    `process_results_mc2`, groups are macro-averaged, and the bar counts the requests."""
    from lm_eval.tasks.truthfulqa.utils import process_results_mc2

    from llmctl.core.evaluate.metrics import aggregate
    from llmctl.core.evaluate.tasks import Task

    rows = [{"q": "The quick brown", "options": ["fox", "sea"], "label": 0, "labels": [1, 0], "s": "a"},
            {"q": "To be, or not to", "options": ["be", "question", "nine"], "label": 2, "labels": [0, 1, 1], "s": "b"},
            {"q": "A stitch in time saves", "options": ["nine", "the dog"], "label": 1, "labels": [1, 1], "s": "a"}]
    task = _mc_task(tmp_path, rows, "metrics: [acc, acc_norm, mc2]\ngroup_by: s\n")
    task.samples_log = []
    monkeypatch.setattr(Task, "report", Recorder())
    result = task.run(lm)
    expected, scores = [], {"acc": [], "acc_norm": [], "mc2": []}
    for line, row in enumerate(rows, start=1):
        requests = [(f"Q: {row['q']}\nA:", f" {c}") for c in row["options"]]
        lls = [s.logprob for s in lm.loglikelihood([lm.encode_pair(*r) for r in requests])]
        norm = [ll / len(c) for ll, c in zip(lls, row["options"])]
        values = {"acc": float(lls.index(max(lls)) == row["label"]),
                  "acc_norm": float(norm.index(max(norm)) == row["label"]),
                  "mc2": float(process_results_mc2({"mc2_targets": {"labels": row["labels"]}},
                                                   [(ll, False) for ll in lls])["acc"])}
        expected.append({"doc": f"{tmp_path / 'mc.jsonl'}:{line}", "requests": requests, "loglikelihoods": lls,
                         "gold": row["label"], **values})
        for k, v in values.items():
            scores[k].append(v)
    assert len(task.samples_log) == 3
    for logged, e in zip(task.samples_log, expected):
        assert logged.pop("loglikelihoods") == pytest.approx(e.pop("loglikelihoods"), rel=1e-5)
        assert logged.pop("mc2") == pytest.approx(e.pop("mc2"), rel=1e-5) and logged == e
    assert result == pytest.approx({**aggregate(scores, ["a", "b", "a"]), "examples": 3}, rel=1e-5, nan_ok=True)
    assert Task.report.calls[0] == ("progress", "mc", 7, "req")
    assert sum(c[1] for c in Task.report.calls if c[0] == "advance") == 7


def test_multiple_choice_gold_answers_and_their_refusals(tmp_path):
    """A gold index as a number or a numeric string, a gold text (its first occurrence, as lm-eval's
    `choices.index`); everything else refused with the document's line."""
    from llmctl.core.evaluate.choice import choice_metrics
    from llmctl.errors import ConfigError, DataError

    task = _mc_task(tmp_path, [{"q": "x", "options": ["a", "b"], "label": 0}])
    where = "f.jsonl:3"

    def options(choices, gold):
        return task.options((where, {"options": choices, "label": gold}))

    assert options(["a", "b"], "1") == (["a", "b"], 1) and options(["a", "b"], 1) == (["a", "b"], 1)
    assert options(["a", "b", "a"], "a") == (["a", "b", "a"], 0) and options(["X1", "b"], "X1")[1] == 0
    assert options(["a", "b"], "b")[1] == 1
    for gold in ("-1", 2, True, 1.5, None):
        message = f"^{where}: gold index {re.escape(repr(gold))} out of range for 2 choices$"
        with pytest.raises(DataError, match=message):
            options(["a", "b"], gold)
    with pytest.raises(DataError, match=f"^{where}: gold answer 'c' is not one of the choices$"):
        options(["a", "b"], "c")
    for choices in ([], "ab", ["a", 1]):
        with pytest.raises(DataError, match=f"^{where}: field 'options' must be a non-empty list of strings$"):
            options(choices, 0)
    with pytest.raises(ConfigError, match="^task bad: config key 'metrics': unknown metric 'f1'; "
                                          "choose from: acc, acc_norm, mc2$"):
        _mc_task(tmp_path, [], "metrics: [acc, f1]\n", name="bad")
    with pytest.raises(ValueError):  # one log-likelihood list per document, one choice list, one gold
        choice_metrics([[0.0, -1.0]], [["a", "b"], ["c", "d"]], [0, 1])


def test_partial_choice_scores_the_shared_continuation_after_each_context(tmp_path):
    """WinoGrande's partial scoring: one request per context — description + the sentence up to the
    blank filled by an option — with the shared continuation after the delimiter."""
    from llmctl.core.evaluate.tasks import load_task

    rows = [{"contexts": ["Ann gave Bo", "Bo gave Ann"], "continuation": "a book.", "gold": 1},
            {"contexts": ["It was", "It is"], "continuation": "late.", "gold": 0}]
    (tmp_path / "w.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "w.yaml").write_text("type: partial_choice\ndataset: {path: w.jsonl}\ndescription: 'D. '\n")
    task = load_task(str(tmp_path / "w.yaml"))
    docs = task.documents()
    options = [task.options(d) for d in docs]
    assert task.requests(docs, options) == [("D. Ann gave Bo", " a book."), ("D. Bo gave Ann", " a book."),
                                            ("D. It was", " late."), ("D. It is", " late.")]
    assert [task.example_target(d) for d in docs] == ["a book.", "late."]
