"""Inception-v3 of the 2015-12-05 TensorFlow graph (``classify_image_graph_def.pb``) in PyTorch.

    extractor = InceptionExtractor(device="cuda")        # weights from a local file, never downloaded
    feats = extractor(images)                             # images: uint8 (B, H, W, 3)
    feats["pool"] (B, 2048), feats["spatial"] (B, 2023), feats["probs"] (B, 1008)

The graph ADM's evaluator runs, as pytorch-fid ports it (``FIDInception*`` blocks): TF's
average pools exclude padding (``count_include_pad=False``) and the last block (Mixed_7c)
max-pools its pool branch. Module and parameter names are torchvision's, which are the key
names of both pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` and torch-fidelity's
``weights-inception-2015-12-05-6726825d.pth`` (its converter writes the same names, without
BatchNorm's ``num_batches_tracked``), so both load strictly with no renaming.

Taps, named as in ADM's evaluator:
- ``pool_3:0`` -> "pool": the 2048-d global average pool after Mixed_7c (FID, precision/recall).
- ``mixed_6/conv:0`` -> "spatial": in the TF graph ``mixed`` .. ``mixed_10`` are Mixed_5b ..
  Mixed_7c, so ``mixed_6`` is Mixed_6d (``mixed_3`` is the 6a reduction), and ``mixed_6/conv``
  is the op that closes the scope of its 1x1 branch (Conv2D -> batchnorm -> ReLU), i.e.
  Mixed_6d.branch1x1's output, 192 x 17 x 17 (torch-fidelity's converter maps
  ``mixed_6/conv/*`` to ``Mixed_6d.branch1x1``). ADM keeps channels [:7] of the NHWC tensor
  and flattens (h, w, c): 17·17·7 = 2023. The block's concat starts with that branch, so we
  slice Mixed_6d's output.
- ``softmax/logits/MatMul`` -> "logits": ADM's IS multiplies pool_3 by this MatMul's weight
  only - no bias - over all 1008 outputs of the graph (1000 ImageNet classes + 8 unused);
  "probs" is their softmax, as ADM feeds to the Inception Score.

Input: uint8 (or float in [0, 255]) images of any size, resized to 299 x 299 and mapped to
[-1, 1] by (x - 128) / 128 (the graph's Sub/Mul). ``resize="tf1"`` (default) reproduces the
graph's ResizeBilinear (TF1, align_corners=False, no half-pixel centres); ``"pytorch_fid"``
uses ``F.interpolate(bilinear, align_corners=False)`` like pytorch-fid (half-pixel centres,
slightly different pixels when upsampling 256 -> 299).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

WEIGHTS_FILES = (
    "pt_inception-2015-12-05-6726825d.pth",  # pytorch-fid
    "weights-inception-2015-12-05-6726825d.pth",  # torch-fidelity
)
NUM_CLASSES = 1008
SPATIAL_CHANNELS = 7
RESIZE_MODES = ("tf1", "pytorch_fid")


# -- the network -------------------------------------------------------------------------
class BasicConv2d(nn.Module):
    """conv (no bias) -> BatchNorm (eps 1e-3, TF's) -> ReLU."""

    def __init__(self, cin: int, cout: int, **conv):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **conv)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg_pool(x):
    # TF's SAME average pool divides by the number of real (unpadded) pixels.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35x35 block: 1x1 | 5x5 | double 3x3 | avg-pool 1x1."""

    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_avg_pool(x))], 1)


class InceptionB(nn.Module):
    """35 -> 17 reduction: strided 3x3 | double 3x3 | max-pool."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):
    """17x17 block: 1x1 | 1x7-7x1 | double 7x1-1x7 | avg-pool 1x1 (1x1 branch first in the concat)."""

    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = layer(bd)
        return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(_avg_pool(x))], 1)


class InceptionD(nn.Module):
    """17 -> 8 reduction: 1x1-strided 3x3 | 1x1-1x7-7x1-strided 3x3 | max-pool."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
    """8x8 block: 1x1 | 1x1-(1x3, 3x1) | 1x1-3x3-(1x3, 3x1) | pool 1x1.

    ``pool="max"`` for Mixed_7c: the 2015 graph max-pools there (pytorch-fid's FIDInceptionE_2).
    """

    def __init__(self, cin: int, pool: str = "avg"):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.pool == "max" else _avg_pool(x)
        return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], 1)


class InceptionV3(nn.Module):
    """The FID Inception-v3. forward: (B, 3, H, W) in [0, 255] -> dict of pool, spatial, logits, probs."""

    def __init__(self, resize: str = "tf1"):
        super().__init__()
        if resize not in RESIZE_MODES:
            raise ValueError(f"unknown resize {resize!r}; expected one of {', '.join(RESIZE_MODES)}")
        self.resize = resize
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(2048, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = x.float()
        if self.resize == "tf1":
            x = resize_tf1(x, 299)
        else:
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = (x - 128) / 128  # the graph's Sub(128), Mul(1/128); 1/128 is exact in float32
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (B, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # (B, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (B, 192, 35, 35)
        x = self.Mixed_6a(self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x))))  # (B, 768, 17, 17)
        x = self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x)))
        # mixed_6/conv:0 = Mixed_6d.branch1x1, the first 192 channels of the concat; ADM's
        # [..., :7] on NHWC, flattened in (h, w, c) order.
        spatial = x[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(x.shape[0], -1)  # (B, 2023)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(self.Mixed_6e(x))))  # (B, 2048, 8, 8)
        pool = x.mean(dim=(2, 3))  # pool_3: 8x8 VALID average pool
        logits = pool @ self.fc.weight.T  # ADM: softmax/logits/MatMul's weight, no bias
        return {"pool": pool, "spatial": spatial, "logits": logits, "probs": logits.softmax(dim=1)}


def resize_tf1(x: torch.Tensor, size: int) -> torch.Tensor:
    """TF1 ResizeBilinear (align_corners=False, half_pixel_centers=False): x (B, C, H, W) -> (B, C, size, size).

    Source coordinate = output index · (in / out) in float32, neighbours floor and
    min(floor + 1, in - 1); interpolates along width, then height, as TF's kernel does.
    """

    def taps(n_in: int):
        scale = torch.tensor(n_in / size, dtype=torch.float32)
        src = torch.arange(size, dtype=torch.float32, device=x.device) * scale.to(x.device)
        lo = src.floor().long()
        return lo, (lo + 1).clamp(max=n_in - 1), (src - lo).to(x.dtype)

    y0, y1, fy = taps(x.shape[2])
    x0, x1, fx = taps(x.shape[3])
    top, bottom = x[:, :, y0], x[:, :, y1]
    top = top[..., x0] + (top[..., x1] - top[..., x0]) * fx
    bottom = bottom[..., x0] + (bottom[..., x1] - bottom[..., x0]) * fx
    return top + (bottom - top) * fy[:, None]


# -- weights ------------------------------------------------------------------------------
def weights_search_dirs() -> list[Path]:
    """Where weights are looked for, in order: $MDTZOO_WEIGHTS, ~/.cache/mdtzoo, torch hub's checkpoints."""
    dirs = [Path(os.environ["MDTZOO_WEIGHTS"]).expanduser()] if os.environ.get("MDTZOO_WEIGHTS") else []
    dirs.append(Path("~/.cache/mdtzoo").expanduser())
    # pytorch-fid and torch-fidelity download into torch hub's cache: reuse a copy already there.
    dirs.append(Path(torch.hub.get_dir()) / "checkpoints")
    return dirs


def find_weights(path: str | os.PathLike | None = None) -> Path:
    """The weights file: ``path`` itself (a file, or a folder holding one of WEIGHTS_FILES), else
    the first of WEIGHTS_FILES in weights_search_dirs(). FileNotFoundError lists every place tried."""
    if path is not None:
        path = Path(path).expanduser()
        candidates = [path / name for name in WEIGHTS_FILES] if path.is_dir() else [path]
    else:
        candidates = [d / name for d in weights_search_dirs() for name in WEIGHTS_FILES]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"Inception-v3 FID weights not found; looked for {' or '.join(WEIGHTS_FILES)} at: "
        f"{', '.join(str(c) for c in candidates)}. mdtzoo never downloads: get {WEIGHTS_FILES[0]} "
        "from pytorch-fid's GitHub release (docs/evaluation.md), put it in ~/.cache/mdtzoo/ "
        "or $MDTZOO_WEIGHTS/, or pass its path (--weights)."
    )


def load_weights(model: InceptionV3, path: str | os.PathLike) -> InceptionV3:
    """Load a pytorch-fid / torch-fidelity state dict into ``model`` strictly (tensors only)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict of tensors, got {type(state).__name__}")
    # A DataParallel prefix and BatchNorm's step counter carry no weights; everything else must match.
    counter = "num_batches_tracked"
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.endswith(counter)}
    expected = {k for k in model.state_dict() if not k.endswith(counter)}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(
            f"{path} is not an Inception-v3 FID state dict (pytorch-fid / torch-fidelity key names): "
            f"{len(missing)} keys missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    state.update({k: torch.tensor(0) for k in model.state_dict() if k.endswith(counter)})
    try:
        # assign: the loaded tensors become the parameters, so ``model`` may live on the meta device.
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise ValueError(f"{path}: tensor shapes do not fit the FID Inception-v3: {e}") from None
    return model


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class InceptionExtractor:
    """Callable: uint8 images (B, H, W, 3) -> {"pool": (B, 2048), "spatial": (B, 2023), "probs": (B, 1008)}.

    ``model`` overrides the network (e.g. random weights in tests); otherwise the weights come
    from ``find_weights(weights)``.
    """

    def __init__(self, weights=None, device: str | None = None, resize: str = "tf1", model: nn.Module | None = None):
        self.device = torch.device(device or default_device())
        if model is None:
            self.weights_path = find_weights(weights)
            with torch.device("meta"):  # no random init of 24M parameters that the file replaces
                model = InceptionV3(resize=resize)
            model = load_weights(model, self.weights_path)
        else:
            self.weights_path = None
        self.model = model.to(self.device).eval().requires_grad_(False)

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device).permute(0, 3, 1, 2)
        # cuDNN convolutions default to TF32 on Ampere+ GPUs (~1e-3 relative error); the reference
        # numbers come from full float32, so switch it off for the extraction.
        allow_tf32 = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = False
        try:
            with torch.inference_mode():
                out = self.model(x)
        finally:
            torch.backends.cudnn.allow_tf32 = allow_tf32
        return {k: out[k].float().cpu().numpy() for k in ("pool", "spatial", "probs")}

    def describe(self) -> str:
        weights = self.weights_path.name if self.weights_path else "custom model"
        return f"inception_v3_2015-12-05 ({weights}, resize={getattr(self.model, 'resize', '?')})"
