"""`generate --compile` on CPU (`search.py`'s `compiled_decode_step`, `Runner._prepare_step` and
`Runner.__init__`'s compile branches), found by mutation testing (docs/testing.md): the cache size
rounded up to `CACHE_BUCKET`, the step made once per model and reused, the warm-up step's dummy
token overwritten by the prefill, and the compiled step's logits equal to an uncached run of each
row alone. One small model is compiled, for one row (the matvec back end's case); elsewhere a
recording eager step, or a recording `torch.compile`, stands in for the compiler."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch._inductor.config

from llmctl.core.generate import matvec
from llmctl.core.generate.search import CACHE_BUCKET, Runner, compiled_decode_step
from llmctl.core.model import ModelConfig, Transformer

TINY = dict(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=48,
            max_seq_len=600)
PADDED = [[5, 6, 7, 8, 9], [11, 12]]
CPU = torch.device("cpu")


def _model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**TINY)).eval()


def _alone(model, row: list[int]) -> torch.Tensor:
    """The last position's logits of `row` run alone, without a cache."""
    return model(torch.tensor([row])).logits[0, -1]


def _greedy(runner: Runner, model, prompts: list[list[int]], steps: int) -> list[list[int]]:
    """Greedy tokens through `runner`; every step's logits checked against each row run alone."""
    rows = [list(p) for p in prompts]
    logits = runner.prefill()[:, -1]
    for step in range(steps + 1):
        for i, row in enumerate(rows):
            assert torch.allclose(logits[i], _alone(model, row), atol=1e-4), (step, i)
        if step == steps:
            break
        nxt = logits.argmax(-1)
        for i, row in enumerate(rows):
            row.append(int(nxt[i]))
        logits = runner.forward(nxt[:, None])[:, 0]
    return [row[len(p):] for row, p in zip(rows, prompts)]


class _Step:
    """An eager `decode_step` standing in for the compiled one; records each call's tokens and slot."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __call__(self, ids, positions, padding, keys, values, slot):
        self.calls.append((ids.tolist(), int(slot)))
        return self.model.decode_step(ids, positions, padding, keys, values, slot)


@pytest.mark.parametrize("prompts", [PADDED, [[5, 6, 7]]], ids=["padded", "one_row"])
def test_the_warm_up_step_is_forgotten_before_the_prefill(prompts):
    """The step made for the model is the Runner's; it runs once on a dummy token at slot 0 when
    the Runner is made, and that token, the cache length and the next positions are undone, so
    greedy decoding through it gives each row's uncached logits."""
    model = _model()
    step = model._llmctl_compiled_step = _Step(model)
    with torch.inference_mode():
        runner = Runner(model, prompts, 8, CPU, compile=True)
        assert runner.step_fn is step
        assert step.calls == [([[0]] * len(prompts), 0)]  # the warm-up: a dummy token at slot 0
        assert runner.length == runner.cache.length == 0
        if len(prompts) > 1:
            assert runner.next_pos[:, 0].tolist() == [len(p) for p in prompts]
        else:
            assert runner.next_pos is None and runner.mask is None
        tokens = _greedy(runner, model, prompts, 3)
        width = max(map(len, prompts))
        assert [c[1] for c in step.calls[1:]] == [width, width + 1, width + 2]  # then one call per step
        assert [c[0] for c in step.calls[1:]] == [[[t[k]] for t in tokens] for k in range(3)]


@pytest.mark.parametrize(("asked", "made"), [(8, CACHE_BUCKET), (CACHE_BUCKET, CACHE_BUCKET),
                                             (CACHE_BUCKET + 1, 2 * CACHE_BUCKET)])
def test_a_compiled_runner_rounds_its_cache_up_to_the_bucket(asked, made):
    model = _model()
    model._llmctl_compiled_step = _Step(model)
    with torch.inference_mode():
        assert Runner(model, PADDED, asked, CPU, compile=True).cache.max_len == made
        eager = Runner(model, PADDED, asked, CPU)
        assert eager.cache.max_len == asked and eager.step_fn is None  # eager: the size asked, no fixed-shape step
        assert Runner(model, PADDED, asked, CPU, compile=True).cache.keys[0].shape[2] == made


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_the_step_asks_torch_compile_for_static_shapes_and_on_cpu_for_frozen_weights(monkeypatch, device):
    """What `compiled_decode_step` asks of torch.compile (a stand-in records it): static shapes; on
    CPU the matvec back end, with inductor's freezing and C++ wrapper on while a graph compiles
    (speed only: no logits show them); elsewhere (the meta device standing in for CUDA) inductor
    as it is, the CUDA graph being captured later by the Runner."""
    asked = []

    def compile(fn, **options):
        asked.append((fn, options))
        return lambda *args: (args, torch._inductor.config.freezing, torch._inductor.config.cpp_wrapper)

    monkeypatch.setattr(torch, "compile", compile)
    outside = (torch._inductor.config.freezing, torch._inductor.config.cpp_wrapper)
    model = SimpleNamespace(model=SimpleNamespace(embed_tokens=SimpleNamespace(weight=torch.empty(1, device=device))),
                            decode_step=lambda *args: None)
    with torch._dynamo.config.patch(cache_size_limit=8):
        step = compiled_decode_step(model)
        assert torch._dynamo.config.cache_size_limit >= 64  # the shapes beams make are not left to eager
    assert compiled_decode_step(model) is step is model._llmctl_compiled_step and len(asked) == 1
    assert asked[0][0] is model.decode_step
    if device == "cpu":
        assert asked[0][1] == {"dynamic": False, "backend": matvec.backend}
        assert step(1, 2) == ((1, 2), True, True)
    else:
        assert asked[0][1] == {"dynamic": False}
        assert step(1, 2) == ((1, 2), *outside)
    assert (torch._inductor.config.freezing, torch._inductor.config.cpp_wrapper) == outside


def test_the_compiled_step_gives_the_uncached_logits_and_is_made_once_per_model(monkeypatch):
    """A real `torch.compile` of one row (the matvec back end's case, static shapes): each step's
    logits equal the row run alone without a cache, and a second Runner of the same shape reuses
    the model's step and its graph."""
    from torch._dynamo.utils import counters

    model = _model(1)
    lowered, inductor = [], matvec.backend

    def backend(graph, example_inputs):
        assert all(isinstance(t, torch.Tensor) for t in example_inputs)  # static shapes: no size symbols passed
        lowered.append([tuple(t.shape) for t in example_inputs])
        return inductor(graph, example_inputs)

    monkeypatch.setattr(matvec, "backend", backend)
    counters.clear()
    with torch.inference_mode(), torch._dynamo.config.patch(cache_size_limit=8):
        runner = Runner(model, [[3, 1, 4, 1]], 20, CPU, compile=True)
        step = model._llmctl_compiled_step
        assert runner.step_fn is step and compiled_decode_step(model) is step
        assert torch._dynamo.config.cache_size_limit >= 64
        _greedy(runner, model, [[3, 1, 4, 1]], 4)
        again = Runner(model, [[2, 7]], 30, CPU, compile=True)
        assert again.step_fn is step
        _greedy(again, model, [[2, 7]], 2)
    assert counters["stats"]["unique_graphs"] == 1 == len(lowered)  # one graph, not one per step or Runner
    assert lowered[0][0] == (1, 1)  # the token ids: one row, one token
    assert {s[2] for s in lowered[0] if len(s) == 4} == {CACHE_BUCKET}  # the cache, rounded up
