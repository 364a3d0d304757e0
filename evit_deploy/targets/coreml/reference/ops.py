"""The ML program operations the reference executor knows, one function per op.

Each function takes an :class:`OpCall` (the op's bound parameters) and returns its
output value, or a tuple for ops with several outputs. Float inputs arrive as fp32
whatever the program declares: the executor rounds each result to the declared type
afterwards, so an fp16 program is computed in fp32 and rounded op by op.

Semantics follow the MIL op definitions of coremltools (iOS15-iOS18 opsets).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .blob import unpack_subbyte
from .values import TensorInfo

OpFunction = Callable[["OpCall"], Any]
OPS: dict[str, OpFunction] = {}

_MISSING = object()


def register(*names: str):
    def add(fn: OpFunction) -> OpFunction:
        for name in names:
            OPS[name] = fn
        return fn
    return add


@dataclass
class OpCall:
    """One op's parameters, as the executor bound them."""

    type: str
    location: str
    params: dict[str, list]                 # parameter -> bound values (several for variadic ones)
    outputs: list[TensorInfo | None] = field(default_factory=list)

    def has(self, name: str) -> bool:
        return name in self.params

    def value(self, name: str, default=_MISSING):
        """A single-valued parameter; float tensors as fp32."""
        if name not in self.params:
            if default is _MISSING:
                raise ValueError(f"required parameter '{name}' is not bound")
            return default
        bound = self.params[name]
        if len(bound) != 1:
            raise ValueError(f"parameter '{name}' has {len(bound)} values, expected one")
        return _as_compute(bound[0])

    def values(self, name: str) -> list:
        return [_as_compute(v) for v in self.params.get(name, [])]

    def int(self, name: str, default=_MISSING) -> int:
        v = self.value(name, default)
        return int(np.asarray(v).item()) if v is not None else None

    def bool(self, name: str, default=_MISSING) -> bool:
        return bool(np.asarray(self.value(name, default)).item())

    def str(self, name: str, default=_MISSING) -> str:
        v = self.value(name, default)
        return str(np.asarray(v, dtype=object).item())

    def ints(self, name: str, default=_MISSING) -> tuple[int, ...] | None:
        v = self.value(name, default)
        return None if v is None else tuple(int(i) for i in np.asarray(v).reshape(-1))

    def bools(self, name: str, default=_MISSING) -> tuple[bool, ...] | None:
        v = self.value(name, default)
        return None if v is None else tuple(bool(b) for b in np.asarray(v).reshape(-1))


def _as_compute(value):
    if isinstance(value, np.ndarray) and value.dtype == np.float16:
        return value.astype(np.float32)
    return value


def _axis(axis: int, rank: int) -> int:
    if not -rank <= axis < max(rank, 1):
        raise ValueError(f"axis {axis} is out of range for rank {rank}")
    return axis % max(rank, 1)


# -- element-wise ------------------------------------------------------------------------------

@register("add")
def add(call: OpCall):
    return np.add(call.value("x"), call.value("y"))


@register("sub")
def sub(call: OpCall):
    return np.subtract(call.value("x"), call.value("y"))


@register("mul")
def mul(call: OpCall):
    return np.multiply(call.value("x"), call.value("y"))


@register("real_div")
def real_div(call: OpCall):
    x, y = call.value("x"), call.value("y")
    with np.errstate(divide="ignore", invalid="ignore"):   # x/0 is inf or nan, as on device
        return np.true_divide(x, y)


@register("relu")
def relu(call: OpCall):
    x = call.value("x")
    return np.maximum(x, np.zeros((), x.dtype))


@register("clip")
def clip(call: OpCall):
    x = call.value("x")
    return np.minimum(np.maximum(x, np.float32(call.value("alpha"))), np.float32(call.value("beta")))


@register("sigmoid")
def sigmoid(call: OpCall):
    x = call.value("x")
    # exp of a large negative input overflows to inf; 1 / (1 + inf) is the right limit.
    with np.errstate(over="ignore"):
        return (1.0 / (1.0 + np.exp(-x))).astype(x.dtype)


@register("softmax")
def softmax(call: OpCall):
    x = call.value("x")
    axis = call.int("axis", -1)
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


@register("cast")
def cast(call: OpCall):
    x = np.asarray(call.value("x"))
    target = call.str("dtype")
    # Floats are rounded to the declared output type by the executor, which also knows
    # whether fp16 rounding is switched off; only the kind of number changes here.
    if target in ("fp16", "fp32", "fp64"):
        return x.astype(np.float32)
    if target == "bool":
        return x != 0
    if target.startswith(("int", "uint")):
        return np.trunc(x).astype(np.int64) if x.dtype.kind == "f" else x.astype(np.int64)
    raise ValueError(f"cast to unsupported dtype '{target}'")


# -- linear algebra ----------------------------------------------------------------------------

@register("linear")
def linear(call: OpCall):
    x, weight = call.value("x"), call.value("weight")
    out = np.matmul(x, weight.T)
    bias = call.value("bias", None)
    return out if bias is None else out + bias


@register("matmul")
def matmul(call: OpCall):
    x, y = call.value("x"), call.value("y")
    if call.bool("transpose_x", False) and x.ndim >= 2:
        x = np.swapaxes(x, -1, -2)
    if call.bool("transpose_y", False) and y.ndim >= 2:
        y = np.swapaxes(y, -1, -2)
    return np.matmul(x, y)


def _conv_padding(pad_type: str, pad, in_size, kernel, strides, dilations) -> list[tuple[int, int]]:
    spatial = len(in_size)
    if pad_type == "valid":
        return [(0, 0)] * spatial
    if pad_type == "custom":
        if pad is None or len(pad) != 2 * spatial:
            raise ValueError(f"custom padding needs {2 * spatial} values, got {pad}")
        return [(pad[2 * i], pad[2 * i + 1]) for i in range(spatial)]
    if pad_type in ("same", "same_lower"):
        pads = []
        for size, k, s, d in zip(in_size, kernel, strides, dilations):
            out = -(-size // s)
            total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
            small, large = total // 2, total - total // 2
            pads.append((small, large) if pad_type == "same" else (large, small))
        return pads
    raise ValueError(f"unknown pad_type '{pad_type}'")


@register("conv")
def conv(call: OpCall):
    x, weight = call.value("x"), call.value("weight")
    spatial = x.ndim - 2
    if spatial not in (1, 2) or weight.ndim != x.ndim:
        raise ValueError(f"conv on a rank-{x.ndim} input with a rank-{weight.ndim} weight is not supported")
    if spatial == 1:                    # a 1-D conv is a 2-D conv over a height of one
        call = _conv1d_as_2d(call, x, weight)
        return conv(call)[:, :, 0, :]
    strides = call.ints("strides", None) or (1, 1)
    dilations = call.ints("dilations", None) or (1, 1)
    groups = call.int("groups", 1)
    pads = _conv_padding(call.str("pad_type", "valid"), call.ints("pad", None), x.shape[2:],
                         weight.shape[2:], strides, dilations)
    n, c, _, _ = x.shape
    o, cg, kh, kw = weight.shape
    if c != cg * groups or o % groups:
        raise ValueError(f"weight {weight.shape} with groups={groups} does not fit an input of {c} channels")
    x = np.pad(x, [(0, 0), (0, 0), *pads])
    h, w = x.shape[2:]
    (sh, sw), (dh, dw) = strides, dilations
    ho, wo = (h - (kh - 1) * dh - 1) // sh + 1, (w - (kw - 1) * dw - 1) // sw + 1
    if ho <= 0 or wo <= 0:
        raise ValueError(f"the kernel does not fit the padded input {x.shape[2:]}")
    if kh == kw == 1 and sh == sw == 1:
        out = _grouped_pointwise(x, weight, groups)
    elif cg == 1 and o == c:
        out = _depthwise(x, weight, (ho, wo), strides, dilations)
    else:
        out = _im2col(x, weight, groups, (ho, wo), strides, dilations)
    bias = call.value("bias", None)
    if bias is not None:
        out = out + bias.reshape(1, -1, 1, 1)
    return out


def _conv1d_as_2d(call: OpCall, x, weight) -> OpCall:
    params = dict(call.params)
    params["x"], params["weight"] = [x[:, :, None, :]], [weight[:, :, None, :]]
    for name, neutral in (("strides", 1), ("dilations", 1)):
        if name in params:
            params[name] = [np.array([neutral, *call.ints(name)])]
    if "pad" in params:
        params["pad"] = [np.array([0, 0, *call.ints("pad")])]
    return OpCall(call.type, call.location, params, call.outputs)


def _grouped_pointwise(x, weight, groups):
    n, c, h, w = x.shape
    o = weight.shape[0]
    xs = x.reshape(n, groups, c // groups, h * w)
    ws = weight.reshape(groups, o // groups, c // groups)
    return np.matmul(ws[None], xs).reshape(n, o, h, w)


def _depthwise(x, weight, out_size, strides, dilations):
    """Each channel with its own kernel: one multiply-add per kernel tap."""
    n, c = x.shape[:2]
    ho, wo = out_size
    (sh, sw), (dh, dw) = strides, dilations
    out = np.zeros((n, c, ho, wo), np.float32)
    for i in range(weight.shape[2]):
        for j in range(weight.shape[3]):
            patch = x[:, :, i * dh: i * dh + (ho - 1) * sh + 1: sh, j * dw: j * dw + (wo - 1) * sw + 1: sw]
            out += patch * weight[:, 0, i, j][None, :, None, None]
    return out


def _im2col(x, weight, groups, out_size, strides, dilations):
    n, c = x.shape[:2]
    o, cg, kh, kw = weight.shape
    ho, wo = out_size
    (sh, sw), (dh, dw) = strides, dilations
    windows = np.lib.stride_tricks.sliding_window_view(x, ((kh - 1) * dh + 1, (kw - 1) * dw + 1), axis=(2, 3))
    windows = windows[:, :, ::sh, ::sw, ::dh, ::dw][:, :, :ho, :wo]      # n, c, ho, wo, kh, kw
    cols = windows.reshape(n, groups, cg, ho, wo, kh, kw).transpose(0, 1, 3, 4, 2, 5, 6)
    cols = cols.reshape(n, groups, ho * wo, cg * kh * kw)
    ws = weight.reshape(groups, o // groups, cg * kh * kw)
    out = np.matmul(cols, np.swapaxes(ws, 1, 2)[None])                    # n, g, ho*wo, o/g
    return out.transpose(0, 1, 3, 2).reshape(n, o, ho, wo)


@register("conv_transpose")
def conv_transpose(call: OpCall):
    """Transposed 2-D convolution: every input pixel scatters its kernel-weighted copy."""
    x, weight = call.value("x"), call.value("weight")
    if x.ndim != 4 or weight.ndim != 4:
        raise ValueError(f"conv_transpose on a rank-{x.ndim} input is not supported (2-D only)")
    strides = call.ints("strides", None) or (1, 1)
    dilations = call.ints("dilations", None) or (1, 1)
    groups = call.int("groups", 1)
    pad_type = call.str("pad_type", "valid")
    n, c, h, w = x.shape
    cin, cog, kh, kw = weight.shape                      # weight: C_in, C_out/groups, kh, kw
    if cin != c or c % groups:
        raise ValueError(f"weight {weight.shape} with groups={groups} does not fit an input of {c} channels")
    (sh, sw), (dh, dw) = strides, dilations
    full_h, full_w = (h - 1) * sh + (kh - 1) * dh + 1, (w - 1) * sw + (kw - 1) * dw + 1
    out = np.zeros((n, cog * groups, full_h, full_w), np.float32)
    xg = x.reshape(n, groups, c // groups, h, w)
    wg = weight.reshape(groups, c // groups, cog, kh, kw)
    for i in range(kh):
        for j in range(kw):
            contribution = np.einsum("ngchw,gco->ngohw", xg, wg[:, :, :, i, j]).reshape(n, -1, h, w)
            out[:, :, i * dh: i * dh + (h - 1) * sh + 1: sh, j * dw: j * dw + (w - 1) * sw + 1: sw] += contribution
    if pad_type == "custom":
        top, bottom, left, right = call.ints("pad", None) or (0, 0, 0, 0)
        out = out[:, :, top: full_h - bottom, left: full_w - right]
    elif pad_type != "valid":
        raise ValueError(f"conv_transpose with pad_type '{pad_type}' is not supported")
    shape = call.ints("output_shape", None)
    if shape is not None:
        out = out[:, :, : shape[-2], : shape[-1]]
    bias = call.value("bias", None)
    if bias is not None:
        out = out + bias.reshape(1, -1, 1, 1)
    return out


@register("upsample_nearest_neighbor")
def upsample_nearest_neighbor(call: OpCall):
    """Nearest-neighbour upsampling of the last two axes: output pixel i reads input pixel
    floor(i / scale), which is also what PyTorch's ``interpolate(size=...)`` computes."""
    x = call.value("x")
    scale_h = float(np.asarray(call.value("scale_factor_height", 1)).item())
    scale_w = float(np.asarray(call.value("scale_factor_width", 1)).item())
    h, w = x.shape[-2:]
    declared = call.outputs[0].shape if call.outputs and call.outputs[0] is not None else None
    if declared and all(isinstance(d, int) for d in declared[-2:]):
        out_h, out_w = declared[-2:]      # a fractional scale in fp32 can land a hair under the size
    else:
        out_h, out_w = int(np.floor(h * scale_h + 1e-4)), int(np.floor(w * scale_w + 1e-4))
    rows = np.minimum(np.floor(np.arange(out_h) / scale_h).astype(np.int64), h - 1)
    cols = np.minimum(np.floor(np.arange(out_w) / scale_w).astype(np.int64), w - 1)
    return x[..., rows[:, None], cols[None, :]]


@register("batch_norm")
def batch_norm(call: OpCall):
    x = call.value("x")
    shape = (1, -1) + (1,) * (x.ndim - 2)
    mean, variance = call.value("mean").reshape(shape), call.value("variance").reshape(shape)
    gamma, beta = call.value("gamma", None), call.value("beta", None)
    eps = np.float32(call.value("epsilon", np.float32(1e-5)))
    out = (x - mean) / np.sqrt(variance + eps)
    if gamma is not None:
        out = out * gamma.reshape(shape)
    if beta is not None:
        out = out + beta.reshape(shape)
    return out


# -- reductions --------------------------------------------------------------------------------

@register("reduce_mean")
def reduce_mean(call: OpCall):
    x = call.value("x")
    axes = call.ints("axes", None)
    axes = None if axes is None else tuple(_axis(a, x.ndim) for a in axes)
    return np.mean(x, axis=axes, keepdims=call.bool("keep_dims", False), dtype=np.float32)


# -- shapes ------------------------------------------------------------------------------------

@register("reshape")
def reshape(call: OpCall):
    x = call.value("x")
    shape = list(call.ints("shape"))
    # A 0 copies the input's dimension at the same position counted from the right
    # (iOS 17 semantics; identical to iOS 15/16 whenever those allow a 0 at all).
    for i, d in enumerate(shape):
        if d == 0:
            j = x.ndim - (len(shape) - i)
            shape[i] = x.shape[j] if j >= 0 else 1
    return np.reshape(x, shape)


@register("transpose")
def transpose(call: OpCall):
    return np.transpose(call.value("x"), call.ints("perm"))


@register("split")
def split(call: OpCall):
    x = call.value("x")
    axis = _axis(call.int("axis"), x.ndim)
    sizes = call.ints("split_sizes", None)
    if sizes is None:
        parts = call.int("num_splits")
        if x.shape[axis] % parts:
            raise ValueError(f"cannot split {x.shape[axis]} into {parts} equal parts")
        sizes = [x.shape[axis] // parts] * parts
    if sum(sizes) != x.shape[axis]:
        raise ValueError(f"split sizes {list(sizes)} do not add up to {x.shape[axis]}")
    return tuple(np.split(x, np.cumsum(sizes)[:-1], axis=axis))


@register("concat")
def concat(call: OpCall):
    values = call.values("values")
    axis = _axis(call.int("axis"), values[0].ndim)
    if call.bool("interleave", False):
        stacked = np.stack(values, axis=axis + 1)
        shape = list(values[0].shape)
        shape[axis] *= len(values)
        return stacked.reshape(shape)
    return np.concatenate(values, axis=axis)


@register("slice_by_index")
def slice_by_index(call: OpCall):
    x = call.value("x")
    rank = x.ndim
    begin, end = call.ints("begin"), call.ints("end")
    stride = call.ints("stride", None) or (1,) * rank
    begin_mask = call.bools("begin_mask", None) or (False,) * rank
    end_mask = call.bools("end_mask", None) or (False,) * rank
    squeeze = call.bools("squeeze_mask", None) or (False,) * rank
    index = []
    for i in range(rank):
        if squeeze[i]:
            index.append(begin[i])
        else:
            index.append(slice(None if begin_mask[i] else begin[i], None if end_mask[i] else end[i], stride[i]))
    return np.asarray(x[tuple(index)])


@register("pad")
def pad(call: OpCall):
    x = call.value("x")
    flat = call.ints("pad")
    dims = len(flat) // 2
    widths = [(0, 0)] * (x.ndim - dims) + [(flat[2 * i], flat[2 * i + 1]) for i in range(dims)]
    mode = call.str("mode", "constant")
    if mode == "constant":
        return np.pad(x, widths, mode="constant", constant_values=float(call.value("constant_val", 0.0)))
    if mode in ("reflect", "replicate"):
        return np.pad(x, widths, mode="reflect" if mode == "reflect" else "edge")
    raise ValueError(f"unknown pad mode '{mode}'")


# -- activation quantization (iOS 17) --------------------------------------------------------------

_INTEGER_RANGES = {"int8": (-128, 127), "uint8": (0, 255)}


def _per_axis(call: OpCall, name: str, rank: int, default=None):
    """A quantization parameter shaped to broadcast against a rank-``rank`` tensor: a
    scalar as it is, a vector along ``axis``."""
    value = call.value(name, default)
    if value is None:
        return None
    value = np.asarray(value, np.float32)
    if value.ndim == 0:
        return value
    if value.ndim != 1:
        raise ValueError(f"'{name}' must be a scalar or a vector, got shape {value.shape}")
    axis = call.int("axis", None)
    if axis is None:
        raise ValueError(f"a vector '{name}' needs an axis")
    shape = [1] * rank
    shape[_axis(axis, rank)] = value.size
    return value.reshape(shape)


@register("quantize")
def quantize(call: OpCall):
    """clip(round(x / scale) + zero_point) to the output type's range; round half to even,
    as coremltools' own evaluation of the op (numpy's around)."""
    x = call.value("input")
    dtype = call.str("output_dtype")
    if dtype not in _INTEGER_RANGES:
        raise ValueError(f"quantize to unsupported dtype '{dtype}'")
    scale = _per_axis(call, "scale", x.ndim)
    if not np.all(scale != 0):
        raise ValueError("quantize with a zero scale")
    zero_point = _per_axis(call, "zero_point", x.ndim, np.float32(0))
    low, high = _INTEGER_RANGES[dtype]
    return np.clip(np.around(x / scale) + zero_point, low, high)


@register("dequantize")
def dequantize(call: OpCall):
    """scale * (q - zero_point)."""
    q = np.asarray(call.value("input")).astype(np.float32)
    zero_point = _per_axis(call, "zero_point", q.ndim, np.float32(0))
    return _per_axis(call, "scale", q.ndim) * (q - zero_point)


# -- classifier --------------------------------------------------------------------------------

@register("classify")
def classify(call: OpCall):
    probabilities = np.asarray(call.value("probabilities"), np.float32).reshape(-1)
    classes = call.value("classes")
    classes = list(np.asarray(classes, dtype=object).reshape(-1)) if not isinstance(classes, list) else classes
    classes = [c.item() if isinstance(c, np.ndarray) else c for c in classes]
    if len(classes) != probabilities.size:
        raise ValueError(f"{len(classes)} class labels for {probabilities.size} probabilities")
    label = classes[int(np.argmax(probabilities))]
    return np.array(label, dtype=object), dict(zip(classes, (float(p) for p in probabilities)))


# -- compressed constants (evaluated once, when the program is loaded) ----------------------------

@register("constexpr_lut_to_dense")
def constexpr_lut_to_dense(call: OpCall):
    lut = call.value("lut")
    if call.has("shape"):                       # iOS 16: one palette, indices packed as bytes
        shape = call.ints("shape")
        nbits = int(np.log2(lut.size))
        if lut.ndim != 1 or 1 << nbits != lut.size:
            raise ValueError(f"an iOS 16 lookup table needs 2^n entries, got {lut.shape}")
        count = int(np.prod(shape))
        indices = unpack_subbyte(call.value("indices"), f"uint{nbits}", count) if nbits < 8 \
            else np.asarray(call.value("indices"))[:count]
        return lut[indices.astype(np.int64)].reshape(shape)
    # iOS 18: indices have the output's shape; lut is [blocks per axis..., palette, vector].
    indices = np.asarray(call.value("indices")).astype(np.int64)
    rank = indices.ndim
    if lut.ndim != rank + 2:
        raise ValueError(f"lookup table of rank {lut.ndim} for indices of rank {rank}")
    blocks = []
    for axis in range(rank):
        if indices.shape[axis] % lut.shape[axis]:
            raise ValueError(f"axis {axis}: {lut.shape[axis]} palettes do not divide {indices.shape[axis]}")
        block = indices.shape[axis] // lut.shape[axis]
        shape = [1] * rank
        shape[axis] = -1
        blocks.append((np.arange(indices.shape[axis]) // block).reshape(shape))
    picked = lut[(*blocks, indices)]            # indices shape + [vector]
    vector = lut.shape[-1]
    if vector == 1:
        return picked[..., 0]
    axis = _axis(call.int("vector_axis"), rank)
    # Each index stands for `vector` consecutive elements along vector_axis.
    moved = np.moveaxis(picked, -1, axis + 1)
    out_shape = list(indices.shape)
    out_shape[axis] *= vector
    return moved.reshape(out_shape)


@register("constexpr_affine_dequantize")
def constexpr_affine_dequantize(call: OpCall):
    data = np.asarray(call.value("quantized_data")).astype(np.float32)
    zero_point = np.asarray(call.value("zero_point")).astype(np.float32)
    scale = np.asarray(call.value("scale"), np.float32)
    axis = _axis(call.int("axis"), data.ndim)
    shape = [1] * data.ndim
    shape[axis] = -1
    if zero_point.ndim:
        zero_point = zero_point.reshape(shape)
    if scale.ndim:
        scale = scale.reshape(shape)
    return (data - zero_point) * scale


@register("constexpr_blockwise_shift_scale")
def constexpr_blockwise_shift_scale(call: OpCall):
    data = np.asarray(call.value("data")).astype(np.float32)
    scale = np.asarray(call.value("scale"), np.float32)
    offset = call.value("offset", None)
    if scale.ndim != data.ndim:
        raise ValueError(f"scale of rank {scale.ndim} for data of rank {data.ndim}")
    for axis, (d, s) in enumerate(zip(data.shape, scale.shape)):
        if d % s:
            raise ValueError(f"axis {axis}: {s} scales do not divide {d}")
    repeat = [d // s for d, s in zip(data.shape, scale.shape)]
    if offset is not None:
        offset = np.asarray(offset).astype(np.float32)
        for axis, r in enumerate(repeat):
            offset = np.repeat(offset, r, axis) if r > 1 else offset
        data = data - offset
    for axis, r in enumerate(repeat):
        scale = np.repeat(scale, r, axis) if r > 1 else scale
    return data * scale
