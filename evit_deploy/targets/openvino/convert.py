"""From the shared ``torch.export`` trace to an OpenVINO IR (``.xml`` + ``.bin``).

``openvino.convert_model`` reads the ExportedProgram directly. What is done here by hand,
because no library does it for us:

* the IR's input and output get the description's names (the program's placeholder is
  ``x``, its output ``linear:0``), and a fixed-batch IR gets its static shape (the
  converter reports ``[?,3,?,?]`` although the trace's reshapes are fixed);
* the evit-deploy description goes into the IR's ``rt_info`` (see :mod:`.runtime`), with
  what int8 quantization (:mod:`.quantize`) did;
* the operations' PyTorch modules are recorded (``profile`` attributes time to blocks
  through them): the converter names each operation after the FX node it came from, so
  the program is decoded here as the converter would decode it, and its node names are
  matched with their ``nn_module_stack``;
* the two files are written into a temporary directory and renamed into place, weights
  first, so that neither name ever holds a half-written file.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

from ... import calibration as calib
from ...description import ModelDescription
from ...errors import ExportError
from ...native_output import quiet_loggers
from .quantize import quantize
from .runtime import (DESCRIPTION, INFERENCE_PRECISION, MODULE_PATHS, PRECISIONS, RT_KEY, bin_path, first_line,
                      import_openvino)


def export(traced, options, path: Path, reporter) -> tuple[ModelDescription, tuple[Path]]:
    """Write the IR at ``path`` (and its .bin) as ``options`` ask: the description it
    holds, and the weights file beside it."""
    ov = import_openvino()
    inference_precision, weights = PRECISIONS[options.precision]
    desc = traced.description
    model, paths = convert(traced)
    info = {"inference_precision": inference_precision, "weights": weights, "openvino_version": ov.__version__}
    if options.precision == "int8":
        calibration = calib.for_export(desc.preprocessing, options.calibration, reporter)
        model, facts = quantize(model, desc, calibration, options.int8_kernels, reporter)
        desc = desc.with_extra(int8=facts)
    desc = desc.with_extra(openvino=info)
    set_description(model, desc, inference_precision, paths)
    _, weights_file = save(model, path, compress_to_fp16=options.precision == "fp16")
    return desc, (weights_file,)


def convert(traced):
    """The trace's program as an ``openvino.Model`` with the description's names and shape,
    and the PyTorch module each of its operations came from (operation name -> module path,
    for ``profile``)."""
    ov = import_openvino()
    desc: ModelDescription = traced.description
    try:
        with quiet_loggers():
            decoder = _decoder(traced.program)
            model = ov.convert_model(decoder)
    except Exception as exc:
        raise ExportError(f"openvino.convert_model failed: {first_line(exc)}") from exc
    if len(model.inputs) != 1 or len(model.outputs) != len(desc.outputs):
        raise ExportError(f"the converted model has {len(model.inputs)} inputs and {len(model.outputs)} outputs; "
                          f"the description lists 1 and {len(desc.outputs)}")
    model.inputs[0].get_tensor().set_names({desc.input.name})
    model.inputs[0].get_node().set_friendly_name(desc.input.name)
    for port, spec in zip(model.outputs, desc.outputs):
        port.get_tensor().set_names({spec.name})
    shape = [d if isinstance(d, int) else -1 for d in desc.input.shape]
    try:
        model.reshape({desc.input.name: ov.PartialShape(shape)})
    except Exception as exc:
        raise ExportError(f"OpenVINO cannot give the model the input shape {desc.input.shape}: "
                          f"{first_line(exc)}") from exc
    return model, module_paths(decoder)


def _decoder(program):
    """What ``convert_model(program)`` converts: OpenVINO's FX decoder of the program after
    OpenVINO's decompositions. Made here so that its node names, which become the IR's
    operation names, can be matched with the modules they came from."""
    from openvino.frontend.pytorch.fx_decoder import TorchFXPythonDecoder

    return TorchFXPythonDecoder.from_exported_program(program)


def module_paths(decoder) -> dict[str, str]:
    """FX node name -> the innermost PyTorch module it ran in (without the input adapter's
    ``model.`` prefix); the IR names each operation ``<node>/<aten op>/<type>``."""
    paths = {}
    for node in decoder.pt_module.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if stack:
            path = list(stack.values())[-1][0]
            if path.startswith("model."):
                paths[node.name] = path.removeprefix("model.")
    return paths


#: OpenVINO's automatic names: a type and a process-wide count (``Constant_22274``,
#: ``ShapeOf_20845``, ``Constant_323814_compressed``). The converter's own names have a
#: ``/`` or start in lower case.
_AUTOMATIC_NAME = re.compile(r"[A-Z][A-Za-z0-9]*_[0-9]+(_[a-z]+)*")


def stable_names(model) -> None:
    """Rename every operation that carries an automatic name after its place in the graph.
    Automatic names count every node made in the process (and constant folding passes them
    on), so the same export made twice in one process would differ in its .xml; names the
    converter took from the program are kept (``profile`` reads them)."""
    for index, op in enumerate(model.get_ordered_ops()):
        if _AUTOMATIC_NAME.fullmatch(op.get_friendly_name()):
            op.set_friendly_name(f"{op.get_type_name()}_{index}")


def set_description(model, desc: ModelDescription, inference_precision: str,
                    module_paths: dict[str, str] | None = None) -> None:
    """The description in the IR's rt_info: the whole of it as JSON (what ``run`` and
    ``verify`` read), and its main facts as separate entries for people reading the .xml."""
    from ... import __version__

    model.set_rt_info(desc.to_json(), list(DESCRIPTION))
    model.set_rt_info(inference_precision, list(INFERENCE_PRECISION))
    for key, value in {"model": desc.model, "weights_sha256": desc.weights, "input_format": desc.input_format,
                       "mean": ",".join(str(v) for v in desc.preprocessing.mean),
                       "std": ",".join(str(v) for v in desc.preprocessing.std),
                       "precision": desc.extra.get("precision", "fp32"),
                       "evit_deploy_version": __version__}.items():
        model.set_rt_info(str(value), [RT_KEY, key])
    if module_paths:
        model.set_rt_info(json.dumps(module_paths, sort_keys=True, separators=(",", ":")), list(MODULE_PATHS))


def save(model, xml: Path, *, compress_to_fp16: bool) -> tuple[Path, Path]:
    """Write ``xml`` and the .bin beside it: saved in a temporary directory next to them,
    then renamed, weights first. On failure neither final name is touched.

    ``save_model`` transforms the graph as it writes (and names the nodes it makes
    automatically), so the saved IR is read back, given stable names and serialized as is:
    the same export gives the same bytes."""
    ov = import_openvino()
    xml = Path(xml)
    weights = bin_path(xml)
    with tempfile.TemporaryDirectory(prefix=f".{xml.stem}.tmp-", dir=xml.parent) as tmp:
        saved = Path(tmp) / "saved" / xml.name
        staged = Path(tmp) / xml.name
        try:
            # save_model's default (compress_to_fp16=True) would store fp16 weights.
            ov.save_model(model, str(saved), compress_to_fp16=compress_to_fp16)
            written = ov.Core().read_model(str(saved))
            written.set_friendly_name(xml.stem)
            stable_names(written)
            ov.serialize(written, str(staged), str(bin_path(staged)))
        except Exception as exc:
            raise ExportError(f"openvino.save_model failed: {first_line(exc)}") from exc
        os.replace(bin_path(staged), weights)
        os.replace(staged, xml)
    return xml, weights
