"""`llmctl distill` and `core/distill`: each loss against a direct computation, chunked against
unchunked, stored top-k (K = vocab) against the online teacher, exact resume, a frozen teacher,
the student from the teacher's blocks, and the refusals (tokenizer mismatch, bad settings)."""

from __future__ import annotations

import json
import shutil

import pytest

torch = pytest.importorskip("torch")

from torch.nn import functional as F  # noqa: E402

from llmctl.core.distill.losses import LOSSES  # noqa: E402
from test_train import FAST, corpus, curve, records  # noqa: E402, F401  (the shared corpus fixture)

TEACHER_ARGS = "model_args={hidden_size: 48, num_layers: 4, num_heads: 4, num_kv_heads: 2, intermediate_size: 96}"


@pytest.fixture(scope="module")
def teacher(corpus, tmp_path_factory):  # noqa: F811
    """A briefly trained 4-block teacher (width 48) of the corpus's tokenizer."""
    from llmctl.cli import main

    out = tmp_path_factory.mktemp("distill") / "teacher"
    code = main(["--quiet", "train", f"data={corpus['shards']}", TEACHER_ARGS, *FAST, "max_steps=6", "save_every=0",
                 "-o", str(out)])
    assert code == 0
    return out


def _models(vocab=53, teacher_width=48):
    from llmctl.core.model import ModelConfig
    from llmctl.core.model.build import build_model

    torch.manual_seed(0)
    common = dict(vocab_size=vocab, num_heads=4, num_kv_heads=2, intermediate_size=64, max_seq_len=64)
    student = build_model(ModelConfig(hidden_size=32, num_layers=2, **common))
    teacher = build_model(ModelConfig(hidden_size=teacher_width, num_layers=3, initializer_range=0.2, **common))
    return student, teacher.requires_grad_(False).eval()


# -- losses --------------------------------------------------------------------------------------


def test_each_loss_equals_a_direct_computation():
    torch.manual_seed(1)
    s, t = torch.randn(6, 11) * 3, torch.randn(6, 11) * 3
    T = 2.5
    ps, pt = torch.softmax(s / T, -1), torch.softmax(t / T, -1)
    kl = lambda p, q: (p * (p.log() - q.log())).sum(-1)  # noqa: E731
    fn = {name: LOSSES.get(name) for name in LOSSES.names()}
    assert fn["forward_kl"](s, t, temperature=T) == pytest.approx(T * T * kl(pt, ps), rel=1e-5)
    assert fn["reverse_kl"](s, t, temperature=T) == pytest.approx(T * T * kl(ps, pt), rel=1e-5)
    beta = 0.3
    m = beta * pt + (1 - beta) * ps
    assert fn["jsd"](s, t, temperature=T, beta=beta) == pytest.approx(
        T * T * (beta * kl(pt, m) + (1 - beta) * kl(ps, m)), rel=1e-5)
    assert fn["jsd"](s, t, temperature=T, beta=0.0) == pytest.approx(fn["forward_kl"](s, t, temperature=T))
    assert fn["jsd"](s, t, temperature=T, beta=1.0) == pytest.approx(fn["reverse_kl"](s, t, temperature=T))
    labels = torch.tensor([3, 0, 10, 4, 4, 7])
    assert fn["ce"](s, labels) == pytest.approx(-torch.log_softmax(s, -1)[torch.arange(6), labels])
    hs, ht = torch.randn(6, 8), torch.randn(6, 8)
    assert fn["hidden_mse"](hs, ht) == pytest.approx(((hs - ht) ** 2).mean(-1))
    assert fn["hidden_cosine"](hs, ht) == pytest.approx(1 - (hs * ht).sum(-1) / (hs.norm(dim=-1) * ht.norm(dim=-1)))


def test_forward_kl_is_torchtunes_kd_loss_less_the_teacher_entropy():
    """torchtune's ForwardKLLoss (modules/loss/kd_losses.py) is the cross-entropy −Σ p_T log p_S, masked
    mean over labels != -100 (torchtune is not a dev dependency: installing it replaces tokenizers and
    huggingface_hub, so its formula is written out here). Same minimiser, same gradient."""
    from llmctl.core.distill.criterion import Criterion

    torch.manual_seed(2)
    s = torch.randn(2, 5, 13, requires_grad=True)
    t = torch.randn(2, 5, 13)
    labels = torch.randint(0, 13, (2, 5))
    labels[0, :2] = -100
    mask = (labels != -100).reshape(-1)
    p_t = torch.softmax(t, -1).reshape(-1, 13)
    torchtune = -((p_t * torch.log_softmax(s, -1).reshape(-1, 13)).sum(-1) * mask).sum() / mask.sum()
    entropy = -((p_t * p_t.log()).sum(-1) * mask).sum() / mask.sum()
    ours = (LOSSES.get("forward_kl")(s.reshape(-1, 13), t.reshape(-1, 13)) * mask).sum() / mask.sum()
    assert (ours + entropy).item() == pytest.approx(torchtune.item(), rel=1e-5)
    assert torch.allclose(*[torch.autograd.grad(x, s)[0] for x in (ours, torchtune)], atol=1e-6)
    assert Criterion({"forward_kl": 1.0}).names == ["forward_kl", "ce"]


# -- chunking ------------------------------------------------------------------------------------


def _criterion_run(student, teacher, x, y, losses, rows, projections=None, topk=None):
    from llmctl.core.distill.criterion import Criterion, default_layer_map

    student.zero_grad()
    if projections is not None:
        projections.zero_grad()
    hidden = any(LOSSES.get(n).kind == "hidden" for n in losses)
    out = student(x, skip_head=True, output_hidden_states=hidden)
    with torch.no_grad():
        t_out = teacher(x, skip_head=True, output_hidden_states=hidden)
    crit = Criterion(losses, temperature=2.0, beta=0.4, chunk_rows=rows,
                     layer_map=default_layer_map(student.cfg.num_layers, teacher.cfg.num_layers))
    total, parts = crit(student, out, y, teacher=teacher, teacher_out=None if topk else t_out, topk=topk,
                        projections=projections)
    total.backward()
    params = [*student.parameters(), *(projections.parameters() if projections is not None else [])]
    return total.item(), {k: v.item() for k, v in parts.items()}, [p.grad.clone() for p in params]


def test_chunked_losses_equal_the_unchunked_ones_and_make_only_chunks_of_logits():
    from llmctl.core.distill.criterion import Projections

    student, teacher = _models()
    projections = Projections(2, 32, 48)
    x, y = torch.randint(0, 53, (3, 9)), torch.randint(0, 53, (3, 9))
    y[1, :4] = -100
    seen = []
    head = student.head
    student.head = lambda rows, *a: seen.append(rows.shape[0]) or head(rows, *a)
    losses = {"forward_kl": 0.5, "reverse_kl": 0.2, "jsd": 0.3, "ce": 0.4, "hidden_mse": 0.1, "hidden_cosine": 0.2}
    total, parts, grads = _criterion_run(student, teacher, x, y, losses, 5, projections)
    assert seen and max(seen) == 5  # 27 positions, logits made 5 rows at a time
    whole, whole_parts, whole_grads = _criterion_run(student, teacher, x, y, losses, 10**6, projections)
    assert total == pytest.approx(whole, rel=1e-5) and parts == pytest.approx(whole_parts, rel=1e-5)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads, whole_grads))

    # and both equal the direct computation on the models' full logits
    del student.head
    student.zero_grad(), projections.zero_grad()
    out = student(x, output_hidden_states=True)
    with torch.no_grad():
        t_out = teacher(x, output_hidden_states=True)
    m = y != -100
    s, t = out.logits[m], t_out.logits[m]
    direct = sum(w * LOSSES.get(n)(s, t, temperature=2.0, beta=0.4).mean()
                 for n, w in losses.items() if LOSSES.get(n).kind == "logits")
    direct = direct + 0.4 * F.cross_entropy(s, y[m])
    for name in ("hidden_mse", "hidden_cosine"):
        terms = [LOSSES.get(name)(projections[k](out.hidden_states[i])[m], t_out.hidden_states[j][m]).mean()
                 for k, (i, j) in enumerate([(1, 2), (2, 3)])]
        direct = direct + losses[name] * torch.stack(terms).mean()
    direct.backward()
    assert total == pytest.approx(direct.item(), rel=1e-5)
    direct_grads = [p.grad for p in [*student.parameters(), *projections.parameters()]]
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads, direct_grads))


def test_without_autograd_the_chunked_loss_is_the_same_number():
    student, teacher = _models()
    x, y = torch.randint(0, 53, (2, 7)), torch.randint(0, 53, (2, 7))
    total, _, _ = _criterion_run(student, teacher, x, y, {"forward_kl": 1.0, "ce": 1.0}, 3)
    from llmctl.core.distill.criterion import Criterion

    with torch.no_grad():
        out, t_out = student(x, skip_head=True), teacher(x, skip_head=True)
        value, _ = Criterion({"forward_kl": 1.0, "ce": 1.0}, temperature=2.0, chunk_rows=4)(
            student, out, y, teacher=teacher, teacher_out=t_out)
    assert value.item() == pytest.approx(total, rel=1e-6)


# -- the command ---------------------------------------------------------------------------------


def test_offline_top_k_with_k_equal_to_the_vocabulary_is_the_online_loss(llmctl, corpus, teacher, tmp_path,  # noqa: F811
                                                                        monkeypatch):
    from llmctl.core.data import Corpus, encode_corpus
    from llmctl.core.data.shards import TokenShards
    from llmctl.core.distill import store as store_module
    from llmctl.core.distill.store import TeacherOutputs, windows_of
    from llmctl.core.model.io import load_model
    from llmctl.core.tokenizer import load_tokenizer
    from test_train import TEXT

    (tmp_path / "part.txt").write_text(TEXT[:12_000], encoding="utf-8")
    shards = tmp_path / "shards"
    shards.mkdir()
    encode_corpus(Corpus([str(tmp_path / "part.txt")]), load_tokenizer(teacher), shards, val_fraction=0.1)
    monkeypatch.setattr(store_module, "FILE_BYTES", 7 * 32 * 320 * 4)  # 7 windows a file: several files
    store = tmp_path / "store"
    r = llmctl("distill", "--teacher", teacher, "--data", shards, "--save-teacher", store, "--top-k", 320,
               "seq_len=32", "--json")
    assert r.code == 0, r.stderr
    info = r.json()
    outputs = TeacherOutputs(store)
    source = windows_of(TokenShards(shards), 32, batch_size=3)
    assert info["windows"] == outputs.windows == source.windows > 14 and len(outputs.manifest["files"]) > 2
    assert llmctl("distill", "--teacher", teacher, "--data", shards, "--save-teacher", store,
                  "--top-k", 8).code == 2  # never overwritten without --force

    rows = source.batch(4)  # windows across files: the teacher's own outputs come back
    ids, values = outputs.lookup(source.positions(4))
    model = load_model(teacher)[0]
    with torch.no_grad():
        logprobs = torch.log_softmax(model(rows[:, :-1]).logits, -1)
    assert torch.allclose(logprobs.gather(-1, ids), values, atol=2e-2)  # float16 values
    assert torch.equal(ids[..., 0], logprobs.argmax(-1))

    student, _ = load_model(teacher)  # any student; here the teacher's own shape
    torch.manual_seed(3)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x, y = rows[:, :-1], rows[:, 1:]
    losses = {"forward_kl": 0.5, "reverse_kl": 0.3, "jsd": 0.2, "ce": 0.1}
    online, online_parts, online_grads = _criterion_run(student, model, x, y, losses, 40)
    offline, offline_parts, offline_grads = _criterion_run(student, model, x, y, losses, 40, topk=(ids, values))
    assert offline == pytest.approx(online, rel=2e-2) and offline_parts == pytest.approx(online_parts, rel=2e-2)
    assert all(torch.allclose(a, b, atol=2e-3) for a, b in zip(online_grads, offline_grads))

    out = tmp_path / "offline"
    r = llmctl("--quiet", "distill", "--teacher-outputs", store, "--student", "nano", "--data", shards,
               *FAST, "max_steps=2", "-o", out)
    assert r.code == 0, r.stderr
    assert [x["step"] for x in records(out) if "loss" in x] == [1, 2]
    r = llmctl("distill", "--teacher-outputs", store, "--data", shards, *FAST, "seq_len=16", "-o",
               tmp_path / "x")
    assert r.code == 2 and "windows of 32 tokens" in r.stderr


def test_distill_resumes_exactly_and_keeps_projections_out_of_the_student(llmctl, corpus, teacher, tmp_path):  # noqa: F811
    from safetensors import safe_open

    from llmctl.core.checkpoint import open_checkpoint
    from llmctl.core.model.io import load_model
    from llmctl.core.train.state import load_state

    out = tmp_path / "student"
    args = ["--teacher", teacher, "--student", "nano", "--data", corpus["shards"], *FAST, "max_steps=4",
            "save_every=2", "eval_every=2", "objective_args.losses={forward_kl: 1, ce: 0.5, hidden_cosine: 0.5}",
            "-o", out]
    r = llmctl("--quiet", "distill", *args)
    assert r.code == 0, r.stderr
    steps = [x for x in records(out) if "loss" in x]
    assert len(steps) == 4 and all(x["aux_loss"] != 0 for x in steps)
    meta, _ = load_state(out / "checkpoints" / "step-000004")
    assert sorted(meta["modules"]) == ["0.weight", "1.weight"]  # one projection 64 → 48 per mapped block
    assert list(meta["modules"]["0.weight"].shape) == [48, 64]
    with safe_open(out / "model.safetensors", "pt") as f:  # the student alone: no projection exported
        assert all(k.startswith(("model.", "lm_head.")) for k in f.keys())
    assert open_checkpoint(out).config["model_type"] == "llama"
    lineage = json.loads((out / "llmctl.json").read_text())
    assert lineage["config"]["objective"] == "distill" and lineage["command"] == "distill"
    reference, final = curve(out), load_model(out)[0].state_dict()

    shutil.rmtree(out / "checkpoints" / "step-000004")
    (out / "model.safetensors").unlink()
    r = llmctl("--quiet", "distill", "--resume", "-o", out)
    assert r.code == 0, r.stderr
    assert curve(out) == reference
    assert all(torch.equal(p, final[n]) for n, p in load_model(out)[0].state_dict().items())


def test_the_teacher_is_frozen_in_eval_mode_and_the_student_starts_from_its_blocks(corpus, teacher, tmp_path):  # noqa: F811
    from llmctl.config import load_config
    from llmctl.core.model.io import load_model
    from llmctl.core.train import distributed
    from llmctl.core.train.build import make_plan
    from llmctl.core.train.config import TrainConfig
    from llmctl.core.train.loop import Trainer

    cfg = load_config(TrainConfig, None, [f"data={corpus['shards']}", *FAST, "dropout=0.1", "objective=distill",
                                          f"objective_args.teacher={teacher}", "objective_args.student_init=teacher",
                                          "objective_args.losses={reverse_kl: 1, hidden_mse: 1}"], kind="train")
    plan = make_plan(cfg, "cpu")
    assert plan.model_config.num_layers == 2 and plan.model_config.hidden_size == 48
    (tmp_path / "run").mkdir()
    trainer = Trainer(plan, tmp_path / "run", torch.device("cpu"), distributed.Dist(), {})
    reference = load_model(teacher)[0].state_dict()
    start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    for name, value in start.items():  # block i is teacher block 2i; the rest is the teacher's
        source = name.replace("layers.1.", "layers.2.")
        assert torch.equal(value, reference[source]), name
    assert trainer.objective.extra() is None  # same width: no projection
    for _ in range(2):
        trainer.train_step()
    t = trainer.objective.teacher
    assert not t.training and all(p.grad is None and not p.requires_grad for p in t.parameters())
    assert all(torch.equal(p, reference[n]) for n, p in t.state_dict().items())
    assert not torch.equal(trainer.model.state_dict()["model.layers.1.mlp.up_proj.weight"],
                           start["model.layers.1.mlp.up_proj.weight"])


def test_refusals_name_the_problem(llmctl, corpus, teacher, tmp_path):  # noqa: F811
    from llmctl.core.data import Corpus, encode_corpus
    from llmctl.core.tokenizer import TrainSpec, load_tokenizer, train_tokenizer

    other = train_tokenizer(TrainSpec(algo="bytelevel", vocab_size=300), iter([["other words entirely"] * 50]))
    other.save(tmp_path / "tok")
    (tmp_path / "shards").mkdir()
    encode_corpus(Corpus([str(corpus["text"])]), other, tmp_path / "shards", val_fraction=0.1)
    common = ["--teacher", teacher, "--student", "nano", *FAST, "-o", tmp_path / "out"]
    r = llmctl("distill", "--data", tmp_path / "shards", *common)
    assert r.code == 2 and load_tokenizer(teacher).hash in r.stderr and other.hash in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = llmctl("distill", "--data", corpus["shards"], *common, "objective_args.losses={forward_kl: 1, jsdd: 1}")
    assert r.code == 2 and "did you mean 'jsd'" in r.stderr
    r = llmctl("distill", "--data", corpus["shards"], *common, "objective_args.temprature=2")
    assert r.code == 2 and "objective_args.temprature" in r.stderr
    r = llmctl("distill", "--data", corpus["shards"], "--student", "nano", *FAST, "-o", tmp_path / "out")
    assert r.code == 2 and "teacher" in r.stderr
    r = llmctl("train", f"data={corpus['shards']}", *FAST, "objective_args.teacher=x", "-o", tmp_path / "out")
    assert r.code == 2 and "objective causal takes none" in r.stderr
    assert not (tmp_path / "out").exists()


def test_an_adapter_student_trains_only_its_lora_tensors(corpus, teacher, tmp_path):  # noqa: F811
    from llmctl.config import load_config
    from llmctl.core.adapters import lora_modules
    from llmctl.core.model.io import load_model
    from llmctl.core.train import distributed
    from llmctl.core.train.build import make_plan
    from llmctl.core.train.config import TrainConfig
    from llmctl.core.train.loop import Trainer

    cfg = load_config(TrainConfig, None, [f"data={corpus['shards']}", *FAST, "objective=distill", f"model={teacher}",
                                          f"objective_args.teacher={teacher}", "objective_args.adapter=lora",
                                          "objective_args.lora={r: 4, target_modules: [q_proj, v_proj]}"],
                      kind="train")
    (tmp_path / "run").mkdir()
    trainer = Trainer(make_plan(cfg, "cpu"), tmp_path / "run", torch.device("cpu"), distributed.Dist(), {})
    assert len(lora_modules(trainer.model)) == 8  # q and v of 4 blocks
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train_step(), trainer.train_step()
    changed = {n for n, p in trainer.model.state_dict().items() if not torch.equal(p, before[n])}
    assert changed and all(".lora_" in n for n in changed)
    trainer.save()
    loaded, _ = load_model(tmp_path / "run" / "checkpoints" / "step-000002")  # the recorded transform comes back
    assert len(lora_modules(loaded)) == 8
    assert all(torch.equal(p, trainer.model.state_dict()[n]) for n, p in loaded.state_dict().items())
