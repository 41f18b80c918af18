"""``relations``: procedural class-conditional images whose parts must agree with each other.

The MDT paper's motivating claim (Sec. 1, Fig. 2) is that DiT learns an object's parts
independently (a face's two eyes) while MDT learns their relations. Each class here is a
relation between parts whose appearance is drawn per sample, so a model must copy
information across the image, not memorise it; ``oracle.py`` checks the relation exactly.

    ds = DATASETS.build("relations", split="train", image_size=32)
    x, y = ds[0]                          # x (3, 32, 32) float32 in {-1, 1}, y () int64
    ds.oracle.accuracy(samples, labels)   # {"overall": ..., "per_class": {...}}

Images live on a 16x16 cell grid (grid.py): 2 px cells at image_size 32, 1 px at 16;
every class draws at both sizes. Sample i has label i % num_classes; its content is a
function of (seed, i) (train) or of (SPLIT_SEED, i) (heldout: fixed across runs), and
train content never equals a heldout image or its mirror image (redrawn if it does).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from mdtzoo.data.common import SPLIT_SEED, SeededDataset, check_split, label_tensor
from mdtzoo.data.grid import COLOURS, GRID, SHAPES, free_for, render, scale_shape, stamp
from mdtzoo.data.oracle import CLASS_NAMES, RelationsOracle, oracle_accuracy  # noqa: F401  (public API)
from mdtzoo.registry import DATASETS

_CONTENT_STREAM = {"train": 0, "heldout": 1}
_FLIP_STREAM = 0


def _colours(rng: np.random.Generator, k: int) -> list[int]:
    return [int(c) for c in rng.choice(COLOURS, size=k, replace=False)]


def _shape(rng: np.random.Generator) -> np.ndarray:
    return SHAPES[rng.integers(len(SHAPES))]


def _place(rng: np.random.Generator, grid: np.ndarray, shape: np.ndarray, colour: int, tries: int = 200) -> bool:
    """Stamp ``shape`` at a random place keeping a one-cell gap to what is drawn; False if none found."""
    h, w = shape.shape
    for _ in range(tries):
        top, left = int(rng.integers(0, GRID - h + 1)), int(rng.integers(0, GRID - w + 1))
        if free_for(grid != 0, shape, top, left):
            stamp(grid, shape, top, left, colour)
            return True
    return False


def draw_face(rng: np.random.Generator) -> np.ndarray:
    """A head (rounded rectangle) with two mirror-image eyes and a centred mouth."""
    grid = np.zeros((GRID, GRID), dtype=np.int8)
    h, w = int(rng.integers(9, 14)), int(rng.integers(10, 15))
    top, left = int(rng.integers(0, GRID - h + 1)), int(rng.integers(0, GRID - w + 1))
    skin, feature = _colours(rng, 2)
    eye = _shape(rng)
    eh, ew = eye.shape
    # Eyes start >= 1 cell inside the head and keep >= 2 cells between them.
    inset = int(rng.integers(1, (w - 2 - 2 * ew) // 2 + 1))
    eye_row = int(rng.integers(1, min(h - 3 - eh, (h - eh) // 2) + 1))
    mouth_row = int(rng.integers(eye_row + eh + 1, h - 1))
    mouth_w = int(rng.choice(np.arange(2 + w % 2, w - 3, 2)))  # same parity as w: centred exactly
    head = grid[top : top + h, left : left + w]
    head[:] = skin
    head[[0, 0, -1, -1], [0, -1, 0, -1]] = 0
    stamp(head, eye, eye_row, inset, feature)
    stamp(head, eye[:, ::-1], eye_row, w - inset - ew, feature)
    head[mouth_row, (w - mouth_w) // 2 : (w + mouth_w) // 2] = feature
    return grid


def draw_count(k: int) -> Callable[[np.random.Generator], np.ndarray]:
    """k identical objects (one random shape and colour) at random, non-touching places."""

    def draw(rng: np.random.Generator) -> np.ndarray:
        while True:
            grid = np.zeros((GRID, GRID), dtype=np.int8)
            shape = _shape(rng)
            if k <= 2 and rng.random() < 0.5:
                shape = scale_shape(shape, 2)
            colour = _colours(rng, 1)[0]
            if all(_place(rng, grid, shape, colour) for _ in range(k)):
                return grid

    return draw


def draw_colour_match(rng: np.random.Generator) -> np.ndarray:
    """Two objects of different shapes sharing one random colour."""
    while True:
        grid = np.zeros((GRID, GRID), dtype=np.int8)
        a, b = rng.choice(len(SHAPES), size=2, replace=False)
        colour = _colours(rng, 1)[0]
        shapes = [scale_shape(SHAPES[i], 2) if rng.random() < 0.5 else SHAPES[i] for i in (a, b)]
        if all(_place(rng, grid, s, colour) for s in shapes):
            return grid


def draw_mirror(rng: np.random.Generator) -> np.ndarray:
    """2-4 random rectangles on the left half, mirrored onto the right half."""
    half = GRID // 2
    while True:
        left = np.zeros((GRID, half), dtype=np.int8)
        for _ in range(int(rng.integers(2, 5))):
            h, w = int(rng.integers(1, 7)), int(rng.integers(1, 5))
            top, x = int(rng.integers(0, GRID - h + 1)), int(rng.integers(0, half - w + 1))
            left[top : top + h, x : x + w] = _colours(rng, 1)[0]
        if (left != 0).sum() >= 3:  # >= 6 cells once mirrored (the oracle's minimum)
            return np.concatenate([left, left[:, ::-1]], axis=1)


def draw_repeat(rng: np.random.Generator) -> np.ndarray:
    """A random tile (1, 2 or 4 cells a side; 2-3 colours, black allowed) repeated over the image."""
    while True:
        th, tw = (int(v) for v in rng.choice([1, 2, 4], size=2))
        palette = rng.choice(8, size=int(rng.integers(2, 4)), replace=False)
        tile = rng.choice(palette, size=(th, tw)).astype(np.int8)
        if len(np.unique(tile)) >= 2:
            return np.tile(tile, (GRID // th, GRID // tw))


def draw_evenly_spaced(rng: np.random.Generator) -> np.ndarray:
    """Three identical objects on a line at equal spacing (the third is implied by the first two)."""
    shape = _shape(rng)
    sh, sw = shape.shape
    colour = _colours(rng, 1)[0]
    while True:
        dy, dx = (int(v) for v in rng.integers(-7, 8, size=2))
        if abs(dy) <= sh and abs(dx) <= sw:  # neighbours would touch
            continue
        rows = (max(0, -2 * dy), GRID - sh - max(0, 2 * dy))
        cols = (max(0, -2 * dx), GRID - sw - max(0, 2 * dx))
        if rows[0] > rows[1] or cols[0] > cols[1]:
            continue
        top, left = int(rng.integers(rows[0], rows[1] + 1)), int(rng.integers(cols[0], cols[1] + 1))
        grid = np.zeros((GRID, GRID), dtype=np.int8)
        for j in range(3):
            stamp(grid, shape, top + j * dy, left + j * dx, colour)
        return grid


DRAWERS: dict[str, Callable[[np.random.Generator], np.ndarray]] = {
    "face": draw_face,
    "count_2": draw_count(2),
    "count_3": draw_count(3),
    "count_4": draw_count(4),
    "colour_match": draw_colour_match,
    "mirror": draw_mirror,
    "repeat": draw_repeat,
    "evenly_spaced": draw_evenly_spaced,
}
assert tuple(DRAWERS) == CLASS_NAMES, "every relations class needs a drawer and an oracle rule"


class RelationsDataset(SeededDataset):
    """Procedural relations images; see the module docstring.  x: (3, S, S) in {-1, 1}, y: () int64."""

    name = "relations"
    channels = 3

    def __init__(self, split="train", image_size=32, length=50_000, heldout_size=512, seed=0, flip=False, classes=CLASS_NAMES):
        super().__init__(seed, check_split(split))
        unknown = [c for c in classes if c not in DRAWERS]
        if unknown or not classes:
            raise ValueError(f"relations classes must be a non-empty subset of {', '.join(DRAWERS)}; got unknown {unknown}")
        render(np.zeros((GRID, GRID), dtype=np.int8), image_size)  # validates the size
        self.image_size, self.flip, self.classes = int(image_size), bool(flip), tuple(classes)
        self.num_classes = len(self.classes)
        self.length = int(length) if split == "train" else int(heldout_size)
        self.heldout_size = int(heldout_size)
        self.labels = np.arange(self.length, dtype=np.int64) % self.num_classes
        self.oracle = RelationsOracle(self.classes)
        # Train content is redrawn when it equals a heldout image or its mirror image.
        self._heldout_keys = self._keys_of_heldout() if split == "train" else frozenset()

    def _draw(self, split: str, index: int, attempt: int = 0) -> np.ndarray:
        content_seed = self.seed if split == "train" else SPLIT_SEED
        rng = np.random.default_rng(np.random.SeedSequence([content_seed, _CONTENT_STREAM[split], index, attempt]))
        return DRAWERS[self.classes[index % self.num_classes]](rng)

    def _keys_of_heldout(self) -> frozenset:
        keys = set()
        for i in range(self.heldout_size):
            g = self._draw("heldout", i)
            keys.update((g.tobytes(), np.ascontiguousarray(g[:, ::-1]).tobytes()))
        return frozenset(keys)

    def grid(self, index: int) -> np.ndarray:
        """The symbolic content of item ``index``: (16, 16) int8 palette indices, before any flip."""
        index = self._check_index(index)
        for attempt in range(1000):
            g = self._draw(self.split, index, attempt)
            if g.tobytes() not in self._heldout_keys:
                return g
        raise RuntimeError(f"relations item {index} collides with the heldout set 1000 times")

    def __len__(self) -> int:
        return self.length

    def _item(self, index: int, epoch: int):
        g = self.grid(index)
        if self.flip and self.rng(index, epoch, _FLIP_STREAM).random() < 0.5:
            g = g[:, ::-1]
        return torch.from_numpy(render(g, self.image_size)), label_tensor(self.labels[index])


@DATASETS.register("relations")
def relations(
    split: str = "train",
    image_size: int = 32,
    length: int = 50_000,
    heldout_size: int = 512,
    seed: int = 0,
    flip: bool = False,
    classes: Sequence[str] = CLASS_NAMES,
) -> RelationsDataset:
    """Procedural images of related parts (faces, counts, mirrors, tiles); exact oracle in .oracle.

    image_size: a multiple of 16 (16 and 32 tested). length: train items; heldout_size:
    heldout items (fixed across seeds, never equal to a train image). seed: train content
    (and flips). flip: random horizontal flips per epoch (every relation is flip-invariant).
    classes: a subset of CLASS_NAMES, labels in the given order.
    """
    return RelationsDataset(split, image_size, length, heldout_size, seed, flip, tuple(classes))
