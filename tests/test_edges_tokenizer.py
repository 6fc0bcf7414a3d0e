"""Edges of `core/tokenizer.py`, `core/data/split.py` and `core/data/shards.py`.

The trained pipelines are compared with transformers' own GPT-2, Llama and BERT tokenizers built
from the same vocabulary and merges; BPE's first merges and `min_frequency` with merges worked
out by hand; the files with what transformers reads from them.
"""

from __future__ import annotations

import json
import random

import pytest
import transformers
from test_tokenize import CORPUS, MESSAGES, MULTILINGUAL, UNSEEN

from llmctl.core.tokenizer import ALGORITHMS, Algorithm, TrainSpec, load_tokenizer, set_template_in_dir, train_tokenizer
from llmctl.errors import CheckpointError, DataError, UsageError

#: spaces before punctuation and contractions: what `clean_up_tokenization_spaces` would remove
SPACED = "Hello , world . I 'm here ! Don 't go ?"


def _train(algo, vocab_size=400, min_frequency=1, corpus=CORPUS, **kw):
    return train_tokenizer(TrainSpec(algo=algo, vocab_size=vocab_size, min_frequency=min_frequency, **kw), [corpus])


def _model(tok) -> dict:
    return json.loads(tok.inner.to_str())["model"]


def _reference(algo, tok):
    """transformers' tokenizer of the family `algo` follows, from our vocabulary and merges."""
    model = _model(tok)
    if algo == "wordpiece":
        return transformers.BertTokenizer(vocab=model["vocab"], do_lower_case=False, strip_accents=False)
    cls = transformers.GPT2Tokenizer if algo == "bytelevel" else transformers.LlamaTokenizer
    return cls(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]])


@pytest.mark.parametrize("algo", ["bytelevel", "bpe", "bpe_bytes", "wordpiece"])
def test_trained_pipelines_encode_as_transformers_builds_them(algo):
    """GPT-2 (byte-level BPE), Llama (metaspace BPE, byte fallback) and BERT (WordPiece) from our
    vocabulary: the same ids, frames ([CLS] a [SEP] b [SEP], type ids) and decoded text."""
    tok = _train(algo)
    ref = _reference(algo, tok)
    texts = list(MULTILINGUAL)
    if algo != "bpe":  # plain BPE has <unk> where Llama's (byte fallback) has bytes
        texts += [SPACED, "ÀÉÎ Straße ÅNGSTRÖM 中文ab", UNSEEN]
    for text in texts:
        ids = tok.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False), text
        assert tok.encode(text, add_special_tokens=True) == ref.encode(text), text
        if algo != "bpe" and algo != "bpe_bytes":  # Llama's decoder strips the first space; ours keeps text as is
            assert tok.decode(ids) == ref.decode(ids, clean_up_tokenization_spaces=False), text
    assert tok.encode_batch(texts) == [ref.encode(t, add_special_tokens=False) for t in texts]
    assert tok.encode_batch(texts, add_special_tokens=True) == [ref.encode(t) for t in texts]
    if algo == "wordpiece":
        pair = tok.inner.encode("Hi there", "Bye now")
        expected = ref("Hi there", "Bye now")
        assert pair.ids == expected["input_ids"] and pair.type_ids == expected["token_type_ids"]
        assert tok.encode(UNSEEN).count(tok.unk_id) == len(UNSEEN.split()) - 1  # \x00 is dropped, as BERT cleans it
    mine = json.loads(tok.inner.to_str())
    theirs = json.loads(ref.backend_tokenizer.to_str())
    if algo in ("bytelevel", "wordpiece"):  # the very same normalizer, pre-tokenizer and decoder
        assert [mine[k] for k in ("normalizer", "pre_tokenizer", "decoder")] == \
               [theirs[k] for k in ("normalizer", "pre_tokenizer", "decoder")]
    else:
        assert mine["normalizer"] is None and theirs["normalizer"] is None


def test_byte_fallback_layout_and_merges_are_plain_bpes():
    """bpe_bytes at V: the merges of bpe at V - 256, the trainer's ids shifted past the 256 byte
    tokens, every id in 0 … V-1 exactly once, `<unk>` kept, and decoding bytes back to text."""
    bytes_tok, plain = _train("bpe_bytes", 400), _train("bpe", 400 - 256)
    model, base = _model(bytes_tok), _model(plain)
    assert model["merges"] == base["merges"] and model["byte_fallback"] and model["unk_token"] == "<unk>"
    first = len(plain.inner.get_added_tokens_decoder())
    assert {t: (i if i < first else i + 256) for t, i in base["vocab"].items()} == \
           {t: i for t, i in model["vocab"].items() if not t.startswith("<0x")}
    assert sorted(model["vocab"].values()) == list(range(400)) == sorted(bytes_tok.inner.get_vocab().values())
    assert [model["vocab"][f"<0x{b:02X}>"] for b in range(256)] == list(range(first, first + 256))
    ids = bytes_tok.encode("ქ")
    assert ids == [bytes_tok.inner.token_to_id("▁"), *(first + b for b in "ქ".encode())]
    assert bytes_tok.decode(ids) == "ქ"
    assert bytes_tok.decode(bytes_tok.encode("a ქ b")) == "a ქ b"


def test_byte_fallback_reads_merges_saved_as_strings():
    """tokenizers before 0.20 saved each merge as "a b": post-processing reads that form too."""
    from tokenizers import Tokenizer

    class Saved:  # a trained tokenizer as tokenizers 0.19 serialized it
        def __init__(self, tok):
            self.tok, data = tok, json.loads(tok.to_str())
            data["model"]["merges"] = [" ".join(m) for m in data["model"]["merges"]]
            self.text = json.dumps(data)

        def to_str(self):
            return self.text

        def get_added_tokens_decoder(self):
            return self.tok.get_added_tokens_decoder()

    old = Saved(_train("bpe", 400 - 256).inner)
    ALGORITHMS.get("bpe_bytes")().post_process(old)
    assert json.loads(Tokenizer(old.model).to_str())["model"] == _model(_train("bpe_bytes", 400))


@pytest.mark.parametrize("algo", ["bytelevel", "bpe", "wordpiece"])
def test_min_frequency_by_hand(algo):
    """"ab ab ab cd": the pair (a, b) occurs 3 times, (▁/Ġ, a) 2 or 3, the rest once. At
    min_frequency 4 nothing is merged; at 3 "ab" is; at 2 (byte-level) also "Ġab"."""
    corpus = ["ab ab ab cd"]
    word_start = {"bytelevel": "Ġ", "bpe": "▁", "wordpiece": "##"}[algo]

    def learned(min_frequency):
        tok = _train(algo, 300 if algo == "bytelevel" else 60, min_frequency, corpus)
        return {t for t in tok.inner.get_vocab() if len(t.replace(word_start, "")) > 1 and not t.startswith("<")
                and not t.startswith("[")}

    assert learned(4) == set()
    if algo == "bytelevel":  # words "ab", "Ġab", "Ġab", "Ġcd": (a,b) 3, then (Ġ,ab) 2
        assert learned(3) == {"ab"} and learned(2) == {"ab", "Ġab"}
    elif algo == "bpe":  # "▁ab" ×3: (▁,a) and (a,b) tie at 3, the two merges make ▁ab either way
        assert "▁ab" in learned(3) and len(learned(3)) == 2
    else:  # "a ##b" ×3, "c ##d" once
        assert learned(3) == {"ab"} and learned(1) == {"ab", "cd"}


@pytest.mark.parametrize("algo", ["bpe", "bytelevel", "wordpiece", "unigram"])
def test_vocab_size_is_the_target_and_bpe_merges_are_greedy(algo):
    """A corpus with more to learn than the target: exactly `vocab_size` tokens; BPE's merges at a
    smaller target are the first merges of a larger one (the algorithm is greedy)."""
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 8))) for _ in range(300)]
    corpus = [" ".join(rng.choice(words) for _ in range(30)) for _ in range(200)]
    sizes = (400,) if algo == "unigram" else (280, 400)
    toks = [_train(algo, size, corpus=corpus) for size in sizes]
    assert [t.vocab_size for t in toks] == list(sizes)
    if algo in ("bpe", "bytelevel"):
        small, large = (_model(t)["merges"] for t in toks)
        assert small == large[:len(small)] and len(large) - len(small) == 120


@pytest.mark.parametrize("algo", ["bpe", "char", "unigram"])
def test_unknown_characters_become_the_unk_token(algo):
    tok = _train(algo)
    specials = ["<|endoftext|>", "<unk>", "<|pad|>", "<|mask|>", "<|im_start|>", "<|im_end|>"]
    assert [tok.inner.token_to_id(t) for t in specials] == list(range(6))  # the roles', then the template's
    assert tok.unk_id == tok.inner.token_to_id("<unk>") is not None
    ids = tok.encode("ab ქ")
    assert tok.unk_id in ids and tok.decode(ids).startswith("ab")
    if algo == "char":  # the alphabet alone, special tokens first
        assert all(len(t) == 1 for t in tok.inner.get_vocab() if not t.startswith("<"))
        assert tok.inner.token_to_id("<|endoftext|>") == 0 and tok.inner.token_to_id("<|im_end|>") is not None
    if algo == "unigram":
        assert _model(tok)["unk_id"] == tok.unk_id


def test_vocab_size_limits_and_messages():
    with pytest.raises(UsageError, match=r"^--vocab-size 0: must be positive$"):
        _train("bpe", 0)
    with pytest.raises(UsageError, match=r"^--vocab-size 1 is smaller than the alphabet: the corpus has 83 distinct "
                                         r"symbols \+ 6 special tokens; use at least 89$"):
        _train("bpe", 1)
    needed = 256 + 6  # bytes + bos/eos, pad, mask, <|im_start|>, <|im_end|>, <|x|>
    tok = _train("bytelevel", needed, special_tokens=["<|x|>"])  # the alphabet alone fits exactly
    assert tok.vocab_size == needed and _model(tok)["merges"] == []
    with pytest.raises(UsageError, match=rf"^--vocab-size {needed - 1} is smaller than the alphabet: bytelevel needs "
                                         rf"at least {needed} \(256 bytes \+ 6 special tokens\)$"):
        _train("bytelevel", needed - 1, special_tokens=["<|x|>"])
    with pytest.raises(UsageError, match=r"^--normalize nfx: expected one of none, nfc, nfkc, nfd, nfkd$"):
        _train("bpe", normalize="nfx")


def test_empty_corpus_and_empty_batches():
    for batches in ([], [[]], [[], []]):
        with pytest.raises(DataError, match="^empty corpus: no text to train on$"):
            train_tokenizer(TrainSpec(algo="bpe", vocab_size=300), iter(batches))
    tok = train_tokenizer(TrainSpec(algo="bpe", vocab_size=300, min_frequency=1), iter([CORPUS, []]))
    assert tok.vocab_size > 100  # a last empty batch is not an empty corpus


def test_a_failing_trainer_is_one_usage_error(monkeypatch):
    class Failing(Algorithm):
        def build(self, vocab_size, min_frequency, specials):
            tok, trainer = ALGORITHMS.get("bpe")().build(vocab_size, min_frequency, specials)
            return tok, "not a trainer"

    monkeypatch.setitem(ALGORITHMS._items, "failing-test", Failing)
    with pytest.raises(UsageError, match=r"^tokenizer training failed \(failing-test, --vocab-size 300\): "):
        train_tokenizer(TrainSpec(algo="failing-test", vocab_size=300), [CORPUS])


@pytest.mark.parametrize("lowercase, normalize, text, expected", [
    (False, "none", "ＡＢ Ab", "ＡＢ Ab"), (True, "none", "ＡＢ Ab", "ａｂ ab"), (False, "nfkc", "ＡＢ Ab", "AB Ab"),
    (True, "nfkc", "ＡＢ Ab", "ab ab"), (False, "nfd", "é", "e\u0301"),
])
def test_normalizers_as_tokenizers_applies_them(lowercase, normalize, text, expected):
    """The normalizer is absent (null, as GPT-2's) without options, the single step itself with one,
    and a sequence in order with two; WordPiece keeps BERT's normalizer first."""
    tok = _train("bpe", lowercase=lowercase, normalize=normalize)
    data = json.loads(tok.inner.to_str())["normalizer"]
    steps = int(lowercase) + (normalize != "none")
    assert (data is None) == (steps == 0) and (data is None or (data["type"] == "Sequence") == (steps == 2))
    if steps:
        assert tok.inner.normalizer.normalize_str(text) == expected
    wp = json.loads(_train("wordpiece", lowercase=lowercase, normalize=normalize).inner.to_str())["normalizer"]
    assert (wp["normalizers"][0] if steps else wp)["type"] == "BertNormalizer"


def test_files_and_what_transformers_reads(tmp_path):
    """The config transformers reads: its fast class, no clean-up of spaces (decode is the
    tokenizer's), no length limit; the roles also in special_tokens_map.json."""
    tok = _train("bytelevel")
    assert tok.config["tokenizer_class"] == "PreTrainedTokenizerFast"
    tok.save(tmp_path / "a" / "b")  # parents made
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "a" / "b"))
    ids = tok.encode(SPACED)
    assert hf.decode(ids) == tok.decode(ids) == SPACED
    assert hf.model_max_length == transformers.tokenization_utils_base.VERY_LARGE_INTEGER
    assert json.loads((tmp_path / "a" / "b" / "special_tokens_map.json").read_text()) == tok.special_tokens == {
        "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|pad|>", "mask_token": "<|mask|>"}
    assert sorted(p.name for p in (tmp_path / "a" / "b").iterdir()) == [
        "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    unigram = _train("unigram")  # not BPE, so transformers would clean up its spaces if asked to
    unigram.save(tmp_path / "u")
    ids = unigram.encode("The fox , the dog . Как дела ? мир !")
    decoded = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "u")).decode(ids)
    assert decoded == unigram.decode(ids) == "The fox , the dog . Как дела ? мир !"


def test_roles_as_added_tokens_and_from_the_special_tokens_map(tmp_path):
    """Roles may be serialized AddedTokens; special_tokens_map.json's override the config's, as
    transformers reads them (older directories have them only there)."""
    tok = _train("bpe")
    tok.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["bos_token"] = {"__type": "AddedToken", "content": "<|pad|>", "special": True}
    for role in ("eos", "mask", "unk"):
        config.pop(f"{role}_token")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<unk>", "eos_token": {"content": "<|mask|>"}, "mask_token": "<|endoftext|>"}))
    loaded = load_tokenizer(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert (loaded.bos_id, loaded.eos_id, loaded.mask_id) == (hf.bos_token_id, hf.eos_token_id, hf.mask_token_id)
    assert (loaded.token("bos"), loaded.token("eos"), loaded.token("mask"), loaded.unk_id) == (
        "<unk>", "<|mask|>", "<|endoftext|>", None)
    (tmp_path / "special_tokens_map.json").unlink()
    loaded = load_tokenizer(tmp_path)
    assert loaded.token("bos") == "<|pad|>" and loaded.bos_id == tok.pad_id and loaded.eos_id is None


def test_chat_template_jinja_takes_precedence_as_in_transformers(tmp_path):
    """transformers 5 reads chat_template.jinja before the config's template; set-template writes
    both, so the two keep agreeing."""
    tok = _train("bytelevel", 300)
    tok.save(tmp_path)
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}[{{ m.content }}]{% endfor %}")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    expected = hf.apply_chat_template(MESSAGES[:2], tokenize=False)
    assert load_tokenizer(tmp_path).apply_chat_template(MESSAGES[:2]) == expected == "[You are terse.][Hi there]"
    assert set_template_in_dir(tmp_path, "chatml") == []
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert load_tokenizer(tmp_path).apply_chat_template(MESSAGES) == \
           hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True) != expected
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["chat_template"] == \
           (tmp_path / "chat_template.jinja").read_text()


def test_chat_template_kwargs_and_missing_template(tmp_path):
    tok = _train("bytelevel", 300)
    tok.config["chat_template"] = "{{ greeting }}{% for m in messages %} {{ m.content }}{% endfor %}"
    tok.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    mine = load_tokenizer(tmp_path).apply_chat_template(MESSAGES[:2], greeting="Hey")
    assert mine == hf.apply_chat_template(MESSAGES[:2], tokenize=False, greeting="Hey") == "Hey You are terse. Hi there"
    tok.config.pop("chat_template")
    with pytest.raises(UsageError, match=r"^tokenizer has no chat template \(set one: llmctl tokenize set-template\)$"):
        tok.apply_chat_template(MESSAGES)
    tok.save(tmp_path / "plain")
    with pytest.raises(UsageError, match=rf"^tokenizer in {tmp_path / 'plain'} has no chat template \(set one: "):
        load_tokenizer(tmp_path / "plain").apply_chat_template(MESSAGES)


def test_set_template_updates_the_hash_and_fits_exactly(tmp_path):
    tok = _train("bpe", 300, chat_template="llama3")
    before = tok.hash  # cached
    assert tok.set_chat_template("chatml") == ["<|im_start|>", "<|im_end|>"]
    tok.save(tmp_path / "t")
    assert tok.hash != before and tok.hash == load_tokenizer(tmp_path / "t").hash

    tok = _train("bpe", 300, chat_template="llama3")
    tok.save(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps({"vocab_size": tok.vocab_size + 1}))
    with pytest.raises(UsageError, match=rf"^template chatml needs 2 new special token\(s\) \(<\|im_start\|> "
                                         rf"<\|im_end\|>\), which would make the vocabulary {tok.vocab_size + 2} but"):
        set_template_in_dir(tmp_path / "ckpt", "chatml")
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps({"vocab_size": tok.vocab_size + 2}))
    assert set_template_in_dir(tmp_path / "ckpt", "chatml") == ["<|im_start|>", "<|im_end|>"]


def test_pieces_and_load_errors(tmp_path, monkeypatch):
    wp = _train("wordpiece")
    assert [p[0] for p in wp.pieces("Hi there")] == wp.encode("Hi there")  # no [CLS] / [SEP]
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text('{"model": 3}')
    from tokenizers import Tokenizer
    with pytest.raises(Exception) as raised:
        Tokenizer.from_file(str(tmp_path / "bad" / "tokenizer.json"))
    why = str(raised.value).splitlines()[0]
    with pytest.raises(CheckpointError, match=r"^") as err:
        load_tokenizer(tmp_path / "bad")
    assert str(err.value) == f"{tmp_path / 'bad' / 'tokenizer.json'}: not a valid tokenizers file ({why})"
    import tokenizers

    def panics(path):  # a Rust panic may carry no message
        raise RuntimeError()

    monkeypatch.setattr(tokenizers.Tokenizer, "from_file", panics)
    with pytest.raises(CheckpointError) as err:
        load_tokenizer(tmp_path / "bad")
    assert str(err.value) == f"{tmp_path / 'bad' / 'tokenizer.json'}: not a valid tokenizers file (RuntimeError())"
    (tmp_path / "none").mkdir()
    with pytest.raises(CheckpointError) as err:
        load_tokenizer(tmp_path / "none")
    assert str(err.value) == f"{tmp_path / 'none'} has no tokenizer.json (train one: llmctl tokenize train … -o DIR)"


def test_an_adapter_directory_uses_its_bases_tokenizer(tmp_path):
    tok = _train("bpe", 300)
    tok.save(tmp_path / "base")
    (tmp_path / "base" / "config.json").write_text("{}")
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "../base"}))
    assert load_tokenizer(tmp_path / "adapter").hash == tok.hash


# -- document splits (core/data/split.py) ----------------------------------------------------
def _random_text(rng, size=600):
    """Words, single newlines, blank lines (some holding spaces, tabs, \\r) and runs of them."""
    parts = ["word", "x", "ünï", "語", " ", " ", "\n", "\n\n", "\n \t\n", "\n\r\n\n", "  \n\n\n  "]
    return "".join(rng.choice(parts) for _ in range(size))


def _chunks(rng, text):
    out, at = [], 0
    while at < len(text):
        step = rng.choice([1, 2, 3, 7, 50, 400])
        out.append(text[at:at + step])
        at += step
    return out


def _flat(doc_lists):
    return [doc for docs in doc_lists for doc in docs]


def test_splits_equal_the_plain_definitions_over_any_chunking():
    """Paragraphs (separated by lines of spaces/tabs only, stripped), non-blank lines and the whole
    file, as `re.split` / `str.split` define them on the whole text, whatever the chunks."""
    import re

    from llmctl.core.data import DOC_SPLITS

    rng = random.Random(0)
    for _ in range(20):
        text = _random_text(rng)
        expected = {
            "blank": [p.strip() for p in re.split(r"\n[ \t\r\f\v]*\n", text) if p.strip()],
            "line": [line for line in text.split("\n") if line.strip()],
            "file": [text] if text.strip() else [],
        }
        for name, docs in expected.items():
            assert _flat(DOC_SPLITS.get(name)(iter(_chunks(rng, text)))) == docs, name
    assert _flat(DOC_SPLITS.get("file")(iter([" \n", "\t"]))) == []


def _check_pieces(name, text, chunks, limit):
    """The pieces of a chunked split against the documents of the whole text."""
    from llmctl.core.data import DOC_SPLITS, Continued

    def cut(rest):
        return rest.rfind("\n", 0, limit) + 1 or limit

    whole = _flat(DOC_SPLITS.get(name)(iter([text]), 10 ** 9))
    pieces = _flat(DOC_SPLITS.get(name)(iter(chunks), limit))
    assert sum(type(p) is not Continued for p in pieces) == len(whole)
    docs, rest = iter(whole), None
    for piece in pieces:
        rest = next(docs) if rest is None else rest
        assert rest.startswith(piece), (piece, rest)
        if type(piece) is Continued:
            assert piece == rest[:cut(rest)]
            assert len(rest) > limit or name == "blank"  # a streamed paragraph still holds the spaces its end loses
            rest = rest[len(piece):]
        else:
            assert piece == rest and not piece.isspace()
            assert len(piece) <= limit or piece[cut(piece):].isspace()
            rest = None
    assert rest is None and next(docs, None) is None


@pytest.mark.parametrize("name", ["blank", "line", "file"])
def test_long_documents_are_cut_at_the_last_line_break_within_the_limit(name):
    """A document's pieces join to it; each but the last is `Continued`, and ends at the last
    newline of the next `limit` characters (after `limit` characters where there is none); the
    last is never whitespace alone, and longer than `limit` only when its tail past such a cut is
    whitespace. Random texts and chunks, and short ones cut into two chunks at every place."""
    rng = random.Random(1)
    words = ["abc", "defghij", "x" * 30, "y"]
    paragraphs = ["".join(rng.choice(words) + rng.choice([" ", "\n", "  ", "\n  ", " \n"])
                          for _ in range(rng.randint(1, 30))) + rng.choice(["z", "z\n  \n", "z  "]) for _ in range(40)]
    text = "".join(p + rng.choice(["\n\n", "\n \t\n", "\n\n\n"]) for p in paragraphs)
    for limit in (5, 16, 40):
        _check_pieces(name, text, _chunks(rng, text), limit)
    for text in ("  \n abcdefgh ij\n  klmnop  \n\n\n  qrstuvwx yz  ", "abcdefghij\n\n\n  klmnopq\n  rs  \n\nabcde\n  t"):
        for at in range(len(text) + 1):
            _check_pieces(name, text, [text[:at], text[at:]], 6)


def test_batches_close_when_they_reach_max_chars():
    from llmctl.core.data import batched

    lists = [["aa", "bbb"], ["c"], [], ["dddd"], ["e"]]
    assert list(batched(lists, 5)) == [["aa", "bbb"], ["c", "dddd"], ["e"]]
    assert list(batched(lists, 6)) == [["aa", "bbb", "c"], ["dddd", "e"]]
    assert list(batched(lists, 100)) == [["aa", "bbb", "c", "dddd", "e"]]
    assert list(batched([["aaaaa"], ["bbbb"], ["c"]], 5)) == [["aaaaa"], ["bbbb", "c"]]
    assert list(batched([[], []], 1)) == []


# -- token shards (core/data/shards.py) ------------------------------------------------------
def _manifest(path, splits, dtype="uint16", **extra):
    manifest = {"format": "llmctl-tokens", "version": 1, "dtype": dtype, "tokenizer_hash": "h", "vocab_size": 500,
                "splits": splits, **extra}
    (path / "manifest.json").write_text(json.dumps(manifest))
    return manifest


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_shard_writer_against_a_token_by_token_reference(tmp_path, dtype):
    """Random writes (empty documents, documents across shards, ends on shard boundaries): the
    bytes are the little-endian tokens in order, each shard full but the last, and a document
    counted in the shard of its last token (an empty one where it stands)."""
    import numpy as np

    from llmctl.core.data import ShardWriter, TokenShards

    rng = random.Random(2)
    high = 60000 if dtype == "uint16" else 4_000_000_000
    for case in range(6):
        shard_tokens = rng.choice([1, 3, 4, 7, 16])
        out = tmp_path / str(case)
        out.mkdir()
        writer = ShardWriter(out, "train", dtype, shard_tokens)
        tokens, ends = [], []  # the reference: every token, every document's global end
        for _ in range(rng.randint(1, 5)):
            lengths = [rng.choice([0, 1, 2, 3, 4, 8]) for _ in range(rng.randint(1, 6))]
            array = np.array([rng.randrange(high) for _ in range(sum(lengths))], dtype=np.int64)
            local = np.cumsum(lengths).tolist()
            writer.write(array, local)
            ends += [len(tokens) + e for e in local]
            tokens += array.tolist()
        summary = writer.summary()
        sizes = [len(tokens[i:i + shard_tokens]) for i in range(0, len(tokens), shard_tokens)]
        assert [s["tokens"] for s in summary["shards"]] == sizes
        assert [s["file"] for s in summary["shards"]] == [f"train-{i:05d}.bin" for i in range(len(sizes))]
        counts = [s["documents"] for s in summary["shards"]]
        starts = [0, *ends[:-1]]
        last = [(e - 1) // shard_tokens for s, e in zip(starts, ends) if e > s]  # the shard of each last token
        empty = [e for s, e in zip(starts, ends) if e == s]  # at a boundary: the shard before or after
        for i, count in enumerate(counts):
            assert last.count(i) <= count <= last.count(i) + sum((e - 1) // shard_tokens <= i <= e // shard_tokens
                                                                 for e in empty)
        assert summary["tokens"] == len(tokens) and summary["documents"] == len(ends) == sum(counts)
        data = b"".join((out / s["file"]).read_bytes() for s in summary["shards"])
        assert data == np.array(tokens, dtype=np.dtype(dtype).newbyteorder("<")).tobytes()
        _manifest(out, {"train": summary, "val": {"tokens": 0, "documents": 0, "shards": []}}, dtype)
        maps = TokenShards(out).split("train")
        assert all(m.dtype == np.dtype(dtype).newbyteorder("<") for m in maps)
        assert np.concatenate(maps).tolist() == tokens


def test_documents_without_tokens_are_counted(tmp_path):
    """With no EOS appended, documents that encode to nothing still count, where the next token goes."""
    import numpy as np

    from llmctl.core.data import ShardWriter

    writer = ShardWriter(tmp_path, "val", "uint16", 4)
    writer.write(np.zeros(0), [0, 0])  # before any token: a shard is opened for them
    writer.write(np.arange(2), [0, 2])
    writer.write(np.zeros(0), [0])  # the open shard, which already counts 4
    writer.write(np.arange(2), [2])
    writer.write(np.zeros(0), [0])  # after a full shard: the next one
    assert writer.summary()["shards"] == [{"file": "val-00000.bin", "tokens": 4, "documents": 6},
                                          {"file": "val-00001.bin", "tokens": 0, "documents": 1}]
    assert (tmp_path / "val-00001.bin").read_bytes() == b""


def test_token_dtype_boundary():
    from llmctl.core.data import token_dtype

    assert [token_dtype(v) for v in (1, 65535, 65536, 65537, 1 << 20)] == ["uint16"] * 3 + ["uint32"] * 2


def test_token_shards_refusals_by_their_whole_text(tmp_path):
    from llmctl.core.data import TokenShards

    def refused(message):
        with pytest.raises(DataError) as err:
            TokenShards(tmp_path)
        assert str(err.value) == message.format(m=tmp_path / "manifest.json", d=tmp_path)

    shard = {"file": "train-00000.bin", "tokens": 3, "documents": 1}
    (tmp_path / "train-00000.bin").write_bytes(b"\1\0\2\0\3\0")
    refused("{d}: not a token-shard directory (no manifest.json; make one with llmctl tokenize encode)")
    (tmp_path / "manifest.json").write_text("{oops")
    with pytest.raises(DataError, match=r"manifest.json: unreadable manifest \("):
        TokenShards(tmp_path)
    (tmp_path / "manifest.json").write_text("[1]")
    refused("{m}: expected format llmctl-tokens version 1, found list version None")
    _manifest(tmp_path, {}, version=2)
    refused("{m}: expected format llmctl-tokens version 1, found llmctl-tokens version 2")
    _manifest(tmp_path, {"train": {"tokens": 3, "shards": [shard]}}, dtype="int32")
    refused("{m}: unsupported dtype int32")
    _manifest(tmp_path, {"train": {"tokens": 3, "shards": [{**shard, "file": "../x.bin"}]}})
    refused("{m}: '../x.bin' points outside {d}; refusing to read it")
    _manifest(tmp_path, {"train": {"tokens": 3, "shards": [shard]}}, tokenizer="../tok")
    refused("{m}: '../tok' points outside {d}; refusing to read it")
    _manifest(tmp_path, {"train": {"tokens": 3, "shards": [{**shard, "file": "gone.bin"}]}})
    refused(f"{tmp_path / 'gone.bin'}: shard listed in the manifest is missing")
    _manifest(tmp_path, {"train": {"tokens": 3, "shards": [{**shard, "tokens": 2}]}})
    refused(f"{tmp_path / 'train-00000.bin'}: 6 bytes, the manifest says 2 uint16 tokens (4 bytes)")
    _manifest(tmp_path, {"train": {"tokens": 3, "shards": [shard]}}, dtype="uint32")
    refused(f"{tmp_path / 'train-00000.bin'}: 6 bytes, the manifest says 3 uint32 tokens (12 bytes)")
    _manifest(tmp_path, {"train": {"tokens": 3, "shards": [{"tokens": 3}]}})
    refused("{m}: malformed manifest (KeyError: 'file')")
    _manifest(tmp_path, {"train": {"tokens": 3, "shards": [shard]}})
    assert TokenShards(tmp_path).split("train")[0].tolist() == [1, 2, 3]


def test_token_shards_properties(tmp_path):
    from llmctl.core.data import TokenShards

    (tmp_path / "train-00000.bin").write_bytes(b"\1\0\2\0")
    (tmp_path / "train-00001.bin").write_bytes(b"")
    shards = [{"file": "train-00000.bin", "tokens": 2, "documents": 1},
              {"file": "train-00001.bin", "tokens": 0, "documents": 0}]
    _manifest(tmp_path, {"train": {"tokens": 2, "documents": 1, "shards": shards},
                         "val": {"tokens": 0, "documents": 0, "shards": []}}, tokenizer="tokenizer")
    data = TokenShards(tmp_path)
    assert data.splits == ["train"] and data.num_tokens() == 2 and data.num_tokens("val") == 0
    assert data.num_tokens("test") == 0 and data.vocab_size == 500 and data.tokenizer_hash == "h"
    assert [m.tolist() for m in data.split("train")] == [[1, 2]]  # the empty shard is left out
    assert data.split("val") == []
    with pytest.raises(UsageError) as err:
        data.split("test")
    assert str(err.value) == f"{tmp_path}: no 'test' split (have: train, val)"
    assert data.tokenizer_dir is None  # named, but no tokenizer.json there
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "tokenizer.json").write_text("{}")
    assert data.tokenizer_dir == tmp_path / "tokenizer"
    data.check_tokenizer(None, 500)  # no hash to compare; a vocabulary exactly as large
    with pytest.raises(UsageError) as err:
        data.check_tokenizer("other", 500)
    assert str(err.value) == (f"{tmp_path} was encoded with tokenizer h, but the tokenizer in use is other; "
                              "re-encode with llmctl tokenize encode --tokenizer …")
    with pytest.raises(UsageError) as err:
        data.check_tokenizer("h", 499)
    assert str(err.value) == f"{tmp_path} holds ids of a 500-token vocabulary; the model has only 499"
    _manifest(tmp_path, {"train": {"tokens": 2, "documents": 1, "shards": shards[:1]}})
    assert TokenShards(tmp_path).tokenizer_dir is None


# -- round 10: the properties' edges ------------------------------------------------------------


def test_the_hash_covers_the_normalizer_and_the_pre_tokenizer():
    from tokenizers import Tokenizer

    from llmctl.core.tokenizer import Tok

    tok = _train("bytelevel", 300)
    data = json.loads(tok.inner.to_str())
    assert len(tok.hash) == 16 and tok.hash == Tok(Tokenizer.from_str(json.dumps(data)), {}).hash
    hashes = {tok.hash}
    for key, value in (("normalizer", {"type": "NFC"}), ("pre_tokenizer", {"type": "Whitespace"})):
        changed = Tok(Tokenizer.from_str(json.dumps({**data, key: value})), tok.config)
        hashes.add(changed.hash)
    assert len(hashes) == 3


def test_named_chat_templates_take_the_default_one():
    from llmctl.core.tokenizer import Tok

    tok = _train("bytelevel", 300)
    named = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    assert Tok(tok.inner, {"chat_template": named}).chat_template == "D"
    assert Tok(tok.inner, {"chat_template": named[:1]}).chat_template is None  # no default among them
    assert Tok(tok.inner, {"chat_template": "S"}).chat_template == "S"


def test_a_split_of_one_token_is_a_split(tmp_path):
    from llmctl.core.data.shards import TokenShards

    _manifest(tmp_path, {"train": {"tokens": 1, "shards": []}, "val": {"tokens": 0, "shards": []}})
    assert TokenShards(tmp_path).splits == ["train"]
