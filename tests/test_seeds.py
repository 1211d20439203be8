"""Seed ingestion: good records land once, every bad record is named by record and field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sqlalchemy as sa
from PIL import Image
from typer.testing import CliRunner

from mmprm_tasks.db import get_engine
from mmprm_tasks.seeds import ingest_file
from mmprm_tasks.settings import ConfigurationError
from mmprm_tasks.storage import open_store

from helpers import write_png


def make_seed_file(root: Path, n: int, *, jsonl: bool = False) -> Path:
    records = []
    for i in range(n):
        write_png(root / "images" / f"p{i}.png", color=(i % 256, (i * 7) % 256, 99), text=str(i))
        records.append({"id": f"p{i:04d}", "question": f"What is {i} + 1?", "correct_answer": str(i + 1),
                        "image_path": f"images/p{i}.png", "split": "train"})
    path = root / ("seeds.jsonl" if jsonl else "seeds.json")
    if jsonl:
        path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    else:
        path.write_text(json.dumps(records))
    return path


def count(settings, table: str) -> int:
    with get_engine(settings).connect() as conn:
        return conn.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar_one()


def test_200_records_land_once(settings, tmp_path):
    seed_file = make_seed_file(tmp_path / "data", 200)
    report = ingest_file(seed_file, settings)
    assert (report.total, report.inserted, report.unchanged, report.images_stored) == (200, 200, 0, 200)
    assert report.ok and report.quarantine_uri is None
    assert count(settings, "seed_problems") == 200
    assert len(open_store(settings).list_keys("images/")) == 200

    again = ingest_file(seed_file, settings)
    assert (again.inserted, again.unchanged, again.images_stored, len(again.rejected)) == (0, 200, 0, 0)
    assert count(settings, "seed_problems") == 200
    assert len(open_store(settings).list_keys("images/")) == 200


def test_ingest_into_real_s3(s3_settings, tmp_path):
    seed_file = make_seed_file(tmp_path / "data", 5, jsonl=True)
    report = ingest_file(seed_file, s3_settings)
    assert report.inserted == 5
    store = open_store(s3_settings)
    keys = store.list_keys("images/")
    assert len(keys) == 5
    with get_engine(s3_settings).connect() as conn:
        row = conn.execute(sa.text("SELECT image_key, image_sha256, split FROM seed_problems WHERE problem_id='p0003'")).one()
    assert row.image_key in keys and row.image_key.startswith(f"images/{row.image_sha256}") and row.split == "train"


def test_s3_image_paths_are_confined_and_rejected_per_record(s3_settings, tmp_path):
    """s3:// images only under the configured roots; a bucket is never created by reading; a
    missing object or bucket rejects its record and the good records still land."""
    from minio import Minio

    store = open_store(s3_settings)  # the platform bucket
    png = tmp_path / "x.png"
    write_png(png)
    store.put_bytes("seed-images/ok.png", png.read_bytes())
    store.put_bytes("private/secret.png", png.read_bytes())
    bucket = s3_settings.store.bucket
    records = [
        {"id": "ok", "question": "q1?", "correct_answer": 1, "image_path": f"s3://{bucket}/seed-images/ok.png"},
        {"id": "private", "question": "q2?", "correct_answer": 2, "image_path": f"s3://{bucket}/private/secret.png"},
        {"id": "climb", "question": "q3?", "correct_answer": 3,
         "image_path": f"s3://{bucket}/seed-images/../private/secret.png"},
        {"id": "missing", "question": "q4?", "correct_answer": 4, "image_path": f"s3://{bucket}/seed-images/nope.png"},
        {"id": "made-up", "question": "q5?", "correct_answer": 5, "image_path": "s3://attacker-made-bucket/seed-images/a.png"},
        # keys no object can have: an empty part, a backslash climb (the server refuses it)
        {"id": "empty-part", "question": "q6?", "correct_answer": 6, "image_path": f"s3://{bucket}/seed-images//ok.png"},
        {"id": "backslash", "question": "q7?", "correct_answer": 7,
         "image_path": f"s3://{bucket}/seed-images/..\\private/secret.png"},
    ]
    seed = tmp_path / "s3.json"
    seed.write_text(json.dumps(records))
    allowed = s3_settings.with_overrides({"image_s3_roots": [f"s3://{bucket}/seed-images/",
                                                             "s3://attacker-made-bucket/seed-images/"]})
    report = ingest_file(seed, allowed)
    assert report.inserted == 1
    by_id = {r.record_id: r for r in report.rejected}
    assert set(by_id) == {"private", "climb", "missing", "made-up", "empty-part", "backslash"}
    assert all(r.field == "image_path" for r in by_id.values())
    assert "not under an allowed S3 image root" in by_id["private"].message
    assert "not under an allowed S3 image root" in by_id["climb"].message
    assert "no such object" in by_id["missing"].message and "NoSuchBucket" in by_id["made-up"].message
    assert all("invalid object key" in by_id[rid].message for rid in ("empty-part", "backslash"))
    cfg = s3_settings.store
    client = Minio(cfg.endpoint, access_key=cfg.access_key, secret_key=cfg.secret_key.get_secret_value(),
                   secure=False, region=cfg.region)
    assert not client.bucket_exists(bucket_name="attacker-made-bucket")
    # with no roots configured (the default), no s3:// image is read at all
    default = ingest_file(seed, s3_settings)
    assert default.inserted == default.unchanged == 0 and len(default.rejected) == len(records)
    assert all("not under an allowed S3 image root" in r.message for r in default.rejected)


def _bad_seed_file(root: Path) -> tuple[Path, dict[int, tuple[str, str]]]:
    """A JSONL file with good records interleaved with many kinds of bad ones.

    Returns the file and, for every bad record's line index, its kind and the field its
    rejection must name.
    """
    images = root / "images"
    for i in range(10):
        write_png(images / f"good{i}.png", color=(10 * i, 20, 30), text=f"g{i}")
    write_png(images / "shared.png", color=(1, 2, 3))
    (images / "notes.txt").write_text("this is not an image")
    good_png = (images / "good0.png").read_bytes()
    (images / "truncated.png").write_bytes(good_png[: len(good_png) // 2])
    Image.new("1", (8000, 8000)).save(images / "bomb.png")  # 64 Mpx: a decompression bomb
    (images / "adir.png").mkdir()
    outside = root.parent / "outside.png"
    write_png(outside)
    (images / "link.png").symlink_to(outside)

    def rec(rid, **over):
        base = {"id": rid, "question": f"question {rid}?", "correct_answer": "7", "image_path": "images/shared.png"}
        base.update(over)
        return {k: v for k, v in base.items() if v is not ...}

    lines: list[bytes] = []
    expected: dict[int, tuple[str, str]] = {}

    def good(i):
        lines.append(json.dumps(rec(f"good{i}", image_path=f"images/good{i}.png", question=f"good question {i}?")).encode())

    def bad(tag, field, record=None, raw: bytes | None = None):
        expected[len(lines)] = (tag, field)
        lines.append(raw if raw is not None else json.dumps(record).encode())

    good(0)
    bad("no-id", "id", rec(..., question="no id here"))
    bad("no-question", "question", rec("no-question", question=...))
    good(1)
    bad("no-answer", "correct_answer", rec("no-answer", correct_answer=...))
    bad("no-image", "image_path", rec("no-image", image_path=...))
    bad("id-list", "id", rec(["a", "b"]))
    bad("question-int", "question", rec("question-int", question=12345))
    good(2)
    bad("question-empty", "question", rec("question-empty", question="   "))
    bad("answer-empty", "correct_answer", rec("answer-empty", correct_answer=""))
    bad("answer-bool", "correct_answer", rec("answer-bool", correct_answer=True))
    bad("answer-null", "correct_answer", rec("answer-null", correct_answer=None))
    good(3)
    bad("image-missing", "image_path", rec("image-missing", image_path="images/nope.png"))
    bad("image-text", "image_path", rec("image-text", image_path="images/notes.txt"))
    bad("image-truncated", "image_path", rec("image-truncated", image_path="images/truncated.png"))
    bad("image-bomb", "image_path", rec("image-bomb", image_path="images/bomb.png"))
    bad("image-dir", "image_path", rec("image-dir", image_path="images/adir.png"))
    good(4)
    bad("escape-relative", "image_path", rec("escape-relative", image_path="../outside.png"))
    bad("escape-absolute", "image_path", rec("escape-absolute", image_path=str(outside)))
    bad("escape-symlink", "image_path", rec("escape-symlink", image_path="images/link.png"))
    good(5)
    bad("dup-id", "id", rec("good5", image_path="images/good6.png", question="other question"))
    bad("dup-content", "<record>", rec("dup-content", image_path="images/good4.png", question="good question 4?"))
    good(6)
    bad("non-utf8", "question", raw=b'{"id": "non-utf8", "question": "caf\xe9 \xff?", "correct_answer": "1", "image_path": "images/shared.png"}')
    bad("huge-question", "question", rec("huge-question", question="x" * 50_000))
    bad("huge-answer", "correct_answer", rec("huge-answer", correct_answer="9" * 5_000))
    bad("nul-question", "question", rec("nul-question", question="what\x00is this"))
    bad("nul-answer", "correct_answer", rec("nul-answer", correct_answer="4\x00"))
    bad("nul-extra", "note", rec("nul-extra", note="a\x00b"))
    bad("nul-key", "<key>", rec("nul-key", **{"no\x00te": 1}))
    bad("bell-nested-extra", "meta.tags[1]", rec("bell-nested-extra", meta={"tags": ["ok", "ring\x07"]}))
    bad("ansi-question", "question", rec("ansi-question", question="\x1b[2J\x1b[31mred?"))
    bad("c1-question", "question", rec("c1-question", question="csi \x9b2J?"))
    bad("nan-answer", "correct_answer", raw=b'{"id": "nan-answer", "question": "q?", "correct_answer": NaN, '
                                           b'"image_path": "images/shared.png"}')
    bad("inf-answer", "correct_answer", raw=b'{"id": "inf-answer", "question": "q?", "correct_answer": 1e309, '
                                           b'"image_path": "images/shared.png"}')
    good(7)
    bad("not-object", "<record>", ["p9", "q", "a", "images/shared.png"])
    bad("bad-json", "<record>", raw=b'{"id": "bad-json", "question": "unterminated')
    bad("bad-id-chars", "id", rec("a/b/../c"))
    bad("huge-extra", "<extra>", rec("huge-extra", notes="n" * 200_000))
    # nesting beyond what the JSON reader can recurse into: one rejected record, not a failed file
    bad("deep-json", "<record>", raw=b'{"id": "deep-json", "notes": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    good(8)
    good(9)
    path = root / "mixed.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path, expected


def test_mixed_file_lands_every_good_record_and_names_every_bad_one(settings, tmp_path):
    seed_file, expected = _bad_seed_file(tmp_path / "data")
    assert len(expected) >= 20
    report = ingest_file(seed_file, settings)

    assert report.inserted == 10
    with get_engine(settings).connect() as conn:
        landed = set(conn.execute(sa.text("SELECT problem_id FROM seed_problems")).scalars())
    assert landed == {f"good{i}" for i in range(10)}

    by_tag = {expected[r.record_index][0]: r for r in report.rejected}
    assert sorted(r.record_index for r in report.rejected) == sorted(expected)
    for tag, field in expected.values():
        assert by_tag[tag].field == field, (tag, by_tag[tag].describe())
        assert f"record {by_tag[tag].record_index}" in by_tag[tag].describe()
    assert "resolves outside" in by_tag["escape-relative"].message
    assert "resolves outside" in by_tag["escape-symlink"].message
    assert "good5" in by_tag["dup-id"].message
    assert "UTF-8" in by_tag["non-utf8"].message
    assert "NUL" in by_tag["nul-extra"].message and "U+001B" in by_tag["ansi-question"].message
    assert "finite" in by_tag["nan-answer"].message and "finite" in by_tag["inf-answer"].message

    store = open_store(settings)
    quarantine = store.get_json(report.quarantine_uri.split("/objects/", 1)[1])
    assert len(quarantine["rejected"]) == len(expected)
    assert all("field" in r and "message" in r for r in quarantine["rejected"])


def test_same_id_with_new_content_is_rejected_later(settings, tmp_path):
    root = tmp_path / "data"
    seed_file = make_seed_file(root, 3)
    ingest_file(seed_file, settings)
    records = json.loads(seed_file.read_text())
    records[1]["question"] = "changed question?"
    seed_file.write_text(json.dumps(records))
    report = ingest_file(seed_file, settings)
    assert report.unchanged == 2 and report.inserted == 0
    assert [(r.record_id, r.field) for r in report.rejected] == [("p0001", "id")]
    assert "different content" in report.rejected[0].message


def test_malformed_json_array_fails_the_file(settings, tmp_path):
    bad = tmp_path / "broken.json"
    bad.write_text('[{"id": "a", ')
    with pytest.raises(ValueError, match="not a valid JSON array"):
        ingest_file(bad, settings)


def test_image_root_allows_images_elsewhere(settings, tmp_path):
    images = tmp_path / "shared-images"
    write_png(images / "x.png")
    seed = tmp_path / "seeds" / "s.json"
    seed.parent.mkdir()
    seed.write_text(json.dumps([{"id": "x1", "question": "q?", "correct_answer": 3, "image_path": str(images / "x.png")}]))
    assert ingest_file(seed, settings).rejected[0].field == "image_path"
    report = ingest_file(seed, settings.with_overrides({"image_root": str(images)}))
    assert report.inserted == 1


def test_a_link_escaping_the_image_roots_is_named_an_escape(settings, tmp_path):
    """With two roots (the seed file's folder and image_root), a link under one root that points
    outside both is an escape, not a missing file."""
    images = tmp_path / "shared-images"
    write_png(images / "x.png")
    secret = tmp_path / "private" / "secret.png"
    write_png(secret)
    seeds = tmp_path / "seeds"
    seeds.mkdir()
    (seeds / "link.png").symlink_to(secret)
    seed = seeds / "s.json"
    seed.write_text(json.dumps([{"id": "l1", "question": "q?", "correct_answer": 3, "image_path": "link.png"}]))
    report = ingest_file(seed, settings.with_overrides({"image_root": str(images)}))
    assert report.inserted == 0
    assert report.rejected[0].field == "image_path"
    assert "link that resolves outside" in report.rejected[0].message


def test_an_ingest_racing_another_counts_and_rejects_what_the_other_landed(settings, tmp_path):
    """Another ingest inserts p0001 with different content after this one checked the index but
    before it inserts: the record is rejected by name, not silently dropped."""
    import threading

    seed = make_seed_file(tmp_path / "data", 3)
    other = get_engine(settings).connect()
    transaction = other.begin()
    record = dict(question="What is 1 + 1?", answer="2", image_key="images/x.png", sha="x" * 64, source="other")
    other.execute(sa.text(
        "INSERT INTO seed_problems (problem_id, question, correct_answer, image_key, image_sha256, content_hash,"
        " source) VALUES ('p0001', :question, :answer, :image_key, :sha, 'another-content', :source)"), record)
    result = {}
    worker = threading.Thread(target=lambda: result.update(report=ingest_file(seed, settings)))
    worker.start()
    worker.join(timeout=3)
    assert worker.is_alive()  # its insert waits on the other transaction's row
    transaction.commit()
    other.close()
    worker.join(timeout=30)
    report = result["report"]
    assert report.inserted == 2 and report.unchanged == 0
    assert [(r.record_id, r.field) for r in report.rejected] == [("p0001", "id")]
    assert "different content" in report.rejected[0].message


def test_a_trigger_can_name_only_seed_files_under_the_seed_roots(settings, tmp_path):
    """seed_source comes from whoever may trigger a DAG: a file elsewhere (here a passwords file)
    is refused before it is read; under <home>/seeds (the default root) it is ingested."""
    from mmprm_tasks.pipeline import ingest_stage

    secret = tmp_path / "airflow" / "simple_auth_manager_passwords.json"
    secret.parent.mkdir()
    secret.write_text('{"admin": "hunter2"}')
    with pytest.raises(ConfigurationError, match="outside the allowed seed roots"):
        ingest_stage(settings, str(secret))
    with pytest.raises(ConfigurationError, match="outside the allowed seed roots"):  # no climbing out
        ingest_stage(settings, str(settings.home / "seeds" / ".." / "x.json"))
    with pytest.raises(ConfigurationError, match="no such file"):  # not retried: waiting cannot help
        ingest_stage(settings, str(settings.home / "seeds" / "missing.json"))
    assert not open_store(settings).list_keys("quarantine/")
    seed = make_seed_file(settings.home / "seeds", 2)
    assert ingest_stage(settings, str(seed))["inserted"] == 2
    elsewhere = make_seed_file(tmp_path / "shared", 2)
    result = ingest_stage(settings.with_overrides({"seed_roots": [str(tmp_path / "shared")]}), f"file://{elsewhere}")
    assert result["unchanged"] == 2


def test_quarantine_copies_no_raw_bytes_of_a_file_without_a_valid_record(settings, tmp_path):
    not_seeds = tmp_path / "notes.jsonl"
    not_seeds.write_text('{"admin": "hunter2"}\n["root", "x"]\n')
    report = ingest_file(not_seeds, settings)
    assert report.inserted == 0 and len(report.rejected) == 2
    quarantine = open_store(settings).get_json(report.quarantine_uri.split("/objects/", 1)[1])
    assert "hunter2" not in json.dumps(quarantine)
    assert all("raw" not in r and r["message"] for r in quarantine["rejected"])


def test_cli_ingest_exit_codes(cli_settings, tmp_path):
    from mmprm_tasks import cli

    runner = CliRunner()
    good = make_seed_file(tmp_path / "data", 4)
    result = runner.invoke(cli.app, ["ingest", str(good)])
    assert result.exit_code == 0, result.output
    assert "inserted" in result.output
    mixed, _ = _bad_seed_file(tmp_path / "mixed")
    result = runner.invoke(cli.app, ["ingest", str(mixed)])
    assert result.exit_code == 1
    assert "rejected records" in result.output and "quarantine report" in result.output
    result = runner.invoke(cli.app, ["db", "status"])
    assert result.exit_code == 0 and "seed_problems" in result.output
