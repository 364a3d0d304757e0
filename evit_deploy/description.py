"""What an artifact is: the model, its weights and its input/output contract (torch-free).

Every exporter stores this description inside its artifact (ONNX ``metadata_props``,
Core ML user metadata, a JSON file beside a TVM library), so that ``run`` can feed the
artifact and ``verify`` can rebuild its PyTorch reference from the artifact alone.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields

from . import __version__
from .preprocess import INPUT_FORMATS, Preprocessing

RANDOM_INIT = "random-init"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int | str, ...]        # a str names a dynamic dimension, e.g. "batch"
    dtype: str = "float32"
    doc: str = ""

    @classmethod
    def from_dict(cls, data: dict) -> "TensorSpec":
        return cls(data["name"], tuple(data["shape"]), data.get("dtype", "float32"), data.get("doc", ""))


@dataclass(frozen=True)
class ModelDescription:
    model: str                           # efficientvit_m4, or package.module:factory
    display_name: str
    task: str                            # classification | detection
    weights: str                         # SHA-256 of the checkpoint file, or "random-init"
    seed: int | None                     # the random-init seed, to rebuild the reference
    model_options: dict                  # arguments that rebuilt the model (img_size, ...)
    input_format: str                    # a key of preprocess.INPUT_FORMATS
    preprocessing: Preprocessing
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    labels: tuple[str, ...] | None = None
    evit_deploy_version: str = __version__
    format_version: int = FORMAT_VERSION
    extra: dict = field(default_factory=dict)   # exporter-specific facts (precision, ...)

    def __post_init__(self):
        if self.input_format not in INPUT_FORMATS:
            raise ValueError(f"unknown input format {self.input_format!r}")

    @property
    def random_init(self) -> bool:
        return self.weights == RANDOM_INIT

    @property
    def input(self) -> TensorSpec:
        return self.inputs[0]

    @property
    def stem(self) -> str:
        """A file-name stem that tells artifacts of one model apart: efficientvit_m4,
        efficientvit_m4_maskrcnn_fpn, mypkg_models_mobilenet."""
        base = self.model.replace(":", "_").replace(".", "_")
        if self.task == "detection":
            return f"{base}_{self.model_options.get('neck', 'fpn')}_fpn"
        return base

    @property
    def batch(self) -> int | None:
        """The fixed batch size, or None when the batch dimension is dynamic."""
        first = self.input.shape[0]
        return first if isinstance(first, int) else None

    def with_extra(self, **extra) -> "ModelDescription":
        from dataclasses import replace
        return replace(self, extra={**self.extra, **extra})

    def to_dict(self, *, labels: bool = True) -> dict:
        data = asdict(self)
        data["preprocessing"] = self.preprocessing.to_dict()
        if not labels:
            data.pop("labels")
        return data

    def to_json(self, *, labels: bool = True) -> str:
        return json.dumps(self.to_dict(labels=labels), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: dict) -> "ModelDescription":
        known = {f.name for f in fields(cls)}
        data = {k: v for k, v in data.items() if k in known}
        data["preprocessing"] = Preprocessing.from_dict(data["preprocessing"])
        data["inputs"] = tuple(TensorSpec.from_dict(t) for t in data["inputs"])
        data["outputs"] = tuple(TensorSpec.from_dict(t) for t in data["outputs"])
        if data.get("labels") is not None:
            data["labels"] = tuple(data["labels"])
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "ModelDescription":
        return cls.from_dict(json.loads(text))
