"""Tokenizers (every algorithm), chat templates, and the `llmctl tokenize` commands."""

from __future__ import annotations

import io
import json
import sys

import numpy as np
import pytest

from llmctl.core.tokenizer import ALGORITHMS, TrainSpec, load_tokenizer, train_tokenizer
from llmctl.errors import DataError, UsageError

MULTILINGUAL = [
    "The quick brown fox jumps over the lazy dog.",
    "Ünïcödé: straße, café, naïve — «quotes» and ‘single’.",
    "日本語のテキストです。中文文本也在这里。",
    "Привет, мир! Как дела?",
    "مرحبا بالعالم",
    "emoji 🙂🚀, tabs\tand  double  spaces",
    "line one\nline two",
]
CORPUS = MULTILINGUAL * 8
UNSEEN = "ქართული ენა 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \x00\x7f"  # scripts and controls the corpus lacks
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "  Hello!  "},
    {"role": "user", "content": "Bye", "name": None},
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One small tokenizer per algorithm, saved: {algo: directory}."""
    root = tmp_path_factory.mktemp("toks")
    out = {}
    for algo in ALGORITHMS.names():
        tok = train_tokenizer(TrainSpec(algo=algo, vocab_size=400, min_frequency=1), [CORPUS])
        tok.save(root / algo)
        out[algo] = root / algo
    return out


@pytest.mark.parametrize("algo", ["bytelevel", "bpe", "bpe_bytes", "unigram", "char", "wordpiece"])
def test_round_trip_multilingual(trained, algo):
    tok = load_tokenizer(trained[algo])
    for text in MULTILINGUAL:
        decoded = tok.decode(tok.encode(text))
        if algo == "wordpiece":  # BERT pre-tokenization drops whitespace and splits punctuation
            assert "".join(decoded.split()) == "".join(text.split())
        else:
            assert decoded == text
    assert tok.unk_id is None or tok.unk_id not in tok.encode("".join(MULTILINGUAL))
    if algo in ("bytelevel", "bpe_bytes"):  # never an unknown token, even for unseen scripts
        assert tok.unk_id not in tok.encode(UNSEEN) and tok.decode(tok.encode(UNSEEN)) == UNSEEN
    if algo == "bpe_bytes":  # bytes come right after the special tokens, as in Llama 2
        first = min(tok.inner.token_to_id(f"<0x{b:02X}>") for b in range(256))
        assert [tok.inner.token_to_id(f"<0x{b:02X}>") for b in range(256)] == list(range(first, first + 256))
        assert tok.vocab_size == 400


def test_algorithm_conventions(trained):
    wp = load_tokenizer(trained["wordpiece"])
    assert any(t.startswith("##") for t in wp.inner.get_vocab())
    ids = wp.encode("Hi there", add_special_tokens=True)
    assert ids[0] == wp.inner.token_to_id("[CLS]") and ids[-1] == wp.eos_id == wp.inner.token_to_id("[SEP]")
    assert wp.mask_id is not None and wp.pad_id is not None
    uni = load_tokenizer(trained["unigram"])
    assert "▁" in "".join(uni.inner.encode("hello world").tokens)
    for algo in ("bytelevel", "bpe", "unigram", "char"):
        tok = load_tokenizer(trained[algo])
        assert tok.token("eos") == "<|endoftext|>" and tok.mask_id is not None and tok.pad_id is not None
        assert {"<|im_start|>", "<|im_end|>"} <= set(tok.inner.get_vocab())
    char = load_tokenizer(trained["char"])
    assert all(len(t) == 1 or t.startswith("<") for t in char.inner.get_vocab())


@pytest.mark.parametrize("algo", ["bytelevel", "bpe", "bpe_bytes", "unigram", "char", "wordpiece"])
def test_transformers_loads_with_same_ids(trained, algo):
    import transformers
    hf = transformers.AutoTokenizer.from_pretrained(str(trained[algo]))
    tok = load_tokenizer(trained[algo])
    for text in [*MULTILINGUAL, UNSEEN]:
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text)
        assert hf.encode(text) == tok.encode(text, add_special_tokens=True)
        ids = tok.encode(text)
        assert hf.decode(ids) == tok.decode(ids)
    assert (hf.eos_token_id, hf.bos_token_id, hf.pad_token_id) == (tok.eos_id, tok.bos_id, tok.pad_id)
    assert hf.mask_token_id == tok.mask_id and len(hf) == tok.vocab_size


def test_hash_is_stable_and_content_based(trained, tmp_path):
    tok = load_tokenizer(trained["bpe"])
    assert tok.hash == load_tokenizer(trained["bpe"] / "tokenizer.json").hash
    import transformers
    transformers.AutoTokenizer.from_pretrained(str(trained["bpe"])).save_pretrained(tmp_path / "resaved")
    resaved = load_tokenizer(tmp_path / "resaved")
    assert resaved.hash == tok.hash and resaved.chat_template == tok.chat_template is not None
    assert len({load_tokenizer(d).hash for d in trained.values()}) == len(trained)


@pytest.mark.parametrize("template", ["chatml", "llama3"])
def test_chat_template_matches_transformers(trained, tmp_path, template):
    import transformers
    tok = train_tokenizer(TrainSpec(algo="bytelevel", vocab_size=300, chat_template=template), [CORPUS])
    tok.save(tmp_path / "tok")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    mine = load_tokenizer(tmp_path / "tok")
    for add in (True, False):
        rendered = mine.apply_chat_template(MESSAGES, add_generation_prompt=add)
        assert rendered == hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=add)
    # the template's control tokens are single special tokens
    ids = mine.encode(mine.apply_chat_template(MESSAGES))
    turn_end = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>"}[template]
    assert ids.count(mine.inner.token_to_id(turn_end)) == len(MESSAGES)
    assert mine.inner.token_to_id(turn_end) in mine.stop_ids


def test_file_template_uses_special_tokens(trained, tmp_path):
    import transformers
    (tmp_path / "t.jinja").write_text(
        "{% for m in messages %}{{ bos_token }}{{ m.role | upper }}: {{ m.content }}{{ eos_token }}\n"
        "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    )
    tok = load_tokenizer(trained["wordpiece"])
    assert tok.set_chat_template(str(tmp_path / "t.jinja")) == []
    tok.save(tmp_path / "wp")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "wp"))
    expected = hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert load_tokenizer(tmp_path / "wp").apply_chat_template(MESSAGES) == expected
    assert expected.startswith("[CLS]SYSTEM: You are terse.[SEP]\n")


def test_train_errors():
    with pytest.raises(UsageError, match="did you mean 'bpe'"):
        train_tokenizer(TrainSpec(algo="bpee", vocab_size=300), [CORPUS])
    with pytest.raises(UsageError, match="smaller than the alphabet.*256 bytes"):
        train_tokenizer(TrainSpec(algo="bytelevel", vocab_size=100), [CORPUS])
    for algo in ("bpe", "wordpiece", "char", "unigram"):
        with pytest.raises(UsageError, match="smaller than the alphabet"):
            train_tokenizer(TrainSpec(algo=algo, vocab_size=40, min_frequency=1), [CORPUS])
    with pytest.raises(DataError, match="empty corpus"):
        train_tokenizer(TrainSpec(algo="unigram", vocab_size=300), iter([]))
    with pytest.raises(UsageError, match="unknown chat template"):
        train_tokenizer(TrainSpec(algo="bpe", vocab_size=300, chat_template="nope"), [CORPUS])
    with pytest.raises(UsageError, match="--normalize"):
        train_tokenizer(TrainSpec(algo="bpe", vocab_size=300, normalize="nfx"), [CORPUS])


def test_normalization_options():
    tok = train_tokenizer(TrainSpec(algo="bpe", vocab_size=300, lowercase=True, normalize="nfkc"), [CORPUS])
    assert tok.decode(tok.encode("ＡＢＣ Straße")) == "abc straße"


# -- the command ------------------------------------------------------------------------------
def write_corpus(path, docs):
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def tokdir(llmctl, tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt", CORPUS)
    r = llmctl("tokenize", "train", corpus, "-o", tmp_path / "tok", "--algo", "bytelevel", "--vocab-size", 320,
            "--special-tokens", "<|tool|>,<|x|>", "--json")
    assert r.code == 0, r.stderr
    info = r.json()
    assert info["vocab_size"] == 320 and info["documents"] == len(CORPUS) and info["bytes_per_token"] > 1
    tok = load_tokenizer(tmp_path / "tok")
    assert tok.encode("a <|tool|> b").count(tok.inner.token_to_id("<|tool|>")) == 1
    return tmp_path / "tok"


def test_cli_train_encode_memmap_matches_direct_encode(llmctl, tokdir, tmp_path, monkeypatch):
    docs = [f"{text} #{i}" for i, text in enumerate(MULTILINGUAL * 30)]
    corpus = write_corpus(tmp_path / "docs.txt", docs)
    out = tmp_path / "data"
    r = llmctl("tokenize", "encode", corpus, "--tokenizer", tokdir, "-o", out, "--val-fraction", "0.2",
            "--shard-tokens", "500", "--json", "--seed", "3")
    assert r.code == 0, r.stderr
    from llmctl.core.data import TokenShards, in_val

    tok = load_tokenizer(tokdir)
    shards = TokenShards(out)
    shards.check_tokenizer(tok.hash, tok.vocab_size)
    m = shards.manifest
    assert m["dtype"] == "uint16" and m["eos_id"] == tok.eos_id and len(m["splits"]["train"]["shards"]) > 2
    for split, wanted in (("train", False), ("val", True)):
        ids = [i for d in docs if in_val(d, 0.2, 3) == wanted for i in tok.encode(d) + [tok.eos_id]]
        assert np.concatenate(shards.split(split)).tolist() == ids
        assert m["splits"][split]["documents"] == sum(in_val(d, 0.2, 3) == wanted for d in docs) > 0
    assert r.json()["splits"]["val"]["tokens"] == shards.num_tokens("val")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt", "data", "docs.txt", "tok"]

    # existing output: refused without --force (exit 2), replaced with it
    assert llmctl("tokenize", "encode", corpus, "--tokenizer", tokdir, "-o", out).code == 2
    r = llmctl("tokenize", "encode", corpus, "--tokenizer", tokdir, "-o", out, "--force", "--no-append-eos", "--json")
    assert r.code == 0 and r.json()["tokens"] == sum(len(tok.encode(d)) for d in docs)
    quiet = llmctl("--quiet", "tokenize", "encode", corpus, "--tokenizer", tokdir, "-o", out, "--force")
    assert quiet.code == 0 and quiet.stdout == quiet.stderr == ""  # --quiet silences the summary table

    # a shard of another tokenizer is refused by training's check
    other = train_tokenizer(TrainSpec(algo="bpe", vocab_size=300), [CORPUS])
    with pytest.raises(UsageError, match="encoded with tokenizer"):
        TokenShards(out).check_tokenizer(other.hash, other.vocab_size)

    # decode from a shard, from arguments and from stdin
    r = llmctl("tokenize", "decode", "--tokenizer", tokdir, "--shard", out / "train-00000.bin", "--limit", 0)
    assert r.code == 0 and r.stdout.startswith(docs[0].split("#")[0][:10])
    ids = tok.encode("Привет, мир! 🙂")
    r = llmctl("tokenize", "decode", "--tokenizer", tokdir, *ids)
    assert r.stdout == "Привет, мир! 🙂\n"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(json.dumps(ids).encode())))
    r = llmctl("tokenize", "decode", "--tokenizer", tokdir, "--json")
    assert r.json() == {"text": "Привет, мир! 🙂", "tokens": len(ids)}
    assert llmctl("tokenize", "decode", "--tokenizer", tokdir, "99999").code == 2


def test_cli_count_inspect_set_template(llmctl, tokdir, tmp_path):
    a = write_corpus(tmp_path / "a.txt", MULTILINGUAL)
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in MULTILINGUAL[:3]))
    r = llmctl("tokenize", "count", a, tmp_path / "b.jsonl", "--tokenizer", tokdir, "--json")
    assert r.code == 0, r.stderr
    tok = load_tokenizer(tokdir)
    files, total = r.json()["files"], r.json()["total"]
    assert [f["tokens"] for f in files] == [sum(len(tok.encode(t)) for t in MULTILINGUAL[:n]) for n in (7, 3)]
    assert total["tokens"] == sum(f["tokens"] for f in files) and total["documents"] == 10

    r = llmctl("tokenize", "inspect", "naïve 日本", "--tokenizer", tokdir, "--json")
    out = r.json()
    assert out["ids"] == tok.encode("naïve 日本") and "".join(out["pieces"]) == "naïve 日本"
    assert out["bytes"] == len("naïve 日本".encode())
    r = llmctl("tokenize", "inspect", "hello world", "--tokenizer", tokdir)
    assert r.code == 0 and "bytes/token" in r.stderr

    r = llmctl("tokenize", "set-template", tokdir, "llama3", "--json")
    assert r.code == 0 and r.json()["added_tokens"] == ["<|begin_of_text|>", "<|start_header_id|>",
                                                        "<|end_header_id|>", "<|eot_id|>"]
    again = load_tokenizer(tokdir)
    assert again.apply_chat_template(MESSAGES[:2]).startswith("<|begin_of_text|><|start_header_id|>system")
    assert again.vocab_size == tok.vocab_size + 4 and again.hash != tok.hash
    (tokdir / "config.json").write_text(json.dumps({"vocab_size": again.vocab_size}))
    (tmp_path / "bad.jinja").write_text("{% for m in messages %}")
    r = llmctl("tokenize", "set-template", tokdir, tmp_path / "bad.jinja")
    assert r.code == 2 and "syntax error" in r.stderr
    (tmp_path / "t.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    assert llmctl("tokenize", "set-template", tokdir, tmp_path / "t.jinja").code == 0
    assert load_tokenizer(tokdir).apply_chat_template(MESSAGES[:2]) == "You are terse.Hi there"


def test_cli_bad_input(llmctl, tokdir, tmp_path):
    good = write_corpus(tmp_path / "good.txt", CORPUS)
    cases = [
        (["train", tmp_path / "missing.txt", "-o", tmp_path / "t1", "--vocab-size", 300], 1, "no such file"),
        (["train", good, "-o", tmp_path / "t2", "--vocab-size", 300, "--algo", "sentencepiece"], 2,
         "unknown tokenizer algorithm"),
        (["train", good, "-o", tmp_path / "t3", "--vocab-size", 50, "--algo", "bpe"], 2, "smaller than the alphabet"),
        (["train", good, "-o", tokdir, "--vocab-size", 300], 2, "already exists"),
        (["encode", good, "--tokenizer", tmp_path / "nowhere", "-o", tmp_path / "d1"], 2, "no such file"),
        (["encode", good, "--tokenizer", tokdir, "-o", tmp_path / "d2", "--val-fraction", 1.5], 2, "--val-fraction"),
    ]
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    cases += [
        (["train", tmp_path / "empty.txt", "-o", tmp_path / "t4", "--vocab-size", 300], 1, "empty corpus"),
        (["encode", tmp_path / "empty.txt", "--tokenizer", tokdir, "-o", tmp_path / "d3"], 1, "empty corpus"),
    ]
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\nnot json\n')
    cases.append((["encode", tmp_path / "bad.jsonl", "--tokenizer", tokdir, "-o", tmp_path / "d4"], 1,
                  "bad.jsonl:2: invalid JSON"))
    for args, code, message in cases:
        r = llmctl("tokenize", *args)
        assert r.code == code and message in r.stderr, (args, r.code, r.stderr)
        assert len([line for line in r.stderr.splitlines() if "error" in line]) == 1
    leftovers = {p.name for p in tmp_path.iterdir()}
    assert leftovers == {"corpus.txt", "good.txt", "empty.txt", "bad.jsonl", "tok"}


def test_cli_invalid_utf8_is_reported_not_fatal(llmctl, tokdir, tmp_path):
    (tmp_path / "bad.txt").write_bytes("héllo wörld\n\n".encode() + b"broken \xff\xfe bytes\n")
    r = llmctl("tokenize", "encode", tmp_path / "bad.txt", "--tokenizer", tokdir, "-o", tmp_path / "d", "--json")
    assert r.code == 0 and r.json()["invalid_utf8"] == 2 and r.json()["documents"] == 2
    assert "invalid UTF-8" in r.stderr


def test_set_template_refuses_to_outgrow_a_checkpoint(tmp_path):
    from llmctl.core.tokenizer import set_template_in_dir

    tok = train_tokenizer(TrainSpec(algo="bpe", vocab_size=300, chat_template="llama3"), [CORPUS])
    tok.save(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps({"vocab_size": tok.vocab_size}))
    with pytest.raises(UsageError, match="would make the vocabulary"):
        set_template_in_dir(tmp_path / "ckpt", "chatml")
    assert load_tokenizer(tmp_path / "ckpt").apply_chat_template(MESSAGES[:1]).startswith("<|begin_of_text|>")
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps({"vocab_size": tok.vocab_size + 8}))
    assert set_template_in_dir(tmp_path / "ckpt", "chatml") == ["<|im_start|>", "<|im_end|>"]
