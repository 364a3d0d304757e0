"""examples/: each one exercised where it can run here (the classify script on ONNX and TVM
artifacts without torch, the build file, the CI workflow, the Swift snippet's names, the
README's Python API block)."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from conftest import ROOT, run_python
from evit_deploy import api
from evit_deploy.preprocess import sample_images

EXAMPLES = ROOT / "examples"
SAMPLE = sample_images()


def classify_without_torch(artifact: Path, images) -> list[dict]:
    """Run examples/classify.py as an application would: neither torch nor evit-deploy importable."""
    code = ("import runpy, sys\n"
            "sys.modules['torch'] = None; sys.modules['evit_deploy'] = None\n"
            f"sys.argv = ['classify.py', '--json', {str(artifact)!r}, *{[str(i) for i in images]!r}]\n"
            f"runpy.run_path({str(EXAMPLES / 'classify.py')!r}, run_name='__main__')\n")
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]


def test_classify_script_agrees_with_evit_deploy_run(m0_onnx):
    results = classify_without_torch(m0_onnx, SAMPLE)
    expected = api.run(m0_onnx, SAMPLE).predictions
    assert [r["image"] for r in results] == [str(p) for p in SAMPLE]
    assert [[t["index"] for t in r["top"]] for r in results] == [[i for i, *_ in p.top] for p in expected]


def test_classify_script_follows_the_artifacts_input_format(tmp_path):
    """A uint8 artifact with the preprocessing baked in takes the cropped pixels as they are;
    a dynamic batch takes all photos at once."""
    baked = api.export("m0", "onnx", out_dir=tmp_path, options={"bake_preprocessing": "uint8"},
                       dynamic_batch=True).artifact.path
    results = classify_without_torch(baked, SAMPLE[:2])
    expected = api.predict("m0", SAMPLE[:2])
    assert [r["top"][0]["index"] for r in results] == [p.top[0][0] for p in expected]


def test_classify_script_rejects_what_it_cannot_run(tmp_path):
    other = tmp_path / "model.bin"
    other.write_bytes(b"\0")
    proc = run_python(f"import runpy, sys; sys.argv = ['classify.py', {str(other)!r}, 'x.jpg']; "
                      f"runpy.run_path({str(EXAMPLES / 'classify.py')!r}, run_name='__main__')")
    assert proc.returncode != 0 and "not an artifact this script knows" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_build_file_is_valid_and_lists_the_release():
    from evit_deploy.build import load_build_file
    from evit_deploy.plan import merge_options

    spec = load_build_file(EXAMPLES / "evit-deploy.toml")
    targets = {a.name: a.target for a in spec.artifacts}
    assert targets == {"ios": "coreml", "android-litert": "litert", "android-executorch": "executorch",
                       "server-onnx": "onnx", "server-openvino": "openvino", "server-tvm": "tvm"}
    tvm = next(a for a in spec.artifacts if a.target == "tvm")
    _, options, _ = merge_options(tvm.target, tvm.options, device=tvm.device)    # as the export sees them
    assert tvm.batch == 16 and "broadwell" in options.tvm_target
    # The tuning command in the file's comment makes a database for exactly that target.
    text = (EXAMPLES / "evit-deploy.toml").read_text()
    command = re.search(r"evit-deploy tune .*", text).group(0)
    target = shlex.split(command)[shlex.split(command).index("--tvm-target") + 1]
    from evit_deploy.targets.tvm.target_string import resolve_target
    assert resolve_target(target) == resolve_target(options.tvm_target)


def test_workflow_runs_commands_that_exist():
    yaml = pytest.importorskip("yaml")
    from typer.main import get_command

    from evit_deploy.cli import app

    workflow = yaml.safe_load((EXAMPLES / "github-actions.yml").read_text())
    jobs = workflow["jobs"]
    assert jobs["verify-on-macos"]["needs"] == "build" and "macos" in jobs["verify-on-macos"]["runs-on"]
    steps = [s for job in jobs.values() for s in job["steps"]]
    assert any(s.get("uses", "").startswith("actions/upload-artifact") and s["with"]["path"] == "dist/"
               for s in steps)
    commands = get_command(app).commands
    used = [line.strip() for s in steps for line in s.get("run", "").splitlines()
            if line.strip().startswith("evit-deploy")]
    assert used, "the workflow runs no evit-deploy command"
    for line in used:
        words = [w for w in shlex.split(line)[1:] if not w.startswith("--quiet")]
        command = commands[words[0]]                 # KeyError: a command the CLI does not have
        known = {opt for p in command.params for opt in getattr(p, "opts", [])}
        assert {w for w in words if w.startswith("--")} <= known, line


def test_swift_snippet_uses_the_names_core_ml_export_gives(m0_onnx):
    pytest.importorskip("coremltools")
    from types import SimpleNamespace

    from evit_deploy.models.registry import resolve_name
    from evit_deploy.targets import get_target
    from evit_deploy.targets.coreml.metadata import LABEL_OUTPUT, PROBABILITIES_OUTPUT

    swift = (EXAMPLES / "ios" / "ClassifyPhoto.swift").read_text()
    target = get_target("coreml")
    package = target.artifact_name(SimpleNamespace(display_name=resolve_name("m2").display_name),
                                   target.parse_options({}))
    # Xcode names the generated class after the package, '-' becoming '_'.
    assert package == "EfficientViT-M2.mlpackage" and "EfficientViT_M2(" in swift
    assert f"output.{LABEL_OUTPUT}" in swift and PROBABILITIES_OUTPUT in swift
    # Every target names the input after the trace; the generated method takes it as a label.
    _, description = api.inspect_artifact(m0_onnx)
    assert f"prediction({description.input.name}:" in swift


def test_kotlin_snippet_reads_what_the_android_exports_store(m0_onnx):
    """The names the Kotlin snippet looks up are the ones the LiteRT and ExecuTorch exports
    write, and the description keys it reads exist in a real description."""
    kotlin = (EXAMPLES / "android" / "ClassifyPhoto.kt").read_text()
    from evit_deploy.targets.executorch.runtime import DESCRIPTION_METHOD
    from evit_deploy.targets.litert.flatbuffer import METADATA_NAME

    assert f'entry.name() == "{METADATA_NAME}"' in kotlin
    assert f'module.execute("{DESCRIPTION_METHOD}")' in kotlin
    stored = api.inspect_artifact(m0_onnx)[1].to_dict()
    for key in re.findall(r'preprocessing\.get\w+\("(\w+)"\)', kotlin):
        assert key in stored["preprocessing"], key
    for key in re.findall(r'input\.(?:get|opt)\w+\("(\w+)"', kotlin):
        assert key in stored["inputs"][0], key
    assert 'root.optJSONArray("labels")' in kotlin and len(stored["labels"]) == 1000
    # The fp16 branch matches the type the ExecuTorch fp16 export records.
    assert 'd.dtype == "float16"' in kotlin


def test_build_file_android_artifacts_use_the_android_devices():
    from evit_deploy.build import load_build_file
    from evit_deploy.devices import load_device

    spec = load_build_file(EXAMPLES / "evit-deploy.toml")
    devices = {a.name: a.device for a in spec.artifacts}
    assert load_device(devices["android-litert"]).options == {"precision": "fp32"}
    assert load_device(devices["android-executorch"]).options == {"precision": "fp16"}


def test_the_readmes_python_api_example_runs(tmp_path):
    """The README's Python API block, run as written but for M0 (the same calls; M4 only
    takes longer), in a folder holding what it names: a checkpoint, cat.jpg, photos/, val/."""
    import shutil

    from conftest import save_checkpoint

    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Python API"):readme.index("## Writing a target plug-in")]
    code = section[section.index("```python") + len("```python"):]
    code = code[:code.index("```")].replace("m4", "m0")
    save_checkpoint(tmp_path / "efficientvit_m0.pth", "m0", seed=3)
    shutil.copy(SAMPLE[0], tmp_path / "cat.jpg")
    for folder in ("photos", "val"):
        (tmp_path / folder).mkdir()
        for image in SAMPLE:
            shutil.copy(image, tmp_path / folder / image.name)
    proc = run_python(code, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dist/efficientvit_m0.onnx True" in proc.stdout


def test_the_readmes_commands_exist_with_the_options_they_use():
    """Every ``evit-deploy ...`` line of the README (code blocks and inline) names a command
    the CLI has (or the example plug-in adds) and only options that command takes (for
    ``export``, also the targets' own options)."""
    import dataclasses

    import click
    from typer.main import get_command

    from evit_deploy.cli import app
    from evit_deploy.targets import available_targets, option_shortcuts

    readme = (ROOT / "README.md").read_text()
    lines = [line.strip() for block in re.findall(r"```bash\n(.*?)```", readme, re.S)
             for line in block.replace("\\\n", " ").splitlines() if line.strip().startswith("evit-deploy ")]
    lines += re.findall(r"`(evit-deploy [^`]+)`", readme)
    assert len(lines) > 50
    plugin_commands = set(re.findall(r'Command\("([\w-]+)"', (EXAMPLES / "plugin_target" / "evit_pt2_target.py")
                                     .read_text()))
    target_flags = {flag for cls in available_targets().values() for f in dataclasses.fields(cls.Options)
                    for flag in (f"--{f.name.replace('_', '-')}", f"--no-{f.name.replace('_', '-')}")}
    target_flags |= set(option_shortcuts())
    group = get_command(app)
    ctx = click.Context(group)
    for line in lines:
        words = [w for w in shlex.split(line.split(" #")[0])[1:] if w not in ("--quiet", "-q", "--debug", "--help")]
        if not words or words[0].startswith("-") or words[0] in plugin_commands:
            continue
        command = group.get_command(ctx, words[0])
        assert command is not None, line
        known = {opt for p in command.params for opt in (*getattr(p, "opts", ()), *getattr(p, "secondary_opts", ()))}
        if words[0] == "export":
            known |= target_flags
        assert {w.split("=")[0] for w in words if w.startswith("--")} <= known, line
