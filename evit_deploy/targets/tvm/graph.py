"""ExportedProgram -> the Relax module that is tuned and compiled.

Tuning and compiling must see exactly the same fused kernels (the tuning database is
keyed by kernel), so both start from :func:`prepare`.
"""

from __future__ import annotations

LAYOUTS = ("NCHW", "NHWC")
DEFAULT_LAYOUT = "NHWC"
#: Changes whenever :func:`prepare` produces different kernels: a tuning database made
#: by another version matches fewer (or none) of them.
VERSION = "2-nhwc-layout-free-weights"


def import_program(program):
    """The Relax module of a ``torch.export`` program, weights embedded as constants.

    ``run_ep_decomposition=False`` keeps ``matmul`` whole: decomposed, every attention
    matmul arrives as ``expand`` + ``bmm`` and the expands become identity
    ``broadcast_to`` copies of every query, key and value.
    """
    from tvm.relax.frontend.torch import from_exported_program

    return from_exported_program(program, run_ep_decomposition=False)


def prepare(mod, target, *, layout: str = DEFAULT_LAYOUT):
    """Optimise, legalise and fuse ``mod`` for ``target`` (a ``tvm.target.Target``).

    ``layout`` is the convolution data layout. PyTorch's NCHW makes a convolution's
    innermost loop run along the image width (14, 7 or 4 pixels in EfficientViT's
    stages), too short for 8- or 16-lane vectors; NHWC puts the channels (64 to 384)
    innermost.
    """
    import tvm
    from tvm import relax

    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    passes = [
        relax.transform.DecomposeOpsForInference(),
        relax.transform.CanonicalizeBindings(),
        # The attention-bias gather (biases[:, idxs]) depends on weights only.
        fold_constant_layout_ops(),
    ]
    if layout == "NHWC":
        passes += [
            relax.transform.ConvertLayout({"relax.nn.conv2d": ["NHWC", "OHWI"]}),
            fold_constant_layout_ops(),         # weights OIHW -> OHWI and biases, once
        ]
    passes += [
        relax.transform.FuseTransposeMatmul(),
        relax.transform.DeadCodeElimination(),
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        # (No FoldConstant here: everything constant is folded above, and the pass spends
        # seconds per kernel looking.)
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
        relax.transform.DeadCodeElimination(),
        # Weights are constants: let tuned kernels choose their layout, which the build
        # then applies to the constants once (see compile.build).
        relax.transform.AttachAttrLayoutFreeBuffers(),
    ]
    with target, tvm.transform.PassContext(opt_level=3):
        return tvm.transform.Sequential(passes)(mod)


def fold_constant_layout_ops():
    """Evaluate ``take``, ``permute_dims`` and ``reshape`` of constants with numpy.

    Relax's FoldConstant compiles every folded call with LLVM (seconds each); the model
    has one gather per attention layer and one weight transpose per convolution, so
    numpy saves about a minute per import.
    """
    import numpy as np
    import tvm
    from tvm import relax

    # Relax tensor constants are ir.GenericConst wrapping a runtime tensor in .value.
    constant = tvm.ir.expr.GenericConst

    def take(call, a, idx):
        axis = call.attrs.axis
        return np.take(a, idx.astype(np.int64), axis=None if axis is None else int(axis))

    def permute_dims(call, a):
        axes = call.attrs.axes
        return np.transpose(a, None if axes is None else [int(i) for i in axes])

    folders = {"relax.take": take, "relax.permute_dims": permute_dims}

    def is_tensor_constant(expr) -> bool:
        return isinstance(expr, constant) and hasattr(expr.value, "numpy")

    @relax.expr_functor.mutator
    class Folder(relax.PyExprMutator):
        def resolve(self, expr):
            """A constant bound to a variable (``lv = metadata[...]``) counts as constant."""
            if isinstance(expr, relax.Var):
                bound = self.lookup_binding(expr)
                if bound is not None:
                    return bound
            return expr

        def visit_call_(self, call):
            call = super().visit_call_(call)
            name = getattr(call.op, "name", None)
            if name != "relax.reshape" and name not in folders:
                return call
            args = [self.resolve(a) for a in call.args]
            if not args or not is_tensor_constant(args[0]):
                return call
            if name == "relax.reshape" and isinstance(args[1], relax.ShapeExpr):
                shape = [int(d) for d in args[1].values]
                return relax.const(np.ascontiguousarray(args[0].value.numpy().reshape(shape)))
            if name in folders and all(is_tensor_constant(a) for a in args):
                arrays = [a.value.numpy() for a in args]
                return relax.const(np.ascontiguousarray(folders[name](call, *arrays)))
            return call

    @tvm.transform.module_pass(opt_level=0, name="FoldConstantLayoutOps")
    def fold(mod, _ctx):
        folder = Folder(mod)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                folder.builder_.update_func(gv, folder.visit_expr(func))
        return folder.builder_.get()

    return fold
