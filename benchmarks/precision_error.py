"""How far correct reduced-precision artifacts are from the exact answer.

The parity classes ``int8`` and ``bf16`` (``evit_deploy/parity.py``) bound the error of an
artifact against the exact answer (the unfused model in float64) with fixed limits. This
script measures what correct artifacts reach, so that the limits rest on data:

* int8: each model exported with ``--precision int8`` to every int8 target (ONNX through
  onnxruntime static quantization, Core ML W8A8 run by the reference executor, OpenVINO
  through NNCF, LiteRT and ExecuTorch through the pt2e XNNPACK quantizer), with realistic weights
  (``models/synthetic.realistic_weights``) and with the default synthetic weights that
  commands use without ``--weights``; default calibration;
* bf16: the BN-folded model run by PyTorch in bfloat16 (weights and activations), the
  arithmetic a bf16 backend performs at the most.

Figures are over the 4 bundled photos, the inputs int8 artifacts are judged on (and, for
int8, also over the 4 seeded noise images, which lie outside the calibrated ranges): the
largest error relative to the output scale, the lowest cosine similarity, the gain (the
least-squares scale of the artifact's logits on the exact ones) furthest from 1, and on
how many photos the top-1 class agrees with the exact answer's.

    python benchmarks/precision_error.py m0 m4 --targets onnx coreml --json error.json
    python benchmarks/precision_error.py m0 m1 m2 m3 m4 m5 --bf16-only
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

TARGET_OPTIONS = {"onnx": {"precision": "int8"}, "openvino": {"precision": "int8"},
                  "coreml": {"precision": "int8", "minimum_deployment_target": "iOS17"},
                  "litert": {"precision": "int8"}, "executorch": {"precision": "int8"}}


def measure_int8(model: str, target: str, weights_kind: str, seed: int, workdir: Path) -> dict:
    from evit_deploy import api
    from evit_deploy.parity import Tolerance
    from evit_deploy.progress import QuietReporter

    weights = None
    if weights_kind == "realistic":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from parity_noise import realistic_checkpoint
        weights = realistic_checkpoint(model, seed, workdir / f"{model}-{seed}.pth")
    accept_all = Tolerance(min_cosine=-1.0, top1="none", max_rel=float("inf"))
    start = time.perf_counter()
    result = api.export(model, target, out_dir=workdir / f"{model}-{target}-{weights_kind}", weights=weights,
                        options=TARGET_OPTIONS[target], tolerance=accept_all, reporter=QuietReporter())
    report = result.report
    logits = report.outputs[0]
    # The verdict of the int8 class itself, on this CPU.
    verdict = api.verify(result.artifact.path, weights=weights, reporter=QuietReporter())
    photos = [i for i in report.inputs if i.kind == "photo"]
    agree = sum(i.reference_top1 == i.artifact_top1 for i in photos)
    on_photos = [r for r, i in zip(logits.per_input, report.inputs) if i.kind == "photo"]
    return {"precision": "int8", "model": model, "target": target, "weights": weights_kind,
            "seed": seed if weights else 0, "runtime": report.runtime, "cpu": report.cpu,
            "passes_int8_class": verdict.passed, "failures": verdict.failures,
            "max_rel": max(r["artifact"] for r in on_photos), "min_cosine": min(r["cosine"] for r in on_photos),
            "noise_max_rel": max(r["artifact"] for r in logits.per_input),
            "noise_min_cosine": min(r["cosine"] for r in logits.per_input),
            "max_gain_error": max(abs(r["gain"] - 1) for r in on_photos),
            "photos_top1": f"{agree}/{len(photos)}",
            "top5_overlap": logits.top5_overlap, "seconds": round(time.perf_counter() - start, 1),
            "per_input": logits.per_input}


def measure_bf16(model: str, seed: int) -> dict:
    """The folded model in bfloat16 against the exact answer, on the parity inputs."""
    import copy

    import numpy as np
    import torch

    from evit_deploy.models import create_model
    from evit_deploy.models.fuse import fuse
    from evit_deploy.models.synthetic import realistic_weights
    from evit_deploy.parity import Tolerance, compare_output, reference_outputs
    from evit_deploy.preprocess import Preprocessing, to_input
    from evit_deploy.samples import sample_inputs

    reference = realistic_weights(create_model(model), seed).eval()
    spec = Preprocessing.for_size(224)
    inputs = sample_inputs(spec)
    x = to_input(np.stack([p.image for p in inputs]), spec, "normalized")
    exact = reference_outputs(reference, x, exact=True)["0"]
    folded = fuse(copy.deepcopy(reference)).eval().to(torch.bfloat16)
    with torch.no_grad():
        out = folded(torch.from_numpy(x).to(torch.bfloat16)).float().numpy()
    metrics, per_input = compare_output("logits", exact, [exact], out, inputs,
                                        Tolerance(min_cosine=-1.0, top1="none", max_rel=float("inf")), True)
    photos = [(r, o) for p, (r, o, _) in zip(inputs, per_input) if p.kind == "photo"]
    return {"precision": "bf16", "model": model, "target": "torch (bfloat16)", "weights": "realistic", "seed": seed,
            "max_rel": metrics.max_rel, "min_cosine": metrics.min_cosine,
            "photos_top1": f"{sum(r == o for r, o in photos)}/{len(photos)}", "top5_overlap": metrics.top5_overlap}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", default=["m0", "m1", "m2", "m3", "m4", "m5"])
    parser.add_argument("--targets", nargs="+", default=list(TARGET_OPTIONS), choices=list(TARGET_OPTIONS))
    parser.add_argument("--weights", nargs="+", default=["realistic", "default"], choices=["realistic", "default"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1])
    parser.add_argument("--bf16-only", action="store_true")
    parser.add_argument("--int8-only", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    from evit_deploy.cpufeatures import host_cpu
    print(f"CPU {host_cpu()}", flush=True)
    rows = []

    def show(row):
        rows.append(row)
        print(f"{row['precision']:5} {row['model']:16} {row['target']:17} {row['weights']:9} seed {row['seed']}: "
              f"max error {row['max_rel']:.3f}, min cosine {row['min_cosine']:.4f}, photos top-1 "
              f"{row['photos_top1']}, top-5 overlap {row['top5_overlap']:.2f}"
              + (f", gain within 1 ± {row['max_gain_error']:.3f}" if "max_gain_error" in row else "")
              + (f" (with noise inputs: {row['noise_max_rel']:.3f}, {row['noise_min_cosine']:.4f})"
                 if "noise_max_rel" in row else "")
              + ("" if row.get("passes_int8_class", True) else " FAILS the int8 class"), flush=True)
        if args.json:                     # after every artifact: a long run keeps what it measured
            args.json.write_text(json.dumps(rows, indent=2) + "\n")

    if not args.int8_only:
        for model in args.models:
            for seed in args.seeds:
                show(measure_bf16(model, seed))
    if not args.bf16_only:
        with tempfile.TemporaryDirectory(prefix="evit-precision-") as tmp:
            for model in args.models:
                for kind in args.weights:
                    for seed in (args.seeds if kind == "realistic" else [0]):
                        for target in args.targets:
                            show(measure_int8(model, target, kind, seed, Path(tmp)))
    for precision in ("bf16", "int8"):
        mine = [r for r in rows if r["precision"] == precision]
        if mine:
            print(f"{precision}: worst max error {max(r['max_rel'] for r in mine):.3f}, "
                  f"worst cosine {min(r['min_cosine'] for r in mine):.4f}"
                  + (f", worst gain error {max(r['max_gain_error'] for r in mine):.3f}"
                     if all("max_gain_error" in r for r in mine) else "") + f" over {len(mine)} artifacts"
                  + (f"; {sum(not r['passes_int8_class'] for r in mine)} fail the int8 class"
                     if precision == "int8" else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
