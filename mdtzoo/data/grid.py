"""The symbolic canvas behind the ``relations`` dataset: a 16x16 grid of palette colours.

Every relations image is a GRID x GRID array of colour indices, each cell drawn as a
square of ``image_size // GRID`` pixels (2 px at 32, 1 px at 16). The palette is the
8 corners of the RGB cube, so a colour index is 3 bits (r, g, b) and a pixel channel
is exactly -1 or +1. Reading an image back (``quantise``) is therefore a per-channel
sign of each cell's mean: it tolerates large pixel noise and makes the oracle exact.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import torch

GRID = 16
BACKGROUND = 0  # black
COLOURS = tuple(range(1, 8))  # the 7 foreground colours
COLOUR_NAMES = ("black", "blue", "green", "cyan", "red", "magenta", "yellow", "white")
# (8, 3) channel signs of each palette index: bit 2 = red, bit 1 = green, bit 0 = blue.
PALETTE = np.array([[(c >> 2) & 1, (c >> 1) & 1, c & 1] for c in range(8)], dtype=np.float32) * 2 - 1
# A cell whose channel mean is closer than this to 0 (mid grey) is unreadable.
DEFAULT_MARGIN = 0.25


def _pattern(text: str) -> np.ndarray:
    return np.array([[ch == "#" for ch in row] for row in text.split("/")], dtype=bool)


# Small 8-connected shapes (at most 3x3 cells), pairwise different up to translation.
# Several are not mirror-symmetric (L, J, Z, S, step), so "mirror" and "copy" differ.
SHAPES = tuple(
    _pattern(t)
    for t in (
        "###/###/###",  # square
        "##/##",  # small square
        ".#./###/.#.",  # plus
        "#.#/.#./#.#",  # cross
        "###/#.#/###",  # ring
        ".#./#.#/.#.",  # diamond
        "###/.#./.#.",  # T
        "#../#../###",  # L
        "..#/..#/###",  # J
        "##./.##",  # Z
        ".##/##.",  # S
        "#../##./.##",  # step
        "###",  # bar
        "#/#/#",  # column
    )
)


def render(grid: np.ndarray, image_size: int) -> np.ndarray:
    """Colour indices (G, G) -> float32 image (3, S, S) in {-1, +1}."""
    cell = cell_size(image_size)
    rgb = PALETTE[grid].transpose(2, 0, 1)  # (3, G, G)
    return np.ascontiguousarray(rgb.repeat(cell, axis=1).repeat(cell, axis=2))


def cell_size(image_size: int) -> int:
    if image_size % GRID or image_size < GRID:
        raise ValueError(f"relations images are a {GRID}x{GRID} grid: image_size must be a multiple of {GRID}, got {image_size}")
    return image_size // GRID


def as_signed_nchw(images) -> np.ndarray:
    """uint8 (N, H, W, 3) or float (N, 3, H, W) in [-1, 1] (numpy or torch) -> float32 (N, 3, H, W)."""
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4:
        raise ValueError(f"expected a batch of images (N, H, W, 3) uint8 or (N, 3, H, W) float, got shape {images.shape}")
    if images.dtype == np.uint8:
        if images.shape[-1] != 3:
            raise ValueError(f"uint8 images must be NHWC with 3 channels, got shape {images.shape}")
        return images.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0
    if images.shape[1] != 3:
        raise ValueError(f"float images must be NCHW in [-1, 1] with 3 channels, got shape {images.shape}")
    return images.astype(np.float32)


def quantise(images, margin: float = DEFAULT_MARGIN) -> np.ndarray:
    """Images -> colour indices (N, G, G) int8; -1 marks an unreadable cell.

    Each cell's pixels are averaged per channel (averaging removes pixel noise), then each
    channel mean is read as +1 if > margin, -1 if < -margin, and unreadable in between.
    """
    x = as_signed_nchw(images)
    n, _, h, w = x.shape
    if h != w:
        raise ValueError(f"relations images are square, got {h}x{w}")
    cell = cell_size(h)
    means = x.reshape(n, 3, GRID, cell, GRID, cell).mean(axis=(3, 5))  # (N, 3, G, G)
    bits = (means > 0).astype(np.int8)
    grid = bits[:, 0] * 4 + bits[:, 1] * 2 + bits[:, 2]
    grid[(np.abs(means) < margin).any(axis=1)] = -1
    return grid


_NEIGHBOURS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]


def components(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected components of a boolean (G, G) mask, each as an (n, 2) array of (row, col) cells.

    Ordered by their first cell in row-major order.
    """
    seen = np.zeros_like(mask, dtype=bool)
    out = []
    h, w = mask.shape
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        cells, queue = [], deque([(y, x)])
        seen[y, x] = True
        while queue:
            cy, cx = queue.popleft()
            cells.append((cy, cx))
            for dy, dx in _NEIGHBOURS:
                ny, nx = cy + dy, cx + dx
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        out.append(np.array(cells, dtype=np.int64))
    return out


def crop(cells: np.ndarray) -> tuple[tuple[int, int], np.ndarray]:
    """A component's top-left (row, col) and its shape: the boolean mask cropped to its bounding box."""
    top, left = cells.min(axis=0)
    h, w = cells.max(axis=0) - (top, left) + 1
    mask = np.zeros((h, w), dtype=bool)
    mask[cells[:, 0] - top, cells[:, 1] - left] = True
    return (int(top), int(left)), mask


def stamp(grid: np.ndarray, shape: np.ndarray, top: int, left: int, colour: int) -> None:
    """Paint ``shape``'s cells at (top, left) with ``colour`` (in place)."""
    h, w = shape.shape
    region = grid[top : top + h, left : left + w]
    region[shape] = colour


def free_for(occupied: np.ndarray, shape: np.ndarray, top: int, left: int) -> bool:
    """True when ``shape`` at (top, left) fits and keeps a one-cell gap (8-neighbourhood) to ``occupied``."""
    h, w = shape.shape
    g = occupied.shape[0]
    if top < 0 or left < 0 or top + h > g or left + w > g:
        return False
    return not occupied[max(top - 1, 0) : top + h + 1, max(left - 1, 0) : left + w + 1].any()


def scale_shape(shape: np.ndarray, factor: int) -> np.ndarray:
    return shape.repeat(factor, axis=0).repeat(factor, axis=1)
