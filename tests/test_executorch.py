"""ExecuTorch target: an fp32 export of a realistic M0 at 64x64 (fully delegated to
XNNPACK, the description in the program, verification that fails on a damaged weight)
and the fp16 and int8 exports of the tiny attention model. What every target does
(truncated files, atomic writes, bad input) is tests/contract/."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import SMALL, export_once, reduced_precision_description
from evit_deploy import api
from evit_deploy.errors import EXIT_PARITY_FAILED
from evit_deploy.models.checkpoint import sha256_file
from evit_deploy.preprocess import sample_images

pytest.importorskip("executorch")

SAMPLE = sample_images()
@pytest.fixture(scope="module")
def fp32(tmp_path_factory, realistic_m0):
    return export_once(tmp_path_factory, "m0", "executorch", weights=realistic_m0, img_size=SMALL)


@pytest.fixture
def tiny(tiny_export):
    """{precision: export} of the tiny attention model in fp16 and int8 (shared with tests/contract)."""
    return {"fp16": tiny_export("executorch", "fp16"), "int8": tiny_export("executorch", "int8")}


def test_fp32_is_fully_delegated_verifies_and_carries_its_description(fp32, realistic_m0):
    weights = realistic_m0
    assert fp32.report.passed and fp32.report.precision == "fp32", fp32.report.summary()
    assert fp32.artifact.path.name == "efficientvit_m0.pte"
    _, stored = api.inspect_artifact(fp32.artifact.path)
    assert stored == fp32.artifact.description
    assert stored.weights == sha256_file(weights) and stored.labels[281] == "tabby"
    assert stored.preprocessing.mean == (0.485, 0.456, 0.406) and stored.extra["precision"] == "fp32"
    delegation = stored.extra["executorch"]["delegation"]
    assert delegation["ops_outside_xnnpack"] == {} and delegation["fully_delegated"]
    assert delegation["xnnpack_delegate_calls"] >= 1


def test_the_program_has_the_description_method(fp32):
    from executorch.runtime import Runtime

    from evit_deploy.targets.executorch.runtime import DESCRIPTION_METHOD

    program = Runtime.get().load_program(fp32.artifact.path.read_bytes())
    assert program.method_names == {"forward", DESCRIPTION_METHOD}
    text = program.load_method(DESCRIPTION_METHOD).execute([])[0]
    assert json.loads(text) == json.loads(fp32.artifact.description.to_json())


def test_int8_verifies_in_its_class(tiny):
    desc = reduced_precision_description(tiny["int8"], "int8")
    assert desc.extra["executorch"]["int8"]["calibration"]["images"] == len(SAMPLE)
    assert desc.extra["executorch"]["delegation"]["fully_delegated"]


def test_fp16_is_fully_delegated_with_float16_io_and_verifies_in_its_class(tiny):
    desc = reduced_precision_description(tiny["fp16"], "fp16")
    # float16 ends: a float32 input or output would need a dtype cast, which ExecuTorch's
    # XNNPACK partitioner leaves to the portable kernels (see lower.py).
    assert desc.input.dtype == "float16" and [o.dtype for o in desc.outputs] == ["float16"]
    delegation = desc.extra["executorch"]["delegation"]
    assert delegation["fully_delegated"] and delegation["xnnpack_delegate_calls"] == 1, delegation
    # run converts: a float32 image in, float32 logits out (verify above did the same).
    path = tiny["fp16"].artifact.path
    target, _ = api.inspect_artifact(path)
    x = np.random.default_rng(0).standard_normal(tuple(desc.input.shape)).astype(np.float32)
    assert target.run(path, {desc.input.name: x})[desc.outputs[0].name].dtype == np.float32


def _reverse_a_weight(src, dst, weights):
    """The program with the values of the classifier's (BN-folded) weight, which the
    XNNPACK payload stores as raw fp32, in reverse order."""
    from torch import nn

    from evit_deploy.models import create_model

    model = create_model("m0", weights, fuse=True, img_size=SMALL)
    linear = max((m for m in model.modules() if isinstance(m, nn.Linear)), key=lambda m: m.weight.numel())
    weight = linear.weight.detach().numpy()
    data = bytearray(src.read_bytes())
    start = data.find(weight.tobytes()[:256])
    assert start > 0, "the classifier weight is not stored as raw fp32"
    values = np.frombuffer(bytes(data[start:start + weight.nbytes]), np.float32)
    data[start:start + weight.nbytes] = values[::-1].tobytes()
    dst.write_bytes(bytes(data))


def test_verify_fails_on_a_damaged_file(fp32, realistic_m0, tmp_path, cli):
    weights = realistic_m0
    good = fp32.artifact.path
    assert fp32.report.passed    # verified by its export
    bad = tmp_path / good.name
    _reverse_a_weight(good, bad, weights)
    code, out, err = cli("verify", bad, "--weights", weights, "--json", "-")
    assert code == EXIT_PARITY_FAILED, err
    assert not json.loads(out)["passed"] and "parity FAILED" in err and "Traceback" not in err


def test_sessions_keep_their_thread_counts(fp32):
    """The process has one thread pool, and a delegate loaded before it is resized would
    wait forever on the old one: each session runs with its own count and reloads its
    method after another session resized the pool."""
    from executorch.extension.pybindings import portable_lib

    from evit_deploy.targets import get_target

    target = get_target("executorch")
    path = fp32.artifact.path
    one, two = target.open_session(path, threads=1), target.open_session(path, threads=2)
    x = {"image": np.random.default_rng(0).random((1, 3, SMALL, SMALL), dtype=np.float32)}
    first = one(x)["logits"]
    assert portable_lib._threadpool_get_thread_count() == 1
    np.testing.assert_array_equal(two(x)["logits"], first)
    assert portable_lib._threadpool_get_thread_count() == 2
    np.testing.assert_array_equal(one(x)["logits"], first)
    assert portable_lib._threadpool_get_thread_count() == 1


def test_profile_reports_xnnpack_operators_from_etdump(fp32):
    """``profile`` on a .pte: XNNPACK's operators inside the delegate call, by kind."""
    from evit_deploy.profiler import categorize
    from evit_deploy.targets.executorch.profile import OUTSIDE_OPERATORS

    target, desc = api.inspect_artifact(fp32.artifact.path)
    x = np.random.default_rng(0).standard_normal(tuple(desc.input.shape)).astype(np.float32)
    ops = target.profile_ops(fp32.artifact.path, {desc.input.name: x}, threads=1, iterations=2, blocks={})
    kinds = {op.name for op in ops}
    assert all("#" not in k for k in kinds) and OUTSIDE_OPERATORS in kinds
    categories = {categorize(op.name)[0] for op in ops}
    assert {"convolution", "matrix multiply", "softmax"} <= categories, kinds
    assert all(op.seconds >= 0 for op in ops) and sum(op.seconds for op in ops) > 0


def test_operator_times_drop_the_warm_up_and_add_up_to_the_delegate_call():
    from types import SimpleNamespace as NS

    from evit_deploy.targets.executorch.profile import OUTSIDE_OPERATORS, operator_times

    def event(name, raw, delegated=True):
        return NS(name=name, perf_data=NS(raw=raw), is_delegated_op=delegated)

    blocks = [NS(events=[event("Method::init", [9.0], False)]),
              NS(events=[event("DELEGATE_CALL", [50.0, 10.0, 12.0], False),
                         event("Convolution (NHWC, F32) GEMM #1", [20.0, 4.0, 5.0]),
                         event("Convolution (NHWC, F32) GEMM #2", [20.0, 3.0, 3.0]),
                         event("Softmax (NC, F32) #1", [5.0, 1.0, 1.0]),
                         event("aten::_to_dim_order_copy", [1.0, 0.5, 0.5], delegated=False)])]
    times = {}
    for op in operator_times(blocks):
        times[op.name] = times.get(op.name, 0.0) + op.seconds
    assert times == pytest.approx({"Convolution (NHWC, F32) GEMM": 0.015, "Softmax (NC, F32)": 0.002,
                                   "aten::_to_dim_order_copy": 0.001, OUTSIDE_OPERATORS: 0.005})
