"""Tests for nni_steppingnet.models and nni_steppingnet.data (offline, fast)."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from torch import nn

from nni_steppingnet import data as sdata
from nni_steppingnet import models as smodels

MODEL_SIZES: list[tuple[str, int]] = [
    ("lenet3c1l", 8),
    ("lenet3c1l", 32),
    ("lenet5", 28),
    ("lenet5", 32),
    ("vgg16_cifar", 32),
]
BASE_CONV_CHANNELS: dict[str, list[int]] = {
    "lenet3c1l": [32, 32, 64],
    "lenet5": [6, 16],
    "vgg16_cifar": [c for c in smodels.VGG16_CFG if isinstance(c, int)],
}


def _conv_out_channels(model: nn.Module) -> list[int]:
    return [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]


# --------------------------------------------------------------------------- models


@pytest.mark.parametrize("width", [1.0, 1.8])
@pytest.mark.parametrize(("name", "img_size"), MODEL_SIZES)
def test_model_builds_and_classifier_is_last(name: str, img_size: int, width: float) -> None:
    model = timm.create_model(name, num_classes=7, width=width, img_size=img_size, in_chans=3)
    model.eval()
    order: list[nn.Module] = []
    handles = [
        m.register_forward_hook(lambda mod, _inp, _out: order.append(mod))
        for m in model.modules()
        if len(list(m.children())) == 0
    ]
    with torch.no_grad():
        out = model(torch.randn(2, 3, img_size, img_size))
    for h in handles:
        h.remove()
    assert out.shape == (2, 7)
    classifier = model.get_classifier()
    assert isinstance(classifier, nn.Linear)
    assert classifier.out_features == 7 == model.num_classes
    assert order[-1] is classifier
    assert model.classifier is classifier


@pytest.mark.parametrize("name", sorted(BASE_CONV_CHANNELS))
def test_width_scales_channels(name: str) -> None:
    img = 32
    base = _conv_out_channels(timm.create_model(name, width=1.0, img_size=img))
    wide = _conv_out_channels(timm.create_model(name, width=1.8, img_size=img))
    assert base == BASE_CONV_CHANNELS[name]
    assert wide == [int(np.floor(c * 1.8 + 0.5)) for c in base]
    for b, w in zip(base, wide):
        assert abs(w / b - 1.8) <= 0.5 / b + 1e-9


def test_lenet5_hidden_width_and_in_chans() -> None:
    model = smodels.lenet5(num_classes=10, in_chans=1, img_size=28, width=2.0)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [m.out_features for m in linears] == [240, 168, 10]
    assert linears[0].in_features == 32 * 5 * 5
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)


def test_tiny_width_keeps_one_channel() -> None:
    model = smodels.lenet3c1l(width=0.001, img_size=8, in_chans=1)
    assert _conv_out_channels(model) == [1, 1, 1]
    assert model(torch.randn(1, 1, 8, 8)).shape == (1, 10)


@pytest.mark.parametrize("name", ["lenet3c1l", "lenet5", "vgg16_cifar"])
def test_model_argument_errors(name: str) -> None:
    with pytest.raises(ValueError, match="load_state_dict"):
        timm.create_model(name, pretrained=True)
    fn = getattr(smodels, name)
    with pytest.raises(TypeError, match="bogus_arg"):
        fn(bogus_arg=1)
    with pytest.raises(ValueError, match="width"):
        fn(width=0.0)


def test_img_size_too_small() -> None:
    with pytest.raises(ValueError, match="img_size"):
        smodels.lenet5(img_size=11)
    with pytest.raises(ValueError, match="img_size"):
        smodels.vgg16_cifar(img_size=16)
    with pytest.raises(ValueError, match="img_size"):
        smodels.lenet3c1l(img_size=3)


def test_reset_classifier() -> None:
    model = smodels.lenet3c1l(img_size=8, in_chans=1)
    model.reset_classifier(3)
    assert model.num_classes == 3
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 3)


# --------------------------------------------------------------------------- data


def test_digits_shapes_and_determinism() -> None:
    train, test, info = sdata.load_dataset("digits", seed=0)
    assert info == sdata.DatasetInfo("digits", 10, 1, 8)
    assert len(train) + len(test) == 1797
    assert len(test) == 360
    x, y = train[0]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32
    assert isinstance(y, int)
    assert set(train.targets.tolist()) == set(range(10))
    assert set(test.targets.tolist()) == set(range(10))
    # Normalised with training statistics.
    assert abs(float(train.images.mean())) < 1e-4
    assert abs(float(train.images.std()) - 1.0) < 1e-3

    train2, test2, _ = sdata.load_dataset("digits", seed=0)
    assert torch.equal(train.images, train2.images) and torch.equal(test.targets, test2.targets)
    train3, _, _ = sdata.load_dataset("digits", seed=1)
    assert not torch.equal(train.targets, train3.targets)


def test_digits_resize_and_val_fraction() -> None:
    train, val, info = sdata.load_dataset("digits", img_size=16, val_fraction=0.25)
    assert info.img_size == 16
    assert train[0][0].shape == (1, 16, 16)
    assert len(val) == pytest.approx(0.25 * (len(train) + len(val)), abs=10)


def test_synthetic_deterministic() -> None:
    a_train, a_test, info = sdata.load_dataset("synthetic", seed=3, synthetic_size=64)
    b_train, b_test, _ = sdata.load_dataset("synthetic", seed=3, synthetic_size=64)
    c_train, _, _ = sdata.load_dataset("synthetic", seed=4, synthetic_size=64)
    assert info == sdata.DatasetInfo("synthetic", 4, 3, 16)
    assert len(a_train) == 64 and len(a_test) == 16
    assert torch.equal(a_train.images, b_train.images) and torch.equal(a_test.targets, b_test.targets)
    assert not torch.equal(a_train.images, c_train.images)
    assert sdata.load_dataset("synthetic", img_size=8)[2].img_size == 8


def test_synthetic_is_learnable() -> None:
    torch.manual_seed(0)
    train, test, info = sdata.load_dataset("synthetic", seed=0, synthetic_size=256)
    model = nn.Sequential(
        nn.Conv2d(info.in_chans, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Linear(8 * 16, info.num_classes),
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loader, test_loader = sdata.make_loaders(train, test, batch_size=32, seed=0)
    for _ in range(3):
        for x, y in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    correct = 0
    with torch.no_grad():
        for x, y in test_loader:
            correct += int((model(x).argmax(1) == y).sum())
    assert correct / len(test) > 0.6  # chance is 0.25


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def test_mnist_from_fake_idx_files(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    train_x = rng.integers(0, 256, size=(20, 28, 28), dtype=np.uint8)
    train_y = np.arange(20) % 10
    test_x = rng.integers(0, 256, size=(10, 28, 28), dtype=np.uint8)
    test_y = np.arange(10)
    _write_idx(raw / "train-images-idx3-ubyte.gz", train_x)
    _write_idx(raw / "train-labels-idx1-ubyte.gz", train_y)
    _write_idx(raw / "t10k-images-idx3-ubyte.gz", test_x)
    _write_idx(raw / "t10k-labels-idx1-ubyte.gz", test_y)

    train, test, info = sdata.load_dataset("mnist", tmp_path)
    assert info == sdata.DatasetInfo("mnist", 10, 1, 28)
    assert len(train) == 20 and len(test) == 10
    x, y = train[3]
    assert x.shape == (1, 28, 28) and y == 3
    expected = (train_x[3].astype(np.float32) / 255.0 - 0.1307) / 0.3081
    np.testing.assert_allclose(x[0].numpy(), expected, rtol=1e-5, atol=1e-5)
    assert test.targets.tolist() == list(range(10))

    _, _, info32 = sdata.load_dataset("mnist", str(tmp_path), img_size=32)
    assert info32.img_size == 32


def test_mnist_missing_names_expected_paths(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as err:
        sdata.load_dataset("mnist", tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte.gz") in msg
    assert str(tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz") in msg
    assert "download=True" in msg


@pytest.mark.parametrize(("name", "folder"), [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python")])
def test_cifar_missing_names_folder(tmp_path: Path, name: str, folder: str) -> None:
    with pytest.raises(FileNotFoundError, match=folder) as err:
        sdata.load_dataset(name, tmp_path)
    assert str(tmp_path / folder) in str(err.value)


def test_augmented_dataset_shapes() -> None:
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    targets = torch.arange(6)
    ds = sdata.AugmentedImageDataset(images, targets, (0.5,) * 3, (0.25,) * 3, augment=True)
    torch.manual_seed(0)
    x, y = ds[2]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == 2
    plain = sdata.AugmentedImageDataset(images, targets, (0.5,) * 3, (0.25,) * 3, augment=False)
    expected = (images[2].float() / 255.0 - 0.5) / 0.25
    assert torch.allclose(plain[2][0], expected)


def test_imagefolder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="train"):
        sdata.load_dataset("imagefolder", tmp_path)
    from PIL import Image

    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (20, 12), color=(i * 100, 50, 200)).save(d / f"{i}.png")
    train, test, info = sdata.load_dataset("imagefolder", tmp_path, img_size=16)
    assert info == sdata.DatasetInfo("imagefolder", 2, 3, 16)
    assert len(train) == 4 and len(test) == 4
    assert train[0][0].shape == (3, 16, 16)


def test_bad_names_and_roots() -> None:
    with pytest.raises(ValueError) as err:
        sdata.load_dataset("imagenet-22k")
    for name in sdata.DATASETS:
        assert name in str(err.value)
    with pytest.raises(ValueError, match="data.root"):
        sdata.load_dataset("mnist")
    with pytest.raises(ValueError, match="val_fraction"):
        sdata.load_dataset("digits", val_fraction=1.0)


def test_make_loaders_seeded_and_to_device() -> None:
    train, test, _ = sdata.load_dataset("synthetic", synthetic_size=64)
    order: list[torch.Tensor] = []
    for _ in range(2):
        loader, test_loader = sdata.make_loaders(train, test, batch_size=16, seed=5)
        order.append(torch.cat([y for _, y in loader]))
        assert loader.num_workers == 0 and not loader.pin_memory
    assert torch.equal(order[0], order[1])
    loader, _ = sdata.make_loaders(train, test, batch_size=16, seed=6)
    assert not torch.equal(order[0], torch.cat([y for _, y in loader]))
    assert len(test_loader) == 1

    batch = {"x": torch.zeros(2), "pair": (torch.ones(1), [torch.ones(1)]), "n": 3}
    moved = sdata.to_device(batch, "cpu")
    assert moved["n"] == 3 and isinstance(moved["pair"], tuple) and isinstance(moved["pair"][1], list)
    assert moved["x"].device.type == "cpu"
