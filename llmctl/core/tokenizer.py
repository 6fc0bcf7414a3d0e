"""Tokenizers: train (via the Rust `tokenizers` library), save, load, chat templates.

A tokenizer directory holds `tokenizer.json`, `tokenizer_config.json` (special-token roles and
a Jinja `chat_template`) and `special_tokens_map.json`; `transformers.AutoTokenizer` loads it
as-is and gives the same ids. Algorithms are registered in `ALGORITHMS`:

    bytelevel  GPT-2 style byte-level BPE: any input encodes, never an unknown token
    bpe        character BPE over SentencePiece-style metaspace (`▁`) words, `<unk>` fallback
    bpe_bytes  the same with byte fallback: unknown characters become <0xNN> byte tokens (Llama 2)
    unigram    SentencePiece unigram LM over metaspace words
    wordpiece  BERT WordPiece (`##` continuations, [CLS] x [SEP] post-processing)
    char       one token per character (no merges)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Iterable

from llmctl.core.chat_templates import end_of_turn_tokens, render_chat, resolve_template
from llmctl.core.registry import Registry
from llmctl.errors import CheckpointError, DataError, UsageError

ROLES = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")
EOT, PAD, MASK, UNK = "<|endoftext|>", "<|pad|>", "<|mask|>", "<unk>"
NORMALIZATIONS = ("none", "nfc", "nfkc", "nfd", "nfkd")
JINJA = "chat_template.jinja"  # where transformers 5's save_pretrained puts the template

ALGORITHMS: Registry[type["Algorithm"]] = Registry("tokenizer algorithm")


class Algorithm:
    """A tokenizer recipe: default special tokens by role and `build` → (Tokenizer, trainer)."""

    roles: dict[str, str] = {"bos": EOT, "eos": EOT, "unk": UNK, "pad": PAD, "mask": MASK}
    #: symbols every vocabulary holds before training (bytes for byte-level), else 0
    fixed_alphabet = 0

    def build(self, vocab_size: int, min_frequency: int, specials: list[str]):
        raise NotImplementedError

    def post_process(self, tok) -> None:
        """Adjust the trained tokenizer (e.g. add a post-processor); nothing by default."""


def _metaspace(tok) -> None:
    from tokenizers import decoders, pre_tokenizers

    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()


@ALGORITHMS.register("bytelevel")
class ByteLevelBPE(Algorithm):
    roles = {"bos": EOT, "eos": EOT, "pad": PAD, "mask": MASK}
    fixed_alphabet = 256

    def build(self, vocab_size, min_frequency, specials):
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
        )
        return tok, trainer


@ALGORITHMS.register("bpe")
class MetaspaceBPE(Algorithm):
    def build(self, vocab_size, min_frequency, specials):
        from tokenizers import Tokenizer, models, trainers

        tok = Tokenizer(models.BPE(unk_token=UNK))
        _metaspace(tok)
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials, show_progress=False
        )
        return tok, trainer


@ALGORITHMS.register("bpe_bytes")
class ByteFallbackBPE(MetaspaceBPE):
    """`bpe` plus the 256 byte tokens <0x00>…<0xFF> right after the special tokens: a character
    the vocabulary lacks encodes as its UTF-8 bytes instead of <unk> (Llama 2, Mistral)."""

    fixed_alphabet = 256

    def build(self, vocab_size, min_frequency, specials):
        return super().build(vocab_size - self.fixed_alphabet, min_frequency, specials)

    def post_process(self, tok) -> None:
        import json

        from tokenizers import decoders, models

        trained = json.loads(tok.to_str())["model"]
        first = len(tok.get_added_tokens_decoder())  # the special tokens hold ids 0 … first - 1
        byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
        vocab = {t: i if i < first else i + 256 for t, i in trained["vocab"].items() if t not in byte_tokens}
        vocab.update({t: first + b for b, t in enumerate(byte_tokens)})
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
        tok.model = models.BPE(vocab, merges, unk_token=UNK, byte_fallback=True)
        tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()])


@ALGORITHMS.register("char")
class Characters(Algorithm):
    def build(self, vocab_size, min_frequency, specials):
        from tokenizers import Tokenizer, models, trainers

        tok = Tokenizer(models.BPE(unk_token=UNK))
        _metaspace(tok)
        # a target of 0 stops the BPE trainer before its first merge: the alphabet alone
        trainer = trainers.BpeTrainer(vocab_size=0, special_tokens=specials, show_progress=False)
        return tok, trainer


@ALGORITHMS.register("unigram")
class Unigram(Algorithm):
    def build(self, vocab_size, min_frequency, specials):
        from tokenizers import Tokenizer, models, trainers

        tok = Tokenizer(models.Unigram())
        _metaspace(tok)
        trainer = trainers.UnigramTrainer(
            vocab_size=vocab_size, special_tokens=specials, unk_token=UNK, show_progress=False
        )
        return tok, trainer


@ALGORITHMS.register("wordpiece")
class WordPiece(Algorithm):
    roles = {"bos": "[CLS]", "eos": "[SEP]", "unk": "[UNK]", "sep": "[SEP]", "pad": "[PAD]",
             "cls": "[CLS]", "mask": "[MASK]"}

    def build(self, vocab_size, min_frequency, specials):
        from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

        tok = Tokenizer(models.WordPiece(unk_token="[UNK]", continuing_subword_prefix="##"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=False, strip_accents=False)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece(prefix="##")
        trainer = trainers.WordPieceTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
            continuing_subword_prefix="##", show_progress=False,
        )
        return tok, trainer

    def post_process(self, tok) -> None:
        from tokenizers import processors

        cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
        )


@dataclass
class TrainSpec:
    """What `train_tokenizer` builds (the `llmctl tokenize train` flags)."""

    algo: str = "bytelevel"
    vocab_size: int = 8192
    min_frequency: int = 2
    special_tokens: list[str] = field(default_factory=list)
    lowercase: bool = False
    normalize: str = "none"
    chat_template: str = "chatml"


def _normalizer(spec: TrainSpec, base):
    from tokenizers import normalizers

    if spec.normalize not in NORMALIZATIONS:
        raise UsageError(f"--normalize {spec.normalize}: expected one of {', '.join(NORMALIZATIONS)}")
    steps = [base] if base is not None else []
    if spec.normalize != "none":
        steps.append(getattr(normalizers, spec.normalize.upper())())
    if spec.lowercase:
        steps.append(normalizers.Lowercase())
    return normalizers.Sequence(steps) if len(steps) > 1 else (steps[0] if steps else None)


def train_tokenizer(spec: TrainSpec, batches: Iterable[list[str]]) -> "Tok":
    """Train a tokenizer on `batches` of documents (streamed; never held in memory at once)."""
    from tokenizers import Tokenizer

    algo = ALGORITHMS.get(spec.algo)()
    template, template_tokens = resolve_template(spec.chat_template)
    roles = dict(algo.roles)
    specials = list(dict.fromkeys([*roles.values(), *template_tokens, *spec.special_tokens]))
    if spec.vocab_size < 1:
        raise UsageError(f"--vocab-size {spec.vocab_size}: must be positive")
    if algo.fixed_alphabet and spec.vocab_size < algo.fixed_alphabet + len(specials):
        raise UsageError(
            f"--vocab-size {spec.vocab_size} is smaller than the alphabet: {spec.algo} needs at least "
            f"{algo.fixed_alphabet + len(specials)} ({algo.fixed_alphabet} bytes + {len(specials)} special tokens)"
        )
    inner, trainer = algo.build(spec.vocab_size, spec.min_frequency, specials)
    inner.normalizer = _normalizer(spec, inner.normalizer)
    documents = 0

    def counted():
        nonlocal documents
        for batch in batches:
            documents += len(batch)
            yield batch

    try:
        inner.train_from_iterator(counted(), trainer=trainer)
    except Exception as exc:  # the Rust trainer reports e.g. a vocab too small for unigram
        if isinstance(exc, (DataError, UsageError)):
            raise
        if "not large enough" in str(exc):
            raise UsageError(f"--vocab-size {spec.vocab_size} is smaller than the alphabet: the corpus has more "
                             f"distinct characters than fit with {len(specials)} special tokens") from None
        raise UsageError(f"tokenizer training failed ({spec.algo}, --vocab-size {spec.vocab_size}): {exc}") from None
    if documents == 0:
        raise DataError("empty corpus: no text to train on")
    size = inner.get_vocab_size()
    if size > spec.vocab_size:
        raise UsageError(
            f"--vocab-size {spec.vocab_size} is smaller than the alphabet: the corpus has "
            f"{size - len(specials)} distinct symbols + {len(specials)} special tokens; use at least {size}"
        )
    algo.post_process(inner)
    inner = Tokenizer.from_str(inner.to_str())  # the saved form, so `hash` is the same after loading
    config = make_config(roles, template)
    return Tok(inner, config)


def make_config(roles: dict[str, str], chat_template: str | None) -> dict[str, Any]:
    """A `tokenizer_config.json` that `transformers.AutoTokenizer` loads with `tokenizer.json`."""
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast"}
    config.update({f"{role}_token": roles.get(role) for role in ROLES})
    config["clean_up_tokenization_spaces"] = False
    config["model_max_length"] = 1_000_000_000_000_000_019_884_624_838_656  # transformers' "no limit"
    if chat_template is not None:
        config["chat_template"] = chat_template
    return config


def _token_str(value: Any) -> str | None:
    if isinstance(value, dict):  # a serialized AddedToken
        return value.get("content")
    return value


class Tok:
    """A loaded tokenizer: the `tokenizers.Tokenizer` (`inner`) plus its special-token roles."""

    def __init__(self, inner, config: dict[str, Any], path: Path | None = None):
        self.inner = inner
        self.config = config
        self.path = path

    # -- special tokens -------------------------------------------------------------------
    def token(self, role: str) -> str | None:
        """The string of a special-token role (`bos`, `eos`, `pad`, `unk`, `mask`, …) or None."""
        return _token_str(self.config.get(f"{role}_token"))

    def _id(self, role: str) -> int | None:
        token = self.token(role)
        return None if token is None else self.inner.token_to_id(token)

    bos_id = property(lambda self: self._id("bos"))
    eos_id = property(lambda self: self._id("eos"))
    pad_id = property(lambda self: self._id("pad"))
    unk_id = property(lambda self: self._id("unk"))
    mask_id = property(lambda self: self._id("mask"))

    @property
    def special_tokens(self) -> dict[str, str]:
        """`{"bos_token": "<|endoftext|>", …}`: the variables chat templates see."""
        return {f"{r}_token": t for r in ROLES if (t := self.token(r)) is not None}

    @property
    def vocab_size(self) -> int:
        return self.inner.get_vocab_size(with_added_tokens=True)

    @property
    def stop_ids(self) -> list[int]:
        """EOS plus any known end-of-turn token in the vocabulary (stop ids for chat generation)."""
        ids = [self.eos_id] + [self.inner.token_to_id(t) for t in sorted(end_of_turn_tokens())]
        return sorted({i for i in ids if i is not None})

    @cached_property
    def hash(self) -> str:
        """Content hash of what decides ids (normalizer, pre-tokenizer, model, added tokens).

        Stable across re-serialization (e.g. `save_pretrained`), unlike the file's bytes.
        """
        data = json.loads(self.inner.to_str())
        added = sorted((t["id"], t["content"]) for t in data.get("added_tokens") or [])
        key = [data.get("normalizer"), data.get("pre_tokenizer"), data.get("model"), added]
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]

    # -- encode / decode ------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.inner.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = False) -> list[list[int]]:
        """Encode many texts in parallel (Rust threads)."""
        return [e.ids for e in self.inner.encode_batch_fast(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.inner.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def pieces(self, text: str) -> list[tuple[int, str, str]]:
        """(id, vocabulary token, the text it covers) per token of `text`.

        A character split over several byte-level tokens is shown with the first of them.
        """
        enc = self.inner.encode(text, add_special_tokens=False)
        out, shown = [], 0
        for i, token, (start, end) in zip(enc.ids, enc.tokens, enc.offsets):
            out.append((i, token, text[max(start, shown):end]))
            shown = max(shown, end)
        return out

    # -- chat -------------------------------------------------------------------------------
    @property
    def chat_template(self) -> str | None:
        template = self.config.get("chat_template")
        if isinstance(template, list):  # transformers' named-templates form: take "default"
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        return template

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs) -> str:
        """Render `messages` exactly as transformers' `apply_chat_template(..., tokenize=False)`."""
        if self.chat_template is None:
            where = f" in {self.path}" if self.path else ""
            raise UsageError(f"tokenizer{where} has no chat template (set one: llmctl tokenize set-template)")
        return render_chat(self.chat_template, messages, self.special_tokens, add_generation_prompt, **kwargs)

    def set_chat_template(self, name_or_file: str) -> list[str]:
        """Install a built-in or file template; adds the special tokens it needs. Returns those added."""
        source, tokens = resolve_template(name_or_file)
        missing = [t for t in tokens if self.inner.token_to_id(t) is None]
        if missing:
            self.inner.add_special_tokens(missing)
            self.__dict__.pop("hash", None)
        self.config["chat_template"] = source
        return missing

    # -- files ------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into `directory`."""
        from llmctl.core.io import atomic_file, write_json

        directory = Path(directory)
        with atomic_file(directory / "tokenizer.json", "w", force=True, encoding="utf-8") as f:
            f.write(self.inner.to_str(pretty=True))
        _write_config(directory, self.config)
        write_json(directory / "special_tokens_map.json", self.special_tokens)


def load_tokenizer(path: str | Path) -> Tok:
    """Load a tokenizer from a tokenizer directory, a checkpoint with one (an adapter directory without
    one: its base's), or a tokenizer.json."""
    from tokenizers import Tokenizer

    path = Path(path)
    if not path.exists():
        raise UsageError(f"tokenizer {path}: no such file or directory")
    file = path if path.is_file() else path / "tokenizer.json"
    directory = file.parent
    if not file.is_file():
        from llmctl.core.adapters.files import base_path, is_adapter

        if is_adapter(path):  # a PEFT adapter saved without a tokenizer uses its base's
            return load_tokenizer(base_path(path))
        raise CheckpointError(f"{path} has no tokenizer.json (train one: llmctl tokenize train … -o DIR)")
    try:
        inner = Tokenizer.from_file(str(file))
    except BaseException as exc:  # a Rust panic on a malformed file is not an Exception
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        why = str(exc).splitlines()[0] if str(exc) else repr(exc)
        raise CheckpointError(f"{file}: not a valid tokenizers file ({why})") from None
    config = _read_json(directory / "tokenizer_config.json")
    jinja = directory / JINJA
    if jinja.is_file():  # transformers reads it before the config's template
        config["chat_template"] = jinja.read_text(encoding="utf-8")
    special_map = _read_json(directory / "special_tokens_map.json")
    for role in ROLES:  # its roles override the config's, as in transformers (older directories have only it)
        if (value := special_map.get(f"{role}_token")) is not None:
            config[f"{role}_token"] = value
    return Tok(inner, config, directory)


def set_template_in_dir(target: str | Path, name_or_file: str) -> list[str]:
    """Set the chat template of the tokenizer in `target` (a tokenizer dir or checkpoint), in place.

    Adds the special tokens the template needs; refuses if they would not fit a checkpoint's
    embedding (`config.json` `vocab_size`). Returns the tokens added.
    """
    tok = load_tokenizer(target)
    added = tok.set_chat_template(name_or_file)
    model_vocab = _read_json(tok.path / "config.json").get("vocab_size")
    if added and model_vocab is not None and tok.vocab_size > model_vocab:
        raise UsageError(
            f"template {name_or_file} needs {len(added)} new special token(s) ({' '.join(added)}), which would make "
            f"the vocabulary {tok.vocab_size} but the model in {tok.path} has vocab_size {model_vocab}"
        )
    if added:
        tok.save(tok.path)
    else:
        _write_config(tok.path, tok.config)
    return added


def _write_config(directory: Path, config: dict[str, Any]) -> None:
    """tokenizer_config.json, and the template into a chat_template.jinja already there (it takes precedence)."""
    from llmctl.core.io import atomic_file, write_json

    write_json(directory / "tokenizer_config.json", config)
    if (directory / JINJA).is_file() and isinstance(config.get("chat_template"), str):
        with atomic_file(directory / JINJA, "w", force=True, encoding="utf-8") as f:
            f.write(config["chat_template"])


def _read_json(path: Path) -> dict[str, Any]:
    from llmctl.core.checkpoint import read_json_object

    return read_json_object(path, required=False) or {}
