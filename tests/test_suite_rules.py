"""Rules the test suite keeps about itself."""

from __future__ import annotations

import re
from pathlib import Path

OPTIONAL = {"torch", "llama_cpp"}  # torch: its own guard in each file; llama_cpp: not a [dev] requirement


def test_reference_libraries_are_imported_plainly():
    """The references (transformers, PEFT, TRL, gguf, compressed-tensors, …) are [dev] requirements:
    a broken install must fail the run, not turn their parity tests into skips (`importorskip`)."""
    found = sorted((p.name, m) for p in Path(__file__).parent.glob("*.py")
                   for m in re.findall(r"importorskip\(\s*[\"']([\w.]+)[\"']", p.read_text()))
    assert found and [(name, m) for name, m in found if m not in OPTIONAL] == []
