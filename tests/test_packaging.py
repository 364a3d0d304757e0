"""What a wheel ships: every package of evit_deploy is listed in pyproject.toml (setuptools
installs only the listed ones; an editable install would hide a missing one)."""

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
