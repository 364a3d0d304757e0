"""The command the TVM target adds to the CLI: ``evit-deploy tune``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..base import CommandResult


def tune_command(model: str = typer.Argument("m0", help="m0 … m5"),
                 tvm_target: Optional[str] = typer.Option(None, "--tvm-target",
                                                          help="TVM target: 'llvm -mcpu=broadwell [-num-cores=N]', "
                                                          "JSON, or native (the default). --target: its deprecated alias."),
                 old_target: Optional[str] = typer.Option(None, "--target", "-t", hidden=True,
                                                          help="Deprecated alias of --tvm-target."),
                 trials: Optional[int] = typer.Option(None, "--trials", min=1, help="Candidates to measure in this run."),
                 time_budget: Optional[str] = typer.Option(None, "--time-budget",
                                                           help="Wall-clock budget: 90s, 30m, 1h30m."),
                 db: Optional[Path] = typer.Option(None, "--db", help="Tuning database directory "
                                                   "(default: tvm-tuning/<target>); re-running continues it."),
                 batch: int = typer.Option(16, "--batch", min=1, help="Batch size the kernels are tuned for."),
                 threads: Optional[int] = typer.Option(None, "--threads", min=1,
                                                       help="Threads the kernels use (sets the target's num-cores)."),
                 img_size: int = typer.Option(224, "--img-size", help="Input resolution (multiple of 16)."),
                 rpc_tracker: Optional[str] = typer.Option(None, "--rpc-tracker", help="HOST:PORT of a TVM RPC "
                                                           "tracker: measure on its devices."),
                 rpc_key: Optional[str] = typer.Option(None, "--rpc-key", help="Key the devices registered with."),
                 start_from: Optional[Path] = typer.Option(None, "--from", help="Another tuning database (made for "
                                                           "another CPU, say): its best schedules are measured here "
                                                           "first, a head start."),
                 precision: str = typer.Option("fp32", "--precision", help="fp32, or bf16: the kernels of a "
                                               "bf16 library (export --precision bf16)."),
                 *, reporter) -> CommandResult:
    """Tune a model's kernels for a TVM target (MetaSchedule) into a tuning database."""
    from ...console import table
    from .tune import tune

    target = _tvm_target(tvm_target, old_target, reporter)
    result = tune(model, target, trials=trials, time_budget=time_budget, db_dir=db, batch=batch, threads=threads,
                  img_size=img_size, rpc_tracker=rpc_tracker, rpc_key=rpc_key, start_from=start_from,
                  precision=precision, reporter=reporter)
    est = (f"{result.estimated_latency_ms:.2f} ms per batch of {result.input_shape[0]} "
           f"(≈ {result.estimated_images_per_s:.0f} images/s, kernels only)" if result.estimated_latency_ms
           else "not yet: some kernels have no measurement")
    rows = [["database", str(result.db_path)], ["target", result.target_string],
            ["model", f"{result.model} {'x'.join(map(str, result.input_shape))}"],
            ["kernels", f"{result.kernels} ({result.hand_written_kernels} best with a hand-written schedule)"],
            ["trials", f"{result.trials} in this run, {result.total_trials} in all"],
            ["time", f"{result.seconds / 60:.1f} min (stopped: {result.stopped})"],
            ["measured on", result.measured_on], ["estimated latency", est],
            ["errors", result.errors], ["log", str(result.log_path)]]
    warnings = ([f"{result.errors} candidates failed to build or run; see {result.log_path}"]
                if result.errors else [])
    return CommandResult(result.to_dict(), [table("Tuning", ["", ""], rows)], warnings)


def _tvm_target(tvm_target: str | None, old_target: str | None, reporter) -> str:
    """``--tvm-target``, or its alias ``--target`` (kept for one release: in ``export``,
    ``--target`` names the evit-deploy target)."""
    from ...errors import BadInputError

    if old_target is None:
        return tvm_target or "native"
    if tvm_target is not None:
        raise BadInputError("give the TVM target once: --tvm-target (--target is its deprecated alias)")
    reporter.warn("tune --target is deprecated and will be removed: use --tvm-target")
    return old_target
