"""Training callbacks: per-step seeding, progress bars (training steps with ETA, validation, test), the run's history
over resumed segments, and throughput / peak-memory measurement."""

from __future__ import annotations

import math
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
    """Progress on the console: one bar over the run's optimizer steps (not epochs) with ETA, loss and the latest
    val accuracy; a bar of its own for each validation and for the test.

    While validation runs, the training bar steps aside (its line shows the validation bar) and its clock stops:
    elapsed time and ETA count training steps only, so the ETA does not jump after every validation. Each
    validation then leaves one line (step, accuracy, loss, seconds) above the bar. Bars are drawn by the global
    rank zero only (under DDP the other processes draw none). They go to stderr; ``lra.console`` keeps their final
    states in the run's ``train.log``.
    """

    def __init__(self):
        self.bar, self.eval_bar, self.paused_at = None, None, None

    def on_train_start(self, trainer, pl_module):
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        self.bar = tqdm(total=total, initial=trainer.global_step, desc="train", unit="step",
                        dynamic_ncols=True, file=sys.stderr, disable=not trainer.is_global_zero)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        # reading a metric waits for the GPU: on CUDA only once per logging interval
        if self.bar.disable:
            return
        if pl_module.device.type != "cuda" or trainer.global_step % max(1, trainer.log_every_n_steps) == 0:
            metrics = trainer.callback_metrics
            post = {k: f"{float(metrics[k]):.4f}" for k in ("train/loss", "val/acc") if k in metrics}
            self.bar.set_postfix(post, refresh=False)
        self.bar.update(trainer.global_step - self.bar.n)

    def on_train_end(self, trainer, pl_module):
        if self.bar is not None:
            self.bar.close()

    def on_exception(self, trainer, pl_module, exception):
        """A run stopped by an error closes its bars: left open, they would be redrawn at exit and push the bars of a
        sweep's next run down a line."""
        self._eval_end()
        self.on_train_end(trainer, pl_module)

    # ---- evaluation bars -------------------------------------------------------------------------
    def _eval_start(self, trainer, desc: str, batches, leave: bool) -> None:
        total = sum(batches) if isinstance(batches, list) else None
        total = total if total is not None and math.isfinite(total) else None
        self.eval_bar = tqdm(total=total, desc=desc, unit="batch", dynamic_ncols=True, file=sys.stderr,
                             leave=leave, position=0, disable=not trainer.is_global_zero)

    def _eval_end(self) -> None:
        if self.eval_bar is not None:
            self.eval_bar.close()
            self.eval_bar = None

    def on_validation_start(self, trainer, pl_module):
        self.paused_at = time.time()
        if self.bar is not None and not self.bar.disable:
            self.bar.clear()
        desc = "sanity check" if trainer.sanity_checking else \
            "validate" if self.bar is None else f"validate (step {trainer.global_step})"
        batches = trainer.num_sanity_val_batches if trainer.sanity_checking else trainer.num_val_batches
        # inside training the bar makes way for the training bar again; alone (lra.eval: trainer.validate) it stays
        self._eval_start(trainer, desc, batches, leave=self.bar is None and not trainer.sanity_checking)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.eval_bar.update(1)

    def on_validation_end(self, trainer, pl_module):
        self._eval_end()
        seconds = time.time() - (self.paused_at or time.time())
        if self.bar is None or self.bar.disable:
            return
        # the training clock skips the validation: tqdm's rate and ETA see training steps only
        self.bar.start_t += seconds
        self.bar.last_print_t += seconds
        metrics = trainer.callback_metrics
        if not trainer.sanity_checking and "val/acc" in metrics:
            self.bar.write(f"[lra] step {trainer.global_step}: val/acc {100 * float(metrics['val/acc']):.2f}%, "
                           f"val/loss {float(metrics['val/loss']):.4f} (validation {seconds:.1f}s)",
                           file=self.bar.fp)
        self.bar.refresh()

    def on_test_start(self, trainer, pl_module):
        self._eval_start(trainer, "test", trainer.num_test_batches, leave=True)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.eval_bar.update(1)

    def on_test_end(self, trainer, pl_module):
        self._eval_end()


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
                             "val_loss": round(float(metrics["val/loss"]), 6), "elapsed_s": round(self.elapsed(), 2)})

    def state_dict(self) -> dict:
        return {"history": self.history, "elapsed_s": self.elapsed(), "segments": self.segments}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = list(state_dict["history"])
        self.earlier_s, self.segments = float(state_dict["elapsed_s"]), int(state_dict["segments"]) + 1


class Throughput(L.Callback):
    """Training throughput (``train/tokens_per_s``) and peak memory, without a host synchronisation per step.

    Tokens are the positions the model processes (batch x padded length, both inputs for two-input tasks). On CPU
    each step is timed with the wall clock. On CUDA each step is bracketed by two CUDA events and the events are read
    once every ``trainer.log_every_n_steps`` steps (one synchronisation per interval), so the figure measures the
    kernels, not the launch-and-wait latency a per-step ``synchronize`` would add.

    Peak memory: on CUDA, the most bytes allocated during a training step above what was allocated when the step began
    (``max_memory_allocated`` after ``reset_peak_memory_stats`` at each step start, minus ``memory_allocated`` then):
    activations and temporaries, the benchmark's definition (``lra.bench``); on CPU the process's peak resident set
    size (absolute; the benchmark's tensor tracking would slow training down). ``peak_memory_kind`` says which.

    ``summary()`` gives the median rate over steps after the first ``warmup`` ones. Rates and the peak are kept in
    checkpoints, so a resumed run reports them over all its segments (memory: the highest peak).
    """

    CUDA_KIND = "cuda_peak_allocated_above_step_start"

    def __init__(self, warmup: int = 5):
        self.warmup, self.rates, self.earlier_peak_mb, self.device = warmup, [], 0.0, None
        self.start, self.pending, self.step_peak_mb = None, [], 0.0

    def state_dict(self) -> dict:
        return {"rates": self.rates, "peak_mb": self._peak()[0]}

    def load_state_dict(self, state_dict: dict) -> None:
        self.rates, self.earlier_peak_mb = list(state_dict["rates"]), float(state_dict["peak_mb"])

    def _cuda(self) -> bool:
        return self.device is not None and self.device.type == "cuda"

    def _peak(self) -> tuple[float, str]:
        if self._cuda():
            return max(self.step_peak_mb, self.earlier_peak_mb), self.CUDA_KIND
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return max(peak, self.earlier_peak_mb), "process_peak_rss"

    def on_train_start(self, trainer, pl_module):
        self.device = pl_module.device

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._cuda():
            self.base_bytes = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            begin = torch.cuda.Event(enable_timing=True)
            begin.record()
            self.pending.append([begin, None, 0])
        else:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        tokens = sum(v.numel() for k, v in batch.items() if k.startswith("input_ids"))
        if not self._cuda():
            rate = tokens / max(time.perf_counter() - self.start, 1e-9)
            self.rates.append(rate)
            pl_module.log("train/tokens_per_s", rate, batch_size=1)
            return
        peak = (torch.cuda.max_memory_allocated(self.device) - self.base_bytes) / 2**20
        self.step_peak_mb = max(self.step_peak_mb, peak)
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        self.pending[-1][1:] = [end, tokens]
        if trainer.global_step % max(1, trainer.log_every_n_steps) == 0:
            self.flush(pl_module)

    def flush(self, pl_module=None) -> None:
        """Read the pending CUDA events (one synchronisation) into per-step rates."""
        if not self.pending or self.pending[-1][1] is None:
            return
        self.pending[-1][1].synchronize()
        rates = [tokens / max(begin.elapsed_time(end) / 1000, 1e-9) for begin, end, tokens in self.pending]
        self.rates += rates
        self.pending = []
        if pl_module is not None:
            pl_module.log("train/tokens_per_s", sum(rates) / len(rates), batch_size=1)

    def summary(self, device: torch.device) -> dict:
        self.device = device
        self.flush()
        rates = sorted(self.rates[self.warmup:] or self.rates)
        peak, kind = self._peak()
        return {
            "train_tokens_per_s": rates[len(rates) // 2] if rates else None,
            "peak_memory_mb": round(peak, 1),
            "peak_memory_kind": kind,
        }
