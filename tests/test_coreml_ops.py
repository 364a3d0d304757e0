"""The Core ML reference executor, op by op, against PyTorch.

Each test builds a small ML program with coremltools' MIL builder, saves it as a package
(no graph passes, so the op under test reaches the file as written) and runs the saved
package through the executor.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from evit_deploy.targets.coreml.package import write_package
from evit_deploy.targets.coreml.quiet_import import coremltools
from evit_deploy.targets.coreml.reference.blob import BlobFile, unpack_subbyte
from evit_deploy.targets.coreml.reference.executor import Program, ProgramError, UnsupportedOpError
from evit_deploy.targets.coreml.reference.ops import OPS, OpCall

ct = coremltools()
from coremltools.converters.mil import Builder as mb  # noqa: E402  (after the quiet import)
from coremltools.converters.mil.mil import types  # noqa: E402

RNG = np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _seeded_per_test(request):
    # Each test draws the same numbers whichever tests ran before it.
    global RNG
    RNG = np.random.default_rng(zlib.crc32(request.node.name.encode()))


def randn(*shape, scale=1.0):
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def save(tmp_path, build, shapes, *, target=None, name="op", classifier=None) -> Program:
    """``build`` (a function of the inputs) as a saved package, loaded by the executor."""
    target = target or ct.target.iOS16
    specs = [mb.TensorSpec(shape=s, dtype=types.fp32) for s in shapes]
    program = mb.program(input_specs=specs, opset_version=target)(build)
    model = ct.convert(program, convert_to="mlprogram", minimum_deployment_target=target,
                       compute_precision=ct.precision.FLOAT32, pass_pipeline=ct.PassPipeline.EMPTY,
                       classifier_config=classifier, skip_model_load=True)
    path = tmp_path / f"{name}.mlpackage"
    write_package(path, model.get_spec(), f"{model.weights_dir}/weight.bin")
    return Program(path)


def run(program: Program, *arrays, **kwargs):
    outputs = program.run(dict(zip(program.inputs, arrays)), **kwargs)
    values = list(outputs.values())
    return values[0] if len(values) == 1 else values


def close(ours, theirs, atol=1e-5):
    theirs = theirs.detach().numpy() if isinstance(theirs, torch.Tensor) else theirs
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(np.asarray(ours, np.float32), theirs, atol=atol, rtol=1e-5)


T = torch.from_numpy


# -- element-wise ------------------------------------------------------------------------------

@pytest.mark.parametrize("op,ref", [("add", torch.add), ("sub", torch.sub), ("mul", torch.mul),
                                    ("real_div", torch.div)])
def test_binary_ops_broadcast_like_torch(tmp_path, op, ref):
    x, y = randn(2, 3, 4, 5), randn(1, 3, 1, 5) + 3.0
    program = save(tmp_path, lambda a, b: getattr(mb, op)(x=a, y=b), [x.shape, y.shape])
    close(run(program, x, y), ref(T(x), T(y)))
    constant = save(tmp_path, lambda a: getattr(mb, op)(x=a, y=np.float32(0.5)), [x.shape], name="c")
    close(run(constant, x), ref(T(x), 0.5))


@pytest.mark.parametrize("op,ref", [("relu", torch.relu), ("sigmoid", torch.sigmoid)])
def test_activations(tmp_path, op, ref):
    x = randn(2, 8, 3, scale=30.0)              # large magnitudes: exp must not overflow into nan
    program = save(tmp_path, lambda a: getattr(mb, op)(x=a), [x.shape])
    close(run(program, x), ref(T(x)))


def test_clip_is_hardtanh(tmp_path):
    x = randn(3, 7, scale=10.0)
    program = save(tmp_path, lambda a: mb.clip(x=a, alpha=np.float32(0.0), beta=np.float32(6.0)), [x.shape])
    close(run(program, x), F.relu6(T(x)))


@pytest.mark.parametrize("axis", [-1, 1])
def test_softmax(tmp_path, axis):
    x = randn(2, 5, 7, scale=60.0)          # exp overflows fp32 unless the max is subtracted first
    program = save(tmp_path, lambda a: mb.softmax(x=a, axis=axis), [x.shape])
    close(run(program, x), torch.softmax(T(x), dim=axis))


def test_cast_to_int_and_fp16(tmp_path):
    x = randn(3, 4, scale=5.0)
    program = save(tmp_path, lambda a: mb.cast(x=a, dtype="int32"), [x.shape])
    out = run(program, x)
    assert out.dtype == np.int32
    assert np.array_equal(out, T(x).to(torch.int32).numpy())
    to_half = save(tmp_path, lambda a: mb.cast(x=mb.cast(x=a, dtype="fp16"), dtype="fp32"), [x.shape], name="h")
    assert np.array_equal(run(to_half, x), T(x).half().float().numpy())


# -- linear algebra ----------------------------------------------------------------------------

def test_linear(tmp_path):
    x, w, b = randn(2, 3, 16), randn(10, 16), randn(10)
    program = save(tmp_path, lambda a: mb.linear(x=a, weight=w, bias=b), [x.shape])
    close(run(program, x), F.linear(T(x), T(w), T(b)), atol=1e-4)
    no_bias = save(tmp_path, lambda a: mb.linear(x=a, weight=w), [x.shape], name="nb")
    close(run(no_bias, x), F.linear(T(x), T(w)), atol=1e-4)


@pytest.mark.parametrize("tx,ty", [(False, False), (True, False), (False, True), (True, True)])
def test_matmul_with_transposes(tmp_path, tx, ty):
    x = randn(3, 2, 4, 5) if not tx else randn(3, 2, 5, 4)
    y = randn(2, 5, 6) if not ty else randn(2, 6, 5)
    program = save(tmp_path, lambda a, b: mb.matmul(x=a, y=b, transpose_x=tx, transpose_y=ty), [x.shape, y.shape])
    tx_, ty_ = T(x), T(y)
    expected = torch.matmul(tx_.transpose(-1, -2) if tx else tx_, ty_.transpose(-1, -2) if ty else ty_)
    close(run(program, x, y), expected, atol=1e-4)


CONV_CASES = {
    # name: (input shape, weight shape, groups, strides, dilations, pad_type, pad)
    "pointwise": ((2, 8, 6, 7), (12, 8, 1, 1), 1, (1, 1), (1, 1), "valid", None),
    "3x3-custom-asymmetric": ((1, 3, 9, 8), (4, 3, 3, 3), 1, (2, 1), (1, 1), "custom", (1, 0, 2, 1)),
    "depthwise-stride2": ((1, 6, 11, 10), (6, 1, 3, 3), 6, (2, 2), (1, 1), "custom", (1, 1, 1, 1)),
    "depthwise-5x5-same": ((2, 4, 7, 7), (4, 1, 5, 5), 4, (1, 1), (1, 1), "same", None),
    "grouped-dilated": ((1, 6, 12, 12), (9, 2, 3, 3), 3, (1, 2), (2, 1), "valid", None),
    "grouped-pointwise": ((1, 6, 4, 4), (4, 3, 1, 1), 2, (1, 1), (1, 1), "valid", None),
    "same-even-kernel": ((1, 2, 8, 7), (3, 2, 2, 4), 1, (1, 1), (1, 1), "same", None),
    "same-lower-even-kernel": ((1, 2, 8, 8), (3, 2, 4, 4), 1, (1, 2), (1, 1), "same_lower", None),
}


@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv(tmp_path, case):
    shape, wshape, groups, strides, dilations, pad_type, pad = CONV_CASES[case]
    x, w, b = randn(*shape), randn(*wshape), randn(wshape[0])
    kwargs = dict(weight=w, bias=b, groups=groups, strides=list(strides), dilations=list(dilations), pad_type=pad_type)
    if pad is not None:
        kwargs["pad"] = list(pad)
    program = save(tmp_path, lambda a: mb.conv(x=a, **kwargs), [x.shape])
    if pad_type == "custom":
        padded = F.pad(T(x), (pad[2], pad[3], pad[0], pad[1]))
    elif pad_type in ("same", "same_lower"):
        pads = []
        for size, k, s, d in zip(shape[2:], wshape[2:], strides, dilations):
            total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
            pads.append((total // 2, total - total // 2) if pad_type == "same" else (total - total // 2, total // 2))
        padded = F.pad(T(x), (*pads[1], *pads[0]))
    else:
        padded = T(x)
    expected = F.conv2d(padded, T(w), T(b), stride=strides, dilation=dilations, groups=groups)
    close(run(program, x), expected, atol=1e-4)


CONV_TRANSPOSE_CASES = {
    # name: (input shape, weight shape (C_in, C_out/groups, kh, kw), groups, strides, pad)
    "fpn-2x2-stride2": ((1, 6, 4, 5), (6, 5, 2, 2), 1, (2, 2), (0, 0, 0, 0)),
    "3x3-stride2-padded": ((2, 4, 5, 3), (4, 3, 3, 3), 1, (2, 2), (1, 1, 1, 1)),
    "grouped-3x3": ((1, 4, 3, 3), (4, 3, 3, 3), 2, (1, 2), (0, 1, 1, 0)),
}


@pytest.mark.parametrize("case", list(CONV_TRANSPOSE_CASES))
def test_conv_transpose(tmp_path, case):
    shape, wshape, groups, strides, pad = CONV_TRANSPOSE_CASES[case]
    x, w, b = randn(*shape), randn(*wshape), randn(wshape[1] * groups)
    program = save(tmp_path, lambda a: mb.conv_transpose(x=a, weight=w, bias=b, groups=groups, strides=list(strides),
                                                         pad_type="custom", pad=list(pad)), [x.shape])
    full = F.conv_transpose2d(T(x), T(w), T(b), stride=strides, groups=groups)
    expected = full[:, :, pad[0]: full.shape[2] - pad[1], pad[2]: full.shape[3] - pad[3]]
    close(run(program, x), expected, atol=1e-4)


@pytest.mark.parametrize("size,out", [((4, 5), (8, 10)), ((8, 10), (15, 20)), ((3, 3), (7, 4))])
def test_upsample_nearest_neighbor(tmp_path, size, out):
    x = randn(1, 3, *size)
    program = save(tmp_path, lambda a: mb.upsample_nearest_neighbor(
        x=a, scale_factor_height=np.float32(out[0] / size[0]), scale_factor_width=np.float32(out[1] / size[1])),
        [x.shape])
    close(run(program, x), F.interpolate(T(x), size=out, mode="nearest"))


def test_batch_norm(tmp_path):
    x = randn(2, 5, 3, 4)
    mean, var, gamma, beta = randn(5), np.abs(randn(5)) + 0.1, randn(5), randn(5)
    program = save(tmp_path, lambda a: mb.batch_norm(x=a, mean=mean, variance=var, gamma=gamma, beta=beta,
                                                     epsilon=np.float32(1e-3)), [x.shape])
    close(run(program, x), F.batch_norm(T(x), T(mean), T(var), T(gamma), T(beta), eps=1e-3))


# -- reductions and shapes ---------------------------------------------------------------------

@pytest.mark.parametrize("axes,keep", [([2, 3], True), ([-1], False), (None, False)])
def test_reduce_mean(tmp_path, axes, keep):
    x = randn(2, 3, 4, 5)
    program = save(tmp_path, lambda a: mb.reduce_mean(x=a, axes=axes, keep_dims=keep), [x.shape])
    expected = T(x).mean() if axes is None else T(x).mean(dim=axes, keepdim=keep)
    close(run(program, x), expected)


def test_reshape_with_inferred_and_copied_dims(tmp_path):
    x = randn(2, 3, 4, 5)
    program = save(tmp_path, lambda a: mb.reshape(x=a, shape=[2, -1, 5]), [x.shape])
    close(run(program, x), T(x).reshape(2, -1, 5))
    same_rank = save(tmp_path, lambda a: mb.reshape(x=a, shape=[0, 0, -1, 1]), [x.shape], name="z16")
    close(run(same_rank, x), T(x).reshape(2, 3, 20, 1))
    # iOS 17: a 0 copies the input dimension at the same position counted from the right.
    ios17 = save(tmp_path, lambda a: mb.reshape(x=a, shape=[0, 0, -1]), [x.shape], target=ct.target.iOS17, name="z")
    close(run(ios17, x), T(x).reshape(3, 4, 10))


def test_transpose(tmp_path):
    x = randn(2, 3, 4, 5)
    program = save(tmp_path, lambda a: mb.transpose(x=a, perm=[0, 2, 3, 1]), [x.shape])
    close(run(program, x), T(x).permute(0, 2, 3, 1))


def test_split(tmp_path):
    x = randn(2, 10, 3)
    program = save(tmp_path, lambda a: mb.split(x=a, split_sizes=[2, 5, 3], axis=1), [x.shape])
    for ours, theirs in zip(run(program, x), torch.split(T(x), [2, 5, 3], dim=1)):
        close(ours, theirs)
    even = save(tmp_path, lambda a: mb.split(x=a, num_splits=2, axis=-2), [x.shape], name="even")
    for ours, theirs in zip(run(even, x), torch.chunk(T(x), 2, dim=-2)):
        close(ours, theirs)


def test_concat(tmp_path):
    x, y = randn(2, 3, 4), randn(2, 5, 4)
    program = save(tmp_path, lambda a, b: mb.concat(values=[a, b, a], axis=1), [x.shape, y.shape])
    close(run(program, x, y), torch.cat([T(x), T(y), T(x)], dim=1))
    z = randn(2, 3, 4)
    inter = save(tmp_path, lambda a, b: mb.concat(values=[a, b], axis=2, interleave=True), [x.shape, z.shape], name="i")
    close(run(inter, x, z), torch.stack([T(x), T(z)], dim=3).reshape(2, 3, 8))


def test_slice_by_index(tmp_path):
    x = randn(2, 6, 7, 5)
    program = save(tmp_path, lambda a: mb.slice_by_index(
        x=a, begin=[0, 1, 0, -3], end=[2, 6, 5, 5], stride=[1, 2, 1, 1],
        begin_mask=[False, False, True, False], end_mask=[True, False, False, False],
        squeeze_mask=[False, False, False, False]), [x.shape])
    close(run(program, x), T(x)[:, 1:6:2, :5, -3:5])
    squeezed = save(tmp_path, lambda a: mb.slice_by_index(x=a, begin=[0, 2, 0, 0], end=[2, 3, 7, 5],
                                                          squeeze_mask=[False, True, False, False]),
                    [x.shape], name="sq")
    close(run(squeezed, x), T(x)[:, 2])


@pytest.mark.parametrize("mode,torch_mode", [("constant", "constant"), ("reflect", "reflect"),
                                             ("replicate", "replicate")])
def test_pad(tmp_path, mode, torch_mode):
    x = randn(1, 2, 5, 6)
    kwargs = {"constant_val": np.float32(1.5)} if mode == "constant" else {}
    program = save(tmp_path, lambda a: mb.pad(x=a, pad=[1, 2, 0, 3], mode=mode, **kwargs), [x.shape])
    expected = F.pad(T(x), (0, 3, 1, 2), mode=torch_mode, **({"value": 1.5} if mode == "constant" else {}))
    close(run(program, x), expected)


# -- classifier --------------------------------------------------------------------------------

def test_classify_picks_the_arg_max_label(tmp_path):
    x = randn(1, 6, scale=3.0)
    labels = [f"class {i}" for i in range(6)]
    program = save(tmp_path, lambda a: mb.softmax(x=a, axis=-1), [x.shape],
                   classifier=ct.ClassifierConfig(labels))
    assert [op.type for op in program.steps][-1] == "classify"
    label, probabilities = run(program, x)
    probs = torch.softmax(T(x), -1)[0]
    assert str(label) == labels[int(torch.argmax(probs))]
    assert list(probabilities) == labels
    np.testing.assert_allclose([probabilities[k] for k in labels], probs.numpy(), atol=1e-6)


# -- compressed constants ----------------------------------------------------------------------

def test_constexpr_lut_to_dense_ios16(tmp_path):
    from coremltools.optimize._utils import pack_elements_into_bits

    lut = np.linspace(-1, 1, 16).astype(np.float16)
    indices = RNG.integers(0, 16, size=(6, 5)).astype(np.uint8)
    x = randn(6, 5)

    def build(a):
        dense = mb.constexpr_lut_to_dense(lut=lut, indices=pack_elements_into_bits(indices.reshape(-1), 4),
                                          shape=np.array([6, 5], np.uint32))
        return mb.add(x=a, y=mb.cast(x=dense, dtype="fp32"))

    program = save(tmp_path, build, [x.shape])
    expected = T(x) + T(lut.astype(np.float32))[T(indices).long()]
    close(run(program, x), expected)


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")
def test_constexpr_affine_dequantize_matches_torch_dequantize(tmp_path):
    w = randn(4, 6)
    scale = (np.abs(w).max(axis=1) / 127).astype(np.float32)
    zero = np.array([0, 3, -2, 1], np.int8)
    quantized = torch.quantize_per_channel(T(w), T(scale).double(), T(zero.astype(np.int64)), 0, torch.qint8)
    q = quantized.int_repr().numpy().astype(np.int8)
    x = randn(4, 6)

    def build(a):
        dense = mb.constexpr_affine_dequantize(quantized_data=q, zero_point=zero, scale=scale, axis=0)
        return mb.add(x=a, y=dense)

    program = save(tmp_path, build, [x.shape])
    close(run(program, x), T(x) + quantized.dequantize())


@pytest.mark.parametrize("dtype,per_channel", [("int8", False), ("uint8", True)])
def test_quantize_dequantize_match_torch(tmp_path, dtype, per_channel):
    """W8A8 programs' activation ops: clip(round-half-even(x / scale) + zero point), and back."""
    x = randn(2, 3, 4, 5, scale=3.0)
    # Exact halves at scale 0.5 round to even. (MIL rounds before adding the zero point,
    # torch after: the zero points are even, so both give the same integers.)
    x[0, 0, 0, :3] = [0.25, 0.75, -0.25]
    x[1, 2, 3, 4] = 1e3                                        # saturates
    if per_channel:
        scale = np.array([0.5, 0.03, 0.1], np.float32)
        zero = np.array([128, 100, 0], np.uint8)
        expected = torch.quantize_per_channel(T(x), T(scale).double(), T(zero.astype(np.int64)), 1, torch.quint8)
        params = {"scale": scale, "zero_point": zero, "axis": 1}
    else:
        scale, zero = np.float32(0.5), np.int8(-4)
        expected = torch.quantize_per_tensor(T(x), 0.5, -4, torch.qint8)
        params = {"scale": scale, "zero_point": zero}

    def build(a):
        q = mb.quantize(input=a, output_dtype=dtype, **params)
        return q, mb.dequantize(input=q, **params)

    program = save(tmp_path, build, [x.shape], target=ct.target.iOS17)
    q, back = run(program, x)
    (quantize,) = [op for op in program.steps if op.type == "quantize"]
    assert quantize.outputs[0][1].dtype == dtype               # (the program hands it out as int32)
    if not per_channel:
        np.testing.assert_array_equal(q[0, 0, 0, :3], np.array([0, 2, 0]) - 4)
    np.testing.assert_array_equal(q, expected.int_repr().numpy())
    close(back, expected.dequantize())


def _compressed_linear(tmp_path, mode: str, target):
    """A linear layer big enough to be compressed by the export's own pipeline."""
    from evit_deploy.targets.coreml.quantize import compression_pipeline

    w = randn(64, 48)
    program = mb.program(input_specs=[mb.TensorSpec(shape=(2, 48), dtype=types.fp32)], opset_version=target)(
        lambda a: mb.linear(x=a, weight=w))
    model = ct.convert(program, convert_to="mlprogram", minimum_deployment_target=target,
                       compute_precision=ct.precision.FLOAT16, pass_pipeline=compression_pipeline(mode),
                       skip_model_load=True)
    path = tmp_path / f"{mode}-{target.name}.mlpackage"
    write_package(path, model.get_spec(), f"{model.weights_dir}/weight.bin")
    return path, w


@pytest.mark.parametrize("target", ["iOS16", "iOS18"])
@pytest.mark.parametrize("mode", ["palettize4", "palettize6", "int8"])
def test_compressed_weights_decode_as_coremltools_decodes_them(tmp_path, mode, target):
    from coremltools.converters.mil.frontend.milproto.load import load

    path, w = _compressed_linear(tmp_path, mode, getattr(ct.target, target))
    program = Program(path)
    spec = model_spec(path)
    pymil = load(spec, spec.specificationVersion, str(path / "Data/com.apple.CoreML/weights"))
    constexprs = [op for op in pymil.functions["main"].operations if op.op_type.startswith("constexpr_")]
    assert constexprs, "nothing was compressed"
    for op in constexprs:
        ours = program.constants[op.outputs[0].name]
        assert np.array_equal(ours, op.materialized_val_inference())
    dense = next(program.constants[op.outputs[0].name] for op in constexprs)
    rms_error = np.sqrt(np.mean((dense.astype(np.float32) - w) ** 2)) / w.std()
    # Optimal quantisers of Gaussian weights reach about 0.095 (16 levels), 0.026 (64 levels)
    # and 0.007 (int8 per channel); these bounds leave room for a small sample.
    assert 0 < rms_error < {"palettize4": 0.15, "palettize6": 0.06, "int8": 0.012}[mode]


def model_spec(path):
    from evit_deploy.targets.coreml.package import read_spec
    return read_spec(path)


def test_ios18_vector_lookup_table_fills_along_the_vector_axis():
    indices = RNG.integers(0, 4, size=(3, 2)).astype(np.uint8)
    lut = randn(1, 1, 4, 2)                   # one palette of four 2-vectors
    call = OpCall("constexpr_lut_to_dense", "test", {"indices": [indices], "lut": [lut],
                                                     "vector_axis": [np.int32(0)]})
    out = OPS["constexpr_lut_to_dense"](call)
    vectors = T(lut[0, 0])[T(indices).long()]              # 3, 2, vector
    expected = vectors.permute(0, 2, 1).reshape(6, 2)      # each index fills two rows
    close(out, expected)


def test_blockwise_shift_scale_repeats_scales_over_blocks():
    data = RNG.integers(-8, 8, size=(4, 6)).astype(np.int8)
    scale, offset = np.abs(randn(2, 3)) + 0.1, RNG.integers(-2, 2, size=(2, 3)).astype(np.int8)
    call = OpCall("constexpr_blockwise_shift_scale", "test", {"data": [data], "scale": [scale], "offset": [offset]})
    out = OPS["constexpr_blockwise_shift_scale"](call)
    expand = lambda a: T(np.asarray(a, np.float32)).repeat_interleave(2, 0).repeat_interleave(2, 1)  # noqa: E731
    close(out, (T(data.astype(np.float32)) - expand(offset)) * expand(scale))


# -- fp16 semantics, blobs, errors -------------------------------------------------------------

def test_fp16_program_is_rounded_after_every_op(tmp_path):
    x = randn(2, 50, scale=4.0)
    c, d = randn(50).astype(np.float16), randn(50).astype(np.float16)

    def build(a):
        h = mb.cast(x=a, dtype="fp16")
        h = mb.softmax(x=mb.add(x=mb.mul(x=h, y=c), y=d), axis=-1)
        return mb.cast(x=h, dtype="fp32")

    program = save(tmp_path, build, [x.shape])
    assert program.computes_fp16
    r = lambda t: t.half().float()  # noqa: E731
    tc, td = T(c.astype(np.float32)), T(d.astype(np.float32))
    rounded = r(torch.softmax(r(r(r(T(x)) * tc) + td), -1))
    exact = torch.softmax(T(x) * tc + td, -1)
    ulp = np.spacing(np.abs(rounded.numpy()).astype(np.float16)).astype(np.float32)
    assert np.all(np.abs(run(program, x) - rounded.numpy()) <= ulp)
    close(run(program, x, round_fp16=False), exact, atol=1e-6)
    assert np.abs(run(program, x) - exact.numpy()).max() > 1e-6      # the rounding is really there


@pytest.mark.parametrize("type_name,writer,dtype", [
    ("fp16", "write_fp16_data", np.float16), ("fp32", "write_float_data", np.float32),
    ("int8", "write_int8_data", np.int8), ("uint8", "write_uint8_data", np.uint8),
    ("uint4", "write_uint4_data", np.uint8), ("uint6", "write_uint6_data", np.uint8),
    ("int4", "write_int4_data", np.int8), ("uint1", "write_uint1_data", np.uint8)])
def test_blob_file_reads_what_coremltools_writes(tmp_path, type_name, writer, dtype):
    from coremltools import libmilstoragepython

    from evit_deploy.targets.coreml.reference.blob import SUBBYTE_BITS

    path = tmp_path / "weight.bin"
    blobs = libmilstoragepython._BlobStorageWriter(str(path))
    written = []
    for count in (5, 33):
        if type_name in SUBBYTE_BITS:
            bits = SUBBYTE_BITS[type_name]
            low, high = (-(1 << bits - 1), 1 << bits - 1) if type_name.startswith("int") else (0, 1 << bits)
            values = RNG.integers(low, high, size=count).astype(dtype)
            offset = getattr(blobs, writer)(values)             # the writer packs sub-byte values itself
        else:
            values = (RNG.standard_normal(count) * 50).astype(dtype)
            data = values.view(np.uint16) if dtype == np.float16 else values
            offset = getattr(blobs, writer)(np.ascontiguousarray(data))
        written.append((offset, values))
    del blobs
    reader = BlobFile(path)
    for offset, values in written:
        assert np.array_equal(reader.read(offset, type_name, values.size), values)
    with pytest.raises(ValueError, match="holds"):
        reader.read(written[0][0], "fp32" if type_name != "fp32" else "fp16", 5)
    corrupt = bytearray(path.read_bytes())
    corrupt[written[1][0]] ^= 0xFF
    path.write_bytes(bytes(corrupt))
    with pytest.raises(ValueError, match="bad sentinel"):
        BlobFile(path).read(written[1][0], type_name, written[1][1].size)


def test_unpack_subbyte_is_lsb_first():
    assert unpack_subbyte(np.array([0b10110100], np.uint8), "uint4", 2).tolist() == [0b0100, 0b1011]
    assert unpack_subbyte(np.array([0xF7], np.uint8), "int4", 2).tolist() == [7, -1]


def test_unknown_op_is_refused_with_its_name_and_location(tmp_path):
    x = randn(2, 3)
    program = save(tmp_path, lambda a: mb.relu(x=mb.sigmoid(x=a)), [x.shape])
    spec = model_spec(program.package)
    ops = spec.mlProgram.functions["main"].block_specializations[program.opset].operations
    index = next(i for i, op in enumerate(ops) if op.type == "relu")
    ops[index].type = "frobnicate"
    write_package(tmp_path / "unknown.mlpackage", spec, program.package / "Data/com.apple.CoreML/weights/weight.bin")
    with pytest.raises(UnsupportedOpError) as info:
        Program(tmp_path / "unknown.mlpackage")
    message = str(info.value)
    assert "'frobnicate'" in message and f"operation {index} of function main" in message
    assert len(message.splitlines()) == 1


def test_inconsistent_program_names_the_op(tmp_path):
    x = randn(2, 3, 4)
    program = save(tmp_path, lambda a: mb.transpose(x=a, perm=[0, 2, 1]), [x.shape])
    spec = model_spec(program.package)
    op = next(o for o in spec.mlProgram.functions["main"].block_specializations[program.opset].operations
              if o.type == "transpose")
    perm = next(o for o in spec.mlProgram.functions["main"].block_specializations[program.opset].operations
                if o.outputs[0].name == op.inputs["perm"].arguments[0].name)
    perm.attributes["val"].immediateValue.tensor.ints.values[:] = [0, 1, 2]
    write_package(tmp_path / "bad.mlpackage", spec, None)
    with pytest.raises(ProgramError, match="op 'transpose'.*produced shape"):
        run(Program(tmp_path / "bad.mlpackage"), x)


def test_every_registered_op_has_a_test():
    tested = {"add", "sub", "mul", "real_div", "relu", "clip", "sigmoid", "softmax", "cast", "linear", "matmul",
              "conv", "conv_transpose", "upsample_nearest_neighbor", "batch_norm", "reduce_mean", "reshape", "transpose", "split", "concat",
              "slice_by_index", "pad", "classify", "constexpr_lut_to_dense", "constexpr_affine_dequantize",
              "constexpr_blockwise_shift_scale", "quantize", "dequantize"}
    assert set(OPS) == tested
