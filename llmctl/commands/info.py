"""`llmctl info CKPT`: what a checkpoint is, read from its configs and safetensors headers
(no weights loaded, torch not imported)."""

from pathlib import Path
from typing import Annotated, Any

import typer

from llmctl.console import console, emit, table
from llmctl.options import human_bytes, human_count


def info(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint directory (llmctl or Hugging Face).", show_default=False)],
) -> None:
    """Architecture, parameters, dtype, size, tokenizer, lineage, quantization and sparsity of a checkpoint
    (of an adapter directory: its base's, and the adapter's method, rank, targets and trainable share)."""
    from llmctl.core.adapters import base_path, describe_adapter, is_adapter
    from llmctl.core.checkpoint import open_checkpoint
    from llmctl.core.summary import describe
    from llmctl.errors import CheckpointError

    try:
        adapter = is_adapter(checkpoint)
        summary = describe(open_checkpoint(base_path(checkpoint) if adapter else checkpoint))
        if adapter:  # the base's architecture; the adapter's own lineage and metrics
            summary["adapter"] = describe_adapter(checkpoint, summary["parameters"]["total"])
            summary.update(path=str(checkpoint), lineage=summary["adapter"].pop("lineage"),
                           metrics=summary["adapter"].pop("metrics"))
        rows = _rows(summary)
    except (TypeError, ValueError, AttributeError, KeyError, IndexError) as exc:  # a field of the wrong type
        raise CheckpointError(f"{checkpoint}: config.json or llmctl.json has a malformed field "
                              f"({type(exc).__name__}: {exc})") from None
    emit(summary, lambda: console.print(table(str(checkpoint), ["field", "value"], rows)))


def _rows(s: dict[str, Any]) -> list[list[Any]]:
    params = s["parameters"]
    count = human_count(params["total"])
    if params["active"] is not None:
        count += f" ({human_count(params['active'])} active, {s['experts_per_token']} of {s['num_experts']} experts)"
    rows = [
        ["architecture", _v(s["architecture"])],
        ["model_type", _v(s["model_type"])],
        ["parameters", count],
        ["layers", _v(s["layers"])],
        ["hidden / intermediate", f"{_v(s['hidden_size'])} / {_v(s['intermediate_size'])}"],
        ["heads / kv heads / head dim", f"{_v(s['heads'])} / {_v(s['kv_heads'])} / {_v(s['head_dim'])}"],
        ["vocab", _v(s["vocab_size"])],
        ["context length", _v(s["context_length"])],
        ["position", _position(s["position"])],
        ["dtype", ", ".join(f"{d} ({human_count(n)})" for d, n in s["dtypes"].items()) or "-"],
        ["size", f"{human_bytes(s['size_bytes'])} weights, {human_bytes(s['disk_bytes'])} on disk"],
        ["shards", f"{len(s['shards'])} {s['format']} file(s)"],
        ["tokenizer", ("yes" if s["tokenizer"] else "no") + (", chat template" if s["chat_template"] else "")],
    ]
    lineage = s["lineage"]
    if lineage is not None:
        rows.append(["created by", f"llmctl {lineage['command']} at {lineage['created'] or '?'}" if lineage["command"]
                     else "not recorded (made elsewhere; llmctl.json holds no lineage)"])
        if lineage.get("merge_method"):
            rows.append(["merge method", lineage["merge_method"]])
        for parent in lineage["parents"]:
            rows.append(["parent", f"{parent.get('path')} ({(parent.get('hash') or '?')[:12]})"])
    for spec in s.get("transforms") or []:
        rows.append(["transform", ", ".join(f"{k}={v}" for k, v in spec.items() if v is not None)])
    for key in ("quantization", "sparsity"):
        for k, v in (s[key] or {}).items():
            rows.append([f"{key} {k}", _compact(v)])
    rows.append(["metrics records", s["metrics"]])
    if s.get("adapter"):
        a = s["adapter"]
        share = f" ({a['trainable_share']:.2%} of the base)" if a["trainable_share"] is not None else ""
        ranks = a.get("ranks") or []
        span = f"{ranks[0]}" if len(ranks) == 1 else f"{ranks[0]}–{ranks[-1]}" if ranks else ""
        per_module = f" (per module {span})" if ranks and ranks != [a["r"]] else ""
        rows += [["adapter", f"{a['method']}" + (f", r={a['r']}{per_module}, alpha={a['alpha']}" if a["r"] else "")],
                 ["adapter virtual tokens", a["num_virtual_tokens"]] if a["num_virtual_tokens"] else
                 ["adapter targets", f"{a['targets']} ({a['modules']} modules)" if a["modules"] else _v(a["targets"])],
                 ["adapter parameters", f"{human_count(a['parameters'])}{share}"],
                 ["base", a["base"] + "".join(f" + {t['type']}" for t in a["base_transforms"])]]
        if a.get("task_type") == "SEQ_CLS":  # a reward model: the base as a sequence classifier
            rows.append(["adapter task", f"SEQ_CLS (sequence classifier), trained in full: {_compact(a['modules_to_save'])}"])
    return rows


def _compact(value: Any) -> str:
    """A lineage value on one line: mappings as k=v, lists comma-separated, floats to 3 digits."""
    if isinstance(value, dict):
        return ", ".join(f"{k}={_compact(v)}" for k, v in value.items())
    if isinstance(value, list):
        return ", ".join(map(_compact, value))
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _v(value: Any) -> Any:
    return "-" if value is None else value


def _position(p: dict[str, Any]) -> str:
    details = []
    for key, value in p.items():
        if isinstance(value, dict):
            details.append(f"{key}: " + " ".join(f"{k}={_num(v)}" for k, v in value.items()))
        elif key != "type" and value is not None:
            details.append(f"{key}={_num(value)}")
    return p["type"] + (f" ({', '.join(details)})" if details else "")


def _num(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)
