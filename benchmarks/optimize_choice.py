"""Does ``optimize`` choose the fastest right artifact, and how long does it take?

For each model (realistic synthetic weights) and batch, this runs ``optimize`` (one thread,
held-out crops of the bundled photos as its images), then re-times every admissible
candidate in a separate ``bench`` run on the same machine, and reports the winner, its
speed against onnxruntime fp32, the minutes optimize took, and the winner's speed against
the fastest admissible candidate of the re-timing (the goal: within 3%).

    python benchmarks/optimize_choice.py m0 m4 --batches 16 1 --json optimize_choice.json
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from evit_deploy import benchkit

ADMISSIBLE = ("chosen", "runner-up", "admissible")


def write_photos(folder: Path, count: int) -> Path:
    """``count`` held-out crops of the bundled photos as PNG files (optimize reads a folder)."""
    import numpy as np
    from PIL import Image

    from evit_deploy.calibration import _default_set
    from evit_deploy.preprocess import Preprocessing

    spec = Preprocessing.for_size(224)
    images = _default_set(spec, seed=1).images
    while len(images) < count:
        images = np.concatenate([images, _default_set(spec, seed=len(images)).images])
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images[:count]):
        pixels = image if image.dtype == np.uint8 else (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"crop{i:03d}.png")
    return folder


def retime(model: str, result, weights: Path, batch: int) -> dict[str, float]:
    """Images/s of each admissible candidate in a separate bench run."""
    from evit_deploy.bench import bench

    chosen = [c for c in result.candidates if c.outcome.value in ADMISSIBLE]
    # Tuned variants (--tune) time with their tuning: bench's options of "TARGET@tuned".
    options = {f"{c.target}@tuned": {k: v for k, v in c.options.items() if k != "precision"}
               for c in chosen if c.backend.endswith("@tuned")}
    found = bench([model], [c.backend for c in chosen], batch=batch, threads=1, weights={model: str(weights)},
                  target_options=options or None, memory=False)
    return {r.backend: r.images_per_s for r in found.records if r.images_per_s}


def main() -> int:
    from evit_deploy import optimize
    from evit_deploy.hostinfo import cpu_info

    p = benchkit.parser(__doc__)
    p.add_argument("--batches", type=int, nargs="+", default=[16, 1])
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--time-budget", default=None)
    # Synthetic weights have near-flat logits: fp16 already flips 1 crop in 64, int8 a third
    # (a trained model's margins are far wider). A looser budget shows what int8 would win.
    p.add_argument("--min-top1-agreement", type=float, default=None)
    p.add_argument("--out", type=Path, help="keep optimize's output directories here")
    args = p.parse_args()
    benchkit.quiet()
    rows = []
    with tempfile.TemporaryDirectory(prefix="optimize-choice-") as tmp:
        work = args.out or Path(tmp)
        photos = write_photos(Path(tmp) / "photos", args.images)
        for model in args.models:
            weights = benchkit.realistic_checkpoint(model, 0, Path(tmp) / f"{model}.pth")
            for batch in args.batches:
                start = time.monotonic()
                result = optimize(model, work / f"{model}-b{batch}", weights=weights, images=photos, batch=batch,
                                  threads=1, time_budget=args.time_budget,
                                  min_top1_agreement=args.min_top1_agreement)
                minutes = (time.monotonic() - start) / 60
                speeds = retime(model, result, weights, batch)
                fastest = max(speeds, key=speeds.get) if speeds else None
                winner = result.candidate(result.winner) if result.winner else None
                rows.append({"model": model, "batch": batch, "winner": result.winner, "runner_up": result.runner_up,
                             "ratio_to_onnxruntime": winner and winner.ratio_to_baseline, "minutes": round(minutes, 1),
                             "retimed": speeds, "retimed_fastest": fastest,
                             "winner_vs_fastest": speeds.get(result.winner, 0) / speeds[fastest] if fastest else None,
                             "candidates": [c.to_dict() for c in result.candidates]})
                print(f"{model} b{batch}: {result.winner} {winner and winner.ratio_to_baseline:.2f}x onnxruntime "
                      f"fp32, {minutes:.1f} min; re-timed fastest {fastest}, winner at "
                      f"{rows[-1]['winner_vs_fastest']:.3f} of it", flush=True)
    benchkit.write_json(args.json, {"machine": cpu_info(), "threads": 1, "images": args.images,
                                    "min_top1_agreement": args.min_top1_agreement, "runs": rows})
    return 0


if __name__ == "__main__":
    benchkit.main(main)
