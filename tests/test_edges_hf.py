"""Edges of the Hugging Face codecs (`core/hf.py`) that the parity tests leave open.

The reference is transformers: its config classes (defaults, the keys it writes, how it reads
Qwen's sliding-window keys), its sequence-classification models, and what it refuses.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from test_hf_parity import CASES, TOL, VOCAB, build_hf, hf_logits, ours_logits

from llmctl.core.hf import ARCHES, arch_for, config_from_hf, config_to_hf, module_groups, to_checkpoint
from llmctl.core.model import ModelConfig, Transformer
from llmctl.core.model.io import load_model, save_model
from llmctl.errors import CheckpointError

FAMILIES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3", "gemma": "Gemma",
            "mixtral": "Mixtral", "qwen3_moe": "Qwen3Moe", "qwen2_moe": "Qwen2Moe", "phi3": "Phi3",
            "starcoder2": "Starcoder2", "gpt2": "GPT2", "bert": "Bert"}
SIZES = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48)
# keys whose llmctl default is not transformers' (noted in the mutation-testing notes): given explicitly
EXPLICIT = {"max_position_embeddings": 64, "head_dim": 8, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
            "num_experts": 4, "num_experts_per_tok": 2, "shared_expert_intermediate_size": 24,
            "moe_intermediate_size": 16, "num_key_value_heads": 2}


def sizes(model_type: str) -> dict:
    """Small sizes, and those of EXPLICIT that the architecture has."""
    if model_type == "gpt2":
        return dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2)
    skip = ("num_key_value_heads", "head_dim") if model_type == "bert" else ()
    return dict(SIZES, **{k: v for k, v in EXPLICIT.items() if k not in skip
                          and ("moe" in model_type or not ("expert" in k or k.startswith("moe")))
                          and (model_type == "qwen2_moe" or not k.startswith("shared"))})


def transformers_config(model_type: str, **kwargs) -> dict:
    """transformers' full config.json dict for the architecture (as a model's save_pretrained writes it)."""
    config = getattr(transformers, FAMILIES[model_type] + "Config")(**kwargs)
    return dict(config.to_dict(), architectures=[ARCHES[model_type].architecture])


@pytest.mark.parametrize("model_type", FAMILIES)
def test_omitted_keys_read_as_transformers_defaults(model_type):
    """A config.json that leaves a key out means transformers' default for it."""
    given = sizes(model_type)
    ours = config_from_hf({"model_type": model_type, **given})
    assert ours == config_from_hf(transformers_config(model_type, **given))


@pytest.mark.parametrize("model_type", FAMILIES)
def test_written_keys_are_the_ones_transformers_reads(model_type):
    """Every key config_to_hf writes for a config read from transformers' own dict has transformers' value."""
    kwargs = dict(sizes(model_type), initializer_range=0.03)
    if model_type == "gpt2":
        kwargs.update(resid_pdrop=0.2, embd_pdrop=0.3, attn_pdrop=0.4, layer_norm_epsilon=1e-4, n_inner=40)
    elif model_type == "bert":
        kwargs.update(hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.3, layer_norm_eps=1e-4,
                      type_vocab_size=3, tie_word_embeddings=False)
    else:
        eps = "norm_epsilon" if model_type == "starcoder2" else "rms_norm_eps"
        kwargs.update({eps: 1e-4}, attention_dropout=0.3, rope_theta=321.0, tie_word_embeddings=True)
        if model_type in ("phi3", "starcoder2"):
            kwargs.update(sliding_window=7, tie_word_embeddings=model_type == "phi3")
            kwargs.update(resid_pdrop=0.2) if model_type == "phi3" else kwargs.update(
                residual_dropout=0.2, embedding_dropout=0.1, use_bias=False)
        if "moe" in model_type or model_type == "mixtral":
            kwargs.update(router_aux_loss_coef=0.25)
    full = transformers_config(model_type, **kwargs)
    original = getattr(transformers, FAMILIES[model_type] + "Config")(**kwargs)
    cfg = config_from_hf(full)
    written = config_to_hf(cfg, torch.float32)
    assert written["model_type"] == model_type and written["architectures"] == full["architectures"]
    assert written["dtype"] == "float32"
    rope_keys = {"rope_parameters", "rope_theta", "rope_scaling"}
    for key, value in written.items():
        unused = {"sliding_window"} if full.get("use_sliding_window") is False else set()
        if key in full and key not in rope_keys | unused | {"dtype", "layer_types", "max_window_layers"}:
            assert value == full[key], key
    assert config_from_hf(written) == cfg
    reread = getattr(transformers, FAMILIES[model_type] + "Config")(**written)
    for key in (k for k in kwargs if k != "rope_theta"):
        assert getattr(reread, key) == getattr(original, key), key
    if model_type not in ("gpt2", "bert"):
        assert reread.rope_parameters["rope_theta"] == 321.0
        assert written["rope_parameters"] == full["rope_parameters"]


def test_v4_mixtral_expert_count_and_rope_keys():
    """Mixtral's `num_local_experts` (transformers 4), rope_theta inside rope_parameters or beside it."""
    full = transformers_config("mixtral", **SIZES, num_key_value_heads=2, num_local_experts=6, num_experts_per_tok=3)
    full.pop("num_experts", None)
    cfg = config_from_hf(full)
    assert (cfg.num_experts, cfg.experts_per_token, cfg.moe_intermediate_size) == (6, 3, 48)
    written = config_to_hf(cfg)
    assert written["num_local_experts"] == 6 and written["intermediate_size"] == 48
    assert "dtype" not in written
    base = {"model_type": "llama", **SIZES}
    assert config_from_hf(base).rope_theta == 10000.0
    assert config_from_hf({"model_type": "mixtral", **SIZES}).rope_theta == 1e6
    assert config_from_hf(dict(base, rope_theta=7.0)).rope_theta == 7.0
    assert config_from_hf(dict(base, rope_theta=7.0, rope_parameters={"rope_theta": 9.0})).rope_theta == 9.0
    linear = config_from_hf(dict(base, rope_scaling={"type": "linear", "factor": 2.0}))
    assert linear.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    v5 = {"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 1.0, "rope_theta": 5.0}
    assert config_from_hf(dict(base, rope_parameters=v5)).rope_scaling == {"rope_type": "linear", "factor": 2.0}
    biased = config_from_hf(dict(base, attention_bias=True))
    assert (biased.qkv_bias, biased.o_bias, biased.mlp_bias) == (True, True, False)
    assert config_from_hf(dict(base, rope_parameters={"rope_type": "default", "partial_rotary_factor": 1.0})
                          ).rope_scaling is None
    with pytest.raises(CheckpointError, match="partial_rotary_factor is not supported"):
        config_from_hf(dict(base, rope_parameters={"rope_type": "default", "partial_rotary_factor": 0.5}))


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3"])
def test_qwen_sliding_window_keys_as_transformers_reads_them(model_type):
    """use_sliding_window / max_window_layers / layer_types: transformers' layer_types decide."""
    base = dict(sizes(model_type), num_hidden_layers=3, sliding_window=5)
    for use, start in [(True, 0), (True, 3), (True, 5), (False, 0), (True, 1)]:
        full = transformers_config(model_type, **base, use_sliding_window=use, max_window_layers=start)
        kinds = set(full["layer_types"])
        legacy = {k: v for k, v in full.items() if k != "layer_types"}
        if len(kinds) > 1:
            for config in (full, legacy):
                with pytest.raises(CheckpointError, match="^config.json: sliding window on only some layers is "
                                                          "not supported$"):
                    config_from_hf(config)
            continue
        want = 5 if kinds == {"sliding_attention"} else None
        assert config_from_hf(full).sliding_window == want
        assert config_from_hf(legacy).sliding_window == want, (use, start)
    full_layers = transformers_config(model_type, **base, use_sliding_window=True, max_window_layers=0,
                                      layer_types=["full_attention"] * 3)
    assert config_from_hf(full_layers).sliding_window is None  # layer_types decide, as in transformers
    cfg = config_from_hf(transformers_config(model_type, **base, use_sliding_window=True, max_window_layers=0))
    written = config_to_hf(cfg)
    assert written["layer_types"] == ["sliding_attention"] * 3 and written["use_sliding_window"] is True
    reread = getattr(transformers, FAMILIES[model_type] + "Config")(**written)
    assert reread.layer_types == ["sliding_attention"] * 3 and reread.sliding_window == 5
    off = config_to_hf(config_from_hf(transformers_config(model_type, **base)))
    assert (off["use_sliding_window"], off["max_window_layers"], off["layer_types"]) == (
        False, 3, ["full_attention"] * 3)


@pytest.mark.parametrize("model_type,key,value,supported", [
    ("gpt2", "scale_attn_by_inverse_layer_idx", True, False), ("gpt2", "scale_attn_weights", False, True),
    ("gpt2", "add_cross_attention", True, False), ("bert", "is_decoder", True, False),
    ("bert", "position_embedding_type", "relative_key", "absolute"), ("qwen3_moe", "decoder_sparse_step", 2, 1),
    ("qwen2_moe", "mlp_only_layers", [0], []),
])
def test_unsupported_values_are_refused_by_name(model_type, key, value, supported):
    """Keys llmctl supports at one value only: another is refused, leaving it out means that value."""
    full = transformers_config(model_type, **sizes(model_type))
    assert full.get(key, supported) == supported
    with pytest.raises(CheckpointError, match=rf"^config.json: {key}={value!r} is not supported "
                                              rf"\(only {supported!r}\)$".replace("[", r"\[").replace("]", r"\]")):
        config_from_hf(dict(full, **{key: value}))
    cfg = config_from_hf({k: v for k, v in full.items() if k != key})
    assert cfg == config_from_hf(full) and config_to_hf(cfg)[key] == supported


def test_activation_names():
    """transformers' names: swish is SiLU, gelu_new the tanh GELU; an unknown one is refused."""
    base = {"model_type": "llama", **SIZES}
    assert config_from_hf(dict(base, hidden_act="swish")) == config_from_hf(base)
    geglu = config_from_hf(dict(base, hidden_act="gelu_new"))
    assert (geglu.mlp, geglu.activation) == ("geglu", "gelu_tanh")
    assert config_to_hf(geglu)["hidden_act"] == "gelu_pytorch_tanh"
    gpt2 = config_from_hf({"model_type": "gpt2", **sizes("gpt2")})
    assert (gpt2.mlp, gpt2.activation) == ("gelu", "gelu_tanh")
    assert config_to_hf(gpt2)["activation_function"] == "gelu_new"
    gemma = {"model_type": "gemma", **SIZES}
    assert config_from_hf(dict(gemma, hidden_act="gelu")).activation == "gelu_tanh"  # as transformers reads Gemma
    bert = config_from_hf({"model_type": "bert", **SIZES})
    assert (bert.mlp, bert.activation) == ("gelu", None)
    with pytest.raises(CheckpointError, match=r"config.json: hidden_act='tanh' is not supported \(silu, swish"):
        config_from_hf(dict(base, hidden_act="tanh"))


def test_model_types_that_are_not_supported():
    for model_type in (None, ["llama"], "falcon"):
        with pytest.raises(CheckpointError, match=r"model_type .* is not supported; supported: llmctl, llama, "):
            config_from_hf({"model_type": model_type, **SIZES})
    with pytest.raises(CheckpointError, match=r"^config.json: malformed \("):
        config_from_hf({"model_type": "llama", **SIZES, "num_attention_heads": "four"})
    cfg = ModelConfig(vocab_size=VOCAB, hidden_size=32, num_layers=1, num_heads=4, intermediate_size=48,
                      position="alibi")
    assert arch_for(cfg) is None and module_groups(cfg) == {}
    written = config_to_hf(cfg, torch.bfloat16)
    assert (written["model_type"], written["architectures"], written["dtype"]) == (
        "llmctl", ["LlmctlTransformer"], "bfloat16")
    extra = {"quantization_config": {"x": 1}, "architectures": ["LlmctlTransformer"], "dtype": "bfloat16"}
    assert config_from_hf(dict(written, **extra)) == cfg


def test_sequence_classifier_equals_transformers(tmp_path):
    """LlamaForSequenceClassification: `score` is our head; its logits at the last token are theirs."""
    config = transformers.LlamaConfig(**CASES["llama-gqa-untied"][1], num_labels=3)
    torch.manual_seed(0)
    theirs = transformers.LlamaForSequenceClassification(config).eval()
    theirs.save_pretrained(tmp_path / "hf")
    ours, cfg = load_model(tmp_path / "hf")
    assert cfg.num_labels == 3
    ids = torch.randint(0, VOCAB, (1, 7))
    assert (hf_logits(theirs, ids) - ours_logits(ours, ids)[:, -1]).abs().max().item() <= TOL
    tensors, written = to_checkpoint(ours)
    assert written["architectures"] == ["LlamaForSequenceClassification"] and "score.weight" in tensors
    assert written["dtype"] == "float32" and "lm_head.weight" not in tensors
    assert written["id2label"] == {str(i): f"LABEL_{i}" for i in range(3)}
    assert written["label2id"] == {f"LABEL_{i}": i for i in range(3)}
    save_model(ours, tmp_path / "ours", lineage={"command": "test"})
    again = transformers.LlamaForSequenceClassification.from_pretrained(tmp_path / "ours").eval()
    assert (hf_logits(again, ids) - hf_logits(theirs, ids)).abs().max().item() <= TOL
    causal = dict(json.loads((tmp_path / "hf" / "config.json").read_text()), architectures=["LlamaForCausalLM"])
    assert config_from_hf(causal).num_labels is None
    assert config_from_hf(dict(causal, architectures=None)).num_labels == 3
    # a causal LM's `config.to_dict()` dumped as config.json: no class named, transformers' default two labels
    dumped = transformers.LlamaConfig(**CASES["llama-gqa-untied"][1]).to_dict()
    assert dumped["architectures"] is None and len(dumped["id2label"]) == 2
    assert config_from_hf(dumped).num_labels is None
    assert config_from_hf(dict(dumped, num_labels=2)).num_labels == 2  # an explicit count still says classifier


def test_a_classifier_saved_without_its_labels_has_two_as_in_transformers(tmp_path):
    """transformers' diff dict drops the default two labels; a `num_labels` beside an `id2label` of
    another length wins over it. llmctl reads both cases as transformers does."""
    config = transformers.LlamaConfig(**CASES["llama-gqa-untied"][1], num_labels=2)
    torch.manual_seed(0)
    transformers.LlamaForSequenceClassification(config).save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    bare = {k: v for k, v in written.items() if k not in ("id2label", "label2id", "num_labels")}
    (tmp_path / "config.json").write_text(json.dumps(bare))
    theirs = transformers.AutoConfig.from_pretrained(tmp_path)
    assert theirs.num_labels == 2 and load_model(tmp_path)[1].num_labels == 2
    assert config_from_hf(dict(bare, num_labels=4)).num_labels == 4
    assert config_from_hf(dict(bare, architectures=None)).num_labels is None
    mismatched = dict(bare, num_labels=5, id2label={str(i): f"L{i}" for i in range(3)})
    (tmp_path / "config.json").write_text(json.dumps(mismatched))
    assert transformers.AutoConfig.from_pretrained(tmp_path).num_labels == 5
    assert config_from_hf(mismatched).num_labels == 5
    assert config_from_hf(dict(mismatched, num_labels=None)).num_labels == 3


def saved_with(tmp_path, case: str, edit) -> None:
    """transformers' `case` model saved in tmp_path, its model.safetensors then edited by `edit(weights)`."""
    from safetensors.torch import load_file, save_file

    build_hf(*CASES[case]).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    edit(weights)
    save_file(weights, tmp_path / "model.safetensors")


def test_tensor_of_the_wrong_size_is_named(tmp_path):
    name = "transformer.h.1.attn.c_attn.weight"
    saved_with(tmp_path, "gpt2-tied", lambda w: w.update({name: w[name][:, :90].clone()}))
    with pytest.raises(CheckpointError, match=r"tensor 'transformer.h.1.attn.c_attn.weight' has shape \[90, 32\], "
                                              r"expected 96 rows for model.layers.1.self_attn.q_proj.weight, "):
        load_model(tmp_path)


def test_unexpected_tensors_are_counted(tmp_path):
    saved_with(tmp_path, "llama-gqa-untied",
               lambda w: w.update({"model.extra.weight": torch.zeros(2), "model.layers.0.other": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model.extra.weight' has no place in a llama "
                                              r"checkpoint \(and 1 more\)$"):
        load_model(tmp_path)


def test_module_groups_name_fused_and_transposed_modules():
    """GPT-2's fused c_attn holds our q, k, v; its Conv1D are stored transposed; a classifier's head is `score`."""
    gpt2 = config_from_hf({"model_type": "gpt2", **sizes("gpt2")})
    groups = module_groups(gpt2)
    rule, parts = groups["transformer.h.1.attn.c_attn"]
    assert parts == tuple(f"model.layers.1.self_attn.{p}_proj" for p in "qkv") and rule.transpose
    assert groups["transformer.h.0.mlp.c_fc"][1] == ("model.layers.0.mlp.up_proj",)
    assert groups["transformer.h.0.ln_1"][1] == ("model.layers.0.input_layernorm",)
    assert not groups["transformer.h.0.ln_1"][0].transpose
    assert len(groups) == 2 + 2 * 6 + 1  # embeddings and positions, per layer 4 linears + 2 norms, ln_f (tied head)
    llama = ModelConfig.from_dict(dict(config_from_hf({"model_type": "llama", **SIZES}).to_dict(), num_labels=2))
    mapped = module_groups(llama)
    assert mapped["score"][1] == ("lm_head",) and "lm_head" not in mapped
    assert len(mapped) == 2 + 2 * 9 + 1  # embeddings, norm, per layer 7 linears + 2 norms, score


def test_a_tensor_without_a_place_falls_back_to_llmctl():
    """A LoRA on GPT-2's fused c_attn cannot be written under GPT-2's names: the checkpoint is llmctl's."""
    from llmctl.core.model.build import build_model
    from test_transforms import Lora

    gpt2 = config_from_hf({"model_type": "gpt2", **sizes("gpt2")})
    model = build_model(gpt2, [Lora(target_modules=["q_proj"])], device="meta")
    assert isinstance(model, Transformer)
    tensors, written = to_checkpoint(model)
    assert written["model_type"] == "llmctl" and "model.layers.0.self_attn.q_proj.lora_A.weight" in tensors
    plain = build_model(gpt2, device="meta")
    tensors, written = to_checkpoint(plain)
    assert written["model_type"] == "gpt2" and "lm_head.weight" not in tensors
    assert tensors["transformer.h.0.attn.c_attn.weight"].shape == (32, 96)


def test_transformed_tensors_keep_their_suffix_under_the_hf_module(tmp_path):
    """A LoRA on q_proj and on the output head is written under Llama's names, and loads back."""
    from test_transforms import Lora

    from llmctl.core.hf import tensors_to_hf

    base = ModelConfig.from_dict(config_from_hf({"model_type": "llama", **SIZES, "num_key_value_heads": 2}).to_dict())
    torch.manual_seed(0)
    model, _ = load_model(save_model(Transformer(base), tmp_path / "base", lineage={"command": "test"}),
                          transforms=[Lora(target_modules=["q_proj", "lm_head"])])
    tensors = tensors_to_hf(model)
    assert {"lm_head.lora_A.weight", "model.layers.1.self_attn.q_proj.lora_B.weight"} <= set(tensors)
    out = save_model(model, tmp_path / "lora", lineage={"command": "test"})
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    again, _ = load_model(out)
    ids = torch.randint(0, VOCAB, (1, 6))
    assert torch.equal(ours_logits(again, ids), ours_logits(model, ids))
    gpt2 = config_from_hf({"model_type": "gpt2", **sizes("gpt2")})
    fused = Transformer(gpt2)
    fused = load_model(save_model(fused, tmp_path / "gpt2", lineage={"command": "test"}),
                       transforms=[Lora(target_modules=["q_proj"])])[0]
    with pytest.raises(CheckpointError, match=r"^tensor 'model.layers.0.self_attn.q_proj.lora_A.weight' has no "
                                              r"place in a gpt2 checkpoint: transformer.h.0.attn.c_attn fuses "
                                              r".*, which cannot carry 'lora_A.weight' \(such a model is saved as "
                                              r"model_type 'llmctl'\)$"):
        tensors_to_hf(fused)


def test_a_tied_head_may_be_stored_and_nothing_else_extra(tmp_path):
    """A tied checkpoint that also stores lm_head.weight loads; any other extra tensor is still refused."""
    from safetensors.torch import load_file, save_file

    theirs = build_hf(*CASES["qwen2-mha-tied"])
    theirs.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    assert "lm_head.weight" not in weights
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"].clone()
    save_file(weights, tmp_path / "model.safetensors")
    ids = torch.randint(0, VOCAB, (1, 6))
    assert (hf_logits(theirs, ids) - ours_logits(load_model(tmp_path)[0], ids)).abs().max().item() <= TOL
    save_file(dict(weights, **{"model.norm.extra": torch.zeros(2)}), tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="unexpected tensor 'model.norm.extra'"):
        load_model(tmp_path)
    weights["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(32, 31)  # the rows right, not the columns
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=rf"^{tmp_path}: tensor 'model.layers.0.self_attn.q_proj.weight' "
                                              r"has shape \[32, 31\], expected \[32, 32\]$"):
        load_model(tmp_path)


@pytest.mark.parametrize("model_type,target,why", [
    ("gpt2", "o_proj", r"transformer.h.0.attn.c_proj is stored transposed, which cannot carry 'lora_A.weight'"),
    ("bert", "lm_head", r"lm_head is split across cls.predictions.decoder and cls.predictions, which cannot carry"),
])
def test_transposed_and_split_modules_cannot_carry_extra_tensors(model_type, target, why):
    from test_transforms import Lora

    from llmctl.core.hf import tensors_to_hf
    from llmctl.core.model.build import build_model

    cfg = config_from_hf({"model_type": model_type, **sizes(model_type), "tie_word_embeddings": False})
    with pytest.raises(CheckpointError, match=why):
        tensors_to_hf(build_model(cfg, [Lora(target_modules=[target])], device="meta"))


def test_transformed_bert_without_its_base_prefix_loads(tmp_path):
    """Old BERT files omit `bert.`; a transformed module's tensors are found under the short names too."""
    from safetensors.torch import load_file, save_file
    from test_transforms import Lora

    theirs = build_hf(*CASES["bert"])
    theirs.save_pretrained(tmp_path / "hf")
    model, _ = load_model(tmp_path / "hf", transforms=[Lora(target_modules=["q_proj"])])
    out = save_model(model, tmp_path / "lora", lineage={"command": "test"})
    weights = load_file(out / "model.safetensors")
    assert "bert.encoder.layer.1.attention.self.query.lora_B.weight" in weights
    save_file({k.removeprefix("bert."): v for k, v in weights.items()}, out / "model.safetensors")
    ids = torch.randint(0, VOCAB, (1, 6))
    assert torch.equal(ours_logits(load_model(out)[0], ids), ours_logits(model, ids))


def test_one_unexpected_tensor_is_named_alone(tmp_path):
    saved_with(tmp_path, "llama-gqa-untied", lambda w: w.update({"model.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model.extra.weight' has no place in a llama "
                                              r"checkpoint$"):
        load_model(tmp_path)


def test_an_llmctl_checkpoint_names_itself_in_shape_errors(tmp_path):
    """model_type "llmctl": our own names, checked against the model with the checkpoint's path."""
    from safetensors.torch import load_file, save_file

    cfg = ModelConfig(vocab_size=VOCAB, hidden_size=32, num_layers=1, num_heads=4, intermediate_size=48,
                      position="alibi")
    out = save_model(Transformer(cfg), tmp_path / "alibi", lineage={"command": "test"})
    weights = load_file(out / "model.safetensors")
    assert "model.layers.0.self_attn.q_proj.weight" in weights
    weights["model.norm.weight"] = torch.ones(31)
    save_file(weights, out / "model.safetensors")
    with pytest.raises(CheckpointError, match=rf"^{out}: tensor 'model.norm.weight' has shape \[31\], expected "):
        load_model(out)
