"""Edges of the configuration and wiring modules found by mutation testing: `ModelConfig`'s
derived sizes (transformers' own rules) and every refusal, `layer(i)` and the architecture
views; `build_model`; training plans (`core/train/build.py`) and the settings they route to
the model; the quantize and prune runs (`core/quant/run.py`, `core/prune/run.py`)."""

from __future__ import annotations

import re

import pytest
import torch

from llmctl.core.model.config import ModelConfig
from llmctl.errors import ConfigError, UsageError


def _refused(message: str, **fields) -> None:
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        ModelConfig(**fields)


# --- ModelConfig -----------------------------------------------------------------------------------


def test_unset_sizes_follow_the_transformers_defaults():
    """None kv heads → MHA and head_dim = hidden // heads (LlamaConfig); intermediate → 4 × hidden
    (GPT-2's n_inner); an MoE's expert width → the dense width."""
    import transformers

    llama = transformers.LlamaConfig(hidden_size=48, num_attention_heads=6, num_key_value_heads=None)
    cfg = ModelConfig(hidden_size=48, num_heads=6)
    assert (cfg.num_kv_heads, cfg.head_dim) == (llama.num_key_value_heads, llama.head_dim) == (6, 8)
    assert cfg.intermediate_size == 4 * 48 and cfg.moe_intermediate_size is None  # no experts: left unset
    moe = ModelConfig(hidden_size=48, num_heads=6, intermediate_size=40, num_experts=4)
    assert moe.moe_intermediate_size == 40
    assert ModelConfig(num_experts=4, intermediate_size=40, moe_intermediate_size=24).moe_intermediate_size == 24
    given = ModelConfig(hidden_size=48, num_heads=6, num_kv_heads=2, head_dim=16, intermediate_size=100)
    assert (given.num_kv_heads, given.head_dim, given.intermediate_size) == (2, 16, 100)


@pytest.mark.parametrize("key", ["vocab_size", "hidden_size", "num_layers", "num_heads", "max_seq_len", "num_kv_heads",
                                 "head_dim", "intermediate_size"])
def test_every_size_is_bounded_to_1_through_2_to_the_31(key):
    base = dict(hidden_size=64, num_heads=4, num_kv_heads=1, head_dim=16, position="nope")
    for bad in (0, -1, 1 << 31):
        _refused(f"{key} must be in 1 … 2^31, got {bad}", **{**base, key: bad})
    top = (1 << 31) - 1
    if key in ("hidden_size", "num_heads", "num_kv_heads", "num_layers"):  # sizes the rules need real (layers: above)
        return
    assert getattr(ModelConfig(**{**base, key: top}), key) == top
    assert getattr(ModelConfig(**{**base, key: 1}), key) == 1


def test_a_deep_config_builds_no_list_per_layer():
    """Without per-layer sizes nothing is checked layer by layer: a config with 2^31 − 1 layers is
    made at once (it built two lists of num_layers entries: 16 GiB each there, 80 MB each for 10^7)."""
    import tracemalloc

    tracemalloc.start()
    try:
        cfg = ModelConfig(num_layers=10**7)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert cfg.num_layers == 10**7 and peak < 1 << 20


def test_each_refusal_names_its_sizes():
    _refused("hidden_size 50 is not divisible by num_heads 4; set head_dim", hidden_size=50)
    assert ModelConfig(hidden_size=50, head_dim=12).head_dim == 12  # an explicit head_dim is not checked against it
    _refused("num_heads 6 is not a multiple of num_kv_heads 4", hidden_size=48, num_heads=6, num_kv_heads=4)
    assert ModelConfig(hidden_size=48, num_heads=6, num_kv_heads=3).num_kv_heads == 3
    for k in (0, 5):
        _refused(f"experts_per_token {k} must be in 1..num_experts 4", num_experts=4, experts_per_token=k)
    assert ModelConfig(num_experts=4, experts_per_token=4).experts_per_token == 4
    assert ModelConfig(num_experts=0, experts_per_token=9).experts_per_token == 9  # dense: not used
    _refused("rope needs an even head_dim, got 15", head_dim=15)
    assert ModelConfig(head_dim=15, position="alibi").head_dim == 15
    _refused("sliding_window must be >= 1, got 0", sliding_window=0)
    assert ModelConfig(sliding_window=1).sliding_window == 1
    classifier = ("num_labels {}: a classifier needs num_labels >= 1 and its own score head (tie_embeddings false)")
    _refused(classifier.format(0), num_labels=0, tie_embeddings=False)
    _refused(classifier.format(2), num_labels=2)
    assert ModelConfig(num_labels=1, tie_embeddings=False).num_labels == 1
    _refused("multi-token-prediction heads need a causal model", is_causal=False, num_mtp_heads=1)
    assert ModelConfig(is_causal=False).num_mtp_heads == 0 and ModelConfig(num_mtp_heads=2).num_mtp_heads == 2


def test_per_layer_sizes_are_one_per_layer_and_keep_the_grouping():
    for key in ("layer_num_heads", "layer_num_kv_heads", "layer_intermediate_sizes"):
        for sizes in ([4], [4, 4, 4], [4, 0], [4, 1 << 31]):
            _refused(f"{key} must hold 2 sizes (one per layer) in 1 … 2^31, got {sizes}", num_kv_heads=1,
                     **{key: sizes})
    _refused("a layer's 3 heads are not a multiple of its 2 kv heads", num_kv_heads=1, layer_num_heads=[4, 3],
             layer_num_kv_heads=[2, 2])
    _refused("a layer's 3 heads are not a multiple of its 2 kv heads", num_kv_heads=2, layer_num_heads=[4, 3])
    _refused("a layer's 4 heads are not a multiple of its 3 kv heads", num_kv_heads=1, layer_num_kv_heads=[1, 3])
    cfg = ModelConfig(num_kv_heads=2, layer_num_heads=[4, 2], layer_num_kv_heads=[2, 1],
                      layer_intermediate_sizes=[(1 << 31) - 1, 7])
    first, second = cfg.layer(0), cfg.layer(1)
    assert (first.num_heads, first.num_kv_heads, first.intermediate_size) == (4, 2, (1 << 31) - 1)
    assert (second.num_heads, second.num_kv_heads, second.intermediate_size) == (2, 1, 7)
    assert (second.layer_num_heads, second.layer_num_kv_heads, second.layer_intermediate_sizes) == (None, None, None)
    assert second.hidden_size == cfg.hidden_size and second.head_dim == cfg.head_dim
    only = ModelConfig(layer_intermediate_sizes=[8, 9])
    assert (only.layer(1).intermediate_size, only.layer(1).num_heads, only.layer(1).num_kv_heads) == (9, 4, 4)
    plain = ModelConfig()
    assert plain.layer(1) is plain


def test_the_architecture_leaves_out_the_run_time_knobs_and_a_rotary_context():
    from dataclasses import fields

    cfg = ModelConfig(max_seq_len=128, rope_scaling={"rope_type": "linear", "factor": 2.0})
    runtime = {"attention_kernel", "embedding_dropout", "attention_dropout", "residual_dropout",
               "gradient_checkpointing", "initializer_range", "mtp_loss_weight", "router_aux_loss_coef",
               "hf_model_type"}
    everything = {f.name for f in fields(ModelConfig)}
    assert set(cfg.architecture()) == everything - runtime
    assert cfg.architecture()["max_seq_len"] == 128 and cfg.architecture()["hidden_size"] == 64
    assert set(cfg.weights_architecture()) == everything - runtime - {"max_seq_len", "rope_scaling"}
    learned = ModelConfig(position="learned", max_seq_len=128)
    assert learned.weights_architecture() == learned.architecture()  # a learned table has max_seq_len rows
    assert ModelConfig(max_seq_len=512, attention_dropout=0.1).weights_architecture() == \
        ModelConfig(max_seq_len=64).weights_architecture()


def test_a_config_round_trips_through_a_dict_and_refuses_unknown_keys():
    cfg = ModelConfig(num_layers=3, num_kv_heads=2, layer_num_heads=[4, 2, 4], eos_token_id=[1, 2])
    data = cfg.to_dict()
    assert data["layer_num_heads"] == [4, 2, 4] and data["num_kv_heads"] == 2 and data["head_dim"] == 16
    again = ModelConfig.from_dict(data)
    assert again == cfg
    data["layer_num_heads"].append(9)
    assert cfg.layer_num_heads == [4, 2, 4]  # from_dict and to_dict share no lists with the config
    with pytest.raises(ConfigError, match=r"^unknown config key 'num_head' \(did you mean 'num_heads'\?\)$"):
        ModelConfig.from_dict({"num_head": 4})


def test_presets_load_by_name_or_path_with_overrides(tmp_path):
    from llmctl.core.model.presets import load_preset

    nano = load_preset("nano")
    assert (nano.hidden_size, nano.num_kv_heads, nano.intermediate_size) == (64, 2, 192)
    assert load_preset("nano", ["num_layers=3", "position=alibi"]).num_layers == 3
    path = tmp_path / "mine.yaml"
    path.write_text("hidden_size: 32\nnum_heads: 2\n")
    mine = load_preset(path, ["vocab_size=99"])
    assert (mine.hidden_size, mine.num_heads, mine.vocab_size, mine.head_dim) == (32, 2, 99, 16)
    with pytest.raises(ConfigError, match="did you mean 'nano'"):
        load_preset("nanoo")


def test_build_model_applies_transforms_in_order_on_the_device_asked():
    from llmctl.core.model.build import build_model
    from llmctl.core.model.transforms import Transform

    seen = []

    class Mark(Transform):
        def __init__(self, tag):
            self.tag = tag

        def apply(self, model):
            seen.append((self.tag, model.model.embed_tokens.weight.device.type))
            return model

    cfg = ModelConfig(vocab_size=32, hidden_size=16, num_layers=1, num_heads=2, max_seq_len=16)
    meta = build_model(cfg, [Mark("a"), Mark("b")], device="meta")
    assert seen == [("a", "meta"), ("b", "meta")]
    assert {p.device.type for p in meta.parameters()} == {"meta"}
    torch.manual_seed(0)
    plain = build_model(cfg)
    torch.manual_seed(0)
    again = build_model(cfg, device="cpu")
    assert {p.device.type for p in plain.parameters()} == {"cpu"} and plain.cfg == cfg
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), again.state_dict().values()))


# --- training plans (core/train/build.py) ----------------------------------------------------------

TEXT = " ".join(f"word{i % 50} and some more text, number {i}." for i in range(400))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A character tokenizer (EOS/BOS 0, PAD 2), the text it was trained on and its token shards."""
    from llmctl.core.data import Corpus, encode_corpus
    from llmctl.core.tokenizer import TrainSpec, train_tokenizer

    root = tmp_path_factory.mktemp("plan")
    tok = train_tokenizer(TrainSpec(algo="char", vocab_size=80, special_tokens=["<|endoftext|>", "<|bos|>", "<|pad|>"]),
                          iter([[TEXT]]))
    tok.save(root / "tok")
    (root / "text.txt").write_text(TEXT, encoding="utf-8")
    (root / "shards").mkdir()
    encode_corpus(Corpus([str(root / "text.txt")]), tok, root / "shards", val_fraction=0.1)
    return {"root": root, "tok": root / "tok", "text": root / "text.txt", "shards": root / "shards",
            "vocab": tok.vocab_size}


def _cfg(data, /, **fields):
    from llmctl.core.train.config import TrainConfig

    context = {k: fields.pop(k) for k in ("max_seq_len", "rope_scaling") if k in fields}  # finetune's keys
    cfg = TrainConfig(**{"data": [str(data["shards"])], "seq_len": 32, "max_steps": 8, "warmup_steps": 2, **fields})
    for key, value in context.items():
        setattr(cfg, key, value)
    return cfg


def _plan(data, /, device="cpu", report=None, **fields):
    from llmctl.core.train.build import make_plan

    return make_plan(_cfg(data, **fields), device, *([report] if report else []))


def _refused_plan(message, data, /, **fields):
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        _plan(data, **fields)


def test_plan_numbers_are_checked_with_their_key(data):
    for key in ("batch_size", "seq_len", "grad_accum"):
        _refused_plan(f"config key '{key}': must be >= 1, got 0", data, **{key: 0})
    assert _plan(data, batch_size=1, seq_len=1, grad_accum=1).config.seq_len == 1
    _refused_plan("config key 'max_time': must be > 0 minutes, got 0", data, max_time=0)
    assert _plan(data, max_time=0.5).config.max_time == 0.5
    for key in ("max_steps", "warmup_steps", "save_every", "eval_every", "eval_batches", "grad_clip", "weight_decay"):
        _refused_plan(f"config key '{key}': must be >= 0, got -1", data, **{key: -1})
        assert getattr(_plan(data, **{key: 0}).config, key) == 0
    _refused_plan("config key 'lr': must be > 0, got 0", data, lr=0)
    _refused_plan("config key 'keep_last': must be >= 1, got 0", data, keep_last=0)
    assert _plan(data, keep_last=1).config.keep_last == 1
    for bad in (1, -0.1):
        _refused_plan(f"config key 'val_fraction': must be in [0, 1), got {bad}", data, val_fraction=bad)
    assert _plan(data, val_fraction=0).config.val_fraction == 0
    for key, bad, asks in [("log_every", 0, "must be >= 1"), ("dropout", 2.0, "must be in [0, 1)"),
                           ("seed", -1, "must be >= 0"), ("beta1", 2.0, "must be in [0, 1)"),
                           ("beta2", 1.0, "must be in [0, 1)"), ("eps", 0.0, "must be > 0"),
                           ("lr", float("nan"), "must be > 0"), ("lr", float("inf"), "must be > 0"),
                           ("weight_decay", float("nan"), "must be >= 0"), ("min_lr", float("nan"), "must be >= 0"),
                           ("grad_clip", float("nan"), "must be >= 0"), ("max_time", float("nan"), "must be > 0 minutes"),
                           ("mask_prob", 0.0, "must be in (0, 1)"), ("decay_fraction", 1.5, "must be in [0, 1]")]:
        _refused_plan(f"config key '{key}': {asks}, got {bad}", data, **{key: bad})
    assert _plan(data, dropout=0.0, seed=0, log_every=1).config.dropout == 0.0
    with pytest.raises(UsageError, match=r"^unknown LR schedule 'cosin' \(did you mean 'cosine'\?\); choose from: "):
        _plan(data, schedule="cosin")


def test_precision_names_and_auto(data, monkeypatch):
    assert _plan(data).precision == "float32"  # auto on CPU
    for name, want in (("fp32", "float32"), ("float32", "float32"), ("bf16", "bfloat16"), ("bfloat16", "bfloat16")):
        assert _plan(data, precision=name).precision == want
    for name in ("fp16", "float16"):
        _refused_plan("config key 'precision': fp16 needs CUDA (it trains with a grad scaler); use bf16 on CPU", data,
                      precision=name)
        assert _plan(data, "cuda", precision=name).precision == "float16"
    for supported, want in ((True, "bfloat16"), (False, "float32")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda supported=supported: supported)
        assert _plan(data, "cuda").precision == want
        assert _plan(data, "cpu").precision == "float32"


def test_a_preset_takes_the_datas_vocabulary_and_special_ids(data):
    from llmctl.core.data.shards import TokenShards

    manifest = TokenShards(data["shards"]).manifest
    plan = _plan(data)
    mc = plan.model_config
    assert (mc.vocab_size, mc.eos_token_id, mc.bos_token_id) == (manifest["vocab_size"], manifest.get("eos_id"),
                                                                 manifest.get("bos_id"))
    assert mc.vocab_size == data["vocab"] and mc.pad_token_id == 2 and mc.hidden_size == 64  # nano
    assert plan.tokenizer_dir is not None and plan.tokenizer.vocab_size == data["vocab"]  # the shards' own
    assert plan.init_from is None and plan.parents == [] and plan.objective == "causal"
    text = _plan(data, data=[str(data["text"])], tokenizer=str(data["tok"]))
    assert (text.model_config.vocab_size, text.model_config.pad_token_id) == (data["vocab"], 2)
    assert text.text_files == [data["text"]] and text.shards is None and text.tokenizer_dir == data["tok"]
    assert _plan(data, model_args={"vocab_size": 100, "num_layers": 3}).model_config.num_layers == 3
    assert _plan(data, model_args={"vocab_size": data["vocab"]}).model_config.vocab_size == data["vocab"]
    assert _plan(data, model_args={"vocab_size": 100}).model_config.vocab_size == 100
    _refused_plan(f"config key 'model_args.vocab_size': {data['vocab'] - 1} is smaller than the data's tokenizer "
                  f"({data['vocab']} tokens); leave it out to use the tokenizer's size", data,
                  model_args={"vocab_size": data["vocab"] - 1})
    assert _plan(data, model_args={"num_mtp_heads": 1}).objective == "mtp"  # auto: by the model's kind
    assert _plan(data, model_args={"num_mtp_heads": 1}, objective="causal").objective == "causal"


def test_a_checkpoint_starts_the_run_with_its_own_tokenizer(data, tmp_path):
    from llmctl.core.model.build import build_model
    from llmctl.core.model.io import save_model

    cfg = ModelConfig(vocab_size=data["vocab"] + 5, hidden_size=16, num_layers=1, num_heads=2, max_seq_len=64)
    ckpt = save_model(build_model(cfg), tmp_path / "ckpt", tokenizer_dir=data["tok"]) or tmp_path / "ckpt"
    plan = _plan(data, model=str(ckpt), data=[str(data["text"])])
    assert plan.init_from == ckpt and plan.parents == [str(ckpt)] and plan.tokenizer_dir == ckpt
    assert plan.model_config.vocab_size == data["vocab"] + 5 and plan.model_config.hidden_size == 16
    _refused_plan(f"config key 'model_args': applies to presets only, not to checkpoint {ckpt}", data, model=str(ckpt),
                  model_args={"num_layers": 2})
    small = ModelConfig(vocab_size=data["vocab"] - 1, hidden_size=16, num_layers=1, num_heads=2, max_seq_len=64)
    save_model(build_model(small), tmp_path / "small")
    _refused_plan(f"config key 'data': its tokenizer has {data['vocab']} tokens but model {tmp_path / 'small'} has "
                  f"vocab_size {data['vocab'] - 1}; tokenize with the model's tokenizer", data, model=str(tmp_path / "small"))
    _refused_plan("config key 'tokenizer': raw text data needs a tokenizer (tokenizer=DIR)", data,
                  model=str(tmp_path / "small"), data=[str(data["text"])])  # a checkpoint without one
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="^config key 'model': "):
        _plan(data, model=str(tmp_path / "empty"))


def test_tokenizer_and_data_refusals(data, tmp_path):
    missing = tmp_path / "nothing"
    _refused_plan(f"config key 'tokenizer': {missing} does not exist", data, tokenizer=str(missing))
    (tmp_path / "notatok").mkdir()
    with pytest.raises(ConfigError, match="^config key 'tokenizer': "):
        _plan(data, tokenizer=str(tmp_path / "notatok"))
    _refused_plan("config key 'data': no training data given (a token-shard directory or text files)", data, data=[])
    _refused_plan(f"config key 'data': {missing} does not exist", data, data=[str(data["text"]), str(missing)])
    from llmctl.core.data.shards import TokenShards

    longest = max(s["tokens"] for s in TokenShards(data["shards"]).manifest["splits"]["train"]["shards"])
    _refused_plan(f"config key 'data': {data['shards']} has no train shard longer than seq_len={longest} tokens "
                  f"(longest: {longest})", data, seq_len=longest)
    (tmp_path / "docs" / "deep").mkdir(parents=True)
    for name in ("b.txt", "a.md", "deep/c.text", "skip.json", "deep/skip.bin"):
        (tmp_path / "docs" / name).write_text(TEXT[:500])
    plan = _plan(data, data=[str(tmp_path / "docs")], tokenizer=str(data["tok"]), val_data=[str(data["text"])])
    assert plan.text_files == [tmp_path / "docs" / n for n in ("a.md", "b.txt", "deep/c.text")]
    assert plan.val_files == [data["text"]]
    both = _plan(data, data=[str(tmp_path / "docs" / "deep"), str(tmp_path / "docs")], tokenizer=str(data["tok"]))
    assert both.text_files == [tmp_path / "docs" / n for n in ("deep/c.text", "a.md", "b.txt", "deep/c.text")]
    assert _plan(data, data=[str(data["text"])], tokenizer=str(data["tok"])).val_files == []
    (tmp_path / "none").mkdir()
    (tmp_path / "none" / "x.json").write_text("{}")
    _refused_plan(f"config key 'data': {tmp_path / 'none'} has no manifest.json and no .txt/.md files", data,
                  data=[str(tmp_path / "none")], tokenizer=str(data["tok"]))
    (tmp_path / "e1.txt").write_text("")
    (tmp_path / "e2.txt").write_text("")
    _refused_plan(f"config key 'data': {tmp_path / 'e1.txt'}, {tmp_path / 'e2.txt'} is empty", data,
                  data=[str(tmp_path / "e1.txt"), str(tmp_path / "e2.txt")], tokenizer=str(data["tok"]))
    assert _plan(data, data=[str(tmp_path / "e1.txt"), str(data["text"])], tokenizer=str(data["tok"])).text_files


def test_shards_with_ids_past_their_stated_vocabulary_are_refused(data, tmp_path):
    import json
    import shutil

    shutil.copytree(data["shards"], tmp_path / "s")
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    manifest["vocab_size"] = 3
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match=rf"^config key 'data': {re.escape(str(tmp_path / 's'))} holds token id \d+, "
                                          r"outside the model's vocabulary "
                                          r"of 3; re-encode it with the model's tokenizer$"):
        _plan(data, data=[str(tmp_path / "s")])
    manifest["splits"]["train"]["tokens"] = 0
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(manifest))
    _refused_plan(f"config key 'data': {tmp_path / 's'} has an empty train split", data, data=[str(tmp_path / "s")])
    del manifest["splits"]["train"]
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(manifest))
    _refused_plan(f"config key 'data': {tmp_path / 's'} has an empty train split", data, data=[str(tmp_path / "s")])
    (tmp_path / "s" / "manifest.json").write_text("{")
    with pytest.raises(ConfigError, match=f"^config key 'data': {re.escape(str(tmp_path / 's' / 'manifest.json'))}: "
                                          "unreadable manifest"):
        _plan(data, data=[str(tmp_path / "s")])


def test_a_rotary_models_context_is_set_by_the_finetune_keys(data):
    plan = _plan(data, max_seq_len=512, seq_len=300)
    assert plan.model_config.max_seq_len == 512 and plan.model_config.rope_scaling is None
    _refused_plan("config key 'seq_len': 300 exceeds the context of model nano (max_seq_len 256)", data, seq_len=300)
    assert _plan(data, seq_len=256).model_config.max_seq_len == 256  # the whole context is allowed
    scaled = _plan(data, rope_scaling={"type": "linear", "factor": 2.0}).model_config
    assert scaled.rope_scaling == {"factor": 2.0, "rope_type": "linear"} and scaled.max_seq_len == 256
    yarn = _plan(data, rope_scaling={"rope_type": "yarn", "factor": 4.0}).model_config
    assert yarn.rope_scaling == {"rope_type": "yarn", "factor": 4.0}
    with pytest.raises(UsageError, match="^unknown .*'linea'"):
        _plan(data, rope_scaling={"type": "linea", "factor": 2.0})
    for key, value in (("max_seq_len", 512), ("rope_scaling", {"type": "linear", "factor": 2.0})):
        _refused_plan(f"config key '{key}': only a rotary (rope) model's context can be changed, not learned", data,
                      model_args={"position": "learned"}, **{key: value})
    assert _plan(data, model_args={"position": "learned"}).model_config.max_seq_len == 256


def test_training_settings_reach_the_model_config(data):
    mc = _plan(data).model_config
    assert (mc.gradient_checkpointing, mc.embedding_dropout, mc.attention_dropout, mc.residual_dropout,
            mc.mtp_loss_weight) == (False, 0.0, 0.0, 0.0, 0.3)
    mc = _plan(data, gradient_checkpointing=True, dropout=0.25, mtp_weight=0.5).model_config
    assert (mc.gradient_checkpointing, mc.embedding_dropout, mc.attention_dropout, mc.residual_dropout,
            mc.mtp_loss_weight) == (True, 0.25, 0.25, 0.25, 0.5)


def test_a_warmup_longer_than_the_run_is_warned_about(data):
    from _recorder import Recorder

    def warnings(**fields):
        report = Recorder()
        assert _plan(data, report=report, **fields).report is report  # where the run reports, later too
        return report.messages()

    assert warnings(max_steps=5, warmup_steps=10) == [
        ("warn", "warmup_steps=10 is longer than max_steps=5: lr never reaches 0.0003")]
    assert warnings(max_steps=1, warmup_steps=2) == [
        ("warn", "warmup_steps=2 is longer than max_steps=1: lr never reaches 0.0003")]
    assert warnings(max_steps=10, warmup_steps=10) == []
    assert warnings(max_steps=0, warmup_steps=10) == []
    assert warnings(max_steps=5, warmup_steps=10, max_time=1.0) == []


# --- the quantize and prune runs (core/quant/run.py, core/prune/run.py, core/prune/base.py) -------

WORDS = "the quick brown fox jumps over a lazy dog while seven cats sleep under warm red roofs".split()


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny Hugging Face Llama (2 blocks, 4 heads in 2 KV groups, context 64) with its tokenizer and
    generation config, and text to calibrate on."""
    import random

    from conftest import tiny_llama

    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(40)) for _ in range(60)]
    root = tmp_path_factory.mktemp("runs")
    (root / "base").mkdir()
    tiny_llama(root / "base", texts, vocab=200, context=64, scale=1.0)
    (root / "text.txt").write_text("\n\n".join(texts))
    return root / "base", root / "text.txt"


def _numels(path, prefix=""):
    from safetensors import safe_open

    counts = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for name in f.keys():
                if name.startswith(prefix):
                    counts[name] = f.get_tensor(name)
    return counts


def test_quantize_records_what_it_did_and_copies_the_checkpoints_files(llama, tmp_path):
    import json

    import transformers

    from _recorder import Recorder
    from llmctl.core.quant.config import QuantizeConfig
    from llmctl.core.quant.run import run_quantize

    base, text = llama
    import time

    import resource

    report = Recorder()
    low = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB → MiB
    start = time.perf_counter()
    result = run_quantize(base, tmp_path / "q", QuantizeConfig(method="int4", bits=4, group_size=16), [str(text)],
                          report=report)
    took = time.perf_counter() - start
    assert low <= result["peak_rss_mb"] <= resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    assert report.messages() == [("warn", "--method int4 is round-to-nearest: --calibration is not used")]
    blocks = transformers.LlamaForCausalLM(transformers.AutoConfig.from_pretrained(base)).model.layers
    linears = sum(isinstance(m, torch.nn.Linear) for m in blocks.modules())
    assert ("progress", "quantize int4", linears, "linear") in report.steps() and linears == 14  # the method's bar
    assert 0 < result["seconds"] <= took and result["quantization"]["seconds"] == round(result["seconds"], 2)
    q = result["quantization"]
    norms = sum(isinstance(m, transformers.models.llama.modeling_llama.LlamaRMSNorm)
                for m in transformers.LlamaForCausalLM(transformers.AutoConfig.from_pretrained(base)).modules())
    assert q["unquantized"] == ["model.embed_tokens", "lm_head", f"{norms} norm/other modules"] and norms == 5
    hf = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert q["format"] == f"{hf['quant_method']} {hf['config_groups']['group_0']['format']}"
    assert (q["method"], q["bits"], q["group_size"], q["symmetric"]) == ("int4", 4, 16, True) and "calibration" not in q
    lineage = json.loads((tmp_path / "q" / "llmctl.json").read_text())
    assert lineage["command"] == "quantize" and lineage["config"]["group_size"] == 16
    assert lineage["parents"][0]["path"] == str(base) and q["error"]["linears"] == linears
    assert lineage["quantization"]["unquantized"] == q["unquantized"] and lineage["quantization"]["bits"] == 4
    assert json.loads((tmp_path / "q" / "generation_config.json").read_text())["eos_token_id"] == \
        json.loads((base / "generation_config.json").read_text())["eos_token_id"]
    assert (tmp_path / "q" / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()
    size = sum(f.stat().st_size for f in (tmp_path / "q").iterdir() if f.suffix in (".safetensors", ".bin"))
    assert result["size_mb"] == size / 1e6 and result["input_size_mb"] == (base / "model.safetensors").stat().st_size / 1e6
    assert result["output"] == str(tmp_path / "q")
    assert (tmp_path / "q" / "model.safetensors").is_file()
    quiet = Recorder()
    run_quantize(base, tmp_path / "q8", QuantizeConfig(), [], report=quiet)
    assert quiet.messages() == []


def test_quantize_sizes_count_only_the_weights_it_reads(llama, tmp_path):
    """A Hugging Face repository often ships `pytorch_model.bin` beside the safetensors; llmctl
    never loads (unpickles) it, so it is not part of the input's size."""
    import shutil

    from llmctl.core.quant.config import QuantizeConfig
    from llmctl.core.quant.run import run_quantize

    base, _ = llama
    shutil.copytree(base, tmp_path / "both")
    (tmp_path / "both" / "pytorch_model.bin").write_bytes(b"\0" * 100_000)
    result = run_quantize(tmp_path / "both", tmp_path / "q", QuantizeConfig(), [])
    assert result["input_size_mb"] == (base / "model.safetensors").stat().st_size / 1e6


def test_quantize_loads_on_the_device_asked_after_checking_the_output(llama, tmp_path, monkeypatch):
    import shutil

    import llmctl.core.model.io as io
    from llmctl.core.quant.config import QuantizeConfig
    from llmctl.core.quant.run import run_quantize
    from llmctl.runtime import options

    base, text = llama
    devices, load = [], io.load_model

    def recording(path, **kwargs):
        devices.append(kwargs.get("device", "absent"))
        return load(path, **kwargs)

    monkeypatch.setattr(io, "load_model", recording)
    monkeypatch.setattr(options, "device", "cuda:7")  # what a missing --device would resolve
    run_quantize(base, tmp_path / "q", QuantizeConfig(), [], device="cpu")
    assert devices == [torch.device("cpu")]
    shutil.copy(text, tmp_path / "q" / "calib.txt")  # an input inside the quantized output
    with pytest.raises(UsageError, match=r"^--force will not replace .*: it holds the input .*calib.txt; choose another "
                                         r"output path$"):
        run_quantize(base, tmp_path / "q", QuantizeConfig(method="gptq", bits=4), [str(tmp_path / "q" / "calib.txt")],
                     force=True, device="cpu")
    assert devices == [torch.device("cpu")]  # refused before the model was loaded
    with pytest.raises(UsageError, match=r"already exists \(use --force to replace it\)$"):
        run_quantize(base, tmp_path / "q", QuantizeConfig(), [], device="cpu")  # force is off by default


def test_quantize_refusals_and_its_outputs(llama, tmp_path):
    import json
    import shutil

    from llmctl.core.outputs import OUTPUT_KINDS
    from llmctl.core.quant.config import QuantizeConfig
    from llmctl.core.quant.run import run_quantize

    base, text = llama
    with pytest.raises(UsageError, match=r"^--method gptq needs --calibration text \(a .txt/.jsonl file, a directory or "
                                         r"a glob\)$"):
        run_quantize(base, tmp_path / "g", QuantizeConfig(method="gptq", bits=4), [])
    with pytest.raises(UsageError, match="^--seq-len 65 exceeds the model's context of 64$"):
        run_quantize(base, tmp_path / "g", QuantizeConfig(method="gptq", bits=4, seq_len=65), [str(text)])
    shutil.copytree(base, tmp_path / "adapted")
    (tmp_path / "adapted" / "llmctl.json").write_text(json.dumps({"command": "finetune", "transforms": [{"name": "x"}]}))
    with pytest.raises(UsageError, match=r"is already transformed \(quantized or adapted\); quantize its float base$"):
        run_quantize(tmp_path / "adapted", tmp_path / "a", QuantizeConfig(), [])
    assert not (tmp_path / "g").exists() and not (tmp_path / "a").exists()
    shutil.copytree(base, tmp_path / "bare", ignore=shutil.ignore_patterns("tokenizer*"))
    run_quantize(tmp_path / "bare", tmp_path / "q", QuantizeConfig(), [])
    assert not (tmp_path / "q" / "tokenizer.json").exists()
    from llmctl.core.quant.run import unquantized

    assert unquantized(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())) == ["0"]  # no "0 norm/other"
    is_quantized = OUTPUT_KINDS.get("quantized")
    assert is_quantized(tmp_path / "q") and not is_quantized(base)
    run_quantize(tmp_path / "bare", tmp_path / "q", QuantizeConfig(bits=8), [], force=True)  # replaces its own kind
    shutil.copytree(tmp_path / "q", tmp_path / "hf", ignore=shutil.ignore_patterns("llmctl.json"))  # as HF writes it
    with pytest.raises(UsageError, match=r"is already transformed \(quantized or adapted\); quantize its float base$"):
        run_quantize(tmp_path / "hf", tmp_path / "a", QuantizeConfig(), [])
    for lineage in ('{"command": "prune"}', '["quantize"]', "{", None):
        other = tmp_path / f"other{len(str(lineage))}"
        shutil.copytree(tmp_path / "q", other)
        if lineage is None:
            (other / "config.json").unlink()
        else:
            (other / "llmctl.json").write_text(lineage)
        assert not is_quantized(other), lineage


def test_quantize_seed_draws_the_calibration_windows(llama, tmp_path):
    from llmctl.core.quant.config import QuantizeConfig
    from llmctl.core.quant.run import run_quantize

    base, text = llama
    cfg = QuantizeConfig(method="gptq", bits=4, group_size=16, samples=2, seq_len=64)  # the whole context
    drawn = {seed: run_quantize(base, tmp_path / str(seed), cfg, [str(text)], seed=seed)["quantization"]["calibration"]
             for seed in (None, 0, 3)}
    assert drawn[None]["sha256"] == drawn[0]["sha256"] != drawn[3]["sha256"]
    assert drawn[None]["seed"] == drawn[0]["seed"] == 0  # no --seed: seed 0
    assert (drawn[3]["samples"], drawn[3]["seq_len"], drawn[3]["seed"]) == (2, 64, 3)


def test_prune_measures_its_sparsity_and_records_the_run(llama, tmp_path):
    import json

    from llmctl.core.prune.config import PruneConfig
    from llmctl.core.prune.run import prune_checkpoint

    base, text = llama
    settings = PruneConfig(method="wanda", sparsity=0.3, calibration=[str(text)], samples=3, seq_len=100)
    result = prune_checkpoint(base, settings, tmp_path / "w")
    out = _numels(tmp_path / "w", "model.layers.")
    linear = [t for n, t in out.items() if n.endswith("proj.weight")]
    zeros = sum(int((t == 0).sum()) for t in linear) / sum(t.numel() for t in linear)
    assert result["sparsity"]["achieved"] == pytest.approx(zeros) and zeros == pytest.approx(0.3, abs=0.02)
    assert (result["sparsity"]["method"], result["sparsity"]["sparsity"], result["sparsity"]["pattern"]) == \
        ("wanda", 0.3, None)
    calibration = {"files": [str(text.resolve())], "samples": 3, "seq_len": 64}  # the model's context, at most
    assert result["calibration"] == calibration and result["model_type"] == "llama"
    lineage = json.loads((tmp_path / "w" / "llmctl.json").read_text())
    assert lineage["calibration"] == calibration and lineage["config"]["seq_len"] == 100
    assert lineage["sparsity"] == {"method": "wanda", "sparsity": 0.3, "achieved": pytest.approx(zeros)}
    assert lineage["parents"][0]["path"] == str(base)
    assert (tmp_path / "w" / "tokenizer.json").is_file() and (tmp_path / "w" / "generation_config.json").is_file()
    for i, row in enumerate(result["layers"]["after"]):
        block = {n: t for n, t in out.items() if n.startswith(f"model.layers.{i}.")}
        weights = [t for n, t in block.items() if n.endswith("proj.weight")]
        assert row == {"layer": i, "parameters": sum(t.numel() for t in block.values()), "heads": 4, "kv_heads": 2,
                       "intermediate_size": 64,
                       "sparsity": pytest.approx(sum(int((t == 0).sum()) for t in weights) /
                                                 sum(t.numel() for t in weights))}
    assert [r["sparsity"] for r in result["layers"]["before"]] == [0.0, 0.0]
    nm = prune_checkpoint(base, PruneConfig(method="magnitude", pattern="2:4"), tmp_path / "nm")
    assert nm["sparsity"]["sparsity"] is None and nm["sparsity"]["pattern"] == "2:4" and nm["calibration"] is None
    nm_lineage = json.loads((tmp_path / "nm" / "llmctl.json").read_text())
    assert "sparsity" not in nm_lineage["sparsity"] and "calibration" not in nm_lineage
    assert result["output"] == str(tmp_path / "w") and nm["output"] == str(tmp_path / "nm")
    with pytest.raises(UsageError, match="already exists"):  # force is off by default
        prune_checkpoint(base, PruneConfig(method="magnitude", pattern="2:4"), tmp_path / "nm")


def test_prune_loads_on_the_device_asked_and_reports_its_progress(llama, tmp_path, monkeypatch):
    import resource
    import shutil
    import time

    import llmctl.core.model.io as io
    from _recorder import Recorder
    from llmctl.core.prune.config import PruneConfig
    from llmctl.core.prune.run import prune_checkpoint

    base, _ = llama
    shutil.copytree(base, tmp_path / "bare", ignore=shutil.ignore_patterns("tokenizer*"))  # magnitude needs none
    devices, load = [], io.load_model

    def recording(path, **kwargs):
        devices.append(kwargs.get("device", "absent"))
        return load(path, **kwargs)

    monkeypatch.setattr(io, "load_model", recording)
    report = Recorder()
    low = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    result = prune_checkpoint(tmp_path / "bare", PruneConfig(sparsity=0.5), tmp_path / "m", report=report)
    took = time.perf_counter() - start
    high = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # ru_maxrss is in KiB on Linux
    assert devices == ["cpu"] and ("progress", "prune", 14, "module") in report.steps()  # 7 linears × 2 blocks
    assert 0 < result["seconds"] <= took and low <= result["peak_rss_bytes"] <= high
    assert not (tmp_path / "m" / "tokenizer.json").exists()


def test_structured_prune_reports_the_parameters_removed(llama, tmp_path):
    from llmctl.core.prune.config import PruneConfig
    from llmctl.core.prune.run import prune_checkpoint

    base, text = llama
    result = prune_checkpoint(base, PruneConfig(method="heads", sparsity=0.5, calibration=[str(text)], samples=2,
                                                seq_len=16, eval_data=[str(text)]), tmp_path / "h")
    before, after = _numels(base), _numels(tmp_path / "h")
    total = sum(t.numel() for t in before.values())
    assert result["parameters"] == {"before": total, "after": sum(t.numel() for t in after.values())}
    assert result["sparsity"]["parameters_removed"] == pytest.approx(1 - result["parameters"]["after"] / total)
    assert "achieved" not in result["sparsity"] and result["sparsity"]["parameters_removed"] > 0
    assert [(r["heads"], r["kv_heads"]) for r in result["layers"]["after"]] == [(2, 1), (2, 1)]
    ppl = result["perplexity"]
    assert ppl["before"] > 1 and ppl["after"] > 1 and ppl["before"] != ppl["after"]
    layers = PruneConfig(method="layers", sparsity=0.5, calibration=[str(text)], samples=2, seq_len=16)
    assert prune_checkpoint(base, layers, tmp_path / "l")["perplexity"] is None
    ranked = PruneConfig(method="channels", sparsity=0.25, uniform=False, calibration=[str(text)], samples=2, seq_len=16)
    rows = prune_checkpoint(base, ranked, tmp_path / "c")["layers"]["after"]
    widths = _numels(tmp_path / "c")
    assert [r["intermediate_size"] for r in rows] == [widths[f"model.layers.{i}.mlp.up_proj.weight"].shape[0]
                                                      for i in range(2)]


def test_prune_refusals(llama, tmp_path):
    import shutil

    from llmctl.core.prune.config import PruneConfig
    from llmctl.core.prune.run import prune_checkpoint

    base, text = llama

    def refused(message, **settings):
        with pytest.raises(UsageError, match=f"^{re.escape(message)}$"):
            prune_checkpoint(base, PruneConfig(**settings), tmp_path / "out")
        assert not (tmp_path / "out").exists()

    refused("--method sparsegpt needs calibration text (--calibration FILE)", method="sparsegpt")
    refused("samples and seq_len must be >= 1 and >= 2, got 0 and 16", samples=0, seq_len=16)
    refused("samples and seq_len must be >= 1 and >= 2, got 1 and 1", samples=1, seq_len=1)
    for bad in (-0.1, 1.0):
        refused(f"--sparsity must be in [0, 1), got {bad}", sparsity=bad)
    refused("--pattern is for unstructured methods, not channels", method="channels", pattern="2:4",
            calibration=[str(text)])
    from llmctl.core.prune import PRUNERS

    for method in ("heads", "channels", "layers"):  # the structured methods' own range: Pruner.check
        for bad in (-0.1, 1.0, 1.5):
            with pytest.raises(UsageError, match=rf"^--sparsity must be in \[0, 1\), got {bad}$"):
                PRUNERS.get(method)(PruneConfig(method=method, sparsity=bad))
        assert PRUNERS.get(method)(PruneConfig(method=method, sparsity=0.0)).settings.sparsity == 0.0
    assert prune_checkpoint(base, PruneConfig(sparsity=0.0, samples=1, seq_len=2), tmp_path / "z")["sparsity"][
        "achieved"] == 0.0
    from llmctl.core.quant.config import QuantizeConfig
    from llmctl.core.quant.run import run_quantize

    run_quantize(base, tmp_path / "q", QuantizeConfig(), [])
    with pytest.raises(UsageError, match=r"^the model has module transforms \(pack-quantized\); prune a dense checkpoint$"):
        prune_checkpoint(tmp_path / "q", PruneConfig(), tmp_path / "out")
    from types import SimpleNamespace

    two = SimpleNamespace(transforms=[SimpleNamespace(name="lora"), SimpleNamespace(name="nf4")])
    with pytest.raises(UsageError, match=r"^the model has module transforms \(lora, nf4\); prune a dense checkpoint$"):
        PRUNERS.get("magnitude")(PruneConfig()).check_model(two)
    shutil.rmtree(tmp_path / "q")


def test_partial_rotary_and_parallel_residual_refusals():
    _refused("partial_rotary_factor must be in (0, 1], got 0.0", partial_rotary_factor=0.0)
    _refused("rope needs an even number of rotary dims, got 3 (head_dim 16 × partial_rotary_factor 0.2)",
             hidden_size=64, num_heads=4, partial_rotary_factor=0.2)
    _refused("residual 'parallel' needs norm_placement 'pre'", residual="parallel", norm_placement="post")
    assert ModelConfig(hidden_size=64, num_heads=4, partial_rotary_factor=0.25).rotary_dim == 4
