"""``image_folder``: ImageNet-style folders with ADM's preprocessing (centre crop, flip, [-1, 1]).

Two layouts (``layout="auto"`` picks by looking):
- "folders": ``root/<class_name>/**/*.jpg`` - class ids are the sorted folder names
  (torchvision's ImageFolder; ImageNet's ``train/n01440764/...``).
- "flat": ``root/**/<class>_<anything>.png`` - the class is the file name before its first
  underscore, ids over the sorted set of classes (ADM's ``image_datasets.py`` convention).

Corrupt files: ``on_corrupt="error"`` raises CorruptImageError naming the path and PIL's
reason; ``"skip"`` replaces the item by the next valid one (deterministic), records
(path, reason) in ``dataset.corrupt`` and warns. ``verify=True`` decodes every image of the
split at construction so problems surface before any expensive work.
"""

from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from mdtzoo.data.common import SeededDataset, check_split, label_tensor, split_indices, to_signed_chw
from mdtzoo.registry import DATASETS

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp")
LAYOUTS = ("auto", "folders", "flat")
ON_CORRUPT = ("error", "skip")
# What PIL raises on unreadable files: unidentified/truncated (OSError), bad headers
# (SyntaxError, ValueError), early end (EOFError), oversized images (DecompressionBombError).
PIL_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


class CorruptImageError(ValueError):
    """An image file PIL cannot decode; the message names the file and PIL's reason."""


def center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """ADM's centre crop (guided_diffusion/image_datasets.py): PIL image -> uint8 (S, S, C).

    Halve with BOX filtering while the short side is >= 2·S (cheap, alias-free), resize
    with BICUBIC so the short side is S, then crop the centre S x S.
    """
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size]


def _image_files(folder: str, extensions: Sequence[str]) -> list[str]:
    """Image files under ``folder`` (recursive, symlinks followed), sorted, relative to it."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames.sort()
        rel = os.path.relpath(dirpath, folder)
        out += [os.path.normpath(os.path.join(rel, f)) for f in filenames if f.lower().endswith(extensions)]
    return sorted(out)


def list_images(root: str, layout: str = "auto", extensions: Sequence[str] = IMAGE_EXTENSIONS):
    """(relative paths, labels (n,) int64, class names, layout used) of an image folder."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder {root} does not exist (or is not a directory)")
    extensions = tuple(e.lower() for e in extensions)
    files = _image_files(root, extensions)
    if not files:
        raise FileNotFoundError(
            f"no images in {root} (searched recursively for files ending in {', '.join(extensions)}, any case)"
        )
    nested = [f for f in files if os.sep in f]
    if layout == "auto":
        if nested and len(nested) < len(files):
            raise ValueError(
                f"{root} holds both class folders ({len(nested)} images) and {len(files) - len(nested)} loose "
                "images; pass layout='folders' (loose images ignored) or layout='flat' (class = file name prefix)"
            )
        layout = "folders" if nested else "flat"
    if layout == "folders":
        files = nested
        if not files:
            raise FileNotFoundError(f"no class folders with images in {root} (layout='folders')")
        classes = [f.split(os.sep, 1)[0] for f in files]
    else:
        classes = [os.path.basename(f).split("_")[0] for f in files]
    class_names = sorted(set(classes))
    ids = {name: i for i, name in enumerate(class_names)}
    return files, np.array([ids[c] for c in classes], dtype=np.int64), class_names, layout


def load_rgb(path: str) -> Image.Image:
    """The fully decoded RGB image at ``path``; CorruptImageError names the file and PIL's reason."""
    try:
        with Image.open(path) as im:
            im.load()  # decode now: a truncated file fails here, not halfway through a batch
            return im.convert("RGB")
    except PIL_ERRORS as err:
        raise CorruptImageError(f"corrupt image {path}: {type(err).__name__}: {err}") from err


class ImageFolderDataset(SeededDataset):
    """Images of a folder, ADM-preprocessed.  x: (3, S, S) float32 in [-1, 1], y: () int64."""

    name = "image_folder"
    channels = 3

    def __init__(self, root, split="train", image_size=256, seed=0, flip=True, heldout_size=1000,
                 layout="auto", on_corrupt="error", verify=False, extensions=IMAGE_EXTENSIONS):
        super().__init__(seed, check_split(split, ("train", "heldout", "all")))
        if root is None:
            raise ValueError("datasets.image_folder needs root= (a folder of images)")
        if on_corrupt not in ON_CORRUPT:
            raise ValueError(f"on_corrupt must be one of {', '.join(ON_CORRUPT)}, got {on_corrupt!r}")
        self.root, self.image_size, self.flip, self.on_corrupt = str(root), int(image_size), bool(flip), on_corrupt
        files, labels, self.class_names, self.layout = list_images(self.root, layout, extensions)
        self.num_classes = len(self.class_names)
        self.indices = split_indices(len(files), split, heldout_size)
        if len(self.indices) == 0:
            raise ValueError(
                f"the {split} split of {self.root} is empty ({len(files)} images, heldout_size={heldout_size}; "
                "the heldout split is min(heldout_size, 10% of the images))"
            )
        self.paths = [os.path.join(self.root, files[i]) for i in self.indices]
        self.labels = labels[self.indices]
        self.corrupt: list[tuple[str, str]] = []  # (path, reason) of every file skipped so far
        self._bad: set[int] = set()
        if verify:
            self.verify()

    def __len__(self) -> int:
        return len(self.paths)

    def verify(self, indices: Sequence[int] | None = None, num_threads: int | None = None) -> list[tuple[str, str]]:
        """Decode every image (or ``indices``) now; raise (error) or record and warn once (skip).

        Returns the (path, reason) pairs found. PIL releases the GIL while decoding, so threads help.
        """
        indices = range(len(self)) if indices is None else indices

        def check(i):
            try:
                load_rgb(self.paths[i])
                return None
            except CorruptImageError as err:
                return i, str(err)

        with ThreadPoolExecutor(num_threads or min(32, os.cpu_count() or 1)) as pool:
            found = [r for r in pool.map(check, indices) if r is not None]
        if found and self.on_corrupt == "error":
            listing = "\n  ".join(reason for _, reason in found[:20])
            more = f"\n  ... and {len(found) - 20} more" if len(found) > 20 else ""
            raise CorruptImageError(f"{len(found)} corrupt image(s) in {self.root}:\n  {listing}{more}")
        new = [(i, r) for i, r in found if i not in self._bad]
        self._record(new)
        if new:
            paths = ", ".join(self.paths[i] for i, _ in new[:20]) + (" ..." if len(new) > 20 else "")
            warnings.warn(f"image_folder: {len(new)} corrupt image(s) in {self.root} will be replaced by the next valid image: {paths}")
        return [(self.paths[i], r) for i, r in found]

    def _record(self, found) -> None:
        for i, reason in found:
            if i not in self._bad:
                self._bad.add(i)
                self.corrupt.append((self.paths[i], reason))

    def _load_valid(self, index: int) -> tuple[int, Image.Image]:
        """(index actually used, image): ``index`` itself, or in skip mode the next valid one."""
        for step in range(len(self)):
            j = (index + step) % len(self)
            if j in self._bad:
                continue
            try:
                return j, load_rgb(self.paths[j])
            except CorruptImageError as err:
                if self.on_corrupt == "error":
                    raise
                self._record([(j, str(err))])
                warnings.warn(f"image_folder: skipping {err} ({len(self.corrupt)} corrupt so far; see dataset.corrupt)")
        raise CorruptImageError(f"every image of the {self.split} split of {self.root} is corrupt")

    def _item(self, index: int, epoch: int):
        used, image = self._load_valid(index)
        arr = center_crop_arr(image, self.image_size)
        if self.flip and self.rng(index, epoch).random() < 0.5:
            arr = arr[:, ::-1]
        return torch.from_numpy(to_signed_chw(arr)), label_tensor(self.labels[used])


@DATASETS.register("image_folder")
def image_folder(
    root: str | None = None,
    split: str = "train",
    image_size: int = 256,
    seed: int = 0,
    flip: bool = True,
    heldout_size: int = 1000,
    layout: str = "auto",
    on_corrupt: str = "error",
    verify: bool = False,
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
) -> ImageFolderDataset:
    """ImageNet-style class folders or ADM flat files; ADM centre crop, random flip, [-1, 1].

    split: "train", "heldout" (min(heldout_size, 10%) images, a fixed choice independent of
    seed) or "all" (every image in sorted order: what ``mdtzoo extract`` encodes).
    layout: "auto" | "folders" | "flat"; on_corrupt: "error" | "skip"; verify: decode the
    split's images now (threads) so a corrupt file is reported before training starts.
    """
    return ImageFolderDataset(root, split, image_size, seed, flip, heldout_size, layout, on_corrupt, verify, tuple(extensions))

