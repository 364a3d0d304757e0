"""``evit-deploy optimize``: the fastest artifact that is right on this machine, chosen by
measurement within an accuracy budget.

Every target × precision this CPU can run is a candidate (what it cannot run is listed with
the reason), and so is what a target makes faster with time when asked (``--tune``: a
target's :meth:`~evit_deploy.targets.base.Target.tuned_options`, TVM's tuned kernels);
onnxruntime fp32 is the baseline. Each candidate is exported and verified here in its
parity class, evaluated against the fp32 PyTorch model on the images
(:mod:`evit_deploy.evaluation`), and the survivors are timed with ``bench``'s protocol,
interleaved with the baseline in one process, so that every ratio comes from one run. The
fastest candidate within the budget wins; one that fails parity or the budget, or fails
to run, is never chosen, and the report says why.

A rerun reuses what an earlier one made in the same output directory (exports with their
parity reports, evaluations, tuning databases), keyed on everything each is made from, as
``build`` does. The choice is written so that CI can rebuild exactly it
(``from = "optimize.json"`` in a build file's ``[[artifact]]``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import statistics
import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from .backends import BackendSpec, random_inputs, target_backends
from .errors import BadInputError, EvitError, OutputError, ParityError, first_line, named_first_line
from .fsutil import (ensure_output_dir, exclusive_lock, publish_together, remove, sha256_file, temp_sibling,
                     tree_sha256, write_json_atomic)
from .progress import QuietReporter, Reporter, raise_if_interrupted

RESULT_FILE = "optimize.json"
CHART_FILE = "optimize.png"
CACHE_DIR = ".evit-optimize-cache"
BASELINE = "onnxruntime"
#: Without --min-top1-agreement or --max-top1-drop: what "right" means for the choice.
DEFAULT_MIN_AGREEMENT = 0.99
#: With --tune, the share of --time-budget given to tuning (10 minutes without a budget).
TUNE_SHARE, TUNE_SECONDS = 0.4, 600.0
OBJECTIVES = ("throughput", "latency")
#: How many of the fastest candidates are timed again, head to head, before the choice.
FINALISTS = 3


class Outcome(Enum):
    CHOSEN = "chosen"
    RUNNER_UP = "runner-up"
    ADMISSIBLE = "admissible"          # right and within the budget, not the fastest
    DROPPED = "dropped"                # failed parity, the budget, or to run: never chosen
    REFUSED = "refused"                # this CPU or installation cannot make or run it
    NOT_TRIED = "not tried"            # the time budget ran out first


@dataclass
class Candidate:
    """One artifact optimize considers, and what was measured of it."""

    backend: str                       # as bench names it: onnxruntime:int8, tvm@tuned
    target: str | None
    precision: str
    options: dict                      # its export options
    outcome: Outcome = Outcome.NOT_TRIED
    reason: str | None = None          # why dropped, refused or not tried
    artifact: str | None = None
    bytes: int | None = None           # what an app ships: the artifact's files
    export_seconds: float | None = None
    load_seconds: float | None = None
    parity: dict | None = None         # precision, passed, max error, cosine, summary
    eval: dict | None = None           # top-1 agreement, top-5 overlap, accuracy with labels
    images_per_s: float | None = None
    latency_ms: dict | None = None     # median, p10, p90 of one batch
    ratio_to_baseline: float | None = None
    noisy: bool | None = None
    peak_rss_mb: float | None = None
    reused: bool = False               # export and evaluation came from an earlier run

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["outcome"] = self.outcome.value
        return data


@dataclass
class OptimizeResult:
    model: str
    settings: dict
    machine: dict
    candidates: list[Candidate]
    winner: str | None = None          # backend name
    runner_up: str | None = None
    artifact: str | None = None        # the winner's file under the output directory
    build_entry: dict | None = None    # the [[artifact]] entry of a build file that rebuilds the winner
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)

    def candidate(self, backend: str) -> Candidate:
        return next(c for c in self.candidates if c.backend == backend)

    def to_dict(self) -> dict:
        return {"model": self.model, "settings": self.settings, "machine": self.machine, "winner": self.winner,
                "runner_up": self.runner_up, "artifact": self.artifact, "build_entry": self.build_entry,
                "seconds": round(self.seconds, 1), "warnings": self.warnings,
                "candidates": [c.to_dict() for c in self.candidates]}


@dataclass(frozen=True)
class Budget:
    """What a candidate must keep of the fp32 model to be chosen."""

    min_top1_agreement: float | None = None
    max_top1_drop: float | None = None          # a fraction (0.005 = half a point of top-1 accuracy)

    def failures(self, found: dict) -> list[str]:
        failed = []
        if self.min_top1_agreement is not None and found["top1_agreement"] < self.min_top1_agreement:
            failed.append(f"top-1 agreement {found['top1_agreement']:.4f} < {self.min_top1_agreement:g} on "
                          f"{found['images']} images")
        if self.max_top1_drop is not None and found["top1_drop"] > self.max_top1_drop:
            failed.append(f"top-1 accuracy drop {found['top1_drop'] * 100:.2f} points > "
                          f"{self.max_top1_drop * 100:g} on {found['images']} images")
        return failed

    def describe(self) -> str:
        if self.max_top1_drop is not None:
            return f"top-1 accuracy drop at most {self.max_top1_drop * 100:g} points"
        return f"top-1 agreement with fp32 at least {self.min_top1_agreement:g}"


def optimize(model: str, out_dir, *, weights=None, images=None, labels=None, min_top1_agreement: float | None = None,
             max_top1_drop: float | None = None, batch: int | None = None, threads: int = 1, img_size: int = 224,
             input_size: tuple[int, int] | None = None, targets=None, precisions=None, time_budget=None,
             tune: bool = False, objective: str = "throughput", rounds: int = 5, round_seconds: float = 1.0,
             memory: bool = True, seed: int = 0, reporter: Reporter | None = None) -> OptimizeResult:
    """Choose the fastest artifact of ``model`` that is right on this machine (see the
    module docstring); the winner and ``optimize.json`` are written into ``out_dir``.

    ``max_top1_drop`` is a fraction and needs labelled ``images``; without either budget,
    top-1 agreement with fp32 must be at least :data:`DEFAULT_MIN_AGREEMENT`. ``batch``
    defaults to 16 for the throughput objective and 1 for latency. ``time_budget`` is
    seconds or ``"20m"``: what was not tried when it ran out is listed.
    """
    from .evaluation import eval_images
    from .hostinfo import cpu_info, package_versions
    from .plan import plan_export, resolve_model_name, trace_plan
    from .cpufeatures import host_cpu

    reporter = reporter or Reporter()
    started = time.monotonic()
    if objective not in OBJECTIVES:
        raise BadInputError(f"--objective must be throughput or latency, got '{objective}'")
    batch = (16 if objective == "throughput" else 1) if batch is None else batch
    if batch < 1 or threads < 1 or rounds < 1:
        raise BadInputError("batch, threads and rounds must be at least 1")
    budget = _budget(min_top1_agreement, max_top1_drop)
    chosen_images = eval_images(images, labels)
    if budget.max_top1_drop is not None and chosen_images.labels is None:
        raise BadInputError("--max-top1-drop needs labelled images: --images DIR/<synset>/... or --labels FILE")
    seconds = _seconds(time_budget)
    deadline = started + seconds if seconds is not None else None
    name = resolve_model_name(model)
    out = ensure_output_dir(out_dir)
    cache = out / CACHE_DIR
    with exclusive_lock(out, f"{out} is being written by another `evit-deploy optimize` or `build`: wait for it "
                             f"to finish, or choose another --out"):
        plan_args = {"batch": batch, "weights": weights, "img_size": img_size, "input_size": input_size, "seed": seed}
        candidates = _candidates(name, targets, precisions, plan_args)
        if tune:
            _add_tuned(candidates, name, plan_args, threads, _tuning_seconds(seconds), cache, reporter)
        settings = {"batch": batch, "threads": threads, "img_size": img_size, "input_size": input_size,
                    "objective": objective, "budget": dataclasses.asdict(budget), "budget_text": budget.describe(),
                    "images": chosen_images.to_dict(), "time_budget_s": seconds, "tune": tune, "rounds": rounds,
                    "round_seconds": round_seconds, "baseline": BASELINE, "weights": _weights_id(weights, seed)}
        result = OptimizeResult(name, settings, {**cpu_info(), "cpu": host_cpu(), "versions": package_versions()},
                                candidates)
        versions = result.machine["versions"]

        tried = [c for c in candidates if c.outcome is Outcome.NOT_TRIED]
        traces: dict = {}                      # one trace per input format, shared by the exports
        with reporter.stage("trace", name):    # the baseline's: what fails here is bad input, refused before any work
            baseline = plan_export(name, "onnx", options=candidates[0].options, **plan_args)
            traces[baseline.trace_key] = trace_plan(baseline)
        with reporter.task("export and verify", total=len(tried)) as task:
            for c in tried:
                if deadline is not None and time.monotonic() > deadline and c.backend != BASELINE:
                    c.reason = "the time budget ran out before it was tried"
                    task.update(advance=1)
                    continue
                task.update(description=f"export and verify {c.backend}")
                _export(c, name, plan_args, cache, versions, traces)
                task.update(advance=1)
        verified = [c for c in candidates if c.artifact and c.outcome is Outcome.NOT_TRIED]
        _evaluate(verified, chosen_images, budget, weights, cache, reporter)
        # Timed too: what was right but outside the accuracy budget, so that the report shows
        # what the budget cost.
        timed = [c for c in candidates if c.artifact and (c.outcome is Outcome.NOT_TRIED or c.eval is not None)]
        _time(timed, name, batch, threads, img_size, rounds, round_seconds, memory, objective, reporter)
        finalists = _finalists(candidates, objective)
        if len(finalists) > 2:     # the fastest few again, head to head, twice the rounds: the choice is among them
            _time(finalists, name, batch, threads, img_size, 2 * rounds, round_seconds, False, objective, reporter)
        _choose(result, objective)
        result.warnings += _warnings(result, chosen_images)
        if result.winner:
            _publish_winner(result, out, cache)
        result.seconds = time.monotonic() - started
        write_json_atomic(out / RESULT_FILE, result.to_dict())
        plot(result, out / CHART_FILE)
        return result


# -- candidates ----------------------------------------------------------------------------

def _budget(min_top1_agreement, max_top1_drop) -> Budget:
    if min_top1_agreement is not None and max_top1_drop is not None:
        raise BadInputError("give --min-top1-agreement or --max-top1-drop, not both")
    for value, flag in ((min_top1_agreement, "--min-top1-agreement"), (max_top1_drop, "--max-top1-drop")):
        if value is not None and not 0 <= value <= 1:
            raise BadInputError(f"{flag} must be between 0 and 1, got {value}")
    if min_top1_agreement is None and max_top1_drop is None:
        return Budget(min_top1_agreement=DEFAULT_MIN_AGREEMENT)
    return Budget(min_top1_agreement, max_top1_drop)


def _seconds(time_budget) -> float | None:
    if time_budget is None:
        return None
    from .targets.options import parse_duration
    return parse_duration(time_budget)


def _tuning_seconds(budget_s: float | None) -> float:
    return TUNE_SHARE * budget_s if budget_s is not None else TUNE_SECONDS


def _candidates(name: str, targets, precisions, plan_args: dict) -> list[Candidate]:
    """Every target × precision, each refused with its reason or left to try; the
    baseline (onnxruntime fp32) first, whatever ``targets`` says."""
    from .api import cpu_needs
    from .plan import plan_export
    from .errors import unknown_name
    from .targets import available_targets
    from .targets.options import PRECISIONS

    registered = available_targets()
    for t in targets or ():
        if t not in registered:
            raise unknown_name("target", t, list(registered))
    for p in precisions or ():
        if p not in PRECISIONS:
            raise unknown_name("precision", p, list(PRECISIONS))
    runtimes = {target: runtime for runtime, target in target_backends().items()}
    found = [Candidate(BASELINE, "onnx", "fp32", {"precision": "fp32"})]
    for target, cls in registered.items():
        if targets and target not in targets:
            continue
        for precision in cls.precisions():
            if precisions and precision not in precisions:
                continue
            runtime = runtimes.get(target)
            backend = runtime or target if precision == "fp32" else f"{runtime or target}:{precision}"
            if backend == BASELINE:
                continue
            c = Candidate(backend, target, precision, {"precision": precision})
            found.append(c)
            if runtime is None:
                _refuse(c, f"no runtime on this machine to time it: {cls.produces}")
                continue
            try:
                cpu_needs(plan_export(name, target, options=c.options, **plan_args), verify=True)
            except EvitError as exc:
                _refuse(c, first_line(exc))
    return found


def _refuse(c: Candidate, reason: str) -> None:
    c.outcome, c.reason = Outcome.REFUSED, reason


def _add_tuned(candidates: list[Candidate], name: str, plan_args: dict, threads: int, seconds: float, cache: Path,
               reporter: Reporter) -> None:
    """A tuned variant of each candidate whose target can make it faster with time, the
    time shared among them."""
    from .targets import get_target

    tunable = [c for c in candidates if c.outcome is Outcome.NOT_TRIED and c.target
               and get_target(c.target).can_tune()]
    for c in tunable:
        tuned = Candidate(f"{c.backend}@tuned", c.target, c.precision, dict(c.options))
        candidates.append(tuned)
        try:
            with reporter.stage("tune", f"{c.backend}, {seconds / len(tunable) / 60:.1f} min"):
                tuned.options.update(get_target(c.target).tuned_options(
                    name, dict(c.options), batch=plan_args["batch"], threads=threads, img_size=plan_args["img_size"],
                    seconds=seconds / len(tunable), workdir=cache / "tuning", reporter=QuietReporter()))
        except OutputError:
            raise
        except EvitError as exc:
            _refuse(tuned, f"tuning failed: {first_line(exc)}")


# -- export and verify ---------------------------------------------------------------------

def _weights_id(weights, seed: int) -> str:
    if weights is None:
        return f"random-init:{seed}"
    if isinstance(weights, (str, Path)) and Path(weights).is_file():
        return sha256_file(weights)
    return str(weights)


def _export_key(c: Candidate, name: str, plan_args: dict, versions: dict, path_values: dict) -> str:
    record = {"model": name, "target": c.target, "options": c.options, "weights": _weights_id(plan_args["weights"],
              plan_args["seed"]), "batch": plan_args["batch"], "img_size": plan_args["img_size"],
              "input_size": plan_args["input_size"], "versions": versions,
              "files": {k: tree_sha256(Path(v)) for k, v in path_values.items() if Path(v).exists()}}
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _export(c: Candidate, name: str, plan_args: dict, cache: Path, versions: dict, traces: dict) -> None:
    """Export and verify ``c`` into the cache (or take what an earlier run left there)."""
    from .api import export_traced
    from .plan import plan_export, trace_plan
    from .targets.options import path_options

    try:
        plan = plan_export(name, c.target, options=c.options, **plan_args)
    except EvitError as exc:
        _refuse(c, first_line(exc))
        return
    paths = {k: v for k in path_options(type(plan.options)) if (v := getattr(plan.options, k, None))}
    folder = cache / "exports" / f"{c.backend.replace(':', '-').replace('@', '-')}-" \
        f"{_export_key(c, name, plan_args, versions, paths)}"
    record_file = folder / "candidate.json"
    if record_file.is_file():
        saved = json.loads(record_file.read_text())
        if saved.get("artifact") is None or _intact(folder, saved):
            _restore(c, saved, folder)
            return
    remove(folder)
    folder.mkdir(parents=True)
    start = time.perf_counter()
    saved: dict = {"export_seconds": None, "artifact": None}
    try:
        if plan.trace_key not in traces:
            traces[plan.trace_key] = trace_plan(plan)
        done = export_traced(traces[plan.trace_key], plan, folder, reporter=QuietReporter())
        tgt = plan.target
        files = tgt.artifact_files(done.artifact.path)
        saved.update(artifact=done.artifact.path.name, parity=_parity(done.report),
                     files={f.relative_to(folder).as_posix(): tree_sha256(f) for f in files},
                     bytes=sum(_size(f) for f in files))
    except OutputError:
        remove(folder)      # the disk under --out, not this candidate: every other one would fail the same way
        raise
    except ParityError as exc:
        raise_if_interrupted()        # Ctrl-C in the form of a failure: not a verdict to keep
        saved.update(parity=_parity(exc.report), dropped=exc.report.summary() if exc.report else first_line(exc))
    except EvitError as exc:
        raise_if_interrupted()
        saved.update(dropped=f"export failed: {first_line(exc)}")
    except Exception as exc:  # a converter's crash drops this candidate, not the run
        raise_if_interrupted()
        saved.update(dropped=f"export failed: {named_first_line(exc)}")
    saved["export_seconds"] = round(time.perf_counter() - start, 1)
    write_json_atomic(record_file, saved)
    _restore(c, saved, folder, reused=False)


def _intact(folder: Path, saved: dict) -> bool:
    return all((folder / f).exists() and tree_sha256(folder / f) == digest for f, digest in saved["files"].items())


def _restore(c: Candidate, saved: dict, folder: Path, reused: bool = True) -> None:
    c.reused = reused
    c.export_seconds, c.parity, c.bytes = saved.get("export_seconds"), saved.get("parity"), saved.get("bytes")
    if saved.get("dropped"):
        c.outcome, c.reason = Outcome.DROPPED, saved["dropped"]
    else:
        c.artifact = str(folder / saved["artifact"])


def _parity(report) -> dict | None:
    if report is None:
        return None
    return {"passed": report.passed, "precision": report.precision, "runtime": report.runtime,
            "max_rel": max(o.max_rel for o in report.outputs), "min_cosine": min(o.min_cosine for o in report.outputs),
            "summary": report.summary()}


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# -- evaluate ------------------------------------------------------------------------------

def _evaluate(candidates: list[Candidate], images, budget: Budget, weights, cache: Path, reporter: Reporter) -> None:
    """Top-1 agreement (and accuracy) of each against the fp32 model; outside the budget: dropped."""
    from .evaluation import Evaluated, evaluate
    from .targets import get_target
    from .tracing import build_reference

    # Keyed on the images' names and bytes, not where they lie: a moved folder is the same set.
    images_key = hashlib.sha256(json.dumps([p.name for p in images.paths] + [tree_sha256(p) for p in images.paths]
                                           + [list(images.labels or ())]).encode()).hexdigest()[:16]
    pending, reference = [], None
    for c in candidates:
        saved = Path(c.artifact).parent / f"eval-{images_key}.json"
        if saved.is_file():
            c.eval = json.loads(saved.read_text())
            continue
        tgt = get_target(c.target)
        description = tgt.read_description(Path(c.artifact))
        if reference is None:
            with reporter.stage("reference", description.model):
                reference = build_reference(description, weights)
        pending.append((c, saved, Evaluated(Path(c.artifact), tgt, description, reference)))
    if pending:
        found = evaluate([e for _, _, e in pending], images, reporter=reporter)
        for (c, saved, _), record in zip(pending, found.records):
            c.eval = {k: v for k, v in dataclasses.asdict(record).items() if k not in ("artifact", "target", "runtime")}
            write_json_atomic(saved, c.eval)
    for c in candidates:
        failed = budget.failures(c.eval)
        if failed:
            c.outcome, c.reason = Outcome.DROPPED, "; ".join(failed)


# -- timing --------------------------------------------------------------------------------

def _time(candidates: list[Candidate], name: str, batch: int, threads: int, img_size: int, rounds: int,
          round_seconds: float, memory: bool, objective: str, reporter: Reporter) -> None:
    """Every candidate timed with bench's protocol, interleaved in one process."""
    from .bench import NOISY_SPREAD, Prepared, peak_rss_mb, time_interleaved
    from .targets import get_target

    runners = {}
    for c in candidates:
        tgt = get_target(c.target)
        path = Path(c.artifact)
        try:
            start = time.perf_counter()
            session = tgt.open_session(path, threads=threads)
            if c.load_seconds is None:        # the first load (a second one finds the session cached)
                c.load_seconds = round(time.perf_counter() - start, 3)
            inputs = random_inputs(tgt.read_description(path), batch)
            session(inputs)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:  # a runtime that fails is dropped, not timed
            raise_if_interrupted()
            c.outcome, c.reason = Outcome.DROPPED, f"failed to run: {first_line(exc)}"
            continue
        runners[c.backend] = (lambda s=session, x=inputs: s(x))
    if not runners:
        return
    with reporter.task("timing", total=rounds * len(runners)) as task:
        samples = time_interleaved(runners, rounds=rounds, round_seconds=round_seconds,
                                   warmup_seconds=min(1.0, round_seconds), task=task)
    base = None
    for c in candidates:
        if c.backend not in samples:
            continue
        latencies = sorted(x * 1000 for r in samples[c.backend] for x in r)
        median = statistics.median(latencies)
        c.latency_ms = {"median": median, "p10": latencies[len(latencies) // 10],
                        "p90": latencies[min(len(latencies) - 1, (9 * len(latencies)) // 10)]}
        c.images_per_s = batch / (median / 1000)
        medians = [statistics.median(r) for r in samples[c.backend]]
        c.noisy = ((c.latency_ms["p90"] - c.latency_ms["p10"]) / median > NOISY_SPREAD
                   or (max(medians) - min(medians)) / statistics.median(medians) > NOISY_SPREAD)
        if c.backend == BASELINE:
            base = c.images_per_s
        if memory:
            with reporter.stage("memory", c.backend):
                c.peak_rss_mb = peak_rss_mb(name, BackendSpec.parse(c.backend.partition("@")[0]),
                                            Prepared(None, artifact=c.artifact), batch=batch, threads=threads,
                                            img_size=img_size)
    for c in candidates:
        if base and c.images_per_s:
            c.ratio_to_baseline = c.images_per_s / base


def _finalists(candidates: list[Candidate], objective: str, count: int = FINALISTS) -> list[Candidate]:
    """The ``count`` fastest admissible candidates, and the baseline (for the ratios)."""
    timed = sorted((c for c in candidates if c.outcome is Outcome.NOT_TRIED and c.images_per_s is not None),
                   key=_speed_key(objective))
    return list({c.backend: c for c in [*timed[:count], *(c for c in timed if c.backend == BASELINE)]}.values())


def _speed_key(objective: str):
    """Fastest first, by the ratio to the baseline timed in the same run (the finalists are
    timed twice, and a machine's speed drifts between runs); at one batch, the images/s
    and the latency order are the same."""
    return lambda c: -(c.ratio_to_baseline or c.images_per_s)


def _choose(result: OptimizeResult, objective: str) -> None:
    timed = [c for c in result.candidates if c.outcome is Outcome.NOT_TRIED and c.images_per_s is not None]
    untried = [c for c in result.candidates if c.outcome is Outcome.NOT_TRIED and c.images_per_s is None]
    for c in untried:
        c.reason = c.reason or "not timed"
    ranked = sorted(timed, key=_speed_key(objective))
    for i, c in enumerate(ranked):
        c.outcome = Outcome.CHOSEN if i == 0 else Outcome.RUNNER_UP if i == 1 else Outcome.ADMISSIBLE
        if i:
            c.reason = _slower(c, ranked[0], objective)
    if ranked:
        result.winner = ranked[0].backend
        result.runner_up = ranked[1].backend if len(ranked) > 1 else None


def _slower(c: Candidate, winner: Candidate, objective: str) -> str:
    speed = (c.ratio_to_baseline / winner.ratio_to_baseline if c.ratio_to_baseline and winner.ratio_to_baseline
             else c.images_per_s / winner.images_per_s)
    if objective == "throughput":
        return f"{speed:.2f}× the winner's throughput"
    return f"{1 / speed:.2f}× the winner's latency"


def _warnings(result: OptimizeResult, images) -> list[str]:
    found = []
    if len(images.paths) < 100:
        found.append(f"agreement measured on {len(images.paths)} images (one is {100 / len(images.paths):.1f} "
                     f"points): pass --images DIR with images like the app's")
    if result.settings["weights"].startswith("random-init"):
        found.append("synthetic weights: the speeds hold, the agreement figures say little about a trained model")
    noisy = [c.backend for c in result.candidates if c.noisy]
    if noisy:
        found.append(f"timings flagged noisy (spread over 15%): {', '.join(noisy)}")
    if result.winner is None:
        found.append("no candidate is right and within the budget: nothing was chosen")
    return found


# -- output --------------------------------------------------------------------------------

def _publish_winner(result: OptimizeResult, out: Path, cache: Path) -> None:
    """The winner's files beside optimize.json, and the build entry that rebuilds it."""
    from .targets import get_target

    winner = result.candidate(result.winner)
    tgt = get_target(winner.target)
    source = Path(winner.artifact)
    moves = []                                      # sidecars first: the artifact appears last
    try:
        for f in tgt.artifact_files(source):
            moves.append((temp_sibling(out / f.name), out / f.name))
            (shutil.copytree if f.is_dir() else shutil.copy2)(f, moves[-1][0])
        publish_together(moves)
    except BaseException:
        for staging, _ in moves:
            remove(staging)
        raise
    result.artifact = str(out / source.name)
    description = tgt.read_description(out / source.name)
    options = tgt.rebuild_options(description)
    for key in _path_keys(tgt):
        if options.get(key):
            options[key] = _relative(Path(options[key]), out)
    result.build_entry = {"name": f"optimized-{result.model.rsplit('_', 1)[-1]}", "target": winner.target,
                          "models": [result.model], "batch": result.settings["batch"], "options": options}


def _path_keys(tgt) -> tuple[str, ...]:
    from .targets.options import path_options
    return path_options(tgt.Options)


def _relative(path: Path, base: Path) -> str:
    try:
        return path.resolve().relative_to(base.resolve()).as_posix()
    except ValueError:
        return str(path.resolve())


def build_toml(entry: dict, source: str = RESULT_FILE) -> str:
    """The ``[[artifact]]`` entry as a build file writes it, and the short form that takes it
    from ``optimize.json``."""
    def value(v):
        return json.dumps(v) if not isinstance(v, bool) else str(v).lower()

    lines = ["[[artifact]]", f"name = {value(entry['name'])}", f"target = {value(entry['target'])}",
             f"models = {value(entry['models'])}", f"batch = {entry['batch']}", "[artifact.options]"]
    lines += [f"{k} = {value(v)}" for k, v in entry["options"].items() if v is not None]
    return "\n".join(lines) + f"\n\n# or, to follow this run's choice:\n# [[artifact]]\n# from = \"{source}\"\n"


def plot(result: OptimizeResult, path) -> Path:
    """Speed against top-1 agreement, one point per candidate evaluated; the winner marked."""
    from .charts import pyplot, save_png

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    shown = [c for c in result.candidates if c.eval is not None and c.images_per_s is not None]
    for c in shown:
        style = {"chosen": ("*", 220, "tab:red"), "dropped": ("x", 50, "tab:gray")}.get(
            c.outcome.value, ("o", 50, "tab:blue"))
        ax.scatter([c.eval["top1_agreement"]], [c.images_per_s], marker=style[0], s=style[1], color=style[2])
        ax.annotate(c.backend, (c.eval["top1_agreement"], c.images_per_s), fontsize=7, xytext=(4, 2),
                    textcoords="offset points")
    budget = result.settings["budget"].get("min_top1_agreement")
    if budget is not None:
        ax.axvline(budget, color="tab:gray", linestyle="--", linewidth=0.8)
    ax.set_xlabel("top-1 agreement with fp32 PyTorch")
    ax.set_ylabel("images / s" if result.settings["objective"] == "throughput" else "images / s (batch of "
                  f"{result.settings['batch']})")
    ax.set_title(f"{result.model}: batch {result.settings['batch']}, {result.settings['threads']} thread(s) — "
                 f"{result.machine['model']}", fontsize=9)
    return save_png(fig, path)
