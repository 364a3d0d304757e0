"""Does ``tune --from OTHER_DB`` converge faster than tuning from nothing?

Goal 4 of the TVM issue: a database made for another CPU is a head start. This script
tunes one model twice for the same target and the same time budget, into two fresh
databases: once from nothing (the default schedules first, then the search) and once
``--from`` the other database (its best schedule of each kernel measured beside the
default in the first rounds). Then the two libraries are timed side by side
(``evit-deploy bench``'s interleaved rounds): converging faster means the library tuned
``--from`` the other database is the faster one after the same budget; the script exits
1 when it is not.

Each run also records its estimated model latency after every round (``curve`` in
``tune --json`` and in the database's run record), shown at fractions of the budget. Those
come from two runs one after the other, so a machine whose speed drifts between them
(seen here: 5-7% within minutes) moves them; the side-by-side timing is the verdict.

    evit-deploy tune m0 --target "llvm -mcpu=skylake-avx512 -num-cores=1" --time-budget 5m --db other
    python benchmarks/tune_convergence.py m0 --from other --budget 4m --json convergence.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path

FRACTIONS = (0.25, 0.5, 0.75, 1.0)


def estimate_at(curve: list[list[float]], seconds: float) -> float | None:
    """The estimate (ms) the run had reached ``seconds`` into it (None: not yet one)."""
    reached = [ms for t, _, ms in curve if t <= seconds]
    return min(reached) if reached else None


def first_reaching(curve: list[list[float]], target_ms: float) -> float | None:
    """Seconds into the run when its estimate first reached ``target_ms`` (None: never)."""
    return next((t for t, _, ms in curve if ms <= target_ms), None)


def compare(scratch: dict, head_start: dict, budget_s: float) -> dict:
    """The two runs' estimates over time and when each reached the from-nothing run's final one."""
    final = scratch["curve"][-1][2] if scratch["curve"] else None
    rows = [{"fraction": f, "seconds": round(f * budget_s),
             "from_nothing_ms": estimate_at(scratch["curve"], f * budget_s),
             "from_other_db_ms": estimate_at(head_start["curve"], f * budget_s)} for f in FRACTIONS]
    return {"rows": rows, "final_from_nothing_ms": final, "seconds_to_reach_it": {
        "from_nothing": first_reaching(scratch["curve"], final) if final else None,
        "from_other_db": first_reaching(head_start["curve"], final) if final else None}}


def side_by_side(model: str, databases: dict[str, Path], batch: int, reporter) -> dict[str, float]:
    """Images/s of the library built from each database, timed in interleaved rounds."""
    from evit_deploy.bench import bench

    options = {f"tvm@{label}": {"db": str(db), "tvm_target": None} for label, db in databases.items()}
    result = bench([model], list(options), batch=batch, threads=1, rounds=7, round_seconds=2.0,
                   target_options=options, memory=False, reporter=reporter)
    return {r.backend.partition("@")[2]: r.images_per_s for r in result.records}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="m0 … m5")
    parser.add_argument("--from", dest="other", type=Path, required=True, help="the other CPU's tuning database")
    parser.add_argument("--target", default="native -num-cores=1", help="the target both runs tune for")
    parser.add_argument("--budget", default="4m", help="time budget of each run (90s, 4m, ...)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--json", type=Path, help="write both runs and the verdict as JSON")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)

    from rich.console import Console
    from rich.table import Table

    from evit_deploy.console import RichReporter
    from evit_deploy.errors import EvitError
    from evit_deploy.hostinfo import cpu_info
    from evit_deploy.targets.tvm.tune import parse_duration, tune

    budget_s = parse_duration(args.budget)
    runs, reporter = {}, RichReporter()
    try:
        with tempfile.TemporaryDirectory(prefix="evit-convergence-") as tmp:
            databases = {"from_nothing": Path(tmp) / "from_nothing", "from_other_db": Path(tmp) / "from_other_db"}
            for label, start_from in (("from_nothing", None), ("from_other_db", args.other)):
                result = tune(args.model, args.target, time_budget=budget_s, db_dir=databases[label],
                              batch=args.batch, start_from=start_from, reporter=reporter)
                runs[label] = {"trials": result.trials, "seconds": round(result.seconds, 1),
                               "estimated_latency_ms": result.estimated_latency_ms, "curve": result.curve}
            speed = side_by_side(args.model, databases, args.batch, reporter)
    except EvitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    verdict = compare(runs["from_nothing"], runs["from_other_db"], budget_s)
    verdict["images_per_s"] = speed
    met = speed["from_other_db"] > speed["from_nothing"]
    verdict["from_other_db_converges_faster"] = met

    cpu = cpu_info().get("model", "this CPU")
    table = Table(title=f"Estimated latency (ms per batch of {args.batch}) while tuning {args.model} for "
                        f"'{args.target}', {args.budget} each — {cpu}")
    for column in ("into the run", "from nothing", f"--from {args.other.name}"):
        table.add_column(column, justify="right")
    for row in verdict["rows"]:
        table.add_row(f"{row['seconds']} s", *(f"{row[k]:.2f}" if row[k] else "-"
                                               for k in ("from_nothing_ms", "from_other_db_ms")))
    times = verdict["seconds_to_reach_it"]
    table.add_row("reached the from-nothing run's final estimate after",
                  *(f"{times[k]:.0f} s" if times[k] is not None else "never" for k in ("from_nothing", "from_other_db")))
    table.add_row("library, images/s side by side", *(f"{speed[k]:.1f}" for k in ("from_nothing", "from_other_db")))
    console = Console()
    console.print(table)
    console.print(f"goal 4 (--from converges faster than from nothing, same budget, timed side by side): "
                  f"{'met' if met else 'NOT met'} ({speed['from_other_db'] / speed['from_nothing']:.3f}x)")
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "target": args.target, "budget_s": budget_s,
                                         "batch": args.batch, "other_db": str(args.other), "cpu": cpu,
                                         "runs": runs, **verdict}, indent=2))
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
