"""What a wheel ships: every package of evit_deploy is listed in pyproject.toml (setuptools
installs only the listed ones; an editable install would hide a missing one)."""

from __future__ import annotations

import tomllib

from conftest import ROOT


def test_every_package_is_listed():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    packages = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "evit_deploy").rglob("__init__.py")}
    assert packages - listed == set()
