"""``lra-data``: get, check, prepare and time the data of every task.

    lra-data status   [TASK ...] [--data-dir D] [--lra-release R] [OVERRIDES ...]
    lra-data download TASK [--data-dir D] [--lra-release R] [--url URL] [--force] [--max-extract-gb G] [OVERRIDES ...]
    lra-data prepare  TASK [--data-dir D] [--lra-release R] [OVERRIDES ...]
    lra-data generate TASK [--data-dir D] [listops: --seed N --num-train N ...] [OVERRIDES ...]
    lra-data bench    TASK [--batches N] [--steps N] [OVERRIDES ...]

Every command composes the training config (``configs/train.yaml`` with ``task=TASK`` and the Hydra
``OVERRIDES``, e.g. ``protocol=quick`` or ``task.max_len=1000``) and instantiates the task's datamodule,
so its paths, options and cache keys are exactly those of ``python -m lra.train task=TASK OVERRIDES``. The
protocol is ``nystrom`` unless ``protocol=`` is given: the data ``make reproduce`` trains on (``protocol=quick``:
the demo's small generated sets).
``--data-dir``/``--lra-release`` are ``paths.data_dir``/``paths.lra_release``.

* ``status``: per task (every ``configs/task/*.yaml``, or the TASKs named): its source, each source file
  present or missing, the prepared caches with their sizes (the one the current options use is marked).
* ``download``: tasks whose datamodule has a ``download()`` method (the hub tasks, Text and Image) call
  it (``datasets.load_dataset`` then ``save_to_disk`` under ``<data_dir>/hub/``); every other task gets LRA's
  release archive: fetched into ``<data_dir>`` with resume (HTTP Range) and checked (the size the server
  announces, the MD5 of Google Cloud Storage's ``x-goog-hash`` header when sent; LRA publishes no checksum, so
  the SHA-256 of the file is computed and recorded next to it in ``<archive>.sha256`` and checked on reuse;
  nothing is recorded or kept unless the file opens as a gzip-compressed tar, so an error page served with
  status 200 is reported, not trusted), then extracted and flattened into ``paths.lra_release`` (the archive
  nests ``lra_release/lra_release/``). Extraction refuses links (the release has none; a relative link could
  point outside the folder once flattened), anything but files and folders, paths leaving the folder, and
  more than ``--max-extract-gb`` (default ``EXTRACT_RATIO`` times the archive's size) of content. Entries
  already in ``paths.lra_release`` are kept; ``--force`` downloads the archive again and extracts it over
  them (the way to repair a damaged release). One download runs at a time per release folder (a lock).
* ``prepare``: the datamodule's cached, atomic ``prepare_data`` with a progress bar.
* ``generate``: tasks with ``source: generate`` (ListOps, Pathfinder, Path-X): the files that
  ``task.source=generate`` trains on, in the folder training reads (the datamodule's ``ensure_sources`` makes
  them). Defaults are the full-size sets: ListOps keeps its flags (``--seed``, ``--num-train``, ...); the other
  tasks take ``task.generator.*`` overrides and the ``nystrom`` protocol's data unless ``protocol=`` is given
  (``protocol=quick`` makes the small quick sets).
* ``bench``: prepare time, data-loader batches/s, and the training-step time of the task's model under the
  ``nystrom`` protocol (unless ``protocol=`` is given) on one batch, to show whether loading keeps up.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import statistics
import sys
import tarfile
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path
from urllib.parse import urlparse

from tqdm import tqdm

from lra.data import store
from lra.data.base import RELEASE_URL, SPLITS, DataError
from lra.data.listops_generator import ListOpsSpec

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
DEFAULT_PROTOCOL = "nystrom"  # the protocol of `make reproduce`: status and prepare look at the data it needs
CHUNK = 1 << 20
EXTRACT_RATIO = 20  # extraction stops beyond this multiple of the whole archive's size (--max-extract-gb)
SAFE_EXTRACT = {"filter": "data"} if hasattr(tarfile, "data_filter") else {"set_attrs": False}


# ---- composing the training config -----------------------------------------------------------------
def task_names() -> list[str]:
    return sorted(p.stem for p in (CONFIGS / "task").glob("*.yaml"))


def compose_task(task: str, overrides: list[str], data_dir: str | None = None, lra_release: str | None = None):
    """The composed training config for ``task=<task>`` and ``overrides`` (as ``python -m lra.train`` sees it), the
    protocol ``DEFAULT_PROTOCOL`` unless the overrides name one."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if task not in task_names():
        raise DataError(f"unknown task {task!r}; the tasks are the files of {CONFIGS / 'task'}: "
                        f"{', '.join(task_names())}.")
    if not any(o.startswith("protocol=") for o in overrides):
        overrides = [f"protocol={DEFAULT_PROTOCOL}", *overrides]
    paths = []
    if data_dir:
        paths.append(f"paths.data_dir={data_dir}")
    if lra_release:
        paths.append(f"paths.lra_release={lra_release}")
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(CONFIGS), version_base="1.3"):
            return compose("train", overrides=[f"task={task}", *paths, *overrides])
    except (HydraException, OmegaConfBaseException) as err:
        raise DataError(f"cannot compose the config of task={task} with {overrides}: {err}") from None
    finally:
        GlobalHydra.instance().clear()


def datamodule(cfg):
    """Instantiate ``cfg.task.datamodule`` (a missing optional module becomes a ``DataError``)."""
    import hydra

    try:
        return hydra.utils.instantiate(cfg.task.datamodule)
    except hydra.errors.InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, DataError):
            raise cause from None
        raise DataError(f"cannot build the datamodule of task={cfg.task.name}: {cause or err}") from None


def _human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return ""


def _folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


# ---- status -----------------------------------------------------------------------------------------
@contextlib.contextmanager
def hub_offline(enabled: bool = True):
    """Within the block, the Hugging Face libraries read only their local caches (no network, no retries)."""
    if not enabled:
        yield
        return
    import datasets.config
    import huggingface_hub.constants

    saved = (datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE,
             huggingface_hub.constants.HF_HUB_OFFLINE)
    datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
    huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        (datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE,
         huggingface_hub.constants.HF_HUB_OFFLINE) = saved
def cmd_status(args) -> int:
    for task in args.tasks or task_names():
        try:
            cfg = compose_task(task, args.overrides, args.data_dir, args.lra_release)
            dm = datamodule(cfg)
        except DataError as err:
            print(f"{task}: cannot set up: {err}\n")
            continue
        print(f"{task}  (protocol {cfg.protocol.name}; source {json.dumps(dm.describe_source())})")
        files = dm.source_files()
        missing = [p for p in files if not p.is_file()]
        if not files:
            print("  sources: kept by the library's own cache (nothing on disk to check until prepared)")
        elif len(files) <= 8:
            for path in files:
                print(f"  {'missing' if path in missing else 'present'}  {path}")
        else:
            print(f"  sources: {len(files) - len(missing)} of {len(files)} files present in {files[0].parent}")
            for path in missing[:5]:
                print(f"  missing  {path}")
        try:
            with hub_offline(not files):  # a status never waits on the network: the library's cache or nothing
                current = None if missing else dm.cache_dir
        except DataError as err:  # e.g. a hub dataset that cannot be loaded here
            current = None
            print(f"  -> cannot key the cache: {err}")
        caches = sorted(p for p in (dm.cache_root / dm.name).glob("*") if p.is_dir())
        for folder in caches:
            state = ("prepared" if (folder / "meta.json").is_file() else
                     "incomplete (a prepare under way, or left by a killed one: the next prepare removes it)")
            mark = "   <- current options" if folder == current else ""
            print(f"  cache    {folder}  {_human(_folder_size(folder))}  {state}{mark}")
        if not caches:
            print(f"  cache    none yet under {dm.cache_root / dm.name}")
        if missing:
            print(f"  -> {dm.missing_help(missing)}")
        print()
    return 0


# ---- download ---------------------------------------------------------------------------------------
def _offline_help(url: str, dest: Path, task: str, why: str) -> DataError:
    return DataError(
        f"could not download {url} ({why}). Without network here: fetch it elsewhere (e.g. `curl -C - -o "
        f"{dest.name} {url}`), put it at {dest} (a partial {dest.name}.part there is resumed) and rerun "
        f"`lra-data download {task}`; or extract it yourself (`tar xzf {dest.name}`) and point paths.lra_release "
        f"(or LRA_RELEASE) at the lra_release/ folder that holds listops-1000/, tsv_data/ and pathfinder*/."
    )


def _remote_size(url: str, timeout: float) -> int | None:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout) as resp:
            return int(resp.headers["Content-Length"])
    except (OSError, KeyError, ValueError):
        return None


def _digests(path: Path) -> tuple[str, str]:
    sha, md5 = hashlib.sha256(), hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            sha.update(block)
            md5.update(block)
    return sha.hexdigest(), md5.hexdigest()


def _describe(head: bytes, content_type: str | None) -> str:
    """What a file that should be the archive holds instead, for messages (from its first bytes)."""
    text = head.lstrip()[:200].lower()
    if not head:
        kind = "an empty file"
    elif text.startswith((b"<!doctype html", b"<html")) or b"<html" in text:
        kind = "an HTML page"
    elif text.startswith((b"<?xml", b"<error")):
        kind = "an XML document"
    elif text.startswith((b"{", b"[")):
        kind = "a JSON document"
    else:
        kind = "data that is not gzip"
    snippet = " ".join(head[:80].decode("utf-8", errors="replace").split())
    typed = f", served as {content_type}" if content_type else ""
    return f"{kind}{typed}, starting {snippet!r}"


def archive_problem(path: Path, content_type: str | None = None) -> str | None:
    """``None`` when ``path`` opens as a gzip-compressed tar archive (its first member header is read),
    else what it is instead."""
    with open(path, "rb") as f:
        head = f.read(512)
    if not head.startswith(b"\x1f\x8b"):
        return f"{path.stat().st_size} bytes of {_describe(head, content_type)}"
    try:
        with tarfile.open(path, "r:gz") as tar:
            tar.next()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
        return f"a gzip file that is not a tar archive ({err})"
    return None


def fetch(url: str, dest: Path, task: str = "TASK", timeout: float = 30.0, force: bool = False) -> Path:
    """Download ``url`` to ``dest`` via ``dest.part`` (resumed with an HTTP Range request when present),
    check it (size, the server's MD5, and that it opens as a gzip-compressed tar) and record its SHA-256 in
    ``dest.sha256``. An existing ``dest`` is checked against that record; ``force`` downloads afresh (an
    existing ``dest`` is replaced only by a complete, checked download)."""
    record = dest.with_name(dest.name + ".sha256")
    if dest.is_file() and not force:
        problem = archive_problem(dest)
        if problem:
            raise DataError(f"{dest} is not the release archive: it holds {problem}. Delete it (and {record.name} "
                            f"if there) and run the command again to download it, or use --force.")
        sha, _ = _digests(dest)
        if record.is_file() and record.read_text().split()[0] != sha:
            raise DataError(f"{dest} does not match its recorded SHA-256 ({record}); delete both and download again.")
        record.write_text(f"{sha}  {dest.name}\n")
        print(f"{dest} already downloaded (sha256 {sha})")
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    if force:
        part.unlink(missing_ok=True)
    have = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        resp = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and have and _remote_size(url, timeout) == have:  # the partial file is complete
            resp = None
        else:
            raise _offline_help(url, dest, task, f"HTTP {err.code} {err.reason}") from None
    except (urllib.error.URLError, OSError) as err:
        raise _offline_help(url, dest, task, str(getattr(err, "reason", err))) from None
    md5 = content_type = None
    if resp is not None:
        with resp:
            content_type = resp.headers.get("Content-Type")
            resumed = have > 0 and resp.status == 206
            if resumed:  # "Content-Range: bytes <first>-<last>/<total>"
                total = resp.headers.get("Content-Range", "").rpartition("/")[2]
            else:
                total = resp.headers.get("Content-Length")
            total = int(total) if total and total.isdigit() else None
            hashes = dict(h.strip().split("=", 1) for h in resp.headers.get("x-goog-hash", "").split(",") if "=" in h)
            md5 = base64.b64decode(hashes["md5"]).hex() if "md5" in hashes else None
            have = have if resumed else 0
            with open(part, "ab" if resumed else "wb") as out, tqdm(
                total=total, initial=have, unit="B", unit_scale=True, desc=dest.name, disable=None
            ) as bar:
                for block in iter(lambda: resp.read(CHUNK), b""):
                    out.write(block)
                    bar.update(len(block))
        if total is not None and part.stat().st_size != total:
            raise DataError(
                f"{url}: got {part.stat().st_size} of {total} bytes (connection dropped). Rerun the same "
                f"command: it resumes from {part}."
            )
    sha, got_md5 = _digests(part)
    if md5 is not None and got_md5 != md5:
        part.unlink()
        raise DataError(f"{url}: the downloaded file's MD5 {got_md5} differs from the server's {md5}; it was "
                        f"deleted. Rerun the command to download it again.")
    problem = archive_problem(part, content_type)
    if problem:
        part.unlink()
        raise DataError(f"{url} did not send the release archive: it sent {problem} (an error or login page?). "
                        f"Nothing was kept or recorded. Check the URL (LRA's is {RELEASE_URL}) and the network "
                        f"(a proxy or captive portal), or download the archive by hand and put it at {dest}.")
    os.replace(part, dest)
    record.write_text(f"{sha}  {dest.name}\n")
    checked = "MD5 checked against the server's x-goog-hash; " if md5 else ""
    print(f"downloaded {dest} ({_human(dest.stat().st_size)}); {checked}sha256 {sha} recorded in {record} "
          f"(LRA publishes no checksum for this archive)")
    return dest


def _release_roots(staging: Path) -> list[Path]:
    """``staging`` and the chain of nested ``lra_release`` folders under it, deepest first."""
    chain = [staging]
    while (chain[-1] / "lra_release").is_dir():
        chain.append(chain[-1] / "lra_release")
    return chain[::-1]


def _safe_members(tar: tarfile.TarFile, archive: Path, limit: int):
    """The archive's members: plain files and folders inside it, ``limit`` bytes of content in all. Anything
    else is refused with a ``DataError``: paths that leave the folder, links (LRA's release has none, and a
    relative link can point outside ``paths.lra_release`` once the nested folders are flattened), devices."""
    total = 0
    for member in tar:
        if member.name.startswith("/") or ".." in Path(member.name).parts:
            raise DataError(f"{archive}: refusing the archive member {member.name!r}, which points outside it. "
                            f"This is not LRA's release: download it from {RELEASE_URL}.")
        if member.issym() or member.islnk():
            kind = "a symbolic link" if member.issym() else "a hard link"
            raise DataError(f"{archive}: refusing the archive member {member.name!r}, {kind} to "
                            f"{member.linkname!r}: links are not extracted (LRA's release has none, and a relative "
                            f"link could point outside the release folder once the nested lra_release/ folders are "
                            f"flattened). Nothing was extracted; download the release from {RELEASE_URL}.")
        if not (member.isfile() or member.isdir()):
            raise DataError(f"{archive}: refusing the archive member {member.name!r}, which is neither a file nor "
                            f"a folder. Nothing was extracted; download the release from {RELEASE_URL}.")
        total += member.size
        if total > limit:
            raise DataError(
                f"{archive}: refusing to extract {member.name!r}: the content would exceed {_human(limit)} "
                f"({EXTRACT_RATIO}x the archive's size unless --max-extract-gb says otherwise; a release of text "
                f"and PNG images unpacks to far less), so this looks like a decompression bomb or the wrong file. "
                f"Nothing was extracted. If the archive is what you meant, raise --max-extract-gb."
            )
        yield member


def extract_release(archive: Path, target: Path, replace: bool = False, limit: int | None = None) -> list[str]:
    """Extract ``archive`` and move the contents of its (nested) ``lra_release/`` folders into ``target``;
    deeper folders win. Entries already in ``target`` are kept, or with ``replace`` replaced (``--force``).
    ``limit``: the most bytes of content extracted (default ``EXTRACT_RATIO`` times the archive's size).
    Returns the names moved in."""
    limit = EXTRACT_RATIO * archive.stat().st_size if limit is None else limit
    store.remove_stale_partials(target.parent)
    staging = store.partial_name(target)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        try:
            with tarfile.open(archive, "r:*") as tar:
                members = _safe_members(tar, archive, limit)
                for member in tqdm(members, desc=f"extract {archive.name}", unit=" files", disable=None):
                    tar.extract(member, staging, **SAFE_EXTRACT)
        except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
            raise DataError(f"{archive} is not a complete tar.gz archive ({err}). Delete it and download again "
                            f"(`lra-data download TASK --force`).") from None
        target.mkdir(parents=True, exist_ok=True)
        moved, trash = [], staging / ".replaced"
        for root in _release_roots(staging):
            for child in sorted(root.iterdir()):
                dest = target / child.name
                if child.name in ("lra_release", trash.name) or child.name in moved:
                    continue
                if dest.exists() or dest.is_symlink():
                    if not replace:
                        continue
                    trash.mkdir(exist_ok=True)
                    os.replace(dest, trash / child.name)  # out of the way; removed with the staging folder
                shutil.move(str(child), str(dest))
                moved.append(child.name)
    finally:  # refused member, broken archive, interruption: leave no half-extracted folder behind
        shutil.rmtree(staging, ignore_errors=True)
    return moved


def cmd_download(args) -> int:
    name = Path(urlparse(args.url).path).name
    if not name or args.url.endswith("/"):
        raise DataError(f"--url {args.url} names a folder, not the archive file (it ends in '/' or has no file "
                        f"name). Give the archive's own URL, e.g. {RELEASE_URL}.")
    cfg = compose_task(args.task, args.overrides, args.data_dir, args.lra_release)
    dm = datamodule(cfg)
    if hasattr(dm, "download"):
        print(f"{args.task}: saved to {dm.download()}")
        return 0
    if "source" in cfg.task:  # a task that can also be generated: this command is about its release files
        cfg = compose_task(args.task, ["task.source=release", *args.overrides], args.data_dir, args.lra_release)
        dm = datamodule(cfg)
    if not args.force and all(p.is_file() for p in dm.source_files()):
        print(f"{args.task}: the release files are already in {cfg.paths.lra_release}; nothing to do (--force to redo)")
        return 0
    release = Path(cfg.paths.lra_release)
    limit = None if args.max_extract_gb is None else int(args.max_extract_gb * 2**30)
    with store.lock(release, f"downloading the LRA release into {release}"):
        if not args.force and all(p.is_file() for p in dm.source_files()):  # a concurrent download provided them
            print(f"{args.task}: the release files are already in {release}; nothing to do (--force to redo)")
            return 0
        archive = fetch(args.url, Path(cfg.paths.data_dir) / name, args.task, args.timeout, force=args.force)
        moved = extract_release(archive, release, replace=args.force, limit=limit)
    how = "replaced or added" if args.force else "extracted"
    print(f"{how} in {release}: {', '.join(moved) or 'nothing new'}")
    missing = [p for p in dm.source_files() if not p.is_file()]
    if missing:
        raise DataError(f"the archive did not provide what {args.task} reads: {dm.missing_help(missing)}")
    print(f"{args.task}: all {len(dm.source_files())} source files present")
    return 0


# ---- prepare ----------------------------------------------------------------------------------------
def cmd_prepare(args) -> int:
    cfg = compose_task(args.task, args.overrides, args.data_dir, args.lra_release)
    dm = datamodule(cfg)
    read_split, done = dm.read_split, []
    started = time.perf_counter()
    with tqdm(total=len(SPLITS), desc=f"prepare {args.task}", unit="split", disable=None) as bar:

        def read_with_progress(split):
            bar.set_postfix_str(split)
            arrays = read_split(split)
            bar.update()
            done.append(split)
            return arrays

        dm.read_split = read_with_progress
        dm.prepare_data()
    fresh = bool(done)
    meta = json.loads((dm.cache_dir / "meta.json").read_text())
    sizes = ", ".join(f"{k} {v}" for k, v in meta["sizes"].items())
    print(f"{args.task}: {'prepared' if fresh else 'already prepared'} in {time.perf_counter() - started:.1f}s: "
          f"{sizes} examples, {_human(_folder_size(dm.cache_dir))} in {dm.cache_dir}")
    return 0


# ---- generate ---------------------------------------------------------------------------------------
LISTOPS_FLAGS = [f.name for f in dataclasses.fields(ListOpsSpec)]


def cmd_generate(args) -> int:
    flags = {name: getattr(args, name) for name in LISTOPS_FLAGS if getattr(args, name) is not None}
    if args.task != "listops" and flags:
        raise DataError(f"--{'/--'.join(flags).replace('_', '-')} are ListOps flags; for {args.task} give "
                        f"Hydra overrides such as task.generator.seed=1.")
    generator = []
    if args.task == "listops":  # every field explicit: defaults are LRA's full-size set, whatever the protocol
        generator = [f"task.generator.{f.name}={flags.get(f.name, f.default)}" for f in dataclasses.fields(ListOpsSpec)]
    if "generator" not in compose_task(args.task, args.overrides, args.data_dir).task:
        raise DataError(f"task {args.task} has no generator (task/{args.task}.yaml has no `generator`); its data "
                        f"comes from `lra-data download {args.task}`.")
    protocol = [] if any(o.startswith("protocol=") for o in args.overrides) else ["protocol=nystrom"]
    overrides = ["task.source=generate", *protocol, *generator, *args.overrides]
    dm = datamodule(compose_task(args.task, overrides, args.data_dir))
    dm.ensure_sources()
    print("wrote " + ", ".join(str(p) for p in dm.source_files()))
    data_dir = f" paths.data_dir={args.data_dir}" if args.data_dir else ""
    print(f"train on them with: python -m lra.train task={args.task}{data_dir} " + " ".join(overrides))
    return 0


# ---- bench ------------------------------------------------------------------------------------------
def cmd_bench(args) -> dict:
    """Prepare time, loader batches/s and training-step time; returns them (and prints a summary)."""
    import torch
    import torch.nn.functional as F
    from omegaconf import OmegaConf

    from lra.models import build_model

    overrides = list(args.overrides)
    if not any(o.startswith("protocol=") for o in overrides):
        overrides.insert(0, "protocol=nystrom")
    cfg = compose_task(args.task, overrides, args.data_dir, args.lra_release)
    dm = datamodule(cfg)
    started = time.perf_counter()
    dm.prepare_data()
    dm.setup()
    prepare_s = time.perf_counter() - started
    loader = dm.train_dataloader()
    started, it = time.perf_counter(), iter(loader)  # an endless stream (StepSampler)
    for _ in range(args.batches):
        batch = next(it)
    loader_bps = args.batches / (time.perf_counter() - started)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(OmegaConf.to_container(cfg.encoder, resolve=True), cfg.model.attention,
                        OmegaConf.to_container(cfg.model.options, resolve=True) or {}, vocab_size=dm.vocab_size,
                        max_len=dm.seq_len, num_classes=dm.num_classes, dual=dm.dual).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=float(cfg.optim.lr))
    batch = {k: v.to(device) for k, v in batch.items()}
    times = []
    for step in range(args.warmup + args.steps):
        started = time.perf_counter()
        loss = F.cross_entropy(model(batch).float(), batch["label"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - started)
    step_s = statistics.median(times)
    result = {"task": args.task, "protocol": cfg.protocol.name, "model": cfg.model.name, "device": str(device),
              "batch_size": dm.batch_size, "seq_len": dm.seq_len, "num_workers": dm.num_workers,
              "prepare_s": prepare_s, "loader_batches_per_s": loader_bps, "step_s": step_s,
              "loader_headroom": loader_bps * step_s}
    print(f"{args.task} ({cfg.protocol.name} protocol, model {cfg.model.name}, batch {dm.batch_size} x {dm.seq_len}, "
          f"{dm.num_workers} loader workers, {device}):\n"
          f"  prepare + setup   {prepare_s:8.2f} s (0 when the cache was already there)\n"
          f"  data loader       {loader_bps:8.1f} batches/s ({loader_bps * dm.batch_size:.0f} examples/s)\n"
          f"  training step     {step_s:8.3f} s = {1 / step_s:.2f} batches/s (median of {args.steps})\n"
          f"  loader headroom   {result['loader_headroom']:8.1f}x "
          f"({'keeps up' if result['loader_headroom'] >= 1 else 'TOO SLOW: raise data.num_workers'})")
    return result


# ---- the command line -------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lra-data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name, func, help, task=True, release=True):
        p = sub.add_parser(name, help=help, epilog="Hydra overrides (key=value words) may follow anywhere, e.g. "
                           "protocol=quick task.max_len=1000 data.batch_size=8 (default protocol: nystrom).")
        if task:
            p.add_argument("task", help="a task: " + ", ".join(task_names()))
        p.add_argument("--data-dir", help="paths.data_dir (default: the config's, LRA_DATA_DIR or data)")
        if release:
            p.add_argument("--lra-release", help="paths.lra_release, the extracted lra_release/ folder")
        p.set_defaults(func=func)
        return p

    status = command("status", cmd_status, "sources and prepared caches of every task", task=False)
    status.add_argument("items", nargs="*", help="task names to show (default: all)")
    download = command("download", cmd_download, "fetch a task's source (LRA release archive or hub dataset)")
    download.add_argument("--url", default=RELEASE_URL, help=f"the release archive (default {RELEASE_URL})")
    download.add_argument("--timeout", type=float, default=30.0, help="network timeout in seconds")
    download.add_argument("--force", action="store_true",
                          help="download the archive again and extract it over what is there (repairs a damaged "
                               "release)")
    download.add_argument("--max-extract-gb", type=float, default=None,
                          help=f"refuse to extract more than this (default: {EXTRACT_RATIO}x the archive's size)")
    command("prepare", cmd_prepare, "prepare (tokenise and cache) a task's splits")
    gen = command("generate", cmd_generate, "make a task's data offline with its generator (task.source=generate)",
                  release=False)
    for name in LISTOPS_FLAGS:
        gen.add_argument(f"--{name.replace('_', '-')}", type=int, default=None,
                         help=f"ListOps only (default {getattr(ListOpsSpec, name)})")
    bench = command("bench", cmd_bench, "time prepare, the data loader and a training step")
    bench.add_argument("--batches", type=int, default=50, help="loader batches to time")
    bench.add_argument("--steps", type=int, default=3, help="training steps to time (after --warmup)")
    bench.add_argument("--warmup", type=int, default=1, help="untimed training steps first")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; the ``key=value`` words anywhere after the command are Hydra overrides
    (``args.overrides``; for ``status`` the other words are task names, ``args.tasks``)."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    words = getattr(args, "items", []) + rest
    unknown = [w for w in words if w.startswith("-") or ("=" not in w and args.command != "status")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)} (Hydra overrides are key=value words)")
    args.overrides = [w for w in words if "=" in w]
    args.tasks = [w for w in words if "=" not in w]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = args.func(args)
    except DataError as err:
        print(f"\nerror: {err}", file=sys.stderr)
        return 2
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
