"""The exact oracle of the ``relations`` dataset: does an image obey its class's relation?

    oracle_accuracy(images, labels)  # -> {"overall": 0.93, "per_class": {"face": 0.81, ...}, "count": {...}}
    RelationsOracle().score(images, labels)  # per-sample columns: pd.DataFrame(...) works

images: uint8 (N, H, W, 3) or float (N, 3, H, W) in [-1, 1], H = W a multiple of 16.
An image is first read back to its 16x16 grid of palette colours (``grid.quantise``:
per-cell channel means, sign per channel, cells within ``margin`` of mid grey are
unreadable). Every rule below then checks the grid exactly; one unreadable cell
anywhere fails the sample (a generated image must be clean to count).

Rules (objects are 8-connected groups of non-black cells; "shape" is an object's cell
mask cropped to its bounding box, so equal shapes differ only by translation):
- face: the non-black cells form one head: a rectangle (>= 5x5) minus its 4 corner cells,
  with a border of one colour H; inside it, cells of one other colour F form exactly three
  objects: two eyes, one each side of the head's axis, and, strictly below both, a one-row
  mouth; and the head is mirror symmetric about its vertical axis (so the eyes are mirror
  images at mirrored places, same colour, and the mouth is centred).
- count_k: exactly k objects, each of one colour, all the same colour and shape.
- colour_match: exactly 2 objects, each of one colour, the same colour, different shapes.
- mirror: the image equals its left-right mirror image and has >= 6 non-black cells.
- repeat: >= 2 colours and the image is periodic with period 4 cells in both directions
  (it is its top-left 4x4 tile repeated 4x4 times; tiles of 1 or 2 cells are included).
- evenly_spaced: exactly 3 objects of one colour and one shape, one of them exactly
  midway between the other two (collinear, equal spacing).

Graded score (``graded.py``; ``RelationsOracle.graded / graded_scores``,
``graded_relation_score``): a per-sample score in [0, 1], 1.0 exactly when the rule above
accepts the image, lower the further the image is from its relation (~0.03-0.1 on noise).
Cells are read softly (nearest palette colour, no rejection; confidence
``min(1, min_channel |mean| / margin)``) and ``score = readability * relation(grid)``,
readability = mean cell confidence (1 iff every cell is readable). relation(grid)
("non-trivial" pairs leave out two background cells; sub-scores are fractions in [0, 1]):
- mirror: equal fraction of the non-trivial left-right mirror pairs * min(1, non-black / 6).
- repeat: equal fraction of the non-trivial pairs 4 cells apart (rows and columns; background
  = the most common colour) * min(1, cells not of the most common colour / 16).
- count_k: objects * colour * (1 + shape) / 2; objects = min(n, k) / k * share of non-black
  cells in the k largest objects; colour = share of their cells in their most common colour;
  shape = mean pairwise IoU of their top-left-aligned shapes.
- colour_match: objects * colour * (1 + different) / 2 (k = 2; different: shapes differ, 0/1).
- evenly_spaced: objects * colour * (1 + shape + spacing) / 3 (k = 3); spacing = 1 / (1 + e),
  e = min over the middle one m of |2 corner_m - corner_a - corner_b| (L1, top-left corners).
- face: head * mean(border, features, parts, symmetry, eyes) in the largest object's box:
  head = IoU(non-black, rounded rectangle) * min(1, min(h, w) / 5); border = share of the
  edge in its commonest colour (skin); features = share of non-skin cells in their commonest
  colour; parts = mean(min(n, 3) / max(n, 3), eyes either side, one-row mouth, mouth below);
  symmetry = equal share of mirror pairs with a non-skin cell; eyes = IoU of one eye with the
  other's mirror image (same colour). graded.py's docstring has each term in full.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from mdtzoo.data.grid import BACKGROUND, DEFAULT_MARGIN, components, crop, quantise

MIN_MIRROR_CELLS = 6
REPEAT_PERIOD = 4


def _objects(grid: np.ndarray) -> list[np.ndarray]:
    return components(grid != BACKGROUND)


def _same_colour_objects(grid: np.ndarray, objects: list[np.ndarray]) -> str:
    """'' when every object is one colour and all share it, else the reason."""
    colours = []
    for i, cells in enumerate(objects):
        cs = np.unique(grid[cells[:, 0], cells[:, 1]])
        if len(cs) != 1:
            return f"object {i} has {len(cs)} colours"
        colours.append(int(cs[0]))
    if len(set(colours)) != 1:
        return f"objects have different colours {colours}"
    return ""


def check_face(grid: np.ndarray) -> str:
    ys, xs = np.nonzero(grid != BACKGROUND)
    if len(ys) == 0:
        return "empty image"
    head = grid[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    h, w = head.shape
    if h < 5 or w < 5:
        return f"head {h}x{w} is smaller than 5x5"
    silhouette = np.ones((h, w), dtype=bool)
    silhouette[[0, 0, -1, -1], [0, -1, 0, -1]] = False
    if not np.array_equal(head != BACKGROUND, silhouette):
        return "non-black cells are not one rounded rectangle (head)"
    border = np.concatenate([head[0, 1:-1], head[-1, 1:-1], head[1:-1, 0], head[1:-1, -1]])
    if len(np.unique(border)) != 1:
        return "head border has more than one colour"
    skin = border[0]
    features = head != skin
    features[[0, 0, -1, -1], [0, -1, 0, -1]] = False
    feature_colours = np.unique(head[features])
    if len(feature_colours) != 1:
        return f"face features have {len(feature_colours)} colours, expected 1"
    parts = sorted(components(features), key=lambda c: (c[:, 0].min(), c[:, 1].min()))
    if len(parts) != 3:
        return f"{len(parts)} face features, expected 2 eyes and a mouth"
    *eyes, mouth = parts
    axis = (w - 1) / 2
    if not any(e[:, 1].max() < axis for e in eyes) or not any(e[:, 1].min() > axis for e in eyes):
        return "the eyes are not one left and one right of the face's axis"
    if mouth[:, 0].min() != mouth[:, 0].max():
        return "mouth is not a single row"
    if mouth[:, 0].min() <= max(e[:, 0].max() for e in eyes):
        return "mouth is not below both eyes"
    if not np.array_equal(head, head[:, ::-1]):
        return "face is not mirror symmetric (eyes differ in shape, colour or place, or mouth off-centre)"
    return ""


def check_count(k: int) -> Callable[[np.ndarray], str]:
    def check(grid: np.ndarray) -> str:
        objects = _objects(grid)
        if len(objects) != k:
            return f"{len(objects)} objects, expected {k}"
        reason = _same_colour_objects(grid, objects)
        if reason:
            return reason
        shapes = [crop(c)[1] for c in objects]
        if any(not np.array_equal(shapes[0], s) for s in shapes[1:]):
            return "objects have different shapes"
        return ""

    check.__name__ = f"check_count_{k}"
    return check


def check_colour_match(grid: np.ndarray) -> str:
    objects = _objects(grid)
    if len(objects) != 2:
        return f"{len(objects)} objects, expected 2"
    reason = _same_colour_objects(grid, objects)
    if reason:
        return reason
    a, b = (crop(c)[1] for c in objects)
    if np.array_equal(a, b):
        return "the two objects have the same shape (expected different shapes)"
    return ""


def check_mirror(grid: np.ndarray) -> str:
    if (grid != BACKGROUND).sum() < MIN_MIRROR_CELLS:
        return f"fewer than {MIN_MIRROR_CELLS} non-black cells"
    if not np.array_equal(grid, grid[:, ::-1]):
        return f"{int((grid != grid[:, ::-1]).sum()) // 2} cells differ from their mirror cell"
    return ""


def check_repeat(grid: np.ndarray) -> str:
    if len(np.unique(grid)) < 2:
        return "a single colour (no tile)"
    p = REPEAT_PERIOD
    if not (np.array_equal(grid[p:], grid[:-p]) and np.array_equal(grid[:, p:], grid[:, :-p])):
        return f"not a {p}x{p}-cell tile repeated"
    return ""


def check_evenly_spaced(grid: np.ndarray) -> str:
    reason = check_count(3)(grid)
    if reason:
        return reason
    corners = np.array([crop(c)[0] for c in _objects(grid)])  # (3, 2) top-left (row, col)
    for m in range(3):
        a, b = (i for i in range(3) if i != m)
        if np.array_equal(2 * corners[m], corners[a] + corners[b]):
            return ""
    return "no object is midway between the other two"


# The class list of the relations dataset, in label order (relations.py draws each).
RULES: dict[str, Callable[[np.ndarray], str]] = {
    "face": check_face,
    "count_2": check_count(2),
    "count_3": check_count(3),
    "count_4": check_count(4),
    "colour_match": check_colour_match,
    "mirror": check_mirror,
    "repeat": check_repeat,
    "evenly_spaced": check_evenly_spaced,
}
CLASS_NAMES: tuple[str, ...] = tuple(RULES)


def check_grid(grid: np.ndarray, class_name: str) -> str:
    """'' when the (G, G) colour grid obeys ``class_name``'s rule, else the reason it does not."""
    if (grid < 0).any():
        return f"{int((grid < 0).sum())} unreadable cells (colour too close to mid grey)"
    return RULES[class_name](grid)


class RelationsOracle:
    """Scores images against the relation of their label.  ``classes``: label -> class name."""

    def __init__(self, classes: Sequence[str] = CLASS_NAMES, margin: float = DEFAULT_MARGIN):
        unknown = [c for c in classes if c not in RULES]
        if unknown:
            raise ValueError(f"unknown relations classes {unknown}; known: {', '.join(RULES)}")
        self.classes = tuple(classes)
        self.margin = float(margin)

    def score(self, images, labels) -> dict[str, list | np.ndarray]:
        """Per-sample columns: correct (N,) bool, label (N,) int64, class_name, reason ('' if correct)."""
        grids = quantise(images, self.margin)
        labels, names = check_labels(labels, len(grids), self.classes)
        reasons = [check_grid(g, c) for g, c in zip(grids, names)]
        return {
            "correct": np.array([r == "" for r in reasons], dtype=bool),
            "label": labels,
            "class_name": names,
            "reason": reasons,
        }

    def accuracy(self, images, labels) -> dict:
        """{"overall": fraction correct, "per_class": {name: fraction}, "count": {name: samples}}."""
        return summarise(self.score(images, labels), self.classes)

    __call__ = accuracy

    def graded_scores(self, images, labels) -> np.ndarray:
        """(N,) float64 graded relation scores in [0, 1]; 1.0 exactly where ``score`` says correct (graded.py)."""
        from mdtzoo.data.graded import graded_scores

        return graded_scores(images, labels, self.classes, self.margin)

    def graded(self, images, labels) -> dict:
        """{"overall": mean graded score, "per_class": {name: mean}, "count": {name: samples}}."""
        from mdtzoo.data.graded import graded_summary

        scores = self.graded_scores(images, labels)
        _, names = check_labels(labels, len(scores), self.classes)
        return graded_summary(scores, names, self.classes)


def check_labels(labels, n: int, classes: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """``n`` labels (numpy, torch or a list) -> (int64 (n,), class names); ValueError on a bad count or label."""
    labels = np.asarray(labels.cpu() if hasattr(labels, "cpu") else labels, dtype=np.int64).reshape(-1)
    if len(labels) != n:
        raise ValueError(f"got {n} images but {len(labels)} labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= len(classes)):
        raise ValueError(f"labels must be in 0..{len(classes) - 1} ({', '.join(classes)})")
    return labels, [classes[y] for y in labels]


def summarise(scores: dict, classes: Sequence[str] = CLASS_NAMES) -> dict:
    """Overall and per-class accuracy of ``RelationsOracle.score``'s columns (classes present only)."""
    correct, names = scores["correct"], np.array(scores["class_name"], dtype=object)
    per_class, count = {}, {}
    for name in (c for c in classes if c in set(scores["class_name"])):
        sel = names == name
        per_class[name], count[name] = float(correct[sel].mean()), int(sel.sum())
    return {"overall": float(correct.mean()) if len(correct) else float("nan"), "per_class": per_class, "count": count}


def oracle_accuracy(images, labels, classes: Sequence[str] = CLASS_NAMES, margin: float = DEFAULT_MARGIN) -> dict:
    """Relation accuracy of ``images`` given their ``labels``: dict(overall=..., per_class={...}, count={...})."""
    return RelationsOracle(classes, margin).accuracy(images, labels)


def graded_relation_score(images, labels, classes: Sequence[str] = CLASS_NAMES, margin: float = DEFAULT_MARGIN) -> dict:
    """Mean graded relation score (graded.py) of ``images`` given their ``labels``: dict(overall, per_class, count)."""
    return RelationsOracle(classes, margin).graded(images, labels)
