"""Each option of the model-changing commands that changes the math has a test that fails when
the option is ignored (issue: tests that catch real bugs). Every test here was checked by
planting "the option is ignored" in a copy of the code (docs/testing.md lists the plants)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from conftest import tiny_llama  # noqa: E402
from llmctl.core.model.io import load_model  # noqa: E402

TEXT = ("The quick brown fox jumps over the lazy dog. A cat sat on the mat and looked at the birds. "
        "Hello world, this is a small calibration text about animals, numbers 1 2 3 and colours.\n\n")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("base"), [TEXT] * 20, vocab=300, context=128, scale=1.0)


# --- quantize -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def calibration():
    return torch.randint(3, 250, (8, 32), generator=torch.Generator().manual_seed(0))


def _quantized(base, calibration, method: str, **options) -> dict[str, torch.Tensor]:
    """Dequantized weights of every quantized linear after `method` with `section.key=value` options."""
    from llmctl.core.quant.config import QuantizeConfig
    from llmctl.core.quant.linear import PackedLinear
    from llmctl.core.quant.methods import quantize_model

    cfg = QuantizeConfig(method=method, bits=4, group_size=16)
    for key, value in options.items():
        section, _, name = key.rpartition("__")
        setattr(getattr(cfg, section) if section else cfg, name, value)
    model, _ = load_model(base)
    quantize_model(model, cfg, calibration)
    return {p: m.dequantize(torch.float32) for p, m in model.named_modules() if isinstance(m, PackedLinear)}


def _max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def defaults(base, calibration):
    return {m: _quantized(base, calibration, m) for m in ("gptq", "awq")}


@pytest.mark.parametrize("method, options", [
    ("gptq", {"gptq__damp": 1.0}),
    ("gptq", {"gptq__act_order": True}),
    ("gptq", {"gptq__true_sequential": False}),
    ("awq", {"awq__grid": 3}),
    ("awq", {"awq__duo_scaling": False}),
    ("awq", {"awq__clip": False}),
    ("awq", {"awq__clip_grid": 100}),  # finer shrink steps
    ("awq", {"awq__max_shrink": 0.05}),  # one step: no shrink
    ("awq", {"awq__clip_tokens": 4}),
], ids=lambda v: next(iter(v)) if isinstance(v, dict) else v)
def test_each_calibrated_option_reaches_the_solver(base, calibration, defaults, method, options):
    changed = _quantized(base, calibration, method, **options)
    assert _max_difference(changed, defaults[method]) > 1e-4


def test_gptq_block_size_is_only_a_schedule(base, calibration, defaults):
    """Lazy batch updates are exact: any block size gives the first block the same weights up to
    float rounding (later blocks see inputs that rounding may have moved across a grid boundary)."""
    other = _quantized(base, calibration, "gptq", gptq__block_size=32)
    first = [k for k in other if k.startswith("model.layers.0.")]
    assert max((other[k] - defaults["gptq"][k]).abs().max().item() for k in first) < 1e-6


def test_awq_clipping_never_raises_the_error_it_searches_over(base, calibration):
    """The clip search starts at no shrink, so each group's error on the clip tokens can only fall."""
    from llmctl.core.quant.awq import search_clip
    from llmctl.core.quant.config import AWQConfig
    from llmctl.core.quant.scheme import Scheme

    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(64, 32, generator=g), torch.randn(8, 32, generator=g)
    w[:, 3] *= 10  # an outlier column a clipped range trades off
    scheme = Scheme(bits=4, group_size=16)
    clipped = search_clip(x, w, scheme, AWQConfig(clip_grid=10, max_shrink=0.5))
    assert not torch.equal(clipped, w)
    error = [(x @ (scheme.fake(v) - w).T).pow(2).mean().item() for v in (clipped, w)]
    assert error[0] < error[1]


def test_ignore_keeps_the_named_linears_in_float(base):
    from llmctl.core.quant.config import QuantizeConfig
    from llmctl.core.quant.linear import PackedLinear
    from llmctl.core.quant.methods import quantize_model

    model, _ = load_model(base)
    dense = model.model.layers[0].mlp.down_proj.weight.clone()
    quantize_model(model, QuantizeConfig(method="int8", ignore=["lm_head", "re:.*down_proj$"]))
    assert isinstance(model.model.layers[0].mlp.up_proj, PackedLinear)
    assert all(type(layer.mlp.down_proj) is torch.nn.Linear for layer in model.model.layers)
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight, dense)


def test_gptq_groups_linears_by_shared_input_every_time(base, calibration, defaults):
    """q/k/v and gate/up share an input; o_proj's input must never join gate/up's (it did when a
    freed activation's address was reused: the result then changed from run to run)."""
    from llmctl.core.model.layerwise import LayerwiseRun
    from llmctl.core.quant.methods import _groups

    model, _ = load_model(base)
    run = LayerwiseRun(model, calibration)
    block, linears = run.blocks[0], [p for p, m in run.blocks[0].named_modules() if isinstance(m, torch.nn.Linear)]

    def forward():
        run.index = 0
        run.step(run.hidden)

    expected = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
    for _ in range(4):
        assert _groups(block, linears, forward) == expected
    assert _max_difference(_quantized(base, calibration, "gptq"), defaults["gptq"]) == 0


def test_quantize_calibrates_on_the_windows_asked_for(llmctl, base, tmp_path):
    (tmp_path / "calib.txt").write_text(TEXT * 40)
    r = llmctl("quantize", base, "-m", "gptq", "--calibration", tmp_path / "calib.txt", "--samples", "3",
               "--seq-len", "24", "--group-size", "16", "-o", tmp_path / "q", "--json")
    assert r.code == 0, r.stderr
    record = r.json()["quantization"]["calibration"]
    assert (record["samples"], record["seq_len"]) == (3, 24)


def test_awq_grid_is_the_set_of_exponents_searched():
    """grid=2 tries α ∈ {0, 1/2}: with strong activation outliers the winner is s ∝ mean|x|^½."""
    from llmctl.core.quant.awq import search_scale
    from llmctl.core.quant.config import AWQConfig
    from llmctl.core.quant.scheme import Scheme

    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(256, 32, generator=g), torch.randn(16, 32, generator=g)
    x[:, :4] *= 30
    x_mean = x.abs().mean(0)
    linear = torch.nn.Linear(32, 16, bias=False)
    linear.weight.data = w
    with torch.no_grad():  # the linear alone is the module whose output is measured
        s = search_scale(linear, [((x,), {}, x @ w.T)], [linear], x_mean, Scheme(bits=4, group_size=16),
                         AWQConfig(grid=2, duo_scaling=False))
    expected = x_mean.sqrt() / (x_mean.sqrt().max() * x_mean.sqrt().min()).sqrt()
    assert s is not None and torch.allclose(s, expected, rtol=1e-5)


def test_awq_identity_tries_no_scaling_beside_the_grid():
    """Weights already on the int4 grid round without error at s = 1 and with some at every duo
    scale: `identity` (llm-compressor's candidate) keeps them unscaled, AutoAWQ's grid cannot."""
    from llmctl.core.quant.awq import search_scale
    from llmctl.core.quant.config import AWQConfig
    from llmctl.core.quant.scheme import Scheme

    g = torch.Generator().manual_seed(3)
    scheme = Scheme(bits=4, group_size=16, symmetric=False)
    w = torch.randint(-8, 8, (16, 32), generator=g).float()
    w[:, ::16], w[:, 1::16] = -8.0, 7.0  # every group spans −8…7: its scale is 1, its zero 0, w on the grid
    assert torch.equal(scheme.fake(w), w)
    x = torch.randn(256, 32, generator=g) * torch.linspace(0.5, 4, 32)
    linear = torch.nn.Linear(32, 16, bias=False)
    linear.weight.data = w
    calls, x_mean = [((x,), {}, x @ w.T)], x.abs().mean(0)
    with torch.no_grad():
        assert search_scale(linear, calls, [linear], x_mean, scheme, AWQConfig(grid=4, identity=True)) is None
        assert search_scale(linear, calls, [linear], x_mean, scheme, AWQConfig(grid=4)) is not None


# --- finetune ------------------------------------------------------------------------------------

def test_adapter_options_shape_the_adapter(base, tmp_path):
    import json
    import math

    from llmctl.core.adapters import lora_modules, mark_trainable, save_adapter
    from llmctl.core.adapters.methods import METHODS
    from llmctl.core.train.finetune_config import AdapterOptions

    options = AdapterOptions(r=3, alpha=12.0, dropout=0.25, target_modules=["q_proj", "up_proj"],
                             exclude_modules=r".*\.layers\.0\..*", rslora=True, modules_to_save=["lm_head"])
    model, _ = load_model(base)
    for transform in METHODS.get("dora")(options):
        transform.apply(model)
    adapted = lora_modules(model)
    assert sorted(adapted) == ["model.layers.1.mlp.up_proj", "model.layers.1.self_attn.q_proj"]
    for module in adapted.values():
        assert module.lora_A.weight.shape[0] == 3 and module.scaling == pytest.approx(12 / math.sqrt(3))
        assert module.lora_dropout.p == 0.25 and module.lora_magnitude_vector is not None
    mark_trainable(model, options.modules_to_save)
    assert model.lm_head.weight.requires_grad and not model.model.layers[1].mlp.up_proj.weight.requires_grad
    out = save_adapter(model, tmp_path / "adapter", base=base)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["lm_head"] and config["use_dora"] and config["use_rslora"]


@pytest.fixture(scope="module")
def sft_records(tmp_path_factory):
    import json

    path = tmp_path_factory.mktemp("sft") / "records.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"what is {a} plus {a}?", "completion": f" {a + a}."}) + "\n"
                            for a in range(20)))
    return path


def _sft_plan(base, records, **keys):
    from types import SimpleNamespace

    from llmctl.core.tokenizer import load_tokenizer
    from llmctl.core.train.finetune_config import FinetuneConfig

    cfg = FinetuneConfig(model=str(base), seq_len=96, **keys)
    return SimpleNamespace(config=cfg, tokenizer=load_tokenizer(base), text_files=[str(records)], val_files=[])


@pytest.mark.parametrize("key, value", [("train_on", "all"), ("packing", False), ("val_fraction", 0.25)])
def test_sft_data_options_change_the_rows(base, sft_records, key, value):
    from llmctl.core.train.sft import _encode

    default, changed = (_encode(_sft_plan(base, sft_records, **keys)) for keys in ({}, {key: value}))
    stats, other = default["stats"].summary(), changed["stats"].summary()
    if key == "train_on":  # the prompts' tokens are learned too
        assert other["loss_tokens"] > stats["loss_tokens"] and torch.equal(changed["train"][:, 0], default["train"][:, 0])
    elif key == "packing":  # one example per row
        assert other["rows"] == other["examples"] > stats["rows"]
    else:
        assert len(changed["val"]) > len(default["val"]) and other["examples"] == 15


def test_packed_batches_keep_documents_apart(base, sft_records):
    from types import SimpleNamespace

    from llmctl.core.train.sft import SFT, _encode

    for packing in (True, False):
        plan = _sft_plan(base, sft_records, packing=packing)
        rows = _encode(plan)["train"][:2]
        inputs, labels, extra = SFT(SimpleNamespace(config=plan.config), torch.device("cpu")).batch(rows, 0)
        assert ("document_ids" in extra) == packing
        if packing:
            assert torch.equal(extra["document_ids"], rows[:, 2, :-1]) and extra["document_ids"].max() > 0


# --- prune ---------------------------------------------------------------------------------------

def test_sparsegpt_damping_reaches_the_solver():
    from test_prune import _reference_sparsegpt_nm

    from llmctl.core.prune import PRUNERS, PruneConfig

    torch.manual_seed(1)
    x = torch.randn(128, 48) * torch.rand(48) * 3
    results = []
    for damp in (0.01, 0.5):
        linear = torch.nn.Linear(48, 16, bias=False)
        torch.manual_seed(2)
        torch.nn.init.normal_(linear.weight)
        pruner = PRUNERS.get("sparsegpt")(PruneConfig(method="sparsegpt", pattern="2:4", block_size=16, damp=damp))
        stats = pruner.Stats(linear)
        stats.add(x)
        want = _reference_sparsegpt_nm(linear.weight.data, stats.matrix, 2, 4, 16, percdamp=damp)
        pruner.prune_linear(linear, stats)
        torch.testing.assert_close(linear.weight.data, want, rtol=1e-5, atol=1e-6)
        results.append(linear.weight.data)
    assert not torch.allclose(*results, atol=1e-3)


def test_prune_seed_draws_the_calibration_windows(base, tmp_path):
    from llmctl.core.prune import PruneConfig
    from llmctl.core.prune.run import prune_checkpoint

    text = tmp_path / "calib.txt"
    text.write_text(TEXT * 30)
    pruned = {}
    for name, seed in (("a", 0), ("b", 1), ("c", 0)):
        settings = PruneConfig(method="wanda", calibration=[str(text)], samples=2, seq_len=16, seed=seed)
        prune_checkpoint(base, settings, tmp_path / name)
        pruned[name] = load_model(tmp_path / name)[0].model.layers[0].mlp.down_proj.weight
    assert torch.equal(pruned["a"], pruned["c"]) and not torch.equal(pruned["a"], pruned["b"])


# --- distill -------------------------------------------------------------------------------------

from test_distill import teacher  # noqa: E402, F401  (a briefly trained 4-block teacher)
from test_train import FAST as TRAIN_FAST  # noqa: E402
from test_train import corpus  # noqa: E402, F401


def test_distill_settings_reach_the_criterion_and_the_student(corpus, teacher, tmp_path):  # noqa: F811
    """temperature, beta, layer_map and keep_every each reach what they configure (the losses
    themselves are checked against direct computations in test_distill.py)."""
    from llmctl.config import load_config
    from llmctl.core.train import distributed
    from llmctl.core.train.build import make_plan
    from llmctl.core.train.config import TrainConfig
    from llmctl.core.train.loop import Trainer

    args = ["objective=distill", f"objective_args.teacher={teacher}", "objective_args.student_init=teacher",
            "objective_args.keep_every=3", "objective_args.temperature=3.5", "objective_args.beta=0.25",
            "objective_args.losses={jsd: 1, hidden_mse: 1}", "objective_args.layer_map=[[0, 2], [1, 1]]"]
    cfg = load_config(TrainConfig, None, [f"data={corpus['shards']}", *TRAIN_FAST, *args], kind="train")
    (tmp_path / "run").mkdir()
    trainer = Trainer(make_plan(cfg, "cpu"), tmp_path / "run", torch.device("cpu"), distributed.Dist(), {})
    criterion = trainer.objective.criterion
    assert (criterion.temperature, criterion.beta, criterion.layer_map) == (3.5, 0.25, [(0, 2), (1, 1)])
    reference = load_model(teacher)[0].state_dict()
    student = trainer.model.state_dict()
    assert len(trainer.model.model.layers) == 2  # teacher blocks 0 and 3
    assert torch.equal(student["model.layers.1.mlp.up_proj.weight"], reference["model.layers.3.mlp.up_proj.weight"])
