"""Shipped YAML presets and recipes (installed as the package `llmctl.configs`)."""
