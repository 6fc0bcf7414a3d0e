"""Edges that the export and merge tests miss (found by mutation testing).

GGUF k-quants (Q4_K, Q6_K), each decoded with gguf-py's reference dequantizer: exactly
representable blocks come back bit for bit, every value takes the nearest of its sub-block's
levels (also with subnormal float16 scales), the least-squares refit beats plain min-max, zero /
constant / tiny sub-blocks, inputs of any rank and float dtype, the chunked runner.

Merge array back ends, against torch and safetensors: every float cast and narrowing (float8
included), the reused read buffers, the torch back end's fall-backs (float8, pickle `.bin`),
integer buffers that must agree, which back end a plan gets."""

import json
import types
import warnings

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from llmctl.core.checkpoint import open_checkpoint
from llmctl.core.export import kquants
from llmctl.core.merge import arrays

Q4_K, Q6_K = gguf.GGMLQuantizationType.Q4_K, gguf.GGMLQuantizationType.Q6_K
F16_STEP = np.float32(2.0 ** -10)  # a float16-exact scale unit


def _decode(raw: np.ndarray, kind) -> np.ndarray:
    return gguf.quants.dequantize(raw.reshape(-1, raw.shape[-1]), kind).reshape(-1, 256)


def _levels(raw: np.ndarray, kind) -> np.ndarray:
    """[blocks, sub-blocks, codes]: every value a sub-block can decode to, read by gguf's unpacking."""
    blocks = raw.reshape(-1, 144 if kind == Q4_K else 210)
    if kind == Q4_K:
        d, dmin = (blocks[:, i:i + 2].copy().view(np.float16).astype(np.float32) for i in (0, 2))
        sc, m = gguf.quants.Q4_K.get_scale_min(blocks[:, 4:16])
        return (d * sc)[..., None] * np.arange(16) - (dmin * m)[..., None]
    d = blocks[:, 208:210].copy().view(np.float16).astype(np.float32)
    sc = blocks[:, 192:208].view(np.int8).astype(np.float32)
    return (d * sc)[..., None] * (np.arange(64) - 32)


def _assert_nearest_levels(x: np.ndarray, raw: np.ndarray, kind) -> None:
    """Each value decodes to the nearest level of its sub-block (ties to either)."""
    levels = _levels(raw, kind)
    sub = levels.shape[1]
    values = x.reshape(-1, sub, 256 // sub)
    got = _decode(raw, kind).reshape(values.shape)
    best = np.abs(values[..., None] - levels[:, :, None, :]).min(-1)
    excess = np.abs(values - got) - best
    assert (excess <= 1e-6 * np.abs(values).max((1, 2), keepdims=True)).all(), excess.max()


def _assert_extremes_take_code_minus_32(x: np.ndarray, raw: np.ndarray) -> None:
    """Q6_K maps each sub-block's value of largest magnitude to code -32: wherever the int8 scale
    is large enough (|sc| ≥ 64) for its rounding to keep that code in range, and not wrapped."""
    levels = _levels(raw, Q6_K)  # [blocks, 16, 64]; code k ↦ d·sc·(k − 32)
    values = x.reshape(-1, 16, 16)
    extreme = np.take_along_axis(values, np.abs(values).argmax(-1)[..., None], -1)
    code = np.abs(extreme - levels).argmin(-1)
    sc = raw.reshape(-1, 210)[:, 192:208].view(np.int8).astype(int)
    big = np.abs(sc) >= 64
    assert big.sum() > 10 and (code[big] == 0).all()


def _minmax_q4_k(x: np.ndarray) -> np.ndarray:
    """Plain min-max 4-bit codes per 32 values, float scales: the fit Q4_K's refit must beat."""
    b = x.reshape(-1, 8, 32)
    low = np.minimum(b.min(-1), 0)[..., None]
    scale = (b.max(-1)[..., None] - low) / 15
    return (np.clip(np.rint((b - low) / scale), 0, 15) * scale + low).reshape(x.shape)


def _rmse(a, b) -> float:
    return float(np.sqrt(((a - b) ** 2).mean()))


def test_q4_k_exact_codes_come_back_bit_for_bit():
    """x = d·sc·q − dmin·m with every code range reached (sc, m over 0…63, 0 and 63 included,
    an all-zero and a constant sub-block) decodes exactly, with the same 6-bit sc and m."""
    rng = np.random.default_rng(1)
    n = 6
    sc = rng.integers(0, 64, size=(n, 8))
    m = rng.integers(0, 64, size=(n, 8))
    sc[:, 0], m[:, 1], sc[:, 2], m[:, 3] = 63, 63, 0, 0
    sc[0, 4] = m[0, 4] = 0  # all zero
    q = rng.integers(0, 16, size=(n, 8, 32))
    q[..., 0], q[..., 1] = 0, 15
    d, dmin = F16_STEP * 3, F16_STEP * 5
    x = (d * sc[..., None] * q - dmin * m[..., None]).astype(np.float32).reshape(n, 256)
    raw = kquants.quantize_q4_k(x)
    np.testing.assert_array_equal(_decode(raw, Q4_K), x)
    got_sc, got_m = gguf.quants.Q4_K.get_scale_min(raw[:, 4:16])
    np.testing.assert_array_equal(got_sc, sc)
    np.testing.assert_array_equal(got_m, m)


def test_q6_k_exact_codes_with_signed_scales_come_back_bit_for_bit():
    """x = d·sc·(q − 32) with signed sub-block scales (±127, 0, small ones) decodes exactly."""
    rng = np.random.default_rng(2)
    n = 6
    sc = rng.integers(-127, 128, size=(n, 16))
    sc[:, 0], sc[:, 1], sc[:, 2], sc[:, 3], sc[:, 4] = 127, -127, 0, 1, -3
    codes = rng.integers(-31, 32, size=(n, 16, 16))
    codes[..., 5] = -32  # the one extreme of each sub-block
    x = (F16_STEP * sc[..., None] * codes).astype(np.float32).reshape(n, 256)
    raw = kquants.quantize_q6_k(x)
    np.testing.assert_array_equal(_decode(raw, Q6_K), x)
    np.testing.assert_array_equal(raw[:, 192:208].view(np.int8), sc)


@pytest.mark.parametrize("kind", ["normal", "offset", "positive", "mixed", "tiny"])
def test_every_value_takes_its_nearest_level(kind):
    """Random rows, all-positive rows, sub-blocks of magnitudes 1000x apart (small sub-block
    scales, whose rounding can push a value past the outermost code) and tiny blocks whose float16
    super-block scale is subnormal (rounded down by up to half, so a sub-block's 6-bit / int8
    scale must be clipped to stay in its bits): the nearest level, always."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((16, 512)).astype(np.float32)
    if kind == "offset":
        x += 2.0
    elif kind == "positive":
        x = rng.uniform(0.5, 1.5, size=x.shape).astype(np.float32)
    elif kind == "mixed":
        x *= np.repeat(10.0 ** rng.integers(-3, 1, size=(16, 32)), 16, axis=-1).astype(np.float32)
    elif kind == "tiny":
        x = (rng.standard_normal((64, 256)) * 10.0 ** rng.uniform(-6, -1, size=(64, 1))).astype(np.float32)
    for fn, code in ((kquants.quantize_q4_k, Q4_K), (kquants.quantize_q6_k, Q6_K)):
        _assert_nearest_levels(x, fn(x), code)
    _assert_extremes_take_code_minus_32(x, kquants.quantize_q6_k(x))


@pytest.mark.parametrize("kind, ratio", [("normal", 0.96), ("positive", 1.0)])
def test_q4_k_refit_beats_plain_min_max(kind, ratio):
    """The least-squares refit of each sub-block's scale and offset: 6-bit scales included, the
    error stays below min-max rounding with float scales (on normal rows by 5%, 3% without the
    scale's refit; llama.cpp's own search is ~4% lower still). All-positive rows keep offset 0
    (m ≥ 0), so gain less."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((64, 512)).astype(np.float32)
    if kind == "positive":
        x = rng.uniform(0.5, 1.5, size=x.shape).astype(np.float32)
    ours = _rmse(_decode(kquants.quantize_q4_k(x), Q4_K).reshape(x.shape), x)
    assert ours < ratio * _rmse(_minmax_q4_k(x), x)


def test_zero_and_constant_blocks():
    """An all-zero block gives all-zero Q4_K bytes (as llama.cpp's reference); zero, constant and
    tiny sub-blocks decode within their error, with no division warnings."""
    x = np.zeros((3, 256), np.float32)
    x[1, :32] = -0.75  # a constant sub-block, the rest zero
    x[2] = np.random.default_rng(5).standard_normal(256)
    x[2, 32:64] = 0.0
    x[2, 64:96] = 1e-9
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q4, q6 = kquants.quantize_q4_k(x), kquants.quantize_q6_k(x)
    np.testing.assert_array_equal(q4[0], 0)
    np.testing.assert_array_equal(_decode(q6[:1], Q6_K), 0)
    for raw, code in ((q4, Q4_K), (q6, Q6_K)):
        y = _decode(raw, code)
        np.testing.assert_allclose(y[:2], x[:2], atol=1e-3)
        assert np.abs(y[2, 32:96]).max() <= 1e-3
        _assert_nearest_levels(x, raw, code)


@pytest.mark.parametrize("fn, size", [(kquants.quantize_q4_k, 144), (kquants.quantize_q6_k, 210)])
def test_any_rank_and_float_dtype(fn, size):
    """1-D and 3-D inputs keep their leading shape; float16 and float64 inputs quantize as their
    float32 values; rows that are not whole super-blocks are refused with their length."""
    rng = np.random.default_rng(6)
    x = (rng.standard_normal((2, 3, 512)) * 0.02).astype(np.float32)
    flat = fn(x.reshape(6, 512))
    assert fn(x).shape == (2, 3, 2 * size)
    np.testing.assert_array_equal(fn(x).reshape(6, -1), flat)
    np.testing.assert_array_equal(fn(x[0, 0]), flat[0])
    half = x.astype(np.float16)
    np.testing.assert_array_equal(fn(half), fn(half.astype(np.float32)))
    np.testing.assert_array_equal(fn(x.astype(np.float64)), fn(x))
    with pytest.raises(ValueError, match="rows of 100 values are not a multiple of 256"):
        fn(np.zeros((2, 3, 100), np.float32))


@pytest.mark.parametrize("name", ["Q4_K", "Q6_K"])
def test_chunked_runner_equals_one_call(name):
    """`_in_chunks` (what the exporter calls) over a 3-D tensor, a few rows at a time and a last
    partial chunk, and over more rows than values per row, gives the bytes of one call."""
    fn, size = {"Q4_K": (kquants.quantize_q4_k, 144), "Q6_K": (kquants.quantize_q6_k, 210)}[name]
    x = np.random.default_rng(7).standard_normal((5, 3, 256)).astype(np.float32)
    run = kquants._in_chunks(fn, size, rows=4)
    got = run(x)
    assert got.shape == (5, 3, size) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, fn(x))
    assert kquants.QUANTIZERS[name](x).tobytes() == got.tobytes()
    tall = np.random.default_rng(8).standard_normal((2, 140, 256)).astype(np.float32)
    expected = fn(tall)  # held, so the runner's output buffer cannot be its memory
    np.testing.assert_array_equal(kquants._in_chunks(fn, size)(tall), expected)


# --- merge array back ends ---------------------------------------------------------------------

FLOATS = ["float16", "bfloat16", "float32", "float64"]


def _checkpoint(path, tensors: dict, *, bin: bool = False):
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 1}))
    if bin:
        torch.save(tensors, path / "pytorch_model.bin")
    else:
        save_file(tensors, path / "model.safetensors")
    return open_checkpoint(path)


def _as_numpy(t: torch.Tensor) -> np.ndarray:
    """What the numpy back end holds for `t`: its values, bfloat16 as uint16 bit patterns."""
    return t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # to float16: ∞, as torch
@pytest.mark.parametrize("source", FLOATS)
def test_numpy_casts_equal_torchs_for_every_pair(source):
    """`Numpy.cast` between any two float dtypes gives torch's values, bit for bit (NaN aside:
    any quiet NaN; torch's own bfloat16 NaN bits vary), and casting to its own dtype is a no-op."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, generator=g, dtype=torch.float64) * 10.0 ** torch.randint(-9, 9, (4000,), generator=g)
    x = torch.cat([x, torch.tensor([0.0, -0.0, float("inf"), float("nan"), 1 + 2**-8, 70000.0, 1e-7])]).to(getattr(torch, source))
    xp = arrays.Numpy()
    for to in FLOATS:
        got = xp.cast(_as_numpy(x), source, to)
        want = _as_numpy(x.to(getattr(torch, to)))
        assert got.dtype == want.dtype and got.shape == want.shape, (source, to)
        nan = x.isnan().numpy()
        np.testing.assert_array_equal(got[~nan], want[~nan])
        back = xp.cast(got, to, "float32")
        assert np.isnan(back[nan]).all()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float8_e4m3fn", "float8_e5m2"])
def test_narrowed_rounds_in_place_as_torch(dtype):
    """`narrowed` (float32 work arrays of a 16-bit or float8 merge) rounds in place to torch's values."""
    x = (torch.randn(5000, generator=torch.Generator().manual_seed(1)) * 3).numpy()
    want = torch.from_numpy(x.copy()).to(getattr(torch, dtype)).float().numpy()
    y = arrays.narrowed(x, dtype)
    assert y is x and x.dtype == np.float32
    np.testing.assert_array_equal(x, want)


def test_read_buffers_are_reused_per_slot_and_grown(tmp_path):
    """A slot's buffer is reused for a tensor of the same or smaller size and replaced by a larger
    one; slots are separate; every read gives safetensors' values (bfloat16 as its bits)."""
    g = torch.Generator().manual_seed(2)
    tensors = {"big": torch.randn(8, 16, generator=g), "same": torch.randn(16, 8, generator=g),
               "small": torch.randn(3, generator=g).to(torch.bfloat16), "bigger": torch.randn(300, generator=g)}
    ck = _checkpoint(tmp_path / "ck", tensors)
    dtypes = {n: str(t.dtype).removeprefix("torch.") for n, t in tensors.items()}
    xp = arrays.Numpy()
    first = xp.read(ck, "big", "float32")
    buffer = xp.slots[0]
    other = xp.read(ck, "small", dtypes["small"], 1)
    for name in ("same", "small"):
        got = xp.read(ck, name, dtypes[name])
        assert xp.slots[0] is buffer and np.shares_memory(got, buffer)
        np.testing.assert_array_equal(got, _as_numpy(tensors[name]))
    np.testing.assert_array_equal(other, _as_numpy(tensors["small"]))
    assert not np.shares_memory(first, xp.slots[1])
    got = xp.read(ck, "bigger", "float32")
    assert xp.slots[0] is not buffer and xp.slots[0].nbytes == 1200
    np.testing.assert_array_equal(got, tensors["bigger"].numpy())


def test_torch_reads_float8_and_bin_checkpoints_whole(tmp_path):
    """The torch back end reads a safetensors tensor into its slot's buffer; float8 (no numpy
    dtype) and a weights-only pickle `.bin` are read whole, with the file's values."""
    g = torch.Generator().manual_seed(3)
    tensors = {"w": torch.randn(4, 8, generator=g).to(torch.bfloat16),
               "f8": torch.randn(4, 8, generator=g).to(torch.float8_e4m3fn)}
    xp = arrays.Torch()
    safe = _checkpoint(tmp_path / "safe", tensors)
    w = xp.read(safe, "w", "bfloat16")
    assert w.dtype == torch.bfloat16 and torch.equal(w, tensors["w"])
    assert np.shares_memory(w.view(torch.int16).numpy(), xp.slots[0])
    f8 = xp.read(safe, "f8", "float8_e4m3fn")
    assert f8.dtype == torch.float8_e4m3fn and torch.equal(f8.view(torch.uint8), tensors["f8"].view(torch.uint8))
    pickled = _checkpoint(tmp_path / "bin", {"w": tensors["w"].float()}, bin=True)
    assert torch.equal(xp.read(pickled, "w", "float32"), tensors["w"].float())
    assert list(xp.slots) == [0]


@pytest.mark.parametrize("backend", ["Numpy", "Torch"])
def test_integer_tensors_must_agree_between_inputs(backend, tmp_path, monkeypatch):
    """A non-float tensor is copied when the inputs agree and refused when they differ, on either
    back end (`equal`); float tensors are merged."""
    from llmctl.core.merge import merge, parse_recipe, run
    from llmctl.errors import CheckpointError

    monkeypatch.setattr(run, "backend_for", lambda plan: getattr(arrays, backend)())
    monkeypatch.chdir(tmp_path)
    ones = torch.ones(4, dtype=torch.bfloat16)
    for name, scale, ids in (("a", 1, [1, 2, 3]), ("b", 2, [1, 2, 3]), ("c", 1, [1, 2, 4])):
        _checkpoint(tmp_path / name, {"model.norm.weight": ones * scale, "model.ids": torch.tensor(ids)})

    def recipe(*names):
        return parse_recipe({"merge_method": "linear", "models": [{"model": n, "parameters": {"weight": 1}} for n in names]})

    merge(recipe("a", "b"), "out")
    out = load_file(tmp_path / "out" / "model.safetensors")
    assert torch.equal(out["model.ids"], torch.tensor([1, 2, 3]))
    assert torch.equal(out["model.norm.weight"], ones * 1.5)
    with pytest.raises(CheckpointError, match="'model.ids': a non-floating tensor differs between inputs"):
        merge(recipe("a", "c"), "out2")
    xp = getattr(arrays, backend)()
    a, b = np.arange(6).reshape(2, 3), np.arange(6).reshape(2, 3)
    if backend == "Torch":
        a, b = torch.from_numpy(a), torch.from_numpy(b)
    assert xp.equal(a, b) is True
    b[1, 2] = 7
    assert xp.equal(a, b) is False and xp.equal(b, a) is False


def test_a_float8_job_runs_on_torch():
    """numpy has no float8: a plan with a float8 input or output gets the torch back end."""
    def plan(*dtypes):
        job = types.SimpleNamespace(dtype=dtypes[0], input_dtypes=dtypes[1:])
        return types.SimpleNamespace(method=types.SimpleNamespace(arrays=True), vocabulary=None, jobs=[job],
                                     checkpoints={"a": types.SimpleNamespace(weights_format="safetensors")})

    assert isinstance(arrays.backend_for(plan("bfloat16", "float16", "float32")), arrays.Numpy)
    assert isinstance(arrays.backend_for(plan("float8_e4m3fn", "float32", "float32")), arrays.Torch)
    assert isinstance(arrays.backend_for(plan("float32", "float32", "float8_e5m2")), arrays.Torch)


@pytest.mark.parametrize("backend", ["Numpy", "Torch"])
def test_writes_survive_partial_pwrites(backend, tmp_path, monkeypatch):
    """Each back end hands the writer a byte view: when `pwrite` writes only part of a buffer
    (as Linux does past 2 GiB), the rest resumes at the right byte."""
    import os

    from llmctl.core.checkpoint import CheckpointWriter

    g = torch.Generator().manual_seed(4)
    tensors = {"w": torch.randn(3, 5, 7, generator=g), "h": torch.randn(6, 9, generator=g).to(torch.bfloat16)}
    pwrite = os.pwrite
    monkeypatch.setattr(os, "pwrite", lambda fd, data, offset: pwrite(fd, bytes(memoryview(data).cast("B")[:5]), offset))
    xp = getattr(arrays, backend)()
    layout = {n: (tuple(t.shape), str(t.dtype).removeprefix("torch.")) for n, t in tensors.items()}
    with CheckpointWriter(tmp_path / "out", layout) as writer:
        for name, (_, dtype) in layout.items():
            xp.write(writer, name, tensors[name] if backend == "Torch" else _as_numpy(tensors[name]), dtype)
        writer.finish({"model_type": "llama"})
    got = load_file(tmp_path / "out" / "model.safetensors")
    for name, t in tensors.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name


# --- AWQ ---------------------------------------------------------------------------------------

ATTN = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
LINEARS = [*ATTN, "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def _awq_model(**kw):
    from llmctl.core.model import ModelConfig
    from llmctl.core.model.build import build_model

    torch.manual_seed(0)
    return build_model(ModelConfig(vocab_size=50, hidden_size=32, num_layers=1, num_heads=4, intermediate_size=64, **kw))


def _producers(block, linears):
    from llmctl.core.quant import awq

    names = {id(m): n for n, m in block.named_modules()}
    return [(None if p is None else names[id(p)], g) for p, g in awq._groups(block, linears)]


@pytest.mark.parametrize("kw, mlp, producers", [
    ({}, ["mlp.gate_proj", "mlp.up_proj"], ["input_layernorm", "self_attn.v_proj", "post_attention_layernorm", "mlp.up_proj"]),
    ({"norm_placement": "post"}, ["mlp.gate_proj", "mlp.up_proj"], [None, "self_attn.v_proj", None, "mlp.up_proj"]),
    ({"num_kv_heads": 2}, ["mlp.gate_proj", "mlp.up_proj"], ["input_layernorm", None, "post_attention_layernorm", "mlp.up_proj"]),
    ({"mlp": "gelu", "norm": "layernorm"}, ["mlp.up_proj"], ["input_layernorm", "self_attn.v_proj", "post_attention_layernorm", None]),
])
def test_awq_groups_are_autoawqs_llama_mapping(kw, mlp, producers):
    """AutoAWQ's mapping: the attention norm scales q/k/v, v scales o when their shapes match (not
    under GQA), the feed-forward norm scales gate/up, up scales down in a gated MLP (without a
    gate, up's output goes through the activation, which 1/s does not pass); a post-norm block's
    norms come after the sublayer, so nothing folds into them. An ignored linear is neither scaled nor
    folded into (it stays bit for bit); MoE experts stand alone."""
    model = _awq_model(**kw)
    block = model.model.layers[0]
    linears = [*ATTN, "self_attn.o_proj", *mlp, "mlp.down_proj"]
    groups = [ATTN, ["self_attn.o_proj"], mlp, ["mlp.down_proj"]]
    assert _producers(block, linears) == list(zip(producers, groups))
    some = ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"]  # k, o and up ignored
    assert _producers(block, some) == [(producers[0], ["self_attn.q_proj", "self_attn.v_proj"]), (None, ["mlp.down_proj"])]
    moe = _awq_model(num_experts=2, experts_per_token=1).model.layers[0]
    experts = [n for n, m in moe.named_modules() if isinstance(m, torch.nn.Linear) and ".experts." in n]
    assert _producers(moe, [*ATTN, *experts]) == [("input_layernorm", ATTN), *((None, [e]) for e in experts)]


@pytest.mark.parametrize("kw", [{}, {"norm": "gemma_rmsnorm", "qkv_bias": True, "mlp_bias": True},
                                {"mlp": "gelu", "norm": "layernorm", "qkv_bias": True}, {"num_kv_heads": 2}])
def test_awq_fold_keeps_the_float_model(kw):
    """Folding 1/s into each producer (a norm's weight — Gemma's stored as scale − 1 — its bias, a
    linear's rows and bias) and s into the group's columns leaves the model's logits unchanged."""
    from llmctl.core.quant import awq

    model = _awq_model(**kw)
    block = model.model.layers[0]
    linears = [n for n in LINEARS if n in dict(block.named_modules())]
    ids = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for m in block.modules():  # non-trivial norm weights and biases
            for name in ("weight", "bias"):
                if isinstance(m, torch.nn.Module) and not isinstance(m, torch.nn.Linear) and getattr(m, name, None) is not None:
                    getattr(m, name).normal_(0.5, 0.2, generator=g)
        before = model(ids).logits
        folded = 0
        for producer, group in awq._groups(block, linears):
            if producer is None:
                continue
            s = torch.rand(block.get_submodule(group[0]).in_features, generator=g) + 0.5
            awq._fold(producer, s)
            for p in group:
                block.get_submodule(p).weight.mul_(s)
            folded += 1
        after = model(ids).logits
    assert folded >= 3
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def test_awq_scales_are_autoawqs():
    """`scales` is AutoAWQ's / llm-compressor's formula (transcribed): duo and activation-only."""
    from llmctl.core.quant import awq

    g = torch.Generator().manual_seed(7)
    x_mean, w_mean = torch.rand(32, generator=g) * 3, torch.rand(32, generator=g)
    x_mean[3] = 0.0
    for alpha in (0.0, 0.25, 0.5, 0.9):
        duo = (x_mean.pow(alpha) / (w_mean.pow(1 - alpha) + 1e-4)).clamp(min=1e-4)
        plain = x_mean.pow(alpha).clamp(min=1e-4)
        for ours, theirs in ((awq.scales(x_mean, w_mean, alpha), duo), (awq.scales(x_mean, w_mean, alpha, duo=False), plain)):
            torch.testing.assert_close(ours, theirs / (theirs.max() * theirs.min()).sqrt(), rtol=1e-6, atol=0)


def test_awq_applies_the_winning_scale_even_at_alpha_0():
    """With duo scaling α = 0 gives s ∝ 1/(mean|ŵ| + 1e-4), not 1: when it wins (grid=1: the only
    point), AutoAWQ and llm-compressor apply it; without duo, α = 0 is s = 1 (None: no scaling)."""
    from llmctl.core.quant import awq
    from llmctl.core.quant.config import AWQConfig
    from llmctl.core.quant.scheme import Scheme

    g = torch.Generator().manual_seed(8)
    x, w = torch.randn(64, 32, generator=g), torch.randn(16, 32, generator=g)
    linear = torch.nn.Linear(32, 16, bias=False)
    linear.weight.data = w
    scheme, x_mean = Scheme(bits=4, group_size=16), x.abs().mean(0)
    calls = [((x,), {}, x @ w.T)]
    with torch.no_grad():
        s = awq.search_scale(linear, calls, [linear], x_mean, scheme, AWQConfig(grid=1))
        g_abs = w.reshape(-1, 16).abs()
        w_mean = (g_abs / (g_abs.amax(1, keepdim=True) + 1e-6)).reshape(w.shape).mean(0)
        assert s is not None and torch.equal(s, awq.scales(x_mean, w_mean, 0.0))
        assert awq.search_scale(linear, calls, [linear], x_mean, scheme, AWQConfig(grid=1, duo_scaling=False)) is None


def test_awq_module_error_is_the_mean_squared_output_difference():
    """Summed over calls of different sizes, divided by all their elements; the call's keyword
    arguments reach the module; a module returning a tensor (not a tuple) is read whole."""
    from llmctl.core.quant import awq

    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 3, bias=False)

        def forward(self, x, *, gain=1.0):
            return self.proj(x) * gain

    m = Scaled()
    g = torch.Generator().manual_seed(9)
    xs = [torch.randn(2, 4, generator=g), torch.randn(5, 4, generator=g)]
    with torch.no_grad():
        calls = [((x,), {"gain": 3.0}, m(x, gain=3.0)) for x in xs]
        other = torch.randn(3, 4, generator=g)
        got = awq.module_error(m, calls, [m.proj], [other])
        want = sum(((x @ other.T) * 3 - ref).pow(2).sum() for (x,), _, ref in calls) / 21
    assert got == pytest.approx(want.item(), rel=1e-5)
    assert awq.module_error(m, [], [m.proj], [other]) == 0.0


def test_awq_parent_is_the_lowest_common_module():
    from llmctl.core.quant import awq

    block = _awq_model().model.layers[0]
    moe = _awq_model(num_experts=2, experts_per_token=1).model.layers[0]
    assert awq._parent(block, ATTN) is block.self_attn
    assert awq._parent(block, ["mlp.gate_proj", "mlp.up_proj"]) is block.mlp
    assert awq._parent(block, ["mlp.down_proj"]) is block.mlp.down_proj
    assert awq._parent(moe, ["mlp.experts.1.gate_proj", "mlp.experts.1.up_proj"]) is moe.mlp.experts[1]


def test_awq_block_hands_over_the_inputs_the_folded_model_gives():
    """After `awq_block` the float model is unchanged and scaled (its norms folded); each linear is
    handed its round-to-nearest weight and the Hessian 2XᵀX/n of the inputs the folded model now
    gives it. An MoE expert no token reached is skipped, the routed one after it is not."""
    from conftest import unrouted_moe

    from llmctl.core.quant import awq
    from llmctl.core.quant.config import AWQConfig
    from llmctl.core.quant.scheme import Scheme

    model = _awq_model()
    block = model.model.layers[0]
    ids = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(10))
    scheme, got = Scheme(bits=4, group_size=16), {}
    with torch.no_grad():
        before, norm = model(ids).logits, block.input_layernorm.weight.clone()
        awq.awq_block(block, LINEARS, lambda: model(ids), lambda p, q, h: got.__setitem__(p, (q, h)), scheme,
                      AWQConfig(grid=4, clip=False))
        seen = {}
        hooks = [block.get_submodule(p).register_forward_pre_hook(
            lambda m, a, p=p: seen.__setitem__(p, a[0].reshape(-1, a[0].shape[-1]).float())) for p in LINEARS]
        torch.testing.assert_close(model(ids).logits, before, rtol=1e-4, atol=1e-4)
        for h in hooks:
            h.remove()
    assert not torch.equal(block.input_layernorm.weight, norm) and sorted(got) == sorted(LINEARS)
    for p, (q, h) in got.items():
        x = seen[p]
        torch.testing.assert_close(h, 2 * x.T @ x / len(x), rtol=1e-4, atol=1e-5)
        for a, b in zip(q, scheme.nearest(block.get_submodule(p).weight)):
            assert torch.equal(a, b), p

    class LastExpert(torch.nn.Module):
        def forward(self, h):
            return torch.tensor([0.0, 0.0, 0.0, 10.0]).expand(*h.shape[:-1], 4)

    moe = unrouted_moe()
    layer = moe.model.layers[0]
    layer.mlp.gate = LastExpert()
    names = [n for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)]
    put = []
    with torch.no_grad():
        awq.awq_block(layer, names, lambda: moe(ids), lambda p, q, h: put.append(p), scheme, AWQConfig(grid=2))
    assert sorted(put) == sorted([*ATTN, "self_attn.o_proj", *(f"mlp.experts.3.{n}" for n in ("gate_proj", "up_proj", "down_proj"))])


@pytest.mark.parametrize("sym", [True, False])
def test_awq_clip_search_is_autoawqs(sym):
    """`search_clip` equals AutoAWQ's `_search_best_clip` (transcribed: per output row and group,
    the shrink of the group's max |w| with the least mean squared error of x_g·Q(w_g)), strict `<`."""
    from llmctl.core.quant import awq
    from llmctl.core.quant.config import AWQConfig
    from llmctl.core.quant.scheme import Scheme

    g = torch.Generator().manual_seed(11)
    x, w = torch.randn(40, 64, generator=g), torch.randn(12, 64, generator=g)
    w[:, 5] *= 6  # an outlier column worth clipping around
    scheme, cfg = Scheme(bits=4, group_size=16, symmetric=sym), AWQConfig(clip_grid=8, max_shrink=0.5)
    got = awq.search_clip(x, w, scheme, cfg)
    # AutoAWQ: w [O, 1, G, k], input [1, n, G, k]
    wg, xg = w.reshape(12, 1, 4, 16), x.reshape(1, 40, 4, 16)
    org_out = (xg * wg).sum(-1)                                  # [O, n, G]
    org_max = wg.abs().amax(-1, keepdim=True)                     # [O, 1, G, 1]
    best_max, min_errs = org_max.clone(), torch.full_like(org_max, float("inf"))
    for i_s in range(int(cfg.max_shrink * cfg.clip_grid)):
        max_val = org_max * (1 - i_s / cfg.clip_grid)
        q_w = scheme.fake(torch.clamp(wg, -max_val, max_val).reshape(12, 64)).reshape(wg.shape)
        err = ((xg * q_w).sum(-1) - org_out).pow(2).mean(1).view(min_errs.shape)
        better = err < min_errs
        min_errs[better], best_max[better] = err[better], max_val[better]
    want = torch.clamp(wg, -best_max, best_max).reshape(12, 64)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert not torch.equal(got, w)


def test_awq_block_clips_all_but_q_and_k_and_ignores_the_global_rng():
    """With clipping on, q_proj and k_proj are handed their unclipped rounding (AutoAWQ leaves them),
    the others a clipped one; the rows the clip search samples come from awq_block's own seeded
    generator, so the result does not depend on torch's global random state."""
    from llmctl.core.quant import awq
    from llmctl.core.quant.config import AWQConfig
    from llmctl.core.quant.scheme import Scheme

    ids = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(12))
    scheme, runs = Scheme(bits=4, group_size=16), []
    for seed in (1, 2):
        model = _awq_model()
        block, got = model.model.layers[0], {}
        torch.manual_seed(seed)
        with torch.no_grad():
            awq.awq_block(block, LINEARS, lambda: model(ids), lambda p, q, h: got.__setitem__(p, q), scheme,
                          AWQConfig(grid=2, clip_grid=8, clip_tokens=8))
        unclipped = {p: scheme.nearest(block.get_submodule(p).weight) for p in LINEARS}
        same = {p for p in LINEARS if all(torch.equal(a, b) for a, b in zip(got[p], unclipped[p]))}
        assert {"self_attn.q_proj", "self_attn.k_proj"} <= same and len(same) < len(LINEARS)
        runs.append(got)
    for p in LINEARS:
        assert all(torch.equal(a, b) for a, b in zip(runs[0][p], runs[1][p])), p
