"""Per-node kernel times from onnxruntime's profiler, for ``evit-deploy profile``.

Each node is attributed to the block of the PyTorch module it was exported from: the
exporter records module paths in the nodes' ``namespace`` metadata, and onnxruntime names
the nodes it rewrites after the original node or its output.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

from ..base import OpTime


def profile_ops(path: Path, inputs: dict[str, np.ndarray], *, threads: int, iterations: int,
                blocks: dict[str, str]) -> list[OpTime]:
    import onnx
    import onnxruntime as ort

    scopes = {}
    for node in onnx.load(str(path)).graph.node:
        # onnxruntime names the nodes it rewrites after the original node or its output.
        for key in (node.name, *node.output):
            scopes[key] = _module_paths(node)
    with tempfile.TemporaryDirectory(prefix="evit-ort-profile-") as tmp:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "ort")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        session.run(None, inputs)                      # warm-up, excluded below
        for _ in range(iterations):
            session.run(None, inputs)
        events = json.loads(Path(session.end_profiling()).read_text())
    runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
    after_warmup = runs[0]["ts"] + runs[0]["dur"] if runs else 0
    ops = []
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time") or e["ts"] < after_warmup:
            continue
        node = e["name"].removesuffix("_kernel_time")
        ops.append(OpTime(e.get("args", {}).get("op_name", node), e["dur"] / 1e6,
                          _block_for(node, scopes, blocks)))
    return ops


def _module_paths(node) -> list[str]:
    """Module paths (outermost first) from the exporter's ``namespace`` node metadata,
    without the input adapter's ``model.`` prefix."""
    namespace = next((p.value for p in node.metadata_props if p.key == "namespace"), "")
    paths = [part.split(":")[0].strip() for part in namespace.split("/")]
    return [p.removeprefix("model.") for p in paths if p.startswith("model.")]


def _block_for(node: str, scopes: dict[str, list[str]], blocks: dict[str, str]) -> str | None:
    # Fused nodes are named "<original>/<Fusion>/..."; layout-converted ones "<output>_nchwc".
    name = node.split("/")[0].removesuffix("_nchwc")
    for path in reversed(scopes.get(name, [])):
        if path in blocks:
            return blocks[path]
    return None
