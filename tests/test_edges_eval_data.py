"""Edges of the evaluation wrappers and the data encoders that the parity tests miss (found by
mutation testing): the scoring model's windows, truncation, batching, shared contexts, greedy
flags and progress against transformers and lm-eval's own window functions."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import transformers

from _recorder import Recorder
from conftest import tiny_llama
from test_finetune_data import tokdir  # noqa: F401  (a byte-level BPE with a chat template)
from test_masked_eval import bert_dir, hf_bert  # noqa: F401  (the tiny BERT checkpoint)
from llmctl.core.evaluate.lm import ScoringModel, rolling_windows

TEXT = (
    "The quick brown fox jumps over the lazy dog. A stitch in time saves nine.\n"
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer\n"
) * 3


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("tiny-llama"), [TEXT] * 3, vocab=300, context=64)


@pytest.fixture(scope="module")
def hf_model(hf_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def ours(hf_dir):
    from llmctl.core.model.io import load_model

    return load_model(hf_dir)[0]


@pytest.fixture(scope="module")
def tok(hf_dir):
    from llmctl.core.tokenizer import load_tokenizer

    return load_tokenizer(hf_dir)


class _Bar:
    """A progress bar that records its calls."""

    def __init__(self):
        self.calls = []

    def advance(self, amount=1):
        self.calls.append(("advance", amount))

    def update(self, **fields):
        self.calls.append(("update", fields))

    def advanced(self) -> float:
        return sum(c[1] for c in self.calls if c[0] == "advance")


def _hf_span(model, row: list[int], n: int) -> tuple[float, bool]:
    """log P and all-argmax of the last `n` tokens of `row`, by the HF model over the whole row."""
    ids = torch.tensor([row])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
    targets = ids[0, 1:]
    picked = logprobs[torch.arange(len(targets)), targets][-n:]
    return picked.sum().item(), bool((logprobs.argmax(-1) == targets)[-n:].all())


def _greedy_tokens(model, start: list[int], n: int) -> list[int]:
    ids = torch.tensor([start])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(start):].tolist()


# -- core/evaluate/lm.py ---------------------------------------------------------------------------


@pytest.mark.parametrize("max_length", [1, 2, 5, 64])
def test_rolling_windows_equal_lm_evals(max_length):
    """lm-eval's `get_rolling_token_windows(context_len=1)` + `make_disjoint_window`, every length
    around the window's edges."""
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    for length in [0, 1, 2, max_length - 1, max_length, max_length + 1, 2 * max_length, 2 * max_length + 3, 150]:
        tokens = list(range(100, 100 + length))
        expected = [make_disjoint_window(w) for w in get_rolling_token_windows(tokens, 7, max_length, 1)]
        assert [tuple(map(list, w)) for w in rolling_windows(tokens, 7, max_length)] == \
               [tuple(map(list, w)) for w in expected]


@pytest.mark.parametrize("model_name", ["hf_model", "ours"])
def test_rolling_loglikelihood_greedy_flags_and_progress(request, hf_model, tok, model_name):
    """A document is greedy when every window is (HF's argmax per window): a greedy continuation of
    BOS is, one whose second window is not is not, an empty one is; the bar's total is the
    windows, advanced to it."""
    lm = ScoringModel(request.getfixturevalue(model_name), tok, max_length=16, batch_size=4)
    greedy = _greedy_tokens(hf_model, [tok.bos_id], 20)
    docs = [greedy[:12], greedy[:18] + [(greedy[0] + 1) % 300] * 3, []]
    bar = _Bar()
    scores = lm.loglikelihood_rolling(docs, bar)
    windows = [rolling_windows(d, tok.bos_id, 16) for d in docs]
    assert bar.calls[0] == ("update", {"total": 3}) and bar.advanced() == 3
    flags = [[_hf_span(hf_model, ctx + cont, len(cont)) for ctx, cont in w] for w in windows]
    assert [[f[1] for f in fs] for fs in flags] == [[True], [True, False], []]
    for doc, fs, score in zip(docs, flags, scores):
        assert score.tokens == len(doc)
        assert score.logprob == pytest.approx(sum(f[0] for f in fs), rel=1e-5, abs=1e-6)
    assert [s.greedy for s in scores] == [True, False, True]


def test_prefix_token_is_bos_else_eos_else_refused():
    from llmctl.errors import CheckpointError

    def lm(bos, eos):
        return ScoringModel(torch.nn.Identity(), SimpleNamespace(bos_id=bos, eos_id=eos), max_length=8)

    assert lm(5, 6).prefix_token == 5 and lm(0, 6).prefix_token == 0 and lm(None, 6).prefix_token == 6
    with pytest.raises(CheckpointError, match="^the tokenizer has neither a BOS nor an EOS token to condition"):
        lm(None, None).prefix_token


def test_batch_defaults_and_what_a_model_offers(hf_model, ours, tok):
    """16 rows / 1,024 tokens per pass on CPU, 128 / 65,536 elsewhere; an llmctl decoder shares
    contexts and runs its head through oneDNN, an HF model or an encoder does not."""
    from llmctl.core.evaluate.lm import OneDNNLinear

    cpu = ScoringModel(torch.nn.Identity(), tok, max_length=8)
    assert (cpu.batch_size, cpu.max_batch_tokens, cpu.device, cpu.seed) == (16, 1024, torch.device("cpu"), 1234)
    assert ScoringModel(torch.nn.Identity(), tok, max_length=8, seed=7).seed == 7
    other = ScoringModel(torch.nn.Identity(), tok, max_length=8, device="meta")
    assert (other.batch_size, other.max_batch_tokens) == (128, 65536)
    given = ScoringModel(torch.nn.Identity(), tok, max_length=8, batch_size=3, max_batch_tokens=50)
    assert (given.batch_size, given.max_batch_tokens, given.max_length) == (3, 50, 8)
    lm = ScoringModel(ours, tok, max_length=8)
    assert lm.can_share and lm.has_head and isinstance(lm.projection, OneDNNLinear)
    hf = ScoringModel(hf_model, tok, max_length=8)
    assert not hf.can_share and not hf.has_head and hf.projection is None
    encoder = SimpleNamespace(eval=lambda: encoder, make_cache=None, head=None, cfg=SimpleNamespace(is_causal=False))
    assert not ScoringModel(encoder, tok, max_length=8).can_share and not ScoringModel(encoder, tok, max_length=8).has_head
    no_cfg = SimpleNamespace(eval=lambda: no_cfg, make_cache=None, head=None)
    assert not ScoringModel(no_cfg, tok, max_length=8).has_head


def test_onednn_head_with_bias_and_the_cases_it_leaves_to_torch():
    from llmctl.core.evaluate.lm import OneDNNLinear, onednn_projection

    torch.manual_seed(0)
    linear = torch.nn.Linear(8, 5)
    x = torch.randn(2, 3, 8)
    for lin in (linear, torch.nn.Linear(8, 5, bias=False)):
        projection = onednn_projection(lin, torch.device("cpu"))
        assert isinstance(projection, OneDNNLinear)
        assert torch.allclose(projection(x), lin(x), atol=1e-6) and projection(x).shape == (2, 3, 5)

    class Sub(torch.nn.Linear):
        pass

    assert onednn_projection(linear, torch.device("meta")) is None
    assert onednn_projection(Sub(8, 5), torch.device("cpu")) is None
    assert onednn_projection(torch.nn.Linear(8, 5).double(), torch.device("cpu")) is None
    assert onednn_projection(torch.nn.Linear(8, 5).to(torch.bfloat16), torch.device("cpu")) is None


def test_only_the_scored_positions_reach_the_head_and_it_runs_through_onednn(ours, hf_model, tok):
    """`logits_to_keep`: the last (width − length + n) positions of a batch, the most any row needs;
    an llmctl model's head through the oneDNN copy; same scores as HF."""
    lm = ScoringModel(ours, tok, max_length=32, batch_size=8)
    ids = tok.encode(TEXT)
    rows, n = [ids[:20], ids[5:15], ids[30:42]], [3, 6, 2]
    calls, projected = [], []
    features, projection = lm.features, lm.projection
    lm.features = lambda input_ids, keep=0: calls.append((input_ids.shape[1], keep)) or features(input_ids, keep)
    lm.projection = lambda x: projected.append(x.shape[0]) or projection(x)
    scores = lm.score_rows(rows, n)
    assert calls == [(19, 20 - 10 + 6)] and projected == [3 * 6]  # every row padded to the longest span
    for row, k, score in zip(rows, n, scores):
        assert score.logprob == pytest.approx(_hf_span(hf_model, row, k)[0], rel=1e-5)


@pytest.mark.parametrize("model_name", ["hf_model", "ours"])
def test_loglikelihood_prefix_truncation_and_refusals(request, hf_model, tok, model_name):
    """An empty context is the prefix token; rows are cut on the left to max_length + 1 tokens
    and a continuation longer than that is scored in part; an empty continuation is refused."""
    from llmctl.errors import DataError

    lm = ScoringModel(request.getfixturevalue(model_name), tok, max_length=32, batch_size=4)
    ids = tok.encode(TEXT)
    assert len(ids) > 80
    requests = [([], ids[:5]), (ids[:80], ids[80:85]), (ids[:10], ids[10:50]), (ids[:27], ids[27:33]),
                (ids[:28], ids[28:34])]
    rows = [[tok.bos_id] + ids[:5], ids[52:85], ids[17:50], ids[:33], ids[1:34]]
    n = [5, 5, 32, 6, 6]
    bar = _Bar()
    scores = lm.loglikelihood(requests, bar)
    assert bar.advanced() == len(requests)
    for row, k, score in zip(rows, n, scores):
        logprob, greedy = _hf_span(hf_model, row, k)
        assert (score.tokens, score.greedy) == (k, greedy)
        assert score.logprob == pytest.approx(logprob, rel=1e-5)
    with pytest.raises(DataError, match=r"^a continuation \(choice\) encodes to no tokens$"):
        lm.loglikelihood([(ids[:3], [])])


@pytest.mark.parametrize("model_name", ["hf_model", "ours"])
def test_score_rows_greedy_flags_spans_and_bounds(request, hf_model, tok, model_name):
    """Rows of one span (a view) and of different spans (gathered): HF's sums and argmax flags;
    `greedy=False` gives None; a row of max_length + 2 tokens is refused, max_length + 1 is not."""
    lm = ScoringModel(request.getfixturevalue(model_name), tok, max_length=24, batch_size=8)
    greedy = _greedy_tokens(hf_model, [tok.bos_id], 24)
    ids = tok.encode(TEXT)
    same = [[tok.bos_id] + greedy[:11], ids[:12], [tok.bos_id] + greedy[:5] + ids[:6]]
    mixed = [[tok.bos_id] + greedy[:24], ids[:7], [tok.bos_id] + greedy[:3] + ids[40:45], ids[3:20]]
    for rows, n in [(same, [4, 4, 4]), (same, [11, 5, 1]), (mixed, [24, 3, 2, 16]), (mixed, [1, 1, 1, 1])]:
        bar = _Bar()
        scores = lm.score_rows(rows, n, bar)
        assert bar.advanced() == len(rows)
        expected = [_hf_span(hf_model, row, k) for row, k in zip(rows, n)]
        assert [s.greedy for s in scores] == [e[1] for e in expected]
        assert [s.tokens for s in scores] == n
        assert [s.logprob for s in scores] == pytest.approx([e[0] for e in expected], rel=1e-5)
        assert [s.greedy for s in lm.score_rows(rows, n, greedy=False)] == [None] * len(rows)
    assert {e[1] for e in [_hf_span(hf_model, row, 4) for row in same]} == {True, False}
    with pytest.raises(ValueError, match=r"^row of 26 tokens exceeds max_length \+ 1 = 25$"):
        lm.score_rows([ids[:26]], [3])


def test_share_batches_keep_contexts_and_continuations_within_the_token_budget(tok):
    """Groups are taken longest context first; a chunk ends when one more context or the padded
    continuations (rows x longest) would pass `max_batch_tokens` (40 here; equal is allowed)."""
    lm = ScoringModel(torch.nn.Identity(), tok, max_length=64, max_batch_tokens=40)

    def chunks(groups, n_scored):
        return [[len(prefix) for prefix, _ in chunk] for chunk in lm._share_batches(groups, n_scored)]

    a, b, c, d, e = [0] * 10, [0] * 12, [0] * 8, [0] * 3, [1] * 3
    n_scored = [3, 5, 2, 2, 2, 9, 1, 1, 20]
    groups = [(a, [0, 1]), (b, [2, 3, 4]), (c, [5]), (d, [6, 7]), (e, [8])]
    assert chunks(groups, n_scored) == [[12, 10], [8, 3], [3]]
    # at the budget exactly: two contexts of 20 (2 x 20), ten rows of 4 (10 x 4)
    assert chunks([([0] * 20, [0]), ([1] * 20, list(range(1, 10))), ([2], [10])], [4] * 11) == [[20, 20], [1]]
    assert chunks([([0] * 20, [0]), ([1] * 21, [1])], [1, 1]) == [[21], [20]]
    # the next chunk counts only its own rows and longest continuation
    assert chunks([([0] * 9, [0]), ([1] * 8, [1]), ([2] * 7, [2, 3, 4]), ([3] * 6, [5])],
                  [30, 1, 4, 4, 4, 10]) == [[9], [8, 7], [6]]
    assert chunks([([0] * 5, [0]), ([1] * 4, [1, 2])], [20, 1, 1]) == [[5], [4]]  # 3 rows x 20 > 40
    assert list(lm._share_batches([], [])) == []


def test_contexts_are_shared_from_the_threshold_of_saved_positions(ours, hf_model, tok):
    """(choices − 1) × context length ≥ `share_min_tokens` shares the context's KV cache (scores equal
    HF's); one token fewer saved runs whole rows; an HF model never shares."""
    ids = tok.encode(TEXT)
    context = ids[:10]
    requests = [(context, ids[10:13]), (context, ids[20:22]), (context, [ids[40]]), (ids[:4], ids[4:6])]
    for model, threshold, shared in [(ours, 20, [3]), (ours, 21, []), (ours, 0, [3, 1]), (hf_model, 0, [])]:
        lm = ScoringModel(model, tok, max_length=64)
        calls = []
        score_shared = lm._score_shared
        lm._score_shared = lambda prefixes, conts: calls.extend(map(len, conts)) or score_shared(prefixes, conts)
        bar = _Bar()
        scores = lm.loglikelihood(requests, bar, share_min_tokens=threshold)
        assert sorted(calls, reverse=True) == shared and bar.advanced() == len(requests)
        for (ctx, cont), score in zip(requests, scores):
            logprob, greedy = _hf_span(hf_model, ctx + cont, len(cont))
            assert (score.tokens, score.greedy) == (len(cont), greedy)
            assert score.logprob == pytest.approx(logprob, rel=1e-5)


# -- core/evaluate/masked.py -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def bert_tok(bert_dir):  # noqa: F811
    from llmctl.core.tokenizer import load_tokenizer

    return load_tokenizer(bert_dir)


@pytest.fixture(scope="module")
def bert_ours(bert_dir):  # noqa: F811
    from llmctl.core.model.io import load_model

    return load_model(bert_dir)[0]


def _hf_masked(model, framed: list[int], positions: list[int], mask_id: int) -> list[tuple[float, bool]]:
    """(log P, is argmax) of framed[p] with framed[p] masked, one transformers pass each."""
    out = []
    for p in positions:
        ids = torch.tensor([framed])
        ids[0, p] = mask_id
        with torch.no_grad():
            logprobs = torch.log_softmax(model(input_ids=ids).logits[0, p], -1)
        out.append((logprobs[framed[p]].item(), int(logprobs.argmax()) == framed[p]))
    return out


def _masked_argmax(model, framed: list[int], p: int, mask_id: int) -> int:
    ids = torch.tensor([framed])
    ids[0, p] = mask_id
    with torch.no_grad():
        return int(model(input_ids=ids).logits[0, p].argmax())


def _check(lm, hf, rows, n, scores):
    for row, k, score in zip(rows, n, scores):
        framed = [*lm.prefix, *row, *lm.suffix]
        expected = _hf_masked(hf, framed, [len(lm.prefix) + len(row) - k + j for j in range(k)], lm.mask_id)
        assert (score.tokens, score.greedy) == (k, all(e[1] for e in expected))
        assert score.logprob == pytest.approx(sum(e[0] for e in expected), rel=1e-4, abs=1e-4)


@pytest.mark.parametrize("model_name", ["hf_bert", "bert_ours"])
def test_masked_rows_batched_across_rows_with_progress_and_greedy_flags(request, hf_bert, bert_tok,  # noqa: F811
                                                                         model_name):
    """Masked copies batched 4 at a time across rows: HF's masking loop, argmax flags (a token
    set to the model's prediction is greedy), a bar advanced by the rows each batch finishes."""
    from llmctl.core.evaluate.masked import MaskedScoringModel

    lm = MaskedScoringModel(request.getfixturevalue(model_name), bert_tok, max_length=12, batch_size=4)
    cls, sep = bert_tok.inner.token_to_id("[CLS]"), bert_tok.inner.token_to_id("[SEP]")
    assert (lm.prefix, lm.suffix, lm.max_length, lm.mask_id) == ([cls], [sep], 9, bert_tok.mask_id)
    assert lm.has_head is (model_name == "bert_ours")
    dog = lm.encode("over the lazy dog")
    dog[-1] = _masked_argmax(hf_bert, [cls, *dog, sep], len(dog), lm.mask_id)
    rows = [lm.encode("the quick brown fox jumps"), dog, lm.encode("a stitch in time saves nine ."), dog]
    n = [3, 1, 6, 2]  # 12 masked copies: rows 0 and 1 end in the first batch, none in the second
    bar = _Bar()
    scores = lm.score_rows(rows, n, bar)
    assert bar.calls == [("advance", 2), ("advance", 0), ("advance", 2)]
    _check(lm, hf_bert, rows, n, scores)
    hits = [h for _, h in _hf_masked(hf_bert, [cls, *dog, sep], [len(dog) - 1, len(dog)], lm.mask_id)]
    assert hits == [False, True]  # the last row: one greedy token of two is not greedy
    assert [s.greedy for s in scores] == [False, True, False, False]
    assert [s.greedy for s in lm.score_rows(rows, n, greedy=False)] == [None] * 4


@pytest.mark.parametrize("model_name", ["hf_bert", "bert_ours"])
def test_masked_loglikelihood_cuts_rows_on_the_left_and_rolls_windows(request, hf_bert, bert_tok,  # noqa: F811
                                                                      model_name):
    """Rows of at most max_length + 1 tokens (10 here), a continuation longer than that scored in
    part, no prefix token for an empty context; rolling windows of max_length tokens, each
    document greedy only when every window is."""
    from llmctl.core.evaluate.masked import MaskedScoringModel
    from llmctl.errors import DataError

    lm = MaskedScoringModel(request.getfixturevalue(model_name), bert_tok, max_length=12, batch_size=5)
    ids = lm.encode("the quick brown fox jumps over the lazy dog . a stitch in time saves nine .")
    assert len(ids) > 14
    requests = [(ids[:8], ids[8:11]), ([], ids[:4]), (ids[:2], ids[2:14]), (ids[:6], ids[6:7])]
    bar = _Bar()
    scores = lm.loglikelihood(requests, bar)
    assert bar.advanced() == 4
    _check(lm, hf_bert, [ids[1:11], ids[:4], ids[4:14], ids[:7]], [3, 4, 10, 1], scores)
    with pytest.raises(DataError, match=r"^a continuation \(choice\) encodes to no tokens$"):
        lm.loglikelihood([(ids[:3], [])])

    cls, sep = lm.prefix[0], lm.suffix[0]
    alone = [_masked_argmax(hf_bert, [cls, 0, sep], 1, lm.mask_id)]  # a one-token window, greedy
    docs = [ids[:9] + alone, alone, ids[:14], []]
    bar = _Bar()
    scores = lm.loglikelihood_rolling(docs, bar)
    assert bar.calls[0] == ("update", {"total": 5}) and bar.advanced() == 5
    windows = [[d[i:i + 9] for i in range(0, len(d), 9)] for d in docs]
    for doc, w, score in zip(docs, windows, scores):
        flags = [f for row in w for f in _hf_masked(hf_bert, [cls, *row, sep], range(1, len(row) + 1), lm.mask_id)]
        assert score.tokens == len(doc)
        assert score.logprob == pytest.approx(sum(f[0] for f in flags), rel=1e-4, abs=1e-4)
        assert score.greedy is all(f[1] for f in flags)
    assert [s.greedy for s in scores] == [False, True, False, True]


def test_masked_defaults_and_refusals(hf_bert, bert_tok):  # noqa: F811
    """16 masked copies per pass on CPU, 128 elsewhere; a tokenizer without a mask token is refused;
    one without special tokens frames nothing."""
    from llmctl.core.evaluate.masked import MaskedScoringModel
    from llmctl.errors import CheckpointError

    assert MaskedScoringModel(hf_bert, bert_tok, max_length=12).batch_size == 16
    assert MaskedScoringModel(hf_bert, bert_tok, max_length=12, device="meta").batch_size == 128
    assert MaskedScoringModel(hf_bert, bert_tok, max_length=12, batch_size=3).batch_size == 3
    lm = MaskedScoringModel(hf_bert, bert_tok, max_length=12)
    assert lm.encode("the lazy dog") == bert_tok.encode("the lazy dog", add_special_tokens=False) != \
           bert_tok.encode("the lazy dog", add_special_tokens=True)
    head_only = SimpleNamespace(eval=lambda: head_only, head=None)
    assert not lm.has_head and not MaskedScoringModel(head_only, bert_tok, max_length=12).has_head
    bare = SimpleNamespace(mask_id=4, encode=lambda text, add_special_tokens=True: [7, 8])
    lm = MaskedScoringModel(hf_bert, bare, max_length=12)
    assert (lm.prefix, lm.suffix, lm.max_length) == ([], [], 11)
    framed = SimpleNamespace(mask_id=4, encode=lambda text, add_special_tokens=True:  # HF's default: framed
                             [1, 1, 7, 8, 2, 2, 2] if add_special_tokens else [7, 8])
    lm = MaskedScoringModel(hf_bert, framed, max_length=12)
    assert (lm.prefix, lm.suffix, lm.max_length, lm.encode("a")) == ([1, 1], [2, 2, 2], 6, [7, 8])
    with pytest.raises(CheckpointError, match="^an encoder-only model needs a tokenizer with a mask token to be"):
        MaskedScoringModel(hf_bert, SimpleNamespace(mask_id=None), max_length=12)


# -- core/evaluate/pairwise.py ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def reward_dir(hf_dir, tmp_path_factory):
    """A transformers LlamaForSequenceClassification (one score) with the tiny Llama's tokenizer."""
    import shutil

    out = tmp_path_factory.mktemp("tiny-reward")
    config = transformers.AutoConfig.from_pretrained(hf_dir)
    config.num_labels = 1
    torch.manual_seed(1)
    model = transformers.LlamaForSequenceClassification(config)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8.0)
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(hf_dir / name, out / name)
    return out


PAIRS = [
    {"prompt": "The quick brown", "chosen": " fox jumps", "rejected": " dog sat"},
    {"prompt": "To be, or not to be, that is", "chosen": " the question", "rejected": " the question"},  # a tie
    {"prompt": "A stitch in time " * 12, "chosen": " saves nine.", "rejected": " nine saves."},  # cut on the left
    {"prompt": "whether 'tis nobler", "chosen": " in the mind", "rejected": " to suffer the slings"},
    {"prompt": "The lazy", "chosen": " dog.", "rejected": " fox."},
    {"prompt": "Over the", "chosen": " lazy dog", "rejected": " quick brown fox jumps"},
]


def _pairwise_task(tmp_path, pairs, extra=""):
    import json

    from llmctl.core.evaluate.tasks import load_task

    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    (tmp_path / "pairs.yaml").write_text(f"type: pairwise\nname: pairs\ndataset: {{path: pairs.jsonl}}\n{extra}")
    task = load_task(str(tmp_path / "pairs.yaml"))
    task.report, task.samples_log = Recorder(), []
    return task


def test_pairwise_reward_model_scores_equal_transformers_classifier(reward_dir, tok, tmp_path):
    """The reward model reads prompt (with special tokens) + answer + EOS, its last 64 tokens,
    batched 4 rows at a time with right padding: HF's sequence scores row by row; a tie is no win."""
    from llmctl.core.evaluate.runner import load_scorer

    lm = load_scorer(reward_dir, device="cpu", dtype=torch.float32, batch_size=4)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(reward_dir, dtype=torch.float32).eval()
    task = _pairwise_task(tmp_path, [{**p, "group": "ab"[i % 2]} for i, p in enumerate(PAIRS)], "group_by: group\n")
    result = task.run(lm)

    def score(prompt, answer):
        row = (tok.encode(prompt, add_special_tokens=True) + tok.encode(answer) + [tok.eos_id])[-64:]
        with torch.no_grad():
            return hf(torch.tensor([row])).logits[0, 0].item()

    assert len(tok.encode(PAIRS[2]["prompt"])) > 64
    expected = [(score(p["prompt"], p["chosen"]), score(p["prompt"], p["rejected"])) for p in PAIRS]
    wins = [float(c > r) for c, r in expected]
    assert 0 < sum(wins) < len(wins) - 1 and wins[1] == 0.0
    assert result["acc"] == pytest.approx(sum(wins) / len(wins)) and result["examples"] == len(PAIRS)
    by_group = [sum(wins[g::2]) / len(wins[g::2]) for g in (0, 1)]
    assert (result["acc/a"], result["acc/b"]) == pytest.approx(by_group)
    assert result["acc_macro"] == pytest.approx(sum(by_group) / 2)
    for record, p, (c, r), win in zip(task.samples_log, PAIRS, expected, wins):
        assert record["chosen_score"] == pytest.approx(c, rel=1e-4, abs=1e-4)
        assert record["rejected_score"] == pytest.approx(r, rel=1e-4, abs=1e-4)
        assert record["acc"] == win and record["doc"].endswith(f":{PAIRS.index(p) + 1}")
    assert task.report.calls == [("progress", "pairs", 12, "req")] + [("advance", 4)] * 3


def test_pairwise_reward_model_without_a_pad_token_scores_each_row_at_its_own_end(reward_dir, tok, tmp_path):
    """No pad token: a batch cannot be right-padded (the score is read at the last position), so
    rows of different lengths are scored apart — transformers' scores, which refuse a batch."""
    from llmctl.core.evaluate.runner import load_scorer

    lm = load_scorer(reward_dir, device="cpu", dtype=torch.float32, batch_size=4)
    lm.model.cfg.pad_token_id = None
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(reward_dir, dtype=torch.float32).eval()
    task = _pairwise_task(tmp_path, PAIRS[:2])
    task.run(lm)
    for record, p in zip(task.samples_log, PAIRS):
        for key in ("chosen", "rejected"):
            row = tok.encode(p["prompt"], add_special_tokens=True) + tok.encode(p[key]) + [tok.eos_id]
            with torch.no_grad():
                expected = hf(torch.tensor([row])).logits[0, 0].item()
            assert record[f"{key}_score"] == pytest.approx(expected, rel=1e-4, abs=1e-4)


def test_pairwise_language_model_compares_log_likelihoods(ours, hf_model, tok, tmp_path):
    """A language model: log P(answer | prompt) of each answer (HF's sums), with a one-shot example
    showing the chosen answer; a field that is not a string is refused with its line."""
    from llmctl.errors import DataError

    lm = ScoringModel(ours, tok, max_length=64, batch_size=4)
    task = _pairwise_task(tmp_path, PAIRS, "num_fewshot: 1\nfewshot_sampler: first_n\n")
    result = task.run(lm)
    shot = PAIRS[0]["prompt"] + PAIRS[0]["chosen"] + "\n\n"
    contexts = [PAIRS[1]["prompt"] + PAIRS[1]["chosen"] + "\n\n" if i == 0 else shot for i in range(len(PAIRS))]
    wins = []
    for record, p, before in zip(task.samples_log, PAIRS, contexts):
        scores = []
        for key in ("chosen", "rejected"):
            context, continuation = lm.encode_pair(before + p["prompt"], p[key])
            row = (context + continuation)[-65:]
            scores.append(_hf_span(hf_model, row, len(continuation))[0])
        assert (record["chosen_score"], record["rejected_score"]) == pytest.approx(scores, rel=1e-5)
        wins.append(float(scores[0] > scores[1]))
    assert result["acc"] == pytest.approx(sum(wins) / len(wins)) and 0 < sum(wins) < len(wins)
    (bar, *steps) = task.report.steps()  # one bar, advanced by each batch
    assert bar[2:] == (12, "req") and all(kind == "advance" for kind, _ in steps) and sum(n for _, n in steps) == 12

    task = _pairwise_task(tmp_path, PAIRS[:1] + [{"prompt": "x", "chosen": "y", "rejected": 3}])
    with pytest.raises(DataError, match=r"pairs.jsonl:2: field 'rejected' must be a string$"):
        task.run(lm)


def test_documents_are_encoded_without_special_tokens(bert_tok):
    """A tokenizer that frames text ([CLS] … [SEP], or a BOS) does not frame contexts and choices."""
    lm = ScoringModel(torch.nn.Identity(), bert_tok, max_length=8)
    assert lm.encode("the lazy dog") == bert_tok.encode("the lazy dog", add_special_tokens=False)
    assert lm.encode("the lazy dog") != bert_tok.encode("the lazy dog", add_special_tokens=True)
    framing = SimpleNamespace(encode=lambda text, add_special_tokens=True: [0] * add_special_tokens + [ord(text)])
    assert ScoringModel(torch.nn.Identity(), framing, max_length=8).encode("a") == [97]


@pytest.mark.parametrize("chunk, rows", [(3 * 300, 2), (300, 2)])
def test_head_makes_at_most_a_chunk_of_logits_at_a_time(ours, tok, monkeypatch, chunk, rows):
    """HEAD_CHUNK logits per head call (vocabulary 300 wide, not the hidden size), at least
    HEAD_CHUNK_ROWS rows: 3 rows, then 2, at a time."""
    import llmctl.core.evaluate.lm as lm_module

    monkeypatch.setattr(lm_module, "HEAD_CHUNK", chunk)
    monkeypatch.setattr(lm_module, "HEAD_CHUNK_ROWS", rows)
    lm = ScoringModel(ours, tok, max_length=32)
    ids = tok.encode(TEXT)
    projection, sizes = lm.projection, []
    lm.projection = lambda x: sizes.append(x.shape[0]) or projection(x)
    lm.score_rows([ids[:12], ids[4:14]], [5, 6])
    step = max(rows, chunk // 300)
    assert sizes == [step] * (12 // step) + [12 % step] * bool(12 % step)


# -- core/data/encode.py ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bytelevel():
    from llmctl.core.tokenizer import TrainSpec, train_tokenizer

    return train_tokenizer(TrainSpec(algo="bytelevel", vocab_size=300), [[TEXT]])


def _corpus_file(tmp_path):
    long = "".join(f"line {i} of a long document\n" for i in range(12))
    docs = ["short one", long.rstrip("\n"), "naïve ✓ two", "three"] + [f"doc {i} " * (i % 5 + 1) for i in range(20)]
    path = tmp_path / "c.txt"
    path.write_text("\n\n".join(docs) + "\n")
    return path


def test_encode_corpus_equals_encoding_each_document(bytelevel, tmp_path, monkeypatch):
    """Shards hold every document's ids (EOS after a whole document, not after a piece of a
    long one), in order, each document — all its pieces — in the split its first piece's
    content and the seed choose (the first document's too), each counted in the shard where it
    ends; the manifest records it all; each batch is reported, encoded in this process."""
    import json
    import time

    import numpy as np

    import llmctl.core.data.encode as encode_module
    from llmctl.core.data import Corpus, TokenShards, encode_corpus, in_val
    from llmctl.core.data.split import Continued
    from llmctl.core.tokenizer import load_tokenizer

    tok, path = bytelevel, _corpus_file(tmp_path)
    pieces = list(Corpus([str(path)], max_doc_chars=100).documents())
    assert any(type(p) is Continued for p in pieces)
    seed = next(s for s in range(100) if in_val(pieces[0], 0.3, s))
    expected, route, continues = {False: [], True: []}, False, False
    ends = {False: [], True: []}
    for piece in pieces:
        route = route if continues else in_val(piece, 0.3, seed)
        continues = type(piece) is Continued
        expected[route] += tok.encode(piece) + ([] if continues else [tok.eos_id])
        ends[route] += [] if continues else [len(expected[route])]
    assert ends[True] and ends[False]
    corpus = Corpus([str(path)], max_doc_chars=100)
    reported, encoded = [], []
    ids_of = encode_module._ids_of
    monkeypatch.setattr(encode_module, "_ids_of", lambda tokenizer, batch: encoded.append(1) or ids_of(tokenizer, batch))
    out = tmp_path / "out"
    out.mkdir()
    began = time.perf_counter()
    result = encode_corpus(corpus, tok, out, val_fraction=0.3, seed=seed, shard_tokens=64, batch_chars=120,
                           on_batch=reported.append)
    assert 0 < result.seconds <= time.perf_counter() - began
    shards = TokenShards(out)
    for split, wanted in (("train", False), ("val", True)):
        assert np.concatenate(shards.split(split)).tolist() == expected[wanted]
        summary = result.manifest["splits"][split]
        assert summary["documents"] == len(ends[wanted]) and summary["tokens"] == len(expected[wanted])
        starts = np.cumsum([0] + [s["tokens"] for s in summary["shards"]])
        assert [s["documents"] for s in summary["shards"]] == [
            sum(a < e <= b for e in ends[wanted]) for a, b in zip(starts, starts[1:])]
        assert all(s["tokens"] == 64 for s in summary["shards"][:-1])
    assert len(result.manifest["splits"]["train"]["shards"]) > 2
    assert len(encoded) == len(reported)
    assert reported == [corpus.stats] * len(list(Corpus([str(path)], max_doc_chars=100).batches(120)))
    stats = corpus.stats
    manifest = {k: v for k, v in result.manifest.items() if k != "splits"}
    assert manifest == {
        "format": "llmctl-tokens", "version": 1, "dtype": "uint16", "tokenizer_hash": tok.hash, "vocab_size": 300,
        "eos_id": tok.eos_id, "bos_id": tok.bos_id, "append_eos": True, "val_fraction": 0.3, "seed": seed,
        "doc_split": "blank", "sources": [str(path)], "bytes": path.stat().st_size,
        "text_bytes": stats.text_bytes, "invalid_utf8": 0, "tokenizer": "tokenizer"}
    assert stats.bytes == path.stat().st_size and result.stats is stats and result.seconds > 0
    assert json.loads((out / "manifest.json").read_text()) == result.manifest
    assert load_tokenizer(out / "tokenizer").hash == tok.hash

    out = tmp_path / "plain"
    out.mkdir()
    plain = encode_corpus(Corpus([str(path)], max_doc_chars=100), tok, out, append_eos=False, batch_chars=1)
    assert np.concatenate(TokenShards(out).split("train")).tolist() == [i for p in pieces for i in tok.encode(p)]
    assert plain.manifest["splits"]["train"]["documents"] == len(ends[False]) + len(ends[True])
    assert plain.manifest["splits"]["val"] == {"tokens": 0, "documents": 0, "shards": []}
    assert (plain.manifest["append_eos"], plain.manifest["val_fraction"], plain.manifest["seed"]) == (False, 0.0, 0)


def test_worker_processes_keep_many_batches_in_order(bytelevel, tmp_path, monkeypatch):
    """Two workers over 16 batches (more than the 2 × workers in flight): the same shards as one
    process, and this process encodes nothing itself."""
    import numpy as np

    import llmctl.core.data.encode as encode_module
    from llmctl.core.data import Corpus, TokenShards, encode_corpus

    paths = []
    for i in range(8):
        paths.append(tmp_path / f"{i}.txt")
        paths[-1].write_text(f"file {i} first document\n\nfile {i} second " + "word " * i + "\n")
    splits = {}
    for workers in (1, 2):
        encoded = []
        ids_of = encode_module._ids_of
        monkeypatch.setattr(encode_module, "_ids_of", lambda tok, batch: encoded.append(1) or ids_of(tok, batch))
        out = tmp_path / f"w{workers}"
        out.mkdir()
        encode_corpus(Corpus([str(p) for p in paths]), bytelevel, out, val_fraction=0.3, batch_chars=1, workers=workers)
        assert len(encoded) == (16 if workers == 1 else 0)
        splits[workers] = [np.concatenate(TokenShards(out).split(s)).tolist() for s in ("train", "val")]
    assert splits[1] == splits[2] and all(splits[1])


def test_corpus_is_encoded_without_the_tokenizers_special_tokens(bert_tok, tmp_path):
    """A tokenizer whose template frames text ([CLS] … [SEP]): documents and counts without the frame."""
    import numpy as np

    from llmctl.core.data import Corpus, TokenShards, encode_corpus
    from llmctl.core.data.encode import count_tokens

    path = tmp_path / "c.txt"
    docs = ["the quick brown fox", "a stitch in time saves nine"]
    path.write_text("\n\n".join(docs) + "\n")
    (tmp_path / "out").mkdir()
    encode_corpus(Corpus([str(path)]), bert_tok, tmp_path / "out", append_eos=False)
    plain = [i for d in docs for i in bert_tok.encode(d, add_special_tokens=False)]
    assert np.concatenate(TokenShards(tmp_path / "out").split("train")).tolist() == plain
    assert count_tokens(Corpus([str(path)]), bert_tok)[0]["tokens"] == len(plain)


def test_encode_corpus_refusals(bytelevel, tmp_path):
    from llmctl.core.data import Corpus, encode_corpus
    from llmctl.errors import DataError, UsageError

    path = _corpus_file(tmp_path)
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "blank.txt").write_text("")
    (tmp_path / "one.txt").write_text("one document\n")

    def run(*sources, **kw):
        out = tmp_path / f"out{len(list(tmp_path.iterdir()))}"
        out.mkdir()
        return encode_corpus(Corpus([str(s) for s in sources or [path]]), kw.pop("tok", bytelevel), out, **kw)

    for fraction in (-0.01, 1.0):
        with pytest.raises(UsageError, match=rf"^--val-fraction {fraction}: must be in \[0, 1\)$"):
            run(val_fraction=fraction)
    assert run(val_fraction=0.0).manifest["splits"]["val"]["documents"] == 0
    no_eos = SimpleNamespace(eos_id=None)
    with pytest.raises(UsageError, match="^the tokenizer has no eos token; use --no-append-eos or set eos_token$"):
        run(tok=no_eos)
    with pytest.raises(DataError, match=rf"^empty corpus: no text in {tmp_path / 'empty.txt'}, {tmp_path / 'blank.txt'}$"):
        run(tmp_path / "empty.txt", tmp_path / "blank.txt")
    assert run(tmp_path / "one.txt").manifest["splits"]["train"]["documents"] == 1
    with pytest.raises(DataError, match=r"^--val-fraction 0.9999999 left no training documents$"):
        run(val_fraction=0.9999999)


def test_val_membership_is_crc32_of_the_content_below_the_fraction():
    """`zlib.crc32(utf-8 bytes, seed mod 2**32) < fraction · 2**32`; lone surrogates are hashed, not refused."""
    import zlib

    from llmctl.core.data import in_val

    docs = [f"document {i} ✓" for i in range(200)] + ["a\ud800b"]
    for seed in (0, 7, -1, 2**32 + 7):
        for fraction in (0.0, 0.1, 0.5, 1.0):
            for doc in docs:
                crc = zlib.crc32(doc.encode("utf-8", "surrogatepass"), seed % 2**32)
                assert in_val(doc, fraction, seed) == (fraction > 0 and crc < fraction * 2**32)
    assert in_val("x", 1.0, 0) and not in_val("x", 0.0, 0)
    crc = zlib.crc32(b"x")
    assert in_val("x", (crc + 1) / 2**32, 0) and not in_val("x", crc / 2**32, 0)


def test_count_tokens_per_file(bytelevel, tmp_path):
    """Tokens, documents, bytes and text bytes of each file (not cumulative), a report per batch."""
    import json

    from llmctl.core.data import Corpus
    from llmctl.core.data.encode import count_tokens

    a = _corpus_file(tmp_path)
    b = tmp_path / "b.jsonl"
    b.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["naïve ✓", "one more", "x"]))
    reported = []
    corpus = Corpus([str(a), str(b)])
    rows = count_tokens(corpus, bytelevel, on_batch=reported.append, batch_chars=50)
    expected = []
    for path in (a, b):
        alone = Corpus([str(path)])
        docs = list(alone.documents())
        expected.append({"file": str(path), "documents": len(docs), "bytes": path.stat().st_size,
                         "text_bytes": alone.stats.text_bytes,
                         "tokens": sum(len(bytelevel.encode(d)) for d in docs)})
    assert rows == expected and reported == [corpus.stats] * len(reported) and len(reported) >= 3


# -- core/data/sft.py, core/data/preference.py -----------------------------------------------------


@pytest.fixture(scope="module")
def chat_tok(tokdir):  # noqa: F811
    from llmctl.core.tokenizer import load_tokenizer

    return load_tokenizer(tokdir)


def test_sft_records_their_masks_and_refusals(chat_tok, tmp_path):
    """Each record form's ids and loss mask by hand, `train_on=all`, no EOS without one; every
    refusal's message with its place."""
    import json

    from llmctl.core.data.sft import SFTEncoder, encode_files, read_records
    from llmctl.errors import DataError

    tok = chat_tok
    prompt, answer = tok.encode("two plus two?", add_special_tokens=True), tok.encode(" four")
    pair = {"prompt": "two plus two?", "completion": " four"}
    everything = SFTEncoder(tok, train_on="all")(pair, "x")
    assert everything.ids == prompt + answer + [tok.eos_id]
    assert everything.mask == [False] + [True] * (len(everything.ids) - 1)
    no_eos = SimpleNamespace(eos_id=None, chat_template=None, encode=tok.encode)
    example = SFTEncoder(no_eos)(pair, "x")
    assert example.ids == prompt + answer and example.mask == [False] * len(prompt) + [True] * len(answer)
    text = SFTEncoder(no_eos)({"text": "three plus five"}, "x")
    assert text.ids == tok.encode("three plus five", add_special_tokens=True)
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "four"}]
    assert SFTEncoder(tok, train_on="all")({"messages": chat[:1]}, "x").mask[0] is False

    def refused(record, message, **kw):
        with pytest.raises(DataError, match=message):
            SFTEncoder(kw.pop("tokenizer", tok), **kw)(record, "f.jsonl:3")

    with pytest.raises(DataError, match=r"^train_on must be one of completion, all, not 'prompt'$"):
        SFTEncoder(tok, train_on="prompt")
    refused({}, r"^f.jsonl:3: a record needs 'text', 'prompt' and 'completion', or 'messages' \(it has no fields\)$")
    refused({"b": 1, "a": 2}, r"\(it has a, b\)$")
    refused({"prompt": chat[:1], "completion": "four"},
            r"^f.jsonl:3: field 'completion' must be a non-empty list of messages$")
    refused({"prompt": "hi", "completion": chat[1:]}, r"^f.jsonl:3: field 'prompt' must be a non-empty list")
    refused({"messages": []}, r"^f.jsonl:3: field 'messages' must be a non-empty list of messages$")
    refused({"messages": [{"role": 1, "content": "x"}]}, r"messages\[0\] must be an object with string 'role'")
    refused({"messages": [chat[0], {"role": "assistant", "content": 2}]},
            r"^f.jsonl:3: messages\[1\] must be an object with string 'role' and 'content'$")
    refused({"messages": chat[:1]}, r"^f.jsonl:3: no assistant message to learn$")
    refused({"prompt": chat[:1], "completion": chat[:1]}, r"^f.jsonl:3: no assistant message to learn$")
    refused({"messages": chat}, r"^f.jsonl:3: chat records need a chat template: the tokenizer has none "
            r"\(give chat_template=NAME\|FILE\)$", tokenizer=no_eos)
    refused({"messages": chat}, r"^f.jsonl:3: chat template: ", template="{% for m in messages %}{{ m.x.y }}{% endfor %}")
    refused({"messages": chat}, r"^f.jsonl:3: the chat template does not render this conversation turn by turn "
            r"\(turn 2 changes what precedes it\), so assistant turns cannot be masked; use train_on=all$", template="{{ messages | length }}{% for m in messages %}"
            "{{ m.content }}{% endfor %}")
    refused({"prompt": 3, "completion": "x"}, r"^f.jsonl:3: field 'prompt' is int, not text$")
    refused({"prompt": "x", "completion": 3}, r"^f.jsonl:3: field 'completion' is int, not text$")

    (tmp_path / "bad.json").write_text("[{")
    with pytest.raises(DataError, match=rf"^{tmp_path / 'bad.json'}: not a JSON array of records \("):
        list(read_records(tmp_path / "bad.json"))
    (tmp_path / "obj.json").write_text(json.dumps({"text": "a"}))
    with pytest.raises(DataError, match=r"obj.json: expected a JSON array of records$"):
        list(read_records(tmp_path / "obj.json"))
    (tmp_path / "list.json").write_text(json.dumps([{"text": "a"}, ["b"]]))
    with pytest.raises(DataError, match=r"list.json\[1\]: expected a JSON object$"):
        list(read_records(tmp_path / "list.json"))
    (tmp_path / "latin.json").write_bytes(b"[\xff]")
    with pytest.raises(DataError, match=r"latin.json: not a JSON array of records"):
        list(read_records(tmp_path / "latin.json"))
    (tmp_path / "a.jsonl").write_text("")
    (tmp_path / "b.json").write_text("[]")
    with pytest.raises(DataError, match=rf"^{tmp_path / 'a.jsonl'}, {tmp_path / 'b.json'}: no records$"):
        encode_files([tmp_path / "a.jsonl", tmp_path / "b.json"], SFTEncoder(tok))


def test_sft_frames_prompts_and_texts_but_not_completions_or_chats(bert_tok):
    """The tokenizer's special tokens ([CLS] … [SEP]) around a text and a prompt, not around the
    completion or a rendered chat (the template writes its own)."""
    from llmctl.core.data.sft import SFTEncoder

    tok = bert_tok
    text = SFTEncoder(tok)({"text": "the lazy dog"}, "x")
    assert text.ids == tok.encode("the lazy dog", add_special_tokens=True) != tok.encode("the lazy dog")
    pair = SFTEncoder(tok)({"prompt": "the quick", "completion": " brown fox"}, "x")
    assert pair.ids == tok.encode("the quick", add_special_tokens=True) + tok.encode(" brown fox")
    chat = SFTEncoder(tok, train_on="all", template="{% for m in messages %}{{ m.content }} {% endfor %}")
    rendered = chat({"messages": [{"role": "user", "content": "the"}, {"role": "assistant", "content": "dog"}]}, "x")
    assert rendered.ids == tok.encode("the dog ")


def test_sft_fit_and_pack_by_hand():
    """Rows of `length`: packed while the next example fits (a full row is allowed), padding a
    document of its own with `pad_id` and no loss; cut examples counted, loss-less ones dropped;
    the summary's figures."""
    from llmctl.core.data.sft import Example, Stats, pack
    from llmctl.errors import DataError

    def ex(n, learn):
        return Example(list(range(10, 10 + n)), [False] * (n - learn) + [True] * learn)

    examples = [ex(3, 1), ex(5, 2), ex(4, 4), ex(9, 1), ex(6, 6), ex(2, 0)]
    rows, stats = pack(examples, 8, pad_id=99)
    ids, mask, docs = (rows[:, i].tolist() for i in range(3))
    assert ids == [[10, 11, 12, 10, 11, 12, 13, 14], [10, 11, 12, 13, 99, 99, 99, 99],
                   [10, 11, 12, 13, 14, 15, 99, 99]]
    assert mask == [[0, 0, 1, 0, 0, 0, 1, 1], [1, 1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 0, 0]]
    assert docs == [[0, 0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 1, 1]]
    assert (stats.examples, stats.tokens, stats.truncated, stats.dropped) == (6, [3, 5, 4, 9, 6, 2], 1, 2)
    assert (stats.loss_tokens, stats.rows, stats.fill) == (13, 3, 18 / 24)
    assert stats.summary() == {"examples": 6, "tokens": 29, "tokens_per_example": {"min": 2, "mean": 4.8, "max": 9},
                               "loss_tokens": 13, "truncated": 1, "dropped": 2, "rows": 3, "fill": 0.75}
    rows, stats = pack([ex(8, 1), ex(4, 1), ex(4, 1), ex(9, 1), ex(10, 8)], 8, pad_id=0)
    assert rows[:, 2].tolist() == [[0] * 8, [0] * 4 + [1] * 4, [0] * 8]  # 8 fits; 4 + 4 fills a row
    assert (stats.truncated, stats.dropped, stats.rows) == (2, 1, 3)
    with pytest.raises(DataError, match=r"^no example has a token to learn \(all prompt, or cut away by seq_len\)$"):
        pack([ex(9, 1)], 8, pad_id=0)
    rows, stats = pack(examples[:3], 8, pad_id=0, packing=False)
    assert rows[:, 0].tolist() == [[10, 11, 12, 0, 0, 0, 0, 0], [10, 11, 12, 13, 14, 0, 0, 0],
                                   [10, 11, 12, 13, 0, 0, 0, 0]]
    assert rows[:, 2].tolist() == [[0, 0, 0, 1, 1, 1, 1, 1], [0] * 5 + [1] * 3, [0] * 4 + [1] * 4]
    assert (stats.rows, stats.fill) == (3, 12 / 24)
    assert Stats(fill=2 / 3).summary()["fill"] == 0.667 and Stats().summary()["tokens_per_example"] is None


def test_preference_rows_stats_and_refusals_by_hand(chat_tok, tmp_path):
    """Pairs: chosen then rejected, ids right-padded with `pad_id`, masks on the completions, a
    sequence cut at `length` (counted), a record whose completion is cut away dropped. KTO: the
    example (mask × 2 when undesirable) and the prompt with the previous record's completion (the
    first takes the last one's). Every refusal's message."""
    import json

    from llmctl.core.data.preference import PreferenceEncoder, encode_preferences
    from llmctl.errors import DataError

    tok = chat_tok

    def seq(prompt, completion):
        p, c = tok.encode(prompt, add_special_tokens=True), tok.encode(completion) + [tok.eos_id]
        return p + c, [0] * len(p) + [1] * len(c)

    def write(name, records):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in records))
        return tmp_path / name

    pairs = [{"prompt": "two plus two?", "chosen": " four", "rejected": " five"},
             {"prompt": "three?", "chosen": " three plus five", "rejected": " eight" * 12},
             {"prompt": "add " * 20, "chosen": " four", "rejected": " five"}]
    length = 16
    rows, stats = encode_preferences([write("p.jsonl", pairs)], PreferenceEncoder(tok), length, pad_id=7)
    assert rows.shape == (2, 2, 2, length) and rows.dtype == torch.long
    for r, record in enumerate(pairs[:2]):
        for k, key in enumerate(("chosen", "rejected")):
            ids, mask = seq(record["prompt"], record[key])
            n = min(len(ids), length)
            assert rows[r, k, 0].tolist() == ids[:n] + [7] * (length - n)
            assert rows[r, k, 1].tolist() == mask[:n] + [0] * (length - n)
    longest = max(len(seq(p["prompt"], p[k])[0]) for p in pairs for k in ("chosen", "rejected"))
    assert (stats.records, stats.truncated, stats.dropped, stats.longest, stats.desirable) == (3, 1, 1, longest, 0)
    assert stats.describe(True) == (f"3 pairs, longest sequence {longest} tokens; 1 sequences cut to seq_len, "
                                    "1 records dropped (completion cut away)")

    kto = [{"prompt": "two plus two?", "completion": " four", "label": True},
           {"prompt": "three?", "completion": " eight", "label": False},
           {"prompt": "five?", "completion": " five plus", "label": False}]
    rows, stats = encode_preferences([write("k.jsonl", kto)], PreferenceEncoder(tok, paired=False), length, 0)
    for r, record in enumerate(kto):
        ids, mask = seq(record["prompt"], record["completion"])
        label = 1 if record["label"] else 2
        assert rows[r, 0, 0].tolist() == ids + [0] * (length - len(ids))
        assert rows[r, 0, 1].tolist() == [m * label for m in mask] + [0] * (length - len(ids))
        previous = kto[r - 1]["completion"]
        kl_ids, kl_mask = seq(record["prompt"], previous)
        assert rows[r, 1, 0].tolist() == kl_ids + [0] * (length - len(kl_ids))
        assert rows[r, 1, 1].tolist() == kl_mask + [0] * (length - len(kl_ids))
    assert (stats.records, stats.desirable, stats.dropped, stats.truncated) == (3, 1, 0, 0)
    assert stats.describe(False) == f"3 examples, longest sequence {stats.longest} tokens, 1 desirable / 2 undesirable"

    def refused(records, message, paired=True, length=16):
        with pytest.raises(DataError, match=message):
            encode_preferences([write("bad.jsonl", records)], PreferenceEncoder(tok, paired=paired), length, 0)

    refused([{"prompt": "p"}], r"bad.jsonl:1: a preference pair record needs 'prompt', 'chosen', 'rejected' "
            r"\(missing chosen, rejected\)$")
    refused([kto[0], {"prompt": "p", "completion": "c"}], r"bad.jsonl:2: a KTO record needs 'prompt', 'completion', "
            r"'label' \(missing label\)$", paired=False)
    refused([{**kto[0], "label": 1}], r"bad.jsonl:1: field 'label' must be true or false, not 1$", paired=False)
    refused([{"prompt": "p", "chosen": "c", "rejected": 3}], r"bad.jsonl:1 \(rejected\): field 'completion' is int")
    refused([], r"bad.jsonl: no records$")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match=rf"^{tmp_path / 'empty.jsonl'}, {tmp_path / 'empty.jsonl'}: no records$"):
        encode_preferences([tmp_path / "empty.jsonl"] * 2, PreferenceEncoder(tok), 16, 0)
    exact = len(seq(pairs[0]["prompt"], pairs[0]["chosen"])[0])  # a sequence of exactly `length` is not cut
    _, stats = encode_preferences([write("d.jsonl", [pairs[2], pairs[0], pairs[2], pairs[0]])], PreferenceEncoder(tok),
                                  exact, 0)
    assert (stats.records, stats.dropped, stats.truncated) == (4, 2, 0)
    assert stats.describe(True).endswith(" tokens; 0 sequences cut to seq_len, 2 records dropped (completion cut away)")
    stats.dropped = 0
    assert stats.describe(True) == f"4 pairs, longest sequence {stats.longest} tokens"
    refused(pairs[2:], r"^every record's completion is cut away by seq_len=15; raise seq_len$")
