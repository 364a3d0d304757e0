"""Backend names (``RUNTIME[:PRECISION][@LABEL]``) parsed into specs, in-process: no export,
no timing (``tests/test_bench_profile.py`` runs them)."""

from __future__ import annotations

import dataclasses

import pytest

from evit_deploy.backends import TORCH_BACKENDS, BackendSpec, all_backends, backend_specs, parse_backends
from evit_deploy.errors import BadInputError


def test_a_name_says_runtime_precision_label_and_target():
    spec = BackendSpec.parse("tvm:bf16@tuned")
    assert (spec.name, spec.runtime, spec.precision, spec.label, spec.target) == \
        ("tvm:bf16@tuned", "tvm", "bf16", "tuned", "tvm")
    assert spec.variant == "tvm@tuned" and not spec.is_torch
    assert dict(spec.options) == {"precision": "bf16"}
    plain = BackendSpec.parse("onnxruntime")
    assert (plain.runtime, plain.precision, plain.label, plain.target, plain.variant) == \
        ("onnxruntime", "fp32", None, "onnx", None)
    for name in TORCH_BACKENDS:
        torch = BackendSpec.parse(name)
        assert torch.is_torch and torch.precision == "fp32" and dict(torch.options) == {}


def test_precision_is_the_named_one_else_the_options_else_the_targets_default():
    options = {"onnx": {"precision": "fp16", "opset": 18}, "onnx@old": {"opset": 17}}
    assert BackendSpec.parse("onnxruntime", options).precision == "fp16"
    assert BackendSpec.parse("onnxruntime:int8", options).precision == "int8"
    assert dict(BackendSpec.parse("onnxruntime:int8@old", options).options) == {"precision": "int8", "opset": 17}


def test_calibration_goes_to_the_int8_backend_only():
    options = {"onnx": {"calibration": "photos", "int8_kernels": "vnni", "opset": 18}}
    assert BackendSpec.parse("onnxruntime", options).export_options() == {"opset": 18}
    assert BackendSpec.parse("onnxruntime:int8", options).export_options() == \
        {"calibration": "photos", "int8_kernels": "vnni", "opset": 18, "precision": "int8"}


def test_specs_are_frozen():
    spec = BackendSpec.parse("onnxruntime", {"onnx": {"opset": 18}})
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.precision = "int8"
    with pytest.raises(TypeError):
        spec.options["opset"] = 17
    assert hash(spec) == hash(BackendSpec.parse("onnxruntime"))


@pytest.mark.parametrize("name,message", [
    ("onnxrt", "unknown backend 'onnxrt'"),
    ("tvm@", "a label follows '@'"),
    ("torch:int8", "PyTorch backends run fp32 only"),
    ("torch-jit@x", "no variants"),
    ("onnxruntime:bf16", "target 'onnx' does not support precision 'bf16' (it supports fp32, fp16, int8)"),
    ("onnxruntime:", "a precision follows ':'"),
])
def test_bad_names_are_one_line_errors(name, message):
    with pytest.raises(BadInputError) as info:
        BackendSpec.parse(name)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_backend_lists():
    assert parse_backends(" torch, onnxruntime:int8 ,torch,") == ["torch", "onnxruntime:int8"]
    assert parse_backends("all") == all_backends() and all_backends()[:2] == list(TORCH_BACKENDS)
    with pytest.raises(BadInputError, match="unknown backend 'onnxrt'"):
        parse_backends("torch,onnxrt")


def test_options_for_a_variant_nobody_asked_for_are_a_typo():
    specs = backend_specs(["onnxruntime", "onnxruntime@half"], {"onnx@half": {"precision": "fp16"}})
    assert [s.precision for s in specs] == ["fp32", "fp16"]
    with pytest.raises(BadInputError, match="no backend is labelled '@half' for target 'onnx'"):
        backend_specs(["onnxruntime"], {"onnx@half": {"precision": "fp16"}})


@pytest.mark.parametrize("options,message", [
    ({"onxx": {"opset": "18"}}, "unknown target 'onxx' (did you mean 'onnx'?)"),
    ({"tvm": {"nosuch": "1"}}, "unknown option for target 'tvm' in --option 'nosuch'"),
    ({"openvino": {"precision": "int9"}}, "'int9'"),
    ({"onnx": {"opset": "12"}}, "option 'opset' of target 'onnx' '12'"),
])
def test_options_for_a_target_no_backend_uses_are_still_checked(options, message):
    """A typo in ``-O`` is an error before any work, even for a target that is not timed
    (it would otherwise be silently left out)."""
    with pytest.raises(BadInputError) as info:
        backend_specs(["onnxruntime"], options)
    assert message in str(info.value) and "\n" not in str(info.value)
