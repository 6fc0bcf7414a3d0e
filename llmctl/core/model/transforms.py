"""Module transforms: model surgery by module path, recorded in checkpoints and re-applied on load.

    t = TRANSFORMS.get("my_int8")(target_modules="all-linear")
    t.apply(model)              # real weights (converted) or the meta device (shapes only)
    t.spec()                    # {"type": "my_int8", "target_modules": "all-linear", …}: JSON
    from_spec(t.spec())         # the same transform again

`save_model` records a model's transforms (`model.transforms`, in order) and `load_model`
re-applies them to a model built on the meta device before assigning the stored tensors, so
every command reads a transformed checkpoint without a flag of its own. A transform with a
Hugging Face format (`quant_method` set) is written to `config.json`'s `quantization_config`;
the others to `llmctl.json`'s `transforms` list.

Selection follows PEFT's `target_modules`: a string is a regex that must match the whole
module path; a list matches a path equal to an entry or ending in `.entry`; `"all-linear"` is
every `nn.Linear` (or replaced linear: a module with `in_features` and `out_features`) except
the output head. `exclude_modules` works the same way and
`layers_to_transform` keeps only modules inside those blocks (`…layers.N.…`).

A new transform is one file (an entry point of `llmctl.transforms` for a plugin):

    @TRANSFORMS.register("my_int8")
    @dataclass(kw_only=True)
    class MyInt8(Transform):
        bits: int = 8                              # parameters: dataclass fields, kept in spec()

        def replace(self, path, module):           # the selected nn.Linear → its replacement
            return MyInt8Linear.from_linear(module)   # must work on meta tensors too

Tensors a replacement module keeps under the base names (`weight`, `bias`) load from a dense
checkpoint unchanged; new ones (`qweight`, `scales`, `lora_A.weight`…) are stored under the
same module path, and Hugging Face weight names are derived by module prefix.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import re
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch
from torch import nn

from llmctl.core.registry import Registry
from llmctl.errors import CheckpointError, UsageError

ALL_LINEAR = "all-linear"
OUTPUT_HEAD = "lm_head"
TIED = (OUTPUT_HEAD, "model.embed_tokens")  # replacing either unties them
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")

Targets = str | list[str] | None


def matches(path: str, targets: Targets) -> bool:
    """PEFT's rule: a string is a full-match regex; a list matches equal names and `.suffix`es."""
    if targets is None:
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, path) is not None
    return path in targets or any(path.endswith(f".{t}") for t in targets)


def select_modules(model: nn.Module, target_modules: Targets, exclude_modules: Targets = None,
                   layers_to_transform: list[int] | None = None) -> list[str]:
    """Paths of the modules `target_modules` picks (PEFT semantics), in module order."""
    out = []
    for path, module in model.named_modules():
        if not path:
            continue
        if target_modules == ALL_LINEAR:  # dense or already replaced (quantized) linear layers
            picked = (isinstance(module, nn.Linear) or hasattr(module, "in_features") and hasattr(module, "out_features")
                      ) and path != OUTPUT_HEAD
        else:
            picked = matches(path, target_modules)
        if not picked or matches(path, exclude_modules):
            continue
        if layers_to_transform is not None:
            layer = _LAYER.search(path)
            if layer is None or int(layer.group(1)) not in layers_to_transform:
                continue
        out.append(path)
    return out


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    """Put `new` at `path`. Replacing the output head or the embeddings of a model that ties
    them unties them first (config and all), so each is stored, and reloaded, on its own."""
    cfg = getattr(model, "cfg", None)
    if path in TIED and getattr(cfg, "tie_embeddings", False):
        model.cfg = dataclasses.replace(cfg, tie_embeddings=False)
    model.set_submodule(path, new)


@dataclass(kw_only=True)
class Transform:
    """A recorded change of a model's modules; subclasses implement `replace`.

    Parameters are dataclass fields (JSON values), so `spec()` and `from_spec` round-trip.
    """

    target_modules: Targets = ALL_LINEAR
    exclude_modules: Targets = None
    layers_to_transform: list[int] | None = None

    quant_method: ClassVar[str | None] = None  # set when HF's quantization_config has a format for it

    def replace(self, path: str, module: nn.Module) -> nn.Module:
        """The module that takes the place of `module` (on the same device, meta included)."""
        raise NotImplementedError

    def select(self, model: nn.Module) -> list[str]:
        return select_modules(model, self.target_modules, self.exclude_modules, self.layers_to_transform)

    def apply(self, model: nn.Module) -> nn.Module:
        """Replace every selected module in place; record self in `model.transforms`."""
        paths = self.select(model)
        if not paths:
            raise UsageError(f"transform {self.name}: target_modules={self.target_modules!r} matches no module")
        for path in paths:
            module = model.get_submodule(path)
            with _device_of(module):  # new tensors default to the replaced module's device
                replace_module(model, path, self.replace(path, module))
        model.transforms = [*getattr(model, "transforms", []), self]
        return model

    @property
    def name(self) -> str:
        return TRANSFORMS.name_of(type(self))

    def spec(self) -> dict[str, Any]:
        """{"type": name, **parameters}: what a checkpoint records."""
        return {"type": self.name, **dataclasses.asdict(self)}

    def quantization_config(self) -> dict[str, Any]:
        """config.json's `quantization_config` (only for transforms with a `quant_method`)."""
        return {"quant_method": self.quant_method, **dataclasses.asdict(self)}

    @classmethod
    def from_quantization_config(cls, config: Mapping[str, Any]) -> Transform:
        return _construct(cls, {k: v for k, v in config.items() if k != "quant_method"}, "quantization_config")


TRANSFORMS: Registry[type[Transform]] = Registry("model transform", "llmctl.transforms", base=Transform)


def _device_of(module: nn.Module):
    tensor = next(itertools.chain(module.parameters(), module.buffers()), None)
    return torch.device(tensor.device) if tensor is not None else contextlib.nullcontext()


def _construct(cls: type[Transform], params: Mapping[str, Any], where: str) -> Transform:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - known)
    if unknown:
        raise CheckpointError(f"{where}: transform {TRANSFORMS.name_of(cls)} has no parameter {unknown[0]!r}")
    try:
        return cls(**params)
    except (UsageError, TypeError, ValueError) as e:  # a value the transform refuses: the file is at fault
        message = str(e).replace("--", "")  # a transform's check may name the CLI flag the value comes from
        raise CheckpointError(f"{where}: transform {TRANSFORMS.name_of(cls)}: {message}") from None


def from_spec(spec: Mapping[str, Any]) -> Transform:
    """The transform a checkpoint recorded; CheckpointError when it is not installed."""
    if not isinstance(spec, Mapping) or "type" not in spec:
        raise CheckpointError(f"llmctl.json: transform record {spec!r} has no 'type'")
    name = spec["type"]
    if name not in TRANSFORMS:
        raise CheckpointError(f"llmctl.json: transform {name!r} is not installed; known: {', '.join(TRANSFORMS.names())}")
    return _construct(TRANSFORMS.get(name), {k: v for k, v in spec.items() if k != "type"}, "llmctl.json")


def from_quantization_config(config: Mapping[str, Any]) -> Transform:
    """The transform registered for config.json's `quantization_config.quant_method`."""
    if not isinstance(config, Mapping):
        raise CheckpointError(f"config.json: quantization_config must be an object, not {type(config).__name__} "
                              f"{config!r:.60}")
    method = config.get("quant_method")
    known = {cls.quant_method: cls for _, cls in TRANSFORMS.items() if cls.quant_method}
    if method not in known:  # never empty: the built-in NF4 and compressed-tensors formats
        raise CheckpointError(f"config.json: quantization_config quant_method {method!r} is not supported; "
                              f"supported: {', '.join(sorted(known))}")
    return known[method].from_quantization_config(config)


def recorded(config: Mapping[str, Any], lineage: Mapping[str, Any] | None) -> list[Transform]:
    """The transforms a checkpoint's config.json and llmctl.json record, in application order."""
    out = [from_quantization_config(config["quantization_config"])] if config.get("quantization_config") else []
    specs = (lineage or {}).get("transforms", []) if isinstance(lineage, Mapping) else []
    if not isinstance(specs, list):
        raise CheckpointError(f"llmctl.json: transforms must be a list of transform records, not {specs!r:.60}")
    return out + [from_spec(s) for s in specs]


def record(transforms: list[Transform]) -> tuple[dict | None, list[dict]]:
    """(quantization_config or None, llmctl.json transform specs) for a model's transforms: a
    leading transform with a Hugging Face format goes to config.json, the rest to llmctl.json."""
    if transforms and transforms[0].quant_method:
        return transforms[0].quantization_config(), [t.spec() for t in transforms[1:]]
    return None, [t.spec() for t in transforms]


def _register_builtins() -> None:
    """Built-in transforms register on import (third parties through `llmctl.transforms`)."""
    import importlib

    for module in ("llmctl.core.adapters.lora", "llmctl.core.adapters.prompt", "llmctl.core.quant.nf4",
                   "llmctl.core.quant.linear"):
        importlib.import_module(module)


_register_builtins()
