"""Export a checkpoint to another runtime's file format; each format is a registered `Exporter`.

    exporter = EXPORTERS.get("gguf")()
    result = exporter.export(ckpt, "model.gguf", type="q8_0", force=False, report=REPORTER)

A plugin adds a format by declaring an `Exporter` subclass in the `llmctl.exporters`
entry-point group; `llmctl export CKPT --format NAME` then finds it.
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

from llmctl.core.registry import Registry
from llmctl.core.report import SILENT, Reporter


class Exporter:
    """One output format: the tensor types it offers and `export`, which writes one file or dir."""

    #: tensor types `--type` accepts; the first is the default
    types: ClassVar[tuple[str, ...]] = ()
    #: the `OUTPUT_KINDS` name `--force` checks an existing output against
    kind: ClassVar[str] = ""

    def export(self, checkpoint: str | os.PathLike, output: str | os.PathLike, *, type: str,
               force: bool = False, report: Reporter = SILENT) -> dict[str, Any]:
        """Write `checkpoint` to `output` (atomically); return a summary for the command to show."""
        raise NotImplementedError


EXPORTERS: Registry[type["Exporter"]] = Registry("export format", "llmctl.exporters", base=Exporter)


def _register_builtins() -> None:
    from llmctl.core.export import gguf  # noqa: F401  (registers "gguf")


_register_builtins()
