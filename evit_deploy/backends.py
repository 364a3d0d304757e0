"""The backends ``bench`` and ``profile`` time, named ``RUNTIME[:PRECISION][@LABEL]``.

``torch`` (eager) and ``torch-jit`` (traced and frozen) are PyTorch itself; every export
target that declares a ``benchmark_backend`` adds its runtime (``onnxruntime`` for ONNX,
``tvm`` for TVM), timed on an artifact exported and verified for the purpose. A precision
after ``:`` (``onnxruntime:int8``) exports that precision; a label after ``@``
(``tvm@tuned``) names a variant with export options of its own
(``-O tvm@tuned.db=DIR``). A name is parsed once, into a :class:`BackendSpec`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import numpy as np

from .errors import BadInputError, unknown_name

TORCH_BACKENDS = ("torch", "torch-jit")


def target_backends() -> dict[str, str]:
    """Benchmark backend name -> export target name, from the registered targets."""
    from .targets import available_targets
    return {cls.benchmark_backend: name for name, cls in available_targets().items()
            if getattr(cls, "benchmark_backend", None)}


def all_backends() -> list[str]:
    return [*TORCH_BACKENDS, *target_backends()]


@dataclass(frozen=True)
class BackendSpec:
    name: str                          # as written: tvm:bf16@tuned
    runtime: str                       # tvm
    precision: str                     # what it computes in: named, else its options', else the target's default
    label: str | None                  # tuned: a variant with options -O TARGET@tuned.KEY=VALUE
    target: str | None                 # the export target; None for PyTorch itself
    # Export options: the target's (-O TARGET.KEY=VALUE), then the variant's, then the precision named.
    options: Mapping = field(default_factory=lambda: MappingProxyType({}), hash=False)

    @classmethod
    def parse(cls, name: str, target_options: dict | None = None) -> BackendSpec:
        """The backend ``name`` names, with its export options from ``target_options``
        (``{"tvm": {...}, "tvm@tuned": {...}}``); :class:`BadInputError` if there is none."""
        head, at, label = name.partition("@")
        runtime, colon, precision = head.partition(":")
        targets = target_backends()
        if runtime not in (*TORCH_BACKENDS, *targets):
            raise unknown_name("backend", runtime, [*TORCH_BACKENDS, *targets])
        if at and not label:
            raise BadInputError(f"backend '{name}': a label follows '@' (tvm@tuned)")
        if colon and not precision:
            raise BadInputError(f"backend '{name}': a precision follows ':' (onnxruntime:int8)")
        if runtime in TORCH_BACKENDS:
            if precision or label:
                raise BadInputError(f"backend '{name}': PyTorch backends run fp32 only, with no variants")
            return cls(name, runtime, "fp32", None, None)
        from .targets import get_target

        target = get_target(targets[runtime])
        if precision and precision not in target.precisions():
            raise BadInputError(f"backend '{name}': target '{target.name}' does not support precision "
                                f"'{precision}' (it supports {', '.join(target.precisions())})")
        given = target_options or {}
        options = {**given.get(target.name, {}), **(given.get(f"{target.name}@{label}", {}) if label else {})}
        if precision:
            options["precision"] = precision
        # An option's default is its dataclass field's class attribute (Core ML: fp16).
        effective = options.get("precision", getattr(target.Options, "precision", "fp32"))
        return cls(name, runtime, effective, label or None, target.name, MappingProxyType(options))

    @property
    def is_torch(self) -> bool:
        return self.target is None

    @property
    def variant(self) -> str | None:
        """``tvm@tuned``: the key of the variant's options in ``-O``."""
        return f"{self.target}@{self.label}" if self.label and self.target else None

    def get_target(self):
        from .targets import get_target
        return get_target(self.target)

    def export_options(self) -> dict:
        """The options its artifact is exported with: ``-O TARGET.calibration=DIR`` is given
        once per target, for its int8 backend, and is not the others'."""
        options = dict(self.options)
        if self.precision != "int8":
            options.pop("calibration", None)
            options.pop("int8_kernels", None)
        return options

    def export(self, model: str, *, batch: int, img_size: int, weights, out_dir: Path, reporter=None):
        """An artifact made and verified for timing this backend
        (an :class:`~evit_deploy.api.ExportResult`)."""
        from .api import export_plan
        from .plan import plan_export

        plan = plan_export(model, self.target, options=self.export_options(), batch=batch, weights=weights,
                           img_size=img_size)
        return export_plan(plan, out_dir, reporter=reporter)


def parse_backends(text: str) -> list[str]:
    """The backend names of ``--backends`` (comma-separated, or ``all``), each checked."""
    names = all_backends() if text.strip() == "all" else [b.strip() for b in text.split(",") if b.strip()]
    for name in names:
        BackendSpec.parse(name)
    return list(dict.fromkeys(names))


def check_target_options(target_options: dict | None) -> None:
    """Each ``-O TARGET[@LABEL].KEY=VALUE`` names a registered target and one of its
    options with a valid value, whether or not a backend uses it: a typo (``onxx.opset``)
    is an error before any work, not a setting silently left out."""
    from .targets import available_targets, get_target
    from .targets.options import parse_options

    names = list(available_targets())
    for key, values in (target_options or {}).items():
        name = key.partition("@")[0]
        if name not in names:
            raise unknown_name("target", name, names)
        parse_options(get_target(name).Options, values, target=name, source="--option")


def backend_specs(names: list[str], target_options: dict | None = None) -> list[BackendSpec]:
    """Each backend of ``names`` with its options. Options given for a variant
    (``tvm@tuned``) that no backend asks for are a typo."""
    check_target_options(target_options)
    specs = [BackendSpec.parse(name, target_options) for name in names]
    wanted = {spec.variant for spec in specs if spec.variant}
    for key in target_options or {}:
        if "@" in key and key not in wanted:
            raise BadInputError(f"options for '{key}' but no backend is labelled '@{key.partition('@')[2]}' "
                                f"for target '{key.partition('@')[0]}'")
    return specs


def random_inputs(description, batch: int) -> dict[str, np.ndarray]:
    """A seeded input batch for an artifact (its speed does not depend on the values)."""
    x = np.random.default_rng(0).random((batch, *description.input.shape[1:]), dtype=np.float32)
    return {description.input.name: x.astype(description.input.dtype)}
