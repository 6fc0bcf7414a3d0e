"""`llmctl export CKPT --format gguf -o FILE`: a checkpoint in another runtime's format.

Formats are registered exporters (`core/export/`; plugins add more in the `llmctl.exporters`
entry-point group). GGUF files run in llama.cpp, ollama and LM Studio.
"""

from pathlib import Path
from typing import Annotated, Optional

import typer

from llmctl.options import human_bytes, option


def export(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint directory (llmctl or Hugging Face).", show_default=False)],
    output: Annotated[Path, option("--output", "-o", help="The file to write (e.g. model.gguf).")],
    format: Annotated[str, option("--format", help="Output format: gguf, or one a plugin adds.")] = "gguf",
    type: Annotated[Optional[str], option("--type", "-t", help="Tensor type; gguf: f16 (default), f32, bf16, q8_0, q4_0, q4_k_m.")] = None,
) -> None:
    """Export a checkpoint to another runtime's format (GGUF for llama.cpp), streamed tensor by tensor."""
    from llmctl.console import REPORTER, emit, info
    from llmctl.core.export import EXPORTERS
    from llmctl.core.outputs import claim_output
    from llmctl.runtime import options

    exporter = EXPORTERS.get(format)()
    type = type or exporter.types[0]
    with claim_output(output, exporter.kind, force=options.force, inputs=[checkpoint]):
        result = exporter.export(checkpoint, output, type=type, force=options.force, report=REPORTER)
    emit(result, lambda: info(f"wrote {output} ({format} {type}, {result['tensors']} tensors, "
                              f"{human_bytes(result['bytes'])})"))
