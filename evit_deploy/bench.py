"""``evit-deploy bench``: CPU throughput of every deployment path, side by side.

The paper's protocol (supplementary Table 3) by default: BN folded, fp32, batch 16, one
thread, warm-up before timing. Backends (:mod:`evit_deploy.backends`: PyTorch itself and
each target's runtime, in any precision the target exports, and variants with options of
their own) are timed in one process, every model on every backend interleaved in repeated
rounds (the order rotating each round) so that machine drift hits all of them alike;
results are medians with their spread, and each backend's ratio to PyTorch.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .backends import TORCH_BACKENDS, BackendSpec, backend_specs, random_inputs
from .backends import parse_backends  # noqa: F401  (bench.parse_backends, before backends.py)
from .errors import BadInputError, EvitError
from .hostinfo import cpu_info, package_versions
from .models.registry import resolve_name
from .progress import QuietReporter, Reporter, raise_if_interrupted

BASELINE = "torch-jit"          # the paper's PyTorch protocol: fused and jit-traced
NOISY_SPREAD = 0.15             # (p90 - p10) / median above this is flagged as noisy


@dataclass
class BenchRecord:
    model: str
    backend: str
    batch: int
    threads: int
    images_per_s: float | None        # None: rejected
    latency_ms: dict | None           # median, p10, p90, min, max
    iterations: int
    rounds: int
    noisy: bool
    peak_rss_mb: float | None = None
    ratio_to_baseline: float | None = None
    notes: list[str] = field(default_factory=list)    # the artifact's health warnings (Target.health)
    rejected: str | None = None       # why the backend could not be timed (export, parity, CPU, runtime)

    @classmethod
    def rejection(cls, model: str, backend: str, batch: int, threads: int, reason: str) -> "BenchRecord":
        return cls(model, backend, batch, threads, None, None, 0, 0, False, rejected=reason)


@dataclass
class BenchResult:
    records: list[BenchRecord]
    settings: dict
    host: dict = field(default_factory=cpu_info)
    versions: dict = field(default_factory=package_versions)

    def to_dict(self) -> dict:
        return {"settings": self.settings, "host": self.host, "versions": self.versions,
                "records": [{**asdict(r), "cpu": self.host["model"], "versions": self.versions}
                            for r in self.records]}


# -- preparing runnable backends -----------------------------------------------------------

@dataclass
class Prepared:
    """A backend ready to run one batch per call, and what a memory probe needs."""
    run: callable
    artifact: str | None = None
    notes: list[str] = field(default_factory=list)   # warnings about how well it will run


def _torch_runner(model_name: str, backend: str, batch: int, img_size: int, weights, threads: int):
    import torch

    from .models import create_model

    torch.set_num_threads(threads)
    model = create_model(model_name, "random" if weights is None else weights, fuse=True, img_size=img_size)
    x = torch.rand(batch, 3, img_size, img_size)
    if backend == "torch-jit":
        import warnings
        with torch.no_grad(), warnings.catch_warnings():
            # The trace specialises the Python shape checks to this input size, as intended.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            model = torch.jit.freeze(torch.jit.trace(model, x))

    def run():
        torch.set_num_threads(threads)   # other backends share the process
        with torch.no_grad():
            model(x)
    return run


def _model_entry(model: str, weights: dict) -> tuple[str, str, object]:
    """(label, family member, weights) of a model argument: ``m4``, or a checkpoint file
    that records its architecture (a pruned one: label ``efficientvit_m4@<file stem>``)."""
    path = Path(model)
    if path.suffix in (".pth", ".pt", ".safetensors"):
        if not path.is_file():
            raise BadInputError(f"checkpoint not found: {path}")
        from .models.checkpoint import read_checkpoint

        architecture = read_checkpoint(path)[2]
        if architecture is None:
            raise BadInputError(f"{path} records no architecture: give the model's name and the file as its "
                                f"weights")
        return f"{architecture['model']}@{path.stem}", architecture["model"], str(path)
    name = resolve_name(model).name
    return name, name, weights.get(name)


def prepare(model_name: str, backend: BackendSpec, *, batch: int, threads: int, img_size: int = 224, weights=None,
            workdir: Path, reporter: Reporter | None = None) -> Prepared:
    if backend.is_torch:
        return Prepared(_torch_runner(model_name, backend.runtime, batch, img_size, weights, threads))
    result = backend.export(model_name, batch=batch, img_size=img_size, weights=weights,
                            out_dir=workdir / backend.name.replace(":", "-").replace("@", "-"), reporter=reporter)
    artifact = result.artifact
    tgt = backend.get_target()
    session = tgt.open_session(artifact.path, threads=threads)
    inputs = random_inputs(artifact.description, batch)
    session(inputs)                  # a runtime that fails, fails here rather than in the timing
    notes = [f.message for f in tgt.health(artifact.path, artifact.description) if f.level != "ok"]
    return Prepared(lambda: session(inputs), artifact=str(artifact.path), notes=notes)


def rejection_reason(exc: BaseException, *, files_kept: bool) -> str:
    """One line on why a backend could not be timed. Where a rejected export's files are
    is said only when they are kept (``--artifacts``), not in a temporary directory."""
    from .errors import ParityError, first_line, named_first_line

    if isinstance(exc, ParityError) and exc.report is not None and not files_kept:
        return exc.report.summary()
    if isinstance(exc, EvitError):
        return first_line(exc)
    return named_first_line(exc)


# -- timing --------------------------------------------------------------------------------

def _summarise(latencies: list[float]) -> dict:
    arr = np.asarray(latencies) * 1000.0
    return {"median": float(np.median(arr)), "p10": float(np.percentile(arr, 10)),
            "p90": float(np.percentile(arr, 90)), "min": float(arr.min()), "max": float(arr.max())}


def time_interleaved(runners: dict[str, callable], *, rounds: int, round_seconds: float,
                     warmup_seconds: float, min_iterations: int = 2, task=None) -> dict[str, list[list[float]]]:
    """Latencies (s) per backend per round; the backend order rotates every round."""
    names = list(runners)
    for name in names:                    # warm-up: caches, allocators, thread pools
        end = time.perf_counter() + warmup_seconds
        runners[name]()
        while time.perf_counter() < end:
            runners[name]()
    samples = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            lat = []
            end = time.perf_counter() + round_seconds
            while len(lat) < min_iterations or time.perf_counter() < end:
                start = time.perf_counter()
                runners[name]()
                lat.append(time.perf_counter() - start)
            samples[name].append(lat)
            if task is not None:
                task.update(advance=1)
    return samples


def bench(models: list[str], backends: list[str] | None = None, *, batch: int = 16, threads: int = 1,
          img_size: int = 224, rounds: int = 5, round_seconds: float = 1.0, warmup_seconds: float = 1.0,
          weights: dict | None = None, target_options: dict | None = None, memory: bool = True,
          artifacts_dir: str | os.PathLike | None = None, reporter: Reporter | None = None) -> BenchResult:
    """Benchmark ``models`` on ``backends``; see the module docstring for the protocol.

    ``backends`` are names (:class:`~evit_deploy.backends.BackendSpec`); ``target_options``
    maps a target (or a variant, ``tvm@tuned``) to export options (``{"tvm": {"db": ...}}``);
    ``weights`` maps a model to a checkpoint (speed does not depend on the values).
    A backend that cannot be prepared (export, parity, this CPU, its runtime) is a
    rejected record with its reason; :class:`EvitError` only when every backend was.
    ``artifacts_dir`` keeps the exported artifacts (and rejected ones) there instead of in
    a temporary directory.
    """
    reporter = reporter or Reporter()
    if batch < 1 or threads < 1 or rounds < 1:
        raise BadInputError("batch, threads and rounds must be at least 1")
    specs = backend_specs(backends or [*TORCH_BACKENDS, "onnxruntime"], target_options)
    backends = [spec.name for spec in specs]
    entries = [_model_entry(m, weights or {}) for m in models]
    names = [label for label, _, _ in entries]
    records: list[BenchRecord] = []
    failures: list[EvitError] = []
    with contextlib.ExitStack() as stack:
        workdir = Path(artifacts_dir) if artifacts_dir is not None else \
            Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="evit-bench-")))
        prepared: dict[tuple[str, str], Prepared] = {}
        for model, family, model_weights in entries:
            for spec in specs:
                backend = spec.name
                try:
                    with reporter.stage("prepare", f"{model} {backend}"):
                        prepared[model, backend] = prepare(
                            family, spec, batch=batch, threads=threads, img_size=img_size, weights=model_weights,
                            workdir=workdir / model.replace("@", "-"), reporter=QuietReporter())
                except (KeyboardInterrupt, SystemExit):
                    raise
                except Exception as exc:  # one backend's failure is a row of the result, not the end of it
                    raise_if_interrupted()
                    reason = rejection_reason(exc, files_kept=artifacts_dir is not None)
                    reporter.warn(f"{model} {backend}: rejected: {reason}")
                    records.append(BenchRecord.rejection(model, backend, batch, threads, reason))
                    failures.append(exc if isinstance(exc, EvitError) else EvitError(reason))
                    continue
                for note in prepared[model, backend].notes:
                    reporter.warn(f"{model} {backend}: {note}")
        # Every model on every backend in one interleaved run: a ratio between two models
        # (a pruned one and its original) is as fair as one between two backends.
        samples = {}
        if prepared:
            with reporter.task("timing", total=rounds * len(prepared)) as task:
                samples = time_interleaved({key: p.run for key, p in prepared.items()}, rounds=rounds,
                                           round_seconds=round_seconds, warmup_seconds=warmup_seconds, task=task)
        for model, family, model_weights in entries:
            for spec in specs:
                if (model, spec.name) not in prepared:
                    continue
                peak = None
                if memory:
                    with reporter.stage("memory", f"{model} {spec.name}"):
                        peak = peak_rss_mb(family, spec, prepared[model, spec.name], batch=batch, threads=threads,
                                           img_size=img_size, weights=model_weights)
                rounds_ = samples[model, spec.name]
                summary = _summarise([x for round_ in rounds_ for x in round_])
                round_medians = [statistics.median(r) for r in rounds_]
                spread = (summary["p90"] - summary["p10"]) / summary["median"]
                drift = (max(round_medians) - min(round_medians)) / statistics.median(round_medians)
                records.append(BenchRecord(model, spec.name, batch, threads, batch / (summary["median"] / 1000.0),
                                           summary, sum(map(len, rounds_)), rounds,
                                           spread > NOISY_SPREAD or drift > NOISY_SPREAD, peak,
                                           notes=prepared[model, spec.name].notes))
    if all(r.rejected for r in records):
        raise failures[0]
    order = {b: i for i, b in enumerate(backends)}
    records.sort(key=lambda r: (names.index(r.model), order[r.backend]))
    by_model: dict[str, dict[str, BenchRecord]] = {}
    for r in records:
        by_model.setdefault(r.model, {})[r.backend] = r
    baseline = BASELINE if BASELINE in backends else backends[0]
    for group in by_model.values():
        base = group[baseline].images_per_s
        for r in group.values():
            if base is not None and r.images_per_s is not None:
                r.ratio_to_baseline = r.images_per_s / base
    settings = {"batch": batch, "threads": threads, "img_size": img_size, "rounds": rounds,
                "round_seconds": round_seconds, "warmup_seconds": warmup_seconds, "backends": backends,
                "baseline": baseline, "bn_folded": True,
                "precisions": {spec.name: spec.precision for spec in specs},
                "options": {spec.name: dict(spec.options) for spec in specs if not spec.is_torch},
                "env_threads": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                                               "TVM_NUM_THREADS") if os.environ.get(k)}}
    return BenchResult(records, settings)


# -- memory --------------------------------------------------------------------------------

def peak_rss_mb(model: str, backend: BackendSpec, prepared: Prepared, *, batch: int, threads: int,
                img_size: int, weights=None) -> float | None:
    """Peak resident memory of a fresh process that loads the backend and runs it.

    Measured apart from the timing process, whose own peak covers every backend at once;
    artifact backends load only their runtime (no torch), as an application would.
    """
    spec = {"model": model, "runtime": backend.runtime, "target": backend.target, "artifact": prepared.artifact,
            "batch": batch, "threads": threads, "img_size": img_size,
            "weights": str(weights) if isinstance(weights, (str, Path)) else None}
    proc = subprocess.run([sys.executable, "-m", "evit_deploy.bench", json.dumps(spec)], capture_output=True,
                          text=True, timeout=600)
    if proc.returncode != 0:
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss_mb"]


def _memory_probe(spec: dict) -> float:
    import resource

    if spec["artifact"] is None:
        run = _torch_runner(spec["model"], spec["runtime"], spec["batch"], spec["img_size"], spec.get("weights"),
                            spec["threads"])
    else:
        from .targets import get_target
        tgt = get_target(spec["target"])
        description = tgt.read_description(Path(spec["artifact"]))
        session = tgt.open_session(Path(spec["artifact"]), threads=spec["threads"])
        inputs = random_inputs(description, spec["batch"])
        run = lambda: session(inputs)  # noqa: E731
    for _ in range(3):
        run()
    try:
        # VmHWM is this process image's own peak. ru_maxrss is not: Linux carries it over
        # from the parent across fork+exec, so it would report the benchmark process.
        with open("/proc/self/status", encoding="ascii") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024.0
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# -- reporting -----------------------------------------------------------------------------

def plot(result: BenchResult, path: str | os.PathLike) -> Path:
    """Grouped bars of images/s per model and backend (PNG), written atomically."""
    from .charts import pyplot, save_png

    plt = pyplot()
    models = list(dict.fromkeys(r.model for r in result.records))
    backends = result.settings["backends"]
    width = 0.8 / len(backends)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(models) + 2), 4.5), dpi=120)
    for i, backend in enumerate(backends):
        values = [next((r.images_per_s or 0 for r in result.records if r.model == m and r.backend == backend), 0)
                  for m in models]
        bars = ax.bar([x + i * width for x in range(len(models))], values, width, label=backend)
        for bar, m in zip(bars, models):
            rec = next((r for r in result.records if r.model == m and r.backend == backend), None)
            if rec and rec.ratio_to_baseline and backend != result.settings["baseline"]:
                ax.annotate(f"{(rec.ratio_to_baseline - 1) * 100:+.0f}%", (bar.get_x() + bar.get_width() / 2,
                            bar.get_height()), ha="center", va="bottom", fontsize=7)
    ax.set_xticks([x + width * (len(backends) - 1) / 2 for x in range(len(models))])
    ax.set_xticklabels([resolve_name(m.split("@")[0]).display_name + (f" ({m.split('@')[1]})" if "@" in m else "")
                        for m in models])
    ax.set_ylabel("images / s")
    s = result.settings
    ax.set_title(f"Throughput, batch {s['batch']}, {s['threads']} thread(s) — {result.host['model']}", fontsize=9)
    ax.legend(fontsize=8)
    return save_png(fig, path)


if __name__ == "__main__":   # memory probe, run in a fresh process by peak_rss_mb()
    print(json.dumps({"peak_rss_mb": _memory_probe(json.loads(sys.argv[1]))}))
