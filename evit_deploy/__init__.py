"""evit-deploy: EfficientViT M0-M5 to ONNX, Core ML, TVM, OpenVINO, LiteRT and ExecuTorch, with proven parity.

The public API is importable from here; torch is only imported when a function that
needs it is first used, so ``evit_deploy.run`` on an ONNX artifact stays torch-free.
"""

__version__ = "0.1.0"

_API = {
    "create_model": ("evit_deploy.models.factory", "create_model"),
    "list_models": ("evit_deploy.models.registry", "list_models"),
    "trace": ("evit_deploy.tracing", "trace"),
    "export": ("evit_deploy.api", "export"),
    "verify": ("evit_deploy.api", "verify"),
    "evaluate": ("evit_deploy.api", "evaluate"),
    "run": ("evit_deploy.api", "run"),
    "predict": ("evit_deploy.api", "predict"),
    "model_info": ("evit_deploy.api", "model_info"),
    "models_overview": ("evit_deploy.api", "models_overview"),
    "list_targets": ("evit_deploy.targets", "list_targets"),
    "load_device": ("evit_deploy.devices", "load_device"),
    "list_devices": ("evit_deploy.devices", "list_devices"),
    "plan_export": ("evit_deploy.plan", "plan_export"),
    "optimize": ("evit_deploy.optimizer", "optimize"),
}
# Earlier names, kept so that existing code keeps working (the device ones for one release).
_ALIASES = {"load_device_profile": _API["load_device"], "list_device_profiles": _API["list_devices"],
            "load_profile": _API["load_device"], "list_profiles": _API["list_devices"]}

__all__ = ["__version__", *_API]


def __getattr__(name):
    if name in _API or name in _ALIASES:
        import importlib
        module, attr = _API.get(name) or _ALIASES[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'evit_deploy' has no attribute {name!r}")


def __dir__():
    return __all__
