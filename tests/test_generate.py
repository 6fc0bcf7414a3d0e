"""`llmctl generate` and `llmctl.core.generate` against transformers' generate() on tiny models."""

import functools
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import transformers

from llmctl.core.generate import GenerationConfig, generate  # noqa: E402
from llmctl.core.generate.speculative import _accept  # noqa: E402
from llmctl.core.generate import search  # noqa: E402
from llmctl.core.model.io import load_model  # noqa: E402
from llmctl.core.tokenizer import load_tokenizer  # noqa: E402

SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "a stitch in time saves nine, and the early bird catches the worm",
    "language models predict the next token from the previous ones",
    "héllo wörld, ünïcode text with 世界 and emoji 🎉 is fine",
] * 20
PROMPTS = ["the quick brown", "language models predict the next token", "a"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _hf_config(arch: str, vocab: int, **overrides):
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=96,
                  initializer_range=0.2, tie_word_embeddings=False, eos_token_id=0, pad_token_id=0,
                  bos_token_id=None)
    if arch == "gpt2":
        return transformers.GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=96,
                                       initializer_range=0.2, eos_token_id=0, pad_token_id=0, bos_token_id=None,
                                       **overrides)
    extra = {
        "llama": {},
        "qwen3": {"head_dim": 16},
        "mistral": {"sliding_window": 8},
        "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    }[arch]
    cls = {"llama": transformers.LlamaConfig, "qwen3": transformers.Qwen3Config,
           "mistral": transformers.MistralConfig, "mixtral": transformers.MixtralConfig}[arch]
    return cls(**{**common, **extra, **overrides})


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one intra-op thread is faster and immune to a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokdir(tmp_path_factory) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SENTENCES, trainer)
    out = tmp_path_factory.mktemp("tok")
    eos = "<|endoftext|>"
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=eos).save_pretrained(out)
    config = json.loads((out / "tokenizer_config.json").read_text())
    config["chat_template"] = CHAT_TEMPLATE
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


def _save_hf(arch: str, tokdir: Path, out: Path, seed: int = 0, **overrides) -> Path:
    import shutil

    vocab = load_tokenizer(tokdir).vocab_size
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(_hf_config(arch, vocab, **overrides)).eval()
    model.save_pretrained(out)
    for f in tokdir.iterdir():
        shutil.copy(f, out / f.name)
    return out


@pytest.fixture(scope="module")
def ckpts(tokdir, tmp_path_factory):
    """arch → saved tiny HF checkpoint (built once per module)."""
    made = {}

    def get(arch: str, seed: int = 0, **overrides) -> Path:
        key = (arch, seed, tuple(sorted(overrides.items())))
        if key not in made:
            made[key] = _save_hf(arch, tokdir, tmp_path_factory.mktemp(arch), seed, **overrides)
        return made[key]

    return get


@functools.lru_cache(maxsize=None)
def _hf_model(path: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(path).eval()


@functools.lru_cache(maxsize=None)
def _llmctl_model(path: Path):
    return load_model(path)[0], load_tokenizer(path)


def _hf_generate(path: Path, prompt_ids: list[int], **kwargs) -> list[int]:
    model = _hf_model(path)
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), pad_token_id=0, eos_token_id=0, **kwargs)
    return out[0, len(prompt_ids):].tolist()


def _ours(path: Path, prompts, cfg: GenerationConfig, draft: Path | None = None):
    model, tok = _llmctl_model(path)
    draft_model = _llmctl_model(draft)[0] if draft else None
    return generate(model, tok, prompts, cfg, draft=draft_model)


def _strip_pad(tokens: list[int]) -> list[int]:
    """HF pads finished beams with pad (=eos=0); keep up to and including the first EOS."""
    return tokens[: tokens.index(0) + 1] if 0 in tokens else tokens


# -- exactness against transformers -----------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "qwen3", "gpt2", "mistral", "mixtral"])
def test_greedy_matches_transformers_and_batching(ckpts, arch):
    path = ckpts(arch)
    tok = load_tokenizer(path)
    cfg = GenerationConfig(max_new_tokens=16)
    batched = _ours(path, PROMPTS, cfg)
    for prompt, result in zip(PROMPTS, batched):
        expected = _strip_pad(_hf_generate(path, tok.encode(prompt), do_sample=False, max_new_tokens=16))
        assert result.tokens == expected, prompt
        assert _ours(path, [prompt], cfg)[0].tokens == result.tokens  # left-padded batch == alone
        assert result.finish_reason == ("eos" if expected[-1] == 0 else "length")


@pytest.mark.parametrize("num_beams, length_penalty, early_stopping", [
    (3, 1.0, False), (2, 0.0, True), (4, 2.0, "never"), (3, -0.5, False),
])
def test_beam_search_matches_transformers(ckpts, num_beams, length_penalty, early_stopping):
    path = ckpts("llama", seed=1)
    tok = load_tokenizer(path)
    for prompt in PROMPTS[:2]:
        ids = tok.encode(prompt)
        expected = _strip_pad(_hf_generate(path, ids, do_sample=False, num_beams=num_beams, max_new_tokens=10,
                                           length_penalty=length_penalty, early_stopping=early_stopping))
        cfg = GenerationConfig(max_new_tokens=10, num_beams=num_beams, length_penalty=length_penalty,
                               early_stopping=early_stopping)
        assert _ours(path, [prompt], cfg)[0].tokens == expected


def test_beam_search_finishes_on_eos_like_transformers(ckpts):
    # make EOS likely: pick as EOS the 3rd greedy token, so beams end early
    path = ckpts("qwen3", seed=2)
    tok = load_tokenizer(path)
    greedy = _ours(path, [PROMPTS[0]], GenerationConfig(max_new_tokens=6))[0].tokens
    eos = greedy[2]
    model = _hf_model(path)
    ids = torch.tensor([tok.encode(PROMPTS[0])])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, num_beams=3,
                             max_new_tokens=12, eos_token_id=eos, pad_token_id=eos)
    expected = out[0, ids.shape[1]:].tolist()
    expected = expected[: expected.index(eos) + 1] if eos in expected else expected
    ours = _ours(path, [PROMPTS[0]], GenerationConfig(max_new_tokens=12, num_beams=3, eos_ids=[eos]))[0]
    assert ours.tokens == expected
    assert ours.finish_reason == ("eos" if expected[-1] == eos else "length")


def test_beam_search_batched_equals_alone(ckpts):
    path = ckpts("llama", seed=1)
    cfg = GenerationConfig(max_new_tokens=8, num_beams=3)
    batched = _ours(path, PROMPTS, cfg)
    assert [r.tokens for r in batched] == [_ours(path, [p], cfg)[0].tokens for p in PROMPTS]


def _reference_contrastive(hf, ids: list[int], k: int, alpha: float, steps: int) -> list[int]:
    """Brute force, no cache: re-run the whole sequence for every candidate."""
    out_ids = list(ids)
    for _ in range(steps):
        with torch.no_grad():
            out = hf(torch.tensor([out_ids]), output_hidden_states=True)
            probs = out.logits[0, -1].float().softmax(-1)
            top_p, top_ids = torch.topk(probs, k)
            context = torch.nn.functional.normalize(out.hidden_states[-1][0], dim=-1)
            scores = []
            for p, t in zip(top_p.tolist(), top_ids.tolist()):
                h = hf(torch.tensor([out_ids + [t]]), output_hidden_states=True).hidden_states[-1][0, -1]
                penalty = (context @ torch.nn.functional.normalize(h, dim=-1)).max().item()
                scores.append((1 - alpha) * p - alpha * penalty)
        out_ids.append(top_ids[max(range(k), key=lambda i: (scores[i], -i))].item())
    return out_ids[len(ids):]


def test_contrastive_search_matches_reference(ckpts):
    path = ckpts("llama")
    tok = load_tokenizer(path)
    hf = _hf_model(path)
    cfg = GenerationConfig(max_new_tokens=8, penalty_alpha=0.6, top_k=4, eos_ids=[])
    results = _ours(path, PROMPTS[:2], cfg)
    for prompt, result in zip(PROMPTS[:2], results):
        assert result.tokens == _reference_contrastive(hf, tok.encode(prompt), 4, 0.6, 8)


# -- speculative decoding -----------------------------------------------------------------

def test_speculative_greedy_equals_plain_greedy(ckpts):
    target, draft = ckpts("llama"), ckpts("llama", seed=5, num_hidden_layers=1)
    cfg = GenerationConfig(max_new_tokens=20, eos_ids=[])
    plain = _ours(target, PROMPTS, cfg)
    for k in (1, 3):
        spec = _ours(target, PROMPTS, GenerationConfig(max_new_tokens=20, eos_ids=[], speculate_k=k), draft=draft)
        assert [r.tokens for r in spec] == [r.tokens for r in plain]
        assert all(0 <= r.acceptance_rate <= 1 for r in spec)
    self_draft = _ours(target, PROMPTS[:1], cfg, draft=target)[0]  # the target as its own draft
    assert self_draft.tokens == plain[0].tokens and self_draft.acceptance_rate == 1.0
    lookup = _ours(target, PROMPTS, GenerationConfig(max_new_tokens=20, eos_ids=[], prompt_lookup=3))
    assert [r.tokens for r in lookup] == [r.tokens for r in plain]


def test_speculative_with_penalties_equals_plain(ckpts):
    target, draft = ckpts("llama"), ckpts("llama", seed=5, num_hidden_layers=1)
    cfg = dict(max_new_tokens=16, eos_ids=[], repetition_penalty=1.3, no_repeat_ngram_size=2)
    plain = _ours(target, PROMPTS, GenerationConfig(**cfg))
    spec = _ours(target, PROMPTS, GenerationConfig(**cfg), draft=draft)
    assert [r.tokens for r in spec] == [r.tokens for r in plain]


def test_speculative_accept_rule_preserves_target_distribution():
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.2, 0.2, 0.1])
    q = torch.tensor([0.1, 0.6, 0.1, 0.2])
    counts = torch.zeros(4)
    n = 8000
    for _ in range(n):
        x = int(torch.multinomial(q, 1, generator=g))
        ok, other = _accept(p, q, x, g)
        counts[x if ok else other] += 1
    assert torch.allclose(counts / n, p, atol=0.025)
    counts.zero_()
    for _ in range(n):  # point-mass draft (prompt lookup) proposing token 1
        ok, other = _accept(p, None, 1, g)
        counts[1 if ok else other] += 1
    assert torch.allclose(counts / n, p, atol=0.025)


def test_speculative_sampling_is_seeded(ckpts):
    target, draft = ckpts("llama"), ckpts("llama", seed=5, num_hidden_layers=1)
    cfg = lambda: GenerationConfig(max_new_tokens=12, eos_ids=[], temperature=0.9, seed=7)  # noqa: E731
    assert _ours(target, PROMPTS, cfg(), draft=draft)[0].tokens == _ours(target, PROMPTS, cfg(), draft=draft)[0].tokens


# -- sampling, processors, stop strings ----------------------------------------------------

def test_seeded_sampling_is_reproducible(ckpts):
    path = ckpts("llama")
    cfg = lambda seed: GenerationConfig(max_new_tokens=12, temperature=1.0, top_k=20, top_p=0.95,  # noqa: E731
                                        min_p=0.01, typical_p=0.99, seed=seed, eos_ids=[])
    a, b, c = (_ours(path, PROMPTS, cfg(s)) for s in (1, 1, 2))
    assert [r.tokens for r in a] == [r.tokens for r in b]
    assert [r.tokens for r in a] != [r.tokens for r in c]


def test_greedy_with_repetition_penalty_and_ngram_matches_transformers(ckpts):
    path = ckpts("llama")
    tok = load_tokenizer(path)
    cfg = GenerationConfig(max_new_tokens=14, repetition_penalty=1.5, no_repeat_ngram_size=2)
    for prompt in PROMPTS[:2]:
        expected = _strip_pad(_hf_generate(path, tok.encode(prompt), do_sample=False, max_new_tokens=14,
                                           repetition_penalty=1.5, no_repeat_ngram_size=2))
        assert _ours(path, [prompt], cfg)[0].tokens == expected


def test_stop_string_and_min_new_tokens(ckpts):
    path = ckpts("llama")
    full = _ours(path, [PROMPTS[0]], GenerationConfig(max_new_tokens=16, eos_ids=[]))[0]
    stop = full.text[5:8]
    cut = _ours(path, [PROMPTS[0]], GenerationConfig(max_new_tokens=16, eos_ids=[], stop=[stop]))[0]
    assert cut.finish_reason == "stop" and cut.text == full.text[: full.text.index(stop)]
    assert full.tokens[: len(cut.tokens)] == cut.tokens
    first = full.tokens[0]
    early = _ours(path, [PROMPTS[0]], GenerationConfig(max_new_tokens=8, eos_ids=[first], min_new_tokens=3))[0]
    assert first not in early.tokens[:3]


def test_prompt_longer_than_context(ckpts):
    from llmctl.errors import UsageError

    path = ckpts("llama")
    long = "the quick brown fox " * 40
    with pytest.raises(UsageError, match="the model's context is 96"):
        _ours(path, [long], GenerationConfig(max_new_tokens=8))
    short = _ours(path, ["the quick brown"], GenerationConfig(max_new_tokens=200, eos_ids=[]))[0]
    assert short.prompt_tokens + len(short.tokens) == 96 and short.finish_reason == "length"
    r = _ours(path, [long], GenerationConfig(max_new_tokens=8, truncate="left", eos_ids=[]))[0]
    assert r.prompt_tokens == 88 and len(r.tokens) == 8


# -- the command ----------------------------------------------------------------------------

def test_cli_json_single_prompt_and_stdin(llmctl, ckpts, monkeypatch):
    import io

    path = ckpts("llama")
    r = llmctl("generate", path, "the quick brown", "--max-new-tokens", "6", "--temperature", "0", "--json")
    assert r.code == 0, r.stderr
    data = r.json()
    assert set(data) >= {"text", "tokens", "finish_reason", "prefill_tokens_per_s", "decode_tokens_per_s"}
    assert data["tokens"] == _ours(path, ["the quick brown"], GenerationConfig(max_new_tokens=6))[0].tokens
    monkeypatch.setattr("sys.stdin", io.StringIO("the quick brown"))
    r2 = llmctl("generate", path, "-", "-n", "6")
    assert r2.code == 0, r2.stderr
    assert r2.stdout == data["text"] + "\n"  # streamed text


def test_cli_jsonl_batched_in_order_and_bad_line(llmctl, ckpts, tmp_path):
    path = ckpts("llama")
    lines = [{"prompt": p, "id": i} for i, p in enumerate(PROMPTS)]
    lines.append({"messages": [{"role": "user", "content": "hi"}]})
    good = tmp_path / "p.jsonl"
    good.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    r = llmctl("generate", path, "--input", good, "-n", "5", "--batch-size", "2", "--quiet")
    assert r.code == 0, r.stderr
    out = [json.loads(x) for x in r.stdout.splitlines()]
    assert [o.get("id") for o in out] == [0, 1, 2, None] and [o["line"] for o in out] == [1, 2, 3, 4]
    alone = _ours(path, PROMPTS, GenerationConfig(max_new_tokens=5))
    assert [o["tokens"] for o in out[:3]] == [a.tokens for a in alone]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(lines[0]) + "\n" + json.dumps(lines[1]) + "\n{oops\n" + json.dumps(lines[2]) + "\n")
    r = llmctl("generate", path, "--input", bad, "-n", "3", "--quiet")
    assert r.code == 1 and "bad.jsonl:3" in r.stderr
    assert len(r.stdout.splitlines()) == 2  # the results before the bad line are kept
    empty = tmp_path / "empty.jsonl"  # valid JSON, but a prompt the model cannot take, in a batch with good ones
    empty.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in [*PROMPTS[:2], "", PROMPTS[2]]))
    r = llmctl("generate", path, "--input", empty, "-n", "3", "--batch-size", "4", "--quiet")
    assert r.code == 2 and r.stderr.strip() == f"error: {empty}:3: the prompt is empty (no tokens)"
    assert [json.loads(x)["line"] for x in r.stdout.splitlines()] == [1, 2]


@pytest.mark.parametrize("settings", [dict(temperature=1.3), dict(temperature=1.0, num_beams=2)])
def test_a_prompts_sample_does_not_depend_on_its_batch(ckpts, settings):
    """Each prompt draws from its own generator (seed + its index): batched or alone, at any batch
    size, a prompt samples the same tokens; `first_index` continues the numbering."""
    path = ckpts("llama")
    cfg = GenerationConfig(max_new_tokens=12, seed=7, **settings)
    alone = [_ours(path, [p], replace(cfg, seed=7 + i))[0].tokens for i, p in enumerate(PROMPTS)]
    for size in (2, len(PROMPTS)):
        assert [r.tokens for r in _ours(path, PROMPTS, replace(cfg, batch_size=size))] == alone, size
    model, tok = _llmctl_model(path)
    assert [r.tokens for r in generate(model, tok, PROMPTS[1:], cfg, first_index=1)] == alone[1:]
    assert len(set(map(tuple, alone))) > 1  # the draws differ between prompts


def test_cli_jsonl_keeps_each_lines_sample_when_a_line_is_refused(llmctl, ckpts, tmp_path):
    """A refused line re-runs its batch one prompt at a time: the good lines still draw what they
    draw in a batch without the bad line."""
    path = ckpts("llama")
    lines = [*PROMPTS[:2], "", PROMPTS[2]]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in lines))
    flags = ["-n", "6", "--temperature", "1.3", "--seed", "5", "--quiet"]
    r = llmctl("generate", path, "--input", empty, "--batch-size", "4", *flags)
    assert r.code == 2
    clean = tmp_path / "clean.jsonl"
    clean.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS[:2]))
    want = llmctl("generate", path, "--input", clean, "--batch-size", "2", *flags)
    assert want.code == 0, want.stderr
    assert [json.loads(x)["tokens"] for x in r.stdout.splitlines()] == \
        [json.loads(x)["tokens"] for x in want.stdout.splitlines()]


def test_cli_jsonl_from_stdin(llmctl, ckpts, monkeypatch):
    import io

    path = ckpts("llama")
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS)))
    r = llmctl("generate", path, "--input", "-", "-n", "4", "--quiet")
    assert r.code == 0, r.stderr
    alone = _ours(path, PROMPTS, GenerationConfig(max_new_tokens=4))
    assert [json.loads(x)["tokens"] for x in r.stdout.splitlines()] == [a.tokens for a in alone]


@pytest.mark.parametrize("args, code, message", [
    (["hi", "--num-beams", "2", "--draft", "X"], 2, "cannot be combined"),
    (["hi", "--num-beams", "2", "--penalty-alpha", "0.5"], 2, "cannot be combined"),
    (["hi", "--top-p", "1.5", "--temperature", "1"], 2, "--top-p"),
    ([], 2, "exactly one of"),
    (["hi", "--rope-scaling", "linear"], 2, "--rope-factor"),
    (["hi", "--system", "be brief"], 2, "--system goes with --chat"),  # was ignored silently
])
def test_cli_bad_flags(llmctl, ckpts, args, code, message):
    r = llmctl("generate", ckpts("llama"), *args)
    assert r.code == code and message in r.stderr, r.stderr


def test_cli_missing_tokenizer_and_long_prompt(llmctl, ckpts, tmp_path):
    import shutil

    src = ckpts("llama")
    bare = tmp_path / "bare"
    shutil.copytree(src, bare)
    (bare / "tokenizer.json").unlink()
    r = llmctl("generate", bare, "hi")
    assert r.code == 1 and "has no tokenizer.json" in r.stderr
    long = "the quick brown fox " * 40
    r = llmctl("generate", src, long, "-n", "4")
    assert r.code == 2 and "--truncate left" in r.stderr
    r = llmctl("generate", src, long, "-n", "4", "--truncate", "left", "--json")
    assert r.code == 0 and r.json()["prompt_tokens"] == 92
    medium = "the quick brown fox " * 15  # over 96 tokens, under 4 × 96
    r = llmctl("generate", src, medium, "-n", "4", "--rope-scaling", "linear", "--rope-factor", "4", "--json")
    assert r.code == 0 and r.json()["prompt_tokens"] > 96


def test_cli_chat_keeps_history_and_resets(llmctl, ckpts, monkeypatch):
    import io

    path = ckpts("llama")
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\nagain\n/reset\nhello\n/exit\nignored\n"))
    r = llmctl("generate", path, "--chat", "-n", "4", "--json", "--ignore-eos")
    assert r.code == 0, r.stderr
    replies = [json.loads(x) for x in r.stdout.splitlines()]
    assert len(replies) == 3
    assert replies[0]["tokens"] == replies[2]["tokens"]  # after /reset the history is gone
    assert replies[1]["prompt_tokens"] > replies[0]["prompt_tokens"]  # the 2nd turn sees the 1st


def test_cli_speculative_and_beam(llmctl, ckpts):
    target, draft = ckpts("llama"), ckpts("llama", seed=5, num_hidden_layers=1)
    plain = llmctl("generate", target, "the quick", "-n", "8", "--json", "--ignore-eos").json()
    spec = llmctl("generate", target, "the quick", "-n", "8", "--json", "--ignore-eos", "--draft", draft).json()
    assert spec["tokens"] == plain["tokens"] and "acceptance_rate" in spec
    beam = llmctl("generate", target, "the quick", "-n", "8", "--num-beams", "3", "--length-penalty", "0",
                  "--json", "--ignore-eos").json()
    expected = _ours(target, ["the quick"], GenerationConfig(max_new_tokens=8, num_beams=3, length_penalty=0.0,
                                                             eos_ids=[]))[0]
    assert beam["tokens"] == expected.tokens and beam["tokens"] != plain["tokens"]  # the beams were searched


@pytest.mark.parametrize("arch", ["mistral", "gpt2"])
def test_compiled_decode_step_equals_eager(ckpts, arch):
    """`--compile`: a fixed-shape step, compiled once, gives the eager tokens (padded batch too)."""
    from torch._dynamo.utils import counters

    path = ckpts(arch)
    eager = _ours(path, PROMPTS, GenerationConfig(max_new_tokens=20))
    model, tok = load_model(path)[0], load_tokenizer(path)  # fresh: no RoPE tables, nothing compiled
    counters.clear()
    compiled = generate(model, tok, PROMPTS, GenerationConfig(max_new_tokens=20, compile=True))
    assert [r.tokens for r in compiled] == [r.tokens for r in eager]
    alone = generate(model, tok, PROMPTS[:1], GenerationConfig(max_new_tokens=24, compile=True))  # a new shape
    assert alone[0].tokens[:20] == eager[0].tokens
    assert counters["stats"]["unique_graphs"] == 2  # one per batch shape, not one per step


def test_compiled_step_in_beam_and_contrastive_search_and_speculative_draft(ckpts, monkeypatch):
    path, draft = ckpts("mistral"), ckpts("llama", seed=5, num_hidden_layers=1)
    beam = dict(max_new_tokens=12, num_beams=3, eos_ids=[])
    assert (_ours(path, PROMPTS[:1], GenerationConfig(**beam, compile=True))[0].tokens
            == _ours(path, PROMPTS[:1], GenerationConfig(**beam))[0].tokens)
    contrastive = dict(max_new_tokens=10, penalty_alpha=0.6, top_k=3, eos_ids=[])  # a padded batch of 2
    steps, static_step = [], search.Runner._static_step
    monkeypatch.setattr(search.Runner, "_static_step", lambda self, ids: steps.append(ids.shape) or static_step(self, ids))
    eager = _ours(path, PROMPTS[:2], GenerationConfig(**contrastive))
    assert steps == []  # without --compile (and off CUDA) every step runs the model's forward
    compiled = _ours(path, PROMPTS[:2], GenerationConfig(**contrastive, compile=True))
    assert [r.tokens for r in compiled] == [r.tokens for r in eager]
    assert steps == [(6, 1)] * 11  # the warm-up and 10 candidate steps: 2 prompts × 3 rows, compiled
    spec = dict(max_new_tokens=16, eos_ids=[], speculate_k=3)
    target = ckpts("llama")
    compiled = _ours(target, PROMPTS[:1], GenerationConfig(**spec, compile=True), draft=draft)[0]
    assert compiled.tokens == _ours(target, PROMPTS[:1], GenerationConfig(max_new_tokens=16, eos_ids=[]))[0].tokens
    eager = _ours(target, PROMPTS[:1], GenerationConfig(**spec), draft=draft)[0]
    assert compiled.acceptance_rate == eager.acceptance_rate  # the compiled draft proposes the same tokens
