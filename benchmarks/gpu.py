"""GPU benchmarks: llmctl against transformers on the same GPU, in one run.

    python -P benchmarks/gpu.py --out DIR          (scripts/gpu-check.sh runs it; --quick: small shapes)

Model: the `llama` preset at vocabulary 4096 (d=768, 12 layers, 12 heads / 4 KV heads, SwiGLU
2048, untied: 81.8M parameters), random weights, random tokens (speed does not depend on them).
  - train: batch 16 × 1024, bf16 autocast, AdamW (fused), clip 1.0. llmctl's `Trainer.train_step`
    (eager and compile=true) against a plain transformers loop (`LlamaForCausalLM`, SDPA,
    fused AdamW, `loss.item()` per step). Median step after warm-up; MFU against the GPU's
    datasheet peak (`peak_flops`), and a profile of each side's step (top kernels, GPU busy time).
  - decode: greedy, 16-token prompts, 128 new tokens, EOS off; batch 1 and 16; float32 and
    bf16. llmctl eager (`cuda_graph=False`), with the CUDA-graph step (the default), and (bf16)
    with `--compile`; transformers `generate()` (dynamic cache, eager). Decode tokens/s excludes
    prefill on both sides: (N − 1) / (time(N tokens) − time(1 token)).
  - eval: strided perplexity (max_length 1024, stride 512) of llmctl's scorer against the
    transformers perplexity-guide loop; results must agree.
  - finetune: LoRA (r 16, alpha 32, every linear but the head), batch 8 × 1024 random words, bf16
    autocast, AdamW over the adapter: `llmctl finetune`'s `Trainer.train_step` (eager and
    compile=true) against PEFT + transformers (SDPA), steps alternating; median tokens/s.
Writes DIR/gpu-report.md and DIR/gpu-report.json.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import transformers

transformers.logging.set_verbosity_error()

LLAMA = dict(vocab_size=4096, hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
             num_key_value_heads=4, max_position_embeddings=2048, rope_theta=500000.0, tie_word_embeddings=False)
QUICK = dict(LLAMA, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def hf_config(arch: dict) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(**arch, bos_token_id=None, eos_token_id=None, pad_token_id=0)


def llmctl_args(arch: dict) -> dict:
    return dict(vocab_size=arch["vocab_size"], hidden_size=arch["hidden_size"], num_layers=arch["num_hidden_layers"],
                num_heads=arch["num_attention_heads"], num_kv_heads=arch["num_key_value_heads"],
                intermediate_size=arch["intermediate_size"], max_seq_len=arch["max_position_embeddings"],
                rope_theta=arch["rope_theta"], tie_embeddings=False)


# -- train ---------------------------------------------------------------------------------------------


def make_shards(root: Path, vocab: int, tokens: int) -> Path:
    rng = np.random.default_rng(0)
    out = root / "shards"
    out.mkdir()
    splits = {}
    for split, n in (("train", tokens), ("val", 50_000)):
        rng.integers(0, vocab, n, dtype=np.uint16).tofile(out / f"{split}-00000.bin")
        splits[split] = {"tokens": n, "documents": 1, "shards": [{"file": f"{split}-00000.bin", "tokens": n,
                                                                  "documents": 1}]}
    (out / "manifest.json").write_text(json.dumps({
        "format": "llmctl-tokens", "version": 1, "dtype": "uint16", "tokenizer_hash": "random", "vocab_size": vocab,
        "eos_id": None, "bos_id": None, "splits": splits}))
    return out


def llmctl_trainer(shards: Path, root: Path, arch: dict, batch: int, seq: int, compile: bool, device):
    from llmctl.config import load_config
    from llmctl.core.train import distributed
    from llmctl.core.train.build import make_plan
    from llmctl.core.train.config import TrainConfig
    from llmctl.core.train.loop import Trainer

    model_args = "{" + ", ".join(f"{k}: {str(v).lower() if isinstance(v, bool) else v}"
                                 for k, v in llmctl_args(arch).items()) + "}"
    args = [f"data={shards}", "model=llama", f"model_args={model_args}", "max_steps=1000", f"batch_size={batch}",
            f"seq_len={seq}", "lr=3e-4", "warmup_steps=2", "eval_every=0", "save_every=0", "eval_batches=1",
            "precision=bf16", f"compile={str(compile).lower()}", "tensorboard=false"]
    cfg = load_config(TrainConfig, None, args, kind="train")
    out = root / f"llmctl-{compile}"
    out.mkdir()
    return Trainer(make_plan(cfg, device.type), out, device, distributed.Dist(), {})


def hf_train_step(arch: dict, shards: Path, batch: int, seq: int, device):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(hf_config(arch)).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    data = np.fromfile(shards / "train-00000.bin", dtype=np.uint16)
    rng = np.random.default_rng(0)

    def step() -> float:
        starts = rng.integers(0, len(data) - seq - 1, batch)
        x = torch.from_numpy(np.stack([data[s:s + seq] for s in starts]).astype(np.int64))
        x = x.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else x
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


# -- finetune ------------------------------------------------------------------------------------------


def finetune_inputs(path: Path, root: Path, vocab: int, seq: int) -> Path:
    """A word-level tokenizer for the checkpoint at `path` (w0 … w{vocab-1}, one token a word,
    w0 = EOS) and 64 `text` records of `seq` random words (one packed row each)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w1"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "w0", "unk_token": "w1"}))
    rng = np.random.default_rng(0)
    data = root / "sft.jsonl"
    data.write_text("".join(json.dumps({"text": " ".join(f"w{i}" for i in rng.integers(2, vocab, seq))}) + "\n"
                            for _ in range(64)))
    return data


def llmctl_lora_step(path: Path, data: Path, root: Path, batch: int, seq: int, compile: bool, device):
    from llmctl.config import load_config
    from llmctl.core.train import distributed
    from llmctl.core.train.build import make_plan
    from llmctl.core.train.finetune_config import FinetuneConfig
    from llmctl.core.train.loop import Trainer

    args = ["method=lora", "adapter.r=16", "adapter.alpha=32", "adapter.target_modules=all-linear", "max_steps=1000",
            f"batch_size={batch}", f"seq_len={seq}", "lr=2e-4", "warmup_steps=0", "eval_every=0", "save_every=0",
            "val_fraction=0", "precision=bf16", f"compile={str(compile).lower()}", "tensorboard=false"]
    cfg = load_config(FinetuneConfig, None, args, kind="finetune")
    cfg.model, cfg.data = str(path), [str(data)]
    out = root / f"lora-{compile}"
    out.mkdir()
    return Trainer(make_plan(cfg, device.type), out, device, distributed.Dist(), {}).train_step


def peft_lora_step(path: Path, vocab: int, batch: int, seq: int, device, *, dora: bool = False,
                   precision: str = "bf16", checkpointing: bool = False, attention: str = "sdpa"):
    """A PEFT + transformers training step (r 16, alpha 32, every linear but the head, AdamW lr
    2e-4 over the adapter, clip 1.0) on random tokens; benchmarks/finetune.py's contender too."""
    import peft

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                              attn_implementation=attention).to(device)
    model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                       lora_dropout=0.0, use_dora=dora)).train()
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4, betas=(0.9, 0.95), weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)

    def step() -> float:
        x = torch.randint(2, vocab, (batch, seq), generator=gen).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def bench_finetune(path: Path, root: Path, vocab: int, batch: int, seq: int, warmup: int, steps: int, device,
                   compile: bool) -> dict:
    data = finetune_inputs(path, root, vocab, seq)
    steps_fn = {"llmctl eager": llmctl_lora_step(path, data, root, batch, seq, False, device)}
    result: dict = {"batch": batch, "seq": seq}
    if compile:
        steps_fn["llmctl compile=true"] = llmctl_lora_step(path, data, root, batch, seq, True, device)
        result["compile_s"] = timed(steps_fn["llmctl compile=true"])  # the first step compiles
    steps_fn["PEFT + transformers"] = peft_lora_step(path, vocab, batch, seq, device)
    for fn in steps_fn.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in steps_fn}
    for _ in range(steps):
        for name, fn in steps_fn.items():
            times[name].append(timed(fn))
    peft_rate = batch * seq / statistics.median(times["PEFT + transformers"])
    for name, t in times.items():
        rate = batch * seq / statistics.median(t)
        result[name] = {"tokens_per_s": rate, "vs_peft": rate / peft_rate}
    return result


def profile(step, steps: int = 3) -> dict:
    """Top kernels by GPU time over `steps` steps, and the share of the wall time the GPU was busy."""
    from torch.profiler import ProfilerActivity, profile as prof

    step()
    sync()
    start = time.perf_counter()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with prof(activities=activities) as p:
        for _ in range(steps):
            step()
        sync()
    wall = time.perf_counter() - start
    events = p.key_averages()
    gpu_total = sum(e.self_device_time_total for e in events) / 1e6  # µs → s
    top = sorted(events, key=lambda e: e.self_device_time_total, reverse=True)[:15]
    return {"wall_s_per_step": wall / steps, "gpu_busy_share": gpu_total / wall,
            "top": [(e.key[:90], round(e.self_device_time_total / 1e3 / steps, 3), e.count // steps) for e in top]}


def bench_train(arch, root, batch, seq, warmup, steps, device, compile) -> dict:
    from llmctl.core.train.metrics import flops_per_token

    shards = make_shards(root, arch["vocab_size"], 2_000_000)
    contenders = {"llmctl eager": llmctl_trainer(shards, root, arch, batch, seq, False, device)}
    fpt, peak = flops_per_token(contenders["llmctl eager"].model, seq), contenders["llmctl eager"].peak
    if compile:
        trainer = llmctl_trainer(shards, root, arch, batch, seq, True, device)
        compile_s = timed(trainer.train_step)  # the first step compiles
        contenders["llmctl compile=true"] = trainer
    steps_fn = {name: t.train_step for name, t in contenders.items()}
    steps_fn["transformers loop"] = hf_train_step(arch, shards, batch, seq, device)
    for fn in steps_fn.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in steps_fn}
    for _ in range(steps):  # interleaved, step by step
        for name, fn in steps_fn.items():
            times[name].append(timed(fn))
    result = {"batch": batch, "seq": seq, "flops_per_token": fpt, "peak_flops": peak,
              "params_M": sum(p.numel() for p in contenders["llmctl eager"].model.parameters()) / 1e6}
    hf_rate = batch * seq / statistics.median(times["transformers loop"])
    for name, t in times.items():
        rate = batch * seq / statistics.median(t)
        result[name] = {"tokens_per_s": rate, "vs_hf": rate / hf_rate, "mfu": rate * fpt / peak}
    if compile:
        result["llmctl compile=true"]["compile_s"] = compile_s
    result["profile"] = {"llmctl eager": profile(steps_fn["llmctl eager"]),
                         "transformers loop": profile(steps_fn["transformers loop"])}
    return result


# -- decode --------------------------------------------------------------------------------------------


class IdTok:
    stop_ids: list[int] = []

    def __init__(self, prompts):
        self.prompts = prompts

    def encode(self, text, add_special_tokens=False):
        return self.prompts[text]

    def decode(self, ids, skip_special_tokens=False):
        return ""


def bench_decode(path: Path, arch: dict, new_tokens: int, batch: int, device, compile: bool) -> dict:
    from llmctl.core.generate import GenerationConfig, generate
    from llmctl.core.model.io import load_model

    g = torch.Generator().manual_seed(0)
    prompts = {f"p{i}": torch.randint(1, arch["vocab_size"], (16,), generator=g).tolist() for i in range(batch)}
    tok = IdTok(prompts)
    rows, reference_ids = {}, None
    for dtype in (torch.float32, torch.bfloat16):
        hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
        ours = load_model(path, device=device, dtype=dtype)[0]

        def run_hf(names, n):
            ids = torch.tensor([prompts[p] for p in names], device=device)
            with torch.inference_mode():
                out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                                  min_new_tokens=n, eos_token_id=None, pad_token_id=0)
            return out[:, 16:].tolist()

        def ours_run(**settings):
            def run(names, n):
                cfg = GenerationConfig(max_new_tokens=n, eos_ids=[], batch_size=len(names), **settings)
                with torch.inference_mode():
                    return [r.tokens for r in generate(ours, tok, names, cfg)]
            return run

        runs = {"transformers": run_hf, "llmctl eager": ours_run(cuda_graph=False), "llmctl cuda-graph": ours_run()}
        if compile and dtype == torch.bfloat16:
            runs["llmctl --compile"] = ours_run(compile=True)
        name_of = "fp32" if dtype == torch.float32 else "bf16"
        for b, names in ((1, ["p0"]), (batch, list(prompts))):
            for run in runs.values():  # warm-up: compiles and captures for this shape
                run(names, 4)
            for label, run in runs.items():
                t_n, t_1 = timed(lambda: run(names, new_tokens)), timed(lambda: run(names, 1))
                rows[f"{name_of} b{b} {label}"] = len(names) * (new_tokens - 1) / (t_n - t_1)
        if dtype == torch.float32:
            reference_ids = run_hf(["p0"], new_tokens)
            rows["fp32 greedy ids identical (eager, graph, compile vs transformers)"] = all(
                runs[k](["p0"], new_tokens) == reference_ids for k in runs if k != "transformers")
        else:
            rows["bf16 profile, 20 eager decode steps"] = profile(lambda: runs["llmctl eager"](["p0"], 20), steps=1)
            for b in (1, batch):
                for compiled in ((False, True) if compile else (False,)):
                    label = f"bf16 b{b} one {'compiled ' if compiled else ''}graph replay, steps/s (no sampling loop)"
                    rows[label] = 1 / step_time(ours, device, b, compiled)
        del hf, ours
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return rows


def step_time(model, device, batch: int, compile: bool, steps: int = 100) -> float:
    """Seconds per one-token step of the Runner alone, back to back (what bounds decoding
    once the sampling loop's own work is gone)."""
    from llmctl.core.generate.search import Runner
    from llmctl.core.model.attention import inference_backends

    with torch.inference_mode(), inference_backends(device):
        runner = Runner(model, [[1] * 16] * batch, 16 + steps + 20, device, compile=compile, cuda_graph=True)
        runner.prefill()
        ids = torch.ones(batch, 1, dtype=torch.long, device=device)
        for _ in range(5):
            runner.forward(ids)
        return timed(lambda: [runner.forward(ids) for _ in range(steps)]) / steps


# -- eval ----------------------------------------------------------------------------------------------


def bench_eval(path: Path, root: Path, vocab: int, device, max_length: int, stride: int, words: int) -> dict:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from llmctl.core.evaluate.lm import ScoringModel
    from llmctl.core.evaluate.perplexity import perplexity
    from llmctl.core.model.io import load_model
    from llmctl.core.model.attention import inference_backends
    from llmctl.core.tokenizer import load_tokenizer

    rng = np.random.default_rng(0)
    lexicon = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), rng.integers(2, 9))) for _ in range(3000)]
    text = " ".join(rng.choice(lexicon, words))
    data = root / "text.txt"
    data.write_text(text)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train([str(data)], trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                                show_progress=False,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}))
    ours_tok = load_tokenizer(path)
    ids = ours_tok.encode(text)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()

    def hf_loop():
        ids_t = torch.tensor([ids], device=device)
        nll, count, prev_end = 0.0, 0, 0
        for begin in range(0, len(ids), stride):
            end = min(begin + max_length, len(ids))
            target = ids_t[:, begin:end].clone()
            target[:, : -(end - prev_end)] = -100
            with torch.no_grad():
                loss = hf(ids_t[:, begin:end], labels=target).loss
            n = int((target[:, 1:] != -100).sum())
            nll, count, prev_end = nll + loss.item() * n, count + n, end
            if end == len(ids):
                break
        return math.exp(nll / count), count

    lm = ScoringModel(load_model(path, device=device, dtype=torch.float32)[0], ours_tok, max_length=max_length,
                      device=device)
    def ours():  # as `llmctl eval` runs it
        with inference_backends(device):
            return perplexity(lm, [data], max_length=max_length, stride=stride)
    hf_loop(), ours()  # warm-up
    t_hf = min(timed(hf_loop) for _ in range(2))
    t_ours = min(timed(ours) for _ in range(2))
    ppl_hf, count = hf_loop()
    ppl_ours = ours()["perplexity"]
    return {"tokens": count, "transformers tok/s": count / t_hf, "llmctl tok/s": count / t_ours,
            "vs_hf": t_hf / t_ours, "perplexity transformers": ppl_hf, "perplexity llmctl": ppl_ours,
            "relative difference": abs(ppl_ours - ppl_hf) / ppl_hf}


# -- report --------------------------------------------------------------------------------------------


def report(results: dict) -> str:
    env, lines = results["env"], []
    lines += [f"# GPU benchmarks: {env['gpu']}", "",
              f"torch {env['torch']}, transformers {env['transformers']}, CUDA {env['cuda']}, "
              f"cuDNN {env['cudnn']}. Command: `{env['command']}`", ""]
    if "train" in results:
        t = results["train"]
        lines += [f"## Train ({t['params_M']:.1f}M params, batch {t['batch']} × {t['seq']}, bf16 autocast)", "",
                  "| loop | tokens/s | vs transformers | MFU |", "|---|---:|---:|---:|"]
        for name in ("llmctl eager", "llmctl compile=true", "transformers loop"):
            if name in t:
                r = t[name]
                lines.append(f"| {name} | {r['tokens_per_s']:,.0f} | {r['vs_hf']:.2f}× | {r['mfu']:.1%} |")
        if "compile_s" in t.get("llmctl compile=true", {}):
            lines += ["", f"compile=true: first step (compilation) {t['llmctl compile=true']['compile_s']:.1f} s."]
        for side, p in t["profile"].items():
            lines += ["", f"Profile, {side}: {p['wall_s_per_step'] * 1e3:.1f} ms per step, GPU busy "
                      f"{p['gpu_busy_share']:.0%}.", "", "| kernel / op | ms per step | calls per step |",
                      "|---|---:|---:|"]
            lines += [f"| `{k}` | {ms} | {n} |" for k, ms, n in p["top"]]
    if "decode" in results:
        lines += ["", "## Decode (greedy, 16-token prompts, 128 new tokens; tokens/s summed over the batch)", "",
                  "| case | tokens/s |", "|---|---:|"]
        for k, v in results["decode"].items():
            if isinstance(v, float):
                lines.append(f"| {k} | {v:,.1f} |")
            elif isinstance(v, bool):
                lines.append(f"| {k} | {v} |")
        prof = results["decode"].get("bf16 profile, 20 eager decode steps")
        if prof:
            lines += ["", f"bf16 eager decode, 20 steps: {prof['wall_s_per_step'] * 1e3:.1f} ms, GPU busy "
                      f"{prof['gpu_busy_share']:.0%}.", "", "| kernel / op | ms | calls |", "|---|---:|---:|"]
            lines += [f"| `{k}` | {ms} | {n} |" for k, ms, n in prof["top"]]
    if "eval" in results:
        e = results["eval"]
        lines += ["", "## Eval (strided perplexity, float32)", "",
                  f"{e['tokens']:,} tokens: llmctl {e['llmctl tok/s']:,.0f} tok/s, transformers loop "
                  f"{e['transformers tok/s']:,.0f} tok/s → **{e['vs_hf']:.2f}×**; perplexity {e['perplexity llmctl']:.5f} "
                  f"vs {e['perplexity transformers']:.5f} (relative difference {e['relative difference']:.1e})."]
    if "finetune" in results:
        f = results["finetune"]
        lines += ["", f"## Finetune: LoRA r 16, all linears, batch {f['batch']} × {f['seq']}, bf16 autocast", "",
                  "| loop | tokens/s | vs PEFT |", "|---|---:|---:|"]
        for name in ("llmctl eager", "llmctl compile=true", "PEFT + transformers"):
            if name in f:
                lines.append(f"| {name} | {f[name]['tokens_per_s']:,.0f} | {f[name]['vs_peft']:.2f}× |")
        if "compile_s" in f:
            lines += ["", f"compile=true: first step (compilation) {f['compile_s']:.1f} s."]
    return "\n".join(lines) + "\n"


def main() -> None:
    import sys

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--quick", action="store_true", help="tiny shapes (a smoke test of this script, CPU too)")
    ap.add_argument("--only", default="train,decode,eval,finetune")
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    arch = QUICK if args.quick else LLAMA
    compile = not args.no_compile
    sizes = dict(batch=2, fbatch=2, seq=64, warmup=2, steps=3, new_tokens=8, dbatch=3, words=3000, max_length=128,
                 stride=64) if args.quick else dict(batch=16, fbatch=8, seq=1024, warmup=5, steps=15, new_tokens=128,
                                                    dbatch=16, words=100_000, max_length=1024, stride=512)
    results = {"env": {"gpu": torch.cuda.get_device_name() if device.type == "cuda" else "CPU",
                       "torch": torch.__version__, "transformers": transformers.__version__,
                       "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
                       "command": "python -P benchmarks/gpu.py " + " ".join(sys.argv[1:])}}
    args.out.mkdir(parents=True, exist_ok=True)

    def save():
        (args.out / "gpu-report.json").write_text(json.dumps(results, indent=2, default=str))
        (args.out / "gpu-report.md").write_text(report(results))

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        path = root / "llama"
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(hf_config(arch)).save_pretrained(path)
        for part in args.only.split(","):
            start = time.perf_counter()
            try:
                if part == "train":
                    results["train"] = bench_train(arch, root, sizes["batch"], sizes["seq"], sizes["warmup"],
                                                   sizes["steps"], device, compile)
                elif part == "decode":
                    results["decode"] = bench_decode(path, arch, sizes["new_tokens"], sizes["dbatch"], device, compile)
                elif part == "finetune":
                    results["finetune"] = bench_finetune(path, root, arch["vocab_size"], sizes["fbatch"], sizes["seq"],
                                                         sizes["warmup"], sizes["steps"], device, compile)
                elif part == "eval":
                    results["eval"] = bench_eval(path, root, arch["vocab_size"], device, sizes["max_length"],
                                                 sizes["stride"], sizes["words"])
            except Exception as exc:  # one failing part must not lose the others' figures
                import traceback

                results[f"{part}_error"] = traceback.format_exc()
                print(f"{part} failed: {exc!r}", flush=True)
            print(f"{part}: {time.perf_counter() - start:.1f} s", flush=True)
            save()
    print(report(results))


if __name__ == "__main__":
    main()
