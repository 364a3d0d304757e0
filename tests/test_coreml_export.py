"""Core ML target: export, package contents, parity through the reference executor,
reproducibility, corruption, compression, options and profiles. What every target does
(torch-free running, verify of an intact artifact, truncated files) is tests/contract/."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from torch import nn

from evit_deploy import api
from evit_deploy.errors import EXIT_BAD_INPUT, EXIT_EXPORT_FAILED, EXIT_PARITY_FAILED
from evit_deploy.labels import imagenet_labels
from evit_deploy.preprocess import IMAGENET_MEAN, IMAGENET_STD, sample_images
from evit_deploy.targets.coreml import CoreMLTarget, runtime
from evit_deploy.targets.coreml.metadata import DESCRIPTION_KEY
from evit_deploy.targets.coreml.package import MODEL_FILE, package_files, read_spec
from evit_deploy.targets.coreml.reference import Program
from evit_deploy.targets.coreml.reference.blob import BlobFile
from evit_deploy.targets.coreml.runtime import numeric_outputs

SAMPLE = sample_images()


@pytest.fixture(scope="session")
def m0_coreml(tmp_path_factory):
    """The default export (fp16, image input, iOS 16) of synthetic-weight M0, with its zip."""
    out = tmp_path_factory.mktemp("m0-coreml")
    result = api.export("m0", "coreml", out_dir=out, options={"zip": True})
    assert result.report.passed, result.report.summary()
    return result


def _main_ops(spec):
    function = spec.mlProgram.functions["main"]
    return function.block_specializations[function.opset].operations


def _hashes(paths: list[Path], root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


def _copy(package: Path, tmp_path: Path, name: str = "Copy.mlpackage") -> Path:
    copy = tmp_path / name
    shutil.copytree(package, copy)
    return copy


def _rewrite_spec(package: Path, spec) -> None:
    (package / "Data" / MODEL_FILE).write_bytes(spec.SerializeToString())


# -- what is exported --------------------------------------------------------------------------

def test_export_is_an_ios16_ml_program_with_image_input_and_classifier(m0_coreml):
    path = m0_coreml.artifact.path
    assert path.name == "EfficientViT-M0.mlpackage" and path.is_dir()
    assert sorted(p.relative_to(path).as_posix() for p in package_files(path)) == [
        "Data/com.apple.CoreML/model.mlmodel", "Data/com.apple.CoreML/weights/weight.bin", "Manifest.json"]
    spec = read_spec(path)
    assert spec.WhichOneof("Type") == "mlProgram"
    assert spec.specificationVersion == 7                  # Core ML 6: iOS 16 / macOS 13
    (image,) = spec.description.input
    assert image.name == "image" and image.type.WhichOneof("Type") == "imageType"
    assert (image.type.imageType.width, image.type.imageType.height) == (224, 224)
    assert image.type.imageType.colorSpace == image.type.imageType.RGB
    outputs = {o.name: o.type.WhichOneof("Type") for o in spec.description.output}
    assert outputs == {"classLabel": "stringType", "classLabelProbs": "dictionaryType", "logits": "multiArrayType"}
    assert spec.description.predictedFeatureName == "classLabel"
    assert spec.description.predictedProbabilitiesName == "classLabelProbs"
    ops = [op.type for op in _main_ops(spec)]
    assert ops.count("classify") == 1 and "softmax" in ops
    # The image input's 1/255 is the first op; the exact per-channel mean/std follows.
    program = Program(path)
    scale, _, gain, offset = program.steps[:4]
    assert [op.type for op in program.steps[:4]] == ["mul", "cast", "mul", "add"]
    constant = lambda op: program.constants[op.params["y"][0][1]].astype(np.float32)  # noqa: E731
    assert constant(scale) == np.float32(1 / 255)
    mean, std = np.array(IMAGENET_MEAN, np.float32), np.array(IMAGENET_STD, np.float32)
    np.testing.assert_allclose(constant(gain).reshape(-1), 1 / std, rtol=1e-3)         # stored in fp16
    np.testing.assert_allclose(constant(offset).reshape(-1), -mean / std, rtol=1e-3)
    classes = next(op for op in _main_ops(spec) if op.type == "classify").inputs["classes"]
    labels = [v.immediateValue.tensor.strings.values[0] for v in
              classes.arguments[0].value.immediateValue.list.values]
    assert labels == list(imagenet_labels())
    zipped = m0_coreml.artifact.sidecars
    assert [p.name for p in zipped] == ["EfficientViT-M0.mlpackage.zip"] and zipped[0].is_file()


def test_metadata_xcode_shows_and_the_description(m0_coreml, tmp_path):
    spec = read_spec(m0_coreml.artifact.path)
    meta = spec.description.metadata
    assert "EfficientViT" in meta.author and "evit-deploy" in meta.author
    assert meta.license and meta.versionString
    assert "EfficientViT-M0" in meta.shortDescription and "random-init" in meta.shortDescription
    docs = {f.name: f.shortDescription for f in [*spec.description.input, *spec.description.output]}
    assert all(docs.values()), docs
    user = dict(meta.userDefined)
    assert user["com.apple.coreml.model.preview.type"] == "imageClassifier"
    assert user["model"] == "efficientvit_m0" and user["weights_sha256"] == "random-init"
    assert "0.485" in user["normalisation"] and "0.229" in user["normalisation"]
    assert user["evit_deploy_version"] and user["coremltools_version"]
    assert "com.github.apple.coremltools.conversion_date" not in user
    assert user["com.github.apple.coremltools.source"].startswith("torch==")
    # The package alone (moved, without anything beside it) describes the model.
    alone = _copy(m0_coreml.artifact.path, tmp_path)
    description = CoreMLTarget().read_description(alone)
    assert description == m0_coreml.artifact.description
    assert json.loads(user[DESCRIPTION_KEY])["input_format"] == description.input_format == "uint8"
    assert description.input.dtype == "uint8" and description.outputs[0].name == "logits"
    assert description.extra["coreml"]["minimum_deployment_target"] == "iOS16"


def test_fp16_parity_runs_through_the_reference_executor(m0_coreml):
    report = m0_coreml.report
    assert report.precision == "fp16" and report.passed
    assert "reference executor" in report.runtime
    logits = report.outputs[0]
    photos = [i for i in report.inputs if i.kind == "photo"]
    assert len(photos) == 4 and all(i.reference_top1 == i.artifact_top1 for i in photos)
    assert logits.max_rel > 1e-6                           # it really computed in fp16
    extra = report.extra
    assert extra["executor"] == "reference-executor"
    assert extra["package_bytes"] == sum(p.stat().st_size for p in package_files(m0_coreml.artifact.path))
    drift = extra["fp16_drift"]
    assert drift["inputs"] == [p.stem for p in SAMPLE]
    assert 0 < drift["max_rel"] < 0.05 and drift["top1_changed"] == 0
    assert drift["class_label_matches_logits"] == 4


def test_export_is_byte_reproducible(m0_coreml, tmp_path):
    again = api.export("m0", "coreml", out_dir=tmp_path, options={"zip": True}, verify=False)
    first, second = m0_coreml.artifact, again.artifact
    assert _hashes(package_files(first.path), first.path) == _hashes(package_files(second.path), second.path)
    assert _hashes(list(first.sidecars), first.path.parent) == _hashes(list(second.sidecars), second.path.parent)


def test_run_classifies_photos_like_pytorch(m0_coreml):
    result = api.run(m0_coreml.artifact.path, SAMPLE)
    expected = api.predict("m0", SAMPLE)
    assert [p.top[0][0] for p in result.predictions] == [p.top[0][0] for p in expected]
    probabilities = result.outputs["classLabelProbs"]
    assert probabilities.shape == (4, 1000)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-2)
    assert list(probabilities.argmax(axis=1)) == [p.top[0][0] for p in expected]


def test_fp32_program_matches_unfused_pytorch(tmp_path, checkpoint):
    weights = checkpoint("m0", seed=11)
    result = api.export("m0", "coreml", out_dir=tmp_path, weights=weights, options={"precision": "fp32"})
    report = result.report
    assert result.artifact.path.name == "EfficientViT-M0-fp32.mlpackage"
    assert report.passed and report.precision == "fp32", report.summary()
    logits = report.outputs[0]
    assert logits.max_rel <= 1e-4
    assert logits.top1_agree == logits.top1_checked == len(report.inputs)
    assert not Program(result.artifact.path).computes_fp16
    assert report.extra["fp16_drift"] is None
    user = read_spec(result.artifact.path).description.metadata.userDefined
    assert len(user["weights_sha256"]) == 64 and user["weights_sha256"] in read_spec(
        result.artifact.path).description.metadata.shortDescription


# -- corrupted packages fail verify ------------------------------------------------------------

def _blob_of(spec, var_name):
    const = next(op for op in _main_ops(spec) if op.type == "const" and op.outputs[0].name == var_name)
    return const.attributes["val"].blobFileValue.offset


def _corrupt_one_weight(package: Path) -> None:
    """One fp16 weight of the first convolution set far outside its tensor's range."""
    spec = read_spec(package)
    conv = next(op for op in _main_ops(spec) if op.type == "conv")
    weights = package / "Data/com.apple.CoreML/weights/weight.bin"
    _, start, size = BlobFile(weights).metadata(_blob_of(spec, conv.inputs["weight"].arguments[0].name))
    data = bytearray(weights.read_bytes())
    values = np.frombuffer(bytes(data[start:start + size]), np.float16).copy()
    values[0] = np.float16(5 * np.abs(values.astype(np.float32)).max())
    data[start:start + size] = values.tobytes()
    weights.write_bytes(bytes(data))


def _change_softmax_axis(package: Path) -> None:
    """An attention softmax normalises over queries instead of keys (same shape, wrong values)."""
    spec = read_spec(package)
    ops = _main_ops(spec)
    softmax = next(op for op in ops if op.type == "softmax")
    axis = next(op for op in ops if op.outputs[0].name == softmax.inputs["axis"].arguments[0].name)
    values = axis.attributes["val"].immediateValue.tensor.ints.values
    assert list(values) == [-1]
    values[:] = [-2]
    _rewrite_spec(package, spec)


def _break_blob_header(package: Path) -> None:
    """The weight file's first blob record loses its sentinel: the program cannot load."""
    weights = package / "Data/com.apple.CoreML/weights/weight.bin"
    data = bytearray(weights.read_bytes())
    data[64:68] = b"\0\0\0\0"
    weights.write_bytes(bytes(data))


@pytest.mark.parametrize("corrupt", [_corrupt_one_weight, _change_softmax_axis, _break_blob_header],
                         ids=["one-weight", "softmax-axis", "blob-header"])
def test_verify_fails_on_a_corrupted_package(m0_coreml, tmp_path, cli, corrupt):
    bad = _copy(m0_coreml.artifact.path, tmp_path, "EfficientViT-M0.mlpackage")
    corrupt(bad)
    code, out, err = cli("verify", bad, "--json", "-")
    assert code == EXIT_PARITY_FAILED, err
    report = json.loads(out)
    assert not report["passed"] and report["failures"]
    assert "parity FAILED" in err and "Traceback" not in err
    if corrupt is _break_blob_header:
        assert "failed to run" in report["failures"][0] and "sentinel" in report["failures"][0]
        assert report["extra"]["fp16_drift"] is None and "sentinel" in report["extra"]["fp16_drift_error"]


def test_unknown_op_is_a_one_line_error_naming_it(m0_coreml, tmp_path, cli):
    bad = _copy(m0_coreml.artifact.path, tmp_path)
    spec = read_spec(bad)
    ops = _main_ops(spec)
    index = next(i for i, op in enumerate(ops) if op.type == "sigmoid")
    ops[index].type = "hard_sigmoid_v9"
    _rewrite_spec(bad, spec)
    code, _, err = cli("-q", "verify", bad)
    assert code == EXIT_BAD_INPUT
    (line,) = err.strip().splitlines()
    assert line.startswith("error: ") and "Traceback" not in err
    assert "'hard_sigmoid_v9'" in line and f"operation {index} of function main" in line


def test_export_refuses_a_program_the_executor_cannot_verify(tmp_path, cli, monkeypatch):
    from evit_deploy.targets.coreml.reference import ops

    monkeypatch.delitem(ops.OPS, "clip")          # custom_models.mobile_cnn uses ReLU6
    code, _, err = cli("-q", "export", "--model", "custom_models:mobile_cnn", "--input-size", "96",
                       "-t", "coreml", "--out", tmp_path)
    assert code == EXIT_EXPORT_FAILED
    (line,) = err.strip().splitlines()
    assert "op 'clip'" in line and "mobile-cnn.mlpackage" in line and ".evit-staging" not in line
    assert list(tmp_path.iterdir()) == []


def test_not_a_package(tmp_path, cli):
    fake = tmp_path / "Fake.mlpackage"
    fake.mkdir()
    code, _, err = cli("verify", fake)
    assert code == EXIT_BAD_INPUT and "is not an .mlpackage" in err


# -- options -----------------------------------------------------------------------------------

def test_compressed_variant_reports_size_and_parity(tmp_path):
    # Every mode's decoding is checked against coremltools in test_coreml_ops; this is
    # the whole pipeline for one of them.
    mode, op = "palettize8", "constexpr_lut_to_dense"
    result = api.export("m0", "coreml", out_dir=tmp_path, options={"compress": mode})
    report = result.report
    assert result.artifact.path.name == f"EfficientViT-M0-{mode}.mlpackage"
    assert report.precision == "compressed" and report.passed, report.summary()
    assert op in {o.type for o in _main_ops(read_spec(result.artifact.path))}
    extra = report.extra
    assert extra["compress"] == mode
    assert extra["weights_bytes"] == (result.artifact.path / "Data/com.apple.CoreML/weights/weight.bin").stat().st_size
    assert extra["weights_bytes"] < 0.6 * extra["uncompressed_weights_bytes"]
    assert report.outputs[0].max_rel > 1e-3       # lossy, and measured as such


class FeaturePyramid(nn.Module):
    """The three stage outputs of a classifier's backbone: several 4-D outputs, no labels."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return tuple(self.model.forward_features(x))


def efficientvit_m0_pyramid() -> nn.Module:
    from evit_deploy.models.factory import create_model
    return FeaturePyramid(create_model("m0", "random", seed=5))


def test_tensor_input_batch_and_several_outputs(tmp_path):
    result = api.export(f"{__name__}:efficientvit_m0_pyramid", "coreml", out_dir=tmp_path, input_size=(224, 224),
                        batch=2, options={"input_type": "tensor"})
    assert result.report.passed, result.report.summary()
    assert [o.name for o in result.report.outputs] == ["output_0", "output_1", "output_2"]
    spec = read_spec(result.artifact.path)
    (tensor,) = spec.description.input
    assert tensor.type.WhichOneof("Type") == "multiArrayType" and list(tensor.type.multiArrayType.shape) == [2, 3, 224, 224]
    outputs = {o.name: list(o.type.multiArrayType.shape) for o in spec.description.output}
    assert outputs == {"output_0": [2, 64, 14, 14], "output_1": [2, 128, 7, 7], "output_2": [2, 192, 4, 4]}
    assert not spec.description.predictedFeatureName                     # not a classifier
    assert "com.apple.coreml.model.preview.type" not in spec.description.metadata.userDefined
    assert result.artifact.description.input_format == "float01"
    run = api.run(result.artifact.path, SAMPLE[:3])                       # padded to two batches of two
    assert {k: v.shape for k, v in run.outputs.items()} == {
        "output_0": (3, 64, 14, 14), "output_1": (3, 128, 7, 7), "output_2": (3, 192, 4, 4)}


def test_profile_iphone11_a13(tmp_path, cli):
    # What the profile sets does not depend on the model or its size: M0 at 64x64.
    code, out, err = cli("export", "m0", "--img-size", "64", "--device", "iphone11-a13", "--out", tmp_path,
                         "--json", tmp_path / "r.json")
    assert code == 0, err
    artifact = Path(out.strip().splitlines()[-1])
    assert artifact.name == "EfficientViT-M0.mlpackage"
    assert "reference-executor" in out and "fp16_drift" in out      # what ran, and the drift
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["passed"] and report["precision"] == "fp16"
    description = CoreMLTarget().read_description(artifact)
    assert description.extra["profile"] == "iphone11-a13"
    assert description.extra["options"]["compute_units"] == "cpu_and_ne"
    assert read_spec(artifact).specificationVersion == 7


@pytest.mark.parametrize("args,message", [
    (["--compress", "int8", "--minimum-deployment-target", "iOS15"], "needs --minimum-deployment-target iOS16"),
    (["--batch", "2"], "takes one image at a time"),
    (["--dynamic-batch"], "does not support a dynamic batch"),
    (["--compute-units", "cpu_and_neural_engine"], "did you mean 'cpu_and_ne'"),
    (["--minimum-deployment-target", "ios16"], "did you mean 'iOS16'"),
])
def test_bad_requests_are_one_line_errors(cli, tmp_path, args, message):
    code, _, err = cli("export", "m0", "-t", "coreml", "--out", tmp_path, *args)
    assert code == EXIT_BAD_INPUT, err
    assert message in err and "Traceback" not in err
    assert not list(tmp_path.glob("*.mlpackage"))


# -- the Core ML runtime path (macOS) ----------------------------------------------------------

class FakeMLModel:
    """Stands in for coremltools.models.MLModel: records what predict() was given."""

    def __init__(self, labels):
        self.labels = labels
        self.fed = []

    def predict(self, feed):
        self.fed.append(feed)
        image = np.asarray(feed["image"], np.float32)
        scores = np.zeros(len(self.labels), np.float32)
        scores[int(image.sum()) % len(self.labels)] = 1.0
        return {"classLabel": self.labels[int(scores.argmax())], "logits": scores[None],
                "classLabelProbs": {label: float(s) for label, s in zip(self.labels, scores)}}


def test_core_ml_runtime_gets_pil_images_and_its_outputs_become_arrays(m0_coreml):
    description = m0_coreml.artifact.description
    model = FakeMLModel(list(description.labels))
    pixels = np.random.default_rng(0).integers(0, 256, (2, 3, 224, 224), dtype=np.uint8)
    results = runtime.predict(model, description, {"image": pixels})
    assert len(results) == len(model.fed) == 2
    for fed, item in zip(model.fed, pixels):
        assert fed["image"].mode == "RGB" and fed["image"].size == (224, 224)
        assert np.array_equal(np.asarray(fed["image"]), item.transpose(1, 2, 0))
    outputs = [numeric_outputs(r, description) for r in results]
    assert sorted(outputs[0]) == ["classLabelProbs", "logits"]
    for out, result in zip(outputs, results):
        assert out["classLabelProbs"].shape == (1, 1000)
        assert description.labels[int(out["classLabelProbs"].argmax())] == result["classLabel"]


def test_reference_executor_off_macos_or_when_asked(monkeypatch, m0_coreml):
    monkeypatch.setattr(runtime.sys, "platform", "darwin")
    monkeypatch.setenv(runtime.EXECUTOR_ENV, "reference")
    assert not runtime.available()
    assert "reference executor" in CoreMLTarget().runtime_name(m0_coreml.artifact.path)
    monkeypatch.setattr(runtime.sys, "platform", "linux")
    monkeypatch.delenv(runtime.EXECUTOR_ENV)
    assert not runtime.available()
