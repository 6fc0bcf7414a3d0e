"""Parity with `transformers`: their checkpoints load in llmctl, ours load in theirs, same logits.

Every case builds a tiny random model with transformers, saves it, loads it with llmctl and
compares logits (float32, max |Δ| ≤ 1e-4), then saves with llmctl, loads with transformers and
compares again.
"""

from __future__ import annotations

import json

import pytest
import torch

import transformers
transformers.logging.set_verbosity_error()

from llmctl.core.model.io import load_model, save_model  # noqa: E402
from llmctl.errors import CheckpointError  # noqa: E402

TOL = 1e-4
VOCAB = 96
DECODER = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64)
MOE = dict(num_experts_per_tok=2)
TOKENS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)  # Phi-3's and StarCoder2's defaults exceed VOCAB
NEOX = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
            max_position_embeddings=64)  # head_dim 8: rotary_pct 0.25 turns 2 of each head's dims
PHI = dict(NEOX, resid_pdrop=0.0, embd_pdrop=0.0)

CASES = {
    "llama-gqa-untied": ("Llama", dict(DECODER, rope_theta=500.0)),
    "llama-mqa-tied-bias": ("Llama", dict(DECODER, num_key_value_heads=1, tie_word_embeddings=True,
                                          attention_bias=True, mlp_bias=True)),
    "llama-rope-linear": ("Llama", dict(DECODER, rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "llama-rope-dynamic": ("Llama", dict(DECODER, max_position_embeddings=8,
                                         rope_scaling={"rope_type": "dynamic", "factor": 2.0})),
    "llama-rope-yarn": ("Llama", dict(DECODER, rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                             "original_max_position_embeddings": 16})),
    "llama-rope-llama3": ("Llama", dict(DECODER, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8})),
    "mistral-window": ("Mistral", dict(DECODER, sliding_window=4, rope_theta=1e6)),
    "qwen2-mha-tied": ("Qwen2", dict(DECODER, num_key_value_heads=4, tie_word_embeddings=True)),
    "qwen2-window": ("Qwen2", dict(DECODER, use_sliding_window=True, sliding_window=5, max_window_layers=0)),
    "qwen3-headdim": ("Qwen3", dict(DECODER, head_dim=16, tie_word_embeddings=True)),
    "gemma-mqa": ("Gemma", dict(DECODER, head_dim=8, num_key_value_heads=1)),
    # Gemma 2: sandwich norms; layer 0 slides (window 4 < 12 tokens), layer 1 does not; caps that matter
    "gemma2-softcap-window": ("Gemma2", dict(DECODER, head_dim=8, query_pre_attn_scalar=12, sliding_window=4,
                                             attn_logit_softcapping=0.25, final_logit_softcapping=1.0)),
    "gemma2-nocap-layers-untied": ("Gemma2", dict(DECODER, num_hidden_layers=3, num_key_value_heads=1, head_dim=16,
                                                  query_pre_attn_scalar=16, sliding_window=5,
                                                  layer_types=["full_attention", "sliding_attention",
                                                               "sliding_attention"],
                                                  attn_logit_softcapping=None, final_logit_softcapping=None,
                                                  tie_word_embeddings=False)),
    # Gemma 3: q/k norms; the sliding layers' RoPE its own theta, the full layer's scaled
    "gemma3_text-local-rope": ("Gemma3Text", dict(DECODER, num_hidden_layers=3, head_dim=8, query_pre_attn_scalar=12,
                                                  sliding_window=4, layer_types=["sliding_attention"] * 2 + [
                                                      "full_attention"],
                                                  rope_parameters={"full_attention": {"rope_type": "linear",
                                                                                      "factor": 2.0, "rope_theta": 1e6},
                                                                   "sliding_attention": {"rope_type": "default",
                                                                                         "rope_theta": 50.0}})),
    "gemma3_text-defaults-softcap": ("Gemma3Text", dict(DECODER, final_logit_softcapping=1.0,
                                                        attn_logit_softcapping=0.25)),  # every layer slides (4096);
    # transformers' Gemma 3 ignores attn_logit_softcapping: so does llmctl
    "mixtral": ("Mixtral", dict(DECODER, num_local_experts=4, **MOE)),
    "qwen3_moe-norm": ("Qwen3Moe", dict(DECODER, num_experts=4, moe_intermediate_size=16, head_dim=8,
                                        norm_topk_prob=True, **MOE)),
    "qwen3_moe-raw": ("Qwen3Moe", dict(DECODER, num_experts=4, moe_intermediate_size=16, norm_topk_prob=False,
                                       **MOE)),
    "qwen2_moe-shared": ("Qwen2Moe", dict(DECODER, num_experts=4, moe_intermediate_size=16,
                                          shared_expert_intermediate_size=24, **MOE)),
    "phi3": ("Phi3", dict(DECODER, **TOKENS)),
    "phi3-window-tied": ("Phi3", dict(DECODER, sliding_window=5, tie_word_embeddings=True, rope_theta=500.0,
                                      **TOKENS)),
    "starcoder2-window": ("Starcoder2", dict(DECODER, sliding_window=4, rope_theta=1e5, **TOKENS)),
    "starcoder2-nobias-untied": ("Starcoder2", dict(DECODER, use_bias=False, tie_word_embeddings=False, head_dim=16,
                                                    hidden_act="gelu", **TOKENS)),
    "gpt2-tied": ("GPT2", dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                               bos_token_id=0, eos_token_id=0)),
    "gpt2-untied-relu": ("GPT2", dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=32, n_inner=40,
                                      activation_function="relu", tie_word_embeddings=False,
                                      bos_token_id=0, eos_token_id=0)),
    "bert": ("Bert", dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=48, max_position_embeddings=64)),
    "phi3-partial-rotary": ("Phi3", dict(DECODER, partial_rotary_factor=0.75, **TOKENS)),  # Phi-4-mini's
    "gpt_neox-parallel": ("GPTNeoX", dict(NEOX, rotary_pct=0.25)),
    "gpt_neox-sequential-full-rotary-tied": ("GPTNeoX", dict(NEOX, use_parallel_residual=False, rotary_pct=1.0,
                                                             tie_word_embeddings=True)),
    "gpt_neox-nobias-half-rotary-linear": ("GPTNeoX", dict(NEOX, attention_bias=False, rotary_emb_base=500.0,
                                                           rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                                            "partial_rotary_factor": 0.5})),
    "phi": ("Phi", dict(PHI)),
    "phi-qk-norm-gqa-tied": ("Phi", dict(PHI, qk_layernorm=True, num_key_value_heads=2, tie_word_embeddings=True,
                                         partial_rotary_factor=0.25, hidden_act="gelu")),
}
HEADS = {"GPT2": "LMHeadModel", "Bert": "ForMaskedLM"}
MODELS = {"Gemma3Text": "Gemma3ForCausalLM"}  # a model class not named after its config


def build_hf(family: str, kwargs: dict):
    config = getattr(transformers, f"{family}Config")(**kwargs)
    model = getattr(transformers, MODELS.get(family, family + HEADS.get(family, "ForCausalLM")))(config)
    torch.manual_seed(1)
    with torch.no_grad():  # move norms/biases off their 1/0 init so every weight matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def hf_and_ours(case: str, tmp_path):
    """The case's transformers model and llmctl's load of its saved checkpoint."""
    theirs = build_hf(*CASES[case])
    theirs.save_pretrained(tmp_path)
    return theirs, load_model(tmp_path)[0]


def hf_logits(model, ids, mask=None, positions=None, types=None):
    kwargs = {"attention_mask": mask}
    if positions is not None:
        kwargs["position_ids"] = positions
    if types is not None:
        kwargs["token_type_ids"] = types
    with torch.no_grad():
        return model(ids, **kwargs).logits.float()


def ours_logits(model, ids, mask=None, positions=None, types=None):
    with torch.no_grad():
        return model(ids, attention_mask=mask, position_ids=positions, token_type_ids=types).logits


@pytest.mark.parametrize("case", CASES)
def test_parity_both_ways(case, tmp_path, record_property):
    family, kwargs = CASES[case]
    theirs = build_hf(family, kwargs)
    theirs.save_pretrained(tmp_path / "hf")
    ours, cfg = load_model(tmp_path / "hf")
    assert not ours.training
    torch.manual_seed(2)
    ids = torch.randint(0, VOCAB, (2, 12))
    types = torch.randint(0, 2, ids.shape) if family == "Bert" else None

    reference = hf_logits(theirs, ids, types=types)
    delta_load = (reference - ours_logits(ours, ids, types=types)).abs().max().item()
    assert delta_load <= TOL, f"llmctl load: max |Δ| {delta_load}"

    save_model(ours, tmp_path / "ours", lineage={"command": "test"})
    saved = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert saved["model_type"] == theirs.config.model_type
    reloaded = type(theirs).from_pretrained(tmp_path / "ours").eval()
    delta_save = (reference - hf_logits(reloaded, ids, types=types)).abs().max().item()
    assert delta_save <= TOL, f"transformers load of llmctl save: max |Δ| {delta_save}"
    again, cfg_again = load_model(tmp_path / "ours")
    assert cfg_again.architecture() == cfg.architecture()
    record_property("max_abs_delta", max(delta_load, delta_save))
    print(f"{case}: load Δ={delta_load:.2e} save Δ={delta_save:.2e}")


@pytest.mark.parametrize("case", ["llama-gqa-untied", "mistral-window", "gemma2-softcap-window",
                                  "gemma2-nocap-layers-untied", "gemma3_text-local-rope",
                                  "qwen3-headdim", "gpt2-tied", "mixtral",
                                  "phi3-window-tied", "starcoder2-window", "gpt_neox-parallel",
                                  "phi-qk-norm-gqa-tied"])
def test_parity_left_padded_batch(case, tmp_path):
    """Left padding with a mask and explicit positions matches transformers on real tokens."""
    theirs, ours = hf_and_ours(case, tmp_path)
    ids = torch.randint(0, VOCAB, (3, 10))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :6] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    a = hf_logits(theirs, ids, mask, positions)
    b = ours_logits(ours, ids, mask, positions)
    real = mask.bool()
    assert (a[real] - b[real]).abs().max().item() <= TOL
    # positions default to the count of real tokens before each one
    assert (b[real] - ours_logits(ours, ids, mask)[real]).abs().max().item() == 0


@pytest.mark.parametrize("case", ["llama-gqa-untied", "qwen3-headdim", "gemma2-softcap-window",
                                  "phi3", "starcoder2-nobias-untied",
                                  "gpt_neox-sequential-full-rotary-tied", "phi"])
def test_parity_packed_documents(case, tmp_path):
    """document_ids equal transformers' packed sequences (position_ids restarting at 0, no mask)."""
    from llmctl.core.model.transformer import document_positions

    theirs, ours = hf_and_ours(case, tmp_path)
    ids = torch.randint(0, VOCAB, (2, 12))
    docs = torch.tensor([[0] * 5 + [1] * 3 + [2] * 4, [0] * 12])
    positions = document_positions(docs)
    assert positions[0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3]
    with torch.no_grad():  # transformers detects packing only without a cache
        a = theirs(ids, position_ids=positions, use_cache=False).logits
        b = ours(ids, document_ids=docs).logits
    assert (a - b).abs().max().item() <= TOL


@pytest.mark.parametrize("case", ["gpt_neox-parallel", "gpt_neox-nobias-half-rotary-linear", "phi-qk-norm-gqa-tied",
                                  "phi3-partial-rotary"])
def test_greedy_decoding_matches_transformers(case, tmp_path):
    """Greedy tokens with the KV cache equal transformers' `generate`: one row through the step
    `Runner` picks (the native plan refuses parallel residuals and partial rotary: eager), and
    through `decode_step`, the fixed-shape step `--compile` compiles."""
    from llmctl.core.generate.search import Runner
    from llmctl.core.native.decode import why_not

    theirs, ours = hf_and_ours(case, tmp_path)
    assert why_not(ours) in ("native kernels unavailable", "parallel residual", "parallel_shared residual",
                             "partial rotary")
    prompt = torch.randint(3, VOCAB, (1, 6))
    with torch.no_grad():
        want = theirs.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None,
                               pad_token_id=0)[0, 6:].tolist()
        for step in (None, ours.decode_step):
            runner = Runner(ours, prompt.tolist(), 32, torch.device("cpu"))
            assert runner.step_fn is None
            runner.step_fn = step
            got = [int(runner.prefill()[0, -1].argmax())]
            while len(got) < 12:
                got.append(int(runner.forward(torch.tensor([got[-1:]]))[0, -1].argmax()))
            assert got == want


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("case", ["gpt_neox-parallel", "phi-qk-norm-gqa-tied", "qwen2-mha-tied", "gemma2-softcap-window"])
def test_sequence_classifier_both_ways(case, tied, tmp_path):
    """GPTNeoX/Phi/Qwen2/Gemma2ForSequenceClassification: `score` (no bias, Phi's LM head has one; no
    final softcap) is our head, never tied: a reward model made from a tied LM (Qwen2.5, Gemma 2, whose
    configs keep tie_word_embeddings true) loads too."""
    family, kwargs = CASES[case]
    config = getattr(transformers, f"{family}Config")(**dict(kwargs, tie_word_embeddings=tied), num_labels=3)
    torch.manual_seed(0)
    theirs = getattr(transformers, f"{family}ForSequenceClassification")(config).eval()
    theirs.save_pretrained(tmp_path / "hf")
    ours, cfg = load_model(tmp_path / "hf")
    assert cfg.num_labels == 3 and not cfg.lm_head_bias
    ids = torch.randint(0, VOCAB, (1, 7))
    assert (hf_logits(theirs, ids) - ours_logits(ours, ids)[:, -1]).abs().max().item() <= TOL
    save_model(ours, tmp_path / "ours", lineage={"command": "test"})
    again = type(theirs).from_pretrained(tmp_path / "ours").eval()
    assert (hf_logits(again, ids) - hf_logits(theirs, ids)).abs().max().item() == 0


def test_bert_mlm_with_padding(tmp_path):
    """Encoder-only: bidirectional attention and the MLM head, with right padding."""
    theirs = build_hf(*CASES["bert"])
    theirs.save_pretrained(tmp_path)
    ours, cfg = load_model(tmp_path)
    assert not cfg.is_causal
    ids = torch.randint(0, VOCAB, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    a, b = hf_logits(theirs, ids, mask), ours_logits(ours, ids, mask)
    real = mask.bool()
    assert (a[real] - b[real]).abs().max().item() <= TOL


def test_unsupported_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "falcon_mamba"}))
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="falcon_mamba"):
        load_model(tmp_path)


def test_missing_and_unexpected_tensors(tmp_path):
    from safetensors.torch import load_file, save_file

    theirs = build_hf(*CASES["llama-gqa-untied"])
    theirs.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    extra = dict(weights, **{"model.layers.0.self_attn.rotary.weight": torch.zeros(2)})
    save_file(extra, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="unexpected tensor"):
        load_model(tmp_path)
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="missing tensor 'model.layers.1.mlp.up_proj.weight'"):
        load_model(tmp_path)


def test_sharded_bfloat16_save_loads_in_both(tmp_path):
    theirs = build_hf(*CASES["qwen3-headdim"])
    theirs.save_pretrained(tmp_path / "hf")
    ours, _ = load_model(tmp_path / "hf", dtype=torch.bfloat16)
    assert ours.lm_head.weight.dtype == torch.bfloat16
    save_model(ours, tmp_path / "ours", lineage={"command": "test"}, max_shard_bytes=20_000)
    assert (tmp_path / "ours" / "model.safetensors.index.json").is_file()
    reloaded = type(theirs).from_pretrained(tmp_path / "ours", dtype=torch.bfloat16).eval()
    again, _ = load_model(tmp_path / "ours")
    ids = torch.randint(0, VOCAB, (1, 7))
    assert again.lm_head.weight.dtype == torch.bfloat16
    assert torch.equal(ours_logits(again, ids), ours_logits(ours, ids))
    # bfloat16 rounding differs by kernel: at most 0.012 over 50 random inputs (measured)
    assert (hf_logits(reloaded, ids) - ours_logits(ours, ids)).abs().max().item() < 0.03


def test_module_groups_map_hf_paths_to_ours():
    from llmctl.core.hf import config_from_hf, module_groups
    from llmctl.core.model.presets import load_preset

    def names(cfg):
        return {theirs: parts[0] if len(parts) == 1 else parts for theirs, (_, parts) in module_groups(cfg).items()}

    bert = names(load_preset("bert"))
    assert bert["bert.encoder.layer.3.attention.self.query"] == "model.layers.3.self_attn.q_proj"
    assert bert["bert.encoder.layer.0.output.dense"] == "model.layers.0.mlp.down_proj"
    llama = names(load_preset("llama"))
    assert llama["model.layers.2.mlp.gate_proj"] == "model.layers.2.mlp.gate_proj"
    sizes = dict(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    neox = names(config_from_hf(dict(sizes, model_type="gpt_neox")))
    assert neox["gpt_neox.layers.0.attention.dense"] == "model.layers.0.self_attn.o_proj"
    assert neox["gpt_neox.layers.0.mlp.dense_h_to_4h"] == "model.layers.0.mlp.up_proj"
    assert neox["embed_out"] == "lm_head"
    assert neox["gpt_neox.layers.0.attention.query_key_value"] == tuple(f"model.layers.0.self_attn.{p}_proj"
                                                                        for p in "qkv")  # fused, head by head
    phi = names(config_from_hf(dict(sizes, model_type="phi")))
    assert phi["model.layers.0.self_attn.dense"] == "model.layers.0.self_attn.o_proj"
    assert phi["model.layers.0.mlp.fc2"] == "model.layers.0.mlp.down_proj"


def test_transformers_4_style_config(tmp_path):
    """Older config.json files spell RoPE as rope_theta + rope_scaling {"type": …}."""
    theirs = build_hf(*CASES["llama-rope-yarn"])
    theirs.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    params = config.pop("rope_parameters")
    config["rope_theta"] = params.pop("rope_theta")
    config["rope_scaling"] = {"type": params.pop("rope_type"), **params}
    config["torch_dtype"] = config.pop("dtype")
    (tmp_path / "config.json").write_text(json.dumps(config))
    ours, cfg = load_model(tmp_path)
    assert cfg.rope_scaling["rope_type"] == "yarn"
    ids = torch.randint(0, VOCAB, (1, 20))
    assert (hf_logits(theirs, ids) - ours_logits(ours, ids)).abs().max().item() <= TOL


def test_gpt2_checkpoint_without_base_prefix(tmp_path):
    """The original GPT-2 files name tensors `h.0.…`/`wte.weight` and keep the attn.bias buffers."""
    from safetensors.torch import load_file, save_file

    theirs = build_hf(*CASES["gpt2-tied"])
    theirs.save_pretrained(tmp_path)
    weights = {k.removeprefix("transformer."): v for k, v in load_file(tmp_path / "model.safetensors").items()}
    weights["h.0.attn.bias"] = torch.ones(1, 1, 64, 64)
    save_file(weights, tmp_path / "model.safetensors")
    ours, _ = load_model(tmp_path)
    ids = torch.randint(0, VOCAB, (1, 9))
    assert (hf_logits(theirs, ids) - ours_logits(ours, ids)).abs().max().item() <= TOL


def test_gemma_legacy_gelu_means_tanh(tmp_path):
    theirs = build_hf(*CASES["gemma-mqa"])
    theirs.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(hidden_act="gelu", hidden_activation=None)  # as in the original Gemma releases
    (tmp_path / "config.json").write_text(json.dumps(config))
    ours, cfg = load_model(tmp_path)
    assert cfg.activation == "gelu_tanh"
    reloaded = type(theirs).from_pretrained(tmp_path).eval()
    ids = torch.randint(0, VOCAB, (1, 8))
    assert (hf_logits(reloaded, ids) - ours_logits(ours, ids)).abs().max().item() <= TOL


PHI3_LONGROPE = {"rope_type": "longrope", "short_factor": [1.0] * 4, "long_factor": [2.0] * 4,
                 "original_max_position_embeddings": 16}


@pytest.mark.parametrize("edit,match", [
    (dict(rope_parameters=dict(PHI3_LONGROPE, rope_theta=1e4)), r"rope_parameters type 'longrope' is not supported"),
    (dict(rope_parameters=None, rope_scaling={"type": "su", "short_factor": [1.0] * 4, "long_factor": [2.0] * 4}),
     r"rope_scaling type 'su' is not supported"),  # transformers reads su and yarn as longrope on Phi-3
    (dict(rope_parameters=None, rope_scaling={"type": "yarn", "factor": 2.0}), r"type 'yarn' is not supported"),
])
def test_phi3_rope_llmctl_cannot_express_is_refused(edit, match, tmp_path):
    """Phi-3's long-context RoPE (longrope / su): a one-line CheckpointError."""
    theirs = build_hf(*CASES["phi3"])
    theirs.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **edit}))
    with pytest.raises(CheckpointError, match=rf"^config.json: .*{match}"):
        load_model(tmp_path)


@pytest.mark.parametrize("case,edit,match", [
    # transformers' Llama turns every dim of a head whatever the key says: llmctl refuses rather than guess
    ("llama-gqa-untied", dict(partial_rotary_factor=0.5), r"partial_rotary_factor is not supported"),
    ("gpt_neox-parallel", dict(rope_parameters={"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0],
                                                "long_factor": [2.0]}), r"type 'longrope' is not supported"),
    ("gpt_neox-parallel", dict(rope_parameters=None, rotary_pct=0.4), r"malformed .*even number of rotary dims"),
    ("phi", dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0}),
     r"malformed .*partial_rotary_factor must be in \(0, 1\]"),
])
def test_rotary_llmctl_cannot_express_is_refused(case, edit, match, tmp_path):
    """A config key llmctl cannot compute is refused by name, in one line."""
    build_hf(*CASES[case]).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **edit}))
    with pytest.raises(CheckpointError, match=rf"^config.json: .*{match}") as error:
        load_model(tmp_path)
    assert "\n" not in str(error.value)


def test_gpt_neox_legacy_config_and_buffers(tmp_path):
    """Pythia's files: rotary_pct / rotary_emb_base instead of rope_parameters, the attention's
    bias / masked_bias / rotary inv_freq buffers among the tensors; they load with equal logits."""
    from safetensors.torch import load_file, save_file

    theirs = build_hf(*CASES["gpt_neox-nobias-half-rotary-linear"])
    theirs.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    params = config.pop("rope_parameters")
    config.update(rotary_pct=params.pop("partial_rotary_factor"), rotary_emb_base=params.pop("rope_theta"),
                  rope_scaling={"type": params.pop("rope_type"), **params})
    (tmp_path / "config.json").write_text(json.dumps(config))
    weights = load_file(tmp_path / "model.safetensors")
    for i in range(2):
        weights[f"gpt_neox.layers.{i}.attention.bias"] = torch.ones(1, 1, 64, 64, dtype=torch.bool)
        weights[f"gpt_neox.layers.{i}.attention.masked_bias"] = torch.tensor(-1e9)
        weights[f"gpt_neox.layers.{i}.attention.rotary_emb.inv_freq"] = torch.ones(2)
    save_file(weights, tmp_path / "model.safetensors")
    ours, cfg = load_model(tmp_path)
    assert (cfg.partial_rotary_factor, cfg.rope_theta, cfg.rope_scaling) == (0.5, 500.0, {"rope_type": "linear",
                                                                                          "factor": 2.0})
    ids = torch.randint(0, VOCAB, (1, 20))
    assert (hf_logits(theirs, ids) - ours_logits(ours, ids)).abs().max().item() <= TOL


def test_gpt_neox_fused_qkv_rows_go_head_by_head(tmp_path):
    """query_key_value's rows are [heads, (q, k, v), head_dim]: split and joined exactly."""
    from safetensors.torch import load_file

    theirs, ours = hf_and_ours("gpt_neox-parallel", tmp_path)
    fused = theirs.gpt_neox.layers[1].attention.query_key_value.weight.detach().view(4, 3, 8, 32)
    attn = ours.model.layers[1].self_attn
    for j, proj in enumerate((attn.q_proj, attn.k_proj, attn.v_proj)):
        assert torch.equal(proj.weight, fused[:, j].reshape(32, 32))
    save_model(ours, tmp_path / "ours", lineage={"command": "test"})
    assert load_file(tmp_path / "ours" / "model.safetensors").keys() == load_file(tmp_path / "model.safetensors").keys()
    saved = load_file(tmp_path / "ours" / "model.safetensors")["gpt_neox.layers.1.attention.query_key_value.bias"]
    assert torch.equal(saved, theirs.gpt_neox.layers[1].attention.query_key_value.bias)


def test_phi3_longrope_checkpoint_from_transformers_is_refused(tmp_path):
    family, kwargs = CASES["phi3"]
    build_hf(family, dict(kwargs, rope_parameters=PHI3_LONGROPE)).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="longrope"):
        load_model(tmp_path)


def test_phi3_with_a_rope_scaling_phi3_lacks_is_written_as_llama(tmp_path):
    """transformers' Phi-3 takes no linear RoPE scaling: a finetuned Phi-3 with one is saved as the
    Llama it computes as (unfused tensors), which transformers loads with equal logits."""
    import dataclasses

    _, ours = hf_and_ours("phi3", tmp_path / "hf")
    assert ours.cfg.hf_model_type == "phi3"
    scaled = dataclasses.replace(ours.cfg, rope_scaling={"rope_type": "linear", "factor": 2.0})
    model, _ = load_model(tmp_path / "hf", config=scaled)
    save_model(model, tmp_path / "ours", lineage={"command": "test"})
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["model_type"] == "llama"
    llama = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "ours").eval()
    ids = torch.randint(0, VOCAB, (1, 20))
    assert (hf_logits(llama, ids) - ours_logits(model, ids)).abs().max().item() <= TOL


def test_starcoder2_lm_head_follows_tie_word_embeddings(tmp_path):
    """StarCoder2 ties its head by default (no lm_head tensor); untied checkpoints carry one."""
    from safetensors.torch import load_file

    for case, tied in [("starcoder2-window", True), ("starcoder2-nobias-untied", False)]:
        theirs, ours = hf_and_ours(case, tmp_path / case)
        assert ours.cfg.tie_embeddings is tied and (ours.lm_head.weight is ours.model.embed_tokens.weight) is tied
        save_model(ours, tmp_path / case / "ours", lineage={"command": "test"})
        names = set(load_file(tmp_path / case / "ours" / "model.safetensors"))
        assert ("lm_head.weight" in names) is not tied
        assert names == set(load_file(tmp_path / case / "model.safetensors")) - ({"lm_head.weight"} if tied else set())


@pytest.mark.parametrize("case", ["gemma2-softcap-window", "gemma2-nocap-layers-untied", "gemma3_text-local-rope"])
def test_greedy_generation_with_kv_cache_equals_transformers(case, tmp_path):
    """Greedy tokens through the KV cache (left-padded batch; eager and fixed-shape `decode_step`
    steps) equal transformers' generate() well past the sliding window."""
    from llmctl.core.generate.search import Runner
    from llmctl.core.native.decode import why_not

    theirs, ours = hf_and_ours(case, tmp_path)
    assert why_not(ours) is not None  # the native step does not take Gemma 2: the eager path runs
    prompts, steps = [[5, 17, 33, 8, 61, 2, 40], [9, 70, 3]], 14
    ids = torch.tensor([[0] * (7 - len(p)) + p for p in prompts])
    with torch.no_grad():
        out = theirs.generate(ids, attention_mask=(ids != 0) | (torch.arange(7) >= 4), do_sample=False,
                              max_new_tokens=steps, min_new_tokens=steps, pad_token_id=0)
    expected = out[:, 7:].tolist()
    for static in (False, True):
        runner = Runner(ours, prompts, 7 + steps, torch.device("cpu"))
        if static:
            runner.step_fn = ours.decode_step
        tokens, logits = [], runner.prefill()
        with torch.no_grad():
            for _ in range(steps):
                tokens.append(logits[:, -1].argmax(-1))
                logits = runner.forward(tokens[-1][:, None])
        assert torch.stack(tokens, 1).tolist() == expected, f"static={static}"


@pytest.mark.parametrize("case,edit,match", [
    ("gemma2-softcap-window", dict(use_bidirectional_attention=True), r"use_bidirectional_attention=True is not "),
    ("gemma2-softcap-window", dict(layer_types=["chunked_attention", "full_attention"]),
     r"layer_types \['chunked_attention', 'full_attention'\] are not supported"),
    ("gemma3_text-local-rope", dict(use_bidirectional_attention=True), r"use_bidirectional_attention=True is not "),
    ("gemma3_text-local-rope", dict(rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                                     "sliding_attention": {"rope_type": "linear", "factor": 2.0}}),
     r"the sliding layers' rope_parameters .* are not supported"),
])
def test_gemma_config_llmctl_cannot_express_is_refused(case, edit, match, tmp_path):
    """What transformers' Gemma 2/3 compute and llmctl cannot: a one-line CheckpointError naming the key."""
    build_hf(*CASES[case]).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **edit}))
    with pytest.raises(CheckpointError, match=rf"^config.json: {match}"):
        load_model(tmp_path)


@pytest.mark.parametrize("case,old,windows", [
    ("gemma2-softcap-window", {}, [4, None]),  # the even layers slide
    ("gemma3_text-local-rope", dict(sliding_window_pattern=3, rope_theta=1e6, rope_local_base_freq=50.0,
                                    rope_scaling={"rope_type": "linear", "factor": 2.0}), [4, 4, None]),
])
def test_gemma_configs_without_layer_types(case, old, windows, tmp_path):
    """Configs written before `layer_types` (and Gemma 3's before per-type rope_parameters) slide
    on the layers transformers' defaults pick, with the same RoPE."""
    theirs, _ = hf_and_ours(case, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["layer_types"]
    if old:
        del config["rope_parameters"]
    (tmp_path / "config.json").write_text(json.dumps({**config, **old}))
    ours, cfg = load_model(tmp_path)
    assert cfg.layer_sliding_windows == windows and cfg.sliding_window is None
    ids = torch.randint(0, VOCAB, (1, 12))
    assert (hf_logits(theirs, ids) - ours_logits(ours, ids)).abs().max().item() <= TOL
