"""ONNX target: export, metadata, options, batches, .npy inputs, rebuilding the reference.
What every target does (parity, corruption, torch-free run) is tests/contract/."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from conftest import SMALL
from evit_deploy import api
from evit_deploy.preprocess import sample_images
from evit_deploy.targets.onnx.runtime import METADATA_KEY

SAMPLE = sample_images()


def _initializer_hashes(model):
    import hashlib
    return [(i.data_type, tuple(i.dims), hashlib.sha256(numpy_helper.to_array(i).tobytes()).hexdigest())
            for i in model.graph.initializer]


def test_export_writes_a_checked_model_with_metadata(m0_onnx):
    model = onnx.load(m0_onnx)
    onnx.checker.check_model(model, full_check=True)
    meta = {p.key: p.value for p in model.metadata_props}
    desc = json.loads(meta[METADATA_KEY])
    assert desc["model"] == "efficientvit_m0" and desc["weights"] == "random-init" and desc["seed"] == 0
    assert desc["preprocessing"]["mean"] == [0.485, 0.456, 0.406]
    assert len(desc["labels"]) == 1000 and desc["labels"][281] == "tabby"
    assert meta["input_format"] == "normalized" and meta["evit_deploy_version"]
    assert [i.name for i in model.graph.input] == ["image"]
    assert [o.name for o in model.graph.output] == ["logits"]
    hashes = _initializer_hashes(model)
    assert len(hashes) == len(set(hashes)), "duplicate initializers"


def test_the_worst_conditioned_model_with_realistic_weights_passes(tmp_path, checkpoint):
    # Seed 1 of M5 is the checkpoint on which fp32 PyTorch is 2.8e-4 of the output scale
    # from the exact answer: the fixed 1e-4 rule against PyTorch fp32 rejected this export.
    # A realistic M0 passes in test_parity.py; M0-M5 on every fp32 target:
    # benchmarks/parity_noise.py.
    weights = checkpoint("m5", seed=1, recipe="realistic")
    result = api.export("m5", "onnx", out_dir=tmp_path, weights=weights)
    report = result.report
    assert report.passed, report.summary()
    logits = report.outputs[0]
    assert report.exact_answer == "float64"
    assert all(row["artifact"] <= row["limit"] for row in logits.per_input)
    assert logits.top1_agree + logits.top1_ties == len(report.inputs)
    desc = onnx.load(result.artifact.path).metadata_props
    assert any(p.key == "weights_sha256" and len(p.value) == 64 for p in desc)


def test_fp16_has_fp16_weights_and_fp32_io(tiny_export):
    result = tiny_export("onnx", "fp16")
    assert result.report.passed and result.report.precision == "fp16"
    model = onnx.load(result.artifact.path)
    float_inits = [i for i in model.graph.initializer if i.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
                   and numpy_helper.to_array(i).size > 16]
    assert float_inits and all(i.data_type == onnx.TensorProto.FLOAT16 for i in float_inits)
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    logits = result.report.outputs[0]
    assert logits.max_rel > 1e-6          # really computed in fp16
    photos = [i for i in result.report.inputs if i.kind == "photo"]
    assert photos and all(i.reference_top1 == i.artifact_top1 for i in photos)


@pytest.mark.parametrize("fmt,dtype", [("uint8", np.uint8), ("float01", np.float32)])
def test_baked_preprocessing_takes_raw_rgb(tmp_path, fmt, dtype):
    result = api.export("m0", "onnx", out_dir=tmp_path, options={"bake_preprocessing": fmt}, dynamic_batch=True,
                        img_size=SMALL)
    assert result.report.passed
    model = onnx.load(result.artifact.path)
    elem = model.graph.input[0].type.tensor_type.elem_type
    assert elem == (onnx.TensorProto.UINT8 if dtype is np.uint8 else onnx.TensorProto.FLOAT)
    # Same predictions as the normalised-input model on the same photos.
    run = api.run(result.artifact.path, SAMPLE)
    preds = api.predict("m0", SAMPLE, img_size=SMALL)
    assert [p.top[0][0] for p in run.predictions] == [p.top[0][0] for p in preds]
    # One path on its own is one input (not a string of characters).
    one = api.run(result.artifact.path, str(SAMPLE[0]))
    assert [p.top for p in one.predictions] == [run.predictions[0].top]


def test_dynamic_and_static_batches(tmp_path):
    static = api.export("m0", "onnx", out_dir=tmp_path / "b3", batch=3, img_size=SMALL)
    assert static.report.passed
    model = onnx.load(static.artifact.path)
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 3
    # five inputs through a batch-3 artifact: padded and trimmed
    result = api.run(static.artifact.path, SAMPLE + SAMPLE[:1])
    assert result.outputs["logits"].shape == (5, 1000)
    dynamic = api.export("m0", "onnx", out_dir=tmp_path / "dyn", dynamic_batch=True, img_size=SMALL)
    assert dynamic.report.passed
    assert dynamic.artifact.description.batch is None


def test_run_accepts_npy_tensors(m0_onnx, tmp_path, cli):
    from evit_deploy.preprocess import Preprocessing, preprocess_file

    x = np.concatenate([preprocess_file(p, Preprocessing.for_size(224)) for p in SAMPLE[:2]])
    np.save(tmp_path / "batch.npy", x)
    code, out, _ = cli("run", m0_onnx, tmp_path / "batch.npy", "--json", "-")
    assert code == 0
    preds = json.loads(out)
    assert [p["input"] for p in preds] == [f"{tmp_path / 'batch.npy'}[0]", f"{tmp_path / 'batch.npy'}[1]"]
    assert all(len(p["top"]) == 5 for p in preds)
    np.save(tmp_path / "wrong.npy", x[:, :, :100])
    code, _, err = cli("run", m0_onnx, tmp_path / "wrong.npy")
    assert code == 2 and "has shape" in err


def test_verify_rebuilds_the_reference_from_a_checkpoint(tmp_path, checkpoint, cli):
    weights = checkpoint("m0", seed=21, img_size=SMALL)
    artifact = api.export("m0", "onnx", out_dir=tmp_path, weights=weights, img_size=SMALL).artifact.path
    code, _, err = cli("verify", artifact)
    assert code == 2 and "pass that file with --weights" in err
    code, _, _ = cli("verify", artifact, "--weights", weights)
    assert code == 0
    other = checkpoint("m0", seed=22, img_size=SMALL)
    code, _, err = cli("verify", artifact, "--weights", other)
    assert code == 2 and "is not the checkpoint this artifact was built from" in err


def test_verify_against_a_checkpoint_refuses_an_artifact_made_from_synthetic_weights(tmp_path, checkpoint, cli):
    """Exported without --weights by mistake: checked against its own synthetic weights it
    would pass, and say nothing of the checkpoint the user named."""
    artifact = api.export("m0", "onnx", out_dir=tmp_path, img_size=SMALL).artifact.path
    weights = checkpoint("m0", seed=21, img_size=SMALL)
    code, _, err = cli("verify", artifact, "--weights", weights)
    assert code == 2 and "made from synthetic weights (random-init, seed 0)" in err and "Traceback" not in err
    code, _, err = cli("eval", artifact, "--weights", weights)
    assert code == 0 and "compared with the model it was made from" in err


def test_a_model_without_head_outputs_features_not_classes(tmp_path, cli):
    """num_classes=0 (timm's way to ask for a feature extractor): the artifact's output is
    the pooled feature vector, named and documented so, with no labels to mistake it for
    class probabilities."""
    code, _, err = cli("export", "m0", "-t", "onnx", "--num-classes", 0, "--img-size", SMALL, "--out", tmp_path)
    assert code == 0, err
    path = tmp_path / "efficientvit_m0.onnx"
    description = api.inspect_artifact(path)[1]
    assert [o.name for o in description.outputs] == ["features"] and description.labels is None
    assert description.outputs[0].shape[1:] == (192,) and "no classifier head" in description.outputs[0].doc
    code, out, _ = cli("run", path, SAMPLE[0], "--json", "-")
    assert code == 0 and json.loads(out) == []            # no predictions: there are no classes
    code, out, _ = cli("run", path, SAMPLE[0])
    assert code == 0 and "features" in out and "class_" not in out and "probability" not in out
