"""llm-compressor's own AWQ, GPTQ and round-to-nearest on a checkpoint: the anchor rows of
`python -m benchmarks.quantize quality --llmcompressor PYTHON` (RTN, AWQ) and of
`python -m benchmarks.prune --llmcompressor PYTHON` (RTN, GPTQ on the 2:4 model).

llm-compressor pins transformers and torch to ranges of its own, so it lives in a venv of its own and
this script runs under that venv's interpreter (with -P: benchmarks/tokenize.py would shadow the
standard library's); it imports nothing from llmctl:

    python -m venv /tmp/lcvenv && /tmp/lcvenv/bin/pip install torch==2.13.0 llmcompressor
    /tmp/lcvenv/bin/python -P benchmarks/llmcompressor_anchor.py MODEL WINDOWS.safetensors OUT --method awq --scheme W4A16_ASYM

WINDOWS holds `input_ids` [samples, seq_len]: the calibration windows of llmctl's own run, so that both
see the same tokens. OUT is written compressed (compressed-tensors `pack-quantized`), with MODEL's
tokenizer files beside it; the last line of stdout is JSON: {"seconds": …, "llmcompressor": version}.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("windows", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--method", choices=["awq", "gptq", "rtn"], required=True)
    ap.add_argument("--scheme", default="W4A16", help="llm-compressor's preset: W4A16 (int4 g128, symmetric), "
                    "W4A16_ASYM")
    args = ap.parse_args()

    import llmcompressor
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.awq import AWQModifier
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.pipelines.cache import IntermediatesCache
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    if not torch.accelerator.is_available():  # 0.14's AWQ pins its cache for GPU copies, which fails on a CPU-only
        IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None  # host; pinning changes no value

    ids = load_file(str(args.windows))["input_ids"]
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    modifier = {"awq": AWQModifier, "gptq": GPTQModifier, "rtn": QuantizationModifier}[args.method]
    recipe = modifier(targets=["Linear"], scheme=args.scheme, ignore=["lm_head"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(args.model / "tokenizer.json"))  # oneshot asks for one
    start = time.perf_counter()
    oneshot(model=model, processor=tokenizer, dataset=data, recipe=recipe, max_seq_length=ids.shape[1],
            num_calibration_samples=len(ids))
    seconds = time.perf_counter() - start
    model.save_pretrained(args.out, save_compressed=True)
    for name in TOKENIZER_FILES:
        if (args.model / name).is_file():
            shutil.copy(args.model / name, args.out / name)
    print(json.dumps({"seconds": round(seconds, 1), "llmcompressor": llmcompressor.__version__}))


if __name__ == "__main__":
    main()
