"""What an artifact needs of the CPU it runs on, and whether this CPU has it (torch-free).

Parity is proven on the machine that exports; artifacts ship to others. Two needs matter:

* **instruction sets the code is compiled for** (a TVM library for ``skylake-avx512``):
  a CPU without them kills the process with SIGILL, so they are checked before a
  library is loaded;
* **what integer kernels need to compute what was verified**: onnxruntime's and oneDNN's
  u8×s8 kernels on x86 without VNNI add pairs of products in int16 (``VPMADDUBSW``) and
  saturate unless the weights have 7 bits. Such an artifact runs everywhere but is exact
  only where VNNI is.

Runtimes that pick their kernels by CPUID when they load (onnxruntime, OpenVINO, XNNPACK)
need nothing beyond x86-64. Feature names are Linux's ``/proc/cpuinfo`` flags.
``EVIT_DEPLOY_CPU_FLAGS`` replaces this host's list (space separated), to ask what
another CPU would do with an artifact (and for the tests).
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from functools import lru_cache

from .errors import BadInputError

FLAGS_ENV = "EVIT_DEPLOY_CPU_FLAGS"

#: Any one of these gives exact u8×s8 dot products with 32-bit accumulation
#: (VPDPBUSD, or AMX's TDPBUSD).
VNNI = ("avx512_vnni", "avx_vnni", "amx_int8")

#: Why full-range int8 artifacts need :data:`VNNI`.
SATURATION = ("its u8×s8 int8 kernels are exact only with VNNI: without it, x86 kernels add pairs of "
              "products in int16 (VPMADDUBSW), which full-range (8-bit) weights overflow")


@dataclass(frozen=True)
class CpuNeeds:
    """What an artifact needs of a CPU (recorded in its description as ``extra["cpu"]``)."""

    isa: tuple[str, ...] = ()          # instruction sets its code uses: without one it cannot run
    exact_with: tuple[str, ...] = ()   # any one of these to compute as verified (empty: every CPU)
    why: str = ""                      # why exact_with is needed

    def to_dict(self) -> dict:
        return {"isa": list(self.isa), "exact_with": list(self.exact_with), "why": self.why}

    @classmethod
    def from_dict(cls, data: dict | None) -> "CpuNeeds":
        data = data or {}
        return cls(tuple(data.get("isa") or ()), tuple(data.get("exact_with") or ()), data.get("why") or "")


@dataclass(frozen=True)
class CpuVerdict:
    """Whether this CPU runs an artifact, and computes it as verified."""

    known: bool                        # False: this host's features could not be read
    missing: tuple[str, ...]           # instruction sets the code needs that this CPU lacks
    exact: bool                        # computes what was verified (int8 kernels)
    needs: CpuNeeds

    @property
    def runs(self) -> bool:
        return not self.missing

    def summary(self) -> str:
        if not self.known:
            return "unknown: this CPU's features cannot be read here"
        if self.missing:
            return f"does not run here: this CPU lacks {', '.join(self.missing)}"
        if not self.exact:
            return f"runs here but not as verified: {self.needs.why}; this CPU has none of {', '.join(self.needs.exact_with)}"
        return "runs here as verified"


#: ``--int8-kernels``: portable (7-bit weights, exact on every x86 CPU) or vnni (8-bit).
INT8_KERNELS = ("portable", "vnni")


def int8_cpu_needs(precision: str, kernels: str) -> CpuNeeds:
    """The needs of an int8 artifact of a runtime with u8×s8 kernels (onnxruntime, OpenVINO)."""
    if precision == "int8" and kernels == "vnni":
        return CpuNeeds(exact_with=VNNI, why=SATURATION)
    return CpuNeeds()


def check_int8_kernels(precision: str, kernels: str, *, target: str) -> None:
    """``--int8-kernels vnni`` for another precision would be silently ignored: refused."""
    if kernels != INT8_KERNELS[0] and precision != "int8":
        raise BadInputError(f"--int8-kernels is for --precision int8 (target '{target}' was asked for {precision})")


def with_legacy_int8_needs(description):
    """The description of an int8 artifact made before descriptions recorded CPU needs:
    it was quantized with 8-bit weights, exact only with VNNI."""
    if "cpu" in description.extra or description.extra.get("precision") != "int8":
        return description
    return description.with_extra(cpu=CpuNeeds(exact_with=VNNI, why=SATURATION).to_dict())


#: CPU vector extensions that matter for inference kernels, as /proc/cpuinfo names them.
VECTOR_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
                "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16", "asimd", "sve")


@lru_cache(maxsize=1)
def _cpuinfo() -> tuple[str | None, frozenset[str] | None]:
    """(model name, feature flags) from /proc/cpuinfo; None where it does not exist."""
    model = flags = None
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model is None:
                    model = value.strip()
                elif key in ("flags", "Features") and flags is None:
                    flags = frozenset(value.split())
    except OSError:
        pass
    return model, flags


def cpu_flags() -> frozenset[str] | None:
    """This CPU's feature flags as Linux names them (avx2, avx512_vnni, ...); None where
    they cannot be read (no /proc/cpuinfo)."""
    return _cpuinfo()[1]


def cpu_model() -> str:
    return _cpuinfo()[0] or platform.processor() or platform.machine()


def played_flags() -> frozenset[str] | None:
    """The flags of ``$EVIT_DEPLOY_CPU_FLAGS`` when it is set (playing another CPU), else None."""
    override = os.environ.get(FLAGS_ENV)
    return None if override is None else frozenset(override.replace(",", " ").split())


def host_features() -> frozenset[str] | None:
    """This CPU's feature flags (``/proc/cpuinfo`` names), ``$EVIT_DEPLOY_CPU_FLAGS`` if
    set, or None where they cannot be read."""
    played = played_flags()
    return played if played is not None else cpu_flags()


def host_cpu() -> dict:
    """This CPU as parity reports and build manifests record it: model and vector extensions."""
    flags = host_features()
    return {"model": cpu_model(),
            "features": [f for f in VECTOR_FLAGS if f in flags] if flags is not None else None}


def needs_of(description) -> CpuNeeds:
    return CpuNeeds.from_dict(description.extra.get("cpu"))


def judge(needs: CpuNeeds, features: frozenset[str] | None = None) -> CpuVerdict:
    features = host_features() if features is None else features
    if features is None:
        return CpuVerdict(False, (), True, needs)
    missing = tuple(f for f in needs.isa if f not in features)
    exact = not needs.exact_with or any(f in features for f in needs.exact_with)
    return CpuVerdict(True, missing, exact, needs)


def require_runnable(needs: CpuNeeds, what: str) -> CpuVerdict:
    """The verdict for ``what`` (an artifact) on this CPU; :class:`BadInputError` if its
    code uses instructions this CPU lacks (running it would die of SIGILL)."""
    verdict = judge(needs)
    if verdict.missing:
        raise BadInputError(f"{what} is compiled for CPUs with {', '.join(verdict.missing)}, which this CPU "
                            f"({cpu_model()}) lacks: running it would crash (illegal instruction); "
                            f"build it for this CPU instead")
    return verdict


#: Linux: arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) lets a process use AMX tiles.
AMX_PERMISSION_SYSCALL = (158, 0x1023, 18)      # arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA


def amx_permission_error() -> str | None:
    """Ask Linux for the AMX tile data (the first tile instruction of a process that has
    not asked dies of SIGILL); why it was refused, or None. (The AMX kernels ask too: this
    is to refuse in one line where they could not run.)"""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return "AMX tiles are used only on x86-64 Linux"
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(*AMX_PERMISSION_SYSCALL) == 0:
        return None
    return f"Linux refused them: {os.strerror(ctypes.get_errno())}"


def require_amx_permission(what: str) -> None:
    """:class:`BadInputError` if this process may not use AMX tiles, which ``what`` uses."""
    refused = amx_permission_error()
    if refused is not None:
        raise BadInputError(f"{what} computes with AMX tiles, which this process may not use ({refused}): "
                            f"build it for this CPU without bf16, or run it where AMX is allowed")


def inexact_message(verdict: CpuVerdict, what: str) -> str:
    return (f"{what}: {verdict.needs.why}, and this CPU has none of {', '.join(verdict.needs.exact_with)}: "
            f"it computes something else here than what was verified")
