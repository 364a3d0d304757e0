"""The images artifacts are checked on: seeded noise, the bundled photos, the user's own.

Parity (:mod:`evit_deploy.parity`) runs every artifact on these; targets use them too
(Core ML's fp16 drift is measured on the photos). Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .preprocess import Preprocessing, list_images, load_image, resize_crop, sample_images


@dataclass(frozen=True)
class SampleImage:
    name: str
    kind: str               # "noise" | "photo" | "user"
    image: np.ndarray       # uint8 HWC RGB at the model's input size


def sample_inputs(spec: Preprocessing, *, images_dir=None, noise: int = 4, seed: int = 0,
                  photos: bool = True) -> list[SampleImage]:
    """Seeded noise images, the bundled photos, and any user images, at the model's size."""
    rng = np.random.default_rng(seed)
    inputs = []
    for i in range(noise):
        if i % 2 == 0:
            img = rng.integers(0, 256, (spec.height, spec.width, 3), dtype=np.uint8)
        else:
            # Smooth noise: natural images are mostly low-frequency, uniform noise is not.
            coarse = rng.random((max(2, spec.height // 16), max(2, spec.width // 16), 3))
            img = np.kron(coarse, np.ones((16, 16, 1)))[:spec.height, :spec.width]
            img = np.pad(img, ((0, spec.height - img.shape[0]), (0, spec.width - img.shape[1]), (0, 0)),
                         mode="edge")
            img = (img * 255).round().astype(np.uint8)
        inputs.append(SampleImage(f"noise-{i}", "noise", img))
    if photos:
        for path in sample_images():
            inputs.append(SampleImage(path.stem, "photo", resize_crop(load_image(path), spec)))
    if images_dir is not None:
        for path in list_images(images_dir):
            inputs.append(SampleImage(path.name, "user", resize_crop(load_image(path), spec)))
    return inputs
