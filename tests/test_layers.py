"""The package's layers, read from its import statements (function-level ones included):

* no import cycle anywhere in ``evit_deploy``;
* a target module never imports the command layer (``api``, ``cli``, ``commands``, ``bench``,
  ``profiler``, ``build``, ``evaluation``): what a target needs from the core lives below it;
* the core names no target module: it reaches targets through the registry
  (``evit_deploy.targets``) and their contract (``evit_deploy.targets.base``) only;
* every built-in target package has the same anatomy: declarations (``__init__.py``),
  ``convert.py``, ``quantize.py``, ``runtime.py``, and ``profile.py`` exactly when it can
  time its operators; the functions of those modules named after a hook are the hook.
"""

from __future__ import annotations

import ast
from pathlib import Path

import evit_deploy

PACKAGE_DIR = Path(evit_deploy.__file__).parent
COMMAND_MODULES = ("api", "cli", "commands", "bench", "backends", "profiler", "build", "evaluation", "optimizer")
TARGET_CONTRACT = {"evit_deploy.targets", "evit_deploy.targets.base", "evit_deploy.targets.options",
                   "evit_deploy.targets.sessions"}
BUILT_IN_TARGETS = ("onnx", "coreml", "tvm", "openvino", "litert", "executorch")
TARGET_ANATOMY = {"__init__.py", "convert.py", "quantize.py", "runtime.py"}


def _module_names() -> dict[str, Path]:
    names = {}
    for path in PACKAGE_DIR.rglob("*.py"):
        parts = ("evit_deploy", *path.relative_to(PACKAGE_DIR).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


MODULES = _module_names()


def _imports(name: str, path: Path) -> set[str]:
    """The evit_deploy modules ``name`` imports (a ``from package import module`` counts as
    importing the module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                base = ".".join([*base, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_import_reader_sees_what_it_must():
    # The rules below are only as good as the reader: check it on known imports.
    assert "evit_deploy.targets.base" in GRAPH["evit_deploy.targets.onnx"]          # from ..base import ...
    assert "evit_deploy.targets.tvm.tune" in GRAPH["evit_deploy.targets.tvm.commands"]   # inside a function
    assert "evit_deploy.models.registry" in GRAPH["evit_deploy.plan"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    assert _cycles(GRAPH) == []


def _command_layer(module: str) -> bool:
    """A command module, or a module of a command package (evit_deploy.build.runner)."""
    return any(module == f"evit_deploy.{m}" or module.startswith(f"evit_deploy.{m}.") for m in COMMAND_MODULES)


def test_targets_never_import_the_command_layer():
    offending = {m: sorted(i for i in GRAPH[m] if _command_layer(i)) for m in GRAPH
                 if m.startswith("evit_deploy.targets.")}
    assert {m: i for m, i in offending.items() if i} == {}
    assert _command_layer("evit_deploy.build.runner") and not _command_layer("evit_deploy.builder")
    # A renamed module must not drop out of the rule unnoticed.
    assert {f"evit_deploy.{m}" for m in COMMAND_MODULES} <= set(GRAPH), set(COMMAND_MODULES)


def test_the_core_names_no_target():
    offending = {m: sorted(i for i in GRAPH[m] if i.startswith("evit_deploy.targets.") and i not in TARGET_CONTRACT)
                 for m in GRAPH if not m.startswith("evit_deploy.targets")}
    assert {m: i for m, i in offending.items() if i} == {}


def test_every_built_in_target_has_the_same_anatomy():
    from evit_deploy.targets import available_targets

    targets = available_targets()
    for name in BUILT_IN_TARGETS:
        files = {p.name for p in (PACKAGE_DIR / "targets" / name).glob("*.py")}
        assert TARGET_ANATOMY <= files, (name, sorted(TARGET_ANATOMY - files))
        assert ("profile.py" in files) == targets[name].supports_profiling(), name


def test_the_anatomy_gives_each_target_its_export_and_its_sessions():
    """A target package needs no export method or session class of its own: the base
    class takes them from its convert.py and runtime.py. A variant declared in a plain
    module keeps its parent's package; a target in a plain module has none."""
    import importlib

    from evit_deploy.targets import available_targets
    from evit_deploy.targets.base import Target
    from evit_deploy.targets.onnx import OnnxTarget

    targets = available_targets()
    for name in BUILT_IN_TARGETS:
        cls = targets[name]
        assert cls.package == f"evit_deploy.targets.{name}", name
        module, _, attr = cls.session_class.partition(":")
        assert (module, attr) == (f"{cls.package}.runtime", "Session"), name
        assert isinstance(getattr(importlib.import_module(module), attr), type), name
        convert = importlib.import_module(f"{cls.package}.convert")
        assert callable(convert.export), name

    class Variant(OnnxTarget):
        name = "variant"

    class Standalone(Target):
        name = "standalone"
        requires = {"numpy": "numpy"}

    assert Variant.package == OnnxTarget.package and Variant.session_class == OnnxTarget.session_class
    assert Variant.benchmark_backend == "variant"
    assert Standalone.package is None and Standalone.session_class is None
    assert Standalone.run_requires == {"numpy": "numpy"} and Standalone.benchmark_backend == "standalone"
    assert targets["onnx"].benchmark_backend == "onnxruntime" and targets["coreml"].benchmark_backend is None
    # A package's target is named after the package and produces what its docstring says.
    assert all(targets[name].name == name for name in BUILT_IN_TARGETS)
    assert targets["onnx"].produces == "ONNX model (.onnx), run by onnxruntime"
    assert Variant.produces == OnnxTarget.produces and not hasattr(Standalone, "produces")


def _hook_arguments(hook: str) -> tuple[tuple, dict]:
    """What the base class passes a package's function of a hook's name (dummies)."""
    path, description = Path("artifact"), object()
    return {"runtime_name": ((path,), {}), "read_description": ((path,), {}), "artifact_files": ((path,), {}),
            "health": ((path, description), {}), "parity_extras": ((object(),), {}), "host_findings": ((), {}),
            "profile_ops": ((path, {}), {"threads": 1, "iterations": 1, "blocks": {}})}[hook]


def test_a_target_packages_functions_are_its_hooks():
    """Where a target package's runtime.py (profile.py) defines a function named after a
    hook, the base class calls it with the hook's arguments: each must take them, and a
    class that overrides the hook leaves no such function behind, unused."""
    import importlib
    import inspect

    from evit_deploy.targets import available_targets
    from evit_deploy.targets.base import RUNTIME_FUNCTIONS, Target

    targets = available_targets()
    found = 0
    for name in BUILT_IN_TARGETS:
        cls = targets[name]
        for module, hook in [*(("runtime", h) for h in RUNTIME_FUNCTIONS), ("profile", "profile_ops")]:
            if not (PACKAGE_DIR / "targets" / name / f"{module}.py").exists():
                continue
            function = getattr(importlib.import_module(f"{cls.package}.{module}"), hook, None)
            if function is None:
                continue
            found += 1
            args, kwargs = _hook_arguments(hook)
            inspect.signature(function).bind(*args, **kwargs)       # raises TypeError if it cannot take them
            overridden = getattr(cls, hook) is not getattr(Target, hook)
            assert not overridden, f"{cls.__name__}.{hook} overrides {cls.package}.{module}.{hook}"
    assert found >= 15, found       # the six runtimes define most hooks this way


def test_a_plug_in_registered_under_another_name_is_refused(monkeypatch):
    from importlib.metadata import EntryPoint

    import pytest

    import evit_deploy.targets as registry
    from evit_deploy.errors import BadInputError

    misnamed = EntryPoint("onnx2", "evit_deploy.targets.onnx:OnnxTarget", registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(registry, "entry_points", lambda group: [misnamed])
    registry._load_all.cache_clear()
    try:
        with pytest.raises(BadInputError, match="named 'onnx', not 'onnx2' as registered"):
            registry.get_target("onnx2")
    finally:
        registry._load_all.cache_clear()
