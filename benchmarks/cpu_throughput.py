"""Does tuned TVM meet the performance goal? Tuned TVM vs PyTorch vs onnxruntime, side by side.

The goal (issue "TVM target"): at batch 16 on one machine, the tuned library beats
PyTorch (BN folded, ``torch.jit`` traced: the paper's protocol) by at least the paper's
TVM/PyTorch ratio for the model (supplementary Table 3: +38% to +71%), and beats
onnxruntime's CPU provider. The timing is ``evit-deploy bench``'s (one process, backends
interleaved round after round, medians); this script adds the verdict.

    evit-deploy tune m0 --target "native -num-cores=1" --time-budget 40m --db tuning/native-1c
    python benchmarks/cpu_throughput.py m0 --db tuning/native-1c --threads 1 --json out.json

The libraries are built from the database for its own target (``num-cores`` = the
threads the kernels were tuned for; pass the same ``--threads``).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

PAPER_PROFILE = "xeon-e5-2690v4"
BACKENDS = ["torch-jit", "onnxruntime", "tvm"]


def paper_ratios() -> dict[str, float]:
    """The paper's TVM/PyTorch throughput ratio per model (from the Xeon profile)."""
    from evit_deploy.device_profiles import load_device_profile

    paper = load_device_profile(PAPER_PROFILE).paper
    return {m: paper["throughput_tvm_ips"][m] / paper["throughput_ips"][m] for m in paper["throughput_ips"]}


def verdicts(records, paper: dict[str, float]) -> list[dict]:
    """One row per model from ``evit_deploy.bench`` records: the ratios and whether the
    goal holds (a model without a paper figure only has to beat onnxruntime)."""
    from evit_deploy.models.registry import resolve_name

    by_model: dict[str, dict] = {}
    for r in records:
        by_model.setdefault(r.model, {})[r.backend] = r
    rows = []
    for model, recs in by_model.items():
        tvm, torch, ort = recs["tvm"], recs["torch-jit"], recs["onnxruntime"]
        short = resolve_name(model).short_name
        vs_torch, vs_ort = tvm.images_per_s / torch.images_per_s, tvm.images_per_s / ort.images_per_s
        need = paper.get(short)
        rows.append({"model": model, "tvm": tvm.images_per_s, "torch-jit": torch.images_per_s,
                     "onnxruntime": ort.images_per_s, "tvm_vs_torch": vs_torch, "paper_tvm_vs_torch": need,
                     "tvm_vs_onnxruntime": vs_ort, "tvm_notes": tvm.notes,
                     "noisy": any(r.noisy for r in (tvm, torch, ort)),
                     # A library with health warnings (kernels without a tuned schedule) never counts.
                     "goal_met": not tvm.notes and (need is None or vs_torch >= need) and vs_ort > 1.0})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="m0 … m5")
    parser.add_argument("--db", type=Path, required=True, help="tuning database made by `evit-deploy tune`")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--round-seconds", type=float, default=2.0, help="time per backend per round")
    parser.add_argument("--json", type=Path, help="write the benchmark records and verdicts as JSON")
    args = parser.parse_args(argv)
    # As the CLI does: deprecation notices from inside torch (its ONNX exporter) are not
    # the reader's business.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)

    from evit_deploy.bench import bench
    from evit_deploy.console import RichReporter
    from evit_deploy.errors import EvitError

    try:
        result = bench(args.models, BACKENDS, batch=args.batch, threads=args.threads, rounds=args.rounds,
                       round_seconds=args.round_seconds, target_options={"tvm": {"db": str(args.db)}},
                       memory=False, reporter=RichReporter())
    except EvitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    rows = verdicts(result.records, paper_ratios())
    _print_table(rows, result.settings)
    if args.json:
        args.json.write_text(json.dumps({**result.to_dict(), "verdicts": rows}, indent=2) + "\n")
    return 0 if all(r["goal_met"] for r in rows) else 1


def _print_table(rows: list[dict], settings: dict) -> None:
    from evit_deploy.console import out, table
    from evit_deploy.models.registry import resolve_name

    out.print(table(f"Images/s at batch {settings['batch']}, {settings['threads']} thread(s), median of "
                    f"{settings['rounds']} interleaved rounds",
                    ["model", "TVM", "torch-jit", "ORT", "TVM/torch", "paper", "TVM/ORT", "goal met"],
                    [[resolve_name(r["model"]).short_name.upper(), f"{r['tvm']:.0f}", f"{r['torch-jit']:.0f}", f"{r['onnxruntime']:.0f}",
                      f"{r['tvm_vs_torch']:.2f}", "" if r["paper_tvm_vs_torch"] is None else f"{r['paper_tvm_vs_torch']:.2f}",
                      f"{r['tvm_vs_onnxruntime']:.2f}",
                      ("yes" if r["goal_met"] else "NO") + (" (noisy)" if r["noisy"] else "")] for r in rows],
                    justify_right=set(range(1, 7))))


if __name__ == "__main__":
    sys.exit(main())
