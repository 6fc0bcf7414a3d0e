"""Edges of decorated functions — registered strategies and the like, which mutmut 3 leaves
unmutated unless the scratch copy is rewritten with `scripts/undecorate.py`: the learning-rate
schedules at and past their ends, and the distillation losses over any leading shape."""

from __future__ import annotations

import pytest
import torch


# -- learning-rate schedules ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cosine", "linear", "wsd"])
def test_schedules_stay_at_min_lr_past_max_steps(name):
    """A refit `max_time` horizon can end a run's schedule before its step: the rate then stays
    at min_lr (a cosine would climb back, a line go negative)."""
    from llmctl.core.train.schedule import lr_at

    p = dict(lr=1.0, min_lr=0.1, warmup_steps=2, max_steps=10, decay_fraction=0.2)
    assert [lr_at(name, step, **p) for step in (10, 15, 18, 30)] == pytest.approx([0.1] * 4)


@pytest.mark.parametrize("name", ["cosine", "linear"])
def test_a_one_step_decay_reaches_min_lr_at_its_end(name):
    from llmctl.core.train.schedule import lr_at

    p = dict(lr=1.0, min_lr=0.1, warmup_steps=4, max_steps=5)
    assert [lr_at(name, step, **p) for step in (3, 4, 5)] == pytest.approx([1.0, 1.0, 0.1])


def test_wsd_with_a_one_step_decay():
    """decay_fraction 0.1 of 10 steps: one decay step — the plateau lasts through step 9."""
    from llmctl.core.train.schedule import lr_at

    p = dict(lr=1.0, min_lr=0.1, warmup_steps=0, max_steps=10, decay_fraction=0.1)
    assert [lr_at("wsd", step, **p) for step in (8, 9, 10)] == pytest.approx([1.0, 1.0, 0.1])
    p["decay_fraction"] = 0.01  # rounds to no step: still one
    assert [lr_at("wsd", step, **p) for step in (9, 10)] == pytest.approx([1.0, 0.1])


# -- distillation losses ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "jsd", "hidden_mse", "hidden_cosine"])
def test_losses_reduce_the_last_dimension_whatever_leads(name):
    """One value per position: [2, 3, V] inputs give the [2, 3] values of their six rows; with
    no settings, the loss is at temperature 1 and β = 0.5."""
    from llmctl.core.distill.losses import LOSSES

    fn = LOSSES.get(name)
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 3, 7, generator=g), torch.randn(2, 3, 7, generator=g)
    settings = {} if fn.kind == "hidden" else dict(temperature=2.0, beta=0.3)
    rows = fn(student.reshape(6, 7), teacher.reshape(6, 7), **settings)
    assert rows.shape == (6,)
    torch.testing.assert_close(fn(student, teacher, **settings), rows.reshape(2, 3))
    if fn.kind == "logits":
        torch.testing.assert_close(fn(student, teacher), fn(student, teacher, temperature=1.0, beta=0.5))


# -- merge sparsifiers ----------------------------------------------------------------------------------


def _della_by_hand(delta, density, epsilon, seed):
    """DELLA's MagPrune written out: per row (a 1-D delta is one row; more dimensions are rows of
    the first), keep probability density − ε + rank/(n − 1) · 2ε by ascending magnitude rank."""
    import numpy as np

    rows = delta.reshape(1, -1) if delta.ndim == 1 else delta.reshape(delta.shape[0], -1)
    n = rows.shape[1]
    probs = np.empty(rows.shape, dtype=np.float64)
    for i, row in enumerate(rows):
        for rank, j in enumerate(sorted(range(n), key=lambda j: abs(row[j]))):
            probs[i, j] = density - epsilon + (rank / (n - 1) if n > 1 else 0.0) * 2 * epsilon
    draws = np.random.default_rng(seed).random(rows.shape, dtype=np.float32)
    return (draws < probs.astype(np.float32)).reshape(delta.shape)


@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 2), (4, 1), (2, 2, 3)])
def test_della_keeps_by_rank_in_each_row(shape):
    import numpy as np

    from llmctl.core.merge.sparsify import SPARSIFIERS

    della = SPARSIFIERS.get("della_magprune")
    delta = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    for seed in range(5):
        got = della(delta, 0.5, 0.3, np.random.default_rng(seed))
        assert got.dtype == bool and np.array_equal(got, _della_by_hand(delta, 0.5, 0.3, seed))
    defaults = della(delta, 0.5, generator=np.random.default_rng(0))
    assert np.array_equal(defaults, _della_by_hand(delta, 0.5, 0.15, 0))  # ε = 0.15 by default


def test_della_bounds_and_empty_masks():
    import numpy as np

    from llmctl.core.merge.sparsify import SPARSIFIERS

    della, delta = SPARSIFIERS.get("della_magprune"), np.ones((2, 3), dtype=np.float32)
    none = della(delta, 0.0, 0.15)
    assert none.dtype == bool and none.shape == (2, 3) and not none.any()
    for density, epsilon in ((0.15, 0.15), (0.85, 0.15)):  # an end at 0 or 1
        with pytest.raises(ValueError, match=r"^della: density ± epsilon must lie in \(0, 1\)"):
            della(delta, density, epsilon)


def test_magnitude_masks_are_boolean_and_keep_at_least_one():
    import numpy as np

    from llmctl.core.merge.sparsify import SPARSIFIERS

    delta = np.array([0.1, -3.0, 0.2, 2.0, -0.05], dtype=np.float32)
    keep = SPARSIFIERS.get("magnitude")
    assert keep(delta, 0.0).dtype == bool and not keep(delta, 0.0).any()
    assert keep(delta, 0.1).tolist() == [False, True, False, False, False]  # 0.5 of an entry: the largest
    random = SPARSIFIERS.get("random")(delta, 0.5, np.random.default_rng(0))
    assert random.dtype == bool and random.shape == delta.shape
    outliers = SPARSIFIERS.get("magnitude_outliers")
    big = np.arange(1, 201, dtype=np.float32)
    assert np.array_equal(outliers(big, 0.5), outliers(big, 0.5, gamma=0.01))  # γ = 0.01 by default
    assert outliers(big, 0.5).sum() == 100 and not outliers(big, 0.5)[-2:].any()


# -- RoPE scalings ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, params, seq_len", [
    ("linear", {"factor": 4.0}, 64),
    ("dynamic", {"factor": 2.0}, 40),  # within the context: the base unchanged
    ("dynamic", {"factor": 2.0}, 300),
    ("dynamic", {"factor": 3.5}, 1000),
    ("yarn", {"factor": 4.0}, 64),
    ("yarn", {"factor": 8.0, "original_max_position_embeddings": 32, "beta_fast": 16, "beta_slow": 2}, 64),
    ("yarn", {"factor": 4.0, "attention_factor": 1.3, "truncate": False}, 64),
    ("yarn", {"factor": 16.0, "original_max_position_embeddings": 4096, "beta_fast": 64, "beta_slow": 0.5}, 64),
    ("yarn", {"factor": 1.0}, 64),
    ("yarn", {"factor": 0.5}, 64),
    ("yarn", {"factor": 1.5}, 64),
    ("yarn", {"factor": 4.0, "original_max_position_embeddings": 4096, "truncate": False}, 64),
    ("yarn", {"factor": 4.0, "original_max_position_embeddings": 4096, "beta_fast": 4, "beta_slow": 4}, 64),
    ("yarn", {"factor": 4.0, "original_max_position_embeddings": 10**6, "beta_fast": 10**4, "beta_slow": 0.1,
              "theta": 500.0}, 64),  # the ramp ends past the last dimension
])
def test_rope_scalings_are_transformers(kind, params, seq_len):
    """Each registered scaling's inverse frequencies and attention factor against transformers'
    ROPE_INIT_FUNCTIONS for the same config (dynamic NTK at the sequence length reached)."""
    import transformers as tr
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from llmctl.core.model import ModelConfig
    from llmctl.core.model.position import ROPE_SCALINGS

    params = dict(params)
    theta = params.pop("theta", 10000.0)
    cfg = ModelConfig(vocab_size=64, hidden_size=256, num_layers=1, num_heads=4, max_seq_len=128, rope_theta=theta)
    config = tr.LlamaConfig(hidden_size=256, num_attention_heads=4, num_hidden_layers=1, max_position_embeddings=128,
                            rope_parameters={"rope_type": kind, "rope_theta": theta, **params})
    want, want_factor = ROPE_INIT_FUNCTIONS[kind](config, "cpu", seq_len=seq_len)
    got, factor = ROPE_SCALINGS.get(kind)(cfg, params, torch.arange(seq_len), torch.device("cpu"))
    torch.testing.assert_close(got, want.float(), rtol=1e-6, atol=0)
    assert factor == pytest.approx(want_factor, rel=1e-12)
    default, unit = ROPE_SCALINGS.get("default")(cfg, {}, torch.arange(4), torch.device("cpu"))
    assert unit == 1.0 and torch.equal(default, 1.0 / theta ** (torch.arange(0, 64, 2).float() / 64))


# -- merge methods ----------------------------------------------------------------------------------------------


def test_model_stock_of_opposite_task_vectors_is_the_base():
    """Two task vectors at 180°: 1 + (n − 1)·cos = 0, so t = 0 — the base (not their average, nor a
    division by zero)."""
    from llmctl.core.merge.methods import Inputs, model_stock

    base = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    delta = torch.tensor([[0.5, -1.0], [2.0, 0.25]])
    for filter_wise in (False, True):
        got = model_stock(Inputs(base.clone(), [base + delta, base - 3 * delta]), filter_wise=filter_wise)
        torch.testing.assert_close(got, base)


def test_nuslerp_with_weights_summing_to_zero_is_the_midpoint():
    from llmctl.core.merge.methods import Inputs, nuslerp

    a, b = torch.tensor([[1.0, 0.0, 2.0]]), torch.tensor([[0.0, 1.0, -1.0]])
    half = nuslerp(Inputs(None, [a, b]), [1.0, 1.0])
    torch.testing.assert_close(nuslerp(Inputs(None, [a, b]), [0.0, 0.0]), half)
    torch.testing.assert_close(nuslerp(Inputs(None, [a, b]), [1e-7, -2e-7]), half)  # |Σ| below 1e-6: still


# -- attention kernels ----------------------------------------------------------------------------------------


def test_sdpa_in_16_bits_on_cpu_keeps_the_mask_and_the_dropout():
    """The explicit 16-bit CPU path (several queries, up to 1024 keys): a padding mask hides its
    keys (changing a hidden value changes nothing), the result is eager attention's within bf16
    rounding, and dropout is applied."""
    from llmctl.core.model.attention import eager_attention, sdpa_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 4, 8, generator=g).bfloat16() for _ in range(3))
    mask = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    mask[..., -1] = False  # the last key is padding
    got = sdpa_attention(q, k, v, mask, False, 0.0)
    want = eager_attention(q.float(), k.float(), v.float(), mask, False, 0.0)
    torch.testing.assert_close(got.float(), want, atol=3e-2, rtol=3e-2)
    v2 = v.clone()
    v2[..., -1, :] = 100.0
    assert got.dtype == torch.bfloat16 and torch.equal(sdpa_attention(q, k, v2, mask, False, 0.0), got)
    eager = eager_attention(q, k, v, mask, False, 0.0)  # in 16 bits too: the probabilities in v's dtype
    assert eager.dtype == torch.bfloat16 and torch.allclose(eager.float(), want, atol=3e-2, rtol=3e-2)
    torch.manual_seed(0)
    assert not torch.equal(sdpa_attention(q, k, v, None, False, 0.5), sdpa_attention(q, k, v, None, False, 0.0))


def test_acc_norm_divides_by_each_choices_characters():
    """lm-evaluation-harness's acc_norm: log-likelihood over the choice's length in characters (a
    one-character choice divides by 1)."""
    from llmctl.core.evaluate.choice import CHOICE_METRICS

    acc, acc_norm = CHOICE_METRICS.get("acc"), CHOICE_METRICS.get("acc_norm")
    lls, texts = [-1.0, -2.5], ["a", "bcd"]  # per character: -1.0 and -0.83
    assert (acc(lls, texts, 0, {}), acc_norm(lls, texts, 1, {}), acc_norm(lls, texts, 0, {})) == (1.0, 1.0, 0.0)
    assert acc_norm([-1.0, -2.5], ["", "bcd"], 1, {}) == 1.0  # an empty choice divides by 1, not 0
