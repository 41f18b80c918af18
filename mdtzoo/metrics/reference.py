"""Image batches in ``.npz`` files (ADM's format) and reference statistics.

    images = open_images("samples.npz")               # validated header; streams batches
    ref = load_reference("VIRTUAL_imagenet256_labeled.npz", extractor)
    make_reference(uint8_images_or_folder, extractor, "my_ref.npz", image_size=64)

ADM's reference batches hold ``arr_0`` (uint8 NHWC images, 10,000 for ImageNet) and the
dataset's precomputed ``mu``/``sigma`` (pool_3) and ``mu_s``/``sigma_s`` (spatial). Its
evaluator always runs Inception on ``arr_0`` (precision/recall need per-image features) and
uses the stored statistics when present. Ours (``make_reference``) store the statistics of
every image plus ``pool_features`` of a seeded random subset of ``pr_size`` images, so they
need no images and no Inception pass at evaluation time.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from mdtzoo.metrics.frechet import RunningGaussian, gaussian_stats
from mdtzoo.metrics.suite import Extractor, extract_features

STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")
POOL_KEY = "pool_features"


# -- image batches in .npz files ----------------------------------------------------------
@dataclass
class NpzImages:
    """``key`` of an .npz, checked to be uint8 (N, H, W, 3); read in batches without loading it all."""

    path: Path
    key: str
    shape: tuple[int, ...]
    offset: int | None  # byte offset of the data in the zip member; None: load whole (rare formats)

    def __len__(self) -> int:
        return self.shape[0]

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """uint8 (B, H, W, 3) batches in file order (50k 256² images are 9.8 GB: never all in memory)."""
        if self.offset is None:
            arr = np.load(self.path)[self.key]
            for start in range(0, len(arr), batch_size):
                yield arr[start : start + batch_size]
            return
        per_image = int(np.prod(self.shape[1:]))
        with zipfile.ZipFile(self.path) as z, z.open(f"{self.key}.npy") as f:
            f.read(self.offset)  # zip members are streams: skip the .npy header by reading it
            for start in range(0, self.shape[0], batch_size):
                count = min(batch_size, self.shape[0] - start)
                data = f.read(count * per_image)
                if len(data) != count * per_image:
                    raise ValueError(f"{self.path}: {self.key} is truncated (image {start + len(data) // per_image})")
                yield np.frombuffer(data, dtype=np.uint8).reshape(count, *self.shape[1:])


def npz_keys(path: str | os.PathLike, what: str = "file") -> list[str]:
    """The array names in an .npz; clear errors for a missing or non-npz file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        with zipfile.ZipFile(path) as z:
            return [n[: -len(".npy")] for n in z.namelist() if n.endswith(".npy")]
    except zipfile.BadZipFile:
        raise ValueError(f"{what} {path} is not an .npz file (np.savez writes one)") from None


def check_images(shape: tuple[int, ...], dtype, where: str) -> None:
    """Raise ValueError unless (shape, dtype) is uint8 (N >= 2, H, W, 3)."""
    if np.dtype(dtype) != np.uint8:
        raise ValueError(f"{where} has dtype {np.dtype(dtype)}; expected uint8 images in [0, 255]")
    if len(shape) != 4 or shape[-1] != 3:
        hint = " (channels first? ADM's format is NHWC)" if len(shape) == 4 and shape[1] == 3 else ""
        raise ValueError(f"{where} has shape {tuple(shape)}; expected (N, H, W, 3) NHWC RGB{hint}")
    if shape[0] < 2 or min(shape[1:3]) < 1:
        raise ValueError(f"{where} has shape {tuple(shape)}; need at least 2 non-empty images")


def open_images(path: str | os.PathLike, key: str = "arr_0", what: str = "samples file") -> NpzImages:
    """Validate ``key`` of an .npz from its header only (cheap; before any model is loaded)."""
    keys = npz_keys(path, what)
    if key not in keys:
        raise ValueError(f"{what} {path} has no {key} (it holds: {', '.join(keys) or 'nothing'})")
    with zipfile.ZipFile(path) as z, z.open(f"{key}.npy") as f:
        version = np.lib.format.read_magic(f)
        if version in ((1, 0), (2, 0)):
            reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = reader(f)
            offset = None if fortran else f.tell()
        else:
            arr = np.load(path)[key]
            shape, dtype, offset = arr.shape, arr.dtype, None
    check_images(shape, dtype, f"{what} {path}: {key}")
    return NpzImages(Path(path), key, tuple(int(s) for s in shape), offset)


def read_labels(path: str | os.PathLike, num_images: int) -> np.ndarray | None:
    """``arr_1`` of a samples file (ADM saves the sampled classes there), if it is (N,) integers."""
    if "arr_1" not in npz_keys(path):
        return None
    labels = np.load(path)["arr_1"]
    ok = labels.shape == (num_images,) and np.issubdtype(labels.dtype, np.integer) and labels.min() >= 0
    return labels.astype(np.int64) if ok else None


def array_batches(images: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(images), batch_size):
        yield images[start : start + batch_size]


# -- reference statistics -----------------------------------------------------------------
@dataclass
class Reference:
    """mu (2048,), sigma (2048, 2048), mu_s (2023,), sigma_s (2023, 2023), pool (M, 2048) for P/R."""

    mu: np.ndarray
    sigma: np.ndarray
    mu_s: np.ndarray
    sigma_s: np.ndarray
    pool: np.ndarray

    @property
    def num_pool(self) -> int:
        return len(self.pool)


def check_reference(path: str | os.PathLike) -> bool:
    """Validate a reference .npz without computing; True if it needs Inception (has to read arr_0)."""
    keys = npz_keys(path, "reference file")
    has_stats = all(k in keys for k in STAT_KEYS)
    if any(k in keys for k in STAT_KEYS) and not has_stats:
        raise ValueError(f"reference file {path} has only some of {', '.join(STAT_KEYS)} (need all four or none)")
    if has_stats and POOL_KEY in keys:
        return False
    if "arr_0" not in keys:
        raise ValueError(
            f"reference file {path} has neither arr_0 (reference images) nor {POOL_KEY} with "
            f"{', '.join(STAT_KEYS)} (it holds: {', '.join(keys) or 'nothing'})"
        )
    open_images(path, "arr_0", "reference file")
    return True


def load_reference(path: str | os.PathLike, extractor: Extractor | None = None, batch_size: int = 64) -> Reference:
    """A Reference from an ADM or mdtzoo .npz; Inception runs on arr_0 when the file needs it."""
    if not check_reference(path):
        with np.load(path) as z:
            return Reference(*(z[k] for k in STAT_KEYS), pool=z[POOL_KEY])
    if extractor is None:
        raise ValueError(f"reference file {path} holds images (arr_0): an extractor is needed to read it")
    images = open_images(path, "arr_0", "reference file")
    feats = extract_features(images.batches(batch_size), extractor)
    keys = npz_keys(path)
    if all(k in keys for k in STAT_KEYS):  # ADM: dataset statistics stored, arr_0 only for P/R
        with np.load(path) as z:
            return Reference(*(z[k] for k in STAT_KEYS), pool=feats.pool)
    return Reference(*gaussian_stats(feats.pool), *gaussian_stats(feats.spatial), pool=feats.pool)


def folder_batches(folder: str | os.PathLike, image_size: int, batch_size: int) -> tuple[int, Iterator[np.ndarray]]:
    """(count, uint8 batches) of every image under ``folder``, ADM centre-cropped to image_size."""
    from mdtzoo.data.images import center_crop_arr, list_images, load_rgb

    files = list_images(str(folder), layout="flat")[0]

    def gen():
        for start in range(0, len(files), batch_size):
            chunk = files[start : start + batch_size]
            yield np.stack([center_crop_arr(load_rgb(os.path.join(folder, f)), image_size) for f in chunk])

    return len(files), gen()


def make_reference(
    images,
    extractor: Extractor,
    path: str | os.PathLike,
    *,
    image_size: int | None = None,
    batch_size: int = 64,
    pr_size: int = 10_000,
    seed: int = 0,
) -> Path:
    """Write a reference .npz: mu/sigma/mu_s/sigma_s of all images, pool_features of a subset.

    images: uint8 (N, H, W, 3) array, or an image folder (then ``image_size`` is required:
    ADM's centre crop). Statistics accumulate over batches (any dataset size); the P/R subset
    is ``pr_size`` images chosen by a seeded permutation (ADM's ImageNet reference holds
    10,000), not the first ones, since folders are often sorted by class. Written atomically.
    """
    if isinstance(images, (str, os.PathLike)):
        if image_size is None:
            raise ValueError(f"make_reference: pass image_size to read the image folder {images}")
        n, batches = folder_batches(images, image_size, batch_size)
    else:
        images = np.asarray(images)
        check_images(images.shape, images.dtype, "make_reference: images")
        n, batches = len(images), array_batches(images, batch_size)
    subset = np.zeros(n, dtype=bool)
    subset[np.random.default_rng(seed).permutation(n)[:pr_size]] = True
    pool_stats, spatial_stats, pool_subset, start = RunningGaussian(), RunningGaussian(), [], 0
    for batch in batches:
        out = extractor(batch)
        pool = np.asarray(out["pool"], np.float32).reshape(len(batch), -1)
        pool_stats.update(pool)
        spatial_stats.update(np.asarray(out["spatial"], np.float32).reshape(len(batch), -1))
        pool_subset.append(pool[subset[start : start + len(batch)]])
        start += len(batch)
    mu, sigma = pool_stats.stats()
    mu_s, sigma_s = spatial_stats.stats()
    arrays = dict(mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s, num_images=np.int64(n))
    arrays[POOL_KEY] = np.concatenate(pool_subset)
    with atomic_open(path) as f:
        np.savez(f, **arrays)
    return Path(path)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb"):
    """Write to a temp file beside ``path``, then os.replace it in: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
