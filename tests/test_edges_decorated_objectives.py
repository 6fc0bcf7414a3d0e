"""Edges of decorated functions that mutmut reached only once `scripts/undecorate.py` rewrote
them (round 11): KTO's `encode`, GRPO's rollouts and saved rounds, the criterion's `hidden`, the
reference log-probs, the shards' window count and the validation loss. Values are worked out by
hand or taken from a reference (transformers' Llama, torch's cross-entropy, DPO's pair encoding)."""

from __future__ import annotations

import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """A byte-level BPE tokenizer (BOS/EOS/PAD = 0/1/2) of a few arithmetic questions."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from llmctl.core.tokenizer import load_tokenizer

    out = tmp_path_factory.mktemp("tok")
    inner = Tokenizer(models.BPE())
    inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    inner.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|bos|>", "<|eos|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    inner.train_from_iterator([f"what is {a} plus {a}? {a + a}." for a in range(10)], trainer)
    inner.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|bos|>", "eos_token": "<|eos|>",
        "pad_token": "<|pad|>", "model_max_length": 64}))
    return load_tokenizer(out)


def test_the_criterion_asks_for_hidden_states_only_for_a_hidden_state_loss():
    from llmctl.core.distill.criterion import Criterion

    assert Criterion({"hidden_mse": 1.0}).hidden is True
    assert Criterion({"forward_kl": 0.5, "hidden_cosine": 0.5}).hidden is True
    assert Criterion({"forward_kl": 1.0, "ce": 0.5}).hidden is False


def _shards(lengths: list[int], seq_len: int, **options):
    from llmctl.core.train.data import ShardBatches

    arrays = [np.arange(n, dtype=np.uint16) + 1000 * i for i, n in enumerate(lengths)]
    options = {"batch_size": 1, "seed": 0, "sampling": "sequential", **options}
    return arrays, ShardBatches(arrays, [], seq_len=seq_len, **options)


def test_the_window_count_is_each_streams_full_windows_at_stride_seq_len():
    """A window is seq_len + 1 tokens (inputs and the shifted labels), the next one starts
    seq_len later: a stream of n tokens holds floor((n - 1) / seq_len) of them, and a stream
    of seq_len tokens or fewer is left out."""
    for lengths, want in [([33], 1), ([64], 1), ([65], 2), ([97], 3), ([96], 2),
                          ([33, 10, 65, 32, 97], 1 + 2 + 3), ([200, 40], 6 + 1)]:
        windows = _shards(lengths, 32)[1].windows
        assert windows == want and type(windows) is int, (lengths, windows)
    assert _shards([11, 4, 21], 5)[1].windows == 2 + 4


def test_sequential_batches_visit_exactly_the_counted_windows_then_wrap():
    arrays, batches = _shards([33, 10, 65], 32)
    assert batches.windows == 3
    rows = [batches.batch(i)[0] for i in range(batches.windows + 1)]
    want = [arrays[0][0:33], arrays[2][0:33], arrays[2][32:65]]
    for row, expected in zip(rows, want):
        assert torch.equal(row, torch.from_numpy(expected.astype(np.int64)))
    assert torch.equal(rows[-1], rows[0])  # window 3 is window 0 of the next epoch


def test_a_rollout_is_prompt_plus_completion_rows_by_hand():
    from llmctl.core.rl.grpo import Rollout

    r = Rollout.build([[7, 8, 9], [5]], [[1, 2], []], ["ab", ""], [True, False], "cpu", pad_id=0)
    assert r.ids.tolist() == [[7, 8, 9, 1, 2], [5, 0, 0, 0, 0]] and r.ids.dtype == torch.long
    assert r.targets.tolist() == [[1, 2], [0, 0]] and r.targets.dtype == torch.long
    assert r.mask.tolist() == [[1.0, 1.0], [0.0, 0.0]] and r.mask.dtype == torch.float32
    assert r.positions.tolist() == [[2, 3], [0, 1]]  # the position before each completion token
    assert r.truncated.tolist() == [True, False] and r.truncated.dtype == torch.bool
    assert r.texts == ["ab", ""]
    # a longer completion after a shorter prompt: positions stop at the last column
    r = Rollout.build([[1, 2, 3], [4]], [[], [5, 6]], ["", "x"], [False, True], "cpu", pad_id=9)
    assert r.ids.tolist() == [[1, 2, 3], [4, 5, 6]]
    assert r.targets.tolist() == [[9, 9], [5, 6]] and r.mask.tolist() == [[0.0, 0.0], [1.0, 1.0]]
    assert r.positions.tolist() == [[2, 2], [0, 1]]
    # no completion at all still has one (masked) column
    r = Rollout.build([[3, 4]], [[]], [""], [False], "cpu", pad_id=0)
    assert r.ids.tolist() == [[3, 4]] and r.targets.tolist() == [[0]] and r.mask.tolist() == [[0.0]]
    assert r.positions.tolist() == [[1]]
    moved = Rollout.build([[1, 2]], [[3]], ["c"], [True], torch.device("meta"), pad_id=0)  # onto the device given
    assert {t.device.type for t in (moved.ids, moved.positions, moved.targets, moved.mask, moved.truncated)} == {"meta"}


def _round(num_items, with_ref: bool):
    from llmctl.core.rl.grpo import Part, Rollout, Round

    g = torch.Generator().manual_seed(0)
    parts = []
    for i in range(3):
        rollout = Rollout.build([[1, 2 + i], [3]], [[4, 5], [6 + i]], ["", ""], [i == 1, False], "cpu", pad_id=0)
        ref = torch.randn(2, 2, generator=g) if with_ref else None
        old = torch.randn(2, 2, generator=g) if with_ref else None
        parts.append(Part(rollout, torch.randn(2, generator=g), rollout.mask * (i + 1), ref, old))
    return Round(11, parts, num_items)


@pytest.mark.parametrize("num_items, with_ref", [(12.5, True), (None, False)])
def test_a_saved_round_loads_back_part_by_part(num_items, with_ref):
    """What a resumed run trains on: every part's tensors, in order, the round's number and
    dapo's normaliser (absent when none)."""
    from llmctl.core.rl.grpo import Round

    saved = _round(num_items, with_ref)
    state = saved.state()
    assert ("num_items" in state) == (num_items is not None)
    loaded = Round.from_state(state, torch.device("cpu"))
    assert loaded.number == 11 and type(loaded.number) is int
    assert loaded.num_items == num_items and len(loaded.parts) == 3
    for a, b in zip(saved.parts, loaded.parts):
        for name in ("ids", "positions", "targets", "mask", "truncated"):
            x, y = getattr(a.rollout, name), getattr(b.rollout, name)
            assert torch.equal(x, y) and x.dtype == y.dtype, name
        assert b.rollout.texts == []
        assert torch.equal(a.advantages, b.advantages) and torch.equal(a.mask, b.mask)
        for x, y in ((a.ref, b.ref), (a.old, b.old)):
            assert (x is None and y is None) or torch.equal(x, y)
    moved = Round.from_state(state, torch.device("meta"))  # onto the device given (meta: no data)
    tensors = [t for p in moved.parts for t in (p.rollout.ids, p.rollout.truncated, p.advantages, p.mask, p.ref)
               if t is not None]
    assert len(tensors) == 3 * (5 if with_ref else 4) and all(t.device.type == "meta" for t in tensors)


def test_kto_encodes_labelled_examples_as_trl_does(tok, tmp_path):
    """KTO reads unpaired records (`prompt`, `completion`, `label`): each row is the example and,
    for the KL term, its prompt with the previous example's completion (TRL's rotation; the first
    takes the last's). The same tokens as DPO's pairs (chosen = the completion, rejected = the
    previous one), the completion's mask doubled for an undesirable example."""
    import json
    from types import SimpleNamespace

    from llmctl.core.train.finetune_config import FinetuneConfig
    from llmctl.core.train.preference import DPO, KTO

    examples = [("what is 1 plus 1?", " 2.", True), ("what is 2 plus 2?", " 5.", False),
                ("what is 3 plus 3?", " 6.", True)]
    kto, dpo = tmp_path / "kto.jsonl", tmp_path / "dpo.jsonl"
    kto.write_text("".join(json.dumps({"prompt": p, "completion": c, "label": y}) + "\n" for p, c, y in examples))
    dpo.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": examples[i - 1][1]}) + "\n"
                           for i, (p, c, _) in enumerate(examples)))

    def encode(cls, path, objective):
        lines = []
        plan = SimpleNamespace(config=FinetuneConfig(model="base", seq_len=32), tokenizer=tok,
                               text_files=[str(path)], val_files=[], objective=objective,
                               report=SimpleNamespace(info=lines.append))
        return cls.encode(plan), lines

    (got, lines), (want, _) = encode(KTO, kto, "kto"), encode(DPO, dpo, "dpo")
    assert lines == [f"kto data: 3 examples, longest sequence {got['stats'].longest} tokens, "
                     "2 desirable / 1 undesirable"]
    assert got["val"] is None and got["train"].shape == want["train"].shape == (3, 2, 2, 33)
    rows, pairs = got["train"], want["train"]
    assert torch.equal(rows[:, :, 0], pairs[:, :, 0])
    assert torch.equal(rows[:, 1, 1], pairs[:, 1, 1])
    assert torch.equal(rows[:, 0, 1], pairs[:, 0, 1] * torch.tensor([1, 2, 1])[:, None])


@pytest.fixture(scope="module")
def bf16_base(tmp_path_factory):
    """A tiny HF Llama checkpoint stored in bfloat16 (its float32 load is exact)."""
    import shutil

    import transformers
    from conftest import tiny_llama

    root = tmp_path_factory.mktemp("reference")
    (root / "f32").mkdir()
    base = tiny_llama(root / "f32", ["question: what is two plus three? answer: five. " * 20], vocab=200,
                      context=128, scale=2.0)
    transformers.LlamaForCausalLM.from_pretrained(base).to(torch.bfloat16).save_pretrained(root / "bf16")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(base / name, root / "bf16")
    return root / "bf16"


def _dpo(base, tmp_path, *overrides):
    import json

    from _recorder import Recorder

    from llmctl.config import load_config
    from llmctl.core.train.build import make_plan
    from llmctl.core.train.finetune_config import FinetuneConfig
    from llmctl.core.train.objectives import OBJECTIVES

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"question: what is {a} plus {a}? answer:", "chosen": f" {a + a}.",
                                        "rejected": f" {a + a + 1}."}) + "\n" for a in range(7)))
    cfg = load_config(FinetuneConfig, "tiny", ["method=dpo", "batch_size=2", "val_fraction=0.3", *overrides],
                      kind="finetune")
    cfg.model, cfg.data, cfg.objective = str(base), [str(data)], cfg.training_objective
    plan = make_plan(cfg, "cpu")
    plan.report = Recorder()
    return OBJECTIVES.get("dpo")(plan, torch.device("cpu"))


def _sums(model, rows) -> torch.Tensor:
    """[N, 2] log-prob sums of each sequence's learned tokens, one sequence at a time."""
    from torch.nn import functional as F

    out = torch.zeros(len(rows), 2, dtype=torch.float64)
    with torch.no_grad():
        for i in range(len(rows)):
            for s in range(2):
                ids, mask = rows[i, s, 0], rows[i, s, 1]
                logp = F.log_softmax(model(ids[None, :-1]).logits[0].float(), -1)
                token = logp.gather(-1, ids[1:, None])[:, 0]
                out[i, s] = float(token[mask[1:] != 0].sum())
    return out


def test_reference_logps_are_the_bases_in_float32_with_the_runs_context(bf16_base, tmp_path):
    """`precompute_ref`'s sums are transformers' Llama's for the base loaded in float32 (it is
    stored in bfloat16) with the run's RoPE scaling, every pair of every split, scored
    batch_size pairs at a time under one progress bar."""
    import transformers

    from llmctl.core.train import reference

    objective = _dpo(bf16_base, tmp_path, "max_seq_len=256", "rope_scaling={type: linear, factor: 2.0}")
    prepared = objective.plan.prepared
    parts = {"train": prepared["train"], "val": prepared["val"]}
    assert (len(parts["train"]), len(parts["val"])) == (5, 2)
    sums = reference._compute(objective, parts)
    config = transformers.AutoConfig.from_pretrained(bf16_base)
    config.rope_parameters = {**config.rope_parameters, "rope_type": "linear", "factor": 2.0}
    hf = transformers.LlamaForCausalLM.from_pretrained(bf16_base, config=config, dtype=torch.float32).eval()
    plain = transformers.LlamaForCausalLM.from_pretrained(bf16_base, dtype=torch.float32).eval()
    for name, rows in parts.items():
        want = _sums(hf, rows)
        assert sums[name].shape == (len(rows), 2)
        torch.testing.assert_close(sums[name].double(), want, atol=1e-4, rtol=0)
        assert not torch.allclose(_sums(plain, rows), want, atol=1e-2)  # the scaling matters here
    assert objective.plan.report.steps() == [("progress", "reference log-probs", 7, "record"), ("advance", 2),
                                             ("advance", 2), ("advance", 1), ("advance", 2)]


def test_reference_logps_in_bfloat16_run_under_autocast(bf16_base, tmp_path):
    """With precision=bfloat16 the base scores under bf16 autocast (as the policy does), which
    moves the sums off the float32 ones; batch_size=1 scores one pair at a time."""
    from llmctl.core.model.io import load_model
    from llmctl.core.train import reference

    objective = _dpo(bf16_base, tmp_path, "precision=bfloat16", "batch_size=1")
    rows = objective.plan.prepared["train"]
    sums = reference._compute(objective, {"train": rows})["train"].double()
    assert objective.plan.report.steps() == [("progress", "reference log-probs", 5, "record"), *[("advance", 1)] * 5]
    model = load_model(bf16_base, dtype=torch.float32)[0].eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = _sums(model, rows)
    torch.testing.assert_close(sums, want, atol=1e-4, rtol=0)
    assert (sums - _sums(model, rows)).abs().max() > 2e-3  # float32's sums are not these


def test_the_validation_loss_is_the_mean_cross_entropy_of_the_held_out_windows_in_eval_mode():
    """`Trainer.evaluate` over three full validation batches: the next-token cross-entropy of all
    their windows (torch's, on the model's logits with dropout off), and the model trains again
    afterwards."""
    from contextlib import nullcontext
    from types import SimpleNamespace

    from torch.nn import functional as F

    from llmctl.core.model import ModelConfig
    from llmctl.core.model.build import build_model
    from llmctl.core.train.distributed import Dist
    from llmctl.core.train.loop import Trainer
    from llmctl.core.train.objectives import Causal

    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                                    embedding_dropout=0.5, attention_dropout=0.5, residual_dropout=0.5)).train()
    windows = torch.randint(0, 64, (6, 17), generator=torch.Generator().manual_seed(1))
    objective = object.__new__(Causal)
    objective.cfg, objective.device = SimpleNamespace(document_mask=False), torch.device("cpu")
    trainer = object.__new__(Trainer)
    trainer.val, trainer.d, trainer.cfg = list(windows.split(2)), Dist(), SimpleNamespace(seed=0)
    trainer.device = torch.device("cpu")
    trainer.trained = trainer.forward = model
    trainer.objective, trainer._autocast = objective, nullcontext
    with torch.no_grad():
        logits = model.eval()(windows[:, :-1]).logits
    model.train()
    want = float(F.cross_entropy(logits.reshape(-1, 64), windows[:, 1:].reshape(-1)))
    assert trainer.evaluate() == pytest.approx(want, rel=1e-5) and model.training
    trainer.val = trainer.val[:1]
    with torch.no_grad():
        logits = model.eval()(windows[:2, :-1]).logits
    model.train()
    want = float(F.cross_entropy(logits.reshape(-1, 64), windows[:2, 1:].reshape(-1)))
    assert trainer.evaluate() == pytest.approx(want, rel=1e-5) and model.training
    trainer.val = []
    assert trainer.evaluate() is None
