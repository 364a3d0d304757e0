"""A third-party evit-deploy target, as a separate package would ship it.

It saves the traced program as a PyTorch ``.pt2`` archive (``torch.export.save``) and runs
it with ``torch.export.load``. Register it in the plug-in package's ``pyproject.toml``::

    [project.entry-points."evit_deploy.targets"]
    pt2 = "evit_pt2_target:Pt2Target"

After ``pip install`` of that package, ``evit-deploy targets`` lists ``pt2`` and
``evit-deploy export m0 --target pt2`` exports and verifies through the shared parity engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from evit_deploy.description import ModelDescription
from evit_deploy.targets import Artifact, Target, option

DESCRIPTION_FILE = "evit_deploy.json"


@dataclass
class Pt2Options:
    note: str = option("", "free text stored beside the program")


class Pt2Target(Target):
    name = "pt2"
    produces = "torch.export archive (.pt2)"
    suffixes = (".pt2",)
    requires = {"torch": "torch"}
    run_requires = {"torch": "torch"}
    supports_dynamic_batch = True
    Options = Pt2Options

    def export(self, traced, options: Pt2Options, path: Path) -> Artifact:
        import torch

        torch.export.save(traced.program, str(path),
                          extra_files={DESCRIPTION_FILE: traced.description.to_json()})
        return Artifact(path, self.name, traced.description)

    def read_description(self, path: Path) -> ModelDescription:
        return _load(str(Path(path).resolve()), Path(path).stat().st_mtime_ns)[1]

    def run(self, path: Path, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        module, description = _load(str(Path(path).resolve()), Path(path).stat().st_mtime_ns)
        with torch.no_grad():
            out = module(torch.from_numpy(inputs[description.input.name]))
        out = out if isinstance(out, (tuple, list)) else (out,)
        return {spec.name: o.numpy() for spec, o in zip(description.outputs, out)}


@lru_cache(maxsize=2)
def _load(path: str, mtime_ns: int):
    """The program and its description, loaded once per file version."""
    import torch

    extra = {DESCRIPTION_FILE: ""}
    program = torch.export.load(path, extra_files=extra)
    return program.module(), ModelDescription.from_json(extra[DESCRIPTION_FILE])
