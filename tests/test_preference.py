"""Preference finetuning (dpo, ipo, simpo, orpo, kto): data, references, metrics, exact resume."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
import transformers  # noqa: E402,F401

from conftest import tiny_llama  # noqa: E402

from llmctl.core.model.io import load_model  # noqa: E402

from test_finetune import FAST, base, kill_then_resume  # noqa: E402, F401  (the finetune tests' tiny base)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    r = random.Random(0)
    folder = tmp_path_factory.mktemp("data")
    with (folder / "pairs.jsonl").open("w") as f, (folder / "kto.jsonl").open("w") as g:
        for i in range(24):
            a, b = r.randint(0, 9), r.randint(0, 9)
            prompt = f"question: what is {a} plus {b}? answer:"
            f.write(json.dumps({"prompt": prompt, "chosen": f" {a + b}.", "rejected": f" {a + b + 1 + i % 3}."}) + "\n")
            g.write(json.dumps({"prompt": prompt, "completion": f" {a + b + i % 2}.", "label": i % 2 == 0}) + "\n")
    return folder


def word_order_base(folder: Path) -> Path:
    """A tiny Llama whose tokenizer knows the words of the built-in word_order task."""
    from llmctl.core.evaluate.builtin import ADJECTIVES, DETERMINERS, NOUNS, VERBS

    folder.mkdir(parents=True, exist_ok=True)
    vocabulary = " ".join(DETERMINERS + ADJECTIVES + NOUNS + VERBS)
    return tiny_llama(folder, [f"Sentence: {vocabulary} "] * 20, vocab=120, context=64, scale=1.0)


def word_order_data(folder: Path) -> Path:
    """A word-order base model, 300 training pairs and 80 held-out ones (the reward models' data)."""
    base = word_order_base(folder / "base")
    word_order_pairs(folder / "train.jsonl", 300, seed=1)
    word_order_pairs(folder / "held_out.jsonl", 80, seed=2)
    return base


def word_order_pairs(path: Path, n: int, seed: int) -> Path:
    """Synthetic pairs from the built-in word_order task (another seed than its eval's): the
    grammatical sentence chosen over a shuffled one."""
    from llmctl.core.evaluate.builtin import generate

    with path.open("w") as f:
        for d in generate("word_order", n, seed=seed):
            wrong = [c for i, c in enumerate(d["choices"]) if i != d["gold"]]
            f.write(json.dumps({"prompt": "Sentence:", "chosen": " " + d["choices"][d["gold"]],
                                "rejected": " " + wrong[0]}) + "\n")
    return path


def _objective(base, data, method, *overrides):
    """(objective, model, a batch's (inputs, labels, extra)) as the trainer builds them."""
    from llmctl.config import load_config
    from llmctl.core.train.build import make_plan
    from llmctl.core.train.distributed import Dist
    from llmctl.core.train.finetune_config import FinetuneConfig
    from llmctl.core.train.objectives import OBJECTIVES

    cfg = load_config(FinetuneConfig, "tiny", [f"method={method}", *overrides], kind="finetune")
    cfg.model, cfg.data, cfg.objective = str(base), [str(data)], cfg.training_objective
    plan = make_plan(cfg, "cpu")
    objective = OBJECTIVES.get(plan.objective)(plan, torch.device("cpu"))
    model = load_model(plan.init_from, dtype=torch.float32, config=plan.model_config)[0]
    objective.prepare(model)
    model.train()
    data = objective.data(Dist())
    return objective, model, objective.batch(data.batch(0), 0)


class Counting(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.model(*args, **kwargs)


@pytest.mark.parametrize("method", ["simpo", "orpo"])
def test_reference_free_methods_hold_and_run_no_reference(base, pairs, method):
    objective, model, (inputs, labels, extra) = _objective(base, pairs / "pairs.jsonl", method, "adapter.method=full")
    assert objective.companions() == {} and objective.reference_source is None
    counting = Counting(model)
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    loss, _ = objective.loss(counting, inputs, labels, extra)
    assert counting.calls == 1 and len(calls) == 1  # one forward pass: the policy's, chosen and rejected together
    assert inputs.shape[0] == 2 * objective.cfg.batch_size and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_adapter_off_reference_equals_a_frozen_copy(base, pairs):
    lora, model, (inputs, labels, extra) = _objective(base, pairs / "pairs.jsonl", "dpo", "adapter.method=lora")
    assert lora.reference_source == "adapter" and lora.companions() == {}
    with torch.no_grad():  # a trained-looking adapter, so the policy differs from the base
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    reference = lora.reference_logps(inputs, labels, extra)
    policy, _ = lora.policy_logps(model, inputs, labels)
    full, copy_model, _ = _objective(base, pairs / "pairs.jsonl", "dpo", "adapter.method=full")
    assert full.reference_source == "copy" and set(full.companions()) == {"reference"}
    frozen = full.reference_logps(inputs, labels, extra)
    assert torch.allclose(reference.sums, frozen.sums, atol=1e-5, rtol=0)
    assert torch.equal(reference.counts, frozen.counts)
    assert not torch.allclose(policy.sums, reference.sums, atol=1e-2)
    # and the adapter is back on after the reference pass
    assert torch.allclose(lora.policy_logps(model, inputs, labels)[0].sums, policy.sums)
    # the per-sequence sums are the tokens' log-probs of a plain forward pass
    logits = load_model(base)[0](inputs).logits.log_softmax(-1)
    mask = labels != -100
    manual = (logits.gather(-1, labels.clamp(min=0)[..., None])[..., 0] * mask).sum(1)
    assert torch.allclose(frozen.sums, manual, atol=1e-4, rtol=0)
    del copy_model


def test_precomputed_reference_is_cached_and_equals_the_online_one(base, pairs, tmp_path, monkeypatch):
    import llmctl.core.train.reference as ref_module

    data = tmp_path / "pairs.jsonl"
    data.write_bytes((pairs / "pairs.jsonl").read_bytes())
    pre, _, (inputs, labels, extra) = _objective(base, data, "dpo", "adapter.method=full",
                                                 "objective_args.precompute_ref=true")
    assert pre.companions() == {} and pre.reference_source == "precomputed"
    [cache] = tmp_path.glob(".pairs.jsonl.ref-*.safetensors")
    online, _, _ = _objective(base, data, "dpo", "adapter.method=full")
    assert torch.allclose(pre.reference_logps(inputs, labels, extra).sums,
                          online.reference_logps(inputs, labels, extra).sums, atol=1e-4, rtol=0)

    def fail(*args):
        raise AssertionError("recomputed despite the cache")
    monkeypatch.setattr(ref_module, "_compute", fail)
    again, _, batch = _objective(base, data, "ipo", "adapter.method=full",
                                 "objective_args.precompute_ref=true")  # same data and base: the cache serves ipo too
    assert torch.equal(batch[2]["reference"], extra["reference"])
    assert list(tmp_path.glob(".pairs.jsonl.ref-*.safetensors")) == [cache]


def test_every_method_trains_and_logs_trl_metrics(llmctl, base, pairs, tmp_path):
    for method, data in [("dpo", "pairs"), ("kto", "kto")]:
        out = tmp_path / method
        r = llmctl("finetune", base, *FAST, "--method", method, "--data", pairs / f"{data}.jsonl", "adapter=lora",
                   "max_steps=2", "save_every=0", "-o", out)
        assert r.code == 0, r.stderr
        assert (out / "adapter_config.json").is_file()
        steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
        if method == "dpo":
            want = {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen"}
            assert all(want <= set(s) for s in steps), steps
        else:  # a batch of two may hold only desirable or only undesirable examples
            assert all("kl" in s and ("rewards/chosen" in s or "rewards/rejected" in s) for s in steps), steps
        if method == "dpo":  # step 1: the adapter is still zero, so policy = reference
            assert steps[0]["rewards/chosen"] == 0 and abs(steps[0]["loss"] - 0.6931472) < 1e-5
        vals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"val_loss"' in x]
        assert vals and all("val_ppl" not in v for v in vals)  # a preference loss has no perplexity


def test_bad_records_are_named_with_file_and_line(llmctl, base, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"}\n')
    r = llmctl("finetune", base, *FAST, "--method", "dpo", "--data", bad, "-o", tmp_path / "out")
    assert r.code == 1 and f"{bad}:2: a preference pair record needs" in r.stderr and "missing rejected" in r.stderr
    assert not (tmp_path / "out").exists()
    bad.write_text('{"prompt": "a", "completion": "b", "label": "yes"}\n')
    r = llmctl("finetune", base, *FAST, "--method", "kto", "--data", bad, "-o", tmp_path / "out")
    assert r.code == 1 and f"{bad}:1: field 'label' must be true or false" in r.stderr
    r = llmctl("finetune", base, *FAST, "--method", "dpo", "--data", bad, "objective_args.bta=1", "-o", tmp_path / "o")
    assert r.code == 2 and "objective_args.bta" in r.stderr and "did you mean 'beta'" in r.stderr


def test_conversational_pairs_mask_the_assistant_answer(base):
    from llmctl.core.chat_templates import resolve_template
    from llmctl.core.data.preference import PreferenceEncoder
    from llmctl.core.tokenizer import load_tokenizer

    tok = load_tokenizer(base)
    template, _ = resolve_template("chatml")
    encoder = PreferenceEncoder(tok, template=template)
    record = {"prompt": [{"role": "user", "content": "two plus three?"}],
              "chosen": [{"role": "assistant", "content": "five"}],
              "rejected": [{"role": "assistant", "content": "six"}]}
    (chosen, rejected), label = encoder(record, "x:1")
    assert label is None
    learned = tok.decode([i for i, m in zip(chosen.ids, chosen.mask) if m])
    assert learned.startswith("five") and "two plus" not in learned
    n = chosen.mask.index(True)
    assert chosen.ids[:n] == rejected.ids[:n]  # the same prompt before both answers


def _records(out: Path) -> list[dict]:
    timing = {"tokens_per_s", "mfu"}
    return [{k: v for k, v in json.loads(x).items() if k not in timing}
            for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_sigkill_then_resume_reproduces_the_uninterrupted_run(base, pairs, tmp_path):
    args = [base, *FAST, "--method", "dpo", "--data", pairs / "pairs.jsonl", "adapter=lora", "max_steps=8",
            "save_every=2", "keep_last=5", "adapter.dropout=0.1", "objective_args.precompute_ref=true"]
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    kill_then_resume(args, [base, "--data", pairs / "pairs.jsonl"], ref, cut, kill_at=4)
    assert _records(cut) == _records(ref)
    assert (cut / "adapter_model.safetensors").read_bytes() == (ref / "adapter_model.safetensors").read_bytes()


def test_dpo_on_synthetic_pairs_raises_the_margin_and_word_order_accuracy(llmctl, tmp_path):
    """The demo: DPO (LoRA, the base as reference) on grammatical-over-shuffled pairs from the
    built-in word_order generator (another seed than the eval's) lifts the reward margin from 0
    and `llmctl eval --task word_order` on its held-out prompts well past its standard error."""
    base = word_order_base(tmp_path / "base")
    data = word_order_pairs(tmp_path / "pairs.jsonl", 300, seed=1)

    def accuracy(model):
        r = llmctl("--json", "eval", model, "--task", "word_order", "--limit", "80", "--no-record")
        assert r.code == 0, r.stderr
        return json.loads(r.stdout)["results"][str(model)]["word_order"]

    before = accuracy(base)
    r = llmctl("finetune", base, *FAST, "--method", "dpo", "--data", data, "adapter=lora",
               "adapter.target_modules=all-linear", "adapter.r=8", "adapter.alpha=16", "objective_args.beta=1.0",
               "max_steps=30", "batch_size=8", "save_every=0", "lr=1e-2", "-o", tmp_path / "dpo")
    assert r.code == 0, r.stderr
    after = accuracy(tmp_path / "dpo")
    steps = [json.loads(x) for x in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    margins = [s["rewards/margins"] for s in steps]
    late = sum(margins[-10:]) / 10
    print(f"word_order acc: {before['acc']:.3f} -> {after['acc']:.3f}; margin: {margins[0]:.3f} -> {late:.3f}")
    assert margins[0] == 0 and late > 0.1
    assert after["acc"] - before["acc"] > 2 * max(before["acc_stderr"], after["acc_stderr"])


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_ddp_two_processes_match_one(base, pairs, tmp_path, strategy):
    """The trainer's DDP and FSDP (the head, run apart from the wrapped forward, gathered too; the
    reference is the sharded base with the adapter off): 2 ranks × 2 pairs give the single
    process's 4-pair losses."""
    import socket

    from conftest import run_process

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [base, *FAST, "--method", "dpo", "--data", pairs / "pairs.jsonl", "adapter=lora", "max_steps=3",
            "save_every=0", "objective_args.beta=0.5", "val_fraction=0.05", "eval_every=1"]  # one validation row: rank 1 has none
    r = run_process("--quiet", "finetune", *args, "batch_size=4", "-o", tmp_path / "one")
    assert r.code == 0, r.stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}", "-m", "llmctl",
           "--quiet", "finetune", *map(str, args), "batch_size=2", f"distributed.strategy={strategy}",
           "-o", str(tmp_path / "two")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = ([x["loss"] for x in _records(tmp_path / d) if "loss" in x] for d in ("one", "two"))
    assert len(one) == 3 and one[-1] != one[0]
    assert two == pytest.approx(one, rel=1e-4, abs=1e-6)


def test_kto_rows_hold_labels_and_the_kl_counterpart(base, tmp_path):
    from llmctl.core.data.preference import DESIRABLE, UNDESIRABLE, PreferenceEncoder, encode_preferences
    from llmctl.core.tokenizer import load_tokenizer

    tok = load_tokenizer(base)
    data = tmp_path / "kto.jsonl"
    records = [("two plus three?", " five.", True), ("one plus one?", " three.", False), ("four?", " four.", True)]
    data.write_text("".join(json.dumps({"prompt": p, "completion": c, "label": y}) + "\n" for p, c, y in records))
    rows, stats = encode_preferences([data], PreferenceEncoder(tok, paired=False), length=40, pad_id=2)
    assert rows.shape == (3, 2, 2, 40) and (stats.records, stats.desirable) == (3, 2)
    assert [int(r[0, 1].max()) for r in rows] == [DESIRABLE, UNDESIRABLE, DESIRABLE]

    def text(seq, learned):
        ids, mask = seq[0].tolist(), seq[1].tolist()
        return tok.decode([i for i, m in zip(ids, mask) if bool(m) == learned and i != 2])
    for i, (prompt, _, _) in enumerate(records):  # prompt i with the completion of record i - 1
        assert text(rows[i, 1], False).endswith(prompt) and text(rows[i, 1], True) == text(rows[i - 1, 0], True)
