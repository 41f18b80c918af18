"""Evaluate generated images with the ADM suite: samples -> features -> metrics -> results JSON.

    results = evaluate_npz("samples.npz", "VIRTUAL_imagenet256_labeled.npz", device="cuda")
    print(format_results(results))                       # ADM evaluator's lines
    write_results(results, results_path("samples.npz", "VIRTUAL_imagenet256_labeled.npz"))

Three layers, each usable alone: ``evaluate_features`` (numpy features -> numbers),
``evaluate_arrays`` (uint8 images + any extractor callable), ``evaluate_npz`` (files; inputs
are validated from their headers before weights are loaded or anything is computed). A
run-directory mode (``mdtzoo eval RUN_DIR``) is meant to find the samples .npz of a run and call
``evaluate_npz`` + ``write_results`` into the run's folder.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np

import mdtzoo
from mdtzoo.metrics.reference import (
    Reference,
    array_batches,
    atomic_open,
    check_images,
    check_reference,
    load_reference,
    open_images,
    read_labels,
)
from mdtzoo.metrics.suite import ADM_SUITE, Extractor, Features, extract_features
from mdtzoo.registry import METRICS

# ADM's printed names, in its order (evaluations/evaluator.py).
ADM_LABELS = {
    "inception_score": "Inception Score",
    "fid": "FID",
    "sfid": "sFID",
    "precision": "Precision",
    "recall": "Recall",
}
# What evaluate_npz adds beside the metrics.
PROVENANCE_KEYS = ("samples", "ref", "num_samples", "num_ref_features", "extractor", "seconds", "mdtzoo_version")


def evaluate_features(samples: Features, ref: Reference, metrics: Sequence[str] = ADM_SUITE) -> dict[str, float]:
    """Run the registered ``metrics`` (names in the ``metrics`` family) on precomputed features."""
    results: dict[str, float] = {}
    for name in metrics:
        results.update(METRICS.build(name, samples=samples, ref=ref))
    return results


def evaluate_arrays(
    sample_images: np.ndarray,
    ref: Reference | str | os.PathLike,
    extractor: Extractor,
    *,
    batch_size: int = 64,
    labels: np.ndarray | None = None,
    metrics: Sequence[str] = ADM_SUITE,
) -> dict[str, float]:
    """Metrics of uint8 images (N, H, W, 3) against a Reference (or a reference .npz path).

    ``extractor`` is any callable uint8 (B, H, W, 3) -> {"pool", "spatial", "probs"} arrays
    (``mdtzoo.metrics.inception.InceptionExtractor`` for the real numbers). ``labels`` (N,), the
    sampled classes, only feed the class-sorted-order check of the Inception Score.
    """
    sample_images = np.asarray(sample_images)
    check_images(sample_images.shape, sample_images.dtype, "sample images")
    if not isinstance(ref, Reference):
        ref = load_reference(ref, extractor, batch_size)
    feats = extract_features(array_batches(sample_images, batch_size), extractor, labels)
    return evaluate_features(feats, ref, metrics)


def make_extractor(weights=None, device: str | None = None, resize: str = "tf1") -> Extractor:
    """The Inception-v3 extractor from a local weights file (FileNotFoundError lists where it looked)."""
    from mdtzoo.metrics.inception import InceptionExtractor

    return InceptionExtractor(weights=weights, device=device, resize=resize)


def evaluate_npz(
    samples_path: str | os.PathLike,
    ref_path: str | os.PathLike,
    *,
    extractor: Extractor | None = None,
    weights=None,
    device: str | None = None,
    resize: str = "tf1",
    batch_size: int = 64,
    metrics: Sequence[str] = ADM_SUITE,
) -> dict:
    """Metrics of a samples .npz against a reference .npz, plus provenance (paths, counts, extractor).

    Both files are checked first (exists, is an .npz, arr_0 uint8 (N, H, W, 3), reference keys);
    then the extractor is built (``make_extractor``) unless one is given. Samples stream in
    batches of ``batch_size``; ``arr_1`` labels, if present, feed the sorted-order check.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for name in metrics:
        METRICS.get(name)  # unknown names fail here, listing the known ones
    samples = open_images(samples_path, "arr_0", "samples file")
    check_reference(ref_path)
    if extractor is None:
        extractor = make_extractor(weights, device, resize)
    start = time.perf_counter()
    ref = load_reference(ref_path, extractor, batch_size)
    feats = extract_features(samples.batches(batch_size), extractor, read_labels(samples_path, len(samples)))
    results = evaluate_features(feats, ref, metrics)
    describe = getattr(extractor, "describe", None)
    return {
        **results,
        "samples": str(samples_path),
        "ref": str(ref_path),
        "num_samples": len(feats),
        "num_ref_features": ref.num_pool,
        "extractor": describe() if describe else type(extractor).__name__,
        "seconds": round(time.perf_counter() - start, 1),
        "mdtzoo_version": mdtzoo.__version__,
    }


def format_results(results: dict) -> str:
    """The ADM evaluator's lines ("Inception Score: ...", "FID: ...", ...), then any other metric."""
    lines = [f"{label}: {results[key]}" for key, label in ADM_LABELS.items() if key in results]
    lines += [f"{k}: {v}" for k, v in results.items() if k not in ADM_LABELS and k not in PROVENANCE_KEYS]
    return "\n".join(lines)


def results_path(samples_path: str | os.PathLike, ref_path: str | os.PathLike, out_dir=None) -> Path:
    """``<out_dir or the samples' folder>/<samples>_eval_<ref>.json``: one file per (samples, reference)."""
    samples_path = Path(samples_path)
    folder = Path(out_dir) if out_dir is not None else samples_path.parent
    return folder / f"{samples_path.stem}_eval_{Path(ref_path).stem}.json"


def write_results(results: dict, path: str | os.PathLike, force: bool = False) -> Path:
    """Write results as JSON atomically (temp file + os.replace); FileExistsError unless ``force``."""
    path = Path(path)
    if path.exists() and not force:
        raise FileExistsError(f"{path} already exists; pass --force (force=True) to overwrite it")
    with atomic_open(path, "w") as f:
        json.dump(results, f, indent=2, sort_keys=False)
        f.write("\n")
    return path
