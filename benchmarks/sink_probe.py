"""Does an attention sink give the d=128 model the outlier features AWQ and Wanda need?

Large LLMs put a "massive activation" (Sun et al., 2024) in a few residual dimensions of the
token every head can attend to for nothing, usually the BOS token at position 0. The models
`benchmarks/trained.py` trains read random windows of a text stream, so position 0 is an
ordinary token, and none grew one (BENCHMARKS.md). This probe trains the same architecture
(the `llama` preset at d=128, 8 layers, on the same Tiny Shakespeare split and tokenizer) with
`<|endoftext|>` prepended to every window, measures the residual stream as training goes, then
quantizes the result (int4 g128: RTN, AWQ, GPTQ) and prunes it (magnitude, Wanda, SparseGPT at
50 % and 2:4), each from the same calibration windows, and reports each one's KL to the float
model on the same held-out windows (BOS first, as in training). The trained weights are kept in
DIR/sink-probe-<steps>-<lr>.safetensors, and a second run with the same settings reuses them.

`llmctl train` has no per-window BOS, so the loop is written here (AdamW with `llmctl train`'s
defaults: betas 0.9/0.95, weight decay 0.1 except norms and embeddings, clip 1.0, cosine to
lr/10 after 30 warm-up steps); the model, quantizers and calibration are llmctl's.

    python -m benchmarks.sink_probe --dir /tmp/llmctl-trained --steps 2400 --lr 3e-3
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.trained import Settings, split

BOS = 0  # <|endoftext|> in the byte-level tokenizers `llmctl tokenize train` makes


def windows(data: np.ndarray, n: int, length: int, rng: np.random.Generator) -> torch.Tensor:
    """`n` windows of `length` tokens, each BOS and then a random slice of `data`."""
    starts = rng.integers(0, len(data) - length, n)
    rows = np.stack([data[s : s + length - 1] for s in starts])
    return torch.from_numpy(np.concatenate([np.full((n, 1), BOS, dtype=np.int64), rows], 1))


def residual_stats(model, tokens: torch.Tensor) -> list[dict]:
    """Per layer output: the largest per-dimension kurtosis and max/median dimension RMS over the
    tokens after position 0, position 0's norm over the median token norm, and the largest |h|."""
    rows = []
    for i, h in enumerate(model(tokens, output_hidden_states=True).hidden_states[1:]):  # [0]: the embeddings
        rest = h[:, 1:].reshape(-1, h.shape[-1])
        z = (rest - rest.mean(0)) / rest.std(0)
        rms = rest.square().mean(0).sqrt()
        rows.append({"layer": i, "kurtosis": round(z.pow(4).mean(0).max().item(), 1),
                     "rms_max_over_median": round((rms.max() / rms.median()).item(), 1),
                     "position0_norm": round((h[:, 0].norm(dim=-1).mean() / h[:, 1:].norm(dim=-1).median()).item(), 1),
                     "absmax": round(h.abs().max().item(), 1)})
    return rows


def main() -> None:
    from tokenizers import Tokenizer

    from llmctl.core.model import ModelConfig
    from safetensors.torch import load_file, save_file

    from llmctl.core.model.build import build_model
    from llmctl.core.prune import PRUNERS, PruneConfig
    from llmctl.core.quant.config import QuantizeConfig
    from llmctl.core.quant.methods import quantize_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/llmctl-trained"), help="benchmarks.trained's cache")
    parser.add_argument("--steps", type=int, default=2400)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--every", type=int, default=400, help="measure every N steps")
    args = parser.parse_args()

    s = Settings()
    train_file, val_file = split(args.dir)
    tok_dir = args.dir / f"tok-{s.vocab_size}"
    if not tok_dir.is_dir():
        raise SystemExit(f"{tok_dir}: run `python -m benchmarks.trained --dir {args.dir}` first (it trains the tokenizer)")
    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    train, val = (np.array(tok.encode(f.read_text(encoding="utf-8")).ids, dtype=np.int64) for f in (train_file, val_file))
    torch.manual_seed(s.seed)
    model = build_model(ModelConfig(
        vocab_size=s.vocab_size, hidden_size=s.hidden_size, num_layers=s.num_layers, num_heads=s.num_heads,
        num_kv_heads=s.num_kv_heads, intermediate_size=s.intermediate_size, max_seq_len=256, position="rope",
        rope_theta=500000.0, norm="rmsnorm", norm_eps=1e-5, mlp="swiglu", tie_embeddings=False))
    exempt = ("norm", "embed")  # `llmctl train`'s no_decay
    groups = [{"params": [p for n, p in model.named_parameters() if not any(e in n for e in exempt)]},
              {"params": [p for n, p in model.named_parameters() if any(e in n for e in exempt)], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), weight_decay=s.weight_decay)
    rng = np.random.default_rng(s.seed)
    probe = windows(val, 16, s.seq_len + 1, np.random.default_rng(1))
    start = time.perf_counter()
    weights = args.dir / f"sink-probe-{args.steps}-{args.lr:g}.safetensors"
    for step in range(1, 0 if weights.is_file() else args.steps + 1):
        warm = min(1.0, step / s.warmup_steps)
        decay = 0.5 * (1 + math.cos(math.pi * max(0, step - s.warmup_steps) / (args.steps - s.warmup_steps)))
        for group in opt.param_groups:
            group["lr"] = args.lr * warm if step <= s.warmup_steps else args.lr * (0.1 + 0.9 * decay)
        batch = windows(train, s.batch_size, s.seq_len + 1, rng)
        loss = F.cross_entropy(model(batch[:, :-1]).logits.flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % args.every == 0 or step == args.steps:
            model.eval()
            with torch.no_grad():
                logits = model(probe[:, :-1]).logits
                ppl = math.exp(F.cross_entropy(logits[:, 1:].flatten(0, 1), probe[:, 2:].flatten()).item())
                entry = {"step": step, "seconds": round(time.perf_counter() - start), "held_out_perplexity": round(ppl, 2),
                         "layers": residual_stats(model, probe[:, :-1])}
            model.train()
            print(json.dumps(entry), flush=True)
    if weights.is_file():
        model.load_state_dict(load_file(weights))
    else:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights)
    model.eval()
    calibration = windows(train, 128, s.seq_len, np.random.default_rng(5))
    held_out = windows(val, 32, s.seq_len, np.random.default_rng(6))

    @torch.no_grad()
    def logprobs(m):
        return m(held_out).logits.log_softmax(-1).flatten(0, 1)

    reference, kl = logprobs(model), {}

    def measure(name: str, change) -> None:
        changed = copy.deepcopy(model)
        change(changed)
        kl[name] = F.kl_div(logprobs(changed), reference, log_target=True, reduction="batchmean").item()
        print(f"{name}: KL {kl[name]:.3e}", flush=True)

    for name, method, symmetric in [("RTN", "int4", True), ("RTN asym", "int4", False), ("AWQ", "awq", True),
                                    ("AWQ asym", "awq", False), ("GPTQ", "gptq", True)]:
        cfg = QuantizeConfig(method=method, bits=4, group_size=128, symmetric=symmetric, seq_len=s.seq_len)
        measure(name, lambda m: quantize_model(m, cfg, None if method == "int4" else calibration))
    for pattern in (None, "2:4"):
        for method in ("magnitude", "wanda", "sparsegpt"):
            pruner = PRUNERS.get(method)(PruneConfig(method=method, pattern=pattern))
            measure(f"{method} {pattern or '50 %'}", lambda m: pruner.prune(m, calibration if pruner.calibrated else None))
    shares = {"AWQ": kl["AWQ"] / kl["RTN"], "AWQ asym": kl["AWQ asym"] / kl["RTN asym"], "GPTQ": kl["GPTQ"] / kl["RTN"]}
    print(json.dumps({"kl_to_float": {k: float(f"{v:.3e}") for k, v in kl.items()},
                      "share_of_rtn": {k: round(v, 3) for k, v in shares.items()},
                      "share_of_magnitude": {f"{m} {p}": round(kl[f"{m} {p}"] / kl[f"magnitude {p}"], 3)
                                             for m in ("wanda", "sparsegpt") for p in ("50 %", "2:4")}}))


if __name__ == "__main__":
    main()
