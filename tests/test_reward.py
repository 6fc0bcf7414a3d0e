"""`finetune --method reward`: a Bradley–Terry reward model saved as a transformers sequence
classifier, loaded back by llmctl and transformers with equal scores, scored by `eval`."""

from __future__ import annotations

import json
import pytest

torch = pytest.importorskip("torch")
import transformers  # noqa: E402

from conftest import run_process  # noqa: E402

from llmctl.core.model.io import load_model  # noqa: E402


def train_reward(tmp_path_factory, name: str, *overrides: str):
    """(base, reward model, folder): 30 steps of `--method reward` on grammatical-over-shuffled
    sentence pairs (held-out pairs in the folder), with `overrides`."""
    from test_preference import word_order_data

    folder = tmp_path_factory.mktemp(name)
    base = word_order_data(folder)
    out = folder / "rm"
    result = run_process("finetune", base, "--config", "tiny", "--method", "reward", "--data", folder / "train.jsonl",
                         *overrides, "max_steps=30", "batch_size=8", "lr=3e-3", "save_every=0", "-o", out)
    assert result.code == 0, result.stderr
    return base, out, folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A reward model trained on grammatical-over-shuffled sentence pairs, and held-out pairs."""
    return train_reward(tmp_path_factory, "reward", "adapter=full")


def test_the_reward_model_is_a_transformers_sequence_classifier_with_equal_scores(trained):
    from llmctl.core.model.reward import sequence_scores

    base, out, _ = trained
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and config["num_labels"] == 1
    assert config["pad_token_id"] == 2 and not config["tie_word_embeddings"]
    from safetensors import safe_open

    names = set(safe_open(out / "model.safetensors", "pt").keys())
    assert "score.weight" in names and "lm_head.weight" not in names
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32).eval()
    ours, cfg = load_model(out)
    assert cfg.num_labels == 1
    ids = torch.tensor([[0, 40, 41, 42, 43, 1, 2, 2], [0, 50, 51, 52, 53, 54, 55, 1], [0, 60, 61, 1, 2, 2, 2, 2]])
    with torch.no_grad():
        theirs = hf(ids).logits
        mine = sequence_scores(ours, ids, cfg.pad_token_id)
    assert theirs.shape == mine.shape == (3, 1)
    assert torch.allclose(mine, theirs, atol=1e-5, rtol=0)
    assert mine.std() > 1e-4  # distinct rows, distinct scores


def test_training_raises_the_pairwise_accuracy_that_eval_reports(trained, llmctl, tmp_path):
    base, out, folder = trained
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert {"accuracy", "margin", "mean_reward"} <= set(steps[0])
    first, last = steps[:5], steps[-5:]
    assert sum(s["loss"] for s in last) < sum(s["loss"] for s in first)
    task = tmp_path / "pairs.yaml"
    task.write_text(f"type: pairwise\ndataset: {{path: {folder / 'held_out.jsonl'}}}\n")
    def accuracy(model):
        r = llmctl("--json", "eval", model, "--task", task, "--no-record")
        assert r.code == 0, r.stderr
        return json.loads(r.stdout)["results"][str(model)]["pairs"]

    before, after = accuracy(base), accuracy(out)  # the base LM compares log-likelihoods; the reward model scores
    print(f"held-out pairwise accuracy: base LM {before['acc']:.3f}, reward model {after['acc']:.3f}")
    assert after["examples"] == 80 and after["acc"] > 0.65  # chance is 0.5
    assert after["acc"] - before["acc"] > 2 * max(before["acc_stderr"], after["acc_stderr"])
    r = llmctl("generate", out, "Sentence:")
    assert r.code == 1 and "is a reward model" in r.stderr
