"""CPU throughput, side by side in one process: tuned TVM vs PyTorch vs onnxruntime.

The paper's protocol (supplementary Table 3): batch 16, fp32, one thread, after warm-up.
PyTorch is the BN-folded model traced with ``torch.jit``; onnxruntime runs the ONNX
export with its CPU provider; TVM runs the ``.so`` exported with a tuning database.
Engines take turns round after round, so a change in machine load hits all of them
alike; each engine's figure is its median round, and the speed-ups are ratios of those.

    python benchmarks/cpu_throughput.py m0 m4 --tvm-dir dist/tvm --threads 1 --rounds 7
    python benchmarks/cpu_throughput.py m0 --tvm-dir dist/tvm --untuned-dir dist/untuned --json out.json

Every model needs ``<tvm-dir>/efficientvit_<m>.so`` made at the same batch size, e.g.
``evit-deploy export m0 --target tvm --tvm-target "native -num-cores=1" --batch 16 --db DB --out dist/tvm``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PAPER_PROFILE = "xeon-e5-2690v4"


def timed_rounds(engines: dict, *, rounds: int, min_seconds: float, batch: int) -> dict[str, list[float]]:
    """Images/s of each engine per round; engines alternate within every round."""
    results = {name: [] for name in engines}
    for _ in range(rounds):
        for name, run in engines.items():
            n, start = 0, time.perf_counter()
            while True:
                run()
                n += 1
                elapsed = time.perf_counter() - start
                if elapsed >= min_seconds and n >= 2:
                    break
            results[name].append(batch * n / elapsed)
    return results


def torch_engine(model: str, x: np.ndarray, threads: int):
    import torch

    from evit_deploy.models import create_model

    torch.set_num_threads(threads)
    net = create_model(model, "random", fuse=True).eval()
    xt = torch.from_numpy(x)
    with torch.no_grad():
        jit = torch.jit.trace(net, xt)

    def run():
        with torch.no_grad():
            jit(xt)
    return run


def onnx_engine(model: str, x: np.ndarray, threads: int, workdir: Path):
    import onnxruntime as ort

    from evit_deploy import api

    result = api.export(model, "onnx", out_dir=workdir / model, batch=x.shape[0], verify=False)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(str(result.artifact.path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda: session.run(None, {name: x})


def tvm_engine(library: Path, x: np.ndarray, threads: int):
    """A loaded library as a zero-argument callable (the input is already on the device)."""
    from evit_deploy.targets.tvm.runtime import load

    model = load(library, threads=threads)
    if tuple(model.input_shape) != tuple(x.shape):
        raise SystemExit(f"{library} takes {list(model.input_shape)}, the benchmark feeds {list(x.shape)}")
    xd = model.to_device(x)
    return lambda: model.run_device(xd)


def paper_figures() -> dict:
    from evit_deploy.profiles import load_profile

    paper = load_profile(PAPER_PROFILE).paper
    return {m: (paper["throughput_ips"][m], paper["throughput_tvm_ips"][m]) for m in paper["throughput_ips"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="m0 … m5")
    parser.add_argument("--tvm-dir", type=Path, required=True, help="directory with tuned efficientvit_<m>.so")
    parser.add_argument("--untuned-dir", type=Path, help="also time untuned libraries from this directory")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=2.0, help="minimum time per engine per round")
    parser.add_argument("--json", type=Path, help="write the results as JSON")
    args = parser.parse_args(argv)

    from evit_deploy.models import resolve_name

    paper = paper_figures()
    rows, report = [], {"batch": args.batch, "threads": args.threads, "rounds": args.rounds,
                        "load_before": os.getloadavg(), "models": {}}
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        for short in args.models:
            spec = resolve_name(short)
            x = rng.standard_normal((args.batch, 3, 224, 224)).astype(np.float32)
            engines = {"tvm": tvm_engine(args.tvm_dir / f"{spec.name}.so", x, args.threads),
                       "torch-jit": torch_engine(spec.name, x, args.threads),
                       "onnxruntime": onnx_engine(spec.name, x, args.threads, Path(tmp))}
            for run in engines.values():     # warm-up
                run()
                run()
            per_round = timed_rounds(engines, rounds=args.rounds, min_seconds=args.seconds, batch=args.batch)
            if args.untuned_dir:
                slow = tvm_engine(args.untuned_dir / f"{spec.name}.so", x, args.threads)
                slow()
                per_round["tvm-untuned"] = timed_rounds({"u": slow}, rounds=1, min_seconds=args.seconds,
                                                        batch=args.batch)["u"]
            ips = {k: statistics.median(v) for k, v in per_round.items()}
            short_name = spec.short_name
            paper_ratio = paper[short_name][1] / paper[short_name][0] if short_name in paper else None
            vs_torch, vs_ort = ips["tvm"] / ips["torch-jit"], ips["tvm"] / ips["onnxruntime"]
            goal = (paper_ratio is None or vs_torch >= paper_ratio) and vs_ort > 1.0
            report["models"][spec.name] = {"images_per_s": ips, "rounds": per_round, "tvm_vs_torch": vs_torch,
                                           "tvm_vs_onnxruntime": vs_ort, "paper_tvm_vs_torch": paper_ratio,
                                           "goal_met": goal}
            rows.append([spec.name, ips.get("tvm-untuned"), ips["tvm"], ips["torch-jit"], ips["onnxruntime"],
                         vs_torch, paper_ratio, vs_ort, goal])
            print(f"{spec.name}: " + ", ".join(f"{k} {v:.1f}" for k, v in ips.items()), file=sys.stderr)
    report["load_after"] = os.getloadavg()
    _print_table(rows, args)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


def _print_table(rows, args) -> None:
    from evit_deploy.console import out, table

    def f(v, fmt):
        return "" if v is None else format(v, fmt)

    out.print(table(f"Images/s at batch {args.batch}, {args.threads} thread(s), median of {args.rounds} "
                    f"interleaved rounds (load {os.getloadavg()[0]:.1f})",
                    ["model", "TVM untuned", "TVM tuned", "PyTorch jit", "onnxruntime", "TVM/PyTorch",
                     "paper TVM/PyTorch", "TVM/onnxruntime", "goal met"],
                    [[r[0], f(r[1], ".1f"), f(r[2], ".1f"), f(r[3], ".1f"), f(r[4], ".1f"), f(r[5], ".2f"),
                      f(r[6], ".2f"), f(r[7], ".2f"), "yes" if r[8] else "NO"] for r in rows],
                    justify_right=set(range(1, 8))))


if __name__ == "__main__":
    sys.exit(main())
