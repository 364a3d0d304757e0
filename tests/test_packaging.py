"""What a wheel ships: every package of evit_deploy is listed in pyproject.toml (setuptools
installs only the listed ones; an editable install would hide a missing one); what the
package exports: the functions the README's Python API calls."""

from __future__ import annotations

import tomllib

from conftest import ROOT


def test_every_package_is_listed():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    packages = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "evit_deploy").rglob("__init__.py")}
    assert packages - listed == set()


def test_the_devices_folder_ships_as_device_files():
    """The repository's devices/ (TOML) is the package evit_deploy.device_files, data included."""
    from evit_deploy.devices import list_devices

    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools["package-dir"]["evit_deploy.device_files"] == "devices"
    assert "evit_deploy.device_files" in setuptools["packages"]
    assert setuptools["package-data"]["evit_deploy.device_files"] == ["*.toml"]
    shipped = sorted(p.stem for p in (ROOT / "devices").glob("*.toml"))
    assert shipped and sorted(d.name for d in list_devices()) == shipped


def test_the_public_api_names_its_functions_even_after_every_module_is_imported():
    """``evit_deploy.trace`` and friends stay the functions the README calls, also once a
    submodule of the same name would have been imported (importing a submodule sets the
    package's attribute of that name)."""
    import importlib
    import inspect
    import pkgutil
    import re

    import evit_deploy as ed

    for info in pkgutil.iter_modules(ed.__path__, "evit_deploy."):
        if not info.ispkg and info.name != "evit_deploy.__main__":      # that one runs the CLI
            importlib.import_module(info.name)
    for name in ed.__all__[1:]:
        assert inspect.isfunction(getattr(ed, name)), name
    readme = (ROOT / "README.md").read_text()
    api = readme[readme.index("## Python API"):readme.index("## Writing a target plug-in")]
    called = set(re.findall(r"\bed\.(\w+)\(", api))
    assert called and called <= set(ed.__all__), called - set(ed.__all__)
