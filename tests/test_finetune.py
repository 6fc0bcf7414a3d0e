"""`llmctl finetune`: adapters trained with train's trainer, in PEFT's format, read by every command."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
import transformers  # noqa: E402
import peft  # noqa: E402

from conftest import tiny_llama  # noqa: E402

from llmctl.core.model.io import load_model  # noqa: E402

FAST = ["--config", "tiny"]  # configs/finetune/tiny.yaml
IDS = torch.tensor([[5, 17, 42, 7, 99, 3, 150, 11]])


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    out = tmp_path_factory.mktemp("base")
    return tiny_llama(out, ["question: what is two plus three? answer: five. " * 20], vocab=200, context=128,
                      scale=2.0)


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    r = random.Random(0)
    path = tmp_path_factory.mktemp("data") / "sums.jsonl"
    with path.open("w") as f:
        for _ in range(40):
            a, b = r.randint(0, 9), r.randint(0, 9)
            f.write(json.dumps({"prompt": f"question: what is {a} plus {b}? answer:", "completion": f" {a + b}."}) + "\n")
    return path


def _logits(model):
    with torch.no_grad():
        out = model(IDS)
    return out.logits.float()


def _losses(out: Path) -> list[float]:
    return [x["loss"] for x in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in x]


def test_lora_finetune_writes_a_peft_adapter_every_command_reads(llmctl, base, records, tmp_path):
    out = tmp_path / "lora"
    before = (base / "model.safetensors").read_bytes()
    r = llmctl("--json", "finetune", base, *FAST, "--data", records, "merge_adapter=true", "-o", out)
    assert r.code == 0, r.stderr
    assert "SFT data: 38 examples" in r.stderr and json.loads(r.stdout)["method"] == "lora"
    assert (out / "adapter_config.json").is_file() and not (out / "config.json").exists()
    assert (base / "model.safetensors").read_bytes() == before  # the base is never written
    losses = _losses(out)
    assert losses[-1] < losses[0]

    # the optimizer state holds the adapter's tensors only
    from safetensors import safe_open

    state = safe_open(out / "checkpoints" / "step-000006" / "trainer_state" / "state.safetensors", "pt")
    moments = {k for k in state.keys() if k.startswith("optimizer.")}
    assert moments and all(".lora_A." in k or ".lora_B." in k for k in moments)
    assert len(moments) == 2 * 2 * 2 * 3  # 2 layers x (q, v) x (A, B) x (step, exp_avg, exp_avg_sq)

    # PEFT reads it and computes our logits
    ours, _ = load_model(out)
    hf = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(hf, out).eval()
    with torch.no_grad():
        assert torch.allclose(_logits(ours), theirs(IDS).logits, atol=1e-4, rtol=0)
    assert not torch.allclose(_logits(ours), _logits(load_model(base)[0]), atol=1e-3)

    # merged == unmerged
    merged, _ = load_model(out / "merged")
    assert not merged.transforms and torch.allclose(_logits(merged), _logits(ours), atol=1e-5, rtol=0)

    # generate, eval and info take the adapter directory
    g = llmctl("--json", "generate", out, "question: what is 2 plus 3? answer:", "--max-new-tokens", "3",
               "--temperature", "0")
    assert g.code == 0, g.stderr
    gm = llmctl("--json", "generate", out / "merged", "question: what is 2 plus 3? answer:", "--max-new-tokens", "3",
                "--temperature", "0")
    assert json.loads(g.stdout)["tokens"] == json.loads(gm.stdout)["tokens"]
    text = tmp_path / "eval.txt"
    text.write_text("question: what is 4 plus 4? answer: 8.\n" * 4)
    e = llmctl("--json", "eval", out, "--task", "perplexity", "--data", text)
    assert e.code == 0, e.stderr
    assert json.loads((out / "llmctl.json").read_text())["metrics"][-1]["task"] == "perplexity"
    i = llmctl("--json", "info", out)
    adapter = json.loads(i.stdout)["adapter"]
    assert adapter["method"] == "lora" and adapter["r"] == 4 and adapter["modules"] == 4
    assert 0 < adapter["trainable_share"] < 0.05


def test_qlora_trains_on_an_nf4_base_in_bf16(llmctl, base, records, tmp_path):
    out = tmp_path / "qlora"
    r = llmctl("finetune", base, *FAST, "--method", "qlora", "--data", records, "precision=auto", "max_steps=3",
               "adapter.target_modules=all-linear", "-o", out)
    assert r.code == 0, r.stderr
    lineage = json.loads((out / "llmctl.json").read_text())
    assert [t["type"] for t in lineage["base_transforms"]] == ["nf4"] and lineage["command"] == "finetune"
    model, _ = load_model(out)
    from llmctl.core.quant.nf4 import NF4Linear

    assert isinstance(model.model.layers[0].mlp.up_proj, NF4Linear)
    assert float(model.model.layers[0].mlp.up_proj.lora_B.weight.detach().abs().sum()) > 0
    assert all(torch.isfinite(torch.tensor(_losses(out))))


def test_bad_record_and_method_are_named(llmctl, base, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n')
    r = llmctl("finetune", base, *FAST, "--data", bad, "-o", tmp_path / "out")
    assert r.code == 1 and f"{bad}:2: a record needs" in r.stderr and not (tmp_path / "out").exists()
    r = llmctl("finetune", base, *FAST, "--data", bad, "--method", "lorra", "-o", tmp_path / "out")
    assert r.code == 2 and "did you mean 'lora'" in r.stderr


def spawn_finetune(*args) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "llmctl", "--quiet", "finetune", *map(str, args)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def kill_then_resume(args: list, resume_args: list, ref: Path, cut: Path, kill_at: int) -> None:
    """`finetune ARGS` to the end in `ref`; the same in `cut`, SIGKILLed once checkpoint `kill_at`
    is written, then resumed there with `resume_args`."""
    whole, killed = spawn_finetune(*args, "-o", ref), spawn_finetune(*args, "-o", cut)
    deadline = time.time() + 300  # a loaded machine
    while not (cut / "checkpoints" / f"step-{kill_at:06d}" / "trainer_state" / "state.json").is_file():
        assert killed.poll() is None and time.time() < deadline, killed.communicate()[1]
        time.sleep(0.02)
    killed.kill()
    killed.wait()
    assert whole.wait(timeout=400) == 0, whole.communicate()[1]
    assert not (cut / "adapter_config.json").exists()  # it never finished
    resumed = spawn_finetune(*resume_args, "-o", cut, "--resume")
    assert resumed.wait(timeout=400) == 0, resumed.communicate()[1]


def test_sigkill_then_resume_reproduces_the_uninterrupted_run(base, records, tmp_path):
    args = [base, *FAST, "--data", records, "--method", "dora", "max_steps=14", "save_every=4", "keep_last=5",
            "adapter.dropout=0.1"]
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    kill_then_resume(args, [base, "--data", records], ref, cut, kill_at=8)
    assert _losses(cut) == _losses(ref)
    assert (cut / "adapter_model.safetensors").read_bytes() == (ref / "adapter_model.safetensors").read_bytes()


def test_long_context_finetune_rescales_rope_and_the_adapter_keeps_it(llmctl, base, tmp_path):
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps({"text": "question: what is two plus two? answer: four. " * 14}) + "\n"
                            for _ in range(6)))
    args = ["finetune", base, *FAST, "--data", data, "seq_len=200", "max_steps=2"]
    r = llmctl(*args, "-o", tmp_path / "short")
    assert r.code == 2 and "exceeds the context of model" in r.stderr  # base context: 128
    r = llmctl(*args, "max_seq_len=256", "rope_scaling={type: linear, factor: 2.0}", "-o", tmp_path / "long")
    assert r.code == 0, r.stderr
    model, cfg = load_model(tmp_path / "long")
    assert cfg.max_seq_len == 256 and cfg.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    plain, _ = load_model(base)
    rescaled, _ = load_model(base, config=cfg)  # the base's weights fit the longer context
    ids = torch.randint(0, 200, (1, 180))
    with torch.no_grad():
        assert model(ids).logits.shape[1] == 180
        assert not torch.allclose(rescaled(ids[:, :100]).logits, plain(ids[:, :100]).logits, atol=1e-3)


def test_a_short_lora_sft_raises_word_order_accuracy(llmctl, tmp_path):
    """The demo: LoRA on sentences of the built-in word_order generator (another seed than the
    eval's) lifts `llmctl eval --task word_order` from chance well past its standard error."""
    from llmctl.core.evaluate.builtin import ADJECTIVES, DETERMINERS, NOUNS, VERBS, generate

    (tmp_path / "base").mkdir()
    vocabulary = " ".join(DETERMINERS + ADJECTIVES + NOUNS + VERBS)
    base = tiny_llama(tmp_path / "base", [f"Sentence: {vocabulary} "] * 20, vocab=120, context=64, scale=1.0)
    data = tmp_path / "sentences.jsonl"
    data.write_text("".join(json.dumps({"prompt": "Sentence:", "completion": " " + d["choices"][d["gold"]]}) + "\n"
                            for d in generate("word_order", 300, seed=1)))

    def accuracy(model):
        r = llmctl("--json", "eval", model, "--task", "word_order", "--limit", "80", "--no-record")
        assert r.code == 0, r.stderr
        return json.loads(r.stdout)["results"][str(model)]["word_order"]

    before = accuracy(base)
    r = llmctl("finetune", base, *FAST, "--data", data, "adapter.target_modules=all-linear", "adapter.r=8",
               "adapter.alpha=16", "max_steps=30", "batch_size=8", "save_every=0", "lr=1e-2", "-o", tmp_path / "sft")
    assert r.code == 0, r.stderr
    after = accuracy(tmp_path / "sft")
    print(f"word_order acc: {before['acc']:.3f} -> {after['acc']:.3f}")
    assert after["acc"] - before["acc"] > 2 * max(before["acc_stderr"], after["acc_stderr"])


def test_adapter_method_comes_from_the_method_or_the_adapter_shorthand():
    from llmctl.commands.finetune import _adapter_shorthand
    from llmctl.config import load_config
    from llmctl.core.train.finetune_config import FinetuneConfig

    sft = load_config(FinetuneConfig, None, ["method=dora", "adapter.r=4"])
    assert (sft.adapter_method, sft.training_objective) == ("dora", "sft")
    pref = load_config(FinetuneConfig, None, ["method=dpo", _adapter_shorthand("adapter=qlora"), "adapter.r=4"])
    assert (pref.adapter_method, pref.training_objective, pref.adapter.r) == ("qlora", "dpo", 4)
    assert _adapter_shorthand("adapter.r=4") == "adapter.r=4"


def test_sft_loss_over_chunks_equals_the_model_loss(base, monkeypatch):
    """With a frozen head the SFT objective makes logits for the learned positions only, a chunk at
    a time: the same loss and adapter gradients as the model's own cross-entropy."""
    from types import SimpleNamespace

    from llmctl.core.model import logprobs

    monkeypatch.setattr(logprobs, "CHUNK", 1)
    monkeypatch.setattr(logprobs, "MIN_ROWS", 100)  # ~540 learned positions: 6 chunks

    from llmctl.core.adapters import LoRA, mark_trainable
    from llmctl.core.train.sft import SFT

    model, _ = load_model(base, transforms=[LoRA(r=2, target_modules="all-linear")])
    mark_trainable(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    ids = torch.randint(3, 190, (3, 300), generator=torch.Generator().manual_seed(0))
    labels = torch.where(torch.rand(3, 300, generator=torch.Generator().manual_seed(1)) < 0.6, ids, -100)
    grads = []
    for loss_of in (lambda: SFT.loss(SimpleNamespace(_model=model), model, ids, labels, {})[0],
                    lambda: model(ids, labels=labels).loss):
        model.zero_grad()
        loss = loss_of()
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    (ours, ours_grads), (reference, reference_grads) = grads
    assert torch.allclose(ours, reference, atol=1e-5, rtol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5, rtol=1e-4) for a, b in zip(ours_grads, reference_grads))


def test_packed_rows_of_one_document_each_need_no_document_mask(base):
    """A batch whose rows each hold one document trains without `document_ids` (SDPA's causal kernel,
    positions from 0): the same logits as with them; rows of several documents keep them."""
    from types import SimpleNamespace

    from llmctl.core.train.objectives import Objective
    from llmctl.core.train.sft import SFT

    sft = SimpleNamespace(cfg=SimpleNamespace(packing=True), device=torch.device("cpu"))
    sft._to_device = Objective._to_device.__get__(sft)
    ids = torch.randint(3, 190, (2, 33), generator=torch.Generator().manual_seed(0))
    one = torch.stack([ids, torch.ones_like(ids), torch.zeros_like(ids)], 1)
    one[1, 2] = 7  # the document id is per row: another row may number its one document differently
    inputs, labels, extra = SFT.batch(sft, one, 0)
    assert extra == {} and torch.equal(inputs, ids[:, :-1]) and torch.equal(labels, ids[:, 1:])
    two = one.clone()
    two[0, 2, 20:] = 1
    assert torch.equal(SFT.batch(sft, two, 0)[2]["document_ids"], two[:, 2, :-1])
    model, _ = load_model(base)
    with torch.no_grad():
        assert torch.allclose(model(inputs).logits, model(inputs, document_ids=one[:, 2, :-1]).logits, atol=1e-5)
