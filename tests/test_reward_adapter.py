"""`finetune --method reward adapter=lora|dora|qlora`: a reward model as PEFT's SEQ_CLS adapter
(LoRA on the base, the fresh score head trained in full as a module to save) that PEFT loads
with equal scores and llmctl loads, scores (`eval` pairwise), merges and resumes exactly."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
import transformers  # noqa: E402
import peft  # noqa: E402


from llmctl.core.model.io import load_model  # noqa: E402
from llmctl.core.model.reward import sequence_scores  # noqa: E402

IDS = torch.tensor([[0, 40, 41, 42, 43, 1, 2, 2], [0, 50, 51, 52, 53, 54, 55, 1], [0, 60, 61, 1, 2, 2, 2, 2]])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A LoRA reward model (merged too) trained on grammatical-over-shuffled pairs, and held-out pairs."""
    from test_reward import train_reward

    return train_reward(tmp_path_factory, "reward_adapter", "adapter=lora", "merge_adapter=true")


def hf_classifier(base):
    return transformers.AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, pad_token_id=2,
                                                                           dtype=torch.float32)


def test_peft_loads_the_seq_cls_adapter_with_llmctls_scores(trained):
    base, out, _ = trained
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["score"]
    from safetensors import safe_open

    names = set(safe_open(out / "adapter_model.safetensors", "pt").keys())
    assert "base_model.model.score.weight" in names and not any("lm_head" in n for n in names)
    theirs_model = peft.PeftModel.from_pretrained(hf_classifier(base), out).eval()
    ours, cfg = load_model(out)
    assert cfg.num_labels == 1 and cfg.pad_token_id == 2
    with torch.no_grad():
        theirs, mine = theirs_model(IDS).logits, sequence_scores(ours, IDS, cfg.pad_token_id)
    assert theirs.shape == mine.shape == (3, 1)
    assert torch.allclose(mine, theirs, atol=1e-4, rtol=0) and mine.std() > 1e-4
    merged, mcfg = load_model(out / "merged")  # merge_adapter=true: a full sequence classifier, same scores
    assert json.loads((out / "merged" / "config.json").read_text())["architectures"] == \
        ["LlamaForSequenceClassification"]
    with torch.no_grad():
        assert torch.allclose(sequence_scores(merged, IDS, mcfg.pad_token_id), mine, atol=1e-5, rtol=0)


def test_eval_reports_the_adapter_reward_models_pairwise_accuracy(trained, llmctl, tmp_path):
    base, out, folder = trained
    task = tmp_path / "pairs.yaml"
    task.write_text(f"type: pairwise\ndataset: {{path: {folder / 'held_out.jsonl'}}}\n")

    def accuracy(model):
        r = llmctl("--json", "eval", model, "--task", task, "--no-record")
        assert r.code == 0, r.stderr
        return json.loads(r.stdout)["results"][str(model)]["pairs"]

    before, after = accuracy(base), accuracy(out)
    print(f"held-out pairwise accuracy: base LM {before['acc']:.3f}, LoRA reward model {after['acc']:.3f}")
    assert after["examples"] == 80 and after["acc"] > 0.65  # chance is 0.5
    assert after["acc"] - before["acc"] > 2 * max(before["acc_stderr"], after["acc_stderr"])
    r = llmctl("--json", "info", out)
    assert r.code == 0 and json.loads(r.stdout)["adapter"]["task_type"] == "SEQ_CLS"
    r = llmctl("generate", out, "Sentence:")
    assert r.code == 1 and "is a reward model" in r.stderr


def test_a_seq_cls_adapter_made_by_peft_loads_in_llmctl(trained, tmp_path):
    base = trained[0]
    torch.manual_seed(0)
    config = peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"])
    theirs_model = peft.get_peft_model(hf_classifier(base), config)
    with torch.no_grad():
        for name, p in theirs_model.named_parameters():
            if "lora_B" in name or "score" in name:
                p.normal_(0, 0.5)  # away from the zero delta
    theirs_model.save_pretrained(tmp_path / "peft_rm")
    ours, cfg = load_model(tmp_path / "peft_rm")
    assert cfg.num_labels == 1
    with torch.no_grad():
        theirs = theirs_model.eval()(IDS).logits
        assert torch.allclose(sequence_scores(ours, IDS, cfg.pad_token_id), theirs, atol=1e-4, rtol=0)


def test_qlora_reward_model_trains_and_resumes_exactly_after_sigkill(trained, tmp_path):
    from test_finetune import _losses, kill_then_resume

    base, _, folder = trained
    args = [base, "--config", "tiny", "--method", "reward", "--data", folder / "train.jsonl", "adapter=qlora",
            "max_steps=16", "batch_size=8", "lr=1e-2", "save_every=4", "keep_last=5", "eval_every=0"]
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    kill_then_resume(args, [base, "--data", folder / "train.jsonl"], ref, cut, kill_at=8)
    losses = _losses(cut)
    assert losses == _losses(ref) and len(losses) == 16
    assert (cut / "adapter_model.safetensors").read_bytes() == (ref / "adapter_model.safetensors").read_bytes()
    assert sum(losses[-4:]) < sum(losses[:4]) - 0.2  # from ln 2 (a fresh head) down
    assert json.loads((cut / "llmctl.json").read_text())["base_transforms"][0]["type"] == "nf4"


def test_reward_refuses_prefix_and_prompt_adapters(trained, llmctl, tmp_path):
    base, _, folder = trained
    r = llmctl("finetune", base, "--config", "tiny", "--method", "reward", "--data", folder / "train.jsonl",
               "adapter=prefix", "-o", tmp_path / "x")
    assert r.code == 2 and "adapter=prefix" in r.stderr and not (tmp_path / "x").exists()
