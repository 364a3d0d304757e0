"""``evit-deploy build``: a declarative build file → verified artifacts + a manifest.

The whole build file is validated before any work (:mod:`.schema`). Every artifact is
verified by the parity engine, then judged by its eval gates (:mod:`.gates`); an artifact
that fails either is moved to ``<name>.rejected/``. ``dist/manifest.json``
(:mod:`.manifest`) records what was built from what (:class:`BuildRecord`), and a re-run
skips artifacts whose inputs (:mod:`.inputs`) and files are unchanged (:mod:`.runner`).
"""

from .manifest import MANIFEST, MANIFEST_VERSION, read_manifest
from .record import BuildRecord, Status
from .runner import BuildResult, build, exit_status
from .schema import ArtifactEntry, BuildFile, ModelEntry, load_build_file

__all__ = ["MANIFEST", "MANIFEST_VERSION", "ArtifactEntry", "BuildFile", "BuildRecord", "BuildResult", "ModelEntry",
           "Status", "build", "exit_status", "load_build_file", "read_manifest"]
