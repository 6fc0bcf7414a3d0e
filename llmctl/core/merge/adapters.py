"""LoRA adapters as merge inputs: `BASE+ADAPTER` (mergekit's spelling) or an adapter directory
(whose config names its base), each materialised as its merged weights — the adapter loaded
on its base and folded in (`core/adapters`) — in a scratch directory, then merged like any
checkpoint."""

from __future__ import annotations

from pathlib import Path

from llmctl.errors import UsageError


def split(ref: str) -> tuple[str | None, str] | None:
    """(base or None, adapter dir) when `ref` names an adapter, else None."""
    from llmctl.core.adapters import is_adapter

    if Path(ref).exists():
        return (None, ref) if is_adapter(ref) else None
    base, plus, adapter = ref.partition("+")
    if not plus:
        return None
    for part in (base, adapter):
        if not Path(part).exists():
            raise UsageError(f"model {ref!r}: {part} does not exist (BASE+ADAPTER names two directories)")
    if not is_adapter(adapter):
        raise UsageError(f"model {ref!r}: {adapter} is not a PEFT adapter directory (no adapter_config.json)")
    return base, adapter


def materialise(refs: list[str], scratch: Path) -> tuple[dict[str, Path], dict[str, list[str]]]:
    """({ref: merged checkpoint dir}, {ref: [base, adapter] parents}) for the adapter refs."""
    from llmctl.core.adapters import base_path, load_adapter, merge_adapter
    from llmctl.core.checkpoint import open_checkpoint
    from llmctl.core.model.io import save_model

    paths, parents = {}, {}
    for i, ref in enumerate(refs):
        found = split(ref)
        if found is None:
            continue
        base, adapter = found
        base = Path(base) if base is not None else base_path(adapter)
        model, _ = load_adapter(adapter, base=base)
        source = open_checkpoint(base)
        paths[ref] = save_model(merge_adapter(model), scratch / f"input-{i}", generation_config=source.generation_config,
                                tokenizer_dir=base if source.has_tokenizer else None)
        parents[ref] = [str(base), str(adapter)]
        del model
    return paths, parents
