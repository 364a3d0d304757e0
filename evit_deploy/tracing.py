"""Trace once: the deploy model captured by ``torch.export`` plus its description.

Every exporter consumes a :class:`TracedModel`. The parity reference travels with it: the
same weights *before* BN folding, in fp32, so a folding bug shows up as a parity failure.
"""

from __future__ import annotations

import copy
import importlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .description import RANDOM_INIT, ModelDescription, TensorSpec
from .errors import (BadInputError, CheckpointError, ExportError, first_line, is_out_of_memory,
                     named_first_line, out_of_memory)
from .labels import labels_for
from .models.checkpoint import official_weights_path, sha256_file
from .models.factory import DEFAULT_SEED, RANDOM, create_model, load_model
from .models.fuse import fuse
from .models.registry import is_custom, resolve_name
from .preprocess import IMAGENET_MEAN, IMAGENET_STD, INPUT_FORMATS, Preprocessing

FACTORY_WEIGHTS = "factory"   # a custom model's weights are whatever its factory returns

RANDOM_INIT_WARNING = ("no weights given: using a RANDOM initialisation (seed {seed}); the artifact "
                       "computes nothing useful and is marked random-init in its metadata")


class InputAdapter(nn.Module):
    """Takes the artifact's input format and hands the model a normalised float tensor.

    Baking the scaling and normalisation into the graph means a consumer of a ``uint8``
    or ``float01`` artifact cannot get the ImageNet statistics wrong.
    """

    def __init__(self, model: nn.Module, input_format: str, mean, std):
        super().__init__()
        self.model = model
        self.input_format = input_format
        scale = 1.0 / (255.0 if input_format == "uint8" else 1.0)
        std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        # (x * scale - mean) / std as one multiply-add per channel.
        self.register_buffer("gain", scale / std_t)
        self.register_buffer("offset", -mean_t / std_t)

    def forward(self, x):
        if self.input_format != "normalized":
            # In the dtype of the model's own constants: fp32, or fp16 when a target runs
            # the whole deploy model in half precision.
            x = x.to(self.gain.dtype) * self.gain + self.offset
        return self.model(x)


@dataclass
class TracedModel:
    program: torch.export.ExportedProgram
    description: ModelDescription
    reference: nn.Module          # unfused, fp32, eval; takes normalised input
    deploy: nn.Module             # what was traced: folded model behind the input adapter
    warnings: tuple[str, ...] = ()   # what the person exporting should know (synthetic weights, ...)

    def weight_bytes(self) -> int:
        """Bytes of the traced model's parameters and buffers, as stored in fp32."""
        return sum(t.numel() * t.element_size() for t in self.deploy.state_dict().values())

    def example_input(self, batch: int | None = None) -> torch.Tensor:
        spec = self.description.input
        n = batch or self.description.batch or 1
        shape = (n, *spec.shape[1:])
        if spec.dtype == "uint8":
            return torch.randint(0, 256, shape, dtype=torch.uint8)
        return torch.rand(shape)


def load_factory(spec: str):
    """``package.module:callable`` -> the callable."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise BadInputError(f"--model must look like package.module:factory, got '{spec}'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise BadInputError(f"cannot import {module_name} for --model {spec}: {first_line(exc)}") from None
    except Exception as exc:        # the user's module failed while it was imported (SyntaxError, ...)
        raise BadInputError(f"cannot import {module_name} for --model {spec}: "
                            f"{named_first_line(exc)}") from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise BadInputError(f"{module_name} has no callable '{attr}' (from --model {spec})")
    return factory


def _resolve_weights(description_weights: str, model: str, weights) -> str | Path | None:
    """The checkpoint to rebuild a reference with, checked against the recorded SHA-256."""
    if description_weights in (RANDOM_INIT, FACTORY_WEIGHTS):
        return None
    if weights is None:
        candidate = official_weights_path(resolve_name(model), download=False)
        if candidate.exists() and sha256_file(candidate) == description_weights:
            return candidate
        raise CheckpointError(f"this artifact was built from the checkpoint with SHA-256 "
                              f"{description_weights[:16]}…; pass that file with --weights FILE")
    weights = Path(weights) if str(weights) != "official" else official_weights_path(resolve_name(model))
    actual = sha256_file(weights) if Path(weights).is_file() else None
    if actual is not None and actual != description_weights:
        raise CheckpointError(f"{weights} (SHA-256 {actual[:16]}…) is not the checkpoint this artifact "
                              f"was built from (SHA-256 {description_weights[:16]}…)")
    return weights


def unused_weights(description: ModelDescription, weights) -> str | None:
    """Why ``weights``, given for an artifact made without a checkpoint (synthetic weights
    or a custom model's factory), do not describe it; None when they may."""
    if weights is None or description.weights not in (RANDOM_INIT, FACTORY_WEIGHTS):
        return None
    made_from = (f"synthetic weights (random-init, seed {description.seed})" if description.weights == RANDOM_INIT
                 else f"the model its factory {description.model} returns")
    return f"it was made from {made_from}, not from {weights}"


def build_reference(description: ModelDescription, weights=None) -> nn.Module:
    """Rebuild an artifact's PyTorch reference (unfused, fp32, eval) from its description."""
    options = dict(description.model_options)
    if is_custom(description.model):
        return make_custom_model(description.model, description.seed or DEFAULT_SEED)
    checkpoint = _resolve_weights(description.weights, description.model, weights)
    return create_model(description.model, RANDOM if checkpoint is None else checkpoint,
                        seed=description.seed if description.seed is not None else DEFAULT_SEED,
                        **options).float()


def make_custom_model(spec: str, seed: int) -> nn.Module:
    """The fp32 eval-mode module ``package.module:factory`` returns, with torch seeded by
    ``seed`` while the factory runs (so a randomly initialised one is the same each time)."""
    factory = load_factory(spec)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = factory()
    except Exception as exc:      # the user's code: their error, said as such, not "internal error"
        raise BadInputError(f"--model {spec}: the factory failed: {named_first_line(exc)}") from exc
    if not isinstance(model, nn.Module):
        raise BadInputError(f"--model {spec} returned a {type(model).__name__}, not a torch.nn.Module")
    return model.eval().float()


def _custom_model(spec: str, seed: int, input_size) -> tuple[nn.Module, dict, int, int]:
    if input_size is None:
        raise BadInputError(f"--model {spec} needs --input-size (e.g. 224 or 256x192)")
    h, w = input_size
    return make_custom_model(spec, seed), {}, h, w


def _output_tensors(outputs, model: str) -> tuple[torch.Tensor, ...]:
    """A model's outputs as a tuple of tensors; anything else (a dict, None, nested
    tuples) is a one-line error, as every target exports a flat list of tensors."""
    outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    for o in outputs:
        if not isinstance(o, torch.Tensor):
            raise BadInputError(f"{model} returns a {type(o).__name__}; evit-deploy exports models that return a "
                                f"tensor or a tuple of tensors (wrap it to return one)")
    return tuple(outputs)


class _ThisThreadCaptured:
    """``sys.stderr`` while ``torch.export`` runs: what this thread writes is kept (torch
    prints the partial graph of a failed export there, a screenful before our one-line
    error), other threads (the progress display) write through."""

    def __init__(self, stream):
        import threading

        self.stream, self.thread, self.parts = stream, threading.get_ident(), []

    def write(self, text: str) -> int:
        import threading

        if threading.get_ident() == self.thread:
            self.parts.append(text)
            return len(text)
        return self.stream.write(text)

    def __getattr__(self, name):
        return getattr(self.stream, name)


def _export_quietly(deploy, example, dynamic_shapes):
    """``torch.export.export``; torch's own printout of a failure goes into the exception's
    notes (shown with --debug), and what it writes on success is written as usual."""
    import sys

    captured = _ThisThreadCaptured(sys.stderr)
    sys.stderr = captured
    try:
        return torch.export.export(deploy, (example,), dynamic_shapes=dynamic_shapes)
    except Exception as exc:
        if "".join(captured.parts).strip():
            exc.add_note("".join(captured.parts))
            captured.parts.clear()
        raise
    finally:
        sys.stderr = captured.stream
        if captured.parts:
            captured.stream.write("".join(captured.parts))


def trace(model: str = "m0", weights=None, *, batch: int = 1, dynamic_batch: bool = False,
          img_size: int = 224, num_classes: int = 1000, distillation: bool = False,
          input_format: str = "normalized", seed: int = DEFAULT_SEED,
          input_size: tuple[int, int] | None = None, task: str = "classification",
          neck: str = "maskrcnn") -> TracedModel:
    """Load, fold and capture a model with ``torch.export``.

    ``model`` is a family member (``m4``) or ``package.module:factory`` for any
    ``nn.Module`` (then ``input_size`` is required and ``weights`` is not used).
    ``task="detection"`` traces the backbone + FPN at ``input_size`` (height, width; default
    ``img_size`` square), with one output per FPN level.
    """
    if input_format not in INPUT_FORMATS:
        raise BadInputError(f"unknown input format '{input_format}'; valid: {', '.join(INPUT_FORMATS)}")
    if batch < 1:
        raise BadInputError(f"batch must be at least 1, got {batch}")
    if is_custom(model):
        reference, options, h, w = _custom_model(model, seed, input_size)
        name, display, weights_id, init_seed = model, model.rsplit(":", 1)[-1], FACTORY_WEIGHTS, seed
    elif task == "detection":
        spec = resolve_name(model)
        h, w = input_size or (img_size, img_size)
        if h % 16 or w % 16 or h <= 0 or w <= 0:
            raise BadInputError(f"detection input size must be multiples of 16, got {h}x{w}")
        options = {"task": "detection", "neck": neck}
        reference, provenance = load_model(spec.name, RANDOM if weights is None else weights, seed=seed, **options)
        name, display = spec.name, f"{spec.display_name} FPN ({neck})"
    else:
        spec = resolve_name(model)
        if input_size is not None and input_size[0] != input_size[1]:
            raise BadInputError(f"classification models take square inputs; got {input_size[0]}x{input_size[1]} "
                                f"(non-square sizes are for --task detection)")
        img_size = input_size[0] if input_size is not None else img_size
        options = {"img_size": img_size, "num_classes": num_classes, "distillation": distillation}
        reference, provenance = load_model(spec.name, RANDOM if weights is None else weights, seed=seed, **options)
        name, display, h, w = spec.name, spec.display_name, img_size, img_size
    warnings = []
    if not is_custom(model):
        weights_id = provenance.weights_sha256 or RANDOM_INIT
        init_seed = provenance.init_seed
        if weights is not None and weights_id == RANDOM_INIT:
            weights_id = "state-dict"
        if weights_id == RANDOM_INIT:
            warnings.append(RANDOM_INIT_WARNING.format(seed=init_seed))
        elif provenance.neck_pretrained is False:
            warnings.append("the checkpoint is a classification one: the backbone is loaded, but the FPN neck "
                            f"keeps its seeded initialisation (seed {init_seed})")

    deploy = InputAdapter(fuse(copy.deepcopy(reference)).eval(), input_format,
                          IMAGENET_MEAN, IMAGENET_STD).eval()
    in_dtype = torch.uint8 if input_format == "uint8" else torch.float32
    example_batch = max(batch, 2) if dynamic_batch else batch
    example = torch.zeros(example_batch, 3, h, w, dtype=in_dtype)
    dynamic_shapes = None
    if dynamic_batch:
        dynamic_shapes = {"x": {0: torch.export.Dim("batch", min=1, max=4096)}}
    try:
        with torch.no_grad():
            outputs = deploy(example)
    except Exception as exc:
        shape = "x".join(map(str, example.shape))
        if is_out_of_memory(exc):
            raise out_of_memory(exc, f"running {name} on a {shape} input") from exc
        raise ExportError(f"{name} fails on a {shape} {example.dtype} input: {named_first_line(exc)}") from exc
    outputs = _output_tensors(outputs, name)
    try:
        program = _export_quietly(deploy, example, dynamic_shapes)
    except Exception as exc:
        raise ExportError(f"torch.export failed on {name}: {first_line(exc)}") from exc

    batch_dim: int | str = "batch" if dynamic_batch else batch
    if task == "detection":
        out_names = list(reference.level_names)
        docs = [f"FPN level {n}: stride {s}, {reference.out_channels} channels"
                for n, s in zip(out_names, reference.strides)]
    elif not is_custom(model) and num_classes == 0:
        # No classifier head (as timm's num_classes=0): the output is the pooled feature
        # vector, not class scores, and has no labels.
        out_names = ["features"]
        docs = [f"pooled image features ({outputs[0].shape[-1]} channels; no classifier head, num_classes=0)"]
    else:
        out_names = ["logits"] if len(outputs) == 1 else [f"output_{i}" for i in range(len(outputs))]
        docs = ["class scores (logits)" if n == "logits" else "" for n in out_names]
    classifier = len(outputs) == 1 and outputs[0].dim() == 2 and out_names != ["features"]
    description = ModelDescription(
        model=name, display_name=display, task=task if not is_custom(model) else "classification",
        weights=weights_id,
        seed=init_seed, model_options=options, input_format=input_format,
        preprocessing=Preprocessing.for_size(h, w),
        inputs=(TensorSpec("image", (batch_dim, 3, h, w), "uint8" if input_format == "uint8" else "float32",
                           f"RGB image, NCHW, {input_format}"),),
        outputs=tuple(TensorSpec(n, (batch_dim, *o.shape[1:]), str(o.dtype).removeprefix("torch."), doc)
                      for n, o, doc in zip(out_names, outputs, docs)),
        labels=labels_for(outputs[0].shape[-1]) if classifier else None,
    )
    return TracedModel(program, description, reference, deploy, tuple(warnings))

