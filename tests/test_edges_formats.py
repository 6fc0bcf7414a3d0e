"""Edges that the quantize, adapter and export tests miss (found by mutation testing).

Quantization methods: GPTQ over a model equals the reference's sequential procedure (IST-DASLab
gptq, `llama_sequential`: each group's Hessian from the inputs the quantized groups before it give),
the reported errors are ‖(W − Ŵ)Xᵀ‖² / ‖WXᵀ‖² and ‖W − Ŵ‖² / ‖W‖² computed by hand, NF4's ignore list.

PEFT's adapter files, against PEFT: an adapter merged into a checkpoint equals `merge_and_unload`
(and takes the adapter's tokenizer, else the base's), a SEQ_CLS adapter made by PEFT loads with its
head's label count and is written back as PEFT reads it; BERT's module names both ways.

Prefix and prompt tuning on a grouped-query model, both ways against PEFT (the config fields PEFT
writes for the same model), and what they refuse.

GGUF export's dense tensors: LoRA folded as W + (α/r)·BA (biases kept), quantized layers dequantized
(int8 ones were dropped), QLoRA both. Its vocabulary metadata against gguf-py's `SpecialVocab` and
llama.cpp's conversion rules (`convert_hf_to_gguf.py`: token types, padding, pre-tokenizer names,
SentencePiece-style scores)."""

import copy
import json
import shutil

import pytest
import torch
from torch import nn

from _recorder import Recorder
from conftest import tiny_llama

from llmctl.core.model import ModelConfig
from llmctl.core.model.build import build_model
from llmctl.core.quant.config import QuantizeConfig
from llmctl.core.quant.methods import quantize_model, relative_error, summarize

# --- quantization methods -----------------------------------------------------------------------

SEQUENTIAL = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
              ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]  # the reference's `sequential` for Llama


def _model(scale: float = 1.0):
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                    intermediate_size=64))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
    return model.eval()


def _dense(model) -> dict[str, torch.Tensor]:
    from llmctl.core.quant.linear import PackedLinear

    return {p: m.dequantize(torch.float32) for p, m in model.named_modules() if isinstance(m, PackedLinear)}


def _add_batch(h: torch.Tensor, n: int, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The reference's `GPTQ.add_batch`: H = 2/N Σ xxᵀ as a running mean over the batches."""
    x = x.reshape(-1, x.shape[-1]).T
    h = h * (n / (n + x.shape[1]))
    n += x.shape[1]
    x = (2 / n) ** 0.5 * x
    return h + x @ x.T, n


def test_gptq_is_the_reference_sequential_procedure():
    """Transcribed from `llama_sequential` (true sequential, no act order; the windows in batches
    of 3): per block, per group of linears that share an input, the Hessian of the
    inputs the block gets *with the groups before it quantized*, GPTQ on it; the quantized block's
    outputs are the next block's inputs. The weights, the reported output errors and the bar."""
    from llmctl.core.model.transforms import replace_module
    from llmctl.core.quant.gptq import gptq
    from llmctl.core.quant.linear import PackedLinear
    from llmctl.core.quant.scheme import Scheme

    ids = torch.randint(0, 64, (5, 12), generator=torch.Generator().manual_seed(1))
    model = _model()
    reference = copy.deepcopy(model)
    report = Recorder()
    errors = quantize_model(model, QuantizeConfig(method="gptq", bits=4, group_size=16, micro_batch=3),
                            ids, report)
    scheme = Scheme(4, 16, True)
    expected, output_errors = {}, {}
    with torch.no_grad():
        inps = [reference.embed(chunk) for chunk in ids.split(3)]
        for i, layer in enumerate(reference.model.layers):
            for group in SEQUENTIAL:
                stats = {p: (torch.zeros(layer.get_submodule(p).in_features, layer.get_submodule(p).in_features), 0)
                         for p in group}
                seen = {p: [] for p in group}

                def add(module, args, p):
                    stats[p] = _add_batch(*stats[p], args[0])
                    seen[p].append(args[0].reshape(-1, args[0].shape[-1]))

                hooks = [layer.get_submodule(p).register_forward_pre_hook(lambda m, a, p=p: add(m, a, p))
                         for p in group]
                for x, ctx in inps:
                    layer(x, ctx)
                for h in hooks:
                    h.remove()
                for p in group:
                    linear, xs = layer.get_submodule(p), torch.cat(seen[p])
                    packed = PackedLinear.from_linear(linear, scheme, gptq(linear.weight, stats[p][0], scheme))
                    w_hat = packed.dequantize(torch.float32)
                    d, w = linear.weight - w_hat, linear.weight
                    output_errors[f"model.layers.{i}.{p}"] = ((d @ xs.T).pow(2).sum() / (w @ xs.T).pow(2).sum()).item()
                    replace_module(layer, p, packed)
                    expected[f"model.layers.{i}.{p}"] = w_hat
            inps = [(layer(x, ctx)[0], ctx) for x, ctx in inps]
    got = _dense(model)
    assert got.keys() == expected.keys() and len(got) == 14
    for path in got:
        torch.testing.assert_close(got[path], expected[path], rtol=0, atol=1e-6, msg=path)
    assert errors["output_error"] == pytest.approx(sum(output_errors.values()) / 14, rel=1e-4)
    worst = max(output_errors, key=output_errors.get)
    assert errors["worst_output_error"] == {"linear": worst, "error": pytest.approx(output_errors[worst], rel=1e-4)}
    assert report.steps() == [("progress", "gptq layer by layer", 2, "layer"), ("advance", 1), ("advance", 1)]


def test_reported_weight_errors_are_computed_by_hand_for_small_weights():
    """‖W − Ŵ‖² / ‖W‖² per linear, their mean and the worst, on weights whose ‖W‖² is far below 1
    (a floor on the denominator must only guard against 0)."""
    model = _model(scale=0.01)
    dense = {p: m.weight.detach().clone() for p, m in model.named_modules() if isinstance(m, nn.Linear)}
    report = Recorder()
    errors = quantize_model(model, QuantizeConfig(method="int4", bits=4, group_size=16), report=report)
    got = _dense(model)
    assert all(dense[p].pow(2).sum() < 1e-2 for p in got)
    by_hand = {p: ((dense[p] - w).pow(2).sum() / dense[p].pow(2).sum()).item() for p, w in got.items()}
    assert errors["linears"] == 14 and "output_error" not in errors
    assert errors["weight_error"] == pytest.approx(sum(by_hand.values()) / 14, rel=1e-5)
    worst = max(by_hand, key=by_hand.get)
    assert errors["worst_weight_error"] == {"linear": worst, "error": pytest.approx(by_hand[worst], rel=1e-5)}
    assert report.steps() == [("progress", "quantize int4", 14, "linear")] + [("advance", 1)] * 14


def test_relative_errors_by_hand():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 8, generator=g) * 1e-3
    w_hat = w + torch.randn(6, 8, generator=g) * 1e-4
    x = torch.randn(20, 8, generator=g)
    d = w - w_hat
    assert relative_error(w, w_hat, None) == pytest.approx((d.pow(2).sum() / w.pow(2).sum()).item(), rel=1e-5)
    assert relative_error(w, w_hat, x.T @ x) == pytest.approx(
        ((d @ x.T).pow(2).sum() / (w @ x.T).pow(2).sum()).item(), rel=1e-4)
    assert relative_error(torch.zeros(2, 2), torch.zeros(2, 2), None) == 0  # 0/0 guarded
    assert summarize({"a": {"weight": 0.1}, "b": {"weight": 0.3, "output": 0.2}, "c": {"weight": 0.2}}) == {
        "linears": 3, "weight_error": pytest.approx(0.2), "worst_weight_error": {"linear": "b", "error": 0.3},
        "output_error": 0.2, "worst_output_error": {"linear": "b", "error": 0.2}}


def test_nf4_keeps_the_ignored_linears_in_float():
    """`ignore` reaches NF4 as `exclude_modules` (less the head, which NF4 leaves alone anyway)."""
    from llmctl.core.quant.nf4 import NF4, NF4Linear

    model = _model()
    quantize_model(model, QuantizeConfig(method="nf4", ignore=["lm_head", "down_proj"]))
    kinds = {p: type(m) for p, m in model.named_modules() if isinstance(m, (nn.Linear, NF4Linear))}
    assert {p for p, k in kinds.items() if k is nn.Linear} == {"lm_head", "model.layers.0.mlp.down_proj",
                                                               "model.layers.1.mlp.down_proj"}
    assert model.transforms[-1].spec() == NF4(exclude_modules=["down_proj"]).spec()
    plain = _model()
    quantize_model(plain, QuantizeConfig(method="nf4"))
    assert plain.transforms[-1].spec() == NF4().spec() and isinstance(plain.model.layers[0].mlp.down_proj, NF4Linear)


def test_a_second_method_keeps_the_transforms_before_it():
    """NF4 but the down projections, then int8 on those: both transforms recorded, in order."""
    from llmctl.core.quant.linear import PackedLinear
    from llmctl.core.quant.nf4 import NF4Linear

    model = _model()
    quantize_model(model, QuantizeConfig(method="nf4", ignore=["lm_head", "down_proj"]))
    quantize_model(model, QuantizeConfig(method="int8"))
    assert [t.name for t in model.transforms] == ["nf4", "pack-quantized"]
    assert isinstance(model.model.layers[1].mlp.down_proj, PackedLinear)
    assert isinstance(model.model.layers[1].mlp.up_proj, NF4Linear)


def test_quantize_model_refusals_say_why():
    from llmctl.errors import UsageError

    with pytest.raises(UsageError, match=r"^ignore=\['re:\.\*'\] leaves no linear to quantize$"):
        quantize_model(_model(), QuantizeConfig(method="int8", ignore=["re:.*"]))
    with pytest.raises(UsageError, match="^--method awq needs --calibration text$"):
        quantize_model(_model(), QuantizeConfig(method="awq", bits=4, group_size=16))


# --- PEFT's adapter files -----------------------------------------------------------------------

IDS = torch.tensor([[0, 40, 41, 42, 43, 1, 2, 2], [0, 50, 51, 52, 53, 54, 55, 1], [0, 60, 61, 1, 2, 2, 2, 2]])


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("llama"), ["the quick brown fox jumps over the lazy dog. " * 20],
                      vocab=120, context=64, scale=2.0)


def _lora(base, seed=0, **kw):
    from llmctl.core.adapters import LoRA, lora_modules
    from llmctl.core.model.io import load_model

    model, _ = load_model(base, transforms=[LoRA(r=2, **kw)])
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in lora_modules(model).values():
            module.lora_B.weight.copy_(torch.randn(module.lora_B.weight.shape, generator=g) * 0.3)
    return model


def test_merged_checkpoint_is_peft_merge_and_unload(llama, tmp_path):
    """`merge_to_checkpoint` writes PEFT's `merge_and_unload` weights with the adapter's tokenizer
    (else the base's), a `finetune` lineage naming both, and refuses to overwrite without force."""
    import peft
    import transformers

    from llmctl.core.adapters import merge_to_checkpoint, save_adapter
    from llmctl.errors import UsageError

    adapter = save_adapter(_lora(llama, target_modules=["q_proj", "down_proj"], dora=True), tmp_path / "a", base=llama)
    out = merge_to_checkpoint(adapter, tmp_path / "m")
    hf = transformers.AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32)
    want = peft.PeftModel.from_pretrained(hf, adapter).merge_and_unload().state_dict()
    got = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
    assert got.keys() == want.keys()
    for key in got:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6, msg=key)
    lineage = json.loads((out / "llmctl.json").read_text())
    assert lineage["command"] == "finetune" and lineage["merged_adapter"] == str(adapter.resolve())
    assert [p["path"] for p in lineage["parents"]] == [str(llama.resolve())]
    assert (out / "tokenizer.json").read_bytes() == (llama / "tokenizer.json").read_bytes()
    with pytest.raises(UsageError, match="already exists"):
        merge_to_checkpoint(adapter, out)
    tokenizer = json.loads((llama / "tokenizer.json").read_text())
    tokenizer["added_tokens"].append({**tokenizer["added_tokens"][0], "id": 119, "content": "<extra>"})
    (adapter / "tokenizer.json").write_text(json.dumps(tokenizer))
    merge_to_checkpoint(adapter, out, force=True)
    assert (out / "tokenizer.json").read_text() == json.dumps(tokenizer)  # the adapter's own


def test_merged_checkpoint_of_a_base_without_tokenizer_has_none(llama, tmp_path):
    from llmctl.core.adapters import merge_to_checkpoint, save_adapter

    bare = tmp_path / "bare"
    shutil.copytree(llama, bare, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens*"))
    assert not (bare / "tokenizer.json").exists()
    out = merge_to_checkpoint(save_adapter(_lora(bare, target_modules=["v_proj"]), tmp_path / "a", base=bare),
                              tmp_path / "m")
    assert (out / "config.json").is_file() and not (out / "tokenizer.json").exists()


def _hf_classifier(base, labels):
    import transformers

    return transformers.AutoModelForSequenceClassification.from_pretrained(base, num_labels=labels, pad_token_id=2,
                                                                           dtype=torch.float32)


def test_a_seq_cls_adapter_made_by_peft_loads_and_is_written_back(llama, tmp_path):
    """PEFT's SEQ_CLS adapter with 3 labels: llmctl reads the label count from `score.weight` (an
    untied head, the base's pad token), scores as PEFT, and writes it back as PEFT reads it
    (`task_type`, PEFT's `modules_to_save`, the classifier fields beside the base's)."""
    import peft

    from llmctl.core.adapters import save_adapter
    from llmctl.core.adapters.peft_format import model_config
    from llmctl.core.model.io import load_model
    from llmctl.core.model.reward import sequence_scores

    torch.manual_seed(0)
    theirs = peft.get_peft_model(_hf_classifier(llama, 3), peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8,
                                                                          target_modules=["q_proj", "o_proj"]))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name or "score" in name:
                p.normal_(0, 0.5)
    theirs.save_pretrained(tmp_path / "peft")
    cfg = model_config(tmp_path / "peft")
    assert (cfg.num_labels, cfg.tie_embeddings, cfg.pad_token_id) == (3, False, 2)
    ours, cfg = load_model(tmp_path / "peft")
    with torch.no_grad():
        expected = theirs.eval()(IDS).logits
        torch.testing.assert_close(sequence_scores(ours, IDS, cfg.pad_token_id), expected, rtol=0, atol=1e-5)
    out = save_adapter(ours, tmp_path / "ours", base=llama)
    config = json.loads((out / "adapter_config.json").read_text())
    peft_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (config["task_type"], config["modules_to_save"]) == ("SEQ_CLS", peft_config["modules_to_save"])
    assert json.loads((out / "llmctl.json").read_text())["base_context"] == {"num_labels": 3}  # the rest as the base
    again = peft.PeftModel.from_pretrained(_hf_classifier(llama, 3), out).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(IDS).logits, expected, rtol=0, atol=1e-5)
    reloaded, rcfg = load_model(out)
    assert rcfg.num_labels == 3
    with torch.no_grad():
        torch.testing.assert_close(sequence_scores(reloaded, IDS, rcfg.pad_token_id), expected, rtol=0, atol=1e-5)


def test_a_seq_cls_adapter_without_its_head_is_refused(llama, tmp_path):
    from safetensors.torch import load_file, save_file

    from llmctl.core.adapters import save_adapter
    from llmctl.core.model.io import load_model
    from llmctl.errors import CheckpointError

    out = save_adapter(_lora(llama, target_modules=["q_proj"]), tmp_path / "a", base=llama)
    config = json.loads((out / "adapter_config.json").read_text())
    seq_cls = {**config, "task_type": "SEQ_CLS", "modules_to_save": ["score"]}
    (out / "adapter_config.json").write_text(json.dumps(seq_cls))
    with pytest.raises(CheckpointError, match=rf"^{out / 'adapter_model.safetensors'}: a SEQ_CLS adapter without "
                                              r"base_model\.model\.score\.weight \(its head\)$"):
        load_model(out)
    tensors = load_file(out / "adapter_model.safetensors")
    save_file({**tensors, "base_model.model.score.weight": torch.randn(5, 32)}, out / "adapter_model.safetensors")
    model, cfg = load_model(out)
    assert cfg.num_labels == 5 and cfg.tie_embeddings is False and model.lm_head.weight.shape == (5, 32)


def _same_fields(ours: dict, theirs: dict) -> None:
    """Every field of our adapter_config.json has PEFT's value (lists in any order: PEFT saves sets)."""
    for key, value in ours.items():
        if key != "base_model_name_or_path":
            other = theirs[key]
            assert (sorted(value) == sorted(other)) if isinstance(value, list) else value == other, key


def test_lora_config_fields_are_pefts(llama, tmp_path):
    """adapter_config.json for a LoRA equals what PEFT writes for the same LoraConfig, field by field."""
    import peft
    import transformers

    from llmctl.core.adapters import save_adapter

    out = save_adapter(_lora(llama, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"], alpha=8,
                             dropout=0.1, rslora=True), tmp_path / "ours", base=llama)
    config = peft.LoraConfig(r=2, task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"],
                             modules_to_save=["lm_head"], lora_alpha=8, lora_dropout=0.1, use_rslora=True)
    hf = transformers.AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32)
    peft.get_peft_model(hf, config).save_pretrained(tmp_path / "peft")
    _same_fields(json.loads((out / "adapter_config.json").read_text()),
                 json.loads((tmp_path / "peft" / "adapter_config.json").read_text()))


def test_all_linear_in_some_layers_is_written_as_the_modules_it_picks(llama, tmp_path):
    """PEFT refuses `layers_to_transform` with a string target ("all-linear", a regex): such an
    adapter is written with the module paths it adapts, which PEFT loads with our logits."""
    import peft
    import transformers

    from llmctl.core.adapters import lora_modules, save_adapter

    model = _lora(llama, target_modules="all-linear", exclude_modules=["o_proj"], layers_to_transform=[1], dora=True)
    out = save_adapter(model, tmp_path / "ours", base=llama)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["target_modules"] == list(lora_modules(model)) and len(config["target_modules"]) == 6
    assert config["exclude_modules"] is None and config["layers_to_transform"] is None
    hf = transformers.AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(peft.PeftModel.from_pretrained(hf, out).eval()(IDS).logits, model(IDS).logits,
                                   rtol=0, atol=1e-5)

def test_bert_adapters_use_its_module_names_both_ways(tmp_path):
    """Where our module names are not the architecture's (BERT), an adapter is written with the
    HF paths it targets, and a PEFT config's targets, exclusions and layers are matched on them."""
    import peft
    import transformers
    from test_hf_parity import CASES, VOCAB, build_hf

    from llmctl.core.adapters import LoRA, lora_modules, save_adapter
    from llmctl.core.model.io import load_model

    build_hf(*CASES["bert"]).save_pretrained(tmp_path / "bert")
    base, ids = tmp_path / "bert", torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))
    model = _lora(base, target_modules=["q_proj", "v_proj"], layers_to_transform=[1])
    out = save_adapter(model, tmp_path / "ours", base=base)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["target_modules"] == ["bert.encoder.layer.1.attention.self.query",
                                        "bert.encoder.layer.1.attention.self.value"]
    assert config["exclude_modules"] is None and config["layers_to_transform"] is None
    hf = transformers.AutoModelForMaskedLM.from_pretrained(base, dtype=torch.float32)
    with torch.no_grad():
        expected = model(ids).logits
        torch.testing.assert_close(peft.PeftModel.from_pretrained(hf, out).eval()(ids).logits, expected,
                                   rtol=0, atol=1e-4)
    theirs = peft.get_peft_model(transformers.AutoModelForMaskedLM.from_pretrained(base, dtype=torch.float32),
                                 peft.LoraConfig(r=2, target_modules=["query", "key", "output.dense"],
                                                 exclude_modules=["key"], layers_to_transform=[0],
                                                 init_lora_weights=False)).eval()
    theirs.save_pretrained(tmp_path / "peft")
    ours, _ = load_model(tmp_path / "peft")
    assert sorted(lora_modules(ours)) == ["model.layers.0.mlp.down_proj", "model.layers.0.self_attn.o_proj",
                                          "model.layers.0.self_attn.q_proj"]
    assert isinstance(ours.transforms[-1], LoRA)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=0, atol=1e-5)
    every = peft.get_peft_model(transformers.AutoModelForMaskedLM.from_pretrained(base, dtype=torch.float32),
                                peft.LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False)).eval()
    every.save_pretrained(tmp_path / "every")
    ours, _ = load_model(tmp_path / "every")
    assert len(lora_modules(ours)) == 2 * 6 + 1  # q, k, v, o, up, down per layer, and the MLM head's dense
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, every(ids).logits, rtol=0, atol=1e-5)
    # ours on all linears: written as "all-linear" (PEFT's rule is ours), read back and by PEFT alike
    model = _lora(base, target_modules="all-linear")
    out = save_adapter(model, tmp_path / "ours-all", base=base)
    assert json.loads((out / "adapter_config.json").read_text())["target_modules"] == "all-linear"
    hf = transformers.AutoModelForMaskedLM.from_pretrained(base, dtype=torch.float32)
    with torch.no_grad():
        expected = model(ids).logits
        torch.testing.assert_close(load_model(out)[0](ids).logits, expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(peft.PeftModel.from_pretrained(hf, out).eval()(ids).logits, expected,
                                   rtol=0, atol=1e-4)


def test_adapter_files_that_cannot_be_read_are_refused_with_the_reason(llama, tmp_path):
    from safetensors.torch import load_file, save_file

    from llmctl.core.adapters import save_adapter
    from llmctl.core.model.io import load_model
    from llmctl.errors import CheckpointError

    out = save_adapter(_lora(llama, target_modules=["q_proj"]), tmp_path / "a", base=llama)
    config_file, weights = out / "adapter_config.json", out / "adapter_model.safetensors"
    config, tensors = json.loads(config_file.read_text()), load_file(weights)
    where = str(config_file)
    for change, message in [({"peft_type": "IA3"}, f"{where}: peft_type 'IA3' is not supported; supported: LORA, "
                                                   "PREFIX_TUNING, PROMPT_TUNING"),
                            ({"bias": "all"}, f"{where}: bias='all' is not supported"),
                            ({"lora_bias": True}, f"{where}: lora_bias=True is not supported"),
                            ({"rank_pattern": {"q_proj": 4}},  # read (PEFT's per-module ranks): the file is rank 2
                             f"{weights}: tensor 'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight' "
                             "has shape [2, 32], the model's is [4, 32]")]:
        config_file.write_text(json.dumps({**config, **change}))
        with pytest.raises(CheckpointError) as caught:
            load_model(out)
        assert str(caught.value) == message
    config_file.write_text(json.dumps({**config, "bias": None, "rank_pattern": None}))  # None: PEFT's default
    load_model(out)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    for stored, message in [({**tensors, "base_model.model.model.norm.lora_A.weight": torch.zeros(2, 32)},
                             f"{weights}: tensor 'base_model.model.model.norm.lora_A.weight' has no place in the "
                             "model"),
                            ({**tensors, key: torch.zeros(3, 32)},
                             f"{weights}: tensor '{key}' has shape [3, 32], the model's is [2, 32]")]:
        save_file(stored, weights)
        with pytest.raises(CheckpointError) as caught:
            load_model(out)
        assert str(caught.value) == message
    # PEFT saves a targeted embedding's base weight beside its adapter: ours is the base's, skipped
    base_layer = {"base_model.model.model.embed_tokens.base_layer.weight": torch.zeros(1)}
    save_file({**tensors, **base_layer, "base_model.model.model.norm.lora_A.weight": torch.zeros(2, 32)}, weights)
    with pytest.raises(CheckpointError, match="'base_model.model.model.norm.lora_A.weight' has no place"):
        load_model(out)  # (the tensors after a skipped one are still checked)
    save_file({**tensors, **base_layer}, weights)
    model, _ = load_model(out)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.lora_A.weight, tensors[key])
    weights.unlink()
    with pytest.raises(CheckpointError, match=rf"^{out}: no adapter_model\.safetensors$"):
        load_model(out)


def test_saving_an_adapter_checks_the_model(llama, tmp_path):
    from llmctl.core.adapters import save_adapter
    from llmctl.core.model.io import load_model
    from llmctl.core.quant.nf4 import NF4
    from llmctl.errors import CheckpointError

    with pytest.raises(CheckpointError, match=r"^the model has no adapter to save \(its last transform is not lora, "
                                              r"prefix or prompt\)$"):
        save_adapter(load_model(llama, transforms=[NF4()])[0], tmp_path / "a", base=llama)
    nf4 = load_model(llama, transforms=[NF4()])[0]
    from llmctl.core.model.io import save_model

    quantized = save_model(nf4, tmp_path / "nf4")
    with pytest.raises(CheckpointError, match=rf"^the model's transforms do not start with those of its base "
                                              rf"{quantized}$"):
        save_adapter(_lora(llama, target_modules=["q_proj"]), tmp_path / "b", base=quantized)


# --- prefix and prompt tuning -------------------------------------------------------------------

P = 3  # virtual tokens


@pytest.fixture(scope="module")
def gqa(tmp_path_factory):
    """A Llama with 4 query and 2 key/value heads (the kv width is not the hidden size)."""
    import transformers

    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=48, max_position_embeddings=64))
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    out = tmp_path_factory.mktemp("gqa")
    hf.save_pretrained(out)
    return out


def _peft_prompt(method):
    import peft

    return {"prefix": peft.PrefixTuningConfig, "prompt": peft.PromptTuningConfig}[method](
        task_type="CAUSAL_LM", num_virtual_tokens=P)


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_prompt_learning_on_grouped_query_attention_equals_peft_both_ways(gqa, tmp_path, method):
    import peft
    import transformers

    from llmctl.core.adapters import save_adapter
    from llmctl.core.adapters.prompt import Prefix, Prompt
    from llmctl.core.model.io import load_model

    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    hf = lambda: transformers.AutoModelForCausalLM.from_pretrained(gqa, dtype=torch.float32).eval()  # noqa: E731
    real = (lambda logits: logits[:, P:]) if method == "prompt" else (lambda logits: logits)  # noqa: E731
    torch.manual_seed(1)
    model, _ = load_model(gqa, transforms=[{"prefix": Prefix, "prompt": Prompt}[method](num_virtual_tokens=P)])
    with torch.no_grad():
        model.prompt_encoder.embedding.weight.mul_(0.5)
    out = save_adapter(model, tmp_path / "ours", base=gqa)
    theirs = peft.get_peft_model(hf(), _peft_prompt(method)).eval()
    with torch.no_grad():
        theirs.prompt_encoder.default.embedding.weight.mul_(0.5)
        theirs.save_pretrained(tmp_path / "peft")
        ours_cfg = json.loads((out / "adapter_config.json").read_text())
        peft_cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
        written = {k: v for k, v in ours_cfg.items() if k != "base_model_name_or_path"}
        assert written == {k: peft_cfg[k] for k in written}  # every field we write has PEFT's value
        torch.testing.assert_close(model(ids).logits, real(peft.PeftModel.from_pretrained(hf(), out)(ids).logits),
                                   rtol=0, atol=1e-5)
        loaded, _ = load_model(tmp_path / "peft")
        torch.testing.assert_close(loaded(ids).logits, real(theirs(ids).logits), rtol=0, atol=1e-5)


def test_prompt_learning_refusals_name_the_reason(gqa, llama, tmp_path):
    from llmctl.core.adapters import save_adapter
    from llmctl.core.adapters.prompt import Prefix, Prompt
    from llmctl.core.model.io import load_model
    from llmctl.errors import CheckpointError, UsageError

    for kw, reason in [(dict(is_causal=False), "an encoder-only model"), (dict(sliding_window=4), "a sliding window"),
                       (dict(position="alibi"), "ALiBi"), (dict(num_mtp_heads=1), "multi-token prediction heads"),
                       (dict(layer_num_kv_heads=[2, 1]), "per-layer kv heads")]:
        cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, **kw)
        with pytest.raises(UsageError, match=f"^prompt tuning does not support {reason}$"):
            build_model(cfg, [Prompt(num_virtual_tokens=2)])
    with pytest.raises(UsageError, match="^prefix tuning does not support another prefix/prompt adapter$"):
        build_model(ModelConfig(vocab_size=64, hidden_size=32), [Prompt(num_virtual_tokens=2), Prefix()])
    with pytest.raises(UsageError, match="^prefix: num_virtual_tokens must be >= 1, got 0$"):
        Prefix(num_virtual_tokens=0)
    assert Prompt(num_virtual_tokens=1).num_virtual_tokens == 1
    out = save_adapter(load_model(gqa, transforms=[Prefix(num_virtual_tokens=P)])[0], tmp_path / "a", base=gqa)
    config_file = out / "adapter_config.json"
    config = json.loads(config_file.read_text())
    for change, message in [({"num_transformer_submodules": 2}, "num_transformer_submodules=2 (encoder-decoder) is not "
                                                                "supported"),
                            ({"prefix_projection": True},
                             "prefix_projection=true is not supported (only plain prefixes)"),
                            ({"num_layers": 3}, "num_layers=3 does not fit the base model (2)"),
                            ({"num_attention_heads": 4}, "num_attention_heads=4 does not fit the base model (2)"),
                            ({"token_dim": 32}, "token_dim=32 does not fit the base model (16)")]:
        config_file.write_text(json.dumps({**config, **change}))
        with pytest.raises(CheckpointError) as caught:
            load_model(out)
        assert str(caught.value) == f"{config_file}: {message}"
    config_file.write_text(json.dumps({k: v for k, v in config.items() if k not in ("num_layers", "token_dim",
                                                                                     "num_attention_heads",
                                                                                     "num_transformer_submodules")}))
    assert load_model(out)[0].prompt_encoder.num_virtual_tokens == P  # PEFT's defaults fit any base


def test_saved_adapter_files_and_the_context_they_record(llama, tmp_path):
    """PEFT's safetensors metadata, the generation config, force, and `base_context`: only the
    context fields that differ from the base's (none: no key), which a reload applies."""
    import dataclasses

    from safetensors import safe_open

    from llmctl.core.adapters import save_adapter
    from llmctl.core.model.io import load_model
    from llmctl.errors import UsageError

    model = _lora(llama, target_modules=["q_proj"])
    out = save_adapter(model, tmp_path / "a", base=llama, generation_config={"max_new_tokens": 7})
    with safe_open(out / "adapter_model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
    assert json.loads((out / "generation_config.json").read_text()) == {"max_new_tokens": 7}
    assert "base_context" not in json.loads((out / "llmctl.json").read_text())
    with pytest.raises(UsageError, match="already exists"):
        save_adapter(model, out, base=llama)
    model.cfg = dataclasses.replace(model.cfg, max_seq_len=128, rope_scaling={"rope_type": "linear", "factor": 2.0})
    save_adapter(model, out, base=llama, force=True)
    assert not (out / "generation_config.json").exists()
    assert json.loads((out / "llmctl.json").read_text())["base_context"] == {
        "max_seq_len": 128, "rope_scaling": {"rope_type": "linear", "factor": 2.0}}
    assert load_model(out)[1].max_seq_len == 128
    other = tmp_path / "other"  # another base given explicitly (merge's BASE+ADAPTER) is the one loaded
    shutil.copytree(llama, other)
    from safetensors.torch import load_file, save_file

    weights = load_file(other / "model.safetensors")
    save_file({k: v * 1.5 for k, v in weights.items()}, other / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "rope_parameters": {"rope_type": "default",
                                                                                  "rope_theta": 5000.0}}))
    from llmctl.core.adapters import load_adapter

    loaded, cfg = load_adapter(out, base=other)
    assert (cfg.rope_theta, cfg.max_seq_len) == (5000.0, 128)  # its config, with the adapter's context
    q = loaded.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(q.weight, 1.5 * weights["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(q.lora_B.weight, model.model.layers[0].self_attn.q_proj.lora_B.weight)


def test_an_adapter_over_a_base_that_records_transforms_records_none_of_them(llama, tmp_path):
    """A base whose transforms are recorded in both its config.json (NF4) and its llmctl.json (an
    unmerged LoRA): an adapter on it records no `base_transforms` of its own, and loads back."""
    from llmctl.core.adapters import LoRA, load_adapter, lora_modules, save_adapter
    from llmctl.core.adapters.prompt import Prompt
    from llmctl.core.model.io import load_model, save_model
    from llmctl.core.quant.nf4 import NF4

    model, _ = load_model(llama, transforms=[NF4(), LoRA(r=2, target_modules=["q_proj"])])
    with torch.no_grad():
        for module in lora_modules(model).values():
            module.lora_B.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(0))
    base = save_model(model, tmp_path / "base")
    assert json.loads((base / "llmctl.json").read_text())["transforms"][0]["type"] == "lora"
    model = load_model(base)[0]
    Prompt(num_virtual_tokens=2).apply(model)
    with torch.no_grad():
        model.prompt_encoder.embedding.weight.normal_(generator=torch.Generator().manual_seed(1))
    out = save_adapter(model, tmp_path / "a", base=base)
    assert json.loads((out / "llmctl.json").read_text())["base_transforms"] == []
    loaded, _ = load_adapter(out)
    assert [t.name for t in loaded.transforms] == ["nf4", "lora", "prompt"]
    ids = torch.randint(3, 100, (1, 6))
    torch.testing.assert_close(loaded(ids).logits, model.eval()(ids).logits)


def test_load_adapter_takes_the_dtype_config_and_transforms_it_is_given(llama, tmp_path):
    import dataclasses

    from llmctl.core.adapters import load_adapter, save_adapter
    from llmctl.core.model.io import load_model

    model = _lora(llama, target_modules=["q_proj"])
    model.cfg = dataclasses.replace(model.cfg, max_seq_len=128)
    out = save_adapter(model, tmp_path / "a", base=llama)  # base_context: max_seq_len 128
    loaded, cfg = load_adapter(out, dtype=torch.bfloat16)
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16 and cfg.max_seq_len == 128
    given = dataclasses.replace(load_model(llama)[1], max_seq_len=96)
    assert load_adapter(out, config=given)[1].max_seq_len == 96
    seen = []

    class Seen:
        def apply(self, model):
            seen.append(model)
            return model

    loaded, _ = load_adapter(out, transforms=[Seen()])
    assert seen == [loaded]


def test_a_peft_classifier_head_unties_a_tied_base(tmp_path):
    """AutoModelForSequenceClassification's score head is its own tensor, whatever the base ties."""
    from safetensors.torch import save_file

    from llmctl.core.adapters.peft_format import _classifier

    save_file({"base_model.model.score.weight": torch.zeros(3, 32)}, tmp_path / "adapter_model.safetensors")
    cfg = _classifier(ModelConfig(vocab_size=64, hidden_size=32, tie_embeddings=True), tmp_path)
    assert (cfg.num_labels, cfg.tie_embeddings) == (3, False)


def test_a_module_without_transforms_has_no_adapter_to_save(tmp_path):
    from llmctl.core.adapters import save_adapter
    from llmctl.errors import CheckpointError

    with pytest.raises(CheckpointError, match=r"^the model has no adapter to save \(its last transform is not lora"):
        save_adapter(nn.Linear(2, 2), tmp_path / "a", base=tmp_path)


# --- GGUF export: dense tensors and the vocabulary ----------------------------------------------


def test_dense_tensors_fold_adapters_and_dequantize():
    from llmctl.core.adapters import LoRA, lora_modules
    from llmctl.core.export.dense import dense_tensors
    from llmctl.core.quant.linear import PackQuantized
    from llmctl.core.quant.nf4 import NF4

    torch.manual_seed(0)
    plain = build_model(ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                    qkv_bias=True, tie_embeddings=False))
    want = {k: v.clone() for k, v in plain.state_dict().items()}

    def check(model, kinds, expected):
        tensors, got_kinds = dense_tensors(model)
        assert got_kinds == kinds and tensors.keys() == want.keys()
        for name, t in tensors.items():
            value = expected.get(name, want[name])
            assert t.shape == tuple(value.shape), name
            torch.testing.assert_close(t.get().float(), value.float(), rtol=0, atol=1e-5, msg=name)

    def adapt(model):
        LoRA(r=2, alpha=6, target_modules=["q_proj", "lm_head"]).apply(model)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for m in lora_modules(model).values():
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g))
        return {f"{p}.weight": m.lora_B.weight @ m.lora_A.weight * 3 for p, m in lora_modules(model).items()}

    adapted = copy.deepcopy(plain)
    deltas = adapt(adapted)
    check(adapted, {"adapted"}, {k: want[k] + d for k, d in deltas.items()})
    quantized = PackQuantized(bits=4, group_size=16).apply(copy.deepcopy(plain))
    dequantized = {f"{p}.weight": m.dequantize(torch.float32) for p, m in quantized.named_modules()
                   if hasattr(m, "dequantize")}
    assert len(dequantized) == 14
    check(quantized, {"quantized"}, dequantized)
    qlora = NF4().apply(copy.deepcopy(plain))
    base = {f"{p}.weight": m.dequantize(torch.float32) for p, m in qlora.named_modules() if hasattr(m, "dequantize")}
    deltas = adapt(qlora)
    check(qlora, {"adapted", "quantized"}, {k: base[k] + deltas.get(k, 0) for k in base} | {
        "lm_head.weight": want["lm_head.weight"] + deltas["lm_head.weight"]})


def test_an_int8_checkpoint_exports_every_tensor_dequantized(llama, llmctl, tmp_path):
    """A compressed-tensors layer stores `weight_packed`, not `weight`: its dequantized weight is
    exported all the same (it was dropped, and the GGUF file had only the norms and embeddings)."""
    import gguf
    import numpy as np

    from llmctl.core.model.io import load_model, save_model

    model, _ = load_model(llama)
    quantize_model(model, QuantizeConfig(method="int8"))
    save_model(model, tmp_path / "q8", tokenizer_dir=llama)
    for source, out in ((llama, "f.gguf"), (tmp_path / "q8", "q.gguf")):
        r = llmctl("export", source, "-o", tmp_path / out, "--type", "f32")
        assert r.code == 0, r.stderr
    dense = {t.name: np.array(t.data) for t in gguf.GGUFReader(tmp_path / "f.gguf").tensors}
    got = {t.name: np.array(t.data) for t in gguf.GGUFReader(tmp_path / "q.gguf").tensors}
    assert got.keys() == dense.keys() and len(got) == 21
    v = model.get_submodule("model.layers.1.self_attn.v_proj")
    np.testing.assert_array_equal(got["blk.1.attn_v.weight"], v.dequantize(torch.float32).numpy())


class _Writer:
    """Records what `add_vocab` writes: {key: value} from each `add_KEY(value)`."""

    def __init__(self):
        self.kv = {}

    def __getattr__(self, name):
        if not name.startswith("add_"):
            raise AttributeError(name)
        return lambda value: self.kv.__setitem__(name[4:], value)


def _tokenizer_dir(path, model, pre, *, specials=("<s>", "</s>", "<pad>"), config=None, post=None, normalizer=None):
    """A tokenizer directory: `model` (a tokenizers model, trained on a few words when it is a BPE)."""
    from tokenizers import Tokenizer, decoders, trainers

    tok = Tokenizer(model)
    tok.pre_tokenizer = pre
    if normalizer is not None:
        tok.normalizer = normalizer
    if type(model).__name__ == "BPE":
        from tokenizers import pre_tokenizers

        byte_level = "ByteLevel" in repr(pre)
        tok.decoder = decoders.ByteLevel() if byte_level else decoders.Metaspace()
        trainer = trainers.BpeTrainer(vocab_size=300 if byte_level else 60, special_tokens=list(specials),
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet() if byte_level else [])
        tok.train_from_iterator(["the cat sat on the mat, the cat ate the rat", "a bat and a hat"] * 20, trainer)
    if post is not None:
        tok.post_processor = post(tok)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(config or {}))
    return path


def _vocab(path, n_vocab):
    from conftest import recording_reporter

    from llmctl.core.export.vocab import add_vocab

    writer, report = _Writer(), recording_reporter()
    described = add_vocab(writer, path, n_vocab, report)
    return writer.kv, report.seen, described


def test_byte_level_vocab_is_llama_cpps(tmp_path):
    """Tokens in id order, padded with `[PAD{id}]` (unused); added special tokens control, other added
    tokens user-defined; merges, special ids, BOS added and EOS not (as the post-processor does), the
    chat template: as gguf-py's SpecialVocab reads the same directory."""
    import gguf
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors

    def post(tok):
        return processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])

    config = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "chat_template": "{{ messages }}"}
    path = _tokenizer_dir(tmp_path / "t", models.BPE(), pre_tokenizers.ByteLevel(add_prefix_space=True), config=config,
                          post=post)

    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    tok.add_tokens([AddedToken("<tool>", special=False)])
    tok.save(str(path / "tokenizer.json"))
    vocab = tok.get_vocab(with_added_tokens=True)
    n = len(vocab)
    kv, warnings, described = _vocab(path, n + 3)
    assert described == f"gpt2 (byte-level BPE), {n} tokens"
    assert warnings == ["the tokenizer adds a prefix space, llama.cpp's gpt2 tokenizer does not: the first word may "
                        "tokenize differently"]
    assert (kv["tokenizer_model"], kv["tokenizer_pre"]) == ("gpt2", "gpt-2")
    assert kv["token_list"] == sorted(vocab, key=vocab.get) + [f"[PAD{i}]" for i in range(n, n + 3)]
    specials = {vocab[t] for t in ("<s>", "</s>", "<pad>")}
    assert kv["token_types"] == [3 if i in specials else 4 if i == vocab["<tool>"] else 5 if i >= n else 1
                                 for i in range(n + 3)]
    ref = gguf.SpecialVocab(path, load_merges=True, n_vocab=n + 3)
    assert kv["token_merges"] == ref.merges
    assert {r: kv[f"{r}_token_id"] for r in ("bos", "eos", "pad")} == {r: ref.special_token_ids[r]
                                                                      for r in ("bos", "eos", "pad")}
    assert "unk_token_id" not in kv
    assert (kv["add_bos_token"], kv["add_eos_token"]) == (True, False) == (ref.add_special_token["bos"],
                                                                           ref.add_special_token.get("eos", False))
    assert kv["chat_template"] == ref.chat_template == "{{ messages }}"


def test_eos_appended_by_the_post_processor_is_recorded(tmp_path):
    from tokenizers import models, pre_tokenizers, processors

    def post(tok):
        return processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))])

    path = _tokenizer_dir(tmp_path / "t", models.BPE(), pre_tokenizers.ByteLevel(add_prefix_space=False),
                          config={"bos_token": "<s>", "eos_token": "</s>"}, post=post)
    kv, warnings, _ = _vocab(path, 400)
    assert (kv["add_bos_token"], kv["add_eos_token"]) == (False, True) and warnings == []
    assert "chat_template" not in kv and "pad_token_id" not in kv


@pytest.mark.parametrize("pre, name", [
    ({"type": "Sequence", "pretokenizers": [{"type": "Split", "pattern": {"Regex": "LLAMA3"}},
                                            {"type": "ByteLevel", "use_regex": False}]}, "llama-bpe"),
    ({"type": "Sequence", "pretokenizers": [{"type": "Split", "pattern": {"Regex": "QWEN2"}},
                                            {"type": "ByteLevel", "use_regex": False}]}, "qwen2"),
    ({"type": "ByteLevel"}, "gpt-2"),
    ({"type": "Sequence", "pretokenizers": [{"type": "ByteLevel", "use_regex": True}]}, "gpt-2"),
    ({"type": "ByteLevel", "use_regex": False}, "default"),
    ({"type": "Sequence", "pretokenizers": [{"type": "Split", "pattern": {"Regex": "\\s+"}},
                                            {"type": "ByteLevel", "use_regex": False}]}, "default"),
    ({"type": "Sequence", "pretokenizers": [{"type": "Split", "pattern": {"Regex": "LLAMA3"}},
                                            {"type": "Split", "pattern": {"Regex": "LLAMA3"}}]}, "default"),
    ({"type": "Sequence", "pretokenizers": [{"type": "Split", "pattern": {"String": " "}}]}, "default"),
])
def test_pre_tokenizer_names_are_llama_cpps(pre, name):
    """The split patterns of Llama 3 (`llama-bpe`) and Qwen2 (`\\p{N}` one digit at a time) by name;
    plain ByteLevel is GPT-2's; anything else llama.cpp's default, with a warning."""
    from conftest import recording_reporter

    from llmctl.core.export.vocab import _LLAMA3, PRE_TOKENIZERS, _byte_level_pre

    regex = {"LLAMA3": _LLAMA3, "QWEN2": _LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")}
    pre = json.loads(json.dumps(pre).replace('"LLAMA3"', json.dumps(regex["LLAMA3"])).replace(
        '"QWEN2"', json.dumps(regex["QWEN2"])))
    report = recording_reporter()
    assert _byte_level_pre(pre, report) == name
    assert report.seen == ([] if name != "default" else [
        "llama.cpp does not know this tokenizer's pre-tokenizer; it will split text with its default pattern, so "
        "some texts may tokenize differently"])
    # llama.cpp's own patterns (llama-vocab.cpp, LLAMA_VOCAB_PRE_TYPE_LLAMA3 / QWEN2)
    assert _LLAMA3 == ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}"
                       "| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
                       "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
    assert PRE_TOKENIZERS[regex["QWEN2"]] == "qwen2" and "\\p{N}|" in regex["QWEN2"]


def test_sentencepiece_style_bpe_scores_are_minus_the_first_merge_rank(tmp_path):
    """llama.cpp merges the best-scoring pair first: a token made by merge r scores −(r + 1), by its
    first merge when several make it; tokens no merge makes score 0; `<0xNN>` are byte tokens
    only with byte fallback; an `<unk>` is the unknown token; the space prefix is added."""
    from tokenizers import models, pre_tokenizers

    config = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}
    path = _tokenizer_dir(tmp_path / "t", models.BPE(unk_token="<unk>"), pre_tokenizers.Metaspace(),
                          specials=("<unk>", "<s>", "</s>"), config=config)
    data = json.loads((path / "tokenizer.json").read_text())
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    vocab = data["model"]["vocab"]
    again = next(f"{t[:k]} {t[k:]}" for m in merges for t in ["".join(m.split(" "))] for k in range(1, len(t))
                 if k != len(m.split(" ")[0]) and t[:k] in vocab and t[k:] in vocab
                 and f"{t[:k]} {t[k:]}" not in merges)
    merges.append(again)  # a later merge that makes a token an earlier one made
    data["model"]["merges"] = merges
    data["model"]["vocab"]["<0x41>"] = len(vocab)
    (path / "tokenizer.json").write_text(json.dumps(data))
    n = len(data["model"]["vocab"])
    kv, warnings, described = _vocab(path, n + 1)
    expected = [0.0] * (n + 1)
    for rank, m in reversed(list(enumerate(merges))):
        expected[vocab["".join(m.split(" "))]] = -float(rank + 1)
    assert kv["token_scores"] == expected and described == f"llama (SentencePiece-style BPE), {n} tokens"
    assert (kv["tokenizer_model"], kv["tokenizer_pre"], kv["add_space_prefix"]) == ("llama", "default", True)
    types = kv["token_types"]
    assert types[vocab["<unk>"]] == 2 and types[vocab["<0x41>"]] == 1 and types[n] == 5 and kv["unk_token_id"] == 0
    data["model"]["byte_fallback"] = True
    (path / "tokenizer.json").write_text(json.dumps(data))
    assert _vocab(path, n + 1)[0]["token_types"][vocab["<0x41>"]] == 6


def test_vocab_refusals_and_warnings(tmp_path):
    from tokenizers import models, normalizers, pre_tokenizers

    from llmctl.errors import UsageError

    byte_level = _tokenizer_dir(tmp_path / "b", models.BPE(), pre_tokenizers.ByteLevel(add_prefix_space=False),
                                normalizer=normalizers.NFKC())
    kv, warnings, _ = _vocab(byte_level, 400)
    assert warnings == ["llama.cpp does not apply the tokenizer's normalizer (NFKC); unnormalized text may tokenize "
                        "differently"]
    n = len(kv["token_list"]) - kv["token_types"].count(5)
    with pytest.raises(UsageError, match=rf"^the tokenizer has {n} tokens but the model only {n - 1} embedding rows$"):
        _vocab(byte_level, n - 1)
    assert len(_vocab(byte_level, n)[0]["token_list"]) == n
    word_level = _tokenizer_dir(tmp_path / "w", models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"),
                                pre_tokenizers.Whitespace())
    with pytest.raises(UsageError, match=r"^cannot export a WordLevel tokenizer with a Whitespace pre-tokenizer to "
                                         r"GGUF: llama\.cpp reads byte-level BPE, or Metaspace BPE and Unigram$"):
        _vocab(word_level, 10)
    (tmp_path / "none").mkdir()
    assert _vocab(tmp_path / "none", 10) == ({"tokenizer_model": "no_vocab"}, [
        "the checkpoint has no tokenizer: the GGUF file carries none (llama.cpp can then only run token ids)"], None)


def test_unigram_vocab_keeps_the_models_scores(tmp_path):
    """A Unigram (SentencePiece) tokenizer: llama.cpp's scores are the model's log-probabilities."""
    from tokenizers import models, pre_tokenizers

    pieces = [("<unk>", 0.0), ("<s>", 0.0), ("</s>", 0.0), ("\u2581the", -1.5), ("\u2581cat", -2.25), ("a", -3.0),
              ("t", -3.5), ("\u2581", -4.0), ("c", -4.5), ("h", -5.0), ("e", -5.5)]
    path = _tokenizer_dir(tmp_path / "u", models.Unigram(pieces, unk_id=0, byte_fallback=False),
                          pre_tokenizers.Metaspace(), config={"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"})
    kv, warnings, described = _vocab(path, len(pieces) + 2)
    assert kv["token_scores"] == [score for _, score in pieces] + [0.0, 0.0] and warnings == []
    assert kv["token_list"][:len(pieces)] == [p for p, _ in pieces] and kv["token_types"][0] == 2
    assert (kv["tokenizer_model"], kv["tokenizer_pre"]) == ("llama", "default")
    assert described == f"llama (SentencePiece-style Unigram), {len(pieces)} tokens"


def test_bos_and_eos_both_added_are_both_recorded(tmp_path):
    from tokenizers import models, pre_tokenizers, processors

    def post(tok):
        ids = [("<s>", tok.token_to_id("<s>")), ("</s>", tok.token_to_id("</s>"))]
        return processors.TemplateProcessing(single="<s> $A </s>", special_tokens=ids)

    path = _tokenizer_dir(tmp_path / "t", models.BPE(), pre_tokenizers.ByteLevel(add_prefix_space=False),
                          config={"bos_token": "<s>", "eos_token": "</s>"}, post=post)
    assert (_vocab(path, 400)[0]["add_bos_token"], _vocab(path, 400)[0]["add_eos_token"]) == (True, True)


def test_merges_serialized_as_strings_read_as_pairs(tmp_path, monkeypatch):
    """tokenizers < 0.20 (the declared range starts at 0.19) serializes a merge as "a b", not
    ["a", "b"]: both forms give the same GGUF merges and SentencePiece scores."""
    from tokenizers import models, pre_tokenizers

    from llmctl.core import tokenizer as tokenizer_module

    load = tokenizer_module.load_tokenizer

    class OldSerialization:
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def to_str(self):
            data = json.loads(self.inner.to_str())
            data["model"]["merges"] = [" ".join(m) for m in data["model"]["merges"]]
            return json.dumps(data)

    def old_load(path):
        tok = load(path)
        tok.inner = OldSerialization(tok.inner)
        return tok

    byte_level = _tokenizer_dir(tmp_path / "b", models.BPE(), pre_tokenizers.ByteLevel(add_prefix_space=False))
    metaspace = _tokenizer_dir(tmp_path / "m", models.BPE(unk_token="<unk>"), pre_tokenizers.Metaspace(),
                               specials=("<unk>", "<s>", "</s>"), config={"unk_token": "<unk>"})
    new = [_vocab(byte_level, 400)[0], _vocab(metaspace, 100)[0]]
    monkeypatch.setattr(tokenizer_module, "load_tokenizer", old_load)
    old = [_vocab(byte_level, 400)[0], _vocab(metaspace, 100)[0]]
    assert old[0]["token_merges"] == new[0]["token_merges"] and all(" " in m for m in old[0]["token_merges"])
    assert old[1]["token_scores"] == new[1]["token_scores"] and min(new[1]["token_scores"]) < -10


def test_tokenizers_llama_cpp_cannot_read_are_refused_naming_their_parts(tmp_path):
    from tokenizers import models, pre_tokenizers

    from llmctl.errors import UsageError

    def refusal(name, model, pre):
        with pytest.raises(UsageError) as caught:
            _vocab(_tokenizer_dir(tmp_path / name, model, pre), 10)
        return str(caught.value).split(" to GGUF")[0]

    word_level = lambda: models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")  # noqa: E731
    assert refusal("m", word_level(), pre_tokenizers.Metaspace()) == \
        "cannot export a WordLevel tokenizer with a Metaspace pre-tokenizer"
    assert refusal("s", word_level(), pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Digits()])) \
        == "cannot export a WordLevel tokenizer with a Digits/Whitespace pre-tokenizer"
    assert refusal("n", word_level(), None) == "cannot export a WordLevel tokenizer with a missing pre-tokenizer"
    assert refusal("e", models.WordLevel({}, unk_token="[UNK]"), pre_tokenizers.Whitespace()) == \
        "cannot export a WordLevel tokenizer with a Whitespace pre-tokenizer"


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_virtual_tokens_are_made_where_the_model_is(method):
    """On a model built on the meta device (as `load_model` builds, then assigns), the encoder is
    meta too: nothing allocated, and a checkpoint's tensors assigned later; recorded after the
    transforms before it (QLoRA's NF4 base)."""
    from llmctl.core.adapters.prompt import Prefix, Prompt

    from llmctl.core.quant.nf4 import NF4

    model = build_model(ModelConfig(vocab_size=64, hidden_size=32, num_kv_heads=2), [NF4()], device="meta")
    {"prefix": Prefix, "prompt": Prompt}[method](num_virtual_tokens=P).apply(model)
    weight = model.prompt_encoder.embedding.weight
    assert weight.is_meta and weight.shape == ((P, 2 * 2 * 2 * 8) if method == "prefix" else (P, 32))
    assert [t.name for t in model.transforms] == ["nf4", method]  # after the base's own
