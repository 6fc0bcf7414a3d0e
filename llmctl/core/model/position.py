"""Positional encodings, registered by name: POSITIONS.get(cfg.position)(cfg) -> PositionEncoding.

A position strategy acts at up to three places, each a method returning None when unused:
  embed(position_ids)               vectors added to the token embeddings (learned, sinusoidal)
  rotary(position_ids, dtype, length)  (cos, sin) to rotate queries and keys (RoPE);
                                    every position id is below `length` (a hint)
  attention_bias(q_pos, k_pos)      an additive [B, H, Tq, Tk] attention bias (ALiBi)
RoPE context extension is a second registry, ROPE_SCALINGS: rope_type -> fn(cfg, params,
position_ids) -> (inv_freq, attention factor), with the same formulas and parameter names as
Hugging Face's `rope_parameters`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from llmctl.core.registry import Registry

POSITIONS: Registry = Registry("positional encoding")
ROPE_SCALINGS: Registry = Registry("rope scaling")


@POSITIONS.register("nope")
class PositionEncoding(nn.Module):
    """No positional information at all (NoPE); the base class of every strategy."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg

    def embed(self, position_ids: torch.Tensor) -> torch.Tensor | None:
        return None

    def rotary(
        self, position_ids: torch.Tensor, dtype: torch.dtype, length: int | None = None, cached: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None

    def attention_bias(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor | None:
        return None


@POSITIONS.register("learned")
class LearnedPositions(PositionEncoding):
    """A trained vector per absolute position (GPT-2, BERT)."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.weight = nn.Parameter(torch.empty(cfg.max_seq_len, cfg.hidden_size))

    def embed(self, position_ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(position_ids, self.weight)


@POSITIONS.register("sinusoidal")
class SinusoidalPositions(PositionEncoding):
    """The fixed sin/cos table of 'Attention Is All You Need', computed on the fly."""

    def embed(self, position_ids: torch.Tensor) -> torch.Tensor:
        dim = self.cfg.hidden_size
        inv_freq = 1.0 / 10000 ** (torch.arange(0, dim, 2, device=position_ids.device).float() / dim)
        angles = position_ids.float()[..., None] * inv_freq
        return torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(-2)[..., :dim]


@POSITIONS.register("alibi")
class ALiBi(PositionEncoding):
    """Attention with Linear Biases: each head penalizes distance with its own slope."""

    def slopes(self, device: torch.device) -> torch.Tensor:
        n = self.cfg.num_heads
        p = 2 ** math.floor(math.log2(n))
        base = [2 ** (-8 * (i + 1) / p) for i in range(p)]
        extra = [2 ** (-4 * (2 * i + 1) / p) for i in range(n - p)]  # odd slopes of 2p heads
        return torch.tensor(base + extra, device=device)

    def attention_bias(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        distance = (q_pos[:, :, None] - k_pos[:, None, :]).abs().float()  # [B, Tq, Tk]
        return -self.slopes(q_pos.device)[None, :, None, None] * distance[:, None]


@POSITIONS.register("rope")
class RoPE(PositionEncoding):
    """Rotary position embeddings (rotate-half layout), with optional context scaling.

    cos/sin are looked up in tables over positions 0..n-1 (bit-identical to computing them
    per call), built on first use and rebuilt when a longer one is needed or the scaling,
    device or dtype changed (`llmctl generate --rope-scaling` edits cfg.rope_scaling of a
    loaded model). Dynamic NTK, whose frequencies depend on the sequence length, computes
    them on every call instead.
    """

    def __init__(self, cfg):
        super().__init__(cfg)
        self._tables: tuple[torch.Tensor, torch.Tensor] | None = None  # not a buffer: never saved
        self._tables_key: tuple | None = None

    def rotary(
        self, position_ids: torch.Tensor, dtype: torch.dtype, length: int | None = None, cached: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [B, T, rotary_dim] for `position_ids`, all of which are below `length`
        (default: computed from position_ids, which waits for the device). `cached=False`
        computes them without the tables (no module state: for compiled steps)."""
        kind, params = self._scaling()
        if kind == "dynamic":
            return self._cos_sin(kind, params, position_ids, position_ids, dtype)
        if not cached:
            return self._cos_sin(kind, params, position_ids, None, dtype)
        if length is None:
            length = int(position_ids.max()) + 1
        cos, sin = self.tables(length, position_ids.device, dtype)
        return cos[position_ids], sin[position_ids]

    def tables(self, length: int, device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
        """cos, sin [n ≥ length, rotary_dim] for positions 0..n-1 (None under dynamic NTK, whose
        angles depend on the sequence length): the tables `rotary` indexes."""
        kind, params = self._scaling()
        if kind == "dynamic":
            return None
        key = (repr(self.cfg.rope_scaling), self.cfg.rope_theta, self.cfg.rotary_dim, device, dtype)
        if self._tables is None or self._tables_key != key or len(self._tables[0]) < length:
            size = max(2 * length, 1024)  # room to grow: decoding rebuilds only on doubling
            self._tables = self._cos_sin(kind, params, torch.arange(size, device=device), None, dtype)
            self._tables_key = key
        return self._tables

    def _scaling(self) -> tuple[str, dict]:
        params = dict(self.cfg.rope_scaling or {})
        return params.pop("rope_type", params.pop("type", "default")), params

    def _cos_sin(self, kind: str, params: dict, positions: torch.Tensor, position_ids, dtype: torch.dtype):
        inv_freq, factor = ROPE_SCALINGS.get(kind)(self.cfg, params, position_ids, positions.device)
        angles = positions.float()[..., None] * inv_freq
        angles = torch.cat([angles, angles], dim=-1)  # [..., rotary_dim]
        return (angles.cos() * factor).to(dtype), (angles.sin() * factor).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, H, T, D] by cos/sin [B, T, R]: x * cos + rotate_half(x) * sin, with the
    rotated halves added in place (no concatenated copy of x); with R < D (partial rotary) only
    the first R dims of each head turn, as transformers' GPT-NeoX and Phi."""
    if cos.shape[-1] < x.shape[-1]:
        rot = cos.shape[-1]
        return torch.cat([apply_rotary(x[..., :rot], cos, sin), x[..., rot:]], dim=-1)
    cos, sin = cos[:, None], sin[:, None]
    half = x.shape[-1] // 2
    out = x * cos
    out[..., :half].addcmul_(x[..., half:], sin[..., :half], value=-1)
    out[..., half:].addcmul_(x[..., :half], sin[..., half:])
    return out


def _inv_freq(theta: float, dim: int, device) -> torch.Tensor:
    """Made on the device that uses it: no host-to-device copy (a CUDA graph can hold it)."""
    return 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim)


@ROPE_SCALINGS.register("default")
def default_rope(cfg, params: dict, position_ids: torch.Tensor, device) -> tuple[torch.Tensor, float]:
    return _inv_freq(cfg.rope_theta, cfg.rotary_dim, device), 1.0


@ROPE_SCALINGS.register("linear")
def linear_rope(cfg, params: dict, position_ids: torch.Tensor, device) -> tuple[torch.Tensor, float]:
    """Position interpolation: positions divided by `factor`."""
    return _inv_freq(cfg.rope_theta, cfg.rotary_dim, device) / params["factor"], 1.0


@ROPE_SCALINGS.register("dynamic")
def dynamic_ntk_rope(cfg, params: dict, position_ids: torch.Tensor, device) -> tuple[torch.Tensor, float]:
    """Dynamic NTK: grow the base once the sequence passes max_seq_len."""
    seq_len = max(int(position_ids.max()) + 1, cfg.max_seq_len)
    factor, dim = params["factor"], cfg.rotary_dim
    base = cfg.rope_theta * ((factor * seq_len / cfg.max_seq_len) - (factor - 1)) ** (dim / (dim - 2))
    return _inv_freq(base, dim, device), 1.0


@ROPE_SCALINGS.register("yarn")
def yarn_rope(cfg, params: dict, position_ids: torch.Tensor, device) -> tuple[torch.Tensor, float]:
    """YaRN: interpolate low frequencies, keep high ones, ramp between; scale attention."""
    dim, base, factor = cfg.rotary_dim, cfg.rope_theta, params["factor"]
    original = params.get("original_max_position_embeddings") or cfg.max_seq_len
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        attention_factor = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    beta_fast, beta_slow = params.get("beta_fast") or 32, params.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    ramp = ((torch.arange(dim // 2, device=device).float() - low) / max(high - low, 0.001)).clamp(0, 1)
    extrapolation = _inv_freq(base, dim, device)
    keep = 1 - ramp
    return extrapolation / factor * (1 - keep) + extrapolation * keep, attention_factor


@ROPE_SCALINGS.register("llama3")
def llama3_rope(cfg, params: dict, position_ids: torch.Tensor, device) -> tuple[torch.Tensor, float]:
    """Llama 3.1: divide low frequencies by `factor`, keep high ones, smooth in between."""
    inv_freq = _inv_freq(cfg.rope_theta, cfg.rotary_dim, device)
    factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
    original = params["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= original / high) & (wavelen <= original / low)
    return torch.where(medium, smoothed, scaled), 1.0


def make_position(cfg) -> PositionEncoding:
    """The position strategy named by `cfg.position`."""
    return POSITIONS.get(cfg.position)(cfg)
