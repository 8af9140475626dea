"""Training callbacks: per-step seeding, a step progress bar with ETA, and throughput / peak-memory measurement."""

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


class Throughput(L.Callback):
    """Times every training step (synchronising CUDA) and logs ``train/tokens_per_s``.

    Tokens are the positions the model processes (batch x padded length, both inputs for two-input
    tasks). ``summary()`` gives the median over steps after the first ``warmup`` ones, and the peak memory:
    ``torch.cuda.max_memory_allocated`` on CUDA, the process's peak resident set size on CPU.
    """

    def __init__(self, warmup: int = 5):
        self.warmup, self.rates, self.start = warmup, [], None

    def _sync(self, pl_module):
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_start(self, trainer, pl_module):
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
        if device.type == "cuda":
            peak, kind = torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_memory_allocated"
        else:
            peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process_peak_rss"
        return {
            "train_tokens_per_s": rates[len(rates) // 2] if rates else None,
            "peak_memory_mb": round(peak, 1),
            "peak_memory_kind": kind,
        }
