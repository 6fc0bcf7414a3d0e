"""Quantized checkpoints: decode speed, quantize time and memory, and quality.

    python -m benchmarks.quantize speed   [--threads 2] [--new-tokens 64] [--repeats 3] [--prompt-tokens 32]
                                          [--compile] [--only NAME…]
    python -m benchmarks.quantize prefill [--threads 2] [--prompt-tokens 512] [--repeats 3]
    python -m benchmarks.quantize time    [--samples 32] [--seq-len 512] [--micro-batch 32 4]
    python -m benchmarks.quantize quality [--samples 128] [--width 128 --steps 1200 | --pretrained CKPT] [--group-size 128]
                                          [--dir DIR] [--llmcompressor PYTHON]

speed: a random 97.5M Llama (hidden 768, 12 layers, 12 heads, vocab 8192, MHA) decoded greedily
at batch 1 by llmctl in float32, bfloat16, int8 (RTN, per channel) and int4 (RTN, groups of 128)
— int8/int4 with bf16 activations, the head kept in bf16 (llm-compressor's default) or quantized
too (as llama.cpp's q8_0/q4_0 files have it: the same bytes), and int8 with float32 ones — through the native decode plan
(core/native/decode.py, where it is built) and, for comparison, through the Python eager step
(each product still by the native kernels; see core/quant/kernels.py) —
by transformers in float32 and, when llama-cpp-python is installed, by llama.cpp in f32, f16,
q8_0 and q4_0 (a GGUF of the same weights written here with the `gguf` package). Decode tokens/s
= (N − 1) / (time(N tokens) − time(1 token)), best of --repeats, contenders interleaved; then each
round's llmctl / llama.cpp ratio at the same precision, median and range (the pairs ran seconds apart). The
bandwidth share is the bytes a token reads (every weight but the embedding table, in the
format used) × tokens/s ÷ the read bandwidth measured in the same run (1 GiB in 2 MB pages read by
a torch sum or the native product, the faster, before and after the decoders: the better).
prefill: the same model and precisions, prompt tokens/s over a --prompt-tokens prompt (llama-bench's
pp512) against llama.cpp evaluating it in one batch.
time: `llmctl quantize` on the `llama` preset's shape (125M, random weights) as a subprocess:
RTN int8, RTN int4 and GPTQ int4 g128 (once per --micro-batch) — wall time and peak RSS.
quality: held-out perplexity (`llmctl eval --task perplexity`) of the briefly trained model of
benchmarks/trained.py (or, `--pretrained CKPT`, a checkpoint made elsewhere) and of its int8, int4 RTN,
GPTQ, AWQ (groups of --group-size, 128; RTN and AWQ on the
asymmetric grid too) and NF4 versions, each one's change from the float model and KL divergence
from it (on 16 held-out windows), and GPTQ's and AWQ's change and KL as a share of RTN's on the
same grid; writes
benchmarks/results/quantize-quality-d<width>.md (or -<checkpoint name>.md; `--outliers C`: on the model with LLM-style
activation outliers of benchmarks/outliers.py, …-outliers<C>.md). `--llmcompressor PYTHON` adds
llm-compressor's own int4 RTN and AWQ (W4A16, W4A16_ASYM) on the same model and calibration windows,
run by that interpreter (benchmarks/llmcompressor_anchor.py), read and measured by llmctl
(…-llmcompressor.md).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import outliers, trained
from benchmarks.generate import PROMPT_LEN, IdTok, _time

SHAPE = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
             num_key_value_heads=12, vocab_size=8192)
LLAMA_PRESET = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                    num_key_value_heads=4, vocab_size=32000, rope_theta=500000.0)


def llmctl(*args: str) -> dict:
    """`python -m llmctl ARGS --json` in a subprocess; its JSON result."""
    proc = subprocess.run([sys.executable, "-m", "llmctl", *map(str, args), "--json", "--quiet"],
                          capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"llmctl {' '.join(map(str, args))}: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout)


def read_bandwidth(mib: int = 1024, repeats: int = 5) -> float:
    """Bytes per second read from 1 GiB in 2 MB pages (as the native decode plan's weights are:
    core/native/arena.py; 4 KB pages read a fifth slower here): the faster of a torch sum and,
    where it is built, the native float32 product streaming it as a [N, 1024] matrix."""
    from llmctl.core import native
    from llmctl.core.native.arena import huge_buffer

    x = huge_buffer(mib * 2**20).view(torch.float32).fill_(1.0)
    reads = [x.sum]
    if native.has(native.F32):
        w, v = x.view(-1, 1024), torch.ones(1, 1024)
        reads.append(lambda: native.ops().mv_float(v, w))
    for read in reads:
        read()
    return x.numel() * 4 / min(_time(read) for _ in range(repeats) for read in reads)


def build(path: Path, shape: dict) -> Path:
    import transformers

    cfg = transformers.LlamaConfig(**shape, max_position_embeddings=1024, tie_word_embeddings=False,
                                   bos_token_id=None, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def streamed_bytes(path: Path) -> int:
    """Bytes of every stored tensor but the embedding table: what a decoded token reads."""
    from llmctl.core.checkpoint import open_checkpoint

    ck = open_checkpoint(path)
    return sum(t.numel() * t.element_size() for n, t in ck.state_dict().items() if "embed_tokens" not in n)


# -- llama.cpp ---------------------------------------------------------------------------------

def write_gguf(src: Path, out: Path, kind: str) -> Path:
    """The checkpoint at `src` as a llama GGUF (`kind`: F32, F16, Q8_0, Q4_0); q/k rows permuted
    to llama.cpp's rotary layout as its converter does; a placeholder vocabulary."""
    import gguf
    import numpy as np

    from llmctl.core.checkpoint import open_checkpoint

    ck = open_checkpoint(src)
    c = ck.config
    heads, kv, layers = c["num_attention_heads"], c["num_key_value_heads"], c["num_hidden_layers"]
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_context_length(c["max_position_embeddings"])
    w.add_embedding_length(c["hidden_size"])
    w.add_block_count(layers)
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_dimension_count(c["hidden_size"] // heads)
    w.add_rope_freq_base(float(c.get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(c["rms_norm_eps"])
    w.add_file_type({"F32": 0, "F16": 1, "Q8_0": 7, "Q4_0": 2}[kind])
    w.add_tokenizer_model("llama")
    vocab = c["vocab_size"]
    w.add_token_list([f"<t{i}>".encode() for i in range(vocab)])
    w.add_token_scores([0.0] * vocab)
    w.add_token_types([1] * vocab)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)

    def permute(t, n):
        return t.reshape(n, 2, t.shape[0] // n // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)

    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    parts = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for i in range(layers):
        for hf, gg in parts.items():
            names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{gg}.weight"
    qtype = getattr(gguf.GGMLQuantizationType, kind)
    for name, tensor in ck.state_dict().items():
        data = tensor.float().numpy()
        if name.endswith("q_proj.weight"):
            data = permute(data, heads)
        elif name.endswith("k_proj.weight"):
            data = permute(data, kv)
        if data.ndim == 1:  # norms stay float32, as llama.cpp's converter keeps them
            w.add_tensor(names[name], data.astype(np.float32))
        else:
            q = gguf.quants.quantize(data, qtype)
            w.add_tensor(names[name], q, raw_shape=q.shape, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def llama_cpp_runner(path: Path, threads: int, n_ctx: int = 256, n_batch: int = 64):
    from llama_cpp import Llama

    llm = Llama(str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, n_batch=n_batch,
                n_ubatch=n_batch, verbose=False, logits_all=False)

    def run(prompt: list[int], n: int) -> list[int]:
        llm.reset()
        out = []
        for token in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
            out.append(token)
            if len(out) == n:
                break
        return out
    run.close = llm.close
    return run


# -- parts -------------------------------------------------------------------------------------

def scratch(prefix: str) -> Path:
    """A temporary directory removed at exit (the speed run's models and GGUFs take ~3 GB)."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, tmp, True)
    return tmp


@contextlib.contextmanager
def python_step():
    """llmctl's eager decode step in Python: the native whole-step plan switched off."""
    from llmctl.core.native import decode

    saved, decode.native_step = decode.native_step, lambda model: None
    try:
        yield
    finally:
        decode.native_step = saved


def speed(args) -> None:
    import transformers

    from llmctl.core.generate import GenerationConfig, generate
    from llmctl.core.model.io import load_model

    torch.set_num_threads(args.threads)
    bandwidth = read_bandwidth()
    tmp = scratch("llmctl-bench-quant-")
    base = build(tmp / "f32", SHAPE)
    llmctl("quantize", base, "-o", tmp / "int8", "-m", "int8")
    llmctl("quantize", base, "-o", tmp / "int4", "-m", "int4", "--group-size", "128")
    # the head quantized too, as in llama.cpp's q8_0 / q4_0 files: the same bytes per token
    llmctl("quantize", base, "-o", tmp / "int8-head", "-m", "int8", "ignore=[]")
    llmctl("quantize", base, "-o", tmp / "int4-head", "-m", "int4", "--group-size", "128", "ignore=[]")
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, SHAPE["vocab_size"], (args.prompt_tokens or PROMPT_LEN,), generator=g).tolist()
    tok = IdTok({"p": prompt})

    def ours(path: Path, dtype: torch.dtype, compile: bool = False, plan: bool = True):
        model, _ = load_model(path, dtype=dtype)

        def run(p, n):
            cfg = GenerationConfig(max_new_tokens=n, eos_ids=[], batch_size=1, compile=compile)
            with contextlib.nullcontext() if plan else python_step():
                return generate(model, tok, ["p"], cfg)[0].tokens
        return run

    hf = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()

    def run_hf(p, n):
        ids = torch.tensor([p])
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                              min_new_tokens=n, eos_token_id=None, pad_token_id=0)
        return out[0, len(p):].tolist()

    runs = {"llmctl float32": (ours(base, torch.float32), streamed_bytes(base)),
            "llmctl bf16": (ours(base, torch.bfloat16), streamed_bytes(base) // 2),
            "llmctl int8, bf16 activations": (ours(tmp / "int8", torch.bfloat16), streamed_bytes(tmp / "int8")),
            "llmctl int4 g128, bf16 activations": (ours(tmp / "int4", torch.bfloat16), streamed_bytes(tmp / "int4")),
            "llmctl int8 (head too), bf16 activations": (ours(tmp / "int8-head", torch.bfloat16),
                                                          streamed_bytes(tmp / "int8-head")),
            "llmctl int4 g128 (head too), bf16 activations": (ours(tmp / "int4-head", torch.bfloat16),
                                                               streamed_bytes(tmp / "int4-head")),
            "llmctl int8, float32 activations": (ours(tmp / "int8", torch.float32), streamed_bytes(tmp / "int8")),
            "llmctl float32, Python step": (ours(base, torch.float32, plan=False), streamed_bytes(base)),
            "llmctl bf16, Python step": (ours(base, torch.bfloat16, plan=False), streamed_bytes(base) // 2),
            "llmctl int8, bf16 activations, Python step": (ours(tmp / "int8", torch.bfloat16, plan=False),
                                                           streamed_bytes(tmp / "int8")),
            "llmctl int4 g128, bf16 activations, Python step": (ours(tmp / "int4", torch.bfloat16, plan=False),
                                                                streamed_bytes(tmp / "int4")),
            "transformers float32": (run_hf, streamed_bytes(base))}
    if args.compile:
        runs.update({"llmctl float32 --compile": (ours(base, torch.float32, True), streamed_bytes(base)),
                     "llmctl bf16 --compile": (ours(base, torch.bfloat16, True), streamed_bytes(base) // 2),
                     "llmctl int8, bf16 activations, --compile": (ours(tmp / "int8", torch.bfloat16, True),
                                                                   streamed_bytes(tmp / "int8")),
                     "llmctl int4 g128, bf16 activations, --compile": (ours(tmp / "int4", torch.bfloat16, True),
                                                                        streamed_bytes(tmp / "int4"))})
    if args.only:
        runs = {name: run for name, run in runs.items() if name == "llmctl float32" or any(w in name for w in args.only)}
    try:
        import llama_cpp  # noqa: F401
        for kind in ("F32", "F16", "Q8_0", "Q4_0"):
            if args.only and not any(w in f"llama.cpp {kind.lower()}" for w in args.only):
                continue
            path = write_gguf(base, tmp / f"{kind}.gguf", kind)
            size = path.stat().st_size - SHAPE["vocab_size"] * SHAPE["hidden_size"] * {"F32": 4, "F16": 2, "Q8_0": 34 / 32, "Q4_0": 18 / 32}[kind]
            runs[f"llama.cpp {kind.lower()}"] = (llama_cpp_runner(path, args.threads, len(prompt) + args.new_tokens + 8),
                                                 int(size))
    except ImportError:
        print("llama-cpp-python is not installed: no llama.cpp rows", file=sys.stderr)

    for run, _ in runs.values():
        run(prompt, 4)  # warm-up
    reference = runs["llmctl float32"][0](prompt, args.new_tokens)
    best = {name: [float("inf"), float("inf")] for name in runs}
    rounds = {name: [] for name in runs}  # each round's tokens/s
    for _ in range(args.repeats):
        for name, (run, _) in runs.items():
            full, one = _time(lambda: run(prompt, args.new_tokens)), _time(lambda: run(prompt, 1))
            best[name] = [min(best[name][0], full), min(best[name][1], one)]
            rounds[name].append((args.new_tokens - 1) / (full - one))
    bandwidth = max(bandwidth, read_bandwidth())  # the host's memory speed drifts: the better of before and after
    print(f"torch {torch.__version__}, {args.threads} threads, read bandwidth {bandwidth / 1e9:.1f} GB/s, "
          f"load average {os.getloadavg()[0]:.1f}, {args.new_tokens} greedy tokens after a {len(prompt)}-token prompt "
          "at batch 1\n")
    print("| decoder | tok/s | MB read per token | bandwidth share | tokens = llmctl float32 |")
    print("|---|---:|---:|---:|---|")
    for name, (run, nbytes) in runs.items():
        rate = (args.new_tokens - 1) / (best[name][0] - best[name][1])
        same = run(prompt, args.new_tokens) == reference
        print(f"| {name} | {rate:.1f} | {nbytes / 1e6:.0f} | {nbytes * rate / bandwidth:.0%} | {same} |")
    print_round_ratios(rounds)
    for run, _ in runs.values():
        getattr(run, "close", lambda: None)()  # llama.cpp frees its model before interpreter exit


LLAMA_CPP_PEERS = {"float32": "f32", "bf16": "f16", "int8": "q8_0", "int4": "q4_0"}


def prefill(args) -> None:
    """Prompt tokens/s (llama-bench's pp): `generate` of one token after a --prompt-tokens prompt, llmctl
    in float32, bf16 and int8 / int4 g128 with bf16 activations, against llama.cpp's f32, f16, q8_0 and
    q4_0 evaluating the same prompt in one batch; best of --repeats, contenders interleaved."""
    from llmctl.core.generate import GenerationConfig, generate
    from llmctl.core.model.io import load_model

    torch.set_num_threads(args.threads)
    tmp = scratch("llmctl-bench-prefill-")
    base = build(tmp / "f32", SHAPE)
    llmctl("quantize", base, "-o", tmp / "int8", "-m", "int8")
    llmctl("quantize", base, "-o", tmp / "int4", "-m", "int4", "--group-size", "128")
    n = args.prompt_tokens or 512
    prompt = torch.randint(3, SHAPE["vocab_size"], (n,), generator=torch.Generator().manual_seed(0)).tolist()
    tok = IdTok({"p": prompt})

    def ours(path: Path, dtype: torch.dtype):
        model, _ = load_model(path, dtype=dtype)
        cfg = GenerationConfig(max_new_tokens=1, eos_ids=[], batch_size=1)
        return lambda: generate(model, tok, ["p"], cfg)

    runs = {"llmctl float32": ours(base, torch.float32), "llmctl bf16": ours(base, torch.bfloat16),
            "llmctl int8, bf16 activations": ours(tmp / "int8", torch.bfloat16),
            "llmctl int4 g128, bf16 activations": ours(tmp / "int4", torch.bfloat16)}
    try:
        import llama_cpp  # noqa: F401
        for kind in ("F32", "F16", "Q8_0", "Q4_0"):
            run = llama_cpp_runner(write_gguf(base, tmp / f"{kind}.gguf", kind), args.threads, n_ctx=n + 8, n_batch=n)
            runs[f"llama.cpp {kind.lower()}"] = functools.partial(run, prompt, 1)
    except ImportError:
        print("llama-cpp-python is not installed: no llama.cpp rows", file=sys.stderr)
    rounds = {name: [] for name in runs}
    for run in runs.values():
        run()  # warm-up: kernels made, pages touched
    for _ in range(args.repeats):
        for name, run in runs.items():
            rounds[name].append(n / _time(run))
    print(f"torch {torch.__version__}, {args.threads} threads, load average {os.getloadavg()[0]:.1f}, "
          f"a {n}-token prompt and one new token at batch 1\n")
    print("| prefill | prompt tokens/s |\n|---|---:|")
    print("\n".join(f"| {name} | {max(rates):.0f} |" for name, rates in rounds.items()))
    print_round_ratios(rounds)
    for run in runs.values():
        getattr(getattr(run, "func", run), "close", lambda: None)()


def print_round_ratios(rounds: dict[str, list[float]]) -> None:
    """llmctl's tokens/s over llama.cpp's at the same precision, round by round (the two ran
    seconds apart, so the host's drifting memory speed mostly cancels): median and range."""
    import statistics

    lines = []
    for name, rates in rounds.items():
        words = name.split()
        if words[0] != "llmctl" or "Python step" in name or "--compile" in name or "float32 activations" in name:
            continue
        peer = f"llama.cpp {LLAMA_CPP_PEERS[words[1].rstrip(',')]}"
        if peer in rounds:
            ratios = [a / b for a, b in zip(rates, rounds[peer])]
            lines.append(f"| {name} | {peer} | {statistics.median(ratios):.2f}× | {min(ratios):.2f}–{max(ratios):.2f}× |")
    if lines:
        print("\n| llmctl | llama.cpp | ratio, median of rounds | range |\n|---|---|---:|---:|")
        print("\n".join(lines))


def quantize_time(args) -> None:
    tmp = scratch("llmctl-bench-qtime-")
    base = build(tmp / "llama", LLAMA_PRESET)
    text = tmp / "calibration.txt"
    g = torch.Generator().manual_seed(0)  # random words: timing does not depend on the text
    words = [f"w{int(i)}" for i in torch.randint(0, 5000, (400_000,), generator=g)]
    text.write_text(" ".join(words))
    from tokenizers import Tokenizer, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<unk>", *sorted(set(words))])}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(base / "tokenizer.json"))
    (base / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    print(f"`llama` preset shape (125M, random weights), {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.1f}\n")
    print("| method | wall s | peak RSS MB | checkpoint MB |")
    print("|---|---:|---:|---:|")
    calib = ["--calibration", text, "--samples", args.samples, "--seq-len", args.seq_len]
    gptq = [(f"GPTQ int4 g128 ({args.samples}×{args.seq_len} tokens, micro-batch {m})",
             ["-m", "gptq", *calib, f"micro_batch={m}"]) for m in args.micro_batch]
    for name, extra in (("RTN int8", ["-m", "int8"]), ("RTN int4 g128", ["-m", "int4"]), *gptq):
        start = time.perf_counter()
        r = llmctl("quantize", base, "-o", tmp / "-".join(name.split()[:2]), *extra, "--force")
        wall = time.perf_counter() - start
        print(f"| {name} | {wall:.1f} | {r['peak_rss_mb']:.0f} | {r['size_mb']:.0f} |")


def held_out_kl(t, windows: int = 16, seq_len: int = 256):
    """A function giving a checkpoint's mean KL(float ‖ it) per token on `windows` held-out windows."""
    import torch.nn.functional as F

    from llmctl.core.model.io import load_model
    from llmctl.core.tokenizer import load_tokenizer

    ids = torch.tensor(load_tokenizer(t.model).encode(t.val.read_text(encoding="utf-8"))[: windows * seq_len])
    tokens = ids.view(-1, seq_len)

    @torch.no_grad()
    def logprobs(path):
        return load_model(path)[0].eval()(tokens).logits.log_softmax(-1).flatten(0, 1)

    reference = logprobs(t.model)
    return lambda path: F.kl_div(logprobs(path), reference, log_target=True, reduction="batchmean").item()


LLMCOMPRESSOR = {  # row: (benchmarks/llmcompressor_anchor.py --method, --scheme: llm-compressor's preset)
    "llm-compressor int4 RTN g128": ("rtn", "W4A16"), "llm-compressor int4 AWQ g128": ("awq", "W4A16"),
    "llm-compressor int4 RTN g128 asym": ("rtn", "W4A16_ASYM"), "llm-compressor int4 AWQ g128 asym": ("awq", "W4A16_ASYM")}


def llmctl_windows(t, calib: list, out: Path, sha256: str) -> Path:
    """The calibration windows `llmctl quantize {calib}` drew (its lineage's `sha256`), as `input_ids`
    in a safetensors file."""
    from safetensors.torch import save_file

    from llmctl.core.quant.calibration import calibration_windows
    from llmctl.core.tokenizer import load_tokenizer

    samples, seq_len = (int(calib[calib.index(flag) + 1]) for flag in ("--samples", "--seq-len"))
    ids, record = calibration_windows([str(t.train)], load_tokenizer(t.model), samples, seq_len, seed=0)
    if record["sha256"] != sha256:
        raise SystemExit("the calibration windows differ from those llmctl quantize used")
    save_file({"input_ids": ids.contiguous()}, str(out))
    return out


def llmcompressor_rows(python: str, t, work: Path, calib: list, sha256: str, kl_to_float, anchors=LLMCOMPRESSOR):
    """(name, perplexity, KL, seconds) of llm-compressor's own `anchors` (default: RTN and AWQ) on the same
    model and windows, run by `python` (a venv with llmcompressor: `benchmarks/llmcompressor_anchor.py`) and
    read by llmctl."""
    windows = llmctl_windows(t, calib, work / "calibration-windows.safetensors", sha256)
    script = Path(__file__).with_name("llmcompressor_anchor.py")
    for name, (method, scheme) in anchors.items():
        out = work / name.replace(" ", "_")
        shutil.rmtree(out, ignore_errors=True)
        proc = subprocess.run([python, "-P", str(script), str(t.model), str(windows), str(out), "--method", method,
                               "--scheme", scheme], capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
        seconds = json.loads(proc.stdout.strip().splitlines()[-1])["seconds"]
        yield name, t.perplexity(out), kl_to_float(out), seconds


def quality(args) -> None:
    t = trained.from_arguments(args)
    work = t.model.parent / "quantize"
    seq_len = min(args.seq_len, 256)  # the trained model's context
    calib = ["--calibration", t.train, "--samples", args.samples, "--seq-len", seq_len]
    g = f"g{args.group_size}"
    group = ["--group-size", args.group_size]
    variants = {"float": None, "int8": ["-m", "int8"], f"int4 RTN {g}": ["-m", "int4", *group],
                f"int4 GPTQ {g}": ["-m", "gptq", *group, *calib],
                f"int4 GPTQ {g} act-order": ["-m", "gptq", *group, *calib, "gptq.act_order=true"],
                f"int4 AWQ {g}": ["-m", "awq", *group, *calib], f"int4 RTN {g} asym": ["-m", "int4", *group, "--asym"],
                f"int4 AWQ {g} asym": ["-m", "awq", *group, "--asym", *calib], "NF4": ["-m", "nf4"]}
    lines = [f"Model: {t.describe()}{outliers.describe(t.record)}; perplexity on the held-out text; calibration "
             f"{args.samples} windows of {seq_len} tokens from the training text.", "",
             "| model | perplexity | change | KL to float (nats/token) | rel. output error at quantize time "
             "| quantize s |", "|---|---:|---:|---:|---:|---:|"]
    change, kl, base, kl_to_float = {}, {}, t.perplexity(t.model), held_out_kl(t)
    windows_sha256 = None  # of the calibration windows llmctl's calibrated methods drew
    for name, extra in variants.items():
        if extra is None:
            path, q = t.model, {}
        else:
            path = work / name.replace(" ", "_")
            q = json.loads(trained.llmctl("quantize", t.model, "-o", path, *extra, "--force", "--json").stdout)
            q = q["quantization"]
            windows_sha256 = q.get("calibration", {}).get("sha256", windows_sha256)
        value = base if extra is None else t.perplexity(path)
        change[name], kl[name] = value / base - 1, kl_to_float(path)
        err = q.get("error", {}).get("output_error")
        err = "" if err is None else f"{err:.2e}"
        lines.append(f"| {name} | {value:.3f} | {100 * change[name]:+.2f} % | {kl[name]:.2e} | {err} | "
                     f"{q.get('seconds', '')} |")
    if args.llmcompressor:
        if args.group_size != 128:
            raise SystemExit("--llmcompressor runs llm-compressor's W4A16 presets: groups of 128 only")
        anchors = llmcompressor_rows(args.llmcompressor, t, work, calib, windows_sha256, kl_to_float)
        for name, value, kl_value, seconds in anchors:
            change[name], kl[name] = value / base - 1, kl_value
            lines.append(f"| {name} | {value:.3f} | {100 * change[name]:+.2f} % | {kl_value:.2e} | | {seconds} |")
    for what, values, unit in (("perplexity change", change, " %"), ("KL to float", kl, "")):
        for tool in ("", "llm-compressor "):
            for grid in ("", " asym"):  # each method against round-to-nearest on the same grid, by the same tool
                rtn = values.get(f"{tool}int4 RTN {g}{grid}")
                if rtn is None:
                    continue
                shares = [f"{name.removeprefix(tool).removeprefix('int4 ')} {values[name] / rtn:.0%}" for name in values
                          if name.startswith((f"{tool}int4 GPTQ", f"{tool}int4 AWQ")) and name.endswith(" asym") == bool(grid)]
                rtn = f"{100 * rtn:+.2f} %" if unit else f"{rtn:.2e}"
                lines += ["", f"{what} as a share of {tool}int4 RTN{grid}'s ({rtn}; goal ≤ 60 %): " + ", ".join(shares)]
    suffix = f"{outliers.suffix(t.record)}{'' if args.group_size == 128 else '-' + g}{'-llmcompressor' if args.llmcompressor else ''}"
    out = Path(__file__).parent / "results" / f"quantize-quality-{t.stem}{suffix}.md"
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("part", choices=["speed", "prefill", "time", "quality"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, help=f"the prompt's length (speed: {PROMPT_LEN}, decoding at a "
                    "depth; prefill: 512)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--group-size", type=int, default=128, help="quality: int4 groups (a width 128 does not divide, "
                    "such as SmolLM2-135M's 576, needs 64)")
    ap.add_argument("--compile", action="store_true", help="speed: also llmctl's --compile decode step")
    ap.add_argument("--only", nargs="+", help="speed: only the decoders whose names contain one of these "
                    "(llmctl float32, the reference, always runs)")
    ap.add_argument("--llmcompressor", metavar="PYTHON", help="quality: also llm-compressor's own RTN and AWQ, run by "
                    "this interpreter (a venv with llmcompressor; benchmarks/llmcompressor_anchor.py)")
    ap.add_argument("--micro-batch", type=int, nargs="+", default=[4],
                    help="time: calibration windows per forward pass, one GPTQ run each")
    trained.add_arguments(ap.add_argument_group("quality: the trained model (benchmarks/trained.py)"))
    args = ap.parse_args()
    {"speed": speed, "prefill": prefill, "time": quantize_time, "quality": quality}[args.part](args)


if __name__ == "__main__":
    main()
