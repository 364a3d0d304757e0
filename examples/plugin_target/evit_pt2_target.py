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
        import torch

        extra = {DESCRIPTION_FILE: ""}
        torch.export.load(str(path), extra_files=extra)
        return ModelDescription.from_json(extra[DESCRIPTION_FILE])

    def run(self, path: Path, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        description = self.read_description(path)
        module = torch.export.load(str(path)).module()
        with torch.no_grad():
            out = module(torch.from_numpy(inputs[description.input.name]))
        out = out if isinstance(out, (tuple, list)) else (out,)
        return {spec.name: o.numpy() for spec, o in zip(description.outputs, out)}
