"""A third-party evit-deploy target, as a separate package would ship it.

It saves the traced program as a PyTorch ``.pt2`` archive (``torch.export.save``) and runs
it with ``torch.export.load``. Register it in the plug-in package's ``pyproject.toml``::

    [project.entry-points."evit_deploy.targets"]
    pt2 = "evit_pt2_target:Pt2Target"

After ``pip install`` of that package, ``evit-deploy targets`` lists ``pt2`` and
``evit-deploy export m0 --target pt2`` exports and verifies through the shared parity engine.
The target also adds a command to the CLI, ``evit-deploy pt2-ops ARTIFACT``, which counts the
operators of the saved program (:meth:`Pt2Target.commands`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import typer

from evit_deploy.description import ModelDescription
from evit_deploy.targets import Artifact, Command, CommandResult, Target, option

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

    @classmethod
    def commands(cls) -> list[Command]:
        return [Command("pt2-ops", operator_counts)]

    def export(self, traced, options: Pt2Options, path: Path, reporter) -> Artifact:
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


def operator_counts(artifact: Path = typer.Argument(..., help="A .pt2 artifact."),
                    top: int = typer.Option(10, "--top", min=1, help="How many operators to list."),
                    *, reporter) -> CommandResult:
    """Count the operators of a .pt2 artifact's program (`evit-deploy pt2-ops`)."""
    import torch
    from rich.table import Table

    from evit_deploy.errors import BadInputError

    if not artifact.is_file():
        raise BadInputError(f"artifact not found: {artifact}")
    with reporter.stage("load", artifact.name):
        program = torch.export.load(str(artifact))
    counts = Counter(str(node.target) for node in program.graph.nodes if node.op == "call_function")
    table = Table(title=f"Operators of {artifact.name}")
    table.add_column("operator")
    table.add_column("calls", justify="right")
    for op, n in counts.most_common(top):
        table.add_row(op, str(n))
    return CommandResult(dict(counts.most_common()), [table])


@lru_cache(maxsize=2)
def _load(path: str, mtime_ns: int):
    """The program and its description, loaded once per file version."""
    import torch

    extra = {DESCRIPTION_FILE: ""}
    program = torch.export.load(path, extra_files=extra)
    return program.module(), ModelDescription.from_json(extra[DESCRIPTION_FILE])
