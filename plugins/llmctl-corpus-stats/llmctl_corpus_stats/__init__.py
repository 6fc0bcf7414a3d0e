"""Streaming corpus statistics, as an llmctl plugin (see `command.py`)."""

from llmctl_corpus_stats.stats import CorpusStats, scan

__all__ = ["CorpusStats", "scan"]
