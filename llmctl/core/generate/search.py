"""Search strategies: greedy/sampling, beam search, contrastive search.

A strategy is a registered function `(model, job) -> None` that decodes `job.prompts` and feeds
every generated token to the matching `job.seqs[i]` (a `stream.Sequence`), recording timings
in `job`. `Runner` owns one batch's pre-allocated KV cache, attention mask and positions.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from llmctl.core.generate.sampling import History, Processor, apply_processors, choose, draw
from llmctl.core.generate.stream import Sequence
from llmctl.core.registry import Registry
from llmctl.errors import UsageError

SEARCHES: Registry[Callable] = Registry("decoding strategy", "llmctl.decoding_strategies",
                                    modules=("llmctl.core.generate.speculative",))


@dataclass
class Job:
    """Everything a strategy needs for one batch of prompts."""

    cfg: Any  # GenerationConfig
    prompts: list[list[int]]
    seqs: list[Sequence]
    processors: list[Processor]
    sampling: bool
    generators: list[torch.Generator] | None  # one per prompt (sampling)
    vocab_size: int
    device: torch.device
    draft: Any = None  # draft model (speculative decoding)
    prefill_s: float = 0.0
    decode_s: float = 0.0
    proposed: int = 0  # speculative: draft tokens proposed / accepted
    accepted: int = 0

    def history(self, rows: list[list[int]] | None = None) -> History | None:
        """A History over `rows` (default: the prompts) when a processor needs one."""
        if not self.processors:
            return None
        return History(self.prompts if rows is None else rows, self.vocab_size, self.device)

    def process(self, scores: torch.Tensor, history: History | None) -> torch.Tensor:
        return apply_processors(self.processors, scores, history) if self.processors else scores


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Runner:
    """Runs `model` over a left-padded batch with a pre-allocated KV cache.

    Unpadded batches pass neither mask nor positions (the model derives them from the cache
    offset); padded ones keep a [B, max_len] mask buffer and per-row next positions.
    One-token steps go through `Transformer.decode_step` (fixed shapes) when it is compiled
    (`compile`) or replayed from a CUDA graph (`cuda_graph`, on CUDA where the model allows);
    else, for one row on CPU, through the native plan (`core/native/decode.py`) where it takes
    the model. `hidden`: every call also leaves the new positions' `final_hidden` [B, T, hidden]
    in `self.hidden` (contrastive search).
    """

    def __init__(self, model, prompts: list[list[int]], max_len: int, device: torch.device, compile: bool = False,
                 cuda_graph: bool = False, hidden: bool = False):
        from llmctl.core.generate.graphs import graphable

        self.model, self.keep_hidden, self.hidden = model, hidden, None
        self.graphed = cuda_graph and device.type == "cuda" and graphable(model)
        self.step_fn = compiled_decode_step(model) if compile else model.decode_step if self.graphed else None
        if self.step_fn is not None and hidden:
            self.step_fn = functools.partial(self.step_fn, hidden=True)
        if self.step_fn is None and device.type == "cpu" and len(prompts) == 1 and not hidden:
            from llmctl.core.native.decode import native_step

            self.step_fn = native_step(model)  # None where the native plan does not take the model
        width = max(len(p) for p in prompts)
        if compile:  # one compiled graph per (batch, cache size): round the size up
            max_len = -(-max_len // CACHE_BUCKET) * CACHE_BUCKET
        self.ids = torch.zeros(len(prompts), width, dtype=torch.long)
        lengths = torch.tensor([len(p) for p in prompts])
        for i, p in enumerate(prompts):
            self.ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        self.ids = self.ids.to(device)
        self.cache = model.make_cache(len(prompts), max_len, device=device)
        self.length = 0
        self.mask = self.next_pos = None
        if bool((lengths < width).any()):
            self.mask = torch.ones(len(prompts), max_len, dtype=torch.long, device=device)
            self.mask[:, :width] = torch.arange(width)[None, :] >= (width - lengths)[:, None]
            self.next_pos = lengths.to(device)[:, None]
        if compile or self.graphed:
            self._prepare_step()

    def _prepare_step(self) -> None:
        """Compile (or look up) the step for this batch and cache size, and capture its CUDA
        graph, before anything is timed; the dummy token written in slot 0 is overwritten by
        the prefill."""
        from llmctl.core.generate.graphs import GraphedStep

        next_pos = self.next_pos
        dummy = torch.zeros(self.cache.batch_size, 1, dtype=torch.long, device=self.ids.device)
        if self.graphed:
            self.step_fn = GraphedStep(self.step_fn, *self._step_inputs(dummy))
        else:  # eagerly first, so that layers make their kernels' weight layouts outside the graph
            self.model.decode_step(*self._step_inputs(dummy))
            self._static_step(dummy)
        self.cache.truncate(0)
        self.length, self.next_pos = 0, next_pos

    @property
    def padded(self) -> bool:
        return self.mask is not None

    def prefill(self, keep: int = 1) -> torch.Tensor:
        """Run the prompts; returns the logits of the last `keep` positions (0 = all) [B, keep, V]."""
        width = self.ids.shape[1]
        mask = None if self.mask is None else self.mask[:, :width]  # the model counts positions from it
        logits = self._run(self.ids, mask, keep)
        self.length = width
        return logits

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Append `ids` [B, T] to every row; returns logits [B, T, V]."""
        n = ids.shape[1]
        if n == 1 and self.step_fn is not None:
            return self._static_step(ids)
        mask = None if self.mask is None else self.mask[:, : self.length + n]
        logits = self._run(ids, mask)
        if self.next_pos is not None:
            self.next_pos = self.next_pos + n
        self.length += n
        return logits

    def _run(self, ids: torch.Tensor, mask: torch.Tensor | None, keep: int = 0) -> torch.Tensor:
        """The model's forward over the cache; logits of the last `keep` positions (0: all)."""
        out = self.model(ids, attention_mask=mask, cache=self.cache, logits_to_keep=keep, skip_head=self.keep_hidden)
        if not self.keep_hidden:
            return out.logits
        self.hidden = self.model.final_hidden(out.features)
        return self.model.head(out.features)

    def _step_inputs(self, ids: torch.Tensor) -> tuple:
        """`decode_step`'s arguments for the next token `ids` [B, 1]."""
        slot = torch.full((1,), self.cache.length, dtype=torch.long, device=ids.device)
        if self.mask is None:
            positions, padding = slot.expand(ids.shape[0], 1), None
        else:
            positions, padding = self.next_pos, self.mask.bool()
        return ids, positions, padding, self.cache.keys, self.cache.values, slot

    def _static_step(self, ids: torch.Tensor) -> torch.Tensor:
        logits = self.step_fn(*self._step_inputs(ids))
        if self.keep_hidden:
            logits, hidden = logits
            self.hidden = hidden[:, None]
        if self.mask is not None:
            self.next_pos = self.next_pos + 1
        self.cache.advance(1)
        self.length += 1
        return logits[:, None]

    def truncate(self, length: int) -> None:
        """Forget everything after the first `length` cached tokens (all rows)."""
        if self.next_pos is not None:
            self.next_pos = self.next_pos - (self.length - length)
        self.cache.truncate(length)
        self.length = length

    def reorder(self, index: torch.Tensor) -> None:
        """Make row i a copy of row index[i] (beam and contrastive search)."""
        self.cache.reorder(index)
        if self.mask is not None:
            self.mask = self.mask[index]
            self.next_pos = self.next_pos[index]


CACHE_BUCKET = 256  # compiled decoding: cache sizes are multiples of this


def compiled_decode_step(model) -> Callable:
    """`model.decode_step` under torch.compile with static shapes, made once per model. On CPU
    the weights are frozen into the graph (so they must not change afterwards) and batch-1
    products stream (`matvec`); on CUDA the compiled step is then captured in a CUDA graph by
    the Runner."""
    step = getattr(model, "_llmctl_compiled_step", None)
    if step is None:
        import torch._dynamo
        import torch._inductor.config

        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        if model.model.embed_tokens.weight.device.type != "cpu":
            step = torch.compile(model.decode_step, dynamic=False)
        else:
            from llmctl.core.generate import matvec

            compiled = torch.compile(model.decode_step, dynamic=False, backend=matvec.backend)

            def step(*args, **kwargs):
                # freezing (read when a graph is compiled): weights become constants that
                # inductor pre-packs for its GEMM kernels; it applies under inference_mode only
                with torch._inductor.config.patch(freezing=True, cpp_wrapper=True):
                    return compiled(*args, **kwargs)

        model._llmctl_compiled_step = step
    return step


def _max_len(job: Job) -> int:
    return max(len(p) for p in job.prompts) + job.cfg.max_new_tokens


@SEARCHES.register("sample")
def sample_search(model, job: Job) -> None:
    """Greedy (temperature 0) or ancestral sampling through the processor chain, batched."""
    runner = Runner(model, job.prompts, _max_len(job), job.device, job.cfg.compile, job.cfg.cuda_graph)
    logits = _timed_prefill(runner, job)[:, -1]
    start = time.perf_counter()
    history = job.history()
    for _ in range(job.cfg.max_new_tokens):
        scores = job.process(logits.float(), history)
        next_ids = choose(scores, job.sampling, job.generators)
        ids = next_ids.tolist()
        if history is not None:
            history.append(ids, next_ids)
        if all([seq.push(t) for seq, t in zip(job.seqs, ids)]):
            break
        logits = runner.forward(next_ids[:, None])[:, -1]
    job.decode_s = time.perf_counter() - start


def _timed_prefill(runner: Runner, job: Job, keep: int = 1) -> torch.Tensor:
    start = time.perf_counter()
    logits = runner.prefill(keep)
    _sync(job.device)
    job.prefill_s = time.perf_counter() - start
    return logits


@SEARCHES.register("beam")
def beam_search(model, job: Job) -> None:
    """Beam search with `transformers`' scoring: length penalty, `early_stopping` True/False/"never",
    EOS hypotheses kept aside, `2 × beams` candidates per step; `--temperature > 0` samples beams."""
    cfg, nb, V = job.cfg, job.cfg.num_beams, job.vocab_size
    B, steps, dev = len(job.prompts), cfg.max_new_tokens, job.device
    rows = [p for p in job.prompts for _ in range(nb)]
    runner = Runner(model, rows, _max_len(job), dev, cfg.compile, cfg.cuda_graph)
    logits = _timed_prefill(runner, job)[:, -1]
    start = time.perf_counter()
    history = job.history(rows)
    eos = torch.tensor(list(cfg.eos_ids), dtype=torch.long, device=dev)
    keep = max(2, 1 + len(eos)) * nb
    top_beams = torch.arange(keep, device=dev) < nb
    big = -1.0e9
    running = torch.zeros(B, nb, steps, dtype=torch.long, device=dev)
    running_scores = torch.zeros(B, nb, device=dev)
    running_scores[:, 1:] = big
    done_seqs, done_scores = running.clone(), torch.full((B, nb), big, device=dev)
    done_lens = torch.zeros(B, nb, dtype=torch.long, device=dev)
    is_done = torch.zeros(B, nb, dtype=torch.bool, device=dev)
    improvable = torch.ones(B, 1, dtype=torch.bool, device=dev)
    for step in range(steps):
        log_probs = job.process(torch.log_softmax(logits.float(), dim=-1), history)
        flat = (log_probs.view(B, nb, V) + running_scores[:, :, None]).view(B, nb * V)
        if job.sampling:
            index = draw(flat.softmax(-1), keep, job.generators)
            top_scores, order = flat.gather(1, index).sort(dim=-1, descending=True)  # best first, as topk
            index = index.gather(1, order)
        else:
            top_scores, index = torch.topk(flat, keep)
        source, tokens = index // V, index % V
        top_seqs = running.gather(1, source[:, :, None].expand(-1, -1, steps)).clone()
        top_seqs[:, :, step] = tokens
        hits = torch.isin(tokens, eos) | (step + 1 >= steps)

        # the best `nb` unfinished candidates continue
        live_scores = top_scores + hits.float() * big
        pick = torch.topk(live_scores, nb)[1]
        running = top_seqs.gather(1, pick[:, :, None].expand(-1, -1, steps))
        running_scores = live_scores.gather(1, pick)
        parent = source.gather(1, pick)

        # finished candidates among the top `nb` compete with the kept hypotheses
        finished_now = hits & top_beams[None, :]
        scored = top_scores / ((step + 1) ** cfg.length_penalty)
        scored = scored + (is_done.all(-1, keepdim=True) & (cfg.early_stopping is True)).float() * big
        scored = scored + (~improvable).float() * big + (~finished_now).float() * big
        merged_scores = torch.cat([done_scores, scored], 1)
        best = torch.topk(merged_scores, nb)[1]
        done_scores = merged_scores.gather(1, best)
        done_seqs = torch.cat([done_seqs, top_seqs], 1).gather(1, best[:, :, None].expand(-1, -1, steps))
        new_lens = torch.full((B, keep), step + 1, dtype=torch.long, device=dev)
        done_lens = torch.cat([done_lens, new_lens], 1).gather(1, best)
        is_done = torch.cat([is_done, finished_now], 1).gather(1, best)

        # can a running beam still beat the worst kept hypothesis?
        horizon = steps if cfg.early_stopping == "never" and cfg.length_penalty > 0 else step + 1
        best_possible = running_scores[:, :1] / (horizon**cfg.length_penalty)
        worst = torch.where(is_done, done_scores.min(dim=1, keepdim=True)[0], big)
        improvable = improvable & (best_possible > worst).any(-1, keepdim=True)
        all_full = bool(is_done.all()) and cfg.early_stopping is True
        if not bool(improvable.any()) or all_full or bool(hits.all()):
            break

        flat_parent = (torch.arange(B, device=dev)[:, None] * nb + parent).view(-1)
        runner.reorder(flat_parent)
        if history is not None:
            history.reorder(flat_parent.tolist())
            history.append(running[:, :, step].reshape(-1).tolist())
        logits = runner.forward(running[:, :, step].reshape(-1, 1))[:, -1]
    for b, seq in enumerate(job.seqs):
        for t in done_seqs[b, 0, : int(done_lens[b, 0])].tolist():
            seq.push(t)
        seq.close()
    job.decode_s = time.perf_counter() - start


@SEARCHES.register("contrastive")
def contrastive_search(model, job: Job) -> None:
    """Contrastive search (Su et al., 2022): among the top-k tokens pick the one maximizing
    `(1-α)·p(v) − α·max cos(h_v, h_context)`. Each prompt occupies `k` cache rows so the k
    candidates are scored in one forward pass (compiled or graphed as the other searches' steps);
    the chosen row is then copied to its siblings."""
    cfg, k, alpha = job.cfg, job.cfg.top_k, job.cfg.penalty_alpha
    if k < 2:
        raise UsageError("contrastive search (--penalty-alpha) needs --top-k >= 2")
    B, dev = len(job.prompts), job.device
    rows = [p for p in job.prompts for _ in range(k)]
    runner = Runner(model, rows, _max_len(job), dev, cfg.compile, cfg.cuda_graph, hidden=True)
    logits = _timed_prefill(runner, job, keep=0)[::k, -1]
    start = time.perf_counter()
    width = runner.ids.shape[1]
    hidden = runner.hidden[::k].float()
    context = torch.zeros(B, width + cfg.max_new_tokens, hidden.shape[-1], device=dev)
    context[:, :width] = hidden / hidden.norm(dim=-1, keepdim=True)
    valid = torch.zeros(B, context.shape[1], dtype=torch.bool, device=dev)
    valid[:, :width] = True if runner.mask is None else runner.mask[::k, :width].bool()
    history = job.history()
    groups = torch.arange(B, device=dev) * k
    for step in range(cfg.max_new_tokens):
        probs = job.process(logits.float(), history).softmax(-1)
        top_probs, top_ids = torch.topk(probs, k)
        all_logits = runner.forward(top_ids.view(-1, 1))[:, -1]
        cand = runner.hidden[:, -1].float().view(B, k, -1)
        cand = cand / cand.norm(dim=-1, keepdim=True)
        n = width + step
        cosine = torch.einsum("bnh,bkh->bkn", context[:, :n], cand)
        cosine = cosine.masked_fill(~valid[:, None, :n], -torch.finfo(cosine.dtype).max)
        score = (1.0 - alpha) * top_probs - alpha * cosine.max(dim=-1)[0]
        chosen = score.argmax(dim=-1)
        next_ids = top_ids.gather(1, chosen[:, None]).squeeze(1)
        context[:, n] = cand[torch.arange(B, device=dev), chosen]
        valid[:, n] = True
        ids = next_ids.tolist()
        if history is not None:
            history.append(ids, next_ids)
        if all([seq.push(t) for seq, t in zip(job.seqs, ids)]):
            break
        rows_kept = groups + chosen
        logits = all_logits[rows_kept]
        runner.reorder(rows_kept.repeat_interleave(k))
    job.decode_s = time.perf_counter() - start
