"""Datasets: procedural relations, bundled digits, ImageNet-style image folders, pre-extracted latents.

Every dataset is registered in ``DATASETS`` and follows one contract (common.py):
``ds[i] -> (x, y)`` with x float32 (C, H, W) (pixels in [-1, 1], or scaled latents) and
y a 0-d int64 label; ``ds[i]`` is a pure function of (index, seed, epoch); ``split`` is
"train" or "heldout" (disjoint); attributes ``num_classes``, ``image_size``, ``channels``,
``name``, ``labels``; ``set_epoch(epoch)`` changes the augmentation stream.
"""

from mdtzoo.data.common import SPLITS, SeededDataset, item_rng, split_indices  # noqa: F401
from mdtzoo.data import relations, digits, images, latents  # noqa: F401,E402  (registration)
