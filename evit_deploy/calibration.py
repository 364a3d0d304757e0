"""Calibration images: what an int8 quantizer measures activation ranges on.

Every target that quantizes activations (onnxruntime's static quantization, Core ML's
W8A8, and the OpenVINO, LiteRT and ExecuTorch quantizers to come) calibrates on the same
images, prepared the same way as the images the artifact will see: resized and
centre-cropped by :mod:`evit_deploy.preprocess`, then handed over as numpy batches in
whatever input format the quantized program takes (``normalized``, ``float01``,
``uint8``). Torch-free.

The default set is the bundled photos plus seeded crops and mirror images of them: enough
to exercise the pipeline, but int8 scales fit the images they were measured on, so an
app's own kind of images (``--calibration DIR``) is what a shipped artifact should use.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import BadInputError
from .preprocess import Preprocessing, find_images, load_image, resize_crop, sample_images, to_input

#: Seeded crops added to the bundled photos in the default set (4 + 28 = 32 images).
DEFAULT_CROPS = 28
#: A calibration directory with more images is sampled (seeded) down to this many:
#: activation ranges settle long before (onnxruntime's and coremltools' examples use
#: tens to a few hundred images), and every image is one more inference at export.
MAX_IMAGES = 256
#: Batch of a dynamic-batch program's calibration runs.
DYNAMIC_BATCH = 16

DEFAULT_WARNING = ("int8 calibration on the bundled photos and seeded crops of them: activation ranges fit the "
                   "images they are measured on, so pass --calibration DIR with images like the ones the app "
                   "will see")


@dataclass(frozen=True)
class CalibrationSet:
    """Calibration images at a model's input size, ready to become batches."""

    images: np.ndarray          # uint8, N x H x W x 3 (RGB), already resized and cropped
    names: tuple[str, ...]
    source: str                 # the directory, or "default"

    @property
    def is_default(self) -> bool:
        return self.source == "default"

    @property
    def sha256(self) -> str:
        """The pixels calibrated on: recorded in artifacts, so a re-export is traceable."""
        return hashlib.sha256(np.ascontiguousarray(self.images).tobytes()).hexdigest()

    def describe(self) -> dict:
        """What an artifact's description records about its calibration."""
        return {"source": self.source, "images": len(self.images), "sha256": self.sha256}

    def batches(self, spec: Preprocessing, input_format: str, batch: int | None) -> Iterator[np.ndarray]:
        """The images as NCHW batches in ``input_format``. A fixed-batch program gets full
        batches only: the last one is completed with images from the start of the set
        (which moves no min/max and barely any histogram); ``batch=None`` (a dynamic
        batch) gives batches of :data:`DYNAMIC_BATCH`."""
        size = batch or DYNAMIC_BATCH
        count = len(self.images)
        if batch is not None and count % batch:
            count += batch - count % batch
        order = np.arange(count) % len(self.images)
        for start in range(0, count, size):
            yield to_input(self.images[order[start:start + size]], spec, input_format)


def check_directory(directory) -> None:
    """Raise :class:`BadInputError` unless ``directory`` holds images (before any export)."""
    find_images(directory)


def check_request(precision: str, directory, *, target: str) -> None:
    """A calibration directory is for int8 only: for any other precision it would be
    silently ignored, so it is refused."""
    if directory is None:
        return
    if precision != "int8":
        raise BadInputError(f"--calibration is for --precision int8 (target '{target}' was asked for {precision})")
    check_directory(directory)


def calibration_set(spec: Preprocessing, directory=None, *, seed: int = 0,
                    max_images: int = MAX_IMAGES) -> CalibrationSet:
    """The images in ``directory`` (and its subdirectories), or the default set."""
    if directory is None:
        return _default_set(spec, seed)
    paths = find_images(directory)
    if len(paths) > max_images:
        keep = np.sort(np.random.default_rng(seed).choice(len(paths), max_images, replace=False))
        paths = [paths[i] for i in keep]
    root = Path(directory)
    images = np.stack([resize_crop(load_image(p), spec) for p in paths])
    return CalibrationSet(images, tuple(p.relative_to(root).as_posix() for p in paths), str(directory))


def for_export(spec: Preprocessing, directory, reporter) -> CalibrationSet:
    """The set an int8 export calibrates on: the images in ``directory``, or the default
    set, of which :data:`DEFAULT_WARNING` warns ``reporter``."""
    if directory is None:
        reporter.warn(DEFAULT_WARNING)
    return calibration_set(spec, directory)


def _default_set(spec: Preprocessing, seed: int) -> CalibrationSet:
    """The bundled photos, then seeded crops of them (a random part of 30-100% of each
    side, mirrored half of the time) resized and cropped like any input."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    photos = [(p.stem, load_image(p)) for p in sample_images()]
    images = [resize_crop(img, spec) for _, img in photos]
    names = [name for name, _ in photos]
    for i in range(DEFAULT_CROPS):
        name, img = photos[i % len(photos)]
        w, h = img.size
        cw, ch = int(w * rng.uniform(0.3, 1.0)), int(h * rng.uniform(0.3, 1.0))
        left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        crop = img.crop((left, top, left + cw, top + ch))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        images.append(resize_crop(crop, spec))
        names.append(f"{name}-crop-{i}")
    return CalibrationSet(np.stack(images), tuple(names), "default")

