"""`llmctl eval`: perplexity and log-likelihoods equal transformers', tasks, bad input, CLI."""

from __future__ import annotations

import json
import math

import pytest

import torch
import transformers

from conftest import tiny_llama  # noqa: E402
from llmctl.core.evaluate.lm import ScoringModel, rolling_windows  # noqa: E402

TEXT = (
    "The quick brown fox jumps over the lazy dog. A stitch in time saves nine.\n"
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer\n"
    "the slings and arrows of outrageous fortune, or to take arms against a sea of troubles.\n"
) * 4


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny HF Llama checkpoint with a byte-level BPE tokenizer (BOS/EOS/PAD)."""
    from llmctl.core.evaluate import builtin

    words = " ".join(builtin.DETERMINERS + builtin.ADJECTIVES + builtin.NOUNS + builtin.VERBS)
    texts = [TEXT, "Sentence: 0123456789 + = - Copy: Output:", words] * 3
    return tiny_llama(tmp_path_factory.mktemp("tiny-llama"), texts, vocab=300, context=64)


@pytest.fixture(scope="module")
def hf_model(hf_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tok(hf_dir):
    from llmctl.core.tokenizer import load_tokenizer

    return load_tokenizer(hf_dir)


@pytest.fixture
def lm(hf_model, tok):
    return ScoringModel(hf_model, tok, max_length=64, batch_size=3)


def hf_strided_nll(model, ids: list[int], max_length: int, stride: int) -> tuple[float, int]:
    """The transformers perplexity-guide loop (token count from the shifted labels)."""
    ids_t = torch.tensor([ids])
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + max_length, len(ids))
        trg_len = end - prev_end
        input_ids = ids_t[:, begin:end]
        target = input_ids.clone()
        target[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target).loss
        n = int((target[:, 1:] != -100).sum())
        nll += loss.item() * n
        count += n
        prev_end = end
        if end == len(ids):
            break
    return nll, count


# ---------------------------------------------------------------- perplexity


@pytest.mark.parametrize("max_length,stride", [(32, 32), (32, 12), (64, 40), (17, 5)])
def test_perplexity_equals_transformers(lm, hf_model, tok, tmp_path, max_length, stride):
    from llmctl.core.evaluate.perplexity import perplexity

    text = TEXT[: len(TEXT) // 2]
    data = tmp_path / "text.txt"
    data.write_text(text)
    ids = tok.encode(text)
    nll, count = hf_strided_nll(hf_model, ids, max_length, stride)
    result = perplexity(lm, [data], max_length=max_length, stride=stride)
    assert result["tokens"] == count
    assert result["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-4)
    assert result["nll"] == pytest.approx(nll / count, rel=1e-4)
    assert result["bits_per_byte"] == pytest.approx(nll / len(text.encode()) / math.log(2), rel=1e-4)
    assert result["word_perplexity"] == pytest.approx(math.exp(nll / len(text.split())), rel=1e-4)


@pytest.mark.parametrize("onednn", [True, False])
def test_llmctl_model_perplexity_equals_transformers(hf_dir, hf_model, tok, tmp_path, onednn):
    """The product path (the checkpoint loaded as an llmctl model, trimmed last layer, head in
    pieces, on CPU float32 by oneDNN when torch has it) against the transformers loop."""
    from llmctl.core.evaluate.perplexity import perplexity
    from llmctl.core.model.io import load_model

    lm = ScoringModel(load_model(hf_dir)[0], tok, max_length=64, batch_size=4)
    assert (lm.projection is not None) == torch.backends.mkldnn.is_available()
    if not onednn:
        lm.projection = None
    data = tmp_path / "text.txt"
    data.write_text(TEXT)
    ids = tok.encode(TEXT)
    for max_length, stride in [(64, 64), (64, 24)]:
        nll, count = hf_strided_nll(hf_model, ids, max_length, stride)
        result = perplexity(lm, [data], max_length=max_length, stride=stride)
        assert result["tokens"] == count
        assert result["nll"] == pytest.approx(nll / count, rel=1e-5)


def test_perplexity_streams_in_chunks(lm, tmp_path, monkeypatch):
    """Chunked reading (cut before non-space lines) gives the same windows as one piece."""
    from llmctl.core.evaluate import perplexity as ppl

    data = tmp_path / "text.txt"
    data.write_text(TEXT)
    whole = ppl.perplexity(lm, [data], max_length=32, stride=16)
    monkeypatch.setattr(ppl, "CHUNK_CHARS", 50)
    chunks = list(ppl.read_chunks(data, ppl.TextStats(), 50))
    assert len(chunks) > 3 and "".join(chunks) == TEXT
    streamed = ppl.perplexity(lm, [data], max_length=32, stride=16)
    assert streamed["tokens"] == whole["tokens"]
    assert streamed["perplexity"] == pytest.approx(whole["perplexity"], rel=1e-5)


def test_strided_windows_cover_each_token_once():
    from llmctl.core.evaluate.perplexity import strided_windows

    tokens = list(range(23))
    for max_length, stride in [(8, 8), (8, 3), (8, 1), (30, 7)]:
        for chunking in (1, 5, 100):
            chunks = [tokens[i : i + chunking] for i in range(0, len(tokens), chunking)]
            scored = [t for row, n in strided_windows(chunks, max_length, stride) for t in row[len(row) - n :]]
            if stride < max_length:
                assert scored == tokens[1:]  # everything but the first token, once
            else:
                assert scored == [t for t in tokens if t % max_length]


# ---------------------------------------------------------------- log-likelihoods


def hf_continuation_logprob(model, context: list[int], continuation: list[int]) -> float:
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
    targets = ids[0, 1:]
    return logprobs[torch.arange(len(targets)), targets][-len(continuation):].sum().item()


def test_loglikelihood_equals_hf_per_choice_sums(lm, hf_model, tok):
    requests = [lm.encode_pair("The quick brown fox", c) for c in [" jumps", " sat on the mat", " is"]]
    requests.append(lm.encode_pair("To be, or not to be, ", "that is the question"))
    scores = lm.loglikelihood(requests)
    for (context, continuation), score in zip(requests, scores):
        assert score.tokens == len(continuation)
        assert score.logprob == pytest.approx(hf_continuation_logprob(hf_model, context, continuation), rel=1e-5)


def test_batching_does_not_change_scores(hf_model, tok):
    requests = [(tok.encode(TEXT[:n]), tok.encode(TEXT[n : n + m])) for n, m in [(5, 9), (40, 3), (90, 30), (1, 1)]]
    reference = ScoringModel(hf_model, tok, max_length=64, batch_size=1).loglikelihood(requests)
    for batch_size, max_tokens in [(4, 16384), (3, 100), (2, 1)]:
        lm = ScoringModel(hf_model, tok, max_length=64, batch_size=batch_size, max_batch_tokens=max_tokens)
        for a, b in zip(lm.loglikelihood(requests), reference):
            assert a.logprob == pytest.approx(b.logprob, rel=1e-5) and (a.greedy, a.tokens) == (b.greedy, b.tokens)


def test_head_in_pieces_equals_whole(hf_dir, tok, monkeypatch):
    """An llmctl model's head runs a few rows at a time: same scores and greedy flags."""
    import llmctl.core.evaluate.lm as lm_module
    from llmctl.core.model.io import load_model

    lm = ScoringModel(load_model(hf_dir)[0], tok, max_length=64, batch_size=4)
    requests = [(tok.encode(TEXT[:n]), tok.encode(TEXT[n : n + m])) for n, m in [(5, 9), (40, 3), (90, 30), (1, 1)]]
    whole = lm.loglikelihood(requests, share_min_tokens=10**9)
    monkeypatch.setattr(lm_module, "HEAD_CHUNK", 1)
    monkeypatch.setattr(lm_module, "HEAD_CHUNK_ROWS", 3)
    for a, b in zip(lm.loglikelihood(requests, share_min_tokens=10**9), whole):
        assert a.logprob == pytest.approx(b.logprob, rel=1e-6) and (a.greedy, a.tokens) == (b.greedy, b.tokens)


def test_shared_context_cache_equals_hf_and_plain_rows(hf_dir, hf_model, tok):
    """Choices sharing a context reuse its KV cache: same scores as whole rows and as HF."""
    from llmctl.core.model.io import load_model

    model = load_model(hf_dir)[0]
    lm = ScoringModel(model, tok, max_length=64, batch_size=4)
    context = TEXT[:60]
    requests = [lm.encode_pair(context, c) for c in [" the", " a long continuation of words", " x", " and so"]]
    requests += [lm.encode_pair(TEXT[:7], " y"), lm.encode_pair(TEXT[:300], " truncated on the left")]
    requests += [lm.encode_pair(TEXT[20:50], c) for c in [" one", " two words"]]  # a second group, shorter
    calls = []
    score_shared = lm._score_shared
    lm._score_shared = lambda prefixes, conts: calls.extend(map(len, conts)) or score_shared(prefixes, conts)
    shared = lm.loglikelihood(requests, share_min_tokens=1)
    assert calls.count(4) == 1 and calls.count(2) == 1  # two groups, batched: contexts left-padded
    small = ScoringModel(model, tok, max_length=64, batch_size=4, max_batch_tokens=40)  # one group per pass
    for a, b in zip(small.loglikelihood(requests, share_min_tokens=1), shared):
        assert a.logprob == pytest.approx(b.logprob, rel=1e-5) and (a.greedy, a.tokens) == (b.greedy, b.tokens)
    plain = lm.loglikelihood(requests, share_min_tokens=10**9)
    assert lm.loglikelihood(requests)[0].logprob == pytest.approx(shared[0].logprob, rel=1e-5)
    for (ctx, cont), a, b in zip(requests, shared, plain):
        assert a.logprob == pytest.approx(b.logprob, rel=1e-5) and (a.greedy, a.tokens) == (b.greedy, b.tokens)
        if len(ctx) + len(cont) <= 65:
            assert a.logprob == pytest.approx(hf_continuation_logprob(hf_model, ctx, cont), rel=1e-5)


def test_encode_pair_moves_trailing_space():
    class Chars:
        bos_id, eos_id = 0, 1

        def encode(self, text, add_special_tokens=False):
            return [ord(c) for c in text]

    lm = ScoringModel(torch.nn.Identity(), Chars(), max_length=8)
    context, continuation = lm.encode_pair("Q: ", "A")
    assert context == [ord("Q"), ord(":")] and continuation == [ord(" "), ord("A")]


def test_loglikelihood_rolling_equals_full_sum(lm, hf_model, tok):
    ids = tok.encode(TEXT)[:150]
    assert [t for _, cont in rolling_windows(ids, 0, 64) for t in cont] == ids
    (score,) = lm.loglikelihood_rolling([ids])
    expected = sum(hf_continuation_logprob(hf_model, ctx, cont) for ctx, cont in rolling_windows(ids, 0, 64))
    assert score.tokens == len(ids)
    assert score.logprob == pytest.approx(expected, rel=1e-5)
    # a short document is one window conditioned on the prefix token
    short = ids[:20]
    assert lm.loglikelihood_rolling([short])[0].logprob == pytest.approx(
        hf_continuation_logprob(hf_model, [0], short), rel=1e-5)


# ---------------------------------------------------------------- multiple choice


def test_acc_norm_uses_character_length():
    from llmctl.core.evaluate.choice import choice_metrics

    # raw log-likelihood prefers the short choice; per character the long one wins
    result = choice_metrics([[-2.0, -3.0]], [["ab", "abcdefghij"]], [1])
    assert result["acc"] == 0.0 and result["acc_norm"] == 1.0
    result = choice_metrics([[-1.0, -5.0], [-4.0, -1.0]], [["x", "y"], ["x", "y"]], [0, 0])
    assert result["acc"] == 0.5 and result["acc_stderr"] == pytest.approx(0.5)


def write_mc_task(tmp_path, rows, **extra):
    data = tmp_path / "mc.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    lines = ["type: multiple_choice", "dataset: {path: mc.jsonl}", 'prompt: "Q: {{ question }}\\nA:"',
             "choices: options", "gold: label", *(f"{k}: {json.dumps(v)}" for k, v in extra.items())]
    task = tmp_path / "mc.yaml"
    task.write_text("\n".join(lines) + "\n")
    return task


MC_ROWS = [
    {"question": "The quick brown", "options": ["fox", "sea of troubles", "nine"], "label": 0},
    {"question": "To be, or not to", "options": ["be", "question"], "label": 0},
    {"question": "A stitch in time saves", "options": ["nine", "the dog", "arrows"], "label": 0},
]


def test_multiple_choice_task_matches_hf_sums(lm, hf_model, tmp_path):
    from llmctl.core.evaluate.tasks import load_task

    task = load_task(str(write_mc_task(tmp_path, MC_ROWS)))
    result = task.run(lm)
    acc, acc_norm = [], []
    for row in MC_ROWS:
        lls = []
        for choice in row["options"]:
            context, continuation = lm.encode_pair(f"Q: {row['question']}\nA:", " " + choice)
            lls.append(hf_continuation_logprob(hf_model, context, continuation))
        acc.append(max(range(len(lls)), key=lls.__getitem__) == row["label"])
        normed = [ll / len(c) for ll, c in zip(lls, row["options"])]
        acc_norm.append(max(range(len(lls)), key=normed.__getitem__) == row["label"])
    assert result["examples"] == 3
    assert result["acc"] == pytest.approx(sum(acc) / 3) and result["acc_norm"] == pytest.approx(sum(acc_norm) / 3)


def test_fewshot_is_seeded_from_the_fewshot_split(tmp_path):
    from llmctl.core.evaluate.tasks import load_task

    shots = [{"question": f"shot{i}", "options": ["a", "b"], "label": i % 2} for i in range(10)]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in shots))
    path = write_mc_task(tmp_path, MC_ROWS, fewshot_delimiter="\n##\n")
    text = path.read_text().replace("dataset: {path: mc.jsonl}", "dataset: {path: mc.jsonl, fewshot_path: train.jsonl}")
    path.write_text(text)
    task = load_task(str(path), {"num_fewshot": 3})
    docs = task.documents()
    first, again = task.contexts(docs), task.contexts(docs)
    assert first == again  # seeded
    for context, doc in zip(first, docs):
        parts = context.split("\n##\n")
        assert len(parts) == 4 and parts[-1] == f"Q: {doc[1]['question']}\nA:"
        for part in parts[:3]:
            i = int(part.split("shot")[1].split("\n")[0])
            assert part == f"Q: shot{i}\nA: {'ab'[i % 2]}"
    other = load_task(str(path), {"num_fewshot": 3})
    other.fewshot_seed = 7
    assert other.contexts(docs) != first


# ---------------------------------------------------------------- built-in tasks


def test_builtin_datasets_are_deterministic():
    from llmctl.core.evaluate import builtin

    for name in ("arithmetic", "word_order", "copy", "reverse"):
        assert builtin.generate(name, 20, 0) == builtin.generate(name, 20, 0)
        assert builtin.generate(name, 20, 0) != builtin.generate(name, 20, 1)
    for doc in builtin.generate("word_order", 50, 0):
        assert len(set(doc["choices"])) == 4
        words = doc["choices"][doc["gold"]].split()
        assert words[0] in builtin.DETERMINERS and words[2] in builtin.NOUNS and words[3] in builtin.VERBS
    for doc in builtin.generate("arithmetic", 20, 0):
        assert int(doc["answer"]) == eval(f"{doc['a']} {doc['op']} {doc['b']}")
    doc = builtin.generate("reverse", 1, 0)[0]
    assert doc["target"].split() == doc["input"].split()[::-1]


def test_shipped_task_presets_load():
    from llmctl.config import list_presets
    from llmctl.core.evaluate.tasks import load_task

    names = list_presets("eval")
    assert {"perplexity", "word_order", "arithmetic", "copy", "reverse"} <= set(names)
    for name in names:
        task = load_task(name)
        if name != "perplexity" and task.dataset.benchmark is None:  # benchmarks: tests/test_benchmarks.py
            assert task.documents()


def train_on_sentences(model, tok, steps: int = 30):
    """A plain torch loop on built-in word_order sentences (a different seed from the eval)."""
    import random

    from llmctl.core.evaluate import builtin

    rng = random.Random(99)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        rows = [tok.encode("Sentence: " + " ".join(builtin.sentence(rng))) for _ in range(16)]
        width = max(map(len, rows))
        ids = torch.tensor([[0] + r + [1] * (width - len(r)) for r in rows])
        labels = ids.clone()
        labels[:, 0] = -100
        for b, r in enumerate(rows):
            labels[b, len(r) + 2 :] = -100
        loss = model(ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_trained_model_beats_chance_on_word_order(hf_dir, tok):
    from llmctl.core.evaluate.tasks import load_task

    torch.manual_seed(0)
    config = transformers.AutoConfig.from_pretrained(hf_dir)
    model = train_on_sentences(transformers.LlamaForCausalLM(config), tok)
    task = load_task("word_order", {"limit": 60})
    untrained = task.run(ScoringModel(transformers.LlamaForCausalLM(config), tok, max_length=64))
    result = task.run(ScoringModel(model, tok, max_length=64))
    assert result["acc"] - 3 * result["acc_stderr"] > 0.25  # chance is 0.25
    assert result["acc"] > untrained["acc"]


# ---------------------------------------------------------------- generation


class FakeResult:
    def __init__(self, text):
        self.text = text


def test_generation_metrics_regex_and_self_consistency(monkeypatch, tmp_path):
    import llmctl.core.generate as gen
    from llmctl.core.evaluate.metrics import corpus_bleu
    from llmctl.core.evaluate.tasks import load_task

    outputs = iter([
        # doc 1: three samples, majority "12"
        "so the answer is 12", "I think 13", "= 12.", "answer 7", "answer 7", "answer 8",
    ])
    calls = []

    def fake_generate(model, tok, prompts, cfg, context=None, report=None, first_index=0):
        calls.append((prompts, cfg))
        return [FakeResult(next(outputs)) for _ in prompts]

    monkeypatch.setattr(gen, "generate", fake_generate)
    (tmp_path / "q.jsonl").write_text('{"q": "5+7", "a": "12"}\n{"q": "3+4", "a": ["seven", "7"]}\n')
    (tmp_path / "t.yaml").write_text(
        "type: generate\ndataset: {path: q.jsonl}\nprompt: 'Q: {{ q }}'\ntarget: a\nuntil: [\"\\n\\n\"]\n"
        "answer_regex: '(\\d+)'\nmetrics: [exact_match, bleu]\n")
    task = load_task(str(tmp_path / "t.yaml"), {"samples": 3, "chain_of_thought": True})
    result = task.run(ScoringModel(torch.nn.Identity(), None, max_length=64, batch_size=8))
    prompts, cfg = calls[0]
    assert prompts == ["Q: 5+7 Let's think step by step."] * 3 + ["Q: 3+4 Let's think step by step."] * 3
    assert cfg.temperature > 0 and cfg.stop == ["\n\n"]
    assert result["exact_match"] == 1.0 and result["examples"] == 2
    assert result["bleu"] == pytest.approx(corpus_bleu(["12", "7"], [["12"], ["seven", "7"]]))


def test_generation_task_with_llmctl_model(hf_dir, tok, tmp_path):
    """A generation task end to end through `llmctl.core.generate` on a loaded checkpoint: its
    scores are those of the model's greedy continuations, cut at `until`, each against its own
    document's target (targets made from the continuations, so the scores are not all 0)."""
    import json

    from llmctl.core.evaluate.metrics import METRICS
    from llmctl.core.evaluate.tasks import load_task
    from llmctl.core.generate import GenerationConfig, generate
    from llmctl.core.model.io import load_model

    model, cfg = load_model(hf_dir)
    lm = ScoringModel(model, tok, max_length=cfg.max_seq_len, batch_size=2)
    inputs = ["a b c", "x y", "h a g a p"]
    prompts = [f"Copy: {x}\nOutput:" for x in inputs]
    full = [r.text for r in generate(model, tok, prompts, GenerationConfig(max_new_tokens=8, eos_ids=[]),
                                     context=cfg.max_seq_len)]
    stop = full[0][3]  # cuts the first continuation after 3 characters or fewer
    cut = [t[: t.index(stop)] if stop in t else t for t in full]
    assert len(cut[0]) <= 3 < len(full[0]) and len(set(cut)) == 3
    targets = [cut[0], cut[1][: len(cut[1]) // 2] or "q", "zzz"]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"input": x, "target": t}) + "\n"
                                              for x, t in zip(inputs, targets)))
    (tmp_path / "t.yaml").write_text(json.dumps({
        "type": "generate", "dataset": {"path": "d.jsonl"}, "prompt": "Copy: {{ input }}\nOutput:",
        "until": [stop], "max_new_tokens": 8, "metrics": ["exact_match", "chrf", "bleu", "rougeL"],
        "normalize": {"strip": False}}))
    result = load_task(str(tmp_path / "t.yaml"), {}).run(lm)
    assert result["examples"] == 3 and result["exact_match"] == pytest.approx(1 / 3)
    references = [[t] for t in targets]
    for name in ("chrf", "bleu", "rougeL"):
        assert result[name] == pytest.approx(METRICS.get(name)(cut, references)[0]), name


def test_sampled_generations_do_not_depend_on_the_batch_size(hf_dir, tok, tmp_path):
    """A self-consistency task (3 samples a document): every sample is drawn by its own seeded
    generator, so `--batch-size` changes the speed, not the generations or the scores."""
    import json

    from llmctl.core.evaluate.tasks import load_task
    from llmctl.core.model.io import load_model

    model, cfg = load_model(hf_dir)
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"input": x, "target": "a"}) + "\n"
                                              for x in ["a b c", "x y", "h a g a p"]))
    (tmp_path / "t.yaml").write_text(json.dumps({
        "type": "generate", "dataset": {"path": "d.jsonl"}, "prompt": "Copy: {{ input }}\nOutput:",
        "max_new_tokens": 6, "temperature": 1.5, "metrics": ["exact_match"]}))
    runs = []
    for size in (1, 3):
        task = load_task(str(tmp_path / "t.yaml"), {"samples": 3})
        task.samples_log = []
        task.run(ScoringModel(model, tok, max_length=cfg.max_seq_len, batch_size=size, seed=11))
        runs.append([r["generations"] for r in task.samples_log])
    assert runs[0] == runs[1]
    assert any(len(set(g)) > 1 for g in runs[0])  # the samples of a document differ


# ---------------------------------------------------------------- bad input


def test_malformed_task_yaml_names_the_key(tmp_path):
    from llmctl.core.evaluate.tasks import load_task
    from llmctl.errors import ConfigError

    bad = tmp_path / "bad.yaml"
    cases = {
        "type: multiple_choice\ndataset: {path: x.jsonl}\nchoicez: opts\n": "choicez",
        "dataset: {path: x.jsonl}\n": "'type'",
        "type: multiple_chioce\n": "multiple_choice",
        "type: multiple_choice\ndataset: {path: x.jsonl, sizee: 3}\n": "dataset.sizee",
        "type: multiple_choice\ndataset: {}\n": "'dataset'",
        "type: generate\ndataset: {builtin: copy}\nmetrics: [blue]\n": "'metrics'",
        "type: generate\ndataset: {builtin: copy}\nprompt: '{{ input '\n": "'prompt'",
        "type: multiple_choice\ndataset: {path: x.jsonl}\nnum_fewshot: many\n": "'num_fewshot'",
        "type: [\n": "invalid YAML",
    }
    for text, expected in cases.items():
        bad.write_text(text)
        with pytest.raises(ConfigError, match=expected):
            load_task(str(bad))


def test_bad_data_errors_name_the_line(lm, tmp_path):
    from llmctl.core.evaluate.perplexity import perplexity
    from llmctl.core.evaluate.tasks import load_task
    from llmctl.errors import DataError

    rows = [MC_ROWS[0], {**MC_ROWS[1], "label": 5}]
    with pytest.raises(DataError, match=r"mc\.jsonl:2: gold index 5 out of range for 2 choices"):
        load_task(str(write_mc_task(tmp_path, rows))).run(lm)
    (tmp_path / "mc.jsonl").write_text(json.dumps(MC_ROWS[0]) + "\n{not json\n")
    with pytest.raises(DataError, match=r"mc\.jsonl:2: invalid JSON"):
        load_task(str(tmp_path / "mc.yaml")).run(lm)
    (tmp_path / "mc.jsonl").write_text(json.dumps({"question": "x", "label": 0}) + "\n")
    with pytest.raises(DataError, match=r"mc\.jsonl:1: missing field 'options'"):
        load_task(str(tmp_path / "mc.yaml")).run(lm)
    (tmp_path / "mc.jsonl").write_text("\n")
    with pytest.raises(DataError, match="empty"):
        load_task(str(tmp_path / "mc.yaml")).run(lm)
    (tmp_path / "mc.jsonl").unlink()
    with pytest.raises(DataError, match="mc.jsonl not found"):
        load_task(str(tmp_path / "mc.yaml")).run(lm)
    with pytest.raises(DataError, match="nope.txt: no such file"):
        perplexity(lm, [tmp_path / "nope.txt"])
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="no tokens to score"):
        perplexity(lm, [tmp_path / "empty.txt"])


# ---------------------------------------------------------------- CLI


@pytest.fixture
def ckpt(hf_dir, tmp_path):
    import shutil

    return shutil.copytree(hf_dir, tmp_path / "ckpt")


def test_cli_json_records_and_compares_checkpoints(llmctl, ckpt, tmp_path):
    import shutil

    (tmp_path / "text.txt").write_text(TEXT)
    other = shutil.copytree(ckpt, tmp_path / "other")
    r = llmctl("eval", ckpt, other, "--task", "word_order", "--task", "perplexity", "--data", tmp_path / "text.txt",
               "--max-length", 32, "--limit", 8, "--json", "--quiet")
    assert r.code == 0, r.stderr
    results = r.json()["results"]
    assert list(results) == [str(ckpt), str(other)]
    assert results[str(ckpt)] == results[str(other)]
    assert results[str(ckpt)]["word_order"]["examples"] == 8
    assert set(results[str(ckpt)]["perplexity"]) == {"perplexity", "nll", "bits_per_byte", "word_perplexity", "tokens"}
    history = json.loads((ckpt / "llmctl.json").read_text())["metrics"]
    assert [m["task"] for m in history] == ["word_order", "perplexity"]
    assert history[1]["metrics"] == results[str(ckpt)]["perplexity"]
    r = llmctl("eval", ckpt, "--task", "word_order", "--limit", 4, "--no-record")
    assert r.code == 0 and "acc_norm" in r.stderr and "word_order" in r.stderr
    assert len(json.loads((ckpt / "llmctl.json").read_text())["metrics"]) == 2


def test_cli_errors(llmctl, ckpt, tmp_path):
    (ckpt / "tokenizer.json").unlink()
    r = llmctl("eval", ckpt, "--task", "word_order")
    assert r.code == 1 and "no tokenizer" in r.stderr
    r = llmctl("eval", ckpt, "--task", "word_ordre")
    assert r.code == 2 and "did you mean 'word_order'" in r.stderr
    r = llmctl("eval", ckpt, "--task", "word_order", "--stride", 4)
    assert r.code == 2 and "--stride does not apply" in r.stderr
    r = llmctl("eval", tmp_path / "missing", "--task", "word_order")
    assert r.code != 0 and "missing" in r.stderr


def test_rolling_task_reports_document_perplexity(lm, tmp_path):
    from llmctl.core.evaluate.tasks import load_task

    docs = [TEXT[:200], TEXT[200:260]]
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs))
    (tmp_path / "wiki.yaml").write_text("type: loglikelihood_rolling\ndataset: {path: docs.jsonl}\n")
    result = load_task(str(tmp_path / "wiki.yaml")).run(lm)
    scores = lm.loglikelihood_rolling([lm.encode(d) for d in docs])
    nll = -sum(s.logprob for s in scores)
    assert result["tokens"] == sum(len(lm.encode(d)) for d in docs) and result["examples"] == 2
    assert result["word_perplexity"] == pytest.approx(math.exp(nll / sum(len(d.split()) for d in docs)))
    assert result["bits_per_byte"] == pytest.approx(nll / sum(len(d.encode()) for d in docs) / math.log(2))


def test_a_broken_later_checkpoint_fails_before_the_first_is_evaluated(hf_dir, tmp_path, monkeypatch):
    """`eval A MISSING`: the error comes before A's (possibly hours of) evaluation, not after it."""
    import llmctl.core.evaluate.runner as runner
    from llmctl.core.evaluate.tasks import load_task
    from llmctl.errors import CheckpointError, UsageError

    loaded = []
    monkeypatch.setattr(runner, "load_scorer", lambda path, **kw: loaded.append(path))
    notok = tmp_path / "notok"
    notok.mkdir()
    (notok / "config.json").write_text((hf_dir / "config.json").read_text())
    for bad, says in ((tmp_path / "missing", "does not exist"), (notok, "no weights")):
        with pytest.raises((CheckpointError, UsageError), match=says):
            runner.evaluate([hf_dir, bad], [load_task("word_order", {"limit": 2})], device="cpu", dtype=None,
                            record=False)
    assert loaded == []


def test_a_checkpoint_given_twice_is_refused_before_any_evaluation(hf_dir, monkeypatch):
    """`eval X ./X` (or `eval X X`) evaluated X twice and showed one column; refused up front."""
    import os

    import llmctl.core.evaluate.runner as runner
    from llmctl.core.evaluate.tasks import load_task
    from llmctl.errors import UsageError

    loaded = []
    monkeypatch.setattr(runner, "load_scorer", lambda path, **kw: loaded.append(path))
    monkeypatch.chdir(hf_dir.parent)
    task = [load_task("word_order", {"limit": 2})]
    for twice, says in (([hf_dir, hf_dir], f"checkpoint {hf_dir} is given twice$"),
                        ([hf_dir.name, f".{os.sep}{hf_dir.name}{os.sep}"],
                         rf"checkpoint \.{os.sep}{hf_dir.name}{os.sep} is given twice \(as {hf_dir.name}\)$")):
        with pytest.raises(UsageError, match=says):
            runner.evaluate(twice, task, device="cpu", dtype=None, record=False)
    assert loaded == []
