"""One contract, two stores: the same suite runs on the local directory and on a real S3 server."""

from __future__ import annotations

import uuid

import pytest
from minio import Minio
from minio.error import S3Error

from mmprm_tasks.settings import Settings, StoreConfig
from mmprm_tasks.storage import LocalStore, ObjectNotFound, S3Store, open_store, open_uri, sha256_hex


@pytest.fixture(params=["local", "s3"])
def store_settings(request, tmp_path) -> Settings:
    if request.param == "local":
        return Settings(home=tmp_path, store=StoreConfig(kind="local", root=tmp_path / "objects"))
    server = request.getfixturevalue("s3_server")
    return Settings(home=tmp_path, store=StoreConfig(
        kind="s3", endpoint=server.endpoint, bucket=f"contract-{uuid.uuid4().hex[:12]}",
        access_key=server.access_key, secret_key=server.secret_key))


@pytest.fixture
def store(store_settings):
    return open_store(store_settings)


def test_put_get_round_trip(store):
    uri = store.put_bytes("a/b/c.bin", b"\x00\x01payload")
    assert store.get_bytes("a/b/c.bin") == b"\x00\x01payload"
    assert uri == store.uri("a/b/c.bin")
    assert uri.startswith("s3://" if isinstance(store, S3Store) else "file://")


def test_overwrite_replaces(store):
    store.put_bytes("k", b"one")
    store.put_bytes("k", b"two")
    assert store.get_bytes("k") == b"two"


def test_missing_key_raises_object_not_found(store):
    with pytest.raises(ObjectNotFound):
        store.get_bytes("nope/missing.json")
    assert not store.exists("nope/missing.json")


def test_list_is_prefix_scoped_and_recursive(store):
    for key in ["trees/r1/p1.json", "trees/r1/p2.json", "trees/r2/p1.json", "images/x.png"]:
        store.put_bytes(key, b"x")
    assert store.list_keys("trees/r1/") == ["trees/r1/p1.json", "trees/r1/p2.json"]
    assert len(store.list_keys("trees/")) == 3
    assert len(store.list_keys()) == 4


def test_delete_is_idempotent(store):
    store.put_bytes("d/x", b"1")
    store.delete("d/x")
    store.delete("d/x")
    assert not store.exists("d/x")


def test_json_round_trip_keeps_unicode(store):
    obj = {"question": "Δ = 3² ?", "labels": [0.5, 1.0], "nested": {"a": [1, 2]}}
    store.put_json("j/obj.json", obj)
    assert store.get_json("j/obj.json") == obj


def test_jsonl_reads_each_non_blank_line(store):
    store.put_bytes("j/lines.jsonl", '{"a": 1}\n\n  \n{"b": "ü"}\n'.encode())
    assert store.get_jsonl("j/lines.jsonl") == [{"a": 1}, {"b": "ü"}]
    # streamed (both stores), across read blocks and without a final newline
    long = "x" * (3 << 20)
    store.put_bytes("j/long.jsonl", f'"{long}"\n\n"ü"\n"last"'.encode())
    assert list(store.iter_lines("j/long.jsonl")) == [f'"{long}"', '"ü"', '"last"']


def test_content_addressed_put_lands_once(store):
    data = b"same bytes"
    key1 = store.put_content_addressed("images", data, ".png")
    key2 = store.put_content_addressed("images", data, ".png")
    assert key1 == key2 == f"images/{sha256_hex(data)}.png"
    assert store.list_keys("images/") == [key1]


def test_dir_round_trip(store, tmp_path):
    src = tmp_path / "ckpt"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text("{}")
    (src / "sub" / "weights.bin").write_bytes(b"\x01" * 1000)
    store.put_dir("checkpoints/c1", src)
    out = store.get_dir("checkpoints/c1", tmp_path / "back")
    assert (out / "config.json").read_text() == "{}"
    assert (out / "sub" / "weights.bin").read_bytes() == b"\x01" * 1000
    with pytest.raises(ObjectNotFound):
        store.get_dir("checkpoints/none", tmp_path / "none")


def test_large_object_multipart(store, tmp_path):
    data = bytes(range(256)) * (6 * 1024 * 1024 // 256 + 1)  # > 5 MiB: multipart on S3
    store.put_bytes("big/blob", data)
    assert store.get_bytes("big/blob") == data
    source = tmp_path / "spooled.bin"
    source.write_bytes(data[::-1])
    store.put_file("big/from-file", source)  # streamed from disk, not read into memory first
    assert store.get_bytes("big/from-file") == data[::-1]


@pytest.mark.parametrize("bad", ["", "/abs", "a/../b", "a//b", "./a"])
def test_invalid_keys_are_refused(store, bad):
    with pytest.raises(ValueError):
        store.put_bytes(bad, b"x")


def test_open_uri_resolves_both_schemes(store_settings, store):
    uri = store.put_bytes("u/v.txt", b"via uri")
    other, key = open_uri(uri, store_settings)
    assert other.get_bytes(key) == b"via uri"


def test_local_store_writes_atomically(tmp_path):
    store = LocalStore(tmp_path)
    store.put_bytes("x/y", b"1")
    assert [p.name for p in (tmp_path / "x").iterdir()] == ["y"]


def test_local_store_removes_temporaries_of_failed_and_dead_writers(tmp_path):
    """A failed write leaves nothing; a writer killed mid-write (SIGKILL, nothing to clean up)
    leaves a temporary file that the next write into that directory removes once it is stale,
    while a fresh one (a live writer's) stays."""
    import os
    import time

    from mmprm_tasks.storage import STALE_TEMPORARY_S

    store = LocalStore(tmp_path)
    with pytest.raises(TypeError):
        store.put_bytes("x/bad", "not bytes")  # type: ignore[arg-type]
    assert list((tmp_path / "x").iterdir()) == []

    (tmp_path / "y").mkdir()
    dead, live = tmp_path / "y" / ".tmp-dead", tmp_path / "y" / ".tmp-live"
    dead.write_bytes(b"half")
    live.write_bytes(b"writing")
    old = time.time() - STALE_TEMPORARY_S - 60
    os.utime(dead, (old, old))
    assert list(store.iter_keys("y/")) == []  # temporaries are never objects
    LocalStore(tmp_path).put_bytes("y/z", b"1")
    assert sorted(p.name for p in (tmp_path / "y").iterdir()) == [".tmp-live", "z"]


def test_s3_store_has_no_credential_defaults():
    cfg = StoreConfig(kind="s3")
    assert cfg.access_key is None and cfg.secret_key is None
    with pytest.raises(ValueError, match="MMPRM_STORE__ACCESS_KEY and MMPRM_STORE__SECRET_KEY"):
        open_store(Settings(store=cfg))


def test_s3_rejects_wrong_credentials(s3_server):
    client = Minio(s3_server.endpoint, access_key="intruder", secret_key="wrong-secret", secure=False,
                   region="us-east-1")
    with pytest.raises(S3Error) as info:
        S3Store(client, "should-not-exist")
    assert info.value.code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied")


def test_s3_bucket_is_created_once(s3_server):
    settings = Settings(store=StoreConfig(kind="s3", endpoint=s3_server.endpoint, bucket="created-once",
                                          access_key=s3_server.access_key, secret_key=s3_server.secret_key))
    open_store(settings).put_bytes("k", b"1")
    assert open_store(settings).get_bytes("k") == b"1"
