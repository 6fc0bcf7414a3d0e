"""llmctl's native batch-1 kernels (`llmctl/core/native`): equal to references, used where they fit,
and torch's kernels wherever they cannot be built."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_llama

from llmctl.core import native
from llmctl.core.generate import GenerationConfig, generate, matvec
from llmctl.core.model.io import load_model, save_model
from llmctl.core.quant.config import QuantizeConfig
from llmctl.core.quant.linear import PackedLinear
from llmctl.core.quant.methods import quantize_model
from llmctl.core.quant.scheme import Scheme
from llmctl.core.tokenizer import load_tokenizer

needs = pytest.mark.skipif(native.ops() is None or not native.has(native.QUANT | native.BF16 | native.F32),
                           reason="no C++ compiler or no AVX2 + FMA here")


def quantized_input(x: torch.Tensor, bits: int) -> torch.Tensor:
    """x as mv_quant sees it: int8 per block of 512 / bits values, scale max|x| / 127, back to float."""
    blocks = x.float().reshape(-1, native.block_of(bits))
    d = blocks.abs().amax(1, keepdim=True) / 127
    return (torch.round(blocks / torch.where(d > 0, d, 1)) * d).reshape(x.shape)


@needs
@pytest.mark.parametrize("n", [1, 3, 4, 130])  # one row, a few, and more than one thread's range of 64
@pytest.mark.parametrize("k", [96, 2048])  # steps of 64 inputs with a tail of 32, and without
def test_float32_product(n, k):
    torch.manual_seed(0)
    x, w = torch.randn(1, k), torch.randn(n, k)
    exact = (x.double() @ w.double().T).float()  # float32 sums in another order differ by about k·eps
    torch.testing.assert_close(native.ops().mv_float(x, w), exact, rtol=1e-5, atol=1e-5 * k / 96)


@needs
@pytest.mark.parametrize("k", [2048, 96])  # steps of 64 inputs, and a tail of 32
def test_bfloat16_product_sums_in_float32(k):
    torch.manual_seed(0)
    x, w = torch.randn(1, k).bfloat16(), torch.randn(131, k).bfloat16()
    y = native.ops().mv_float(x, w)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, (x.float() @ w.float().T).bfloat16(), rtol=8e-3, atol=0)  # one bf16 rounding


@needs
@pytest.mark.parametrize("scheme", [Scheme(8), Scheme(8, 128, symmetric=False), Scheme(4, 128),
                                    Scheme(4, 256, symmetric=False), Scheme(4),  # groups of several blocks
                                    Scheme(4, 128, symmetric=False), Scheme(8, 64, symmetric=False)])  # of one
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_product_equals_the_dequantized_one_on_the_rounded_input(scheme, dtype):
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 132)
    module = PackedLinear.from_linear(linear, scheme)
    x = (torch.randn(1, 1, 256) * torch.linspace(0.1, 3, 256)).to(dtype)  # blocks of different scales
    x[..., 64:128] = 0  # an all-zero block
    with torch.no_grad():
        y = module(x)
    assert [name for name, _ in module.kernels.values()] == ["native"] and y.shape == (1, 1, 132)
    expected = F.linear(quantized_input(x, scheme.bits), module.dequantize(torch.float32), linear.bias.detach())
    tol = 8e-3 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(y.float(), expected, rtol=tol, atol=tol * expected.abs().max().item())
    exact = F.linear(x.float(), module.dequantize(torch.float32), linear.bias.detach())
    assert (y.float() - exact).norm() < 0.02 * exact.norm()  # the input's rounding costs little


@needs
@pytest.mark.parametrize("bits", [8, 4])
def test_integer_sums_at_the_grid_ends_do_not_saturate(bits):
    """Weights at the ends of the grid (int8: unsigned 0 and 255) against inputs at ±127: where a
    kernel multiplies bytes pairwise into 16 bits (AVX2's vpmaddubsw), unsigned int8 weights would
    overflow; read as signed u − 128 they do not."""
    linear = torch.nn.Linear(256, 8, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([1.0, -1.0, 0.5, -0.25]).repeat_interleave(2)[:, None].expand(8, 256))
        linear.weight[1::2, ::2] *= -1  # odd rows alternate in sign
    module = PackedLinear.from_linear(linear, Scheme(bits))
    for sign in (1.0, -1.0):
        x = torch.full((1, 256), sign)
        with torch.no_grad():
            y = module(x)
        assert [name for name, _ in module.kernels.values()] == ["native"]
        torch.testing.assert_close(y, F.linear(x, module.dequantize(torch.float32)), rtol=1e-6, atol=1e-4)


@needs
def test_decoding_rows_and_batches_keep_their_own_kernels(monkeypatch):
    from llmctl.core.quant import kernels

    monkeypatch.setattr(kernels, "fast_bf16_matmul", lambda: True)  # a CPU with bf16 hardware
    module = PackedLinear.from_linear(torch.nn.Linear(128, 64), Scheme(4, 128))
    with torch.no_grad():
        for _ in range(2):
            module(torch.randn(3, 128, dtype=torch.bfloat16))  # a short batch: torch's int4 kernel
            module(torch.randn(1, 1, 128, dtype=torch.bfloat16))  # decoding: one row
            module(torch.randn(200, 128, dtype=torch.bfloat16))  # a prefill: dequantized for one GEMM
    assert [name for name, _ in module.kernels.values()] == ["int4pack_cpu", "native", "gemm"]


@pytest.mark.parametrize("in_features,out_features,scheme", [(96, 8, Scheme(8)), (192, 8, Scheme(4)),
                                                             (256, 8, Scheme(4, 64)), (128, 6, Scheme(8))])
def test_shapes_the_kernel_does_not_take_go_to_torch(in_features, out_features, scheme):
    module = PackedLinear.from_linear(torch.nn.Linear(in_features, out_features), scheme)
    with torch.no_grad():
        module(torch.randn(1, in_features))
    assert "native" not in [name for name, _ in module.kernels.values()]


@needs
def test_bad_shapes_are_refused_by_the_op():
    with pytest.raises(RuntimeError, match="K and N must fit the packing"):
        native.ops().mv_quant(torch.randn(1, 96), torch.zeros(4, 96, dtype=torch.uint8), torch.ones(4, 1),
                              torch.zeros(4, 1), None, 8)
    with pytest.raises(RuntimeError, match="K % 32"):
        native.ops().mv_float(torch.randn(1, 40), torch.randn(4, 40))


@needs
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_one_row_products_take_the_native_kernel(monkeypatch, dtype):
    ops, calls = native.ops(), []
    monkeypatch.setattr(native, "ops", lambda: SimpleNamespace(
        capabilities=ops.capabilities, mv_float=lambda x, w: calls.append(tuple(w.shape)) or ops.mv_float(x, w)))
    torch.manual_seed(0)
    w, b = torch.randn(48, 64, dtype=dtype), torch.randn(48, dtype=dtype)
    f = torch.compile(lambda x: F.linear(torch.tanh(x), w, b), backend=matvec.backend, dynamic=False)
    x = torch.randn(1, 64, dtype=dtype)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(f(x), F.linear(torch.tanh(x), w, b), rtol=tol, atol=tol)
    assert calls == [(48, 64)]  # traced once, into the native op


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    text = "The quick brown fox jumps over the lazy dog. A cat sat on the mat and looked at the birds.\n\n"
    return tiny_llama(tmp_path_factory.mktemp("base"), [text] * 20, vocab=300, context=128, hidden=128,
                      intermediate=256)


@needs
@pytest.mark.parametrize("bits,group", [(8, None), (4, 128)])
def test_native_decoding_compiled_equals_eager(base, tmp_path, bits, group):
    model, _ = load_model(base)
    quantize_model(model, QuantizeConfig(method=f"int{bits}", bits=bits, group_size=group))
    save_model(model, tmp_path / "q", tokenizer_dir=base)
    # float32 activations: in bf16 this tiny model's logits move by up to 3 between eager and
    # compiled steps (inductor rounds fewer intermediates) with or without these kernels
    model, tok = load_model(tmp_path / "q")[0], load_tokenizer(tmp_path / "q")
    cfg = dict(max_new_tokens=12, eos_ids=[])
    eager = generate(model, tok, ["the cat"], GenerationConfig(**cfg))
    layers = [m for m in model.modules() if isinstance(m, PackedLinear)]
    assert len(layers) == 14 and all("native" in [n for n, _ in m.kernels.values()] for m in layers)
    compiled = generate(model, tok, ["the cat"], GenerationConfig(**cfg, compile=True))
    assert compiled[0].tokens == eager[0].tokens


def test_disabled_or_unbuildable_kernels_leave_torch_in_charge(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("LLMCTL_NATIVE", "0")
    native.ops.cache_clear()
    try:
        assert native.ops() is None and not native.has(native.F32)
        w = torch.randn(6, 64)
        assert matvec.mm(torch.randn(1, 64).bfloat16(), w.t().bfloat16()) is NotImplemented  # oneDNN's bf16
        torch.testing.assert_close(matvec.mm(torch.ones(1, 64), w.t()), w.sum(1)[None], rtol=1e-5, atol=1e-5)

        monkeypatch.setenv("LLMCTL_NATIVE", "1")
        monkeypatch.setattr(native, "_loaded", lambda torch: False)  # as in a process that has not built them
        (tmp_path / "file").write_text("")
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file"))
        native.ops.cache_clear()
        assert native.ops() is None  # the build directory cannot be made: a warning, torch's kernels
        assert "native CPU kernels unavailable" in capsys.readouterr().err
    finally:
        native.ops.cache_clear()


@pytest.mark.skipif(native.ops() is None, reason="native kernels unavailable")
def test_a_build_killed_midway_does_not_block_the_next_load():
    """torch's build lock outlives a killed build (its file stays); the next process takes
    llmctl's own lock, which died with the killed one, and goes on."""
    import subprocess
    import sys

    stale = native.build_dir() / "lock"
    stale.write_text("")
    try:
        done = subprocess.run([sys.executable, "-c", "from llmctl.core import native; print(native.ops() is not None)"],
                              capture_output=True, text=True, timeout=120)
        assert done.stdout.strip() == "True", done.stderr[-500:]
        assert not stale.exists()
    finally:
        stale.unlink(missing_ok=True)
