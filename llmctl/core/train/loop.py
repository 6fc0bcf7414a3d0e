"""The training loop: a plan in, checkpoints and metrics out, never losing work.

OUTDIR is a work directory: `metrics.jsonl`, `train_config.yaml`, `checkpoints/step-NNNNNN/`
(each written atomically: a full model checkpoint plus `trainer_state/`). When training
completes, the last checkpoint's model files are linked into OUTDIR itself, so OUTDIR is a
checkpoint every other command reads. `resume` continues from the newest checkpoint with the
same optimizer, schedule, RNG and data position, so the loss curve equals an uninterrupted
run's (bit-for-bit on CPU).
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from llmctl.core.adapters.files import lineage_hash
from llmctl.core.checkpoint import append_metrics
from llmctl.core.report import SILENT, Reporter
from llmctl.core.train import distributed as dist_
from llmctl.core.train.build import Plan
from llmctl.core.train.config import CHECKPOINTS, CONFIG_FILE
from llmctl.core.train.data import ShardBatches, TextBatches, TextStream, split_text
from llmctl.core.train.metrics import MetricsLog, flops_per_token, peak_flops, truncate_metrics
from llmctl.core.train.objectives import OBJECTIVES
from llmctl.core.train.optim import build_optimizer
from llmctl.core.train.schedule import lr_at
from llmctl.core.train.state import load_state, restore_rng, save_state
from llmctl.errors import CheckpointError, LlmctlError

SIGNAL_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}
TIMED_STEPS = 10  # with `max_time`, max_steps is refitted every this many steps


class NonFiniteLoss(LlmctlError):
    """The loss became NaN/inf; the last good checkpoint is kept (exit 1)."""


@dataclass
class Result:
    step: int
    exit_code: int  # 0 done, 130/143 stopped by SIGINT/SIGTERM after a checkpoint
    val_loss: float | None
    checkpoint: Path | None


def latest_checkpoint(outdir: Path) -> Path | None:
    """The newest complete `checkpoints/step-*` directory (temporary ones start with a dot)."""
    folder = Path(outdir) / CHECKPOINTS
    done = sorted(p for p in folder.glob("step-*") if (p / "trainer_state" / "state.json").is_file())
    return done[-1] if done else None


class _Signals:
    """SIGINT/SIGTERM set a flag the loop checks after each step; a second one interrupts."""

    def __init__(self):
        self.received: int | None = None
        self._old: dict = {}

    def __enter__(self):
        for sig in SIGNAL_EXIT:
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def make_data(plan: Plan, d: dist_.Dist):
    """The batch source for this rank."""
    cfg = plan.config
    common = dict(batch_size=cfg.batch_size, rank=d.rank, world=d.world, eval_batches=cfg.eval_batches)
    if plan.shards is not None:
        val = plan.shards.split("val") if "val" in plan.shards.manifest["splits"] else []
        return ShardBatches(plan.shards.split("train"), val, seq_len=cfg.seq_len, seed=cfg.seed,
                            sampling=cfg.sampling, **common)
    encode = plan.tokenizer.encode
    eos = plan.tokenizer.eos_id
    if plan.val_files:
        train_segments = [(f, 0, f.stat().st_size) for f in plan.text_files]
        val_segments = [(f, 0, f.stat().st_size) for f in plan.val_files]
    else:
        train_segments, val_segments = split_text(plan.text_files, cfg.val_fraction)
    train = TextStream(train_segments, encode, eos, cfg.seq_len)
    val = TextStream(val_segments, encode, eos, cfg.seq_len) if val_segments else None
    return TextBatches(train, val, **common)


class WithExtra(torch.nn.Module):
    """What trains when the objective has extra parameters: the model plus them, so the
    optimizer, DDP and FSDP see both; calls go to the model."""

    def __init__(self, model: torch.nn.Module, extra: torch.nn.Module):
        super().__init__()
        self.model, self.extra = model, extra

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)


class Trainer:
    """Owns the model, optimizer and data of one run (one per process under torchrun)."""

    def __init__(self, plan: Plan, outdir: Path, device: torch.device, d: dist_.Dist, lineage: dict,
                 final_outdir: Path | None = None, report: Reporter = SILENT):
        from llmctl.core.model.build import build_model
        from llmctl.core.model.io import load_model

        self.plan, self.cfg, self.outdir, self.device, self.d = plan, plan.config, Path(outdir), device, d
        self.final_outdir = final_outdir  # --force: OUTDIR, replaced by `outdir` at the first checkpoint
        self.lineage = lineage  # the resolved config and the data it trains on
        self.report = report if d.is_main else SILENT
        self.parents = [{"path": str(p.resolve()), "hash": lineage_hash(p)} for p in map(Path, plan.parents)]
        cfg = self.cfg
        self.resume_from = latest_checkpoint(self.outdir)
        state = load_state(self.resume_from) if self.resume_from is not None else None
        self.objective = OBJECTIVES.get(plan.objective)(plan, device)
        torch.manual_seed(cfg.seed)
        source = self.resume_from or plan.init_from
        if source is None:
            model = build_model(plan.model_config).to(device)  # initialised on CPU: same weights anywhere
        else:  # built on meta with this run's settings (dropout, checkpointing), weights assigned
            model = load_model(source, device=device, dtype=torch.float32, config=plan.model_config)[0]
        if self.resume_from is None:
            self.objective.initialise(model)
        self.model = model  # the plain module: exported in checkpoints
        self.model.train()
        self.objective.prepare(self.model)
        for companion in self.objective.companions().values():
            companion.requires_grad_(False).eval()
        extra = self.objective.extra()
        if extra is not None and state is not None:
            extra.load_state_dict(state[0]["modules"])
        # what the optimizer, DDP and FSDP see: the model, and the objective's extras if any
        self.trained = self.model if extra is None else WithExtra(self.model, extra.to(device))
        self.wrapped = dist_.wrap(self.trained, cfg.distributed.strategy, d, device, getattr(torch, plan.precision))
        self.optimizer = build_optimizer(self.wrapped, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                         no_decay=cfg.no_decay, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
        self.forward = torch.compile(self.wrapped) if cfg.compile else self.wrapped
        self.masks = self._sparsity_masks() if cfg.keep_sparsity else None
        self.data = self.objective.data(d)
        self.scaler = torch.amp.GradScaler("cuda") if plan.precision == "float16" else None
        self.tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * d.world
        self.flops_per_token = flops_per_token(self.model, cfg.seq_len)
        dtype = getattr(torch, plan.precision)
        self.peak = cfg.peak_tflops * 1e12 if cfg.peak_tflops else peak_flops(dtype, device)
        self.step = 0
        self.max_steps = cfg.max_steps  # may shrink once to fit `max_time`, see _fit_time_budget
        self.horizon_fixed = cfg.max_time is None
        if state is not None:
            self._restore(self.resume_from, state)
        self.val = self.data.val_batches()

    def _sparsity_masks(self):
        from llmctl.core.train.sparsity import SparsityMasks

        masks = SparsityMasks(self.wrapped)
        if masks:
            self.report.info(f"keep_sparsity: {masks.zeros:,} zero weights in {len(masks)} tensors stay zero")
        else:
            self.report.warn("keep_sparsity: the model has no zero weights to keep")
        return masks

    # -- state ------------------------------------------------------------------------------

    def _restore(self, ckpt: Path, state: tuple[dict, dict]) -> None:
        meta, optim_state = state
        dist_.load_optimizer_state(self.wrapped, self.optimizer, optim_state)
        self.data.load_state(meta["data"])
        restore_rng(meta["rng"], meta["rng_tensors"])
        if self.scaler is not None and meta.get("scaler"):
            self.scaler.load_state_dict(meta["scaler"])
        self.step = int(meta["step"])
        if meta["objective"] and meta.get("world_size") != self.d.world:
            raise CheckpointError(f"{ckpt} holds per-process {self.plan.objective} state of {meta.get('world_size')} "
                                  f"processes; resume it with as many")
        self.objective.load_state(meta["objective"].get(self.d.rank, {}))
        if self.cfg.max_time is not None and meta.get("horizon_fixed"):  # keep the budgeted schedule
            self.max_steps, self.horizon_fixed = int(meta["max_steps"]), True
        if self.d.is_main:
            truncate_metrics(self.outdir, self.step)
            self.report.info(f"resuming from {ckpt} (step {self.step})")

    def save(self) -> Path:
        """Write `checkpoints/step-NNNNNN` atomically (a collective; rank 0 writes)."""
        from llmctl.core.io import atomic_dir

        model_state, optim_state = dist_.full_state_dicts(self.wrapped, self.optimizer)
        objective_state = dist_.gather_tensors(self.objective.state(), self.d, self.device)  # every rank's
        target = self.outdir / CHECKPOINTS / f"step-{self.step:06d}"
        if self.d.is_main:
            export = self.model if self.cfg.distributed.strategy != "fsdp" or not self.d.enabled \
                else self._unsharded(model_state)
            lineage = {"command": self.objective.command, **self.lineage, "parents": self.parents, "step": self.step}
            modules = {k.removeprefix("extra."): v for k, v in model_state.items() if k.startswith("extra.")} \
                if self.trained is not self.model else None
            with atomic_dir(target, force=True) as tmp:
                self.objective.save(export, tmp, tokenizer_dir=self.plan.tokenizer_dir, lineage=lineage, force=True,
                                    generation_config=generation_config(self.plan.model_config))
                save_state(tmp, step=self.step, optimizer=optim_state, data=self.data.state(),
                           scaler=self.scaler.state_dict() if self.scaler else None,
                           extra={"world_size": self.d.world, "max_steps": self.max_steps,
                                  "horizon_fixed": self.horizon_fixed}, modules=modules,
                           objective=objective_state)
            self._prune()
        if self.final_outdir is not None:  # the new run has a checkpoint: it replaces the old one now
            if self.d.is_main:
                from llmctl.core.io import replace_dir

                replace_dir(self.outdir, self.final_outdir)
            self.outdir, self.final_outdir = self.final_outdir, None
            target = self.outdir / CHECKPOINTS / target.name
        return target

    def _unsharded(self, state: dict):
        from llmctl.core.model.build import build_model

        if self.trained is not self.model:
            state = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
        model = build_model(self.model.cfg, self.model.transforms, device="meta")
        model.load_state_dict(state, assign=True)
        model.tie_weights()
        return model

    def _prune(self) -> None:
        done = sorted((self.outdir / CHECKPOINTS).glob("step-*"))
        for old in done[: -self.cfg.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    # -- steps ------------------------------------------------------------------------------

    def _autocast(self):
        if self.plan.precision == "float32":
            return nullcontext()
        return torch.autocast(self.device.type, dtype=getattr(torch, self.plan.precision))

    def _inputs(self, rows: torch.Tensor, index: int, generator: torch.Generator | None = None):
        """(input_ids, labels, model kwargs) the objective makes of a batch of token rows."""
        if self.device.type == "cuda":  # page-locked, so the copies to the device overlap the GPU's work
            rows = rows.pin_memory()
        return self.objective.batch(rows, index, generator)

    def _loss(self, inputs, labels, extra: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(what the objective minimises, language-model loss)."""
        with self._autocast():
            return self.objective.loss(self.forward, inputs, labels, extra)

    def _weights(self, batches: list) -> list:
        """Each micro-batch's weight in the step's loss. For a mean over targets (tokens), its share
        of the targets of the whole step on every rank, times the ranks (DDP and FSDP average
        the ranks' gradients): the step minimises the mean over all of them, as one batch would —
        not the mean of micro-batch means, which overweighs short ones. Else 1/grad_accum each."""
        counts = [self.objective.targets(batch) for batch in batches]
        if any(count is None for count in counts):
            return [1 / len(batches)] * len(batches)
        counts = torch.stack(counts).to(self.device, torch.float32)
        total = dist_.all_reduce_sum_(counts.sum().reshape(1), self.d)
        return list(counts * self.d.world / total.clamp(min=1))

    def train_step(self) -> tuple[float, float, float, float]:
        """One optimizer step over `grad_accum` micro-batches: (loss, aux_loss, grad_norm, lr).

        The losses and the gradient norm stay on the device until one read per step, before
        the optimizer update (which a non-finite loss skips): one host sync, not one per value.
        """
        cfg = self.cfg
        lr = lr_at(cfg.schedule, self.step, lr=cfg.lr, min_lr=cfg.min_lr, warmup_steps=cfg.warmup_steps,
                   max_steps=self.max_steps, decay_fraction=cfg.decay_fraction)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        totals = torch.zeros(2, device=self.device)  # objective, LM loss
        first = self.step * cfg.grad_accum
        with self._autocast():
            batches = self.objective.step_batches([self._inputs(self.data.batch(i), i)
                                                   for i in range(first, first + cfg.grad_accum)])
        for micro, ((inputs, labels, extra), weight) in enumerate(zip(batches, self._weights(batches))):
            dist_.set_grad_sync(self.wrapped, micro == cfg.grad_accum - 1)
            objective, lm_loss = self._loss(inputs, labels, extra)
            objective = objective * weight
            (self.scaler.scale(objective) if self.scaler else objective).backward()
            totals += torch.stack([objective.detach(), lm_loss.detach() * weight])
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.wrapped.parameters(), max_norm)
        if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor
            grad_norm = grad_norm.full_tensor()
        totals = dist_.all_reduce_sum_(totals, self.d) / self.d.world
        total, lm_total, grad_norm = torch.cat([totals, grad_norm.reshape(1).to(totals)]).tolist()
        if not math.isfinite(total):
            self.optimizer.zero_grad(set_to_none=True)
            return total, 0.0, float("nan"), lr
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.masks:
            self.masks.apply()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return lm_total, total - lm_total, grad_norm, lr

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean loss over the fixed validation batches (None without a val split). Every rank
        scores as many batches as the rank with the fewest, so none waits in a collective alone."""
        batches = (self.val or [])[:dist_.fewest(len(self.val or []), self.d, self.device)]
        if not batches:
            return None
        self.trained.eval()
        generator = torch.Generator().manual_seed(self.cfg.seed + 1)
        total = 0.0
        for i, rows in enumerate(batches):
            inputs, labels, extra = self._inputs(rows, i, generator)
            with self._autocast():
                total += float(self.objective.val_loss(self.forward, inputs, labels, extra))
        self.trained.train()
        summed, count = dist_.all_reduce_sum([total, float(len(batches))], self.d, self.device)
        return summed / count

    # -- the run ----------------------------------------------------------------------------

    def run(self) -> Result:
        cfg, d = self.cfg, self.d
        log = MetricsLog(self.outdir, cfg.tensorboard) if d.is_main else None
        last_saved: Path | None = self.resume_from
        val_loss = None
        exit_code = 0
        try:
            with _Signals() as signals, self.report.progress("train", total=self.max_steps, unit="step") as bar:
                bar.update(completed=self.step)
                started, first_step, timed_from, fitted = time.perf_counter(), self.step, None, None
                while self.step < self.max_steps:
                    start = time.perf_counter()
                    loss, aux_loss, grad_norm, lr = self.train_step()
                    if not math.isfinite(loss):
                        where = f"; the last good checkpoint is {last_saved}" if last_saved else ""
                        raise NonFiniteLoss(f"non-finite loss ({loss}) at step {self.step + 1}{where}")
                    elapsed = time.perf_counter() - start
                    tokens_per_s = self.tokens_per_step / elapsed
                    mfu = self.flops_per_token * tokens_per_s / (self.peak * d.world)
                    if not self.horizon_fixed:  # time every step after the first (it warms up)
                        now = time.perf_counter()
                        timed_from, fitted = timed_from or now, fitted or now
                        timed = self.step - first_step - 1
                        # refit every TIMED_STEPS steps, or sooner when steps are slow against the budget
                        if timed and (timed % TIMED_STEPS == 0 or now - fitted >= cfg.max_time * 60 / 20):
                            self._fit_time_budget(now - started, timed / (now - timed_from))
                            fitted = now
                            bar.update(total=self.max_steps)
                    if self.step % cfg.log_every == 0 or self.step == self.max_steps:
                        record = {"step": self.step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                                  "tokens_per_s": tokens_per_s, "mfu": mfu}
                        if aux_loss:
                            record["aux_loss"] = aux_loss
                        record.update(self.objective.recorded_metrics())  # every rank: each forgets its own
                        if log:
                            log.log(record)
                    if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < self.max_steps:
                        val_loss = self._log_eval(log)
                    bar.update(completed=self.step, loss=loss, tok_s=round(tokens_per_s))
                    stop = dist_.any_rank(signals.received is not None, d, self.device)
                    if stop or (cfg.save_every and self.step % cfg.save_every == 0) or self.step == self.max_steps:
                        last_saved = self.save()
                    if stop:
                        sig = signals.received or signal.SIGTERM
                        if d.is_main:
                            self.report.info(f"stopped by {signal.Signals(sig).name} after step {self.step}; "
                                             f"checkpoint {last_saved}")
                        exit_code = SIGNAL_EXIT[sig]
                        break
            if exit_code == 0:
                if last_saved is None or last_saved.name != f"step-{self.step:06d}":
                    last_saved = self.save()
                val_loss = self._log_eval(log)
                if d.is_main:
                    publish(last_saved, self.outdir)
                    if val_loss is not None:
                        append_metrics(self.outdir, {"task": "val_loss", "step": self.step, **self._val_record(val_loss)})
        finally:
            if log:
                log.close()
        return Result(self.step, exit_code, val_loss, last_saved)

    def _fit_time_budget(self, elapsed: float, steps_per_s: float) -> None:
        """Set max_steps to what fits in `max_time` at the mean step rate so far (evaluations and
        checkpoints included, 10% kept in reserve), so the LR schedule ends on time. Refitted
        every TIMED_STEPS steps until half the budget is spent, then fixed and stored in the
        training state, so a resumed run follows the same schedule."""
        budget = self.cfg.max_time * 60
        [rate] = dist_.all_reduce_sum([steps_per_s], self.d, self.device)  # every rank agrees
        fits = self.step + int(0.9 * (budget - elapsed) * rate / self.d.world)
        self.max_steps = max(self.step, min(self.cfg.max_steps, fits))
        self.horizon_fixed = elapsed >= budget / 2 or self.max_steps == self.step
        if self.horizon_fixed and self.d.is_main:
            self.report.info(f"max_time {self.cfg.max_time:g} min: training {self.max_steps} steps")
            if self.cfg.warmup_steps > self.max_steps:
                self.report.warn(f"warmup_steps={self.cfg.warmup_steps} is longer than the {self.max_steps} steps "
                                 f"that fit in max_time: lr never reaches {self.cfg.lr:g}")

    def _log_eval(self, log: MetricsLog | None) -> float | None:
        val_loss = self.evaluate()
        if val_loss is not None and log:
            log.log({"step": self.step, **self._val_record(val_loss)})
        return val_loss

    def _val_record(self, val_loss: float) -> dict:
        """The validation loss, with its perplexity when the loss is a language model's."""
        if not self.objective.perplexity:
            return {"val_loss": val_loss}
        return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}


def generation_config(model_config) -> dict:
    """generation_config.json as transformers writes it from a model config: the special token ids."""
    ids = {key: getattr(model_config, key, None) for key in ("bos_token_id", "eos_token_id", "pad_token_id")}
    return {"_from_model_config": True, **{k: v for k, v in ids.items() if v is not None}}


def publish(checkpoint: Path, outdir: Path) -> None:
    """Make OUTDIR a checkpoint: hard-link (or copy) the final model files into it, config last."""
    files = sorted((p for p in checkpoint.iterdir() if p.is_file()), key=lambda p: p.name == "config.json")
    for src in files:
        dst = outdir / src.name
        if dst.exists() and os.path.samefile(src, dst):
            continue  # already this file (a resumed, finished run): renaming onto it would do nothing
        tmp = outdir / f".{src.name}.tmp-{os.getpid()}"
        tmp.unlink(missing_ok=True)
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copy2(src, tmp)
        os.replace(tmp, dst)


def check_outdir(outdir: Path, *, resume: bool, force: bool, inputs=()) -> None:
    """OUTDIR must not exist, unless --resume (an llmctl train work dir, or empty) or --force
    (replace an llmctl train work dir, never the working directory or the run's inputs)."""
    from llmctl.core.outputs import OUTPUT_KINDS, check_output
    from llmctl.errors import OutputExistsError

    if resume and outdir.exists():
        if outdir.is_dir() and (not any(outdir.iterdir()) or OUTPUT_KINDS.get("train")(outdir)):
            return
        raise OutputExistsError(f"--resume: {outdir} exists but is not an llmctl train output directory")
    if outdir.exists() and not force:
        raise OutputExistsError(f"output {outdir} already exists (use --resume to continue it or --force to start over)")
    check_output(outdir, "train", force=force, inputs=inputs)


def _check_resume(outdir: Path, plan: Plan) -> None:
    """The newest checkpoint must be of the run's architecture and not past `max_steps`."""
    import json

    from llmctl.core.checkpoint import open_checkpoint
    from llmctl.core.hf import config_from_hf
    from llmctl.core.train.state import META, STATE_DIR
    from llmctl.errors import CheckpointError, UsageError

    from llmctl.core.adapters import is_adapter

    ckpt = latest_checkpoint(outdir)
    if ckpt is None:
        return
    if is_adapter(ckpt):  # an adapter's architecture is its base's (a reward model's: as a classifier)
        from llmctl.core.adapters.peft_format import model_config

        stored = model_config(ckpt)
    else:
        stored = config_from_hf(open_checkpoint(ckpt).config)
    if stored.weights_architecture() != plan.model_config.weights_architecture():
        raise CheckpointError(f"{ckpt} has another architecture than this run's model; resume with the run's own "
                              "config (no model overrides), or train into a new OUTDIR")
    step = int(json.loads((ckpt / STATE_DIR / META).read_text(encoding="utf-8"))["step"])
    if step > plan.config.max_steps:
        raise UsageError(f"max_steps={plan.config.max_steps} is below step {step} of {outdir}'s newest checkpoint; "
                         "give a larger max_steps to continue it")


def _remove_leftovers(outdir: Path) -> None:
    """Temporary files and checkpoints of a writer that died (we hold OUTDIR's lock)."""
    for tmp in [*outdir.glob(".*.tmp-*"), *(outdir / CHECKPOINTS).glob(".step-*.tmp-*")]:
        shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink(missing_ok=True)


def run_training(cfg, outdir: str | os.PathLike, *, device: torch.device | str = "cpu", resume: bool = False,
                 force: bool = False, report: Reporter = SILENT) -> Result:
    """Validate `cfg` (nothing written on error), prepare OUTDIR, and train on `device` (under torchrun
    too: each rank takes its local CUDA device); progress and messages go to `report` (rank 0's).

    With `force` over an existing run, the new run is built in `.OUTDIR.new` and replaces the
    old one at its first checkpoint; OUTDIR is locked against a second writer throughout."""
    import yaml

    from llmctl.config import to_dict
    from llmctl.core.outputs import output_lock
    from llmctl.core.train.build import make_plan
    from llmctl.core.train.config import anchor_paths

    outdir = Path(outdir)
    inputs = [*cfg.data, *cfg.val_data, cfg.tokenizer, cfg.model]
    check_outdir(outdir, resume=resume, force=force, inputs=inputs)
    device = torch.device(device)
    plan = make_plan(cfg, device.type, report)
    inputs += plan.parents  # what the objective reads too (distill's teacher), checked again under the lock
    if resume:
        _check_resume(outdir, plan)
    d = dist_.init(cfg.distributed.backend, device)
    if device.type == "cuda" and d.enabled:
        device = torch.device("cuda", d.local_rank)
    replace = force and not resume and outdir.is_dir() and any(outdir.iterdir())
    workdir = outdir.with_name(f".{outdir.resolve().name}.new") if replace else outdir
    if d.is_main:
        outdir.resolve().parent.mkdir(parents=True, exist_ok=True)
    fresh = created = False  # set under the lock: whether this run starts OUTDIR (and made the directory)
    try:
        with output_lock(outdir) if d.is_main else nullcontext():
            resolved = anchor_paths(to_dict(cfg))  # --resume may run from another directory
            if d.is_main:
                check_outdir(outdir, resume=resume, force=force, inputs=inputs)  # again, under the lock
                if replace:
                    shutil.rmtree(workdir, ignore_errors=True)  # a dead run's
                elif outdir.is_dir():
                    _remove_leftovers(outdir)
                created = not workdir.exists()
                fresh = not replace and (created or not any(workdir.iterdir()))
                workdir.mkdir(parents=True, exist_ok=True)
                if latest_checkpoint(workdir) is None:
                    truncate_metrics(workdir, 0)
            try:
                dist_.barrier(d)
                lineage = {"config": resolved, "data": describe_data(plan)}
                trainer = Trainer(plan, workdir, device, d, lineage, final_outdir=outdir if replace else None,
                                  report=report)
                if d.is_main:  # once the checkpoint to resume has loaded: a failed resume keeps the run's recipe
                    (workdir / CONFIG_FILE).write_text(yaml.safe_dump(resolved, sort_keys=False), encoding="utf-8")
                result = trainer.run()
                del trainer  # its DDP reducer holds the process group: freed by `settle`, not at exit
                dist_.settle(d)
                return result
            except BaseException:
                if fresh:  # failed before its first checkpoint: nothing left behind that blocks the re-run
                    _undo_fresh(workdir, created)
                raise
    finally:
        if replace and d.is_main and workdir.exists():  # stopped before its first checkpoint: the old run stays
            shutil.rmtree(workdir, ignore_errors=True)
        dist_.shutdown(d)


def _undo_fresh(outdir: Path, created: bool) -> None:
    """Remove what a run that started in a new (or empty) OUTDIR wrote, when it ended without a
    checkpoint: the directory itself if this run created it, else its contents. A run that
    saved a checkpoint keeps everything (it can be resumed)."""
    if not outdir.is_dir() or any((outdir / CHECKPOINTS).glob("step-*")):
        return
    if created:
        shutil.rmtree(outdir, ignore_errors=True)
        return
    for child in outdir.iterdir():
        shutil.rmtree(child, ignore_errors=True) if child.is_dir() and not child.is_symlink() \
            else child.unlink(missing_ok=True)


def describe_data(plan: Plan) -> dict:
    """What the run trained on, for the lineage: the shard manifest or the text files."""
    if plan.shards is not None:
        return {"path": str(plan.shards.path.resolve()), **plan.shards.manifest}
    return {"text_files": [{"path": str(f.resolve()), "bytes": f.stat().st_size} for f in plan.text_files],
            "val_files": [str(f.resolve()) for f in plan.val_files],
            "tokenizer": str(plan.tokenizer_dir.resolve()) if plan.tokenizer_dir else None}
