"""The model-family commands, devices, labels, preprocessing, and the CLI's machinery."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import cli_without_torch, run_python
from evit_deploy.errors import BadInputError
from evit_deploy.labels import imagenet_labels
from evit_deploy.preprocess import Preprocessing, resize_crop, sample_images, to_input
from evit_deploy.devices import list_devices, load_device

SAMPLE = sample_images()


def test_models_table_is_measured(cli):
    code, out, _ = cli("models", "--json", "-")
    assert code == 0
    rows = {r["model"]: r for r in json.loads(out)}
    assert list(rows) == [f"efficientvit_m{i}" for i in range(6)]
    assert rows["efficientvit_m4"]["paper_top1"] == 74.3
    assert 8.7 < rows["efficientvit_m4"]["params_m"] < 8.9
    code, out, _ = cli("models")
    assert code == 0 and "efficientvit_m5" in out and "MACs" in out


def test_models_are_listed_without_building_them():
    # The figures are stored (test_models.py recounts them), so listing needs no torch.
    proc = cli_without_torch(["models", "--json", "-"])
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)) == 6


def test_info_summarises_the_architecture(cli):
    code, out, _ = cli("info", "M2", "--json", "-")
    assert code == 0
    data = json.loads(out)
    assert [s["embed_dim"] for s in data["stages"]] == [128, 192, 224]
    assert [s["heads"] for s in data["stages"]] == [4, 3, 2]
    assert [s["window"] for s in data["stages"]] == [7, 7, 4]
    assert data["unfused"]["batchnorm"] > 0 and data["fused"]["batchnorm"] == 0
    assert data["unfused"]["conv"] == data["fused"]["conv"]
    code, out, _ = cli("info", "m2")
    assert code == 0 and "BN folded" in out


def test_predict_prints_top5_with_class_names(cli, checkpoint):
    code, out, err = cli("predict", "m0", *SAMPLE, "--json", "-")
    assert code == 0 and "RANDOM" in err
    preds = json.loads(out)
    assert len(preds) == 4 and all(len(p["top"]) == 5 for p in preds)
    assert all(p["top"][0]["label"] == imagenet_labels()[p["top"][0]["index"]] for p in preds)
    probs = [t["probability"] for t in preds[0]["top"]]
    assert probs == sorted(probs, reverse=True)
    code, out, err = cli("predict", "m0", SAMPLE[0], "--weights", checkpoint("m0"))
    assert code == 0 and "RANDOM" not in err and "probability" in out


def test_labels_are_unique_imagenet_names():
    labels = imagenet_labels()
    assert len(labels) == len(set(labels)) == 1000
    assert labels[0] == "tench" and labels[281] == "tabby" and labels[999] == "toilet tissue"
    assert labels[134] != labels[517] and labels[134].startswith("crane")


def test_preprocessing_matches_the_standard_transform():
    from PIL import Image

    spec = Preprocessing.for_size(224)
    assert spec.resize == 256
    img = Image.open(SAMPLE[1]).convert("RGB")
    crop = resize_crop(img, spec)
    assert crop.shape == (224, 224, 3) and crop.dtype == np.uint8
    # The same steps done independently: bicubic short side 256, centre crop, normalise.
    w, h = img.size
    scale = 256 / min(w, h)
    resized = img.resize((round(w * scale), round(h * scale)), Image.BICUBIC)
    left, top = round((resized.width - 224) / 2), round((resized.height - 224) / 2)
    expected = np.asarray(resized.crop((left, top, left + 224, top + 224)))
    assert np.array_equal(crop, expected)
    x = to_input(crop, spec, "normalized")
    manual = (crop / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    assert np.allclose(x[0], manual.transpose(2, 0, 1), atol=1e-6)


def test_builtin_devices_load():
    names = {p.name for p in list_devices()}
    assert {"onnx-cpu"} <= names
    onnx_cpu = load_device("onnx-cpu")
    assert onnx_cpu.target == "onnx" and onnx_cpu.options["opset"] == 18


@pytest.mark.parametrize("text,message", [
    ('name = "p"\ntarget = "onnx"\ncolour = "red"\n', "unknown key 'colour'"),
    ('name = "p"\ntarget = "onnx"\n[options]\nopset = "high"\n', "option 'opset' of target 'onnx' must be int"),
    ('name = "p"\ntarget = "onnx"\n[options]\nfp32 = true\n', "unknown option for target 'onnx'"),
    ('name = "p"\ntarget = "onnxx"\n', "unknown target 'onnxx'"),
    ('name = "p"\ntarget = "onnx"\n[device]\ncores = 0\n', "'device.cores' must be at least 1"),
    ('name = "p"\ntarget = "onnx"\n[device]\ncores = "many"\n', "'device.cores' must be int"),
    ('name = "p"\ntarget = "onnx"\n[paper]\nlatency_ms = { m9 = 1.0 }\n', "'paper.latency_ms.m9' is not a model"),
    ('name = "q"\ntarget = "onnx"\n', "must match the file name"),
    ('target = "onnx"\n', "missing required key 'name'"),
    ('name = "p"\ntarget = onnx\n', "invalid TOML"),
])
def test_device_validation(tmp_path, text, message):
    path = tmp_path / "p.toml"
    path.write_text(text)
    with pytest.raises(BadInputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_device(path)


def test_devices_and_targets_commands(cli):
    code, out, _ = cli("devices", "--json", "-")
    assert code == 0 and "onnx-cpu" in {p["name"] for p in json.loads(out)}
    code, out, _ = cli("devices")
    assert code == 0 and "iphone11-a13" in out
    code, out, _ = cli("targets", "--json", "-")
    assert code == 0
    onnx_target = next(t for t in json.loads(out) if t["name"] == "onnx")
    assert onnx_target["usable"] and "onnxruntime" in onnx_target["requires"]


def test_profiles_is_a_deprecated_alias_of_devices(cli):
    code, out, err = cli("profiles", "--json", "-")
    assert code == 0 and json.loads(out) == json.loads(cli("devices", "--json", "-")[1])
    assert "'profiles' is deprecated" in err and "evit-deploy devices" in err
    code, out, _ = cli("--help")
    assert code == 0 and "Deprecated alias of `devices`" in out


def test_target_commands_are_loaded_when_called_or_listed():
    """Registering the CLI and running a built-in command import no target's command code;
    ``--help`` lists them and calling one works."""
    proc = run_python(
        "import sys\n"
        "from evit_deploy.cli import invoke\n"
        "loaded = lambda: 'evit_deploy.targets.tvm.commands' in sys.modules\n"
        "assert invoke(['targets', '--json', '-']) == 0 and not loaded()\n"
        "assert invoke(['tune', '--help']) == 0 and loaded()\n"
        "assert invoke(['tune', 'm0', '--tvm-target', 'llvm -mcpu=nonsense-cpu']) == 2\n")
    assert proc.returncode == 0, proc.stderr
    assert "--tvm-target" in proc.stdout and "nonsense-cpu" in proc.stderr


def test_version(cli):
    code, out, _ = cli("--version")
    assert code == 0 and out.strip().startswith("evit-deploy ")


def test_help_shows_every_option_text_in_full(cli, monkeypatch):
    """Rich reads "[word]" in a help text as markup and drops it ("Static batch size ."):
    every option's help must reach the terminal as written (the targets' commands too)."""
    import typer

    from evit_deploy.cli import app

    monkeypatch.setenv("COLUMNS", "400")
    group = typer.main.get_command(app)
    checked = 0
    with typer.Context(group) as ctx:
        commands = {name: group.get_command(ctx, name) for name in group.list_commands(ctx)}
    assert "tune" in commands
    for name, command in commands.items():
        code, out, _ = cli(name, "--help")
        assert code == 0
        shown = " ".join(out.replace("│", " ").split())
        for param in command.params:
            text = getattr(param, "help", None)
            if getattr(param, "param_type_name", "") == "option" and text and "[" in text:
                assert " ".join(text.replace("\\[", "[").split()) in shown, (name, param.name)
                checked += 1
    assert checked >= 2
