"""Edges of the packed int8/int4 linears the mutation runs found untested (docs/testing.md):
`PackedLinear`'s buffers and dtypes, the `pack-quantized` config both ways (compressed-tensors
as the reference), target/ignore rules, odd widths."""

import pytest
import torch
from torch import nn

from llmctl.core import native
from llmctl.core.model.transforms import from_spec
from llmctl.core.quant import kernels
from llmctl.core.quant.linear import PackedLinear, PackQuantized
from llmctl.core.quant.scheme import Scheme
from llmctl.errors import CheckpointError, UsageError

import compressed_tensors as ct  # noqa: E402
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor  # noqa: E402
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme  # noqa: E402
from compressed_tensors.utils import match_named_modules  # noqa: E402


def _ct_weight(module: PackedLinear, scheme: Scheme) -> torch.Tensor:
    """The weight compressed-tensors decompresses from the module's tensors."""
    args = QuantizationArgs(num_bits=scheme.bits, symmetric=scheme.symmetric,
                            strategy="group" if scheme.group_size else "channel", group_size=scheme.group_size)
    state = {k: v for k, v in module.state_dict().items() if k != "bias"}
    return PackedQuantizationCompressor.decompress(state, QuantizationScheme(targets=["Linear"], weights=args))["weight"]


@pytest.mark.parametrize("scheme", [Scheme(4, 32, symmetric=False), Scheme(8), Scheme(4)])
def test_a_module_built_on_meta_has_the_tensors_a_checkpoint_assigns(scheme):
    """load_model builds on meta and assigns strictly: names, shapes and dtypes must be those stored."""
    torch.manual_seed(0)
    real = PackedLinear.from_linear(nn.Linear(64, 24).bfloat16(), scheme)
    with torch.device("meta"):  # as Transform.apply makes it
        meta = PackedLinear.from_linear(nn.Linear(64, 24, dtype=torch.bfloat16), scheme)
    want = {k: (tuple(v.shape), v.dtype) for k, v in real.state_dict().items()}
    assert {k: (tuple(v.shape), v.dtype) for k, v in meta.state_dict().items()} == want
    assert want["weight_scale"][1] == torch.bfloat16 and want["weight_packed"][1] == torch.int32
    assert meta.weight_packed.device.type == "meta"


@pytest.mark.parametrize("scheme", [Scheme(4, 32, symmetric=False), Scheme(4, 32), Scheme(8, symmetric=False)])
def test_bfloat16_modules_store_bfloat16_scales_and_round_on_that_grid(scheme):
    torch.manual_seed(0)
    linear = nn.Linear(64, 40).bfloat16()
    module = PackedLinear.from_linear(linear, scheme)
    assert module.weight_scale.dtype == torch.bfloat16
    scale, zero, q = module.integers()  # the documented dtypes, whatever the scheme
    assert (scale.dtype, zero.dtype, q.dtype) == (torch.float32, torch.float32, torch.int8)
    w = linear.weight.detach().float()
    # the integers are nearest on the grid of the stored (bf16-rounded) scale
    assert torch.equal(q, scheme.quantize(w, scale, zero))
    assert torch.equal(module.dequantize(), _ct_weight(module, scheme))  # bit for bit, in bfloat16


def test_odd_input_widths_unpack_to_the_input_width():
    """37 int4 values fill 5 words (40 nibbles): the padding must not reach the weight."""
    torch.manual_seed(0)
    scheme = Scheme(4)
    linear = nn.Linear(37, 8)
    module = PackedLinear.from_linear(linear, scheme)
    assert module.integers()[2].shape == (8, 37)
    assert torch.equal(module.dequantize(), _ct_weight(module, scheme))
    x = torch.randn(2, 37)
    with torch.no_grad():
        torch.testing.assert_close(module(x), nn.functional.linear(x, module.dequantize(), linear.bias))


def test_calibrated_solutions_are_stored_for_their_path_only():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 8), nn.Linear(8, 8)).bfloat16()
    t = PackQuantized(bits=4, group_size=None, ignore=[])
    q = torch.randint(-8, 8, (8, 32), dtype=torch.int8)
    scale, zero = torch.rand(8, 1) + 0.1, torch.zeros(8, 1)  # float32, as the methods give them
    t.solutions["0"] = (scale, zero, q)
    t.apply(model)
    assert torch.equal(model[0].integers()[2], q) and model[0].weight_scale.dtype == torch.bfloat16
    torch.testing.assert_close(model[0].weight_scale.float(), scale, rtol=4e-3, atol=0)
    assert not t.solutions  # consumed
    rtn = PackedLinear.from_linear(nn.Linear(8, 8).bfloat16(), t.scheme)  # the other one: round-to-nearest
    assert model[1].weight_scale.dtype == rtn.weight_scale.dtype


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.gate_proj, self.up_proj = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)


@pytest.mark.parametrize("targets,ignore", [
    (["Linear"], ["re:.*gate_proj"]),
    (["re:.*q_proj", "re:layers\\.1\\."], []),
    (["layers.0.up_proj"], ["layers.0.q_proj"]),
    (["re:layers\\.0\\..*"], ["re:layers\\.0\\.up", "lm_head"]),
    (["Linear"], ["re:proj"]),  # re: matches from the start, so nothing is ignored
])
def test_targets_and_ignore_select_as_compressed_tensors_does(targets, ignore):
    model = nn.Module()
    model.layers = nn.ModuleList([_Block(), _Block()])
    model.lm_head = nn.Linear(8, 8)
    expected = [n for n, m in match_named_modules(model, targets, ignore) if isinstance(m, nn.Linear)]
    assert PackQuantized(targets=targets, ignore=ignore).select(model) == expected and expected


def test_config_is_compressed_tensors_own_and_reads_back():
    ours = PackQuantized(bits=4, group_size=32, symmetric=False, targets=["re:.*proj"], ignore=["lm_head"])
    config = ours.quantization_config()
    args = QuantizationArgs(num_bits=4, symmetric=False, strategy="group", group_size=32)
    theirs = QuantizationConfig(config_groups={"group_0": QuantizationScheme(targets=["re:.*proj"], weights=args,
                                                                             format="pack-quantized")},
                                format="pack-quantized", quantization_status="compressed", ignore=["lm_head"])
    dumped = theirs.model_dump(mode="json")
    assert set(config) <= set(dumped) and all(config[k] == dumped[k] for k in config if k != "config_groups")
    weights = config["config_groups"]["group_0"]["weights"]
    assert QuantizationArgs.model_validate(weights) == QuantizationArgs.model_validate(
        {**args.model_dump(), "observer": "minmax"})  # llm-compressor's static weight observer
    again = PackQuantized.from_quantization_config(dumped)
    assert again.spec() == ours.spec() and from_spec(ours.spec()).spec() == ours.spec()
    assert ours.spec() == {"type": "pack-quantized", "bits": 4, "group_size": 32, "symmetric": False,
                           "targets": ["re:.*proj"], "ignore": ["lm_head"]}


@pytest.mark.parametrize("actorder", ["weight", "static"])
def test_llm_compressors_defaults_and_act_order_are_read(actorder):
    """What llm-compressor may leave out: symmetric (true), targets (all linears), ignore (none); and
    its act-order "weight" or its alias "static" (0.14's GPTQ default: a calibration order that changes
    nothing at load) is accepted."""
    config = {"format": "pack-quantized", "config_groups": {"g": {"weights": {
        "num_bits": 4, "type": "int", "strategy": "group", "group_size": 64, "actorder": actorder}}}}
    t = PackQuantized.from_quantization_config(config)
    assert (t.bits, t.group_size, t.symmetric, t.targets, t.ignore) == (4, 64, True, ["Linear"], [])
    config["config_groups"]["g"]["weights"]["symmetric"] = False
    assert PackQuantized.from_quantization_config(config).symmetric is False
    config.update(transform_config={}, sparsity_config={"format": "dense", "sparsity_structure": "2:4"})
    assert PackQuantized.from_quantization_config(config).symmetric is False  # empty, or metadata only


def _config(**weights):
    w = {"num_bits": 8, "type": "int", "strategy": "channel", **weights}
    return {"format": "pack-quantized", "config_groups": {"g": {"weights": w}}}


@pytest.mark.parametrize("config,message", [
    (_config(strategy="tensor"), "weight-only int quantization per channel or group"),
    (_config(actorder="group"), "weight-only int quantization per channel or group"),
    (_config(actorder="dynamic"), "weight-only int quantization per channel or group"),  # group's alias
    (_config(dynamic=True), "weight-only int quantization per channel or group"),
    ({**_config(), "config_groups": {"g": {"weights": _config()["config_groups"]["g"]["weights"],
                                           "input_activations": {"num_bits": 8}}}}, "weight-only"),
    ({"format": "int-quantized", "config_groups": {"a": {}, "b": {}}},
     "format with one config group is supported \\(got format 'int-quantized', 2 groups\\)"),
    (_config(num_bits=3), "^config.json quantization_config: bits must be 4 or 8, not 3$"),
    ({**_config(), "transform_config": {"config_groups": {"u": {"type": "hadamard"}}}}, "transform_config"),
    ({**_config(), "kv_cache_scheme": {"num_bits": 8, "type": "float", "strategy": "tensor"}}, "kv_cache_scheme"),
    ({**_config(), "sparsity_config": {"format": "sparse-24-bitmask", "sparsity_structure": "2:4"}},
     "sparsity_config format 'sparse-24-bitmask'"),
])
def test_unsupported_configs_name_what_is_wrong(config, message):
    with pytest.raises(CheckpointError, match=message) as e:
        PackQuantized.from_quantization_config(config)
    assert str(e.value).startswith("config.json quantization_config: ")


def test_repr_names_the_scheme():
    module = PackedLinear.from_linear(nn.Linear(64, 16), Scheme(4, 32, symmetric=False))
    assert module.extra_repr() == ("in_features=64, out_features=16, bits=4, group_size=32, symmetric=False, "
                                   "bias=True")


# ---------------------------------------------------------------------------------------- kernels

def _kernel_names(module) -> list[str]:
    return [name for name, _ in module.kernels.values()]


CPU_KERNELS = [  # (scheme, input shape, input dtype, the kernel that must serve it)
    (Scheme(8), (3, 256), torch.bfloat16, "int8pack"),
    (Scheme(4, 64), (3, 256), torch.bfloat16, "int4pack_cpu"),
    (Scheme(8), (3, 256), torch.float32, "dense"),
    (Scheme(8, symmetric=False), (3, 256), torch.bfloat16, "dequantize"),  # int8pack has no zero points
    (Scheme(4), (3, 48), torch.bfloat16, "dequantize"),  # no int4 group size divides 48
    (Scheme(8, 64), (3, 256), torch.float16, "gemm"),  # torch's float16 ops: a reference path
    (Scheme(8, 64), (3, 256), torch.bfloat16, "dequantize"),
    (Scheme(8), (2, 32, 256), torch.bfloat16, "gemm"),  # 64 rows: a prefill (on a CPU with bf16 hardware)
    (Scheme(8), (63, 256), torch.bfloat16, "int8pack"),
    (Scheme(4, 64, symmetric=False), (128, 256), torch.float16, "gemm"),
    (Scheme(4, 64), (127, 256), torch.bfloat16, "int4pack_cpu"),
    (Scheme(8), (64, 256), torch.float32, "dense"),
]
if native.has(native.QUANT):
    CPU_KERNELS += [(Scheme(8), (1, 256), torch.bfloat16, "native"), (Scheme(4, 128), (1, 256), torch.float32, "native")]


@pytest.mark.parametrize("module_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scheme,shape,dtype,kernel", CPU_KERNELS)
def test_bias_free_modules_take_their_kernel_in_any_input_dtype(scheme, shape, dtype, kernel, module_dtype,
                                                                 monkeypatch):
    """Llama's linears have no bias; a module's scales may be in another dtype than its inputs."""
    monkeypatch.setattr(kernels, "fast_bf16_matmul", lambda: True)
    torch.manual_seed(0)
    module = PackedLinear.from_linear(nn.Linear(shape[-1], 48, bias=False).to(module_dtype), scheme)
    x = torch.randn(*shape, dtype=dtype)
    with torch.no_grad():
        y = module(x)
    assert _kernel_names(module) == [kernel] and y.dtype == dtype
    expected = nn.functional.linear(x.float(), module.dequantize(torch.float32))
    tol = 1e-5 if dtype == torch.float32 and kernel != "native" else 2e-2
    torch.testing.assert_close(y.float(), expected, rtol=0, atol=tol * expected.abs().max().item())


def test_a_float32_modules_bias_meets_16_bit_inputs_on_the_dequantizing_paths(monkeypatch):
    monkeypatch.setattr(kernels, "fast_bf16_matmul", lambda: True)
    module = PackedLinear.from_linear(nn.Linear(256, 48), Scheme(8, 64))  # no fused kernel: dequantized
    weight, bias = module.dequantize(torch.float32), module.bias.detach()
    with torch.no_grad():
        for n, kernel in ((3, "dequantize"), (64, "gemm")):
            x = torch.randn(n, 256, dtype=torch.bfloat16)
            y = module(x)
            expected = nn.functional.linear(x.float(), weight, bias)
            assert y.dtype == torch.bfloat16 and module.kernels[(x.device, x.dtype, "few" if n < 64 else "many")][0] == kernel
            torch.testing.assert_close(y.float(), expected, rtol=0, atol=2e-2 * expected.abs().max().item())


def test_one_row_a_few_and_many_keep_a_kernel_each(monkeypatch):
    """Decoding, a short batch and a prompt's prefill through one module: each row count's kernel is
    made once and kept beside the others."""
    monkeypatch.setattr(kernels, "fast_bf16_matmul", lambda: True)
    module = PackedLinear.from_linear(nn.Linear(256, 48).bfloat16(), Scheme(8))
    weight, bias = module.dequantize(torch.float32), module.bias.float()
    with torch.no_grad():
        for n in (1, 3, 64, 2, 200):
            x = torch.randn(n, 256, dtype=torch.bfloat16)
            expected = nn.functional.linear(x.float(), weight, bias)
            torch.testing.assert_close(module(x).float(), expected, rtol=0, atol=2e-2 * expected.abs().max().item())
    names = {key[2]: name for key, (name, _) in module.kernels.items()}
    assert names == {"one": "native" if native.has(native.QUANT) else "int8pack", "few": "int8pack", "many": "gemm"}


@pytest.mark.parametrize("bf16_hardware", [True, False])
def test_bf16_prefills_are_dequantized_for_a_gemm_only_where_the_cpu_has_bf16_hardware(bf16_hardware, monkeypatch):
    """Without AVX512-BF16 or AMX, oneDNN's bf16 GEMM is 2–3× slower than torch's fused int8/int4 ops."""
    monkeypatch.setattr(kernels, "fast_bf16_matmul", lambda: bf16_hardware)
    for scheme, fused in ((Scheme(8), "int8pack"), (Scheme(4, 64), "int4pack_cpu")):
        module = PackedLinear.from_linear(nn.Linear(256, 48, bias=False).bfloat16(), scheme)
        with torch.no_grad():
            module(torch.randn(200, 256, dtype=torch.bfloat16))
            module(torch.randn(200, 256, dtype=torch.float16))  # float16: a GEMM on any CPU
        assert _kernel_names(module) == ["gemm" if bf16_hardware else fused, "gemm"]


def test_cpu_flags_decide_bf16_hardware(monkeypatch):
    from llmctl.core import native

    for flags, expected in (("flags : fpu avx2 avx512f avx512_bf16", True), ("flags : fpu avx2 amx_bf16", True),
                            ("flags : fpu avx2 avx512f avx512_vnni", False), ("", False)):
        monkeypatch.setattr(native, "_cpu_flags", lambda flags=flags: flags)
        kernels.fast_bf16_matmul.cache_clear()
        assert kernels.fast_bf16_matmul() is expected
    kernels.fast_bf16_matmul.cache_clear()


def test_inputs_without_gradients_take_the_fused_kernels_with_autograd_on():
    module = PackedLinear.from_linear(nn.Linear(256, 48).bfloat16(), Scheme(8))
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    module(x)  # not under no_grad: an evaluation loop that forgot it
    assert _kernel_names(module) == ["int8pack"]
    xg = torch.randn(3, 256, requires_grad=True)  # a gradient to the input: dequantized, outside the cache
    bias_free = PackedLinear.from_linear(nn.Linear(256, 48, bias=False).bfloat16(), Scheme(8))
    bias_free(xg).sum().backward()
    assert not bias_free.kernels
    torch.testing.assert_close(xg.grad, bias_free.dequantize(torch.float32).sum(0).expand(3, -1))


def test_a_kernel_that_fails_passes_to_the_next_but_the_last_one_raises(monkeypatch):
    module = PackedLinear.from_linear(nn.Linear(256, 48).bfloat16(), Scheme(8))
    x = torch.randn(3, 256, dtype=torch.bfloat16)

    def broken(module, x):
        raise NotImplementedError("this build lacks the op")
    monkeypatch.setitem(kernels.KERNELS, "int8pack", broken)
    assert kernels.choose(module, x)[0] == "dequantize"
    monkeypatch.setitem(kernels.KERNELS, "int8pack", lambda module, x: lambda x: torch.ones(1) @ torch.ones(2))
    assert kernels.choose(module, x)[0] == "dequantize"  # a kernel that fails when first run
    monkeypatch.setitem(kernels.KERNELS, "dequantize", broken)
    with pytest.raises(NotImplementedError):
        kernels.choose(module, x)
    with pytest.raises(ValueError, match=r"no kernel among \['int4pack_cuda'\] takes this module"):
        kernels.choose(module, x, allowed=["int4pack_cuda"])


# ---------------------------------------------------------------------------------------- GGUF export

@pytest.mark.parametrize("scaling", [
    {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    {"factor": 4.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0, "original_max_position_embeddings": 256},
    {"factor": 32.0, "low_freq_factor": 0.5, "high_freq_factor": 3.0, "original_max_position_embeddings": 8192},
])
def test_llama3_rope_factors_are_transformers_divisors(scaling):
    """rope_freqs (llama.cpp divides each rotary frequency by it) against transformers' llama3 rope,
    over head sizes whose frequencies fall in all three bands."""
    import transformers as tr
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from llmctl.core.export.gguf import _llama3_factors
    from llmctl.core.model import ModelConfig

    cfg = ModelConfig(vocab_size=64, hidden_size=128, num_layers=1, num_heads=2, rope_theta=500000.0,
                      rope_scaling={"rope_type": "llama3", **scaling})
    config = tr.LlamaConfig(hidden_size=128, num_attention_heads=2, num_hidden_layers=1,
                            rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, **scaling})
    scaled = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")[0].double()
    default = 1.0 / 500000.0 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64)
    factors = _llama3_factors(cfg)
    assert factors.dtype == "float32" and factors.shape == (32,)
    torch.testing.assert_close(torch.from_numpy(factors).double(), default / scaled, rtol=1e-6, atol=0)
    assert {1.0, scaling["factor"]} <= set(factors.tolist())  # the short and long bands both present


def test_llama3_rope_factors_default_as_llama_cpp_does():
    """llama.cpp's converter: low_freq_factor 1, high_freq_factor 4, original context 8192 when absent."""
    from llmctl.core.export.gguf import _llama3_factors
    from llmctl.core.model import ModelConfig

    def factors(**scaling):
        return _llama3_factors(ModelConfig(vocab_size=64, hidden_size=128, num_layers=1, num_heads=2,
                                           rope_theta=500000.0, rope_scaling={"rope_type": "llama3", **scaling}))

    explicit = factors(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
    assert (factors(factor=8.0) == explicit).all()
    assert not (factors(factor=8.0, low_freq_factor=2.0) == explicit).all()  # the keys are read
    assert not (factors(factor=8.0, high_freq_factor=8.0) == explicit).all()
    assert not (factors(factor=8.0, original_max_position_embeddings=4096) == explicit).all()


def _hf_config(kind: str, **changes):
    """llmctl's ModelConfig of a tiny transformers config of `kind`."""
    import transformers as tr

    from llmctl.core.hf import config_from_hf

    common = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2)
    moe = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
    config = {"llama": lambda: tr.LlamaConfig(**common),
              "qwen2": lambda: tr.Qwen2Config(**common),
              "qwen2_moe": lambda: tr.Qwen2MoeConfig(**common, **moe, shared_expert_intermediate_size=48),
              "qwen3_moe": lambda: tr.Qwen3MoeConfig(**common, **moe, head_dim=16)}[kind]()
    return config_from_hf({**config.to_dict(), **changes})


def test_gguf_refusals_name_the_reason(monkeypatch):
    """Each refusal of `family_of`, with the message that says why (transformers' configs as input)."""
    import dataclasses

    from llmctl.core.export import gguf as export_gguf
    from llmctl.core.model import ModelConfig

    family_of = export_gguf.family_of
    with pytest.raises(UsageError) as e:
        family_of(ModelConfig(vocab_size=64, hidden_size=16, num_layers=1, num_heads=2, position="alibi"))
    assert str(e.value) == ("this model matches no Hugging Face architecture (its config is llmctl's own), and "
                            "llama.cpp runs only known ones: llama, mistral, mixtral, qwen2, qwen3, gemma, gemma2, gemma3_text, "
                            "gpt2, qwen2_moe, qwen3_moe, phi3, starcoder2, phi, gpt_neox")
    llama = _hf_config("llama")
    with pytest.raises(UsageError) as e:  # a reward model's one-row score head is no LM head
        family_of(dataclasses.replace(llama, num_labels=1))
    assert str(e.value) == ("cannot export a sequence classifier (reward model, 1 score) to GGUF: llama.cpp runs "
                            "language models")
    with pytest.raises(UsageError, match=r"\(reward model, 3 scores\)"):
        family_of(dataclasses.replace(llama, num_labels=3))
    with pytest.raises(UsageError, match="^cannot export this llama model to GGUF: its MLP is geglu/gelu_tanh, "
                                         "llama.cpp's llama computes swiglu/silu$"):
        family_of(_hf_config("llama", hidden_act="gelu_pytorch_tanh"))
    with pytest.raises(UsageError, match="llama.cpp's qwen3moe always renormalizes the top-k routing weights$"):
        family_of(_hf_config("qwen3_moe", norm_topk_prob=False))
    with pytest.raises(UsageError, match="llama.cpp's qwen2moe never renormalizes the top-k routing weights$"):
        family_of(_hf_config("qwen2_moe", norm_topk_prob=True))
    assert family_of(_hf_config("qwen3_moe", norm_topk_prob=True))[0] == "qwen3_moe"
    for kind, scaling, ok in [("llama", "linear", True), ("qwen2", "yarn", True), ("qwen2", "linear", True),
                              ("llama", "llama3", True), ("qwen2", "llama3", False), ("llama", "dynamic", False)]:
        cfg = dataclasses.replace(_hf_config(kind), rope_scaling={"rope_type": scaling, "factor": 2.0})
        if ok:
            assert family_of(cfg)[0] == kind
        else:
            with pytest.raises(UsageError) as e:
                family_of(cfg)
            supported = "linear and yarn, llama3" if kind == "llama" else "linear and yarn"
            assert str(e.value) == (f"cannot export rope scaling '{scaling}' on {kind} to GGUF: llama.cpp's {kind} "
                                    f"supports {supported}")
    monkeypatch.delitem(export_gguf.FAMILIES, "llama")  # an architecture llmctl reads and llama.cpp does not
    with pytest.raises(UsageError, match="^cannot export a llama model to GGUF: llama.cpp has no such architecture$"):
        family_of(llama)


def test_gguf_missing_says_how_to_install(monkeypatch):
    import sys

    from llmctl.core.export.gguf import need_gguf

    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(UsageError) as e:
        need_gguf()
    assert str(e.value) == "GGUF export needs the gguf package: pip install 'llmctl[gguf]'"


def _use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's `use_more_bits` (llama-quant.cpp), C integer arithmetic."""
    c_div = int(n / 8)
    diff = i - c_div
    c_mod = diff - 3 * int(diff / 3)  # C's % truncates towards zero
    return i < c_div or i >= int(7 * n / 8) or c_mod == 2


@pytest.mark.parametrize("n", [1, 2, 7, 8, 12, 22, 26, 28, 30, 32, 40, 60, 80])
def test_q4_k_m_layers_with_more_bits_are_llama_cpps(n):
    from llmctl.core.export.gguf import Item, _q4_k_m

    for i in range(n):
        want = "Q6_K" if _use_more_bits(i, n) else "Q4_K"
        for name in (f"blk.{i}.attn_v.weight", f"blk.{i}.ffn_down.weight", f"blk.{i}.ffn_down_exps.weight"):
            assert _q4_k_m(Item(name, (32, 256), [], "one", i), n) == want, (name, n)
        assert _q4_k_m(Item(f"blk.{i}.ffn_up.weight", (32, 256), [], "one", i), n) == "Q4_K"


def test_a_tensor_without_a_gguf_name_is_named():
    from llmctl.core.export.gguf import gguf_name

    assert gguf_name("model.layers.3.mlp.experts.7.down_proj.weight") == "blk.3.ffn_down_exps.weight"
    with pytest.raises(CheckpointError) as e:
        gguf_name("model.layers.0.mlp.extra.weight")
    assert str(e.value) == "tensor 'model.layers.0.mlp.extra.weight' has no GGUF counterpart"
