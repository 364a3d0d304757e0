"""Load and run an OpenVINO IR made by evit-deploy with ``openvino`` and numpy only (no torch).

An export is two files, kept together::

    efficientvit_m4.xml     the network, with the evit-deploy description in its rt_info
    efficientvit_m4.bin     its weights (OpenVINO finds them by the .xml's name)

The description (model, weights SHA-256 or random-init, input format, mean/std, labels,
precision) is read from the IR's ``rt_info`` under ``evit_deploy``, so nothing else is
needed to feed the model or to rebuild its PyTorch reference.

OpenVINO's CPU plug-in picks bf16 by itself on CPUs that have it (its default
``INFERENCE_PRECISION_HINT``), so every compile here states the precision the artifact was
exported for: ``f32`` unless the IR records ``bf16``.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from ... import errors
from ...cpufeatures import played_flags
from ...description import ModelDescription
from ...errors import BadInputError
from ..base import Finding

#: --precision -> (INFERENCE_PRECISION_HINT, weights as stored)
PRECISIONS = {"fp32": ("f32", "f32"), "fp16": ("f32", "f16"), "bf16": ("bf16", "f32"), "int8": ("f32", "int8")}

#: Where the description lives in the IR's rt_info.
RT_KEY = "evit_deploy"
DESCRIPTION = (RT_KEY, "description")
#: The INFERENCE_PRECISION_HINT an artifact is compiled with ("f32" or "bf16").
INFERENCE_PRECISION = (RT_KEY, "inference_precision")
INFERENCE_PRECISIONS = ("f32", "bf16")
#: FX node name -> PyTorch module path, JSON (operations are attributed to blocks by it).
MODULE_PATHS = (RT_KEY, "module_paths")
DEVICE = "CPU"


def bin_path(xml: Path) -> Path:
    """The weights file OpenVINO reads beside ``xml``."""
    return Path(xml).with_suffix(".bin")


def artifact_files(xml: Path) -> tuple[Path, Path]:
    """The two files of an IR, weights first (what a compiled model depends on)."""
    return bin_path(xml), Path(xml)


def import_openvino():
    """The openvino module, imported with its usage telemetry off (see :mod:`.telemetry`)."""
    from .telemetry import off

    off()
    import openvino
    return openvino


@lru_cache(maxsize=1)
def _core():
    """One OpenVINO Core per process: it holds the loaded CPU plug-in."""
    return import_openvino().Core()


@lru_cache(maxsize=1)
def _host_capabilities() -> tuple[str, ...]:
    import_openvino()
    import openvino.properties as props
    return tuple(_core().get_property(DEVICE, props.device.capabilities))


#: The CPU flags with which OpenVINO's CPU plug-in computes in bf16.
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_capabilities() -> tuple[str, ...]:
    """The CPU plug-in's OPTIMIZATION_CAPABILITIES here (``BF16``, ``FP32``, ``INT8``, ...).
    With ``$EVIT_DEPLOY_CPU_FLAGS`` (playing another CPU), BF16 follows those flags."""
    capabilities = _host_capabilities()
    played = played_flags()
    if played is None:
        return capabilities
    bf16 = ("BF16",) if played & set(BF16_FLAGS) else ()
    return tuple(c for c in capabilities if c != "BF16") + bf16


def require_precision(inference_precision: str, capabilities: tuple[str, ...] | None = None, *,
                      what: str = "--precision bf16") -> None:
    """Refuse bf16 inference on a CPU without it (one line, exit code 2): OpenVINO would
    otherwise run the artifact in f32 and the artifact would not be what it says."""
    if inference_precision != "bf16":
        return
    capabilities = cpu_capabilities() if capabilities is None else capabilities
    if "BF16" not in capabilities:
        raise BadInputError(f"{what} needs a CPU whose OpenVINO capabilities include BF16; this one has "
                            f"{', '.join(capabilities) or 'none'}: use --precision fp32 (or int8) here")


def read_model(xml: Path):
    """The IR as an ``openvino.Model``, or a one-line :class:`BadInputError`."""
    xml = Path(xml)
    if not xml.is_file():
        raise BadInputError(f"artifact not found: {xml}")
    with open(xml, "rb") as f:
        head = f.read(4096)
    if b"<net" not in head:
        # Without this, OpenVINO offers the file to every frontend it has (TensorFlow's
        # prints parse errors on stderr) before saying it cannot read it.
        raise BadInputError(f"{xml} is not an OpenVINO IR (no <net> element)")
    if not bin_path(xml).is_file():
        raise BadInputError(f"{xml} has no weights {bin_path(xml).name} beside it (keep the two files together)")
    try:
        return _core().read_model(str(xml))
    except Exception as exc:  # openvino raises RuntimeError with a multi-line message
        raise BadInputError(f"{xml} is not a readable OpenVINO IR: {first_line(exc)}") from None


def _rt_text(model, key: tuple[str, ...]) -> str | None:
    return model.get_rt_info(list(key)).astype(str) if model.has_rt_info(list(key)) else None


def description_of(model, xml: Path) -> ModelDescription:
    text = _rt_text(model, DESCRIPTION)
    if text is None:
        raise BadInputError(f"{xml} was not made by evit-deploy (no '{'/'.join(DESCRIPTION)}' in its rt_info)")
    try:
        return ModelDescription.from_json(text)
    except (ValueError, KeyError, TypeError) as exc:
        raise BadInputError(f"{xml}: its evit-deploy description is unreadable: {exc}") from None


def inference_precision_of(model, xml: Path) -> str:
    value = _rt_text(model, INFERENCE_PRECISION) or "f32"
    if value not in INFERENCE_PRECISIONS:
        raise BadInputError(f"{xml}: unknown inference precision '{value}' in its rt_info "
                            f"(expected {', '.join(INFERENCE_PRECISIONS)})")
    return value


def read_description(xml: Path) -> ModelDescription:
    from ...cpufeatures import with_legacy_int8_needs
    return with_legacy_int8_needs(description_of(read_model(xml), Path(xml)))


def compile_config(inference_precision: str, *, threads: int | None = None, profile: bool = False) -> dict:
    """The CPU plug-in's settings, all explicit: the precision (the plug-in's default is
    bf16 where the CPU has it), one stream, the latency hint, and the thread count when
    given (else the plug-in's choice: every core)."""
    ov = import_openvino()
    import openvino.properties as props
    import openvino.properties.hint as hints

    config = {hints.inference_precision: ov.Type.bf16 if inference_precision == "bf16" else ov.Type.f32,
              props.num_streams: 1,
              hints.performance_mode: hints.PerformanceMode.LATENCY,
              props.enable_profiling: profile}
    if threads:
        config[props.inference_num_threads] = int(threads)
    return config


class CompiledModel:
    """A compiled IR and its description, called on a batch; ``run_named`` maps input
    names to outputs."""

    def __init__(self, xml: Path, *, threads: int | None = None, profile: bool = False):
        self.path = Path(xml)
        self.model = model = read_model(self.path)
        self.description = description_of(model, self.path)
        self.inference_precision = inference_precision_of(model, self.path)
        self._require_precision()
        try:
            self.compiled = _core().compile_model(model, DEVICE, compile_config(
                self.inference_precision, threads=threads, profile=profile))
        except Exception as exc:
            raise BadInputError(f"{self.path}: OpenVINO cannot compile it for the CPU: {first_line(exc)}") from None
        self.output_names = [o.get_any_name() for o in self.compiled.outputs]
        self.request = self.compiled.create_infer_request()

    def _require_precision(self) -> None:
        require_precision(self.inference_precision, what=f"{self.path.name} (exported for bf16 inference)")

    def run_named(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._require_precision()       # on every run, not only when compiled: the answer is the host's
        results = self.request.infer(inputs)
        # The request's output tensors are reused by the next call: copy them out.
        return {name: np.array(results[i], copy=True) for i, name in enumerate(self.output_names)}

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.run_named({self.description.input.name: batch})[self.output_names[0]]

    def property(self, key):
        return self.compiled.get_property(key)


class Session(CompiledModel):
    """A compiled IR as the target runs it: ``session({name: array}) -> {name: array}``."""

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.run_named(inputs)


def load(xml: Path, *, threads: int | None = None, profile: bool = False) -> CompiledModel:
    return CompiledModel(xml, threads=threads, profile=profile)


def runtime_name(xml: Path) -> str:
    ov = import_openvino()
    return f"OpenVINO {ov.__version__.split('-')[0]} (CPU, {inference_precision_of(read_model(xml), Path(xml))})"


def parity_extras(model: Session) -> dict:
    """What a parity report adds for an IR: the precision the plug-in computed in, the
    size of the weights."""
    import_openvino()
    import openvino.properties.hint as hints

    return {"inference_precision": model.property(hints.inference_precision).get_type_name(),
            "weights_bytes": bin_path(model.path).stat().st_size}


def health(xml: Path, description: ModelDescription) -> list[Finding]:
    precision = description.extra.get("openvino", {}).get("inference_precision", "f32")
    if precision == "bf16" and "BF16" not in cpu_capabilities():
        return [Finding("error", "exported for bf16 inference, which this CPU does not have",
                        "export --precision fp32 for it")]
    return []


def host_findings() -> list[Finding]:
    """The plug-in's version and what this CPU offers it (bf16 or not)."""
    ov = import_openvino()
    capabilities = cpu_capabilities()
    findings = [Finding("ok", f"OpenVINO {ov.__version__.split('-')[0]} CPU plug-in, "
                              f"OPTIMIZATION_CAPABILITIES: {', '.join(capabilities)}")]
    if "BF16" not in capabilities:
        findings.append(Finding("warning", "this CPU has no BF16 capability: --precision bf16 is refused here",
                                "export fp32 or int8 on this machine, bf16 on a CPU with AVX512_BF16 or AMX"))
    return findings


def first_line(exc: Exception) -> str:
    """The message of an OpenVINO exception, without the source locations it starts with
    ("Exception from src/...:84:", "Check '...' failed at src/...")."""
    return errors.first_line(exc, skip=("Exception from ", "Check '"))
