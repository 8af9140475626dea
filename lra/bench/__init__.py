"""Efficiency benchmark: time and peak memory over attention methods x sequence lengths (``lra-bench``).

    lra-bench --profile quick                 # a few minutes, lengths up to 4K, the GPU where one is (``make bench``)
    lra-bench --profile gpu                   # the GPU tables: 1K..16K, inference and training, fp32/bf16/fp16
    lra-bench --profile lra-table2            # LRA Table 2's condition: LRA Text encoder, batch 32, 1K..4K
    lra-bench --profile full                  # every length 1K..16K, fp32/bf16/fp16 on GPU
    lra-bench --profile scaling               # 8192/2048 time and memory ratio per method (linear-cost check)
    lra-bench --models nystromformer --lengths 4096 8192 --modes train
    lra-bench --render-only                   # rebuild results/efficiency.{md,csv} and the plots from the records

Grid: model (every ``configs/model/*.yaml`` unless ``--models``) x sequence length x mode x precision x batch
size. Each model is built exactly as training builds it: ``configs/train.yaml`` composed with ``model=<m>
protocol=<p> data.seq_len=<N>`` (so ``${encoder.attention_dropout}`` and ``${data.seq_len}`` in a model config
resolve as in a real run). Modes:

* ``attention``: the attention module alone, ``[B, N, dim]`` input with every token real, eval mode under
  ``torch.inference_mode``: one step is one forward (the Nyströmformer paper's measurement, batch 1);
* ``train``: the whole encoder + classifier of the protocol on random token ids: one step is forward,
  cross-entropy plus the attentions' auxiliary losses, backward and an AdamW step with the protocol's
  optimizer settings (the LRA paper's measurement).

Precision ``fp32`` runs as is; ``bf16`` and ``fp16`` (GPU only) run under ``torch.autocast`` (``fp16`` train
steps with a gradient scaler), and at those precisions the attention runs in half precision too (a protocol's
``encoder.attention_fp32`` applies to ``fp32`` points only), so exact attention can reach the fused half-precision
kernels. No method drops attention weights in the benchmark (attention dropout would send exact attention to
PyTorch's math kernel); the records name the SDPA kernels that ran (``sdpa_kernels``).

How a point is measured. Every point runs in a fresh Python process (``python -m lra.bench.measure``) so
that no allocator cache, compiled kernel or memory high-water mark of another point can leak into it. The
process builds the model and its random inputs, runs ``warmup`` untimed steps and ``repeats`` timed steps at
length N, and reports the median step time with its min/max and quartiles; then it measures the memory of
one more step:

* CUDA: each timed step between two CUDA events (synchronised); memory is ``torch.cuda.max_memory_allocated``
  after ``reset_peak_memory_stats``, minus ``torch.cuda.memory_allocated`` before the step: bytes of live
  tensors, the caching allocator's reserve not counted.
* CPU: wall time (``time.perf_counter``) of each timed step; memory is the peak number of bytes held at once by
  tensors created during the memory step, tracked at the dispatcher (``LivePeak``, a ``TorchDispatchMode`` that
  sees every operation's outputs and counts each live storage once): the CPU counterpart of CUDA's allocator
  statistics, exact and repeatable, independent of the allocator. It does not see scratch memory that a kernel
  allocates and frees inside one operation. As a second opinion, one more step measures the process's peak
  resident set size above its resident size before it (``rss_peak_mb``: Linux ``VmHWM`` reset by writing ``5`` to
  ``/proc/self/clear_refs``, after telling glibc's malloc to return freed memory at once with ``malloc_trim`` and
  ``mallopt``); it counts the math libraries' working memory too but varies by 10-20% between identical runs
  (page and allocator effects), which is why the tables use the tensor figure.

Figures are ``peak_mb`` (MB = 2^20 bytes) above the state held before the step (parameters, optimizer
state, inputs). A point that runs out of memory (a CUDA/CPU allocation error, the kernel's OOM killer, or its
resident memory passing ``--memory-limit-mb``, by default 80% of the machine's memory) is recorded as
``oom``; one that passes the per-point time limit (``--timeout``, measured from the process start) as
``timeout``; any other failure as ``error`` with its message. The grid never stops on a failed point.

Every point is one JSON record (device, package versions, git commit, the full configuration) written with
exclusive creation under ``results/bench/<profile>/<device>/<run id>/<model>/`` (never overwritten). Tables
(``results/efficiency.md`` and ``.csv``) take, for each profile and device, the latest run, and give
absolute figures (steps/s, ms, peak MB) and the LRA Table 2 ratios against softmax *and* sdpa measured in
the same run: relative speed ``t_reference / t_method`` and relative memory ``m_method / m_reference``.
Plots (``results/plots/``, needs matplotlib: ``pip install -e '.[plots]'``) show throughput and memory
against length on log scales, and, once accuracy records exist, accuracy against throughput with memory as
the marker size (LRA Figure 3).
"""

from lra.bench.cli import main

__all__ = ["main"]
