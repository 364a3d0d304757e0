"""The export pipeline as users see it: exit codes, atomic writes, plug-ins, any model."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import onnx
import pytest

from conftest import ROOT, run_python
from evit_deploy.errors import EXIT_BAD_INPUT, EXIT_EXPORT_FAILED


def test_export_cli_prints_stages_and_the_artifact(tmp_path, cli):
    code, out, err = cli("export", "m0", "--target", "onnx", "--out", tmp_path, "--json", tmp_path / "r.json")
    assert code == 0
    assert out.strip().endswith(str(tmp_path / "efficientvit_m0.onnx"))
    for stage in ("trace", "export", "verify"):
        assert stage in err
    assert "RANDOM initialisation" in err
    assert json.loads((tmp_path / "r.json").read_text())["passed"] is True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["efficientvit_m0.onnx", "r.json"]


def test_target_options_from_the_command_line_and_devices(tmp_path, cli):
    code, _, _ = cli("-q", "export", "m0", "-t", "onnx", "--out", tmp_path, "--opset", "20", "--fp16")
    assert code == 0
    model = onnx.load(tmp_path / "efficientvit_m0_fp16.onnx")        # precisions of a model sit side by side
    assert model.opset_import[0].version == 20
    desc = json.loads({p.key: p.value for p in model.metadata_props}["evit_deploy.description"])
    assert desc["extra"]["precision"] == "fp16" and desc["extra"]["options"]["opset"] == 20
    code, _, _ = cli("-q", "export", "m0", "--device", "onnx-cpu", "--out", tmp_path / "p", "--no-verify")
    assert code == 0
    desc = json.loads({p.key: p.value for p in onnx.load(tmp_path / "p" / "efficientvit_m0.onnx").metadata_props}
                      ["evit_deploy.description"])
    assert desc["extra"]["profile"] == "onnx-cpu"      # the stored key keeps its earlier name


def test_profile_is_a_deprecated_alias_of_device(cli, tmp_path):
    """``export --profile`` and ``profile=`` (kept for one release) name a device, with a
    warning; both names at once is an error."""
    code, _, err = cli("export", "m0", "--profile", "onnx-cpu", "-t", "tvm", "--out", tmp_path)
    assert code == EXIT_BAD_INPUT and "device 'onnx-cpu' is for target 'onnx', not 'tvm'" in err
    assert "--profile is deprecated" in err and "use --device" in err
    code, _, err = cli("export", "m0", "--profile", "onnx-cpu", "--device", "onnx-cpu", "--out", tmp_path)
    assert code == EXIT_BAD_INPUT and "give --device once" in err
    from evit_deploy.plan import plan_export

    with pytest.warns(DeprecationWarning, match="use device="):
        plan = plan_export("m0", profile="onnx-cpu")
    assert plan.device == "onnx-cpu" and plan.target.name == "onnx" and plan.options.opset == 18
    assert not list(tmp_path.iterdir())
    code, out, err = cli("-q", "export", "m0", "--img-size", "64", "--profile", "onnx-cpu", "--no-verify",
                         "--out", tmp_path / "old")
    assert code == 0 and "--profile is deprecated" in err, err
    meta = {p.key: p.value for p in onnx.load(out.strip().splitlines()[-1]).metadata_props}
    assert json.loads(meta["evit_deploy.description"])["extra"]["profile"] == "onnx-cpu"


def test_verify_takes_its_tolerance_from_parity(m0_onnx, tmp_path, cli):
    """With overrides or without, ``verify`` starts from parity's tolerance for the
    artifact's precision: a precision parity has none for is parity's one-line error (exit
    2), not an fp32 tolerance quietly applied."""
    from evit_deploy.parity import default_tolerance

    model = onnx.load(m0_onnx)
    for prop in model.metadata_props:
        if prop.key == "evit_deploy.description":
            desc = json.loads(prop.value)
            desc["extra"]["precision"] = "int3"
            prop.value = json.dumps(desc)
    odd = tmp_path / m0_onnx.name
    onnx.save(model, odd)
    with pytest.raises(Exception) as raised:
        default_tolerance("int3")
    for overrides in ([], ["--max-rel", "0.5"], ["--top1", "none"]):
        code, _, err = cli("-q", "verify", odd, *overrides)
        assert code == EXIT_BAD_INPUT and err.strip() == f"error: {raised.value}", (overrides, err)
    code, out, err = cli("verify", m0_onnx, "--min-cosine", "0.5", "--json", "-")
    assert code == 0, err
    report = json.loads(out)
    assert report["passed"] and report["tolerance"]["min_cosine"] == 0.5


def test_any_torch_module_through_the_same_pipeline(cli, tmp_path):
    code, out, err = cli("export", "--model", "custom_models:mobile_cnn", "--input-size", "160",
                         "-t", "onnx", "--out", tmp_path, "--json", tmp_path / "r.json")
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["passed"] and report["model"] == "custom_models:mobile_cnn"
    artifact = Path(out.strip().splitlines()[-1])
    model = onnx.load(artifact)
    assert model.graph.input[0].type.tensor_type.shape.dim[2].dim_value == 160
    code, _, err = cli("verify", artifact)
    assert code == 0, err
    # Target options after --model are not mistaken for the MODEL argument.
    code, out, err = cli("-q", "export", "--model", "custom_models:mobile_cnn", "--input-size", "96", "-t", "onnx",
                         "--fp16", "--out", tmp_path / "fp16")
    assert code == 0, err
    meta = {p.key: p.value for p in onnx.load(Path(out.strip().splitlines()[-1])).metadata_props}
    assert json.loads(meta["evit_deploy.description"])["extra"]["precision"] == "fp16"
    # Without --input-size the common --img-size default (224) applies.
    code, out, err = cli("-q", "export", "--model", "custom_models:mobile_cnn", "-t", "onnx", "--out", tmp_path / "d")
    assert code == 0, err
    model = onnx.load(Path(out.strip().splitlines()[-1]))
    assert model.graph.input[0].type.tensor_type.shape.dim[2].dim_value == 224
    code, _, err = cli("export", "--model", "custom_models:nothing_here", "-t", "onnx", "--out", tmp_path)
    assert code == EXIT_BAD_INPUT and "has no callable 'nothing_here'" in err


@pytest.mark.parametrize("factory, code, says", [
    ("failing_factory", EXIT_BAD_INPUT, "error: --model custom_models:failing_factory: the factory failed: ValueError"),
    ("dict_output", EXIT_BAD_INPUT, "returns a dict; evit-deploy exports models that return a tensor"),
    ("data_dependent", EXIT_EXPORT_FAILED, "torch.export failed on custom_models:data_dependent: Could not guard"),
    ("greedy", EXIT_BAD_INPUT, "this machine ran out of memory running custom_models:greedy on a 1x3x32x32 input"),
])
def test_a_custom_model_that_cannot_be_exported_says_why_in_one_line(cli, tmp_path, factory, code, says):
    """The user's own code failing is their error, said in one line (not "internal
    error"), without torch's printout of the partial graph before it."""
    got, _, err = cli("export", "--model", f"custom_models:{factory}", "--input-size", "32", "-t", "onnx",
                      "--out", tmp_path)
    assert got == code and says in err, err
    assert [line for line in err.splitlines() if line.strip() and not line.startswith(("✗", "✓"))] == \
        [err.strip().splitlines()[-1]], err
    assert not list(tmp_path.iterdir())


def test_a_custom_models_outputs_are_described_with_their_own_type(cli, tmp_path):
    code, out, err = cli("-q", "export", "--model", "custom_models:class_index", "--input-size", "32", "-t", "onnx",
                         "--out", tmp_path)
    assert code == 0, err
    meta = {p.key: p.value for p in onnx.load(Path(out.strip().splitlines()[-1])).metadata_props}
    assert [o["dtype"] for o in json.loads(meta["evit_deploy.description"])["outputs"]] == ["int64"]


PLUGIN_DIST = textwrap.dedent("""\
    Metadata-Version: 2.1
    Name: evit-pt2-target
    Version: 0.1
""")


@pytest.fixture
def plugin_path(tmp_path):
    """A tiny installed distribution that registers examples/plugin_target as target 'pt2'."""
    site = tmp_path / "site"
    dist = site / "evit_pt2_target-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(PLUGIN_DIST)
    (dist / "entry_points.txt").write_text("[evit_deploy.targets]\npt2 = evit_pt2_target:Pt2Target\n")
    return os.pathsep.join([str(site), str(ROOT / "examples" / "plugin_target")])


def test_third_party_target_registered_by_entry_point(plugin_path, tmp_path):
    # One fresh process (the plug-in is only visible with its PYTHONPATH): list, export,
    # verify, each through the CLI entry point.
    out = tmp_path / "out"
    script = textwrap.dedent(f"""
        import contextlib, io, json, sys
        from evit_deploy.cli import invoke
        results = {{}}
        for name, args in [("targets", ["targets", "--json", "-"]),
                           ("export", ["-q", "export", "m0", "--target", "pt2", "--out", {str(out)!r}, "--json", "-"]),
                           ("verify", ["verify", {str(out / "efficientvit_m0.pt2")!r}, "--json", "-"]),
                           ("pt2-ops", ["pt2-ops", {str(out / "efficientvit_m0.pt2")!r}, "--json", "-"])]:
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                code = invoke(args)
            results[name] = {{"code": code, "out": json.loads(buf.getvalue())}}
        print(json.dumps(results))
    """)
    proc = run_python(script, env_extra={"PYTHONPATH": plugin_path})
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    targets = {t["name"]: t for t in results["targets"]["out"]}
    assert targets["pt2"]["usable"] and targets["pt2"]["source"] == "evit_pt2_target:Pt2Target"
    assert "onnx" in targets
    assert results["export"]["code"] == 0 and results["export"]["out"]["passed"]
    assert results["export"]["out"]["target"] == "pt2"
    assert results["verify"]["code"] == 0 and results["verify"]["out"]["passed"]
    assert (out / "efficientvit_m0.pt2").is_file()
    # The plug-in's own command: registered by the target, rendered and exited like any other.
    ops = results["pt2-ops"]["out"]
    assert results["pt2-ops"]["code"] == 0 and ops["aten.conv2d.default"] > 10
