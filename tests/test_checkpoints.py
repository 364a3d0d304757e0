"""Checkpoint loading: official, bare, timm and safetensors layouts; bad files; offline."""

from __future__ import annotations

import os
import pickle
import random
import re
import urllib.error

import pytest
import torch

from evit_deploy.errors import CheckpointError
from evit_deploy.models import MODELS, create_model
from evit_deploy.models.checkpoint import sha256_file
from evit_deploy.models.factory import load_model


def _outputs(model, seed=0):
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("name", list(MODELS))
def test_official_layout_loads_strictly(name, checkpoint):
    path = checkpoint(name, seed=7)
    source = create_model(name, "random", seed=7)
    loaded, provenance = load_model(name, path)
    assert torch.equal(_outputs(loaded), _outputs(source))
    assert provenance.weights_sha256 == sha256_file(path) and provenance.init_seed is None
    # strict: the file's keys are exactly the model's keys
    assert set(torch.load(path, weights_only=True)["model"]) == set(loaded.state_dict())


def to_timm_layout(state_dict):
    """The renaming timm's efficientvit_msra applies, written out independently."""
    out = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if parts[-2] == "c":
            parts[-2] = "conv"
        if parts[-2] == "l":
            parts[-2] = "linear"
        if parts[0] == "patch_embed":
            parts[1] = f"conv{int(parts[1]) // 2 + 1}"
        elif parts[0].startswith("blocks"):
            stage = int(parts[0][-1]) - 1
            idx = int(parts[1])
            if stage > 0 and idx < 3:
                prefix = ["stages", str(stage), "downsample", ["res1", "patchmerge", "res2"][idx]]
            else:
                prefix = ["stages", str(stage), "blocks", str(idx - (3 if stage > 0 else 0))]
            parts = prefix + parts[2:]
        out[".".join(parts)] = value
    return out


@pytest.mark.parametrize("name", ["m0", "m5"])
def test_timm_layout_gives_identical_outputs(name, tmp_path):
    source = create_model(name, "random", seed=4)
    timm_sd = to_timm_layout(source.state_dict())
    assert "stages.1.downsample.patchmerge.se.fc1.weight" in timm_sd
    assert "patch_embed.conv1.conv.weight" in timm_sd and "head.linear.weight" in timm_sd
    # Newer timm does not persist the bias index buffers: loading must not need them.
    timm_sd = {k: v for k, v in timm_sd.items() if not k.endswith("attention_bias_idxs")}
    path = tmp_path / "timm.pth"
    torch.save(timm_sd, path)
    assert torch.equal(_outputs(create_model(name, path)), _outputs(source))


def test_bare_and_safetensors_checkpoints(checkpoint):
    source = create_model("m1", "random", seed=2)
    for layout in ("bare", "safetensors"):
        loaded = create_model("m1", checkpoint("m1", seed=2, layout=layout))
        assert torch.equal(_outputs(loaded), _outputs(source)), layout


@pytest.mark.parametrize("wrapped", [
    lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}},       # DataParallel / DDP
    lambda sd: {"model_ema": {f"_orig_mod.{k}": v for k, v in sd.items()}},    # torch.compile
    lambda sd: {"model": {f"module._orig_mod.{k}": v for k, v in sd.items()}},  # both
])
def test_checkpoints_of_wrapped_models_load(wrapped, tmp_path):
    source = create_model("m0", "random", seed=5)
    path = tmp_path / "wrapped.pth"
    torch.save(wrapped(source.state_dict()), path)
    assert torch.equal(_outputs(create_model("m0", path)), _outputs(source))


def test_a_prefix_on_only_some_keys_is_not_stripped(tmp_path):
    sd = create_model("m0", "random", seed=5).state_dict()
    first = next(iter(sd))
    torch.save({(f"module.{k}" if k == first else k): v for k, v in sd.items()}, tmp_path / "half.pth")
    with pytest.raises(CheckpointError, match="module"):
        create_model("m0", tmp_path / "half.pth")


def test_wrong_model_lists_what_does_not_fit(checkpoint):
    path = checkpoint("m4")
    with pytest.raises(CheckpointError) as info:
        create_model("m2", path)
    message = str(info.value)
    assert "does not fit efficientvit_m2" in message
    assert "shape mismatches" in message and re.search(r"\(\d+, \d+.*\) vs model \(", message)
    assert "looks like efficientvit_m4 weights" in message
    assert "\n" not in message


def test_a_checkpoint_for_another_input_size_says_so(checkpoint):
    with pytest.raises(CheckpointError, match="trained at another input size") as info:
        create_model("m0", checkpoint("m0"), img_size=64)
    assert "looks like" not in str(info.value)


def test_distillation_checkpoint_hints_at_the_flag(tmp_path):
    model = create_model("m0", "random", distillation=True)
    path = tmp_path / "dist.pth"
    torch.save({"model": model.state_dict()}, path)
    with pytest.raises(CheckpointError, match="--distillation"):
        create_model("m0", path)
    assert torch.equal(_outputs(create_model("m0", path, distillation=True)), _outputs(model))


def test_truncated_checkpoint(checkpoint, tmp_path):
    data = checkpoint("m0").read_bytes()
    path = tmp_path / "truncated.pth"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        create_model("m0", path)


@pytest.mark.parametrize("content", [b"hello, not a checkpoint\n", random.Random(0).randbytes(4096)],
                         ids=["text", "random-bytes"])
def test_file_that_is_not_a_checkpoint(tmp_path, content):
    path = tmp_path / "junk.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="not a"):
        create_model("m0", path)


def test_a_torchscript_archive_says_what_it_is_and_what_to_save_instead(tmp_path, recwarn):
    model = create_model("m0", img_size=64)
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(4, 2)), path)
    with pytest.raises(CheckpointError, match=r"TorchScript archive .*torch.save\(model.state_dict\(\)"):
        create_model("m0", path)
    assert not [w for w in recwarn if "TorchScript" in str(w.message)]     # torch's own notice is not shown
    torch.save(model.state_dict(), tmp_path / "weights.pth")                # what the message asks for
    assert create_model("m0", tmp_path / "weights.pth", img_size=64) is not None


@pytest.mark.parametrize("protocol", [4, 5])
def test_a_checkpoint_saved_with_a_newer_pickle_protocol_loads(tmp_path, recwarn, protocol):
    # torch's safe loader cannot read these protocols ("Unsupported operand 149"): such a
    # file of plain weights was refused as if it could run code.
    import argparse

    model = create_model("m0", img_size=64)
    path = tmp_path / "weights.pth"
    torch.save({"model": model.state_dict(), "epoch": 3, "args": argparse.Namespace(lr=0.1)}, path,
               pickle_protocol=protocol)
    loaded = create_model("m0", path, img_size=64)
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    assert not [w for w in recwarn if "pickle protocol" in str(w.message)]


def test_checkpoint_without_tensors(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([1, 2, 3], path)
    with pytest.raises(CheckpointError, match="does not hold a state dict"):
        create_model("m0", path)


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("protocol", [2, 4])
def test_malicious_pickle_is_refused_and_not_executed(tmp_path, protocol):
    marker = tmp_path / "pwned"
    exploit = _Exploit()
    exploit.marker = marker
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"model": exploit}, f, protocol=protocol)
    with pytest.raises(CheckpointError, match="refusing to load .* posix.system"):
        create_model("m0", path)
    assert not marker.exists()


def test_missing_file():
    with pytest.raises(CheckpointError, match="not found"):
        create_model("m0", "/nonexistent/weights.pth")


def test_official_weights_offline_gives_one_line_advice(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr("urllib.request.urlopen", offline)
    with pytest.raises(CheckpointError) as info:
        create_model("m3", "official")
    message = str(info.value)
    assert "efficientvit_m3.pth" in message and "--weights FILE" in message and "\n" not in message


def test_official_weights_come_from_the_cache(monkeypatch, checkpoint):
    # A file already in torch.hub's cache is used without any download.
    from evit_deploy.models.checkpoint import official_weights_path

    monkeypatch.setattr("urllib.request.urlopen", lambda *a, **k: pytest.fail("network used"))
    target = official_weights_path(MODELS["efficientvit_m0"], download=False)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(checkpoint("m0", seed=9).read_bytes())
    model = create_model("m0", "official")
    assert torch.equal(_outputs(model), _outputs(create_model("m0", "random", seed=9)))


def test_download_is_atomic(monkeypatch):
    # A download that dies half-way leaves nothing under the cache name.
    from evit_deploy.models.checkpoint import official_weights_path

    class Dying:
        def __init__(self):
            self.calls = 0

        def read(self, n):
            self.calls += 1
            if self.calls > 1:
                raise TimeoutError("connection reset")
            return b"x" * 100

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr("urllib.request.urlopen", lambda *a, **k: Dying())
    with pytest.raises(CheckpointError):
        official_weights_path(MODELS["efficientvit_m1"])
    path = official_weights_path(MODELS["efficientvit_m1"], download=False)
    assert not path.exists()
    assert not any(path.parent.glob(".efficientvit_m1*"))
