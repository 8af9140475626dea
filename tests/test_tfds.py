"""``task.source=tfds`` (Text: ``imdb_reviews``, Image: ``cifar10``) end to end on TensorFlow Datasets' own mock data
(``tfds.testing.mock_data``): the real ``tfds.load`` path of ``lra.data.text.HubDataModule``, LRA's split strings,
the byte and pixel encodings of what TFDS yields, and a training smoke run.

Needs the ``tfds`` extra (``make install EXTRAS=tfds``: tensorflow-datasets and TensorFlow); skipped without it.
Slow (TensorFlow's import alone takes seconds): ``make test-slow``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import lra.train
from lra.data.image import rgb_to_gray_lra
from lra.data.text import encode_bytes

pytestmark = pytest.mark.slow
N = 12  # mock examples per split (TFDS's mock yields the same N examples for every split and slice)


@pytest.fixture
def mock_tfds(tmp_path):
    """TFDS mocked with its metadata written for ``imdb_reviews`` and ``cifar10`` (split sizes N), as
    ``tfds.testing.mock_data``'s docs advise; without them ``tfds.load(batch_size=-1)`` asks TF for a batch of
    ``sys.maxsize`` rows. Yields the TFDS data_dir (``task.tfds_dir``). Imported here, so that the default (not slow)
    test run never imports TFDS."""
    tfds = pytest.importorskip("tensorflow_datasets")
    data_dir = tmp_path / "tfds"
    for name in ("imdb_reviews", "cifar10"):
        builder = tfds.builder(name, data_dir=str(data_dir))
        splits = [tfds.core.SplitInfo(name=s, shard_lengths=[N], num_bytes=0) for s in ("train", "test")]
        builder.info.set_splits(tfds.core.SplitDict(splits))
        Path(builder.data_dir).mkdir(parents=True, exist_ok=True)
        builder.info.write_to_directory(builder.data_dir)
    with tfds.testing.mock_data(num_examples=N, policy=tfds.testing.MockPolicy.USE_FILES, data_dir=str(data_dir)):
        yield data_dir


def tfds_arrays(name: str, split: str, data_dir: Path) -> dict:
    import tensorflow_datasets as tfds

    return tfds.as_numpy(tfds.load(name, split=split, data_dir=str(data_dir), batch_size=-1))


def test_text_from_tfds_imdb_reviews(make_cfg, mock_tfds):
    cfg = make_cfg("task=text", "task.source=tfds", f"task.tfds_dir={mock_tfds}", "protocol=quick",
                   "task.max_len=16", "data.seq_len=16", "data.batch_size=4", "trainer.fast_dev_run=true")
    dm = lra.train.hydra.utils.instantiate(cfg.task.datamodule)
    expected = tfds_arrays("imdb_reviews", "train", mock_tfds)
    train = dm.read_split("train")
    np.testing.assert_array_equal(train["input_ids"], encode_bytes(expected["text"], 16))
    np.testing.assert_array_equal(train["label"], expected["label"])
    assert dm.describe_source() == {"source": "tfds", "dataset": "imdb_reviews", "data_dir": str(mock_tfds)}
    record = lra.train.run(cfg)
    assert record["data"]["source"] == "tfds" and record["data"]["sizes"] == {"train": N, "val": N, "test": N}
    assert 0 <= record["test_acc"] <= 1


def test_image_from_tfds_cifar10_with_lras_splits(make_cfg, mock_tfds):
    cfg = make_cfg("task=image", "task.source=tfds", f"task.tfds_dir={mock_tfds}", "protocol=quick",
                   "data.batch_size=4", "trainer.fast_dev_run=true")
    dm = lra.train.hydra.utils.instantiate(cfg.task.datamodule)
    for split, spec in (("train", "train[:90%]"), ("val", "train[90%:]"), ("test", "test")):
        expected = tfds_arrays("cifar10", spec, mock_tfds)
        got = dm.read_split(split)
        np.testing.assert_array_equal(got["input_ids"], rgb_to_gray_lra(expected["image"]).reshape(-1, 1024))
        np.testing.assert_array_equal(got["label"], expected["label"])
    record = lra.train.run(cfg)
    assert record["data"]["source"] == "tfds" and record["data"]["dataset"] == "cifar10"
