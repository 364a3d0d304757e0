"""Taylor structured pruning: groups, importance, budgets, pruned checkpoints end to end.

Small models (M0 at SMALL x SMALL) with realistic weights (models/synthetic.py).
"""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch

from conftest import SMALL, save_checkpoint
from evit_deploy.models.factory import create_model
from evit_deploy.models.synthetic import realistic_weights
from evit_deploy.pruning.groups import prunable_groups, remove_channels
from evit_deploy.pruning.importance import taylor_importance


@pytest.fixture(scope="module")
def m0():
    return realistic_weights(create_model("m0", img_size=SMALL), 1).eval()


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    from evit_deploy.preprocess import sample_images

    folder = tmp_path_factory.mktemp("photos")
    for photo in sample_images():
        shutil.copy(photo, folder / photo.name)
    return folder


def _random_kept(model, seed: int) -> dict[str, list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return {g.key: sorted(torch.randperm(g.channels, generator=gen)[:max(1, g.channels // 2)].tolist())
            for g in prunable_groups(model)}


def _zeroed(model, kept):
    """``model`` with the channels not in ``kept`` silenced in place of removed: zero BN gain
    and shift make a channel's activation exactly 0 (Q after its depthwise conv, K, V,
    FFN hidden after the ReLU, the patch-merging channel entering squeeze-excite), and a
    zero column stops the next head reading the split channel a removed V channel feeds."""
    z = copy.deepcopy(model)
    modules = dict(z.named_modules())

    def silence(convnorm, rows):
        with torch.no_grad():
            convnorm.bn.weight[rows] = 0
            convnorm.bn.bias[rows] = 0

    for g in prunable_groups(model):
        gone = [c for c in range(g.channels) if c not in kept[g.key]]
        m = modules[g.module]
        if g.kind == "ffn":
            silence(m.pw1, gone)
        elif g.kind == "expansion":
            silence(m.conv2, gone)
        elif g.kind == "qk":
            silence(m.dws[g.head], gone)
            silence(m.qkvs[g.head], [m.qk_dims[g.head] + c for c in gone])
        else:
            silence(m.qkvs[g.head], [2 * m.qk_dims[g.head] + c for c in gone])
            if g.head + 1 < m.num_heads:
                with torch.no_grad():
                    m.qkvs[g.head + 1].c.weight[:, gone] = 0
    return z


def test_removing_channels_equals_zeroing_them(m0):
    kept = _random_kept(m0, 3)
    pruned = remove_channels(m0, kept)
    x = torch.randn(2, 3, SMALL, SMALL, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, zeroed, original = pruned(x), _zeroed(m0, kept)(x), m0(x)
    scale = float(original.abs().max())
    assert float((ours - zeroed).abs().max()) < 1e-5 * scale
    assert float((zeroed - original).abs().max()) > 0.1 * scale      # the test removes something
    attn = pruned.blocks1[0].mixer.m.attn
    assert all(q < 16 for q in attn.qk_dims) and attn.read_runs[0] is None and all(attn.read_runs[1:])
    # A pruned model prunes again: indices are relative to its current widths.
    again = _random_kept(pruned, 4)
    twice = remove_channels(pruned, again)
    with torch.no_grad():
        assert float((twice(x) - _zeroed(pruned, again)(x)).abs().max()) < 1e-5 * scale


def _gate_gradient(model, x, label, sites):
    """∂L/∂m for a gate m (ones) multiplying the given (module, channels, pre) sites: the
    first-order change of the loss when the channels are removed, by autograd alone."""
    gate = None
    handles = []

    def apply(t, channels):
        mask = torch.ones(t.shape[1])
        mask = mask.index_put((torch.as_tensor(channels),), gate)
        return t * mask.view(1, -1, 1, 1)

    for module, channels, pre in sites:
        if pre:
            handles.append(module.register_forward_pre_hook(lambda m, a, c=channels: (apply(a[0], c),)))
        else:
            handles.append(module.register_forward_hook(lambda m, a, out, c=channels: apply(out, c)))
    n = len(sites[0][1])
    gate = torch.ones(n, requires_grad=True)
    try:
        loss = torch.nn.functional.cross_entropy(model(x), torch.tensor([label]))
        return torch.autograd.grad(loss, gate)[0].abs()
    finally:
        for h in handles:
            h.remove()


def test_taylor_importance_is_the_first_order_loss_change(m0):
    x = torch.randn(1, 3, SMALL, SMALL, generator=torch.Generator().manual_seed(1))
    scores = {i.group.key: i for i in taylor_importance(m0, x, torch.tensor([7]))}
    attn = m0.blocks1[0].mixer.m.attn
    qk, v = attn.qk_dims[1], attn.v_dims[1]
    ffn, merge = m0.blocks1[0].ffn0.m, m0.blocks2[1]
    cases = {
        "blocks1.0.ffn0.m:ffn": [(ffn.act, list(range(ffn.pw1.c.out_channels)), False)],
        "blocks2.1:expansion": [(merge.se, list(range(merge.conv1.c.out_channels)), True)],
        # V of a middle head: where it enters the output projection, and the next head's
        # input channels it is added to (gated whole: that head no longer reads them).
        "blocks1.0.mixer.m.attn:v1": [(attn.proj, list(range(attn.v_dims[0], attn.v_dims[0] + v)), True),
                                      (attn.qkvs[2], list(range(v)), True)],
    }
    for key, sites in cases.items():
        torch.testing.assert_close(scores[key].scores, _gate_gradient(m0, x, 7, sites).double(),
                                   rtol=1e-4, atol=1e-9)
    q = _gate_gradient(m0, x, 7, [(attn.dws[1], list(range(qk)), False)])
    torch.testing.assert_close(scores["blocks1.0.mixer.m.attn:qk1"].parts["q"], q.double(), rtol=1e-4, atol=1e-9)
    # Without labels the target is the model's own top-1.
    own = int(m0(x).argmax())
    unlabelled = {i.group.key: i.scores for i in taylor_importance(m0, x)}
    labelled = {i.group.key: i.scores for i in taylor_importance(m0, x, torch.tensor([own]))}
    for key in unlabelled:
        torch.testing.assert_close(unlabelled[key], labelled[key])


@pytest.mark.parametrize("multiple", [1, 8])
def test_the_plan_meets_the_budget_with_widths_the_kernels_take(m0, multiple):
    """Every group keeps a multiple of ``multiple`` channels (or all of them), its most
    important ones, and the model stays within the MAC budget."""
    from evit_deploy.pruning.importance import GroupImportance
    from evit_deploy.pruning.prune import plan, size_of

    gen = torch.Generator().manual_seed(3)
    scores = [GroupImportance(g, torch.rand(g.channels, generator=gen, dtype=torch.float64) + 0.01)
              for g in prunable_groups(m0)]
    kept = plan(m0, scores, keep_macs=0.7, multiple=multiple)
    pruned = remove_channels(m0, kept)
    assert size_of(pruned)[0] <= 0.7 * size_of(m0)[0]
    for item in scores:
        channels = kept[item.group.key]
        assert len(channels) % multiple == 0 or len(channels) == item.group.channels, (item.group.key, len(channels))
        dropped = [c for c in range(item.group.channels) if c not in channels]
        assert not dropped or max(item.scores[dropped]) <= min(item.scores[channels])
    if multiple > 1:       # rounding changed some widths: the test sees a difference
        assert any(len(kept[i.group.key]) % multiple == 0 and len(kept[i.group.key]) < i.group.channels
                   for i in scores)


def test_importance_records_and_fig5(m0, photos, tmp_path):
    from evit_deploy import api
    from evit_deploy.models import resolve_name

    weights = save_checkpoint(tmp_path / "m0.pth", "m0", recipe="realistic", img_size=SMALL)
    labels = tmp_path / "labels.txt"
    labels.write_text("cat.jpg 281\ncoffee.jpg 967\nrocket.jpg 812\nastronaut.jpg 0\n")
    result = api.importance("m0", weights, photos, labels=labels, keep_macs=0.7, img_size=SMALL,
                            plot=tmp_path / "fig5.png")
    data = json.loads(json.dumps(result.to_dict()))
    assert data["images"] == 4 and data["loss"] == "cross-entropy (labels)"
    assert (tmp_path / "fig5.png").read_bytes()[:4] == b"\x89PNG"
    assert abs(sum(g["share"] for g in data["groups"]) - 1) < 1e-9
    assert data["planned_macs"] <= 0.7 * data["macs"] < data["planned_macs"] * 1.02
    # The widths prune would keep: multiples of 8 (its default), or a group's every channel.
    assert all(g["kept"] % 8 == 0 or g["kept"] == g["channels"] for g in data["groups"])
    spec = resolve_name("m0")
    blocks = {r["block"]: r for r in data["fig5"]}
    assert len(blocks) == sum(spec.depth)
    for block, row in blocks.items():
        stage = int(block[6]) - 1
        dim = spec.embed_dim[stage]
        heads = [g for g in data["groups"] if g["block"] == block and g["kind"] in ("qk", "v")]
        ffns = [g for g in data["groups"] if g["block"] == block and g["kind"] == "ffn"]
        assert row["embed_dim"] == dim
        assert row["original"] == {"Q": spec.num_heads[stage] * 16 / dim, "K": spec.num_heads[stage] * 16 / dim,
                                   "V": 1.0, "FFN": 2.0}
        qk = sum(g["kept"] for g in heads if g["kind"] == "qk")
        assert row["pruned"] == pytest.approx({"Q": qk / dim, "K": qk / dim,
                                               "V": sum(g["kept"] for g in heads if g["kind"] == "v") / dim,
                                               "FFN": sum(g["kept"] for g in ffns) / 2 / dim})


def test_pruned_checkpoint_is_enough_for_info_and_export(cli, photos, realistic_m0, tmp_path):
    out = tmp_path / "pruned.pth"
    code, stdout, stderr = cli("prune", "m0", "--weights", realistic_m0, "--images", photos, "--keep-macs", "0.6",
                               "--finetune-steps", "2", "--img-size", SMALL, "--out", out, "--json",
                               tmp_path / "prune.json")
    assert code == 0, stderr
    record = json.loads((tmp_path / "prune.json").read_text())
    assert record["pruned_macs"] <= 0.6 * record["macs"] and len(record["losses"]) == 3
    assert record["loss"].endswith("(no labels)")
    code, stdout, stderr = cli("info", "m0", "--weights", out, "--img-size", SMALL, "--json", "-")
    assert code == 0, stderr
    info = json.loads(stdout)
    assert info["widths"] == record["widths"] and info["macs"] == record["pruned_macs"]
    code, stdout, stderr = cli("export", "m0", "--target", "onnx", "--weights", out, "--img-size", SMALL,
                               "--out", tmp_path / "onnx", "--json", tmp_path / "export.json")
    assert code == 0, stderr
    assert json.loads((tmp_path / "export.json").read_text())["passed"] is True
    # bench takes the file as a model of its own, beside the unpruned one.
    code, stdout, stderr = cli("bench", "m0", out, "--backends", "onnxruntime", "--batch", 2, "--img-size", SMALL,
                               "--rounds", 1, "--round-seconds", 0.05, "--no-memory", "--json", tmp_path / "b.json")
    assert code == 0, stderr
    timed = {r["model"]: r for r in json.loads((tmp_path / "b.json").read_text())["records"]}
    assert set(timed) == {"efficientvit_m0", "efficientvit_m0@pruned"}
    assert all(r["images_per_s"] and not r["rejected"] for r in timed.values())
    # The table gives the pruned model's speed-up over M0 timed in the same run.
    speedup = timed["efficientvit_m0@pruned"]["images_per_s"] / timed["efficientvit_m0"]["images_per_s"]
    assert f"{speedup:.2f}× M0" in stdout.replace("\n", " "), stdout


def test_bad_input(cli, checkpoint, photos, tmp_path, m0):
    from evit_deploy.models.checkpoint import write_checkpoint

    m1 = checkpoint("m1")
    m0_file = save_checkpoint(tmp_path / "m0.pth", "m0")
    pruned = write_checkpoint(tmp_path / "pruned.pth", remove_channels(m0, _random_kept(m0, 5)), "efficientvit_m0")
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (["prune", "m0", "--weights", m1, "--images", photos, "--keep-macs", "0.7"], "does not fit"),
        (["info", "m1", "--weights", pruned, "--img-size", SMALL], "pruned efficientvit_m0 checkpoint, not"),
        (["prune", "m0", "--weights", m0_file, "--images", empty, "--keep-macs", "0.7"], "no images"),
        (["prune", "m0", "--weights", m0_file, "--images", photos, "--keep-macs", "0"], "--keep-macs"),
        (["prune", "m0", "--weights", m0_file, "--images", photos, "--keep-macs", "1.5"], "--keep-macs"),
        (["prune", "m0", "--weights", m0_file, "--images", photos, "--keep-macs", "0.7", "--multiple-of", "0"],
         "--multiple-of"),
        (["prune", "m0", "--weights", m0_file, "--images", photos], "budget"),
        (["importance", "m0", "--weights", m0_file, "--images", photos, "--keep-params", "-1"], "--keep-params"),
        (["importance", "m0", "--weights", m0_file, "--images", photos, "--multiple-of", "0"], "--multiple-of"),
    ]
    for args, message in cases:
        code, _, stderr = cli(*args, "--out", tmp_path / "never.pth") if args[0] == "prune" else cli(*args)
        assert code == 2, (args, stderr)
        assert message in stderr and len(stderr.strip().splitlines()) == 1, (args, stderr)
    assert not (tmp_path / "never.pth").exists()
