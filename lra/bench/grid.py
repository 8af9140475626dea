"""The grid: profiles, the models as the training configs build them, the points, running them, their records.

A profile is ``configs/bench/<name>.yaml`` (every key documented there); command-line options override its
keys, and a run whose settings differ from its profile's is filed as ``<name>-custom``. Points run in the
order length -> mode -> precision -> batch size -> model, so each method is measured close in time to the
softmax and sdpa references it is compared with.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from lra.results import device_name, git_state, package_versions

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"
MODES = ("attention", "train")
PRECISIONS = ("fp32", "bf16", "fp16")
REFERENCES = ("softmax", "sdpa")  # attentions every run includes: the ratios are taken against them
SYNTHETIC = {"vocab_size": 32, "num_classes": 10}  # random token ids and labels of train mode
SETTINGS = ("device", "protocol", "task", "models", "lengths", "modes", "precisions", "batch_sizes", "warmup",
            "repeats", "timeout_s", "memory_limit_mb", "compile", "threads", "isolate", "seed", "scaling_checks")
POLL_S = 0.02


class BenchError(ValueError):
    """A bad profile, option or model name; the message names it and the fix."""


@dataclass(frozen=True)
class Point:
    model: str
    mode: str
    precision: str
    batch_size: int
    seq_len: int

    def label(self) -> str:
        return f"{self.model} {self.mode} {self.precision} b{self.batch_size} N={self.seq_len}"


def profile_names(configs: Path = CONFIGS) -> list[str]:
    return sorted(p.stem for p in (configs / "bench").glob("*.yaml"))


def model_names(configs: Path = CONFIGS) -> list[str]:
    return sorted(p.stem for p in (configs / "model").glob("*.yaml"))


def load_profile(name: str, configs: Path = CONFIGS) -> dict:
    from omegaconf import OmegaConf

    path = configs / "bench" / f"{name}.yaml"
    if not path.is_file():
        raise BenchError(f"unknown benchmark profile {name!r}: there is no {path}. Valid profiles: "
                         f"{', '.join(profile_names(configs))}. Pick one with --profile, or add a YAML file there.")
    settings = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    missing, unknown = set(SETTINGS) - set(settings), set(settings) - set(SETTINGS)
    if missing or unknown:
        raise BenchError(f"{path}: missing keys {sorted(missing)}, unknown keys {sorted(unknown)}. A profile "
                         f"has exactly these keys: {', '.join(SETTINGS)} (see configs/bench/quick.yaml).")
    return settings


def _check_list(settings: dict, key: str, valid: tuple[str, ...]) -> None:
    bad = [v for v in settings[key] if v not in valid]
    if bad or not settings[key]:
        raise BenchError(f"{key}={settings[key]}: each must be one of {', '.join(valid)} (profile key `{key}` "
                         f"or --{key.replace('_', '-')}).")


def validate(settings: dict, configs: Path = CONFIGS) -> dict:
    """Checked settings with ``models: all`` expanded and the softmax/sdpa reference models added."""
    settings = dict(settings)
    _check_list(settings, "modes", MODES)
    _check_list(settings, "precisions", PRECISIONS)
    for key in ("lengths", "batch_sizes"):
        if not settings[key] or any(not isinstance(v, int) or v < 1 for v in settings[key]):
            raise BenchError(f"{key}={settings[key]}: give positive integers (--{key.replace('_', '-')}).")
    if settings["repeats"] < 1 or settings["warmup"] < 0 or settings["timeout_s"] <= 0:
        raise BenchError(f"repeats={settings['repeats']}, warmup={settings['warmup']}, timeout_s="
                         f"{settings['timeout_s']}: need repeats >= 1, warmup >= 0, timeout_s > 0 (--repeats, "
                         f"--warmup, --timeout).")
    if settings["threads"] is not None and settings["threads"] < 1:
        raise BenchError(f"threads={settings['threads']}: give a positive number of CPU threads, or null for "
                         f"torch's default (--threads).")
    known = model_names(configs)
    models = known if settings["models"] == "all" else list(settings["models"])
    unknown = [m for m in models if m not in known]
    if unknown:
        raise BenchError(f"unknown model(s) {unknown}: no configs/model/<name>.yaml. Valid names: "
                         f"{', '.join(known)} (--models, or `models:` in the profile).")
    settings["models"] = models
    return settings


def resolve_device(setting: str) -> str:
    import torch

    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if setting == "cuda" and not torch.cuda.is_available():
        raise BenchError("device=cuda but torch sees no CUDA device. Run with --device cpu (or auto), or install "
                         "a CUDA build of torch on a machine with a GPU.")
    if setting not in ("cpu", "cuda"):
        raise BenchError(f"device={setting!r}: use cpu, cuda or auto (--device).")
    return setting


def compose_models(models: list[str], protocol: str, configs: Path = CONFIGS, task: str = "listops") -> dict:
    """``name -> composed train config`` (``model=<name> protocol=<protocol> task=<task>``), as ``lra.train`` sees
    it: the task's recipe for the protocol sizes the encoder."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(configs.resolve()), version_base="1.3"):
            return {m: compose("train", overrides=[f"model={m}", f"protocol={protocol}", f"task={task}"])
                    for m in models}
    except HydraException as err:
        raise BenchError(f"composing configs/train.yaml with protocol={protocol} task={task} failed: {err}. "
                         f"Pick a protocol from configs/protocol/ (--protocol), a task from configs/task/ (--task)."
                         ) from None
    finally:
        GlobalHydra.instance().clear()


def attention_of(model: str, configs: Path = CONFIGS) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.load(configs / "model" / f"{model}.yaml").attention


def with_references(models: list[str], configs: Path = CONFIGS) -> list[str]:
    """``models`` plus, for each reference attention none of them uses, the first model config that uses it."""
    used = {attention_of(m, configs) for m in models}
    extra = []
    for ref in REFERENCES:
        if ref not in used:
            extra += [m for m in model_names(configs) if attention_of(m, configs) == ref][:1]
    return models + extra


def model_settings(cfg, seq_len: int) -> dict:
    """The resolved ``model``, ``encoder`` and ``optim`` blocks of a composed config at ``data.seq_len``, with no
    attention dropout: dropout on the attention probabilities sends exact attention to PyTorch's math kernel
    (``lra.attention.sdpa``), so the reference rows would not measure the fused kernels; no method drops attention
    weights in the benchmark (the tables say so)."""
    from omegaconf import OmegaConf

    cfg = cfg.copy()
    cfg.data.seq_len = seq_len  # the same value the command-line override data.seq_len=<N> would give
    cfg.encoder.attention_dropout = cfg.encoder.efficient_attention_dropout = 0.0
    return {key: OmegaConf.to_container(cfg[key], resolve=True) for key in ("model", "encoder", "optim")}


def plan(settings: dict, device: str) -> tuple[list[Point], list[str]]:
    """The points of the grid in run order, and notes on what was left out."""
    precisions = [p for p in settings["precisions"] if device == "cuda" or p == "fp32"]
    notes = [f"precision {p} runs on GPU only: skipped on CPU" for p in settings["precisions"] if p not in precisions]
    points = [
        Point(m, mode, precision, b, n)
        for n in settings["lengths"]
        for mode in settings["modes"]
        for precision in precisions
        for b in settings["batch_sizes"]
        for m in settings["models"]
    ]
    return points, notes


def point_spec(point: Point, blocks: dict, settings: dict, device: str) -> dict:
    """A point's measurement spec. Half-precision points run the attention in half precision too (a protocol's
    ``encoder.attention_fp32`` is dropped there), so that exact attention can reach the fused half-precision kernels."""
    encoder = blocks["encoder"] if point.precision == "fp32" else {**blocks["encoder"], "attention_fp32": False}
    return {
        "attention": blocks["model"]["attention"],
        "options": blocks["model"].get("options") or {},
        "encoder": encoder,
        "optim": blocks["optim"],
        "mode": point.mode,
        "precision": point.precision,
        "batch_size": point.batch_size,
        "seq_len": point.seq_len,
        "warmup": settings["warmup"],
        "repeats": settings["repeats"],
        "compile": bool(settings["compile"]),
        "threads": settings["threads"],
        "device": device,
        "seed": settings["seed"],
        **SYNTHETIC,
    }


def default_memory_limit_mb() -> float:
    return 0.8 * os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**20


def resident_mb(pid: int) -> float | None:
    """Resident memory of process ``pid`` (Linux ``/proc``), or None where it cannot be read."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def run_isolated(spec: dict, timeout_s: float, memory_limit_mb: float | None) -> dict:
    """Run ``spec`` in a fresh process; past ``timeout_s`` -> ``timeout``, past the memory limit -> ``oom``."""
    with tempfile.TemporaryDirectory(prefix="lra-bench-") as tmp:
        result, log = Path(tmp) / "result.json", Path(tmp) / "log.txt"
        with open(log, "w") as out:
            proc = subprocess.Popen([sys.executable, "-m", "lra.bench.measure", json.dumps(spec), str(result)],
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline, failure = time.monotonic() + timeout_s, None
        while proc.poll() is None:
            rss = resident_mb(proc.pid)
            if time.monotonic() > deadline:
                failure = {"status": "timeout", "error": f"no result within the point's time limit of {timeout_s}s"}
            elif memory_limit_mb and rss is not None and rss > memory_limit_mb:
                failure = {"status": "oom",
                           "error": f"resident memory {rss:.0f} MB passed the limit of {memory_limit_mb:.0f} MB"}
            if failure:
                os.killpg(proc.pid, signal.SIGKILL)  # the point's own process group (compile workers included)
                proc.wait()
                return failure
            time.sleep(POLL_S)
        if result.is_file():
            return json.loads(result.read_text())
        tail = log.read_text()[-1500:]
        if proc.returncode == -signal.SIGKILL:
            return {"status": "oom", "error": f"killed by SIGKILL (the kernel's out-of-memory killer?): {tail}"}
        return {"status": "error", "error": f"exit status {proc.returncode}: {tail}"}


def device_slug(device: str) -> str:
    import torch

    if device == "cpu":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")


def write_point_record(run_dir: Path, record: dict) -> Path:
    """``<run_dir>/<model>/<mode>_<precision>_b<B>_n<N>.json``, created exclusively: never overwritten."""
    folder = run_dir / record["model"]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{record['mode']}_{record['precision']}_b{record['batch_size']}_n{record['seq_len']}.json"
    with open(path, "x") as f:
        json.dump(record, f, indent=1)
    return path


def describe(result: dict) -> str:
    if result["status"] != "ok":
        return f"{result['status'].upper()} ({result['error'][:160]})"
    memory = "memory n/a" if result["peak_mb"] is None else f"{result['peak_mb']:.1f} MB"
    return (f"{result['median_ms']:.2f} ms (min {result['min_ms']:.2f}, max {result['max_ms']:.2f}), "
            f"{result['steps_per_s']:.2f} steps/s, {memory}")


def say(message: str) -> None:
    print(message, flush=True)  # progress shows at once when the output goes to a file or a pipe


def run_grid(profile: str, settings: dict, results_dir: Path, configs: Path = CONFIGS, log=say) -> list[dict]:
    """Run every point of ``settings`` (a checked profile) and write one record per point; returns the records."""
    import torch

    from lra.bench.measure import run_point

    settings = validate(settings, configs)
    device = resolve_device(settings["device"])
    models = with_references(settings["models"], configs)
    if models != settings["models"]:
        log(f"[lra-bench] adding the reference model(s) {models[len(settings['models']):]} (ratios need them)")
    settings = {**settings, "models": models}
    composed = compose_models(models, settings["protocol"], configs, settings["task"])
    points, notes = plan(settings, device)
    for note in notes:
        log(f"[lra-bench] {note}")
    memory_limit = settings["memory_limit_mb"] or default_memory_limit_mb()
    slug = device_slug(device)
    run_id = f"{time.strftime('%Y%m%d-%H%M%S')}_{secrets.token_hex(3)}"
    run_dir = Path(results_dir) / "bench" / profile / slug / run_id
    common = {"kind": "bench", "profile": profile, "run_id": run_id, "device": device_name(torch.device(device)),
              "device_type": device, "device_slug": slug, "git": git_state(REPO), "versions": package_versions()}
    log(f"[lra-bench] {len(points)} points on {common['device']} -> {run_dir}")
    records = []
    for i, point in enumerate(points, 1):
        blocks = model_settings(composed[point.model], point.seq_len)
        spec = point_spec(point, blocks, settings, device)
        started = time.time()
        result = run_isolated(spec, settings["timeout_s"], memory_limit) if settings["isolate"] else run_point(spec)
        record = {
            **common,
            "status": result["status"],
            "model": blocks["model"]["name"],
            "model_config": point.model,
            "attention": spec["attention"],
            "mode": point.mode,
            "precision": point.precision,
            "batch_size": point.batch_size,
            "seq_len": point.seq_len,
            "compile": spec["compile"],
            **{k: v for k, v in result.items() if k != "status"},
            "config": {"bench": settings, **blocks, "synthetic": SYNTHETIC},
            "started": started,
            "finished": time.time(),
        }
        write_point_record(run_dir, record)
        records.append(record)
        log(f"[{i}/{len(points)}] {point.label()}: {describe(result)}")
    return records

