"""What a Core ML package says about itself: its description and the metadata Xcode shows.

The full :class:`~evit_deploy.description.ModelDescription` is stored as JSON in the
user-defined metadata, so ``verify`` and ``run`` work from the saved package alone.
"""

from __future__ import annotations

from dataclasses import replace

from ... import __version__
from ...description import ModelDescription, TensorSpec
from ...errors import BadInputError
from .quiet_import import coremltools

DESCRIPTION_KEY = "evit_deploy.description"
PREVIEW_TYPE_KEY = "com.apple.coreml.model.preview.type"
CONVERSION_DATE_KEY = "com.github.apple.coremltools.conversion_date"
SOURCE_KEY = "com.github.apple.coremltools.source"
SOURCE_DIALECT_KEY = "com.github.apple.coremltools.source_dialect"
LABEL_OUTPUT = "classLabel"
PROBABILITIES_OUTPUT = "classLabelProbs"


def artifact_description(desc: ModelDescription, options, *, classifier: bool, weights_bytes: int,
                         uncompressed_weights_bytes: int) -> ModelDescription:
    """What the package takes and gives: raw pixels (0-255) for an image input."""
    n, c, h, w = desc.input.shape
    if options.input_type == "image":
        spec = TensorSpec(desc.input.name, (n, c, h, w), "uint8",
                          f"RGB image {w}x{h}, pixels 0-255; scale 1/255 and ImageNet mean/std are applied "
                          "inside the model")
        input_format = "uint8"
    else:
        spec = TensorSpec(desc.input.name, (n, c, h, w), "float32",
                          "RGB image, NCHW, float 0..1; ImageNet mean/std are applied inside the model")
        input_format = "float01"
    coreml = {"input_type": options.input_type, "minimum_deployment_target": options.minimum_deployment_target,
              "compute_precision": options.precision, "compute_units": options.compute_units,
              "compress": options.compress, "weights_bytes": weights_bytes,
              "classifier": {"label": LABEL_OUTPUT, "probabilities": PROBABILITIES_OUTPUT} if classifier else None}
    if options.compress != "none":
        coreml["uncompressed_weights_bytes"] = uncompressed_weights_bytes
    return replace(desc, input_format=input_format, inputs=(spec,)).with_extra(coreml=coreml)


def _weights_text(desc: ModelDescription) -> str:
    if desc.random_init:
        return f"random-init (seed {desc.seed}): synthetic weights, the predictions mean nothing"
    return f"SHA-256 {desc.weights}" if len(desc.weights) == 64 else desc.weights


def set_metadata(spec, desc: ModelDescription, options, *, classifier: bool) -> None:
    """The fields Xcode shows and our user-defined entries (the description among them)."""
    ct = coremltools()
    family = ":" not in desc.model
    meta = spec.description.metadata
    meta.author = ("EfficientViT: Liu et al., CVPR 2023 (github.com/microsoft/Cream); "
                   if family else "") + f"converted by evit-deploy {__version__}"
    meta.license = "MIT (EfficientViT code and released weights)" if family else "see the model's source"
    n, c, h, w = desc.input.shape
    what = f"image classifier ({len(desc.labels)} classes)" if classifier else "model"
    meta.shortDescription = (f"{desc.display_name} {what}, {w}x{h} RGB input. "
                             f"Weights: {_weights_text(desc)}.")
    meta.versionString = f"{__version__}+{desc.weights[:12] if not desc.random_init else 'random-init'}"
    user = meta.userDefined
    # The conversion date makes two conversions of the same model differ.
    if CONVERSION_DATE_KEY in user:
        del user[CONVERSION_DATE_KEY]
    import torch

    # The package is converted from MIL in a second step (see convert.py), which would
    # record "milinternal" as its source; the source is the torch.export program.
    user[SOURCE_KEY] = f"torch=={torch.__version__}"
    user[SOURCE_DIALECT_KEY] = "TorchExport::ATEN"
    mean = ", ".join(f"{v:g}" for v in desc.preprocessing.mean)
    std = ", ".join(f"{v:g}" for v in desc.preprocessing.std)
    scale = "x/255, then " if options.input_type == "image" else ""
    user.update({
        DESCRIPTION_KEY: desc.to_json(),
        "model": desc.model,
        "weights_sha256": desc.weights,
        "normalisation": f"{scale}(x - mean) / std per channel inside the model; mean=({mean}) std=({std})",
        "input_format": desc.input_format,
        "evit_deploy_version": __version__,
        "coremltools_version": ct.__version__,
    })
    if desc.seed is not None and desc.random_init:
        user["seed"] = str(desc.seed)
    if classifier and options.input_type == "image":
        user[PREVIEW_TYPE_KEY] = "imageClassifier"
    docs = {desc.input.name: desc.input.doc,
            LABEL_OUTPUT: "the most likely class",
            PROBABILITIES_OUTPUT: "probability of every class (softmax of the logits)"}
    docs.update({o.name: o.doc or "model output" for o in desc.outputs})
    for feature in [*spec.description.input, *spec.description.output]:
        if feature.name in docs:
            feature.shortDescription = docs[feature.name]


def description_from_spec(spec, path) -> ModelDescription:
    user = spec.description.metadata.userDefined
    if DESCRIPTION_KEY not in user:
        raise BadInputError(f"{path} was not made by evit-deploy (no '{DESCRIPTION_KEY}' metadata)")
    try:
        return ModelDescription.from_json(user[DESCRIPTION_KEY])
    except (ValueError, KeyError, TypeError) as exc:
        raise BadInputError(f"{path}: unreadable '{DESCRIPTION_KEY}' metadata ({exc})") from None
