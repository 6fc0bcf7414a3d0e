"""The output vocabulary of a merge with `tokenizer_source` (mergekit's semantics), and the
embedding / lm_head rows of every input aligned to it.

    vocab = build_vocabulary(recipe, checkpoints)   # None: every input already matches
    vocab.tok                                       # the output tokenizer (to save beside the weights)
    aligned = vocab.align([(model, tensor), ...])   # each tensor with one row per output token

`union` is the base tokenizer (the base model's, else the first model's) plus, as added tokens,
every other model's tokens it lacks, then every model's added tokens. A model's row for a token
it lacks (or a `tokens:` entry with `force`) is filled: from the one model that has the token,
else from the base model, else the mean of the models that have it, else zeros; a `tokens:`
entry names its own source instead. `pad_to_multiple_of` pads with the mean row.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from llmctl.core.checkpoint import Checkpoint
from llmctl.core.merge.recipe import Recipe, TokenSource
from llmctl.errors import ConfigError, UsageError


@dataclass
class Vocabulary:
    tok: object  # core.tokenizer.Tok: the output tokenizer
    size: int  # output rows (the vocabulary, padded)
    order: list[str]  # the output tokens by id
    rows: dict[str, list[int]]  # model → its row of each output token (-1: it lacks the token)
    vocabs: dict[str, dict[str, int]]  # each model's own vocabulary (token → id)
    sizes: dict[str, int]  # each model's vocab_size (its embedding rows)
    tokens: dict[str, TokenSource]  # the recipe's `tokenizer.tokens`
    base: str | None  # the recipe's base model

    @property
    def identity(self) -> bool:
        """True when every input's rows already are the output's (nothing to align)."""
        n = len(self.order)
        return self.size == n and not any(s.force for s in self.tokens.values()) and \
            all(rows == list(range(n)) and self.sizes[m] == n for m, rows in self.rows.items())

    def align(self, tensors: list[tuple[str, object]]) -> list:
        """Each input's tensor with one row per output token (leading axis), the rows a model
        lacks filled as mergekit fills them from the same inputs."""
        by_model = dict(tensors)
        first = tensors[0][1]
        fill = _fill(self, list(by_model))
        defaults = first.new_zeros((len(fill), *first.shape[1:]))
        for slot, (_, sources, _) in enumerate(fill):
            if sources:
                row = by_model[sources[0][0]][sources[0][1]].clone()
                for model, index in sources[1:]:
                    row += by_model[model][index]
                defaults[slot] = row / len(sources) if len(sources) > 1 else row
        out = []
        for model, tensor in tensors:
            out.append(self._permute(model, tensor, fill, defaults))
        return out

    def _permute(self, model: str, tensor, fill, defaults):
        import torch

        index = torch.tensor(self.rows[model])
        n = len(index)
        new = tensor.new_zeros((self.size, *tensor.shape[1:]))
        have = index >= 0
        new[:n][have] = tensor[index[have]]
        filled = [(token_id, slot) for slot, (token_id, _, replaces) in enumerate(fill) if model in replaces]
        if filled:
            ids, slots = zip(*filled)
            new[list(ids)] = defaults[list(slots)]
        if self.size > n:  # padding rows: the mean embedding
            new[n:] = new[:n].mean(0)
        return new


def build_vocabulary(recipe: Recipe, checkpoints: dict[str, Checkpoint]) -> Vocabulary | None:
    """The output vocabulary and each model's rows for `recipe.tokenizer_source` (None: unset,
    or no input has a tokenizer)."""
    from llmctl.core.tokenizer import load_tokenizer

    source = recipe.tokenizer_source
    if source is None:
        return None
    base = recipe.base_model or recipe.models()[0]
    toks = {m: load_tokenizer(ck.path) for m, ck in checkpoints.items() if _has_tokenizer(ck.path)}
    if not toks:  # no input has a tokenizer: the output copies tokenizer_source's files as they are
        return None
    if base not in toks:
        raise UsageError(f"tokenizer_source: the base model {base} has no tokenizer.json")
    sizes = {m: ck.config.get("vocab_size") or toks.get(m, toks[base]).vocab_size for m, ck in checkpoints.items()}
    vocabs = {m: toks.get(m, toks[base]).inner.get_vocab(with_added_tokens=True) for m in checkpoints}
    beyond = sorted((t for t, i in vocabs[base].items() if i >= sizes[base]), key=vocabs[base].get)
    if beyond:  # mergekit strips them from a BPE tokenizer: not done here
        raise UsageError(f"tokenizer_source: {base}'s tokenizer has {len(beyond)} token(s) beyond its vocab_size "
                         f"{sizes[base]} (e.g. {beyond[0]!r}); not supported")
    if source == "union":
        out = _union(base, toks, vocabs, sizes)
    elif source == "base":
        out = toks[base]
    else:
        out = load_tokenizer(checkpoints[source].path if source in checkpoints else Path(source))
    from tokenizers import AddedToken

    vocab = out.inner.get_vocab(with_added_tokens=True)
    for token in recipe.tokens:  # `tokens:` entries the output lacks become (normalised) added tokens
        if token not in vocab:
            out.inner.add_tokens([AddedToken(token, normalized=True, special=False)])
            vocab = out.inner.get_vocab(with_added_tokens=True)
    n = len(vocab)
    pad = recipe.pad_to_multiple_of
    size = -(-n // pad) * pad if pad else n
    order = sorted(vocab, key=vocab.get)
    rows = {m: [(i if (i := vocabs[m].get(t, -1)) < sizes[m] else -1) for t in order] for m in checkpoints}
    for token, spec in recipe.tokens.items():
        if spec.model is not None and spec.model not in checkpoints:
            raise ConfigError(f"tokenizer.tokens[{token!r}]: {spec.model} is not one of the merged models")
    return Vocabulary(out, size, order, rows, vocabs, sizes, recipe.tokens, recipe.base_model)


def _has_tokenizer(path) -> bool:
    return (Path(path) / "tokenizer.json").is_file()


def _union(base: str, toks: dict, vocabs: dict[str, dict[str, int]], sizes: dict[str, int]):
    """mergekit's union: the base tokenizer plus every model's missing tokens (normalised added
    tokens, in model then id order), then every model's added tokens (the first settings win)."""
    from tokenizers import AddedToken

    from llmctl.core.tokenizer import Tok

    plain, added = {}, {}
    for m in [base] + [m for m in toks if m != base]:
        decoder = toks[m].inner.get_added_tokens_decoder()
        contents = {t.content for t in decoder.values()}
        for token, i in sorted(vocabs[m].items(), key=lambda item: item[1]):
            if i < sizes[m] and token not in contents:
                plain.setdefault(token, None)
        for i, info in sorted(decoder.items()):
            if i < sizes[m]:
                added.setdefault(info.content, info)
    from tokenizers import Tokenizer

    tok = Tok(Tokenizer.from_str(toks[base].inner.to_str()), dict(toks[base].config), toks[base].path)
    have = vocabs[base]
    for token in plain:
        if token not in added and token not in have:
            tok.inner.add_tokens([AddedToken(token, normalized=True, special=False)])
    for info in added.values():
        tok.inner.add_tokens([info])
    return tok


def _fill(v: Vocabulary, models: list[str]) -> list[tuple[int, list[tuple[str, int]], frozenset[str]]]:
    """(token id, the [(model, row)] averaged, the models whose row it replaces) per row to fill,
    for a tensor merged from `models`."""
    fill = []
    for token_id, token in enumerate(v.order):
        spec = v.tokens.get(token)
        present = [m for m in models if v.rows[m][token_id] >= 0]
        if not (spec and spec.force) and len(present) == len(models):
            continue
        replaces = frozenset(models if spec and spec.force else [m for m in models if m not in present])
        if spec is not None:
            sources = _source_row(v, token, spec, token_id, models)
        elif len(present) > 1 and v.base in present:
            sources = [(v.base, v.rows[v.base][token_id])]
        else:  # the one model that has it, the mean of those that have it, or zeros
            sources = [(m, v.rows[m][token_id]) for m in present]
        fill.append((token_id, sources, replaces))
    return fill


def _source_row(v: Vocabulary, token: str, spec: TokenSource, token_id: int, models: list[str]):
    if spec.model is None:
        return []
    where = f"tokenizer.tokens[{token!r}]"
    if spec.model not in models:
        raise ConfigError(f"{where}: {spec.model} is not an input of every vocabulary tensor")
    if spec.token is None and spec.token_id is None:
        row = v.rows[spec.model][token_id]
        if row < 0:
            raise ConfigError(f"{where}: {spec.model} has no token {token!r}")
        return [(spec.model, row)]
    row = spec.token_id if spec.token is None else v.vocabs[spec.model].get(spec.token, -1)
    if not 0 <= row < v.sizes[spec.model]:
        what = f"token {spec.token!r}" if spec.token is not None else f"token id {spec.token_id}"
        raise ConfigError(f"{where}: {spec.model} has no {what}")
    return [(spec.model, row)]
