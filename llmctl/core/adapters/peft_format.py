"""Adapter directories in PEFT's layout: `adapter_config.json` + `adapter_model.safetensors`.

    save_adapter(model, out, base=BASE)      # PeftModel.from_pretrained(hf_base, out) loads it
    model, cfg = load_adapter(out)           # base found through base_model_name_or_path

An adapter is the model's last transform, one with a `peft_type` (LORA: `lora.py`;
PREFIX_TUNING, PROMPT_TUNING: `prompt.py`); it writes its own config fields and tensors
(`peft_config`, `peft_tensors`: {PEFT key: tensor}) and reads them (`from_peft_config`).
LoRA's keys are `base_model.model.<HF module path>.lora_A.weight`, `….lora_B.weight`,
`….lora_magnitude_vector` (DoRA) and `base_model.model.<path>.weight` for `modules_to_save`;
module paths are the base architecture's Hugging Face names (`hf.module_groups`; an HF module
that fuses several of ours holds one exact adapter for its parts, `_fuse` / `_unfuse`); prefix and
prompt tuning store one tensor, `prompt_embeddings`. A reward model's adapter (the base made a
sequence classifier, `num_labels`) is PEFT's `task_type: "SEQ_CLS"`: its score head is a module
to save, `base_model.model.score.weight`, so `PeftModel.from_pretrained(
AutoModelForSequenceClassification.from_pretrained(base, num_labels=…), out)` loads it. Beside them
llmctl writes `llmctl.json` (lineage; `base_transforms`: transforms applied to the base before
the adapter, such as QLoRA's `nf4`; `base_context`: config fields set at finetune time — a
rotary context, `max_seq_len` / `rope_scaling`, and a classifier's `num_labels`, `pad_token_id`,
`tie_embeddings`) and the tokenizer. `base_model_name_or_path` may be
absolute or relative (to the adapter directory first, then to the working directory).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmctl.core.adapters.files import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PREFIX, base_path, read_config
from llmctl.core.adapters.lora import ADAPTER_TENSORS, LoRA, dense_weight, lora_modules, pattern_value, saved_modules
from llmctl.core.model.config import CONTEXT_FIELDS
from llmctl.core.model.transforms import ALL_LINEAR, matches
from llmctl.errors import CheckpointError

_FIELDS = {"r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "use_rslora": "rslora", "use_dora": "dora",
           "target_modules": "target_modules", "exclude_modules": "exclude_modules",
           "layers_to_transform": "layers_to_transform", "modules_to_save": "modules_to_save"}
CLASSIFIER_FIELDS = ("num_labels", "pad_token_id", "tie_embeddings")  # a reward model's, beside its base's
HEAD = "lm_head"  # our name of a classifier's score head (HF: `score`)
_UNSUPPORTED = {"bias": "none", "layers_pattern": None, "trainable_token_indices": None, "layer_replication": None,
                "target_parameters": None, "lora_bias": False}


# -- names ---------------------------------------------------------------------------------------


def _groups(model: nn.Module) -> dict[str, tuple[Any, tuple[str, ...]]]:
    """{HF module path: (rule, our module paths)}: `hf.module_groups` of the model's architecture."""
    from llmctl.core.hf import module_groups

    return module_groups(model.cfg)


def _fused(model: nn.Module) -> dict[str, tuple[Any, tuple[str, ...]]]:
    """The HF modules that hold several of ours (Phi-3's `qkv_proj`): one LoRA there is one on each part."""
    return {theirs: group for theirs, group in _groups(model).items() if len(group[1]) > 1}


def _hf_names(model: nn.Module) -> dict[str, str]:
    """{our module path: HF module path} (identity where the architecture names match; each part
    of a fused module maps to it)."""
    return {ours: theirs for theirs, (_, parts) in _groups(model).items() for ours in parts}


def _identity(model: nn.Module) -> bool:
    """Whether the names match one to one but for a classifier's head (`score`, a module to save,
    never a target)."""
    return all(parts == (theirs,) and not r.transpose for theirs, (r, parts) in _groups(model).items()
               if parts != (HEAD,))


def _scaled_alpha(scaling: float, r: int, rslora: bool) -> float:
    """The alpha that gives `scaling` at rank r (alpha / r, or alpha / √r with rsLoRA)."""
    return scaling * (math.sqrt(r) if rslora else r)


def adapter_transform(config: dict, model: nn.Module, where: str = ADAPTER_CONFIG):
    """The adapter transform a PEFT config describes, for `model`."""
    from llmctl.core.model.transforms import TRANSFORMS

    kinds = {cls.peft_type: cls for _, cls in TRANSFORMS.items() if getattr(cls, "peft_type", None)}
    kind = config.get("peft_type")
    if kind not in kinds:
        raise CheckpointError(f"{where}: peft_type {kind!r} is not supported; supported: {', '.join(sorted(kinds))}")
    return kinds[kind].from_peft_config(config, model, where)


def transform_from_config(config: dict, model: nn.Module, where: str = ADAPTER_CONFIG) -> LoRA:
    """The `lora` transform a PEFT LoRA config describes, for `model` (our module names)."""
    for key, default in _UNSUPPORTED.items():
        if config.get(key) not in (default, None):
            raise CheckpointError(f"{where}: {key}={config[key]!r} is not supported")
    params = {ours: config[theirs] for theirs, ours in _FIELDS.items() if theirs in config}
    names = _hf_names(model)
    if params.get("modules_to_save"):  # HF names (a classifier's `score`) → ours
        ours = {theirs: o for o, theirs in names.items()}
        params["modules_to_save"] = [ours.get(m, m) for m in params["modules_to_save"]]
    if _identity(model):
        return LoRA(**params, rank_pattern=config.get("rank_pattern") or None,
                    alpha_pattern=config.get("alpha_pattern") or None)
    if params.get("target_modules") != ALL_LINEAR:  # select on HF names, keep ours
        picked = {t for t in names.values() if matches(t, params.get("target_modules"))
                  and not matches(t, params.get("exclude_modules")) and _in_layers(t, params.get("layers_to_transform"))}
        params.update(target_modules=[o for o, t in names.items() if t in picked], exclude_modules=None,
                      layers_to_transform=None)
    plain, patterns = LoRA(**params), {}  # PEFT's patterns read on HF paths, one entry per module of ours
    for key, field in (("rank_pattern", "r"), ("alpha_pattern", "alpha")):
        value = getattr(plain, field)
        own = {re.escape(o): v for o, t in names.items() if (v := pattern_value(config.get(key), t, value)) != value}
        patterns[key] = own or None
    return LoRA(**params, **patterns)


def _in_layers(path: str, layers: list[int] | None) -> bool:
    """PEFT's `layers_to_transform` on an HF path: the layer is its first numbered segment (BERT's
    `encoder.layer.N`, Llama's `layers.N`)."""
    found = re.match(r".*?\.[^.]*\.(\d+)\.", path)
    return layers is None or (found is not None and int(found.group(1)) in layers)


def adapter_config(transform: LoRA, model: nn.Module) -> dict[str, Any]:
    """adapter_config.json for `transform` on `model`, in PEFT's fields (but the base).

    Each module's rank and alpha that differ from `r` / `lora_alpha` are written as explicit
    `rank_pattern` / `alpha_pattern` entries (a fused HF module's: `_fuse`'s rank and alpha)."""
    names, groups = _hf_names(model), _groups(model)
    spec = {theirs: getattr(transform, ours) for theirs, ours in _FIELDS.items()}
    modules = lora_modules(model)
    targets = list(dict.fromkeys(names.get(p, p) for p in modules))
    if (not _identity(model) and transform.target_modules != ALL_LINEAR) or \
            (isinstance(transform.target_modules, str) and transform.layers_to_transform is not None):  # PEFT refuses
        spec.update(target_modules=targets, exclude_modules=None, layers_to_transform=None)
    if transform.modules_to_save:
        spec["modules_to_save"] = [names.get(m, m) for m in transform.modules_to_save]
    ranks, alphas = {}, {}
    for theirs in targets:
        parts = [modules[p] for p in groups.get(theirs, (None, (theirs,)))[1] if p in modules]
        r = sum(m.r for m in parts)
        alpha = _scaled_alpha(parts[0].scaling, r, transform.rslora)
        if r != transform.r:
            ranks[re.escape(theirs)] = r
        if not math.isclose(alpha, transform.alpha, rel_tol=1e-12):
            alphas[re.escape(theirs)] = alpha
    transposed = any(groups[t][0].transpose for t in targets if t in groups)
    return {"peft_type": "LORA", "task_type": task_type(model), **spec,
            "bias": "none", "fan_in_fan_out": transposed, "init_lora_weights": True, "inference_mode": True,
            "layers_pattern": None, "rank_pattern": ranks, "alpha_pattern": alphas, "revision": None}


def task_type(model: nn.Module) -> str | None:
    """PEFT's task type of an adapter on `model`: SEQ_CLS for a classifier (reward model), CAUSAL_LM for a
    decoder, none for an encoder's masked LM (PEFT has no task type for it; CAUSAL_LM fails to load)."""
    return "SEQ_CLS" if model.cfg.num_labels else "CAUSAL_LM" if model.cfg.is_causal else None


def adapter_tensors(model: nn.Module, transform: LoRA) -> dict[str, torch.Tensor]:
    """{PEFT key: tensor}: the adapters and the `modules_to_save` (a fused HF module's adapter
    made from its parts', `_fuse`)."""
    return _fuse(model, live_tensors(model, transform))


def live_tensors(model: nn.Module, transform: LoRA) -> dict[str, torch.Tensor]:
    """`adapter_tensors` before fusing: the model's own tensors, a fused HF module's parts under
    our module paths."""
    names = {o: t for o, t in _hf_names(model).items() if o not in _parts(model)}
    out = {}
    for path, module in lora_modules(model).items():
        prefix = PREFIX + names.get(path, path)
        for part in ADAPTER_TENSORS:
            value = getattr(module, part)
            if value is not None:
                out[f"{prefix}.{part}" + (".weight" if isinstance(value, nn.Module) else "")] = \
                    value.weight if isinstance(value, nn.Module) else value
    for path in saved_modules(model, transform.modules_to_save):
        for name, tensor in model.get_submodule(path).state_dict().items():
            out[f"{PREFIX}{names.get(path, path)}.{name}"] = tensor
    return {k: v.detach().contiguous() for k, v in out.items()}


def _parts(model: nn.Module) -> set[str]:
    return {p for _, parts in _fused(model).values() for p in parts}


def _fuse(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The parts' adapters of each fused HF module as one exact adapter there: A stacked (rank the
    sum of the parts' ranks), B block-diagonal in the module's row order (zero rows for a part
    without one), each block rescaled to the first part's scaling; DoRA's magnitudes joined (a
    part without an adapter: its weight's row norms, which leave it unchanged)."""
    from llmctl.core.hf import join_rows

    out = dict(tensors)
    modules = lora_modules(model)
    for theirs, (rule, parts) in _fused(model).items():
        adapted = [p for p in parts if p in modules]
        if not adapted:
            continue
        a = [out.pop(f"{PREFIX}{p}.lora_A.weight") for p in adapted]
        b = {p: out.pop(f"{PREFIX}{p}.lora_B.weight") for p in adapted}
        magnitude = {p: out.pop(f"{PREFIX}{p}.lora_magnitude_vector", None) for p in adapted}
        scaling, rank = modules[adapted[0]].scaling, sum(t.shape[0] for t in a)
        blocks, start = [], 0
        for p in parts:
            block = a[0].new_zeros(model.get_submodule(p).out_features, rank)
            if p in b:
                block[:, start:start + b[p].shape[1]] = b[p] * (modules[p].scaling / scaling)
                start += b[p].shape[1]
            blocks.append(block)
        out[f"{PREFIX}{theirs}.lora_A.weight"] = torch.cat(a)
        out[f"{PREFIX}{theirs}.lora_B.weight"] = join_rows(rule, blocks, model.cfg.head_dim)
        if magnitude[adapted[0]] is not None:
            rows = [magnitude[p] if p in magnitude else
                    torch.linalg.norm(dense_weight(model.get_submodule(p)).detach().float(), dim=1) for p in parts]
            out[f"{PREFIX}{theirs}.lora_magnitude_vector"] = join_rows(rule, rows, model.cfg.head_dim)
    return out


def _unfuse(model: nn.Module, tensors: dict[str, torch.Tensor], file: Path) -> dict[str, torch.Tensor]:
    """Inverse of `_fuse` for a fused HF module's adapter (rank R): each part gets A and its rows of B
    (and of DoRA's magnitudes), rank R — exact, whatever made the file."""
    from llmctl.core.hf import split_rows

    out = dict(tensors)
    for theirs, (rule, parts) in _fused(model).items():
        if f"{PREFIX}{theirs}.lora_A.weight" not in out:
            continue
        sizes = [model.get_submodule(p).out_features for p in parts]
        a = out.pop(f"{PREFIX}{theirs}.lora_A.weight")
        b = out.pop(f"{PREFIX}{theirs}.lora_B.weight", None)
        magnitude = out.pop(f"{PREFIX}{theirs}.lora_magnitude_vector", None)
        for name, t in (("lora_B.weight", b), ("lora_magnitude_vector", magnitude)):
            if t is not None and t.shape[0] != sum(sizes):
                raise CheckpointError(f"{file}: tensor {theirs + '.' + name!r} has {t.shape[0]} rows, the model's "
                                      f"{theirs} has {sum(sizes)}")
        if b is None:
            raise CheckpointError(f"{file}: missing tensor {theirs + '.lora_B.weight'!r}")
        b = split_rows(rule, b, sizes, model.cfg.head_dim)
        magnitudes = [None] * len(parts) if magnitude is None else split_rows(rule, magnitude, sizes,
                                                                               model.cfg.head_dim)
        for p, b_part, m_part in zip(parts, b, magnitudes):
            out[f"{PREFIX}{p}.lora_A.weight"] = a
            out[f"{PREFIX}{p}.lora_B.weight"] = b_part
            if m_part is not None:
                out[f"{PREFIX}{p}.lora_magnitude_vector"] = m_part
    return out


# -- save and load -------------------------------------------------------------------------------


def _adapter(model: nn.Module) -> tuple[list, Any]:
    """(transforms before the adapter, the adapter's transform)."""
    transforms = list(getattr(model, "transforms", []))
    if not transforms or not getattr(transforms[-1], "peft_type", None):
        raise CheckpointError("the model has no adapter to save (its last transform is not lora, prefix or prompt)")
    return transforms[:-1], transforms[-1]


def save_adapter(model: nn.Module, out_dir: str | os.PathLike, *, base: str | os.PathLike,
                 tokenizer_dir: str | os.PathLike | None = None, lineage: dict | None = None,
                 generation_config: dict | None = None, force: bool = False) -> Path:
    """Write `model`'s adapter as a PEFT adapter directory (atomically; `force` to replace).

    The transforms applied after the base's own recorded ones and before the adapter (QLoRA's
    `nf4`) are recorded in llmctl.json as `base_transforms`, so `load_adapter` rebuilds them."""
    from safetensors.torch import save_file

    from llmctl.core.checkpoint import GENERATION_CONFIG_NAME, LINEAGE_NAME, _lineage_record, copy_tokenizer
    from llmctl.core.io import atomic_dir, write_json

    before, transform = _adapter(model)
    base = Path(base)
    own, base_cfg = _recorded(base)
    if [t.spec() for t in before[: len(own)]] != [t.spec() for t in own]:
        raise CheckpointError(f"the model's transforms do not start with those of its base {base}")
    fields = CONTEXT_FIELDS + (CLASSIFIER_FIELDS if model.cfg.num_labels else ())
    context = {k: getattr(model.cfg, k) for k in fields if getattr(model.cfg, k) != getattr(base_cfg, k)}
    record = _lineage_record({**(lineage or {}), "base_transforms": [t.spec() for t in before[len(own):]],
                              **({"base_context": context} if context else {})})
    tensors = {k: v.detach().contiguous().to("cpu") for k, v in transform.peft_tensors(model).items()}
    with atomic_dir(out_dir, force=force) as tmp:
        save_file(tensors, tmp / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        write_json(tmp / ADAPTER_CONFIG, {**transform.peft_config(model), "base_model_name_or_path": str(base.resolve())})
        if generation_config is not None:
            write_json(tmp / GENERATION_CONFIG_NAME, generation_config)
        if tokenizer_dir is not None:
            copy_tokenizer(tokenizer_dir, tmp)
        write_json(tmp / LINEAGE_NAME, record)
    return Path(out_dir)


def _recorded(base: Path):
    """(the transforms base records, its model config)."""
    from llmctl.core.checkpoint import open_checkpoint
    from llmctl.core.hf import config_from_hf
    from llmctl.core.model.transforms import recorded

    ck = open_checkpoint(base)
    return recorded(ck.config, ck.lineage), config_from_hf(ck.config)


def load_adapter(path: str | os.PathLike, device=None, dtype: torch.dtype | None = None, *, transforms=(),
                 config=None, base: str | os.PathLike | None = None):
    """(model, cfg): the base (`load_model`; `base` overrides the one the adapter names) with the
    adapter's base transforms and the adapter applied and its tensors assigned (strict: every
    adapter tensor used, every one present)."""
    from llmctl.core.model.io import load_model
    from llmctl.core.model.transforms import from_spec

    path = Path(path)
    config_json = read_config(path)
    base = Path(base) if base is not None else base_path(path, config_json)
    lineage = _lineage(path)
    if config is None and (lineage.get("base_context") or config_json.get("task_type") == "SEQ_CLS"):
        config = model_config(path, base)  # a longer context, or a classifier
    with torch.random.fork_rng(devices=[]):  # a fresh score head and the adapter draw none of the caller's numbers
        model, cfg = load_model(base, device=device, dtype=dtype, config=config)
        transform = adapter_transform(config_json, model, str(path / ADAPTER_CONFIG))
        for spec in lineage.get("base_transforms", []):
            from_spec(spec).apply(model)
        transform.apply(model)
    _assign(model, path, transform)
    for extra in transforms:
        extra.apply(model)
    return model.eval(), model.cfg


def _lineage(path: Path) -> dict:
    file = path / "llmctl.json"
    return json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}


def model_config(path: str | os.PathLike, base: str | os.PathLike | None = None):
    """The `ModelConfig` adapter directory `path` runs with: its base's (`base` or the one it
    names) with the fields set at finetune time (`base_context`), a SEQ_CLS adapter's a classifier."""
    path = Path(path)
    config_json = read_config(path)
    cfg = dataclasses.replace(_recorded(Path(base) if base is not None else base_path(path, config_json))[1],
                              **_lineage(path).get("base_context", {}))
    if config_json.get("task_type") == "SEQ_CLS" and not cfg.num_labels:  # made by PEFT: the head's size from its tensor
        cfg = _classifier(cfg, path)
    return cfg


def _classifier(cfg, path: Path):
    """`cfg` as the sequence classifier whose score head a SEQ_CLS adapter saves (as
    `AutoModelForSequenceClassification`: the base's pad token, an untied head)."""
    from llmctl.core.checkpoint import read_safetensors_header

    header, _ = read_safetensors_header(path / ADAPTER_WEIGHTS)
    head = header.get(f"{PREFIX}score.weight")
    if head is None:
        raise CheckpointError(f"{path / ADAPTER_WEIGHTS}: a SEQ_CLS adapter without {PREFIX}score.weight (its head)")
    return dataclasses.replace(cfg, num_labels=head["shape"][0], tie_embeddings=False)


def _assign(model: nn.Module, path: Path, transform) -> None:
    from safetensors.torch import load_file

    file = path / ADAPTER_WEIGHTS
    if not file.is_file():
        raise CheckpointError(f"{path}: no {ADAPTER_WEIGHTS}")
    stored = {k: v for k, v in load_file(file).items()
              if not k.endswith(".base_layer.weight")}  # PEFT saves a targeted embedding's base: ours is the base's
    wanted = transform.peft_tensors(model)  # {PEFT key: the model's tensor}
    if isinstance(transform, LoRA):  # a fused HF module's adapter goes to its parts (`_unfuse`)
        wanted, stored = live_tensors(model, transform), _unfuse(model, stored, file)
    for key, tensor in stored.items():
        if key not in wanted:
            raise CheckpointError(f"{file}: tensor {key!r} has no place in the model")
        if tuple(tensor.shape) != tuple(wanted[key].shape):
            raise CheckpointError(f"{file}: tensor {key!r} has shape {list(tensor.shape)}, the model's is "
                                  f"{list(wanted[key].shape)}")
    missing = sorted(set(wanted) - set(stored))
    if missing:
        raise CheckpointError(f"{file}: missing tensor {missing[0].removeprefix(PREFIX)!r}")
    with torch.no_grad():
        for key, tensor in wanted.items():
            tensor.copy_(stored[key])  # the model's own storage


def merge_to_checkpoint(adapter: str | os.PathLike, out_dir: str | os.PathLike, *, force: bool = False) -> Path:
    """Write the base of adapter directory `adapter` with the adapter folded in as a full
    checkpoint (`merge_adapter`), whose logits equal the unmerged adapter's."""
    from llmctl.core.adapters.lora import merge_adapter
    from llmctl.core.model.io import save_model

    adapter = Path(adapter)
    model, _ = load_adapter(adapter)
    merge_adapter(model)
    base = base_path(adapter)
    tokenizer = adapter if (adapter / "tokenizer.json").is_file() else base if (base / "tokenizer.json").is_file() \
        else None
    lineage = {"command": "finetune", "parents": [base], "merged_adapter": str(adapter.resolve())}
    return save_model(model, out_dir, tokenizer_dir=tokenizer, lineage=lineage, force=force)
