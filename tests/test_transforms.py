"""Module transforms: PEFT's target_modules semantics, recorded in checkpoints, re-applied on load."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

torch = pytest.importorskip("torch")
import transformers  # noqa: E402

from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from llmctl.core.model.build import build_model  # noqa: E402
from llmctl.core.model.io import load_model, save_model  # noqa: E402
from llmctl.core.model.transforms import TRANSFORMS, Transform, from_spec, select_modules  # noqa: E402
from llmctl.errors import CheckpointError, UsageError  # noqa: E402

TEXT = "the quick brown fox jumps over the lazy dog. a stitch in time saves nine. " * 20


# -- three transforms, each one small class (the recipe ARCHITECTURE.md shows) -----------------------


@TRANSFORMS.register("test_identity")
class Identity(Transform):
    """Records itself, changes nothing."""

    def replace(self, path, module):
        return module


class Int8Linear(nn.Module):
    """Weight-only int8, per output channel, symmetric; dequantized on the fly."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 127
        self.register_buffer("weight", torch.round(w / scale).to(torch.int8))
        self.register_buffer("weight_scale", scale)
        self.bias = linear.bias

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype) * self.weight_scale.to(x.dtype), self.bias)


@TRANSFORMS.register("test_int8")
class Int8(Transform):
    quant_method = "llmctl-test-int8"  # recorded in config.json's quantization_config

    def replace(self, path, module):
        return Int8Linear(module)


class LoraLinear(nn.Linear):
    """A LoRA-shaped linear: the base keeps its own `weight`/`bias` names (torchtune's lesson),
    the adapter adds `lora_A.weight`/`lora_B.weight` (PEFT's names)."""

    def __init__(self, base: nn.Linear, r: int):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=base.weight.device)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=base.weight.device)
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x):
        return super().forward(x) + self.lora_B(self.lora_A(x))


@TRANSFORMS.register("test_lora")
@dataclass(kw_only=True)
class Lora(Transform):
    r: int = 2

    def replace(self, path, module):
        return LoraLinear(module, self.r)


# -- fixtures ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokdir(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TEXT], trainer)
    out = tmp_path_factory.mktemp("tok")
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(out)
    return out


def _hf_checkpoint(tokdir, out, arch="llama", tie=False):
    import shutil

    torch.manual_seed(0)
    common = dict(vocab_size=300, initializer_range=0.2, tie_word_embeddings=tie, eos_token_id=0, bos_token_id=None)
    if arch == "gpt2":
        config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, **common)
    else:
        config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                          **common)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(out)
    for f in tokdir.iterdir():
        shutil.copy(f, out / f.name)
    return out


@pytest.fixture(scope="module")
def base(tokdir, tmp_path_factory):
    return _hf_checkpoint(tokdir, tmp_path_factory.mktemp("llama"))


IDS = torch.tensor([[5, 17, 42, 7, 99, 3, 250, 11]])


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


# -- selection ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [
    {"target_modules": ["q_proj", "v_proj"]},
    {"target_modules": ["model.layers.0.mlp.up_proj", "o_proj"]},
    {"target_modules": r".*\.layers\.1\..*_proj"},
    {"target_modules": "all-linear"},
    {"target_modules": "all-linear", "exclude_modules": ["down_proj"]},
    {"target_modules": ["k_proj", "gate_proj"], "layers_to_transform": [1]},
])
def test_selection_equals_peft(base, kwargs):
    import peft

    hf = transformers.AutoModelForCausalLM.from_pretrained(base)
    wrapped = peft.get_peft_model(hf, peft.LoraConfig(r=2, **kwargs))
    theirs = [n.removeprefix("base_model.model.") for n, m in wrapped.named_modules()
              if isinstance(m, peft.tuners.lora.LoraLayer)]
    model, _ = load_model(base)
    assert select_modules(model, **kwargs) == theirs and theirs


def test_no_match_is_a_usage_error(base):
    model, _ = load_model(base)
    with pytest.raises(UsageError, match="matches no module"):
        Identity(target_modules=["nonexistent"]).apply(model)


# -- checkpoints record their transforms -------------------------------------------------------------


def test_identity_round_trips(base, tmp_path):
    model, _ = load_model(base, transforms=[Identity(target_modules=["q_proj"])])
    out = save_model(model, tmp_path / "id", tokenizer_dir=base)
    spec = {"type": "test_identity", "target_modules": ["q_proj"], "exclude_modules": None,
            "layers_to_transform": None}
    assert json.loads((out / "llmctl.json").read_text())["transforms"] == [spec]
    assert from_spec(spec) == Identity(target_modules=["q_proj"])
    loaded, _ = load_model(out)
    assert [t.spec() for t in loaded.transforms] == [spec]
    assert torch.equal(logits(loaded), logits(model))
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"


def test_info_shows_recorded_transforms(base, tmp_path, llmctl):
    model, _ = load_model(base, transforms=[Lora(target_modules=["q_proj"], r=3)])
    out = save_model(model, tmp_path / "lora")
    r = llmctl("info", out, "--json")
    assert r.code == 0 and r.json()["transforms"] == [model.transforms[0].spec()]
    r = llmctl("info", out)
    assert r.code == 0 and "type=test_lora" in r.stderr and "r=3" in r.stderr


def test_int8_saves_loads_and_serves_generate_and_eval(base, tmp_path, llmctl):
    from llmctl.core.evaluate.lm import ScoringModel
    from llmctl.core.evaluate.perplexity import perplexity
    from llmctl.core.generate import GenerationConfig, generate
    from llmctl.core.tokenizer import load_tokenizer

    dense, _ = load_model(base)
    model, _ = load_model(base, transforms=[Int8()])
    assert isinstance(model.model.layers[0].mlp.down_proj, Int8Linear) and type(model.lm_head) is nn.Linear
    assert not torch.equal(logits(model), logits(dense))  # quantized, and close
    assert torch.allclose(logits(model), logits(dense), atol=0.05 * logits(dense).abs().max())
    out = save_model(model, tmp_path / "q", tokenizer_dir=base)

    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["quantization_config"]["quant_method"] == "llmctl-test-int8"
    from llmctl.core.checkpoint import open_checkpoint

    shapes = open_checkpoint(out).tensor_shapes()
    assert shapes["model.layers.0.self_attn.q_proj.weight"][1] == "int8"
    assert shapes["model.layers.0.self_attn.q_proj.weight_scale"] == ((32, 1), "float32")

    loaded, _ = load_model(out)
    assert torch.equal(logits(loaded), logits(model))

    tok = load_tokenizer(out)
    r = llmctl("generate", out, "the quick brown", "-n", "6", "--temperature", "0", "--json")
    assert r.code == 0, r.stderr
    assert r.json()["tokens"] == generate(model, tok, ["the quick brown"], GenerationConfig(max_new_tokens=6))[0].tokens

    (tmp_path / "text.txt").write_text(TEXT)
    r = llmctl("eval", out, "--task", "perplexity", "--data", tmp_path / "text.txt", "--max-length", 32,
               "--json", "--quiet", "--no-record")
    assert r.code == 0, r.stderr
    expected = perplexity(ScoringModel(model, tok, max_length=32), [tmp_path / "text.txt"], max_length=32)
    assert r.json()["results"][str(out)]["perplexity"] == pytest.approx(expected, rel=1e-6)

    r = llmctl("info", out, "--json")
    assert r.code == 0 and r.json()["quantization"]["quant_method"] == "llmctl-test-int8"


def test_unknown_quantization_method_is_named(base, tmp_path):
    model, _ = load_model(base, transforms=[Int8()])
    out = save_model(model, tmp_path / "q")
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"]["quant_method"] = "awq-future"
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="quant_method 'awq-future' is not supported"):
        load_model(out)


def test_replacing_a_tied_head_unties_it(tokdir, tmp_path):
    tied = _hf_checkpoint(tokdir, tmp_path / "tied", tie=True)
    dense, cfg = load_model(tied)
    assert cfg.tie_embeddings
    model, cfg = load_model(tied, transforms=[Int8(target_modules=["lm_head"])])
    assert not cfg.tie_embeddings and isinstance(model.lm_head, Int8Linear)
    assert model.model.embed_tokens.weight.dtype == torch.float32  # the embedding is untouched
    out = save_model(model, tmp_path / "q")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    loaded, _ = load_model(out)
    assert torch.equal(logits(loaded), logits(model))
    with pytest.raises(ValueError, match="cannot tie"):
        loaded.cfg.tie_embeddings = True
        loaded.tie_weights()


def test_gpt2_fused_attention_cannot_carry_extra_tensors(tokdir, tmp_path):
    path = _hf_checkpoint(tokdir, tmp_path / "gpt2", arch="gpt2")
    model, _ = load_model(path, transforms=[Int8(target_modules=["q_proj", "up_proj"])])
    out = save_model(model, tmp_path / "q")  # c_attn fuses q/k/v transposed: llmctl's own names
    assert json.loads((out / "config.json").read_text())["model_type"] == "llmctl"
    assert torch.equal(logits(load_model(out)[0]), logits(model))

    # an HF GPT-2 checkpoint whose c_attn carries an unknown tensor: the error says why
    from safetensors.torch import load_file, save_file

    tensors = load_file(path / "model.safetensors")
    tensors["transformer.h.0.attn.c_attn.weight_scale"] = torch.ones(96, 1)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"attn\.c_attn fuses .*q_proj, .*cannot carry 'weight_scale'"):
        load_model(path)


def test_lora_shaped_module_loads_a_base_checkpoint_strictly(base, tmp_path):
    import peft

    dense, _ = load_model(base)
    model, _ = load_model(base, transforms=[Lora(target_modules=["q_proj", "v_proj"])])
    q = model.model.layers[1].self_attn.q_proj
    assert isinstance(q, LoraLinear) and torch.equal(q.weight, dense.model.layers[1].self_attn.q_proj.weight)
    assert torch.equal(logits(model), logits(dense))  # lora_B starts at zero
    with torch.no_grad():
        q.lora_B.weight.normal_()
    out = save_model(model, tmp_path / "lora")
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"

    # the adapter tensors are stored under PEFT's key names
    from llmctl.core.checkpoint import open_checkpoint

    ours = {n for n in open_checkpoint(out).tensor_names() if "lora_" in n}
    hf = transformers.AutoModelForCausalLM.from_pretrained(base)
    wrapped = peft.get_peft_model(hf, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    theirs = {n.removeprefix("base_model.model.") for n in peft.get_peft_model_state_dict(wrapped)}
    assert ours == theirs

    loaded, _ = load_model(out)
    assert torch.equal(logits(loaded), logits(model)) and not torch.equal(logits(loaded), logits(dense))

    # strict: the model built with the recorded transform wants every adapter tensor
    from safetensors.torch import load_file, save_file

    tensors = load_file(out / "model.safetensors")
    del tensors["model.layers.0.self_attn.v_proj.lora_A.weight"]
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="missing tensor 'model.layers.0.self_attn.v_proj.lora_A.weight'"):
        load_model(out)


def test_meta_build_applies_transforms_without_allocating(base):
    from llmctl.core.hf import config_from_hf
    from llmctl.core.checkpoint import open_checkpoint

    cfg = config_from_hf(open_checkpoint(base).config)
    model = build_model(cfg, [Int8(), Lora(target_modules=["lm_head"])], device="meta")
    state = model.state_dict()
    assert all(t.is_meta for t in state.values())
    assert state["model.layers.0.mlp.up_proj.weight"].dtype == torch.int8
    assert "lm_head.lora_A.weight" in state and [t.name for t in model.transforms] == ["test_int8", "test_lora"]


def test_train_continues_a_transformed_checkpoint(base, tmp_path, llmctl):
    model, _ = load_model(base, transforms=[Lora(target_modules=["q_proj"])])
    ckpt = save_model(model, tmp_path / "lora", tokenizer_dir=base)
    (tmp_path / "text.txt").write_text(TEXT)
    r = llmctl("--quiet", "train", f"model={ckpt}", f"data={tmp_path / 'text.txt'}", "max_steps=2", "batch_size=2",
               "seq_len=16", "warmup_steps=0", "eval_every=0", "peak_tflops=1", "tensorboard=false",
               "-o", tmp_path / "run")
    assert r.code == 0, r.stderr
    trained, _ = load_model(tmp_path / "run")
    assert [t.name for t in trained.transforms] == ["test_lora"]
    assert not torch.equal(trained.model.layers[0].self_attn.q_proj.lora_A.weight,
                           model.model.layers[0].self_attn.q_proj.lora_A.weight)
