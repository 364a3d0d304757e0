"""What a build records of one artifact: a :class:`BuildRecord` with a :class:`Status`,
written to the manifest as the JSON object other tools read (:meth:`BuildRecord.to_dict`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum


class Status(Enum):
    BUILT = "built"
    UP_TO_DATE = "up to date"
    # from = "optimize.json" with a choice this CPU cannot verify exactly: verify it where it runs.
    UNVERIFIED = "built, unverified here"
    FAILED_PARITY = "failed parity"
    FAILED_GATE = "failed gate"
    FAILED_EXPORT = "failed export"

    @property
    def failed(self) -> bool:
        return self in (Status.FAILED_PARITY, Status.FAILED_GATE, Status.FAILED_EXPORT)

    @property
    def failed_verification(self) -> bool:
        """Made, but it does not compute well enough: parity or an eval gate failed."""
        return self in (Status.FAILED_PARITY, Status.FAILED_GATE)


@dataclass(frozen=True)
class BuildRecord:
    """One artifact of one model. Fields with a default are written only when set."""

    artifact: str                     # the [[artifact]] entry's name
    model: str                        # canonical, efficientvit_m2
    target: str
    profile: str | None
    options: dict                     # as written, then as the plan validated them
    weights: str                      # SHA-256 of the checkpoint, or "random-init"
    seed: int | None                  # for random-init weights
    batch: int | None
    dynamic_batch: bool
    inputs_sha256: str                # everything it is made from (build.inputs.inputs_key)
    reproducible: bool | None = None
    reproducibility: str | None = None          # what determines it, when not reproducible
    parity: dict | None = None                  # parity_summary()
    eval: dict | None = None                    # eval figures and gate verdicts
    status: Status = field(kw_only=True)        # after the fields above, as manifests have it
    error: str | None = None
    path: str | None = None                     # the artifact, relative to the output directory
    size: int | None = None                     # what an app ships: the artifact and its files
    sha256: str | None = None
    files: list[dict] | None = None             # path, size and sha256 of each file
    zip: dict | None = None                     # a directory artifact as one file
    cpu: dict | None = None                     # which CPUs compute it as verified, and which did
    chosen_by: dict | None = None               # from = "optimize.json": that file and where it chose
    seconds: float | None = None

    @property
    def key(self) -> tuple[str, str]:
        return self.artifact, self.model

    def to_dict(self) -> dict:
        required = {f.name for f in dataclasses.fields(self) if f.default is dataclasses.MISSING}
        data = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in required or value is not None:
                data[f.name] = value.value if isinstance(value, Status) else value
        return data

    @classmethod
    def from_dict(cls, data: dict) -> BuildRecord:
        """The record a manifest holds; KeyError, TypeError or ValueError if it is not one."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names and k != "status"}, status=Status(data["status"]))


def parity_summary(report) -> dict | None:
    """What a manifest records of a parity report."""
    if report is None:
        return None
    return {"passed": report.passed, "precision": report.precision, "runtime": report.runtime,
            "tolerance": dataclasses.asdict(report.tolerance),
            "exact_answer": report.exact_answer,
            "outputs": [{"name": o.name, "max_abs": o.max_abs, "max_rel": o.max_rel,
                         "fp32_noise_rel": o.noise_rel, "ratio": o.ratio, "limit": o.limit,
                         "worst_input": o.worst_input, "min_cosine": o.min_cosine, "gain_error": o.gain_error,
                         "top1": None if o.top1_checked is None else f"{o.top1_agree}/{o.top1_checked}",
                         "top5_overlap": o.top5_overlap} for o in report.outputs],
            "failures": report.failures, "extra": report.extra}
