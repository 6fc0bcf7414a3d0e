"""Training objectives: what a run feeds the model and what it minimises.

    objective = OBJECTIVES.get(plan.objective)(plan, device)

The trainer owns the loop (accumulation, clipping, precision, distribution, signals,
checkpoints, exact resume); an objective owns the rest, each part with a default:

| method         | default                          | e.g. overridden by                              |
| -------------- | -------------------------------- | ----------------------------------------------- |
| `resolve(plan)`| -                                | a check or a plan field (masked: the [MASK] id) |
| `data(d)`      | the run's token windows          | instruction or preference pairs                 |
| `batch(rows…)` | -                                | next-token or masked-token targets              |
| `step_batches` | the micro-batches as they are    | GRPO: sample a step's groups, count its tokens  |
| `targets(b)`   | micro-batches weigh equally      | token losses: the count of labelled positions   |
| `initialise(m)`| as built or loaded               | a student from its teacher's layers             |
| `prepare(m)`   | every parameter trains           | LoRA: only adapters train                       |
| `companions()` | none                             | a distillation teacher, a DPO reference (frozen)|
| `extra()`      | none                             | a projection trained beside the model           |
| `loss(…)`      | model loss + weighted aux losses | KL to a teacher, a preference loss              |
| `val_loss(…)`  | model loss                       |                                                 |
| `save(…)`      | the full model (`save_model`)    | an adapter, or the merged model                 |
| `record(…)`    | -                                | rewards, margins, KL: extra `metrics.jsonl` keys|
| `state()`      | none                             | GRPO: the generation reused for μ updates       |

Extra modules are trained and checkpointed with the run (their state goes to
`trainer_state/`, so resume stays exact) but are not exported. A new objective is one class
in one file (an entry point of `llmctl.objectives` for a plugin):

    @OBJECTIVES.register("my_objective")
    class Mine(Causal):
        def loss(self, forward, inputs, labels, extra):
            out = forward(inputs, labels=labels, **extra)
            return out.loss + my_penalty(out), out.loss    # (minimised, reported LM loss)
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from llmctl.core.registry import Registry
from llmctl.errors import ConfigError

MASK_TOKENS = ("[MASK]", "<mask>", "<MASK>")

Batch = tuple[torch.Tensor, torch.Tensor, dict[str, Any]]  # (input_ids, labels aligned with them, model kwargs)


class Objective:
    """The default parts; subclasses set `batch` at least."""

    document_mask = False  # whether `document_mask=true` applies
    takes_args = False  # whether it reads `objective_args`
    command = "train"  # the command its checkpoints name in their lineage
    perplexity = True  # whether exp(validation loss) is a perplexity (not for preference losses)

    def __init__(self, plan, device: torch.device):
        self.plan, self.cfg, self.device = plan, plan.config, device
        self._recorded: dict[str, list[torch.Tensor]] = {}

    @classmethod
    def resolve(cls, plan) -> None:
        """Check the plan (ConfigError, before anything is written) and fill what this needs."""
        if plan.config.document_mask and not cls.document_mask:
            raise ConfigError(f"config key 'document_mask': only for the causal objective (and mtp), not {plan.objective}")
        if plan.config.objective_args and not cls.takes_args:
            raise ConfigError(f"config key 'objective_args': objective {plan.objective} takes none")

    def data(self, d):
        """The batch source of this rank (`batch(index)`, `val_batches()`, `state()`/`load_state`)."""
        from llmctl.core.train.loop import make_data

        return make_data(self.plan, d)

    def batch(self, rows: torch.Tensor, index: int, generator: torch.Generator | None = None) -> Batch:
        raise NotImplementedError

    def step_batches(self, batches: list[Batch]) -> list[Batch]:
        """The `grad_accum` micro-batches of one optimizer step on this rank, before any forward
        pass (under the run's autocast): a loss normalised over the whole step can count here
        what all of them hold. Default: as they are."""
        return batches

    def targets(self, batch: Batch) -> torch.Tensor | None:
        """How many targets this micro-batch's loss is a mean over (a 0-d tensor): the trainer
        weighs micro-batches and ranks by their share of the step's targets, so a step minimises
        the mean over all of them however they fall into micro-batches. None (the default): the
        loss is not a mean over targets (a preference loss over pairs, GRPO's own normalisation),
        and micro-batches weigh equally."""
        return None

    def state(self) -> dict[str, torch.Tensor]:
        """This rank's tensors that resuming needs besides the model and optimizer (saved per rank
        in `trainer_state/`); default none."""
        return {}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what `state` gave (empty when it gave nothing)."""

    def initialise(self, model: nn.Module) -> None:
        """Fill the weights of a run's model when it starts (not when it resumes); default: as built or loaded."""

    def prepare(self, model: nn.Module) -> None:
        """Choose what trains (`requires_grad`), before the optimizer is made."""

    def companions(self) -> dict[str, nn.Module]:
        """Frozen models the loss consults; the trainer keeps them in eval mode without gradients."""
        return {}

    def extra(self) -> nn.Module | None:
        """Parameters trained beside the model (not exported), or None."""
        return None

    def loss(self, forward: Callable, inputs: torch.Tensor, labels: torch.Tensor, extra: dict
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """(what is minimised, the language-model loss reported as `loss`): the model's loss plus
        its weighted MoE load-balancing and multi-token-prediction losses."""
        out = forward(inputs, labels=labels, **extra)
        return out.loss + out.aux_loss, out.loss

    def val_loss(self, forward: Callable, inputs: torch.Tensor, labels: torch.Tensor, extra: dict) -> torch.Tensor:
        return forward(inputs, labels=labels, **extra).loss

    def save(self, model: nn.Module, directory, **kwargs) -> None:
        """Export the trained model into `directory` (a checkpoint's model files)."""
        from llmctl.core.model.io import save_model

        save_model(model, directory, **kwargs)

    def record(self, **values: torch.Tensor | float) -> None:
        """Note scalars (e.g. in `loss`) for the next `metrics.jsonl` record, which logs their means."""
        for key, value in values.items():
            self._recorded.setdefault(key, []).append(torch.as_tensor(value).detach().float().reshape(()))

    def recorded_metrics(self) -> dict[str, float]:
        """The means of what was recorded since the last call (one host sync), and forget them."""
        if not self._recorded:
            return {}
        keys = list(self._recorded)
        means = torch.stack([torch.stack([v.to(self.device) for v in self._recorded[k]]).mean() for k in keys]).tolist()
        self._recorded.clear()
        return dict(zip(keys, means))

    def _to_device(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        return [t.to(self.device, non_blocking=True) for t in tensors]


OBJECTIVES: Registry[type[Objective]] = Registry(
    "training objective", "llmctl.objectives",
    modules=("llmctl.core.train.sft", "llmctl.core.train.preference", "llmctl.core.rl.grpo"), base=Objective)


def labelled(batch: Batch) -> torch.Tensor:
    """The positions a token loss learns from: labels other than -100."""
    return (batch[1] != -100).sum()


@OBJECTIVES.register("causal")
class Causal(Objective):
    """Next-token prediction: position t predicts token t + 1."""

    document_mask = True
    targets = staticmethod(labelled)

    @classmethod
    def resolve(cls, plan) -> None:
        super().resolve(plan)
        if not plan.model_config.is_causal:
            raise ConfigError(f"config key 'objective': model {plan.config.model} is encoder-only; use objective=masked")
        if plan.config.document_mask and plan.model_config.eos_token_id is None:
            raise ConfigError("config key 'document_mask': the data has no EOS token between documents")

    def batch(self, rows, index, generator=None) -> Batch:
        inputs, labels = rows[:, :-1], rows[:, 1:]
        extra = {}
        if self.cfg.document_mask:  # an EOS ends its document: the next token starts one
            ends = inputs == self.plan.model_config.eos_token_id
            [extra["document_ids"]] = self._to_device(ends.cumsum(-1) - ends.long())
        return *self._to_device(inputs, labels), extra


@OBJECTIVES.register("mtp")
class MultiToken(Causal):
    """Next-token prediction plus the model's multi-token heads (head k predicts token t + 1 + k,
    weighted by `mtp_weight`); `auto` picks it for models with such heads."""

    @classmethod
    def resolve(cls, plan) -> None:
        super().resolve(plan)
        if not plan.model_config.num_mtp_heads:
            raise ConfigError(f"config key 'objective': model {plan.config.model} has no multi-token heads "
                              "(num_mtp_heads)")


@OBJECTIVES.register("masked")
class Masked(Objective):
    """BERT's masked-token prediction: `mask_prob` of the positions, 80% [MASK], 10% random, 10% kept."""

    targets = staticmethod(labelled)

    @classmethod
    def resolve(cls, plan) -> None:
        super().resolve(plan)
        inner = getattr(plan.tokenizer, "inner", None)
        for token in MASK_TOKENS:
            tid = inner.token_to_id(token) if inner is not None else None
            if tid is not None:
                tok = plan.tokenizer
                plan.mask_id, plan.special_ids = tid, [i for i in (tok.bos_id, tok.eos_id, tok.pad_id) if i is not None]
                return
        raise ConfigError("config key 'tokenizer': masked-LM training needs a tokenizer with a [MASK] token")

    def batch(self, rows, index, generator=None) -> Batch:
        from llmctl.core.train.data import mask_tokens

        rows = rows[:, :-1]
        gen = generator or torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + index)
        inputs, labels = mask_tokens(rows, mask_id=self.plan.mask_id, vocab_size=self.plan.model_config.vocab_size,
                                     prob=self.cfg.mask_prob, generator=gen, special_ids=self.plan.special_ids)
        return *self._to_device(inputs, labels), {}


def default_objective(model_config) -> str:
    """What `objective=auto` means for a model."""
    if not model_config.is_causal:
        return "masked"
    return "mtp" if model_config.num_mtp_heads else "causal"

