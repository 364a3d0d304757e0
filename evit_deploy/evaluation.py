"""``evit-deploy eval``: what an artifact keeps of the fp32 PyTorch model, over many images.

Parity (:mod:`evit_deploy.parity`) proves on eight inputs that an artifact computes what
the model computes, within its precision's tolerance. What a reduced-precision artifact
costs is a different question, answered over a whole image folder: each artifact and the
fp32 PyTorch reference (the unfolded model its description names) classify every image,
and the report gives

* top-1 agreement (the artifact's class is the reference's), top-5 overlap (the share of
  the reference's five best classes among the artifact's five) and the logit error
  (largest and mean absolute difference, and the largest relative to the reference's
  largest logit), always;
* top-1 and top-5 accuracy of the artifact and of the reference, and the drop between
  them, when the images are labelled: the ImageNet validation layout
  ``DIR/<synset>/*.JPEG``, or a labels file.

Images stream through in chunks, so a 50 000-image validation set needs no more memory
than a chunk. Build files gate artifacts on the result (``min_top1_agreement``,
``max_top1_drop``; :mod:`evit_deploy.build`).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .errors import BadInputError
from .labels import imagenet_labels, imagenet_synsets
from .preprocess import find_images, load_image, resize_crop, sample_images, to_input
from .progress import Reporter

CHUNK = 32                      # images decoded and run at a time


# -- images and labels ---------------------------------------------------------------------

@dataclass(frozen=True)
class EvalImages:
    paths: tuple[Path, ...]
    labels: tuple[int, ...] | None      # class index per image, when known
    source: str                         # the directory, or "bundled photos"
    labels_source: str | None           # "synset folders", the labels file, or None

    def to_dict(self) -> dict:
        return {"images": len(self.paths), "source": self.source, "labels": self.labels_source}


def eval_images(images=None, labels=None) -> EvalImages:
    """The images to evaluate on and their classes: ``images`` (a directory, searched
    recursively; default the bundled photos) labelled by ``labels`` (a file), else by
    synset folders when every image sits in one, else unlabelled."""
    if images is None:
        paths, root, source = sample_images(), None, "bundled photos"
    else:
        root = Path(images)
        paths, source = find_images(root), str(images)
    if labels is not None:
        return EvalImages(tuple(paths), read_labels_file(labels, paths, root), source, str(labels))
    if root is not None:
        by_folder = synset_labels(paths, root)
        if by_folder is not None:
            return EvalImages(tuple(paths), by_folder, source, "synset folders")
    return EvalImages(tuple(paths), None, source, None)


def synset_labels(paths: list[Path], root: Path) -> tuple[int, ...] | None:
    """Class indices from the ImageNet validation layout, or None when some image is not
    in a folder named by a WordNet id of the 1000 classes."""
    index = {synset: i for i, synset in enumerate(imagenet_synsets())}
    found = []
    for path in paths:
        parts = path.relative_to(root).parts
        if len(parts) < 2 or parts[0] not in index:
            return None
        found.append(index[parts[0]])
    return tuple(found)


def parse_label(text: str) -> int | None:
    """A class given as an index (0-999), a WordNet id or a class name; None if unknown."""
    text = text.strip()
    if re.fullmatch(r"\d+", text):
        value = int(text)
        return value if value < len(imagenet_labels()) else None
    for names in (imagenet_synsets(), imagenet_labels()):
        if text in names:
            return names.index(text)
    return None


def read_labels_file(path, images: list[Path], root: Path | None) -> tuple[int, ...]:
    """One ``IMAGE LABEL`` pair per line (whitespace, comma or tab between them; ``#``
    starts a comment). IMAGE is the path relative to the image folder, or the file name;
    LABEL a class index, WordNet id or class name. Every image needs exactly one label."""
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"labels file not found: {path}")
    by_name: dict[str, int] = {}
    try:
        lines = path.read_text("utf-8").splitlines()
    except UnicodeDecodeError:
        raise BadInputError(f"{path} is not a text file") from None
    for number, line in enumerate(lines, 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        # A tab or comma separates, else the first space (class names may hold spaces).
        sep = re.search(r"[\t,]", line)
        name, label = (line[:sep.start()], line[sep.end():]) if sep else (line.split(None, 1) + [""])[:2]
        name, label = name.strip(), label.strip()
        index = parse_label(label)
        if not name or index is None:
            raise BadInputError(f"{path}:{number}: expected 'IMAGE LABEL' with a class index (0-999), WordNet id "
                                f"or ImageNet class name, got '{line}'")
        if name in by_name and by_name[name] != index:
            raise BadInputError(f"{path}:{number}: '{name}' is labelled twice")
        by_name[name] = index
    found, unlabelled = [], []
    for image in images:
        keys = ([image.relative_to(root).as_posix()] if root is not None else []) + [image.name]
        index = next((by_name[k] for k in keys if k in by_name), None)
        if index is None:
            unlabelled.append(keys[0])
        found.append(index)
    if unlabelled:
        raise BadInputError(f"{len(unlabelled)} image(s) have no label in {path} (first: {unlabelled[0]})")
    return tuple(found)


# -- running -------------------------------------------------------------------------------

@dataclass
class Tally:
    """Running totals of one classifier against the reference (and the labels)."""

    images: int = 0
    top1_agree: int = 0
    top5_overlap: float = 0.0
    max_abs: float = 0.0
    sum_abs: float = 0.0
    values: int = 0
    scale: float = 0.0              # the reference's largest |logit| so far
    correct1: int = 0
    correct5: int = 0

    def add(self, logits: np.ndarray, reference: np.ndarray, labels: np.ndarray | None) -> None:
        top5 = np.argsort(-logits, axis=1)[:, :5]
        ref5 = np.argsort(-reference, axis=1)[:, :5]
        self.images += len(logits)
        self.top1_agree += int((top5[:, 0] == ref5[:, 0]).sum())
        self.top5_overlap += sum(len(set(a) & set(b)) / 5 for a, b in zip(top5, ref5))
        diff = np.abs(logits.astype(np.float64) - reference.astype(np.float64))
        self.max_abs = max(self.max_abs, float(diff.max()) if np.isfinite(diff).all() else float("inf"))
        self.sum_abs += float(diff.sum())
        self.values += diff.size
        self.scale = max(self.scale, float(np.abs(reference).max()))
        if labels is not None:
            self.correct1 += int((top5[:, 0] == labels).sum())
            self.correct5 += int((top5 == labels[:, None]).any(axis=1).sum())


@dataclass
class EvalRecord:
    artifact: str
    target: str
    runtime: str
    model: str
    precision: str
    images: int
    top1_agreement: float
    top5_overlap: float
    max_abs_error: float
    mean_abs_error: float
    max_rel_error: float                      # max_abs_error / the reference's largest |logit|
    top1_accuracy: float | None = None
    top5_accuracy: float | None = None
    reference_top1_accuracy: float | None = None
    reference_top5_accuracy: float | None = None
    top1_drop: float | None = None            # reference top-1 accuracy - the artifact's


@dataclass
class EvalResult:
    records: list[EvalRecord]
    images: EvalImages
    reference: str = "fp32 PyTorch, BN not folded (the model each artifact's description names)"
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {**self.images.to_dict(), "reference": self.reference, "warnings": self.warnings,
                "records": [asdict(r) for r in self.records]}


@dataclass
class Evaluated:
    """One artifact to evaluate: its target, description, and the reference it is judged by."""

    path: Path
    target: object
    description: object
    reference: object                          # torch module, unfused fp32, normalised input
    tally: Tally = field(default_factory=Tally)


def check_classifier(path: Path, description) -> None:
    outputs = description.outputs
    if description.labels is None or len(outputs[0].shape) != 2:
        raise BadInputError(f"{path} is not a classifier (eval compares class predictions); "
                            f"its outputs are {', '.join(o.name for o in outputs)}")


def evaluate(artifacts: list[Evaluated], images: EvalImages, *, reporter: Reporter | None = None) -> EvalResult:
    """Run every artifact and its reference over ``images`` (see the module docstring)."""
    import torch

    reporter = reporter or Reporter()
    labels = np.asarray(images.labels) if images.labels is not None else None
    # The references' own accuracy, once per reference module (artifacts may share one).
    references: dict[int, Tally] = {id(a.reference): Tally() for a in artifacts}
    with reporter.task("eval", total=len(images.paths)) as task:
        for start in range(0, len(images.paths), CHUNK):
            paths = images.paths[start:start + CHUNK]
            chunk_labels = labels[start:start + CHUNK] if labels is not None else None
            decoded = {}                         # preprocessing spec -> uint8 HWC batch
            reference_logits: dict[tuple, np.ndarray] = {}
            for a in artifacts:
                spec = a.description.preprocessing
                if spec not in decoded:
                    decoded[spec] = np.stack([resize_crop(load_image(p), spec) for p in paths])
                key = (id(a.reference), spec)
                if key not in reference_logits:
                    with torch.no_grad():
                        x = torch.from_numpy(to_input(decoded[spec], spec, "normalized"))
                        reference_logits[key] = a.reference(x).float().numpy()
                    references[id(a.reference)].add(reference_logits[key], reference_logits[key], chunk_labels)
                x = to_input(decoded[spec], spec, a.description.input_format)
                out = a.target.run_batched(a.path, x, a.description)[a.description.outputs[0].name]
                a.tally.add(np.asarray(out, np.float32), reference_logits[key], chunk_labels)
            task.update(advance=len(paths))
    records = []
    for a in artifacts:
        t, ref = a.tally, references[id(a.reference)]
        record = EvalRecord(
            artifact=str(a.path), target=a.target.name, runtime=a.target.runtime_name(a.path),
            model=a.description.model, precision=a.description.extra.get("precision", "fp32"), images=t.images,
            top1_agreement=t.top1_agree / t.images, top5_overlap=t.top5_overlap / t.images,
            max_abs_error=t.max_abs, mean_abs_error=t.sum_abs / t.values,
            max_rel_error=t.max_abs / (t.scale or 1.0))
        if labels is not None:
            record.top1_accuracy, record.top5_accuracy = t.correct1 / t.images, t.correct5 / t.images
            record.reference_top1_accuracy = ref.correct1 / ref.images
            record.reference_top5_accuracy = ref.correct5 / ref.images
            record.top1_drop = record.reference_top1_accuracy - record.top1_accuracy
        records.append(record)
    result = EvalResult(records, images)
    if len(images.paths) < 100:
        result.warnings.append(f"{len(images.paths)} images: agreement and accuracy are coarse (one image is "
                               f"{100 / len(images.paths):.1f} points); pass --images DIR with more")
    return result

