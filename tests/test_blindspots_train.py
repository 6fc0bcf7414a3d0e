"""Training options off the default path, each against an equivalent configuration or a hand
computation: gradient accumulation, gradient clipping, bf16 autocast, starting from a
checkpoint, and the masked-LM 80/10/10 corruption."""

from __future__ import annotations

import pytest
import torch

from test_train import FAST, corpus  # noqa: F401  (fixture)


def _trainer(corpus, tmp_path, *overrides, rows: torch.Tensor | None = None):
    """A Trainer on the test shards; with `rows`, micro-batch i is the i-th `batch_size` rows
    of `rows` (cycling), so configurations can be fed the very same tokens."""
    from llmctl.config import load_config
    from llmctl.core.train import distributed
    from llmctl.core.train.build import make_plan
    from llmctl.core.train.config import TrainConfig
    from llmctl.core.train.loop import Trainer

    cfg = load_config(TrainConfig, None, [f"data={corpus['shards']}", "model=nano", *FAST, "dropout=0", *overrides],
                      kind="train")
    out = tmp_path / f"out{len(list(tmp_path.iterdir()))}"
    out.mkdir()
    trainer = Trainer(make_plan(cfg, "cpu"), out, torch.device("cpu"), distributed.Dist(), {})
    if rows is not None:
        size = cfg.batch_size
        count = len(rows) // size
        trainer.data.batch = lambda index: rows[(index % count) * size : (index % count + 1) * size]
    return trainer


def _rows(n: int = 4, seq: int = 33) -> torch.Tensor:
    return torch.randint(0, 320, (n, seq), generator=torch.Generator().manual_seed(0))


def _params(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def test_grad_accum_equals_the_doubled_batch(corpus, tmp_path):
    """Two micro-batches of 2 rows make the same steps (loss, gradient norm, weights) as one batch of 4."""
    rows = _rows(8)
    whole = _trainer(corpus, tmp_path, "batch_size=4", "grad_accum=1", rows=rows)
    accum = _trainer(corpus, tmp_path, "batch_size=2", "grad_accum=2", rows=rows)
    assert whole.tokens_per_step == accum.tokens_per_step
    for _ in range(2):
        a, b = whole.train_step(), accum.train_step()
        assert a == pytest.approx(b, rel=1e-5)
    for name, value in _params(whole).items():
        torch.testing.assert_close(_params(accum)[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_grad_accum_weighs_micro_batches_by_their_targets(corpus, tmp_path):
    """Micro-batches with different numbers of learned positions (rows starting with an even
    token learn only their first 4): the step minimises the mean over every learned token, as the
    doubled batch does — not the mean of the two micro-batch means (Hugging Face's Trainer
    before 4.46 did that)."""
    rows = _rows(4, seq=17)
    rows[:2, 0], rows[2:, 0] = 2, 3

    def ignoring(trainer):
        batch = trainer.objective.batch

        def masked(rows, index, generator=None):
            inputs, labels, extra = batch(rows, index, generator)
            short = (rows[:, :1] % 2 == 0) & (torch.arange(labels.shape[1]) >= 4)
            return inputs, labels.masked_fill(short, -100), extra
        trainer.objective.batch = masked
        return trainer

    whole = ignoring(_trainer(corpus, tmp_path, "batch_size=4", "grad_accum=1", "seq_len=16", rows=rows))
    accum = ignoring(_trainer(corpus, tmp_path, "batch_size=2", "grad_accum=2", "seq_len=16", rows=rows))
    inputs, labels, _ = whole._inputs(rows, 0)
    assert int((labels != -100).sum()) == 2 * 4 + 2 * 16
    a, b = whole.train_step(), accum.train_step()
    assert a == pytest.approx(b, rel=1e-5)
    for name, value in _params(whole).items():
        torch.testing.assert_close(_params(accum)[name], value, rtol=1e-5, atol=1e-6, msg=name)
    with torch.no_grad():  # the unweighted mean of the micro-batch means is measurably different
        model = _trainer(corpus, tmp_path, "batch_size=4", "seq_len=16", rows=rows).model
        means = [model(inputs[i:i + 2], labels=labels[i:i + 2]).loss for i in (0, 2)]
        pooled = model(inputs, labels=labels).loss
    assert abs(float(sum(means) / 2 - pooled)) > 1e-3


def test_gradient_clipping_scales_the_update_as_computed_by_hand(corpus, tmp_path):
    """grad_clip=1e-3: the step is AdamW's on the gradient scaled by 1e-3 / its norm (eps=1e-4
    makes Adam's update depend on the gradient's size), and differs from the unclipped step."""
    rows, clip, eps = _rows(2), 1e-3, 1e-4
    common = ("batch_size=2", "weight_decay=0", "warmup_steps=0", "schedule=constant", "lr=0.01", f"eps={eps}")
    clipped = _trainer(corpus, tmp_path, *common, f"grad_clip={clip}", rows=rows)
    free = _trainer(corpus, tmp_path, *common, "grad_clip=0", rows=rows)
    before = _params(clipped)

    model = clipped.model  # the same step by hand, before the trainer takes it
    inputs, labels, extra = clipped._inputs(rows, 0)
    model(inputs, labels=labels).loss.backward()
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
    scale = clip / (norm + 1e-6)
    expected = {id(p): p.detach() - 0.01 * (p.grad * scale) / ((p.grad * scale).abs() + eps) for p in params}
    model.zero_grad(set_to_none=True)

    _, _, grad_norm, lr = clipped.train_step()
    free.train_step()
    assert lr == 0.01 and grad_norm == pytest.approx(float(norm), rel=1e-5) and grad_norm > 100 * clip
    for p in params:
        torch.testing.assert_close(p.detach(), expected[id(p)], rtol=1e-4, atol=1e-7)
    moved = {name: (v - before[name]).abs().max() for name, v in _params(clipped).items()}
    moved_free = {name: (v - before[name]).abs().max() for name, v in _params(free).items()}
    assert max(moved.values()) < 0.5 * max(moved_free.values())  # the clip shrank the update


def test_bf16_losses_differ_from_float32_but_stay_close(corpus, tmp_path):
    rows = _rows(2)
    fp32 = _trainer(corpus, tmp_path, "batch_size=2", "precision=float32", rows=rows)
    bf16 = _trainer(corpus, tmp_path, "batch_size=2", "precision=bf16", rows=rows)
    assert torch.equal(torch.cat([p.flatten() for p in fp32.model.parameters()]),
                       torch.cat([p.flatten() for p in bf16.model.parameters()]))  # same start
    for _ in range(2):
        (a, _, norm_a, _), (b, _, norm_b, _) = fp32.train_step(), bf16.train_step()
        assert a != b and abs(a - b) < 0.02 * a  # bfloat16 matmuls: a 3-digit mantissa, not a different model
        assert norm_a != norm_b and norm_b == pytest.approx(norm_a, rel=0.1)
    assert all(p.dtype == torch.float32 for p in bf16.model.parameters())  # autocast keeps float32 weights


def test_max_steps_zero_from_a_checkpoint_reproduces_its_tensors(llmctl, corpus, tmp_path):
    from safetensors.torch import load_file

    first = tmp_path / "first"
    r = llmctl("train", f"data={corpus['shards']}", *FAST, "max_steps=3", "-o", first)
    assert r.code == 0, r.stderr
    second = tmp_path / "second"
    r = llmctl("train", f"data={corpus['shards']}", f"model={first}", *FAST, "max_steps=0", "seed=7", "-o", second)
    assert r.code == 0, r.stderr
    trained, copied = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert trained.keys() == copied.keys()
    assert all(torch.equal(trained[k], copied[k]) for k in trained)
    fresh = tmp_path / "fresh"  # the guard: training from scratch starts elsewhere
    assert llmctl("train", f"data={corpus['shards']}", *FAST, "max_steps=0", "-o", fresh).code == 0
    assert not torch.equal(load_file(fresh / "model.safetensors")["model.embed_tokens.weight"],
                           trained["model.embed_tokens.weight"])


def test_masking_random_and_kept_shares():
    """BERT's corruption of the picked positions: 80% [MASK], 10% a random token of the
    vocabulary, 10% unchanged (about 10,000 picks: a share's standard error is 0.003)."""
    from llmctl.core.train.data import mask_tokens

    rows = torch.randint(5, 100, (256, 256), generator=torch.Generator().manual_seed(1))
    inputs, labels = mask_tokens(rows, mask_id=2, vocab_size=100, prob=0.15,
                                 generator=torch.Generator().manual_seed(0), special_ids=[1, 2])
    picked = labels != -100
    n = picked.sum().item()
    masked = (inputs == 2) & picked
    kept = (inputs == rows) & picked
    replaced = picked & ~masked & ~kept
    # a random draw equal to the original token counts as kept: 10% + 10% / vocab
    assert masked.sum() / n == pytest.approx(0.8, abs=0.02)
    assert kept.sum() / n == pytest.approx(0.1 + 0.1 / 100, abs=0.012)
    assert replaced.sum() / n == pytest.approx(0.1 - 0.1 / 100, abs=0.012)
    drawn = inputs[replaced]
    assert drawn.min() >= 0 and drawn.max() < 100
    assert drawn.unique().numel() > 80  # spread over the vocabulary, not one token


def test_optimizer_and_model_overrides_reach_the_run(corpus, tmp_path):
    """Each recipe key that changes the math is applied: AdamW's betas, eps and weight decay
    (not on norms, biases, embeddings), the dropout, checkpointing and MTP-weight overrides."""
    trainer = _trainer(corpus, tmp_path, f"model={corpus['moe']}", "beta1=0.8", "beta2=0.9", "eps=1e-6",
                       "weight_decay=0.05", "lr=0.002", "dropout=0.2", "gradient_checkpointing=true", "mtp_weight=0.7")
    groups = trainer.optimizer.param_groups
    assert sorted(g["weight_decay"] for g in groups) == [0.0, 0.05]
    assert all(g["betas"] == (0.8, 0.9) and g["eps"] == 1e-6 for g in groups)
    cfg = trainer.model.cfg
    assert (cfg.embedding_dropout, cfg.attention_dropout, cfg.residual_dropout) == (0.2, 0.2, 0.2)
    assert cfg.gradient_checkpointing and cfg.mtp_loss_weight == 0.7
    assert trainer.train_step()[3] == pytest.approx(0.002 / 2)  # FAST warms up over 2 steps
