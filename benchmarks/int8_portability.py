"""Which int8 recipe is right on every x86 CPU, and what it costs: measured, not assumed.

On x86 without VNNI, onnxruntime's and oneDNN's u8×s8 kernels add pairs of products in
int16 (VPMADDUBSW): with 8-bit weights the sum saturates, so a file verified on a VNNI CPU
computes something else on an AVX2 one. The remedies: 7-bit weights (onnxruntime's
``reduce_range``, NNCF's ``overflow_fix``) or uint8 weights (onnxruntime's U8U8 kernels,
which widen to 16 bits first). For each model (realistic synthetic weights, batch 16, one
thread) this script exports and compares, on this machine:

* ONNX: ``--int8-kernels vnni`` (8-bit weights), ``portable`` (the default: 7-bit) and
  U8U8 (uint8 weights, quantized here with onnxruntime's quantizer and the same recipe);
* OpenVINO: ``--int8-kernels vnni`` (NNCF's overflow fix off) and ``portable`` (on in
  every layer);

(each with its own file name: ``_int8`` and ``_int8_vnni``) and reports for each: parity on this CPU (``verify``), top-1 agreement, top-5 overlap,
lowest cosine and largest error against the fp32 model on held-out images (``--images``), and speed
against fp32 of the same runtime and against onnxruntime fp32 (every session timed
interleaved in one process, as ``bench`` does). For ONNX it also runs each int8 file with
onnxruntime's graph optimisations off: the QDQ graph is then computed in float from the
dequantized values, which is what exact integer kernels (a VNNI CPU) compute, so the
agreement a VNNI CPU would see is measured on any CPU.

    python benchmarks/int8_portability.py m0 m4 --json int8.json
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

BATCH = 16


def ort_session(path: Path, *, optimized: bool = True):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
    options.log_severity_level = 3
    if not optimized:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


def u8u8(fp32: Path, out: Path, calibration, spec) -> Path:
    """The shipped ONNX recipe with uint8 (asymmetric) weights instead of int8."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, \
        quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from evit_deploy.targets.onnx.quantize import op_types_to_quantize

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = calibration.batches(spec, "normalized", BATCH)

        def get_next(self):
            x = next(self.batches, None)
            return None if x is None else {"image": x}

    prepared = out.with_suffix(".prepared.onnx")
    quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
    quantize_static(str(prepared), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    weight_type=QuantType.QUInt8, activation_type=QuantType.QUInt8,
                    op_types_to_quantize=op_types_to_quantize(onnx.load(str(prepared))),
                    calibrate_method=CalibrationMethod.MinMax)
    return out


def main() -> int:
    from evit_deploy import api, benchkit
    from evit_deploy.bench import time_interleaved
    from evit_deploy.calibration import calibration_set
    from evit_deploy.cpufeatures import VNNI, host_cpu
    from evit_deploy.parity import TOLERANCES
    from evit_deploy.progress import QuietReporter
    from evit_deploy.targets.openvino.runtime import load as ov_load

    parser = benchkit.parser(__doc__)
    parser.add_argument("--weights", choices=("realistic", "default"), default="realistic",
                        help="realistic synthetic weights (seed 1), or the seeded ones commands use without "
                             "--weights (larger activations: they overflow 8-bit weight pairs the most)")
    parser.add_argument("--images", type=int, default=64, help="held-out images the agreement is measured on")
    args = parser.parse_args()
    benchkit.quiet()
    cpu = host_cpu()
    vnni = [f for f in VNNI if f in (cpu["features"] or ())]
    print(f"CPU {cpu['model']} ({'VNNI: ' + ', '.join(vnni) if vnni else 'no VNNI'}), batch {BATCH}, 1 thread",
          flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="evit-int8-portability-") as tmp:
        for model in args.models:
            work = Path(tmp) / model
            work.mkdir()
            weights = benchkit.realistic_checkpoint(model, 1, work / "weights.pth") \
                if args.weights == "realistic" else None

            def export(target, **options):
                return api.export(model, target, out_dir=work / target, weights=weights, batch=BATCH,
                                  options=options, verify=False, reporter=QuietReporter()).artifact

            onnx_fp32 = export("onnx")
            spec = onnx_fp32.description.preprocessing
            files = {("onnxruntime", "fp32"): onnx_fp32.path,
                     ("onnxruntime", "vnni"): export("onnx", precision="int8", int8_kernels="vnni").path,
                     ("onnxruntime", "portable"): export("onnx", precision="int8").path,
                     ("onnxruntime", "u8u8"): u8u8(onnx_fp32.path, work / "u8u8.onnx", calibration_set(spec), spec),
                     ("openvino", "fp32"): export("openvino").path,
                     ("openvino", "vnni"): export("openvino", precision="int8", int8_kernels="vnni").path,
                     ("openvino", "portable"): export("openvino", precision="int8").path}
            runners = {key: (ort_session(path) if key[0] == "onnxruntime" else ov_load(path, threads=1))
                       for key, path in files.items()}
            x = benchkit.held_out_images(spec, args.images)
            reference = benchkit.batched(runners[("onnxruntime", "fp32")], x, BATCH)
            batch = x[:BATCH]
            samples = time_interleaved({key: (lambda r=r: r(batch)) for key, r in runners.items()},
                                       rounds=5, round_seconds=1.0, warmup_seconds=1.0)
            speed = {key: BATCH / statistics.median([t for r in s for t in r]) for key, s in samples.items()}
            for (runtime, recipe), path in files.items():
                row = {"model": model, "runtime": runtime, "recipe": recipe, "cpu": cpu, "weights": args.weights,
                       "images_per_s": speed[(runtime, recipe)],
                       "vs_runtime_fp32": speed[(runtime, recipe)] / speed[(runtime, "fp32")],
                       "vs_onnxruntime_fp32": speed[(runtime, recipe)] / speed[("onnxruntime", "fp32")],
                       "here": benchkit.agreement(benchkit.batched(runners[(runtime, recipe)], x, BATCH), reference)}
                if recipe != "fp32":
                    # The U8U8 file carries the fp32 file's description: judged as int8 here.
                    report = api.verify(path, weights=weights, any_cpu=True, tolerance=TOLERANCES["int8"],
                                        reporter=QuietReporter())
                    logits = report.outputs[0]
                    row["parity_here"] = {"passed": report.passed, "min_cosine": logits.min_cosine,
                                          "gain_error": logits.gain_error, "failures": report.failures}
                    if runtime == "onnxruntime":
                        row["exact_kernels"] = benchkit.agreement(
                            benchkit.batched(ort_session(path, optimized=False), x, BATCH), reference)
                rows.append(row)
                here = row["here"]
                exact = row.get("exact_kernels")
                print(f"{model} {runtime:11} {recipe:8} {row['vs_runtime_fp32']:5.2f}x its fp32 "
                      f"{row['vs_onnxruntime_fp32']:5.2f}x onnxruntime fp32 | here: top-1 {here['top1_agreement']:.3f} "
                      f"top-5 {here['top5_overlap']:.2f} cosine {here['min_cosine']:.3f}"
                      + (f" | exact kernels: top-1 {exact['top1_agreement']:.3f} cosine {exact['min_cosine']:.3f}"
                         if exact else "")
                      + (f" | parity here: {'pass' if row['parity_here']['passed'] else 'FAIL'}"
                         if "parity_here" in row else ""), flush=True)
            benchkit.write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    from evit_deploy.benchkit import main as run
    run(main)
