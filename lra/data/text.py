"""Text (LRA): IMDB movie-review sentiment read byte by byte, 2 classes, inputs cut to ``max_len`` bytes.

Tokenisation is LRA's (``tfds.deprecated.text.ByteTextEncoder()`` with no additional tokens): the UTF-8
bytes of a review, each mapped to ``byte + 1`` so that id 0 stays free for padding; vocabulary 257. Bytes
past ``max_len`` are dropped (LRA: ``encode(text)[:max_length]``).

Length: 1000 bytes by default, as LRA's released ``text_classification/configs/base_tc_config.py``
(``max_length = 1000``) and the Nyströmformer harness (``LRA/datasets/text.py``: LRA's pipeline with
``max_length=1000``, padded with 24 zeros to 1024). The LRA paper calls the task "4K"; 4000 bytes padded to 4096
is the preprocessing of Skyformer's fork of the harness (``task.max_len=4000 data.seq_len=4096``).

Splits: IMDB has 25k train and 25k test reviews and no validation split; LRA validates on the test split
(``valid_raw = data['test']``), so do the default here (``val_holdout_percent: null``). Setting
``val_holdout_percent: N`` validates on the last N% of the train split instead (and trains on the rest).

Sources (``source`` option):

* ``hub`` (default): Hugging Face ``imdb`` through ``datasets``. ``hub_path``, when set, is a folder written
  by ``DatasetDict.save_to_disk`` (``lra-data download text`` writes ``<data_dir>/hub/<hub_name>``, which is
  used when present); otherwise ``datasets.load_dataset(hub_name)`` (its cache, or the network).
* ``tfds``: TFDS ``imdb_reviews``, LRA's own source (``make install EXTRAS=tfds``; imported lazily). Tested on
  TFDS's own mock data (``tests/test_tfds.py``, slow).

The hub machinery (``HubDataModule``) is shared with the Image task; ``encode_bytes`` with Retrieval.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from lra.data import store
from lra.data.base import DataError, LRADataModule

BYTE_VOCAB = 257  # 256 byte values shifted by one, plus padding id 0


def byte_ids(text: str | bytes, max_len: int) -> np.ndarray:
    """LRA's byte encoding of one text: ``utf8(text)[:max_len] + 1`` as ``int16`` ``[<= max_len]``."""
    raw = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return np.frombuffer(raw[:max_len], dtype=np.uint8).astype(np.int16) + 1


def encode_bytes(texts, max_len: int) -> np.ndarray:
    """Byte ids of many texts, 0-padded: ``[n, max_len]`` ``int16``. An empty text raises ``ValueError``
    (its row would be all padding, leaving nothing to pool); callers turn it into a ``DataError``."""
    out = np.zeros((len(texts), max_len), dtype=np.int16)
    for row, text in enumerate(texts):
        ids = byte_ids(text, max_len)
        if ids.size == 0:
            raise ValueError(row)
        out[row, : ids.size] = ids
    return out


def subset_indices(n: int, size: int | None, seed: int = 0) -> np.ndarray | None:
    """A fixed random subset of ``range(n)`` (sorted) of ``size`` rows; ``None`` (= all rows) when ``size``
    is ``None`` or not smaller than ``n``."""
    if size is None:
        return None
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise DataError(f"task.subset sizes must be positive integers or null, got {size!r}.")
    if size >= n:
        return None
    return np.sort(np.random.default_rng(seed).choice(n, size, replace=False))


def import_tfds():
    """``tensorflow_datasets``, or a ``DataError`` saying how to install it."""
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise DataError(
            "task.source=tfds needs TensorFlow Datasets, which is not installed. Install the optional extra: "
            "`make install EXTRAS=tfds` (or `pip install 'lra[tfds]'`: tensorflow-datasets and TensorFlow, about "
            "1.5 GB), or use task.source=hub (Hugging Face datasets, installed with lra)."
        ) from None
    return tfds


class HubDataModule(LRADataModule):
    """A task read from Hugging Face ``datasets`` (``source=hub``) or TFDS (``source=tfds``) splits ``train``
    and ``test``. Subclasses set ``hub_default``, ``hub_input``, ``tfds_name``, ``tfds_input`` and implement
    ``encode`` (raw inputs -> ``[n, max_len]`` ids) and ``hub_inputs`` (a ``datasets.Dataset`` -> raw inputs).

    Args:
        data_dir: the suite's data folder (``<data_dir>/hub/<hub_name>`` is where ``download`` saves).
        source: ``hub`` or ``tfds``.
        hub_name: the Hugging Face dataset name.
        hub_path: a ``save_to_disk`` folder to read instead of the Hugging Face cache (must exist when set).
        tfds_dir: TFDS ``data_dir`` (``None``: TFDS's default).
        val_holdout_percent: ``None``: validate on the test split; ``N``: on the last N% of train.
        subset: ``{split: size or None}``: a fixed random subset (seed 0) of each split, for quick runs.
    """

    hub_default = "?"
    hub_input = "?"
    tfds_name = "?"
    tfds_input = "?"

    def __init__(
        self,
        data_dir: str | os.PathLike,
        source: str = "hub",
        hub_name: str | None = None,
        hub_path: str | os.PathLike | None = None,
        tfds_dir: str | None = None,
        val_holdout_percent: int | None = None,
        subset: dict | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if source not in ("hub", "tfds"):
            raise DataError(f"task.source must be 'hub' or 'tfds' for {self.name}, got {source!r}.")
        if val_holdout_percent is not None and not 0 < val_holdout_percent < 100:
            raise DataError(f"task.val_holdout_percent must be null or in 1..99, got {val_holdout_percent!r}.")
        unknown = set(subset or {}) - {"train", "val", "test"}
        if unknown:
            raise DataError(f"task.subset takes the splits train, val, test; got {sorted(unknown)}.")
        self.source, self.hub_name = source, hub_name or self.hub_default
        self.hub_path = Path(hub_path) if hub_path else None
        self.default_hub_folder = Path(data_dir) / "hub" / self.hub_name.replace("/", "__")
        self.tfds_dir, self.val_holdout_percent = tfds_dir, val_holdout_percent
        self.subset = {k: v for k, v in dict(subset or {}).items() if v is not None}
        self._hub = None

    # ---- where the data is ----------------------------------------------------------------------
    @property
    def hub_folder(self) -> Path | None:
        """The ``save_to_disk`` folder read (``hub_path``, else the default one if present), or ``None``
        when the Hugging Face cache is used."""
        if self.hub_path is not None:
            return self.hub_path
        return self.default_hub_folder if self.default_hub_folder.is_dir() else None

    def source_files(self) -> list[Path]:
        folder = self.hub_folder if self.source == "hub" else None
        if folder is None:
            return []  # the Hugging Face / TFDS cache: managed by those libraries
        if not folder.is_dir():
            return [folder / "dataset_dict.json"]
        return sorted(p for p in folder.rglob("*") if p.is_file())

    def missing_help(self, missing: list[Path]) -> str:
        return (
            f"task.hub_path={self.hub_path} does not exist. It must be a folder written by "
            f"`datasets.DatasetDict.save_to_disk` holding the splits train and test of '{self.hub_name}': "
            f"`lra-data download {self.name}` writes one to {self.default_hub_folder} (copy it here from a machine "
            f"with network if this one has none). Or drop task.hub_path to use the Hugging Face cache, or use "
            f"task.source=tfds."
        )

    def describe_source(self) -> dict:
        if self.source == "tfds":
            return {"source": "tfds", "dataset": self.tfds_name, "data_dir": self.tfds_dir}
        folder = self.hub_folder
        return {"source": "hub", "dataset": self.hub_name, "folder": str(folder) if folder else None}

    def source_fingerprint(self) -> dict:
        """The hub copy's own identity in the cache key. A ``save_to_disk`` folder is in ``source_files`` (its
        files' contents, ``state.json`` with the splits' ``_fingerprint`` included, key the cache); the Hugging
        Face cache adds each split's ``datasets`` ``_fingerprint`` and the content fingerprints of its arrow
        files; TFDS adds the builder's version and the content fingerprints of its prepared files."""
        if self.source == "tfds":
            return {"tfds": self._tfds_fingerprint()}
        if self.hub_folder is not None:
            return {}
        splits, index, out = self._hub_splits(), self.fingerprint_index, {}
        for name in ("train", "test"):
            files = [Path(f["filename"]) for f in getattr(splits[name], "cache_files", [])]
            out[name] = {"fingerprint": splits[name]._fingerprint,
                         "files": [[p.name, index.digest(p, strict=False)[0]] for p in files]}
        index.save()
        return {"hub": out}

    def _tfds_fingerprint(self) -> dict:
        tfds = import_tfds()
        try:
            builder = tfds.builder(self.tfds_name, data_dir=self.tfds_dir)
            folder = Path(builder.data_dir)
            if not folder.is_dir():  # not prepared yet: do it now (tfds.load would), then fingerprint it
                self.download()
                folder = Path(tfds.builder(self.tfds_name, data_dir=self.tfds_dir).data_dir)
        except DataError:
            raise
        except Exception as err:  # noqa: BLE001 - any failure of the library becomes one clear message
            raise DataError(f"TFDS cannot find {self.tfds_name} (task.tfds_dir={self.tfds_dir}): "
                            f"{type(err).__name__}: {err}. Run `lra-data download {self.name} task.source=tfds` "
                            f"where there is network, or use task.source=hub.") from None
        index = self.fingerprint_index
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        digests = [[str(p.relative_to(folder)), index.digest(p)[0]] for p in files]
        index.save()
        return {"version": str(getattr(builder, "version", "")), "files": digests}

    def cache_options(self) -> dict:
        dataset = self.tfds_name if self.source == "tfds" else self.hub_name
        return {"source": self.source, "dataset": dataset, "max_len": self.max_len,
                "val_holdout_percent": self.val_holdout_percent, "subset": self.subset}

    # ---- loading --------------------------------------------------------------------------------
    def _load_hub(self, folder: Path | None):
        """train+test of the Hugging Face dataset: from ``folder`` (``save_to_disk``), or ``load_dataset``."""
        import datasets

        where = f"the folder {folder}" if folder else f"the Hugging Face dataset '{self.hub_name}'"
        try:
            splits = datasets.load_from_disk(str(folder)) if folder else datasets.load_dataset(self.hub_name)
        except Exception as err:  # noqa: BLE001 - any failure of the library becomes one clear message
            reason = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"
            raise DataError(
                f"Could not load {where} ({reason}). Without network, `datasets` only finds datasets already in "
                f"its cache ({datasets.config.HF_DATASETS_CACHE}). Either run `lra-data download {self.name}` on a "
                f"machine with network and copy the folder it writes ({self.default_hub_folder}) to the same "
                f"place here (or anywhere, and pass task.hub_path=<that folder>), or use task.source=tfds."
            ) from None
        missing = [s for s in ("train", "test") if s not in splits]
        if missing:
            raise DataError(f"{where} has no split(s) {missing}; {self.name} needs train and test.")
        return splits

    def _hub_splits(self):
        if self._hub is None:
            self._hub = self._load_hub(self.hub_folder)
        return self._hub

    def download(self) -> str:
        """Fetch the source ahead of time: ``hub``: save train+test to ``hub_path`` (default
        ``<data_dir>/hub/<hub_name>``); ``tfds``: TFDS's download_and_prepare. Returns where it went."""
        if self.source == "tfds":
            tfds = import_tfds()
            try:
                tfds.builder(self.tfds_name, data_dir=self.tfds_dir).download_and_prepare()
            except Exception as err:  # noqa: BLE001
                raise DataError(f"TFDS could not download and prepare {self.tfds_name} ({type(err).__name__}: "
                                f"{err}). Use task.source=hub, or run this where there is network.") from None
            return f"TFDS {self.tfds_name} (data_dir {self.tfds_dir or 'TFDS default'})"
        import datasets

        target = self.hub_path or self.default_hub_folder

        def save():  # under the folder's lock, into a temporary unique to this process, renamed when complete
            splits = self._load_hub(None)
            store.remove_stale_partials(target.parent)
            partial = store.partial_name(target)
            try:
                datasets.DatasetDict({s: splits[s] for s in ("train", "test")}).save_to_disk(str(partial))
                os.replace(partial, target)
            finally:
                shutil.rmtree(partial, ignore_errors=True)

        if not store.make_once(target, target.is_dir, save, f"saving {self.hub_name} to {target}"):
            return f"{target} (already there)"
        return str(target)

    def _split_plan(self, split: str) -> tuple[str, str]:
        """``(source split, part)``: part is ``all``, ``head`` (train minus the held-out tail) or ``tail``."""
        if split == "test":
            return "test", "all"
        if self.val_holdout_percent is None:
            return ("train", "all") if split == "train" else ("test", "all")
        return "train", "head" if split == "train" else "tail"

    def _raw_split(self, split: str) -> tuple[object, np.ndarray]:
        """Raw inputs and labels of one of our splits, the subset applied."""
        source_split, part = self._split_plan(split)
        keep = 100 - (self.val_holdout_percent or 0)
        if self.source == "tfds":
            tfds = import_tfds()
            spec = {"all": source_split, "head": f"train[:{keep}%]", "tail": f"train[{keep}%:]"}[part]
            try:
                arrays = tfds.as_numpy(tfds.load(self.tfds_name, split=spec, data_dir=self.tfds_dir, batch_size=-1))
            except Exception as err:  # noqa: BLE001
                raise DataError(
                    f"TFDS could not load {self.tfds_name} split {spec} ({type(err).__name__}: {err}). Without "
                    f"network it needs the prepared dataset in its data_dir (task.tfds_dir={self.tfds_dir}); "
                    f"run `lra-data download {self.name} task.source=tfds` where there is network."
                ) from None
            inputs, labels = arrays[self.tfds_input], np.asarray(arrays["label"])
            rows = subset_indices(len(labels), self.subset.get(split))
            if rows is not None:
                inputs, labels = inputs[rows], labels[rows]
            return inputs, labels.astype(np.int64)
        dataset = self._hub_splits()[source_split]
        for column in (self.hub_input, "label"):
            if column not in dataset.column_names:
                raise DataError(
                    f"{self.describe_source()} split {source_split} has no column '{column}' (columns: "
                    f"{dataset.column_names}); {self.name} expects '{self.hub_input}' and 'label' as in "
                    f"Hugging Face '{self.hub_default}'."
                )
        n = len(dataset)
        cut = round(n * keep / 100)
        span = {"all": np.arange(n), "head": np.arange(cut), "tail": np.arange(cut, n)}[part]
        rows = subset_indices(len(span), self.subset.get(split))
        if rows is not None or part != "all":
            dataset = dataset.select(span if rows is None else span[rows])
        return self.hub_inputs(dataset), np.asarray(dataset["label"][:], dtype=np.int64)

    def where(self, split: str) -> str:
        """Names a split in messages: the source, our split and the source split it comes from."""
        source_split, part = self._split_plan(split)
        origin = "" if (source_split, part) == (split, "all") else f" (from its {source_split} split)"
        return f"{self.describe_source()} split {split}{origin}"

    def read_split(self, split: str) -> dict[str, np.ndarray]:
        inputs, labels = self._raw_split(split)
        bad = np.flatnonzero((labels < 0) | (labels >= self.num_classes))
        if bad.size:
            raise DataError(
                f"{self.where(split)}, example {int(bad[0])}: label {int(labels[bad[0]])} is outside "
                f"0..{self.num_classes - 1} ({bad.size} such examples). Use the train/test splits of "
                f"'{self.hub_default}' (not e.g. IMDB's unlabelled 'unsupervised' split)."
            )
        if len(labels) == 0:
            raise DataError(f"{self.where(split)} is empty.")
        return {"input_ids": self.encode(inputs, split), "label": labels}

    # ---- what a hub task provides ---------------------------------------------------------------
    def hub_inputs(self, dataset):
        raise NotImplementedError

    def encode(self, inputs, split: str) -> np.ndarray:
        raise NotImplementedError


class TextDataModule(HubDataModule):
    """IMDB, byte-level (see the module docstring)."""

    name = "text"
    num_classes = 2
    vocab_size = BYTE_VOCAB
    hub_default = "imdb"
    hub_input = "text"
    tfds_name = "imdb_reviews"
    tfds_input = "text"

    def cache_options(self) -> dict:
        return {**super().cache_options(), "tokenizer": "lra-bytes (utf-8 byte + 1)"}

    def hub_inputs(self, dataset):
        return dataset[self.hub_input][:]

    def encode(self, inputs, split: str) -> np.ndarray:
        try:
            return encode_bytes(inputs, self.max_len)
        except ValueError as err:
            raise DataError(
                f"{self.where(split)}, example {err.args[0]}: empty text (nothing to classify)."
            ) from None
