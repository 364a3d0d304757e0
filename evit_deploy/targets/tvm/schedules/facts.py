"""What a schedule needs to know about the CPU it is written for, read from the TVM target.

Vector width and register count come from the target's LLVM features (``-mcpu``,
``-mattr``), never from the machine doing the compiling: a library for
``llvm -mcpu=broadwell`` is written for AVX2's 8 lanes and 16 registers even when it
is compiled on an AVX-512 CPU. Cache sizes are only known for the host; for another
CPU the sizes of a typical core of its generation are assumed (they only bound the
size of weight panels, never correctness).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

#: A typical x86 core of the last decade: 32 KB L1 data, 1 MB L2.
DEFAULT_L1_BYTES = 32 * 1024
DEFAULT_L2_BYTES = 1024 * 1024


@dataclass(frozen=True)
class CpuFacts:
    vector_bits: int              # SIMD register width used for fp32
    vector_registers: int         # architectural SIMD registers
    cores: int                    # threads the kernels are written for (the target's num-cores)
    l1_bytes: int = DEFAULT_L1_BYTES
    l2_bytes: int = DEFAULT_L2_BYTES
    bf16_dot: bool = False        # a bf16 dot-product instruction (avx512_bf16, AMX, ARM bf16)
    int8_dot: bool = False        # an int8 dot-product instruction (VNNI, ARM dotprod)
    amx_bf16: bool = False        # AMX tiles with bf16 products (tdpbf16ps)

    @property
    def lanes(self) -> int:
        """fp32 elements per vector register."""
        return self.vector_bits // 32

    @classmethod
    def for_target(cls, target) -> "CpuFacts":
        """The facts of a ``tvm.target.Target`` (an ``llvm`` target)."""
        from tvm.target.codegen import llvm_get_cpu_features

        features = set(llvm_get_cpu_features(target))
        triple = str(target.attrs.get("mtriple", "") or "")
        if "avx512f" in features:
            bits, registers = 512, 32
        elif "avx" in features or "avx2" in features:
            bits, registers = 256, 16
        elif "neon" in features or triple.startswith(("aarch64", "arm64")):
            bits, registers = 128, 32
        else:
            bits, registers = 128, 16
        cores = int(target.attrs.get("num-cores", 1) or 1)
        l1, l2 = _host_caches() if _is_host(target) else (DEFAULT_L1_BYTES, DEFAULT_L2_BYTES)
        return cls(bits, registers, cores, l1, l2,
                   bf16_dot=bool(features & {"avx512bf16", "amx-bf16", "bf16"}),
                   int8_dot=bool(features & {"avx512vnni", "avxvnni", "amx-int8", "dotprod"}),
                   amx_bf16="amx-bf16" in features)


def _is_host(target) -> bool:
    from tvm.target.codegen import llvm_get_system_cpu

    return str(target.attrs.get("mcpu", "")) == str(llvm_get_system_cpu())


def _host_caches() -> tuple[int, int]:
    """(L1 data, L2) bytes of this machine's first core, where Linux tells them."""
    sizes = {}
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            level = int((index / "level").read_text())
            kind = (index / "type").read_text().strip()
            text = (index / "size").read_text().strip().upper()
        except (OSError, ValueError):
            continue
        if kind == "Instruction":
            continue
        scale = {"K": 1024, "M": 1024 * 1024}.get(text[-1:], 1)
        sizes[level] = int(text.rstrip("KM")) * scale
    return sizes.get(1, DEFAULT_L1_BYTES), sizes.get(2, DEFAULT_L2_BYTES)
