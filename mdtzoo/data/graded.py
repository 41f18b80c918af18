"""The graded relation score of the ``relations`` dataset: how far an image is from obeying its relation.

    from mdtzoo.data.oracle import RelationsOracle, graded_relation_score
    graded_relation_score(images, labels)            # {"overall": 0.41, "per_class": {"face": 0.55, ...}, "count": {...}}
    RelationsOracle().graded_scores(images, labels)  # (N,) float64 in [0, 1], one per image

The exact oracle (``oracle.py``) is all-or-nothing: one unreadable or wrong cell anywhere
fails the image, so weak models all score 0. This score is 1.0 exactly when the exact
oracle accepts the image and falls towards chance level as the image departs from its
class's relation. Each sub-score below lies in [0, 1] and is 1 when its part of the exact
rule holds; all of them are 1 only when the whole rule holds, so the score is 1 iff the
exact oracle says correct (tested on real, corrupted, near-miss and random images).

**Soft reading.** Cells are read as the exact oracle reads them (per-cell channel means,
sign per channel: the nearest palette colour; the same grid wherever ``quantise`` reads
the cell) but no cell is rejected. Each cell gets a confidence
``min(1, min over channels |mean| / margin)``: 1 for every cell the exact oracle can read,
below 1 for an unreadable one (a mid-grey cell: 0). Then

    score = readability * relation(grid)

readability: the mean cell confidence, 1 only when every cell is readable (so one
unreadable cell costs at most 1/256 here; a 0.2x-contrast image, unreadable everywhere, 0.8).

**relation(grid) per class.** Objects are 8-connected groups of non-black cells; a shape
is an object's mask cropped to its bounding box; "the k largest objects" are ordered by
cell count (ties in raster order). "Non-trivial" pairs leave out pairs of two background
cells, so a mostly black image is not "mostly symmetric".

- mirror: ``sym * content``. sym: among the left-right mirror cell pairs with at least
  one non-black cell, the fraction with equal colours (0 if there is none); content:
  ``min(1, non-black cells / 6)``.
- repeat: ``periodic * colours``. periodic: among the cell pairs 4 cells apart (rows and
  columns) with at least one cell not of the image's most common colour, the fraction with
  equal colours (1 if there is none); colours: ``min(1, cells not of the most common
  colour / 16)`` (a 4x4 tile of >= 2 colours puts >= 16 cells in its minority colours).
- count_k: ``objects * colour * (1 + shape) / 2``. objects: ``min(n, k) / k`` times the
  fraction of non-black cells that lie in the k largest objects (1 iff exactly k objects);
  colour: fraction of the k largest objects' cells that have their most common colour;
  shape: mean pairwise IoU of their shapes aligned at the top-left corner (1 for one object).
- colour_match: ``objects * colour * (1 + different) / 2`` with objects and colour as for
  k = 2; different: 1 when the two largest objects' shapes differ, else 0.
- evenly_spaced: ``objects * colour * (1 + shape + spacing) / 3`` as for k = 3; spacing:
  ``1 / (1 + e)``, e the L1 distance in cells between twice the top-left corner of one of
  the three largest objects and the sum of the other two corners, minimised over which
  one is the middle (0 with fewer than 3 objects).
- face: ``head * mean(border, features, parts, symmetry, eyes)``, in the bounding box of
  the largest object (the head box, h x w; its rounded rectangle is the box minus the 4
  corner cells; features are the rectangle's non-skin cells, feature objects their
  8-connected groups):
  head: IoU of the non-black cells (anywhere) with the rounded rectangle, times
  ``min(1, min(h, w) / 5)``; border: fraction of the rectangle's edge cells that have the
  edge's most common colour (the skin); features: the fraction of feature cells with their
  most common colour (0 if none); parts: mean of
  ``min(n, 3) / max(n, 3)`` for the n feature objects and three checks on the 3 largest
  (sorted by top row, then left column: two eyes, then the mouth) -- one eye wholly left
  and one wholly right of the head's axis, a one-row mouth, the mouth strictly below both
  eyes (each 0 with fewer than 3 features); symmetry: among the head box's mirror pairs
  with a non-skin cell, the fraction with equal colours (1 if none); eyes: the cells where
  one eye meets the mirror image (about the head's axis) of the other eye in the same
  colour, over the union of the two (eyes: the first two of the sorted 3 largest feature
  objects, or the two when there are two; 0 with fewer).

A NaN channel reads as the exact oracle reads it (off, readable).

Cost: the batch reading, mirror and repeat are vectorised; object classes label each
image with ``scipy.ndimage.label``: well over 1000 images/s at 16 and 32 px.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
from scipy import ndimage

from mdtzoo.data.grid import BACKGROUND, DEFAULT_MARGIN, GRID, as_signed_nchw, cell_size, quantise
from mdtzoo.data.oracle import CLASS_NAMES, MIN_MIRROR_CELLS, REPEAT_PERIOD, RULES, check_labels

MIN_HEAD = 5
_EIGHT = np.ones((3, 3), dtype=bool)
_BELOW_ONE = np.nextafter(1.0, 0.0)


# -- reading ----------------------------------------------------------------------------------
def soft_read(images, margin: float = DEFAULT_MARGIN) -> tuple[np.ndarray, np.ndarray]:
    """Images -> (grid (N, G, G) int8 nearest palette colours, confidence (N, G, G) float64 in [0, 1]).

    The grid equals ``quantise``'s wherever that reads a cell; confidence is 1 exactly there.
    """
    x = as_signed_nchw(images)
    n, _, h, w = x.shape
    if h != w:
        raise ValueError(f"relations images are square, got {h}x{w}")
    cell = cell_size(h)
    exact = quantise(x, margin)  # the exact oracle's reading, so "readable" agrees bit for bit
    means = x.reshape(n, 3, GRID, cell, GRID, cell).mean(axis=(3, 5))
    bits = (means > 0).astype(np.int8)
    nearest = bits[:, 0] * 4 + bits[:, 1] * 2 + bits[:, 2]
    grid = np.where(exact >= 0, exact, nearest).astype(np.int8)
    if margin > 0:
        ratio = np.nan_to_num(np.abs(means.astype(np.float64)).min(axis=1) / margin, nan=1.0, posinf=1.0)
        conf = np.where(exact >= 0, 1.0, np.clip(ratio, 0.0, _BELOW_ONE))
    else:
        conf = np.ones(grid.shape)
    return grid, conf


# -- vectorised classes -------------------------------------------------------------------------
def mirror_scores(grid: np.ndarray) -> np.ndarray:
    """(N, G, G) colour grids -> (N,) mirror relation scores (see the module docstring)."""
    half = GRID // 2
    left, right = grid[:, :, :half], grid[:, :, ::-1][:, :, :half]
    nontrivial = (left != BACKGROUND) | (right != BACKGROUND)
    den = nontrivial.sum(axis=(1, 2))
    num = ((left == right) & nontrivial).sum(axis=(1, 2))
    sym = np.where(den > 0, num / np.maximum(den, 1), 0.0)
    content = np.minimum(1.0, (grid != BACKGROUND).sum(axis=(1, 2)) / MIN_MIRROR_CELLS)
    return sym * content


def _colour_counts(grid: np.ndarray) -> np.ndarray:
    n = len(grid)
    flat = grid.reshape(n, -1).astype(np.int64) + 8 * np.arange(n)[:, None]
    return np.bincount(flat.ravel(), minlength=8 * n).reshape(n, 8)


def repeat_scores(grid: np.ndarray) -> np.ndarray:
    """(N, G, G) colour grids -> (N,) repeat relation scores (see the module docstring)."""
    p = REPEAT_PERIOD
    counts = _colour_counts(grid)
    major = counts.argmax(axis=1)[:, None, None]
    off = grid != major
    num = den = 0
    for later, earlier in ((np.s_[:, p:], np.s_[:, :-p]), (np.s_[:, :, p:], np.s_[:, :, :-p])):  # rows, columns
        nontrivial = off[later] | off[earlier]
        num = num + ((grid[later] == grid[earlier]) & nontrivial).sum(axis=(1, 2))
        den = den + nontrivial.sum(axis=(1, 2))
    periodic = np.where(den > 0, num / np.maximum(den, 1), 1.0)
    colours = np.minimum(1.0, (GRID * GRID - counts.max(axis=1)) / (p * p))
    return periodic * colours


# -- object classes (one image at a time) -------------------------------------------------------
class _Objects:
    """The 8-connected objects of a boolean mask with their colours in ``grid``; ``top(k)``: the k largest."""

    def __init__(self, grid: np.ndarray, mask: np.ndarray):
        self.grid = grid
        self.labels, self.n = ndimage.label(mask, structure=_EIGHT)
        self.sizes = np.bincount(self.labels.ravel(), minlength=self.n + 1)[1:]

    def top(self, k: int) -> np.ndarray:
        """Label ids of the (up to) k largest objects, largest first, ties in raster order."""
        return np.argsort(-self.sizes, kind="stable")[:k] + 1

    def cells(self, ident: int) -> np.ndarray:
        return np.argwhere(self.labels == ident)

    def mass(self, ids: np.ndarray) -> float:
        total = self.sizes.sum()
        return float(self.sizes[ids - 1].sum() / total) if total else 0.0

    def colour_agreement(self, ids: np.ndarray) -> float:
        colours = self.grid[np.isin(self.labels, ids)]
        return float(np.bincount(colours, minlength=8).max() / len(colours)) if len(colours) else 0.0


def _shape_masks(parts: list[np.ndarray]) -> np.ndarray:
    """Cells of each object -> (m, G*G) masks of its shape placed at the top-left corner."""
    masks = np.zeros((len(parts), GRID, GRID), dtype=bool)
    for i, cells in enumerate(parts):
        rel = cells - cells.min(axis=0)
        masks[i, rel[:, 0], rel[:, 1]] = True
    return masks.reshape(len(parts), -1)


def _mean_pairwise_iou(masks: np.ndarray) -> float:
    m = len(masks)
    if m < 2:
        return 1.0
    f = masks.astype(np.float64)
    inter = f @ f.T
    area = f.sum(axis=1)
    iou = inter / (area[:, None] + area[None, :] - inter)
    return float(iou[np.triu_indices(m, 1)].mean())


def _object_terms(grid: np.ndarray, k: int) -> tuple[float, float, float, list[np.ndarray], np.ndarray]:
    """(objects, colour, shape, cells of the k largest, their shape masks) of a grid, k expected objects."""
    objs = _Objects(grid, grid != BACKGROUND)
    if objs.n == 0:
        return 0.0, 0.0, 0.0, [], np.zeros((0, GRID * GRID), dtype=bool)
    ids = objs.top(k)
    objects = min(objs.n, k) / k * objs.mass(ids)
    parts = [objs.cells(i) for i in ids]
    masks = _shape_masks(parts)
    return objects, objs.colour_agreement(ids), _mean_pairwise_iou(masks), parts, masks


def count_score(k: int) -> Callable[[np.ndarray], float]:
    def score(grid: np.ndarray) -> float:
        objects, colour, shape, _, _ = _object_terms(grid, k)
        return objects * colour * (1 + shape) / 2

    score.__name__ = f"count_{k}_score"
    return score


def colour_match_score(grid: np.ndarray) -> float:
    objects, colour, _, parts, masks = _object_terms(grid, 2)
    different = float(len(parts) == 2 and not np.array_equal(masks[0], masks[1]))
    return objects * colour * (1 + different) / 2


def evenly_spaced_score(grid: np.ndarray) -> float:
    objects, colour, shape, parts, _ = _object_terms(grid, 3)
    spacing = 0.0
    if len(parts) == 3:
        corners = np.array([c.min(axis=0) for c in parts])
        total = corners.sum(axis=0)
        err = min(np.abs(2 * corners[m] - (total - corners[m])).sum() for m in range(3))
        spacing = 1.0 / (1.0 + float(err))
    return objects * colour * (1 + shape + spacing) / 3


def face_score(grid: np.ndarray) -> float:
    objs = _Objects(grid, grid != BACKGROUND)
    if objs.n == 0:
        return 0.0
    cells = objs.cells(objs.top(1)[0])
    (top, left), (bottom, right) = cells.min(axis=0), cells.max(axis=0)
    h, w = bottom - top + 1, right - left + 1
    silhouette = np.zeros((GRID, GRID), dtype=bool)
    silhouette[top : bottom + 1, left : right + 1] = True
    silhouette[[top, top, bottom, bottom], [left, right, left, right]] = False
    nonblack = grid != BACKGROUND
    union = (nonblack | silhouette).sum()
    head_term = (nonblack & silhouette).sum() / union * min(1.0, min(h, w) / MIN_HEAD)

    head, inside = grid[top : bottom + 1, left : right + 1], silhouette[top : bottom + 1, left : right + 1]
    edge = np.zeros((h, w), dtype=bool)
    edge[[0, -1]], edge[:, [0, -1]] = True, True
    border = head[edge & inside]
    if len(border) == 0:
        return 0.0
    border_counts = np.bincount(border, minlength=8)
    skin = int(border_counts.argmax())
    border_term = border_counts[skin] / len(border)

    features = inside & (head != skin)
    feature_colours = head[features]
    feature_term = np.bincount(feature_colours, minlength=8).max() / len(feature_colours) if len(feature_colours) else 0.0

    parts_obj = _Objects(head, features)
    n = parts_obj.n
    count_term = min(n, 3) / max(n, 3) if n else 0.0
    checks = [0.0, 0.0, 0.0]
    eyes: list[np.ndarray] = []
    if n >= 3:
        parts = sorted((parts_obj.cells(i) for i in parts_obj.top(3)), key=lambda c: (c[:, 0].min(), c[:, 1].min()))
        *eyes, mouth = parts
        axis = (w - 1) / 2
        checks = [
            float(any(e[:, 1].max() < axis for e in eyes) and any(e[:, 1].min() > axis for e in eyes)),
            float(mouth[:, 0].min() == mouth[:, 0].max()),
            float(mouth[:, 0].min() > max(e[:, 0].max() for e in eyes)),
        ]
    elif n == 2:
        eyes = [parts_obj.cells(i) for i in parts_obj.top(2)]
    parts_term = (count_term + sum(checks)) / 4

    mirrored = head[:, ::-1]
    nontrivial = (head != skin) | (mirrored != skin)
    sym_den = nontrivial.sum()
    symmetry_term = ((head == mirrored) & nontrivial).sum() / sym_den if sym_den else 1.0

    eyes_term = 0.0
    if len(eyes) == 2:
        a, b = (np.zeros((h, w), dtype=bool) for _ in range(2))
        a[eyes[0][:, 0], eyes[0][:, 1]] = True
        b[eyes[1][:, 0], eyes[1][:, 1]] = True
        b = b[:, ::-1]  # the second eye's mirror image, at its mirrored place
        eyes_term = ((a & b) & (head == mirrored)).sum() / (a | b).sum()

    return float(head_term * (border_term + feature_term + parts_term + symmetry_term + eyes_term) / 5)


GRID_SCORES: dict[str, Callable[[np.ndarray], float]] = {
    "face": face_score,
    "count_2": count_score(2),
    "count_3": count_score(3),
    "count_4": count_score(4),
    "colour_match": colour_match_score,
    "evenly_spaced": evenly_spaced_score,
}
BATCH_SCORES: dict[str, Callable[[np.ndarray], np.ndarray]] = {"mirror": mirror_scores, "repeat": repeat_scores}
assert set(GRID_SCORES) | set(BATCH_SCORES) == set(RULES), "every relations class needs a graded score"


def relation_scores(grid: np.ndarray, names: Sequence[str]) -> np.ndarray:
    """(N, G, G) colour grids and their class names -> (N,) relation scores (no readability factor)."""
    names = np.asarray(names, dtype=object)
    out = np.zeros(len(grid), dtype=np.float64)
    for name in set(names.tolist()):
        sel = np.flatnonzero(names == name)
        if name in BATCH_SCORES:
            out[sel] = BATCH_SCORES[name](grid[sel])
        else:
            fn = GRID_SCORES[name]
            out[sel] = [fn(grid[i]) for i in sel]
    return out


def graded_scores(images, labels, classes: Sequence[str] = CLASS_NAMES, margin: float = DEFAULT_MARGIN) -> np.ndarray:
    """(N,) float64 scores in [0, 1]: 1.0 exactly when the exact oracle accepts the image."""
    grid, conf = soft_read(images, margin)
    _, names = check_labels(labels, len(grid), classes)
    # 1 exactly when every cell is readable, below 1 otherwise (whatever the rounding of the mean).
    all_readable = (conf == 1.0).all(axis=(1, 2))
    readability = np.where(all_readable, 1.0, np.minimum(conf.mean(axis=(1, 2)), _BELOW_ONE))
    return np.clip(readability * relation_scores(grid, names), 0.0, 1.0)


def graded_summary(scores: np.ndarray, names: Sequence[str], classes: Sequence[str] = CLASS_NAMES) -> dict:
    """{"overall": mean score, "per_class": {name: mean score}, "count": {name: samples}} (classes present only)."""
    scores, names = np.asarray(scores, dtype=np.float64), np.asarray(names, dtype=object)
    per_class, count = {}, {}
    for name in (c for c in classes if c in set(names.tolist())):
        sel = names == name
        per_class[name], count[name] = float(scores[sel].mean()), int(sel.sum())
    return {"overall": float(scores.mean()) if len(scores) else float("nan"), "per_class": per_class, "count": count}

