"""An application that classifies images with an exported TVM library.

Needs only ``apache-tvm``, numpy and Pillow at run time (no torch, no evit-deploy)::

    evit-deploy export m4 --target tvm --tvm-target native --db DB --out dist
    python examples/tvm_app.py dist/efficientvit_m4.so cat.jpg [more.jpg ...]

The library holds the compiled model and its weights; ``efficientvit_m4.tvm.json`` beside
it says what input it takes (batch size, resolution, normalisation) and names the classes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import tvm
from PIL import Image
from tvm.runtime.vm import VirtualMachine


def load(library: Path):
    """The library's ``main`` function and its description."""
    description = json.loads(library.with_name(library.stem + ".tvm.json").read_text())
    # Kernels were tuned for this many threads (the target's num-cores).
    threads = description["extra"]["tvm"]["threads"]
    tvm.get_global_func("runtime.config_threadpool")(1, threads)
    vm = VirtualMachine(tvm.runtime.load_module(str(library)), tvm.cpu())
    return vm["main"], description


def preprocess(path: str, prep: dict) -> np.ndarray:
    """Resize the short side, centre-crop, scale to [0, 1], normalise: 3 x H x W float32."""
    img = Image.open(path).convert("RGB")
    scale = prep["resize"] / min(img.size)
    img = img.resize((max(prep["width"], round(img.width * scale)), max(prep["height"], round(img.height * scale))),
                     Image.BICUBIC)
    left, top = round((img.width - prep["width"]) / 2), round((img.height - prep["height"]) / 2)
    img = img.crop((left, top, left + prep["width"], top + prep["height"]))
    x = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0
    mean = np.asarray(prep["mean"], np.float32)[:, None, None]
    std = np.asarray(prep["std"], np.float32)[:, None, None]
    return (x - mean) / std


def main(library: str, images: list[str]) -> None:
    run, description = load(Path(library))
    batch = description["inputs"][0]["shape"][0]        # the library has a fixed batch size
    labels = description["labels"]
    x = np.stack([preprocess(p, description["preprocessing"]) for p in images])
    for start in range(0, len(x), batch):
        chunk = x[start:start + batch]
        n = len(chunk)
        padded = np.concatenate([chunk, np.repeat(chunk[-1:], batch - n, axis=0)])   # fill the last batch
        logits = run(tvm.runtime.tensor(np.ascontiguousarray(padded)))[0].numpy()[:n]
        for path, row in zip(images[start:start + n], logits):
            p = np.exp(row - row.max())
            p /= p.sum()
            best = np.argsort(-p)[:5]
            print(f"{path}: " + ", ".join(f"{labels[i]} {100 * p[i]:.1f}%" for i in best))


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit("usage: tvm_app.py LIBRARY.so IMAGE [IMAGE ...]")
    main(sys.argv[1], sys.argv[2:])
