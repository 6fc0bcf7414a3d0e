"""Edges of the registered search strategies and of `generate` itself (found by mutation testing
the decorated functions, docs/testing.md): contrastive search on an unpadded batch, on a
post-norm model, with penalties and past the hidden size; the settings each strategy passes to
its Runner; `generate`'s checks, batches, stop ids and rates."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers.generation.logits_process import NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor

from test_generate import PROMPTS, _hf_model, _ours, ckpts, one_thread, tokdir  # noqa: F401  (fixtures)

from llmctl.core.generate import GenerationConfig, generate
from llmctl.core.model import ModelConfig, Transformer
from llmctl.core.tokenizer import load_tokenizer
from llmctl.errors import UsageError

TINY = dict(vocab_size=61, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=48,
            max_seq_len=96)


def make(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**{**TINY, **overrides})).eval()


class Tok:
    """A tokenizer stand-in: a prompt is its token ids written out ("5 6 7")."""

    def __init__(self, stop_ids=(0,)):
        self.stop_ids = list(stop_ids)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [int(t) for t in text.split()]

    def decode(self, ids) -> str:
        return "".join(f" {int(i)}" for i in ids)


def _text(ids: list[int]) -> str:
    return " ".join(map(str, ids))


# -- contrastive search --------------------------------------------------------------------------


def _brute_contrastive(model, ids: list[int], k: int, alpha: float, steps: int, processors=()) -> list[int]:
    """Su et al.'s rule with no cache: every candidate re-runs the whole sequence; the hidden
    states are the head's input (`skip_head`), the penalties transformers' processors."""
    out = list(ids)
    with torch.no_grad():
        for _ in range(steps):
            row = torch.tensor([out])
            scores = model(row).logits[:, -1].float()
            for p in processors:
                scores = p(row, scores)
            top_p, top_ids = torch.topk(scores.softmax(-1)[0], k)
            context = torch.nn.functional.normalize(model(row, skip_head=True).features[0], dim=-1)
            best, best_score = None, None
            for p, t in zip(top_p.tolist(), top_ids.tolist()):
                h = model(torch.tensor([out + [t]]), skip_head=True).features[0, -1]
                score = (1 - alpha) * p - alpha * float((context @ torch.nn.functional.normalize(h, dim=-1)).max())
                if best_score is None or score > best_score:
                    best, best_score = t, score
            out.append(best)
    return out[len(ids):]


@pytest.mark.parametrize("placement", [dict(), dict(norm_placement="post", norm="layernorm")],
                         ids=["pre-norm", "post-norm"])
def test_contrastive_search_of_one_prompt_equals_brute_force_past_the_hidden_size(placement):
    """One prompt (no padding: every context position counts) decoded for more steps than the
    hidden size; a post-norm model's hidden states come from its last block."""
    model = make(**placement)
    prompt, steps = [5, 17, 3, 42], 31  # 35 positions > 32 hidden units
    cfg = GenerationConfig(max_new_tokens=steps, penalty_alpha=0.6, top_k=3, eos_ids=[])
    with torch.no_grad():
        got = generate(model, Tok(), [_text(prompt)], cfg)[0].tokens
    assert got == _brute_contrastive(model, prompt, 3, 0.6, steps)


def test_contrastive_search_applies_the_penalties_over_each_rows_history():
    """Repetition penalty and no-repeat-ngram shape the candidates as transformers' processors
    do, over the prompt and the tokens chosen so far, in a padded batch and alone."""
    model = make(seed=1)
    prompts = [[5, 17, 3, 42, 8], [9, 9, 30]]
    settings = dict(max_new_tokens=12, penalty_alpha=0.4, top_k=4, eos_ids=[])
    penalties = dict(repetition_penalty=1.8, no_repeat_ngram_size=2)
    processors = [RepetitionPenaltyLogitsProcessor(1.8), NoRepeatNGramLogitsProcessor(2)]
    with torch.no_grad():
        batched = generate(model, Tok(), [_text(p) for p in prompts], GenerationConfig(**settings, **penalties))
        alone = generate(model, Tok(), [_text(prompts[1])], GenerationConfig(**settings, **penalties))[0]
        plain = generate(model, Tok(), [_text(p) for p in prompts], GenerationConfig(**settings))
    for prompt, result in zip(prompts, batched):
        assert result.tokens == _brute_contrastive(model, prompt, 4, 0.4, 12, processors), prompt
    assert alone.tokens == batched[1].tokens
    assert [r.tokens for r in plain] != [r.tokens for r in batched]  # the penalties mattered


def test_contrastive_search_needs_two_candidates():
    model = make()
    with pytest.raises(UsageError) as error:
        generate(model, Tok(), ["5 6"], GenerationConfig(max_new_tokens=2, penalty_alpha=0.5, top_k=1))
    assert str(error.value) == "contrastive search (--penalty-alpha) needs --top-k >= 2"
    with torch.no_grad():
        two = generate(model, Tok(), ["5 6"], GenerationConfig(max_new_tokens=3, penalty_alpha=0.5, top_k=2,
                                                              eos_ids=[]))[0]
    assert two.tokens == _brute_contrastive(model, [5, 6], 2, 0.5, 3)


# -- beam search --------------------------------------------------------------------------------


def test_beam_sampling_with_one_end_id_draws_two_candidates_per_beam_like_transformers(ckpts):  # noqa: F811
    """With one EOS id, 2 × beams candidates are drawn (transformers' max(2, 1 + len(eos)) × beams)."""
    path = ckpts("llama", seed=1)
    tok = load_tokenizer(path)
    for seed, prompt in enumerate(PROMPTS[:2]):
        ids = torch.tensor([tok.encode(prompt)])
        torch.manual_seed(seed)
        with torch.no_grad():
            out = _hf_model(path).generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, num_beams=3,
                                           max_new_tokens=8, eos_token_id=[0], pad_token_id=0, top_k=0,
                                           temperature=1.3)
        expected = out[0, ids.shape[1]:].tolist()
        expected = expected[: expected.index(0) + 1] if 0 in expected else expected
        cfg = GenerationConfig(max_new_tokens=8, num_beams=3, eos_ids=[0], seed=seed, temperature=1.3)
        assert _ours(path, [prompt], cfg)[0].tokens == expected, prompt


@pytest.mark.parametrize("num_beams, length_penalty, early_stopping", [(2, 1.0, True), (3, 1.0, False),
                                                                     (2, 2.0, "never")])
def test_beam_search_runs_the_model_as_many_times_as_transformers(ckpts, num_beams, length_penalty,  # noqa: F811
                                                                  early_stopping):
    """Decoding stops once no running beam can beat the kept hypotheses, once `early_stopping`
    has its hypotheses, and after the last token: no forward pass is wasted."""
    from llmctl.core.model.io import load_model

    path = ckpts("llama", seed=1)
    tok = load_tokenizer(path)
    model = load_model(path)[0]
    eos = list(range(0, tok.vocab_size, 5))  # beams finish after a few steps
    ours, theirs, runs = [], [], []
    hooks = [model.register_forward_hook(lambda *a: ours.append(1)),
             _hf_model(path).register_forward_hook(lambda *a: theirs.append(1))]
    try:
        for prompt in PROMPTS[:2]:
            for ends in (eos, []):
                ids = torch.tensor([tok.encode(prompt)])
                theirs.clear(), ours.clear()
                with torch.no_grad():
                    _hf_model(path).generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                             max_new_tokens=10, num_beams=num_beams, length_penalty=length_penalty,
                                             early_stopping=early_stopping, eos_token_id=ends or None, pad_token_id=0)
                    cfg = GenerationConfig(max_new_tokens=10, num_beams=num_beams, length_penalty=length_penalty,
                                           early_stopping=early_stopping, eos_ids=ends)
                    generate(model, tok, [prompt], cfg)
                assert len(ours) == len(theirs), (prompt, ends)
                runs.append(len(ours))
    finally:
        for hook in hooks:
            hook.remove()
    assert max(runs) == 10  # those without an end ran to the last token
    assert min(runs) < 10 or early_stopping == "never"  # and some with one stopped early


# -- what the strategies pass to their Runner ----------------------------------------------------


@pytest.mark.parametrize("strategy", [dict(), dict(num_beams=2)], ids=["sample", "beam"])
@pytest.mark.parametrize("compile, cuda_graph", [(True, False), (False, True)])
def test_sampling_and_beam_search_pass_compile_and_cuda_graph_to_their_runner(monkeypatch, strategy, compile,
                                                                              cuda_graph):
    """`--compile` and `--no-cuda-graph` reach the Runner (which is then run eagerly here)."""
    from llmctl.core.generate import search

    made = []
    real = search.Runner

    def runner(model, prompts, max_len, device, *flags):
        made.append(flags)
        return real(model, prompts, max_len, device)

    monkeypatch.setattr(search, "Runner", runner)
    cfg = GenerationConfig(max_new_tokens=3, eos_ids=[], compile=compile, cuda_graph=cuda_graph, **strategy)
    with torch.no_grad():
        generate(make(), Tok(), ["5 6 7", "8"], cfg)
    assert made == [(compile, cuda_graph)]


# -- the generate entry: settings ----------------------------------------------------------------

BOUNDS = [  # (setting, accepted values, refused values, the message)
    ("max_new_tokens", [1], [0], "--max-new-tokens must be >= 1"),
    ("min_new_tokens", [0], [-1], "--min-new-tokens must be >= 0"),
    ("temperature", [0.0], [-0.01], "--temperature must be >= 0 (0 = greedy)"),
    ("top_k", [0], [-1], "--top-k must be >= 0"),
    ("top_p", [1.0, 0.01], [0.0, 1.01], "--top-p must be in (0, 1]"),
    ("min_p", [0.0, 1.0], [-0.01, 1.01], "--min-p must be in [0, 1]"),
    ("typical_p", [1.0, 0.01], [0.0, 1.01], "--typical-p must be in (0, 1]"),
    ("repetition_penalty", [0.01], [0.0], "--repetition-penalty must be > 0"),
    ("no_repeat_ngram_size", [0], [-1], "--no-repeat-ngram must be >= 0"),
    ("num_beams", [1], [0], "--num-beams must be >= 1"),
    ("penalty_alpha", [0.0, 1.0], [-0.01, 1.01], "--penalty-alpha must be in [0, 1]"),
    ("speculate_k", [1], [0], "--speculate-k must be >= 1"),
    ("prompt_lookup", [0], [-1], "--prompt-lookup must be >= 0"),
    ("batch_size", [1], [0], "--batch-size must be >= 1"),
    ("truncate", ["error", "left"], ["right"], "--truncate must be 'error' or 'left'"),
    ("early_stopping", [True, False, "never"], ["always"], "--early-stopping must be true, false or never"),
]


@pytest.mark.parametrize("name, good, bad, message", BOUNDS, ids=[b[0] for b in BOUNDS])
def test_each_setting_is_checked_at_its_bounds_with_its_flags_message(name, good, bad, message):
    from llmctl.core.generate import validate

    for value in good:
        validate(GenerationConfig(**{name: value}))
    for value in bad:
        with pytest.raises(UsageError) as error:
            validate(GenerationConfig(**{name: value}))
        assert str(error.value) == message, value


def test_generate_checks_its_settings_first():
    with pytest.raises(UsageError, match="--max-new-tokens must be >= 1"):
        generate(make(), Tok(), ["5"], GenerationConfig(max_new_tokens=0))


@pytest.mark.parametrize("settings, draft, expected", [
    (dict(), False, "sample"),
    (dict(temperature=0.7, top_k=5), False, "sample"),
    (dict(), True, "speculative"),
    (dict(prompt_lookup=1), False, "speculative"),
    (dict(num_beams=2), False, "beam"),
    (dict(penalty_alpha=0.1), False, "contrastive"),
    (dict(strategy="mine"), False, "mine"),  # a plugin's strategy, asked for by name
    (dict(num_beams=2, strategy="mine"), False, "mine"),
])
def test_the_strategy_the_settings_ask_for(settings, draft, expected):
    from llmctl.core.generate import strategy_name

    assert strategy_name(GenerationConfig(**settings), draft) == expected
    if not draft:
        assert strategy_name(GenerationConfig(**settings)) == expected  # no draft unless one is given


@pytest.mark.parametrize("settings, draft, message", [
    (dict(num_beams=2), True, "--draft/--prompt-lookup and --num-beams cannot be combined"),
    (dict(prompt_lookup=2, penalty_alpha=0.5), False, "--draft/--prompt-lookup and --penalty-alpha cannot be combined"),
    (dict(num_beams=3, penalty_alpha=0.5), False, "--num-beams and --penalty-alpha cannot be combined"),
    (dict(num_beams=3, penalty_alpha=0.5), True,
     "--draft/--prompt-lookup and --num-beams and --penalty-alpha cannot be combined"),
    (dict(prompt_lookup=1), True, "--draft and --prompt-lookup cannot be combined"),
])
def test_strategies_that_cannot_be_combined_are_named(settings, draft, message):
    from llmctl.core.generate import strategy_name

    with pytest.raises(UsageError) as error:
        strategy_name(GenerationConfig(**settings), draft)
    assert str(error.value) == message


def test_warpers_keep_one_token_per_end_id_and_one_more_for_beams_only():
    """transformers' beam sampling keeps 1 + len(eos) tokens through its warpers; plain sampling one."""
    assert GenerationConfig(num_beams=3, eos_ids=[0, 5]).min_tokens_to_keep == 3
    assert GenerationConfig(num_beams=2, eos_ids=[0]).min_tokens_to_keep == 2
    assert GenerationConfig(num_beams=2, eos_ids=None).min_tokens_to_keep == 1
    assert GenerationConfig(num_beams=1, eos_ids=[0, 5]).min_tokens_to_keep == 1
    assert not GenerationConfig(temperature=0.0).sampling and GenerationConfig(temperature=0.01).sampling


# -- prompts and the context ---------------------------------------------------------------------


class ChatTok(Tok):
    """A `tokenizers` word-level tokenizer whose post-processor adds a BOS (1); renders a
    conversation as its contents."""

    def __init__(self):
        from tokenizers import Tokenizer, models, pre_tokenizers, processors

        super().__init__()
        self.inner = Tokenizer(models.WordLevel({str(i): i for i in range(10)}, unk_token="0"))
        self.inner.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        self.inner.post_processor = processors.TemplateProcessing(single="1 $A", special_tokens=[("1", 1)])

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.inner.encode(text, add_special_tokens=add_special_tokens).ids

    def apply_chat_template(self, messages, add_generation_prompt: bool = False) -> str:
        return " ".join(m["content"] for m in messages) + (" 2" if add_generation_prompt else "")


def test_a_plain_prompt_gets_the_tokenizers_bos_and_a_chat_gets_its_template_and_no_second_bos():
    from llmctl.core.generate import encode_prompt

    assert encode_prompt(ChatTok(), "7 8") == [1, 7, 8]
    chat = [{"role": "user", "content": "1 7"}, {"role": "user", "content": "8"}]  # the template writes the BOS
    assert encode_prompt(ChatTok(), chat) == [1, 7, 8, 2]


def test_fitting_prompts_to_the_context():
    from llmctl.core.generate import fit_context

    cfg = GenerationConfig(max_new_tokens=4)
    left = GenerationConfig(max_new_tokens=4, truncate="left")
    ids = list(range(10, 20))  # 10 tokens
    assert fit_context(ids, cfg, None) == ids
    assert fit_context(ids, cfg, 14) == ids  # exactly fills it
    assert fit_context(ids, left, 14) == ids
    assert fit_context(ids, left, 13) == ids[1:]  # the oldest token goes
    assert fit_context(ids, left, 5) == ids[-1:]  # room for one
    with pytest.raises(UsageError) as error:
        fit_context(ids, left, 4)
    assert str(error.value) == "--max-new-tokens 4 leaves no room for a prompt (context 4)"
    assert fit_context(ids, cfg, 11) == ids  # generation is shortened instead
    with pytest.raises(UsageError) as error:
        fit_context(ids, cfg, 10, index=1)
    assert str(error.value) == ("prompt 2 has 10 tokens, the model's context is 10 "
                                "(use --truncate left, or extend it with --rope-scaling)")
    with pytest.raises(UsageError) as error:
        fit_context([], cfg, 10, index=2)
    assert str(error.value) == "prompt 3 is empty (no tokens)"
    with pytest.raises(UsageError, match="^prompt 1 is empty"):
        fit_context([], cfg, 10)


def test_generation_is_shortened_per_batch_to_what_the_context_leaves_with_a_warning():
    from _recorder import Recorder

    model, report = make(), Recorder()
    prompts = [" ".join(["5"] * 15), "6 7 8"]
    cfg = GenerationConfig(max_new_tokens=8, eos_ids=[], batch_size=1)
    with torch.no_grad():
        results = generate(model, Tok(), prompts, cfg, context=20, report=report)
        quiet = Recorder()
        alone = generate(model, Tok(), prompts[1:], cfg, context=11, report=quiet)[0]
    assert [len(r.tokens) for r in results] == [5, 8] and [r.finish_reason for r in results] == ["length"] * 2
    assert report.messages() == [("warn", "generating at most 5 tokens: a 15-token prompt fills the context of 20 "
                                          "otherwise")]
    assert alone.tokens == results[1].tokens and quiet.messages() == []  # exactly fits: no warning
    with pytest.raises(UsageError, match="^prompt 2 has 11 tokens, the model's context is 11 "):
        generate(model, Tok(), ["5", " ".join(["5"] * 11)], cfg, context=11)
    # without `context`, the model's own: 96
    with torch.no_grad():
        long = generate(model, Tok(), [" ".join(["5"] * 90)], GenerationConfig(max_new_tokens=8, eos_ids=[]))[0]
    assert len(long.tokens) == 6


# -- the generate entry: batches, stop ids, rates ------------------------------------------------


def _greedy(model, prompt: list[int], steps: int) -> list[int]:
    """Greedy decoding with no cache."""
    out = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            out.append(int(model(torch.tensor([out])).logits[0, -1].argmax()))
    return out[len(prompt):]


def test_batches_come_back_in_order_with_their_streamed_text():
    model = make()
    prompts = [[5, 6, 7], [8], [9, 10, 11, 12, 13], [14, 15]]
    streamed = {}
    cfg = GenerationConfig(max_new_tokens=5, eos_ids=[], batch_size=3)
    with torch.no_grad():
        results = generate(model, Tok(), [_text(p) for p in prompts], cfg,
                           on_text=lambda i, text: streamed.__setitem__(i, streamed.get(i, "") + text))
    assert [r.tokens for r in results] == [_greedy(model, p, 5) for p in prompts]
    assert [r.prompt_tokens for r in results] == [3, 1, 5, 2]
    assert streamed == {i: r.text for i, r in enumerate(results)} and results[3].text == Tok().decode(results[3].tokens)


def test_without_end_ids_the_tokenizers_stop_ids_end_a_row():
    model = make()
    free = _greedy(model, [5, 6, 7], 8)
    stop = free[3]
    with torch.no_grad():
        result = generate(model, Tok(stop_ids=[stop]), ["5 6 7"], GenerationConfig(max_new_tokens=8))[0]
        kept = generate(model, Tok(stop_ids=[stop]), ["5 6 7"], GenerationConfig(max_new_tokens=8, eos_ids=[]))[0]
    assert result.tokens == free[: free.index(stop) + 1] and result.finish_reason == "eos"
    assert kept.tokens == free and kept.finish_reason == "length"


def test_a_draft_makes_the_search_speculative():
    model, cfg = make(), GenerationConfig(max_new_tokens=6, eos_ids=[])
    with torch.no_grad():
        result = generate(model, Tok(), ["5 6 7"], cfg, draft=make(seed=3))[0]
        itself = generate(model, Tok(), ["5 6 7"], cfg, draft=model)[0]
    assert result.tokens == itself.tokens == _greedy(model, [5, 6, 7], 6) and 0 <= result.acceptance_rate <= 1
    assert itself.acceptance_rate == 1.0  # the target as its own draft: every guess is right


def test_a_draft_with_another_vocabulary_is_refused():
    with pytest.raises(UsageError) as error:
        generate(make(), Tok(), ["5"], GenerationConfig(), draft=make(vocab_size=60))
    assert str(error.value) == "--draft vocabulary (60) differs from the model's (61)"


def test_contrastive_search_ignores_the_sampling_warpers():
    """transformers' contrastive search applies the logits processors, not the warpers: a
    temperature and top-p change nothing."""
    model = make()
    settings = dict(max_new_tokens=6, penalty_alpha=0.6, top_k=3, eos_ids=[])
    with torch.no_grad():
        warped = generate(model, Tok(), ["5 17 3"], GenerationConfig(**settings, temperature=0.3, top_p=0.5))[0]
    assert warped.tokens == _brute_contrastive(model, [5, 17, 3], 3, 0.6, 6)


def test_without_a_seed_the_draws_follow_torchs_global_generator():
    model = make()
    cfg = GenerationConfig(max_new_tokens=12, eos_ids=[], temperature=1.5)
    with torch.no_grad():
        runs = []
        for seed in (3, 3, 4):
            torch.manual_seed(seed)
            runs.append(generate(model, Tok(), ["5 6"], cfg)[0].tokens)
    assert runs[0] == runs[1] != runs[2]


def test_results_rates_and_their_dictionary():
    from llmctl.core.generate import Result, _result

    seq = SimpleNamespace(close=lambda: None, text=" 4 5", tokens=[4, 5, 6, 7, 8], finish_reason="length")
    job = SimpleNamespace(prompts=[[1, 2, 3], [1, 2, 3, 4]], prefill_s=3.0, decode_s=3.0, accepted=1, proposed=3)
    plain = _result(job, seq, [1, 2, 3], False)
    assert plain == Result(" 4 5", [4, 5, 6, 7, 8], "length", 3, 2.33, 1.67, None)
    assert "acceptance_rate" not in plain.to_dict() and plain.to_dict()["prefill_tokens_per_s"] == 2.33
    spec = _result(job, seq, [1, 2, 3], True)
    assert spec.acceptance_rate == 0.3333 and spec.to_dict()["acceptance_rate"] == 0.3333
    job.accepted, job.proposed = 1, 1
    assert _result(job, seq, [1], True).acceptance_rate == 1.0
    job.accepted, job.proposed, job.prefill_s, job.decode_s = 0, 0, 0.0, 0.0  # nothing proposed, no time
    assert _result(job, seq, [1], True) == Result(" 4 5", [4, 5, 6, 7, 8], "length", 1, 0.0, 0.0, 0.0)


# -- CUDA graphs: which models a graph can hold --------------------------------------------------


@pytest.mark.parametrize("settings, expected", [
    (dict(), True),
    (dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), True),
    (dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), False),
    (dict(num_experts=4, experts_per_token=2), False),
    (dict(position="alibi"), False),
    (dict(position="learned"), True),
])
def test_a_cuda_graph_holds_models_without_data_dependent_steps(settings, expected):
    from llmctl.core.generate.graphs import graphable

    assert graphable(SimpleNamespace(cfg=ModelConfig(**{**TINY, **settings}))) is expected
