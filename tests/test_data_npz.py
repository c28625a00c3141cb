"""The ``npz`` dataset kind: users' own arrays (layouts, dtypes, stratified hold-out, normalisation, errors)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from nni_steppingnet.config import RecipeError, load_recipe
from nni_steppingnet.data import channel_stats, load_dataset, load_npz_arrays, stratified_split


def _arrays(
    n: int = 60, size: int = 8, chans: int = 3, classes: int = 3, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(n, size, size, chans), dtype=np.uint8)  # NHWC
    y = (np.arange(n) % classes).astype(np.int64)
    return x, y


def _write(tmp_path: Path, name: str = "d.npz", **arrays: np.ndarray) -> Path:
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


def _images(ds: torch.utils.data.Dataset) -> torch.Tensor:
    return torch.stack([ds[i][0] for i in range(len(ds))])


def _labels(ds: torch.utils.data.Dataset) -> torch.Tensor:
    return torch.tensor([ds[i][1] for i in range(len(ds))])


@pytest.mark.parametrize("layout", ["nhwc", "nchw", "auto"])
def test_layouts_give_the_same_images(tmp_path: Path, layout: str) -> None:
    x, y = _arrays()
    ref_train, ref_test, _ = load_dataset(
        "npz", _write(tmp_path, "a.npz", x_train=x, y_train=y, x_test=x[:9], y_test=y[:9])
    )
    stored = x if layout != "nchw" else x.transpose(0, 3, 1, 2)
    path = _write(tmp_path, "b.npz", x_train=stored, y_train=y, x_test=stored[:9], y_test=y[:9])
    train, test, info = load_dataset("npz", path, layout=layout)
    assert (info.num_classes, info.in_chans, info.img_size, info.eval_split) == (3, 3, 8, "test")
    assert torch.equal(_images(train), _images(ref_train))
    assert torch.equal(_images(test), _images(ref_test))
    # channel c of sample 0 is the stored NHWC plane x[0, :, :, c]
    stats_mean, stats_std = channel_stats(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
    expected = (
        torch.from_numpy(x[0].transpose(2, 0, 1).copy()).float() / 255.0 - torch.tensor(stats_mean).view(3, 1, 1)
    ) / torch.tensor(stats_std).view(3, 1, 1)
    assert torch.allclose(train[0][0], expected, atol=1e-6)


def test_grayscale_nhw_arrays_get_one_channel(tmp_path: Path) -> None:
    x, y = _arrays(chans=1)
    path = _write(tmp_path, x_train=x[..., 0], y_train=y, x_test=x[:6, ..., 0], y_test=y[:6])
    train, _, info = load_dataset("npz", path)
    assert info.in_chans == 1 and train[0][0].shape == (1, 8, 8)


def test_float_arrays_are_normalised_in_their_own_scale(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    x = (rng.normal(5.0, 3.0, size=(40, 2, 6, 6))).astype(np.float64)  # NCHW floats, any scale
    y = (np.arange(40) % 4).astype(np.int64)
    train, _, info = load_dataset("npz", _write(tmp_path, x_train=x, y_train=y, x_test=x[:8], y_test=y[:8]))
    images = _images(train)
    assert images.dtype == torch.float32 and info.in_chans == 2
    # per-channel statistics of the training images become 0 / 1 exactly
    assert torch.allclose(images.mean(dim=(0, 2, 3)), torch.zeros(2), atol=1e-5)
    assert torch.allclose(images.std(dim=(0, 2, 3), unbiased=False), torch.ones(2), atol=1e-5)


def test_uint8_training_part_normalises_to_zero_mean_unit_std(tmp_path: Path) -> None:
    x, y = _arrays(n=90)
    train, val, info = load_dataset("npz", _write(tmp_path, x_train=x, y_train=y), val_fraction=0.2, seed=3)
    images = _images(train)
    assert torch.allclose(images.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(images.std(dim=(0, 2, 3), unbiased=False), torch.ones(3), atol=1e-5)
    # the statistics come from the training part only: the held-out images are not exactly 0/1
    assert not torch.allclose(_images(val).mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert info.eval_split == "validation split"


def test_stratified_split_is_exact_seeded_and_disjoint(tmp_path: Path) -> None:
    x = np.zeros((103, 4, 4, 3), dtype=np.uint8)
    x[:, 0, 0, 0] = np.arange(103)  # identify each image by its first pixel
    counts = {0: 50, 1: 30, 2: 23}
    y = np.concatenate([np.full(c, k) for k, c in counts.items()]).astype(np.int64)
    path = _write(tmp_path, x_train=x, y_train=y)
    train, val, _ = load_dataset("npz", path, val_fraction=0.1, seed=7)
    val_labels = _labels(val)
    for k, c in counts.items():  # floor(n_c * 0.1 + 0.5) of every class
        assert int((val_labels == k).sum()) == int(np.floor(c * 0.1 + 0.5))
    assert len(train) + len(val) == 103

    def ids(ds: torch.utils.data.Dataset) -> set[int]:
        return {round(float(v), 4) for v in _images(ds)[:, 0, 0, 0]}  # normalised ids stay distinct

    assert not ids(train) & ids(val)
    again_train, again_val, _ = load_dataset("npz", path, val_fraction=0.1, seed=7)
    assert torch.equal(_images(again_val), _images(val))
    other, _ = stratified_split(torch.from_numpy(y), 0.1, 8)
    first, _ = stratified_split(torch.from_numpy(y), 0.1, 7)
    assert not torch.equal(other, first)


def test_augment_crop_flip_changes_training_images_only(tmp_path: Path) -> None:
    x, y = _arrays(n=30)
    path = _write(tmp_path, x_train=x, y_train=y)
    train, val, _ = load_dataset("npz", path, val_fraction=0.2, augment="crop_flip")
    plain, plain_val, _ = load_dataset("npz", path, val_fraction=0.2, augment="none")
    torch.manual_seed(0)
    assert not torch.equal(_images(train), _images(plain))
    assert torch.equal(_images(val), _images(plain_val))
    plain_again, _, _ = load_dataset("npz", path, val_fraction=0.2)  # npz default: no augmentation
    assert torch.equal(_images(plain), _images(plain_again))


def test_train_subset_is_stratified(tmp_path: Path) -> None:
    x, y = _arrays(n=90)
    train, val, _ = load_dataset("npz", _write(tmp_path, x_train=x, y_train=y), val_fraction=0.2, train_subset=36)
    labels = _labels(train)
    assert len(train) == 36 and torch.equal(torch.bincount(labels), torch.tensor([12, 12, 12]))
    assert len(val) == 18


def test_recipe_runs_on_npz_through_overrides(tmp_path: Path) -> None:
    from nni_steppingnet.flow import build_data

    x, y = _arrays(n=40, size=32)
    path = _write(tmp_path, x_train=x, y_train=y)
    recipe = load_recipe(
        "lenet3c1l_cifar10", ["data.name=npz", f"data.root={path}", "data.val_fraction=0.25", "data.batch_size=8"]
    )
    assert recipe.data.augment == "crop_flip"
    train_loader, test_loader, info = build_data(recipe)
    assert info.eval_split == "validation split" and len(test_loader.dataset) == 10
    inputs, targets = next(iter(train_loader))
    assert inputs.shape == (8, 3, 32, 32) and targets.dtype == torch.long
    with pytest.raises(RecipeError, match="data.augment"):
        load_recipe("lenet3c1l_cifar10", ["data.augment=mixup"])
    with pytest.raises(RecipeError, match="data.layout"):
        load_recipe("lenet3c1l_cifar10", ["data.layout=hwc"])


# ------------------------------------------------------------------------------- errors
def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="npz file not found.*data.root"):
        load_dataset("npz", tmp_path / "nope.npz", val_fraction=0.1)
    with pytest.raises(ValueError, match="npz file"):
        load_dataset("npz", None)


def test_missing_keys(tmp_path: Path) -> None:
    x, y = _arrays()
    with pytest.raises(ValueError, match="lacks y_train .*holds: x_train"):
        load_npz_arrays(_write(tmp_path, x_train=x))
    with pytest.raises(ValueError, match="holds x_test but not y_test"):
        load_npz_arrays(_write(tmp_path, "b.npz", x_train=x, y_train=y, x_test=x))
    with pytest.raises(ValueError, match="nothing to evaluate on.*val_fraction"):
        load_dataset("npz", _write(tmp_path, "c.npz", x_train=x, y_train=y))


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x_train": np.zeros((10, 8), np.uint8)}, "must be N x H x W x C"),
        ({"x_train": np.zeros((10, 8, 8, 3, 1), np.uint8)}, "must be N x H x W x C"),
        ({"x_train": np.zeros((10, 8, 6, 3), np.uint8)}, "must be square"),
        ({"x_train": np.zeros((10, 3, 8, 3), np.uint8)}, "cannot tell the layout.*data.layout"),
        ({"x_train": np.zeros((10, 8, 8, 3), np.int32)}, "uint8 .* or floating"),
        ({"x_train": np.full((10, 8, 8, 3), np.nan, np.float32)}, "NaN"),
        ({"y_train": np.zeros(9, np.int64)}, "9 labels but x_train has 10"),
        ({"y_train": np.zeros((10, 1), np.int64)}, "1-D array"),
        ({"y_train": np.full(10, -1, np.int64)}, "negative label"),
        ({"y_train": np.full(10, 0.5)}, "integer class indices"),
        ({"x_test": np.zeros((4, 8, 8, 1), np.uint8), "y_test": np.zeros(4, np.int64)}, "same channels and size"),
        ({"x_test": np.zeros((4, 8, 8, 3), np.uint8), "y_test": np.full(4, 7, np.int64)}, "y_test has label 7"),
    ],
)
def test_bad_arrays(tmp_path: Path, arrays: dict[str, np.ndarray], message: str) -> None:
    base = {
        "x_train": np.zeros((10, 8, 8, 3), np.uint8),
        "y_train": np.arange(10) % 3,
        "x_test": np.zeros((4, 8, 8, 3), np.uint8),
        "y_test": np.arange(4) % 3,
    }
    base.update(arrays)
    with pytest.raises(ValueError, match=message):
        load_dataset("npz", _write(tmp_path, **base))


def test_bad_options(tmp_path: Path) -> None:
    x, y = _arrays()
    path = _write(tmp_path, x_train=x, y_train=y)
    with pytest.raises(ValueError, match="augment must be one of"):
        load_dataset("npz", path, val_fraction=0.1, augment="mixup")
    with pytest.raises(ValueError, match="layout must be one of"):
        load_dataset("npz", path, val_fraction=0.1, layout="hwc")
    with pytest.raises(ValueError, match="layout applies to npz"):
        load_dataset("digits", layout="nhwc")
    with pytest.raises(ValueError, match="crop_flip' is available for"):
        load_dataset("digits", augment="crop_flip")
    with pytest.raises(ValueError, match="train_subset must be a positive int"):
        load_dataset("npz", path, val_fraction=0.1, train_subset=0)
    with pytest.raises(ValueError, match="cannot read"):
        (tmp_path / "junk.npz").write_bytes(b"not a zip")
        load_dataset("npz", tmp_path / "junk.npz", val_fraction=0.1)
