"""Image (LRA): CIFAR-10 as a sequence of 1024 grayscale pixels, 10 classes.

Pixels, exactly as LRA's input pipeline (``tf.cast(tf.image.rgb_to_grayscale(image), tf.int32)``):
``tf.image.rgb_to_grayscale`` on a ``uint8`` image computes, in float32,

    f_c = float32(p_c) * float32(1/255)                      (convert_image_dtype to float)
    y   = (f_r * 0.2989 + f_g * 0.5870) + f_b * 0.1140        (tensordot with the luma weights)
    g   = uint8(truncate(y * 255.5))                           (convert_image_dtype back: scale by max + 0.5, cast)

The order of the float32 operations matters for 47 of the 2^24 colours; ``rgb_to_gray_lra`` reproduces
TensorFlow's result for every colour (the test compares the whole table). The 32x32 grey image is read
row by row (LRA flattens ``[32, 32, 1]`` with a reshape): token ``i = 32 * row + col``, value 0..255,
vocabulary 256. By default every position is a real pixel (``pad_id = None``: the mask is all true; 0 is
black, not padding). ``zero_pixel_is_padding=True`` reproduces the upstream harnesses' bug: LRA's encoders build
``src_padding_mask = inputs > 0`` from the ids for every task (lra_benchmarks/models/transformer/transformer.py)
and the Nyströmformer harness ``mask = ids != 0`` (LRA/code/dataset.py), so every black pixel is a
padded position (``mask = ids != 0``, built at batch time: the prepared arrays and the cache key are the same).

Splits, as LRA: train = the first 90% of CIFAR-10's train split (45,000), validation = its last 10%
(5,000), test = the test split (10,000). With ``source=tfds`` these are LRA's exact images (TFDS
``train[:90%]``/``train[90%:]``); Hugging Face's train split is in another order, so ``source=hub`` holds
out a different 10% (same sizes). Sources as for Text (``lra.data.text.HubDataModule``): ``hub`` =
Hugging Face ``cifar10`` (column ``img``), ``tfds`` = TFDS ``cifar10`` (LRA's source).
"""

from __future__ import annotations

import numpy as np

from lra.data.base import DataError
from lra.data.text import HubDataModule

SIDE = 32
LUMA = np.array([0.2989, 0.5870, 0.1140], dtype=np.float32)  # tf.image.rgb_to_grayscale's weights


def rgb_to_gray_lra(images: np.ndarray) -> np.ndarray:
    """``tf.image.rgb_to_grayscale`` of ``uint8`` images ``[..., 3]`` -> ``uint8`` ``[...]``, bit for bit."""
    f = images.astype(np.float32) * np.float32(1.0 / 255)
    y = (f[..., 0] * LUMA[0] + f[..., 1] * LUMA[1]) + f[..., 2] * LUMA[2]
    return (y * np.float32(255.5)).astype(np.uint8)  # float -> uint8 truncates, as tf.cast does


class ImageDataModule(HubDataModule):
    """CIFAR-10 grayscale pixels (see the module docstring). ``max_len`` must be 1024 (32 x 32).

    ``zero_pixel_is_padding``: pixel value 0 masked as padding (the upstream harnesses' bug; default: every
    pixel real).
    """

    name = "image"
    num_classes = 10
    vocab_size = 256
    pad_id = None
    hub_default = "cifar10"
    hub_input = "img"
    tfds_name = "cifar10"
    tfds_input = "image"

    def __init__(self, val_holdout_percent: int | None = 10, zero_pixel_is_padding: bool = False, **kwargs):
        super().__init__(val_holdout_percent=val_holdout_percent, **kwargs)
        self.pad_id = 0 if zero_pixel_is_padding else None  # masks are built at batch time: not a cache option
        if self.max_len != SIDE * SIDE:
            raise DataError(
                f"task.max_len={self.max_len} for image: CIFAR-10 images are {SIDE}x{SIDE} = {SIDE * SIDE} pixels, "
                f"so task.max_len must be {SIDE * SIDE} (cut batches shorter with data.seq_len if you must)."
            )

    def cache_options(self) -> dict:
        return {**super().cache_options(), "pixels": "tf.image.rgb_to_grayscale, row-major"}

    def hub_inputs(self, dataset):
        from datasets import Image

        dataset = dataset.cast_column(self.hub_input, Image(mode="RGB"))
        return dataset.with_format("numpy", columns=[self.hub_input])[:][self.hub_input]

    def encode(self, inputs, split: str) -> np.ndarray:
        images = np.asarray(inputs)
        if images.dtype != np.uint8 or images.shape[1:] != (SIDE, SIDE, 3):
            raise DataError(
                f"{self.where(split)}: expected {SIDE}x{SIDE} RGB uint8 images, got an array of "
                f"shape {images.shape[1:]} and dtype {images.dtype}. Use CIFAR-10 ('{self.hub_default}')."
            )
        return rgb_to_gray_lra(images).reshape(len(images), SIDE * SIDE)
