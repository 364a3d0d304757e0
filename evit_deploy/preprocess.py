"""Image preprocessing (torch-free: PIL and numpy only).

EfficientViT's evaluation transform: resize the short side to ``crop / 0.875`` (256 for a
224 crop) with bicubic interpolation, centre-crop, scale to [0, 1] and normalise with the
ImageNet mean and std. Artifacts may take their input at any point of that chain
(see :data:`INPUT_FORMATS`); the rest happens inside the artifact.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .errors import BadInputError, first_line

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_FRACTION = 0.875

#: What an artifact's image input expects, NCHW in every case.
INPUT_FORMATS = {
    "normalized": "float32, ImageNet mean/std already applied (the PyTorch model's input)",
    "float01": "float32 RGB in [0, 1]; normalisation happens inside the artifact",
    "uint8": "uint8 RGB in [0, 255]; scaling and normalisation happen inside the artifact",
}

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass(frozen=True)
class Preprocessing:
    height: int
    width: int
    resize: int                          # short side before the centre crop
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bicubic"

    @classmethod
    def for_size(cls, height: int, width: int | None = None) -> "Preprocessing":
        width = height if width is None else width
        return cls(height, width, int(max(height, width) / CROP_FRACTION))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Preprocessing":
        return cls(int(data["height"]), int(data["width"]), int(data["resize"]),
                   tuple(data["mean"]), tuple(data["std"]), data.get("interpolation", "bicubic"))


def load_image(path: str | os.PathLike):
    """Open an image file as RGB, or raise a one-line :class:`BadInputError`.

    An image larger than Pillow's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``)
    is refused before it is decoded: a small file can claim gigapixels.
    """
    import warnings

    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"image not found: {path}")
    try:
        with warnings.catch_warnings():
            # Pillow only warns between the limit and twice the limit: refuse those too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
                return img.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadInputError(f"{path} is larger than Pillow's decompression-bomb limit of "
                            f"{Image.MAX_IMAGE_PIXELS} pixels (PIL.Image.MAX_IMAGE_PIXELS); refusing to decode "
                            f"it") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise BadInputError(f"{path} is not a readable image ({first_line(exc)})") from None


def resize_crop(img, spec: Preprocessing) -> np.ndarray:
    """Resize the short side and centre-crop: uint8 HWC RGB of ``spec``'s size."""
    from PIL import Image

    w, h = img.size
    scale = spec.resize / min(w, h)
    new_w, new_h = max(spec.width, round(w * scale)), max(spec.height, round(h * scale))
    img = img.resize((new_w, new_h), Image.BICUBIC)
    # torchvision's CenterCrop rounds the offset this way; keep it so crops match timm.
    top = int(round((new_h - spec.height) / 2.0))
    left = int(round((new_w - spec.width) / 2.0))
    img = img.crop((left, top, left + spec.width, top + spec.height))
    return np.asarray(img, dtype=np.uint8)


def to_input(images_hwc: np.ndarray, spec: Preprocessing, input_format: str) -> np.ndarray:
    """Batch of uint8 HWC images -> NCHW array in ``input_format``."""
    if input_format not in INPUT_FORMATS:
        raise BadInputError(f"unknown input format '{input_format}'; valid: {', '.join(INPUT_FORMATS)}")
    x = np.asarray(images_hwc)
    if x.ndim == 3:
        x = x[None]
    x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    if input_format == "uint8":
        return x.astype(np.uint8)
    x = x.astype(np.float32) / np.float32(255.0)
    if input_format == "normalized":
        mean = np.asarray(spec.mean, np.float32)[None, :, None, None]
        std = np.asarray(spec.std, np.float32)[None, :, None, None]
        x = (x - mean) / std
    return x.astype(np.float32)


def preprocess_file(path: str | os.PathLike, spec: Preprocessing, input_format: str = "normalized") -> np.ndarray:
    """One image file -> 1xCxHxW array ready for an artifact taking ``input_format``."""
    return to_input(resize_crop(load_image(path), spec), spec, input_format)


def _image_directory(directory: str | os.PathLike) -> Path:
    directory = Path(directory)
    if directory.is_file():
        raise BadInputError(f"{directory} is a file: give the directory that holds the images")
    if not directory.is_dir():
        raise BadInputError(f"image directory not found: {directory}")
    return directory


def list_images(directory: str | os.PathLike) -> list[Path]:
    directory = _image_directory(directory)
    files = sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise BadInputError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {directory}")
    return files


def find_images(directory: str | os.PathLike) -> list[Path]:
    """Every image below ``directory``, subdirectories included (the ImageNet validation
    layout ``DIR/<synset>/*.JPEG``), sorted by relative path; hidden files and folders are
    skipped. A missing or image-less directory is a :class:`BadInputError`."""
    directory = _image_directory(directory)
    files = sorted((p for p in directory.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                    and not any(part.startswith(".") for part in p.relative_to(directory).parts)),
                   key=lambda p: p.relative_to(directory).as_posix())
    if not files:
        raise BadInputError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {directory} or its subdirectories")
    return files


def sample_images() -> list[Path]:
    """The photos shipped with the package (cat, coffee, rocket, astronaut)."""
    from importlib import resources

    root = resources.files("evit_deploy.data").joinpath("images")
    return sorted(Path(str(p)) for p in root.iterdir() if Path(str(p)).suffix.lower() in IMAGE_SUFFIXES)
