"""Datasets for SteppingNet experiments, read from local files only.

``load_dataset`` returns ``(train, test, info)`` where each dataset yields
``(image, label)`` with ``image`` a float ``C x H x W`` tensor. Nothing here
touches the network unless the caller passes ``download=True``; a missing dataset
is a ``FileNotFoundError`` naming the files or folder expected under ``root``.
``digits`` ships with scikit-learn and ``synthetic`` is generated, so both run
anywhere without a root. ``npz`` reads a user's own arrays from one ``.npz`` file
(see :func:`load_npz_arrays` and docs/data.md).

With ``val_fraction > 0`` the second dataset is a seeded, stratified hold-out of the
training split and ``DatasetInfo.eval_split`` says ``"validation split"``; the test
set is then never read for evaluation.
"""

from __future__ import annotations

import dataclasses
import gzip
import logging
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset
from torch.utils.data.distributed import DistributedSampler

__all__ = [
    "DATASETS",
    "DatasetInfo",
    "TensorImageDataset",
    "AugmentedImageDataset",
    "AUGMENTATIONS",
    "LAYOUTS",
    "load_dataset",
    "load_npz_arrays",
    "stratified_split",
    "channel_stats",
    "make_loaders",
    "to_device",
]

logger = logging.getLogger(__name__)

DATASETS: Final[tuple[str, ...]] = ("digits", "mnist", "cifar10", "cifar100", "imagefolder", "synthetic", "npz")
#: ``augment`` values: random crop (zero padding 4) + horizontal flip, or nothing
AUGMENTATIONS: Final[tuple[str, ...]] = ("crop_flip", "none")
#: ``layout`` values of ``npz`` image arrays (``auto`` infers it from the shape)
LAYOUTS: Final[tuple[str, ...]] = ("auto", "nhwc", "nchw")
_NPZ_CHANNELS: Final[frozenset[int]] = frozenset({1, 2, 3, 4})

_MNIST_MEAN: Final[float] = 0.1307
_MNIST_STD: Final[float] = 0.3081
_MNIST_FILES: Final[dict[str, str]] = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_CIFAR_STATS: Final[dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
_CIFAR_FOLDERS: Final[dict[str, str]] = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}

T = TypeVar("T")


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a dataset."""

    name: str
    num_classes: int
    in_chans: int
    img_size: int
    #: what the second dataset is: ``"test"`` or ``"validation split"`` (a hold-out of train)
    eval_split: str = "test"


class TensorImageDataset(Dataset):
    """Images and labels held as in-memory tensors (already normalised)."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor) -> None:
        if images.ndim != 4 or targets.ndim != 1 or images.shape[0] != targets.shape[0]:
            raise ValueError(
                f"expected images N x C x H x W and targets N, got {tuple(images.shape)} and {tuple(targets.shape)}"
            )
        self.images = images.float().contiguous()
        self.targets = targets.long().contiguous()

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.targets[index])


class AugmentedImageDataset(Dataset):
    """``N x C x H x W`` images normalised per sample, with optional CIFAR augmentation.

    uint8 images are scaled to [0, 1] before ``(x - mean) / std``; floating images are
    used as they are (``mean`` and ``std`` are then in the arrays' own scale). Keeping
    the images in their stored dtype costs 4x less memory than pre-normalised floats.

    Augmentation (zero-pad by ``pad`` then random crop back, random horizontal flip)
    uses torch ops and the torch RNG: DataLoader workers are seeded from the loader's
    generator; with ``num_workers=0`` it follows ``torch.manual_seed``.
    """

    def __init__(
        self,
        images: torch.Tensor,
        targets: torch.Tensor,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        augment: bool,
        pad: int = 4,
        img_size: int | None = None,
    ) -> None:
        if images.ndim != 4 or not (images.dtype == torch.uint8 or images.is_floating_point()):
            raise ValueError(
                "AugmentedImageDataset expects uint8 or floating images of shape N x C x H x W, "
                f"got {images.dtype} of shape {tuple(images.shape)}"
            )
        self.images = images.contiguous()
        self.targets = targets.long().contiguous()
        chans = images.shape[1]
        self.mean = torch.tensor(list(mean), dtype=torch.float32).view(chans, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32).view(chans, 1, 1)
        self.augment = augment
        self.pad = pad
        self.img_size = img_size

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        img = self.images[index]
        if self.augment:
            h, w = img.shape[-2:]
            # Pad before normalising so the border is black (zero), as torchvision's RandomCrop does.
            padded = F.pad(img, (self.pad, self.pad, self.pad, self.pad))
            top = int(torch.randint(0, 2 * self.pad + 1, ()))
            left = int(torch.randint(0, 2 * self.pad + 1, ()))
            img = padded[:, top : top + h, left : left + w]
            if bool(torch.rand(()) < 0.5):
                img = img.flip(-1)
        x = img.float() / 255.0 if img.dtype == torch.uint8 else img.float()
        x = (x - self.mean) / self.std
        if self.img_size is not None and x.shape[-1] != self.img_size:
            x = _resize(x.unsqueeze(0), self.img_size).squeeze(0)
        return x, int(self.targets[index])


def _resize(images: torch.Tensor, img_size: int) -> torch.Tensor:
    return F.interpolate(images, size=(img_size, img_size), mode="bilinear", align_corners=False)


def _check_img_size(img_size: int | None) -> None:
    if img_size is not None and (isinstance(img_size, bool) or not isinstance(img_size, int) or img_size < 1):
        raise ValueError(f"img_size must be a positive int or None, got {img_size!r}")


def _require_root(name: str, root: str | os.PathLike[str] | None) -> Path:
    if root is None:
        raise ValueError(
            f"dataset {name!r} is read from local files: pass its folder (for npz: the .npz file) with "
            f"`--set data.root=...` on the command line or `root=` in Python"
        )
    return Path(root).expanduser()


def stratified_split(targets: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stratified, seeded split of indices into sorted ``(train, val)`` index tensors.

    Every class ``c`` with ``n_c`` samples gives ``floor(n_c * fraction + 0.5)`` of them,
    drawn by a ``torch.Generator`` seeded with ``seed``, to the validation part.
    """
    gen = torch.Generator().manual_seed(seed)
    train_idx: list[torch.Tensor] = []
    val_idx: list[torch.Tensor] = []
    for cls in torch.unique(targets).tolist():
        idx = torch.nonzero(targets == cls).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=gen)]
        n_val = int(np.floor(idx.numel() * fraction + 0.5))
        val_idx.append(idx[:n_val])
        train_idx.append(idx[n_val:])
    train = torch.sort(torch.cat(train_idx)).values
    val = torch.sort(torch.cat(val_idx)).values
    if val.numel() == 0 or train.numel() == 0:
        raise ValueError(f"val_fraction={fraction} leaves an empty train or validation split")
    return train, val


def _load_digits(seed: int, val_fraction: float, img_size: int | None) -> tuple[Dataset, Dataset, DatasetInfo]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = np.asarray(bunch.images, dtype=np.float32) / 16.0  # pixel values are 0..16
    labels = np.asarray(bunch.target, dtype=np.int64)
    idx_train, idx_test = train_test_split(
        np.arange(labels.shape[0]), test_size=0.2, stratify=labels, random_state=seed
    )
    x_all = torch.from_numpy(images).unsqueeze(1)
    y_all = torch.from_numpy(labels)
    x_train, y_train = x_all[np.sort(idx_train)], y_all[np.sort(idx_train)]
    x_test, y_test = x_all[np.sort(idx_test)], y_all[np.sort(idx_test)]
    if val_fraction > 0:
        tr, va = stratified_split(y_train, val_fraction, seed)
        x_test, y_test = x_train[va], y_train[va]
        x_train, y_train = x_train[tr], y_train[tr]
    # Statistics from the training images only, so the held-out split stays unseen.
    mean, std = x_train.mean(), x_train.std()
    x_train = (x_train - mean) / std
    x_test = (x_test - mean) / std
    size = 8
    if img_size is not None and img_size != 8:
        x_train, x_test, size = _resize(x_train, img_size), _resize(x_test, img_size), img_size
    info = DatasetInfo("digits", 10, 1, size)
    return TensorImageDataset(x_train, y_train), TensorImageDataset(x_test, y_test), info


def _read_idx(path: Path, expected_ndim: int) -> torch.Tensor:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    if len(data) < 4:
        raise ValueError(f"{path}: not an IDX file (too short)")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08 or ndim != expected_ndim:
        raise ValueError(
            f"{path}: expected an unsigned-byte IDX file with {expected_ndim} dims, "
            f"got header type=0x{dtype_code:02x} ndim={ndim}"
        )
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    count = int(np.prod(dims))
    payload = np.frombuffer(data, dtype=np.uint8, count=count, offset=4 + 4 * ndim)
    return torch.from_numpy(payload.reshape(dims).copy())


def _mnist_paths(raw: Path) -> dict[str, Path] | None:
    """Existing file per MNIST part, preferring the .gz torchvision downloads; None if any is missing."""
    found: dict[str, Path] = {}
    for key, stem in _MNIST_FILES.items():
        for candidate in (raw / f"{stem}.gz", raw / stem):
            if candidate.is_file():
                found[key] = candidate
                break
        else:
            return None
    return found


def _load_mnist(
    root: Path, download: bool, seed: int, val_fraction: float, img_size: int | None
) -> tuple[Dataset, Dataset, DatasetInfo]:
    raw = root / "MNIST" / "raw"
    paths = _mnist_paths(raw)
    if paths is None and download:
        # torchvision's MNIST does the download (and its md5 checks) into ROOT/MNIST/raw.
        from torchvision.datasets import MNIST

        logger.info("downloading MNIST into %s", raw)
        MNIST(str(root), train=True, download=True)
        paths = _mnist_paths(raw)
    if paths is None:
        expected = "\n  ".join(str(raw / f"{stem}.gz") for stem in _MNIST_FILES.values())
        raise FileNotFoundError(
            f"MNIST files not found. Expected (torchvision layout):\n  {expected}\n"
            "Pass download=True (needs network access) or copy the files there."
        )
    splits: list[tuple[torch.Tensor, torch.Tensor]] = []
    for part in ("train", "test"):
        images = _read_idx(paths[f"{part}_images"], 3)
        labels = _read_idx(paths[f"{part}_labels"], 1)
        if images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"MNIST {part}: {images.shape[0]} images but {labels.shape[0]} labels "
                f"({paths[f'{part}_images']}, {paths[f'{part}_labels']})"
            )
        x = (images.float().div_(255.0).sub_(_MNIST_MEAN).div_(_MNIST_STD)).unsqueeze(1)
        splits.append((x, labels.long()))
    (x_train, y_train), (x_test, y_test) = splits
    if val_fraction > 0:
        tr, va = stratified_split(y_train, val_fraction, seed)
        x_test, y_test = x_train[va], y_train[va]
        x_train, y_train = x_train[tr], y_train[tr]
    size = int(x_train.shape[-1])
    if img_size is not None and img_size != size:
        x_train, x_test, size = _resize(x_train, img_size), _resize(x_test, img_size), img_size
    logger.info("MNIST: %d train / %d eval images from %s", len(y_train), len(y_test), raw)
    info = DatasetInfo("mnist", 10, 1, size)
    return TensorImageDataset(x_train, y_train), TensorImageDataset(x_test, y_test), info


def _load_cifar(
    name: str, root: Path, download: bool, seed: int, val_fraction: float, img_size: int | None, augment: str
) -> tuple[Dataset, Dataset, DatasetInfo]:
    from torchvision.datasets import CIFAR10, CIFAR100

    folder = root / _CIFAR_FOLDERS[name]
    if not folder.is_dir() and not download:
        raise FileNotFoundError(
            f"{name} not found: expected the extracted python version of the dataset in "
            f"{folder}/ (torchvision layout). Pass download=True (needs network access) "
            "or extract the archive there."
        )
    cls = CIFAR10 if name == "cifar10" else CIFAR100
    try:
        train_raw = cls(str(root), train=True, download=download)
        test_raw = cls(str(root), train=False, download=False)
    except RuntimeError as exc:  # torchvision's "not found or corrupted" integrity failure
        raise FileNotFoundError(f"{name}: files in {folder}/ are missing or corrupted ({exc})") from exc

    def as_tensors(ds: Any) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.from_numpy(np.asarray(ds.data)).permute(0, 3, 1, 2).contiguous()
        return images, torch.as_tensor(ds.targets, dtype=torch.long)

    x_train, y_train = as_tensors(train_raw)
    x_test, y_test = as_tensors(test_raw)
    if val_fraction > 0:
        tr, va = stratified_split(y_train, val_fraction, seed)
        x_test, y_test = x_train[va], y_train[va]
        x_train, y_train = x_train[tr], y_train[tr]
    mean, std = _CIFAR_STATS[name]
    size = img_size if img_size is not None else 32
    resize_to = None if size == 32 else size
    train = AugmentedImageDataset(x_train, y_train, mean, std, augment=augment == "crop_flip", img_size=resize_to)
    test = AugmentedImageDataset(x_test, y_test, mean, std, augment=False, img_size=resize_to)
    num_classes = 10 if name == "cifar10" else 100
    logger.info("%s: %d train / %d eval images from %s", name, len(train), len(test), folder)
    return train, test, DatasetInfo(name, num_classes, 3, size)


def _npz_layout(name: str, shape: tuple[int, ...], layout: str) -> str:
    """``"nhwc"`` or ``"nchw"`` for a 4-D array of ``shape`` (``layout`` may be ``"auto"``)."""
    if layout != "auto":
        return layout
    first, last = shape[1] in _NPZ_CHANNELS, shape[-1] in _NPZ_CHANNELS
    if first and not last:
        return "nchw"
    if last and not first:
        return "nhwc"
    if first and last:  # e.g. 3 x 3 x 3 images: only one reading may give square images
        nhwc_square, nchw_square = shape[1] == shape[2], shape[2] == shape[3]
        if nhwc_square != nchw_square:
            return "nhwc" if nhwc_square else "nchw"
    raise ValueError(
        f"npz: cannot tell the layout of {name} with shape {shape} (channels first or last?); "
        "state it with `--set data.layout=nhwc` or `--set data.layout=nchw`"
    )


def _npz_images(name: str, array: np.ndarray, layout: str) -> torch.Tensor:
    """``N x C x H x W`` tensor (uint8 kept, floats as float32) from an NHWC/NCHW/NHW array."""
    if array.dtype != np.uint8 and not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"npz: {name} must be uint8 (0..255) or floating, got dtype {array.dtype}")
    if array.ndim == 3:  # N x H x W: one channel
        array = array[:, None, :, :]
    elif array.ndim == 4:
        if _npz_layout(name, tuple(array.shape), layout) == "nhwc":
            array = array.transpose(0, 3, 1, 2)
    else:
        raise ValueError(
            f"npz: {name} must be N x H x W x C, N x C x H x W or N x H x W, got shape {tuple(array.shape)}"
        )
    if array.shape[0] == 0 or min(array.shape[2:]) < 1:
        raise ValueError(f"npz: {name} holds no images (shape {tuple(array.shape)} as N x C x H x W)")
    if array.shape[2] != array.shape[3]:
        raise ValueError(
            f"npz: {name} images must be square (the models take one img_size), got "
            f"{array.shape[2]} x {array.shape[3]} (as N x C x H x W; wrong data.layout?)"
        )
    out = np.ascontiguousarray(array if array.dtype == np.uint8 else array.astype(np.float32, copy=False))
    if out.dtype != np.uint8 and not np.isfinite(out).all():
        raise ValueError(f"npz: {name} contains NaN or infinite values")
    return torch.from_numpy(out)


def _npz_labels(name: str, array: np.ndarray, count: int, images_name: str) -> torch.Tensor:
    if array.ndim != 1:
        raise ValueError(f"npz: {name} must be a 1-D array of class indices, got shape {tuple(array.shape)}")
    if array.shape[0] != count:
        raise ValueError(f"npz: {name} has {array.shape[0]} labels but {images_name} has {count} images")
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)) or not np.all(array == np.round(array)):
            raise ValueError(f"npz: {name} must hold integer class indices, got non-integer values")
    elif not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"npz: {name} must hold integer class indices, got dtype {array.dtype}")
    labels = torch.from_numpy(np.asarray(array, dtype=np.int64))
    if labels.numel() and int(labels.min()) < 0:
        raise ValueError(f"npz: {name} has a negative label ({int(labels.min())}); labels must be 0..K-1")
    return labels


def load_npz_arrays(
    path: str | os.PathLike[str], layout: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Read and check ``x_train``, ``y_train`` and optional ``x_test``, ``y_test`` from ``path``.

    Returns ``(x_train, y_train, x_test, y_test)`` with images as ``N x C x H x W`` tensors
    (uint8 stays uint8, floats become float32) and labels as int64; the test pair is None
    when the file has none. Raises ``FileNotFoundError`` for a missing file and
    ``ValueError`` naming the array and the fix for any other problem.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"data.layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(
            f"npz file not found: {file}. Give the path of a .npz file holding x_train and y_train "
            "(optionally x_test and y_test) with `--set data.root=FILE.npz`"
        )
    try:
        archive = np.load(file, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ValueError(f"npz: cannot read {file} as a numpy .npz archive ({exc})") from exc
    with archive:
        keys = set(archive.files)
        missing = [k for k in ("x_train", "y_train") if k not in keys]
        if missing:
            raise ValueError(
                f"npz: {file} lacks {', '.join(missing)} (it holds: {', '.join(sorted(keys)) or 'nothing'}); "
                "save it with numpy.savez(FILE, x_train=images, y_train=labels[, x_test=..., y_test=...])"
            )
        if ("x_test" in keys) != ("y_test" in keys):
            have, lack = ("x_test", "y_test") if "x_test" in keys else ("y_test", "x_test")
            raise ValueError(f"npz: {file} holds {have} but not {lack}; give both or neither")
        x_train = _npz_images("x_train", archive["x_train"], layout)
        y_train = _npz_labels("y_train", archive["y_train"], x_train.shape[0], "x_train")
        x_test = y_test = None
        if "x_test" in keys:
            x_test = _npz_images("x_test", archive["x_test"], layout)
            y_test = _npz_labels("y_test", archive["y_test"], x_test.shape[0], "x_test")
            if x_test.shape[1:] != x_train.shape[1:]:
                raise ValueError(
                    f"npz: x_test images are {tuple(x_test.shape[1:])} (C x H x W) but x_train images are "
                    f"{tuple(x_train.shape[1:])}; both splits need the same channels and size"
                )
            if x_test.dtype != x_train.dtype:
                raise ValueError(f"npz: x_test is {x_test.dtype} but x_train is {x_train.dtype}; use one dtype")
            top = int(y_train.max())
            if int(y_test.max()) > top:
                raise ValueError(
                    f"npz: y_test has label {int(y_test.max())} but y_train's labels stop at {top}; "
                    "every test class must occur in the training labels"
                )
    return x_train, y_train, x_test, y_test


def channel_stats(images: torch.Tensor, chunk: int = 4096) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of ``N x C x H x W`` images, in float64.

    uint8 images are measured on the [0, 1] scale (as :class:`AugmentedImageDataset` sees
    them). Summed over chunks of ``chunk`` images so no float copy of the whole set exists.
    """
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"channel_stats expects N x C x H x W images with N >= 1, got {tuple(images.shape)}")
    scale = 255.0 if images.dtype == torch.uint8 else 1.0
    chans = images.shape[1]
    total = torch.zeros(chans, dtype=torch.float64)
    total_sq = torch.zeros(chans, dtype=torch.float64)
    for start in range(0, images.shape[0], chunk):
        block = images[start : start + chunk].to(torch.float64) / scale
        total += block.sum(dim=(0, 2, 3))
        total_sq += block.square().sum(dim=(0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / count
    var = (total_sq / count - mean.square()).clamp_min(0.0)
    # A constant channel would divide by zero: leave it unscaled.
    std = torch.where(var > 0, var.sqrt(), torch.ones_like(var))
    return mean.tolist(), std.tolist()


def _load_npz(
    root: Path, seed: int, val_fraction: float, img_size: int | None, augment: str, layout: str
) -> tuple[Dataset, Dataset, DatasetInfo]:
    x_train, y_train, x_test, y_test = load_npz_arrays(root, layout)
    eval_split = "test"
    if val_fraction > 0:
        tr, va = stratified_split(y_train, val_fraction, seed)
        x_test, y_test = x_train[va], y_train[va]
        x_train, y_train = x_train[tr], y_train[tr]
        eval_split = "validation split"
    elif x_test is None or y_test is None:
        raise ValueError(
            f"npz: {root} has no x_test/y_test, so there is nothing to evaluate on; hold out part of the "
            "training arrays with `--set data.val_fraction=0.1` or add x_test and y_test to the file"
        )
    # Statistics from the training part only, so the evaluation images stay unseen.
    mean, std = channel_stats(x_train)
    size = int(x_train.shape[-1])
    resize_to = None if img_size is None or img_size == size else img_size
    num_classes = int(torch.cat([y_train, y_test]).max()) + 1
    train = AugmentedImageDataset(x_train, y_train, mean, std, augment=augment == "crop_flip", img_size=resize_to)
    test = AugmentedImageDataset(x_test, y_test, mean, std, augment=False, img_size=resize_to)
    logger.info(
        "npz: %d train / %d %s images (%d classes) from %s", len(train), len(test), eval_split, num_classes, root
    )
    info = DatasetInfo("npz", num_classes, int(x_train.shape[1]), resize_to or size, eval_split)
    return train, test, info


def _load_imagefolder(
    root: Path, seed: int, val_fraction: float, img_size: int | None
) -> tuple[Dataset, Dataset, DatasetInfo]:
    from torchvision import transforms
    from torchvision.datasets import ImageFolder

    train_dir, val_dir = root / "train", root / "val"
    missing = [str(d) for d in (train_dir, val_dir) if not d.is_dir()]
    if missing:
        raise FileNotFoundError(
            "imagefolder expects ROOT/train/<class>/<image> and ROOT/val/<class>/<image>; "
            f"missing: {', '.join(missing)}"
        )
    size = img_size if img_size is not None else 32
    tf = transforms.Compose(
        [
            transforms.Resize((size, size)),
            transforms.ToTensor(),
            transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
        ]
    )
    train = ImageFolder(str(train_dir), transform=tf)
    test = ImageFolder(str(val_dir), transform=tf)
    if train.classes != test.classes:
        raise ValueError(f"class folders differ between {train_dir} ({train.classes}) and {val_dir} ({test.classes})")
    num_classes = len(train.classes)
    train_ds: Dataset = train
    test_ds: Dataset = test
    if val_fraction > 0:
        tr, va = stratified_split(torch.as_tensor(train.targets, dtype=torch.long), val_fraction, seed)
        train_ds, test_ds = Subset(train, tr.tolist()), Subset(train, va.tolist())
    return train_ds, test_ds, DatasetInfo("imagefolder", num_classes, 3, size)


def _load_synthetic(
    seed: int, synthetic_size: int, val_fraction: float, img_size: int | None
) -> tuple[Dataset, Dataset, DatasetInfo]:
    if synthetic_size < 4:
        raise ValueError(f"synthetic_size must be >= 4, got {synthetic_size}")
    num_classes, chans = 4, 3
    size = img_size if img_size is not None else 16
    gen = torch.Generator().manual_seed(seed)
    # Smooth (upsampled) prototypes so the class signal survives conv + pooling.
    coarse = max(2, size // 4)
    protos = _resize(torch.randn(num_classes, chans, coarse, coarse, generator=gen), size)
    protos = protos / protos.flatten(1).std(dim=1).view(-1, 1, 1, 1)

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=gen)]
        noise = torch.randn(n, chans, size, size, generator=gen)
        return protos[labels] + 0.5 * noise, labels

    x_train, y_train = sample(synthetic_size)
    x_test, y_test = sample(synthetic_size // 4)
    if val_fraction > 0:
        tr, va = stratified_split(y_train, val_fraction, seed)
        x_test, y_test = x_train[va], y_train[va]
        x_train, y_train = x_train[tr], y_train[tr]
    info = DatasetInfo("synthetic", num_classes, chans, size)
    return TensorImageDataset(x_train, y_train), TensorImageDataset(x_test, y_test), info


def _subset(train: Dataset, count: int, seed: int) -> Dataset:
    targets = getattr(train, "targets", None)
    if not isinstance(targets, torch.Tensor):
        raise ValueError(
            "train_subset needs a dataset with a targets tensor (digits, mnist, cifar10, "
            "cifar100, synthetic, npz); imagefolder is not supported"
        )
    total = int(targets.numel())
    if count >= total:
        logger.info("train_subset=%d >= %d training images: using all", count, total)
        return train
    # The "validation" part of a stratified split with fraction count/total is the subset; a
    # different seed offset keeps it independent of the validation hold-out's draw.
    _, keep = stratified_split(targets, count / total, seed + 7919)
    logger.info("train_subset: %d of %d training images (stratified, seed %d)", keep.numel(), total, seed)
    return Subset(train, keep.tolist())


def load_dataset(
    name: str,
    root: str | os.PathLike[str] | None = None,
    *,
    download: bool = False,
    seed: int = 0,
    synthetic_size: int = 512,
    val_fraction: float = 0.0,
    img_size: int | None = None,
    augment: str | None = None,
    layout: str = "auto",
    train_subset: int | None = None,
) -> tuple[Dataset, Dataset, DatasetInfo]:
    """Load ``name`` and return ``(train, test, info)``.

    With ``val_fraction > 0`` the second dataset is a seeded, stratified hold-out
    of the training split (the test set is left untouched), for hyper-parameter
    search, and ``info.eval_split`` is ``"validation split"``. ``img_size`` resizes
    images when it differs from the native size. ``augment`` (``crop_flip`` or
    ``none``; None: ``crop_flip`` for cifar10/cifar100, ``none`` otherwise) applies to
    the training images of ``cifar10``, ``cifar100`` and ``npz``. ``layout`` (``auto``,
    ``nhwc``, ``nchw``) is how ``npz`` arrays store their channels. ``train_subset``
    keeps a seeded, stratified share of about that many training images (each class
    rounded to the nearest image), drawn after the validation hold-out, for short
    experiments; the evaluation images are unchanged.
    """
    key = name.lower()
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    _check_img_size(img_size)
    if augment is not None and augment not in AUGMENTATIONS:
        raise ValueError(f"augment must be one of {', '.join(AUGMENTATIONS)} (or None), got {augment!r}")
    if augment == "crop_flip" and key not in ("cifar10", "cifar100", "npz"):
        raise ValueError(
            f"augment='crop_flip' is available for cifar10, cifar100 and npz, not {key!r}; "
            "use augment='none' (or leave it unset)"
        )
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if train_subset is not None and (
        isinstance(train_subset, bool) or not isinstance(train_subset, int) or train_subset < 1
    ):
        raise ValueError(f"train_subset must be a positive int or None, got {train_subset!r}")
    if layout != "auto" and key != "npz":
        raise ValueError(f"layout applies to npz arrays only; dataset {key!r} has a fixed layout (leave it 'auto')")
    chosen = augment if augment is not None else ("crop_flip" if key in _CIFAR_FOLDERS else "none")
    result: tuple[Dataset, Dataset, DatasetInfo]
    if key == "digits":
        result = _load_digits(seed, val_fraction, img_size)
    elif key == "synthetic":
        result = _load_synthetic(seed, synthetic_size, val_fraction, img_size)
    else:
        path = _require_root(key, root)
        if key == "mnist":
            result = _load_mnist(path, download, seed, val_fraction, img_size)
        elif key in _CIFAR_FOLDERS:
            result = _load_cifar(key, path, download, seed, val_fraction, img_size, chosen)
        elif key == "npz":
            result = _load_npz(path, seed, val_fraction, img_size, chosen, layout)
        else:
            result = _load_imagefolder(path, seed, val_fraction, img_size)
    train, test, info = result
    if train_subset is not None:
        train = _subset(train, train_subset, seed)
    if val_fraction > 0:
        info = dataclasses.replace(info, eval_split="validation split")
    return train, test, info


def make_loaders(
    train: Dataset,
    test: Dataset,
    *,
    batch_size: int,
    device: torch.device | str = "cpu",
    num_workers: int | None = None,
    seed: int = 0,
    drop_last: bool = False,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[DataLoader, DataLoader]:
    """Return ``(train_loader, test_loader)``; train is shuffled by a generator seeded with ``seed``.

    With ``world_size > 1`` (a data-parallel job) rank ``rank`` reads its own part of both sets:
    the train loader draws through a ``DistributedSampler`` (one permutation per epoch shared by
    the ranks, see ``set_epoch``; ``batch_size`` is per rank), and the test loader reads indices
    ``rank, rank + world_size, ...`` without padding, so summed counts are exact.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank {rank} of {world_size}")
    on_cuda = torch.device(device).type == "cuda"
    if num_workers is None:
        # Workers only pay off when the host must keep a GPU busy; on CPU they compete with training.
        num_workers = min(8, os.cpu_count() or 1) if on_cuda else 0
    common: dict[str, Any] = {
        "batch_size": batch_size,
        "num_workers": num_workers,
        "pin_memory": on_cuda,
        "persistent_workers": num_workers > 0,
    }
    if world_size > 1:
        sampler: DistributedSampler[Any] = DistributedSampler(
            train, num_replicas=world_size, rank=rank, shuffle=True, seed=seed
        )
        train_loader = DataLoader(train, sampler=sampler, drop_last=drop_last, **common)
        test = Subset(test, range(rank, len(test), world_size))  # type: ignore[arg-type]
    else:
        train_loader = DataLoader(
            train,
            shuffle=True,
            drop_last=drop_last,
            generator=torch.Generator().manual_seed(seed),
            **common,
        )
    test_loader = DataLoader(test, shuffle=False, drop_last=False, **common)
    return train_loader, test_loader


def to_device(batch: T, device: torch.device | str, non_blocking: bool = True) -> T:
    """Move every tensor in a (nested) tuple/list/dict batch to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)  # type: ignore[return-value]
    if isinstance(batch, Mapping):
        return type(batch)({k: to_device(v, device, non_blocking) for k, v in batch.items()})  # type: ignore[call-arg]
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(to_device(v, device, non_blocking) for v in batch))  # type: ignore[return-value]
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device, non_blocking) for v in batch)  # type: ignore[return-value]
    return batch
