"""Pathfinder stimuli (Linsley et al. 2018, as used by LRA for Pathfinder and Path-X), re-implemented with numpy.

An image shows dashed contours ("snakes": chains of short line segments called paddles, separated by
gaps) on black, and two bright marker discs. Label 1 iff both markers sit on the two ends of the *same*
contour. The recipe follows ``drewlinsley/pathfinder`` (``snakes2.py``) with the per-resolution settings
listed in LRA's ``lra_benchmarks/data/pathfinder.py`` (``LRA_GEOMETRY`` below):

* two target contours of ``contour_length`` paddles start ``seed_distance`` pixels apart (the first start
  away from a ``2 * seed_distance`` border band where the image leaves room); label 1 marks the start and
  the end of one of them, label 0 the start of one and the end of the other;
* each paddle turns from the previous one by ``delta`` drawn with weight ``cos(continuity * delta)**2``
  on ``|delta| < pi / (2 continuity)`` (upstream's continuity weighting: larger = straighter), restricted
  to the turns whose paddle fits, as upstream masks its turn distribution to free spots;
* ``distractor_budget // distractor_length`` distractor contours of ``distractor_length =
  contour_length // 3`` paddles are added where they fit; one that does not fit after a few tries is
  skipped (upstream ``allow_incomplete``);
* difficulty is the contour length: ``easy`` 6 (``curv_baseline``), ``intermediate`` 9, ``hard`` 14.

Geometry and search choices the upstream code leaves implicit, fixed here (pixel units, nodes on pixel
centres, headings on a 5 degree grid):

* a paddle joins two nodes ``round(paddle_length * u(theta))`` apart; the next paddle starts after a
  gap that moves ``gap + 1`` pixels along the dominant axis of its direction, so ``gap`` pixels stay
  empty between dashes at every angle (``paddle_gaps`` is drawn once per image, as upstream's
  ``paddle_margin_list``);
* a pixel's coverage by a paddle at distance ``d`` from its centre line is
  ``clip(thickness/2 + 0.5 - d, 0, min(thickness, 1))`` and its value ``round(255 * min(1, contrast *
  coverage))``; marker discs use ``clip(radius + 0.5 - d, 0, 1)`` at full contrast, so markers are the
  only pixels reaching 255 whenever ``contrast * min(thickness, 1) < 1``;
* **the ground truth is checkable from pixels**: besides the image, ``render`` returns a *solid* mask,
  each contour drawn with its gaps filled in (the same centre line, the same reach) plus the two drawn
  markers. Different contours (and the marker sites) are kept ``min_separation`` empty pixels apart
  in that mask, also diagonally, so the two markers are 8-connected in the solid mask iff the label is
  1, while the image stays dashed like the release's. Every lit image pixel lies in the solid mask.
  Contours also never touch their own older parts (no loops), as upstream;
* a contour stuck with no paddle that fits takes back its previous paddle and redraws it among the
  other headings (a target up to ``TARGET_BACKTRACKS`` times, a distractor never), else it is regrown
  (``CONTOUR_TRIES``) and finally the image restarts; the two targets grow one after the other (upstream
  alternates paddles, which fails more often in crowded 32x32 images). A target's last paddle ends where
  its marker fits.

Files (the release layout): ``<folder>/pathfinder<res>/<difficulty folder>/imgs/<k>/sample_<j>.png`` and
``metadata/<k>.npy``; despite the suffix the index is text, one line per image with upstream's 11
space-separated columns ``imgs/<k> sample_<j>.png <j> <label> <continuity> <contour_length>
<distractor_length> <paddle_length> <paddle_thickness> <gap> <1>``. Images are 8-bit grayscale PNGs
(filter 0, zlib), written by the minimal encoder here, so the bytes do not depend on optional packages.

Determinism: image ``i`` is drawn from its own ``random.Random(f"pathfinder:{seed}:{i}")`` and the labels
are a seeded balanced permutation (exactly ``num_images // 2`` ones), so any number of worker
processes writes identical files.
"""

from __future__ import annotations

import bisect
import itertools
import math
import os
import random
import struct
import zlib
from dataclasses import asdict, dataclass, fields
from functools import cache
from multiprocessing import Pool
from pathlib import Path
from typing import NamedTuple

import numpy as np
from tqdm.auto import tqdm

from lra.data.store import partial_name, remove_stale_partials

# difficulty -> (release folder, contour length in paddles)
DIFFICULTIES = {
    "easy": ("curv_baseline", 6),
    "intermediate": ("curv_contour_length_9", 9),
    "hard": ("curv_contour_length_14", 14),
}

# Per-resolution settings of LRA's release (docstrings of lra_benchmarks/data/pathfinder.py; the rest are
# the defaults of drewlinsley/pathfinder's snakes2_wrapper.py). contrast = snake contrast * paddle contrast;
# distractor_budget // distractor_length = number of distractors. 16 is not an LRA size: a small variant for
# CPU runs, which fits contours of up to 4 paddles (set contour_length).
LRA_GEOMETRY = {
    16: dict(paddle_length=2, paddle_gaps=(1,), paddle_thickness=0.5, continuity=1.0, marker_radius=1.0,
             seed_distance=4.0, distractor_budget=4, contrast=1.5, padding=0),
    32: dict(paddle_length=2, paddle_gaps=(1,), paddle_thickness=0.5, continuity=1.0, marker_radius=1.5,
             seed_distance=7.0, distractor_budget=20, contrast=1.5, padding=1),
    64: dict(paddle_length=5, paddle_gaps=(1,), paddle_thickness=1.0, continuity=1.8, marker_radius=2.5,
             seed_distance=12.0, distractor_budget=22, contrast=0.8, padding=1),
    128: dict(paddle_length=5, paddle_gaps=(2, 3), paddle_thickness=1.5, continuity=1.8, marker_radius=3.0,
              seed_distance=20.0, distractor_budget=35, contrast=0.9, padding=1),
    256: dict(paddle_length=5, paddle_gaps=(3,), paddle_thickness=2.0, continuity=1.8, marker_radius=5.0,
              seed_distance=27.0, distractor_budget=30, contrast=1.0, padding=22),
}

WALL = 1  # owner id of the border; contour parts get ids from 2 up
RECENT = 2  # a part may touch the previous RECENT parts of its own contour (the joint), nothing older
HEADINGS = 72  # paddle directions, every 5 degrees
TARGET_BACKTRACKS = 12  # paddles a target contour may take back before it counts as stuck (distractors: none)
START_PICKS = 20  # random pixels tried for a distractor's start
QUICK_DRAWS = 4  # unrestricted heading draws tried before every heading is checked
CONTOUR_TRIES = 4  # growths tried per contour (upstream max_*_contour_retrial)
IMAGE_TRIES = 200  # fresh starts per image before the spec is declared too crowded


class TooCrowded(RuntimeError):
    """The spec's contours do not fit in its images."""


@dataclass(frozen=True)
class PathfinderSpec:
    """What to generate. Geometry fields left ``None`` take LRA's value for ``resolution``.

    ``num_images`` images are written ``images_per_file`` per ``imgs/<k>/`` folder and ``metadata/<k>.npy``
    file (the release: 200k images per difficulty).
    """

    resolution: int = 32
    difficulty: str = "hard"
    num_images: int = 200000
    images_per_file: int = 1000
    seed: int = 0
    contour_length: int | None = None
    paddle_length: int | None = None
    paddle_gaps: tuple[int, ...] | None = None
    paddle_thickness: float | None = None
    continuity: float | None = None
    marker_radius: float | None = None
    seed_distance: float | None = None
    distractor_budget: int | None = None
    contrast: float | None = None
    padding: int | None = None
    min_separation: int = 1

    def __post_init__(self):
        if self.paddle_gaps is not None:
            object.__setattr__(self, "paddle_gaps", tuple(int(g) for g in self.paddle_gaps))
        if self.resolution not in LRA_GEOMETRY:
            raise ValueError(f"resolution must be one of {sorted(LRA_GEOMETRY)}, got {self.resolution}")
        if self.difficulty not in DIFFICULTIES:
            raise ValueError(f"difficulty must be one of {list(DIFFICULTIES)}, got {self.difficulty!r}")
        if self.num_images < 1 or self.images_per_file < 1:
            raise ValueError("num_images and images_per_file must be at least 1")
        geo = self.geometry()
        if geo.contour_length < 1 or geo.paddle_length < 1 or not geo.paddle_gaps or min(geo.paddle_gaps) < 1:
            raise ValueError("contour_length, paddle_length and every paddle gap must be at least 1")
        if geo.continuity <= 0 or geo.paddle_thickness <= 0 or geo.marker_radius < 0 or geo.min_separation < 1:
            raise ValueError("continuity and paddle_thickness must be > 0, marker_radius >= 0, min_separation >= 1")

    def as_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @property
    def folder_name(self) -> str:
        return DIFFICULTIES[self.difficulty][0]

    def geometry(self) -> Geometry:
        """The resolved drawing settings (LRA's per resolution, overridden by the fields set here)."""
        lra = LRA_GEOMETRY[self.resolution]
        picked = {f.name: getattr(self, f.name) for f in fields(self) if f.name in lra}
        chosen = {k: lra[k] if v is None else v for k, v in picked.items()}
        length = DIFFICULTIES[self.difficulty][1] if self.contour_length is None else self.contour_length
        distractor_length = max(1, length // 3)
        return Geometry(size=self.resolution, contour_length=length, distractor_length=distractor_length,
                        num_distractors=chosen.pop("distractor_budget") // distractor_length,
                        min_separation=self.min_separation, **chosen)


@dataclass(frozen=True)
class Geometry:
    """Resolved drawing settings of a spec (pixels); see ``PathfinderSpec`` and the module docstring."""

    size: int
    contour_length: int
    distractor_length: int
    num_distractors: int
    paddle_length: int
    paddle_gaps: tuple[int, ...]
    paddle_thickness: float
    continuity: float
    marker_radius: float
    seed_distance: float
    contrast: float
    padding: int
    min_separation: int

    @property
    def line_reach(self) -> float:
        return self.paddle_thickness / 2 + 0.5

    @property
    def border(self) -> int:
        """Padding of the internal raster: room for every footprint and its separation ring."""
        return math.ceil(max(self.line_reach, self.marker_radius + 0.5)) + self.min_separation + 1


@dataclass
class Stimulus:
    """One drawn image with the ground truth a test can check from pixels alone."""

    image: np.ndarray  # [size, size] uint8, what the PNG holds
    solid: np.ndarray  # [size, size] bool, contours with their gaps filled plus the two drawn markers
    markers: tuple[tuple[int, int], tuple[int, int]]  # (row, col) centres of the two markers
    label: int
    gap: int  # empty pixels between dashes in this image


# ---- footprints: pixel offsets (flat, on a raster of a given width) of a drawn piece, cached ----------------
class Footprint(NamedTuple):
    solid: np.ndarray  # flat offsets of the solid footprint
    lit: np.ndarray  # flat offsets of the drawn pixels ...
    coverage: np.ndarray  # ... and their coverage in [0, 1]
    solid_list: tuple[int, ...]  # the solid offsets as Python ints (placement works pixel by pixel)
    guard_list: tuple[int, ...]  # solid footprint dilated by min_separation, farthest from the start first


def _segment_distance(ys, xs, y0, x0, y1, x1):
    dy, dx = y1 - y0, x1 - x0
    length2 = dy * dy + dx * dx
    t = np.clip(((ys - y0) * dy + (xs - x0) * dx) / max(length2, 1), 0, 1) if length2 else 0.0
    return np.hypot(ys - (y0 + t * dy), xs - (x0 + t * dx))


def _footprint(width, ys, xs, solid, lit, coverage, separation) -> Footprint:
    ring = np.arange(-separation, separation + 1)
    ry, rx = (a.ravel() for a in np.meshgrid(ring, ring, indexing="ij"))
    gy, gx = np.unique(np.stack([(ys[solid, None] + ry).ravel(), (xs[solid, None] + rx).ravel()]), axis=1)
    order = np.argsort(-np.hypot(gy, gx), kind="stable")
    flat = ys * width + xs
    return Footprint(flat[solid], flat[lit], coverage.astype(np.float32), tuple(flat[solid].tolist()),
                     tuple((gy[order] * width + gx[order]).tolist()))


@cache
def _piece(width: int, gap: tuple[int, int], paddle: tuple[int, int], thickness: float, separation: int) -> Footprint:
    """A gap from (0, 0) to ``gap`` followed by a paddle to ``gap + paddle`` (only the paddle is lit)."""
    reach = thickness / 2 + 0.5
    r = math.ceil(reach)
    ends_y, ends_x = (0, gap[0], gap[0] + paddle[0]), (0, gap[1], gap[1] + paddle[1])
    ys, xs = (a.ravel() for a in np.meshgrid(np.arange(min(ends_y) - r, max(ends_y) + r + 1),
                                             np.arange(min(ends_x) - r, max(ends_x) + r + 1), indexing="ij"))
    d_gap = _segment_distance(ys, xs, 0, 0, *gap)
    d_paddle = _segment_distance(ys, xs, gap[0], gap[1], gap[0] + paddle[0], gap[1] + paddle[1])
    lit = d_paddle < reach
    coverage = np.clip(reach - d_paddle[lit], 0, min(thickness, 1.0))
    return _footprint(width, ys, xs, np.minimum(d_gap, d_paddle) < reach, lit, coverage, separation)


@cache
def _disc(width: int, radius: float, separation: int) -> Footprint:
    """A marker disc of ``radius`` around (0, 0)."""
    r = math.ceil(radius + 0.5)
    ys, xs = (a.ravel() for a in np.meshgrid(np.arange(-r, r + 1), np.arange(-r, r + 1), indexing="ij"))
    d = np.hypot(ys, xs)
    inside = d < radius + 0.5
    return _footprint(width, ys, xs, inside, inside, np.clip(radius + 0.5 - d[inside], 0, 1), separation)


def _step(theta: float, length: int, dominant: bool = False) -> tuple[int, int]:
    sy, sx = math.sin(theta), math.cos(theta)
    scale = length / max(abs(sy), abs(sx)) if dominant else length
    return round(scale * sy), round(scale * sx)


@cache
def _moves(geo: Geometry, gap: int, width: int) -> tuple[tuple, tuple]:
    """Per heading index (every ``360 / HEADINGS`` degrees): ``(end, footprint)`` of the first piece of a
    contour (a paddle) and of a later piece (gap then paddle); ``end`` is the node after the piece relative
    to its start, and the paddle's head lies between the two."""
    out = []
    for gap_pixels in (0, gap + 1):
        moves = []
        for h in range(HEADINGS):
            theta = 2 * math.pi * h / HEADINGS
            step_gap, paddle = _step(theta, gap_pixels, dominant=True), _step(theta, geo.paddle_length)
            end = (step_gap[0] + paddle[0], step_gap[1] + paddle[1])
            moves.append((end, _piece(width, step_gap, paddle, geo.paddle_thickness, geo.min_separation)))
        out.append(tuple(moves))
    return out[0], out[1]


@cache
def _turns(continuity: float) -> tuple[tuple[int, float], ...]:
    """Turns in heading steps with ``|delta| < pi / (2 continuity)`` and their weights ``cos(continuity delta)**2``."""
    step = 2 * math.pi / HEADINGS
    reach = math.ceil(math.pi / (2 * continuity) / step) - 1
    return tuple((k, math.cos(continuity * k * step) ** 2) for k in range(-reach, reach + 1))


# ---- one image ---------------------------------------------------------------------------------------------
class _Canvas:
    """Ownership raster of one image attempt: each pixel holds the id of the contour part that claimed it.

    A part fits when its guard ring (its footprint dilated by ``min_separation``) meets only free pixels
    and the last ``RECENT`` parts of its own contour (the joint it grows from); walls (id 1), other
    contours and its own older parts block. Plain Python lists: footprints are a few dozen pixels and
    most candidates fail on their first pixels, where scalar loops beat numpy's per-call overhead.
    """

    def __init__(self, geo: Geometry):
        self.border = geo.border
        self.width = geo.size + 2 * self.border
        owner = np.full((self.width, self.width), WALL, dtype=np.int64)
        lo, hi = self.border + geo.padding, self.border + geo.size - geo.padding
        owner[lo:hi, lo:hi] = 0
        self.owner = owner.ravel().tolist()
        self.pixels: dict[int, list[int]] = {}  # part id -> pixels it claimed
        self.next_id = WALL + 1
        self.low, self.high = geo.padding, geo.size - geo.padding  # node rows/cols allowed: [low, high)

    def inside(self, node, margin: int = 0) -> bool:
        low, high = self.low + margin, self.high - margin
        return low <= node[0] < high and low <= node[1] < high

    def base(self, node) -> int:
        return (node[0] + self.border) * self.width + node[1] + self.border

    def fits(self, node, footprint: Footprint, parts: list[int]) -> bool:
        """Whether ``footprint`` may be placed at ``node`` as the next part of the contour with part ids ``parts``."""
        base, owner, joint = self.base(node), self.owner, parts[-RECENT:]
        for offset in footprint.guard_list:
            seen = owner[base + offset]
            if seen and seen not in joint:
                return False
        return True

    def place(self, node, footprint: Footprint, parts: list[int]) -> None:
        """Claim the free pixels of ``footprint`` at ``node`` as the next part of the contour ``parts``."""
        base, owner, part = self.base(node), self.owner, self.next_id
        pixels = [base + offset for offset in footprint.solid_list if owner[base + offset] == 0]
        for pixel in pixels:
            owner[pixel] = part
        self.pixels[part] = pixels
        parts.append(part)
        self.next_id += 1

    def release(self, parts: list[int], keep: int = 0) -> None:
        """Take back the parts of a contour after its first ``keep``."""
        while len(parts) > keep:
            for pixel in self.pixels.pop(parts.pop()):
                self.owner[pixel] = 0

    def roomy(self, node, radius: int) -> bool:
        """Nothing claimed (walls included) within Chebyshev distance ``radius`` of ``node``."""
        base, owner, width = self.base(node), self.owner, self.width
        return not any(owner[base + dy * width + dx] for dy in range(-radius, radius + 1)
                       for dx in range(-radius, radius + 1))


class _Contour:
    """A contour being drawn: its part ids on the canvas and its ``(node, footprint)`` pieces."""

    def __init__(self, start):
        self.start, self.end = start, start
        self.parts: list[int] = []
        self.pieces: list[tuple[tuple[int, int], Footprint]] = []


class _Sketch:
    """The contours of one image attempt, placed on a ``_Canvas``."""

    def __init__(self, geo: Geometry, gap: int, rng: random.Random):
        self.geo, self.gap, self.rng = geo, gap, rng
        self.canvas = _Canvas(geo)
        self.disc = _disc(self.canvas.width, geo.marker_radius, geo.min_separation)
        self.first_moves, self.moves = _moves(geo, gap, self.canvas.width)
        self.turns = _turns(geo.continuity)
        self.cumulative = list(itertools.accumulate(weight for _, weight in self.turns))
        self.clearance = math.ceil(geo.line_reach) + geo.min_separation  # room a distractor's start needs
        self.marker_room = math.ceil(geo.marker_radius + 0.5) + geo.min_separation  # a marker's distance to walls

    def reserve_marker(self, node, contour: _Contour) -> bool:
        """Claim a marker site (a disc) at ``node`` for ``contour``, if it fits."""
        if not (self.canvas.inside(node) and self.canvas.fits(node, self.disc, contour.parts)):
            return False
        self.canvas.place(node, self.disc, contour.parts)
        return True

    def open_headings(self, node, candidates, first: bool, parts: list[int], margin: int) -> list:
        """The ``(heading, weight)`` candidates whose piece fits at ``node`` and ends ``margin`` pixels inside.

        (The canvas test inlined: this loop is where the generator spends its time.)
        """
        canvas, moves, joint = self.canvas, self.first_moves if first else self.moves, parts[-RECENT:]
        owner, base, low, high = canvas.owner, canvas.base(node), canvas.low + margin, canvas.high - margin
        y, x = node
        fitting = []
        for h, weight in candidates:
            (dy, dx), footprint = moves[h]
            if low <= y + dy < high and low <= x + dx < high:
                for offset in footprint.guard_list:
                    seen = owner[base + offset]
                    if seen and seen not in joint:
                        break
                else:
                    fitting.append((h, weight))
        return fitting

    def heading(self, node, previous: int | None, parts: list[int], margin: int, excluded) -> int | None:
        """The next paddle's heading, or None when none fits.

        The first paddle's heading is uniform; a later one turns from ``previous`` by ``delta`` with weight
        ``cos(continuity delta)**2``, restricted to the turns that fit (upstream masks its turn distribution
        to free spots the same way) and not in ``excluded``. Up to ``QUICK_DRAWS`` unrestricted draws are
        tried first, keeping the first that fits (rejection sampling: the same distribution); only if none
        does are all turns checked.
        """
        rng, first = self.rng, previous is None
        for _ in range(QUICK_DRAWS):
            if first:
                h = rng.randrange(HEADINGS)
            else:
                k = bisect.bisect_right(self.cumulative, rng.random() * self.cumulative[-1])
                h = (previous + self.turns[min(k, len(self.turns) - 1)][0]) % HEADINGS
            if h not in excluded and self.open_headings(node, ((h, 1.0),), first, parts, margin):
                return h
        candidates = [(h, 1.0) for h in range(HEADINGS)] if first else [
            ((previous + turn) % HEADINGS, weight) for turn, weight in self.turns]
        fitting = self.open_headings(node, [c for c in candidates if c[0] not in excluded], first, parts, margin)
        if not fitting:
            return None
        pick = rng.random() * sum(w for _, w in fitting)
        for h, w in fitting:
            pick -= w
            if pick < 0:
                return h
        return fitting[-1][0]

    def grow(self, contour: _Contour, paddles: int, backtracks: int, end_margin: int = 0) -> bool:
        """Add ``paddles`` pieces to an empty ``contour`` from its start; False (and nothing added) when stuck.

        When no heading fits, the previous paddle is taken back and redrawn among its other headings (at
        most ``backtracks`` times), so contours turn away from walls and other contours instead of being
        redrawn from scratch. The last paddle must end ``end_margin`` pixels inside (room for a marker).
        """
        canvas, pieces, parts, keep = self.canvas, contour.pieces, contour.parts, len(contour.parts)
        node, previous, excluded = contour.start, None, set()
        history = []  # per placed paddle: its node, the previous heading and the headings ruled out there
        while len(pieces) < paddles:
            margin = end_margin if len(pieces) == paddles - 1 else 0
            h = self.heading(node, previous, parts, margin, excluded)
            if h is None:
                if not pieces or not backtracks:
                    canvas.release(parts, keep)
                    pieces.clear()
                    return False
                backtracks -= 1
                pieces.pop()
                canvas.release(parts, len(parts) - 1)
                node, previous, excluded = history.pop()
                continue
            end, footprint = (self.moves if pieces else self.first_moves)[h]
            canvas.place(node, footprint, parts)
            pieces.append((node, footprint))
            history.append((node, previous, excluded | {h}))
            node, previous, excluded = (node[0] + end[0], node[1] + end[1]), h, set()
        contour.end = node
        return True

    def target(self, contour: _Contour) -> bool:
        """Grow a target contour from its reserved start and reserve the marker site at its end."""
        for _ in range(CONTOUR_TRIES):
            if self.grow(contour, self.geo.contour_length, TARGET_BACKTRACKS, self.marker_room):
                if self.reserve_marker(contour.end, contour):
                    return True
                self.canvas.release(contour.parts, 1)  # keep the start's marker site
                contour.pieces.clear()
        return False

    def distractor(self) -> _Contour | None:
        """A distractor contour started at a random pixel with room around it, or None if none fits."""
        canvas, rng = self.canvas, self.rng
        for _ in range(CONTOUR_TRIES):
            for _pick in range(START_PICKS):
                start = (rng.randrange(canvas.low, canvas.high), rng.randrange(canvas.low, canvas.high))
                if canvas.roomy(start, self.clearance):
                    break
            else:
                return None
            contour = _Contour(start)
            if self.grow(contour, self.geo.distractor_length, 0):
                return contour
        return None


def _sketch_targets(geo: Geometry, rng: random.Random) -> tuple[_Sketch, tuple[_Contour, _Contour]]:
    """Two target contours whose starts are ``seed_distance`` apart, with marker sites reserved at all four ends.

    As upstream, the first start avoids a band of ``2 * seed_distance`` along the borders where the image
    leaves room for it, and both starts are placed before either contour grows. Fresh attempts until both fit.
    """
    band = min(round(2 * geo.seed_distance), geo.size // 2 - 1)
    for _ in range(IMAGE_TRIES):
        sketch = _Sketch(geo, rng.choice(geo.paddle_gaps), rng)
        low, high = max(sketch.canvas.low, band), min(sketch.canvas.high, geo.size - band)
        first = _Contour((rng.randrange(low, high), rng.randrange(low, high)))
        if not sketch.reserve_marker(first.start, first):
            continue
        for _try in range(CONTOUR_TRIES):
            angle = rng.uniform(-math.pi, math.pi)
            second = _Contour((first.start[0] + round(geo.seed_distance * math.sin(angle)),
                               first.start[1] + round(geo.seed_distance * math.cos(angle))))
            if sketch.reserve_marker(second.start, second):
                break
        else:
            continue
        if sketch.target(first) and sketch.target(second):
            return sketch, (first, second)
    raise TooCrowded(
        f"could not fit two contours of {geo.contour_length} paddles in {IMAGE_TRIES} tries at {geo.size}x{geo.size}: "
        f"the generator settings are too crowded for this resolution (shorten contour_length or paddle_length)."
    )


def render(spec: PathfinderSpec, index: int, label: int) -> Stimulus:
    """Image ``index`` of ``spec`` with the given label (deterministic in ``(spec.seed, index, label)``)."""
    geo = spec.geometry()
    rng = random.Random(f"pathfinder:{spec.seed}:{index}")
    sketch, targets = _sketch_targets(geo, rng)
    contours = [*targets, *filter(None, (sketch.distractor() for _ in range(geo.num_distractors)))]
    marked = rng.randrange(2)
    markers = (targets[marked].start, targets[marked if label else 1 - marked].end)

    canvas = sketch.canvas
    lum = np.zeros(canvas.width * canvas.width, dtype=np.float32)
    solid = np.zeros(canvas.width * canvas.width, dtype=bool)
    for contour in contours:
        for node, piece in contour.pieces:
            base = canvas.base(node)
            solid[base + piece.solid] = True
            lit = base + piece.lit
            lum[lit] = np.maximum(lum[lit], np.minimum(1.0, geo.contrast * piece.coverage))
    for node in markers:
        base = canvas.base(node)
        solid[base + sketch.disc.solid] = True
        lit = base + sketch.disc.lit
        lum[lit] = np.maximum(lum[lit], sketch.disc.coverage)
    crop = slice(canvas.border, canvas.border + geo.size)
    image = np.rint(lum.reshape(canvas.width, canvas.width)[crop, crop] * 255).astype(np.uint8)
    solid = solid.reshape(canvas.width, canvas.width)[crop, crop].copy()
    return Stimulus(image, solid, markers, int(label), sketch.gap)


# ---- PNG writing -----------------------------------------------------------------------------------------------
def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode_png(image: np.ndarray) -> bytes:
    """8-bit grayscale, non-interlaced PNG of ``image`` ``[H, W]`` uint8 (every row with filter 0)."""
    if image.dtype != np.uint8 or image.ndim != 2:
        raise ValueError(f"encode_png takes a 2-D uint8 array, got {image.dtype} {image.shape}")
    h, w = image.shape
    rows = np.concatenate([np.zeros((h, 1), np.uint8), image], axis=1)
    header = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    data = zlib.compress(rows.tobytes(), 6)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")


# ---- the release layout ---------------------------------------------------------------------------------------
def dataset_root(folder: str | Path, spec: PathfinderSpec) -> Path:
    """``<folder>/pathfinder<res>/<difficulty folder>``: where ``imgs/`` and ``metadata/`` go."""
    return Path(folder) / f"pathfinder{spec.resolution}" / spec.folder_name


def metadata_files(folder: str | Path, spec: PathfinderSpec) -> list[Path]:
    count = math.ceil(spec.num_images / spec.images_per_file)
    return [dataset_root(folder, spec) / "metadata" / f"{k}.npy" for k in range(count)]


def balanced_labels(spec: PathfinderSpec) -> np.ndarray:
    """Labels of all images: a seeded permutation with exactly ``num_images // 2`` ones."""
    labels = np.zeros(spec.num_images, dtype=np.int64)
    labels[np.random.default_rng([spec.seed, 1]).permutation(spec.num_images)[: spec.num_images // 2]] = 1
    return labels


def _write_file(job) -> int:
    """Images and the metadata file of folder ``k``; the metadata is written last, atomically."""
    spec, root, k, labels = job
    geo = spec.geometry()
    images = root / "imgs" / str(k)
    images.mkdir(parents=True, exist_ok=True)
    lines = []
    for j, label in enumerate(labels):
        stimulus = render(spec, k * spec.images_per_file + j, int(label))
        (images / f"sample_{j}.png").write_bytes(encode_png(stimulus.image))
        lines.append(f"imgs/{k} sample_{j}.png {j} {int(label)} {geo.continuity} {geo.contour_length} "
                     f"{geo.distractor_length} {geo.paddle_length} {geo.paddle_thickness} "
                     f"{stimulus.gap} 1\n")
    target = root / "metadata" / f"{k}.npy"
    partial = partial_name(target)
    partial.write_text("".join(lines))
    os.replace(partial, target)
    return len(lines)


def generate(spec: PathfinderSpec, folder: str | Path, workers: int | None = None, progress: bool = True) -> list[Path]:
    """Write ``spec``'s images and metadata in the release layout under ``folder``; returns the metadata files.

    Metadata files already present are kept (an interrupted run resumes); each is written under a name unique
    to its process and renamed into place, and temporaries left by killed runs are removed. ``workers``
    processes draw the files in parallel (default: all CPUs); the output does not depend on it.
    (``PathfinderDataModule`` also holds the folder's lock, so that one of several concurrent jobs generates.)
    """
    root = dataset_root(folder, spec)
    (root / "metadata").mkdir(parents=True, exist_ok=True)
    remove_stale_partials(root / "metadata")
    labels = balanced_labels(spec)
    targets = metadata_files(folder, spec)
    per = spec.images_per_file
    jobs = [(spec, root, k, labels[k * per : (k + 1) * per]) for k, path in enumerate(targets) if not path.is_file()]
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    with tqdm(total=sum(len(job[3]) for job in jobs), desc=f"generating Pathfinder-{spec.resolution}",
              unit="img", disable=not progress) as bar:
        if workers == 1:
            for job in jobs:
                bar.update(_write_file(job))
        else:
            with Pool(workers) as pool:
                for done in pool.imap_unordered(_write_file, jobs):
                    bar.update(done)
    return targets
