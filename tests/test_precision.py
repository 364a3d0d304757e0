"""Reduced precision: the precision option every target has, calibration, int8 exports
(ONNX through onnxruntime's quantizer, Core ML W8A8 verified by the reference executor),
and precisions side by side in ``bench``."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from evit_deploy import api
from evit_deploy.calibration import DEFAULT_CROPS, calibration_set
from evit_deploy.errors import EXIT_BAD_INPUT, EXIT_PARITY_FAILED, BadInputError
from evit_deploy.preprocess import Preprocessing, sample_images
from evit_deploy.targets.options import option, parse_cli_values, parse_options, precision_option

SIZE = 64           # small inputs: int8 behaviour does not need 224x224
SPEC = Preprocessing.for_size(SIZE)


def _image_dir(path, sources, copies=1):
    """A folder of copies of the bundled photos (optionally in subfolders)."""
    path.mkdir(parents=True, exist_ok=True)
    for i in range(copies):
        for source in sources:
            shutil.copy(source, path / f"{source.stem}-{i}{source.suffix}")
    return path


# -- the option ----------------------------------------------------------------------------

@dataclass
class WithPrecision:
    precision: str = precision_option("fp32", ("fp32", "int8"))


@dataclass
class WithoutPrecision:
    level: int = option(1, "a level")


def test_each_target_declares_its_precisions_and_refuses_others():
    assert parse_options(WithPrecision, {"precision": "int8"}, target="t", source="s").precision == "int8"
    with pytest.raises(BadInputError, match=r"^s: target 't' does not support precision 'bf16' \(it supports "
                                            r"fp32, int8\)$"):
        parse_options(WithPrecision, {"precision": "bf16"}, target="t", source="s")
    with pytest.raises(BadInputError, match="unknown value"):
        parse_options(WithPrecision, {"precision": "int4"}, target="t", source="s")
    # A target without the option exports fp32: asking for fp32 is fine, anything else is not.
    assert parse_options(WithoutPrecision, {"precision": "fp32"}, target="t", source="s") == WithoutPrecision()
    assert parse_cli_values(WithoutPrecision, ["--precision", "fp32"], target="t") == {"precision": "fp32"}
    with pytest.raises(BadInputError, match="does not support precision 'int8' \\(it supports fp32\\)"):
        parse_options(WithoutPrecision, {"precision": "int8"}, target="t", source="s")
    from evit_deploy.targets import get_target
    assert get_target("onnx").precisions() == ("fp32", "fp16", "int8")
    assert get_target("coreml").precisions() == ("fp16", "fp32", "int8")


@pytest.mark.parametrize("args,message", [
    # A precision a target does not export: tests/contract (every target) and test_plan.py.
    (["export", "m0", "-t", "coreml", "--precision", "int8"],
     "--precision int8 needs --minimum-deployment-target iOS17 or later"),
    (["export", "m0", "-t", "coreml", "--precision", "int8", "--minimum-deployment-target", "iOS17",
      "--compress", "palettize8"], "--precision int8 already stores int8 weights"),
    (["export", "m0", "-t", "onnx", "--fp16", "--precision", "int8"], "--fp16 and --precision int8 contradict"),
    (["export", "m0", "-t", "onnx", "--calibration", "."], "--calibration is for --precision int8"),
    (["export", "m0", "-t", "onnx", "--quantization", "dynamic"], "--quantization dynamic is for --precision int8"),
    (["export", "m0", "-t", "onnx", "--precision", "int8", "--calibration", "no-such-dir"],
     "image directory not found: no-such-dir"),
    (["bench", "m0", "--backends", "onnxruntime:bf16"], "does not support precision 'bf16'"),
    (["bench", "m0", "--backends", "torch:int8"], "PyTorch backends run fp32 only"),
])
def test_unsupported_precisions_are_one_line_errors(cli, args, message):
    code, out, err = cli(*args)
    assert code == EXIT_BAD_INPUT, err
    assert message in err and len(err.strip().splitlines()) == 1


# -- calibration ---------------------------------------------------------------------------

def test_default_calibration_is_the_photos_and_seeded_crops():
    default = calibration_set(SPEC)
    assert default.is_default and len(default.images) == len(sample_images()) + DEFAULT_CROPS
    assert default.images.shape[1:] == (SIZE, SIZE, 3) and default.images.dtype == np.uint8
    assert calibration_set(SPEC).sha256 == default.sha256                      # seeded
    assert calibration_set(SPEC, seed=1).sha256 != default.sha256
    # Batches in the format the quantized program takes; a fixed batch gets full batches.
    fixed = list(default.batches(SPEC, "normalized", 5))
    assert [len(b) for b in fixed] == [5] * 7 and fixed[0].dtype == np.float32 and fixed[0].shape[1:] == (3, SIZE, SIZE)
    np.testing.assert_array_equal(fixed[-1][2:], fixed[0][:3])                 # completed from the start
    raw = list(default.batches(SPEC, "uint8", None))
    assert [len(b) for b in raw] == [16, 16] and raw[0].dtype == np.uint8


def test_calibration_directory_is_searched_and_sampled(tmp_path):
    photos = sample_images()
    _image_dir(tmp_path / "calib" / "a", photos[:2])
    _image_dir(tmp_path / "calib" / "b", photos[2:], copies=2)
    found = calibration_set(SPEC, tmp_path / "calib")
    assert not found.is_default and len(found.images) == 6 and found.names[0].startswith("a/")
    sampled = calibration_set(SPEC, tmp_path / "calib", max_images=3)
    assert len(sampled.images) == 3 and set(sampled.names) <= set(found.names)
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadInputError, match="no images"):
        calibration_set(SPEC, tmp_path / "empty")


# -- ONNX int8 -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def onnx_int8(tmp_path_factory):
    """Static int8 exports of one realistic M0, calibrated on two different image sets."""
    from conftest import save_checkpoint

    root = tmp_path_factory.mktemp("onnx-int8")
    weights = save_checkpoint(root / "m0.pth", "m0", seed=1, recipe="realistic", img_size=SIZE)
    photos = sample_images()
    exports = {}
    for name, sources in (("cat-coffee", photos[1:3]), ("rocket-astronaut", [photos[0], photos[3]])):
        calib = _image_dir(root / name, sources)
        exports[name] = api.export("m0", "onnx", out_dir=root / f"out-{name}", weights=weights, img_size=SIZE,
                                   options={"precision": "int8", "calibration": str(calib)},
                                   verify=name == "cat-coffee")       # the other is only read
    return weights, exports


def _quantize_scales(path) -> dict[str, np.ndarray]:
    model = onnx.load(path)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return {n.input[0]: inits[n.input[1]] for n in model.graph.node if n.op_type == "QuantizeLinear"}


def test_onnx_int8_verifies_in_its_class_and_records_its_calibration(onnx_int8):
    _, exports = onnx_int8
    result = exports["cat-coffee"]
    assert result.artifact.path.name == "efficientvit_m0_int8.onnx"
    report = result.report
    assert report.passed and report.precision == "int8", report.summary()
    assert report.outputs[0].max_rel > 1e-3                   # really int8
    desc = result.artifact.description
    assert desc.extra["precision"] == "int8" and desc.extra["options"]["precision"] == "int8"
    assert desc.extra["int8"]["calibration"]["images"] == 2 and desc.extra["int8"]["mode"] == "static"
    ops = {n.op_type for n in onnx.load(result.artifact.path).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    weights = [i for i in onnx.load(result.artifact.path).graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert sum(numpy_helper.to_array(i).size for i in weights) > 100_000     # the weights are int8


def test_calibration_images_set_the_activation_scales(onnx_int8, tmp_path):
    weights, exports = onnx_int8
    a = _quantize_scales(exports["cat-coffee"].artifact.path)
    b = _quantize_scales(exports["rocket-astronaut"].artifact.path)
    assert a.keys() == b.keys() and len(a) > 50
    differ = [name for name in a if not np.array_equal(a[name], b[name])]
    assert len(differ) > len(a) // 2
    # The same calibration gives the same bytes (the ONNX target promises reproducible files).
    again = api.export("m0", "onnx", out_dir=tmp_path, weights=weights, img_size=SIZE, verify=False,
                       options=exports["cat-coffee"].artifact.description.extra["options"])
    assert again.artifact.path.read_bytes() == exports["cat-coffee"].artifact.path.read_bytes()


def test_a_broken_int8_artifact_fails_verify(onnx_int8, tmp_path, cli):
    weights, exports = onnx_int8
    model = onnx.load(exports["cat-coffee"].artifact.path)
    # The per-channel weight scales of the classifier: 30% too large. Its error stays within
    # what an ill-conditioned model's correct int8 export reaches; its gain does not.
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
    producers = {o: n for n in model.graph.node for o in n.output}
    scale_name = producers[gemm.input[1]].input[1]
    init = next(i for i in model.graph.initializer if i.name == scale_name)
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1.3, init.name))
    broken = tmp_path / "efficientvit_m0_int8.onnx"
    onnx.save(model, broken)
    code, _, err = cli("verify", broken, "--weights", weights)
    assert code == EXIT_PARITY_FAILED and "gain" in err, err
    code, _, err = cli("verify", exports["cat-coffee"].artifact.path, "--weights", weights)
    assert code == 0, err


# -- Core ML W8A8 --------------------------------------------------------------------------

def test_coreml_w8a8_verifies_through_the_reference_executor(tmp_path, checkpoint):
    from evit_deploy.targets.coreml.reference import Program

    weights = checkpoint("m0", seed=1, recipe="realistic", img_size=SIZE)
    calib = _image_dir(tmp_path / "calib", sample_images()[:2])
    result = api.export("m0", "coreml", out_dir=tmp_path, weights=weights, img_size=SIZE,
                        options={"precision": "int8", "minimum_deployment_target": "iOS17",
                                 "calibration": str(calib)})
    assert result.artifact.path.name == "EfficientViT-M0-w8a8.mlpackage"
    report = result.report
    assert report.passed and report.precision == "int8" and report.extra["executor"] == "reference-executor", \
        report.summary()
    ops = [op.type for op in Program(result.artifact.path).steps]
    assert ops.count("quantize") > 50 and ops.count("quantize") == ops.count("dequantize")
    assert result.artifact.description.extra["int8"]["calibration"]["images"] == 2
    # W8A8 stores int8 weights: about half the fp16 program's.
    assert report.extra["weights_bytes"] < 0.6 * report.extra["package_bytes"] * 2


# -- bench ---------------------------------------------------------------------------------

def test_bench_times_precisions_of_one_runtime_side_by_side(cli, tmp_path):
    # The default synthetic weights need all four photos to calibrate on at this size
    # (with one, int8 fails parity: cosine 0.64 on the photos).
    calib = _image_dir(tmp_path / "calib", sample_images())
    code, _, err = cli("bench", "m0", "--backends", "onnxruntime,onnxruntime:int8", "--batch", "2", "--img-size",
                       str(SIZE), "--rounds", "2", "--round-seconds", "0.05", "--no-memory",
                       "-O", f"onnx.calibration={calib}", "--json", tmp_path / "b.json")
    assert code == 0, err
    data = json.loads((tmp_path / "b.json").read_text())
    assert data["settings"]["precisions"] == {"onnxruntime": "fp32", "onnxruntime:int8": "int8"}
    records = {r["backend"]: r for r in data["records"]}
    assert set(records) == {"onnxruntime", "onnxruntime:int8"}
    assert all(r["images_per_s"] > 0 for r in records.values())
