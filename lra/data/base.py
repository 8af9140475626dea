"""The one datamodule base: sources on disk -> prepared, cached arrays -> batches.

A task subclass says which files it reads (``source_files``), how to explain their absence
(``missing_help``) and how to turn one split into arrays (``read_split``). The base

* checks the sources and raises ``DataError`` naming every missing file and the fix;
* prepares each split once into ``<cache_dir>/<task>/<key>/`` where ``key`` hashes the preprocessing
  options and the content of the sources (``fingerprint_files``: SHA-256 fingerprints kept in
  ``<cache_dir>/<task>/fingerprints.json`` and re-checked by stat, ``lra.data.store``) plus what a hub
  library says of its copy (``source_fingerprint``), so a second run starts at once and any change of
  options or content re-prepares, even an edit that keeps the file's size and date. The folder is
  written under a temporary name (``<key>.partial-<host>-<pid>``) and renamed when complete, under an
  inter-process lock: an interrupted prepare leaves nothing a later run would trust, a concurrent one
  waits and reuses the result, and temporaries of killed prepares are removed by the next one;
* serves memory-mapped arrays as batches ``{input_ids [B, L] long, mask [B, L] bool, label [B] long}``
  padded with id 0 to ``seq_len`` (two-input tasks add ``input_ids_2``/``mask_2``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from lra.data import store

SPLITS = ("train", "val", "test")
RELEASE_URL = "https://storage.googleapis.com/long-range-arena/lra_release.gz"  # LRA's data release


class DataError(RuntimeError):
    """Missing or malformed data; the message names the file and the fix."""


class ArrayDataset(Dataset):
    """Rows of prepared arrays; ``__getitems__`` builds a whole batch with one fancy index.

    ``pad_id`` is the id that marks padding (``mask = ids != pad_id``); ``None`` for tasks whose every
    position is real (pixels, where 0 is a value), whose mask is all true (pixel tasks with
    ``zero_pixel_is_padding``, the upstream harnesses' rule, use ``pad_id = 0``).
    """

    def __init__(self, arrays: dict[str, np.ndarray], seq_len: int, pad_id: int | None = 0):
        self.arrays, self.seq_len, self.pad_id = arrays, seq_len, pad_id
        self.inputs = sorted(k for k in arrays if k.startswith("input_ids"))

    def __len__(self) -> int:
        return len(self.arrays["label"])

    def __getitem__(self, index: int) -> dict:
        return self.__getitems__([index])

    def __getitems__(self, indices) -> dict:
        idx = np.sort(np.asarray(indices))  # sorted reads are faster on memory maps; order is irrelevant
        batch = {"label": torch.from_numpy(self.arrays["label"][idx].astype(np.int64))}
        for key in self.inputs:
            ids = self.arrays[key][idx, : self.seq_len].astype(np.int64)
            stored = ids.shape[1]
            if stored < self.seq_len:
                ids = np.pad(ids, ((0, 0), (0, self.seq_len - stored)))
            ids = torch.from_numpy(ids)
            batch[key] = ids
            if self.pad_id is None:  # every stored position is real; only the padding added here is not
                real = (torch.arange(self.seq_len) < stored).expand(len(idx), -1)
            else:
                real = ids != self.pad_id
            batch[key.replace("input_ids", "mask")] = real
        return batch


def _identity(batch):
    return batch


def _smallest_int_dtype(vocab_size: int):
    return np.uint8 if vocab_size <= 256 else np.int16 if vocab_size <= 32768 else np.int32


class StepSampler(Sampler[int]):
    """The training order as a pure function of ``(seed, batch number)``, so that a resumed run reads exactly
    the batches the uninterrupted run would have read.

    Epoch ``e`` is the permutation ``default_rng([seed, e])`` of the ``size`` rows, cut into global batches of
    ``batch_size * world`` rows (a last partial batch is dropped); process ``rank`` takes its ``batch_size``
    slice of each global batch. Iteration starts at global batch ``start`` (the batches already trained on)
    and never ends: training is measured in steps.
    """

    def __init__(self, size: int, batch_size: int, seed: int, start: int = 0, rank: int = 0, world: int = 1):
        self.per_epoch = size // (batch_size * world)
        if self.per_epoch == 0:
            raise DataError(f"the training split has {size} rows, fewer than one batch of {batch_size} x {world} "
                            f"process(es): lower data.batch_size or use more training data")
        self.size, self.batch_size, self.seed, self.start, self.rank = size, batch_size, seed, start, rank
        self.world = world

    def __iter__(self):
        batch, epoch, order = self.start, None, None
        while True:
            if batch // self.per_epoch != epoch:
                epoch = batch // self.per_epoch
                order = np.random.default_rng([self.seed, epoch]).permutation(self.size)
            first = (batch % self.per_epoch * self.world + self.rank) * self.batch_size
            yield from order[first : first + self.batch_size].tolist()
            batch += 1


class LRADataModule(L.LightningDataModule):
    """Base of every task. Subclasses set ``name``, ``num_classes``, ``vocab_size``, ``dual``, ``pad_id`` and implement
    ``source_files``, ``missing_help``, ``cache_options`` and ``read_split``.

    Args:
        batch_size: training batch size; ``eval_batch_size`` for val/test (defaults to it).
        seq_len: length every batch is padded (or cut) to; inputs longer than ``max_len`` were
            already truncated when prepared.
        cache_dir: root of prepared caches.
        seed: the training order's seed (see ``StepSampler``; the run's ``seed``).

    Under a Lightning trainer the loaders shard themselves over its processes (the trainer must be built with
    ``use_distributed_sampler=False``): training batches by ``StepSampler``, val/test rows ``rank::world``.
    """

    name = "?"
    num_classes = 0
    vocab_size = 0
    dual = False
    pad_id: int | None = 0  # None: every position is real (pixel tasks), the mask is all true

    def __init__(
        self,
        batch_size: int,
        seq_len: int,
        cache_dir: str | os.PathLike,
        max_len: int,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ):
        super().__init__()
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.seed = seed
        self.seq_len, self.max_len, self.num_workers = seq_len, max_len, num_workers
        self.cache_root = Path(cache_dir)
        self.datasets: dict[str, ArrayDataset] = {}
        self._key: str | None = None  # the cache key, computed once per instance (``cache_dir``)
        self._signatures: dict[str, list[int] | None] = {}  # stat of each fingerprinted file when keyed

    # ---- what a task provides -------------------------------------------------------------------
    def source_files(self) -> list[Path]:
        raise NotImplementedError

    def missing_help(self, missing: list[Path]) -> str:
        raise NotImplementedError

    def describe_source(self) -> dict:
        """Where the data came from, for the run record (``source`` is ``release``, ``hub`` or ``generated``)."""
        raise NotImplementedError

    def cache_options(self) -> dict:
        """Every preprocessing option that changes the prepared arrays."""
        raise NotImplementedError

    def read_split(self, split: str) -> dict[str, np.ndarray]:
        """Arrays of one split: ``input_ids`` ``[n, max_len]`` (0 = padding), ``label`` ``[n]``."""
        raise NotImplementedError

    def fingerprint_files(self) -> list[Path]:
        """The files whose content keys the cache (default: ``source_files``). Each ``source_files`` entry
        must exist; any other entry may be missing or not a file (its fingerprint then says so)."""
        return self.source_files()

    def source_fingerprint(self) -> dict:
        """What keys the cache beside the files' content: a hub library's own fingerprint of its copy."""
        return {}

    def cache_extras(self) -> dict[str, str]:
        """Extra text files written into the cache folder with the arrays (name -> content)."""
        return {}

    # ---- the shared machinery -------------------------------------------------------------------
    @staticmethod
    def missing_release_files(release: Path, missing: list[Path]) -> str:
        """What is missing of the release: its whole folder, or the files (for ``missing_help`` messages)."""
        if not release.is_dir():
            return f"the LRA release folder {release} does not exist"
        return "missing: " + ", ".join(f"{p} (a folder, not a file)" if p.is_dir() else str(p) for p in missing)

    def ensure_sources(self) -> None:
        missing = [p for p in self.source_files() if not p.is_file()]
        if missing:
            raise DataError(self.missing_help(missing))

    @property
    def fingerprint_index(self) -> store.FingerprintIndex:
        """This task's fingerprint index (``<cache_dir>/<task>/fingerprints.json``)."""
        return store.FingerprintIndex(self.cache_root / self.name / "fingerprints.json")

    def _fingerprints(self) -> tuple[list[list[str]], dict[str, list[int] | None]]:
        """``[relative name, content fingerprint]`` of every ``fingerprint_files`` entry, and their stats."""
        sources = self.source_files()
        missing = [p for p in sources if not p.is_file()]
        if missing:
            raise DataError(self.missing_help(missing))
        required = {str(p) for p in sources}
        files = self.fingerprint_files()
        index = self.fingerprint_index
        root = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in files]) if files else ""
        pairs, signatures = [], {}
        for path in files:
            digest, signatures[str(path)] = index.digest(path, strict=str(path) in required)
            pairs.append([os.path.relpath(os.path.abspath(path), root), digest])
        index.save()
        return pairs, signatures

    @property
    def cache_dir(self) -> Path:
        """``<cache_dir>/<task>/<key>``: ``key`` hashes ``cache_options``, the content fingerprints of
        ``fingerprint_files`` and ``source_fingerprint``. Computed once per instance; missing sources are a
        ``DataError`` naming them and the fix."""
        if self._key is None:
            pairs, self._signatures = self._fingerprints()
            blob = json.dumps({"options": self.cache_options(), "files": pairs, "source": self.source_fingerprint()},
                              sort_keys=True)
            self._key = hashlib.sha1(blob.encode()).hexdigest()[:16]
        return self.cache_root / self.name / self._key

    def _check_unchanged(self) -> None:
        """Refuse to store a cache whose sources changed while it was being prepared."""
        changed = []
        for name, before in self._signatures.items():
            try:
                st = os.stat(name)
                now = store.signature(st) if stat.S_ISREG(st.st_mode) else None
            except OSError:
                now = None
            if now != before:
                changed.append(name)
        if changed:
            self._key = None
            raise DataError(
                f"{changed[0]}{f' (and {len(changed) - 1} more source files)' if len(changed) > 1 else ''} changed "
                f"while {self.name} was being prepared; nothing was cached. Let whatever writes it finish, then "
                f"run again."
            )

    def prepare_data(self) -> None:
        """Prepare the cache once: under the cache folder's lock (a concurrent prepare of the same data waits,
        then reuses it), into a unique temporary folder renamed when complete."""
        self.ensure_sources()
        final = self.cache_dir
        if (final / "meta.json").is_file():
            return
        with store.lock(final, f"preparing {self.name}"):
            if (final / "meta.json").is_file():  # made by a concurrent prepare while this one waited
                return
            store.remove_stale_partials(final.parent)
            tmp = store.partial_name(final)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            try:
                meta = {"task": self.name, "options": self.cache_options(), "sizes": {}}
                for split in SPLITS:
                    arrays = self.read_split(split)
                    for key, value in arrays.items():
                        if key.startswith("input_ids"):
                            value = value.astype(_smallest_int_dtype(self.vocab_size), copy=False)
                        np.save(tmp / f"{split}.{key}.npy", value)
                    meta["sizes"][split] = int(len(arrays["label"]))
                for name, text in self.cache_extras().items():
                    (tmp / name).write_text(text)
                self._check_unchanged()
                (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
                if final.exists():  # an incomplete folder of an older version; nobody else writes it (locked)
                    shutil.rmtree(final)
                try:
                    os.replace(tmp, final)
                except OSError:
                    if not (final / "meta.json").is_file():  # unlocked file system: a concurrent prepare won
                        raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        self.ensure_sources()  # names missing sources and the fix (or makes generated ones again)
        folder = self.cache_dir
        if not (folder / "meta.json").is_file():
            self.prepare_data()
        for split in SPLITS:
            try:
                arrays = {
                    f.name.split(".")[1]: np.load(f, mmap_mode="r") for f in sorted(folder.glob(f"{split}.*.npy"))
                }
            except (OSError, ValueError) as err:
                raise DataError(f"{folder}: the prepared {split} arrays cannot be read ({err}). Delete that folder "
                                f"and run again: it is prepared anew.") from None
            if "label" not in arrays:
                raise DataError(f"{folder}: the prepared {split} arrays are missing. Delete that folder and run "
                                f"again: it is prepared anew.")
            self.datasets[split] = ArrayDataset(arrays, self.seq_len, self.pad_id)

    def majority_rate(self, split: str = "test") -> float:
        """Accuracy of always predicting the most frequent class of ``split`` (the floor to beat)."""
        labels = np.asarray(self.datasets[split].arrays["label"])
        return float(np.bincount(labels).max() / len(labels))

    def breakdown(self) -> tuple[str, tuple[str, ...], Callable[[dict], torch.Tensor]] | None:
        """What ``lra.eval`` breaks accuracy down by, if this task has such groups: ``(what, group names, batch ->
        group index [B] into the names)``. None here; ListOps gives its root operator."""
        return None

    def _groups_and_labels(self, split: str, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
        """The ``breakdown`` group index and the label of every row of ``split``, in order."""
        data, group_of = self.datasets[split], self.breakdown()[2]
        groups, labels = [], []
        for start in range(0, len(data), chunk):
            batch = data.__getitems__(range(start, min(start + chunk, len(data))))
            groups.append(group_of(batch).numpy())
            labels.append(batch["label"].numpy())
        return np.concatenate(groups), np.concatenate(labels)

    def group_prior(self) -> dict | None:
        """The floor within each ``breakdown`` group: always answering the training split's most common label of the
        row's group (ties: the smaller label). For ListOps, a model that reads only the root operator (the first token)
        can reach it. ``{"label": {group: label}, "train" / "val" / "test": {group: (correct, rows)}}``, or None
        without groups. A group that has no training rows gets no answer (0 correct). On ``train`` the floor is
        in-sample (its answers are chosen there); over a large training split it is the level the floor has, up to
        sampling error, on any split drawn the same way."""
        breakdown = self.breakdown()
        if breakdown is None:
            return None
        names = breakdown[1]
        split_rows = {split: self._groups_and_labels(split) for split in ("train", "val", "test")}
        groups, labels = split_rows["train"]
        answer = {int(g): int(np.bincount(labels[groups == g]).argmax()) for g in np.unique(groups)}
        prior = {"label": {names[g]: label for g, label in answer.items()}}
        for split, (groups, labels) in split_rows.items():
            prior[split] = {names[g]: (int((labels[groups == g] == answer.get(int(g), -1)).sum()),
                                       int((groups == g).sum())) for g in np.unique(groups)}
        return prior

    def _ranks(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _loader(self, split: str, sampler: Sampler, batch_size: int) -> DataLoader:
        return DataLoader(
            self.datasets[split],
            batch_size=batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=_identity,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """An endless, resumable stream: it starts after the batches the trainer has already trained on."""
        trainer, (rank, world) = self.trainer, self._ranks()
        start = trainer.global_step * trainer.accumulate_grad_batches if trainer is not None else 0
        sampler = StepSampler(len(self.datasets["train"]), self.batch_size, self.seed, start, rank, world)
        return self._loader("train", sampler, self.batch_size)

    def _eval_loader(self, split: str) -> DataLoader:
        rank, world = self._ranks()
        return self._loader(split, range(rank, len(self.datasets[split]), world), self.eval_batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")
