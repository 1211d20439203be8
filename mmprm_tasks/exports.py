"""A dataset version as files other tools read unchanged.

* :func:`write_internvl_folder` — the original release's InternVL fine-tuning input as a
  self-contained folder: ``annotation.jsonl``, the images under ``images/`` (named by their
  content-addressed key, so ``image`` is a relative path), and ``meta.json``, the dataset
  description ``{name: {root, annotation, data_augment, repeat_time, length}}``.  The release's
  trainer does ``json.load(open(meta))``, ``open(annotation)`` and
  ``Image.open(os.path.join(root, image))``: in a local folder ``root`` and ``annotation`` are
  the folder's absolute paths; in an S3 store (which that trainer cannot open) they are relative
  to the folder, for a copy synced to disk and read from inside it.
* :func:`write_hf_dataset` — the PRM dataset as Parquet with a Hugging Face ``Image`` column and a
  dataset card, which ``datasets.load_dataset("parquet", data_dir=...)`` (or ``load_dataset(DIR)``)
  reads.

Both read a dataset version's paths from the store and each path's image from the index (paths
name their problem in ``tree_id``), so datasets built before paths carried ``image_key`` export
the same way.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from .db import get_engine
from .formats import internvl_description, internvl_line
from .settings import Settings
from .storage import LocalStore, ObjectStore, open_store

INTERNVL_ANNOTATION = "annotation.jsonl"
INTERNVL_META = "meta.json"
HF_DATA_FILE = "data/train-00000-of-00001.parquet"


class ExportError(ValueError):
    """A dataset cannot be exported as asked (names the record and field at fault)."""


def _join(prefix: str, name: str) -> str:
    return f"{prefix.rstrip('/')}/{name}" if prefix else name


def dataset_paths(settings: Settings, dataset_id: str) -> list[dict[str, Any]]:
    """The dataset version's path records, each with ``image_key``: its problem's stored image."""
    return list(iter_dataset_paths(settings, dataset_id))


def iter_dataset_paths(settings: Settings, dataset_id: str) -> Iterator[dict[str, Any]]:
    """:func:`dataset_paths` as a stream: the paths file is read twice, line by line (its
    problems, then its records), so memory does not grow with the dataset.  An unknown dataset
    fails before the first record."""
    store = open_store(settings)
    with get_engine(settings).connect() as conn:
        paths_key = conn.execute(sa.text("SELECT paths_key FROM datasets WHERE dataset_id = :d"),
                                 {"d": dataset_id}).scalar_one_or_none()
        if paths_key is None:
            raise LookupError(f"no dataset {dataset_id!r} in the step index (run traverse first)")
        problem_ids = sorted({str(json.loads(line).get("tree_id")) for line in store.iter_lines(paths_key)})
        image_keys = dict(conn.execute(sa.text(
            "SELECT problem_id, image_key FROM seed_problems WHERE problem_id = ANY(:ids)"), {"ids": problem_ids}).all())
    return _checked_paths(dataset_id, (json.loads(line) for line in store.iter_lines(paths_key)), image_keys)


def _checked_paths(dataset_id: str, paths: Iterable[dict[str, Any]], image_keys: dict[str, str]
                   ) -> Iterator[dict[str, Any]]:
    for n, path in enumerate(paths):
        if path.get("tree_id") not in image_keys:
            raise ExportError(f"dataset {dataset_id} record {n}: tree_id {path.get('tree_id')!r} names no seed "
                              "problem in the index, so its image cannot be found")
        labels, marks = len(path["labels"]), path["process"].count("<prm>")
        if labels != marks:
            raise ExportError(f"dataset {dataset_id} record {n}: labels has {labels} values but process has "
                              f"{marks} <prm> marks")
        path["image_key"] = image_keys[path["tree_id"]]
        yield path


def write_internvl_folder(settings: Settings, dataset_id: str, paths: Iterable[dict[str, Any]], target: ObjectStore,
                          prefix: str = "", *, each: Callable[[int, dict[str, Any]], None] | None = None
                          ) -> dict[str, Any]:
    """Write the InternVL folder of a dataset version (``paths`` from :func:`iter_dataset_paths`)
    under ``prefix`` of ``target`` (idempotent: images already there are not copied again, the
    annotation and description are rewritten).  One pass over ``paths``, the annotation spooled
    to a temporary file: memory does not grow with the dataset.  ``each(n, path)`` is called for
    every path (the format stage writes its other format in the same pass)."""
    store = open_store(settings)
    if isinstance(target, LocalStore):
        folder = target.root / prefix
        root, annotation = str(folder), str(folder / INTERNVL_ANNOTATION)
    else:
        root, annotation = "", INTERNVL_ANNOTATION
    images: set[str] = set()
    records = 0
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", suffix=".jsonl") as spool:
        for records, path in enumerate(paths, start=1):
            image_key = path["image_key"]
            if image_key not in images:
                images.add(image_key)
                if not target.exists(_join(prefix, image_key)):
                    target.put_bytes(_join(prefix, image_key), store.get_bytes(image_key))
            # The image keys are relative ("images/<sha256>.png"): the trainer joins them to root.
            spool.write(internvl_line(records - 1, {**path, "image_path": image_key}) + "\n")
            if each is not None:
                each(records - 1, path)
        spool.flush()
        target.put_file(_join(prefix, INTERNVL_ANNOTATION), spool.name, "application/x-ndjson")
    description = internvl_description(dataset_id, root=root, annotation=annotation, length=records)
    meta_uri = target.put_json(_join(prefix, INTERNVL_META), description)
    return {"dataset_id": dataset_id, "records": records, "images": len(images),
            "meta": meta_uri, "annotation": target.uri(_join(prefix, INTERNVL_ANNOTATION))}


def export_internvl(settings: Settings, dataset_id: str, out_dir: Path) -> dict[str, Any]:
    """``mmprm export internvl``: the InternVL folder in a local directory."""
    paths = iter_dataset_paths(settings, dataset_id)  # first: an unknown dataset creates no folder
    return write_internvl_folder(settings, dataset_id, paths, LocalStore(out_dir))


# Hugging Face ``datasets`` reads the column types from this schema metadata; without it the
# image column would load as a plain {bytes, path} struct instead of decoded images.
_HF_FEATURES = {
    "id": {"dtype": "int64", "_type": "Value"},
    "image": {"_type": "Image"},
    "question": {"dtype": "string", "_type": "Value"},
    "process": {"dtype": "string", "_type": "Value"},
    "labels": {"feature": {"dtype": "float64", "_type": "Value"}, "_type": "List"},
    "mc_values": {"feature": {"dtype": "float64", "_type": "Value"}, "_type": "List"},
    "answer": {"dtype": "string", "_type": "Value"},
    "polarity": {"dtype": "string", "_type": "Value"},
    "problem_id": {"dtype": "string", "_type": "Value"},
    "image_path": {"dtype": "string", "_type": "Value"},
}

_HF_CARD = """---
configs:
- config_name: default
  data_files:
  - split: train
    path: {data_file}
task_categories:
- image-text-to-text
tags:
- process-reward-model
- multimodal-math
- mm-prm
---

# {dataset_id}

Step-level process-reward training paths made by the MM-PRM platform from Monte Carlo tree
search annotations (OmegaPRM-style search, then the release's traversal into paths).

- Records: {records} paths from {problems} problems ({negatives} negative, {positives} positive).
- Made from annotation runs: {runs}.
- Traversal settings: `{params}`.

## Columns

| column | meaning |
| --- | --- |
| `id` | row number |
| `image` | the problem's image (decoded by `datasets` as a PIL image) |
| `question` | the problem statement |
| `process` | the solution prefix; each step group ends with the mark `<prm>` |
| `labels` | training targets, one per `<prm>` (soft Monte Carlo values, or 0/1 for hard labels) |
| `mc_values` | the Monte Carlo estimate of each step group (the soft labels) |
| `answer` | the problem's correct answer |
| `polarity` | `positive` (the path ends above the threshold) or `negative` |
| `problem_id` | the seed problem's id |
| `image_path` | the image path the seed record gave |

The PRM reads `"Question: {{question}}\\nProcess: {{process}}"` with the image and is trained with
cross-entropy on P(Yes) vs P(No) at every `<prm>` against `[label, 1 - label]`.

```python
from datasets import load_dataset
ds = load_dataset("parquet", data_dir="<this folder>/data", split="train")
```
"""


def write_hf_dataset(settings: Settings, dataset_id: str, out_dir: Path) -> dict[str, Any]:
    """``mmprm export hf``: ``data/train-00000-of-00001.parquet`` (image bytes embedded) and a
    dataset card ``README.md`` in ``out_dir``."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise ExportError("the Hugging Face export needs pyarrow: pip install 'mmprm[hf]'") from exc

    store = open_store(settings)
    paths = dataset_paths(settings, dataset_id)
    images = {key: store.get_bytes(key) for key in sorted({p["image_key"] for p in paths})}
    rows = [{
        "id": n,
        "image": {"bytes": images[p["image_key"]], "path": Path(p["image_key"]).name},
        "question": p["question"],
        "process": p["process"],
        "labels": [float(v) for v in p["labels"]],
        "mc_values": [float(v) for v in p.get("mc_values", p["labels"])],
        "answer": None if p.get("answer") is None else str(p["answer"]),
        "polarity": p.get("polarity"),
        "problem_id": str(p["tree_id"]),
        "image_path": p.get("image_path"),
    } for n, p in enumerate(paths)]
    schema = pa.schema([
        ("id", pa.int64()),
        ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
        ("question", pa.string()), ("process", pa.string()),
        ("labels", pa.list_(pa.float64())), ("mc_values", pa.list_(pa.float64())),
        ("answer", pa.string()), ("polarity", pa.string()), ("problem_id", pa.string()), ("image_path", pa.string()),
    ], metadata={"huggingface": json.dumps({"info": {"features": _HF_FEATURES}})})
    data_file = out_dir / HF_DATA_FILE
    data_file.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), data_file)

    with get_engine(settings).connect() as conn:
        dataset = conn.execute(sa.text("SELECT run_ids, params FROM datasets WHERE dataset_id = :d"),
                               {"d": dataset_id}).one()
    polarities = [p.get("polarity") for p in paths]
    (out_dir / "README.md").write_text(_HF_CARD.format(
        data_file=HF_DATA_FILE, dataset_id=dataset_id, records=len(rows), problems=len({r["problem_id"] for r in rows}),
        negatives=polarities.count("negative"), positives=polarities.count("positive"),
        runs=", ".join(dataset.run_ids), params=json.dumps(dataset.params.get("traverse", {}), sort_keys=True)))
    return {"dataset_id": dataset_id, "records": len(rows), "parquet": str(data_file), "card": str(out_dir / "README.md")}
