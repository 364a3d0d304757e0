"""Shared fixtures. Tests never touch the network: checkpoints are made here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _python_processes() -> dict[int, list[str]]:
    """Processes running this interpreter, other than this one and its own children."""
    import psutil

    me = os.getpid()
    found = {}
    for p in psutil.process_iter(["pid", "ppid", "cmdline"]):
        cmd = p.info["cmdline"] or []
        if p.info["pid"] != me and p.info["ppid"] != me and cmd and cmd[0] == sys.executable:
            found[p.info["pid"]] = cmd
    return found


def _xdist_worker(config) -> bool:
    """Whether this process is a pytest-xdist worker (``-n N``)."""
    return hasattr(config, "workerinput")


def pytest_configure(config):
    # xdist workers share the machine: each runtime gets its share of the cores, not all
    # of them (the variables reach the runtimes these processes and their children load).
    if _xdist_worker(config):
        share = str(max(1, (os.cpu_count() or 1) // int(config.workerinput["workercount"])))
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ.setdefault(name, share)


def pytest_sessionstart(session):
    session.config._python_before = set(_python_processes())


def pytest_sessionfinish(session, exitstatus):
    """Nothing the tests started may outlive them: a worker of TVM's tuner or RPC server
    left running is an orphan of this interpreter (checked for the whole suite). Under
    xdist the controller checks, once the workers are gone: a worker sees the other
    worker and its children, which are not orphans."""
    import time

    if _xdist_worker(session.config):
        return
    before = getattr(session.config, "_python_before", set())
    for _ in range(20):           # killed processes take a moment to go
        left = {pid: cmd for pid, cmd in _python_processes().items() if pid not in before}
        if not left:
            return
        time.sleep(0.5)
    session.config.get_terminal_writer().line(
        "processes left behind by the tests: " + "; ".join(" ".join(c) for c in left.values()), red=True)
    session.exitstatus = 1


@pytest.fixture(autouse=True)
def _offline_torch_hub(tmp_path_factory, monkeypatch):
    # An empty hub cache per session: no test may find or download official weights.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path_factory.getbasetemp() / "torch-home"))


def save_checkpoint(path: Path, model_name: str, *, seed: int = 1, layout: str = "official",
                    recipe: str = "calibrated", **kwargs) -> Path:
    """A checkpoint of synthetic weights with non-trivial BN statistics: the ones commands
    use without weights (``calibrated``), or drawn with the statistics of trained
    checkpoints (``realistic``: see models/synthetic.py)."""
    import torch

    from evit_deploy.models.factory import create_model
    from evit_deploy.models.synthetic import realistic_weights

    if recipe == "realistic":
        model = realistic_weights(create_model(model_name, **kwargs), seed)
    else:
        model = create_model(model_name, "random", seed=seed, **kwargs)
    state = model.state_dict()
    if layout == "official":
        torch.save({"model": state}, path)
    elif layout == "bare":
        torch.save(state, path)
    elif layout == "safetensors":
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        raise ValueError(layout)
    return path


@pytest.fixture
def checkpoint(tmp_path):
    def make(model_name="m0", **kwargs):
        suffix = ".safetensors" if kwargs.get("layout") == "safetensors" else ".pth"
        name = f"{model_name}-{kwargs.get('recipe', 'calibrated')}-{kwargs.get('seed', 1)}{suffix}"
        return save_checkpoint(tmp_path / name, model_name, **kwargs)
    return make


@pytest.fixture
def cli(capsys):
    """Run the CLI in-process: returns (exit code, stdout, stderr)."""
    from evit_deploy.cli import invoke

    def run(*args):
        code = invoke([str(a) for a in args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err
    return run


def run_python(code: str, *, env_extra: dict | None = None, cwd=None, timeout=600) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=timeout)


def cli_without_torch(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    """The CLI in a fresh process where ``import torch`` fails."""
    code = ("import sys; sys.modules['torch'] = None\n"
            "from evit_deploy.cli import invoke\n"
            f"code = invoke({json.dumps([str(a) for a in args])})\n"
            "assert 'torch' not in sys.modules or sys.modules['torch'] is None\n"
            "sys.exit(code)\n")
    return run_python(code, **kwargs)


def cli_with_file_size_limit(args: list, limit_bytes: int, *, timeout=600) -> subprocess.CompletedProcess:
    """The CLI in a fresh process that may write no file beyond ``limit_bytes`` (``ulimit
    -f``): its writes fail as on a full disk (EFBIG instead of ENOSPC), native writers'
    included, with no privileges needed to fill a file system."""
    # Set by the child itself: a preexec_fn would fork this multithreaded process.
    code = ("import resource, runpy, sys\n"
            "limit = int(sys.argv.pop(1))\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))\n"
            "runpy.run_module('evit_deploy', run_name='__main__', alter_sys=True)\n")
    return subprocess.run([sys.executable, "-c", code, str(limit_bytes), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="session")
def m0_onnx(tmp_path_factory):
    """An fp32 ONNX export of synthetic-weight M0, shared by tests that only read it."""
    from evit_deploy import api

    out = tmp_path_factory.mktemp("m0-onnx")
    result = api.export("m0", "onnx", out_dir=out)
    assert result.report.passed
    return result.artifact.path


#: The input size of the export tests that lower a whole model (LiteRT, ExecuTorch).
SMALL = 64


@pytest.fixture(scope="session")
def realistic_m0(tmp_path_factory) -> Path:
    """A checkpoint of M0 at SMALL x SMALL with realistic weights: what a parity check must
    pass on when correct and fail on when damaged."""
    return save_checkpoint(tmp_path_factory.mktemp("realistic-m0") / "m0.pth", "m0", seed=1, recipe="realistic",
                           img_size=SMALL)


@pytest.fixture(scope="session")
def calibration_photos(tmp_path_factory) -> Path:
    """A directory of the bundled sample photos, for --calibration."""
    import shutil

    from evit_deploy.preprocess import sample_images

    folder = tmp_path_factory.mktemp("calibration")
    for photo in sample_images():
        shutil.copy(photo, folder / photo.name)
    return folder


def export_once(tmp_path_factory, model: str, target: str, **kwargs):
    """``api.export`` into a fresh directory: for module-scoped fixtures, so that each test
    file lowers a model once and its tests share the artifact."""
    from evit_deploy import api

    return api.export(model, target, out_dir=tmp_path_factory.mktemp(f"{target}-export"), **kwargs)


#: A patch convolution plus one EfficientViT attention (tests/custom_models.py): it has the
#: attention's products, and lowering it takes seconds where M0 takes a minute.
TINY_ATTENTION = "custom_models:tiny_attention"


#: Options a precision needs beyond itself, by target (Core ML's W8A8 needs iOS 17).
PRECISION_NEEDS = {("coreml", "int8"): {"minimum_deployment_target": "iOS17"}}


def tiny_options(target: str, precision: str, calibration: Path | None = None) -> dict:
    """The export options of TINY_ATTENTION in ``precision`` (int8: calibrated on ``calibration``)."""
    options = {"precision": precision, **PRECISION_NEEDS.get((target, precision), {})}
    if precision == "int8" and calibration is not None:
        options["calibration"] = str(calibration)
    return options


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory, calibration_photos):
    """``tiny_export(target, precision)``: the export of TINY_ATTENTION at SMALL x SMALL, made
    once per session and shared by the contract suite (tests/contract) and the target files.
    A precision this CPU cannot verify is skipped with the reason; a failed export fails
    every test that asks for it without being tried again."""
    from evit_deploy import api
    from evit_deploy.cpufeatures import judge
    from evit_deploy.errors import BadInputError
    from evit_deploy.plan import plan_export

    made: dict[tuple[str, str], object] = {}

    def get(target: str, precision: str):
        key = (target, precision)
        if key not in made:
            try:
                plan = plan_export(TINY_ATTENTION, target, options=tiny_options(target, precision, calibration_photos),
                                   input_size=(SMALL, SMALL))
                verdict = judge(plan.target.cpu_needs(plan.options))
                if not (verdict.runs and verdict.exact):
                    made[key] = pytest.skip.Exception(f"{target} {precision}: {verdict.summary()}")
                else:
                    made[key] = api.export_plan(plan, tmp_path_factory.mktemp(f"{target}-{precision}"))
            except BadInputError as exc:
                # bf16 needs the CPU's bf16 instructions: the targets refuse it at planning.
                made[key] = pytest.skip.Exception(f"{target} {precision}: {exc}") if precision == "bf16" else exc
            except Exception as exc:  # noqa: BLE001 - re-raised in every test that asks
                made[key] = exc
        if isinstance(made[key], BaseException):
            raise made[key]
        return made[key]
    return get


def reduced_precision_description(result, precision: str):
    """The description of an export in ``precision``, after checking that it passed parity
    in that class and really computes in reduced precision: its error is far above the
    noise of computing in fp32 (measured by the parity report itself)."""
    from evit_deploy import api

    report = result.report
    assert report.passed and report.precision == precision, report.summary()
    assert result.artifact.path.stem.endswith(f"_{precision}")
    noise = max(r["fp32_noise"] for o in report.outputs for r in o.per_input)
    assert report.outputs[0].max_rel > 20 * noise, (report.outputs[0].max_rel, noise)
    return api.inspect_artifact(result.artifact.path)[1]


def ctrl_c_as_runtime_error():
    """What TVM's runtime does with a Ctrl-C that reaches it: a RuntimeError of its own."""
    try:
        ctrl_c_here()
    except KeyboardInterrupt:
        raise RuntimeError("RuntimeError") from None


def ctrl_c_here():
    """A Ctrl-C whose KeyboardInterrupt is raised in the caller's frame. (With garbage
    collection on, Python may run the handler inside a gc callback, JAX's for one, which
    only reports it: a test would then see no exception, now and then.)"""
    import gc
    import os
    import signal

    enabled = gc.isenabled()
    gc.disable()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        sum(range(1000))                   # the handler runs here
    finally:
        if enabled:
            gc.enable()
