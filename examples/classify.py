"""Classify photos with an artifact made by evit-deploy, using only that artifact's runtime.

An application does not need torch or evit-deploy to use what `evit-deploy export` or
`evit-deploy build` wrote; this script needs numpy, Pillow and one runtime:

    efficientvit_m4.onnx          onnxruntime
    efficientvit_m4.so            apache-tvm (with efficientvit_m4.tvm.json beside it)
    efficientvit_m4.xml           openvino (with efficientvit_m4.bin beside it)
    EfficientViT-M4.mlpackage     coremltools on macOS (Core ML does not run on Linux)

    python examples/classify.py dist/efficientvit_m4.onnx cat.jpg coffee.jpg
    python examples/classify.py --json dist/efficientvit_m4.so cat.jpg     # one JSON line per photo

Every artifact carries its description (input name and shape, input format, resize and
crop, mean/std, class names): in the ONNX metadata, in the TVM sidecar, in the OpenVINO
IR's rt_info, in the Core ML package's metadata. Reading it, instead of hard-coding ImageNet constants, is what keeps
an application right when the artifact is rebuilt with other options.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

DESCRIPTION_KEY = "evit_deploy.description"


def preprocess(path: str, description: dict) -> np.ndarray:
    """The evaluation transform the model was trained with: resize the short side,
    centre-crop, then whatever the artifact's input format still expects of the caller."""
    prep = description["preprocessing"]
    with Image.open(path) as img:
        img = img.convert("RGB")
    scale = prep["resize"] / min(img.size)
    size = (max(prep["width"], round(img.width * scale)), max(prep["height"], round(img.height * scale)))
    img = img.resize(size, Image.BICUBIC)
    top, left = int(round((img.height - prep["height"]) / 2.0)), int(round((img.width - prep["width"]) / 2.0))
    pixels = np.asarray(img.crop((left, top, left + prep["width"], top + prep["height"])), dtype=np.uint8)
    chw = np.ascontiguousarray(pixels.transpose(2, 0, 1))
    fmt = description["input_format"]          # the exporter may have baked the rest into the graph
    if fmt == "uint8":
        return chw
    x = chw.astype(np.float32) / np.float32(255.0)
    if fmt == "normalized":
        x = (x - np.asarray(prep["mean"], np.float32)[:, None, None]) / np.asarray(prep["std"], np.float32)[:, None, None]
    return x.astype(np.float32)


def check_cpu(path: Path, description: dict) -> None:
    """Refuse a library compiled for instructions this CPU lacks (it would die of SIGILL)
    and warn about int8 kernels that are exact only with VNNI. Both are recorded in the
    description's ``extra.cpu``; the flags are Linux's /proc/cpuinfo names."""
    needs = description.get("extra", {}).get("cpu") or {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = set(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []))
    except OSError:
        return                                     # not Linux: nothing to compare with
    missing = [f for f in needs.get("isa", []) if f not in flags]
    if missing:
        sys.exit(f"{path} is compiled for CPUs with {', '.join(missing)}, which this CPU lacks")
    if needs.get("exact_with") and not flags & set(needs["exact_with"]):
        print(f"warning: {path}: {needs.get('why')}; this CPU has none of {', '.join(needs['exact_with'])}",
              file=sys.stderr)


class OnnxModel:
    def __init__(self, path: Path):
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.description = json.loads(self.session.get_modelmeta().custom_metadata_map[DESCRIPTION_KEY])
        check_cpu(path, self.description)

    def logits(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.description["inputs"][0]["name"]: batch})[0]


class TvmModel:
    def __init__(self, path: Path):
        import tvm
        from tvm.runtime.vm import VirtualMachine

        self.description = json.loads(path.with_name(path.stem + ".tvm.json").read_text("utf-8"))
        check_cpu(path, self.description)
        # The kernels were tuned for this many threads (the target's num-cores).
        tvm.get_global_func("runtime.config_threadpool")(1, self.description["extra"]["tvm"]["threads"])
        self._in_place = self.description["extra"]["tvm"].get("inputs_in_place", False)
        self._main = VirtualMachine(tvm.runtime.load_module(str(path)), tvm.cpu())["main"]

    def logits(self, batch: np.ndarray) -> np.ndarray:
        import tvm
        import tvm_ffi

        batch = np.ascontiguousarray(batch)
        # Libraries that say so read the array where it is, at any alignment (no copy of
        # the batch); others need TVM's 64-byte-aligned copy.
        x = tvm_ffi.from_dlpack(batch, require_alignment=0) if self._in_place else tvm.runtime.tensor(batch)
        out = self._main(x)
        return (out[0] if not hasattr(out, "numpy") else out).numpy()


class OpenVinoModel:
    def __init__(self, path: Path):
        import openvino as ov
        import openvino.properties.hint as hints

        core = ov.Core()
        model = core.read_model(str(path))
        self.description = json.loads(model.get_rt_info(["evit_deploy", "description"]).astype(str))
        check_cpu(path, self.description)
        # The precision the IR was exported for: OpenVINO would otherwise pick bf16 by itself
        # on CPUs that have it.
        precision = model.get_rt_info(["evit_deploy", "inference_precision"]).astype(str)
        self.compiled = core.compile_model(model, "CPU", {
            hints.inference_precision: ov.Type.bf16 if precision == "bf16" else ov.Type.f32})

    def logits(self, batch: np.ndarray) -> np.ndarray:
        return self.compiled({self.description["inputs"][0]["name"]: batch})[0]


class CoreMLModel:
    def __init__(self, path: Path):
        if sys.platform != "darwin":
            sys.exit("Core ML runs on Apple platforms only; on Linux use `evit-deploy verify` "
                     "(evit-deploy's reference executor) to check a .mlpackage")
        import coremltools as ct

        self.model = ct.models.MLModel(str(path))
        self.description = json.loads(self.model.user_defined_metadata[DESCRIPTION_KEY])

    def logits(self, batch: np.ndarray) -> np.ndarray:
        spec = self.description["inputs"][0]
        rows = []
        for item in batch:
            if self.description["input_format"] == "uint8":      # an image input: one picture per call
                feed = Image.fromarray(np.ascontiguousarray(item.transpose(1, 2, 0)), "RGB")
            else:
                feed = item[None]
            out = self.model.predict({spec["name"]: feed})
            if "classLabelProbs" in out:                          # a classifier: probabilities by label
                probs = out["classLabelProbs"]
                rows.append(np.log([probs[label] for label in self.description["labels"]]))
            else:
                rows.append(np.asarray(next(iter(out.values()))).reshape(-1))
        return np.stack(rows)


RUNTIMES = {".onnx": OnnxModel, ".so": TvmModel, ".xml": OpenVinoModel, ".mlpackage": CoreMLModel}


def open_artifact(path: str):
    path = Path(path)
    suffix = path.suffix
    if suffix not in RUNTIMES:
        sys.exit(f"{path}: not an artifact this script knows ({', '.join(RUNTIMES)})")
    return RUNTIMES[suffix](path)


def classify(model, images: list[str], top: int = 5) -> list[dict]:
    """Top-``top`` classes per image. The artifact's batch size is fixed: fill the last
    batch by repeating its final image and drop those rows."""
    description = model.description
    batch = description["inputs"][0]["shape"][0]
    if not isinstance(batch, int):              # a dynamic batch dimension: all at once
        batch = len(images)
    labels = description["labels"]
    x = np.stack([preprocess(p, description) for p in images])
    results = []
    for start in range(0, len(x), batch):
        chunk = x[start:start + batch]
        n = len(chunk)
        padded = np.concatenate([chunk, np.repeat(chunk[-1:], batch - n, axis=0)])
        for path, row in zip(images[start:start + n], model.logits(padded)[:n]):
            p = np.exp(row - row.max())
            p /= p.sum()
            best = np.argsort(-p)[:top]
            results.append({"image": path, "top": [{"index": int(i), "label": labels[i], "probability": float(p[i])}
                                                   for i in best]})
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Classify photos with an evit-deploy artifact.")
    parser.add_argument("artifact", help=".onnx, .so (TVM), .xml (OpenVINO) or .mlpackage (macOS)")
    parser.add_argument("images", nargs="+")
    parser.add_argument("--top", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="one JSON object per image")
    args = parser.parse_args(argv)
    for result in classify(open_artifact(args.artifact), args.images, args.top):
        if args.json:
            print(json.dumps(result))
        else:
            print(f"{result['image']}: " + ", ".join(f"{t['label']} {100 * t['probability']:.1f}%"
                                                      for t in result["top"]))


if __name__ == "__main__":
    main()
