"""Pathfinder / Path-X: generated labels against an independent flood fill, PNG reading, release fixtures, bad input."""

from __future__ import annotations

import io
import json
import struct
import zlib
from collections import deque

import numpy as np
import pytest

from lra.data import DataError
from lra.data.pathfinder import BadImage, PathfinderDataModule, UnsupportedPNG, decode_png, decode_png_minimal
from lra.data.pathfinder_generator import PathfinderSpec, encode_png, generate, render
from lra.train import run

EIGHT = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]


def flood(mask: np.ndarray, start) -> np.ndarray:
    """Pixels of ``mask`` 8-connected to ``start`` (written here, independent of the generator)."""
    seen = np.zeros_like(mask, dtype=bool)
    if not mask[start]:
        return seen
    seen[start] = True
    queue = deque([start])
    while queue:
        y, x = queue.popleft()
        for dy, dx in EIGHT:
            ny, nx = y + dy, x + dx
            if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                seen[ny, nx] = True
                queue.append((ny, nx))
    return seen


def components(mask: np.ndarray) -> int:
    left, count = mask.copy(), 0
    while left.any():
        left &= ~flood(left, tuple(np.argwhere(left)[0]))
        count += 1
    return count


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    padded = np.pad(mask, radius)
    out = np.zeros_like(mask)
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            out |= padded[radius + dy : radius + dy + mask.shape[0], radius + dx : radius + dx + mask.shape[1]]
    return out


@pytest.mark.parametrize("resolution,difficulty,count", [(32, "hard", 24), (32, "easy", 12), (64, "intermediate", 6),
                                                         (128, "hard", 2)])
def test_label_is_the_connectivity_of_the_markers(resolution, difficulty, count):
    spec = PathfinderSpec(resolution=resolution, difficulty=difficulty)
    geo = spec.geometry()
    for index in range(count):
        stimulus = render(spec, index, index % 2)
        image, solid, (a, b) = stimulus.image, stimulus.solid, stimulus.markers
        assert image.shape == solid.shape == (resolution, resolution) and image.dtype == np.uint8
        # the label is what the pixels say: the two markers are 8-connected through the solid mask iff 1
        assert flood(solid, a)[b] == bool(stimulus.label), (resolution, difficulty, index)
        # the solid mask is the image with its gaps filled: it holds every lit pixel and adds only gap pixels
        lit = image > 0
        assert not (lit & ~solid).any()
        assert not (solid & ~dilate(lit, stimulus.gap + 1)).any()
        # the markers are drawn (full white) and the contours are dashed: many separate dashes
        assert image[a] == image[b] == 255
        assert components(lit) >= geo.contour_length


def test_labels_balanced_and_metadata_in_the_release_format(tmp_path):
    spec = PathfinderSpec(resolution=32, difficulty="easy", num_images=21, images_per_file=8, seed=5)
    paths = generate(spec, tmp_path, workers=1, progress=False)
    root = tmp_path / "pathfinder32" / "curv_baseline"
    assert paths == [root / "metadata" / f"{k}.npy" for k in range(3)]
    lines = [line.split(" ") for path in paths for line in path.read_text().splitlines()]
    assert len(lines) == 21 and all(len(fields) == 11 for fields in lines)
    assert sum(int(fields[3]) for fields in lines) == 10  # exactly num_images // 2 positives
    assert lines[9][:4] == ["imgs/1", "sample_1.png", "1", lines[9][3]]
    stimulus = render(spec, 9, int(lines[9][3]))
    np.testing.assert_array_equal(decode_png((root / "imgs" / "1" / "sample_1.png").read_bytes()), stimulus.image)


def test_generation_is_deterministic_across_workers_and_seeded(tmp_path):
    spec = PathfinderSpec(resolution=32, num_images=12, images_per_file=3, seed=1)
    generate(spec, tmp_path / "a", workers=1, progress=False)
    generate(spec, tmp_path / "b", workers=2, progress=False)
    generate(PathfinderSpec(**{**spec.as_dict(), "seed": 2}), tmp_path / "c", workers=1, progress=False)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 12 + 4
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    assert sum((tmp_path / "a" / f).read_bytes() != (tmp_path / "c" / f).read_bytes() for f in files) >= 12


def test_spec_rejects_bad_options():
    with pytest.raises(ValueError, match="resolution must be one of"):
        PathfinderSpec(resolution=48)
    with pytest.raises(ValueError, match="difficulty must be one of"):
        PathfinderSpec(difficulty="medium")
    with pytest.raises(ValueError, match="at least 1"):
        PathfinderSpec(paddle_gaps=[0])


# ---- PNG ---------------------------------------------------------------------------------------------------
def _paeth(a, b, c):
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    return a if pa <= pb and pa <= pc else b if pb <= pc else c


def _png(rows: bytes, width: int, height: int, color: int = 0) -> bytes:
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, color, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def test_minimal_decoder_reads_every_filter_type():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (10, 7)).astype(int)
    rows = b""
    for y in range(10):  # row y uses filter y % 5, applied here with the PNG spec's forward rules
        kind, out = y % 5, []
        for x in range(7):
            a = image[y, x - 1] if x else 0
            b = image[y - 1, x] if y else 0
            c = image[y - 1, x - 1] if x and y else 0
            predictor = [0, a, b, (a + b) // 2, _paeth(a, b, c)][kind]
            out.append((image[y, x] - predictor) % 256)
        rows += bytes([kind, *out])
    np.testing.assert_array_equal(decode_png_minimal(_png(rows, 7, 10)), image)
    np.testing.assert_array_equal(decode_png_minimal(encode_png(image.astype(np.uint8))), image)


@pytest.mark.parametrize("damage,match", [
    (lambda d: b"", "empty file"),
    (lambda d: d[: len(d) // 2], "truncated"),
    (lambda d: d[:40] + bytes([d[40] ^ 0xFF]) + d[41:], "CRC mismatch"),
    (lambda d: b"GIF89a" + d[6:], "not a PNG"),
])
def test_minimal_decoder_names_what_is_wrong(damage, match):
    data = encode_png(np.arange(64, dtype=np.uint8).reshape(8, 8))
    with pytest.raises(BadImage, match=match):
        decode_png_minimal(damage(data))


def test_minimal_decoder_refuses_colour_pngs():
    with pytest.raises(UnsupportedPNG, match="color type 2"):
        decode_png_minimal(_png(bytes([0, 1, 2, 3]), 1, 1, color=2))


# ---- the datamodule on release-format fixtures ---------------------------------------------------------------
def _release(tmp_path, num_images=40):
    spec = PathfinderSpec(resolution=32, difficulty="easy", num_images=num_images, images_per_file=16)
    generate(spec, tmp_path / "lra_release", workers=1, progress=False)
    return tmp_path / "lra_release" / "pathfinder32" / "curv_baseline"


def _module(tmp_path, **kw):
    args = dict(lra_release=tmp_path / "lra_release", data_dir=tmp_path / "data", cache_dir=tmp_path / "cache",
                difficulty="easy", batch_size=4, seq_len=1024, max_len=1024, decode_workers=1)
    return PathfinderDataModule(**{**args, **kw})


def test_release_pixels_become_row_major_tokens_split_80_10_10(tmp_path):
    root = _release(tmp_path)
    pattern = (np.arange(1024) % 251).astype(np.uint8).reshape(32, 32)  # distinct rows: catches a transpose
    (root / "imgs" / "1" / "sample_3.png").write_bytes(encode_png(pattern))
    text = root / "metadata" / "2.npy"  # the release's index files are text; a real .npy array is read too
    np.save(text, np.array([line.split() for line in text.read_text().splitlines()]))
    assert text.read_bytes().startswith(b"\x93NUMPY")
    dm = _module(tmp_path)
    dm.prepare_data()
    dm.setup()
    assert {k: len(v) for k, v in dm.datasets.items()} == {"train": 32, "val": 4, "test": 4}
    rows = [dm.index()[i] for split in ("train", "val", "test") for i in dm.split_rows(split)]
    assert sorted(where for _, _, where in rows) == sorted(where for _, _, where in dm.index())  # a partition
    stored = np.concatenate([np.asarray(dm.datasets[s].arrays["input_ids"]) for s in ("train", "val", "test")])
    labels = np.concatenate([np.asarray(dm.datasets[s].arrays["label"]) for s in ("train", "val", "test")])
    position = [str(path) for path, _, _ in rows].index(str(root / "imgs" / "1" / "sample_3.png"))
    np.testing.assert_array_equal(stored[position], pattern.reshape(-1))
    np.testing.assert_array_equal(labels, [label for _, label, _ in rows])
    batch = next(iter(dm.val_dataloader()))
    assert batch["input_ids"].shape == (4, 1024) and batch["mask"].all()  # pixel 0 is black, not padding
    assert _module(tmp_path, split_seed=1).split_rows("test").tolist() != dm.split_rows("test").tolist()


def test_bad_files_are_skipped_counted_and_reported(tmp_path, capsys):
    root = _release(tmp_path, num_images=200)
    dm = _module(tmp_path, max_bad_fraction=0.05)
    victims = {str(path) for path, _, _ in (dm.index()[i] for i in dm.split_rows("train")[:2])}
    first, second = sorted(victims)
    data = open(first, "rb").read()
    open(first, "wb").write(data[: len(data) // 2])  # truncated PNG
    open(second, "wb").close()  # empty file, like the release's pathfinder32/curv_baseline/imgs/0/sample_172.png
    meta = root / "metadata" / "0.npy"
    lines = meta.read_text().splitlines()
    lines[5] = "imgs/0 sample_5.png 5"  # a line without its label
    nul = next(i for i in range(6, len(lines)) if str(root.joinpath(*lines[i].split()[:2])) not in victims)
    lines[nul] = lines[nul].replace("sample_", "sample_\0\0")  # zeros left by a crash or a full disk
    meta.write_text("\n".join(lines) + "\n")
    dm = _module(tmp_path, max_bad_fraction=0.05)
    dm.prepare_data()
    dm.setup()
    skipped = json.loads((dm.cache_dir / "skipped.json").read_text())
    reasons = [reason for entries in skipped.values() for _, reason in entries]
    assert len(reasons) == 4 and sum(len(d) for d in dm.datasets.values()) == 196
    assert any("truncated" in r for r in reasons) and any("empty" in r for r in reasons)
    assert sum("malformed metadata line" in r for r in reasons) == 2
    assert "skipped 4 unreadable entries" in capsys.readouterr().out
    assert sum(dm.describe_source()["skipped"].values()) == 4


def test_pathfinder_metadata_lines_that_are_not_utf8_are_skipped_and_named(tmp_path):
    root = _release(tmp_path, num_images=40)
    meta = root / "metadata" / "0.npy"
    lines = meta.read_bytes().splitlines(keepends=True)
    lines[1] = lines[1].replace(b"sample_1.png", b"sample_\xff.png")
    meta.write_bytes(b"".join(lines))
    dm = _module(tmp_path, max_bad_fraction=0.5)
    dm.prepare_data()
    reasons = [(where, why) for entries in dm.skipped.values() for where, why in entries]
    assert reasons == [(f"{meta}:2", "metadata line is not UTF-8 text")]


def test_damaged_npy_metadata_is_an_error_naming_the_file(tmp_path):
    root = _release(tmp_path, num_images=40)
    meta = root / "metadata" / "1.npy"
    buffer = io.BytesIO()
    np.save(buffer, np.array([line.split() for line in meta.read_text().splitlines()]))
    meta.write_bytes(buffer.getvalue()[:90])  # a truncated real .npy array
    with pytest.raises(DataError, match=r"metadata/1.npy: a damaged .npy metadata array .*--force"):
        _module(tmp_path).prepare_data()


def test_a_directory_instead_of_an_image_is_skipped_and_counted(tmp_path):
    root = _release(tmp_path, num_images=40)
    image = root / "imgs" / "1" / "sample_2.png"
    image.unlink()
    image.mkdir()
    dm = _module(tmp_path, max_bad_fraction=0.5)
    dm.prepare_data()
    dm.setup()
    skipped = json.loads((dm.cache_dir / "skipped.json").read_text())
    assert [entry for entries in skipped.values() for entry in entries] == [
        [str(image), "a directory, not an image file"]]
    assert sum(len(d) for d in dm.datasets.values()) == 39


def test_too_many_bad_files_is_an_error(tmp_path):
    root = _release(tmp_path)
    for path in list((root / "imgs" / "0").glob("*.png"))[:4]:
        path.unlink()
    with pytest.raises(DataError, match=r"of 32 Pathfinder train entries are unreadable.*missing.*max_bad_fraction"):
        _module(tmp_path).prepare_data()


def test_wrong_image_size_is_an_error(tmp_path):
    root = _release(tmp_path)
    (root / "imgs" / "2" / "sample_0.png").write_bytes(encode_png(np.zeros((64, 64), np.uint8)))
    with pytest.raises(DataError, match=r"sample_0.png: image is 64x64, expected 32x32 \(task.resolution=32\)"):
        _module(tmp_path).prepare_data()


def test_missing_release_names_the_fix(tmp_path):
    with pytest.raises(DataError, match=r"lra_release does not exist.*lra_release.gz.*task.source=generate"):
        _module(tmp_path).prepare_data()
    (tmp_path / "lra_release" / "pathfinder32" / "curv_baseline" / "metadata").mkdir(parents=True)
    with pytest.raises(DataError, match=r"curv_baseline/metadata holds no <k>.npy index files"):
        _module(tmp_path).prepare_data()


def test_options_that_cannot_work_are_refused(tmp_path):
    with pytest.raises(DataError, match=r"data.seq_len=2048 does not match task.resolution=32.*must be 1024"):
        _module(tmp_path, seq_len=2048)
    with pytest.raises(DataError, match="task.resolution must be one of"):
        _module(tmp_path, resolution=16)  # no such release folder (the generator has 16)
    with pytest.raises(DataError, match="task.difficulty must be one of"):
        _module(tmp_path, difficulty="medium")
    with pytest.raises(DataError, match="task.generator: .*continuity"):
        _module(tmp_path, source="generate", generator={"continuity": 0})


def test_generator_settings_that_cannot_fit_name_the_option(tmp_path):
    dm = _module(tmp_path, source="generate", resolution=16, seq_len=256, max_len=256,
                 generator={"num_images": 2, "contour_length": 14})
    with pytest.raises(DataError, match=r"could not fit two contours of 14 paddles.*task.generator.contour_length"):
        dm.prepare_data()


def test_fast_dev_run_on_generated_pathfinder(make_cfg):
    cfg = make_cfg("task=pathfinder", "protocol=quick", "task.generator.num_images=64",
                   "task.generator.images_per_file=32", "task.decode_workers=1", "data.batch_size=8",
                   "trainer.fast_dev_run=true", "logger=none")
    record = run(cfg)
    assert record["data"]["source"] == "generated" and record["data"]["sizes"] == {"train": 51, "val": 6, "test": 7}
    assert 0.0 <= record["test_acc"] <= 1.0 and record["steps"] == 1


@pytest.mark.slow
def test_fast_dev_run_on_generated_pathx(make_cfg):
    cfg = make_cfg("task=pathx", "protocol=quick", "model=nystromformer", "task.generator.num_images=10",
                   "task.generator.images_per_file=10", "task.decode_workers=1", "data.batch_size=1",
                   "trainer.fast_dev_run=true", "logger=none")
    record = run(cfg)
    assert record["data"]["sizes"] == {"train": 8, "val": 1, "test": 1} and record["steps"] == 1
