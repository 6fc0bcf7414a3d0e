"""End-to-end decoding against transformers where the settings change the result: seeded
sampling through the whole processor chain, and beam search whose beams reach EOS (so the
length penalty and `early_stopping` decide the winner)."""

import pytest
import torch
import transformers  # noqa: F401  (a dev requirement: a broken import must fail, not skip)

from llmctl.core.generate import GenerationConfig
from llmctl.core.tokenizer import load_tokenizer
from test_generate import PROMPTS, _hf_model, _ours, ckpts, one_thread, tokdir  # noqa: F401  (fixtures)

STEPS = 16


def _hf_sample(path, prompt_ids: list[int], seed: int, eos: list[int] = [0], **kwargs) -> list[int]:
    """transformers' multinomial sampling from the global RNG seeded like our generator."""
    model = _hf_model(path)
    ids = torch.tensor([prompt_ids])
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, max_new_tokens=STEPS,
                             pad_token_id=eos[0], eos_token_id=eos, **kwargs)
    tokens = out[0, len(prompt_ids):].tolist()
    ends = [i for i, t in enumerate(tokens) if t in eos]
    return tokens[: ends[0] + 1] if ends else tokens


SAMPLING = [
    dict(temperature=0.6),
    dict(temperature=1.4),
    dict(temperature=1.0, top_k=4),
    dict(temperature=1.2, top_p=0.7),
    dict(temperature=1.0, min_p=0.15),
    dict(temperature=1.0, typical_p=0.6),
    dict(temperature=0.8, top_k=12, top_p=0.9, repetition_penalty=1.6),
    dict(temperature=1.3, no_repeat_ngram_size=1, min_new_tokens=8),
]


@pytest.mark.parametrize("settings", SAMPLING, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_seeded_sampling_equals_transformers(ckpts, settings):
    """The same seed draws the same tokens as transformers' sampler: each setting shapes the
    distribution that is drawn from, step after step, exactly as the warper chain does."""
    path = ckpts("llama")
    tok = load_tokenizer(path)
    hf_settings = {"top_k": 0, "top_p": 1.0, **settings}  # transformers' top_k defaults to 50
    for seed, prompt in enumerate(PROMPTS):
        expected = _hf_sample(path, tok.encode(prompt), seed, **hf_settings)
        got = _ours(path, [prompt], GenerationConfig(max_new_tokens=STEPS, seed=seed, **settings))[0]
        assert got.tokens == expected, (prompt, settings)


@pytest.mark.parametrize("min_new", [0, 1, 3])
def test_min_new_tokens_holds_back_eos_while_sampling(ckpts, min_new):
    """Half the vocabulary ends a sequence, so an EOS is drawn almost as soon as it is allowed."""
    path = ckpts("llama")
    tok = load_tokenizer(path)
    eos = list(range(0, tok.vocab_size, 2))
    for seed in range(4):
        for prompt in PROMPTS:
            expected = _hf_sample(path, tok.encode(prompt), seed, eos=eos, top_k=0, min_new_tokens=min_new)
            got = _ours(path, [prompt], GenerationConfig(max_new_tokens=STEPS, seed=seed, eos_ids=eos,
                                                         temperature=1.0, min_new_tokens=min_new))[0]
            assert got.tokens == expected and not set(got.tokens[:min_new]) & set(eos)


def test_sampling_settings_change_the_draws(ckpts):
    """Guard against a vacuous comparison: with one seed, every setting above draws another
    sequence than plain sampling at temperature 1 does."""
    path = ckpts("llama")
    plain = [r.tokens for r in _ours(path, PROMPTS, GenerationConfig(max_new_tokens=STEPS, temperature=1.0, seed=3))]
    for settings in SAMPLING:
        shaped = _ours(path, PROMPTS, GenerationConfig(max_new_tokens=STEPS, seed=3, **settings))
        assert [r.tokens for r in shaped] != plain, settings


# -- beam search whose beams finish ---------------------------------------------------------

BEAM_GRID = [(3, 1.0, False), (3, 0.0, False), (3, 2.0, False), (3, -1.0, False), (3, 1.0, True), (2, 2.0, True),
             (2, 2.0, False), (2, 1.0, "never"), (2, 2.0, "never"), (4, -1.0, "never")]


def _hf_beam(path, prompt_ids: list[int], eos: list[int], num_beams: int, length_penalty: float,
             early_stopping) -> list[int]:
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = _hf_model(path).generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=10,
                                       num_beams=num_beams, length_penalty=length_penalty,
                                       early_stopping=early_stopping, eos_token_id=eos, pad_token_id=eos[0])
    tokens = out[0, len(prompt_ids):].tolist()
    ends = [i for i, t in enumerate(tokens) if t in eos]
    return tokens[: ends[0] + 1] if ends else tokens


def _beam_eos(tok) -> list[int]:
    """Every fifth token ends a sequence: beams finish after 1 to 10 steps."""
    return list(range(0, tok.vocab_size, 5))


@pytest.mark.parametrize("num_beams, length_penalty, early_stopping", BEAM_GRID)
def test_beam_search_with_finished_beams_equals_transformers(ckpts, num_beams, length_penalty, early_stopping):
    path = ckpts("llama", seed=1)
    tok = load_tokenizer(path)
    eos = _beam_eos(tok)
    cfg = GenerationConfig(max_new_tokens=10, num_beams=num_beams, length_penalty=length_penalty,
                           early_stopping=early_stopping, eos_ids=eos)
    results = _ours(path, PROMPTS, cfg)  # one batch: rows finish at different steps
    for prompt, result in zip(PROMPTS, results):
        expected = _hf_beam(path, tok.encode(prompt), eos, num_beams, length_penalty, early_stopping)
        assert result.tokens == expected, prompt
        assert result.finish_reason == ("eos" if expected[-1] in eos else "length")


def test_beam_settings_change_the_winner(ckpts):
    """Guard against a vacuous comparison: over the grid above, transformers picks at least
    three different hypotheses for each prompt, of different lengths."""
    path = ckpts("llama", seed=1)
    tok = load_tokenizer(path)
    for prompt in PROMPTS:
        outs = {tuple(_hf_beam(path, tok.encode(prompt), _beam_eos(tok), *s)) for s in BEAM_GRID}
        assert len(outs) >= 3 and len({len(o) for o in outs}) >= 2, prompt


@pytest.mark.parametrize("settings", [dict(temperature=0.8), dict(temperature=1.2, top_k=6, min_p=0.1)])
def test_beam_sampling_equals_transformers(ckpts, settings):
    """`--num-beams` with `--temperature`: candidates drawn from the processed beam scores with
    the same seed as transformers' beam sampling (warpers keep 1 + len(eos) tokens per beam)."""
    path = ckpts("llama", seed=1)
    tok = load_tokenizer(path)
    eos = [0, 5]  # few EOS ids: 3 × 3 candidates are drawn, not nearly the whole top of the list
    greedy = [r.tokens for r in _ours(path, PROMPTS, GenerationConfig(max_new_tokens=10, num_beams=3, eos_ids=eos))]
    sampled = []
    for seed, prompt in enumerate(PROMPTS):
        ids = torch.tensor([tok.encode(prompt)])
        torch.manual_seed(seed)
        with torch.no_grad():
            out = _hf_model(path).generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, num_beams=3,
                                           max_new_tokens=10, eos_token_id=eos, pad_token_id=eos[0],
                                           **{"top_k": 0, **settings})
        tokens = out[0, ids.shape[1]:].tolist()
        ends = [i for i, t in enumerate(tokens) if t in eos]
        expected = tokens[: ends[0] + 1] if ends else tokens
        cfg = GenerationConfig(max_new_tokens=10, num_beams=3, eos_ids=eos, seed=seed, **settings)
        sampled.append(_ours(path, [prompt], cfg)[0].tokens)
        assert sampled[-1] == expected, prompt
    assert sampled != greedy  # the draws mattered
