"""Checks that a loaded model can run what it is given, before it runs: a tokenizer whose ids fit
its embedding, token data whose ids fit it, weights that are finite, a language model (not a
reward model) where text is generated."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from llmctl.errors import CheckpointError, ConfigError

SCAN_TOKENS = 1 << 24  # ids read per numpy call when scanning shards


def check_tokenizer_fits(tok, vocab_size: int, where: str | Path) -> None:
    """CheckpointError if `tok` has ids beyond the model's `vocab_size` (they would index past the embedding)."""
    if tok.vocab_size > vocab_size:
        raise CheckpointError(f"{where}: the tokenizer has {tok.vocab_size:,} tokens but the model's vocab_size is "
                              f"{vocab_size:,}; use the tokenizer the model was trained with")


def check_ids_fit(arrays: Iterable, vocab_size: int, where: str | Path) -> None:
    """ConfigError if any token id in `arrays` (numpy, e.g. shard memmaps) is >= `vocab_size`."""
    for array in arrays:
        for start in range(0, len(array), SCAN_TOKENS):
            top = int(array[start:start + SCAN_TOKENS].max())
            if top >= vocab_size:
                raise ConfigError(f"config key 'data': {where} holds token id {top:,}, outside the model's "
                                  f"vocabulary of {vocab_size:,}; re-encode it with the model's tokenizer")


def check_finite(model, where: str | Path) -> None:
    """CheckpointError naming the first parameter with NaN or infinite values."""
    import torch

    for name, tensor in model.named_parameters():
        if tensor.is_floating_point() and tensor.device.type != "meta" and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{where}: the checkpoint has non-finite weights (NaN or inf in {name}); "
                                  "use an earlier checkpoint of the run")


def check_language_model(model_config, where: str | Path) -> None:
    """CheckpointError for a sequence classifier (a reward model: `num_labels` scores, no vocabulary head)."""
    if getattr(model_config, "num_labels", None):
        raise CheckpointError(f"{where} is a reward model (a sequence classifier with {model_config.num_labels} "
                              "score(s)): it scores text (eval type pairwise), it does not generate")
