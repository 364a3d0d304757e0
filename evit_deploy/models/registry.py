"""The EfficientViT family: names, architectures and the paper's published figures.

Torch-free, so that the CLI can resolve names and print tables without importing torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import unknown_name

OFFICIAL_URL = "https://github.com/xinyuliu-jeffrey/EfficientViT_Model_Zoo/releases/download/v1.0/{name}.pth"


@dataclass(frozen=True)
class PaperFigures:
    """What the paper reports for a model: used for comparison, never as our own result."""

    top1: float                 # ImageNet-1k top-1 (%), Table 1
    params_m: float             # parameters (M), Table 1
    macs_m: float               # multiply-accumulates at 224x224 (M), Table 1
    cpu_torch_ips: float        # Xeon E5-2690 v4, PyTorch, batch 16, 1 thread (images/s), supp. Table 3
    cpu_tvm_ips: float          # same machine, TVM auto-tuned (images/s), supp. Table 3
    iphone11_ms: float | None   # Core ML latency on iPhone 11 (ms), where reported


@dataclass(frozen=True)
class Counts:
    """Our own model's size at 224x224 after BN folding, as :mod:`.counting` measures it.

    Stored so that listing the family needs no torch; ``tests/test_models.py`` counts
    every member again and holds these equal to what it finds.
    """

    params: int                 # parameters
    macs: int                   # multiply-accumulates of one image


@dataclass(frozen=True)
class ModelSpec:
    name: str                   # canonical: efficientvit_m4
    display_name: str           # EfficientViT-M4
    embed_dim: tuple[int, int, int]
    depth: tuple[int, int, int]
    num_heads: tuple[int, int, int]
    kernels: tuple[int, ...]
    paper: PaperFigures
    counts: Counts

    @property
    def short_name(self) -> str:
        return self.name.rsplit("_", 1)[-1]

    @property
    def official_url(self) -> str:
        return OFFICIAL_URL.format(name=self.name)


def _spec(idx, embed_dim, depth, num_heads, kernels, paper, counts) -> ModelSpec:
    return ModelSpec(f"efficientvit_m{idx}", f"EfficientViT-M{idx}", embed_dim, depth,
                     num_heads, kernels, paper, counts)


MODELS: dict[str, ModelSpec] = {s.name: s for s in [
    _spec(0, (64, 128, 192), (1, 2, 3), (4, 4, 4), (5, 5, 5, 5),
          PaperFigures(63.2, 2.3, 79, 228, 367, None), Counts(2334916, 79193600)),
    _spec(1, (128, 144, 192), (1, 2, 3), (2, 3, 3), (7, 5, 3, 3),
          PaperFigures(68.4, 3.0, 167, 127, 218, None), Counts(2964256, 167051840)),
    _spec(2, (128, 192, 224), (1, 2, 3), (4, 3, 2), (7, 5, 3, 3),
          PaperFigures(70.8, 4.2, 201, 121, 182, 5.23), Counts(4168338, 201035712)),
    _spec(3, (128, 240, 320), (1, 2, 3), (4, 3, 4), (5, 5, 5, 5),
          PaperFigures(73.4, 6.9, 263, 96, 142, None), Counts(6875890, 262662208)),
    _spec(4, (128, 256, 384), (1, 2, 3), (4, 4, 4), (7, 5, 3, 3),
          PaperFigures(74.3, 8.8, 299, 89, 126, 6.71), Counts(8776340, 299308544)),
    _spec(5, (192, 288, 384), (1, 3, 4), (3, 3, 4), (7, 5, 3, 3),
          PaperFigures(77.1, 12.4, 522, 57, 79, 8.64), Counts(12436260, 521583104)),
]}


def is_custom(model: str) -> bool:
    """Whether ``model`` names any ``nn.Module`` (``package.module:factory``) rather than a
    family member."""
    return ":" in str(model)


def list_models() -> list[str]:
    """Canonical names of the family, smallest first."""
    return list(MODELS)


def resolve_name(name: str) -> ModelSpec:
    """``m4``, ``M4``, ``efficientvit_m4``, ``EfficientViT-M4`` all name the same model."""
    key = re.sub(r"[\s_-]", "", str(name).lower())
    key = key.removeprefix("efficientvit")
    for spec in MODELS.values():
        if key == spec.short_name:
            return spec
    raise unknown_name("model", name, [s.short_name for s in MODELS.values()])
