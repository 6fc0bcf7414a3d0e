"""`PackedLinear` and the `pack-quantized` transform: weight-only int8/int4 linears stored in
compressed-tensors' `pack-quantized` layout, which transformers (with `compressed-tensors`)
and vLLM load as they load llm-compressor's output.

Tensors of a quantized `…q_proj` (our names are transformers' names):

    q_proj.weight_packed      int32 [out, ⌈in·bits/32⌉]   (core/quant/pack.py)
    q_proj.weight_scale       model dtype [out, groups]    (groups = 1: per output channel)
    q_proj.weight_zero_point  int32 [⌈out·bits/32⌉, groups], asymmetric schemes only
    q_proj.weight_shape       int64 [2] = (out, in)
    q_proj.bias               unchanged

and `config.json` gets compressed-tensors' `quantization_config` (one config group whose
`weights` give num_bits, symmetric, strategy channel/group and group_size; `ignore` lists the
linears left in floating point). The forward pass goes through `core/quant/kernels.py`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Callable, Mapping

import torch
from torch import nn

from llmctl.core.model.transforms import TRANSFORMS, Transform
from llmctl.core.quant.pack import pack, packed_width, unpack
from llmctl.core.quant.scheme import Scheme
from llmctl.errors import CheckpointError, UsageError

FORMAT = "pack-quantized"


class PackedLinear(nn.Module):
    """A Linear whose weight is stored as packed integers with scales (and zero points)."""

    def __init__(self, in_features: int, out_features: int, scheme: Scheme, bias: nn.Parameter | None,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        groups = scheme.groups(in_features)
        self.register_buffer("weight_packed", torch.zeros(out_features, packed_width(in_features, scheme.bits),
                                                          dtype=torch.int32))
        self.register_buffer("weight_scale", torch.ones(out_features, groups, dtype=dtype))
        if not scheme.symmetric:
            self.register_buffer("weight_zero_point", torch.zeros(packed_width(out_features, scheme.bits), groups,
                                                                  dtype=torch.int32))
        self.register_buffer("weight_shape", torch.tensor([out_features, in_features]))
        self.bias = bias
        self.kernels = {}  # filled on first use by kernels.linear (each kernel's own weight layout)

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: Scheme, solution: tuple | None = None) -> PackedLinear:
        """`linear` quantized: round-to-nearest, or `solution` = (scale, zero, integers) from a
        calibrated method. On the meta device only the shapes are made."""
        w = linear.weight
        new = cls(linear.in_features, linear.out_features, scheme, linear.bias, w.dtype)
        if w.device.type == "meta":
            return new
        new.store(*(solution or scheme.nearest(w.detach(), w.dtype)))
        return new

    def store(self, scale: torch.Tensor, zero: torch.Tensor, q: torch.Tensor) -> None:
        self.weight_scale = scale.to(self.weight_scale.dtype).contiguous()
        self.weight_packed = pack(q, self.scheme.bits)
        if not self.scheme.symmetric:
            self.weight_zero_point = pack(zero.to(torch.int8), self.scheme.bits, dim=0)
        self.kernels = {}

    def integers(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(scale [out, groups] float32, zero [out, groups] float32, integers int8 [out, in])."""
        q = unpack(self.weight_packed, self.scheme.bits, self.in_features)
        if self.scheme.symmetric:
            zero = torch.zeros_like(self.weight_scale, dtype=torch.float32)
        else:
            zero = unpack(self.weight_zero_point, self.scheme.bits, self.out_features, dim=0).float()
        return self.weight_scale.float(), zero, q

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight [out, in] as compressed-tensors dequantizes it: (q − zero) · scale in the scale's dtype."""
        _, zero, q = self.integers()
        scale = self.weight_scale
        return self.scheme.dequantize(q, scale, zero, scale.dtype).to(dtype or scale.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from llmctl.core.quant.kernels import linear
        return linear(self, x)

    @staticmethod
    def fuse_state(parts: list[dict[str, torch.Tensor]], join: Callable) -> dict[str, torch.Tensor]:
        """The tensors of one PackedLinear whose output channels are the parts' in turn, as an HF
        checkpoint fuses them (Phi-3's `qkv_proj`): rows joined by `join(tensors, rows_per_channel)`
        in the fused weight's row order (zero points are packed along the rows). The parts share
        one scheme; CheckpointError where their tensors cannot be one module's."""
        outs = [p["weight_scale"].shape[0] for p in parts]
        keys = set(parts[0])
        if keys - {"weight_packed", "weight_scale", "weight_zero_point", "weight_shape"} or \
                any(set(p) != keys or p["weight_scale"].shape[1:] != parts[0]["weight_scale"].shape[1:]
                    or p["weight_packed"].shape[1:] != parts[0]["weight_packed"].shape[1:] for p in parts):
            raise CheckpointError("the fused module's parts are not quantized alike")
        out = {"weight_packed": join([p["weight_packed"] for p in parts], 1),
               "weight_scale": join([p["weight_scale"] for p in parts], 1),
               "weight_shape": torch.tensor([sum(outs), int(parts[0]["weight_shape"][1])])}
        if "weight_zero_point" in keys:
            zeros = [p["weight_zero_point"] for p in parts]
            ratio = Fraction(zeros[0].shape[0], outs[0])
            if any(z.shape[0] != n * ratio for z, n in zip(zeros, outs)):  # a part's last int32 only partly used
                raise CheckpointError("the fused module's parts pack their zero points apart")
            out["weight_zero_point"] = join(zeros, ratio)
        return out

    @staticmethod
    def split_state(tensors: dict[str, torch.Tensor], parts: list[dict[str, tuple]], split: Callable
                    ) -> list[dict[str, torch.Tensor]]:
        """Inverse of `fuse_state`: each part's tensors (`parts`: their shapes), the rows taken by
        `split(tensor, rows per part, rows_per_channel)`."""
        if set(tensors) != set(parts[0]):
            raise CheckpointError(f"a fused quantized module holds {sorted(tensors)}, its parts {sorted(parts[0])}")
        outs = [p["weight_scale"][0] for p in parts]
        own: list[dict[str, torch.Tensor]] = [{} for _ in parts]
        for key, tensor in tensors.items():
            if key == "weight_shape":
                pieces = [torch.tensor([n, int(tensor[1])]) for n in outs]
            else:
                sizes = [p[key][0] for p in parts]
                if tensor.shape[0] != sum(sizes) or any(p[key][1:] != tuple(tensor.shape[1:]) for p in parts):
                    raise CheckpointError(f"a fused quantized module's {key} has shape {list(tensor.shape)}, its "
                                          f"parts' {[list(p[key]) for p in parts]}")
                pieces = split(tensor, sizes, Fraction(sizes[0], outs[0]))
            for mine, piece in zip(own, pieces):
                mine[key] = piece
        return own

    def _apply(self, fn, recurse=True):  # .to()/.cuda() invalidate the kernels' copies
        self.kernels = {}
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        s = self.scheme
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={s.bits}, "
                f"group_size={s.group_size}, symmetric={s.symmetric}, bias={self.bias is not None}")


def _listed(path: str, names: list[str], *aliases: str | None) -> bool:
    """compressed-tensors' target rule: an exact module name, or `re:PATTERN` matched from the start,
    tried on `path` and on its other names (`aliases`: the checkpoint's Hugging Face module path)."""
    return any(_entry_matches(n, p) for p in (path, *aliases) if p for n in names)


def _entry_matches(entry: str, path: str) -> bool:
    return re.match(entry[3:], path) is not None if entry.startswith("re:") else path == entry


def check_names(names: Any, key: str) -> list[str]:
    """`names` as a list of module names / `re:` patterns; UsageError naming `key` and the bad entry."""
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise UsageError(f"{key} must be a list of module names or 're:' patterns, not {names!r}")
    for n in names:
        if n.startswith("re:"):
            try:
                re.compile(n[3:])
            except re.error as e:
                raise UsageError(f"{key} entry {n!r} is not a valid regular expression ({e})") from None
    return list(names)


def routers(model: nn.Module) -> list[str]:
    """Paths of the mixture-of-experts routers (`gate`, Qwen2-MoE's `shared_expert_gate`): kept in
    floating point by every method, as llm-compressor's MoE recipes keep them (transformers 5
    loads a router as its own module type, which compressed-tensors never decompresses)."""
    from llmctl.core.model.moe import MoE

    return [f"{p}.{n}" if p else n for p, m in model.named_modules() if isinstance(m, MoE)
            for n in ("gate", "shared_expert_gate") if isinstance(getattr(m, n, None), nn.Linear)]


def hf_names(model: nn.Module) -> dict[str, str]:
    """{our module path: the checkpoint's Hugging Face module path} where they differ (Mixtral's
    `block_sparse_moe`; each part of a fused module, Phi-3's `qkv_proj`); empty for a model without
    an HF architecture."""
    from llmctl.core.hf import module_groups

    cfg = getattr(model, "cfg", None)
    if cfg is None:
        return {}
    return {ours: theirs for theirs, (_, parts) in module_groups(cfg).items() for ours in parts if ours != theirs}


def router_patterns(model: nn.Module, ignore: list[str]) -> list[str]:
    """`re:` entries (our and the HF module name, e.g. `re:.*mlp\\.gate$`, `re:.*block_sparse_moe\\.gate$`)
    for the routers `ignore` does not already keep in floating point."""
    aliases = hf_names(model)
    out: list[str] = []
    for path in routers(model):
        if _listed(path, ignore, aliases.get(path)):
            continue
        for name in (path, aliases.get(path)):
            if name:
                entry = "re:.*" + re.escape(re.sub(r"^.*?layers\.\d+\.", "", name)) + "$"
                if entry not in out:
                    out.append(entry)
    return out


_NOT_READ = {  # compressed-tensors entries that change what the weights mean: refused, never ignored
    "transform_config": "a transform_config (weights rotated by Hadamard or learned transforms, QuIP/SpinQuant)",
    "kv_cache_scheme": "a kv_cache_scheme (a quantized key/value cache)"}


@TRANSFORMS.register(FORMAT)
@dataclass(kw_only=True)
class PackQuantized(Transform):
    """Weight-only integer quantization of the selected linears (round-to-nearest here;
    calibrated methods pass their solutions through `solutions`)."""

    quant_method = "compressed-tensors"

    bits: int = 8
    group_size: int | None = None
    symmetric: bool = True
    targets: list[str] = field(default_factory=lambda: ["Linear"])  # compressed-tensors' targets
    ignore: list[str] = field(default_factory=lambda: ["lm_head"])

    def __post_init__(self):
        self.solutions: dict[str, tuple] = {}  # path → (scale, zero, integers), consumed by replace
        self.targets = check_names(self.targets, "targets")
        self.ignore = check_names(self.ignore, "ignore")
        self.scheme  # noqa: B018 (validates bits and group size)

    @property
    def scheme(self) -> Scheme:
        return Scheme(self.bits, self.group_size, self.symmetric)

    def select(self, model: nn.Module) -> list[str]:
        """The linears `targets` picks and `ignore` leaves, by our module path or by the checkpoint's
        Hugging Face one (llm-compressor writes `re:.*block_sparse_moe.gate` for Mixtral)."""
        aliases = hf_names(model)
        return [p for p, m in model.named_modules()
                if isinstance(m, nn.Linear) and not _listed(p, self.ignore, aliases.get(p))
                and ("Linear" in self.targets or _listed(p, self.targets, aliases.get(p)))]

    def replace(self, path: str, module: nn.Module) -> nn.Module:
        return PackedLinear.from_linear(module, self.scheme, self.solutions.pop(path, None))

    def spec(self) -> dict[str, Any]:
        return {"type": self.name, "bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric,
                "targets": self.targets, "ignore": self.ignore}

    def quantization_config(self) -> dict[str, Any]:
        weights = {"num_bits": self.bits, "type": "int", "symmetric": self.symmetric,
                   "strategy": "channel" if self.group_size is None else "group", "group_size": self.group_size,
                   "dynamic": False, "actorder": None, "block_structure": None, "observer": "minmax",
                   "observer_kwargs": {}}
        return {"quant_method": self.quant_method, "format": FORMAT, "quantization_status": "compressed",
                "config_groups": {"group_0": {"targets": self.targets, "weights": weights,
                                              "input_activations": None, "output_activations": None,
                                              "format": FORMAT}},
                "ignore": self.ignore, "kv_cache_scheme": None}

    @classmethod
    def from_quantization_config(cls, config: Mapping[str, Any]) -> PackQuantized:
        """Ours or llm-compressor's: one config group of weight-only int quantization, packed."""
        where = "config.json quantization_config"
        groups = config.get("config_groups") or {}
        if not isinstance(groups, Mapping) or not all(isinstance(g, Mapping) for g in groups.values()):
            raise CheckpointError(f"{where}: config_groups must be an object of objects, not {groups!r}")
        if config.get("format") != FORMAT or len(groups) != 1:
            raise CheckpointError(f"{where}: only the {FORMAT!r} format with one config group is supported "
                                  f"(got format {config.get('format')!r}, {len(groups)} groups)")
        for key, what in _NOT_READ.items():
            if config.get(key):
                raise CheckpointError(f"{where}: {what} is not supported")
        sparsity = config.get("sparsity_config") or {}
        sparse = sparsity.get("format", "dense") if isinstance(sparsity, Mapping) else sparsity
        if sparse != "dense":  # older compressed-tensors stored 2:4 or bitmask-sparse weights compressed
            raise CheckpointError(f"{where}: sparsity_config format {sparse!r} (compressed sparse weights) is not "
                                  "supported; only 'dense'")
        group = next(iter(groups.values()))
        w = group.get("weights") or {}
        if not isinstance(w, Mapping):
            raise CheckpointError(f"{where}: weights must be an object, not {w!r}")
        if (w.get("type") != "int" or w.get("strategy") not in ("channel", "group") or group.get("input_activations")
                or w.get("actorder") not in (None, "weight", "static") or w.get("dynamic")):  # static: weight's alias
            raise CheckpointError(f"{where}: only static weight-only int quantization per channel or group "
                                  f"is supported (got {w})")
        try:
            out = cls(bits=int(w["num_bits"]), symmetric=bool(w.get("symmetric", True)),
                      group_size=int(w["group_size"]) if w.get("strategy") == "group" else None,
                      targets=group.get("targets") or ["Linear"], ignore=config.get("ignore") or [])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{where}: malformed weights entry {w}: {e}") from None
        except UsageError as e:
            raise CheckpointError(f"{where}: {e}".replace("--", "")) from None
        return out
