"""Edges of `core/generate/search.py` that the end-to-end comparisons do not reach (found by
mutation testing, docs/testing.md): the fixed-shape one-token step (what `--compile` and CUDA
graphs run) on padded and unpadded batches, beam search over a batch with penalties, and the
prefill / decode timings."""

from __future__ import annotations

import types

import pytest
import torch

from llmctl.core.generate import GenerationConfig, search
from llmctl.core.generate.search import Runner
from llmctl.core.model import ModelConfig, Transformer
from llmctl.core.tokenizer import load_tokenizer
from test_generate import PROMPTS, _hf_generate, _ours, _strip_pad, ckpts, one_thread, tokdir  # noqa: F401

TINY = dict(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=48,
            max_seq_len=64)
BATCHES = {"padded": [[5, 6, 7, 8, 9], [11, 12]], "unpadded": [[5, 6, 7], [11, 12, 13]]}


@pytest.mark.parametrize("position", ["rope", "learned"])
@pytest.mark.parametrize("batch", BATCHES)
def test_fixed_shape_step_equals_each_row_run_alone(position, batch):
    """One-token steps through `decode_step` over the whole cache (as the compiled and graphed
    steps run), mixed with multi-token feeds, a rollback and a reordering of the rows (as beam
    search and speculative decoding do), give each row's logits of an uncached run of that row
    alone; the Runner's length and next positions follow what was fed."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**TINY, position=position)).eval()
    prompts = BATCHES[batch]
    width = max(map(len, prompts))
    feeds = [torch.tensor([[1], [2]]), torch.tensor([[3, 4], [5, 6]]), torch.tensor([[7], [8]]),
             torch.tensor([[9], [10]])]

    def alone(row: list[int], last: int) -> torch.Tensor:
        return model(torch.tensor([row])).logits[0, -last:]

    with torch.no_grad():
        assert Runner(model, prompts, 32, torch.device("cpu")).prefill(keep=0).shape == (2, width, 97)
        runner = Runner(model, prompts, 32, torch.device("cpu"))
        runner.step_fn = model.decode_step
        got = [runner.prefill()]
        assert got[0].shape == (2, 1, 97)
        got += [runner.forward(ids) for ids in feeds]
        got, fed = torch.cat(got, 1), torch.cat(feeds, 1).tolist()
        assert runner.length == width + 5 == runner.cache.length
        assert runner.padded == (batch == "padded")
        if runner.padded:
            assert runner.next_pos[:, 0].tolist() == [len(p) + 5 for p in prompts]
        for i, prompt in enumerate(prompts):
            assert torch.allclose(got[i], alone(prompt + fed[i], 6), atol=1e-5), i

        runner.truncate(runner.length - 2)  # drop the last two steps, take another
        after_rollback = runner.forward(torch.tensor([[11], [12]]))[:, 0]
        runner.reorder(torch.tensor([1, 0]))  # the rows swap places
        after_reorder = runner.forward(torch.tensor([[13], [14]]))[:, 0]
        for i, prompt in enumerate(prompts):
            row = prompt + fed[i][:3] + [11 + i]
            assert torch.allclose(after_rollback[i], alone(row, 1)[0], atol=1e-5), i
            assert torch.allclose(after_reorder[1 - i], alone(row + [14 - i], 1)[0], atol=1e-5), i


def test_batched_beam_search_with_penalties_equals_transformers(ckpts):
    """The penalties' token history follows each beam of each prompt in a batch."""
    path = ckpts("llama", seed=1)
    tok = load_tokenizer(path)
    settings = dict(num_beams=3, repetition_penalty=1.8, no_repeat_ngram_size=2)
    batched = _ours(path, PROMPTS, GenerationConfig(max_new_tokens=10, **settings))
    for prompt, result in zip(PROMPTS, batched):
        expected = _strip_pad(_hf_generate(path, tok.encode(prompt), do_sample=False, max_new_tokens=10, **settings))
        assert result.tokens == expected, prompt
    plain = _ours(path, PROMPTS, GenerationConfig(max_new_tokens=10, num_beams=3))
    assert [r.tokens for r in plain] != [r.tokens for r in batched]  # the penalties changed the beams


@pytest.mark.parametrize("strategy", [dict(), dict(num_beams=2), dict(penalty_alpha=0.5, top_k=3)])
def test_timings_are_the_clocks_differences(ckpts, monkeypatch, strategy):
    """Prefill and decode throughput come from the clock readings around each phase."""
    readings = iter([100.0, 102.0, 110.0, 114.0])  # prefill from 100 to 102, decoding from 110 to 114
    monkeypatch.setattr(search, "time", types.SimpleNamespace(perf_counter=lambda: next(readings)))
    path = ckpts("llama")
    tok = load_tokenizer(path)
    results = _ours(path, PROMPTS[:2], GenerationConfig(max_new_tokens=6, eos_ids=[], **strategy))
    prompt_total = sum(len(tok.encode(p)) for p in PROMPTS[:2])
    for r in results:
        assert r.prefill_tokens_per_s == round(prompt_total / 2.0, 2)
        assert r.decode_tokens_per_s == round(len(r.tokens) / 4.0, 2) == 1.5
