"""Artifacts are right on every CPU they run on: what each needs of a CPU is recorded,
checked before anything native runs, and int8 is exact on x86 CPUs without VNNI.

Tests must pass on any x86-64 CPU with AVX2: what depends on the host's features either
asks the real host (and asserts what that host must show) or fakes its feature list
(``EVIT_DEPLOY_CPU_FLAGS``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from evit_deploy import api
from evit_deploy.cpufeatures import FLAGS_ENV, VNNI, CpuNeeds, host_features, judge
from evit_deploy.errors import EXIT_BAD_INPUT, EXIT_OK, first_line
from evit_deploy.cpufeatures import cpu_flags
from evit_deploy.preprocess import Preprocessing, preprocess_file, sample_images

from conftest import ROOT, SMALL

AVX2_ONLY = "sse4_2 avx avx2 fma f16c bmi1 bmi2 abm movbe pni ssse3 sse4_1 popcnt"   # a Zen 1 / Broadwell
HOST_HAS_VNNI = bool(set(VNNI) & (cpu_flags() or frozenset()))


# -- the verdict ---------------------------------------------------------------------------

def test_a_verdict_names_what_a_cpu_lacks(monkeypatch):
    tvm_like = CpuNeeds(isa=("avx2", "avx512f", "avx512bw"))
    int8_full_range = CpuNeeds(exact_with=VNNI, why="saturates")
    avx2 = frozenset(AVX2_ONLY.split())
    assert judge(tvm_like, avx2).missing == ("avx512f", "avx512bw") and not judge(tvm_like, avx2).runs
    assert judge(tvm_like, avx2 | {"avx512f", "avx512bw"}).runs
    assert judge(int8_full_range, avx2).runs and not judge(int8_full_range, avx2).exact
    assert judge(int8_full_range, avx2 | {"avx_vnni"}).exact          # any one of them
    assert judge(CpuNeeds(), avx2).runs and judge(CpuNeeds(), avx2).exact
    monkeypatch.setenv(FLAGS_ENV, "avx2, fma")
    assert host_features() == {"avx2", "fma"}
    monkeypatch.delenv(FLAGS_ENV)
    assert host_features() == cpu_flags()


def test_a_tvm_target_needs_what_llvm_may_use_for_its_cpu():
    pytest.importorskip("tvm")
    from evit_deploy.targets.tvm.target_string import required_cpu_flags, resolve_target

    skylake = required_cpu_flags(resolve_target("llvm -mcpu=skylake-avx512 -num-cores=1"))
    broadwell = required_cpu_flags(resolve_target("llvm -mcpu=broadwell"))
    assert {"avx2", "fma", "avx512f", "avx512bw"} <= set(skylake) and "avx512_vnni" not in skylake
    assert "avx2" in broadwell and not any(f.startswith("avx512") for f in broadwell)
    assert "avx2" not in required_cpu_flags(resolve_target("llvm -mcpu=broadwell -mattr=-avx2"))
    # native is this machine: everything it needs, this CPU has.
    assert judge(CpuNeeds(isa=required_cpu_flags(resolve_target("native"))), cpu_flags()).runs


def test_an_exception_without_a_message_is_still_one_line():
    assert first_line(ValueError()) == "ValueError"
    assert first_line(RuntimeError("\n  first\nsecond")) == "first"


# -- TVM: a library for another CPU is refused, never run -----------------------------------

def _foreign_cpu() -> str | None:
    """An LLVM CPU whose fp32 TVM libraries need instructions this host lacks, if there is
    one: asked of the target itself (an fp32 library for an AMX CPU does not need AMX)."""
    from evit_deploy.targets.tvm import TvmTarget

    flags = cpu_flags() or frozenset()
    for cpu in ("skylake-avx512", "cooperlake", "sapphirerapids", "graniterapids"):
        needs = TvmTarget().cpu_needs(TvmTarget.Options(tvm_target=f"llvm -mcpu={cpu}")).isa
        if set(needs) - flags:
            return cpu
    return None


@dataclass(frozen=True)
class Foreign:
    """A TVM library for a CPU that this host is not, or plays (``played``: the flags of
    ``$EVIT_DEPLOY_CPU_FLAGS``, where no LLVM CPU has instructions this host lacks; the
    refusals are then checked, not that running the library would have crashed)."""
    artifact: api.Artifact
    played: str | None

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, **({FLAGS_ENV: self.played} if self.played else {})}

    @property
    def flags(self) -> frozenset[str]:
        return frozenset(self.played.split()) if self.played else cpu_flags()


@pytest.fixture(scope="module")
def foreign_library(tmp_path_factory):
    pytest.importorskip("tvm")
    cpu, played = _foreign_cpu(), None
    if cpu is None:                             # AVX-512 and AMX here: play an AVX2 CPU
        cpu, played = "skylake-avx512", AVX2_ONLY
    out = tmp_path_factory.mktemp("foreign-tvm")
    target = f"llvm -mcpu={cpu} -num-cores=1"
    with pytest.MonkeyPatch.context() as env:
        if played:
            env.setenv(FLAGS_ENV, played)
        # Verification needs a CPU that runs it: refused before anything is traced.
        with pytest.raises(Exception, match="parity cannot be proven on this machine"):
            api.export("m0", "tvm", out_dir=out, img_size=SMALL, options={"tvm_target": target})
    result = api.export("m0", "tvm", out_dir=out, img_size=SMALL, options={"tvm_target": target}, verify=False)
    return Foreign(result.artifact, played)


@pytest.mark.parametrize("command", ["run", "verify", "eval", "doctor"])
def test_a_library_for_a_cpu_this_one_is_not_is_refused_without_a_crash(foreign_library, command):
    library = foreign_library.artifact.path
    cpu = foreign_library.artifact.description.extra["cpu"]
    missing = sorted(set(cpu["isa"]) - foreign_library.flags)
    assert missing
    args = {"run": [library, sample_images()[0]], "verify": [library], "eval": [library],
            "doctor": [library]}[command]
    proc = subprocess.run([sys.executable, "-m", "evit_deploy", command, *map(str, args)], capture_output=True,
                          text=True, timeout=600, env=foreign_library.env)
    assert proc.returncode == EXIT_BAD_INPUT, (proc.returncode, proc.stderr)   # not 132 (SIGILL)
    assert missing[0] in proc.stderr and "Traceback" not in proc.stderr
    if command != "doctor":
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_the_example_application_refuses_it_too(foreign_library):
    if foreign_library.played:
        pytest.skip("the example application reads /proc/cpuinfo alone: no LLVM CPU tried needs more than this host has")
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "classify.py"), str(foreign_library.artifact.path),
                           str(sample_images()[0])], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "which this CPU lacks" in proc.stderr and "Traceback" not in proc.stderr


def test_a_library_made_before_needs_were_recorded_is_judged_by_its_target(foreign_library, tmp_path, monkeypatch):
    import shutil

    from evit_deploy.targets.tvm.runtime import sidecar_path

    library = tmp_path / foreign_library.artifact.path.name
    shutil.copy(foreign_library.artifact.path, library)
    described = json.loads(sidecar_path(foreign_library.artifact.path).read_text())
    described["extra"].pop("cpu")
    sidecar_path(library).write_text(json.dumps(described))
    if foreign_library.played:
        monkeypatch.setenv(FLAGS_ENV, foreign_library.played)
    from evit_deploy.errors import BadInputError
    with pytest.raises(BadInputError, match="running it would crash"):
        api.run(library, [sample_images()[0]])


# -- int8: exact on CPUs without VNNI --------------------------------------------------------

@pytest.fixture(scope="module")
def onnx_int8_kernels(tmp_path_factory):
    """int8 ONNX exports of M0 (default synthetic weights, whose activations overflow
    8-bit weight pairs the most) with both kernel choices, not verified."""
    out = tmp_path_factory.mktemp("int8-kernels")
    return {k: api.export("m0", "onnx", out_dir=out / k, img_size=SMALL, verify=False,
                          options={"precision": "int8", "int8_kernels": k}).artifact for k in ("portable", "vnni")}


def _int8_weights(path) -> list[np.ndarray]:
    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    return [numpy_helper.to_array(inits[n.input[0]]) for n in model.graph.node
            if n.op_type == "DequantizeLinear" and n.input[0] in inits
            and inits[n.input[0]].data_type == onnx.TensorProto.INT8]


def _pair_fits_int16(weights: np.ndarray) -> bool:
    # VPMADDUBSW adds two u8 x s8 products in int16: the largest two weights against 255.
    return 255 * 2 * int(np.abs(weights.astype(np.int32)).max()) <= np.iinfo(np.int16).max


def test_portable_int8_onnx_has_weights_whose_pairs_cannot_leave_int16(onnx_int8_kernels):
    portable, vnni = onnx_int8_kernels["portable"], onnx_int8_kernels["vnni"]
    assert (portable.path.name, vnni.path.name) == ("efficientvit_m0_int8.onnx", "efficientvit_m0_int8_vnni.onnx")
    weights = _int8_weights(portable.path)
    assert len(weights) > 50 and all(_pair_fits_int16(w) for w in weights)
    assert not all(_pair_fits_int16(w) for w in _int8_weights(vnni.path))     # the check can fail
    assert portable.description.extra["int8"]["kernels"] == "portable"
    assert portable.description.extra["cpu"]["exact_with"] == []
    assert vnni.description.extra["cpu"]["exact_with"] == list(VNNI)


def _session(model, level):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level, options.log_severity_level = level, 3
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def _images() -> np.ndarray:
    return np.concatenate([preprocess_file(p, Preprocessing.for_size(SMALL)) for p in sample_images()])


def _end_to_end_error(path) -> float:
    """How far the file run by onnxruntime's integer kernels lies from its QDQ graph
    computed in float from the dequantized values, relative to the largest logit."""
    import onnxruntime as ort

    sessions = (_session(str(path), level)
                for level in (ort.GraphOptimizationLevel.ORT_ENABLE_ALL, ort.GraphOptimizationLevel.ORT_DISABLE_ALL))
    optimized, qdq = (np.concatenate([session.run(None, {"image": x[None]})[0] for x in _images()])
                      for session in sessions)
    return float(np.abs(optimized - qdq).max() / np.abs(qdq).max())


INTEGER_KERNELS = ("QLinear", "QGemm", "MatMulInteger", "ConvInteger", "DynamicQuantize")


def _beyond_one_step(path, tmp_path) -> list[str]:
    """Each node of the graph onnxruntime runs (QDQ pairs fused into integer kernels), run
    alone on the values the QDQ graph computes in float for its inputs: those whose output
    lies more than one quantization step (uint8 outputs), or more than 1e-3 of its largest
    magnitude (float ones), from that graph's, and the integer kernels not checked. Alone, because a value on a rounding boundary may be
    rounded the other way by a fused kernel (onnxruntime's QLinearAdd, on an AMX Xeon), and
    that one step then carries through every node after it."""
    import onnxruntime as ort
    from onnx import helper

    fused = tmp_path / "fused.onnx"
    options = ort.SessionOptions()
    options.graph_optimization_level, options.log_severity_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL, 3
    options.optimized_model_filepath = str(fused)
    # Without the NHWC layout change every integer kernel reads and writes values the QDQ
    # graph has (its NHWC convolutions do the same u8 x s8 arithmetic in another layout).
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"], disabled_optimizers=["NhwcTransformer"])
    fused, qdq = onnx.load(str(fused)), onnx.load(str(path))
    every_value = onnx.ModelProto()
    every_value.CopyFrom(qdq)
    del every_value.graph.output[:]
    names = [t for n in qdq.graph.node for t in n.output if t]
    every_value.graph.output.extend(helper.make_empty_tensor_value_info(t) for t in names)
    float_graph = _session(every_value.SerializeToString(), ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    values = [dict(zip(names, float_graph.run(None, {"image": x[None]})), image=x[None]) for x in _images()]

    initializers = {i.name: i for i in fused.graph.initializer}
    producer = {t: n for n in fused.graph.node for t in n.output}
    beyond, unchecked = [], {n.name for n in fused.graph.node if n.op_type.startswith(INTEGER_KERNELS)}
    for name in (t for n in fused.graph.node for t in n.output if t in values[0]):
        # The nodes that compute `name` from values the QDQ graph has too: one kernel, with
        # the reshapes and splits onnxruntime moved next to it.
        nodes, fed, todo = [], [], [producer[name]]
        while todo:
            node = todo.pop()
            if node in nodes:
                continue
            nodes.append(node)
            for t in node.input:
                if t in values[0]:
                    fed.append(t)
                elif t and t not in initializers:
                    todo.append(producer[t])
        fed = list(dict.fromkeys(fed))
        unchecked -= {n.name for n in nodes}
        graph = helper.make_graph(
            [n for n in fused.graph.node if n in nodes], name,
            [helper.make_tensor_value_info(t, helper.np_dtype_to_tensor_dtype(values[0][t].dtype), values[0][t].shape)
             for t in fed],
            [helper.make_empty_tensor_value_info(name)],
            [initializers[t] for t in {t for n in nodes for t in n.input} if t in initializers])
        alone = helper.make_model(graph, opset_imports=fused.opset_import)
        alone.ir_version = fused.ir_version
        session = _session(alone.SerializeToString(), ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        for value in values:
            got, want = session.run(None, {t: value[t] for t in fed})[0], value[name]
            kernel = producer[name].op_type if len(nodes) == 1 else "+".join(sorted({n.op_type for n in nodes}))
            if got.dtype == np.uint8:
                off = int(np.abs(got.astype(np.int32) - want.astype(np.int32)).max())
                if off > 1:
                    beyond.append(f"{kernel} {name}: {off} steps")
            elif np.abs(got - want).max() > 1e-3 * np.abs(want).max():
                beyond.append(f"{kernel} {name}: {np.abs(got - want).max():.3g}")
    return beyond + [f"{name}: not checked" for name in sorted(unchecked)]


def test_int8_kernels_compute_the_quantized_graph_exactly_where_the_description_says(onnx_int8_kernels, tmp_path):
    assert not _beyond_one_step(onnx_int8_kernels["portable"].path, tmp_path)        # on every CPU
    if HOST_HAS_VNNI:
        assert not _beyond_one_step(onnx_int8_kernels["vnni"].path, tmp_path)
    else:                                       # this host is the CPU the description warns about
        error = _end_to_end_error(onnx_int8_kernels["vnni"].path)
        assert error > 0.05, error


def test_full_range_int8_is_refused_where_it_cannot_be_verified(onnx_int8_kernels, cli, monkeypatch, tmp_path):
    vnni = onnx_int8_kernels["vnni"].path
    monkeypatch.setenv(FLAGS_ENV, AVX2_ONLY)
    code, _, err = cli("export", "m0", "-t", "onnx", "--precision", "int8", "--int8-kernels", "vnni",
                       "--out", tmp_path)
    assert code == EXIT_BAD_INPUT and "none of avx512_vnni" in err and len(err.strip().splitlines()) == 1, err
    assert not list(tmp_path.iterdir())
    code, _, err = cli("verify", vnni)
    assert code == EXIT_BAD_INPUT and "--any-cpu" in err and len(err.strip().splitlines()) == 1, err
    code, out, err = cli("run", vnni, sample_images()[0])
    assert code == EXIT_OK and "warning:" in err and "exact only with VNNI" in err
    code, _, err = cli("doctor", vnni, "--json", tmp_path / "doctor.json")
    assert code == EXIT_BAD_INPUT
    found = json.loads((tmp_path / "doctor.json").read_text())["artifacts"][0]
    assert found["runs"] and not found["exact"]
    monkeypatch.setenv(FLAGS_ENV, AVX2_ONLY + " avx512_vnni")
    code, _, err = cli("doctor", vnni)
    assert code == EXIT_OK, err


def test_portable_int8_openvino_has_seven_bit_weights_in_its_products(tmp_path, realistic_m0):
    pytest.importorskip("openvino")
    import openvino as ov

    def weights_into(path) -> dict[str, list[int]]:
        """Largest |w| of each int8 constant, by the operation it feeds (through its
        dequantizing Convert/Subtract/Multiply)."""
        found: dict[str, list[int]] = {}
        for op in ov.Core().read_model(str(path)).get_ordered_ops():
            if op.get_type_name() != "Constant" or op.get_element_type() != ov.Type.i8:
                continue
            node = op
            while node.get_type_name() in ("Constant", "Convert", "Subtract", "Multiply", "Reshape"):
                node = next(iter(node.output(0).get_target_inputs())).get_node()
            found.setdefault(node.get_type_name(), []).append(int(np.abs(op.get_data().astype(np.int32)).max()))
        return found

    exports = {k: api.export("m0", "openvino", out_dir=tmp_path / k, weights=realistic_m0, img_size=SMALL,
                             options={"precision": "int8", "int8_kernels": k}, verify=k == "portable")
               for k in ("portable", "vnni")}
    assert exports["portable"].report.passed, exports["portable"].report.summary()
    portable, vnni = (weights_into(exports[k].artifact.path) for k in ("portable", "vnni"))
    # Convolutions and matrix products run u8 x s8 pairs: 7-bit weights keep them in int16.
    # Depthwise (GroupConvolution) kernels widen to 32 bits and keep 8 bits.
    assert len(portable["Convolution"]) > 20 and max(portable["Convolution"] + portable["MatMul"]) <= 64
    assert max(vnni["Convolution"]) > 64
    assert exports["vnni"].artifact.description.extra["cpu"]["exact_with"] == list(VNNI)


# -- what the description and the manifest say ---------------------------------------------

def test_the_description_says_what_a_cpu_needs_and_the_report_which_cpu_checked(tmp_path):
    result = api.export("m0", "onnx", out_dir=tmp_path, img_size=SMALL)
    # onnxruntime picks its kernels by CPUID when it loads: fp32 needs nothing of a CPU.
    assert result.artifact.description.extra["cpu"] == {"isa": [], "exact_with": [], "why": ""}
    checked = result.report.to_dict()["cpu"]
    assert checked["model"] and "avx2" in checked["features"]
    # Which CPU verified it is not in the file: the same export elsewhere gives the same bytes.
    assert "verified_on" not in result.artifact.path.read_bytes().decode("latin-1")


# -- bench keeps going ---------------------------------------------------------------------

def test_bench_reports_a_rejected_backend_and_times_the_others(cli, tmp_path, monkeypatch):
    monkeypatch.setenv(FLAGS_ENV, AVX2_ONLY)
    code, out, err = cli("bench", "m0", "--backends", "onnxruntime,onnxruntime:int8", "--batch", "1",
                         "--img-size", SMALL, "--rounds", "1", "--round-seconds", "0.05", "--no-memory",
                         "-O", "onnx.int8_kernels=vnni", "--json", tmp_path / "b.json")
    assert code == EXIT_OK, err
    records = {r["backend"]: r for r in json.loads((tmp_path / "b.json").read_text())["records"]}
    assert records["onnxruntime"]["images_per_s"] > 0 and records["onnxruntime"]["rejected"] is None
    assert records["onnxruntime:int8"]["images_per_s"] is None
    assert "none of avx512_vnni" in records["onnxruntime:int8"]["rejected"]
    assert "rejected" in out and "kept for inspection" not in out + err
    # Nothing timed at all is an error, with the first backend's reason and exit code.
    code, _, err = cli("bench", "m0", "--backends", "onnxruntime:int8", "--img-size", SMALL, "--no-memory",
                       "-O", "onnx.int8_kernels=vnni")
    assert code == EXIT_BAD_INPUT and "none of avx512_vnni" in err
