"""Architecture presets: `configs/model/NAME.yaml`, each a flat mapping of ModelConfig fields."""

from __future__ import annotations

import os

from llmctl.core.model.config import ModelConfig


def load_preset(name_or_path: str | os.PathLike, overrides: list[str] | None = None) -> ModelConfig:
    """The ModelConfig of a preset name (e.g. 'nano') or a YAML path, plus `key=value` overrides.

    An unknown name is a UsageError (ConfigError) suggesting the closest preset.
    """
    from llmctl.config import load_config

    return load_config(ModelConfig, str(name_or_path), overrides, kind="model")
