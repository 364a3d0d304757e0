"""Bad input, faults and interruptions, across the CLI: each gets a one-line error and a
documented exit code, no traceback, nothing half-written, and what existed survives."""

from __future__ import annotations

import errno
import hashlib
from pathlib import Path

import onnx
import pytest
from onnx import numpy_helper

from evit_deploy import api
from evit_deploy.errors import (EXIT_BAD_INPUT, EXIT_EXPORT_FAILED, EXIT_INTERRUPTED, EXIT_MISSING_DEPENDENCY,
                                EXIT_OUTPUT_ERROR, EXIT_PARITY_FAILED)
from evit_deploy.targets.onnx import OnnxTarget

from conftest import cli_with_file_size_limit, ctrl_c_here


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _one_line(err: str) -> bool:
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    return len(errors) == 1 and "Traceback" not in err


@pytest.mark.parametrize("args,message", [
    (["export", "m9", "-t", "onnx"], "unknown model 'm9'"),
    (["export", "m0", "-t", "onnxx"], "unknown target 'onnxx' (did you mean 'onnx'?)"),
    (["export", "m0", "-t", "onnx", "--opset", "99"], "unknown value for options: option 'opset' of target 'onnx'"),
    (["export", "m0", "-t", "onnx", "--fp61"], "unknown option for target 'onnx' '--fp61' (did you mean '--fp16'?)"),
    (["export", "m0", "-t", "onnx", "--img-size", "200"], "multiple of 16"),
    (["export", "m0", "--device", "iphone-x"], "unknown device"),
    (["export", "m0", "-t", "onnx", "--weights", "/nope.pth"], "checkpoint not found"),
    (["run", "/nope.onnx", "x.jpg"], "artifact not found"),
    (["info", "m7"], "did you mean"),
    (["bench", "m0", "/nope/pruned.pth", "-b", "onnxruntime"], "checkpoint not found: /nope/pruned.pth"),
])
def test_bad_input_is_one_line_and_exit_2(cli, tmp_path, args, message):
    code, _, err = cli(*args, "--out", tmp_path) if args[0] == "export" else cli(*args)
    assert code == EXIT_BAD_INPUT, err
    assert message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 3


def test_not_an_image(m0_onnx, tmp_path, cli):
    fake = tmp_path / "photo.jpg"
    fake.write_text("this is not a jpeg")
    code, _, err = cli("run", m0_onnx, fake)
    assert code == EXIT_BAD_INPUT and "is not a readable image" in err


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A valid PNG signature and header claiming width x height, with one tiny data chunk:
    a decompression bomb's shape without its gigabytes."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)       # 8-bit RGB
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0"))
                     + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("side", [30000, 12000])    # beyond twice Pillow's limit (it raises), within (it warns)
def test_an_image_beyond_the_decompression_bomb_limit_is_bad_input(m0_onnx, tmp_path, cli, side):
    from PIL import Image

    assert side * side > Image.MAX_IMAGE_PIXELS
    bomb = _png_header_only(tmp_path / "huge.png", side, side)
    code, _, err = cli("run", m0_onnx, bomb)
    assert code == EXIT_BAD_INPUT and _one_line(err)
    assert "decompression-bomb limit" in err and str(Image.MAX_IMAGE_PIXELS) in err


def test_debug_shows_the_traceback(cli):
    code, _, err = cli("--debug", "info", "m7")
    assert code == EXIT_BAD_INPUT and "Traceback" in err


def test_missing_dependency_names_the_pip_package(cli, tmp_path, monkeypatch):
    monkeypatch.setattr(OnnxTarget, "requires", {"onnx": "onnx", "no_such_module_xyz": "no-such-package"})
    code, _, err = cli("export", "m0", "-t", "onnx", "--out", tmp_path)
    assert code == EXIT_MISSING_DEPENDENCY and "pip install no-such-package" in err


def test_unwritable_output_location(cli, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = cli("export", "m0", "-t", "onnx", "--out", blocker / "sub")
    assert code == EXIT_OUTPUT_ERROR and "cannot write" in err


@pytest.mark.parametrize("place, reason", [
    ("under-a-file", "exists and is not a directory"),
    ("a-directory", "it is a directory"),
    ("proc", "nothing can be created there"),      # a pseudo file system: "no such file" on create
])
@pytest.mark.parametrize("command", ["bench --json", "bench --plot", "run --save-outputs", "prune --out"])
def test_an_output_file_that_cannot_be_written_is_refused_before_the_work(cli, tmp_path, monkeypatch, command,
                                                                           place, reason):
    import evit_deploy.bench
    import evit_deploy.pruning.run

    blocker = tmp_path / "file"
    blocker.write_text("x")
    path = {"under-a-file": blocker / "out.json", "a-directory": tmp_path,
            "proc": Path("/proc/evit-deploy-test/out.json")}[place]

    def work(*args, **kwargs):
        raise AssertionError("the work started")
    monkeypatch.setattr(evit_deploy.bench, "bench", work)
    monkeypatch.setattr(evit_deploy.pruning.run, "_load", work)
    name, flag = command.split()
    args = {"bench": ["bench", "m0", "--backends", "onnxruntime"], "run": ["run", "/nope.onnx", "x.jpg"],
            "prune": ["prune", "m0", "--weights", "w.pth", "--images", "photos", "--keep-macs", "0.7"]}[name]
    code, _, err = cli(*args, flag, path)
    assert code == EXIT_OUTPUT_ERROR and _one_line(err) and reason in err, err
    assert not blocker.with_name("out.json").exists() and blocker.read_text() == "x"


def test_parity_failure_leaves_no_valid_looking_artifact(cli, tmp_path, monkeypatch):
    real_export = OnnxTarget.export

    def broken_export(self, traced, options, path, reporter):
        artifact = real_export(self, traced, options, path, reporter)
        model = onnx.load(path)
        init = max(model.graph.initializer, key=lambda i: numpy_helper.to_array(i).size)
        arr = numpy_helper.to_array(init) * 1.5
        init.CopyFrom(numpy_helper.from_array(arr, init.name))
        onnx.save(model, path)
        return artifact

    monkeypatch.setattr(OnnxTarget, "export", broken_export)
    code, _, err = cli("export", "m0", "-t", "onnx", "--out", tmp_path)
    assert code == EXIT_PARITY_FAILED
    assert not (tmp_path / "efficientvit_m0.onnx").exists()
    rejected = tmp_path / "efficientvit_m0.onnx.rejected"
    assert (rejected / "efficientvit_m0.onnx").exists() and (rejected / "parity-report.json").exists()
    assert "kept for inspection" in err
    assert not list(tmp_path.glob(".evit-staging-*"))


def test_interrupted_export_keeps_the_previous_artifact(cli, tmp_path, m0_onnx, monkeypatch):
    final = tmp_path / "efficientvit_m0.onnx"
    final.write_bytes(Path(m0_onnx).read_bytes())
    before = _sha(final)

    def interrupted(self, traced, options, path, reporter):
        path.write_bytes(b"half an onnx file")
        raise KeyboardInterrupt

    monkeypatch.setattr(OnnxTarget, "export", interrupted)
    code, _, err = cli("export", "m0", "-t", "onnx", "--out", tmp_path)
    assert code == EXIT_INTERRUPTED and "interrupted" in err
    assert _sha(final) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["efficientvit_m0.onnx"]


@pytest.mark.parametrize("raised", [
    MemoryError("Unable to allocate 588. MiB for an array with shape (1024, 3, 224, 224) and data type float32"),
    RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code returned while running Conv "
                 "node. Failed to allocate memory for requested buffer of size 2466250752"),
    RuntimeError("Exception from src/inference/src/cpp/infer_request.cpp:223: std::bad_alloc"),
])
def test_running_out_of_memory_is_not_a_parity_failure(cli, tmp_path, monkeypatch, raised):
    """A batch too large for this machine says so (exit 2): the artifact is not rejected
    as if it computed something wrong."""
    def out_of_memory(self, path, x, description):
        raise raised

    monkeypatch.setattr(OnnxTarget, "run_batched", out_of_memory)
    code, _, err = cli("export", "m0", "-t", "onnx", "--img-size", "64", "--out", tmp_path)
    assert code == EXIT_BAD_INPUT and _one_line(err), err
    assert "this machine ran out of memory running efficientvit_m0.onnx (input 1x3x64x64)" in err
    assert "parity" not in err and not list(tmp_path.iterdir())


def test_running_out_of_memory_anywhere_is_a_one_line_error_not_a_bug(cli, tmp_path, monkeypatch):
    from evit_deploy import api

    def torch_out_of_memory(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 98304000000 bytes.")

    monkeypatch.setattr(api, "export_plan", torch_out_of_memory)
    code, _, err = cli("export", "m0", "-t", "onnx", "--img-size", "64", "--out", tmp_path)
    assert code == EXIT_BAD_INPUT and _one_line(err), err
    assert "this machine ran out of memory (DefaultCPUAllocator" in err and "internal error" not in err


def test_a_ctrl_c_while_an_artifact_is_published_leaves_no_mix_of_old_and_new_files(cli, tmp_path, monkeypatch):
    """An artifact of several files (OpenVINO's .xml and .bin, a TVM library and its
    description) is moved to its final names one file at a time: a Ctrl-C between two
    moves must not leave a new file beside an old one (a model nobody made)."""
    import dataclasses

    from evit_deploy import fsutil

    real_export, real_publish = OnnxTarget.export, fsutil.publish

    def with_a_sidecar(self, traced, options, path, reporter):
        artifact = real_export(self, traced, options, path, reporter)
        sidecar = path.with_name(path.name + ".sidecar")
        sidecar.write_bytes(path.read_bytes())         # stands for weights that go with this model only
        return dataclasses.replace(artifact, sidecars=(sidecar,))

    def ctrl_c_after_the_first(tmp, final):
        real_publish(tmp, final)
        ctrl_c_here()

    final = tmp_path / "efficientvit_m0.onnx"
    for f in (final, final.with_name(final.name + ".sidecar")):
        f.write_bytes(b"the previous build")
    monkeypatch.setattr(OnnxTarget, "export", with_a_sidecar)
    monkeypatch.setattr(fsutil, "publish", ctrl_c_after_the_first)
    code, _, err = cli("export", "m0", "-t", "onnx", "--img-size", "64", "--no-verify", "--out", tmp_path)
    assert code == EXIT_INTERRUPTED and "interrupted" in err, err
    sidecar = final.with_name(final.name + ".sidecar")
    assert final.read_bytes() == sidecar.read_bytes() != b"the previous build"


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")    # the swallowed Ctrl-C
def test_a_ctrl_c_that_a_finalizer_swallowed_still_stops_the_command(cli, tmp_path, monkeypatch):
    """Ctrl-C arriving while Python runs a weakref callback (a garbage collection inside
    a converter) raises KeyboardInterrupt there, where Python only reports it: the
    command must stop at its next stage all the same, not finish its work."""
    import gc
    import os
    import signal
    import weakref

    real_export = OnnxTarget.export

    def collected_during_a_ctrl_c(self, traced, options, path, reporter):
        class Garbage:
            pass
        garbage = Garbage()

        def pressed():
            # Without collections meanwhile: the handler would then run inside JAX's gc
            # callback, which reports it at the end of the run (conftest.ctrl_c_here).
            enabled = gc.isenabled()
            gc.disable()
            try:
                os.kill(os.getpid(), signal.SIGINT)
                sum(range(1000))           # Python runs the handler here, inside the callback
            finally:
                if enabled:
                    gc.enable()
        weakref.finalize(garbage, pressed)
        del garbage
        return real_export(self, traced, options, path, reporter)

    monkeypatch.setattr(OnnxTarget, "export", collected_during_a_ctrl_c)
    before = signal.getsignal(signal.SIGINT)
    code, _, err = cli("export", "m0", "-t", "onnx", "--img-size", "64", "--out", tmp_path)
    assert code == EXIT_INTERRUPTED and "interrupted" in err, err
    assert not list(tmp_path.iterdir())
    assert signal.getsignal(signal.SIGINT) is before      # the command's handler is gone


def test_checkpoint_of_the_wrong_model(cli, tmp_path, checkpoint):
    out = tmp_path / "out"
    code, _, err = cli("export", "m2", "-t", "onnx", "--out", out, "--weights", checkpoint("m4"))
    assert code == EXIT_BAD_INPUT and _one_line(err)
    assert "does not fit efficientvit_m2" in err and "looks like efficientvit_m4" in err
    assert not list(out.iterdir())


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_checkpoint(cli, tmp_path, checkpoint, damage):
    path = checkpoint("m0")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3] if damage == "truncate" else b"\x00garbage" * 100)
    code, _, err = cli("predict", "m0", "--weights", path, Path(__file__).parent.parent / "evit_deploy/data/images/cat.jpg")
    assert code == EXIT_BAD_INPUT and _one_line(err) and "checkpoint" in err


def test_full_disk_keeps_the_previous_artifact(cli, tmp_path, m0_onnx, monkeypatch):
    final = tmp_path / "efficientvit_m0.onnx"
    final.write_bytes(Path(m0_onnx).read_bytes())
    before = _sha(final)

    def disk_full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", disk_full)
    code, _, err = cli("export", "m0", "-t", "onnx", "--out", tmp_path)
    monkeypatch.undo()
    assert code == EXIT_OUTPUT_ERROR and _one_line(err) and "no space left on device" in err
    assert _sha(final) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["efficientvit_m0.onnx"]


@pytest.mark.parametrize("target", ["openvino", "tvm"])
def test_a_native_writer_failing_on_a_full_disk_is_an_output_error(tmp_path, target):
    # OpenVINO's serializer says "iostream error" and TVM's linker "Compilation error"
    # where Python says "no space left on device" (or, here, "file too large").
    pytest.importorskip(target)
    out = tmp_path / "out"
    done = cli_with_file_size_limit(["export", "m0", "-t", target, "--img-size", "64", "--out", out], 1 << 20)
    assert done.returncode == EXIT_OUTPUT_ERROR and _one_line(done.stderr), done.stderr
    assert "error: cannot write " in done.stderr and "ulimit -f" in done.stderr
    assert not list(out.iterdir())


def test_an_os_error_only_a_write_gives_is_an_output_error_wherever_it_comes_from(cli, tmp_path, monkeypatch):
    def quota(*args, **kwargs):
        raise OSError(errno.EDQUOT, "Disk quota exceeded", str(tmp_path / "scratch"))

    monkeypatch.setattr(api, "trace_plan", quota)        # not from one of the checked writes
    code, _, err = cli("export", "m0", "-t", "onnx", "--img-size", "64", "--out", tmp_path)
    assert code == EXIT_OUTPUT_ERROR and _one_line(err), err
    assert f"cannot write {tmp_path / 'scratch'}: disk quota exceeded" in err


def test_an_exception_without_a_message_is_still_a_one_line_error(cli, tmp_path, monkeypatch):
    import torch

    def fail(*args, **kwargs):
        raise RuntimeError()            # no message at all

    monkeypatch.setattr(torch.export, "export", fail)
    code, _, err = cli("export", "m0", "-t", "onnx", "--img-size", "64", "--out", tmp_path)
    assert code == EXIT_EXPORT_FAILED, err
    assert err.strip().splitlines()[-1] == "error: torch.export failed on efficientvit_m0: RuntimeError"
    assert "Traceback" not in err

