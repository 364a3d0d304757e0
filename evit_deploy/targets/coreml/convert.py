"""From a ``torch.export`` program to a saved ML program package.

Steps: add a softmax output when the model is a classifier with labels; convert the
program to MIL with the image (or tensor) input; optionally quantize or compress it
(:mod:`.quantize`); add the classifier op; then write the spec with the metadata Xcode
shows and the model's description, byte-reproducibly, and check that the reference
executor can run what was written (:mod:`.reference`: it verifies the package off macOS).

The image input carries the only scale Core ML's image inputs have (1/255); the
per-channel ImageNet mean/std is the traced ``InputAdapter``, inside the program.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ... import calibration as calib
from ...description import ModelDescription
from ...errors import BadInputError, EvitError, ExportError, first_line
from . import package, quantize
from .metadata import LABEL_OUTPUT, PROBABILITIES_OUTPUT, artifact_description, set_metadata
from .quiet_import import coremltools

_PROBABILITIES_VAR = "probabilities"       # the softmax output before the classifier takes it over

DEPLOYMENT_TARGETS = ("iOS15", "iOS16", "iOS17", "iOS18")
COMPRESSION_NEEDS = "iOS16"     # the constexpr ops that hold compressed weights


@dataclass
class Converted:
    spec: object                    # the Model protobuf, metadata set
    weight_file: Path | None        # in the converter's temporary package
    description: ModelDescription
    keepalive: object               # the MLModel owning weight_file's temporary directory


def export(traced, options, path: Path, reporter) -> tuple[ModelDescription, tuple[Path, ...]]:
    """Write the package at ``path`` as ``options`` ask (and its .zip beside it with
    ``zip``): the description it holds, and its sidecars."""
    from .reference import UnsupportedOpError, check_supported

    converted = convert(traced, options, reporter)
    write(converted, path)
    try:
        check_supported(package.read_spec(path), path.name)     # not the staging directory
    except UnsupportedOpError as exc:
        raise ExportError(f"the package cannot be verified: {exc}") from None
    sidecars = ()
    if options.zip:
        sidecars = (package.zip_package(path, path.with_name(path.name + ".zip")),)
    return converted.description, sidecars


def is_classifier(description: ModelDescription) -> bool:
    """One 2-D output with a label per class: gets Core ML classifier outputs."""
    out = description.outputs
    return (description.labels is not None and len(out) == 1 and len(out[0].shape) == 2
            and out[0].shape[1] == len(description.labels) and description.batch == 1)


def convert(traced, options, reporter) -> Converted:
    """Convert ``traced`` (traced with input format float01) as ``options`` ask."""
    ct = coremltools()
    desc: ModelDescription = traced.description
    _check_request(desc, options)
    classifier = is_classifier(desc)
    program = _with_probabilities(traced) if classifier else traced.program
    target = getattr(ct.target, options.minimum_deployment_target)
    # W8A8 programs quantize and dequantize fp16 activations around each integer op.
    precision = ct.precision.FLOAT32 if options.precision == "fp32" else ct.precision.FLOAT16
    n, c, h, w = desc.input.shape
    if options.input_type == "image":
        inputs = [ct.ImageType(name=desc.input.name, shape=(n, c, h, w), scale=1 / 255.0,
                               color_layout=ct.colorlayout.RGB)]
    else:
        inputs = [ct.TensorType(name=desc.input.name, shape=(n, c, h, w), dtype=np.float32)]
    outputs = [ct.TensorType(name=o.name, dtype=np.float32) for o in desc.outputs]
    if classifier:
        outputs.append(ct.TensorType(name=_PROBABILITIES_VAR, dtype=np.float32))
    # What the package will take (pixels 0-255 for an image input): calibration feeds it.
    packaged = artifact_description(desc, options, classifier=classifier, weights_bytes=0,
                                    uncompressed_weights_bytes=0)
    calibration = None
    if options.precision == "int8":
        calibration = calib.for_export(desc.preprocessing, options.calibration, reporter)

    def to_mil():
        return ct.convert(program.run_decompositions({}), inputs=inputs, outputs=outputs,
                          minimum_deployment_target=target, compute_precision=precision,
                          pass_pipeline=_conversion_pipeline(ct), convert_to="milinternal")

    try:
        # coremltools draws a progress bar per pass pipeline on stderr; we report our own.
        with contextlib.redirect_stderr(io.StringIO()):
            mil = to_mil()
            uncompressed = _const_bytes(mil)
            # The classifier op is added by the backend, which cannot match user output
            # types against the outputs it adds (coremltools 9 indexes past the list).
            mil.functions["main"].set_output_types(None)
            if calibration is not None:
                # Ranges are measured on a program of their own: the backend edits the
                # program it converts (adding the image input's scaling), so ``mil`` can
                # go through it once only (and MIL programs are too deep to deep-copy).
                ranges = quantize.measure_ranges(to_mil(), target=target, calibration=calibration,
                                                 description=packaged)
                pipeline = quantize.w8a8_pipeline(ranges)
            else:
                pipeline = quantize.compression_pipeline(options.compress) or ct.PassPipeline.EMPTY
            mlmodel = ct.convert(
                mil, convert_to="mlprogram", minimum_deployment_target=target, compute_precision=precision,
                pass_pipeline=pipeline,
                classifier_config=ct.ClassifierConfig(list(desc.labels), predicted_feature_name=LABEL_OUTPUT,
                                                       predicted_probabilities_output=_PROBABILITIES_VAR)
                if classifier else None,
                skip_model_load=True)
    except EvitError:
        raise
    except Exception as exc:
        raise ExportError(f"coremltools failed to convert {desc.model}: {first_line(exc)}") from exc

    spec = mlmodel.get_spec()
    weight_file = Path(mlmodel.weights_dir) / package.WEIGHT_FILE
    if classifier:
        ct.utils.rename_feature(spec, f"{LABEL_OUTPUT}_probs", PROBABILITIES_OUTPUT)
    weights_bytes = weight_file.stat().st_size if weight_file.is_file() else 0
    description = artifact_description(desc, options, classifier=classifier, weights_bytes=weights_bytes,
                                       uncompressed_weights_bytes=uncompressed)
    if calibration is not None:
        description = description.with_extra(int8={
            "activations": "int8, symmetric, per tensor, ranges measured by the reference executor",
            "weights": "int8, symmetric, per output channel", "calibration": calibration.describe()})
    set_metadata(spec, description, options, classifier=classifier)
    return Converted(spec, weight_file if weight_file.is_file() else None, description, mlmodel)


def _conversion_pipeline(ct):
    """coremltools' default passes, except the one that turns the normalisation into a batch_norm.

    That pass writes ``x * gain + offset`` as a batch_norm with variance 1 and epsilon 1e-5,
    which scales every normalised pixel by 1/sqrt(1 + 1e-5): a 5e-6 error at the input that
    a sensitive model amplifies past the fp32 tolerance. The multiply-add stays exact.
    """
    pipeline = ct.PassPipeline.DEFAULT
    pipeline.remove_passes({"common::fuse_elementwise_to_batchnorm"})
    return pipeline


def check_options(options) -> None:
    """What the options alone rule out (before any trace)."""
    order = DEPLOYMENT_TARGETS.index
    if options.compress != "none" and order(options.minimum_deployment_target) < order(COMPRESSION_NEEDS):
        raise BadInputError(f"--compress {options.compress} needs --minimum-deployment-target "
                            f"{COMPRESSION_NEEDS} or later (compressed weights are iOS 16 ops)")
    if options.precision == "int8":
        if options.compress != "none":
            raise BadInputError(f"--precision int8 already stores int8 weights: --compress {options.compress} is for "
                                "fp16 and fp32 programs")
        if order(options.minimum_deployment_target) < order(quantize.NEEDS):
            raise BadInputError(f"--precision int8 needs --minimum-deployment-target {quantize.NEEDS} or later "
                                "(int8 activations are iOS 17 ops)")


def _check_request(desc: ModelDescription, options) -> None:
    if desc.input_format != "float01":
        raise BadInputError(f"the Core ML converter needs a trace with input format float01, got {desc.input_format}")
    if desc.batch is None:
        raise BadInputError("Core ML export needs a fixed batch size (no --dynamic-batch)")
    if len(desc.input.shape) != 4:
        raise BadInputError(f"Core ML export needs an NCHW image input, got shape {desc.input.shape}")
    n, c = desc.input.shape[:2]
    if options.input_type == "image":
        if c != 3:
            raise BadInputError(f"an image input is RGB (3 channels); this model takes {c}: use --input-type tensor")
        if n != 1:
            raise BadInputError("a Core ML image input takes one image at a time; "
                                f"for a batch of {n} use --input-type tensor")
    check_options(options)


def _with_probabilities(traced):
    """The traced program with a softmax of the logits as a second output."""
    import torch

    class WithProbabilities(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x):
            logits = self.model(x)
            return logits, torch.softmax(logits, dim=-1)

    try:
        with torch.no_grad():
            return torch.export.export(WithProbabilities(traced.program.module()), (traced.example_input(),))
    except Exception as exc:
        raise ExportError(f"torch.export failed adding the classifier's softmax: {first_line(exc)}") from exc


def _const_bytes(mil_program) -> int:
    """Bytes of tensor constants in a MIL program (what compression shrinks)."""
    total = 0
    for op in mil_program.functions["main"].operations:
        if op.op_type == "const" and isinstance(op.outputs[0].val, np.ndarray):
            total += op.outputs[0].val.nbytes
    return total


def write(converted: Converted, path: Path) -> Path:
    """Save a conversion as a package at ``path``."""
    return package.write_package(path, converted.spec, converted.weight_file)
