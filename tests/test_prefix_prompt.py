"""Prefix and prompt tuning: PEFT's PREFIX_TUNING / PROMPT_TUNING forward and files, both directions;
the KV cache, padding, packing, switching off, and `llmctl finetune --method prefix|prompt`."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
import transformers  # noqa: E402
import peft  # noqa: E402

from conftest import tiny_llama  # noqa: E402

from llmctl.core.adapters import adapters_disabled, merge_adapter, save_adapter  # noqa: E402
from llmctl.core.adapters.prompt import Prefix, Prompt  # noqa: E402
from llmctl.core.model.io import load_model  # noqa: E402
from llmctl.errors import UsageError  # noqa: E402

IDS = torch.tensor([[5, 17, 42, 7, 99, 3, 150, 11], [9, 8, 7, 6, 5, 4, 3, 2]])
METHODS = {"prefix": Prefix, "prompt": Prompt}
PEFT_CONFIGS = {"prefix": peft.PrefixTuningConfig, "prompt": peft.PromptTuningConfig}
P = 3  # virtual tokens


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("base"), ["the quick brown fox jumps over the lazy dog. " * 10],
                      vocab=200, context=64, scale=2.0)


def _hf(base):
    return transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()


def _adapted(base, method):
    torch.manual_seed(0)
    model, _ = load_model(base, transforms=[METHODS[method](num_virtual_tokens=P)])
    with torch.no_grad():  # small enough that the tiny model stays in a sensible range
        model.prompt_encoder.embedding.weight.mul_(0.5)
    return model


def _theirs(wrapped, method, ids, **kwargs):
    """PEFT's logits of the real tokens (prompt tuning also returns the virtual positions')."""
    with torch.no_grad():
        logits = wrapped(ids, **kwargs).logits
    return logits[:, P:] if method == "prompt" else logits


@pytest.mark.parametrize("method", METHODS)
def test_saved_adapter_gives_peft_logits(base, tmp_path, method):
    model = _adapted(base, method)
    out = save_adapter(model, tmp_path / "adapter", base=base)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == {"prefix": "PREFIX_TUNING", "prompt": "PROMPT_TUNING"}[method]
    assert config["num_virtual_tokens"] == P
    from safetensors.torch import load_file

    assert list(load_file(out / "adapter_model.safetensors")) == ["prompt_embeddings"]
    theirs = peft.PeftModel.from_pretrained(_hf(base), out).eval()
    with torch.no_grad():
        ours = model(IDS).logits
        plain = load_model(base)[0](IDS).logits
    assert not torch.allclose(ours, plain, atol=1e-3)  # the adapter changes the output
    assert torch.allclose(ours, _theirs(theirs, method, IDS), atol=1e-4, rtol=0)
    # switched off, the base's output
    with adapters_disabled(model), torch.no_grad():
        assert torch.allclose(model(IDS).logits, plain, atol=1e-5, rtol=0)
    with torch.no_grad():
        assert torch.equal(load_model(out)[0](IDS).logits, ours)  # the directory loads with its base


@pytest.mark.parametrize("method", METHODS)
def test_peft_trained_adapter_loads_in_llmctl(base, tmp_path, method):
    torch.manual_seed(1)
    wrapped = peft.get_peft_model(_hf(base), PEFT_CONFIGS[method](task_type="CAUSAL_LM", num_virtual_tokens=P))
    with torch.no_grad():
        wrapped.prompt_encoder.default.embedding.weight.mul_(0.5)
    wrapped.eval().save_pretrained(tmp_path / "adapter")
    model, _ = load_model(tmp_path / "adapter")
    with torch.no_grad():
        assert torch.allclose(model(IDS).logits, _theirs(wrapped, method, IDS), atol=1e-4, rtol=0)


def test_prefix_with_left_padding_equals_peft(base, tmp_path):
    model = _adapted(base, "prefix")
    theirs = peft.PeftModel.from_pretrained(_hf(base), save_adapter(model, tmp_path / "a", base=base)).eval()
    mask = torch.ones_like(IDS)
    mask[1, :3] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # PEFT adds the virtual tokens to given positions, as we do
    with torch.no_grad():
        ours = model(IDS, attention_mask=mask, position_ids=positions).logits
        derived = model(IDS, attention_mask=mask).logits  # ours derives the same positions from the mask
    expected = _theirs(theirs, "prefix", IDS, attention_mask=mask, position_ids=positions)
    assert torch.allclose(ours[mask.bool()], expected[mask.bool()], atol=1e-4, rtol=0)
    assert torch.allclose(derived[mask.bool()], ours[mask.bool()], atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_cached_decoding_and_packing_match_the_full_forward(base, method):
    model = _adapted(base, method)
    with torch.no_grad():
        full = model(IDS).logits
        cache = model.make_cache(2, IDS.shape[1])
        steps = [model(IDS[:, :5], cache=cache).logits]
        steps += [model(IDS[:, t:t + 1], cache=cache).logits for t in range(5, IDS.shape[1])]
        assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5, rtol=0)
        # the fixed-shape step (`generate --compile`, CUDA graphs) at cache slot 5
        cache = model.make_cache(2, IDS.shape[1])
        model(IDS[:, :5], cache=cache)
        slot = torch.tensor([5])
        step = model.decode_step(IDS[:, 5:6], slot.expand(2, 1), None, cache.keys, cache.values, slot)
        assert torch.allclose(step, full[:, 5], atol=1e-5, rtol=0)
        # two documents packed in a row: each one sees the virtual tokens, as on its own
        row = torch.cat([IDS[0, :5], IDS[1, :3]])[None]
        packed = model(row, document_ids=torch.tensor([[0] * 5 + [1] * 3])).logits
        assert torch.allclose(packed[0, 5:], model(IDS[1:, :3]).logits[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_prompt_learning_trains_only_the_virtual_tokens_and_cannot_merge(base, method):
    from llmctl.core.adapters import mark_trainable

    model = _adapted(base, method)
    mark_trainable(model)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["prompt_encoder.embedding.weight"]
    model.train()
    model(IDS, labels=IDS).loss.backward()
    assert model.prompt_encoder.embedding.weight.grad.abs().sum() > 0
    with pytest.raises(UsageError, match="no weights to merge"):
        merge_adapter(model)


@pytest.mark.parametrize("method", METHODS)
def test_finetune_prefix_and_prompt(llmctl, base, tmp_path, method):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"the {w} fox", "completion": " jumps over the lazy dog."}) + "\n"
                            for w in ["quick", "brown", "lazy", "red", "old", "young", "big", "small"]))
    out = tmp_path / method
    r = llmctl("--json", "finetune", base, "--config", "tiny", "--method", method, "--data", data,
               "adapter.num_virtual_tokens=4", "lr=0.05", "-o", out)
    assert r.code == 0, r.stderr
    losses = [x["loss"] for x in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in x]
    assert losses[-1] < losses[0]
    theirs = peft.PeftModel.from_pretrained(_hf(base), out).eval()
    ours, _ = load_model(out)
    with torch.no_grad():
        logits = theirs(IDS).logits
        assert torch.allclose(ours(IDS).logits, logits[:, 4:] if method == "prompt" else logits, atol=1e-4, rtol=0)
    adapter = json.loads(llmctl("--json", "info", out).stdout)["adapter"]
    assert adapter["method"] == method and adapter["num_virtual_tokens"] == 4 and 0 < adapter["trainable_share"] < 0.05
    gen = llmctl("generate", out, "the quick", "--max-new-tokens", "3", "--temperature", "0")
    assert gen.code == 0, gen.stderr
    text = tmp_path / "eval.txt"
    text.write_text("the quick fox jumps over the lazy dog.\n" * 4)
    e = llmctl("--json", "eval", out, "--task", "perplexity", "--data", text, "--no-record")
    assert e.code == 0, e.stderr
    refused = llmctl("finetune", base, "--config", "tiny", "--method", method, "--data", data, "merge_adapter=true",
                     "-o", tmp_path / "merged")
    assert refused.code == 2 and "no weights to merge" in refused.stderr
