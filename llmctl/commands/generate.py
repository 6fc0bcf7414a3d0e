"""`llmctl generate CKPT [PROMPT|-]`: text from a checkpoint — one prompt, stdin, a JSONL file
of prompts (batched), or an interactive chat. Decoding logic lives in `llmctl.core.generate`."""

import json
import re
import sys
from enum import Enum
from pathlib import Path
from types import NoneType
from typing import Annotated, Any, Iterator, Optional

import typer

from llmctl.console import REPORTER, console, info, print_json, warn
from llmctl.errors import DataError, UsageError
from llmctl.options import option
from llmctl.runtime import options

SAMPLING = "Sampling"
SEARCH = "Search"
SPECULATIVE = "Speculative decoding"
INPUT = "Input and context"


class RopeScaling(str, Enum):
    linear = "linear"
    dynamic = "dynamic"
    yarn = "yarn"


class Truncate(str, Enum):
    error = "error"
    left = "left"



def generate(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint directory (llmctl or Hugging Face).", show_default=False)],
    prompt: Annotated[Optional[str], typer.Argument(help="The prompt, or '-' to read it from stdin.", show_default=False)] = None,
    max_new_tokens: Annotated[Optional[int], option("--max-new-tokens", "-n", help="Tokens to generate at most (default 128).", panel=SEARCH)] = None,
    min_new_tokens: Annotated[int, option("--min-new-tokens", help="Suppress EOS before this many tokens.", panel=SEARCH)] = 0,
    temperature: Annotated[Optional[float], option("--temperature", "-t", help="0 = greedy (default: the checkpoint's generation_config, else 0).", panel=SAMPLING)] = None,
    top_k: Annotated[Optional[int], option("--top-k", help="Keep the k most likely tokens (also contrastive search's k).", panel=SAMPLING)] = None,
    top_p: Annotated[Optional[float], option("--top-p", help="Nucleus sampling mass.", panel=SAMPLING)] = None,
    min_p: Annotated[float, option("--min-p", help="Drop tokens below min-p × the top probability.", panel=SAMPLING)] = 0.0,
    typical_p: Annotated[float, option("--typical-p", help="Locally typical sampling mass.", panel=SAMPLING)] = 1.0,
    repetition_penalty: Annotated[Optional[float], option("--repetition-penalty", help="CTRL repetition penalty (>1 discourages repeats; default: generation_config.json's, else 1).", panel=SAMPLING)] = None,
    frequency_penalty: Annotated[float, option("--frequency-penalty", help="Subtract α × count of each generated token.", panel=SAMPLING)] = 0.0,
    presence_penalty: Annotated[float, option("--presence-penalty", help="Subtract α from every generated token.", panel=SAMPLING)] = 0.0,
    no_repeat_ngram: Annotated[int, option("--no-repeat-ngram", help="Forbid repeating any n-gram of this size.", panel=SAMPLING)] = 0,
    num_beams: Annotated[int, option("--num-beams", help="Beam search with this many beams.", panel=SEARCH)] = 1,
    length_penalty: Annotated[float, option("--length-penalty", help="Beam score = logprob / length^penalty.", panel=SEARCH)] = 1.0,
    early_stopping: Annotated[str, option("--early-stopping", help="Beam search: true, false or never.", panel=SEARCH)] = "false",
    penalty_alpha: Annotated[float, option("--penalty-alpha", help="Contrastive search degeneration penalty (with --top-k).", panel=SEARCH)] = 0.0,
    strategy: Annotated[Optional[str], option("--strategy", help="Decoding strategy by name, e.g. one a plugin adds (default: from the flags).", panel=SEARCH)] = None,
    plugin_arg: Annotated[Optional[list[str]], option("--plugin-arg", help="KEY=VALUE for a plugin's logits processor or decoding strategy (repeatable; its cfg.plugin_args).", panel=SEARCH)] = None,
    stop: Annotated[Optional[list[str]], option("--stop", help="Stop string (repeatable); excluded from the text.", panel=SEARCH)] = None,
    ignore_eos: Annotated[bool, option("--ignore-eos", help="Keep generating past EOS.", panel=SEARCH)] = False,
    draft: Annotated[Optional[Path], option("--draft", help="Draft checkpoint for speculative decoding.", panel=SPECULATIVE)] = None,
    speculate_k: Annotated[int, option("--speculate-k", help="Tokens proposed per speculation step (default 4).", panel=SPECULATIVE)] = 4,
    prompt_lookup: Annotated[int, option("--prompt-lookup", help="Prompt-lookup decoding with n-grams up to N (no draft model).", panel=SPECULATIVE)] = 0,
    chat: Annotated[bool, option("--chat", help="Interactive multi-turn chat (/reset, /exit).", panel=INPUT)] = False,
    system: Annotated[Optional[str], option("--system", help="System message for --chat.", panel=INPUT)] = None,
    input: Annotated[Optional[Path], option("--input", "-i", help="JSONL of {\"prompt\": …} or {\"messages\": […]}; one JSON result per line.", panel=INPUT)] = None,
    batch_size: Annotated[int, option("--batch-size", help="Prompts decoded together with --input (default 16).", panel=INPUT)] = 16,
    truncate: Annotated[Truncate, option("--truncate", help="Prompt longer than the context: error, or drop its left part.", panel=INPUT)] = Truncate.error,
    rope_scaling: Annotated[Optional[RopeScaling], option("--rope-scaling", help="Extend the context with RoPE scaling.", panel=INPUT)] = None,
    rope_factor: Annotated[Optional[float], option("--rope-factor", help="Context extension factor for --rope-scaling.", panel=INPUT)] = None,
    compile: Annotated[bool, option("--compile", help="torch.compile the decode step.", panel=INPUT)] = False,
    cuda_graph: Annotated[bool, option("--cuda-graph/--no-cuda-graph",
                                     help="On CUDA, replay each one-token step from a CUDA graph.", panel=INPUT)] = True,
) -> None:
    """Generate text: streamed to stdout, or one JSON object per prompt with --json / --input."""
    sources = [s for s, on in (("PROMPT", prompt is not None), ("--input", input is not None), ("--chat", chat)) if on]
    if len(sources) != 1:
        raise UsageError("give exactly one of PROMPT (or '-'), --input FILE, --chat" + (f" (got {', '.join(sources)})" if sources else ""))
    if system is not None and not chat:
        raise UsageError("--system goes with --chat; for one-shot chat prompts give --input with "
                         '{"messages": [{"role": "system", …}, …]} lines')
    if (rope_scaling is None) != (rope_factor is None):
        raise UsageError("--rope-scaling and --rope-factor go together")
    if rope_factor is not None and rope_factor <= 1:
        raise UsageError("--rope-factor must be > 1")
    if input is not None and str(input) != "-" and (not input.exists() or input.is_dir()):  # a pipe is no is_file()
        raise UsageError(f"--input {input}: no such file")
    if early_stopping not in ("true", "false", "never"):
        raise UsageError(f"--early-stopping must be true, false or never, got '{early_stopping}'")

    from llmctl.config import parse_override
    from llmctl.core.generate import GenerationConfig, strategy_name, validate

    cfg = GenerationConfig(
        max_new_tokens=128 if max_new_tokens is None else max_new_tokens,
        min_new_tokens=min_new_tokens,
        temperature=0.0 if temperature is None else temperature,
        top_k=top_k or 0,
        top_p=1.0 if top_p is None else top_p,
        min_p=min_p,
        typical_p=typical_p,
        repetition_penalty=1.0 if repetition_penalty is None else repetition_penalty,
        frequency_penalty=frequency_penalty,
        presence_penalty=presence_penalty,
        no_repeat_ngram_size=no_repeat_ngram,
        num_beams=num_beams,
        length_penalty=length_penalty,
        early_stopping={"true": True, "false": False}.get(early_stopping, early_stopping),
        penalty_alpha=penalty_alpha,
        speculate_k=speculate_k,
        prompt_lookup=prompt_lookup,
        stop=list(stop or []),
        seed=options.seed,
        batch_size=batch_size,
        truncate=truncate.value,
        compile=compile,
        cuda_graph=cuda_graph,
        strategy=strategy,
        plugin_args=dict(map(parse_override, plugin_arg or [])),
    )
    validate(cfg)
    strategy_name(cfg, draft is not None)  # reject bad combinations before loading anything
    if strategy is not None:
        from llmctl.core.generate.search import SEARCHES

        SEARCHES.get(strategy)  # an unknown name fails before loading, naming the installed ones
    if stop is not None and any(s == "" for s in stop):
        raise UsageError('--stop "": an empty stop string would end every generation at once; give some text')
    if prompt == "-":
        from llmctl.core.data.corpus import read_stdin

        prompt = read_stdin()
    text = prompt

    model, tok, draft_model, context = _load(checkpoint, draft, rope_scaling, rope_factor)
    _apply_checkpoint_defaults(cfg, checkpoint, tok, temperature, top_k, top_p, max_new_tokens, ignore_eos,
                               repetition_penalty)
    if chat:
        _chat(model, tok, cfg, draft_model, context, system)
    elif input is not None:
        _jsonl(model, tok, cfg, draft_model, context, input)
    else:
        _single(model, tok, cfg, draft_model, context, text)


def _load(checkpoint: Path, draft: Path | None, rope_scaling, rope_factor):
    from llmctl.core.checks import check_finite, check_language_model, check_tokenizer_fits
    from llmctl.core.model.io import load_model
    from llmctl.core.tokenizer import load_tokenizer
    from llmctl.errors import CheckpointError
    from llmctl.runtime import resolve_device, resolve_dtype

    if not (checkpoint / "tokenizer.json").is_file():
        if not checkpoint.exists():
            raise UsageError(f"checkpoint {checkpoint}: no such directory")
        raise CheckpointError(f"{checkpoint} has no tokenizer.json; generation needs the checkpoint's tokenizer")
    device, dtype = resolve_device(), resolve_dtype()
    tok = load_tokenizer(checkpoint)
    if draft is not None:  # before any weights load
        _check_draft_tokenizer(draft, tok, checkpoint)
    model, mcfg = load_model(checkpoint, device=device, dtype=dtype)
    check_language_model(mcfg, checkpoint)
    check_tokenizer_fits(tok, mcfg.vocab_size, checkpoint)
    check_finite(model, checkpoint)
    context = getattr(mcfg, "max_seq_len", None)
    if rope_scaling is not None:
        if getattr(mcfg, "position", "rope") != "rope":
            raise UsageError(f"--rope-scaling needs a RoPE model; {checkpoint} uses {mcfg.position} positions")
        mcfg.rope_scaling = {"rope_type": rope_scaling.value, "factor": rope_factor,
                             "original_max_position_embeddings": mcfg.max_seq_len}
        context = int(mcfg.max_seq_len * rope_factor)
    draft_model = None
    if draft is not None:
        draft_model, draft_cfg = load_model(draft, device=device, dtype=dtype)
        check_tokenizer_fits(tok, draft_cfg.vocab_size, draft)
        check_finite(draft_model, draft)
    return model, tok, draft_model, context


def _check_draft_tokenizer(draft: Path, tok, checkpoint: Path) -> None:
    """UsageError if the draft's tokenizer gives ids other meanings than the checkpoint's (same vocabulary
    size or not): its guesses would be other tokens, never accepted. A draft without tokenizer.json is
    taken on trust (its vocabulary size is still checked against the tokenizer's)."""
    from llmctl.core.tokenizer import load_tokenizer

    if not (draft / "tokenizer.json").is_file():
        return
    theirs = load_tokenizer(draft)
    if theirs.hash == tok.hash or theirs.inner.get_vocab(True) == tok.inner.get_vocab(True):
        return
    raise UsageError(f"--draft {draft}: its tokenizer ({theirs.hash}) is not {checkpoint}'s ({tok.hash}); "
                     "a draft must share the checkpoint's vocabulary")


def _apply_checkpoint_defaults(cfg, checkpoint: Path, tok, temperature, top_k, top_p, max_new_tokens, ignore_eos,
                               repetition_penalty=None) -> None:
    """Sampling settings and EOS ids from generation_config.json where the flags are silent, key by key (a
    sampling file's top_k/top_p still apply under --temperature T > 0); a key the file lacks means
    transformers' default (`GenerationConfig`: top_k 50, top_p 1, temperature 1), as there."""
    gen: dict = {}
    file = checkpoint / "generation_config.json"
    if file.is_file():
        try:
            gen = json.loads(file.read_text(encoding="utf-8"))
        except ValueError:
            gen = {}
    if not isinstance(gen, dict):
        gen = {}

    def number(key, default, ok=lambda v: v >= 0):
        """The file's `key` (absent or null: transformers' `default`); CheckpointError unless a number in range."""
        value = gen.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
            from llmctl.errors import CheckpointError

            raise CheckpointError(f"{file}: '{key}' is {value!r}, not a valid {key}")
        return value

    if gen.get("do_sample") and (temperature is None or temperature > 0):  # flags win key by key, as in transformers
        if temperature is None:
            cfg.temperature = float(number("temperature", 1.0)) or 1.0
        if top_k is None:  # transformers' GenerationConfig: top_k 50 where the file has none (null or 0: no top-k)
            cfg.top_k = 0 if "top_k" in gen and gen["top_k"] is None else int(number("top_k", 50))
        if top_p is None:
            cfg.top_p = float(number("top_p", 1.0, lambda v: 0 <= v <= 1)) or 1.0
    if repetition_penalty is None:  # applied to greedy decoding too, as transformers does
        cfg.repetition_penalty = float(number("repetition_penalty", 1.0, lambda v: v > 0))
    if max_new_tokens is None and gen.get("max_new_tokens"):
        cfg.max_new_tokens = int(number("max_new_tokens", cfg.max_new_tokens, lambda v: v >= 1))
    eos = gen.get("eos_token_id")
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    cfg.eos_ids = [] if ignore_eos else sorted(set(tok.stop_ids) | set(eos))


def _run(model, tok, cfg, draft, context, prompts: list, on_text=None, first_index: int = 0):
    from llmctl.core.generate import generate as run

    return run(model, tok, prompts, cfg, draft=draft, on_text=on_text, context=context, report=REPORTER,
               first_index=first_index)


def _stream_stdout(_index: int, text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _single(model, tok, cfg, draft, context, text: str) -> None:
    result = _run(model, tok, cfg, draft, context, [text], None if options.json else _stream_stdout)[0]
    if options.json:
        print_json(result.to_dict())
        return
    sys.stdout.write("\n")
    sys.stdout.flush()
    _report(result)


def _report(result) -> None:
    extra = f", acceptance {result.acceptance_rate:.0%}" if result.acceptance_rate is not None else ""
    info(
        f"[dim]{len(result.tokens)} tokens ({result.finish_reason}); prefill {result.prefill_tokens_per_s:,.0f} tok/s, "
        f"decode {result.decode_tokens_per_s:,.1f} tok/s{extra}[/dim]"
    )


def _read_jsonl(path: Path) -> Iterator[tuple[int, Any, dict]]:
    """(line number, prompt, record) per non-empty line; DataError naming the line otherwise."""
    from llmctl.core.data.corpus import iter_jsonl

    ignored: set[str] = set()
    for number, record in iter_jsonl(path):
        settings = sorted(set(record) - {"prompt", "messages", "id"} - ignored)
        if settings:
            ignored.update(settings)
            warn(f"{path}:{number}: {', '.join(settings)} ignored: --input lines give only 'prompt' or 'messages' "
                 "(and 'id'); set decoding with the command's options")
        if isinstance(record.get("prompt"), str):
            yield number, record["prompt"], record
        elif isinstance(record.get("messages"), list) and record["messages"] and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), (str, NoneType))
                for m in record["messages"]):
            yield number, record["messages"], record
        else:
            raise DataError(f"{path}:{number}: expected a string 'prompt' or a list of 'messages' "
                            "({\"role\": str, \"content\": str} each)")


def _jsonl(model, tok, cfg, draft, context, path: Path) -> None:
    """Batched generation over a JSONL file; results are printed (in order) after each batch,
    so an error on a later line keeps everything printed before it."""
    from llmctl.console import progress

    batch: list[tuple[int, int, Any, dict]] = []  # (prompt's ordinal: its sampling seed's offset, line, prompt, record)

    def flush(bar) -> None:
        if not batch:
            return
        try:
            results = _run(model, tok, cfg, draft, context, [p for _, _, p, _ in batch], first_index=batch[0][0])
        except (UsageError, DataError) as error:  # a prompt the model cannot take (empty, too long)
            if len(batch) == 1:
                where = "stdin" if str(path) == "-" else path
                message = re.sub(r"^prompt \d+ ", "the prompt ", str(error))
                raise type(error)(f"{where}:{batch[0][1]}: {message}") from None
            pending = batch[:]  # one at a time: the lines before the bad one are kept, the error names its line
            batch.clear()
            for item in pending:
                batch.append(item)
                flush(bar)
            return
        for (_, number, _, record), result in zip(batch, results):
            out = {"line": number, **({"id": record["id"]} if "id" in record else {}), **result.to_dict()}
            print_json(out)
            bar.advance(1)
        batch.clear()

    with progress("generating", unit="prompt") as bar:
        lines = enumerate(_read_jsonl(path))
        while True:
            try:
                item = next(lines, None)
            except DataError:
                flush(bar)  # keep (and print) everything before the bad line
                raise
            if item is None:
                break
            batch.append((item[0], *item[1]))
            if len(batch) >= cfg.batch_size:
                flush(bar)
        flush(bar)


def _chat(model, tok, cfg, draft, context, system: str | None) -> None:
    """Multi-turn REPL on stdin/stderr; replies stream to stdout."""
    if tok.chat_template is None:
        raise UsageError("this checkpoint's tokenizer has no chat template (llmctl tokenize set-template)")
    base = [{"role": "system", "content": system}] if system else []
    messages = list(base)
    console.print("[dim]chat: /reset clears the history, /exit quits[/dim]")
    while True:
        try:
            console.print("[bold]>[/bold] ", end="")
            line = sys.stdin.readline()
        except KeyboardInterrupt:
            break
        if not line:
            break
        line = line.strip()
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            messages = list(base)
            console.print("[dim]history cleared[/dim]")
            continue
        if not line:
            continue
        messages.append({"role": "user", "content": line})
        result = _run(model, tok, cfg, draft, context, [messages], None if options.json else _stream_stdout)[0]
        if options.json:
            print_json(result.to_dict())
        else:
            sys.stdout.write("\n")
            sys.stdout.flush()
        messages.append({"role": "assistant", "content": result.text})
