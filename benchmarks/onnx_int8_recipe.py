"""Which onnxruntime static-quantization recipe to ship: measured, not assumed.

For each recipe (activation type, symmetric or not, which operator types are quantized)
the script quantizes the same fp32 ONNX export with ``onnxruntime.quantization`` (QDQ,
per-channel int8 weights, MinMax calibration on the default calibration set), then

* times every recipe and the fp32 model in one process, interleaved in rounds as
  ``evit-deploy bench`` does (onnxruntime CPU provider, one thread, batch 16);
* compares each with the fp32 model on 64 held-out images (seeded crops of the bundled
  photos, another seed than the calibration's): top-1 agreement, top-5 overlap, and the
  largest logit error relative to the fp32 output scale.

Weights: realistic synthetic ones (``models/synthetic.realistic_weights``, seed 1).

    python benchmarks/onnx_int8_recipe.py m0 m4 --json recipe.json
    python benchmarks/onnx_int8_recipe.py m4 --recipes u8:-MatMul,Softmax,Mul,Sigmoid s8sym:-MatMul,Softmax
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

# kind:ops — kind is u8 (uint8 activations, asymmetric), s8 (int8, asymmetric) or s8sym
# (int8, symmetric); ops is "all", a +list of types to quantize, or a -list to leave out.
DEFAULT_RECIPES = ["u8:all", "u8:+Conv", "u8:-MatMul,Softmax", "u8:-MatMul,Softmax,Mul,Sigmoid",
                   "s8:-MatMul,Softmax,Mul,Sigmoid", "s8sym:-MatMul,Softmax,Mul,Sigmoid"]


def parse_recipe(text: str, graph_ops: set[str]):
    from onnxruntime.quantization import QuantType

    kind, _, ops = text.partition(":")
    activation = QuantType.QUInt8 if kind == "u8" else QuantType.QInt8
    if ops == "all":
        types = sorted(graph_ops)
    elif ops.startswith("+"):
        types = ops[1:].split(",")
    else:
        types = sorted(graph_ops - set(ops.lstrip("-").split(",")))
    return activation, kind == "s8sym", types


def held_out(spec, count: int = 64) -> np.ndarray:
    from evit_deploy.calibration import _default_set
    from evit_deploy.preprocess import to_input

    images = _default_set(spec, seed=1).images
    while len(images) < count:
        images = np.concatenate([images, _default_set(spec, seed=len(images)).images])
    return to_input(images[:count], spec, "normalized")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", default=["m0", "m4"])
    parser.add_argument("--recipes", nargs="+", default=DEFAULT_RECIPES)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--round-seconds", type=float, default=1.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")

    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, \
        quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from evit_deploy import api
    from evit_deploy.bench import time_interleaved
    from evit_deploy.calibration import calibration_set
    from evit_deploy.hostinfo import cpu_info
    from evit_deploy.progress import QuietReporter
    from parity_noise import realistic_checkpoint

    rows = []
    print(f"CPU {cpu_info()['model']}, onnxruntime {ort.__version__}, 1 thread, batch 16")
    with tempfile.TemporaryDirectory(prefix="evit-int8-recipe-") as tmp:
        for model in args.models:
            work = Path(tmp) / model
            work.mkdir()
            weights = realistic_checkpoint(model, 1, work / "w.pth")
            fp32 = api.export(model, "onnx", out_dir=work, weights=weights, batch=16, verify=False,
                              reporter=QuietReporter()).artifact
            desc = fp32.description
            prepared = work / "prepared.onnx"
            quant_pre_process(str(fp32.path), str(prepared), skip_symbolic_shape=True)
            graph_ops = {n.op_type for n in onnx.load(str(prepared)).graph.node}
            calibration = calibration_set(desc.preprocessing)

            class Reader(CalibrationDataReader):
                def __init__(self):
                    self.batches = calibration.batches(desc.preprocessing, "normalized", 16)

                def get_next(self):
                    x = next(self.batches, None)
                    return None if x is None else {"image": x}

            def session(path):
                options = ort.SessionOptions()
                options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
                options.log_severity_level = 3
                return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

            sessions = {"fp32": session(fp32.path)}
            for recipe in args.recipes:
                activation, symmetric, types = parse_recipe(recipe, graph_ops)
                out = work / f"{len(sessions)}.onnx"
                quantize_static(str(prepared), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                                weight_type=QuantType.QInt8, activation_type=activation, op_types_to_quantize=types,
                                calibrate_method=CalibrationMethod.MinMax,
                                extra_options={"ActivationSymmetric": symmetric})
                sessions[recipe] = session(out)
            x = held_out(desc.preprocessing)
            outputs = {name: np.concatenate([s.run(None, {"image": x[i:i + 16]})[0] for i in range(0, len(x), 16)])
                       for name, s in sessions.items()}
            batch = {"image": x[:16]}
            samples = time_interleaved({name: (lambda s=s: s.run(None, batch)) for name, s in sessions.items()},
                                       rounds=args.rounds, round_seconds=args.round_seconds, warmup_seconds=1.0)
            speed = {name: 16 / statistics.median([t for r in rounds for t in r]) for name, rounds in samples.items()}
            ref = outputs["fp32"]
            scale = float(np.abs(ref).max())
            for name in sessions:
                out = outputs[name]
                row = {"model": model, "recipe": name, "images_per_s": speed[name],
                       "speedup": speed[name] / speed["fp32"],
                       "top1_agreement": float((out.argmax(1) == ref.argmax(1)).mean()),
                       "top5_overlap": float(np.mean([len(set(np.argsort(-a)[:5]) & set(np.argsort(-b)[:5])) / 5
                                                      for a, b in zip(out, ref)])),
                       "max_rel_error": float(np.abs(out - ref).max() / scale)}
                rows.append(row)
                print(f"{model} {name:36} {row['images_per_s']:6.0f} images/s ({row['speedup']:.2f}x fp32)  "
                      f"top-1 agreement {row['top1_agreement']:.2f}  top-5 overlap {row['top5_overlap']:.2f}  "
                      f"max error {row['max_rel_error']:.3f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
