"""Encoder-only checkpoints in eval: pseudo-log-likelihoods equal a direct masking loop over
transformers' BertForMaskedLM; pseudo-perplexity and multiple choice through the CLI."""

from __future__ import annotations

import json
import math

import pytest

import torch
import transformers

TEXT = "the quick brown fox jumps over the lazy dog . a stitch in time saves nine .\n" * 6


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    out = tmp_path_factory.mktemp("tiny-bert")
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator([TEXT, "question answer sentence"] * 3,
                            trainers.WordPieceTrainer(vocab_size=120, special_tokens=specials, show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
                                                       special_tokens=[(t, tok.token_to_id(t)) for t in ("[CLS]", "[SEP]")])
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "cls_token": "[CLS]", "sep_token": "[SEP]",
        "mask_token": "[MASK]", "pad_token": "[PAD]", "unk_token": "[UNK]", "model_max_length": 40}))
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64, max_position_embeddings=40)
    model = transformers.BertForMaskedLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def hf_bert(bert_dir):
    return transformers.BertForMaskedLM.from_pretrained(bert_dir).eval()


@pytest.fixture(scope="module")
def lm(bert_dir):
    from llmctl.core.evaluate.runner import load_scorer

    return load_scorer(bert_dir, device="cpu", dtype=torch.float32, batch_size=5)


def hf_pll(model, framed: list[int], positions: list[int], mask_id: int) -> float:
    """Sum of log P(framed[p] | the rest) with framed[p] masked, one transformers pass each."""
    total = 0.0
    for p in positions:
        ids = torch.tensor([framed])
        ids[0, p] = mask_id
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, p]
        total += torch.log_softmax(logits, -1)[framed[p]].item()
    return total


def test_pseudo_log_likelihood_equals_masking_loop(lm, hf_bert):
    from llmctl.core.evaluate.masked import MaskedScoringModel

    assert isinstance(lm, MaskedScoringModel) and lm.max_length == 40 - 3
    rows = [lm.encode("the quick brown fox jumps"), lm.encode("a stitch in time saves nine ."), lm.encode("dog")]
    n = [3, 7, 1]
    scores = lm.score_rows(rows, n)
    for row, k, score in zip(rows, n, scores):
        framed = [*lm.prefix, *row, *lm.suffix]
        expected = hf_pll(hf_bert, framed, [1 + len(row) - k + j for j in range(k)], lm.mask_id)
        assert score.tokens == k and score.logprob == pytest.approx(expected, rel=1e-4, abs=1e-4)
    assert lm.prefix == [lm.tokenizer.inner.token_to_id("[CLS]")] and lm.suffix == [lm.tokenizer.inner.token_to_id("[SEP]")]


def test_multiple_choice_by_pseudo_log_likelihood(lm, hf_bert, tmp_path, llmctl, bert_dir):
    rows = [{"question": "the quick brown", "options": ["fox", "time saves nine", "dog"], "label": 0},
            {"question": "a stitch in time", "options": ["saves nine", "the lazy"], "label": 0},
            {"question": "over the lazy", "options": ["nine", "dog", "quick fox"], "label": 1}]
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "mc.yaml").write_text('type: multiple_choice\ndataset: {path: mc.jsonl}\nprompt: "{{ question }}"\n'
                                      "choices: options\ngold: label\n")
    acc = []
    for row in rows:
        lls = []
        for option in row["options"]:
            context, continuation = lm.encode_pair(row["question"], " " + option)
            framed = [*lm.prefix, *context, *continuation, *lm.suffix]
            lls.append(hf_pll(hf_bert, framed, [1 + len(context) + j for j in range(len(continuation))], lm.mask_id))
        acc.append(float(max(range(len(lls)), key=lls.__getitem__) == row["label"]))
    r = llmctl("eval", bert_dir, "--task", tmp_path / "mc.yaml", "--no-record", "--json")
    assert r.code == 0, r.stderr
    assert r.json()["results"][str(bert_dir)]["mc"]["acc"] == pytest.approx(sum(acc) / len(acc))


def test_pseudo_perplexity_through_the_cli(lm, hf_bert, tmp_path, llmctl, bert_dir):
    from llmctl.core.evaluate.perplexity import strided_windows

    (tmp_path / "text.txt").write_text(TEXT)
    r = llmctl("eval", bert_dir, "--task", "perplexity", "--data", tmp_path / "text.txt", "--max-length", 16,
               "--stride", 16, "--no-record", "--json")
    assert r.code == 0, r.stderr
    result = r.json()["results"][str(bert_dir)]["perplexity"]
    nll = tokens = 0
    for row, n in strided_windows([lm.encode(TEXT)], 16, 16):
        framed = [*lm.prefix, *row, *lm.suffix]
        nll -= hf_pll(hf_bert, framed, [1 + len(row) - n + j for j in range(n)], lm.mask_id)
        tokens += n
    assert result["tokens"] == tokens
    assert result["perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-4)


def test_generation_tasks_refuse_an_encoder(llmctl, bert_dir):
    r = llmctl("eval", bert_dir, "--task", "copy", "--limit", 2, "--no-record")
    assert r.code == 2 and "needs a causal language model" in r.stderr
