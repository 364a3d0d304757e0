"""The export plan: every decision about an export, made once, before anything is traced.

``export``, ``build``, ``bench`` and ``profile`` all make artifacts. Each of them used to
resolve the target, merge the device's options with the user's, pick the batch
and the input format on its own, and one of them forgot to ask the target for its batch
(a build file's TVM library ignored the batch its tuning database was made for). Now
they all call :func:`plan_export` and trace what it decided (:func:`trace_plan`).

Torch-free until :func:`trace_plan`.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from .errors import BadInputError
from .targets import get_target
from .targets.base import Target
from .targets.options import options_to_dict, parse_cli_values


@dataclass(frozen=True)
class ModelRequest:
    """What to trace: a family member (or ``package.module:factory``) and its settings."""

    model: str                              # canonical (efficientvit_m4) or a factory spec
    weights: object = None                  # file, "official", state dict, or None (synthetic)
    img_size: int = 224
    num_classes: int = 1000
    distillation: bool = False
    input_size: tuple[int, int] | None = None
    task: str = "classification"
    neck: str = "maskrcnn"
    seed: int = 0


@dataclass(frozen=True)
class ExportPlan:
    request: ModelRequest
    target: Target
    options: object                         # the target's Options dataclass, validated
    device: str | None                      # the device whose options the options started from
    batch: int
    dynamic_batch: bool
    input_format: str                       # what the trace takes (preprocess.INPUT_FORMATS)
    precision: str                          # the parity tolerance class
    notes: tuple[str, ...] = field(default=())   # choices made for the user, to tell them

    @property
    def trace_key(self) -> tuple:
        """Plans with equal keys can share one trace (build exports several targets of a model)."""
        r = self.request
        return (r.model, str(r.weights), r.img_size, r.num_classes, r.distillation, r.input_size, r.task,
                r.neck, r.seed, self.input_format, self.batch, self.dynamic_batch)

    def options_dict(self) -> dict:
        return options_to_dict(self.options)


def resolve_model_name(model: str) -> str:
    """The name the trace gives a model: canonical for the family, the spec itself for
    ``package.module:factory``."""
    from .models.registry import is_custom, resolve_name

    return str(model) if is_custom(model) else resolve_name(model).name


def device_argument(device: str | None, profile: str | None) -> str | None:
    """``device=``, or ``profile=``, its name before devices were called devices (accepted
    for one release)."""
    if profile is None:
        return device
    if device is not None:
        raise BadInputError("give the device once: device= (profile= is its deprecated alias)")
    warnings.warn("profile= is deprecated: use device=", DeprecationWarning, stacklevel=3)
    return profile


def merge_options(target: str | None, options=None, *, device: str | None = None,
                  cli_args: list[str] | None = None, source: str = "options",
                  profile: str | None = None) -> tuple[Target, object, str | None]:
    """(target, validated options, device name): the device's options, then ``options``
    (a mapping or the target's Options dataclass), then ``cli_args`` (``--flag value``).
    ``source`` names where the options come from in error messages."""
    device = device_argument(device, profile)
    values: dict = {}
    if device is not None:
        from .devices import load_device
        found = load_device(device)
        if target is not None and target != found.target:
            raise BadInputError(f"device '{found.name}' is for target '{found.target}', not '{target}'")
        target = found.target
        values.update(found.options)
    if target is None:
        raise BadInputError("no target given: pass --target NAME or --device NAME")
    tgt = get_target(target)
    if dataclasses.is_dataclass(options) and not isinstance(options, type):
        values.update(options_to_dict(options))
    else:
        values.update(options or {})
    if cli_args:
        values.update(parse_cli_values(tgt.Options, cli_args, target=tgt.name))
    return tgt, tgt.parse_options(values, source=source), (device and Path(device).stem)


def plan_export(model: str, target: str | None = None, *, options=None, device: str | None = None,
                cli_args: list[str] | None = None, batch: int | None = None, dynamic_batch: bool = False,
                weights=None, img_size: int = 224, num_classes: int = 1000, distillation: bool = False,
                input_size: tuple[int, int] | None = None, task: str = "classification",
                neck: str = "maskrcnn", seed: int = 0, profile: str | None = None) -> ExportPlan:
    """Decide everything about an export; raise :class:`BadInputError` (or
    :class:`MissingDependencyError`) for anything wrong with the request, before any work.

    ``batch=None`` is the target's choice (a TVM export takes the batch its tuning
    database was made for), else 1. ``profile`` is the deprecated name of ``device``.
    """
    name = resolve_model_name(model)
    tgt, opts, device_name = merge_options(target, options, device=device_argument(device, profile),
                                           cli_args=cli_args)
    tgt.check_available()
    tgt.validate(opts)
    if dynamic_batch and not tgt.supports_dynamic_batch:
        raise BadInputError(f"target '{tgt.name}' does not support a dynamic batch; use --batch N")
    notes = []
    if batch is None and not dynamic_batch:
        chosen = tgt.default_batch(opts, name)
        if chosen is not None:
            batch, why = chosen
            notes.append(f"batch {batch}: {why} (--batch N to change)")
    if batch is None:
        batch = 1
    if batch < 1:
        raise BadInputError(f"batch must be at least 1, got {batch}")
    request = ModelRequest(name, weights, img_size, num_classes, distillation, input_size, task, neck, seed)
    return ExportPlan(request, tgt, opts, device_name, batch, dynamic_batch, tgt.input_format(opts),
                      tgt.precision(opts), tuple(notes))


def trace_plan(plan: ExportPlan):
    """The :class:`~evit_deploy.tracing.TracedModel` a plan asks for."""
    from .tracing import trace

    r = plan.request
    return trace(r.model, r.weights, batch=plan.batch, dynamic_batch=plan.dynamic_batch, img_size=r.img_size,
                 num_classes=r.num_classes, distillation=r.distillation, seed=r.seed,
                 input_format=plan.input_format, input_size=r.input_size, task=r.task, neck=r.neck)
