"""The contract every built-in target keeps, for every precision it exports.

Each (target, precision) exports the tiny attention model once per session
(``tiny_export`` in tests/conftest.py); every check here reads that one artifact:
it is written under its name and passed parity; its description reads back as the plan
that made it; it runs where torch cannot be imported if the target promises that; a copy
whose description names other weights fails ``verify``; a copy cut short, or whose
largest file holds other data, fails with a one-line error and never kills the process;
a failure while exporting leaves nothing under the final name; bad input gets its exit
code. What only one target does is tested in its own file (tests/test_<target>.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, SMALL, TINY_ATTENTION, run_python
from evit_deploy import api
from evit_deploy.errors import EXIT_BAD_INPUT, EXIT_PARITY_FAILED, BadInputError, ExportError, ParityError
from evit_deploy.plan import plan_export
from evit_deploy.targets import available_targets, get_target, target_for_artifact
from evit_deploy.targets.options import PRECISIONS
from evit_deploy.tracing import build_reference

CASES = [(name, precision) for name, cls in available_targets().items() for precision in cls.precisions()]
IDS = [f"{name}-{precision}" for name, precision in CASES]


def torch_free(target: str) -> bool:
    """Whether the target promises to run its artifacts where torch is not installed."""
    return "torch" not in get_target(target).run_requires


@pytest.fixture(params=CASES, ids=IDS)
def case(request):
    return request.param


@pytest.fixture
def exported(case, tiny_export):
    return tiny_export(*case)


def copy_artifact(artifact, directory: Path) -> Path:
    """A copy of every file of an artifact in ``directory``; the copy's path."""
    directory.mkdir(parents=True, exist_ok=True)
    for f in artifact.files:
        (shutil.copytree if f.is_dir() else shutil.copy)(f, directory / f.name)
    return directory / artifact.path.name


def files_of(path: Path) -> list[Path]:
    return sorted(p for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file())


def test_export_writes_the_artifact_under_its_name(case, exported):
    target_name, precision = case
    target = get_target(target_name)
    artifact, report = exported.artifact, exported.report
    assert report.passed and report.precision == precision, report.summary()
    assert all(f.exists() and f.parent == artifact.path.parent for f in artifact.files)
    # Only the artifact's files: nothing staged, nothing rejected is left beside them.
    assert sorted(p.name for p in artifact.path.parent.iterdir()) == sorted(f.name for f in artifact.files)
    options = target.parse_options(artifact.description.extra["options"])
    assert artifact.path.name == target.artifact_name(artifact.description, options)
    # The default precision has the plain name; the others sit beside it.
    assert (target.variant(options) == "") == (precision == getattr(target.Options, "precision", "fp32"))
    assert target_for_artifact(artifact.path).name == target_name and target.recognizes(artifact.path)
    assert set(target.artifact_files(artifact.path)) >= {f for f in artifact.files if f.is_file()}


def test_the_description_reads_back_as_the_plan_that_made_it(case, exported):
    target_name, precision = case
    artifact = exported.artifact
    target, read = api.inspect_artifact(artifact.path)
    assert target.name == target_name and read == artifact.description
    assert read.model == TINY_ATTENTION and read.input.shape[-2:] == (SMALL, SMALL)
    assert read.extra["target"] == target_name and read.extra["precision"] == precision
    again = plan_export(read.model, target_name, options=read.extra["options"], input_size=(SMALL, SMALL))
    assert again.options_dict() == read.extra["options"] and again.precision == precision
    assert target.artifact_name(read, again.options) == artifact.path.name
    assert read.extra["cpu"] == target.cpu_needs(again.options).to_dict()
    target.parse_options(target.rebuild_options(read))          # what rebuilds it is valid


def test_verify_passes_on_the_artifact(exported, cli):
    code, out, err = cli("verify", exported.artifact.path, "--json", "-")
    assert code == 0, err
    report = json.loads(out)
    assert report["passed"] and report["precision"] == exported.report.precision


def _other_seed(path: Path) -> int:
    """Rewrite, in every file of the artifact copied alone at ``path``, the stored
    description's seed 0 as 1 (one byte, so every container format stays valid): the
    artifact now claims to be another random model. Returns how many places changed."""
    changed = 0
    for f in files_of(path.parent):
        data = f.read_bytes()
        for old in (b'"seed":0', b'"seed": 0', b"&quot;seed&quot;:0"):
            changed += data.count(old)
            data = data.replace(old, old[:-1] + b"1")
        f.write_bytes(data)
    return changed


def test_a_copy_that_claims_other_weights_fails_verify(exported, tmp_path, cli):
    bad = copy_artifact(exported.artifact, tmp_path / "bad")
    assert _other_seed(bad) > 0
    code, out, err = cli("verify", bad, "--json", "-")
    assert code == EXIT_PARITY_FAILED, err
    report = json.loads(out)
    assert not report["passed"] and report["failures"] and "parity FAILED" in err and "Traceback" not in err


def _cases_of(session, test_name: str) -> list[tuple[str, str]]:
    """The (target, precision) cases of ``test_name`` this session runs."""
    return [item.callspec.params["case"] for item in session.items
            if getattr(item, "originalname", None) == test_name and hasattr(item, "callspec")]


def _in_one_process(cases, tiny_export, tmp_path: Path, body: str, *, without_torch: bool,
                    env: dict | None = None) -> dict:
    """Run ``body`` (Python, with ``path`` and ``key`` set, printing one JSON value) for the
    artifact of each case in one fresh process; {case: its JSON value, or None if the
    process died before it printed it}. One process for all: each costs seconds to start."""
    paths = {}
    for target, precision in cases:
        try:
            paths[f"{target}-{precision}"] = str(tiny_export(target, precision).artifact.path)
        except BaseException:          # skipped or failed: its own test says so
            continue
    code = ("import json, sys\n" + ("sys.modules['torch'] = None\n" if without_torch else "") +
            f"for key, path in {json.dumps(paths)}.items():\n" +
            "".join(f"    {line}\n" for line in body.strip().splitlines()) +
            "    sys.stdout.flush()\n")
    # The tests folder on the path: the tiny model's factory is tests/custom_models.py.
    path = os.pathsep.join(p for p in (str(ROOT / "tests"), os.environ.get("PYTHONPATH")) if p)
    proc = run_python(code, cwd=tmp_path, env_extra={"PYTHONPATH": path, **(env or {})})
    found = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            found[entry["key"]] = entry
    return {"results": found, "returncode": proc.returncode, "stderr": proc.stderr[-2000:]}


@pytest.fixture(scope="session")
def runs_without_torch(request, tiny_export, tmp_path_factory):
    """Every torch-free artifact of the session run by the CLI in one process where
    ``import torch`` fails, on a seeded input tensor; its outputs saved beside it."""
    folder = tmp_path_factory.mktemp("torch-free")
    cases = [c for c in _cases_of(request.session, "test_runs_without_torch") if torch_free(c[0])]
    body = """
import numpy as np
from evit_deploy.cli import invoke
from evit_deploy.targets import target_for_artifact
description = target_for_artifact(path).read_description(path)
x = np.random.default_rng(0).random(description.input.shape, dtype=np.float32)
np.save(f"{key}-in.npy", x.astype(description.input.dtype))
code = invoke(["-q", "run", path, f"{key}-in.npy", "--save-outputs", f"{key}-out.npz"])
target = target_for_artifact(path)
# Converter packages are for export only (xdsl: litert-torch's compiler).
converters = sorted(m for m in (set(target.requires) - set(target.run_requires)) | {"xdsl"} if m in sys.modules)
print(json.dumps({"key": key, "code": code, "torch": sys.modules.get("torch") is not None,
                  "converters": converters}))
"""
    home = folder / "home"            # where a runtime's telemetry would keep its client id
    home.mkdir()
    return folder, _in_one_process(cases, tiny_export, folder, body, without_torch=True, env={"HOME": str(home)})


def test_runs_without_torch(case, exported, runs_without_torch):
    target_name, precision = case
    if not torch_free(target_name):
        pytest.skip(f"{target_name} needs torch to run its artifacts")
    folder, ran = runs_without_torch
    key = f"{target_name}-{precision}"
    entry = ran["results"].get(key)
    assert entry is not None, f"exit {ran['returncode']}: {ran['stderr']}"
    assert entry["code"] == 0 and not entry["torch"], ran["stderr"]
    assert entry["converters"] == [], "running an artifact imports its converter"
    assert not (folder / "home" / "intel").exists(), "OpenVINO's telemetry keeps a client id in ~/intel"
    x = np.load(folder / f"{key}-in.npy")
    inside = api.run(exported.artifact.path, [folder / f"{key}-in.npy"]).outputs
    outside = np.load(folder / f"{key}-out.npz")
    assert sorted(outside.files) == sorted(inside) and len(x) == exported.artifact.description.input.shape[0]
    for name in inside:
        np.testing.assert_array_equal(outside[name], inside[name])


#: Ways an artifact's largest file gets damaged: cut short (an interrupted copy), or
#: replaced by binary data of another kind under its name (a renamed file, a proxy's reply).
DAMAGES = {
    "truncated": lambda data: data[: len(data) // 2],
    "foreign": lambda data: np.random.default_rng(0).bytes(len(data)),
}


@pytest.fixture(scope="session")
def damaged_verifies(request, tiny_export, tmp_path_factory):
    """``verify`` of each damaged copy (:data:`DAMAGES`) of every artifact of the session,
    in one process: a native reader that dies of a signal on a damaged file shows as the
    process's exit."""
    folder = tmp_path_factory.mktemp("damaged")
    cases = list(dict.fromkeys(_cases_of(request.session, "test_a_damaged_copy_fails_verify_with_one_line")))
    for target, precision in cases:
        try:
            artifact = tiny_export(target, precision).artifact
        except BaseException:
            continue
        for damage, damaged in DAMAGES.items():
            copy = copy_artifact(artifact, folder / f"{target}-{precision}" / damage)
            largest = max(files_of(copy), key=lambda f: f.stat().st_size)
            largest.write_bytes(damaged(largest.read_bytes()))
    body = f"""
import contextlib, io, pathlib
from evit_deploy.cli import invoke
for damage in {list(DAMAGES)!r}:
    copy = pathlib.Path(key) / damage / pathlib.Path(path).name
    err = io.StringIO()
    print(json.dumps({{"key": f"{{key}}/{{damage}}", "started": True}}), flush=True)
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = invoke(["-q", "verify", str(copy)])
    print(json.dumps({{"key": f"{{key}}/{{damage}}", "code": code, "err": err.getvalue()}}), flush=True)
"""
    return _in_one_process(cases, tiny_export, folder, body, without_torch=False)


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_copy_fails_verify_with_one_line(case, damage, exported, damaged_verifies):
    key = f"{'-'.join(case)}/{damage}"
    entry = damaged_verifies["results"].get(key)
    assert entry is not None and "code" in entry, \
        f"the process died (exit {damaged_verifies['returncode']}) at {key}: {damaged_verifies['stderr']}"
    assert entry["code"] in (EXIT_BAD_INPUT, EXIT_PARITY_FAILED), entry
    # One line says what is wrong (the process may have printed a library's warning before).
    errors = [line for line in entry["err"].splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and entry["err"].strip().endswith(errors[0]) and "Traceback" not in entry["err"], entry
    if entry["code"] == EXIT_PARITY_FAILED:
        assert "parity FAILED" in errors[0], entry


def test_a_failed_export_leaves_the_previous_artifact_alone(case, exported, tmp_path, monkeypatch):
    """The target writes every file of its artifact, then fails: what was under the final
    names stays as it was, and no staging directory is left."""
    target_name, precision = case
    out = tmp_path / "out"
    previous = copy_artifact(exported.artifact, out)
    before = {p: p.read_bytes() for p in files_of(out)}
    written = exported.artifact

    def writes_then_fails(self, traced, options, path, reporter):
        copy_artifact(written, path.parent)
        raise ExportError("the converter failed half-way")

    monkeypatch.setattr(type(get_target(target_name)), "export", writes_then_fails)
    plan = plan_export(TINY_ATTENTION, target_name, options=written.description.extra["options"],
                       input_size=(SMALL, SMALL))
    with pytest.raises(ExportError, match="half-way"):
        api.export_traced(_tiny_trace(plan), plan, out, verify=False)
    assert {p: p.read_bytes() for p in files_of(out)} == before and previous.exists()
    assert sorted(p.name for p in out.iterdir()) == sorted(f.name for f in written.files)


_traces: dict[tuple, object] = {}


def _tiny_trace(plan):
    """One trace per input format of the tiny model (the failing export above reads none of it)."""
    from evit_deploy.plan import trace_plan

    if plan.trace_key not in _traces:
        _traces[plan.trace_key] = trace_plan(plan)
    return _traces[plan.trace_key]


def test_a_parity_failure_publishes_nothing_under_the_final_name(case, exported, tmp_path, monkeypatch):
    """An export that computes something else than its reference is kept aside, never
    published: here the reference is the model of another seed."""
    target_name, _ = case
    written = exported.artifact

    def writes_the_artifact(self, traced, options, path, reporter):
        copy = copy_artifact(written, path.parent)
        return dataclasses.replace(written, path=copy, sidecars=tuple(path.parent / f.name for f in written.sidecars))

    monkeypatch.setattr(type(get_target(target_name)), "export", writes_the_artifact)
    plan = plan_export(TINY_ATTENTION, target_name, options=written.description.extra["options"],
                       input_size=(SMALL, SMALL))
    other = build_reference(dataclasses.replace(written.description, seed=1))
    with pytest.raises(ParityError, match="was not written under"):
        api.export_traced(dataclasses.replace(_tiny_trace(plan), reference=other), plan, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{written.path.name}.rejected"]
    assert (tmp_path / f"{written.path.name}.rejected" / "parity-report.json").is_file()


def test_bad_input_gets_its_exit_code(case, exported, tmp_path, cli):
    target_name, precision = case
    path = exported.artifact.path
    shape = exported.artifact.description.input.shape
    np.save(tmp_path / "wrong.npy", np.zeros((1, shape[1], shape[2] + 1, shape[3]), np.float32))
    for args, message in [
        (["run", path, tmp_path / "wrong.npy"], "has shape"),
        (["run", path, tmp_path / "no-such-image.jpg"], "no-such-image.jpg"),
        (["verify", tmp_path / f"missing{path.suffix}"], "artifact not found"),
        (["export", TINY_ATTENTION, "--input-size", SMALL, "-t", target_name, "--no-such-option", "1",
          "--out", tmp_path / "out"], "--no-such-option"),
    ]:
        code, _, err = cli(*args)
        assert code == EXIT_BAD_INPUT and message in err, (args, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    refused = [p for p in PRECISIONS if p not in get_target(target_name).precisions()]
    for other in refused:
        code, _, err = cli("export", TINY_ATTENTION, "--input-size", SMALL, "-t", target_name, "--precision", other,
                           "--out", tmp_path / "out")
        assert code == EXIT_BAD_INPUT and f"does not support precision '{other}'" in err, err
        assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_operator_times_where_the_target_has_them(case, exported):
    target_name, _ = case
    target = get_target(target_name)
    description = exported.artifact.description
    x = np.random.default_rng(0).random(description.input.shape, dtype=np.float32).astype(description.input.dtype)
    inputs = {description.input.name: x}
    if not target.supports_profiling():
        with pytest.raises(BadInputError, match="cannot report per-operator times"):
            target.profile_ops(exported.artifact.path, inputs, threads=1, iterations=2, blocks={})
        return
    ops = target.profile_ops(exported.artifact.path, inputs, threads=1, iterations=2, blocks={})
    assert ops and all(op.seconds >= 0 for op in ops) and sum(op.seconds for op in ops) > 0


def test_bench_knows_every_precision_of_the_runtime(case):
    from evit_deploy.backends import BackendSpec

    target_name, precision = case
    backend = get_target(target_name).benchmark_backend
    if backend is None:
        pytest.skip(f"{target_name} has no benchmark backend")
    spec = BackendSpec.parse(f"{backend}:{precision}")
    assert (spec.target, spec.precision) == (target_name, precision)
    for other in [p for p in PRECISIONS if p not in get_target(target_name).precisions()]:
        with pytest.raises(BadInputError, match=f"does not support precision '{other}'"):
            BackendSpec.parse(f"{backend}:{other}")


def test_every_target_has_cases():
    assert {name for name, _ in CASES} == set(available_targets()) >= {"onnx", "coreml", "tvm", "openvino",
                                                                       "litert", "executorch"}
