"""LiteRT target: an fp32 export of a realistic M0 at 64x64 (fully delegated to XNNPACK,
the description in the file's metadata, verification that fails on a damaged weight) and
the int8 export of the tiny attention model (int8 input and output, fully delegated too).
What every target does (truncated files, torch-free running, bench backends) is
tests/contract/."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import SMALL, export_once, reduced_precision_description
from evit_deploy import api
from evit_deploy.errors import EXIT_PARITY_FAILED
from evit_deploy.models.checkpoint import sha256_file
from evit_deploy.preprocess import sample_images

pytest.importorskip("litert_torch")

SAMPLE = sample_images()
@pytest.fixture(scope="module")
def fp32(tmp_path_factory, realistic_m0):
    return export_once(tmp_path_factory, "m0", "litert", weights=realistic_m0, img_size=SMALL)


@pytest.fixture
def int8(tiny_export):
    """The int8 export of the tiny attention model (shared with tests/contract)."""
    return tiny_export("litert", "int8")


def test_fp32_verifies_and_the_file_carries_its_description(fp32, realistic_m0):
    from evit_deploy.targets.litert.flatbuffer import METADATA_NAME, metadata, operator_counts

    weights = realistic_m0
    assert fp32.report.passed and fp32.report.precision == "fp32", fp32.report.summary()
    assert fp32.artifact.path.name == "efficientvit_m0.tflite"
    data = fp32.artifact.path.read_bytes()
    entries = metadata(data)
    assert "min_runtime_version" in entries            # the converter's own entry is kept
    stored = json.loads(entries[METADATA_NAME])
    assert stored == json.loads(fp32.artifact.description.to_json())
    _, read_back = api.inspect_artifact(fp32.artifact.path)
    assert read_back == fp32.artifact.description
    assert read_back.weights == sha256_file(weights) and read_back.input_format == "normalized"
    assert read_back.preprocessing.mean == (0.485, 0.456, 0.406) and read_back.labels[281] == "tabby"
    assert read_back.extra["precision"] == "fp32"
    # What the description says about the operators is what the file holds, and the
    # delegate's share adds up to them.
    litert = read_back.extra["litert"]
    assert litert["operators"] == operator_counts(data)
    share = litert["delegation"]
    assert share["delegated_ops"] + sum(share["ops_outside_xnnpack"].values()) == sum(litert["operators"].values())
    # Every operator runs in one XNNPACK partition of the default Interpreter, the
    # attention's activation products included (rewritten as BATCH_MATMUL: see matmul.py).
    assert share["ops_outside_xnnpack"] == {} and share["xnnpack_partitions"] == 1, share
    assert litert["activation_products_as_batch_matmul"] > 0 and "FULLY_CONNECTED" in litert["operators"]


def test_signature_names_follow_the_description(fp32):
    from evit_deploy.targets.litert.runtime import Session

    session = Session(fp32.artifact.path, threads=1)
    assert list(session.inputs) == ["image"] and list(session.outputs) == ["logits"]
    assert session.threads == 1
    assert tuple(session.inputs["image"]["shape"]) == (1, 3, SMALL, SMALL)


def test_int8_verifies_in_its_class_with_int8_io(int8):
    desc = reduced_precision_description(int8, "int8")
    io = desc.extra["litert"]["quantized_io"]
    assert io["image"]["dtype"] == "int8" and io["image"]["scale"] > 0 and io["logits"]["kind"] == "output"
    assert desc.extra["litert"]["int8"]["calibration"]["images"] == len(SAMPLE)
    # The int8 attention products too run in XNNPACK (symmetric keys, BATCH_MATMUL).
    share = desc.extra["litert"]["delegation"]
    assert share["ops_outside_xnnpack"] == {} and share["xnnpack_partitions"] == 1, share
    assert desc.extra["litert"]["activation_products_as_batch_matmul"] > 0


def _reverse_largest_weight(src, dst):
    """The same model with the elements of its largest constant tensor in reverse order."""
    from ai_edge_litert import schema_py_generated as fb
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model_from_bytearray(bytearray(src.read_bytes()))
    sizes = {fb.TensorType.FLOAT32: 4, fb.TensorType.FLOAT16: 2, fb.TensorType.INT8: 1}
    tensors = [t for t in model.subgraphs[0].tensors if t.type in sizes and model.buffers[t.buffer].data is not None]
    tensor = max(tensors, key=lambda t: len(model.buffers[t.buffer].data))
    buffer = model.buffers[tensor.buffer]
    values = np.frombuffer(bytes(buffer.data), dtype=np.dtype(f"V{sizes[tensor.type]}"))
    buffer.data = np.frombuffer(values[::-1].tobytes(), dtype=np.uint8)
    dst.write_bytes(bytes(flatbuffer_utils.convert_object_to_bytearray(model)))


def test_verify_fails_on_a_damaged_file(fp32, realistic_m0, tmp_path, cli):
    weights = realistic_m0
    good = fp32.artifact.path
    assert fp32.report.passed    # verified by its export
    bad = tmp_path / good.name
    _reverse_largest_weight(good, bad)
    code, out, err = cli("verify", bad, "--weights", weights, "--json", "-")
    assert code == EXIT_PARITY_FAILED, err
    assert not json.loads(out)["passed"] and "parity FAILED" in err and "Traceback" not in err
