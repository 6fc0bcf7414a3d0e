"""Shared fixtures: run the CLI in-process (`llmctl`) or as a subprocess (`llmctl_proc`)."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str

    def json(self):
        import json

        return json.loads(self.stdout)


@pytest.fixture(autouse=True)
def fresh_options():
    """Every test starts from the global options of a fresh invocation: an in-process `llmctl -q …`
    leaves `options.quiet` set, which silenced `info` in whichever test its worker ran next."""
    from llmctl.runtime import options

    options.__init__()


@pytest.fixture
def llmctl(capsys):
    """Run `llmctl ARGS…` in this process; returns Result(code, stdout, stderr)."""
    from llmctl.cli import main

    def run(*args) -> Result:
        capsys.readouterr()
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return Result(code, out, err)

    return run


def run_process(*args, env: dict | None = None, input: str | None = None, timeout: float = 300, cwd=None) -> Result:
    """Run `python -m llmctl ARGS…` in a subprocess (for start-up, plugins and signals)."""
    full_env = {**os.environ, "COLUMNS": "200", **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", "llmctl", *map(str, args)],
        capture_output=True, text=True, env=full_env, input=input, timeout=timeout, cwd=cwd,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


def pythonpath(*dirs) -> str:
    """PYTHONPATH with `dirs` first, keeping the caller's (where llmctl may be installed)."""
    return os.pathsep.join([*map(str, dirs), *filter(None, [os.environ.get("PYTHONPATH")])])


@pytest.fixture
def llmctl_proc():
    return run_process


def save_hf(out: Path, config, jitter: float = 0.0) -> Path:
    """A transformers causal LM of `config` (seed 1), its weights moved by `jitter` · N(0, 1) so that
    norms and biases matter, saved in `out`."""
    import torch
    import transformers

    torch.manual_seed(1)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * jitter)
    model.save_pretrained(out)
    return out


def logits_of(model, ids):
    """Float32 logits of llmctl's or transformers' model on `ids`, without gradients."""
    import torch

    with torch.no_grad():
        out = model(ids)
    return (out.logits if hasattr(out, "logits") else out[0]).float()


def tiny_llama(out: Path, texts: list[str], *, vocab: int, context: int, scale: float = 8.0, hidden: int = 32,
               intermediate: int = 64) -> Path:
    """A tiny HF Llama checkpoint in `out` with a byte-level BPE tokenizer (BOS/EOS/PAD = 0/1/2)
    trained on `texts`; weights scaled by `scale` so the distribution is peaked, not near ties."""
    import json

    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|bos|>", "<|eos|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|bos|>", "eos_token": "<|eos|>",
        "pad_token": "<|pad|>", "model_max_length": context}))
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=hidden, intermediate_size=intermediate,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=context, bos_token_id=0, eos_token_id=1,
                                      pad_token_id=2, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
    model.save_pretrained(out)
    return out


def unrouted_moe():
    """A one-block, 4-expert llmctl model whose router always picks expert 0: experts 1-3 see no token."""
    import torch
    from torch import nn

    from llmctl.core.model import ModelConfig
    from llmctl.core.model.build import build_model

    class FirstExpert(nn.Module):
        def forward(self, h):
            return torch.tensor([10.0, 0.0, 0.0, 0.0]).expand(h.shape[0], 4)

    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=50, hidden_size=32, num_layers=1, num_heads=4, intermediate_size=64,
                                    num_experts=4, experts_per_token=1))
    model.model.layers[0].mlp.gate = FirstExpert()
    return model


def recording_reporter():
    """A silent Reporter that keeps its warnings in `.seen`."""
    from llmctl.core.report import Silent

    class Warnings(Silent):
        def __init__(self):
            self.seen: list[str] = []

        def warn(self, message: str) -> None:
            self.seen.append(message)

    return Warnings()


def silence(model, heads=(), channels=(), layers=()):
    """Make units contribute nothing: o_proj columns of (layer, head), down_proj columns of
    (layer, channel), and both output projections of whole layers."""
    import torch

    d = model.cfg.head_dim
    with torch.no_grad():
        for layer, head in heads:
            model.model.layers[layer].self_attn.o_proj.weight[:, head * d:(head + 1) * d] = 0
        for layer, channel in channels:
            model.model.layers[layer].mlp.down_proj.weight[:, channel] = 0
        for layer in layers:
            model.model.layers[layer].self_attn.o_proj.weight.zero_()
            model.model.layers[layer].mlp.down_proj.weight.zero_()
