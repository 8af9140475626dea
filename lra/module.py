"""The LightningModule: cross-entropy plus the attentions' auxiliary losses, accuracy, optimizer and schedule.

Logged: ``train/loss`` (total), ``train/ce``, ``train/aux/<layer>/<name>`` (each auxiliary term),
``train/acc``, ``train/lr``, ``val/loss``, ``val/acc``, ``test/loss``, ``test/acc``. Validation and test figures
are exact over the whole split: correct predictions, rows and summed losses are added over every batch and every
process before dividing. A NaN or Inf training loss raises ``NonFiniteLoss`` on every process at that step.

Schedules (``optim.schedule``):

* ``onecycle_linear``: ``torch.optim.lr_scheduler.OneCycleLR`` with linear annealing, peak ``lr`` at
  ``warmup_steps`` of ``max_steps`` (the Nyströmformer harness; it also cycles Adam's beta1 0.95->0.85->0.95
  as OneCycleLR does by default);
* ``rsqrt``: ``lr * min(1, step / warmup) / sqrt(max(step, warmup))`` (LRA's
  ``constant * linear_warmup * rsqrt_decay``);
* ``constant``: ``lr`` after a linear warmup.
"""

from __future__ import annotations

import math

import lightning as L
import torch
import torch.nn.functional as F

from lra.models.heads import LRAModel


def lr_lambda(schedule: str, warmup: int, cycle: int | None = None):
    """Multiplier of the base learning rate at ``step`` (LRA's ``constant * linear_warmup * <decay>`` family).

    ``rsqrt``: linear warm-up then ``1/sqrt(step)`` decay (LRA's default); ``cosine``: linear warm-up times
    ``0.5 (1 + cos(π ((step − warmup) / cycle mod 1)))`` (LRA's Image config, ``steps_per_cycle = cycle``);
    ``constant``: linear warm-up then constant.
    """
    if schedule == "cosine":
        cycle = cycle or 1
        return lambda step: (min(1.0, step / warmup) if warmup else 1.0) * max(
            0.0, 0.5 * (1.0 + math.cos(math.pi * ((max(0, step - warmup) / cycle) % 1.0))))
    if schedule == "rsqrt":
        if not warmup:
            return lambda step: 1 / math.sqrt(max(step, 1))
        return lambda step: min(1.0, step / warmup) / math.sqrt(max(step, warmup))
    if schedule == "constant":
        return lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0
    raise ValueError(f"optim.schedule must be onecycle_linear, rsqrt, cosine or constant, got {schedule!r}")


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or Inf: the run stops here instead of training on garbage."""

    def __init__(self, step: int, value: float):
        super().__init__(f"non-finite training loss ({value}) at step {step}")
        self.step, self.value = step, value


class LRAModule(L.LightningModule):
    def __init__(self, model: LRAModel, optim: dict, max_steps: int):
        super().__init__()
        self.model, self.optim, self.max_steps = model, dict(optim), max_steps
        self.breakdown = None  # lra.train.build sets (group names, batch -> group index [B]) for a task with groups
        self.group_counts: dict[str, dict[str, tuple[int, int]]] = {}  # stage -> {group: (correct, rows)}

    def forward(self, batch: dict) -> torch.Tensor:
        return self.model(batch)

    def training_step(self, batch, batch_idx):
        logits = self(batch)
        ce = F.cross_entropy(logits.float(), batch["label"])
        n = batch["label"].shape[0]
        aux = self.model.aux_losses()
        loss = ce + sum(aux.values(), torch.zeros((), device=ce.device))
        self.check_finite(loss)
        for name, value in aux.items():
            self.log(f"train/aux/{name}", value, batch_size=n)
        acc = (logits.argmax(-1) == batch["label"]).float().mean()
        self.log_dict({"train/loss": loss, "train/ce": ce, "train/acc": acc}, batch_size=n, prog_bar=True)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=n)
        return loss

    def check_finite(self, loss: torch.Tensor) -> None:
        """Stop the run (every process at once) at the first NaN/Inf loss: ``NonFiniteLoss`` names its step.

        Reading the loss on the host waits for the GPU, so on CUDA the first non-finite step is noted on the device
        and read once per logging interval and before every validation (so no checkpoint is written after it);
        on CPU it is read at every step.
        """
        step = torch.tensor(self.global_step, device=loss.device)
        first = getattr(self, "_first_bad", None)
        if first is None:
            first = torch.full((), -1, dtype=torch.long, device=loss.device)
        self._first_bad = torch.where(~torch.isfinite(loss.detach()) & (first < 0), step, first)
        self._first_bad_loss = loss.detach()
        interval = max(1, self.trainer.log_every_n_steps) if self._trainer is not None else 1
        if loss.device.type != "cuda" or (self.global_step + 1) % interval == 0:
            self.raise_if_nonfinite()

    def raise_if_nonfinite(self) -> None:
        first = getattr(self, "_first_bad", None)
        if first is None:
            return
        step = int(first)
        bad = step >= 0
        if self._trainer is not None:
            bad = self.trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            raise NonFiniteLoss(step, float(self._first_bad_loss) if step == self.global_step else float("nan"))

    def on_validation_start(self):
        if self.trainer.training or self.trainer.state.fn == "fit":
            self.raise_if_nonfinite()

    # Evaluation sums exact counts over the processes' shards: accuracy = correct / rows of the whole split.
    def _eval_start(self):
        self._eval_sums = torch.zeros(3, dtype=torch.float64, device=self.device)  # correct, rows, loss sum
        if self.breakdown is not None:  # [correct, rows] x group
            self._group_sums = torch.zeros(2, len(self.breakdown[0]), dtype=torch.float64, device=self.device)

    def _eval_step(self, batch):
        logits = self(batch)
        ce = F.cross_entropy(logits.float(), batch["label"], reduction="sum")
        correct = logits.argmax(-1) == batch["label"]
        self._eval_sums[0] += correct.sum()
        self._eval_sums[1] += len(logits)
        self._eval_sums[2] += ce
        if self.breakdown is not None:
            group = self.breakdown[1](batch)
            self._group_sums.index_add_(1, group, torch.stack([correct, torch.ones_like(correct)]).double())

    def _reduced(self, sums: torch.Tensor) -> torch.Tensor:
        return sums if self._trainer is None else self.trainer.strategy.reduce(sums, reduce_op="sum")

    def _eval_end(self, stage: str):
        sums = self._reduced(self._eval_sums)
        rows = sums[1].clamp_min(1)
        self.log(f"{stage}/acc", (sums[0] / rows).float(), prog_bar=True)
        self.log(f"{stage}/loss", (sums[2] / rows).float())
        if self.breakdown is not None:
            counts = zip(self.breakdown[0], *self._reduced(self._group_sums).long().tolist(), strict=True)
            self.group_counts[stage] = {name: (correct, rows) for name, correct, rows in counts if rows}

    def on_validation_epoch_start(self):
        self._eval_start()

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch)

    def on_validation_epoch_end(self):
        self._eval_end("val")

    def on_test_epoch_start(self):
        self._eval_start()

    def test_step(self, batch, batch_idx):
        self._eval_step(batch)

    def on_test_epoch_end(self):
        self._eval_end("test")

    def parameter_groups(self) -> list[dict]:
        """AdamW groups: every parameter decays with ``optim.weight_decay`` except those a submodule lists in
        its ``no_weight_decay()`` (e.g. ToST's temperature, as its authors train it)."""
        exempt = set()
        for prefix, module in self.named_modules():
            if hasattr(module, "no_weight_decay"):
                exempt |= {f"{prefix}.{name}" if prefix else name for name in module.no_weight_decay()}
        named = list(self.named_parameters())
        unknown = exempt - {n for n, _ in named}
        if unknown:
            raise ValueError(f"no_weight_decay() names parameters that do not exist: {sorted(unknown)}")
        return [
            {"params": [p for n, p in named if n not in exempt], "weight_decay": self.optim["weight_decay"]},
            {"params": [p for n, p in named if n in exempt], "weight_decay": 0.0},
        ]

    def configure_optimizers(self):
        o = self.optim
        optimizer = torch.optim.AdamW(self.parameter_groups(), lr=o["lr"], betas=tuple(o["betas"]), eps=o["eps"])
        if o["schedule"] == "onecycle_linear":
            total = max(self.max_steps, 1) + 1  # +1: OneCycleLR refuses a step past its total
            scheduler = torch.optim.lr_scheduler.OneCycleLR(
                optimizer, max_lr=o["lr"], total_steps=total, pct_start=min(o["warmup_steps"] / total, 1.0),
                anneal_strategy="linear")
        else:
            multiplier = lr_lambda(o["schedule"], o["warmup_steps"], o.get("cycle_steps") or self.max_steps)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
