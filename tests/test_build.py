"""``evit-deploy build``: validation, manifest, reproducibility, skipping, failures.

The models are built at 64x64: what a build does (verify, record, skip, reproduce) does not
depend on the resolution. The tests share one build (``built``); a test that changes a
project changes a copy."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import shutil
import textwrap
from pathlib import Path

import pytest

from conftest import ctrl_c_as_runtime_error
from evit_deploy.build import load_build_file
from evit_deploy.errors import EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_PARITY_FAILED, BadInputError
from evit_deploy.targets.onnx import OnnxTarget

ONNX_BUILD = textwrap.dedent("""\
    [build]
    out = "dist"

    [models.m0]
    weights = "m0.pth"
    img_size = 64

    [models.m1]
    img_size = 64

    [[artifact]]
    device = "onnx-cpu"
    models = ["m0", "m1"]

    [[artifact]]
    name = "onnx-fp16"
    target = "onnx"
    models = ["m0"]
    [artifact.options]
    fp16 = true
""")


def _make_project(directory: Path) -> Path:
    """A build file with a checkpoint beside it."""
    from conftest import save_checkpoint

    save_checkpoint(directory / "m0.pth", "m0", seed=3, img_size=64)
    (directory / "evit-deploy.toml").write_text(ONNX_BUILD)
    return directory


@pytest.fixture
def project(tmp_path):
    return _make_project(tmp_path)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A project built once (serially), and what the build printed."""
    from evit_deploy.cli import invoke

    project = _make_project(tmp_path_factory.mktemp("built"))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = invoke(["build", str(project / "evit-deploy.toml")])
    assert code == 0, printed.getvalue()
    return project, printed.getvalue()


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def _hashes(manifest: dict) -> dict:
    return {(r["artifact"], r["model"]): r["sha256"] for r in manifest["artifacts"]}


def test_build_verifies_everything_and_writes_the_manifest(built):
    project, out = built
    manifest = _manifest(project / "dist")
    assert manifest["verdict"] == "pass"
    records = {(r["artifact"], r["model"]): r for r in manifest["artifacts"]}
    assert set(records) == {("onnx-cpu", "efficientvit_m0"), ("onnx-cpu", "efficientvit_m1"),
                            ("onnx-fp16", "efficientvit_m0")}
    for r in records.values():
        assert r["status"] == "built" and r["parity"]["passed"]
        path = project / "dist" / r["path"]
        assert path.is_file() and path.stat().st_size == r["size"]
        assert len(r["sha256"]) == 64 and r["reproducible"] is True
        # Which CPUs compute it as verified (onnxruntime: any), and the CPU that verified it.
        assert r["cpu"]["isa"] == [] and r["cpu"]["verified_on"]["model"]
    m0 = records[("onnx-cpu", "efficientvit_m0")]
    from evit_deploy.models.checkpoint import sha256_file
    assert m0["weights"] == sha256_file(project / "m0.pth")
    assert records[("onnx-cpu", "efficientvit_m1")]["weights"] == "random-init"
    assert records[("onnx-fp16", "efficientvit_m0")]["parity"]["precision"] == "fp16"
    for package in ("evit-deploy", "torch", "onnx", "onnxruntime", "coremltools", "apache-tvm"):
        assert package in manifest["versions"]
    assert "onnx-cpu/m0" in out and "built" in out


def test_a_second_build_in_worker_processes_gives_the_same_bytes(built, cli, tmp_path_factory):
    """The same inputs built again into a fresh directory, this time in two worker processes
    (one per model): the same bytes as the first, serial build."""
    project, _ = built
    first = _manifest(project / "dist")
    again = tmp_path_factory.mktemp("again")
    assert cli("-q", "build", project / "evit-deploy.toml", "--out", again, "--jobs", "2")[0] == 0
    assert _hashes(_manifest(again)) == _hashes(first)
    assert _manifest(again)["artifacts_sha256"] == first["artifacts_sha256"]


def test_rerun_skips_unchanged_work(built, cli, tmp_path):
    project = shutil.copytree(built[0], tmp_path / "project")
    first = _manifest(project / "dist")
    # Re-run in place: nothing to do.
    code, out, _ = cli("build", project / "evit-deploy.toml", "--json", "-")
    assert code == 0
    assert {r["status"] for r in json.loads(out)["artifacts"]} == {"up to date"}
    # Change one input (the fp16 entry's opset) and damage one artifact: exactly those rebuild.
    (project / "evit-deploy.toml").write_text(ONNX_BUILD.replace("fp16 = true", "fp16 = true\nopset = 20"))
    damaged = project / "dist" / next(r["path"] for r in first["artifacts"] if r["model"] == "efficientvit_m1")
    damaged.write_bytes(damaged.read_bytes()[:-10])
    code, out, _ = cli("build", project / "evit-deploy.toml", "--json", "-")
    assert code == 0
    status = {(r["artifact"], r["model"]): r["status"] for r in json.loads(out)["artifacts"]}
    assert status == {("onnx-cpu", "efficientvit_m0"): "up to date", ("onnx-cpu", "efficientvit_m1"): "built",
                      ("onnx-fp16", "efficientvit_m0"): "built"}


def test_every_problem_is_reported_before_any_work(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(textwrap.dedent("""\
        [build]
        outt = "dist"

        [models.m2]
        weights = "missing.pth"
        img_size = 200

        [models.m9]

        [[artifact]]
        target = "onnxx"

        [[artifact]]
        profile = "iphone-x"

        [[artifact]]
        target = "onnx"
        models = ["m2", "m3"]
        [artifact.options]
        opset = 99
    """))
    with pytest.raises(BadInputError) as info:
        load_build_file(path)
    message = str(info.value)
    for expected in ("bad.toml:2: unknown key 'outt' in [build] (did you mean 'out'?)",
                     "bad.toml:5: weights file not found", "bad.toml:6: img_size must be a positive multiple of 16",
                     "bad.toml:8: unknown model 'm9'", "bad.toml:11: [[artifact]] #1: unknown target 'onnxx'",
                     "bad.toml:14: [[artifact]] #2: unknown device 'iphone-x'",
                     "bad.toml:18: [[artifact]] #3: model 'm3' is not defined",
                     "bad.toml:16: unknown value for [[artifact]] #3: option 'opset' of target 'onnx'"):
        assert expected in message, expected
    assert not (tmp_path / "dist").exists()


def test_bad_build_file_exit_code(tmp_path, cli):
    (tmp_path / "b.toml").write_text("[models.m0]\n[[artifact]]\ntarget = 'onnx'\nmodels = 'm0'\n")
    code, _, err = cli("build", tmp_path / "b.toml")
    assert code == EXIT_BAD_INPUT and "'models' in [[artifact]] #1 must be a list" in err
    code, _, err = cli("build", tmp_path / "none.toml")
    assert code == EXIT_BAD_INPUT and "build file not found" in err


def test_a_failing_artifact_fails_the_build_but_not_the_others(project, cli, monkeypatch):
    real_export = OnnxTarget.export

    def fp16_breaks(self, traced, options, path, reporter):
        artifact = real_export(self, traced, options, path, reporter)
        if options.fp16:
            import onnx
            from onnx import numpy_helper
            model = onnx.load(path)
            init = max(model.graph.initializer, key=lambda i: numpy_helper.to_array(i).size)
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 3, init.name))
            onnx.save(model, path)
        return artifact

    monkeypatch.setattr(OnnxTarget, "export", fp16_breaks)
    code, _, err = cli("build", project / "evit-deploy.toml")
    assert code == EXIT_PARITY_FAILED and "1 artifact(s) failed" in err
    manifest = _manifest(project / "dist")
    assert manifest["verdict"] == "fail"
    status = {(r["artifact"], r["model"]): r["status"] for r in manifest["artifacts"]}
    assert status[("onnx-fp16", "efficientvit_m0")] == "failed parity"
    assert status[("onnx-cpu", "efficientvit_m0")] == status[("onnx-cpu", "efficientvit_m1")] == "built"
    assert not (project / "dist" / "onnx-fp16" / "efficientvit_m0_fp16.onnx").exists()


def test_a_full_disk_stops_the_build_instead_of_failing_every_artifact(project, cli, monkeypatch):
    from evit_deploy.errors import EXIT_OUTPUT_ERROR

    real_export = OnnxTarget.export
    calls = []

    def full_after_the_first(self, traced, options, path, reporter):
        calls.append(path)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_export(self, traced, options, path, reporter)

    monkeypatch.setattr(OnnxTarget, "export", full_after_the_first)
    code, _, err = cli("build", project / "evit-deploy.toml")
    assert code == EXIT_OUTPUT_ERROR and "no space left on device" in err.splitlines()[-1], err
    assert len(calls) == 2                      # not tried again for each remaining artifact
    manifest = _manifest(project / "dist")
    assert [r["status"] for r in manifest["artifacts"]] == ["built"]
    assert manifest["verdict"] == "incomplete" and len(manifest["pending"]) == 2


def test_one_build_at_a_time_writes_a_folder(project, cli):
    """Two builds into one folder (a CI matrix sharing a workspace) would each write a
    manifest of files the other replaced: the second is refused, and nothing is added to
    the folder to lock it."""
    from evit_deploy.fsutil import exclusive_lock

    dist = project / "dist"
    dist.mkdir()
    with exclusive_lock(dist, "held by this test"):            # as another build holds it
        code, _, err = cli("build", project / "evit-deploy.toml")
        assert code == EXIT_BAD_INPUT and err.strip().splitlines()[-1] == (
            f"error: {dist} is being written by another `evit-deploy build` or `optimize`: wait for it to finish, "
            f"or build into another --out"), err
        with pytest.raises(BadInputError):                       # the lock is the directory's, not the file's
            exclusive_lock(dist, "held")
    assert list(dist.iterdir()) == []
    exclusive_lock(dist, "free again").close()                   # released with the block


@pytest.mark.parametrize("ctrl_c", ["KeyboardInterrupt", "turned into a RuntimeError"])
def test_ctrl_c_mid_build_keeps_what_was_built(project, cli, monkeypatch, ctrl_c):
    real_export = OnnxTarget.export
    calls = []

    def interrupt_second(self, traced, options, path, reporter):
        calls.append(path)
        if len(calls) == 2:
            path.write_bytes(b"partial")
            if ctrl_c == "KeyboardInterrupt":
                raise KeyboardInterrupt
            ctrl_c_as_runtime_error()
        return real_export(self, traced, options, path, reporter)

    monkeypatch.setattr(OnnxTarget, "export", interrupt_second)
    code, _, err = cli("build", project / "evit-deploy.toml")
    assert code == EXIT_INTERRUPTED and "interrupted" in err, err
    manifest = _manifest(project / "dist")
    # What was built is recorded; what was not is pending, not failed, and the verdict says so.
    assert [r["status"] for r in manifest["artifacts"]] == ["built"]
    assert manifest["verdict"] == "incomplete" and len(manifest["pending"]) == 2
    built = project / "dist" / manifest["artifacts"][0]["path"]
    assert built.is_file()
    leftovers = [p for p in (project / "dist").rglob("*") if p.is_file() and p != built and p.name != "manifest.json"]
    assert leftovers == []


def test_manifest_size_counts_the_files_an_app_ships_and_not_the_zip(tmp_path):
    from evit_deploy.build.manifest import artifact_files
    from evit_deploy.targets.base import Artifact

    xml, weights = tmp_path / "m.xml", tmp_path / "m.bin"
    xml.write_bytes(b"x" * 10)
    weights.write_bytes(b"w" * 1000)
    desc = None                                   # not read by the manifest's file facts
    facts = artifact_files(Artifact(xml, "openvino", desc, sidecars=(weights,)), tmp_path)
    assert facts["path"] == "m.xml" and facts["size"] == 1010          # IR and weights
    package = tmp_path / "M.mlpackage"
    (package / "Data").mkdir(parents=True)
    (package / "Data" / "weights.bin").write_bytes(b"w" * 500)
    archive = package.with_name(package.name + ".zip")
    archive.write_bytes(b"z" * 400)
    facts = artifact_files(Artifact(package, "coreml", desc, sidecars=(archive,)), tmp_path)
    assert facts["size"] == 500 and facts["zip"]["size"] == 400        # the package once


# -- the schema, in-process (no export) ------------------------------------------------------

def _write(directory: Path, text: str) -> Path:
    path = directory / "evit-deploy.toml"
    path.write_text(textwrap.dedent(text))
    return path


def test_declared_path_options_are_beside_the_build_file_and_count_by_content(tmp_path):
    """Only options a target declares as paths (TVM's db) are files: a file that happens to be
    named like another option's value (tvm_target = "native") neither changes that value nor
    the rebuild key."""
    from evit_deploy.build.inputs import inputs_key

    (tmp_path / "db").mkdir()
    (tmp_path / "db" / "records.json").write_text("1")
    (tmp_path / "native").write_text("not a TVM target")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    spec = load_build_file(_write(tmp_path, """\
        [models.m0]
        [[artifact]]
        target = "tvm"
        [artifact.options]
        tvm_target = "native"
        db = "db"
    """))
    (art,) = spec.artifacts
    assert art.paths == {"db": tmp_path / "db"}
    assert art.export_options() == {"tvm_target": "native", "db": str(tmp_path / "db")}
    assert art.options == {"tvm_target": "native", "db": "db"}          # as written: the key's part
    key = inputs_key(spec.models["m0"], art, spec, "weights", {})
    (tmp_path / "native").write_text("changed")
    assert inputs_key(spec.models["m0"], art, spec, "weights", {}) == key
    (tmp_path / "db" / "records.json").write_text("2")
    assert inputs_key(spec.models["m0"], art, spec, "weights", {}) != key


def test_artifact_entries_and_their_defaults(tmp_path):
    spec = load_build_file(_write(tmp_path, """\
        [build]
        seed = 7
        [models.m0]
        [models.m1]
        img_size = 64
        [[artifact]]
        device = "onnx-cpu"
        [[artifact]]
        name = "int8"
        target = "onnx"
        models = ["m1"]
        batch = 4
        min_top1_agreement = 1
        [artifact.options]
        precision = "int8"
        calibration = "calib"
    """))
    assert spec.out == tmp_path / "dist" and spec.seed == 7 and spec.images is None
    assert {k: (m.name, m.weights, m.options) for k, m in spec.models.items()} == {
        "m0": ("efficientvit_m0", None, {}), "m1": ("efficientvit_m1", None, {"img_size": 64})}
    first, second = spec.artifacts
    assert (first.name, first.target, first.device, first.models, first.batch) == \
        ("onnx-cpu", "onnx", "onnx-cpu", ["m0", "m1"], None)
    assert (second.name, second.models, second.batch, second.gates) == ("int8", ["m1"], 4, {"min_top1_agreement": 1.0})
    # A declared path that does not exist is still relative to the build file (the target
    # says it is missing when the artifact is planned), and counts by name only.
    assert second.paths == {"calibration": tmp_path / "calib"}


def test_profile_is_the_earlier_name_of_device(tmp_path):
    """``profile = "..."`` (accepted for one release) reads as ``device``; the bad build
    file above checks that its problems point at its line."""
    spec = load_build_file(_write(tmp_path, '[models.m0]\n[[artifact]]\nprofile = "onnx-cpu"\n'))
    [entry] = spec.artifacts
    assert (entry.name, entry.target, entry.device) == ("onnx-cpu", "onnx", "onnx-cpu")


@pytest.mark.parametrize("text,expected", [
    ('[models.m0]\n[[artifact]]\ntarget = "onnx"\n[artifact.options]\nprecision = "bf16"\n',
     "evit-deploy.toml:2: [[artifact]] #1: target 'onnx' does not support precision 'bf16'"),
    ('[models.m0]\n[[artifact]]\ntarget = "onnx"\ndynamic_batch = "yes"\n',
     "evit-deploy.toml:4: 'dynamic_batch' in [[artifact]] #1 must be a bool"),
    ('[models.m0]\n[[artifact]]\ntarget = "tvm"\ndynamic_batch = true\n',
     "evit-deploy.toml:4: [[artifact]] #1: target 'tvm' does not support dynamic_batch"),
    ('[models.m0]\n[[artifact]]\ndevice = "onnx-cpu"\ntarget = "tvm"\n',
     "evit-deploy.toml:4: [[artifact]] #1: device 'onnx-cpu' is for target 'onnx', not 'tvm'"),
    ('[models.m0]\n[[artifact]]\ndevice = "onnx-cpu"\nprofile = "onnx-cpu"\n',
     "evit-deploy.toml:4: [[artifact]] #1: give 'device' once ('profile' is its earlier name)"),
    ('[models.m0]\n[[artifact]]\ntarget = "onnx"\n[[artifact]]\ntarget = "onnx"\n',
     "two [[artifact]] entries named 'onnx' build model 'm0'"),
    ('[models.m0]\n', "no [[artifact]] entries: nothing to build"),
    ('[models.m0\n', "invalid TOML"),
])
def test_schema_problems_name_file_and_line(tmp_path, text, expected):
    with pytest.raises(BadInputError) as info:
        load_build_file(_write(tmp_path, text))
    assert expected in str(info.value)


def test_records_serialise_to_the_manifest_format():
    from evit_deploy.build import BuildRecord, Status

    built = BuildRecord("onnx-cpu", "efficientvit_m0", "onnx", "onnx-cpu", {"opset": 18}, "random-init", 0, 1, False,
                        "k" * 64, status=Status.BUILT, reproducible=True, path="onnx-cpu/m.onnx", size=10,
                        sha256="s" * 64, files=[{"path": "onnx-cpu/m.onnx", "size": 10, "sha256": "s" * 64}],
                        seconds=1.5)
    data = built.to_dict()
    assert data["status"] == "built" and data["profile"] == "onnx-cpu" and data["seed"] == 0
    assert "error" not in data and "zip" not in data and "eval" not in data     # unset: absent, as before
    assert json.loads(json.dumps(data)) == data
    assert BuildRecord.from_dict({**data, "from_a_later_version": 1}) == built
    failed = BuildRecord.from_dict({**data, "status": "failed gate"})
    assert failed.status is Status.FAILED_GATE and failed.status.failed and failed.status.failed_verification
    assert not Status.UP_TO_DATE.failed and not Status.FAILED_EXPORT.failed_verification
    with pytest.raises(ValueError):
        BuildRecord.from_dict({**data, "status": "half built"})


def test_the_schema_is_torch_free(tmp_path):
    from conftest import run_python

    path = _write(tmp_path, '[models.m0]\n[[artifact]]\ntarget = "tvm"\n[[artifact]]\ndevice = "onnx-cpu"\n')
    proc = run_python("import sys; sys.modules['torch'] = None\n"
                      "from evit_deploy.build import load_build_file\n"
                      f"print(len(load_build_file({str(path)!r}).artifacts))")
    assert proc.returncode == 0 and proc.stdout.strip() == "2", proc.stderr


SLEEPY_TARGET = '''
import os, pathlib, time
from evit_deploy.targets.onnx import OnnxTarget

class SleepyTarget(OnnxTarget):
    """ONNX that takes five minutes to export: a build still busy when it is stopped."""
    name = "sleepy"
    benchmark_backend = None

    def export(self, traced, options, path, reporter):
        pathlib.Path(os.environ["SLEEPY_STARTED"], traced.description.model).touch()
        time.sleep(300)
        return super().export(traced, options, path, reporter)
'''


def _processes_with(marker: str) -> list[int]:
    """The processes whose environment holds ``marker`` (a command and its workers)."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        with contextlib.suppress(OSError):
            if marker.encode() in environ.read_bytes():
                found.append(int(environ.parent.name))
    return found


@pytest.mark.parametrize("stop", ["SIGINT", "SIGTERM"])
def test_a_parallel_build_stopped_by_a_signal_stops_its_workers_and_says_incomplete(tmp_path, stop):
    """A SIGINT or SIGTERM sent to the command alone (``kill``, a CI runner; Ctrl-C in a
    terminal reaches the workers too) stops the worker processes at once rather than
    waiting for the artifacts they are making, and the manifest says the build is
    incomplete."""
    import os
    import signal
    import subprocess
    import sys
    import time
    import uuid

    from evit_deploy.errors import EXIT_TERMINATED

    site, started = tmp_path / "site", tmp_path / "started"
    dist = site / "evit_sleepy-0.1.dist-info"
    dist.mkdir(parents=True)
    started.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: evit-sleepy\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[evit_deploy.targets]\nsleepy = sleepy_target:SleepyTarget\n")
    (site / "sleepy_target.py").write_text(SLEEPY_TARGET)
    build_file = tmp_path / "evit-deploy.toml"
    build_file.write_text('[models.m0]\nimg_size = 64\n[models.m1]\nimg_size = 64\n'
                          '[[artifact]]\nname = "slow"\ntarget = "sleepy"\nmodels = ["m0", "m1"]\n')
    marker = f"EVIT_TEST_{uuid.uuid4().hex}"
    env = {**os.environ, "PYTHONPATH": str(site), "SLEEPY_STARTED": str(started), marker: "1"}
    proc = subprocess.Popen([sys.executable, "-m", "evit_deploy", "build", str(build_file), "--jobs", "2"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while len(list(started.iterdir())) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(list(started.iterdir())) == 2, proc.stderr.read() if proc.poll() is not None else "not started"
        proc.send_signal(getattr(signal, stop))          # to the command only, not its workers
        _, err = proc.communicate(timeout=90)            # the workers would sleep on for five minutes
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == (EXIT_INTERRUPTED if stop == "SIGINT" else EXIT_TERMINATED), err
    assert err.strip().splitlines()[-1] == ("error: interrupted" if stop == "SIGINT" else "error: terminated (SIGTERM)")
    manifest = json.loads((tmp_path / "dist" / "manifest.json").read_text())
    assert manifest["verdict"] == "incomplete" and manifest["pending"] == ["slow/m0", "slow/m1"]
    assert not list((tmp_path / "dist").rglob(".evit-staging-*"))     # the workers' half-made exports
    time.sleep(1)
    assert not _processes_with(marker)
