"""Training callbacks: per-step seeding, a step progress bar with ETA, the run's history over resumed segments, and
throughput / peak-memory measurement."""

from __future__ import annotations

import resource
import sys
import time

import lightning as L
import numpy as np
import torch
from tqdm.auto import tqdm


class StepSeed(L.Callback):
    """Seeds torch's generators before every training step from ``(seed, global rank, step)``.

    The randomness of a step (dropout masks, Proxyformer's landmark dropout, ...) is then a function of the step
    alone, not of everything drawn before it, so a run resumed from a checkpoint draws exactly what the
    uninterrupted run drew (with ``StepSampler`` giving it the same batches). Processes draw different masks.
    """

    def __init__(self, seed: int):
        self.seed = seed

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        state = np.random.SeedSequence([self.seed, trainer.global_rank, trainer.global_step]).generate_state(2)
        torch.manual_seed(int(state[0]) << 32 | int(state[1]))


class StepProgressBar(L.Callback):
    """One bar over the run's optimizer steps (not epochs), with ETA, loss and the latest val accuracy."""

    def __init__(self):
        self.bar = None

    def on_train_start(self, trainer, pl_module):
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        self.bar = tqdm(total=total, initial=trainer.global_step, desc="train", unit="step",
                        dynamic_ncols=True, file=sys.stderr)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        metrics = trainer.callback_metrics
        post = {k: f"{float(metrics[k]):.4f}" for k in ("train/loss", "val/acc") if k in metrics}
        self.bar.set_postfix(post, refresh=False)
        self.bar.update(trainer.global_step - self.bar.n)

    def on_train_end(self, trainer, pl_module):
        if self.bar is not None:
            self.bar.close()


class RunHistory(L.Callback):
    """What a run did over all its segments: a run resumed from a checkpoint continues the history saved in it.

    ``history``: ``{step, val_acc, val_loss, elapsed_s}`` at every validation (the figures the best-checkpoint choice
    was made from; the run record keeps them for the learning-curve plots). ``elapsed()``: seconds of fitting summed
    over segments; a killed segment counts up to its last checkpoint (the steps after it are trained again and
    counted then). ``segments``: how many processes the fit took.
    """

    def __init__(self):
        self.history: list[dict] = []
        self.earlier_s, self.segments, self.started = 0.0, 1, None

    def on_fit_start(self, trainer, pl_module):
        self.started = time.perf_counter()

    def elapsed(self) -> float:
        return self.earlier_s + (time.perf_counter() - self.started if self.started is not None else 0.0)

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        self.history.append({"step": trainer.global_step, "val_acc": round(float(metrics["val/acc"]), 6),
                             "val_loss": round(float(metrics["val/loss"]), 6), "elapsed_s": round(self.elapsed(), 1)})

    def state_dict(self) -> dict:
        return {"history": self.history, "elapsed_s": self.elapsed(), "segments": self.segments}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = list(state_dict["history"])
        self.earlier_s, self.segments = float(state_dict["elapsed_s"]), int(state_dict["segments"]) + 1


class Throughput(L.Callback):
    """Times every training step (synchronising CUDA) and logs ``train/tokens_per_s``.

    Tokens are the positions the model processes (batch x padded length, both inputs for two-input
    tasks). ``summary()`` gives the median over steps after the first ``warmup`` ones, and the peak memory:
    ``torch.cuda.max_memory_allocated`` on CUDA, the process's peak resident set size on CPU. Both are kept in
    checkpoints, so a resumed run reports them over all its segments (rates: all steps; memory: the highest peak).
    """

    def __init__(self, warmup: int = 5):
        self.warmup, self.rates, self.start, self.earlier_peak_mb, self.device = warmup, [], None, 0.0, None

    def state_dict(self) -> dict:
        return {"rates": self.rates, "peak_mb": self._peak()[0]}

    def load_state_dict(self, state_dict: dict) -> None:
        self.rates, self.earlier_peak_mb = list(state_dict["rates"]), float(state_dict["peak_mb"])

    def _peak(self) -> tuple[float, str]:
        if self.device is not None and self.device.type == "cuda":
            peak, kind = torch.cuda.max_memory_allocated(self.device) / 2**20, "cuda_max_memory_allocated"
        else:
            peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process_peak_rss"
        return max(peak, self.earlier_peak_mb), kind

    def _sync(self, pl_module):
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_start(self, trainer, pl_module):
        self.device = pl_module.device
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._sync(pl_module)
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._sync(pl_module)
        tokens = sum(v.numel() for k, v in batch.items() if k.startswith("input_ids"))
        rate = tokens / max(time.perf_counter() - self.start, 1e-9)
        self.rates.append(rate)
        pl_module.log("train/tokens_per_s", rate, batch_size=1)

    def summary(self, device: torch.device) -> dict:
        rates = sorted(self.rates[self.warmup:] or self.rates)
        self.device = device
        peak, kind = self._peak()
        return {
            "train_tokens_per_s": rates[len(rates) // 2] if rates else None,
            "peak_memory_mb": round(peak, 1),
            "peak_memory_kind": kind,
        }
