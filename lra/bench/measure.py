"""One benchmark point, measured in this process (see ``lra.bench`` for the method).

``python -m lra.bench.measure SPEC_JSON RESULT_PATH`` is how the grid runs a point in a fresh process;
``run_point(spec)`` is the same in-process. A spec holds everything the point needs, already resolved::

    {"attention": "nystromformer", "options": {...}, "encoder": {...}, "optim": {...},
     "mode": "attention" | "train", "precision": "fp32" | "bf16" | "fp16", "batch_size": 1, "seq_len": 4096,
     "warmup": 1, "repeats": 3, "compile": false, "threads": null, "device": "cpu" | "cuda", "seed": 0,
     "vocab_size": 32, "num_classes": 10}

The result holds ``status`` (``ok`` | ``oom`` | ``error``), and for ``ok`` the step times (ms), their
median/min/max/quartiles, steps/s, tokens/s and ``peak_mb`` with the ``memory_method`` that produced it (on CPU
also ``rss_peak_mb``, the resident-memory figure of one more step, with its ``rss_method``).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import statistics
import sys
import time
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import lra.attention as attention
from lra.models import build_model

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
MB = 2**20


class CudaMemory:
    method = "cuda max_memory_allocated - memory_allocated before the step"

    def __init__(self, device: torch.device):
        self.device = device

    def start(self) -> None:
        torch.cuda.synchronize(self.device)
        self.base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak_mb(self) -> float:
        torch.cuda.synchronize(self.device)
        return (torch.cuda.max_memory_allocated(self.device) - self.base) / MB


def _proc_status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024  # the kernel reports kB
    raise OSError(f"/proc/self/status has no {key}")


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters (malloc.h)


def release_allocator_cache() -> bool:
    """Make glibc's malloc give freed memory back at once; False where this is not glibc.

    Every block of 64 KB or more gets its own mapping (unmapped when freed), the heap is trimmed above
    128 KB of free space, and what is free now is returned (``malloc_trim``). For this process only.
    """
    try:
        libc = ctypes.CDLL(None)
        tuned = libc.mallopt(M_MMAP_THRESHOLD, 64 * 1024) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 128 * 1024) == 1
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        return False
    return tuned


class ResidentMemory:
    """Peak resident set size during the step above the resident size before it (Linux ``VmHWM``/``VmRSS``)."""

    def __init__(self, release_cache: bool):
        self.released = release_cache and release_allocator_cache()
        self.method = "VmHWM - VmRSS before the step (peak reset via /proc/self/clear_refs)" + (
            ", glibc malloc cache released" if self.released else ", allocator cache included")

    def start(self) -> None:
        Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak RSS to the current RSS
        self.base = _proc_status_bytes("VmRSS")

    def peak_mb(self) -> float:
        return (_proc_status_bytes("VmHWM") - self.base) / MB


class LivePeak(TorchDispatchMode):
    """Within the mode: ``peak`` = the most bytes held at once by tensors it produced (each storage counted once),
    ``largest`` = the element count of the largest tensor any operation produced."""

    def __init__(self):
        super().__init__()
        self.refs, self.peak, self.largest = [], 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.refs.append(weakref.ref(t))
                self.largest = max(self.largest, t.numel())
        alive = [t for t in (ref() for ref in self.refs) if t is not None]
        self.refs = [weakref.ref(t) for t in alive]
        live = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in alive}
        self.peak = max(self.peak, sum(live.values()))
        return out


TENSOR_METHOD = "peak bytes of live tensors created during the step (torch dispatch tracking)"


def tensor_peak_mb(step) -> float:
    """The CPU counterpart of ``CudaMemory``: the peak bytes of live tensors created during ``step``."""
    with LivePeak() as tracker:
        step()
    return tracker.peak / MB


def resident_peak_mb(step, release_cache: bool) -> tuple[float | None, str]:
    """The process's peak resident memory during ``step`` above its resident size before it (Linux only)."""
    if not os.access("/proc/self/clear_refs", os.W_OK):
        return None, "unavailable: needs Linux /proc/self/clear_refs"
    probe = ResidentMemory(release_cache)
    probe.start()
    step()
    return probe.peak_mb(), probe.method


class CudaTimer:
    def __init__(self):
        self.begin = torch.cuda.Event(enable_timing=True)
        self.end = torch.cuda.Event(enable_timing=True)

    def time_ms(self, step) -> float:
        self.begin.record()
        step()
        self.end.record()
        self.end.synchronize()
        return self.begin.elapsed_time(self.end)


class WallTimer:
    def time_ms(self, step) -> float:
        start = time.perf_counter()
        step()
        return (time.perf_counter() - start) * 1000


def attention_step(spec: dict, device: torch.device, autocast):
    """``step()``: one inference forward of the attention module alone on ``[B, N, dim]``, every token real."""
    enc = spec["encoder"]
    module = attention.build(spec["attention"], dim=enc["dim"], num_heads=enc["num_heads"], **spec["options"])
    module = module.to(device).eval()
    run = torch.compile(module) if spec["compile"] else module
    b, n = spec["batch_size"], spec["seq_len"]
    x, mask = torch.randn(b, n, enc["dim"], device=device), torch.ones(b, n, dtype=torch.bool, device=device)

    def step() -> None:
        with torch.inference_mode(), autocast():
            run(x, mask)

    return step, module


def train_step(spec: dict, device: torch.device, autocast):
    """``step()``: one training step of the whole classifier on random token ids of length N, every token real."""
    model = build_model(spec["encoder"], spec["attention"], spec["options"], spec["vocab_size"],
                        spec["seq_len"], spec["num_classes"]).to(device).train()
    run = torch.compile(model) if spec["compile"] else model
    o = spec["optim"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=o["lr"], betas=tuple(o["betas"]), eps=o["eps"],
                                  weight_decay=o["weight_decay"])
    scaler = torch.amp.GradScaler(device.type, enabled=spec["precision"] == "fp16")
    b, n = spec["batch_size"], spec["seq_len"]
    batch = {"input_ids": torch.randint(1, spec["vocab_size"], (b, n), device=device),
             "mask": torch.ones(b, n, dtype=torch.bool, device=device),
             "label": torch.randint(0, spec["num_classes"], (b,), device=device)}

    def step() -> None:
        with autocast():
            loss = F.cross_entropy(run(batch).float(), batch["label"])
            loss = loss + sum(model.aux_losses().values(), torch.zeros((), device=device))
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    return step, model


def summarise(times_ms: list[float], batch_size: int, seq_len: int) -> dict:
    median = statistics.median(times_ms)
    q1, _, q3 = statistics.quantiles(times_ms, n=4, method="inclusive") if len(times_ms) > 1 else [median] * 3
    return {
        "times_ms": [round(t, 4) for t in times_ms],
        "median_ms": median,
        "min_ms": min(times_ms),
        "max_ms": max(times_ms),
        "q1_ms": q1,
        "q3_ms": q3,
        "steps_per_s": 1000 / median,
        "tokens_per_s": 1000 * batch_size * seq_len / median,
    }


def measure(spec: dict, release_cache: bool = False) -> dict:
    """Warm up, time ``repeats`` steps, then measure the memory of one more step (see ``lra.bench``); may raise.

    ``release_cache``: let the CPU memory step reconfigure this process's malloc (fresh processes only).
    """
    device = torch.device(spec["device"])
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    dtype = DTYPES[spec["precision"]]
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else contextlib.nullcontext
    step, model = (attention_step if spec["mode"] == "attention" else train_step)(spec, device, autocast)
    for _ in range(spec["warmup"]):
        step()
    timer = CudaTimer() if device.type == "cuda" else WallTimer()
    times = [timer.time_ms(step) for _ in range(spec["repeats"])]
    if device.type == "cuda":
        memory = CudaMemory(device)
        memory.start()
        step()
        peak, method, resident = memory.peak_mb(), memory.method, {}
    else:
        peak, method = tensor_peak_mb(step), TENSOR_METHOD
        rss, rss_method = resident_peak_mb(step, release_cache)
        resident = {"rss_peak_mb": rss, "rss_method": rss_method}
    return {
        "status": "ok",
        **summarise(times, spec["batch_size"], spec["seq_len"]),
        "peak_mb": peak,
        "memory_method": method,
        **resident,
        "threads": torch.get_num_threads(),
        **({"sdpa_kernels": kernels} if (kernels := sorted(set().union(
            *(getattr(m, "backends_used", ()) for m in model.modules())))) else {}),
    }


def is_out_of_memory(err: BaseException) -> bool:
    if isinstance(err, torch.OutOfMemoryError | MemoryError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text)


def run_point(spec: dict, release_cache: bool = False) -> dict:
    """``measure`` with out-of-memory recorded as ``oom`` and any other failure as ``error``."""
    try:
        return measure(spec, release_cache)
    except Exception as err:  # a failed point is a result, never a crash of the grid
        status = "oom" if is_out_of_memory(err) else "error"
        return {"status": status, "error": f"{type(err).__name__}: {err}"[:2000]}


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m lra.bench.measure SPEC_JSON RESULT_PATH (run by lra-bench)", file=sys.stderr)
        return 2
    spec, out = json.loads(argv[0]), Path(argv[1])
    out.write_text(json.dumps(run_point(spec, release_cache=True)))  # a fresh process: its malloc is ours
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
