"""TVM targets as users write them: classic strings, JSON, or ``native``.

TVM >= 0.24 only accepts dict/JSON targets and its CPU tuner needs ``num-cores``, while
users, tutorials and the paper write ``llvm -mcpu=broadwell``. :func:`parse_target`
turns any of these forms into the canonical dict TVM takes, fills ``num-cores`` and
checks the CPU name against the LLVM that TVM was built with.

Only the syntax is handled here without TVM; :func:`resolve_target` (which validates
against LLVM and looks at the host) imports it.
"""

from __future__ import annotations

import difflib
import json
import shlex

from ...errors import BadInputError, first_line

# The llvm target kind's options and their types (TVM 0.2x, `target.ListTargetKindOptions`).
# "str" | "int" | "bool" | "list" (comma separated in the classic form).
LLVM_OPTIONS = {
    "mcpu": "str", "mtriple": "str", "mattr": "list", "num-cores": "int", "keys": "list",
    "mfloat-abi": "str", "mabi": "str", "opt-level": "int", "vector-width": "int",
    "fast-math": "bool", "fast-math-nnan": "bool", "fast-math-ninf": "bool", "fast-math-nsz": "bool",
    "fast-math-arcp": "bool", "fast-math-contract": "bool", "fast-math-reassoc": "bool",
    "cl-opt": "list", "libs": "list", "tag": "str", "device": "str", "model": "str", "jit": "str",
}
HOST_ALIASES = ("native", "host")
DEFAULT_KEYS = ["cpu"]


def parse_target(text: str) -> dict:
    """``llvm -mcpu=broadwell -num-cores=14``, a JSON object, or ``native``/``host``
    -> a target dict (not yet validated against LLVM; ``num-cores`` may be missing).

    ``native`` gives ``{"kind": "llvm", "mcpu": "native"}``: :func:`resolve_target`
    replaces it with the host CPU's LLVM name.
    """
    if not isinstance(text, str) or not text.strip():
        raise BadInputError("empty TVM target: write e.g. 'llvm -mcpu=broadwell', a JSON object or 'native'")
    text = text.strip()
    if text.startswith(("{", "[")):
        return _from_json(text)
    if text.lower() in HOST_ALIASES:
        return {"kind": "llvm", "mcpu": "native"}
    try:
        tokens = shlex.split(text)
    except ValueError as exc:
        raise BadInputError(f"cannot parse TVM target '{text}': {first_line(exc)}") from None
    kind, options = tokens[0], tokens[1:]
    _check_kind(kind, text)
    target: dict = {"kind": "llvm"}
    if kind.lower() in HOST_ALIASES:          # `native -num-cores=1`
        target["mcpu"] = "native"
    i = 0
    while i < len(options):
        token = options[i]
        if not token.startswith("-") or token.strip("-") == "":
            raise BadInputError(f"TVM target '{text}': expected an option like -mcpu=NAME, got '{token}'")
        key, eq, value = token.lstrip("-").partition("=")
        if key in ("device",) and not eq and i + 1 < len(options) and not options[i + 1].startswith("-"):
            value, eq = options[i + 1], "="
            i += 1
        kind_of = _option_kind(key, text)
        if not eq:
            if kind_of != "bool":
                # `-mcpu broadwell` is not TVM syntax either, but it is clear what was meant.
                if i + 1 < len(options) and not options[i + 1].startswith("-"):
                    value = options[i + 1]
                    i += 1
                else:
                    raise BadInputError(f"TVM target '{text}': option -{key} needs a value (-{key}=...)")
            else:
                value = "true"
        target[key] = _convert(key, kind_of, value, text)
        i += 1
    return target


def _from_json(text: str) -> dict:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadInputError(f"TVM target is not valid JSON: {exc.msg} (line {exc.lineno} column {exc.colno})") from None
    if not isinstance(data, dict):
        raise BadInputError("a JSON TVM target must be an object such as {\"kind\": \"llvm\", \"mcpu\": \"broadwell\"}")
    _check_kind(str(data.get("kind", "")), text)
    target = {"kind": "llvm"}
    for key, value in data.items():
        if key == "kind":
            continue
        kind_of = _option_kind(key, text)
        if kind_of == "list" and isinstance(value, str):
            value = _convert(key, kind_of, value, text)
        elif kind_of == "list" and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise BadInputError(f"TVM target: '{key}' must be a list of strings, got {value!r}")
        elif kind_of == "int" and (isinstance(value, bool) or not isinstance(value, int)):
            value = _convert(key, kind_of, str(value), text)
        elif kind_of == "bool" and not isinstance(value, bool):
            value = _convert(key, kind_of, str(value), text)
        elif kind_of == "str" and not isinstance(value, str):
            raise BadInputError(f"TVM target: '{key}' must be a string, got {value!r}")
        target[key] = value
    if str(target.get("mcpu", "")).lower() in HOST_ALIASES:
        target["mcpu"] = "native"
    return target


def _check_kind(kind: str, text: str) -> None:
    if kind != "llvm":
        if kind.lower() in HOST_ALIASES:
            return
        raise BadInputError(f"TVM target '{text}': the tvm target builds for CPUs, so the target kind must be "
                            f"'llvm' (got '{kind}')")


def _option_kind(key: str, text: str) -> str:
    if key not in LLVM_OPTIONS:
        close = difflib.get_close_matches(key, list(LLVM_OPTIONS), n=1, cutoff=0.6)
        hint = f" (did you mean -{close[0]}?)" if close else ""
        raise BadInputError(f"TVM target '{text}': unknown llvm option -{key}{hint}; valid: "
                            + ", ".join(f"-{k}" for k in LLVM_OPTIONS))
    return LLVM_OPTIONS[key]


def _convert(key: str, kind_of: str, value: str, text: str):
    if kind_of == "int":
        try:
            number = int(value)
        except ValueError:
            raise BadInputError(f"TVM target '{text}': -{key} must be an integer, got '{value}'") from None
        if key == "num-cores" and number < 1:
            raise BadInputError(f"TVM target '{text}': -num-cores must be at least 1, got {number}")
        return number
    if kind_of == "bool":
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise BadInputError(f"TVM target '{text}': -{key} must be true or false, got '{value}'")
    if kind_of == "list":
        items = [v.strip() for v in value.split(",") if v.strip()]
        if key == "mattr":
            bad = [v for v in items if v[0] not in "+-"]
            if bad:
                raise BadInputError(f"TVM target '{text}': -mattr features start with + or - "
                                    f"(e.g. -mattr=+avx2,+fma), got '{bad[0]}'")
        return items
    return value


#: LLVM's x86 features that its code generator may use on its own (auto-vectorisation,
#: TVM's tensor intrinsics), by their Linux /proc/cpuinfo names: a library compiled with
#: one runs only where the CPU has it. Features LLVM emits only for explicit intrinsics
#: (AES, SHA, ...) and tuning flags are left out.
LLVM_TO_LINUX_FLAGS = {
    "sse3": "pni", "ssse3": "ssse3", "sse4.1": "sse4_1", "sse4.2": "sse4_2", "popcnt": "popcnt",
    "avx": "avx", "avx2": "avx2", "fma": "fma", "f16c": "f16c", "bmi": "bmi1", "bmi2": "bmi2",
    "lzcnt": "abm", "movbe": "movbe", "avx512f": "avx512f", "avx512cd": "avx512cd", "avx512bw": "avx512bw",
    "avx512dq": "avx512dq", "avx512vl": "avx512vl", "avx512ifma": "avx512ifma", "avx512vbmi": "avx512vbmi",
    "avx512vbmi2": "avx512_vbmi2", "avx512vnni": "avx512_vnni", "avx512bitalg": "avx512_bitalg",
    "avx512vpopcntdq": "avx512_vpopcntdq", "avx512bf16": "avx512_bf16", "avx512fp16": "avx512_fp16",
    "avxvnni": "avx_vnni", "gfni": "gfni", "amx-tile": "amx_tile", "amx-int8": "amx_int8",
    "amx-bf16": "amx_bf16",
}


#: The AMX features, whose instructions only schedules/amx_intrinsics writes.
AMX_FLAGS = ("amx_tile", "amx_int8", "amx_bf16")


def required_cpu_flags(target: dict) -> tuple[str, ...]:
    """The instruction sets (Linux flag names) code compiled for ``target`` may use: its
    CPU's features as TVM's LLVM knows them, with ``-mattr`` applied."""
    from tvm.target import codegen

    features = codegen.llvm_get_cpu_features(to_tvm(target))
    return tuple(linux for llvm, linux in LLVM_TO_LINUX_FLAGS.items() if llvm in features)


def host_cpu_name() -> str:
    """The LLVM name of this machine's CPU (``native`` resolves to it)."""
    import tvm  # noqa: F401  (registers the LLVM helper functions)
    import tvm_ffi

    return str(tvm_ffi.get_global_func("target.llvm_get_system_cpu")())


def host_cpu_count() -> int:
    """Physical cores this process may use (TVM's CPU tuner plans one thread per core)."""
    from ...hostinfo import cpu_info, usable_cpus

    physical, usable = cpu_info()["physical_cores"], usable_cpus()
    return max(1, min(physical, usable) if physical else usable)


def resolve_target(text_or_dict, *, threads: int | None = None) -> dict:
    """The canonical target dict: parsed, ``native`` replaced by the host CPU, the CPU
    name checked against TVM's LLVM, and ``num-cores`` filled in.

    ``threads`` (e.g. from ``--threads``) sets ``num-cores``; it must agree with an
    explicit ``-num-cores``.
    """
    import tvm  # noqa: F401  (registers the LLVM helper functions)
    import tvm_ffi

    target = dict(text_or_dict) if isinstance(text_or_dict, dict) else parse_target(text_or_dict)
    original = text_or_dict if isinstance(text_or_dict, str) else json.dumps(text_or_dict)
    if target.get("mcpu") == "native":
        target["mcpu"] = host_cpu_name()
        on, off = _model_corrected_to_host(target)
        if on or off:           # the user's -mattr may switch off what the host adds, not on what it lacks
            target["mattr"] = [*(f"+{f}" for f in on), *target.get("mattr", []), *(f"-{f}" for f in off)]
    if "mcpu" in target:
        triple = target.get("mtriple") or str(tvm_ffi.get_global_func("target.llvm_get_system_triple")())
        if not bool(tvm_ffi.get_global_func("target.llvm_is_valid_cpu")(target["mcpu"], triple)):
            raise BadInputError(f"unknown CPU '{target['mcpu']}' in TVM target '{original}'"
                                + _close_cpus(target["mcpu"], triple))
    if threads is not None:
        if threads < 1:
            raise BadInputError(f"--threads must be at least 1, got {threads}")
        if "num-cores" in target and target["num-cores"] != threads:
            raise BadInputError(f"--threads {threads} contradicts -num-cores={target['num-cores']} in the TVM "
                                f"target '{original}'")
        target["num-cores"] = threads
    target.setdefault("num-cores", host_cpu_count())
    target.setdefault("keys", list(DEFAULT_KEYS))
    if not target.get("tag"):
        target.pop("tag", None)
    return canonical(target)


def _model_corrected_to_host(target: dict) -> tuple[list[str], list[str]]:
    """The LLVM features to switch on and off to make the model of the host CPU what this
    machine is. Off: what the model has and this machine does not expose (a virtual machine
    may hide AVX-512): code using it would crash here. On: what this machine has and the
    model lacks (a virtual machine may report an older model number: an Intel Xeon
    with AMX and BF16 reporting Rocket Lake's was named ``rocketlake``, which has neither)."""
    from ...cpufeatures import cpu_flags

    flags = cpu_flags()
    if flags is None:
        return [], []
    from tvm.target import codegen

    features = codegen.llvm_get_cpu_features(to_tvm(target))
    on = [llvm for llvm, linux in LLVM_TO_LINUX_FLAGS.items() if linux in flags and llvm not in features]
    off = [llvm for llvm, linux in LLVM_TO_LINUX_FLAGS.items() if llvm in features and linux not in flags]
    return on, off


def _close_cpus(cpu: str, triple: str) -> str:
    import tvm
    import tvm_ffi

    probe = tvm.target.Target({"kind": "llvm", "mtriple": triple})
    names = [str(n) for n in tvm_ffi.get_global_func("target.llvm_get_cpu_archlist")(probe)]
    close = difflib.get_close_matches(cpu.lower(), names, n=6, cutoff=0.5)
    if not close:
        close = [n for n in names if n[:3] == cpu.lower()[:3]][:6]
    return f" (close valid names: {', '.join(close)})" if close else f"; valid names include {', '.join(names[:12])}, …"


def canonical(target: dict) -> dict:
    """Sorted keys and normalised values, so that equal targets compare and print equal."""
    out = {"kind": "llvm"}
    for key in sorted(k for k in target if k != "kind"):
        value = target[key]
        out[key] = list(value) if isinstance(value, (list, tuple)) else value
    return out


def to_tvm(target: dict):
    """A ``tvm.target.Target`` from a canonical dict."""
    import tvm

    try:
        return tvm.target.Target(dict(target))
    except Exception as exc:  # TVM raises ValueError/TVMError with multi-line text
        raise BadInputError(f"TVM rejected the target {json.dumps(target)}: {first_line(exc)}") from None


def to_classic(target: dict) -> str:
    """The classic string of a target, for messages and reports."""
    parts = [target.get("kind", "llvm")]
    for key, value in target.items():
        if key == "kind" or (key == "keys" and list(value) == DEFAULT_KEYS):
            continue
        if isinstance(value, bool):
            parts.append(f"-{key}" if value else f"-{key}=false")
        elif isinstance(value, (list, tuple)):
            parts.append(f"-{key}={','.join(value)}")
        else:
            parts.append(f"-{key}={value}")
    return " ".join(parts)


def slug(target: dict) -> str:
    """A short file-name friendly name: ``llvm-broadwell-14c``."""
    parts = ["llvm", str(target.get("mcpu", "generic"))]
    if target.get("mattr"):
        import hashlib
        parts.append("mattr" + hashlib.sha1(",".join(target["mattr"]).encode()).hexdigest()[:6])
    parts.append(f"{target.get('num-cores', 'x')}c")
    return "-".join(p.replace("/", "_") for p in parts)
