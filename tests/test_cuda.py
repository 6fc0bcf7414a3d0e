"""The CUDA paths: parity with the CPU and with transformers on the GPU, CUDA-graph and compiled
decoding, resume and mixed-precision training.

Run with `python -m pytest -m cuda` on a machine with a GPU (scripts/gpu-check.sh does, with
the GPU benchmarks); everywhere else every test here is skipped.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

import transformers  # noqa: E402

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

from llmctl.core.generate import GenerationConfig, generate  # noqa: E402
from llmctl.core.model.io import load_model  # noqa: E402

VOCAB = 128
DECODER = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, intermediate_size=96, max_position_embeddings=256)
FAMILIES = {
    "llama": ("Llama", dict(DECODER, rope_theta=500.0)),
    "mistral-window": ("Mistral", dict(DECODER, sliding_window=6)),
    "qwen2": ("Qwen2", dict(DECODER, tie_word_embeddings=True)),
    "qwen3": ("Qwen3", dict(DECODER, head_dim=32)),
    "gemma": ("Gemma", dict(DECODER, head_dim=16, num_key_value_heads=1)),
    "mixtral": ("Mixtral", dict(DECODER, num_local_experts=4, num_experts_per_tok=2)),
    "gpt2": ("GPT2", dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                          bos_token_id=0, eos_token_id=0)),
    "bert": ("Bert", dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=96, max_position_embeddings=256)),
}
HEADS = {"GPT2": "LMHeadModel", "Bert": "ForMaskedLM"}
CUDA = torch.device("cuda")


def _hf_checkpoint(family: str, kwargs: dict, out: Path, seed: int = 0) -> Path:
    """A random transformers model, perturbed off its 1/0 norm and bias init, saved to `out`."""
    config = getattr(transformers, f"{family}Config")(**kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, family + HEADS.get(family, "ForCausalLM"))(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return _hf_checkpoint(*FAMILIES["llama"], tmp_path_factory.mktemp("llama"))


class IdTok:
    """Prompts given as token ids (`encode` looks them up), nothing to decode."""

    stop_ids: list[int] = []

    def __init__(self, prompts: dict[str, list[int]]):
        self.prompts = prompts

    def encode(self, text, add_special_tokens=False):
        return self.prompts[text]

    def decode(self, ids, skip_special_tokens=False):
        return ""


def _prompts(lengths: list[int], seed: int = 0) -> dict[str, list[int]]:
    g = torch.Generator().manual_seed(seed)
    return {f"p{i}": torch.randint(1, VOCAB, (n,), generator=g).tolist() for i, n in enumerate(lengths)}


def _generate(model, prompts: dict[str, list[int]], **settings) -> list[list[int]]:
    cfg = GenerationConfig(eos_ids=[], batch_size=len(prompts), **{"max_new_tokens": 24, **settings})
    with torch.inference_mode():
        return [r.tokens for r in generate(model, IdTok(prompts), list(prompts), cfg)]


# -- the model: CUDA against CPU, and against transformers on CUDA -----------------------------------


@pytest.mark.parametrize("case", FAMILIES)
def test_cuda_logits_equal_cpu(case, tmp_path):
    path = _hf_checkpoint(*FAMILIES[case], tmp_path)
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0  # left padding
    logits = {}
    for device in ("cpu", "cuda"):
        model = load_model(path, device=device, dtype=torch.float32)[0]
        with torch.no_grad():
            logits[device] = model(ids.to(device), attention_mask=mask.to(device)).logits.cpu()
    real = mask.bool()
    assert (logits["cpu"][real] - logits["cuda"][real]).abs().max().item() < 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prompt_logits_and_greedy_ids_equal_transformers_on_cuda(llama, dtype):
    theirs = transformers.AutoModelForCausalLM.from_pretrained(llama, dtype=dtype).to(CUDA).eval()
    ours = load_model(llama, device=CUDA, dtype=dtype)[0]
    prompts = _prompts([12])
    ids = torch.tensor([prompts["p0"]], device=CUDA)
    with torch.no_grad():
        a, b = theirs(ids).logits.float(), ours(ids).logits
    assert (a - b).abs().max().item() < (1e-4 if dtype == torch.float32 else 0.05 * a.abs().max().item())
    if dtype == torch.float32:  # bf16 ties may break either way between two correct kernels
        with torch.no_grad():
            out = theirs.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=24,
                                  min_new_tokens=24, eos_token_id=None, pad_token_id=0)
        assert _generate(ours, prompts) == [out[0, 12:].tolist()]


def test_an_adapter_loads_onto_the_device_asked(llama, tmp_path):
    from llmctl.core.adapters import LoRA, load_adapter, save_adapter

    model, _ = load_model(llama, transforms=[LoRA(r=2, target_modules=["q_proj"])])
    out = save_adapter(model, tmp_path / "a", base=llama)
    loaded, _ = load_adapter(out, device="cuda")
    assert all(p.is_cuda for p in loaded.parameters())


def test_perplexity_on_cuda_equals_cpu(tmp_path):
    from llmctl.core.evaluate.lm import ScoringModel
    from llmctl.core.evaluate.perplexity import perplexity
    from llmctl.core.tokenizer import TrainSpec, train_tokenizer

    text = " ".join(f"word{i % 37} thing{i % 11} and more." for i in range(600))
    data = tmp_path / "text.txt"
    data.write_text(text)
    tok = train_tokenizer(TrainSpec(algo="bytelevel", vocab_size=320, special_tokens=["<|endoftext|>"]),
                          iter([[text]]))
    path = _hf_checkpoint("Llama", dict(DECODER, vocab_size=320), tmp_path / "ckpt")
    results = {}
    for device in ("cpu", "cuda"):
        model = load_model(path, device=device, dtype=torch.float32)[0]
        lm = ScoringModel(model, tok, max_length=128, device=device)
        results[device] = perplexity(lm, [data], max_length=128, stride=64)
    assert results["cpu"]["tokens"] == results["cuda"]["tokens"]
    assert results["cuda"]["perplexity"] == pytest.approx(results["cpu"]["perplexity"], rel=1e-5)


# -- decoding: CUDA graphs and torch.compile against eager ------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lengths", [[12], [12, 5, 9]], ids=["batch1", "padded3"])
def test_cuda_graph_decoding_equals_eager(llama, dtype, lengths):
    from llmctl.core.generate import search

    model = load_model(llama, device=CUDA, dtype=dtype)[0]
    prompts = _prompts(lengths)
    eager = _generate(model, prompts, cuda_graph=False)
    captured = []
    original = search.Runner._prepare_step
    search.Runner._prepare_step = lambda self: (captured.append(self.graphed), original(self))[1]
    try:
        graphed = _generate(model, prompts)
    finally:
        search.Runner._prepare_step = original
    assert captured == [True]
    assert graphed == eager


@pytest.mark.parametrize("settings", [dict(num_beams=3), dict(penalty_alpha=0.6, top_k=4)], ids=["beam", "contrastive"])
def test_cuda_graph_beam_and_contrastive_search_equal_eager(llama, settings):
    model = load_model(llama, device=CUDA, dtype=torch.float32)[0]
    prompts = _prompts([10, 6])
    settings = dict(settings, max_new_tokens=12)
    assert _generate(model, prompts, **settings) == _generate(model, prompts, cuda_graph=False, **settings)


@pytest.mark.parametrize("case", ["mixtral", "gpt2"])
def test_models_a_graph_cannot_hold_decode_eagerly_or_graphed(case, tmp_path):
    """MoE routing has data-dependent shapes: it decodes eagerly; gpt2 (learned positions) is graphed."""
    from llmctl.core.generate.graphs import graphable

    model = load_model(_hf_checkpoint(*FAMILIES[case], tmp_path), device=CUDA)[0]
    assert graphable(model) == (case != "mixtral")
    prompts = _prompts([9, 4])
    assert _generate(model, prompts) == _generate(model, prompts, cuda_graph=False)


def test_compiled_decoding_equals_eager_on_cuda(llama):
    model = load_model(llama, device=CUDA, dtype=torch.float32)[0]
    prompts = _prompts([12, 7])
    assert _generate(model, prompts, compile=True) == _generate(model, prompts, cuda_graph=False)


# -- training ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """Random token shards in the `llmctl tokenize encode` format (vocab 512)."""
    import numpy as np

    out = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    splits = {}
    for split, n in (("train", 200_000), ("val", 8_000)):
        rng.integers(0, 512, n, dtype=np.uint16).tofile(out / f"{split}-00000.bin")
        splits[split] = {"tokens": n, "documents": 1, "shards": [{"file": f"{split}-00000.bin", "tokens": n,
                                                                  "documents": 1}]}
    (out / "manifest.json").write_text(json.dumps({
        "format": "llmctl-tokens", "version": 1, "dtype": "uint16", "tokenizer_hash": "random",
        "vocab_size": 512, "eos_id": None, "bos_id": None, "splits": splits}))
    return out


def _train(llmctl, shards: Path, out: Path, *args) -> list[dict]:
    r = llmctl("--device", "cuda", "train", f"data={shards}", "model=nano", "model_args={vocab_size: 512}",
               "batch_size=4", "seq_len=64", "warmup_steps=2", "eval_every=0", "eval_batches=1",
               "tensorboard=false", *args, "-o", out)
    assert r.code == 0, r.stderr
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_resume_on_cuda_continues_the_run(llmctl, shards, tmp_path):
    full = _train(llmctl, shards, tmp_path / "full", "max_steps=6", "save_every=3", "keep_last=5")
    part = tmp_path / "part"
    shutil.copytree(tmp_path / "full", part)
    shutil.rmtree(part / "checkpoints" / "step-000006")
    resumed = _train(llmctl, shards, part, "max_steps=6", "save_every=3", "keep_last=5", "--resume")
    losses = lambda records: [r["loss"] for r in records if "loss" in r and r["step"] > 3]  # noqa: E731
    assert len(losses(full)) == 3
    assert losses(resumed) == pytest.approx(losses(full), rel=1e-5)


@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_mixed_precision_steps_are_finite_and_mfu_is_a_fraction(llmctl, shards, tmp_path, precision):
    records = [r for r in _train(llmctl, shards, tmp_path / precision, "max_steps=4", "save_every=0",
                                 f"precision={precision}") if "loss" in r]
    assert len(records) == 4
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in records)
    assert all(0 < r["mfu"] < 1 for r in records)
