"""Reading checkpoints: the official release, bare state dicts, timm's layout, safetensors.

A checkpoint is untrusted input. It is read with ``torch.load(weights_only=True)`` (for
the pickle protocols that cannot read, with an unpickler that imports only tensors and
their containers: :class:`_TensorsOnly`) or safetensors, so a malicious file cannot run
code while it is loaded.
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
import urllib.error
import urllib.request
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError, first_line
from ..fsutil import atomic_path, sha256_file  # noqa: F401  (sha256_file: part of this module's API)
from .efficientvit import EfficientViT, EfficientViTConfig
from .registry import MODELS, ModelSpec

# Wrappers used by training scripts around the state dict itself.
_WRAPPER_KEYS = ("model", "state_dict", "model_ema", "module")


@dataclass(frozen=True)
class Checkpoint:
    state_dict: dict[str, torch.Tensor]
    sha256: str
    path: Path
    layout: str          # "official" or "timm"


def official_weights_path(spec: ModelSpec, *, download: bool = True) -> Path:
    """Local path of the released checkpoint, downloaded into torch.hub's cache if needed."""
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    path = cache / f"{spec.name}.pth"
    if path.exists() or not download:
        return path
    try:
        cache.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(spec.official_url, timeout=60) as response, \
                atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        reason = getattr(exc, "reason", exc)
        raise CheckpointError(
            f"cannot download the official {spec.display_name} weights from {spec.official_url} "
            f"({reason}); download it elsewhere and pass the local file with --weights FILE") from None
    return path


def read_state_dict(path: str | os.PathLike) -> tuple[dict, str]:
    """The raw tensors of a checkpoint file and the file's SHA-256, without trusting it."""
    state, sha, _ = read_checkpoint(path)
    return state, sha


def read_checkpoint(path: str | os.PathLike) -> tuple[dict, str, dict | None]:
    """:func:`read_state_dict`, and the architecture the file records (a pruned
    checkpoint's ``{"model": name, "widths": {...}}``; None for a released-width one)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    sha = sha256_file(path)
    if path.suffix == ".safetensors":
        obj = _read_safetensors(path)
    else:
        obj = _read_torch(path)
    architecture = obj.get(ARCHITECTURE_KEY) if isinstance(obj, Mapping) else None
    if architecture is not None and not (isinstance(architecture, Mapping) and isinstance(
            architecture.get("model"), str) and isinstance(architecture.get("widths"), Mapping)):
        raise CheckpointError(f"{path}: its '{ARCHITECTURE_KEY}' entry is not {{'model': NAME, 'widths': {{...}}}}")
    return _unwrap(obj, path), sha, architecture


#: Where a pruned checkpoint records its architecture, beside ``model`` (the state dict).
ARCHITECTURE_KEY = "architecture"


def config_for(spec: ModelSpec, architecture: Mapping | None, source: str) -> EfficientViTConfig:
    """The configuration of family member ``spec`` with the widths ``architecture`` records
    (see :func:`read_checkpoint`); a checkpoint pruned from another member is refused."""
    config = EfficientViTConfig.from_spec(spec)
    if architecture is None:
        return config
    if architecture["model"] != spec.name:
        raise CheckpointError(f"{source} is a pruned {architecture['model']} checkpoint, not {spec.name}")
    try:
        config = config.with_widths(dict(architecture["widths"]))
        with torch.device("meta"):
            EfficientViT(config)        # every width names a module and fits it
    except (TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{source}: its recorded widths do not fit {spec.name} ({first_line(exc)})") from None
    return config


def write_checkpoint(path: str | os.PathLike, model: EfficientViT, name: str) -> Path:
    """Save ``model`` (family member ``name``) atomically, with its widths when pruned, so
    that the file alone rebuilds it."""
    payload = {"model": model.state_dict()}
    if model.config.widths:
        payload[ARCHITECTURE_KEY] = {"model": name, "widths": model.config.widths_dict()}
    with atomic_path(Path(path)) as tmp, open(tmp, "wb") as f:   # open: an OSError, not torch's RuntimeError
        torch.save(payload, f)
    return Path(path)


def _read_safetensors(path: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({first_line(exc)})") from None


def _read_torch(path: Path) -> object:
    if _is_torchscript(path):
        raise CheckpointError(f"{path} is a TorchScript archive (torch.jit.save), not a checkpoint: save the "
                              f"model's weights with torch.save(model.state_dict(), ...)")
    try:
        # Namespace is how training scripts store their arguments; it carries plain data.
        with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        pass        # a global it does not allow, or pickle protocol 4 or 5 it cannot read: see _TensorsOnly
    except _UNREADABLE as exc:
        raise _unreadable(path, exc) from None
    try:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_TensorsOnlyPickle)
    except _Forbidden as exc:
        raise CheckpointError(f"refusing to load {path}: besides tensors it references {exc.name}, which could "
                              f"run code when unpickled") from None
    except pickle.UnpicklingError:
        raise CheckpointError(f"{path} is not a PyTorch checkpoint (unreadable pickle data)") from None
    except _UNREADABLE as exc:
        raise _unreadable(path, exc) from None


_UNREADABLE = (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, AttributeError, TypeError,
               IndexError, KeyError)


def _unreadable(path: Path, exc: BaseException) -> CheckpointError:
    return CheckpointError(f"{path} is not a readable PyTorch checkpoint (truncated or corrupt?): {first_line(exc)}")


def _is_torchscript(path: Path) -> bool:
    """A zip archive with TorchScript code in it (``<archive>/code/``)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any("/code/" in name for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


#: What a checkpoint of weights may import besides storages (which torch maps itself):
#: tensors and parameters rebuilt, their containers, and argparse's Namespace.
_ALLOWED_GLOBALS = frozenset({
    "collections.OrderedDict", "torch._utils._rebuild_tensor", "torch._utils._rebuild_tensor_v2",
    "torch._utils._rebuild_parameter", "torch._utils._rebuild_parameter_with_state", "torch.Size",
    "_codecs.encode", "argparse.Namespace", "builtins.set", "builtins.frozenset", "builtins.bytearray",
    *(f"torch.{name}" for name in dir(torch) if isinstance(getattr(torch, name, None), torch.dtype))})


class _Forbidden(pickle.UnpicklingError):
    def __init__(self, name: str):
        super().__init__(f"{name} is not allowed")
        self.name = name


class _TensorsOnly(pickle.Unpickler):
    """An unpickler that imports only :data:`_ALLOWED_GLOBALS`. Written here because
    torch's own safe loader (``weights_only=True``) cannot read pickle protocols 4 and 5
    ("Unsupported operand 149", the FRAME opcode), which ``torch.save(...,
    pickle_protocol=4)`` writes: such a checkpoint of plain weights was refused."""

    def find_class(self, module: str, name: str):
        if f"{module}.{name}" not in _ALLOWED_GLOBALS:
            raise _Forbidden(f"{module}.{name}")
        return super().find_class(module, name)


class _TensorsOnlyPickle:
    """The ``pickle_module`` :func:`torch.load` is given: its loads go through :class:`_TensorsOnly`."""

    Unpickler = _TensorsOnly

    @staticmethod
    def load(file, **kwargs):
        return _TensorsOnly(file, **kwargs).load()


def _unwrap(obj: object, path: Path) -> dict:
    for _ in range(3):
        if isinstance(obj, Mapping) and not _is_state_dict(obj):
            inner = next((obj[k] for k in _WRAPPER_KEYS if k in obj and isinstance(obj[k], Mapping)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, Mapping) or not _is_state_dict(obj):
        kind = type(obj).__name__
        raise CheckpointError(f"{path} does not hold a state dict (found a {kind} without tensors "
                              f"under 'model', 'state_dict' or at the top level)")
    return _without_wrapper_prefixes(dict(obj))


#: Prefixes training wrappers put before every key: DataParallel / DistributedDataParallel
#: (``module.``) and ``torch.compile`` (``_orig_mod.``).
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _without_wrapper_prefixes(state_dict: dict) -> dict:
    while True:
        prefix = next((p for p in _WRAPPER_PREFIXES if all(k.startswith(p) for k in state_dict)), None)
        if prefix is None:
            return state_dict
        state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}


def _is_state_dict(obj: Mapping) -> bool:
    return bool(obj) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


# -- timm layout ---------------------------------------------------------------------------

_TIMM_PATCH = re.compile(r"^patch_embed\.conv(\d)\.(.*)$")
_TIMM_DOWN = re.compile(r"^stages\.(\d)\.downsample\.(res1|patchmerge|res2)\.(.*)$")
_TIMM_BLOCK = re.compile(r"^stages\.(\d)\.blocks\.(\d+)\.(.*)$")
_TIMM_DOWN_INDEX = {"res1": 0, "patchmerge": 1, "res2": 2}


def is_timm_layout(state_dict: Mapping[str, torch.Tensor]) -> bool:
    return any(k.startswith("stages.") or k.startswith("patch_embed.conv1.") for k in state_dict)


def timm_to_official(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename timm's ``efficientvit_msra`` keys to the released layout.

    timm renames the conv/linear children (``c`` -> ``conv``, ``l`` -> ``linear``), names
    the patch-embedding convs, and splits each stage into ``downsample`` (the three
    leading modules of the released ``blocks2``/``blocks3``) and ``blocks``.
    """
    out = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if len(parts) >= 2 and parts[-2] in ("conv", "linear"):
            parts[-2] = "c" if parts[-2] == "conv" else "l"
        key = ".".join(parts)
        if m := _TIMM_PATCH.match(key):
            key = f"patch_embed.{(int(m[1]) - 1) * 2}.{m[2]}"
        elif m := _TIMM_DOWN.match(key):
            key = f"blocks{int(m[1]) + 1}.{_TIMM_DOWN_INDEX[m[2]]}.{m[3]}"
        elif m := _TIMM_BLOCK.match(key):
            stage, idx = int(m[1]), int(m[2])
            key = f"blocks{stage + 1}.{idx + (3 if stage > 0 else 0)}.{m[3]}"
        out[key] = value
    return out


# -- fitting a state dict to a model -------------------------------------------------------

# Derived entries: recomputed by the model itself, so a checkpoint may omit them.
_DERIVED = re.compile(r"(attention_bias_idxs|num_batches_tracked)$")


def fit_state_dict(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor],
                   source: str, *, name: str | None = None) -> dict[str, torch.Tensor]:
    """Check a state dict against ``model`` (the family member ``name``) and return it
    ready for ``strict=True`` loading.

    Raises :class:`CheckpointError` listing the first missing, unexpected and mismatched
    keys (with shapes), and naming the family member the checkpoint seems to belong to.
    """
    target = model.state_dict()
    fitted = {}
    mismatched = []
    for key, value in state_dict.items():
        if key not in target:
            continue
        want = target[key]
        if value.shape != want.shape and value.dim() == 2 and want.dim() == 4 and want.shape[2:] == (1, 1):
            # Some releases store 1x1 convs (squeeze-excite) as matrices.
            value = value[:, :, None, None]
        if value.shape != want.shape:
            mismatched.append(f"{key} {tuple(value.shape)} vs model {tuple(want.shape)}")
        fitted[key] = value
    missing = [k for k in target if k not in state_dict and not _DERIVED.search(k)]
    unexpected = [k for k in state_dict if k not in target]
    if missing or unexpected or mismatched:
        raise CheckpointError(_mismatch_message(name or type(model).__name__, state_dict, source,
                                                missing, unexpected, mismatched))
    for key in target:
        if key not in fitted:
            fitted[key] = target[key]
    for key in (k for k in fitted if k.endswith("attention_bias_idxs")):
        if not torch.equal(fitted[key], target[key]):
            raise CheckpointError(f"{source}: {key} differs from this model's window layout "
                                  f"(was it trained at another resolution?)")
    return fitted


def _mismatch_message(name, state_dict, source, missing, unexpected, mismatched) -> str:
    def first(items, n=3):
        more = f" (+{len(items) - n} more)" if len(items) > n else ""
        return "; ".join(items[:n]) + more

    parts = []
    if mismatched:
        parts.append(f"{len(mismatched)} shape mismatches: {first(mismatched)}")
    if missing:
        parts.append(f"{len(missing)} missing keys: {first(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys: {first(unexpected)}")
    guess = guess_model(state_dict)
    hint = f"; it looks like {guess} weights" if guess and guess != name else ""
    if any(k.startswith("head_dist.") for k in unexpected) and not missing and not mismatched:
        hint += "; it has a distillation head: pass distillation=True (--distillation)"
    if mismatched and not missing and not unexpected and all("attention_bias" in m for m in mismatched):
        # Only the attention windows differ: the model was built for another input size.
        hint += "; only its attention windows differ: it was trained at another input size (--img-size)"
    return f"{source} does not fit {name}: " + " | ".join(parts) + hint


def guess_model(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """The family member whose layer widths and depths match this state dict, if any."""
    def comparable(key: str) -> bool:
        # Head and bias-table sizes depend on num_classes and img_size, not on the member.
        return not (_DERIVED.search(key) or key.startswith("head") or key.endswith("attention_biases"))

    for spec in MODELS.values():
        with torch.device("meta"):
            reference = EfficientViT(EfficientViTConfig.from_spec(spec)).state_dict()
        if all(k in state_dict and state_dict[k].shape == v.shape
               for k, v in reference.items() if comparable(k)) \
                and all(k in reference for k in state_dict if comparable(k)):
            return spec.name
    return None


def load_checkpoint(model: torch.nn.Module, path: str | os.PathLike, *, name: str | None = None) -> Checkpoint:
    """Load a checkpoint file into ``model`` (the family member ``name``, strictly) and
    describe what was loaded."""
    raw, sha = read_state_dict(path)
    return load_state_dict(model, raw, sha, Path(path), name=name)


def load_state_dict(model: torch.nn.Module, raw: Mapping[str, torch.Tensor], sha: str, path: Path, *,
                    name: str | None = None) -> Checkpoint:
    """:func:`load_checkpoint` for a file already read (:func:`read_checkpoint`)."""
    layout = "timm" if is_timm_layout(raw) else "official"
    state_dict = timm_to_official(raw) if layout == "timm" else raw
    fitted = fit_state_dict(model, state_dict, str(path), name=name)
    model.load_state_dict(fitted, strict=True)
    return Checkpoint(fitted, sha, Path(path), layout)

