"""Plug-in targets that optimize must never choose: ONNX artifacts damaged in known ways.

Each is the ONNX target under another name and benchmark backend, registered by
monkeypatching the target registry (tests/test_optimize.py).
"""

from __future__ import annotations

import time

import numpy as np

from evit_deploy.targets.onnx import OnnxTarget
from evit_deploy.targets.onnx.runtime import Session


def _edit_initializers(path, edit) -> None:
    """Rewrite the ONNX file at ``path`` with ``edit(initializers)`` applied (metadata, and so
    the description, kept)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    edit({init.name: init for init in model.graph.initializer}, numpy_helper)
    onnx.save(model, str(path))


class WrongScaleOnnx(OnnxTarget):
    """fp32, with the patch convolution's weights 30% too large: fails parity."""

    name = "wrong-scale"
    benchmark_backend = "wrong-scale-ort"

    @classmethod
    def precisions(cls):
        return ("fp32",)

    def export(self, traced, options, path, reporter):
        artifact = super().export(traced, options, path, reporter)

        def scale_first_conv(inits, helper):
            init = next(i for n, i in inits.items() if helper.to_array(i).ndim == 4)
            init.CopyFrom(helper.from_array(helper.to_array(init) * np.float32(1.3), init.name))

        _edit_initializers(artifact.path, scale_first_conv)
        return artifact


class SwappedTopOnnx(OnnxTarget):
    """int8, with the two largest logits swapped: inside the int8 parity class where the
    top two are close (the error is their gap), yet every top-1 answer is wrong."""

    name = "swapped-top"
    benchmark_backend = "swapped-top-ort"

    @classmethod
    def precisions(cls):
        return ("int8",)

    def export(self, traced, options, path, reporter):
        import onnx
        from onnx import helper, numpy_helper

        artifact = super().export(traced, options, path, reporter)
        model = onnx.load(str(artifact.path))
        final = model.graph.output[0].name
        classes = model.graph.output[0].type.tensor_type.shape.dim[-1].dim_value
        for node in model.graph.node:
            node.output[:] = [f"{final}_exact" if o == final else o for o in node.output]
        constants = {"k2": np.array([2]), "i0": np.array(0), "i1": np.array(1), "axis1": np.array([1]), "classes": np.array(classes),
                     "off_on": np.array([0, 1], np.float32)}
        model.graph.initializer.extend(numpy_helper.from_array(v, f"swap_{k}") for k, v in constants.items())
        node = helper.make_node
        model.graph.node.extend([
            node("TopK", [f"{final}_exact", "swap_k2"], ["swap_vals", "swap_idx"], axis=-1),
            node("Gather", ["swap_vals", "swap_i0"], ["swap_v1"], axis=1),
            node("Gather", ["swap_vals", "swap_i1"], ["swap_v2"], axis=1),
            node("Sub", ["swap_v2", "swap_v1"], ["swap_gap"]),
            node("Unsqueeze", ["swap_gap", "swap_axis1"], ["swap_gap_col"]),
            node("OneHot", ["swap_idx", "swap_classes", "swap_off_on"], ["swap_hot"], axis=-1),
            node("Gather", ["swap_hot", "swap_i0"], ["swap_hot1"], axis=1),
            node("Gather", ["swap_hot", "swap_i1"], ["swap_hot2"], axis=1),
            node("Sub", ["swap_hot1", "swap_hot2"], ["swap_sign"]),
            node("Mul", ["swap_gap_col", "swap_sign"], ["swap_delta"]),
            node("Add", [f"{final}_exact", "swap_delta"], [final]),
        ])
        onnx.checker.check_model(model)
        onnx.save(model, str(artifact.path))
        return artifact


class SlowSession(Session):
    def __call__(self, inputs):
        time.sleep(0.02)
        return super().__call__(inputs)


class SlowOnnx(OnnxTarget):
    """fp32 and right, 20 ms slower per batch."""

    name = "slow"
    benchmark_backend = "slow-ort"
    session_class = f"{__name__}:SlowSession"

    @classmethod
    def precisions(cls):
        return ("fp32",)


TEST_TARGETS = {cls.name: cls for cls in (WrongScaleOnnx, SwappedTopOnnx, SlowOnnx)}
