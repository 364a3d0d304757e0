"""ExportedProgram -> the Relax module that is tuned and compiled.

Tuning and compiling must see exactly the same fused kernels (the tuning database is
keyed by kernel), so both start from :func:`prepare`.
"""

from __future__ import annotations

LAYOUTS = ("NCHW", "NHWC")
DEFAULT_LAYOUT = "NHWC"
#: Changes whenever :func:`prepare` produces different kernels: a tuning database made
#: by another version matches fewer (or none) of them.
VERSION = "5-nhwc-simplified-fast-softmax-layout-free-weights-nchw-input-conv"


def import_program(program):
    """The Relax module of a ``torch.export`` program, weights embedded as constants.

    ``run_ep_decomposition=False`` keeps ``matmul`` whole: decomposed, every attention
    matmul arrives as ``expand`` + ``bmm`` and the expands become identity
    ``broadcast_to`` copies of every query, key and value.
    """
    from tvm.relax.frontend.torch import from_exported_program

    return from_exported_program(program, run_ep_decomposition=False)


def prepare(mod, target, *, layout: str = DEFAULT_LAYOUT, precision: str = "fp32"):
    """Optimise, legalise and fuse ``mod`` for ``target`` (a ``tvm.target.Target``).

    ``layout`` is the convolution data layout. PyTorch's NCHW makes a convolution's
    innermost loop run along the image width (14, 7 or 4 pixels in EfficientViT's
    stages), too short for 8- or 16-lane vectors; NHWC puts the channels (64 to 384)
    innermost. ``precision="bf16"`` computes the 1x1 convolutions from bf16 weights and
    activations (:func:`convolutions_in_bf16`).
    """
    import tvm
    from tvm import relax

    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    from .quantize import PRECISIONS

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, got {precision!r}")
    passes = [convolutions_in_bf16()] if precision == "bf16" else []
    passes += [
        # Softmax with TVM's polynomial exp: vectorisable, 2.4x faster on the attention maps
        # here, and its error (~2e-6 of the logit scale end to end) is far inside parity.
        relax.transform.FastMathTransform(),
        relax.transform.DecomposeOpsForInference(),
        relax.transform.CanonicalizeBindings(),
        # The attention-bias gather (biases[:, idxs]) depends on weights only.
        fold_constant_layout_ops(),
    ]
    if layout == "NHWC":
        passes += [
            # TOPI lowers transposed convolutions (the FPN's extra levels) in NCHW only;
            # left to follow its NHWC input, one would reach the VM unlowered.
            relax.transform.ConvertLayout({"relax.nn.conv2d": ["NHWC", "OHWI"],
                                           "relax.nn.conv2d_transpose": ["NCHW", "IOHW"]}),
            fold_constant_layout_ops(),         # weights OIHW -> OHWI and biases, once
            simplify_layout(),
            read_image_in_first_convolution(),
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


def bound_value(mutator, expr):
    """What a dataflow variable is bound to (so rewrites can look through ``lv = ...``),
    or ``expr`` itself."""
    from tvm import relax

    if isinstance(expr, relax.Var):
        bound = mutator.lookup_binding(expr)
        if bound is not None:
            return bound
    return expr


def op_name(expr) -> str | None:
    """The operator a Relax call applies (``relax.nn.conv2d``), or None for anything else."""
    from tvm import relax

    return getattr(getattr(expr, "op", None), "name", None) if isinstance(expr, relax.Call) else None


def rewrite_functions(mutator) -> object:
    """Run a Relax mutator (an instance, made for the module) over every Relax function of
    its module and return the rewritten module."""
    from tvm import relax

    for gv, func in mutator.builder_.get().functions_items():
        if isinstance(func, relax.Function):
            mutator.builder_.update_func(gv, mutator.visit_expr(func))
    return mutator.builder_.get()


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
            return bound_value(self, expr)

        def visit_call_(self, call):
            call = super().visit_call_(call)
            name = op_name(call)
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
        return rewrite_functions(Folder(mod))

    return fold


def simplify_layout():
    """Move layout changes out of the way so that NHWC tensors stay NHWC.

    After ``ConvertLayout`` every operation it cannot convert (the attention's
    ``reshape(B, C, H*W)``, ``matmul``, channel ``split``/``strided_slice``/``concat``) gets a transpose to NCHW
    before it and one back after it: about ten small copy kernels per attention head.
    These rewrites are exact algebra on shapes (no arithmetic changes):

    * ``reshape(permute(x, NHWC->NCHW), [B, C, HW])`` -> ``permute(reshape(x, [B, HW, C]), [0, 2, 1])``
      and the inverse for ``reshape(permute(y, [0, 2, 1]), [B, C, H, W])``;
    * ``matmul(a^T, b^T)`` -> ``matmul(b, a)^T``;
    * element-wise operations, ``split``, ``strided_slice`` and ``concat`` of equally permuted tensors are done
      before the permutation;
    * consecutive permutations are composed, identities dropped.

    What is left is one transpose where the window partition needs it, and matmuls that
    read their operands transposed (fused into the matmul kernel later).
    """
    import tvm
    from tvm import relax

    binary = {"relax.add", "relax.subtract", "relax.multiply", "relax.divide"}
    unary = {"relax.nn.relu", "relax.sigmoid"}

    def shape(expr):
        ty = expr.ty
        return [int(v) for v in ty.shape.values] if hasattr(ty, "shape") and hasattr(ty.shape, "values") else None

    def permute(x, axes):
        return x if list(axes) == list(range(len(axes))) else relax.op.permute_dims(x, list(axes))

    @relax.expr_functor.mutator
    class Simplifier(relax.PyExprMutator):
        def __init__(self, mod):
            super().__init__(mod)
            self.changed = False

        def producer(self, expr):
            return bound_value(self, expr)

        def permuted(self, expr):
            """(x, axes) if ``expr`` is ``permute_dims(x, axes)``."""
            p = self.producer(expr)
            if op_name(p) != "relax.permute_dims":
                return None
            n = len(shape(p.args[0]) or [])
            axes = p.attrs.axes
            return p.args[0], (list(range(n))[::-1] if axes is None else [int(a) for a in axes])

        def visit_call_(self, call):
            call = super().visit_call_(call)
            name = op_name(call)
            rule = {"relax.permute_dims": self.compose, "relax.reshape": self.flatten,
                    "relax.matmul": self.transposed_matmul, "relax.concat": self.concat,
                    "relax.strided_slice": self.slice}.get(name)
            if rule is None and name in binary:
                rule = self.binary
            if rule is None and name in unary:
                rule = self.unary
            new = rule(call) if rule is not None else None
            if new is None:
                return call
            self.changed = True
            return new

        def compose(self, call):
            x_shape = shape(call.args[0])
            if x_shape is None:
                return None
            axes = call.attrs.axes
            axes = list(range(len(x_shape)))[::-1] if axes is None else [int(a) for a in axes]
            if axes == list(range(len(axes))):
                return call.args[0]
            inner = self.permuted(call.args[0])
            if inner is None:
                return None
            x, first = inner
            return permute(x, [first[a] for a in axes])

        def flatten(self, call):
            target = shape(call)
            inner = self.permuted(call.args[0])
            if inner is None or target is None:
                return None
            x, axes = inner
            x_shape = shape(x)
            if axes == [0, 3, 1, 2] and len(target) == 3:       # NHWC viewed as (B, C, H*W)
                b, h, w, c = x_shape
                if target == [b, c, h * w]:
                    return relax.op.permute_dims(relax.op.reshape(x, [b, h * w, c]), [0, 2, 1])
            if axes == [0, 2, 1] and len(target) == 4:           # (B, HW, C) viewed as NCHW
                b, n, c = x_shape
                if target[:2] == [b, c] and target[2] * target[3] == n:
                    return relax.op.permute_dims(relax.op.reshape(x, [b, target[2], target[3], c]), [0, 3, 1, 2])
            return None

        def transposed_matmul(self, call):
            a, b = (self.permuted(arg) for arg in call.args[:2])
            if a is None or b is None:
                return None
            n = len(a[1])
            swap_last = list(range(n - 2)) + [n - 1, n - 2]
            if a[1] != swap_last or b[1] != swap_last:
                return None
            return relax.op.permute_dims(relax.op.matmul(b[0], a[0], out_dtype=call.attrs.out_dtype), swap_last)

        def binary(self, call):
            a, b = (self.permuted(arg) for arg in call.args[:2])
            if a is None or b is None or a[1] != b[1] or shape(a[0]) != shape(b[0]):
                return None
            return relax.op.permute_dims(relax.Call(call.op, [a[0], b[0]], call.attrs), a[1])

        def unary(self, call):
            inner = self.permuted(call.args[0])
            if inner is None:
                return None
            return relax.op.permute_dims(relax.Call(call.op, [inner[0]], call.attrs), inner[1])

        def slice(self, call):
            # The attention takes each head's channels (and q, k, v) by slicing: sliced
            # along the axis the permutation moved the channels to, the tensor stays NHWC.
            inner = self.permuted(call.args[0])
            if inner is None:
                return None
            x, axes = inner
            sliced_axes = [axes[int(a.value) % len(axes)] for a in call.args[1].fields]
            return relax.op.permute_dims(relax.op.strided_slice(x, sliced_axes, *call.args[2:],
                                                                assume_inbound=call.attrs.assume_inbound), axes)

        def concat(self, call):
            fields = self.producer(call.args[0])
            if not isinstance(fields, relax.Tuple):
                return None
            parts = [self.permuted(f) for f in fields.fields]
            if any(p is None for p in parts) or any(p[1] != parts[0][1] for p in parts):
                return None
            axes = parts[0][1]
            axis = int(call.attrs.axis) % len(axes)
            return relax.op.permute_dims(relax.op.concat([p[0] for p in parts], axis=axes[axis]), axes)

        def visit_tuple_getitem_(self, op):
            op = super().visit_tuple_getitem_(op)
            split = self.producer(op.tuple_value)
            if op_name(split) != "relax.split":
                return op
            inner = self.permuted(split.args[0])
            if inner is None:
                return op
            x, axes = inner
            axis = int(split.attrs.axis) % len(axes)
            sections = split.attrs.indices_or_sections
            try:
                sections = [int(s) for s in sections]
            except TypeError:              # a number of equal sections, not split points
                sections = int(sections)
            self.changed = True
            part = relax.TupleGetItem(relax.op.split(x, sections, axis=axes[axis]), op.index)
            return relax.op.permute_dims(part, axes)

    @tvm.transform.module_pass(opt_level=0, name="SimplifyLayout")
    def simplify(mod, _ctx):
        cleanup = tvm.transform.Sequential([relax.transform.CanonicalizeBindings(),
                                            relax.transform.EliminateCommonSubexpr(),
                                            relax.transform.DeadCodeElimination()])
        for _ in range(12):
            simplifier = Simplifier(mod)
            rewritten = rewrite_functions(simplifier)
            if not simplifier.changed:
                break
            mod = cleanup(rewritten)
        return mod

    return simplify


def read_image_in_first_convolution():
    """Fold the input's NCHW -> NHWC transpose into the convolution that reads it.

    The image comes in NCHW; as a kernel of its own, the transpose read and wrote the
    whole batch (9.6 MB each way at 16x224x224) and took 1.3-1.4 ms in every model, about
    as long as the 3-channel convolution after it. Fused, the convolution reads the NCHW
    image directly (its zero padding already indexes the input element by element), as
    onnxruntime's first convolution does: M0 ran 4.7% faster.
    """
    import tvm
    from tvm import relax, te, topi

    def conv_of_nchw(x, filt, stride, padding, dilation, groups, kernel_layout, out_dtype):
        nhwc = te.compute((x.shape[0], x.shape[2], x.shape[3], x.shape[1]),
                          lambda n, h, w, c: x[n, c, h, w], name="T_transpose")
        return topi.nn.conv(nhwc, filt, stride, padding, dilation, groups, "NHWC", kernel_layout, out_dtype)

    @relax.expr_functor.mutator
    class Folder(relax.PyExprMutator):
        def __init__(self, mod, inputs):
            super().__init__(mod)
            self.inputs = inputs

        def visit_call_(self, call):
            call = super().visit_call_(call)
            if op_name(call) != "relax.nn.conv2d":
                return call
            attrs = call.attrs
            producer = bound_value(self, call.args[0])
            if not (attrs.data_layout == attrs.out_layout == "NHWC" and op_name(producer) == "relax.permute_dims"
                    and [int(a) for a in producer.attrs.axes] == [0, 2, 3, 1]
                    and any(producer.args[0].same_as(x) for x in self.inputs)):
                return call
            return self.builder_.call_te(conv_of_nchw, producer.args[0], call.args[1], stride=attrs.strides,
                                         padding=attrs.padding, dilation=attrs.dilation, groups=attrs.groups,
                                         kernel_layout=attrs.kernel_layout,
                                         out_dtype=attrs.out_dtype if attrs.out_dtype != "" else None,
                                         primfunc_name_hint="conv2d_nchw_input")

    @tvm.transform.module_pass(opt_level=0, name="ReadImageInFirstConvolution")
    def fold(mod, _ctx):
        # The transpose stays only if something else reads it.
        return relax.transform.DeadCodeElimination()(rewrite_functions(Folder(mod, list(mod["main"].params))))

    return fold


def convolutions_in_bf16():
    """Give every convolution a bf16 library computes in bf16 (:mod:`.quantize`: dense,
    unpadded, 1x1, constant fp32 weights) bf16 weights and an fp32 result::

        conv2d(x, W)  ->  conv2d(x, bf16(W), out_dtype="float32")

    The weights are rounded here, once; the kernel rounds its fp32 activations to bf16
    itself, block by block, and accumulates in fp32 (schedules/gemm_bf16.py).
    """
    import tvm
    from tvm import relax

    from .quantize import computes_in_bf16, round_weights

    constant = tvm.ir.expr.GenericConst

    @relax.expr_functor.mutator
    class Caster(relax.PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if op_name(call) != "relax.nn.conv2d":
                return call
            x, w = call.args[:2]
            a = call.attrs
            wc = bound_value(self, w)
            if not (isinstance(wc, constant) and hasattr(wc.value, "numpy")):
                return call
            weights = wc.value.numpy()
            if not computes_in_bf16(str(x.ty.dtype), weights, kernel_layout=str(a.kernel_layout),
                                    groups=int(a.groups), padding=a.padding, out_dtype=str(a.out_dtype)):
                return call
            return relax.op.nn.conv2d(
                x, relax.const(round_weights(weights)), strides=a.strides, padding=a.padding,
                dilation=a.dilation, groups=a.groups, data_layout=a.data_layout, kernel_layout=a.kernel_layout,
                out_layout=a.out_layout, out_dtype="float32")

    @tvm.transform.module_pass(opt_level=0, name="ConvolutionsInBf16")
    def cast(mod, _ctx):
        return rewrite_functions(Caster(mod))

    return cast
