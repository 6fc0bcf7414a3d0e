"""Prefix tuning and prompt tuning: trainable virtual tokens every position attends to.

    model = load_model(base, transforms=[Prefix(num_virtual_tokens=20)])[0]   # or Prompt(...)
    model(ids)                      # real tokens see P virtual tokens first, at positions 0..P-1

Both add one module, `model.prompt_encoder`, whose `embedding.weight` is PEFT's
`prompt_embeddings` tensor, and reach the model through a single seam,
`Transformer.kv_prefix`: each layer's keys and values [1, kv_heads, P, head_dim] put before
the real tokens' (the attention mask lets every position see them; the real tokens'
positions start at P, as with PEFT + transformers).

- `prefix` (PEFT PREFIX_TUNING, without `prefix_projection`): the keys and values are the
  parameters themselves, `embedding.weight` [P, layers · 2 · kv_heads · head_dim] in PEFT's
  order (per layer a key then a value; heads, then head_dim).
- `prompt` (PEFT PROMPT_TUNING): `embedding.weight` [P, hidden] are input embeddings
  prepended to the input. In a causal model the virtual tokens see only each other, so their
  keys and values are those of the base model run over them alone — which is what the encoder
  computes, once per forward (once per KV cache when generating), then shared by every row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from llmctl.core.model.transforms import TRANSFORMS, Transform
from llmctl.errors import CheckpointError, UsageError

KVPrefix = list[tuple[torch.Tensor, torch.Tensor]]


class PromptEncoder(nn.Module):
    """Virtual tokens' embeddings; `forward(model)` gives each layer's keys and values."""

    adapter_active = True  # False inside `adapters_disabled`: no virtual tokens, the base's output

    def __init__(self, num_virtual_tokens: int, width: int, device=None):
        super().__init__()
        self.embedding = nn.Embedding(num_virtual_tokens, width, device=device)  # PEFT's init: N(0, 1)

    @property
    def num_virtual_tokens(self) -> int:
        return self.embedding.weight.shape[0]

    def forward(self, model: nn.Module) -> KVPrefix:
        """The base model run over the virtual tokens alone (positions 0..P-1); their keys/values."""
        from llmctl.core.adapters.switch import adapters_disabled

        recorder = _KVRecorder()
        with adapters_disabled(model):  # the base's keys and values, and no recursion into this encoder
            x, ctx = model.embed(None, cache=recorder, inputs_embeds=self.embedding.weight[None])
            for layer in model.model.layers:
                x, _ = layer(x, ctx)
        return [recorder.kv[i] for i in range(len(model.model.layers))]


class PrefixEncoder(PromptEncoder):
    """Each layer's virtual keys and values as parameters (PEFT's flat layout)."""

    def __init__(self, num_virtual_tokens: int, cfg, device=None):
        self.shape = (num_virtual_tokens, 2 * cfg.num_layers, cfg.num_kv_heads, cfg.head_dim)
        super().__init__(num_virtual_tokens, 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim, device)

    def forward(self, model: nn.Module) -> KVPrefix:
        kv = self.embedding.weight.view(self.shape).permute(1, 2, 0, 3)[:, None]  # [2·layers, 1, KV, P, D]
        return [(kv[2 * i], kv[2 * i + 1]) for i in range(len(kv) // 2)]


class _KVRecorder:
    """Stands in for a KV cache in `PromptEncoder.forward`: keeps each layer's keys and values."""

    length, sliding_window, prefix = 0, None, None

    def __init__(self):
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        self.kv[layer] = (k, v)
        return k, v

    def window_start(self, new_tokens: int, layer: int | None = None) -> int:
        return 0


@dataclass(kw_only=True)
class PromptLearning(Transform):
    """Adds `model.prompt_encoder` (the module targets of other transforms do not apply)."""

    num_virtual_tokens: int = 20
    peft_type: ClassVar[str]
    mergeable: ClassVar[bool] = False  # no weights to fold into the base (`merge_adapter`)

    def __post_init__(self):
        if self.num_virtual_tokens < 1:
            raise UsageError(f"{self.name}: num_virtual_tokens must be >= 1, got {self.num_virtual_tokens}")

    def encoder(self, cfg, device) -> PromptEncoder:
        raise NotImplementedError

    def apply(self, model: nn.Module) -> nn.Module:
        cfg = model.cfg
        reason = ("an encoder-only model" if not cfg.is_causal
                  else "a sliding window" if cfg.sliding_window or cfg.layer_sliding_windows
                  else "ALiBi" if cfg.position == "alibi" else "multi-token prediction heads" if cfg.num_mtp_heads
                  else "per-layer kv heads" if cfg.layer_num_kv_heads else
                  "another prefix/prompt adapter" if getattr(model, "prompt_encoder", None) is not None else None)
        if reason:
            raise UsageError(f"{self.name} tuning does not support {reason}")
        model.prompt_encoder = self.encoder(cfg, model.model.embed_tokens.weight.device)
        model.transforms = [*getattr(model, "transforms", []), self]
        return model

    # -- PEFT's files (`peft_format.py`) --

    def peft_config(self, model: nn.Module) -> dict:
        cfg = model.cfg
        return {"peft_type": self.peft_type, "task_type": "CAUSAL_LM", "num_virtual_tokens": self.num_virtual_tokens,
                "num_layers": cfg.num_layers, "num_transformer_submodules": 1, "inference_mode": True,
                "modules_to_save": None, "revision": None, **self._peft_fields(cfg)}

    def _peft_fields(self, cfg) -> dict:
        raise NotImplementedError

    @classmethod
    def from_peft_config(cls, config: dict, model: nn.Module, where: str) -> PromptLearning:
        if config.get("num_transformer_submodules", 1) != 1:
            raise CheckpointError(f"{where}: num_transformer_submodules={config['num_transformer_submodules']} "
                                  "(encoder-decoder) is not supported")
        return cls(num_virtual_tokens=int(config["num_virtual_tokens"]))

    def peft_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {"prompt_embeddings": model.prompt_encoder.embedding.weight}


@TRANSFORMS.register("prefix")
@dataclass(kw_only=True)
class Prefix(PromptLearning):
    """Prefix tuning: trainable keys and values of `num_virtual_tokens` virtual tokens per layer."""

    peft_type = "PREFIX_TUNING"

    def encoder(self, cfg, device) -> PromptEncoder:
        return PrefixEncoder(self.num_virtual_tokens, cfg, device)

    def _peft_fields(self, cfg) -> dict:
        dim = cfg.num_kv_heads * cfg.head_dim  # PEFT's grouped-query layout: token_dim over the kv heads
        return {"token_dim": dim, "num_attention_heads": cfg.num_kv_heads, "encoder_hidden_size": dim,
                "prefix_projection": False, "init_weights": None}

    @classmethod
    def from_peft_config(cls, config: dict, model: nn.Module, where: str) -> PromptLearning:
        if config.get("prefix_projection"):
            raise CheckpointError(f"{where}: prefix_projection=true is not supported (only plain prefixes)")
        cfg = model.cfg
        expected = {"num_layers": cfg.num_layers, "num_attention_heads": cfg.num_kv_heads,
                    "token_dim": cfg.num_kv_heads * cfg.head_dim}
        for key, value in expected.items():
            if config.get(key, value) != value:
                raise CheckpointError(f"{where}: {key}={config[key]} does not fit the base model ({value})")
        return super().from_peft_config(config, model, where)


@TRANSFORMS.register("prompt")
@dataclass(kw_only=True)
class Prompt(PromptLearning):
    """Prompt tuning: `num_virtual_tokens` trainable input embeddings before the input."""

    peft_type = "PROMPT_TUNING"

    def encoder(self, cfg, device) -> PromptEncoder:
        return PromptEncoder(self.num_virtual_tokens, cfg.hidden_size, device)

    def _peft_fields(self, cfg) -> dict:
        return {"token_dim": cfg.hidden_size, "num_attention_heads": cfg.num_heads, "prompt_tuning_init": "RANDOM",
                "prompt_tuning_init_text": None, "tokenizer_name_or_path": None, "tokenizer_kwargs": None}
