"""``optimize``: candidates, refusals and drops with their reasons, the winner, reuse, the
time budget, and the choice rebuilt by ``build`` (``from = "optimize.json"``).

Tiny model and short timings: what optimize chooses for M0-M5 is the benchmark's business.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import SMALL, TINY_ATTENTION, ctrl_c_as_runtime_error
from evit_deploy.errors import BadInputError
from optimize_targets import TEST_TARGETS

FAST = {"input_size": (SMALL, SMALL), "rounds": 2, "round_seconds": 0.2, "memory": False}


@pytest.fixture
def with_test_targets(monkeypatch):
    import evit_deploy.targets as registry

    real = registry.available_targets
    monkeypatch.setattr(registry, "available_targets", lambda: {**real(), **TEST_TARGETS})


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Smooth random photos: enough that a top-1 flip shows in the agreement."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("optimize-photos")
    rng = np.random.default_rng(0)
    for i in range(24):
        small = rng.uniform(0, 255, (8, 8, 3)).astype(np.uint8)
        Image.fromarray(small).resize((96, 96), Image.BILINEAR).save(folder / f"noise{i:02d}.png")
    return folder


def test_damaged_and_slow_candidates_are_never_chosen_and_say_why(with_test_targets, photos, tmp_path):
    from evit_deploy import optimize
    from evit_deploy.optimizer import Outcome

    result = optimize(TINY_ATTENTION, tmp_path / "out", images=photos, batch=4,
                      targets=["onnx", *TEST_TARGETS], precisions=["fp32", "int8"], **FAST)
    by = {c.backend: c for c in result.candidates}
    assert by["wrong-scale-ort"].outcome is Outcome.DROPPED
    assert by["wrong-scale-ort"].reason.startswith("parity FAILED"), by["wrong-scale-ort"].reason
    assert by["wrong-scale-ort"].parity["passed"] is False
    swapped = by["swapped-top-ort:int8"]
    assert swapped.parity["passed"] and swapped.parity["precision"] == "int8"
    assert swapped.outcome is Outcome.DROPPED and "top-1 agreement 0.0000" in swapped.reason, swapped.reason
    assert swapped.images_per_s is not None          # timed all the same: the report shows what the budget cost
    slow = by["slow-ort"]
    assert slow.parity["passed"] and slow.eval["top1_agreement"] == 1.0
    assert slow.outcome in (Outcome.RUNNER_UP, Outcome.ADMISSIBLE) and "× the winner's throughput" in slow.reason
    winner = result.candidate(result.winner)
    assert result.winner not in ("wrong-scale-ort", "swapped-top-ort:int8", "slow-ort")
    assert winner.outcome is Outcome.CHOSEN
    assert winner.ratio_to_baseline == max(c.ratio_to_baseline for c in result.candidates
                                           if c.outcome in (Outcome.CHOSEN, Outcome.RUNNER_UP, Outcome.ADMISSIBLE))
    # What it wrote: the winner with its description, optimize.json, the chart.
    out = tmp_path / "out"
    saved = json.loads((out / "optimize.json").read_text())
    assert saved["winner"] == result.winner and saved["machine"]["cpu"]["features"]
    assert {c["backend"]: c["outcome"] for c in saved["candidates"]}["wrong-scale-ort"] == "dropped"
    from evit_deploy import api
    assert api.inspect_artifact(result.artifact)[1].extra["target"] == winner.target
    assert (out / "optimize.png").stat().st_size > 10_000
    assert not list(out.glob(".evit-staging*")) and not list(out.glob("*.tmp*"))


def test_refusals_are_listed_with_their_reason(monkeypatch, tmp_path):
    from evit_deploy import optimize
    from evit_deploy.cpufeatures import host_features
    from evit_deploy.optimizer import Outcome

    # This host without BF16 and VNNI: bf16 is refused (it could not be verified exactly here).
    plain = host_features() - {"avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8", "amx_tile"}
    monkeypatch.setenv("EVIT_DEPLOY_CPU_FLAGS", " ".join(sorted(plain)))
    result = optimize(TINY_ATTENTION, tmp_path / "out", batch=2, targets=["onnx", "openvino", "tvm", "coreml"],
                      precisions=["fp32", "fp16", "bf16"], time_budget=0.001, **FAST)
    by = {c.backend: c for c in result.candidates}
    bf16 = [c for c in result.candidates if c.precision == "bf16"]
    assert bf16 and all(c.outcome is Outcome.REFUSED and "bf16" in c.reason.lower() for c in bf16), bf16
    assert by["coreml"].outcome is Outcome.REFUSED and "no runtime" in by["coreml"].reason
    # A budget of a millisecond (a second was enough for the next candidate on a fast CPU):
    # only the baseline is tried, the rest listed as not tried.
    assert by["onnxruntime:fp16"].outcome is Outcome.NOT_TRIED and "time budget" in by["onnxruntime:fp16"].reason
    assert result.winner == "onnxruntime"


def test_a_rerun_reuses_exports_and_evaluations(tmp_path):
    from evit_deploy import optimize

    first = optimize(TINY_ATTENTION, tmp_path / "out", batch=2, targets=["onnx"], precisions=["fp32", "fp16"], **FAST)
    assert not any(c.reused for c in first.candidates)
    evals = sorted((tmp_path / "out").rglob("eval-*.json"))
    stamps = [p.stat().st_mtime_ns for p in evals]
    second = optimize(TINY_ATTENTION, tmp_path / "out", batch=2, targets=["onnx"], precisions=["fp32", "fp16"],
                      **FAST)
    assert all(c.reused for c in second.candidates if c.artifact)
    assert [p.stat().st_mtime_ns for p in evals] == stamps
    assert {c.backend: c.eval for c in second.candidates} == {c.backend: c.eval for c in first.candidates}
    # A damaged cached export is made again, not trusted.
    exported = next(c for c in second.candidates if c.backend == "onnxruntime:fp16")
    with open(exported.artifact, "r+b") as f:
        f.seek(-64, 2)
        f.write(b"\0" * 64)
    third = optimize(TINY_ATTENTION, tmp_path / "out", batch=2, targets=["onnx"], precisions=["fp32", "fp16"], **FAST)
    assert not third.candidate("onnxruntime:fp16").reused and third.candidate("onnxruntime").reused


@pytest.mark.parametrize("kwargs, message", [
    ({"min_top1_agreement": 0.99, "max_top1_drop": 0.01}, "not both"),
    ({"min_top1_agreement": 1.5}, "between 0 and 1"),
    ({"max_top1_drop": 0.01}, "needs labelled images"),
    ({"objective": "fastest"}, "throughput or latency"),
    ({"targets": ["onnx", "nope"]}, "nope"),
    ({"precisions": ["fp32", "int4"]}, "int4"),
    ({"batch": 0}, "at least 1"),
    ({"time_budget": "soon"}, "soon"),
])
def test_bad_settings_are_refused_before_any_work(kwargs, message, tmp_path):
    from evit_deploy import optimize

    with pytest.raises(BadInputError, match=message):
        optimize(TINY_ATTENTION, tmp_path / "out", **{**FAST, **kwargs})
    assert not (tmp_path / "out" / "optimize.json").exists()


def test_the_choice_is_rebuilt_by_a_build_file(tmp_path):
    from evit_deploy import optimize
    from evit_deploy.build import Status, build

    settings = {**FAST, "input_size": None, "img_size": SMALL}
    result = optimize("m0", tmp_path / "chosen", batch=2, targets=["onnx"], precisions=["fp32"], **settings)
    (tmp_path / "evit-deploy.toml").write_text(f'[models.m0]\nimg_size = {SMALL}\n\n'
                                               '[[artifact]]\nfrom = "chosen/optimize.json"\n')
    built = build(tmp_path / "evit-deploy.toml", out=tmp_path / "dist")
    (record,) = built.records
    assert record.status is Status.BUILT and record.target == result.build_entry["target"] == "onnx"
    assert record.batch == 2 and record.options["precision"] == "fp32"
    assert record.chosen_by["winner"] == result.winner and len(record.chosen_by["sha256"]) == 64
    manifest = json.loads(built.manifest.read_text())
    assert manifest["artifacts"][0]["chosen_by"]["file"].endswith("optimize.json")
    # The same bytes as the winner optimize wrote (ONNX export is reproducible).
    from evit_deploy.fsutil import sha256_file
    assert sha256_file(tmp_path / "dist" / record.path) == sha256_file(result.artifact)


def test_a_build_entry_from_optimize_takes_nothing_else(tmp_path):
    from evit_deploy.build import load_build_file

    (tmp_path / "optimize.json").write_text(json.dumps({"model": "efficientvit_m0", "winner": None,
                                                        "build_entry": None}))
    (tmp_path / "b.toml").write_text('[models.m1]\n\n[[artifact]]\nfrom = "optimize.json"\ntarget = "onnx"\n'
                                     '\n[[artifact]]\nfrom = "missing.json"\n')
    with pytest.raises(BadInputError) as found:
        load_build_file(tmp_path / "b.toml")
    message = str(found.value)
    assert "b.toml:5: [[artifact]] #1: 'target' comes from optimize.json" in message
    assert "records no winner" in message and "missing.json not found" in message


def test_tune_adds_a_tuned_variant_with_its_share_of_the_budget(monkeypatch, with_test_targets, tmp_path):
    from evit_deploy import optimize
    from optimize_targets import SlowOnnx

    asked = []

    def tuned_options(self, model, options, *, seconds, workdir, **settings):
        asked.append((model, seconds, workdir))
        return {"opset": 19}                     # what tuning found: another export of the same model

    monkeypatch.setattr(SlowOnnx, "tuned_options", tuned_options)      # which makes it a target that tunes
    result = optimize(TINY_ATTENTION, tmp_path / "out", batch=2, targets=["slow"], tune=True, time_budget="10m",
                      **FAST)
    tuned = result.candidate("slow-ort@tuned")
    assert tuned.options == {"precision": "fp32", "opset": 19} and tuned.parity["passed"] and tuned.images_per_s
    ((model, seconds, workdir),) = asked
    assert seconds == pytest.approx(0.4 * 600) and workdir.is_relative_to(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "optimize.json").read_text())["winner"] == "onnxruntime"


def test_the_command_shows_a_table_writes_json_and_refuses_bad_input_in_one_line(cli, tmp_path):
    code, out, err = cli("optimize", TINY_ATTENTION, "--input-size", SMALL, "--batch", 2, "--targets", "onnx",
                         "--precisions", "fp32", "--rounds", 1, "--out", tmp_path / "out", "--json",
                         tmp_path / "o.json")
    assert code == 0, err
    assert "chosen" in out and "onnxruntime" in out and 'from = "optimize.json"' in out
    assert json.loads((tmp_path / "o.json").read_text())["winner"] == "onnxruntime"
    for bad, message in ((["--max-top1-drop", "0.5"], "needs labelled images"), ([], "needs --input-size")):
        code, out, err = cli("optimize", TINY_ATTENTION, "--out", tmp_path / "bad", *bad)
        assert code == 2 and message in err and "Traceback" not in err, err
        assert [line for line in err.splitlines() if line.startswith("error:")] == [err.splitlines()[-1]], err


def test_a_ctrl_c_during_an_export_is_not_remembered_as_a_failed_candidate(cli, tmp_path, monkeypatch):
    """A Ctrl-C that a converter turns into an error of its own stops the run (exit 130);
    the candidate is not cached as dropped, so the next run exports it."""
    from evit_deploy.targets.onnx import OnnxTarget

    real_export = OnnxTarget.export

    def ctrl_c_in_fp16(self, traced, options, path, reporter):
        if options.fp16 or options.precision == "fp16":
            ctrl_c_as_runtime_error()
        return real_export(self, traced, options, path, reporter)

    args = ("optimize", TINY_ATTENTION, "--input-size", SMALL, "--batch", 2, "--targets", "onnx", "--precisions",
            "fp32,fp16", "--rounds", 1, "--out", tmp_path / "out")
    monkeypatch.setattr(OnnxTarget, "export", ctrl_c_in_fp16)
    code, _, err = cli(*args)
    assert code == 130 and "interrupted" in err, err
    monkeypatch.setattr(OnnxTarget, "export", real_export)
    code, _, err = cli(*args)
    assert code == 0, err
    fp16 = next(c for c in json.loads((tmp_path / "out" / "optimize.json").read_text())["candidates"]
                if c["backend"] == "onnxruntime:fp16")
    assert fp16["outcome"] != "dropped" and fp16["parity"]["passed"], fp16


@pytest.mark.parametrize("raised", ["OSError", "OutputError"])
def test_a_full_disk_stops_the_run_instead_of_dropping_every_candidate(cli, tmp_path, monkeypatch, raised):
    """What cannot be written under --out is the run's problem, not one candidate's: exit 6
    with the reason, not "no candidate is right" after every export failed the same way."""
    import errno

    from evit_deploy.errors import EXIT_OUTPUT_ERROR, OutputError
    from evit_deploy.targets.onnx import OnnxTarget

    def full(self, traced, options, path, reporter):
        if raised == "OutputError":
            raise OutputError(f"cannot write {path}: no space left on device")
        raise OSError(errno.ENOSPC, "No space left on device", str(path))   # as a converter's own write

    monkeypatch.setattr(OnnxTarget, "export", full)
    out = tmp_path / "out"
    code, _, err = cli("optimize", TINY_ATTENTION, "--input-size", SMALL, "--batch", 2, "--targets", "onnx",
                       "--precisions", "fp32,fp16", "--rounds", 1, "--out", out)
    assert code == EXIT_OUTPUT_ERROR and "no space left on device" in err.splitlines()[-1], err
    assert not (out / "optimize.json").exists()
    assert not list((out / ".evit-optimize-cache" / "exports").iterdir())


def test_one_run_at_a_time_writes_an_out_folder(cli, tmp_path):
    from evit_deploy.fsutil import exclusive_lock

    out = tmp_path / "out"
    out.mkdir()
    with exclusive_lock(out, "held by this test"):              # as another optimize or build holds it
        code, _, err = cli("optimize", TINY_ATTENTION, "--input-size", SMALL, "--batch", 2, "--targets", "onnx",
                           "--precisions", "fp32", "--rounds", 1, "--out", out)
    assert code == 2 and "is being written by another `evit-deploy optimize` or `build`" in err.splitlines()[-1], err
    assert list(out.iterdir()) == []
