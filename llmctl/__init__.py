"""llmctl: a command-line workbench for the whole life of a language model."""

__version__ = "0.1.0"
