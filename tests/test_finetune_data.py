"""SFT data: record formats, loss masks derived from the rendered chat template, packing, errors."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
import transformers  # noqa: E402

from llmctl.core.data.sft import SFTEncoder, encode_files, pack, read_records  # noqa: E402
from llmctl.errors import DataError  # noqa: E402

# chatml with transformers' {% generation %} markers around what an assistant turn adds: renders as chatml
MARKED = ("{% for message in messages %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
          "{% generation %}{{ message['content'] + '<|im_end|>' + '\\n' }}{% endgeneration %}"
          "{% else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
          "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
CHAT = [
    {"role": "system", "content": "You add numbers."},
    {"role": "user", "content": "two plus two?"},
    {"role": "assistant", "content": "four"},
    {"role": "user", "content": "and three plus five?"},
    {"role": "assistant", "content": "eight, I think"},
]


@pytest.fixture(scope="module")
def tokdir(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["two plus two is four; three plus five is eight, I think. You add numbers."] * 5,
                            trainer)
    out = tmp_path_factory.mktemp("tok")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    hf.chat_template = MARKED
    hf.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tok(tokdir):
    from llmctl.core.tokenizer import load_tokenizer

    return load_tokenizer(tokdir)


def test_assistant_masks_equal_transformers_generation_markers(tok, tokdir):
    hf = transformers.AutoTokenizer.from_pretrained(tokdir)
    for turns in (CHAT[:3], CHAT):
        ref = hf.apply_chat_template(turns, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        ours = SFTEncoder(tok)({"messages": turns}, "x")
        assert ours.ids == ref["input_ids"]
        assert ours.mask == [bool(m) for m in ref["assistant_masks"]]
        learned = tok.decode([i for i, m in zip(ours.ids, ours.mask) if m])
        assert learned == "".join(m["content"] + "<|im_end|>\n" for m in turns if m["role"] == "assistant")


def test_the_builtin_chatml_template_gives_the_same_mask(tok):
    from llmctl.core.chat_templates import resolve_template

    marked = SFTEncoder(tok)({"messages": CHAT}, "x")
    plain = SFTEncoder(tok, template=resolve_template("chatml")[0])({"messages": CHAT}, "x")
    assert plain == marked and sum(plain.mask) > 0
    everything = SFTEncoder(tok, train_on="all")({"messages": CHAT}, "x")
    assert everything.ids == plain.ids and everything.mask == [False] + [True] * (len(plain.ids) - 1)


def test_prompt_completion_and_text_records(tok):
    enc = SFTEncoder(tok)
    pair = enc({"prompt": "two plus two?", "completion": " four"}, "x")
    prompt = tok.encode("two plus two?")
    assert pair.ids == prompt + tok.encode(" four") + [tok.eos_id]
    assert pair.mask == [False] * len(prompt) + [True] * (len(pair.ids) - len(prompt))
    conversational = enc({"prompt": CHAT[:4], "completion": CHAT[4:]}, "x")
    full = enc({"messages": CHAT}, "x")
    assert conversational.ids == full.ids
    first_answer = sum(full.mask) - sum(conversational.mask)
    assert first_answer == len(tok.encode("four<|im_end|>\n"))  # only the completion's turn is learned
    text = enc({"text": "three plus five"}, "x")
    assert text.ids[-1] == tok.eos_id and text.mask == [False] + [True] * (len(text.ids) - 1)


def test_malformed_records_name_file_and_line(tmp_path, tok):
    enc = SFTEncoder(tok)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"prompt": "p"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: a record needs 'text'"):
        encode_files([bad], enc)
    bad.write_text('{"text": "ok"}\n\n{"messages": [{"role": "user"}]}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:3: messages\[0\] must be an object"):
        encode_files([bad], enc)
    bad.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: invalid JSON"):
        encode_files([bad], enc)
    array = tmp_path / "records.json"
    array.write_text(json.dumps([{"text": "a"}, {"text": 3}]))
    with pytest.raises(DataError, match=r"records\.json\[1\]: field 'text' is int"):
        encode_files([array], enc)
    assert [w for w, _ in read_records(array)] == [f"{array}[0]", f"{array}[1]"]


def test_packing_keeps_documents_apart_and_counts_truncation(tok):
    enc = SFTEncoder(tok)
    examples = [enc({"prompt": "two plus two?", "completion": " four" * k}, "x") for k in (1, 2, 1, 30)]
    rows, stats = pack(examples, 24, pad_id=0)
    ids, mask, docs = rows.unbind(1)
    assert stats.truncated == 1 and stats.examples == 4 and stats.dropped == 0
    assert stats.loss_tokens == int(mask.sum())
    first = examples[0]
    assert ids[0, : len(first.ids)].tolist() == first.ids and docs[0, : len(first.ids)].eq(0).all()
    assert docs[0, len(first.ids)] == 1  # the next example: its own document
    padded, pstats = pack(examples, 24, pad_id=0, packing=False)
    assert len(padded) == 4 and pstats.rows == 4 and stats.rows < 4 and stats.fill > pstats.fill
    with pytest.raises(DataError, match="no example has a token to learn"):
        pack([enc({"prompt": "two plus two? " * 10, "completion": "four"}, "x")], 8, pad_id=0)
