"""Trainer objectives: a registered objective swaps in (what trains, a frozen companion, extra
parameters, its own loss) and resumes exactly; the built-in ones resolve as before."""

from __future__ import annotations

import shutil

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from llmctl.core.train.objectives import OBJECTIVES, Causal  # noqa: E402
from test_train import FAST, corpus, curve, records  # noqa: E402, F401  (the shared corpus fixture)


class Temperature(nn.Module):
    def __init__(self):
        super().__init__()
        self.log_t = nn.Parameter(torch.zeros(()))


@OBJECTIVES.register("test_last_block_distill")
class LastBlockDistill(Causal):
    """Next-token loss plus KL to a frozen teacher at a learned temperature; only the last
    block trains."""

    def __init__(self, plan, device):
        super().__init__(plan, device)
        from llmctl.core.model.build import build_model

        generator_state = torch.get_rng_state()
        torch.manual_seed(1234)
        self.teacher = build_model(plan.model_config).to(device)
        torch.set_rng_state(generator_state)
        self.temperature = Temperature()

    def prepare(self, model):
        last = f"model.layers.{len(model.model.layers) - 1}."
        for name, param in model.named_parameters():
            param.requires_grad_(name.startswith(last))

    def companions(self):
        return {"teacher": self.teacher}

    def extra(self):
        return self.temperature

    def loss(self, forward, inputs, labels, extra):
        out = forward(inputs, labels=labels, **extra)
        with torch.no_grad():
            teacher = self.teacher(inputs, **extra).logits
        target = F.log_softmax(teacher / self.temperature.log_t.exp(), -1)
        kl = F.kl_div(F.log_softmax(out.logits, -1), target, log_target=True, reduction="batchmean")
        self.record(kl=kl, temperature=self.temperature.log_t.exp())
        return out.loss + 0.5 * kl, out.loss


def test_an_objective_swaps_in_trains_and_resumes_exactly(llmctl, corpus, tmp_path):  # noqa: F811
    from llmctl.core.checkpoint import open_checkpoint
    from llmctl.core.model.io import load_model
    from llmctl.core.train.state import load_state

    common = [f"data={corpus['shards']}", f"tokenizer={corpus['tok']}", *FAST]
    base = tmp_path / "base"
    assert llmctl("--quiet", "train", *common, "max_steps=1", "-o", base).code == 0
    out = tmp_path / "swap"
    args = [*common, f"model={base}", "objective=test_last_block_distill", "max_steps=4", "save_every=2",
            "eval_every=2", "-o", out]
    r = llmctl("--quiet", "train", *args)
    assert r.code == 0, r.stderr
    steps = [x for x in records(out) if "loss" in x]
    assert len(steps) == 4 and all(x["aux_loss"] > 0 for x in steps)  # the KL term is trained on, logged apart
    assert all(x["aux_loss"] == pytest.approx(0.5 * x["kl"], rel=1e-5) for x in steps)  # recorded metrics
    assert steps[0]["temperature"] == 1.0 and steps[-1]["temperature"] != 1.0

    before, _ = load_model(base)
    after, _ = load_model(out)
    changed = {n for n, p in after.state_dict().items() if not torch.equal(p, before.state_dict()[n])}
    assert changed and all(n.startswith("model.layers.1.") for n in changed)  # only the last block trained
    meta, optimizer = load_state(out / "checkpoints" / "step-000004")
    assert float(meta["modules"]["log_t"]) != 0.0  # the extra parameter trained and is checkpointed
    assert all(k.startswith(("model.model.layers.1.", "extra.")) for k in optimizer["state"])
    assert open_checkpoint(out).config["model_type"] == "llama"  # the export: the full model, no extras

    # lose the last checkpoint: --resume from step 2 reproduces the uninterrupted run exactly
    reference = curve(out)
    shutil.rmtree(out / "checkpoints" / "step-000004")
    (out / "model.safetensors").unlink()
    r = llmctl("--quiet", "train", *args, "--resume")
    assert r.code == 0, r.stderr
    assert curve(out) == reference
    resumed, _ = load_model(out)
    assert all(torch.equal(p, after.state_dict()[n]) for n, p in resumed.state_dict().items())


def test_objectives_resolve_by_model_and_name(corpus, tmp_path):  # noqa: F811
    from llmctl.config import load_config
    from llmctl.core.train.build import make_plan
    from llmctl.core.train.config import TrainConfig
    from llmctl.errors import ConfigError, UsageError

    def plan(*overrides):
        cfg = load_config(TrainConfig, None, [f"data={corpus['shards']}", *FAST, *overrides], kind="train")
        return make_plan(cfg, "cpu")

    assert plan("model=nano").objective == "causal"
    assert plan(f"model={corpus['moe']}").objective == "mtp"
    masked = plan(f"model={corpus['bert']}")
    assert masked.objective == "masked" and masked.mask_id is not None
    with pytest.raises(ConfigError, match="no multi-token heads"):
        plan("model=nano", "objective=mtp")
    with pytest.raises(UsageError, match="unknown training objective 'casual'.*did you mean 'causal'"):
        plan("model=nano", "objective=casual")
