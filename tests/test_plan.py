"""The export plan (evit_deploy/plan.py), in-process: every decision about an
export made before anything is traced, and every bad request refused there."""

from __future__ import annotations

import dataclasses

import pytest

from evit_deploy.errors import BadInputError
from evit_deploy.plan import merge_options, plan_export, resolve_model_name
from evit_deploy.targets import get_target


def test_defaults_of_a_plan():
    plan = plan_export("M0", "onnx")
    assert plan.request.model == "efficientvit_m0" and plan.request.weights is None
    assert (plan.target.name, plan.batch, plan.dynamic_batch, plan.input_format, plan.precision) == \
        ("onnx", 1, False, "normalized", "fp32")
    assert plan.options == get_target("onnx").parse_options({}) and plan.notes == ()
    assert plan.options_dict()["opset"] == 18 and plan.device is None


@pytest.mark.parametrize("target,options,precision,input_format", [
    ("onnx", {"precision": "int8"}, "int8", "normalized"),
    ("onnx", {"fp16": True}, "fp16", "normalized"),
    ("coreml", {}, "fp16", "float01"),
    ("coreml", {"precision": "fp32"}, "fp32", "float01"),
    ("coreml", {"compress": "palettize8"}, "compressed", "float01"),
    ("tvm", {}, "fp32", "normalized"),
])
def test_the_target_decides_precision_class_and_input_format(target, options, precision, input_format):
    plan = plan_export("m0", target, options=options)
    assert (plan.precision, plan.input_format) == (precision, input_format)


def test_options_merge_in_order_and_come_back_validated():
    target, options, device = merge_options("onnx", {"opset": 19, "precision": "fp16"}, cli_args=["--opset", "20"])
    assert target.name == "onnx" and (options.opset, options.precision) == (20, "fp16") and device is None
    # A validated Options dataclass is accepted as it is.
    again = plan_export("m0", "onnx", options=options)
    assert again.options == options
    assert plan_export("m0", "onnx", options={"opset": "19"}).options.opset == 19


def test_batches():
    assert plan_export("m0", "onnx", batch=4).batch == 4
    dynamic = plan_export("m0", "onnx", dynamic_batch=True)
    assert dynamic.dynamic_batch and dynamic.batch == 1
    with pytest.raises(BadInputError, match="batch must be at least 1, got 0"):
        plan_export("m0", "onnx", batch=0)


def test_plans_that_can_share_a_trace():
    onnx, openvino = plan_export("m0", "onnx", img_size=64), plan_export("m0", "openvino", img_size=64)
    assert onnx.trace_key == openvino.trace_key
    assert plan_export("m0", "coreml", img_size=64).trace_key != onnx.trace_key      # another input format
    assert plan_export("m0", "onnx", img_size=96).trace_key != onnx.trace_key
    assert plan_export("m0", "onnx", img_size=64, batch=2).trace_key != onnx.trace_key
    with pytest.raises(dataclasses.FrozenInstanceError):
        onnx.batch = 2


def test_any_torch_module_keeps_its_spec():
    assert resolve_model_name("custom_models:tiny_attention") == "custom_models:tiny_attention"
    assert resolve_model_name("efficientvit-m3") == resolve_model_name("m3") == "efficientvit_m3"
    plan = plan_export("custom_models:tiny_attention", "onnx", input_size=(64, 64))
    assert plan.request.model == "custom_models:tiny_attention" and plan.request.input_size == (64, 64)


@pytest.mark.parametrize("kwargs,message", [
    ({"model": "m9", "target": "onnx"}, "unknown model 'm9'"),
    ({"model": "m0", "target": "onxx"}, "unknown target 'onxx' (did you mean 'onnx'?)"),
    ({"model": "m0", "target": None}, "no target given"),
    ({"model": "m0", "target": "onnx", "options": {"opset": 12}}, "unknown value"),
    ({"model": "m0", "target": "onnx", "options": {"opsett": 18}}, "did you mean 'opset'?"),
    ({"model": "m0", "target": "onnx", "options": {"precision": "bf16"}},
     "target 'onnx' does not support precision 'bf16' (it supports fp32, fp16, int8)"),
    ({"model": "m0", "target": "onnx", "options": {"fp16": True, "precision": "int8"}},
     "--fp16 and --precision int8 contradict"),
    ({"model": "m0", "target": "onnx", "options": {"calibration": "."}}, "--calibration is for --precision int8"),
    ({"model": "m0", "target": "onnx", "options": {"int8_kernels": "vnni"}}, "--int8-kernels is for --precision int8"),
    ({"model": "m0", "target": "onnx", "options": {"precision": "int8", "calibration": "no-such-dir"}},
     "image directory not found: no-such-dir"),
    ({"model": "m0", "target": "onnx", "options": {"precision": "int8", "calibration": __file__}},
     f"{__file__} is a file: give the directory that holds the images"),
    ({"model": "m0", "target": "onnx", "cli_args": ["--opset"]}, "option --opset of target 'onnx' needs a value"),
    ({"model": "m0", "target": "coreml", "dynamic_batch": True}, "does not support a dynamic batch"),
    ({"model": "m0", "target": "coreml", "options": {"precision": "int8"}},
     "--precision int8 needs --minimum-deployment-target iOS17 or later"),
    ({"model": "m0", "target": "tvm", "options": {"precision": "int8"}}, "does not support precision 'int8'"),
    ({"model": "m0", "target": "tvm", "options": {"db": "no-such-db"}}, "no-such-db"),
])
def test_bad_requests_are_refused_before_any_work(kwargs, message):
    kwargs = dict(kwargs)
    with pytest.raises(BadInputError) as info:
        plan_export(kwargs.pop("model"), kwargs.pop("target"), **kwargs)
    assert message in str(info.value) and "\n" not in str(info.value)

