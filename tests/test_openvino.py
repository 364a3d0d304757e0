"""OpenVINO target: IR export with its description in rt_info, parity per precision
(fp32 rule, fp16, bf16, int8 through NNCF), corruption, bf16 refusal, benchmark session
settings, per-layer profile, doctor, and the example application. What every target does
(torch-free running without telemetry, truncated files, bad input) is tests/contract/."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest

pytest.importorskip("openvino")

from conftest import save_checkpoint  # noqa: E402
from evit_deploy import api  # noqa: E402
from evit_deploy.errors import EXIT_BAD_INPUT, EXIT_PARITY_FAILED, BadInputError  # noqa: E402
from evit_deploy.preprocess import sample_images  # noqa: E402
from evit_deploy.targets import get_target  # noqa: E402
from evit_deploy.targets.openvino import runtime  # noqa: E402

ov = runtime.import_openvino()       # imported as the target imports it: without usage telemetry

SIZE = 64           # small inputs: the IR's behaviour does not depend on the resolution
SAMPLE = sample_images()
WITHOUT_BF16 = ("WINOGRAD", "FP32", "INT8", "BIN", "EXPORT_IMPORT")


@pytest.fixture(scope="module")
def m0_trace(tmp_path_factory):
    """One realistic M0 checkpoint and its trace, shared by the exports of every precision
    (as a build shares it)."""
    from evit_deploy.plan import plan_export, trace_plan

    weights = save_checkpoint(tmp_path_factory.mktemp("weights") / "m0.pth", "m0", seed=1, recipe="realistic",
                              img_size=SIZE)
    return weights, trace_plan(plan_export("m0", "openvino", weights=weights, img_size=SIZE))


def export(m0_trace, out_dir, **options):
    from evit_deploy.api import export_traced
    from evit_deploy.plan import plan_export

    weights, traced = m0_trace
    out_dir.mkdir(parents=True, exist_ok=True)
    return export_traced(traced, plan_export("m0", "openvino", weights=weights, img_size=SIZE, options=options),
                         out_dir)


@pytest.fixture(scope="module")
def m0_ir(m0_trace, tmp_path_factory):
    """The fp32 IR of that M0 (its checkpoint, its export result)."""
    return m0_trace[0], export(m0_trace, tmp_path_factory.mktemp("openvino"))


def _copy_ir(xml, directory):
    directory.mkdir(exist_ok=True)
    shutil.copy(xml, directory / xml.name)
    shutil.copy(xml.with_suffix(".bin"), directory / xml.with_suffix(".bin").name)
    return directory / xml.name


def test_fp32_export_writes_the_ir_with_its_description(m0_ir):
    weights, result = m0_ir
    xml = result.artifact.path
    assert xml.name == "efficientvit_m0.xml" and result.artifact.sidecars == (xml.with_suffix(".bin"),)
    assert sorted(p.name for p in xml.parent.iterdir()) == ["efficientvit_m0.bin", "efficientvit_m0.xml"]
    report = result.report
    assert report.passed and report.precision == "fp32", report.summary()
    assert report.extra["inference_precision"] == "f32"          # stated, not the CPU's bf16 default
    # What an application reads, with openvino alone.
    model = ov.Core().read_model(str(xml))
    desc = json.loads(model.get_rt_info(["evit_deploy", "description"]).astype(str))
    assert desc["model"] == "efficientvit_m0" and len(desc["weights"]) == 64 and desc["seed"] is None
    assert desc["preprocessing"]["mean"] == [0.485, 0.456, 0.406] and desc["labels"][281] == "tabby"
    assert desc["extra"]["precision"] == "fp32" and desc["input_format"] == "normalized"
    assert model.get_rt_info(["evit_deploy", "weights_sha256"]).astype(str) == desc["weights"]
    assert [i.get_any_name() for i in model.inputs] == ["image"] and [o.get_any_name() for o in model.outputs] == ["logits"]
    assert model.inputs[0].get_partial_shape() == ov.PartialShape([1, 3, SIZE, SIZE])
    weights_consts = [op for op in model.get_ordered_ops() if op.get_type_name() == "Constant"
                      and op.get_element_type() != ov.Type.f32 and np.prod(op.get_output_shape(0)) > 64]
    assert weights_consts == []                                 # compress_to_fp16=False: f32 weights


def _scale_one_weight(xml, out_dir):
    """One convolution's weights in the .bin, 5% larger."""
    bad = _copy_ir(xml, out_dir)
    layers = re.findall(r'<layer id="\d+" name="([^"]+)" type="Const" version="opset1">\s*<data element_type="f32" '
                        r'shape="([^"]+)" offset="(\d+)" size="(\d+)"', bad.read_text())
    _, _, offset, size = max(layers, key=lambda layer: int(layer[3]))
    data = bytearray(bad.with_suffix(".bin").read_bytes())
    chunk = np.frombuffer(data, np.float32, int(size) // 4, int(offset)) * np.float32(1.05)
    data[int(offset):int(offset) + int(size)] = chunk.tobytes()
    bad.with_suffix(".bin").write_bytes(bytes(data))
    return bad


def _wrong_input_format(xml, out_dir):
    """The rt_info says the IR takes 0..1 pixels (float01); the network expects normalised ones."""
    bad = _copy_ir(xml, out_dir)
    text = bad.read_text()
    swapped = text.replace("&quot;input_format&quot;:&quot;normalized&quot;", "&quot;input_format&quot;:&quot;float01&quot;")
    assert swapped != text
    bad.write_text(swapped)
    return bad


def test_export_is_byte_reproducible(m0_ir, m0_trace, tmp_path):
    # Made again in the same process, after other models and exports: OpenVINO's automatic
    # node names count those, evit-deploy's names do not.
    _, first = m0_ir
    again = export(m0_trace, tmp_path).artifact.path
    assert again.read_bytes() == first.artifact.path.read_bytes()
    assert again.with_suffix(".bin").read_bytes() == first.artifact.path.with_suffix(".bin").read_bytes()


def test_verify_fails_on_a_corrupted_ir(m0_ir, tmp_path, cli):
    weights, result = m0_ir
    code, out, err = cli("verify", result.artifact.path, "--weights", weights, "--json", "-")
    assert code == 0 and json.loads(out)["passed"], err
    for corrupt in (_scale_one_weight, _wrong_input_format):
        bad = corrupt(result.artifact.path, tmp_path / corrupt.__name__)
        code, out, err = cli("verify", bad, "--weights", weights, "--json", "-")
        assert code == EXIT_PARITY_FAILED, (corrupt.__name__, err)
        assert not json.loads(out)["passed"] and "Traceback" not in err


def test_int8_through_nncf_verifies_in_the_int8_class(m0_trace, tmp_path):
    calib = tmp_path / "calib"
    calib.mkdir()
    for photo in SAMPLE:
        shutil.copy(photo, calib / photo.name)
    result = export(m0_trace, tmp_path / "out", precision="int8", calibration=str(calib))
    assert result.artifact.path.name == "efficientvit_m0_int8.xml"
    report = result.report
    assert report.passed and report.precision == "int8", report.summary()
    assert report.outputs[0].max_rel > 1e-3                     # really int8
    int8 = result.artifact.description.extra["int8"]
    assert int8["calibration"]["images"] == len(SAMPLE) and int8["calibration"]["source"] == str(calib)
    ops = [op.get_type_name() for op in ov.Core().read_model(str(result.artifact.path)).get_ordered_ops()]
    assert ops.count("FakeQuantize") == int8["fake_quantize_ops"] > 50


def test_fp16_stores_half_the_weights_and_computes_in_f32_with_a_dynamic_batch(m0_ir, tmp_path):
    weights, fp32 = m0_ir
    result = api.export("m0", "openvino", out_dir=tmp_path, weights=weights, img_size=SIZE, dynamic_batch=True,
                        options={"precision": "fp16"})
    report = result.report
    assert result.artifact.path.name == "efficientvit_m0_fp16.xml"
    assert report.passed and report.precision == "fp16" and report.extra["inference_precision"] == "f32"
    assert report.extra["weights_bytes"] < 0.55 * fp32.report.extra["weights_bytes"]
    assert report.outputs[0].max_rel > 1e-6                     # the weights really are rounded
    model = ov.Core().read_model(str(result.artifact.path))
    assert model.inputs[0].get_partial_shape() == ov.PartialShape([-1, 3, SIZE, SIZE])
    assert api.run(result.artifact.path, SAMPLE + SAMPLE[:1]).outputs["logits"].shape == (5, 1000)


def test_bf16_is_refused_on_a_cpu_without_it(m0_ir, tmp_path, cli, monkeypatch):
    weights, result = m0_ir
    # A bf16 artifact: the fp32 IR whose rt_info asks for bf16 inference.
    xml = _copy_ir(result.artifact.path, tmp_path / "bf16")
    xml.write_text(xml.read_text().replace('<inference_precision value="f32" />', '<inference_precision value="bf16" />'))
    monkeypatch.setattr(runtime, "cpu_capabilities", lambda: WITHOUT_BF16)
    code, _, err = cli("export", "m0", "-t", "openvino", "--precision", "bf16", "--out", tmp_path)
    assert code == EXIT_BAD_INPUT and len(err.strip().splitlines()) == 1
    assert "--precision bf16 needs a CPU whose OpenVINO capabilities include BF16" in err
    code, _, err = cli("run", xml, SAMPLE[0])
    assert code == EXIT_BAD_INPUT and "exported for bf16 inference" in err and len(err.strip().splitlines()) == 1
    assert not any(p.suffix == ".xml" for p in tmp_path.iterdir())


def test_bf16_capability_follows_the_cpu_flags_played(monkeypatch):
    # Asking about another CPU (EVIT_DEPLOY_CPU_FLAGS) must not answer with this host's BF16.
    monkeypatch.setenv("EVIT_DEPLOY_CPU_FLAGS", "avx2 fma")
    assert "BF16" not in runtime.cpu_capabilities() and "FP32" in runtime.cpu_capabilities()
    with pytest.raises(BadInputError, match="include BF16"):
        runtime.require_precision("bf16")
    monkeypatch.setenv("EVIT_DEPLOY_CPU_FLAGS", "avx2 fma avx512f avx512_bf16")
    assert "BF16" in runtime.cpu_capabilities()


@pytest.mark.skipif("BF16" not in runtime.cpu_capabilities(), reason="this CPU has no BF16")
def test_bf16_export_verifies_in_the_bf16_class(m0_trace, tmp_path):
    result = export(m0_trace, tmp_path, precision="bf16")
    report = result.report
    assert result.artifact.path.name == "efficientvit_m0_bf16.xml"
    assert report.passed and report.precision == "bf16" and report.extra["inference_precision"] == "bf16"
    assert report.outputs[0].max_rel > 1e-4                     # really computed in bf16


def test_benchmark_sessions_set_threads_streams_and_latency(m0_ir):
    import openvino.properties as props
    import openvino.properties.hint as hints

    _, result = m0_ir
    session = get_target("openvino").open_session(result.artifact.path, threads=1)
    assert session.property(props.inference_num_threads) == 1 and session.property(props.num_streams) == 1
    assert str(session.property(hints.performance_mode)) == "LATENCY"
    assert session.property(hints.inference_precision) == ov.Type.f32
    x = np.zeros((1, 3, SIZE, SIZE), np.float32)
    assert session({"image": x})["logits"].shape == (1, 1000)


def test_profile_categorises_every_layer_and_attributes_blocks(m0_ir):
    from evit_deploy.models import create_model
    from evit_deploy.profiler import block_map, categorize, summarise

    _, result = m0_ir
    blocks = block_map(create_model("m0", img_size=SIZE))
    ops = get_target("openvino").profile_ops(result.artifact.path, {"image": np.zeros((1, 3, SIZE, SIZE), np.float32)},
                                             threads=1, iterations=2, blocks=blocks)
    assert ops and all(categorize(op.name)[0] != "other" for op in ops), \
        sorted({op.name for op in ops if categorize(op.name)[0] == "other"})
    summary = summarise(ops, model="m0", backend="openvino", batch=1, threads=1, iterations=2)
    categories = {c["category"] for c in summary.by_category}
    assert {"convolution", "matrix multiply", "softmax"} <= categories
    attributed = {b["block"]: b["share"] for b in summary.by_block}
    assert {"attention", "FFN", "patch embedding", "head"} <= set(attributed)
    assert attributed.get("(not attributed)", 0) < 0.2


def test_doctor_reports_the_cpu_capabilities():
    from evit_deploy.hostinfo import package_versions

    # Recorded by doctor, bench and build manifests (a build rebuilds when one changes).
    assert package_versions()["openvino"] == ov.__version__.split("-")[0] and package_versions()["nncf"]
    findings = get_target("openvino").diagnose()
    assert all(f.level != "error" for f in findings)
    assert any(f"OPTIMIZATION_CAPABILITIES: {', '.join(runtime.cpu_capabilities())}" in f.message for f in findings)


def test_classify_example_reads_the_ir_without_torch(m0_ir):
    from test_examples import classify_without_torch

    _, result = m0_ir
    results = classify_without_torch(result.artifact.path, SAMPLE)
    expected = api.run(result.artifact.path, SAMPLE).predictions
    assert [[t["index"] for t in r["top"]] for r in results] == [[i for i, *_ in p.top] for p in expected]


def test_both_files_are_written_atomically(tmp_path, monkeypatch):
    from evit_deploy.errors import ExportError
    from evit_deploy.targets.openvino.convert import save

    x = ov.opset13.parameter([1, 4], ov.Type.f32, name="image")
    model = ov.Model([ov.opset13.relu(ov.opset13.multiply(x, ov.opset13.constant(np.full((1, 4), 2, np.float32))))],
                     [x], "tiny")
    xml, weights = save(model, tmp_path / "tiny.xml", compress_to_fp16=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.bin", "tiny.xml"]
    before = xml.read_bytes(), weights.read_bytes()

    def fails_half_way(model, path, **kwargs):
        (next(tmp_path.glob(".tiny.tmp-*")) / "tiny.bin").write_bytes(b"half")   # a partial file in the staging dir
        raise RuntimeError("Exception from src/core/src/pass/serialize.cpp:1:\ndisk full")

    monkeypatch.setattr(ov, "save_model", fails_half_way)
    with pytest.raises(ExportError, match="openvino.save_model failed: disk full"):
        save(model, xml, compress_to_fp16=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.bin", "tiny.xml"]      # no temporary left
    assert (xml.read_bytes(), weights.read_bytes()) == before                          # the old files untouched
