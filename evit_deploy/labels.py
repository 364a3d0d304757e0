"""ImageNet-1k class names (torch-free)."""

from __future__ import annotations

from functools import lru_cache
from importlib import resources


def _rows() -> list[list[str]]:
    text = resources.files("evit_deploy.data").joinpath("imagenet1k_labels.tsv").read_text("utf-8")
    return sorted((line.split("\t") for line in text.splitlines()[1:] if line.strip()), key=lambda r: int(r[0]))


@lru_cache(maxsize=1)
def imagenet_synsets() -> tuple[str, ...]:
    """The WordNet ids of the 1000 classes in training-index order (``n01440764`` is 0):
    the folder names of ImageNet's validation set."""
    return tuple(row[1] for row in _rows())


@lru_cache(maxsize=1)
def imagenet_labels() -> tuple[str, ...]:
    """The 1000 class names in training-index order, e.g. ``labels[281] == 'tabby'``.

    The label column holds comma-separated WordNet lemmas; the first is the short name.
    Two short names occur twice ("crane" the bird and the machine, "maillot"): those get
    their WordNet id appended, because classifier outputs key probabilities by name.
    """
    rows = _rows()
    short = [row[2].split(",")[0].strip() for row in rows]
    labels = tuple(name if short.count(name) == 1 else f"{name} ({row[1]})"
                   for name, row in zip(short, rows))
    if len(labels) != 1000:
        raise RuntimeError(f"corrupt package data: {len(labels)} ImageNet labels instead of 1000")
    return labels


def labels_for(num_classes: int) -> tuple[str, ...]:
    """Class names for a classifier head: ImageNet's, or ``class_<i>`` for custom heads."""
    if num_classes == 1000:
        return imagenet_labels()
    return tuple(f"class_{i}" for i in range(num_classes))
