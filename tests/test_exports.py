"""Exports other tools read unchanged: the release's InternVL folder (opened exactly as its
trainer opens it) and a Hugging Face Parquet dataset (read back with ``datasets``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import sqlalchemy as sa
from PIL import Image
from typer.testing import CliRunner

from mmprm_tasks import cli
from mmprm_tasks.annotate import annotate_chunk
from mmprm_tasks.db import get_engine
from mmprm_tasks.pipeline import format_stage, traverse_stage
from mmprm_tasks.runs import shard_run
from mmprm_tasks.seeds import ingest_file
from mmprm_tasks.storage import open_store
from mmprm_tasks.tree_index import tree_key

from test_annotate import SMALL, arithmetic_script
from test_search import ExactVerifier, ScriptedPolicy
from test_seeds import make_seed_file

N_PROBLEMS = 4


def _dataset(settings, tmp_path, seed_file: Path | None = None) -> str:
    """Seeds (``seed_file``, else N_PROBLEMS made here) -> annotated run -> dataset version (toy
    steps are short: min_words 3)."""
    ingest_file(seed_file or make_seed_file(tmp_path / "data", N_PROBLEMS), settings)
    s = settings.with_overrides({**SMALL, "traverse.min_words": 3})
    shard_run(s, "run-a", chunk_size=N_PROBLEMS)
    annotate_chunk(s, "run-a", 0, policy=ScriptedPolicy(arithmetic_script), verifier=ExactVerifier(), steal=False)
    dataset = traverse_stage(s, ["run-a"])
    assert dataset["counts"]["paths"] >= 2, dataset
    return dataset["dataset_id"]


def _open_as_release_trainer(meta_path: Path) -> list[dict]:
    """What the release's InternVL fine-tuning script does with a dataset description: for each
    entry, open(annotation), one JSON record per line, Image.open(os.path.join(root, image)).
    Run from another working directory, so nothing resolves by luck."""
    records = []
    description = json.load(open(meta_path))
    for entry in description.values():
        with open(entry["annotation"]) as f:
            lines = f.readlines()
        assert len(lines) == entry["length"]
        for line in lines:
            record = json.loads(line)
            with Image.open(os.path.join(entry["root"], record["image"])) as image:
                image.convert("RGB").load()
            records.append(record)
    return records


def test_trees_keep_the_seeds_image_path(settings, tmp_path):
    _dataset(settings, tmp_path)
    store = open_store(settings)
    for i in range(N_PROBLEMS):
        tree = store.get_json(tree_key("run-a", f"p{i:04d}"))
        assert tree["image_path"] == f"images/p{i}.png"  # as the seed record gave it
    with get_engine(settings).connect() as conn:
        rows = conn.execute(sa.text("SELECT image_path, image_key FROM seed_problems ORDER BY problem_id")).all()
    assert [r.image_path for r in rows] == [f"images/p{i}.png" for i in range(N_PROBLEMS)]
    assert all(r.image_key.startswith("images/") and store.exists(r.image_key) for r in rows)


def test_internvl_export_opens_as_the_release_trainer_opens_it(cli_settings, tmp_path, monkeypatch):
    dataset_id = _dataset(cli_settings, tmp_path)
    out = tmp_path / "export" / "internvl"
    result = CliRunner().invoke(cli.app, ["export", "internvl", dataset_id, str(out)])
    assert result.exit_code == 0, result.output

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    records = _open_as_release_trainer(out / "meta.json")
    paths = [json.loads(line) for line in open_store(cli_settings).get_bytes(
        f"datasets/{dataset_id}/paths.jsonl").decode().splitlines()]
    assert len(records) == len(paths) >= 2
    meta = json.loads((out / "meta.json").read_text())[dataset_id]
    assert meta["root"] == str(out.resolve()) and meta["annotation"] == str(out.resolve() / "annotation.jsonl")
    for record, path in zip(records, paths, strict=True):
        assert not os.path.isabs(record["image"]) and "://" not in record["image"]
        human, gpt = record["conversations"]
        assert human["value"].count("<prm>") == len(gpt["value"]) >= 1
        assert gpt["value"] == path["labels"]
        # the image is the problem's own image
        assert Path(out / record["image"]).read_bytes() == open_store(cli_settings).get_bytes(
            _image_key(cli_settings, path["tree_id"]))

    # A second export over the same folder is idempotent.
    before = (out / "annotation.jsonl").read_bytes()
    assert CliRunner().invoke(cli.app, ["export", "internvl", dataset_id, str(out)]).exit_code == 0
    assert (out / "annotation.jsonl").read_bytes() == before
    assert len(list((out / "images").iterdir())) == len({p["tree_id"] for p in paths})


def _image_key(settings, problem_id: str) -> str:
    with get_engine(settings).connect() as conn:
        return conn.execute(sa.text("SELECT image_key FROM seed_problems WHERE problem_id = :p"),
                            {"p": problem_id}).scalar_one()


def test_format_stage_writes_the_internvl_folder_into_the_store(settings, tmp_path, monkeypatch):
    dataset_id = _dataset(settings, tmp_path)
    result = format_stage(settings, dataset_id)
    meta_uri = result["uris"]["internvl_description"]
    assert meta_uri.startswith("file://")
    monkeypatch.chdir(tmp_path)
    records = _open_as_release_trainer(Path(meta_uri[len("file://"):]))
    assert len(records) == result["records"]
    for record in records:
        assert record["conversations"][0]["value"].count("<prm>") == len(record["conversations"][1]["value"])
    # Training still reads the chat format's images through the store: by their keys in it
    # (never the store's URI: a home can move).
    store = open_store(settings)
    chat = store.get_bytes(f"datasets/{dataset_id}/chat.jsonl").decode().splitlines()
    images = [json.loads(line)["image"] for line in chat]
    assert all(image.startswith("images/") and store.exists(image) for image in images)


def test_internvl_export_from_s3_store(s3_settings, tmp_path, monkeypatch):
    """With the store on S3 the export still downloads a local folder the trainer opens."""
    dataset_id = _dataset(s3_settings, tmp_path)
    from mmprm_tasks.exports import export_internvl

    report = export_internvl(s3_settings, dataset_id, tmp_path / "out")
    monkeypatch.chdir(tmp_path)
    assert len(_open_as_release_trainer(tmp_path / "out" / "meta.json")) == report["records"] >= 2
    # The format stage's copy in the bucket names its files relative to the folder: synced to
    # disk (as `aws s3 sync` would), the trainer run from inside it reads it unchanged.
    format_stage(s3_settings, dataset_id)
    store, prefix = open_store(s3_settings), f"datasets/{dataset_id}/internvl/"
    meta = store.get_json(prefix + "meta.json")[dataset_id]
    assert (meta["root"], meta["annotation"]) == ("", "annotation.jsonl")
    synced = tmp_path / "synced"
    for key in store.iter_keys(prefix):
        store.get_file(key, synced / key[len(prefix):])
    monkeypatch.chdir(synced)
    assert len(_open_as_release_trainer(synced / "meta.json")) == report["records"]


def test_hf_export_loads_with_datasets(cli_settings, tmp_path):
    datasets = pytest.importorskip("datasets", reason="the dev extra installs datasets to read the export back")
    dataset_id = _dataset(cli_settings, tmp_path)
    out = tmp_path / "hf"
    result = CliRunner().invoke(cli.app, ["export", "hf", dataset_id, str(out)])
    assert result.exit_code == 0, result.output

    loaded = datasets.load_dataset("parquet", data_dir=str(out / "data"), split="train",
                                   cache_dir=str(tmp_path / "hf-cache"))
    paths = [json.loads(line) for line in open_store(cli_settings).get_bytes(
        f"datasets/{dataset_id}/paths.jsonl").decode().splitlines()]
    assert len(loaded) == len(paths) >= 2
    assert isinstance(loaded.features["image"], datasets.Image)
    for row, path in zip(loaded, paths, strict=True):
        assert isinstance(row["image"], Image.Image) and row["image"].size == (64, 64)
        assert row["process"].count("<prm>") == len(row["labels"]) and row["labels"] == path["labels"]
        assert row["problem_id"] == path["tree_id"] and row["image_path"] == path["image_path"]
    # The folder itself is a dataset repository: its card's configs name the data files.
    card = (out / "README.md").read_text()
    assert card.startswith("---\nconfigs:") and dataset_id in card
    by_card = datasets.load_dataset(str(out), split="train", cache_dir=str(tmp_path / "hf-cache2"))
    assert len(by_card) == len(paths)


def test_export_of_unknown_dataset_names_it(cli_settings, tmp_path):
    for kind in ("internvl", "hf"):
        result = CliRunner().invoke(cli.app, ["export", kind, "ds-nope", str(tmp_path / kind)])
        assert result.exit_code == 1 and "no dataset 'ds-nope'" in result.output, result.output
        assert not (tmp_path / kind).exists()
