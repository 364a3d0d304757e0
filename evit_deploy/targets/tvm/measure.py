"""Building and measuring tuning candidates, with settings that suit small machines.

MetaSchedule's stock ``LocalBuilder`` starts a fresh process pool for every batch and
imports ``tvm.s_tir.tensor_intrin`` inside the build timeout. That import parses hundreds
of TVMScript intrinsics: on a loaded 2-core machine it alone takes longer than the 30 s
timeout, so whole batches are lost to "LocalBuilder: Timeout, killed after 30.0 seconds".
CPU candidates never need those intrinsics once scheduled, so the builder here keeps one
warm pool for the whole session and builds without the import.

Measurements keep the best of several repeats: another process on the machine can only
make a run slower, never faster, so the minimum is the most faithful figure.
"""

from __future__ import annotations

import functools
import os
import socket
import shutil
import tempfile
from dataclasses import dataclass

from ...errors import BadInputError, first_line


#: What MetaSchedule's building and measuring import (module -> pip package); export and
#: run need none of them.
TUNING_REQUIRES = {"xgboost": "xgboost-cpu", "psutil": "psutil", "cloudpickle": "cloudpickle"}


@dataclass(frozen=True)
class MeasureSettings:
    """How candidates are built and timed (chosen by :func:`settings_for_machine`)."""

    build_workers: int
    build_timeout_s: float
    run_timeout_s: float
    repeat: int
    min_repeat_ms: int
    threads: int                # kernel threads during measurement (= the target's num-cores)

    def describe(self) -> str:
        return (f"{self.build_workers} build worker(s), build timeout {self.build_timeout_s:.0f} s, "
                f"best of {self.repeat} runs of >= {self.min_repeat_ms} ms, {self.threads} thread(s)")


def settings_for_machine(threads: int, *, remote: bool = False) -> MeasureSettings:
    """Builder and runner settings for this host.

    Builds are CPU-bound LLVM compilations: one worker per usable core. The timeout has
    to allow for a loaded machine (another tuner, a converter): a healthy candidate
    compiles in seconds, so 5 minutes only ever stops a pathological one.
    """
    from ...hostinfo import usable_cpus
    from .target_string import host_cpu_count

    workers = max(1, min(usable_cpus(), 8))
    if not remote:
        # Measuring locally: building and timing share the CPUs; more builders than
        # cores only slows both.
        workers = max(1, min(workers, host_cpu_count()))
    return MeasureSettings(build_workers=workers, build_timeout_s=300.0, run_timeout_s=120.0,
                           repeat=5, min_repeat_ms=40, threads=threads)


# -- building ----------------------------------------------------------------------------

def build_candidate(mod, target) -> str:
    """Compile one scheduled candidate and return the path of its archive (runs in a
    worker process)."""
    import tvm
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock
    from tvm.support.tar import tar

    # As MetaSchedule's default build, minus the tensor-intrinsics import (see module doc).
    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    rt_mod = tvm.tirx.build(mod, target=target) if hasattr(tvm, "tirx") and hasattr(tvm.tirx, "build") \
        else tvm.build(mod, target=target)
    path = os.path.join(tempfile.mkdtemp(prefix="evit-tvm-cand-"), "cand." + tar.output_format)
    rt_mod.export_library(path, fcompile=tar)
    return path


def _worker_ignores_ctrl_c() -> None:
    """Ctrl-C (and a SIGTERM sent to the group) goes to the whole process group; the tuner
    stops between rounds, so its workers must not die in the middle of one (which would
    count as failed candidates)."""
    import signal

    from ...progress import STOP_SIGNALS
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def _warm_worker() -> None:
    _worker_ignores_ctrl_c()
    import tvm  # noqa: F401  (pay the import once per worker, outside any timeout)
    import tvm.s_tir.transform  # noqa: F401


class Builder:
    """A warm pool of build workers, recycled now and then (TVM's workers leak memory)."""

    def __init__(self, settings: MeasureSettings):
        from tvm.support.popen_pool import PopenPoolExecutor

        self.settings = settings
        self._pool = PopenPoolExecutor(max_workers=settings.build_workers, timeout=settings.build_timeout_s,
                                       initializer=_warm_worker, maximum_process_uses=200)

    def build(self, candidates, target) -> list[tuple[str | None, str | None]]:
        """(artifact path, error) for each candidate."""
        from tvm.support.popen_pool import StatusKind

        results = []
        jobs = [(c.sch.mod, target) for c in candidates]
        for res in self._pool.map_with_error_catching(lambda job: build_candidate(*job), jobs):
            if res.status == StatusKind.COMPLETE:
                results.append((res.value, None))
            elif res.status == StatusKind.TIMEOUT:
                results.append((None, f"build timed out after {self.settings.build_timeout_s:.0f} s"))
            else:
                results.append((None, "build failed: " + str(res.value).strip().splitlines()[-1]))
        return results

    def shutdown(self) -> None:
        self._pool.shutdown()


def remove_artifact(path: str | None) -> None:
    if path:
        shutil.rmtree(os.path.dirname(path), ignore_errors=True)


# -- running -----------------------------------------------------------------------------

def run_evaluator_with_threads(threads: int, *args):
    """MetaSchedule's evaluator, after setting the kernel thread count (bound with
    ``functools.partial``, it travels to the worker with the function).

    Local runs pass (rt_mod, device, config, args); RPC runs pass the session first, and
    the remote's pool is set through ``runtime.config_threadpool``.
    """
    from tvm.s_tir.meta_schedule.runner.utils import run_evaluator_common

    if len(args) == 5:       # RPC: (session, rt_mod, device, config, repeated_args)
        session, rt_mod, device, config, repeated = args
        session.get_function("runtime.config_threadpool")(1, threads)
    else:
        rt_mod, device, config, repeated = args
        from .runtime import set_threads
        set_threads(threads)
    return run_evaluator_common(rt_mod, device, config, repeated)


@dataclass(frozen=True)
class RpcSpec:
    host: str
    port: int
    key: str

    def __str__(self) -> str:
        return f"{self.key}@{self.host}:{self.port}"


def parse_tracker(tracker: str, key: str | None) -> RpcSpec:
    """``HOST:PORT`` and a device key -> :class:`RpcSpec` (one-line errors)."""
    if not key:
        raise BadInputError("--rpc-tracker needs --rpc-key KEY (the key the devices registered with)")
    host, sep, port = tracker.rpartition(":")
    if not sep or not host:
        raise BadInputError(f"--rpc-tracker must be HOST:PORT, got '{tracker}'")
    try:
        port_number = int(port)
    except ValueError:
        raise BadInputError(f"--rpc-tracker must be HOST:PORT with a numeric port, got '{tracker}'") from None
    if not 0 < port_number < 65536:
        raise BadInputError(f"--rpc-tracker port must be 1..65535, got {port_number}")
    return RpcSpec(host, port_number, key)


def free_devices(spec: RpcSpec, timeout_s: float = 10.0) -> int:
    """How many devices are registered with the tracker under ``spec.key``."""
    from tvm.s_tir.meta_schedule.runner.config import RPCConfig

    # A plain connect first: TVM's client retries a refused connection for a minute in a
    # non-daemon thread, which would keep the process alive after the error is reported.
    try:
        socket.create_connection((spec.host, spec.port), timeout=timeout_s).close()
    except OSError as exc:
        raise BadInputError(f"cannot reach the RPC tracker at {spec.host}:{spec.port}: "
                            f"{exc.strerror or exc}") from None
    config = RPCConfig(tracker_host=spec.host, tracker_port=spec.port, tracker_key=spec.key,
                       session_timeout_sec=int(timeout_s))
    try:
        tracker = config.connect_tracker()
        summary = tracker.summary()
    except Exception as exc:
        raise BadInputError(f"cannot reach the RPC tracker at {spec.host}:{spec.port}: "
                            f"{first_line(exc)}") from None
    count = 0
    for server in summary.get("server_info", []):
        if str(server.get("key", "")).split(":")[-1] == spec.key:
            count += 1
    return count


class Runner:
    """Times built candidates locally or on RPC devices; keeps the best repeat."""

    def __init__(self, settings: MeasureSettings, rpc: RpcSpec | None = None, devices: int = 1):
        from tvm.s_tir.meta_schedule.runner import EvaluatorConfig, LocalRunner, RPCConfig, RPCRunner

        self.settings = settings
        evaluate = functools.partial(run_evaluator_with_threads, settings.threads)
        config = EvaluatorConfig(number=1, repeat=settings.repeat, min_repeat_ms=settings.min_repeat_ms,
                                 enable_cpu_cache_flush=False)
        if rpc is None:
            self._runner = LocalRunner(timeout_sec=settings.run_timeout_s, evaluator_config=config,
                                       f_run_evaluator=evaluate,
                                       initializer=_worker_ignores_ctrl_c)
        else:
            rpc_config = RPCConfig(tracker_host=rpc.host, tracker_port=rpc.port, tracker_key=rpc.key,
                                   session_timeout_sec=int(settings.run_timeout_s))
            self._runner = RPCRunner(rpc_config=rpc_config, evaluator_config=config, max_workers=max(1, devices),
                                     f_run_evaluator=evaluate,
                                     initializer=_worker_ignores_ctrl_c)

    def run(self, built: list[tuple[object, str]], device_type: str = "cpu") -> list[tuple[float | None, str | None]]:
        """``built``: (candidate, artifact path) pairs -> (best repeat in seconds, None) or
        (None, error) per pair."""
        from tvm.s_tir.meta_schedule.runner import RunnerInput

        inputs = [RunnerInput(path, device_type, cand.args_info) for cand, path in built]
        results = []
        for fut in self._runner.run(inputs):
            res = fut.result()
            if res.error_msg is None and res.run_secs:
                results.append((min(float(s) for s in res.run_secs), None))
            else:
                results.append((None, str(res.error_msg or "no result")))
        return results

    def shutdown(self) -> None:
        pool = getattr(self._runner, "pool", None)
        if pool is not None:
            pool.shutdown()
