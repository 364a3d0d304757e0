"""Facts about this machine and its Python packages (torch-free), recorded with every
benchmark, build manifest and doctor report."""

from __future__ import annotations

import os
import platform
from functools import lru_cache
from importlib import metadata

from .cpufeatures import VECTOR_FLAGS, cpu_flags, cpu_model

#: Packages whose versions determine what evit-deploy produces.
DEPENDENCIES = ("torch", "numpy", "onnx", "onnxscript", "onnxruntime", "coremltools", "apache-tvm",
                "apache-tvm-ffi", "xgboost-cpu", "psutil", "cloudpickle", "pillow", "safetensors",
                "typer", "rich", "matplotlib")


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def target_packages() -> tuple[str, ...]:
    """The pip packages registered targets declare (an optional extra's runtime, such as
    OpenVINO's), so that their versions are recorded too and a build rebuilds when one changes."""
    from .targets import available_targets

    found = {pip for cls in available_targets().values() for pip in {**cls.requires, **cls.run_requires}.values()}
    return tuple(sorted(found - set(DEPENDENCIES)))


def package_versions(names=None) -> dict[str, str | None]:
    from . import __version__
    names = (*DEPENDENCIES, *target_packages()) if names is None else names
    return {"evit-deploy": __version__, "python": platform.python_version(),
            **{name: package_version(name) for name in names}}


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@lru_cache(maxsize=1)
def cpu_info() -> dict:
    """CPU model, core counts and vector extensions (from /proc/cpuinfo where it exists)."""
    model, flags = cpu_model(), cpu_flags()
    try:
        import psutil
        physical = psutil.cpu_count(logical=False)
    except ImportError:
        physical = None
    return {"model": model, "machine": platform.machine(), "logical_cores": os.cpu_count(),
            "physical_cores": physical, "usable_cores": usable_cpus(),
            "vector_extensions": [f for f in VECTOR_FLAGS if f in (flags or ())],
            "os": f"{platform.system()} {platform.release()}"}
