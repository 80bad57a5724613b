"""Small labelled image sets that install offline, with a held-out split the models never train on.

- ``digits``: scikit-learn's 1,797 8x8 handwritten digits (ships with the package).
- ``fashion_mnist``: 60,000 + 10,000 28x28 images from Debian's ``dataset-fashion-mnist``
  (``apt-get install dataset-fashion-mnist``; IDX files under /usr/share/datasets/fashion-mnist).

Pixels are scaled to [-1, 1], images are ``(N, 1, H, W)`` float32, labels int64. Diffusion teachers
memorise small sets, so sample quality is measured against the held-out split (FINDINGS.md).
"""
from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import ConfigError, choice, positive

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ("T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Boot")


@dataclass
class ImageDataConfig:
    source: str = "digits"  # digits | fashion_mnist
    held_out: int = 800  # digits: images drawn out of the 1,797 | fashion_mnist: first N of the test set (0 = all 10k)
    max_train: int = 0  # cap on training images (0 = all); tiny test runs
    split_seed: int = 0  # which digits are held out

    def validate(self) -> None:
        choice(self.source, ("digits", "fashion_mnist"), "data.source")
        positive(self.held_out, "data.held_out", allow_zero=self.source == "fashion_mnist")
        positive(self.max_train, "data.max_train", allow_zero=True)
        if self.source == "digits" and self.held_out >= 1797 - 10:
            raise ConfigError(f"data.held_out={self.held_out} leaves too few of the 1797 digits to train on")
        if self.source == "fashion_mnist" and not FASHION_MNIST_DIR.is_dir():
            raise ConfigError(f"data.source=fashion_mnist needs {FASHION_MNIST_DIR}: "
                              f"apt-get install dataset-fashion-mnist")


@dataclass
class ImageData:
    train_images: torch.Tensor  # (N, 1, H, W) in [-1, 1]
    train_labels: torch.Tensor  # (N,) int64
    held_out_images: torch.Tensor
    held_out_labels: torch.Tensor
    class_names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_images.shape[1:])

    def train_dict(self) -> dict:
        return {"images": self.train_images, "labels": self.train_labels}

    def held_out_dict(self) -> dict:
        return {"images": self.held_out_images, "labels": self.held_out_labels}


def _read_idx(path: Path) -> np.ndarray:
    """IDX format (LeCun's MNIST files): magic (dtype, ndim), big-endian dims, then raw bytes."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _to_tensor(pixels: np.ndarray, max_value: float) -> torch.Tensor:
    images = torch.from_numpy(pixels.astype(np.float32) / max_value * 2 - 1)
    return images.reshape(len(pixels), 1, *pixels.shape[-2:]) if images.ndim == 3 else images


def load_image_data(cfg: ImageDataConfig) -> ImageData:
    if cfg.source == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = _to_tensor(digits.images, 16.0)
        labels = torch.from_numpy(digits.target).long()
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(cfg.split_seed))
        held, train = order[:cfg.held_out], order[cfg.held_out:]
        data = ImageData(images[train], labels[train], images[held], labels[held], tuple(str(d) for d in range(10)))
    else:
        d = FASHION_MNIST_DIR
        test_x, test_y = _read_idx(d / "t10k-images-idx3-ubyte.gz"), _read_idx(d / "t10k-labels-idx1-ubyte.gz")
        n_held = cfg.held_out or len(test_x)
        data = ImageData(_to_tensor(_read_idx(d / "train-images-idx3-ubyte.gz"), 255.0),
                         torch.from_numpy(_read_idx(d / "train-labels-idx1-ubyte.gz").astype(np.int64)),
                         _to_tensor(test_x[:n_held], 255.0), torch.from_numpy(test_y[:n_held].astype(np.int64)),
                         FASHION_CLASSES)
    if cfg.max_train:
        data.train_images, data.train_labels = data.train_images[:cfg.max_train], data.train_labels[:cfg.max_train]
    return data
