"""A numpy reference executor for the ML program of a saved ``.mlpackage``.

It reads the package from disk (the ``Model`` protobuf and the weight file, never an
in-memory conversion object) and runs the ``main`` function op by op with the functions
of :mod:`.ops`. Where the program declares an fp16 result, the op is computed in fp32 and
its result rounded to fp16, so fp16 drift shows up as it would on a device;
``round_fp16=False`` runs the same program with fp32 activations, to measure that drift.

Constants, including compressed ones (``constexpr_*``), are decoded once at load time, as
Core ML does when it compiles a model. An op the executor does not know is refused at
load time with its name and position, never skipped.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ....errors import BadInputError
from ..package import model_file, read_spec
from .ops import OPS, OpCall
from .values import TensorInfo, ValueDecoder, tensor_info

FUNCTION = "main"
_REMEMBERED_RUNS = 16


class UnsupportedOpError(BadInputError):
    """The program uses an op (or a construct) the reference executor does not implement."""


class ProgramError(ValueError):
    """The program cannot be executed as written: a malformed or inconsistent op."""


@dataclass(frozen=True)
class Operation:
    index: int
    type: str
    params: dict[str, list[tuple[str, object]]]      # parameter -> [("var", name) | ("value", literal)]
    outputs: tuple[tuple[str, TensorInfo | None], ...]

    @property
    def location(self) -> str:
        first = self.outputs[0][0] if self.outputs else "?"
        return f"op '{self.type}' (operation {self.index} of function {FUNCTION}, output '{first}')"


def supported(op_type: str) -> bool:
    return op_type == "const" or op_type in OPS


def _unsupported(where, op_type: str, location: str) -> UnsupportedOpError:
    return UnsupportedOpError(f"{where}: {location} is not supported by the reference executor "
                              f"(it knows: {', '.join(sorted(['const', *OPS]))})")


def check_supported(spec, where) -> None:
    """Raise :class:`UnsupportedOpError` for the first op of ``main`` the executor cannot run."""
    function = spec.mlProgram.functions[FUNCTION]
    block = function.block_specializations[function.opset]
    for index, op in enumerate(block.operations):
        if not supported(op.type) or len(op.blocks):
            outputs = tuple((o.name, None) for o in op.outputs)
            raise _unsupported(where, op.type, Operation(index, op.type, {}, outputs).location)


class Program:
    """The ``main`` function of a saved ML program, ready to run."""

    def __init__(self, package: str | Path):
        self.package = Path(package)
        spec = read_spec(self.package)
        if spec.WhichOneof("Type") != "mlProgram":
            raise BadInputError(f"{self.package} holds a {spec.WhichOneof('Type')} model, not an ML program")
        functions = spec.mlProgram.functions
        if FUNCTION not in functions:
            raise BadInputError(f"{self.package}: the ML program has no '{FUNCTION}' function")
        function = functions[FUNCTION]
        self.opset = function.opset
        if self.opset not in function.block_specializations:
            raise BadInputError(f"{self.package}: function {FUNCTION} has no block for its opset {self.opset}")
        block = function.block_specializations[self.opset]
        self.inputs = {nv.name: tensor_info(nv.type) for nv in function.inputs}
        self.output_names = list(block.outputs)
        decoder = ValueDecoder(model_file(self.package))
        # Verification runs the photos once for parity and again to measure fp16 drift.
        self._recent: OrderedDict[tuple, dict] = OrderedDict()
        self.operations = [self._parse(i, op, decoder) for i, op in enumerate(block.operations)]
        self.constants: dict[str, object] = {}
        self.steps: list[Operation] = []
        for op, raw in zip(self.operations, block.operations):
            if op.type == "const":
                self._fold_const(op, raw, decoder)
            elif op.type.startswith("constexpr_"):
                self._fold_constexpr(op)
            else:
                self.steps.append(op)

    # -- loading ---------------------------------------------------------------------------
    def _parse(self, index: int, op, decoder: ValueDecoder) -> Operation:
        outputs = tuple((o.name, tensor_info(o.type)) for o in op.outputs)
        parsed = Operation(index, op.type, {}, outputs)
        if not supported(op.type):
            raise _unsupported(self.package, op.type, parsed.location)
        if len(op.blocks):
            raise UnsupportedOpError(f"{self.package}: {parsed.location} has nested blocks (control flow), "
                                     "which the reference executor does not run")
        if op.type == "const":
            return parsed           # its value is decoded by _fold_const
        params: dict[str, list] = {}
        try:
            for name in sorted(op.inputs):
                params[name] = [("var", b.name) if b.WhichOneof("binding") == "name"
                                else ("value", decoder.decode(b.value)) for b in op.inputs[name].arguments]
            for name in sorted(op.attributes):
                if name != "name":          # every op carries its own name as an attribute
                    params.setdefault(name, [("value", decoder.decode(op.attributes[name]))])
        except (ValueError, BadInputError) as exc:
            raise ProgramError(f"{parsed.location}: {exc}") from None
        return Operation(index, op.type, params, outputs)

    def _fold_const(self, op: Operation, raw, decoder: ValueDecoder) -> None:
        if "val" not in raw.attributes:
            raise ProgramError(f"{op.location} has no value")
        try:
            value = decoder.decode(raw.attributes["val"])
        except (ValueError, BadInputError) as exc:
            raise ProgramError(f"{op.location}: {exc}") from None
        self.constants[op.outputs[0][0]] = _store(value, op.outputs[0][1], round_fp16=True, op=op)

    def _fold_constexpr(self, op: Operation) -> None:
        params = {}
        for pname, bindings in op.params.items():
            for kind, payload in bindings:
                if kind == "var" and payload not in self.constants:
                    raise ProgramError(f"{op.location}: parameter '{pname}' uses '{payload}', which is not a constant")
            params[pname] = [self.constants[p] if kind == "var" else p for kind, p in bindings]
        for (name, _), value in zip(op.outputs, _call(op, params, round_fp16=True)):
            self.constants[name] = value

    # -- running ---------------------------------------------------------------------------
    def run(self, feeds: dict[str, np.ndarray], *, round_fp16: bool = True, observe=None) -> dict[str, object]:
        """Execute ``main`` on ``feeds`` (input name -> array); every block output by name.

        ``observe(name, value)`` is called with every value an op produces (activation
        ranges for int8 calibration are measured that way)."""
        missing = set(self.inputs) - set(feeds)
        if missing:
            raise ValueError(f"missing program inputs: {', '.join(sorted(missing))}")
        if observe is not None:
            return self._execute(feeds, round_fp16, observe)
        key = (round_fp16, *(_fingerprint(feeds[name]) for name in sorted(self.inputs)))
        if key in self._recent:
            self._recent.move_to_end(key)
            return dict(self._recent[key])
        outputs = self._execute(feeds, round_fp16)
        self._recent[key] = outputs
        if len(self._recent) > _REMEMBERED_RUNS:
            self._recent.popitem(last=False)
        return dict(outputs)

    def _execute(self, feeds: dict[str, np.ndarray], round_fp16: bool, observe=None) -> dict[str, object]:
        env: dict[str, object] = dict(self.constants)
        for name, info in self.inputs.items():
            value = np.asarray(feeds[name])
            if info is not None and not info.matches(value.shape):
                raise ValueError(f"input '{name}' has shape {value.shape}; the program takes {info}")
            env[name] = _store(value, info, round_fp16=round_fp16)
        for op in self.steps:
            params = {}
            for pname, bindings in op.params.items():
                bound = []
                for kind, payload in bindings:
                    if kind == "var":
                        if payload not in env:
                            raise ProgramError(f"{op.location}: parameter '{pname}' uses '{payload}', "
                                               "which no earlier op produces")
                        bound.append(env[payload])
                    else:
                        bound.append(payload)
                params[pname] = bound
            for (name, _), value in zip(op.outputs, _call(op, params, round_fp16=round_fp16)):
                env[name] = value
                if observe is not None:
                    observe(name, value)
        missing = [n for n in self.output_names if n not in env]
        if missing:
            raise ProgramError(f"function {FUNCTION} never produces its outputs {missing}")
        return {name: env[name] for name in self.output_names}

    @property
    def computes_fp16(self) -> bool:
        """Whether any executed op declares an fp16 result."""
        return any(info is not None and info.dtype == "fp16" for op in self.steps for _, info in op.outputs)


def _fingerprint(array) -> tuple:
    array = np.ascontiguousarray(array)
    return array.shape, str(array.dtype), hashlib.sha256(array.tobytes()).hexdigest()


def _call(op: Operation, params: dict[str, list], *, round_fp16: bool) -> list:
    call = OpCall(op.type, op.location, params, [info for _, info in op.outputs])
    try:
        result = OPS[op.type](call)
    except ProgramError:
        raise
    except (ValueError, TypeError, IndexError, KeyError, ArithmeticError) as exc:
        raise ProgramError(f"{op.location}: {exc}") from None
    results = list(result) if isinstance(result, tuple) else [result]
    if len(results) != len(op.outputs):
        raise ProgramError(f"{op.location} produced {len(results)} values for {len(op.outputs)} outputs")
    return [_store(value, info, round_fp16=round_fp16, op=op) for value, (_, info) in zip(results, op.outputs)]


def _store(value, info: TensorInfo | None, *, round_fp16: bool, op: Operation | None = None):
    """``value`` in its declared type (fp16 rounded unless switched off), shape checked."""
    if info is None or isinstance(value, (dict, list)):
        return value
    value = np.asarray(value)
    if not info.matches(value.shape):
        where = op.location if op is not None else "a value"
        raise ProgramError(f"{where} produced shape {value.shape}, the program declares {info}")
    if info.dtype == "fp16":
        return value.astype(np.float16 if round_fp16 else np.float32)
    dtype = info.numpy_dtype
    if dtype is None:
        raise ProgramError(f"values of type {info.dtype} are not supported")
    return value.astype(dtype, copy=False)
