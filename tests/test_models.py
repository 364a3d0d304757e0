"""The EfficientViT family: structure, counts, BN folding, export safety, resolutions."""

from __future__ import annotations

import copy

import pytest
import torch

from evit_deploy.errors import BadInputError
from evit_deploy.models import MODELS, create_model, list_models, resolve_name
from evit_deploy.models.counting import count_macs, count_parameters
from evit_deploy.models.fuse import count_batchnorm, fuse

# Key counts of the released checkpoints (without distillation head), from their files.
RELEASED_KEY_COUNTS = {"efficientvit_m0": 699, "efficientvit_m1": 615, "efficientvit_m2": 603,
                       "efficientvit_m3": 675, "efficientvit_m4": 699, "efficientvit_m5": 835}


@pytest.mark.parametrize("name", list(MODELS))
def test_state_dict_layout_matches_the_release(name):
    sd = create_model(name).state_dict()
    assert len(sd) == RELEASED_KEY_COUNTS[name]
    for key in ("patch_embed.0.c.weight", "patch_embed.0.bn.running_var",
                "blocks1.0.mixer.m.attn.attention_biases", "blocks1.0.mixer.m.attn.attention_bias_idxs",
                "blocks2.1.se.fc1.weight", "head.l.weight", "head.bn.running_mean"):
        assert key in sd, key
    assert sd["blocks1.0.mixer.m.attn.attention_bias_idxs"].dtype == torch.long
    spec = MODELS[name]
    assert sd["patch_embed.6.c.weight"].shape[0] == spec.embed_dim[0]
    assert sd["head.l.weight"].shape == (1000, spec.embed_dim[2])


def _within_paper(measured: float, paper: float, decimals: int) -> bool:
    # The paper prints rounded figures: accept 1% or the rounding of its last digit.
    return abs(measured - paper) <= max(0.01 * paper, 0.5 * 10 ** -decimals)


@pytest.mark.parametrize("name", list(MODELS))
def test_parameters_and_macs_match_the_paper_and_the_stored_counts(name):
    model = create_model(name, fuse=True)
    params, macs = count_parameters(model), count_macs(model)
    # `evit-deploy models` lists the stored figures without building anything: they must
    # be what counting the model gives.
    assert (MODELS[name].counts.params, MODELS[name].counts.macs) == (params, macs)
    params_m, macs_m = params / 1e6, macs / 1e6
    paper = MODELS[name].paper
    assert _within_paper(params_m, paper.params_m, 1), (params_m, paper.params_m)
    assert abs(macs_m - paper.macs_m) <= 0.01 * paper.macs_m, (macs_m, paper.macs_m)


@pytest.mark.parametrize("name", ["m0", "m2", "m5"])
def test_fused_matches_unfused_with_nontrivial_bn(name):
    model = create_model(name, "random", seed=3)
    bn = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len({round(float(m.running_var.mean()), 3) for m in bn}) > 10   # statistics really differ
    fused = fuse(copy.deepcopy(model))
    assert count_batchnorm(model) > 0 and count_batchnorm(fused) == 0
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ref, out = model(x), fused(x)
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_fuse_breaks_when_bn_is_ignored():
    # The check above must be able to fail: dropping BN statistics changes the output.
    model = create_model("m0", "random", seed=3)
    broken = copy.deepcopy(model)
    for m in broken.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert (fuse(broken)(x) - model(x)).abs().max() > 1e-2 * model(x).abs().max()


def test_bias_lookup_never_goes_stale_and_follows_to():
    a = create_model("m0", "random", seed=1)
    b = create_model("m0", "random", seed=2)
    x = torch.randn(1, 3, 224, 224)
    a.eval()
    a.load_state_dict(b.state_dict())          # weights loaded after eval()
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
        a64 = copy.deepcopy(a).to(torch.float64)
        assert a64(x.double()).dtype == torch.float64
        assert torch.allclose(a64(x.double()).float(), b(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", list(MODELS))
def test_torch_export_traces_every_model(name):
    model = fuse(create_model(name, "random"))
    x = torch.randn(1, 3, 224, 224)
    program = torch.export.export(model, (x,))
    # The bias tables are live parameters of the program, not constants baked at trace time.
    assert any(k.endswith("attention_biases") for k in program.state_dict)
    with torch.no_grad():
        before = model(x)
        assert torch.allclose(program.module()(x), before, atol=1e-5, rtol=1e-5)
    # Changing the parameter changes the traced program's output (softmax ignores a
    # constant shift, so the change is random).
    key = next(k for k in program.state_dict if k.endswith("attention_biases"))
    program.state_dict[key].data.add_(torch.randn_like(program.state_dict[key]))
    with torch.no_grad():
        assert not torch.allclose(program.module()(x), before, atol=1e-5)


@pytest.mark.parametrize("size,stage3_window", [(192, 3), (256, 4), (288, 5), (384, 6)])
def test_other_resolutions_build_and_run(size, stage3_window):
    model = create_model("m1", "random", img_size=size)
    windows = [m.window_resolution for m in model.modules() if type(m).__name__ == "LocalWindowAttention"]
    assert windows[-1] == stage3_window          # clamped to the stage-3 feature size
    assert windows[0] == 7
    with torch.no_grad():
        assert model(torch.randn(1, 3, size, size)).shape == (1, 1000)
    with pytest.raises(ValueError, match=f"built for {size}x{size}"):
        model(torch.randn(1, 3, 224, 224))


def test_img_size_must_be_a_multiple_of_16():
    with pytest.raises(ValueError, match="multiple of 16"):
        create_model("m0", img_size=200)


def test_distillation_head_output_is_the_mean_of_both_heads():
    model = create_model("m0", "random", distillation=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        feats = torch.nn.functional.adaptive_avg_pool2d(model.forward_features(x)[-1], 1).flatten(1)
        expected = (model.head(feats) + model.head_dist(feats)) / 2
        assert torch.allclose(model(x), expected)
    model.train()
    assert isinstance(model(x), tuple)


def test_names_are_case_insensitive_and_unknown_names_suggest():
    assert resolve_name("M4").name == resolve_name("efficientvit_m4").name == "efficientvit_m4"
    assert resolve_name("EfficientViT-M2").name == "efficientvit_m2"
    assert list_models() == [f"efficientvit_m{i}" for i in range(6)]
    with pytest.raises(BadInputError, match="did you mean"):
        resolve_name("m44")


def test_create_model_returns_eval_mode_and_random_init_is_reproducible():
    a, b = create_model("m0", "random", seed=5), create_model("m0", "random", seed=5)
    assert not a.training
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
        assert not torch.equal(a(x), create_model("m0", "random", seed=6)(x))
