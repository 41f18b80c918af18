"""``digits``: scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes), upsampled.

No download: the images ship inside scikit-learn. Pixel values 0..16 map linearly to
[-1, 1] (background -1) and are upsampled bilinearly (a convex combination, so values
stay in [-1, 1]) once, in memory. No augmentation: a flipped digit is another glyph.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from mdtzoo.data.common import SeededDataset, check_split, label_tensor, split_indices
from mdtzoo.registry import DATASETS


def load_digits_array() -> tuple[np.ndarray, np.ndarray]:
    """(1797, 8, 8) float32 in [-1, 1] and (1797,) int64 labels, from scikit-learn's bundled copy."""
    try:
        from sklearn.datasets import load_digits  # imported here: only this dataset needs scikit-learn
    except ImportError as err:
        raise ImportError("the digits dataset needs scikit-learn: pip install scikit-learn") from err
    bunch = load_digits()
    images = bunch.images.astype(np.float32) / 16.0 * 2.0 - 1.0
    return images, bunch.target.astype(np.int64)


class DigitsDataset(SeededDataset):
    """8x8 digits at ``image_size``.  x: (1 or 3, S, S) in [-1, 1], y: () int64 in 0..9."""

    name = "digits"
    num_classes = 10

    def __init__(self, split="train", image_size=16, rgb=False, seed=0, heldout_size=180):
        super().__init__(seed, check_split(split))
        if image_size < 8:
            raise ValueError(f"digits are 8x8: image_size must be >= 8, got {image_size}")
        images, labels = load_digits_array()
        self.indices = split_indices(len(images), split, heldout_size)
        x = torch.from_numpy(images[self.indices]).unsqueeze(1)  # (n, 1, 8, 8)
        if image_size != 8:
            x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
        self.channels = 3 if rgb else 1
        self.images = x.expand(-1, self.channels, -1, -1).contiguous().clamp_(-1, 1)
        self.labels = labels[self.indices]
        self.image_size = int(image_size)

    def __len__(self) -> int:
        return len(self.indices)

    def _item(self, index: int, epoch: int):
        return self.images[index].clone(), label_tensor(self.labels[index])


@DATASETS.register("digits")
def digits(split: str = "train", image_size: int = 16, rgb: bool = False, seed: int = 0, heldout_size: int = 180) -> DigitsDataset:
    """scikit-learn's bundled 8x8 digits (1797, 10 classes) upsampled; grayscale or rgb=True.

    heldout_size: images held out (at most 10%: 179 by default), fixed across seeds.
    No augmentation, so seed and epoch do not change the items.
    """
    return DigitsDataset(split, image_size, rgb, seed, heldout_size)
