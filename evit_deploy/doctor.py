"""``evit-deploy doctor``: what is installed, what works here, and what to do about it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .errors import unknown_name
from .hostinfo import cpu_info, package_versions
from .targets import available_targets, list_targets
from .targets.base import Finding


@dataclass
class TargetHealth:
    name: str
    usable: bool
    findings: list[Finding] = field(default_factory=list)


@dataclass
class ArtifactCheck:
    """Whether this CPU runs an artifact as it was verified."""

    path: str
    target: str
    runs: bool                 # False: its code needs instructions this CPU lacks
    exact: bool                # False: it runs, but its kernels compute otherwise here
    verdict: str               # one line for people
    needs: dict                # the description's CPU needs

    @property
    def as_verified(self) -> bool:
        return self.runs and self.exact


@dataclass
class DoctorReport:
    versions: dict
    host: dict
    targets: list[TargetHealth]
    artifacts: list[ArtifactCheck] = field(default_factory=list)

    @property
    def problems(self) -> list[tuple[str, Finding]]:
        return [(t.name, f) for t in self.targets for f in t.findings if f.level != "ok"]

    def unusable(self, names) -> list[str]:
        return [t.name for t in self.targets if t.name in set(names or ()) and not t.usable]

    def to_dict(self) -> dict:
        return {"versions": self.versions, "host": self.host,
                "targets": [{"name": t.name, "usable": t.usable, "findings": [asdict(f) for f in t.findings]}
                            for t in self.targets],
                "artifacts": [{**asdict(a), "as_verified": a.as_verified} for a in self.artifacts]}


def check_artifact(path) -> ArtifactCheck:
    from .api import cpu_verdict

    verdict, description = cpu_verdict(path)
    return ArtifactCheck(str(path), description.extra.get("target", "?"), verdict.runs, verdict.exact,
                         verdict.summary(), verdict.needs.to_dict())


def doctor(requested: list[str] | None = None, artifacts=()) -> DoctorReport:
    """Check the host and every registered target (each reports its own facts), and
    whether this CPU runs each of ``artifacts`` as it was verified.

    ``requested`` target names must exist; whether they are usable is in the report
    (:meth:`DoctorReport.unusable`).
    """
    healths = []
    for info in list_targets():
        if info.error:
            healths.append(TargetHealth(info.name, False, [Finding("error", f"plug-in failed to load: {info.error}",
                                                                   f"fix or uninstall the package providing {info.source}")]))
            continue
        findings = available_targets()[info.name]().diagnose()
        healths.append(TargetHealth(info.name, not any(f.level == "error" for f in findings), findings))
    known = sorted(t.name for t in healths)
    for name in requested or []:
        if name not in known:
            raise unknown_name("target", name, known)
    return DoctorReport(package_versions(), cpu_info(), healths, [check_artifact(a) for a in artifacts])
