"""Edges of decoding that the end-to-end comparisons do not reach (found by mutation testing,
docs/testing.md): `search.py`'s fixed-shape one-token step (what `--compile` and CUDA graphs run),
batched beams with penalties and timings; the native decode plan's refusals and edges; matvec's
one-row products; streamed text and stop strings; generation tasks around `generate`."""

from __future__ import annotations

import types

import pytest
import torch
from _recorder import Recorder

from llmctl.core.generate import GenerationConfig, search
from llmctl.core.generate.search import Runner
from llmctl.core.model import ModelConfig, Transformer
from llmctl.core.tokenizer import load_tokenizer
from test_generate import PROMPTS, _hf_generate, _ours, _strip_pad, ckpts, one_thread, tokdir  # noqa: F401

TINY = dict(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=48,
            max_seq_len=64)
BATCHES = {"padded": [[5, 6, 7, 8, 9], [11, 12]], "unpadded": [[5, 6, 7], [11, 12, 13]]}


@pytest.mark.parametrize("position", ["rope", "learned"])
@pytest.mark.parametrize("batch", BATCHES)
def test_fixed_shape_step_equals_each_row_run_alone(position, batch):
    """One-token steps through `decode_step` over the whole cache (as the compiled and graphed
    steps run), mixed with multi-token feeds, a rollback and a reordering of the rows (as beam
    search and speculative decoding do), give each row's logits of an uncached run of that row
    alone; the Runner's length and next positions follow what was fed."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**TINY, position=position)).eval()
    prompts = BATCHES[batch]
    width = max(map(len, prompts))
    feeds = [torch.tensor([[1], [2]]), torch.tensor([[3, 4], [5, 6]]), torch.tensor([[7], [8]]),
             torch.tensor([[9], [10]])]

    def alone(row: list[int], last: int) -> torch.Tensor:
        return model(torch.tensor([row])).logits[0, -last:]

    with torch.no_grad():
        assert Runner(model, prompts, 32, torch.device("cpu")).prefill(keep=0).shape == (2, width, 97)
        runner = Runner(model, prompts, 32, torch.device("cpu"))
        runner.step_fn = model.decode_step
        got = [runner.prefill()]
        assert got[0].shape == (2, 1, 97)
        got += [runner.forward(ids) for ids in feeds]
        got, fed = torch.cat(got, 1), torch.cat(feeds, 1).tolist()
        assert runner.length == width + 5 == runner.cache.length
        assert runner.padded == (batch == "padded")
        if runner.padded:
            assert runner.next_pos[:, 0].tolist() == [len(p) + 5 for p in prompts]
        for i, prompt in enumerate(prompts):
            assert torch.allclose(got[i], alone(prompt + fed[i], 6), atol=1e-5), i

        runner.truncate(runner.length - 2)  # drop the last two steps, take another
        after_rollback = runner.forward(torch.tensor([[11], [12]]))[:, 0]
        runner.reorder(torch.tensor([1, 0]))  # the rows swap places
        after_reorder = runner.forward(torch.tensor([[13], [14]]))[:, 0]
        for i, prompt in enumerate(prompts):
            row = prompt + fed[i][:3] + [11 + i]
            assert torch.allclose(after_rollback[i], alone(row, 1)[0], atol=1e-5), i
            assert torch.allclose(after_reorder[1 - i], alone(row + [14 - i], 1)[0], atol=1e-5), i


def test_batched_beam_search_with_penalties_equals_transformers(ckpts):
    """The penalties' token history follows each beam of each prompt in a batch."""
    path = ckpts("llama", seed=1)
    tok = load_tokenizer(path)
    settings = dict(num_beams=3, repetition_penalty=1.8, no_repeat_ngram_size=2)
    batched = _ours(path, PROMPTS, GenerationConfig(max_new_tokens=10, **settings))
    for prompt, result in zip(PROMPTS, batched):
        expected = _strip_pad(_hf_generate(path, tok.encode(prompt), do_sample=False, max_new_tokens=10, **settings))
        assert result.tokens == expected, prompt
    plain = _ours(path, PROMPTS, GenerationConfig(max_new_tokens=10, num_beams=3))
    assert [r.tokens for r in plain] != [r.tokens for r in batched]  # the penalties changed the beams


@pytest.mark.parametrize("strategy", [dict(), dict(num_beams=2), dict(penalty_alpha=0.5, top_k=3)])
def test_timings_are_the_clocks_differences(ckpts, monkeypatch, strategy):
    """Prefill and decode throughput come from the clock readings around each phase."""
    readings = iter([100.0, 102.0, 110.0, 114.0])  # prefill from 100 to 102, decoding from 110 to 114
    monkeypatch.setattr(search, "time", types.SimpleNamespace(perf_counter=lambda: next(readings)))
    path = ckpts("llama")
    tok = load_tokenizer(path)
    results = _ours(path, PROMPTS[:2], GenerationConfig(max_new_tokens=6, eos_ids=[], **strategy))
    prompt_total = sum(len(tok.encode(p)) for p in PROMPTS[:2])
    for r in results:
        assert r.prefill_tokens_per_s == round(prompt_total / 2.0, 2)
        assert r.decode_tokens_per_s == round(len(r.tokens) / 4.0, 2) == 1.5


# -- the native decode plan's Python side (`core/native/decode.py`) ----------------------------

from llmctl.core import native  # noqa: E402
from llmctl.core.model.attention import Attention  # noqa: E402
from llmctl.core.model.norm import RMSNorm  # noqa: E402
from llmctl.core.native.decode import native_step, why_not  # noqa: E402
from llmctl.core.quant.linear import PackQuantized  # noqa: E402
from test_native_decode import BASE, assert_steps_equal, build, decode_both, needs  # noqa: E402


class _Attention(Attention):
    """A replaced attention module (a plugin's)."""


class _Norm(RMSNorm):
    def forward(self, x):  # another computation than RMSNorm's
        return super().forward(x) * 2


@needs
def test_why_not_names_each_reason(monkeypatch):
    """Each model the plan cannot run, alone, with the reason it gives."""
    from llmctl.core.adapters.prompt import Prefix
    from llmctl.core.model.transforms import replace_module

    assert why_not(torch.nn.Linear(4, 4)) == why_not(types.SimpleNamespace(cfg=build({}).cfg)) \
        == "not an llmctl Transformer"
    for variant, reason in [(dict(is_causal=False), "an encoder"), (dict(norm_placement="post"), "post-norm"),
                            (dict(num_experts=4), "mixture of experts"), (dict(qk_norm=True), "qk-norm"),
                            (dict(position="alibi"), "ALiBi")]:
        assert why_not(build(variant)) == reason
    assert why_not(build(dict(attention_kernel="eager"))) is None
    model = build({})
    model.cfg.attention_kernel = "a plugin's"
    assert why_not(model) == "attention kernel \"a plugin's\""
    assert why_not(Prefix(num_virtual_tokens=2).apply(build({}))) == "a prefix or prompt adapter"
    assert why_not(build({}).to("meta")) == "not on CPU"
    for name in ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]:
        model = build({})
        part = "self_attn" if name[0] in "qkvo" else "mlp"
        replace_module(model, f"model.layers.0.{part}.{name}", torch.nn.Sequential(torch.nn.Identity()))
        assert why_not(model) == f"layer 0.{name}: Sequential the native kernels do not take"
    model = build({})
    linear = model.model.layers[1].self_attn.k_proj
    linear.weight = torch.nn.Parameter(linear.weight.detach().t().contiguous().t())  # same values, transposed strides
    assert why_not(model) == "layer 1.k_proj: Linear the native kernels do not take"
    model = build({})
    model.model.layers[1].self_attn.__class__ = _Attention
    assert why_not(model) == "layer 1: a replaced block"
    model = build({})
    model.model.layers[1].mlp.act = torch.tanh  # an activation the plan has no code for
    assert why_not(model) == "layer 1: feed-forward swiglu"
    model = build({})
    model.model.layers[1].post_attention_layernorm.__class__ = _Norm
    assert why_not(model) == "layer 1: norm _Norm"
    monkeypatch.setattr(native, "has", lambda capability: False)  # kernels built without float32 products
    assert why_not(build({})) == "native kernels unavailable"


@needs
@pytest.mark.parametrize("variant, quantize, head_in_plan", [
    (dict(num_layers=1), None, True),
    (dict(lm_head_bias=True), None, True),
    (dict(num_kv_heads=4, norm="layernorm", mlp="gelu", activation="gelu_tanh", position="learned", qkv_bias=True,
          o_bias=True, mlp_bias=True), dict(bits=8, group_size=64), True),
    ({}, dict(bits=8, ignore=[]), True),
    ({}, None, False),
    ({}, dict(bits=8, ignore=["lm_head", "re:.*k_proj", "re:.*up_proj"]), True),
    (dict(mlp="gelu", activation="gelu_tanh"), dict(bits=4, group_size=128), True),
], ids=["one layer", "head bias", "quantized with biases", "quantized head", "a head the kernels do not take",
        "products of one input in different formats", "a plain MLP, quantized"])
def test_native_step_equals_the_eager_step_at_the_edges(variant, quantize, head_in_plan):
    """One layer, a biased head, quantized linears with biases and a quantized head — the final
    norm and the head in the plan —, a head the kernels do not take (Python's tail), q/k/v and
    gate/up in different formats (run one after another, not in one region) and a plain MLP's
    lone up product: the eager step's logits."""
    model = build(variant)
    if quantize:
        PackQuantized(**quantize).apply(model)
    if not head_in_plan:
        model.lm_head = torch.nn.Sequential(model.lm_head)
    step = native_step(model)
    assert step.head_in_plan == head_in_plan
    eager, ours, *_ = decode_both(model)
    assert_steps_equal(ours, eager, quantized=quantize is not None)
    assert ours.dtype == torch.float32


@needs
def test_native_step_past_the_rotary_tables_built_so_far():
    """A step at position 1024, after a prompt built tables of 1024 rows, grows them."""
    model = build(dict(max_seq_len=2048))
    step = native_step(model)
    ids = torch.tensor([[5, 6, 7]])
    eager_cache, native_cache = model.make_cache(1, 1025), model.make_cache(1, 1025)
    with torch.inference_mode():
        model(ids, cache=eager_cache), model(ids, cache=native_cache)  # tables of 1024 positions
        eager_cache.length = native_cache.length = 1024
        slot, token = torch.tensor([1024]), torch.tensor([[9]])
        eager = model.decode_step(token, slot[None], None, eager_cache.keys, eager_cache.values, slot)
        ours = step(token, slot[None], None, native_cache.keys, native_cache.values, slot)
    torch.testing.assert_close(ours, eager, rtol=1e-5, atol=1e-5 * eager.abs().max().item())


@needs
def test_native_step_refuses_batches_and_padding():
    step = native_step(build({}))
    cache = build({}).make_cache(2, 4)
    slot = torch.tensor([0])
    with pytest.raises(ValueError, match="^the native decode step takes one unpadded row$"):
        step(torch.tensor([[3], [4]]), torch.zeros(2, 1, dtype=torch.long), None, cache.keys, cache.values, slot)
    with pytest.raises(ValueError, match="^the native decode step takes one unpadded row$"):
        step(torch.tensor([[3]]), slot[None], torch.ones(1, 4, dtype=torch.bool), cache.keys, cache.values, slot)


@needs
def test_the_plan_shares_the_quantized_linears_native_layout():
    """The plan takes each quantized linear's native layout from the module, where eager
    one-row products keep theirs: one copy of the weights, not two."""
    model = build({}, bits=8)
    with torch.inference_mode():
        model(torch.tensor([[3]]))  # an eager one-row pass makes each linear's layout
        native_step(model)
    for module in model.modules():
        if hasattr(module, "kernels"):
            assert len(module.kernels) == 1, module.kernels.keys()


# -- the compiled CPU step's products (`core/generate/matvec.py`) ------------------------------

from llmctl.core.generate import matvec  # noqa: E402


@needs
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_row_products_go_to_the_native_kernel_where_it_takes_them(monkeypatch, dtype):
    """With the kernels built: one row whose length is a multiple of 32 goes to `mv_float` (with
    W's rows contiguous), float32 rows of other lengths to the reduction, bf16 ones to aten;
    `mm` with an output dtype always to aten. aten's product is the reference."""
    ops, calls = native.ops(), []
    monkeypatch.setattr(native, "ops", lambda: types.SimpleNamespace(
        capabilities=ops.capabilities, mv_float=lambda x, w: calls.append((x.shape, w.shape, w.is_contiguous()))
        or ops.mv_float(x, w)))
    torch.manual_seed(0)
    tol = dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    w, b, x = torch.randn(48, 64, dtype=dtype), torch.randn(48, dtype=dtype), torch.randn(1, 64, dtype=dtype)
    torch.testing.assert_close(matvec.mm(x, w.t()), x @ w.t(), **tol)
    torch.testing.assert_close(matvec.addmm(b, x, w.t()), b + x @ w.t(), **tol)
    assert calls == [((1, 64), (48, 64), True)] * 2
    calls.clear()
    w40, x40 = w[:, :40], x[:, :40]
    got = matvec.mm(x40, w40.t())
    if dtype == torch.float32:
        torch.testing.assert_close(got, x40 @ w40.t(), **tol)
    else:
        assert got is NotImplemented
    assert calls == []
    assert matvec.mm(x, w.t(), out_dtype=torch.float32) is NotImplemented
    assert calls == []


# -- streamed text and stop strings (`core/generate/stream.py`) --------------------------------

from llmctl.core.generate.stream import Sequence, StopMatcher  # noqa: E402

PIECES = {1: b"Hello", 2: b" world", 3: b"", 4: b"!", 5: b"x\xc3", 6: b"\xa9", 7: b"\n\n"}


def _pieces_decode(ids: list[int]) -> str:
    """A byte-level decoder whose tokens hold several bytes, one of them none (a special token
    decoded as nothing), and an `é` split across two tokens."""
    return b"".join(PIECES[i] for i in ids).decode("utf-8", errors="replace")


def _sentencepiece_decode(ids: list[int]) -> str:
    """As sentencepiece decodes: the leading space of the first piece is dropped."""
    return _pieces_decode(ids).lstrip(" ")


@pytest.mark.parametrize("decode", [_pieces_decode, _sentencepiece_decode])
@pytest.mark.parametrize("tokens", [[2, 3, 2, 4], [2, 5, 6, 4], [2, 2, 5]])
def test_streamed_text_is_the_decoded_continuation(decode, tokens):
    """The pieces a sequence streams join to the text the decoder gives the whole continuation
    after the prompt's: spacing from the prompt, an empty token, a character split across
    tokens, one cut off by the length limit (U+FFFD, as decoding gives it)."""
    seen = []
    seq = Sequence(decode, [1], max_new_tokens=len(tokens), on_text=seen.append)
    done = [seq.push(t) for t in tokens]
    assert done == [False] * (len(tokens) - 1) + [True] and seq.finish_reason == "length"
    assert "".join(seen) == seq.text == decode([1] + tokens)[len(decode([1])):]


def test_sequences_say_when_they_are_finished():
    """A push returns True at EOS, at a stop string and at the length limit, and after that
    changes nothing; `close` ends an undecided sequence for its length."""
    for tokens, kwargs, reason in [([2, 4], dict(eos_ids=[4]), "eos"), ([2, 4], dict(stops=["!"]), "stop"),
                                   ([2, 2], {}, "length")]:
        seq = Sequence(_pieces_decode, [1], max_new_tokens=2, **kwargs)
        assert [seq.push(t) for t in tokens] == [False, True] and seq.finish_reason == reason
        assert seq.push(2) is True and seq.tokens == tokens
    seq = Sequence(_pieces_decode, [1], max_new_tokens=5)
    seq.push(2), seq.close()
    assert (seq.finish_reason, seq.text) == ("length", " world")


def test_a_stop_string_completed_by_the_final_flush():
    """`x` arrives in a token that also starts a character, so it is held back until the length
    limit flushes it: the stop string still cuts the text and names the reason."""
    seq = Sequence(_pieces_decode, [1], max_new_tokens=2, stops=["x"])
    assert [seq.push(2), seq.push(5)] == [False, True]
    assert (seq.text, seq.finish_reason) == (" world", "stop")


def test_stop_matcher_cuts_at_the_first_of_repeated_stops_and_holds_every_prefix():
    assert StopMatcher(["\n"]).push("a\nb\n") == ("a", True)
    for held in ["<", "</", "</s"]:
        assert StopMatcher(["</s>"]).push(f"hi {held}") == ("hi ", False)


# -- generation tasks (`core/evaluate/generation.py`) ------------------------------------------

import json  # noqa: E402

from llmctl.core.evaluate.metrics import METRICS  # noqa: E402
from llmctl.core.evaluate.tasks import load_task  # noqa: E402
from llmctl.errors import ConfigError, DataError, UsageError  # noqa: E402


def _generation_task(tmp_path, rows, **config):
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "t.yaml").write_text(json.dumps({"type": "generate", "dataset": {"path": "d.jsonl"},
                                                 "prompt": "Q: {{ q }}", "target": "a", **config}))
    return load_task(str(tmp_path / "t.yaml"))


@pytest.mark.parametrize("config, message", [
    (dict(metrics=["exact_match", "nope"]),
     "task t: config key 'metrics': unknown metric 'nope'; choose from: " + ", ".join(METRICS.names())),
    (dict(samples=0), "task t: 'samples' and 'max_new_tokens' must be ≥ 1"),
    (dict(max_new_tokens=0), "task t: 'samples' and 'max_new_tokens' must be ≥ 1"),
    (dict(answer_regex="(a"), "task t: config key 'answer_regex': missing ), unterminated subpattern at position 0"),
])
def test_generation_task_config_errors(tmp_path, config, message):
    with pytest.raises(ConfigError) as error:
        _generation_task(tmp_path, [{"q": "x", "a": "y"}], **config)
    assert str(error.value) == message
    assert _generation_task(tmp_path, [{"q": "x", "a": "y"}], samples=1, max_new_tokens=1).max_new_tokens == 1


def test_generation_task_answers_and_references(tmp_path):
    """`answer_match` picks a match, out of range the last one; a regex without groups gives the
    whole match, one whose groups are all empty ""; an empty target list is a data error."""
    task = _generation_task(tmp_path, [{"q": "x", "a": []}], answer_regex=r"(\d+)")
    assert task.extract("no number") == ""
    for index, answer in [(0, "1"), (1, "2"), (-3, "1"), (-1, "3"), (3, "3"), (-4, "3")]:
        task.answer_match = index
        assert task.extract("1 then 2 then 3") == answer, index
    [doc] = task.documents()
    with pytest.raises(DataError) as error:
        task.references(doc)
    assert str(error.value) == f"{doc[0]}: field 'a' must be a string or a list of strings"
    assert _generation_task(tmp_path, [{"q": "x", "a": 7}], answer_regex=r"\d+").extract("is 42.") == "42"
    assert _generation_task(tmp_path, [{"q": "x", "a": 7}], answer_regex=r"(x)?=").extract("a = b") == ""


def test_generation_task_run_samples_votes_logs_and_scores(tmp_path, monkeypatch):
    """Self-consistency over batches: the sampling settings and context reach `generate`, each
    prompt's answers are voted on, logged as samples, and scored with the task's normalisation."""
    import llmctl.core.generate as gen

    rows = [{"q": "one", "a": "ABC"}, {"q": "two", "a": ["x", "Seven"]}, {"q": "three", "a": "z"}]
    task = _generation_task(tmp_path, rows, samples=2, normalize={"ignore_case": True}, metrics=["exact_match"])
    task.report, task.samples_log = Recorder(), []
    texts = iter(["abc", "abc", "seven", "eight", "q", "q"])
    calls = []

    def fake_generate(model, tok, prompts, cfg, context=None, report=None, first_index=0):
        calls.append((prompts, cfg, context, report))
        return [types.SimpleNamespace(text=next(texts)) for _ in prompts]

    monkeypatch.setattr(gen, "generate", fake_generate)
    lm = types.SimpleNamespace(model=None, tokenizer=None, seed=11, batch_size=2, max_length=77)
    result = task.run(lm)
    assert [c[0] for c in calls] == [["Q: one", "Q: one", "Q: two", "Q: two"], ["Q: three", "Q: three"]]
    for _, cfg, context, report in calls:
        assert (cfg.temperature, cfg.seed, cfg.truncate, cfg.batch_size, context, report) == (0.7, 11, "left", 2, 77,
                                                                                              task.report)
    assert task.report.steps() == [("progress", "t", 3, "ex"), ("advance", 2), ("advance", 1)]
    assert result["exact_match"] == pytest.approx(2 / 3) and result["examples"] == 3
    where = [d[0] for d in task.documents()]
    assert task.samples_log == [
        dict(doc=where[0], prompt="Q: one", generations=["abc", "abc"], answer="abc", references=["ABC"]),
        dict(doc=where[1], prompt="Q: two", generations=["seven", "eight"], answer="seven", references=["x", "Seven"]),
        dict(doc=where[2], prompt="Q: three", generations=["q", "q"], answer="q", references=["z"]),
    ]
    lm.can_generate = False
    with pytest.raises(UsageError) as error:
        task.run(lm)
    assert str(error.value) == "task t generates text: it needs a causal language model, not an encoder"


def test_a_graph_lowered_without_the_rewrite_is_not_reused(monkeypatch):
    """The same graph compiled by plain inductor first: AOTAutograd's cache, keyed before
    decomposition, must not hand that lowering to the matvec back end (a real bug: the rewrite
    silently skipped, or a graph calling the native op served with the kernels off)."""
    import torch.nn.functional as F

    monkeypatch.setattr(native, "has", lambda capability: False)
    calls, rows_dot = [], matvec._rows_dot
    monkeypatch.setattr(matvec, "_rows_dot", lambda *a: calls.append(a[1].shape) or rows_dot(*a))
    torch.manual_seed(0)
    w, x = torch.randn(24, 32), torch.randn(1, 32)
    plain = torch.compile(lambda x: F.linear(torch.sigmoid(x), w), dynamic=False)
    ours = torch.compile(lambda x: F.linear(torch.sigmoid(x), w), backend=matvec.backend, dynamic=False)
    torch.testing.assert_close(plain(x), F.linear(torch.sigmoid(x), w))
    torch.testing.assert_close(ours(x), F.linear(torch.sigmoid(x), w), rtol=1e-5, atol=1e-5)
    assert calls == [torch.Size([32, 24])]
