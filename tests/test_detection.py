"""Detection backbone + FPN: shapes, checkpoint loading, bias-table resizing, export."""

from __future__ import annotations

import json

import onnx
import pytest
import torch

from evit_deploy import api
from evit_deploy.errors import EXIT_BAD_INPUT
from evit_deploy.models import create_model
from evit_deploy.models.factory import load_model
from evit_deploy.models.detection import resize_bias_table


def _shapes(outputs):
    return [tuple(o.shape) for o in outputs]


def test_maskrcnn_levels_for_m4_at_512():
    model = create_model("m4", "random", task="detection")
    assert model.level_names == ["p2", "p3", "p4", "p5", "p6"] and model.strides == [4, 8, 16, 32, 64]
    with torch.no_grad():
        out = model(torch.randn(1, 3, 512, 512))
    assert _shapes(out) == [(1, 256, 128, 128), (1, 256, 64, 64), (1, 256, 32, 32), (1, 256, 16, 16), (1, 256, 8, 8)]
    # Full 7x7 windows in every stage, including stage 3 (4x4 in the 224 classifier).
    windows = [m.window_resolution for m in model.modules() if type(m).__name__ == "LocalWindowAttention"]
    assert set(windows) == {7}
    assert not any(k.startswith("backbone.head") for k in model.state_dict())


def test_retinanet_variant_and_non_square_inputs():
    model = create_model("m4", "random", task="detection", neck="retinanet")
    assert model.strides == [8, 16, 32, 64, 128]
    with torch.no_grad():
        out = model(torch.randn(1, 3, 480, 640))
    assert _shapes(out) == [(1, 256, 60, 80), (1, 256, 30, 40), (1, 256, 15, 20), (1, 256, 8, 10), (1, 256, 4, 5)]
    # Feature maps smaller than a window are padded, not rejected.
    with torch.no_grad():
        small = create_model("m0", "random", task="detection")(torch.randn(1, 3, 128, 192))
    assert _shapes(small)[-1] == (1, 256, 2, 3)


def test_bias_table_resize_keeps_the_dy_dx_layout():
    # value = 10*|dy| + |dx|: rows must stay rows after resizing 4x4 -> 7x7.
    dy, dx = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
    table = (10 * dy + dx).reshape(1, 16).repeat(2, 1)
    resized = resize_bias_table(table, 7).reshape(2, 7, 7)
    assert torch.allclose(resized[0], resized[1])
    assert (resized[0][1:, :] > resized[0][:-1, :]).all()           # grows down |dy| ...
    assert (resized[0][:, 1:] - resized[0][:, :-1]).abs().max() < (resized[0][1:, :] - resized[0][:-1, :]).min()
    assert torch.allclose(resize_bias_table(torch.full((3, 16), 0.7), 7), torch.full((3, 49), 0.7))


def test_classification_checkpoint_loads_into_the_backbone(checkpoint):
    path = checkpoint("m4", seed=5)
    cls = create_model("m4", "random", seed=5)
    det, provenance = load_model("m4", path, task="detection")
    assert provenance.neck_pretrained is False and provenance.weights_sha256
    sd, cls_sd = det.state_dict(), cls.state_dict()
    assert torch.equal(sd["backbone.patch_embed.0.c.weight"], cls_sd["patch_embed.0.c.weight"])
    key = "blocks3.3.mixer.m.attn.attention_biases"
    assert cls_sd[key].shape == (4, 16) and sd[f"backbone.{key}"].shape == (4, 49)
    assert torch.allclose(sd[f"backbone.{key}"], resize_bias_table(cls_sd[key], 7))
    assert torch.equal(sd["backbone.blocks1.0.mixer.m.attn.attention_biases"],
                       cls_sd["blocks1.0.mixer.m.attn.attention_biases"])     # already 7x7: unchanged


def test_mmdetection_checkpoint_loads_backbone_and_neck(tmp_path):
    source = create_model("m2", "random", task="detection", seed=4)
    state = {**source.state_dict(), "rpn_head.rpn_conv.weight": torch.zeros(3), "roi_head.x": torch.zeros(1)}
    path = tmp_path / "mask_rcnn_efficientvit_m2.pth"
    torch.save({"meta": {"epoch": 12}, "state_dict": state}, path)
    loaded, provenance = load_model("m2", path, task="detection", seed=99)
    assert provenance.neck_pretrained is True
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        for a, b in zip(loaded(x), source(x)):
            assert torch.equal(a, b)


def test_wrong_model_detection_checkpoint(tmp_path):
    state = create_model("m4", "random", task="detection").state_dict()
    path = tmp_path / "m4_det.pth"
    torch.save({"state_dict": state}, path)
    from evit_deploy.errors import CheckpointError
    with pytest.raises(CheckpointError, match="does not fit"):
        create_model("m2", path, task="detection")


# Small inputs: the levels and their ceil-divided sizes do not need large ones. M4 at 512 (the
# paper's Mask R-CNN setting) gives the same graph with more channels; its levels are checked
# above without an export.
@pytest.mark.parametrize("model,size,neck", [("m0", "256", "maskrcnn"), ("m0", "192x256", "retinanet")])
def test_onnx_export_has_one_output_per_level(cli, tmp_path, model, size, neck):
    code, out, err = cli("export", model, "--task", "detection", "--neck", neck, "--img-size", size, "-t", "onnx",
                         "--out", tmp_path, "--json", tmp_path / "r.json")
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["passed"] and len(report["outputs"]) == 5
    assert all(o["max_rel"] <= 1e-4 for o in report["outputs"])
    onnx_model = onnx.load(tmp_path / f"efficientvit_{model}_{neck}_fpn.onnx")
    dims = {o.name: [d.dim_value for d in o.type.tensor_type.shape.dim] for o in onnx_model.graph.output}
    h, w = (int(size), int(size)) if "x" not in size else map(int, size.split("x"))
    strides = [4, 8, 16, 32, 64] if neck == "maskrcnn" else [8, 16, 32, 64, 128]
    assert list(dims) == [f"p{s.bit_length() - 1}" for s in strides]
    for (name, shape), stride in zip(dims.items(), strides):
        assert shape == [1, 256, -(-h // stride), -(-w // stride)], name


def test_classification_rejects_non_square_sizes(cli, tmp_path):
    code, _, err = cli("export", "m0", "-t", "onnx", "--img-size", "480x640", "--out", tmp_path)
    assert code == EXIT_BAD_INPUT and "take square inputs" in err


def test_neck_warning_when_only_the_backbone_is_pretrained(tmp_path, checkpoint):
    from evit_deploy.progress import QuietReporter
    reporter = QuietReporter()
    result = api.export("m0", "onnx", out_dir=tmp_path, weights=checkpoint("m0"), task="detection",
                        input_size=(256, 256), reporter=reporter)
    assert result.report.passed
    assert any("FPN neck keeps its seeded initialisation" in w for w in reporter.warnings)


def test_coreml_export_of_the_feature_pyramid(tmp_path):
    # The FPN brings transposed convs and nearest upsampling into the Core ML program.
    result = api.export("m0", "coreml", out_dir=tmp_path, task="detection", input_size=(256, 320),
                        options={"precision": "fp32"})
    assert result.report.passed and result.artifact.path.name == "EfficientViT-M0-FPN-maskrcnn-fp32.mlpackage"
    assert [o.name for o in result.report.outputs] == ["p2", "p3", "p4", "p5", "p6"]
    assert all(o.max_rel <= 1e-4 for o in result.report.outputs)


def test_tvm_export_of_the_feature_pyramid(tmp_path):
    # TOPI lowers transposed convolutions in NCHW only; the NHWC graph must keep them so.
    pytest.importorskip("tvm")
    result = api.export("m0", "tvm", out_dir=tmp_path, task="detection", input_size=(64, 96),
                        options={"tvm_target": "native -num-cores=1"})
    assert result.report.passed
    shapes = {o.name: list(o.shape) for o in result.artifact.description.outputs}
    assert shapes == {"p2": [1, 256, 16, 24], "p3": [1, 256, 8, 12], "p4": [1, 256, 4, 6],
                      "p5": [1, 256, 2, 3], "p6": [1, 256, 1, 2]}
    assert all(o.max_rel <= 1e-4 for o in result.report.outputs)
