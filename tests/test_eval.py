"""``evit-deploy eval`` on labelled folders the tests build, and eval gates in build files."""

from __future__ import annotations

import json
import shutil
import textwrap

import numpy as np
import pytest

from evit_deploy import api
from evit_deploy.errors import EXIT_BAD_INPUT, EXIT_PARITY_FAILED
from evit_deploy.labels import imagenet_labels, imagenet_synsets
from evit_deploy.preprocess import sample_images

PHOTOS = sample_images()


@pytest.fixture(scope="module")
def reference_top1():
    """The class the fp32 PyTorch model behind the shared M0 artifact gives each photo."""
    return {p.name: prediction.top[0][0] for p, prediction in zip(PHOTOS, api.predict("m0", PHOTOS, top=1))}


def _labelled(reference_top1) -> dict:
    """Half the photos labelled with the reference's own class, half with another one:
    the reference's top-1 accuracy is then exactly 50%."""
    return {p.name: reference_top1[p.name] if i % 2 == 0 else (reference_top1[p.name] + 1) % 1000
            for i, p in enumerate(PHOTOS)}


def test_eval_on_a_synset_folder_and_with_a_labels_file(m0_onnx, reference_top1, tmp_path, cli):
    labels = _labelled(reference_top1)
    synsets = imagenet_synsets()
    for photo in PHOTOS:                                  # the ImageNet validation layout
        folder = tmp_path / "val" / synsets[labels[photo.name]]
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(photo, folder / photo.name.replace(".jpg", ".JPEG"))
    code, out, err = cli("eval", m0_onnx, "--images", tmp_path / "val", "--json", tmp_path / "e.json")
    assert code == 0, err
    data = json.loads((tmp_path / "e.json").read_text())
    assert data["images"] == 4 and data["labels"] == "synset folders"
    (record,) = data["records"]
    assert record["precision"] == "fp32" and record["images"] == 4
    assert record["top1_agreement"] == 1.0 and record["top5_overlap"] == 1.0 and record["max_rel_error"] < 1e-4
    assert record["reference_top1_accuracy"] == 0.5 and record["top1_accuracy"] == 0.5
    assert record["top1_drop"] == 0.0 and record["reference_top5_accuracy"] >= 0.5
    assert "agree" in out and "100.0%" in out and "50.0%" in out
    assert "4 images" in err                              # too few to say much: a warning

    # The same images in one flat folder, labelled by a file (index, WordNet id, class name).
    flat = tmp_path / "flat"
    flat.mkdir()
    lines = ["# image label"]
    for i, photo in enumerate(PHOTOS):
        shutil.copy(photo, flat / photo.name)
        index = labels[photo.name]
        lines.append(f"{photo.name} " + [str(index), synsets[index], imagenet_labels()[index]][i % 3])
    (tmp_path / "labels.txt").write_text("\n".join(lines) + "\n")
    code, _, err = cli("eval", m0_onnx, "--images", flat, "--labels", tmp_path / "labels.txt", "--json", "-")
    assert code == 0, err
    again = api.evaluate([m0_onnx], images=flat, labels=tmp_path / "labels.txt")
    assert again.records[0].reference_top1_accuracy == 0.5 and again.records[0].top1_accuracy == 0.5


def test_eval_without_labels_reports_agreement_only(m0_onnx, tmp_path):
    result = api.evaluate([m0_onnx])                       # the bundled photos
    (record,) = result.records
    assert result.images.labels is None and record.top1_accuracy is None and record.top1_drop is None
    assert record.images == len(PHOTOS) and record.top1_agreement == 1.0


@pytest.mark.parametrize("labels,message", [
    ("cat.jpg 281\n", "image(s) have no label"),
    ("cat.jpg 281\ncoffee.jpg 967\nrocket.jpg not-a-class\n", "labels.txt:3: expected 'IMAGE LABEL'"),
    ("cat.jpg 281\ncat.jpg 282\n", "labels.txt:2: 'cat.jpg' is labelled twice"),
])
def test_bad_labels_are_one_line_errors(m0_onnx, tmp_path, cli, labels, message):
    images = tmp_path / "img"
    images.mkdir()
    for photo in PHOTOS[1:4]:
        shutil.copy(photo, images / photo.name)
    (tmp_path / "labels.txt").write_text(labels)
    code, _, err = cli("eval", m0_onnx, "--images", images, "--labels", tmp_path / "labels.txt")
    assert code == EXIT_BAD_INPUT and message in err and len(err.strip().splitlines()) == 1


def test_eval_refuses_what_it_cannot_judge(m0_onnx, tmp_path, cli):
    (tmp_path / "empty").mkdir()
    code, _, err = cli("eval", m0_onnx, "--images", tmp_path / "empty")
    assert code == EXIT_BAD_INPUT and "no images" in err
    code, _, err = cli("eval", tmp_path / "missing.onnx")
    assert code == EXIT_BAD_INPUT and "artifact not found" in err


# -- gates in build files ------------------------------------------------------------------

GATED_BUILD = textwrap.dedent("""\
    [build]
    out = "dist"
    eval_images = "noise"
    eval_labels = "noise-labels.txt"

    [models.m0]
    weights = "m0.pth"
    img_size = 64

    [[artifact]]
    name = "int8-lenient"
    target = "onnx"
    min_top1_agreement = 0
    max_top1_drop = 1
    [artifact.options]
    precision = "int8"
    calibration = "calib"

    [[artifact]]
    name = "int8-strict"
    target = "onnx"
    min_top1_agreement = 0.99
    [artifact.options]
    precision = "int8"
    calibration = "calib"
""")


def test_build_gates_on_eval(tmp_path, checkpoint, cli):
    """Eval images unlike the calibration photos (seeded noise): int8 keeps the fp32 class on
    some of them only, so a 0.99 agreement gate fails (exit 4) where 0 passes."""
    from PIL import Image

    shutil.copy(checkpoint("m0", seed=1, recipe="realistic", img_size=64), tmp_path / "m0.pth")
    (tmp_path / "calib").mkdir()
    for photo in PHOTOS[:2]:
        shutil.copy(photo, tmp_path / "calib" / photo.name)
    (tmp_path / "noise").mkdir()
    rng = np.random.default_rng(0)
    lines = []
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "noise" / f"{i}.png")
        lines.append(f"{i}.png {i}")
    (tmp_path / "noise-labels.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "evit-deploy.toml").write_text(GATED_BUILD)

    code, out, err = cli("build", tmp_path / "evit-deploy.toml")
    assert code == EXIT_PARITY_FAILED, err
    manifest = json.loads((tmp_path / "dist" / "manifest.json").read_text())
    records = {r["artifact"]: r for r in manifest["artifacts"]}
    lenient, strict = records["int8-lenient"], records["int8-strict"]
    assert lenient["status"] == "built" and lenient["parity"]["passed"] and lenient["eval"]["passed"]
    assert lenient["eval"]["images"] == 12 and lenient["eval"]["labels"].endswith("noise-labels.txt")
    assert lenient["eval"]["top1_drop"] == lenient["eval"]["reference_top1_accuracy"] - \
        lenient["eval"]["top1_accuracy"]
    assert lenient["eval"]["top1_agreement"] < 0.99            # what makes the strict gate fail
    assert strict["status"] == "failed gate" and "min_top1_agreement 0.99" in strict["error"]
    assert strict["eval"]["top1_agreement"] == lenient["eval"]["top1_agreement"]
    # Nothing that failed its gate stays under its final name.
    assert (tmp_path / "dist" / "int8-lenient" / "efficientvit_m0_int8.onnx").is_file()
    assert not (tmp_path / "dist" / "int8-strict" / "efficientvit_m0_int8.onnx").exists()
    rejected = tmp_path / "dist" / "int8-strict" / "efficientvit_m0_int8.onnx.rejected"
    assert json.loads((rejected / "eval-report.json").read_text())["failures"]

    # Gates and the eval set count among an artifact's inputs: changing either rebuilds it.
    from dataclasses import replace

    from evit_deploy.build import load_build_file
    from evit_deploy.build.inputs import inputs_key

    spec = load_build_file(tmp_path / "evit-deploy.toml")
    model, entry = spec.models["m0"], spec.artifacts[1]                    # int8-strict
    key = inputs_key(model, entry, spec, "weights", {})
    assert inputs_key(model, replace(entry, gates={"min_top1_agreement": 0.5}), spec, "weights", {}) != key
    (tmp_path / "noise-labels.txt").write_text("0.png 5\n" + "\n".join(f"{i}.png {i}" for i in range(1, 12)))
    assert inputs_key(model, entry, spec, "weights", {}) != key


@pytest.mark.parametrize("extra,message", [
    ("min_top1_agreement = 1.5\n", "min_top1_agreement is a fraction between 0 and 1"),
    ("max_top1_drop = 0.01\n", "max_top1_drop needs labelled eval images"),
])
def test_gate_validation(tmp_path, cli, extra, message):
    (tmp_path / "evit-deploy.toml").write_text(f'[models.m0]\n\n[[artifact]]\ntarget = "onnx"\n{extra}')
    code, _, err = cli("build", tmp_path / "evit-deploy.toml")
    assert code == EXIT_BAD_INPUT and message in err
