"""``bench`` and ``profile`` run on a small configuration and produce well-formed output.

No timing is asserted here: speed claims come from running the benchmark itself."""

from __future__ import annotations

import json

import pytest

from evit_deploy.errors import EXIT_BAD_INPUT

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_bench_small_configuration(cli, tmp_path):
    code, _, err = cli("bench", "m0", "--backends", "torch,torch-jit,onnxruntime", "--batch", "2", "--img-size", "64",
                       "--rounds", "2", "--round-seconds", "0.05", "--json", tmp_path / "b.json",
                       "--plot", tmp_path / "b.png")
    assert code == 0, err
    data = json.loads((tmp_path / "b.json").read_text())
    assert data["settings"]["batch"] == 2 and data["settings"]["threads"] == 1
    assert data["settings"]["baseline"] == "torch-jit"
    records = {r["backend"]: r for r in data["records"]}
    assert set(records) == {"torch", "torch-jit", "onnxruntime"}
    for r in records.values():
        assert r["model"] == "efficientvit_m0" and r["images_per_s"] > 0 and r["iterations"] >= 4
        lat = r["latency_ms"]
        assert lat["min"] <= lat["p10"] <= lat["median"] <= lat["p90"] <= lat["max"]
        assert r["images_per_s"] == pytest.approx(2 / (lat["median"] / 1000))
        assert r["peak_rss_mb"] and r["peak_rss_mb"] > 10
        assert r["cpu"] and r["versions"]["onnxruntime"]
        assert r["ratio_to_baseline"] == pytest.approx(r["images_per_s"] / records["torch-jit"]["images_per_s"])
    assert (tmp_path / "b.png").read_bytes()[:8] == PNG_SIGNATURE


@pytest.mark.parametrize("command", [["bench", "m0", "m1", "--backends", "tvm"], ["profile", "m0", "--backend", "tvm"]])
def test_target_shortcuts_reach_the_target_wherever_they_stand(cli, tmp_path, command):
    """`--db DIR` (TVM's shortcut for -O tvm.db=DIR) after the models, between them, or as
    --db=DIR: it reaches the TVM target, which refuses a database that does not exist
    before any work (so no model is taken for a '--db' model)."""
    pytest.importorskip("tvm")
    missing = tmp_path / "no-such-db"
    for args in ([*command, "--db", missing], [command[0], "--db", missing, *command[1:]],
                 [*command, f"--db={missing}"]):
        code, _, err = cli(*args)
        assert code == EXIT_BAD_INPUT and f"tuning database {missing} does not exist" in err, (args, err)
    code, _, err = cli(*command, "--dbb", missing)
    assert code == EXIT_BAD_INPUT and "No such option: --dbb" in err and "--db" in err


def test_bench_rejects_unknown_backends(cli):
    code, _, err = cli("bench", "m0", "--backends", "torch,onnxrt")
    assert code == EXIT_BAD_INPUT and "unknown backend 'onnxrt'" in err


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_profile_splits_compute_and_memory_bound_time(cli, tmp_path, backend):
    code, _, err = cli("profile", "m0", "--backend", backend, "--batch", "2", "--img-size", "64",
                       "--iterations", "2", "--json", tmp_path / "p.json", "--plot", tmp_path / "p.png")
    assert code == 0, err
    (result,) = json.loads((tmp_path / "p.json").read_text())
    assert result["backend"] == backend and result["total_ms"] > 0
    shares = {c["category"]: c for c in result["by_category"]}
    assert sum(c["share"] for c in result["by_category"]) == pytest.approx(1.0)
    assert shares["convolution"]["bound"] == "compute-bound"
    assert result["memory_bound_share"] + result["compute_bound_share"] == pytest.approx(1.0)
    blocks = {b["block"]: b for b in result["by_block"]}
    assert {"patch embedding", "attention", "FFN"} <= set(blocks)
    assert sum(b["share"] for b in result["by_block"]) == pytest.approx(1.0)
    # Attention contains memory-bound work (softmax, reshapes) and it is attributed there.
    assert 0 < blocks["attention"]["memory_bound_share"] <= 1
    assert (tmp_path / "p.png").read_bytes()[:8] == PNG_SIGNATURE


def test_bench_variants_carry_their_own_options(cli, tmp_path):
    """`onnxruntime@half` is a second ONNX artifact with the variant's options, timed in the
    same run as the plain one; options for a variant nobody asked for are a typo."""
    code, _, err = cli("bench", "m0", "--backends", "onnxruntime,onnxruntime@half", "--batch", "2", "--img-size", "64",
                       "--rounds", "1", "--round-seconds", "0.02", "--no-memory", "-O", "onnx@half.precision=fp16",
                       "--json", tmp_path / "b.json")
    assert code == 0, err
    data = json.loads((tmp_path / "b.json").read_text())
    assert data["settings"]["precisions"] == {"onnxruntime": "fp32", "onnxruntime@half": "fp16"}
    assert {r["backend"] for r in data["records"]} == {"onnxruntime", "onnxruntime@half"}
    code, _, err = cli("bench", "m0", "--backends", "onnxruntime", "-O", "onnx@half.precision=fp16")
    assert code == EXIT_BAD_INPUT and "no backend is labelled '@half'" in err
    code, _, err = cli("bench", "m0", "--backends", "torch@x")
    assert code == EXIT_BAD_INPUT and "no variants" in err


def test_block_names_are_made_once_per_model_and_only_when_read():
    """profile hands runtimes a model's block map that is built on first read (TVM and
    ExecuTorch never read it) and once for every backend that profiles the model."""
    from evit_deploy.profiler import _model_blocks, _ModuleBlocks

    _model_blocks.cache_clear()
    first, second = _ModuleBlocks("efficientvit_m0", 64), _ModuleBlocks("efficientvit_m0", 64)
    assert _model_blocks.cache_info().misses == 0
    assert first["patch_embed"] == "patch embedding" and "head" in first
    assert dict(second) == dict(first) and {"attention", "FFN", "downsampling"} <= set(first.values())
    assert (_model_blocks.cache_info().misses, _model_blocks.cache_info().hits) == (1, 1)
