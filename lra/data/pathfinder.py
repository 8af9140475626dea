"""Pathfinder and Path-X (LRA): is there a path between the two marked dots? 2 classes, one token per pixel.

Sources (``source`` option):

* ``release``: ``<lra_release>/pathfinder<resolution>/<difficulty folder>/`` from LRA's ``lra_release.gz``
  (``curv_baseline``, ``curv_contour_length_9`` or ``curv_contour_length_14``), holding
  ``imgs/<k>/sample_<j>.png`` and ``metadata/<k>.npy`` index files;
* ``generate``: the same layout made by the built-in generator (``lra.data.pathfinder_generator``) under
  ``<data_dir>/generated/pathfinder-<hash of the generator options>/``, generated on first use (announced,
  with a progress bar) and reused afterwards.

LRA's Pathfinder is ``resolution=32, difficulty=hard`` (1024 tokens); Path-X is ``resolution=128,
difficulty=hard`` (16384 tokens).

Reading, as LRA's input pipeline and the Nyströmformer harness do:

* metadata files are text despite the ``.npy`` suffix (a true ``.npy`` string array is read too); each line
  is ``<folder> <file> <index> <label> ...`` (upstream's 11 columns): the image is ``<difficulty
  folder>/<folder>/<file>``, the label column 3. Files are read in numeric order of their stem, lines in
  file order;
* tokens are the grayscale pixel values 0..255 in row-major order (``vocab_size`` 256; 0 is a pixel value,
  not padding: every position is real, the mask is all true). ``zero_pixel_is_padding=True`` reproduces the
  upstream harnesses' bug instead: LRA's encoders mask ``inputs > 0`` for every task
  (lra_benchmarks/models/transformer/transformer.py), the Nyströmformer harness ``ids != 0``
  (LRA/code/dataset.py), so the black background, most of the image, is padding (``mask = ids != 0`` at
  batch time; the prepared arrays and the cache key do not change);
* the split is 80/10/10 of a seeded permutation of the metadata lines (``split_seed``): train the first
  ``int(0.8 n)``, val the next up to ``int(0.9 n)``, test the rest (the harness's boundaries; LRA splits the
  TFDS copy ``[:80%] [80%:90%] [90%:]``, the harness shuffles unseeded). The permutation is over all lines,
  bad ones included, so an unreadable file never moves another image to a different split;
* unreadable entries are skipped and counted: empty, truncated or corrupt PNGs (the release has at
  least one empty file, ``pathfinder32/curv_baseline/imgs/0/sample_172.png``, which LRA and the harness
  also drop), missing image files and malformed metadata lines. Prepare reports the counts (also in the
  run record) and fails when more than ``max_bad_fraction`` of a split is bad. An image of the wrong size
  is an error at once (a wrong ``resolution`` or folder).

PNGs are decoded with Pillow when it is installed, else with the minimal decoder here (8-bit grayscale,
the release's format), in ``decode_workers`` processes with a progress bar.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from lra.data import store
from lra.data.base import RELEASE_URL, DataError, LRADataModule
from lra.data.pathfinder_generator import (
    DIFFICULTIES,
    LRA_GEOMETRY,
    PathfinderSpec,
    TooCrowded,
    generate,
    metadata_files,
)

try:  # optional: faster decoding and every PNG flavour
    from PIL import Image
except ImportError:  # pragma: no cover - depends on the environment
    Image = None

RELEASE_RESOLUTIONS = (32, 64, 128, 256)
SPLIT_BOUNDS = (0.8, 0.9)
DECODE_CHUNK = 500  # images per task sent to a decoding worker
BAD_REPORT = "skipped.json"  # written next to the prepared arrays: what was skipped and why


class BadImage(ValueError):
    """An image file that cannot be decoded (empty, truncated, corrupt): skipped and counted."""


class UnsupportedPNG(ValueError):
    """A valid PNG the minimal decoder does not handle: an error naming the fix (install Pillow)."""


def generated_folder(data_dir: str | Path, spec: PathfinderSpec) -> Path:
    """Where ``source=generate`` keeps the files made for ``spec`` (one folder per distinct spec)."""
    key = hashlib.sha1(json.dumps(spec.as_dict(), sort_keys=True).encode()).hexdigest()[:10]
    return Path(data_dir) / "generated" / f"pathfinder-{key}"


# ---- PNG decoding -------------------------------------------------------------------------------------------
def _unfilter(raw: bytes, height: int, width: int) -> np.ndarray:
    """Undo PNG's per-row filters for one byte per pixel (types 0-4: none, sub, up, average, Paeth)."""
    out = np.zeros((height, width), dtype=np.uint8)
    prior = bytes(width)
    stride = width + 1
    for y in range(height):
        kind, line = raw[y * stride], raw[y * stride + 1 : (y + 1) * stride]
        if kind == 0:
            row = line
        elif kind == 1:
            row = (np.cumsum(np.frombuffer(line, np.uint8), dtype=np.uint64) % 256).astype(np.uint8).tobytes()
        elif kind == 2:
            row = (np.frombuffer(line, np.uint8) + np.frombuffer(prior, np.uint8)).tobytes()
        elif kind in (3, 4):
            row = bytearray(width)
            for x in range(width):
                left, up = row[x - 1] if x else 0, prior[x]
                if kind == 3:
                    guess = (left + up) >> 1
                else:
                    corner = prior[x - 1] if x else 0
                    p = left + up - corner
                    pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
                    guess = left if pa <= pb and pa <= pc else up if pb <= pc else corner
                row[x] = (line[x] + guess) & 0xFF
            row = bytes(row)
        else:
            raise BadImage(f"unknown PNG filter type {kind} in row {y}")
        out[y] = np.frombuffer(row, np.uint8)
        prior = row
    return out


def decode_png_minimal(data: bytes) -> np.ndarray:
    """Pixels ``[H, W]`` uint8 of an 8-bit grayscale, non-interlaced PNG, checking signature, chunk CRCs
    and sizes. Raises ``BadImage`` for empty/truncated/corrupt files, ``UnsupportedPNG`` for other formats."""
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        raise BadImage("empty file" if not data else "not a PNG file")
    pos, header, idat = 8, None, []
    while True:
        if pos + 8 > len(data):
            raise BadImage("truncated PNG (no IEND chunk)")
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body, crc = data[pos + 8 : pos + 8 + length], data[pos + 8 + length : pos + 12 + length]
        if len(crc) < 4:
            raise BadImage(f"truncated PNG (inside the {kind.decode('latin-1')} chunk)")
        if zlib.crc32(kind + body) != struct.unpack(">I", crc)[0]:
            raise BadImage(f"corrupt PNG (CRC mismatch in the {kind.decode('latin-1')} chunk)")
        pos += 12 + length
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
    if header is None:
        raise BadImage("corrupt PNG (no IHDR chunk)")
    width, height, depth, color, _, _, interlace = header
    if (depth, color, interlace) != (8, 0, 0):
        raise UnsupportedPNG(f"bit depth {depth}, color type {color}, interlace {interlace}")
    try:
        raw = zlib.decompress(b"".join(idat))
    except zlib.error as err:
        raise BadImage(f"corrupt PNG data ({err})") from None
    if len(raw) != height * (width + 1):
        raise BadImage(f"corrupt PNG data ({len(raw)} bytes for {height} rows of {width} pixels)")
    return _unfilter(raw, height, width)


def decode_png(data: bytes) -> np.ndarray:
    """Grayscale pixels ``[H, W]`` uint8 (Pillow when installed, converting other modes to ``L``)."""
    if Image is None:
        return decode_png_minimal(data)
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return np.asarray(image if image.mode == "L" else image.convert("L"))
    except (OSError, SyntaxError, ValueError, EOFError, zlib.error) as err:
        raise BadImage(f"{type(err).__name__}: {err}" if data else "empty file") from None


def _decode_files(task) -> tuple[np.ndarray, list[str | None], list[tuple[int, int] | None]]:
    """Decode one chunk of files: pixels ``[n, size*size]``, the reason each bad one was skipped (None if
    fine) and the shape of each image of the wrong size (None if right)."""
    paths, size = task
    pixels = np.zeros((len(paths), size * size), dtype=np.uint8)
    reasons: list[str | None] = [None] * len(paths)
    wrong: list[tuple[int, int] | None] = [None] * len(paths)
    for i, path in enumerate(paths):
        try:
            image = decode_png(Path(path).read_bytes())
        except FileNotFoundError:
            reasons[i] = "missing"
            continue
        except IsADirectoryError:
            reasons[i] = "a directory, not an image file"
            continue
        except OSError as err:  # permissions, I/O errors: this file is unreadable, the others may be fine
            reasons[i] = f"unreadable ({err.strerror or type(err).__name__})"
            continue
        except BadImage as err:
            reasons[i] = str(err)
            continue
        except UnsupportedPNG as err:
            raise DataError(
                f"{path}: a PNG the built-in decoder does not read ({err}; it reads 8-bit grayscale, the "
                f"release's format). Install Pillow (`pip install pillow`) and prepare again."
            ) from None
        if image.shape != (size, size):
            wrong[i] = image.shape
            continue
        pixels[i] = image.reshape(-1)  # row-major: token t is pixel (t // size, t % size)
    return pixels, reasons, wrong


# ---- the datamodule -----------------------------------------------------------------------------------------
class PathfinderDataModule(LRADataModule):
    """Pathfinder (``resolution=32``) and Path-X (``resolution=128``).

    ``generator`` holds ``PathfinderSpec`` fields for ``source=generate`` (its resolution and difficulty are
    this module's). ``max_len`` and ``seq_len`` must equal ``resolution**2``: every pixel is a token and
    there is no padding id to fill a longer sequence with. ``zero_pixel_is_padding``: pixel value 0 masked as
    padding (the upstream harnesses' bug; default: every pixel real).
    """

    name = "pathfinder"
    num_classes = 2
    vocab_size = 256
    pad_id = None  # pixel 0 is black, not padding

    def __init__(
        self,
        lra_release: str,
        data_dir: str,
        source: str = "release",
        resolution: int = 32,
        difficulty: str = "hard",
        generator: dict | None = None,
        split_seed: int = 0,
        max_bad_fraction: float = 0.01,
        decode_workers: int | None = None,
        zero_pixel_is_padding: bool = False,
        **kwargs,
    ):
        if source not in ("release", "generate"):
            raise DataError(f"task.source must be 'release' or 'generate', got {source!r}.")
        if difficulty not in DIFFICULTIES:
            raise DataError(f"task.difficulty must be one of {', '.join(DIFFICULTIES)}, got {difficulty!r}.")
        sizes = RELEASE_RESOLUTIONS if source == "release" else tuple(LRA_GEOMETRY)
        if resolution not in sizes:
            raise DataError(f"task.resolution must be one of {sizes} for task.source={source}, got {resolution}.")
        tokens = resolution * resolution
        for option, value in (("task.max_len", kwargs.get("max_len")), ("data.seq_len", kwargs.get("seq_len"))):
            if value != tokens:
                raise DataError(
                    f"{option}={value} does not match task.resolution={resolution}: Pathfinder has one token per "
                    f"pixel and no padding id, so {option} must be {tokens} (resolution squared). Set both "
                    f"task.max_len and data.seq_len to {tokens}, or change task.resolution."
                )
        if not 0 <= max_bad_fraction < 1:
            raise DataError(f"task.max_bad_fraction must be in [0, 1), got {max_bad_fraction}.")
        super().__init__(**kwargs)
        self.pad_id = 0 if zero_pixel_is_padding else None  # masks are built at batch time: not a cache option
        self.source, self.release = source, Path(lra_release)
        self.resolution, self.difficulty, self.split_seed = resolution, difficulty, split_seed
        self.max_bad_fraction, self.decode_workers = max_bad_fraction, decode_workers or os.cpu_count() or 1
        self.spec = None
        if source == "generate":
            try:
                self.spec = PathfinderSpec(resolution=resolution, difficulty=difficulty, **(generator or {}))
            except (TypeError, ValueError) as err:
                raise DataError(f"task.generator: {err}. (resolution and difficulty are task options.)") from None
        self.name = f"pathfinder{resolution}"  # the cache folder: pathfinder32 (Pathfinder), pathfinder128 (Path-X)
        self.folder = self.release if source == "release" else generated_folder(data_dir, self.spec)
        self.root = self.folder / f"pathfinder{resolution}" / DIFFICULTIES[difficulty][0]
        self.skipped: dict[str, list[tuple[str, str]]] = {}
        self._index: list[tuple[Path | None, int, str]] | None = None
        self._malformed: dict[str, str] = {}  # where -> why, for metadata lines that are not plain malformed

    # ---- sources ---------------------------------------------------------------------------------------------
    def source_files(self) -> list[Path]:
        """The metadata files (the images they list are ``fingerprint_files`` too)."""
        if self.spec is not None:
            return metadata_files(self.folder, self.spec)
        found = sorted(self.root.glob("metadata/*.npy"), key=_numeric_order)
        return found or [self.root / "metadata"]

    def fingerprint_files(self) -> list[Path]:
        """The metadata files and every image they list: all their contents key the cache (hashed once, then
        re-checked by stat). A missing or unreadable image is fingerprinted as such (it is skipped when read)."""
        images = dict.fromkeys(path for path, _, _ in self.index() if path is not None)
        return [*self.source_files(), *images]

    def missing_help(self, missing: list[Path]) -> str:
        shown = ", ".join(str(p) for p in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        if self.spec is not None:
            return (
                f"Generated Pathfinder files missing: {shown}. Training generates them on first use; "
                f"`lra-data generate pathfinder` with the same overrides makes them ahead of time."
            )
        if not self.release.is_dir():
            where = f"the LRA release folder {self.release} does not exist"
        elif missing == [self.root / "metadata"]:
            where = f"{self.root / 'metadata'} holds no <k>.npy index files"
        else:
            where = f"missing: {shown}"
        return (
            f"Pathfinder data not found ({where}). Either download {RELEASE_URL}, extract it and point "
            f"paths.lra_release at the extracted lra_release/ folder (it must hold pathfinder{self.resolution}/"
            f"{DIFFICULTIES[self.difficulty][0]}/ with metadata/ and imgs/), or train on images made by the "
            f"built-in Pathfinder generator with `task.source=generate` (it generates a full-size set on first "
            f"use; `lra-data generate pathfinder` does it ahead of time). Runs on generated data are labelled so "
            f"in the records and tables."
        )

    def ensure_sources(self) -> None:
        """``source=generate``: generate the files once, under the folder's inter-process lock (a concurrent
        job waits, then reuses them)."""
        if self.spec is not None:

            def make():
                print(f"[lra] generating Pathfinder-{self.resolution} ({self.difficulty}) with the built-in "
                      f"generator into {self.folder} ({self.spec.num_images} images)")
                try:
                    generate(self.spec, self.folder, workers=self.decode_workers)
                except TooCrowded as err:
                    raise DataError(f"task.generator: {err} Change task.generator.contour_length (now "
                                    f"{self.spec.geometry().contour_length}) or the geometry options.") from None

            store.make_once(self.folder, lambda: all(p.is_file() for p in self.source_files()), make,
                            f"generating Pathfinder into {self.folder}")
        super().ensure_sources()

    def describe_source(self) -> dict:
        out = {"source": "release" if self.spec is None else "generated", "folder": str(self.root)}
        if self.spec is not None:
            out["generator"] = self.spec.as_dict()
        try:
            report = self.cache_dir / BAD_REPORT
        except (OSError, DataError):  # sources not there yet: nothing prepared to report on
            return out
        if report.is_file():
            out["skipped"] = {split: len(v) for split, v in json.loads(report.read_text()).items()}
        return out

    def cache_options(self) -> dict:
        return {"tokens": "pixels-row-major", "resolution": self.resolution, "difficulty": self.difficulty,
                "split": [*SPLIT_BOUNDS, self.split_seed]}

    # ---- reading -------------------------------------------------------------------------------------------
    def index(self) -> list[tuple[Path | None, int, str]]:
        """Every metadata line in order: ``(image path, label, where)``; path None for a malformed line."""
        if self._index is None:
            rows = []
            for meta in self.source_files():
                for number, fields in enumerate(_metadata_lines(meta), start=1):
                    if not fields:
                        continue
                    where = f"{meta}:{number}"
                    if fields is NOT_UTF8:
                        self._malformed[where] = "metadata line is not UTF-8 text"
                        rows.append((None, -1, where))
                    elif len(fields) >= 4 and fields[3] in ("0", "1") and _inside(fields[0], fields[1]):
                        rows.append((self.root / fields[0] / fields[1], int(fields[3]), where))
                    else:
                        rows.append((None, -1, where))
            if not rows:
                raise DataError(f"{self.root / 'metadata'}: the metadata files list no images. Re-extract the "
                                f"release or regenerate (`task.source=generate`).")
            self._index = rows
        return self._index

    def split_rows(self, split: str) -> np.ndarray:
        """Indices into ``index()`` of one split (seeded permutation, 80/10/10)."""
        n = len(self.index())
        order = np.random.default_rng(self.split_seed).permutation(n)
        a, b = int(SPLIT_BOUNDS[0] * n), int(SPLIT_BOUNDS[1] * n)
        return {"train": order[:a], "val": order[a:b], "test": order[b:]}[split]

    def read_split(self, split: str) -> dict[str, np.ndarray]:
        rows = [self.index()[i] for i in self.split_rows(split)]
        total = len(rows)
        bad = [(where, self._malformed.get(where, "malformed metadata line (expected '<folder> <file> <index> "
                                                  "<0|1> ...' with a relative image path)"))
               for path, _, where in rows if path is None]
        rows = [row for row in rows if row[0] is not None]
        paths = [str(path) for path, _, _ in rows]
        chunks = [(paths[i : i + DECODE_CHUNK], self.resolution) for i in range(0, len(paths), DECODE_CHUNK)]
        pixels = np.zeros((len(paths), self.resolution**2), dtype=np.uint8)
        keep = np.ones(len(paths), dtype=bool)
        workers = min(self.decode_workers, len(chunks))
        with tqdm(total=len(paths), desc=f"decoding Pathfinder {split}", unit="img", disable=len(paths) < 5000) as bar:
            results = map(_decode_files, chunks) if workers <= 1 else _pool_map(workers, chunks)
            for c, (chunk_pixels, reasons, wrong) in enumerate(results):
                start = c * DECODE_CHUNK
                for i, shape in enumerate(wrong):
                    if shape is not None:
                        size = self.resolution
                        raise DataError(
                            f"{paths[start + i]}: image is {shape[0]}x{shape[1]}, expected {size}x{size} "
                            f"(task.resolution={size}). Set task.resolution (and task.max_len, data.seq_len) to "
                            f"the images' size, or point paths.lra_release at a release whose pathfinder{size}/ "
                            f"holds {size}x{size} images."
                        )
                for i, reason in enumerate(reasons):
                    if reason is not None:
                        keep[start + i] = False
                        bad.append((paths[start + i], reason))
                pixels[start : start + len(chunk_pixels)] = chunk_pixels
                bar.update(len(chunk_pixels))
        self.skipped[split] = bad
        if len(bad) > self.max_bad_fraction * total:
            listing = "; ".join(f"{where}: {reason}" for where, reason in bad[:10])
            raise DataError(
                f"{len(bad)} of {total} Pathfinder {split} entries are unreadable (more than task.max_bad_fraction="
                f"{self.max_bad_fraction}), e.g. {listing}. The release under {self.root} looks incomplete or "
                f"damaged: download and extract {RELEASE_URL} again over it (`lra-data download "
                f"{'pathfinder' if self.resolution == 32 else 'pathx'} --force`), regenerate with "
                f"`task.source=generate`, or raise task.max_bad_fraction to accept the loss."
            )
        labels = np.asarray([label for _, label, _ in rows], dtype=np.int64)
        return {"input_ids": pixels[keep], "label": labels[keep]}

    def cache_extras(self) -> dict[str, str]:
        return {BAD_REPORT: json.dumps(self.skipped, indent=1)} if self.skipped else {}

    def prepare_data(self) -> None:
        """Prepare (once) and report what was skipped, also in ``<cache>/skipped.json`` for the run record
        (written with the arrays, before the cache folder is renamed into place)."""
        self.skipped = {}
        super().prepare_data()
        if self.skipped:
            counts = {split: len(v) for split, v in self.skipped.items()}
            if any(counts.values()):
                example = next(item for v in self.skipped.values() for item in v)
                print(f"[lra] Pathfinder: skipped {sum(counts.values())} unreadable entries "
                      f"({', '.join(f'{k} {v}' for k, v in counts.items())}), e.g. {example[0]}: {example[1]}; "
                      f"the full list is in {self.cache_dir / BAD_REPORT}")


NOT_UTF8: list[str] = ["<not UTF-8>"]  # stands for a metadata line that is not UTF-8 text (skipped, counted)


def _metadata_lines(path: Path) -> list[list[str]]:
    """The fields of each line of a metadata file: text in the release (as LRA and the harness read it); a real
    ``.npy`` string array, as the upstream generator's ``np.save`` writes, is read too. A line that is not
    UTF-8 is ``NOT_UTF8``; a file that cannot be read at all is a ``DataError`` naming it."""
    fix = ("Re-extract the release (`lra-data download pathfinder --force`; pathx for Path-X) or, for generated "
           "data, delete its folder under <data_dir>/generated/ and generate again.")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot read this metadata file ({err.strerror}). {fix}") from None
    if data.startswith(b"\x93NUMPY"):
        try:
            array = np.load(io.BytesIO(data), allow_pickle=False)
        except (ValueError, OSError, EOFError) as err:
            raise DataError(f"{path}: a damaged .npy metadata array ({err}). {fix}") from None
        return [[str(v) for v in row] for row in np.atleast_2d(array)]
    lines = []
    for line in data.splitlines():
        try:
            lines.append(line.decode("utf-8").split())
        except UnicodeDecodeError:
            lines.append(NOT_UTF8)
    return lines


def _inside(folder: str, name: str) -> bool:
    """Whether a metadata line's image path is a path inside the dataset folder (relative, no ``..``, no NUL byte:
    the zeros a crash or a full disk leaves in a file)."""
    path = Path(folder, name)
    return "\0" not in folder + name and not path.is_absolute() and ".." not in path.parts


def _numeric_order(path: Path):
    """Metadata files in the numeric order of their stems (``2.npy`` before ``10.npy``), others after."""
    return (0, int(path.stem), "") if path.stem.isdigit() else (1, 0, path.name)


def _pool_map(workers: int, chunks):
    from multiprocessing import Pool

    with Pool(workers) as pool:
        yield from pool.imap(_decode_files, chunks)
