"""Do M0-M5 export to the Android targets, pass parity, and run whole in XNNPACK?

Each model gets realistic weights (``parity_noise.realistic_checkpoint``), is exported at
224x224 to LiteRT and ExecuTorch in each precision asked for, and is verified by the
export itself under the parity engine's tolerance class for that precision. The table
gives, per artifact: whether parity passed, the worst input's error over its limit (1.0
is the limit), the largest error relative to the output scale, and the operators left
outside XNNPACK as the artifact's description records them. A correctness run, not a
timing run.

    python benchmarks/android_check.py                                # M0-M5, both targets, all precisions
    python benchmarks/android_check.py m0 m4 --targets litert --precisions fp32 --json android.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path

from parity_noise import realistic_checkpoint

TARGETS = ("litert", "executorch")
PRECISIONS = ("fp32", "fp16", "int8")      # int8: calibrated on the default set


def check(model: str, target: str, precision: str, weights: Path, workdir: Path) -> dict:
    from evit_deploy import api
    from evit_deploy.errors import EvitError, ParityError
    from evit_deploy.progress import QuietReporter

    row = {"model": model, "target": target, "precision": precision}
    delegation = None
    try:
        result = api.export(model, target, out_dir=workdir / f"{model}-{target}-{precision}", weights=weights,
                            options={"precision": precision}, reporter=QuietReporter())
        report = result.report
        delegation = result.artifact.description.extra[target]["delegation"]
    except ParityError as exc:          # a failed artifact is kept aside; its figures are in the report
        report = exc.report
    except EvitError as exc:
        return {**row, "passed": False, "error": str(exc)}
    # Only the inputs the class judges (int8: the photos, not the seeded noise).
    per_input = [r for o in report.outputs for r in o.per_input if r["limit"] > 0 and r["judged"]]
    return {**row, "passed": report.passed,
            "error_over_limit": max(r["artifact"] / r["limit"] for r in per_input),
            "max_rel": max(o.max_rel for o in report.outputs),
            "ops_outside_xnnpack": delegation and delegation["ops_outside_xnnpack"],
            "summary": report.summary()}

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="*", default=[f"m{i}" for i in range(6)])
    parser.add_argument("--targets", nargs="+", default=list(TARGETS), choices=TARGETS)
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")

    from evit_deploy.console import out, table
    from evit_deploy.hostinfo import cpu_info

    rows = []
    with tempfile.TemporaryDirectory(prefix="evit-android-check-") as tmp:
        for model in args.models:
            weights = realistic_checkpoint(model, args.seed, Path(tmp) / f"{model}.pth")
            for target in args.targets:
                for precision in args.precisions:
                    rows.append(check(model, target, precision, weights, Path(tmp)))
                    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)

    def outside(r):
        ops = r.get("ops_outside_xnnpack")
        return "-" if ops is None else ", ".join(f"{n} {k}" for k, n in ops.items()) or "none"

    out.print(table(f"Android targets at 224x224, realistic weights (seed {args.seed}) — {cpu_info()['model']}",
                    ["model", "target", "precision", "passed", "error/limit", "max rel", "outside XNNPACK"],
                    [[r["model"], r["target"], r["precision"], "yes" if r["passed"] else "NO",
                      f"{r['error_over_limit']:.3f}" if "error_over_limit" in r else r.get("error", "-"),
                      f"{r['max_rel']:.2e}" if "max_rel" in r else "-", outside(r)] for r in rows],
                    justify_right={4, 5}))
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "host": cpu_info()}, indent=1))
    return 0 if all(r["passed"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
