"""Text generation: `generate(model, tok, prompts, GenerationConfig) -> list[Result]`.

Used by `llmctl generate` and by `eval`. A prompt is a string or a list of chat messages
(rendered with the tokenizer's chat template). The strategy is chosen from the config
(`strategy_name`) and looked up in `search.SEARCHES`; logits processors come from
`sampling.PROCESSORS`; streamed text goes to `on_text(prompt_index, text)`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable

from llmctl.core.report import SILENT, Reporter
from llmctl.errors import UsageError


@dataclass
class GenerationConfig:
    max_new_tokens: int = 128
    min_new_tokens: int = 0
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    typical_p: float = 1.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    no_repeat_ngram_size: int = 0
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    penalty_alpha: float = 0.0
    speculate_k: int = 4
    prompt_lookup: int = 0  # max n-gram size for prompt-lookup decoding (0 = off)
    stop: list[str] = field(default_factory=list)
    eos_ids: list[int] | None = None  # None → the tokenizer's stop ids
    seed: int | None = None
    batch_size: int = 16
    truncate: str = "error"  # or "left": drop the oldest prompt tokens to fit the context
    compile: bool = False
    cuda_graph: bool = True  # on CUDA, replay one-token steps from a CUDA graph
    strategy: str | None = None  # explicit strategy name (default: from the settings above)
    plugin_args: dict[str, Any] = field(default_factory=dict)  # settings of plugin processors and strategies

    @property
    def sampling(self) -> bool:
        return self.temperature > 0

    @property
    def min_tokens_to_keep(self) -> int:
        return 1 + len(self.eos_ids or ()) if self.num_beams > 1 else 1


@dataclass
class Result:
    text: str
    tokens: list[int]
    finish_reason: str  # "stop" | "length" | "eos"
    prompt_tokens: int
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    acceptance_rate: float | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if data["acceptance_rate"] is None:
            del data["acceptance_rate"]
        return data


def strategy_name(cfg: GenerationConfig, has_draft: bool = False) -> str:
    """The search strategy the settings ask for; invalid combinations are UsageErrors."""
    speculative = has_draft or cfg.prompt_lookup > 0
    wanted = {"speculative": speculative, "beam": cfg.num_beams > 1, "contrastive": cfg.penalty_alpha > 0}
    chosen = [name for name, on in wanted.items() if on]
    if len(chosen) > 1:
        flags = {"speculative": "--draft/--prompt-lookup", "beam": "--num-beams", "contrastive": "--penalty-alpha"}
        raise UsageError(f"{' and '.join(flags[c] for c in chosen)} cannot be combined")
    if has_draft and cfg.prompt_lookup > 0:
        raise UsageError("--draft and --prompt-lookup cannot be combined")
    return cfg.strategy or (chosen[0] if chosen else "sample")


def validate(cfg: GenerationConfig) -> None:
    """Reject out-of-range settings with the flag's name."""
    checks = [
        (cfg.max_new_tokens >= 1, "--max-new-tokens must be >= 1"),
        (cfg.min_new_tokens >= 0, "--min-new-tokens must be >= 0"),
        (cfg.temperature >= 0, "--temperature must be >= 0 (0 = greedy)"),
        (cfg.top_k >= 0, "--top-k must be >= 0"),
        (0 < cfg.top_p <= 1, "--top-p must be in (0, 1]"),
        (0 <= cfg.min_p <= 1, "--min-p must be in [0, 1]"),
        (0 < cfg.typical_p <= 1, "--typical-p must be in (0, 1]"),
        (cfg.repetition_penalty > 0, "--repetition-penalty must be > 0"),
        (cfg.no_repeat_ngram_size >= 0, "--no-repeat-ngram must be >= 0"),
        (cfg.num_beams >= 1, "--num-beams must be >= 1"),
        (0 <= cfg.penalty_alpha <= 1, "--penalty-alpha must be in [0, 1]"),
        (cfg.speculate_k >= 1, "--speculate-k must be >= 1"),
        (cfg.prompt_lookup >= 0, "--prompt-lookup must be >= 0"),
        (cfg.batch_size >= 1, "--batch-size must be >= 1"),
        (cfg.truncate in ("error", "left"), "--truncate must be 'error' or 'left'"),
        (cfg.early_stopping in (True, False, "never"), "--early-stopping must be true, false or never"),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)


def encode_prompt(tok, prompt: str | list[dict]) -> list[int]:
    """Token ids of a plain prompt (with the tokenizer's BOS handling) or a chat conversation."""
    if isinstance(prompt, str):
        return tok.encode(prompt, add_special_tokens=True)
    return tok.encode(tok.apply_chat_template(prompt, add_generation_prompt=True), add_special_tokens=False)


def fit_context(ids: list[int], cfg: GenerationConfig, context: int | None, index: int = 0) -> list[int]:
    """`ids`, left-truncated with `--truncate left` so that prompt + max_new_tokens fits the
    context; a prompt that leaves no room to generate is a UsageError otherwise."""
    if not ids:
        raise UsageError(f"prompt {index + 1} is empty (no tokens)")
    if context is None or len(ids) + cfg.max_new_tokens <= context:
        return ids
    if cfg.truncate == "left":
        room = context - cfg.max_new_tokens
        if room < 1:
            raise UsageError(f"--max-new-tokens {cfg.max_new_tokens} leaves no room for a prompt (context {context})")
        return ids[-room:]
    if len(ids) < context:
        return ids  # generation is shortened to fit (see `generate`)
    raise UsageError(
        f"prompt {index + 1} has {len(ids)} tokens, the model's context is {context} "
        f"(use --truncate left, or extend it with --rope-scaling)"
    )


def generate(
    model,
    tok,
    prompts: list[str | list[dict]],
    cfg: GenerationConfig,
    *,
    draft=None,
    on_text: Callable[[int, str], None] | None = None,
    context: int | None = None,
    report: Reporter = SILENT,
    first_index: int = 0,
) -> list[Result]:
    """Generate one continuation per prompt, in order (batched `cfg.batch_size` at a time).

    `draft` is a draft model for speculative decoding; `context` overrides the model's
    `cfg.max_seq_len` as the longest allowed prompt + generation; warnings go to `report`.
    Sampling draws prompt i from its own generator seeded `cfg.seed + first_index + i`, so a
    prompt's sample does not depend on the batch it is decoded in (nor on the batch size).
    """
    import torch

    from llmctl.core.generate.sampling import build_processors
    from llmctl.core.model.attention import inference_backends
    from llmctl.core.generate.search import SEARCHES, Job
    from llmctl.core.generate.stream import Sequence

    validate(cfg)
    name = strategy_name(cfg, draft is not None)
    search = SEARCHES.get(name)
    if cfg.eos_ids is None:
        cfg = replace(cfg, eos_ids=list(tok.stop_ids))
    param = next(model.parameters())
    vocab = model.cfg.vocab_size
    if draft is not None and draft.cfg.vocab_size != vocab:
        raise UsageError(f"--draft vocabulary ({draft.cfg.vocab_size}) differs from the model's ({vocab})")
    context = context if context is not None else getattr(model.cfg, "max_seq_len", None)
    ids = [fit_context(encode_prompt(tok, p), cfg, context, i) for i, p in enumerate(prompts)]
    processors = build_processors(cfg, sampling=cfg.sampling and name != "contrastive")
    generators = None
    if cfg.sampling:
        seed = (cfg.seed if cfg.seed is not None else int(torch.randint(2**62, ()).item())) + first_index
        generators = [torch.Generator(device=param.device).manual_seed(seed + i) for i in range(len(ids))]
    step = 1 if name == "speculative" else cfg.batch_size
    results: list[Result] = []
    with torch.inference_mode(), inference_backends(param.device):
        for first in range(0, len(ids), step):
            chunk = ids[first : first + step]
            chunk_cfg = _fit_steps(cfg, context, max(len(p) for p in chunk), report)
            seqs = [
                Sequence(
                    tok.decode,
                    p,
                    max_new_tokens=chunk_cfg.max_new_tokens,
                    eos_ids=cfg.eos_ids,
                    stops=cfg.stop,
                    on_text=None if on_text is None else (lambda text, i=first + j: on_text(i, text)),
                )
                for j, p in enumerate(chunk)
            ]
            job = Job(chunk_cfg, chunk, seqs, processors, cfg.sampling, generators and generators[first : first + step],
                      vocab, param.device, draft=draft)
            search(model, job)
            results.extend(_result(job, seq, p, name == "speculative") for seq, p in zip(seqs, chunk))
    return results


def _fit_steps(cfg: GenerationConfig, context: int | None, longest: int, report: Reporter) -> GenerationConfig:
    """`cfg`, with max_new_tokens lowered (and a warning) if the longest prompt leaves less room."""
    if context is None or longest + cfg.max_new_tokens <= context:
        return cfg
    steps = context - longest
    report.warn(f"generating at most {steps} tokens: a {longest}-token prompt fills the context of {context} otherwise")
    return replace(cfg, max_new_tokens=steps)


def _result(job, seq, prompt: list[int], speculative: bool) -> Result:
    seq.close()
    prompt_total = sum(len(p) for p in job.prompts)
    return Result(
        text=seq.text,
        tokens=seq.tokens,
        finish_reason=seq.finish_reason,
        prompt_tokens=len(prompt),
        prefill_tokens_per_s=round(prompt_total / job.prefill_s, 2) if job.prefill_s else 0.0,
        decode_tokens_per_s=round(len(seq.tokens) / job.decode_s, 2) if job.decode_s else 0.0,
        acceptance_rate=round(job.accepted / max(job.proposed, 1), 4) if speculative else None,
    )
