"""`llmctl train` / `llmctl plot` and the training core (schedules, optimizer, data, state, loop)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import SHARED_DATA

def _text() -> str:
    """60 kB of English: tinyshakespeare when ../shared is present, else Python's own docs."""
    path = SHARED_DATA / "tinyshakespeare.txt"
    if path.is_file():
        return path.read_text(encoding="utf-8")[:60_000]
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))[:60_000]


TEXT = _text()
FAST = ["max_steps=8", "batch_size=2", "seq_len=32", "warmup_steps=2", "eval_every=4", "save_every=4",
        "eval_batches=2", "peak_tflops=1", "tensorboard=false"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    """A byte-level BPE tokenizer (with [MASK]) and train/val token shards of 60 kB of Shakespeare."""
    from llmctl.core.data import Corpus, encode_corpus
    from llmctl.core.tokenizer import TrainSpec, train_tokenizer

    root = tmp_path_factory.mktemp("corpus")
    text = root / "shakespeare.txt"
    text.write_text(TEXT, encoding="utf-8")
    spec = TrainSpec(algo="bytelevel", vocab_size=320, special_tokens=["<|endoftext|>", "[MASK]"])
    tok = train_tokenizer(spec, iter([[p for p in TEXT.split("\n\n") if p.strip()]]))
    tok.save(root / "tok")
    (root / "shards").mkdir()
    encode_corpus(Corpus([str(text)]), tok, root / "shards", val_fraction=0.1)
    (root / "moe.yaml").write_text("vocab_size: 512\nhidden_size: 32\nnum_layers: 2\nnum_heads: 2\nmax_seq_len: 64\n"
                                   "num_experts: 4\nexperts_per_token: 2\nnum_mtp_heads: 1\n")
    (root / "bert.yaml").write_text("vocab_size: 512\nhidden_size: 32\nnum_layers: 2\nnum_heads: 2\nmax_seq_len: 64\n"
                                    "is_causal: false\nposition: learned\nnorm: layernorm\nnorm_placement: post\nmlp: gelu\n")
    return {"text": text, "tok": root / "tok", "shards": root / "shards", "moe": root / "moe.yaml",
            "bert": root / "bert.yaml", "root": root}


def records(outdir: Path) -> list[dict]:
    return [json.loads(line) for line in (outdir / "metrics.jsonl").read_text().splitlines()]


def curve(outdir: Path) -> list[tuple]:
    """The comparable part of metrics.jsonl (no timings)."""
    return [(r["step"], r.get("loss"), r.get("lr"), r.get("grad_norm"), r.get("val_loss")) for r in records(outdir)]


# -- core pieces -----------------------------------------------------------------------------


def test_max_steps_zero_saves_the_initial_model(llmctl, corpus, tmp_path):
    out = tmp_path / "init"
    r = llmctl("train", f"data={corpus['shards']}", f"tokenizer={corpus['tok']}", *FAST, "max_steps=0", "-o", out, "--json")
    assert r.code == 0, r.stderr
    assert r.json()["step"] == 0 and (out / "model.safetensors").is_file()
    assert abs(r.json()["val_loss"] - math.log(320)) < 0.5  # an untrained model: about uniform


def test_max_time_fits_the_schedule_into_the_budget(llmctl, corpus, tmp_path):
    out = tmp_path / "timed"
    from llmctl.core.train.schedule import lr_at

    r = llmctl("train", f"data={corpus['shards']}", f"tokenizer={corpus['tok']}", *FAST, "max_steps=1000000",
               "max_time=0.3", "lr=0.01", "min_lr=1e-5", "save_every=0", "eval_every=0", "-o", out, "--json")
    assert r.code == 0, r.stderr
    steps = r.json()["step"]
    assert 2 <= steps < 1000000  # how many fit depends on the machine's load
    last = [rec for rec in records(out) if "lr" in rec][-1]
    # the cosine reached its end on time: the last step's lr is the schedule's last over `steps`
    end = lr_at("cosine", steps - 1, lr=0.01, min_lr=1e-5, warmup_steps=2, max_steps=steps)
    # … and far below the peak (an un-refitted horizon would still be near it): true from 6 steps on,
    # which fit in 18 s even at a load average of 15
    assert last["step"] == steps and last["lr"] == pytest.approx(end) and last["lr"] < 0.01 / 4
    state = json.loads((out / "checkpoints" / f"step-{steps:06d}" / "trainer_state" / "state.json").read_text())
    assert state["max_steps"] == steps and state["horizon_fixed"] is True


def test_mfu_peak_is_the_gpus_datasheet_figure(monkeypatch):
    """MFU's denominator on a known GPU: its dense 16-bit, TF32 or float32 peak (not a timed probe)."""
    import torch

    from llmctl.core.train.metrics import peak_flops

    cuda = torch.device("cuda")
    for name, bf16 in [("NVIDIA H200", 989.4e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA A100-SXM4-80GB", 312e12)]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=name: name)
        assert peak_flops(torch.bfloat16, cuda) == peak_flops(torch.float16, cuda) == bf16
    matmul, tf32 = torch.backends.cuda.matmul, torch.backends.cuda.matmul.allow_tf32  # a property, not an attribute
    try:
        matmul.allow_tf32 = False
        assert peak_flops(torch.float32, cuda) == 19.5e12
        matmul.allow_tf32 = True
        assert peak_flops(torch.float32, cuda) == 156e12
    finally:
        matmul.allow_tf32 = tf32


def test_schedules_are_registered_and_shaped():
    from llmctl.core.train.schedule import SCHEDULES, lr_at
    from llmctl.errors import UsageError

    p = dict(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=100, decay_fraction=0.2)
    assert set(SCHEDULES.names()) >= {"cosine", "linear", "constant", "wsd"}
    for name in SCHEDULES.names():
        assert lr_at(name, 0, **p) == pytest.approx(0.1)  # warm-up from lr/warmup
        assert lr_at(name, 9, **p) == pytest.approx(1.0)
        assert lr_at(name, 10, **p) == pytest.approx(1.0)  # the first step after warm-up: the peak, not above
    assert lr_at("cosine", 100, **p) == pytest.approx(0.1)
    assert lr_at("cosine", 55, **p) == pytest.approx(0.55)
    assert lr_at("linear", 55, **p) == pytest.approx(0.55)
    assert lr_at("constant", 99, **p) == 1.0
    assert lr_at("wsd", 79, **p) == 1.0 and lr_at("wsd", 90, **p) == pytest.approx(0.55)
    with pytest.raises(UsageError, match="did you mean 'cosine'"):
        lr_at("cosin", 0, **p)


def test_no_weight_decay_on_norms_biases_embeddings():
    from llmctl.core.model import ModelConfig, Transformer
    from llmctl.core.train.optim import build_optimizer

    model = Transformer(ModelConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=2, qkv_bias=True))
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.1, no_decay=["norm", "bias", "embed"], betas=(0.9, 0.95), eps=1e-8)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    kept = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert "model.layers.0.self_attn.q_proj.weight" in decayed
    assert "model.embed_tokens.weight" in kept and "model.norm.weight" in kept
    assert "model.layers.0.self_attn.q_proj.bias" in kept
    assert not any("norm" in n or n.endswith("bias") for n in decayed)


def test_shard_batches_deterministic_and_rank_sliced(corpus):
    import torch

    from llmctl.core.data import TokenShards
    from llmctl.core.train.data import ShardBatches

    ts = TokenShards(corpus["shards"])
    make = lambda **kw: ShardBatches(ts.split("train"), ts.split("val"), seq_len=16, seed=3, eval_batches=2, **kw)
    for sampling in ("random", "sequential"):
        whole = make(batch_size=4, sampling=sampling)
        halves = [make(batch_size=2, sampling=sampling, rank=r, world=2) for r in range(2)]
        for i in (0, 5):
            assert torch.equal(whole.batch(i), torch.cat([h.batch(i) for h in halves]))
        assert torch.equal(make(batch_size=4, sampling=sampling).batch(7), whole.batch(7))
        assert whole.batch(0).shape == (4, 17)
    seq = make(batch_size=2, sampling="sequential").batch(0)
    stream = torch.from_numpy(ts.split("train")[0][:33].astype("int64"))
    assert torch.equal(seq[0], stream[:17]) and torch.equal(seq[1], stream[16:33])
    assert len(make(batch_size=2, sampling="random").val_batches()) == 2


def test_text_stream_resumes_from_its_position(corpus, monkeypatch):
    import numpy as np

    from llmctl.core.tokenizer import load_tokenizer
    from llmctl.core.train import data

    monkeypatch.setattr(data, "BLOCK_BYTES", 2000)  # many blocks, rows spanning them
    tok = load_tokenizer(corpus["tok"])
    train, val = data.split_text([corpus["text"]], 0.1)
    assert train[0][2] == val[0][1] and TEXT.encode()[train[0][2] - 1] == ord("\n")
    small = [(corpus["text"], 0, TEXT.encode().index(b"\n", 6000) + 1)]  # ~2k tokens: several epochs
    make = lambda: data.TextStream(small, tok.encode, tok.eos_id, 48)
    a = make()
    for _ in range(37):
        a.next_row()
    position = a.position()
    expected = [a.next_row() for _ in range(60)]  # crosses the end of the text twice
    b = make()
    b.seek(json.loads(json.dumps(position)))
    assert all(np.array_equal(x, b.next_row()) for x in expected)
    assert tok.eos_id in np.concatenate(expected)  # the document separator between epochs


def test_masking_80_10_10():
    import torch

    from llmctl.core.train.data import mask_tokens

    rows = torch.randint(5, 100, (64, 128))
    rows[:, 0] = 1
    inputs, labels = mask_tokens(rows, mask_id=2, vocab_size=100, prob=0.15,
                                 generator=torch.Generator().manual_seed(0), special_ids=[1])
    picked = labels != -100
    assert abs(picked.float().mean().item() - 0.15) < 0.01
    assert not picked[:, 0].any() and torch.equal(labels[picked], rows[picked])
    assert ((inputs == 2) & picked).sum() / picked.sum() == pytest.approx(0.8, abs=0.03)
    assert torch.equal(inputs[~picked], rows[~picked])


def test_trainer_state_roundtrip_without_pickle(tmp_path):
    import random

    import torch

    from llmctl.core.train.state import STATE_DIR, load_state, restore_rng, save_state

    optim = {"state": {"w": {"step": torch.tensor(3.0), "exp_avg": torch.ones(2, 2)}},
             "param_groups": [{"lr": 0.1, "params": ["w"]}]}
    torch.manual_seed(1)
    random.seed(2)
    save_state(tmp_path, step=3, optimizer=optim, data={"kind": "shards", "index": 3}, scaler=None)
    expected = (torch.rand(3), random.random())
    torch.manual_seed(5)
    random.seed(6)
    meta, loaded = load_state(tmp_path)
    restore_rng(meta["rng"], meta["rng_tensors"])
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]
    assert torch.equal(loaded["state"]["w"]["exp_avg"], torch.ones(2, 2)) and meta["step"] == 3
    assert sorted(p.name for p in (tmp_path / STATE_DIR).iterdir()) == ["state.json", "state.safetensors"]


# -- the command ------------------------------------------------------------------------------


def test_train_on_shards_end_to_end(llmctl, corpus, tmp_path):
    out = tmp_path / "run"
    r = llmctl("train", "--config", "tiny", f"data={corpus['shards']}", f"tokenizer={corpus['tok']}", *FAST,
               "keep_last=1", "-o", out, "--json")
    assert r.code == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["step"] == 8 and math.isfinite(summary["val_loss"])
    recs = records(out)
    steps = [x for x in recs if "loss" in x]
    assert [x["step"] for x in steps] == list(range(1, 9))
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu"} <= set(steps[0])
    assert [x["step"] for x in recs if "val_loss" in x] == [4, 8]
    assert all(x["val_ppl"] == pytest.approx(math.exp(x["val_loss"])) for x in recs if "val_loss" in x)
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000008"]  # keep_last=1
    assert (out / "checkpoints" / "step-000008" / "trainer_state" / "state.safetensors").is_file()

    from llmctl.core.checkpoint import open_checkpoint
    from llmctl.core.model.io import load_model

    model, cfg = load_model(out)
    assert cfg.vocab_size == 320  # a preset takes the tokenizer's vocabulary
    ck = open_checkpoint(out)
    assert ck.has_tokenizer
    assert ck.lineage["command"] == "train" and ck.lineage["config"]["max_steps"] == 8
    assert ck.lineage["data"]["tokenizer_hash"] and ck.lineage["metrics"][-1]["val_loss"] == summary["val_loss"]
    assert not list(out.rglob("*.pkl")) and not list(out.rglob("*.pt"))


def test_train_on_raw_text_streamed(llmctl, corpus, tmp_path):
    out = tmp_path / "text"
    r = llmctl("train", f"data={corpus['text']}", f"tokenizer={corpus['tok']}", "model=nano", *FAST, "-o", out)
    assert r.code == 0, r.stderr
    assert any("val_loss" in x for x in records(out))
    state = json.loads((out / "checkpoints" / "step-000008" / "trainer_state" / "state.json").read_text())
    assert state["data"]["kind"] == "text" and state["data"]["position"]["skip"] > 0


@pytest.mark.parametrize("model,extra", [("moe", ["grad_accum=2"]), ("bert", ["objective=auto"])])
def test_moe_mtp_and_masked_lm(llmctl, corpus, tmp_path, model, extra):
    out = tmp_path / model
    r = llmctl("train", f"data={corpus['shards']}", f"tokenizer={corpus['tok']}", f"model={corpus[model]}",
               *FAST, "max_steps=4", *extra, "-o", out)
    assert r.code == 0, r.stderr
    assert all(math.isfinite(x.get("loss", x.get("val_loss"))) for x in records(out))
    if model == "moe":  # MoE balance + MTP losses are trained on and logged apart from the LM loss
        assert all(x["aux_loss"] > 0 for x in records(out) if "loss" in x)


def test_document_mask_scores_each_document_alone(corpus, tmp_path):
    """document_mask=true: a window's loss equals scoring each of its documents on its own."""
    import torch
    import torch.nn.functional as F

    from llmctl.config import load_config
    from llmctl.core.train import distributed
    from llmctl.core.train.build import make_plan
    from llmctl.core.train.config import TrainConfig
    from llmctl.core.train.loop import Trainer

    cfg = load_config(TrainConfig, None, [f"data={corpus['shards']}", "model=nano", *FAST, "document_mask=true"],
                      kind="train")
    (tmp_path / "out").mkdir()
    trainer = Trainer(make_plan(cfg, "cpu"), tmp_path / "out", torch.device("cpu"), distributed.Dist(), {})
    eos = trainer.plan.model_config.eos_token_id
    rows = torch.randint(0, 300, (2, 33))
    rows[0, [6, 7, 20]] = eos  # documents of 7, 1, 13 and 12 tokens
    inputs, labels, extra = trainer._inputs(rows, 0)
    assert extra["document_ids"][0].tolist() == [0] * 7 + [1] + [2] * 13 + [3] * 11
    model, total = trainer.model.eval(), 0.0
    with torch.no_grad():
        loss = float(trainer._loss(inputs, labels, extra)[1])
        for b, cuts in ((0, [0, 7, 8, 21, 32]), (1, [0, 32])):
            for start, end in zip(cuts, cuts[1:]):
                logits = model(inputs[b : b + 1, start:end]).logits[0]
                total += float(F.cross_entropy(logits, labels[b, start:end], reduction="sum"))
    assert loss == pytest.approx(total / labels.numel(), rel=1e-5)
    from llmctl.errors import ConfigError

    masked = load_config(TrainConfig, None, [f"data={corpus['shards']}", f"model={corpus['bert']}", *FAST,
                                             "document_mask=true"], kind="train")
    with pytest.raises(ConfigError, match="only for the causal objective"):
        make_plan(masked, "cpu")


def test_bf16_autocast_and_continue_from_checkpoint(llmctl, corpus, tmp_path):
    first = tmp_path / "first"
    assert llmctl("train", f"data={corpus['shards']}", f"tokenizer={corpus['tok']}", *FAST, "max_steps=2",
                  "precision=bf16", "gradient_checkpointing=true", "-o", first).code == 0
    second = tmp_path / "second"
    r = llmctl("train", f"data={corpus['shards']}", f"model={first}", *FAST, "max_steps=2", "-o", second)
    assert r.code == 0, r.stderr
    from llmctl.core.checkpoint import open_checkpoint

    assert open_checkpoint(second).lineage["parents"][0]["path"] == str(first.resolve())


@pytest.mark.parametrize("args,message", [
    (["model=nanoo"], "did you mean 'nano'"),
    (["seq_len=512"], "exceeds the context"),
    (["lrr=1"], "did you mean 'lr'"),
    (["schedule=cosin"], "did you mean 'cosine'"),
    (["precision=fp16", "--device", "cpu"], "needs CUDA"),
    (["data=EMPTY"], "is empty"),
    (["data=MISMATCH"], "was encoded with tokenizer"),
])
def test_bad_config_exits_2_and_writes_nothing(llmctl, corpus, tmp_path, args, message):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    other = corpus["root"] / "other-shards"
    if not other.exists():
        from llmctl.core.data import Corpus, encode_corpus
        from llmctl.core.tokenizer import TrainSpec, train_tokenizer

        tok = train_tokenizer(TrainSpec(algo="char", vocab_size=100), iter([[TEXT[:5000]]]))
        other.mkdir()
        encode_corpus(Corpus([str(corpus["text"])]), tok, other)
    subst = {"EMPTY": str(empty), "MISMATCH": str(other)}
    args = [a.split("=")[0] + "=" + subst[a.split("=")[-1]] if a.split("=")[-1] in subst else a for a in args]
    out = tmp_path / "out"
    r = llmctl("train", f"data={corpus['shards']}", f"tokenizer={corpus['tok']}", *FAST, *args, "-o", out)
    assert r.code == 2, r.stderr
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_existing_outdir_needs_force_or_resume(llmctl, corpus, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    base = ["train", f"data={corpus['shards']}", f"tokenizer={corpus['tok']}", *FAST, "max_steps=2", "-o", out]
    r = llmctl(*base)
    assert r.code == 2 and "--force" in r.stderr and (out / "keep.txt").exists()
    assert llmctl(*base, "--resume").code == 2  # not a training directory
    r = llmctl(*base, "--force")  # --force replaces only a training directory
    assert r.code == 2 and "not an llmctl train output" in r.stderr and (out / "keep.txt").exists()
    (out / "keep.txt").unlink()
    assert llmctl(*base).code == 2  # an empty directory still needs --force
    assert llmctl(*base, "--force").code == 0
    r = llmctl("train", "-o", out, "--resume", "max_steps=3")  # the saved recipe, extended
    assert r.code == 0, r.stderr
    assert [x["step"] for x in records(out) if "loss" in x] == [1, 2, 3]


def test_non_finite_loss_stops_naming_the_step(llmctl, corpus, tmp_path, monkeypatch):
    import torch

    from llmctl.core.train import loop

    real = loop.Trainer._loss

    def poisoned(self, inputs, labels, extra):
        objective, loss = real(self, inputs, labels, extra)
        return (objective * float("nan"), loss) if self.step == 5 else (objective, loss)

    monkeypatch.setattr(loop.Trainer, "_loss", poisoned)
    out = tmp_path / "nan"
    r = llmctl("train", f"data={corpus['shards']}", f"tokenizer={corpus['tok']}", *FAST, "-o", out)
    assert r.code == 1
    assert "non-finite loss" in r.stderr and "step 6" in r.stderr and "step-000004" in r.stderr
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000004"]
    assert torch.isfinite(torch.tensor([x["loss"] for x in records(out) if "loss" in x])).all()


# -- never lose work (subprocesses) ------------------------------------------------------------


def _spawn(*args) -> subprocess.Popen:
    env = {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "llmctl", "--quiet", "train", *map(str, args)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_steps(proc: subprocess.Popen, out: Path, steps: int, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (out / "metrics.jsonl").exists() and sum('"loss"' in l for l in (out / "metrics.jsonl").read_text().splitlines()) >= steps:
            return
        assert proc.poll() is None, proc.communicate()[1]
        time.sleep(0.02)
    raise AssertionError("training did not progress")


def test_sigkill_then_resume_matches_uninterrupted_run_bit_for_bit(corpus, tmp_path):
    args = [f"data={corpus['shards']}", f"tokenizer={corpus['tok']}", *FAST, "max_steps=60", "save_every=10",
            "eval_every=20", "dropout=0.1", "keep_last=2"]
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    proc = _spawn(*args, "-o", ref)
    killed = _spawn(*args, "-o", cut)
    _wait_for_steps(killed, cut, 25)
    killed.kill()
    killed.wait()
    assert proc.wait(timeout=120) == 0, proc.communicate()[1]
    assert not (cut / "config.json").exists()  # it never finished
    resumed = _spawn("-o", cut, "--resume")
    assert resumed.wait(timeout=120) == 0, resumed.communicate()[1]
    assert curve(cut) == curve(ref)
    assert (cut / "model.safetensors").read_bytes() == (ref / "model.safetensors").read_bytes()


def test_sigterm_finishes_the_step_checkpoints_and_exits_143(corpus, tmp_path):
    out = tmp_path / "sig"
    proc = _spawn(f"data={corpus['shards']}", f"tokenizer={corpus['tok']}", *FAST, "max_steps=100000",
                  "save_every=0", "-o", out)
    _wait_for_steps(proc, out, 3)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143, proc.communicate()[1]
    checkpoints = list((out / "checkpoints").iterdir())
    assert len(checkpoints) == 1
    assert int(checkpoints[0].name.split("-")[1]) == max(x["step"] for x in records(out))
    assert (checkpoints[0] / "trainer_state" / "state.json").is_file()


def test_sigint_mid_step_exits_130_after_a_checkpoint(llmctl, corpus, tmp_path, monkeypatch):
    from llmctl.core.train import loop

    real = loop.Trainer.train_step

    def interrupted(self):
        if self.step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # arrives mid-step: the step still completes
        return real(self)

    monkeypatch.setattr(loop.Trainer, "train_step", interrupted)
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when the suite runs in the background
    out = tmp_path / "int"
    r = llmctl("train", f"data={corpus['shards']}", f"tokenizer={corpus['tok']}", *FAST, "save_every=0", "-o", out)
    assert r.code == 130
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000003"]
    assert signal.getsignal(signal.SIGINT) is before  # the loop restored the handler it found


# -- plot ----------------------------------------------------------------------------------------


def test_plot_terminal_chart_and_png(llmctl, corpus, tmp_path, monkeypatch):
    out = tmp_path / "run"
    assert llmctl("train", f"data={corpus['shards']}", f"tokenizer={corpus['tok']}", *FAST, "-o", out).code == 0
    r = llmctl("plot", out)
    assert r.code == 0 and "train loss" in r.stderr and "val loss" in r.stderr
    r = llmctl("plot", out, "--json")
    assert [p[0] for p in r.json()["val_loss"]] == [4, 8]
    png = tmp_path / "loss.png"
    r = llmctl("plot", out, "-o", png)
    assert r.code == 0 and png.read_bytes()[:4] == b"\x89PNG"
    from matplotlib.image import imread

    pixels = imread(png)
    assert pixels.shape[:2] == (540, 960)  # 8 x 4.5 in at 120 dpi
    assert (pixels[..., :3] < 0.9).any(axis=-1).mean() > 0.01  # axes, labels and curves drawn
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # matplotlib missing: a usage error
    r = llmctl("plot", out, "-o", tmp_path / "again.png")
    assert r.code == 2 and "pip install 'llmctl[plot]'" in r.stderr and not (tmp_path / "again.png").exists()
    assert llmctl("plot", tmp_path).code == 2


def test_shards_carry_their_tokenizer_into_the_checkpoint(llmctl, corpus, tmp_path):
    from llmctl.core.tokenizer import load_tokenizer

    out = tmp_path / "out"
    r = llmctl("train", f"data={corpus['shards']}", *FAST, "max_steps=1", "-o", out)  # no tokenizer=
    assert r.code == 0, r.stderr
    assert load_tokenizer(out).hash == load_tokenizer(corpus["tok"]).hash
