"""LoRA adapters on architectures whose Hugging Face modules are not ours one to one — fused
(Phi-3's `qkv_proj` / `gate_up_proj`, GPT-2's `c_attn`, GPT-NeoX's `query_key_value`, whose rows go
head by head), stored transposed (GPT-2's Conv1D) or
renamed (StarCoder2's `c_fc`) — and per-module ranks (`rank_pattern` / `alpha_pattern`): the
adapters llmctl writes load in PEFT with its logits, PEFT's load here with theirs."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
import transformers  # noqa: E402
import peft  # noqa: E402

from llmctl.core.adapters import LoRA, save_adapter  # noqa: E402
from llmctl.core.model.io import load_model  # noqa: E402
from conftest import logits_of, save_hf  # noqa: E402
from test_adapters import _peft, _randomize  # noqa: E402

VOCAB = 96
DECODER = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
               bos_token_id=1, eos_token_id=2, pad_token_id=0)
BASES = {
    "phi3": ("Phi3", DECODER),
    "gpt2": ("GPT2", dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
                          eos_token_id=0)),
    "starcoder2": ("Starcoder2", DECODER),
    "gpt_neox": ("GPTNeoX", dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                 num_attention_heads=4, max_position_embeddings=64, rotary_pct=0.5,
                                 tie_word_embeddings=False)),
}
IDS = torch.tensor([[5, 17, 42, 7, 90, 3, 50, 11], [9, 8, 7, 6, 5, 4, 3, 2]])
# (our targets, PEFT's names of the same modules, a per-module rank our way)
TARGETS = {
    "phi3": (["q_proj", "v_proj", "up_proj"], ["qkv_proj", "gate_up_proj", "o_proj"], {"o_proj": 2}),
    "gpt2": (["q_proj", "k_proj", "o_proj", "up_proj"], ["c_attn", "c_fc", "c_proj"], {"up_proj": 2}),
    "starcoder2": (["q_proj", "up_proj", "down_proj"], ["v_proj", "c_fc", "c_proj"], {"down_proj": 2}),
    "gpt_neox": (["q_proj", "v_proj", "up_proj"], ["query_key_value", "dense_h_to_4h", "dense"], {"up_proj": 2}),
}
METHODS = {"lora": {}, "rslora": {"rslora": True}, "dora": {"dora": True}}


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    return {name: save_hf(tmp_path_factory.mktemp(name), getattr(transformers, f"{family}Config")(**kwargs), 0.05)
            for name, (family, kwargs) in BASES.items()}


def _logits(model):
    return logits_of(model, IDS)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", BASES)
def test_our_adapter_on_fused_and_transposed_modules_gives_peft_logits(bases, tmp_path, arch, method):
    ours_targets, _, ranks = TARGETS[arch]
    model, _ = load_model(bases[arch], transforms=[LoRA(r=4, alpha=8, target_modules=ours_targets,
                                                        rank_pattern=ranks, alpha_pattern={"k_proj": 3.0},
                                                        **METHODS[method])])
    _randomize(model)
    out = save_adapter(model, tmp_path / "adapter", base=bases[arch])
    ours = _logits(model)
    assert not torch.allclose(ours, _logits(load_model(bases[arch])[0]), atol=1e-3)  # the adapter matters
    theirs = _peft(bases[arch], out)
    assert (ours - _logits(theirs)).abs().max() < 1e-5
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["fan_in_fan_out"] == (arch == "gpt2")
    reloaded, _ = load_model(out)
    assert (_logits(reloaded) - ours).abs().max() < 1e-5


def test_a_fused_modules_adapter_stacks_its_parts_exactly(bases, tmp_path):
    """q and v at rank 4 on Phi-3 are one rank-8 adapter on qkv_proj: A stacked, B block-diagonal
    with zero rows for k, alpha scaled so that the scaling stays alpha / r."""
    model, _ = load_model(bases["phi3"], transforms=[LoRA(r=4, alpha=8, target_modules=["q_proj", "v_proj"])])
    _randomize(model)
    out = save_adapter(model, tmp_path / "adapter", base=bases["phi3"])
    config = json.loads((out / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == [f"model.layers.{i}.self_attn.qkv_proj" for i in range(2)]
    assert set(config["rank_pattern"].values()) == {8} and set(config["alpha_pattern"].values()) == {16.0}
    from safetensors.torch import load_file

    tensors = load_file(out / "adapter_model.safetensors")
    b = tensors["base_model.model.model.layers.0.self_attn.qkv_proj.lora_B.weight"]
    q, k, v = b.split([32, 16, 16])
    layer = model.model.layers[0].self_attn
    assert torch.equal(q[:, :4], layer.q_proj.lora_B.weight) and not q[:, 4:].any()
    assert not k.any() and torch.equal(v[:, 4:], layer.v_proj.lora_B.weight) and not v[:, :4].any()
    from llmctl.commands.info import _rows
    from llmctl.core.adapters import describe_adapter
    from llmctl.core.checkpoint import open_checkpoint
    from llmctl.core.summary import describe

    summary = {**describe(open_checkpoint(bases["phi3"])), "adapter": describe_adapter(out, None)}
    assert summary["adapter"]["ranks"] == [8]
    assert ["adapter", "lora, r=4 (per module 8), alpha=8"] in _rows(summary)  # what `info` shows


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", BASES)
def test_peft_adapter_on_hf_modules_loads_here(bases, tmp_path, arch, method):
    _, theirs_targets, _ = TARGETS[arch]
    hf = transformers.AutoModelForCausalLM.from_pretrained(bases[arch], dtype=torch.float32)
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=theirs_targets, rank_pattern={theirs_targets[1]: 2},
                             alpha_pattern={theirs_targets[0]: 5}, use_rslora=method == "rslora",
                             use_dora=method == "dora", init_lora_weights=False, fan_in_fan_out=arch == "gpt2")
    wrapped = peft.get_peft_model(hf, config).eval()
    wrapped.save_pretrained(tmp_path / "adapter")
    cfg_file = tmp_path / "adapter" / "adapter_config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "base_model_name_or_path": str(bases[arch])}))
    model, _ = load_model(tmp_path / "adapter")
    assert (_logits(model) - _logits(wrapped)).abs().max() < 1e-5
    again = save_adapter(model, tmp_path / "again", base=bases[arch])  # and back to PEFT
    assert (_logits(_peft(bases[arch], again)) - _logits(wrapped)).abs().max() < 1e-5


def test_a_fused_adapter_of_the_wrong_height_is_named(bases, tmp_path):
    from safetensors.torch import load_file, save_file

    from llmctl.errors import CheckpointError

    model, _ = load_model(bases["phi3"], transforms=[LoRA(r=4, target_modules=["q_proj"])])
    out = save_adapter(model, tmp_path / "adapter", base=bases["phi3"])
    tensors = load_file(out / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.self_attn.qkv_proj.lora_B.weight"
    tensors[key] = tensors[key][:-1]
    save_file(tensors, out / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match=r"qkv_proj.lora_B.weight' has 63 rows, the model's .* has 64"):
        load_model(out)


@pytest.mark.parametrize("bad", [0, "two", True])
def test_a_per_module_rank_must_be_a_positive_integer(bad):
    from llmctl.errors import UsageError

    with pytest.raises(UsageError, match="r must be an integer >= 1.*for 'o_proj'"):
        LoRA(rank_pattern={"o_proj": bad})
