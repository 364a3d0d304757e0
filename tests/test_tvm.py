"""TVM target: tuning (interrupted, resumed, over RPC: marked ``tuning``), the database
contract, export with parity, and the example application running the library without
torch. What every target does (torch-free running, a library that claims other weights,
truncated files) is tests/contract/.

Small on purpose (M0 at 32x32, batch 2, a few dozen trials): these tests check behaviour,
not speed; the speed comparison is benchmarks/cpu_throughput.py. One real tune is
interrupted and resumed; the tests that only need a database use one made from fixed
records (tests/tvm_database.py: no timing, no signals).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import psutil
import pytest
from PIL import Image

from evit_deploy import api
from evit_deploy.errors import EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_OUTPUT_ERROR, BadInputError
from evit_deploy.preprocess import sample_images

pytest.importorskip("tvm")
pytest.importorskip("xgboost")

from evit_deploy.targets.tvm import TvmTarget  # noqa: E402
from evit_deploy.targets.tvm import database as tvmdb  # noqa: E402
from evit_deploy.targets.tvm.target_string import resolve_target  # noqa: E402
from evit_deploy.targets.tvm.tune import tune  # noqa: E402
from tvm_database import deterministic_database  # noqa: E402

from conftest import cli_with_file_size_limit  # noqa: E402

IMG, BATCH = 32, 2
TARGET = "native -num-cores=1"
SAMPLE = sample_images()


def _records(db: Path) -> int:
    path = db / tvmdb.RECORD_FILE
    return sum(1 for line in path.read_text().splitlines() if line.strip()) if path.exists() else 0


@pytest.fixture(scope="module")
def fixed_db(tmp_path_factory):
    """A database with one fixed record per kernel of M0 at BATCH x 3 x IMG x IMG."""
    return deterministic_database(tmp_path_factory.mktemp("tvm-fixed") / "db", "m0", batch=BATCH, img_size=IMG,
                                  target=TARGET)


@pytest.fixture(scope="module")
def tuned_db(tmp_path_factory):
    """A database made by a tune that was interrupted with Ctrl-C, then resumed.

    Returns (path, result of the resumed run, records before resuming, processes left
    behind by either run).
    """
    db = tmp_path_factory.mktemp("tvm-tuning") / "db"
    cmd = [sys.executable, "-m", "evit_deploy", "tune", "m0", "--tvm-target", TARGET, "--img-size", str(IMG),
           "--batch", str(BATCH), "--trials", "100000", "--db", str(db)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        # Interrupted once its first round is stored, however long a loaded machine takes
        # (the limit only guards against a hang).
        deadline = time.monotonic() + 900
        while _records(db) < 1 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
        assert proc.poll() is None, proc.stderr.read()
        assert _records(db) >= 1, "no tuning record within 15 minutes"
        os.killpg(proc.pid, signal.SIGINT)          # Ctrl-C reaches the whole process group
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == EXIT_INTERRUPTED, err
    assert "interrupted" in err and "run the same command to continue" in err and "Traceback" not in err
    left = {"interrupted command": _in_session(proc.pid)}
    before = _records(db)
    # (Helpers this test process had before, such as multiprocessing's resource tracker,
    # are not the tune's.)
    existing = {p.pid for p in psutil.Process().children(recursive=True)}
    result = tune("m0", TARGET, img_size=IMG, batch=BATCH, trials=24, db_dir=db)
    left["in-process tune"] = [p.cmdline() for p in psutil.Process().children(recursive=True)
                               if p.pid not in existing]
    return db, result, before, left


def _in_session(session: int) -> list:
    """Command lines of the processes still in a session (a command's workers, say)."""
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if os.getsid(p.pid) == session:
                found.append(p.info["cmdline"])
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return found


@pytest.mark.tuning
def test_tuning_leaves_no_process_behind(tuned_db):
    """Build and measurement workers end with the tune, interrupted or not."""
    *_, left = tuned_db
    assert left == {"interrupted command": [], "in-process tune": []}


@pytest.mark.tuning
def test_interrupted_tune_leaves_a_database_that_loads(tuned_db):
    db, _, before, _ = tuned_db
    meta = json.loads((db / tvmdb.META_FILE).read_text())
    entry = meta["models"][f"efficientvit_m0 {BATCH}x3x{IMG}x{IMG}"]
    first = entry["runs"][0]
    assert first["stopped"] == "interrupted" and first["trials"] >= before >= 1
    # What was there when Ctrl-C arrived loads as a MetaSchedule database.
    import tvm  # noqa: F401
    loaded = tvmdb.TuningDatabase.open(db).ms_database()
    assert len(loaded.get_all_tuning_records()) >= before


@pytest.mark.tuning
def test_resumed_tune_continues_from_the_database(tuned_db):
    db, result, before, _ = tuned_db
    # A loaded machine may time a candidate out: failed ones are counted, not stored.
    assert result.trials == 24 and result.stopped == "trials" and result.errors < result.trials
    assert _records(db) == before + 24 - result.errors
    entry = json.loads((db / tvmdb.META_FILE).read_text())["models"][f"efficientvit_m0 {BATCH}x3x{IMG}x{IMG}"]
    assert [r["stopped"] for r in entry["runs"]] == ["interrupted", "trials"]
    assert entry["trials"] == result.total_trials
    # The run records how its estimate went, round by round: later, more trials, never worse.
    assert entry["runs"][-1]["curve"] == result.curve
    for (t0, n0, ms0), (t1, n1, ms1) in zip(result.curve, result.curve[1:]):
        assert t0 <= t1 and n0 <= n1 and ms1 <= ms0
    if result.curve:
        assert result.curve[-1][2] == pytest.approx(result.estimated_latency_ms, rel=1e-3)
    log = result.log_path.read_text()
    assert log.count("candidate failed") == result.errors


@pytest.mark.tuning
def test_hand_written_kernels_are_measured_first_and_once(tuned_db):
    """The schedules/ variants go in before MetaSchedule's, and a resumed tune does not
    measure them again."""
    from collections import Counter

    import tvm_ffi

    from evit_deploy.targets.tvm import schedules

    db, result, _, _ = tuned_db
    records = tvmdb.TuningDatabase.open(db).ms_database().get_all_tuning_records()
    written = Counter((tvm_ffi.structural_hash(r.workload.mod), str(r.trace))
                      for r in records if schedules.is_hand_written(r.trace))
    assert written, "no hand-written kernel was measured"
    assert max(written.values()) == 1
    # The tune result says which kernels' best schedule is hand-written, as the database does.
    best = {}
    for r in records:
        key, mean = tvm_ffi.structural_hash(r.workload.mod), sum(map(float, r.run_secs)) / len(r.run_secs)
        if key not in best or mean < best[key][0]:
            best[key] = (mean, schedules.is_hand_written(r.trace))
    assert result.hand_written_kernels == sum(h for _, h in best.values())


@pytest.mark.tuning
def test_database_records_what_it_was_made_for(tuned_db):
    import tvm

    db, result, _, _ = tuned_db
    meta = json.loads((db / tvmdb.META_FILE).read_text())
    assert meta["target"] == resolve_target(TARGET) == result.target
    assert meta["versions"]["tvm"] == tvm.__version__
    entry = meta["models"][f"efficientvit_m0 {BATCH}x3x{IMG}x{IMG}"]
    assert entry["model"] == "efficientvit_m0" and entry["input_shape"] == [BATCH, 3, IMG, IMG]
    assert entry["kernels"] == result.kernels > 10
    assert entry["estimated_latency_ms"] is None or entry["estimated_latency_ms"] > 0


def _with_a_cut_short_record(db: Path, copy: Path) -> Path:
    """A copy of ``db`` whose last record a crash cut short."""
    shutil.copytree(db, copy)
    with (copy / tvmdb.RECORD_FILE).open("a") as f:
        f.write('[0, [[["b0", "SampleCat')        # a crash in the middle of a line
    return copy


@pytest.mark.tuning
def test_a_tune_stops_when_its_database_can_no_longer_be_written(tmp_path):
    # MetaSchedule's appends fail silently: without the check the run would go on for its
    # whole budget, keeping nothing.
    db = tmp_path / "db"
    done = cli_with_file_size_limit(["tune", "m0", "--tvm-target", TARGET, "--img-size", IMG, "--batch", BATCH,
                                     "--time-budget", "90s", "--db", db], 256 * 1024)
    assert done.returncode == EXIT_OUTPUT_ERROR, done.stderr
    assert f"error: cannot write {db}: larger than this process may write" in done.stderr
    assert "rounds before this one are kept" in done.stderr and "Traceback" not in done.stderr
    assert "Logging error" not in done.stderr
    kept = tvmdb.TuningDatabase.open(db)        # the line cut short is left out
    assert kept.record_count() >= 1 and kept.ms_database().get_all_tuning_records()


def _files(db: Path) -> dict:
    """Every file of a database directory: its bytes and modification time."""
    return {str(p.relative_to(db)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(db.rglob("*"))
            if p.is_file()}


@contextmanager
def _counting_opens():
    """The paths TuningDatabase.open reads, while in the block."""
    opened = []
    read = tvmdb.TuningDatabase.open.__func__

    def counting(cls, path):
        opened.append(Path(path))
        return read(cls, path)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tvmdb.TuningDatabase, "open", classmethod(counting))
        yield opened


def test_a_truncated_record_is_left_out_by_readers_and_dropped_by_tune(fixed_db, tmp_path):
    from evit_deploy.targets.tvm import graph

    lines = _records(fixed_db)
    copy = _with_a_cut_short_record(fixed_db, tmp_path / "db")
    before = _files(copy)
    opened = tvmdb.TuningDatabase.open(copy)             # read-only: export, tune --from
    assert opened.record_count() == lines
    assert len(opened.ms_database().get_all_tuning_records()) == lines
    assert _files(copy) == before
    # tune, about to append, drops the cut-short line from the file.
    tvmdb.TuningDatabase.open_or_create(copy, opened.target, graph=graph.VERSION)
    assert _records(copy) == lines and (copy / tvmdb.RECORD_FILE).read_text().endswith("\n")
    assert len(tvmdb.TuningDatabase.open(copy).ms_database().get_all_tuning_records()) == lines
    # Damage that is not a cut-off last line is reported, not silently dropped.
    text = (copy / tvmdb.RECORD_FILE).read_text().splitlines()
    text[0] = text[0][:20]
    (copy / tvmdb.RECORD_FILE).write_text("\n".join(text) + "\n")
    with pytest.raises(BadInputError, match="damaged at line 1"):
        tvmdb.TuningDatabase.open(copy)
    with pytest.raises(BadInputError, match="damaged at line 1"):
        tvmdb.TuningDatabase.open_or_create(copy, opened.target, graph=graph.VERSION)


def test_one_tune_at_a_time_writes_a_database(fixed_db, tmp_path):
    """Two tunes appending to one database at once (a CI matrix sharing it) would number
    kernels differently; the second is refused in one line, and may go once the first is
    done (or has died: the OS drops its lock)."""
    import shutil

    from evit_deploy.targets.tvm import graph

    copy = tmp_path / "db"
    shutil.copytree(fixed_db, copy)
    target = tvmdb.TuningDatabase.open(copy).target
    first = tvmdb.TuningDatabase.open_or_create(copy, target, graph=graph.VERSION)
    with pytest.raises(BadInputError, match="is being written by another `evit-deploy tune`"):
        tvmdb.TuningDatabase.open_or_create(copy, target, graph=graph.VERSION)
    assert len(tvmdb.TuningDatabase.open(copy).ms_database().get_all_tuning_records()) == _records(fixed_db)
    first.close()
    tvmdb.TuningDatabase.open_or_create(copy, target, graph=graph.VERSION).close()


def test_planning_an_export_reads_the_database_once_and_changes_nothing(fixed_db, tmp_path):
    """validate promises to change nothing; the plan asks for the database's target,
    batch and CPU needs: one read-only open, even of a database a crash left a cut-short
    line in."""
    from evit_deploy.api import cpu_needs
    from evit_deploy.plan import plan_export

    db = _with_a_cut_short_record(fixed_db, tmp_path / "db")
    before = _files(db)
    with _counting_opens() as opened:
        plan = plan_export("m0", "tvm", options={"db": str(db)}, img_size=IMG)
        cpu_needs(plan, verify=False)
        cpu_needs(plan, verify=False)
    assert plan.batch == BATCH and plan.target.resolved_target(plan.options) == resolve_target(TARGET)
    assert opened == [db]
    assert _files(db) == before


def test_a_database_is_never_applied_to_another_target(fixed_db, cli, tmp_path):
    db = fixed_db
    other = "llvm -mcpu=broadwell -num-cores=1"
    code, _, err = cli("export", "m0", "--target", "tvm", "--tvm-target", other, "--db", db,
                       "--img-size", IMG, "--batch", BATCH, "--out", tmp_path)
    assert code == EXIT_BAD_INPUT
    assert "was made for TVM target" in err and "--db-any-target" in err and "Traceback" not in err
    code, _, err = cli("tune", "m0", "--tvm-target", other, "--db", db, "--img-size", IMG, "--trials", 1)
    assert code == EXIT_BAD_INPUT and "was made for TVM target" in err


def test_export_with_a_database_builds_for_its_target_by_default(fixed_db):
    from evit_deploy.targets.tvm import TvmTarget

    db = fixed_db
    made_for = json.loads((db / tvmdb.META_FILE).read_text())["target"]
    assert TvmTarget().resolved_target(TvmTarget.Options(db=str(db))) == resolve_target(made_for)
    assert TvmTarget().resolved_target(TvmTarget.Options()) == resolve_target("native")
    # ... and at the batch it was tuned at: kernels of another batch have no record.
    assert TvmTarget().default_batch(TvmTarget.Options(db=str(db)), "efficientvit_m0")[0] == BATCH
    assert TvmTarget().default_batch(TvmTarget.Options(db=str(db)), "efficientvit_m4") is None
    assert TvmTarget().default_batch(TvmTarget.Options(), "efficientvit_m0") is None


def test_tuning_the_pooling_kernel_prints_no_tvm_warning(capfd):
    """TOPI marks its pooling block with a custom rule TVM registers for no CPU target;
    unhandled, MetaSchedule prints a C++ warning on the user's terminal."""
    from tvm.s_tir.meta_schedule import TuneContext

    from evit_deploy.targets.tvm import graph
    from evit_deploy.targets.tvm.metaschedule import extract_kernels, space_generator, without_tensor_intrinsics
    from evit_deploy.targets.tvm.target_string import to_tvm
    from evit_deploy.tracing import trace

    target = to_tvm(resolve_target(TARGET))
    mod = graph.prepare(graph.import_program(trace("m0", batch=1, img_size=IMG).program), target)
    pool = [t for t in extract_kernels(mod, target) if "pool" in t.name]
    assert pool, "the model's global average pool should be a kernel of its own"
    capfd.readouterr()
    with without_tensor_intrinsics():
        ctx = TuneContext(mod=pool[0].mod, target=target, space_generator=space_generator(),
                          task_name=pool[0].name)
        spaces = ctx.generate_design_space()
    assert len(spaces) == 1
    assert "Unknown schedule rule" not in capfd.readouterr().err


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
def test_the_first_convolution_reads_the_image_as_it_comes(layout):
    """NHWC kernels: no transpose kernel for the NCHW image, the stem's first
    convolution reads it (the library's parity, below, checks what it computes)."""
    from tvm import relax

    from evit_deploy.targets.tvm import graph
    from evit_deploy.targets.tvm.target_string import to_tvm
    from evit_deploy.tracing import trace

    mod = graph.prepare(graph.import_program(trace("m0", batch=1, img_size=IMG).program), to_tvm(resolve_target(TARGET)),
                        layout=layout)
    main = mod["main"]
    calls = [b.value for block in main.body.blocks for b in block.bindings if isinstance(b.value, relax.Call)]
    readers = [c.args[0].name_hint for c in calls if any(a.same_as(main.params[0]) for a in c.args[1].fields)]
    assert len(readers) == 1 and readers[0].startswith("fused_conv2d")
    assert ("nchw_input" in readers[0]) == (layout == "NHWC")


@pytest.fixture(scope="module")
def exported_from_a_database(fixed_db, tmp_path_factory):
    """The export of M0 from a copy of the fixed database that a crash left a cut-short
    line in: (result, database, its files before, the database reads during the export)."""
    db = _with_a_cut_short_record(fixed_db, tmp_path_factory.mktemp("tvm-db") / "db")
    out = tmp_path_factory.mktemp("tvm-export")
    before = _files(db)
    with _counting_opens() as opened:
        # No batch given: the export takes the one the database was tuned at.
        result = api.export("m0", "tvm", out_dir=out, img_size=IMG, options={"tvm_target": TARGET, "db": str(db)})
    return result, db, before, opened


@pytest.fixture(scope="module")
def tuned_library(exported_from_a_database):
    return exported_from_a_database[0]


def test_an_export_reads_its_database_once_and_changes_no_byte_of_it(exported_from_a_database):
    result, db, before, opened = exported_from_a_database
    assert opened == [db]
    assert _files(db) == before
    # The cut-short line is left out: one record per kernel.
    info = result.artifact.description.extra["tvm"]
    assert info["database"]["records"] == info["kernels"] == info["tuned_kernels"]


def _elf_section(data: bytes, wanted: bytes) -> tuple[int, int]:
    """(offset, size) of a section of a 64-bit little-endian ELF file."""
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    entry, count, names = struct.unpack_from("<HHH", data, 0x3A)

    def header(i):          # name, type, flags, address, offset, size
        return struct.unpack_from("<IIQQQQ", data, shoff + i * entry)

    table = header(names)[4]
    for i in range(count):
        name, *_, offset, size = header(i)
        if data[table + name:data.index(b"\0", table + name)] == wanted:
            return offset, size
    raise AssertionError(f"no {wanted} section")


def test_a_library_changed_since_export_is_refused_if_it_would_kill_the_process(tuned_library, tmp_path):
    # Its code overwritten by breakpoints: loaded in the command's own process, the first
    # kernel would end it (SIGTRAP). A change that leaves it working (bytes appended, as a
    # signing tool might) is not held against it: parity judges.
    lib = tuned_library.artifact.path
    for name, damage in (("trapped", "code"), ("appended", "tail")):
        copy = tmp_path / f"{name}.so"
        shutil.copy(lib.with_suffix(".tvm.json"), copy.with_suffix(".tvm.json"))
        data = bytearray(lib.read_bytes())
        if damage == "code":
            offset, size = _elf_section(bytes(data), b".text")
            data[offset:offset + size] = b"\xcc" * size
        else:
            data += bytes(4096)
        copy.write_bytes(bytes(data))
        done = subprocess.run([sys.executable, "-m", "evit_deploy", "-q", "verify", str(copy)], capture_output=True,
                              text=True, timeout=600)
        if damage == "code":
            assert done.returncode == EXIT_BAD_INPUT, done.stderr
            assert done.stderr.strip().splitlines()[-1] == (
                f"error: {copy} was changed since it was exported (its SHA-256 is not the one in "
                f"{name}.tvm.json) and kills the process that runs it (SIGTRAP): export it again")
        else:
            assert done.returncode == 0, done.stderr


def test_only_bf16_libraries_need_amx():
    """AMX instructions come only from the bf16 schedules: an fp32 library for an AMX CPU
    runs on CPUs of its kind without AMX (and is not refused there)."""

    sapphire_rapids = TvmTarget.Options(tvm_target="llvm -mcpu=sapphirerapids -num-cores=1")
    bf16_options = TvmTarget.Options(**{**vars(sapphire_rapids), "precision": "bf16"})
    fp32, bf16 = (set(TvmTarget().cpu_needs(o).isa) for o in (sapphire_rapids, bf16_options))
    assert {"avx512f", "avx512_bf16"} <= fp32 and not {"amx_tile", "amx_bf16"} & fp32
    assert {"amx_tile", "amx_bf16"} <= bf16


def test_a_library_using_amx_is_refused_where_linux_does_not_allow_it(tuned_library, tmp_path, monkeypatch):
    """A process may be denied AMX (a seccomp filter, say): its first tile instruction
    would then end it (SIGILL). Faked here, on any CPU: the library's description says it
    uses AMX, this CPU is played with AMX, and Linux's answer is a refusal."""
    from evit_deploy import cpufeatures
    from evit_deploy.cpufeatures import FLAGS_ENV, cpu_flags

    lib = tmp_path / "amx.so"
    shutil.copy(tuned_library.artifact.path, lib)
    described = json.loads(tuned_library.artifact.path.with_suffix(".tvm.json").read_text())
    described["extra"]["cpu"]["isa"].append("amx_tile")
    lib.with_suffix(".tvm.json").write_text(json.dumps(described))
    monkeypatch.setenv(FLAGS_ENV, " ".join(sorted(cpu_flags() | {"amx_tile"})))
    monkeypatch.setattr(cpufeatures, "amx_permission_error", lambda: "Operation not permitted")
    with pytest.raises(BadInputError, match="computes with AMX tiles, which this process may not use"):
        api.run(lib, [sample_images()[0]])
    monkeypatch.setattr(cpufeatures, "amx_permission_error", lambda: None)
    assert api.run(lib, [sample_images()[0]]).predictions


def test_export_applies_the_database_and_passes_parity(tuned_library):
    result = tuned_library
    lib = result.artifact.path
    assert lib.name == "efficientvit_m0.so" and lib.is_file()
    side = lib.with_name("efficientvit_m0.tvm.json")
    assert result.artifact.sidecars == (side,) and side.is_file()
    report = result.report
    assert report.passed and report.precision == "fp32"
    assert report.outputs[0].max_rel <= 1e-4
    info = json.loads(side.read_text())["extra"]["tvm"]
    assert info["target"] == resolve_target(TARGET) and info["threads"] == 1
    assert json.loads(side.read_text())["inputs"][0]["shape"][0] == BATCH
    # Every kernel has its record in the database; the GEMM-shaped ones are hand-written.
    assert 0 < info["hand_written_kernels"] < info["tuned_kernels"] == info["kernels"]
    assert info["database"]["records"] == info["kernels"]
    assert TvmTarget().health(lib, result.artifact.description) == []


def test_a_loaded_library_is_reused_until_either_of_its_files_changes(tuned_library, tmp_path):
    from evit_deploy.targets.tvm.runtime import sidecar_path

    sessions = TvmTarget().sessions()

    lib = tmp_path / tuned_library.artifact.path.name
    for f in TvmTarget().artifact_files(tuned_library.artifact.path):
        shutil.copy(f, tmp_path / f.name)
    assert TvmTarget().artifact_files(lib) == (sidecar_path(lib), lib)
    first = sessions.cached(lib)
    assert sessions.cached(lib) is first
    side = sidecar_path(lib)
    os.utime(side, ns=(side.stat().st_atime_ns, side.stat().st_mtime_ns + 10**9))    # the description rewritten
    assert sessions.cached(lib) is not first


def test_a_library_with_another_librarys_description_fails_to_run_in_one_line(tuned_library, tmp_path, cli):
    """The two files of an export come apart and are paired wrongly (here: a description
    that says another input size): the runtime's refusal is the artifact's fault, not a bug."""
    for f in TvmTarget().artifact_files(tuned_library.artifact.path):
        shutil.copy(f, tmp_path / f.name)
    side = tmp_path / "efficientvit_m0.tvm.json"
    description = json.loads(side.read_text())
    size = description["inputs"][0]["shape"][-1] + 16
    description["inputs"][0]["shape"][-2:] = [size, size]
    description["preprocessing"].update(height=size, width=size)
    description["model_options"]["img_size"] = size
    side.write_text(json.dumps(description))
    image = tmp_path / "grey.png"
    Image.new("RGB", (40, 40), (128, 128, 128)).save(image)
    code, _, err = cli("run", tmp_path / "efficientvit_m0.so", image)
    assert code == 2 and "failed to run" in err and "internal error" not in err, err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [err.strip().splitlines()[-1]]


def test_profile_times_every_kernel_call(tuned_library):
    lib = tuned_library.artifact.path
    description = tuned_library.artifact.description
    x = np.random.default_rng(0).random(description.input.shape, dtype=np.float32)
    ops = TvmTarget().profile_ops(lib, {description.input.name: x}, threads=1, iterations=2, blocks={})
    names = [op.name for op in ops]
    assert ops and len(names) % 2 == 0 and names[:len(names) // 2] == names[len(names) // 2:]   # two runs
    assert all(op.seconds > 0 and op.block is None for op in ops)
    assert any(name.startswith("fused_conv2d") for name in names)
    assert not any(name.startswith("vm.builtin.") for name in names)


def test_library_reads_the_callers_array_in_place(tuned_library):
    """numpy's arrays are rarely 64-byte aligned (TVM's assumption): the library reads
    them where they are, at any float offset, and computes what an aligned copy gives."""
    import tvm

    from evit_deploy.targets.tvm.runtime import load

    model = load(tuned_library.artifact.path)
    assert model.inputs_in_place
    size = int(np.prod(model.input_shape))
    raw = np.random.default_rng(0).random(size + 16, dtype=np.float32)
    expected = model.run_device(tvm.runtime.tensor(raw[:size].reshape(model.input_shape)))[0].numpy()
    buf = np.empty(size + 16, np.float32)
    for offset in (0, 1, 4, 13):                 # in floats: 4-byte steps off the buffer's alignment
        x = buf[offset:offset + size].reshape(model.input_shape)
        x[...] = raw[:size].reshape(model.input_shape)
        device = model.to_device(x)
        assert np.from_dlpack(device).ctypes.data == x.ctypes.data        # no copy
        np.testing.assert_array_equal(model.run_device(device)[0].numpy(), expected)


def test_inputs_are_read_in_place_only_when_every_use_is_a_kernel_argument():
    import tvm
    from tvm import relax, topi

    from evit_deploy.targets.tvm.compile import read_inputs_in_place

    def module(view_first: bool):
        bb = relax.BlockBuilder()
        x = relax.Var("x", relax.TensorType((2, 3, 8, 8), "float32"))
        with bb.function("main", [x]):
            with bb.dataflow():
                y = bb.emit(relax.op.reshape(x, (2, 3, 4, 16))) if view_first else x
                out = bb.emit_output(bb.emit_te(topi.transpose, y, [0, 2, 3, 1]))
            bb.emit_func_output(out)
        return bb.get()

    def alignment(mod):
        kernel = next(gv for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc))
        return int(mod[kernel].params[0].ty.data_alignment)

    rewritten, in_place = read_inputs_in_place(module(view_first=False))
    assert in_place and alignment(rewritten) == 4
    untouched, in_place = read_inputs_in_place(module(view_first=True))
    assert not in_place and alignment(untouched) == 64


def test_example_application_loads_the_library_directly(tuned_library):
    from test_examples import classify_without_torch

    images = SAMPLE[:3]                      # 3 photos through a batch-2 library
    results = classify_without_torch(tuned_library.artifact.path, images)
    expected = api.predict("m0", images, img_size=IMG)
    assert [r["top"][0]["label"] for r in results] == [p.top[0][1] for p in expected]


def test_without_a_database_every_kernel_gets_its_default_schedule(tmp_path):
    from evit_deploy.progress import QuietReporter

    class Notes(QuietReporter):
        def info(self, message):
            self.warnings.append(message)

    reporter = Notes()
    result = api.export("m0", "tvm", out_dir=tmp_path, img_size=IMG, batch=BATCH,
                        options={"tvm_target": TARGET}, reporter=reporter)
    assert result.report.passed
    # The target says what it did through the reporter: defaults, not "untuned and slow".
    assert any("default schedule" in w for w in reporter.warnings)
    assert not any("slow" in w for w in reporter.warnings)
    info = json.loads(result.artifact.sidecars[0].read_text())["extra"]["tvm"]
    assert info["tuned_kernels"] == 0 and info["database"] is None
    assert info["default_kernels"] == info["kernels"] and info["unscheduled_kernels"] == 0
    assert TvmTarget().health(result.artifact.path, result.artifact.description) == []
    # A library where some kernel kept TVM's own code would say so.
    unscheduled = result.artifact.description.with_extra(tvm={**info, "default_kernels": info["kernels"] - 3,
                                                                "unscheduled_kernels": 3})
    health = TvmTarget().health(result.artifact.path, unscheduled)
    assert [f.level for f in health] == ["warning"] and f"3 of {info['kernels']}" in health[0].message


def test_a_build_file_takes_the_batch_the_database_was_tuned_at(tmp_path):
    """A build file naming a database tuned at batch 4 builds the library at batch 4 with
    every kernel scheduled from it, as `export --db` does (it used to build at batch 1,
    where no kernel has a record)."""
    from evit_deploy.build import Status, build

    deterministic_database(tmp_path / "db4", "m0", batch=4, img_size=IMG, target=TARGET)
    (tmp_path / "evit-deploy.toml").write_text(
        f'[models.m0]\nimg_size = {IMG}\n\n[[artifact]]\ntarget = "tvm"\n[artifact.options]\ndb = "db4"\n')
    result = build(tmp_path / "evit-deploy.toml", out=tmp_path / "dist")
    record = result.records[0]
    assert record.status is Status.BUILT, record.error
    assert record.batch == 4
    side = next(f for f in record.files if f["path"].endswith(".tvm.json"))
    description = json.loads((tmp_path / "dist" / side["path"]).read_text())
    info = description["extra"]["tvm"]
    assert description["inputs"][0]["shape"][0] == 4 and info["tuned_kernels"] == info["kernels"]


# -- RPC -------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(predicate, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.tuning
def test_rpc_tuning_measures_on_every_registered_device(tmp_path):
    from evit_deploy.targets.tvm.measure import RpcSpec, free_devices

    port = _free_port()
    key = "evit-test"
    procs, logs = [], []
    try:
        procs.append(subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", "127.0.0.1",
                                       "--port", str(port), "--port-end", str(port + 1), "--silent"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        spec = RpcSpec("127.0.0.1", port, key)
        _wait_for(lambda: _tracker_up(spec), 60, "the tracker")
        for i in range(2):
            log = tmp_path / f"server{i}.log"
            logs.append(log)
            sport = _free_port()
            procs.append(subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_server", "--tracker",
                                           f"127.0.0.1:{port}", "--key", key, "--host", "127.0.0.1",
                                           "--port", str(sport), "--port-end", str(sport + 1)],
                                          stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True))
        _wait_for(lambda: free_devices(spec) == 2, 90, "two servers to register")
        result = tune("m0", TARGET, img_size=IMG, batch=BATCH, trials=16, db_dir=tmp_path / "db",
                      rpc_tracker=f"127.0.0.1:{port}", rpc_key=key)
        assert result.trials == 16 and result.errors < result.trials
        assert result.measured_on.startswith("2 device(s)")
        assert _records(tmp_path / "db") == 16 - result.errors
        # Both devices measured candidates.
        served = [log.read_text().count("load_module") for log in logs]
        assert all(n > 0 for n in served), served
    finally:
        # A server runs each session in a worker process of its own: end the whole group,
        # or the workers outlive the test.
        for p in procs:
            _signal_group(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                _signal_group(p.pid, signal.SIGKILL)
        _wait_for(lambda: not any(_in_session(p.pid) for p in procs), 20, "the RPC processes to end")


def _signal_group(pgid: int, sig) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _tracker_up(spec) -> bool:
    from evit_deploy.targets.tvm.measure import free_devices
    try:
        free_devices(spec, timeout_s=2)
        return True
    except BadInputError:
        return False


def test_rpc_and_budget_errors_are_one_line(cli, tmp_path):
    code, _, err = cli("tune", "m0", "--rpc-key", "k")
    assert code == EXIT_BAD_INPUT and "--rpc-key needs --rpc-tracker" in err
    code, _, err = cli("tune", "m0", "--rpc-tracker", "localhost", "--rpc-key", "k")
    assert code == EXIT_BAD_INPUT and "HOST:PORT" in err
    code, _, err = cli("tune", "m0", "--time-budget", "ten minutes")
    assert code == EXIT_BAD_INPUT and "time budget" in err
    port = _free_port()     # nothing listens there
    code, _, err = cli("tune", "m0", "--tvm-target", TARGET, "--img-size", IMG, "--trials", 1,
                       "--rpc-tracker", f"127.0.0.1:{port}", "--rpc-key", "k", "--db", tmp_path / "db")
    assert code == EXIT_BAD_INPUT and "cannot reach the RPC tracker" in err
    assert not (tmp_path / "db").exists()


def test_profile_targets_the_papers_xeon():
    from evit_deploy.devices import load_device

    profile = load_device("xeon-e5-2690v4")
    assert profile.target == "tvm"
    target = resolve_target(profile.options["tvm_target"])
    assert target["mcpu"] == "broadwell" and target["num-cores"] == 14 == profile.device["cores"]
    assert set(profile.paper["throughput_tvm_ips"]) == {f"m{i}" for i in range(6)}


# -- databases that travel ----------------------------------------------------------------------

def _as_if_measured_on(db_path: Path, cpu: str) -> None:
    meta = json.loads((db_path / tvmdb.META_FILE).read_text())
    for entry in meta["models"].values():
        entry.setdefault("runs", []).append({"stopped": "trials", "cpu": {"model": cpu}})
    (db_path / tvmdb.META_FILE).write_text(json.dumps(meta))


def test_a_database_measured_on_another_cpu_is_checked_here(fixed_db, tmp_path):
    """Its records are timed against the defaults on this machine and only the faster one
    of each kernel is built in: the database can only make the library faster."""
    db = tmp_path / "db"
    shutil.copytree(fixed_db, db)
    # A few kernels' records are enough (and each one checked is two builds).
    lines = (db / tvmdb.RECORD_FILE).read_text().splitlines()
    (db / tvmdb.RECORD_FILE).write_text("\n".join(lines[:8]) + "\n")
    _as_if_measured_on(db, "Intel(R) Xeon(R) Somewhere Else")
    assert tvmdb.TuningDatabase.open(db).measured_on_cpus() == {"Intel(R) Xeon(R) Somewhere Else"}
    result = api.export("m0", "tvm", out_dir=tmp_path / "out", img_size=IMG,
                        options={"tvm_target": TARGET, "db": str(db)})
    assert result.report.passed
    info = json.loads(result.artifact.sidecars[0].read_text())["extra"]["tvm"]
    checked = info["database"]["rechecked_here"]
    assert checked["kernels"] == 8 and checked["records_failed"] == 0
    assert 0 <= checked["records_kept"] <= 8
    # The 8 checked kernels come from the checked database, the others are defaults.
    assert info["tuned_kernels"] == 8 and info["default_kernels"] == info["kernels"] - 8


@pytest.mark.tuning
def test_tuning_can_start_from_another_database(fixed_db, tmp_path):
    """With --from, each kernel's best schedule in the other database is measured beside
    its default in the first rounds (and stored, with what it measured here)."""
    from evit_deploy.targets.tvm import schedules

    result = tune("m0", TARGET, img_size=IMG, batch=BATCH, trials=16, db_dir=tmp_path / "db", start_from=fixed_db)
    assert result.trials == 16 and result.errors < result.trials
    records = tvmdb.TuningDatabase.open(tmp_path / "db").ms_database().get_all_tuning_records()
    assert len(records) == 16 - result.errors
    # The fixed database's records of non-convolution kernels are searched schedules (not
    # one of schedules/): those found here came from it.
    assert any(not schedules.is_hand_written(r.trace) for r in records)
    assert any(schedules.is_hand_written(r.trace) for r in records)
    # Its dense convolutions' records are this CPU's defaults: each is measured once, not
    # once as the default and again as the other database's best.
    import tvm_ffi
    from collections import Counter

    measured = Counter((tvm_ffi.structural_hash(r.workload.mod), str(r.trace)) for r in records)
    assert max(measured.values()) == 1, measured.most_common(1)
    meta = json.loads((tmp_path / "db" / tvmdb.META_FILE).read_text())
    run = meta["models"][f"efficientvit_m0 {BATCH}x3x{IMG}x{IMG}"]["runs"][-1]
    assert run["cpu"]["model"] and run["measured_on"] == "this machine"


def test_a_bf16_library_passes_its_parity_class(tmp_path):
    from evit_deploy.targets.tvm.quantize import supports_bf16
    from evit_deploy.targets.tvm.target_string import to_tvm

    if not supports_bf16(to_tvm(resolve_target(TARGET))):
        pytest.skip("this CPU has no AVX512_BF16")
    result = api.export("m0", "tvm", out_dir=tmp_path, img_size=IMG, batch=BATCH,
                        options={"tvm_target": TARGET, "precision": "bf16"})
    report = result.report
    assert result.artifact.path.name == "efficientvit_m0_bf16.so"
    assert report.passed and report.precision == "bf16", report.summary()
    assert 1e-4 < report.outputs[0].max_rel < 0.05          # really rounded, and only that much
    info = json.loads(result.artifact.sidecars[0].read_text())["extra"]["tvm"]
    assert info["schedule_classes"]["gemm_bf16"] > 0 and info["unscheduled_kernels"] == 0


@pytest.mark.parametrize("value", ["abc", "0", "-2", "1.5"])
def test_a_bad_tvm_num_threads_is_a_one_line_error(cli, tuned_library, monkeypatch, value):
    monkeypatch.setenv("TVM_NUM_THREADS", value)
    code, _, err = cli("verify", tuned_library.artifact.path)
    assert code == EXIT_BAD_INPUT and err.strip().splitlines()[-1] == (
        f"error: TVM_NUM_THREADS must be a whole number of threads, at least 1; got '{value}'"), err
