"""Do the bf16 kernels' tiles pay? Every schedule variant of a model's bf16 1x1
convolutions, each kernel alone, side by side.

For the kernels a ``--precision bf16`` TVM library computes in bf16
(``schedules/gemm_bf16.py``): each variant the class offers the target CPU (AMX tiles of
16 consecutive pixels, AMX tiles of whole rows, vdpbf16ps register blocks), built and
timed as the tuner builds and times its candidates (one thread, the best of 5 runs of at
least 40 ms), the default (the first variant, what a library without tuning gets)
marked. The README's figures on tile shapes come from here.

    python benchmarks/bf16_kernels.py m4 --batch 16 --top 6
    python benchmarks/bf16_kernels.py m0 --img-size 112 --json kernels.json

The target must be this CPU's kind (the kernels run here): ``native`` by default.
"""

from __future__ import annotations

import sys


def measure_kernel(kernel, target, facts, builder, runner) -> list[dict]:
    """Each variant's time per call, in variant order."""
    from evit_deploy.targets.tvm import metaschedule, schedules
    from evit_deploy.targets.tvm.measure import remove_artifact

    labelled = schedules.labelled_candidates(kernel.mod, facts, metaschedule.postprocs(kernel, target))
    built = builder.build([c for _, c in labelled], target)
    runs = runner.run([(c, path) for (_, c), (path, _) in zip(labelled, built) if path])
    times = iter(runs)
    rows = []
    for (variant, _), (path, error) in zip(labelled, built):
        seconds, error = next(times) if path else (None, error)
        remove_artifact(path)
        rows.append({"variant": list(variant), "ms": None if seconds is None else seconds * 1e3,
                     "gflops": None if seconds is None else kernel.flops / seconds / 1e9, "error": error})
    return rows


def main() -> int:
    from rich.console import Console
    from rich.table import Table
    from tvm import s_tir

    from evit_deploy import benchkit
    from evit_deploy.hostinfo import cpu_info
    from evit_deploy.targets.tvm import graph, metaschedule, schedules
    from evit_deploy.targets.tvm.measure import Builder, Runner, settings_for_machine
    from evit_deploy.targets.tvm.schedules import gemm_bf16
    from evit_deploy.targets.tvm.schedules.facts import CpuFacts
    from evit_deploy.targets.tvm.target_string import resolve_target, to_classic, to_tvm
    from evit_deploy.tracing import trace

    parser = benchkit.parser(__doc__, models=("m4",))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--top", type=int, default=6, help="the largest kernels of each model (work per call)")
    parser.add_argument("--tvm-target", default="native -num-cores=1")
    args = parser.parse_args()
    benchkit.quiet()
    resolved = resolve_target(args.tvm_target)
    target = to_tvm(resolved)
    facts = CpuFacts.for_target(target)
    settings = settings_for_machine(1)
    builder, runner = Builder(settings), Runner(settings)
    print(f"CPU {cpu_info()['model']}, TVM target {to_classic(resolved)}, batch {args.batch}, {settings.describe()}",
          flush=True)
    results = []
    try:
        for model in args.models:
            program = trace(model, batch=args.batch, img_size=args.img_size).program
            mod = graph.prepare(graph.import_program(program), target, precision="bf16")
            kernels = [k for k in metaschedule.extract_kernels(mod, target)
                       if schedules.kernel_class(k.mod, facts) is gemm_bf16]
            for kernel in sorted(kernels, key=lambda k: -k.flops)[:args.top]:
                conv = gemm_bf16.match(s_tir.Schedule(kernel.mod))
                shape = f"{conv.n}x{conv.h}x{conv.w}, {conv.c} -> {conv.f}"
                rows = measure_kernel(kernel, target, facts, builder, runner)
                results.append({"model": model, "kernel": kernel.name, "shape": shape, "variants": rows})
                print(f"{model} {kernel.name} ({shape}): " + ", ".join(
                    f"{tuple(r['variant'])} {r['ms']:.3f} ms" if r["ms"] else f"{tuple(r['variant'])} failed"
                    for r in rows), flush=True)
    finally:
        builder.shutdown()
        runner.shutdown()
    table = Table(title=f"bf16 1x1 convolutions, each variant alone (ms per call; GFLOP/s), batch {args.batch}")
    for column in ("model", "kernel (images x map, channels)", "default", "fastest", "default / fastest"):
        table.add_column(column)
    for r in results:
        timed = [v for v in r["variants"] if v["ms"]]
        if not timed:
            continue
        default, fastest = timed[0], min(timed, key=lambda v: v["ms"])
        table.add_row(r["model"], f"{r['kernel']} ({r['shape']})",
                      f"{tuple(default['variant'])} {default['ms']:.3f} ({default['gflops']:.0f})",
                      f"{tuple(fastest['variant'])} {fastest['ms']:.3f} ({fastest['gflops']:.0f})",
                      f"{default['ms'] / fastest['ms']:.2f}")
    Console().print(table)
    benchkit.write_json(args.json, {"cpu": cpu_info()["model"], "target": to_classic(resolved), "batch": args.batch,
                                    "kernels": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
