"""Seed ingestion (SPEC §1): validate, store images content-addressed, index problems.

Every record is judged on its own: a bad record is rejected with a message naming the record and
the field and written to a quarantine report, while good records still land (one transaction per
batch).  Re-ingesting the same file adds nothing: identical records are recognised as unchanged.
"""

from __future__ import annotations

import codecs
import hashlib
import io
import json
import os
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.dialects.postgresql import insert as pg_insert
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError, field_validator

from .db import get_engine, require_schema
from .settings import ConfigurationError, Settings
from .storage import ObjectStore, open_store, sha256_hex
from .validation import find_bad_value, id_problem

MAX_QUESTION_CHARS = 20_000
MAX_ANSWER_CHARS = 1_000
MAX_EXTRA_BYTES = 100_000
MAX_IMAGE_BYTES = 50 * 1024 * 1024
MAX_IMAGE_PIXELS = 40_000_000
BATCH_SIZE = 500
# The columns ingestion writes (the schema itself lives in sql/).
_SEED_TABLE = sa.table(
    "seed_problems", *(sa.column(name) for name in [
        "problem_id", "question", "correct_answer", "image_path", "image_key", "image_sha256", "content_hash",
        "source", "split"]),
    sa.column("extra", JSONB),
)
_IMAGE_SUFFIX = {"PNG": ".png", "JPEG": ".jpg", "GIF": ".gif", "WEBP": ".webp", "BMP": ".bmp", "TIFF": ".tiff"}


class SeedRecord(BaseModel):
    """One SPEC §1 record; fields beyond the four are kept as ``extra``."""

    model_config = ConfigDict(extra="allow", str_strip_whitespace=True)

    id: StrictStr | int = Field(...)
    question: StrictStr = Field(..., min_length=1, max_length=MAX_QUESTION_CHARS)
    correct_answer: StrictStr | int | float = Field(...)
    image_path: StrictStr = Field(..., min_length=1, max_length=4096)

    @field_validator("id", "correct_answer", mode="before")
    @classmethod
    def _no_booleans(cls, value: Any) -> Any:
        # JSON true/false would otherwise pass as the integers 1/0.
        if isinstance(value, bool):
            raise ValueError("must be a string or a number, not a boolean")
        return value

    @field_validator("id", mode="after")
    @classmethod
    def _id_text(cls, value: str | int) -> str:
        # Ids become object keys (trees/<run>/<id>.json) and Airflow-visible names.
        text = str(value).strip()
        problem = id_problem(text)
        if problem:
            raise ValueError(problem)
        return text

    @field_validator("correct_answer", mode="after")
    @classmethod
    def _answer_text(cls, value: str | int | float) -> str:
        text = str(value).strip()
        if not text:
            raise ValueError("must not be empty")
        if len(text) > MAX_ANSWER_CHARS:
            raise ValueError(f"is {len(text)} characters, at most {MAX_ANSWER_CHARS}")
        return text

    def extra_fields(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class RecordRejected(ValueError):
    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass
class Rejection:
    record_index: int  # 0-based position in the file (line number - 1 for JSONL)
    record_id: str | None
    field: str
    message: str

    def describe(self) -> str:
        who = f"record {self.record_index}" + (f" (id {self.record_id!r})" if self.record_id else "")
        return f"{who}: field {self.field!r}: {self.message}"


@dataclass
class IngestReport:
    source: str
    total: int = 0
    inserted: int = 0
    unchanged: int = 0
    images_stored: int = 0
    rejected: list[Rejection] = field(default_factory=list)
    quarantine_uri: str | None = None

    @property
    def ok(self) -> bool:
        return not self.rejected

    def reasons(self) -> Counter[str]:
        return Counter(r.field for r in self.rejected)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["rejected"] = [asdict(r) | {"describe": r.describe()} for r in self.rejected]
        return data


@dataclass
class _Accepted:
    index: int
    record: SeedRecord
    image_bytes: bytes
    image_sha: str
    image_suffix: str
    content_hash: str
    split: str | None

    def raw(self) -> dict[str, Any]:
        return self.record.model_dump()


# Seed files are read as a stream: at most one record's text (plus one read block) is held,
# whatever the file's size.
READ_BLOCK_CHARS = 1 << 20
MAX_RECORD_CHARS = 64 * 1024 * 1024
# Images held for one batch's transaction at most (a batch also ends at BATCH_SIZE records).
BATCH_IMAGE_BYTES = 64 * 1024 * 1024


def _text_blocks(path: Path) -> Iterator[str]:
    """The file as text blocks; bytes that are not UTF-8 are carried as lone surrogates (and
    rejected per record), a leading BOM is dropped."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="surrogateescape")
    first = True
    with path.open("rb") as stream:
        while True:
            raw = stream.read(READ_BLOCK_CHARS)
            text = decoder.decode(raw, final=not raw)
            if first and text:
                text, first = text.removeprefix("\ufeff"), False
            if text:
                yield text
            if not raw:
                return


def _is_json_array(path: Path) -> bool:
    """A ``.jsonl``/``.ndjson`` file is JSON lines whatever its first record (which may be an array,
    rejected alone); any other file is a JSON array when its text starts with ``[``."""
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        return False
    for block in _text_blocks(path):
        stripped = block.lstrip()
        if stripped:
            return stripped.startswith("[")
    return False


TOO_DEEP = "JSON nested too deeply to read"


def _value_end(text: str, start: int) -> int | None:
    """Where the JSON container starting at ``text[start]`` ends, found by counting brackets
    outside strings (no recursion, for a value too deep to parse); None when ``text`` ends first."""
    depth, index, in_string = 0, start, False
    while index < len(text):
        char = text[index]
        if in_string:
            if char == "\\":
                index += 1
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
            if depth == 0:
                return index + 1
        index += 1
    return None


def _iter_json_array(path: Path) -> Iterator[Any]:
    """The elements of a JSON array, one at a time; ValueError for a file that is not one."""
    decoder = json.JSONDecoder()
    blocks = _text_blocks(path)
    buffer, pos, eof = "", 0, False

    def more() -> bool:
        nonlocal buffer, pos, eof
        block = next(blocks, None)
        if block is None:
            eof = True
            return False
        buffer, pos = buffer[pos:] + block, 0
        return True

    def skip_space() -> str:
        nonlocal pos
        while True:
            while pos < len(buffer) and buffer[pos] in " \t\r\n":
                pos += 1
            if pos < len(buffer) or not more():
                return buffer[pos] if pos < len(buffer) else ""

    def fail(message: str) -> ConfigurationError:
        # The whole file is unreadable: a one-line error of the command, never retried.
        return ConfigurationError(f"{path}: not a valid JSON array: {message}")

    if skip_space() != "[":
        raise fail("it does not start with '['")
    pos += 1
    index = 0
    if skip_space() == "]":
        pos += 1
    else:
        while True:
            skip_space()
            while True:
                try:
                    value, end = decoder.raw_decode(buffer, pos)
                except json.JSONDecodeError as exc:
                    if eof:
                        raise fail(f"record {index}: {exc.msg}") from None
                    if len(buffer) - pos > MAX_RECORD_CHARS:
                        raise fail(f"record {index} is longer than {MAX_RECORD_CHARS} characters") from None
                    more()
                    continue
                except RecursionError:
                    # Too deep for the reader: rejected alone, as a JSONL line would be.
                    end = _value_end(buffer, pos)
                    if end is None:
                        if eof or len(buffer) - pos > MAX_RECORD_CHARS:
                            raise fail(f"record {index} is nested too deeply and does not end") from None
                        more()
                        continue
                    value = RecordRejected("<record>", TOO_DEEP)
                    break
                if end == len(buffer) and not eof and more():
                    continue  # the value touched the block's end (a number may go on): read on
                break
            pos = end
            yield value
            index += 1
            separator = skip_space()
            pos += 1
            if separator == "]":
                break
            if separator != ",":
                raise fail(f"expected ',' or ']' after record {index - 1}")
    if skip_space():
        raise fail("text after the closing ']'")


def _iter_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    with path.open("rb") as stream:
        for index, raw_line in enumerate(stream):
            line = raw_line.decode("utf-8", errors="surrogateescape")
            if index == 0:
                line = line.removeprefix("\ufeff")
            if not line.strip():
                continue
            try:
                yield index, json.loads(line)
            except json.JSONDecodeError as exc:
                yield index, RecordRejected("<record>", f"invalid JSON: {exc.msg} at column {exc.colno}")
            except RecursionError:
                yield index, RecordRejected("<record>", TOO_DEEP)


def count_records(path: Path) -> int:
    """How many records the file holds, read as a stream without keeping any (a JSON array is
    parsed through once: one syntax error fails the file before anything lands)."""
    if _is_json_array(path):
        return sum(1 for _ in _iter_json_array(path))
    with path.open("rb") as stream:
        return sum(1 for line in stream if line.strip() and line.strip() != b"\xef\xbb\xbf")


def read_records(path: Path) -> Iterator[tuple[int, Any] | tuple[int, RecordRejected]]:
    """The file's records with their index, streamed; undecodable/unparsable JSONL lines become
    rejections.  A JSON array must be valid as a whole (see :func:`count_records`); JSONL is
    judged line by line.  Bytes that are not UTF-8 are carried as surrogates and rejected per record."""
    if _is_json_array(path):
        return enumerate(_iter_json_array(path))
    return _iter_jsonl(path)


class ImageResolver:
    """Resolves ``image_path`` against allowed roots and proves the file is an image."""

    def __init__(self, seed_file: Path, settings: Settings):
        self.roots = [seed_file.resolve().parent]
        if settings.image_root:
            self.roots.append(settings.image_root.resolve())
        self.settings = settings

    def _load_s3(self, image_path: str) -> bytes:
        """An s3:// image under a configured root (``image_s3_roots``). A missing object or bucket,
        or one these credentials may not read, rejects the record; any other S3 failure (the
        server is down) is an error of the ingest, retried, never a rejection."""
        from minio.error import S3Error

        from .storage import ObjectNotFound, check_key, is_request_error, open_uri

        roots = self.settings.image_s3_roots
        if ".." in image_path.split("/") or not any(image_path.startswith(root.rstrip("/") + "/") for root in roots):
            raise RecordRejected("image_path", f"{image_path!r} is not under an allowed S3 image root "
                                               f"{roots} (setting image_s3_roots)")
        try:
            store, key = open_uri(image_path, self.settings)
            check_key(key)
        except ValueError as exc:  # "a//b", "..\\x", control characters: no object can be named so
            raise RecordRejected("image_path", str(exc)) from None
        try:
            return store.get_bytes(key)
        except ObjectNotFound:
            raise RecordRejected("image_path", f"{image_path!r}: no such object") from None
        except S3Error as exc:
            if exc.code in ("NoSuchBucket", "AccessDenied") or is_request_error(exc):
                raise RecordRejected("image_path", f"{image_path!r}: {exc.code}") from None
            raise

    def load(self, image_path: str) -> bytes:
        if image_path.startswith("s3://"):
            return self._load_s3(image_path)
        if image_path.startswith("file://"):
            image_path = image_path[len("file://"):]
        candidate = Path(image_path)
        bases = [candidate] if candidate.is_absolute() else [root / candidate for root in self.roots]
        for base in bases:
            resolved = base.resolve()
            if not any(resolved.is_relative_to(root) for root in self.roots):
                if any(Path(os.path.normpath(base)).is_relative_to(root) for root in self.roots):
                    # Inside a root as written, outside once links are followed: an escape.
                    raise RecordRejected("image_path", f"{image_path!r} is a link that resolves outside the "
                                                       f"allowed image roots {[str(r) for r in self.roots]}")
                continue
            if resolved.is_file():
                size = resolved.stat().st_size
                if size > MAX_IMAGE_BYTES:
                    raise RecordRejected("image_path", f"{image_path}: file is {size} bytes, at most {MAX_IMAGE_BYTES}")
                return resolved.read_bytes()
        if not any(b.resolve().is_relative_to(r) for b in bases for r in self.roots):
            raise RecordRejected("image_path", f"{image_path!r} resolves outside the allowed image roots {[str(r) for r in self.roots]}")
        raise RecordRejected("image_path", f"{image_path!r}: no such file under {[str(r) for r in self.roots]}")


def decode_image(data: bytes) -> str:
    """The image's file suffix; rejects anything Pillow cannot fully decode."""
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                image.verify()
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                fmt = image.format or ""
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise RecordRejected("image_path", f"not a decodable image: {exc}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise RecordRejected("image_path", f"image is corrupt: {exc}") from None
    finally:
        Image.MAX_IMAGE_PIXELS = previous
    return _IMAGE_SUFFIX.get(fmt, ".img")


def content_hash(question: str, answer: str, image_sha: str) -> str:
    payload = json.dumps([question, answer, image_sha], ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()


def _validate(index: int, raw: Any, resolver: ImageResolver) -> _Accepted:
    if isinstance(raw, RecordRejected):
        raise raw
    if not isinstance(raw, dict):
        raise RecordRejected("<record>", f"must be a JSON object, got {type(raw).__name__}")
    # Every text of the record, extra fields and keys included, and every number (NaN, 1e309).
    bad = find_bad_value(raw)
    if bad:
        raise RecordRejected(bad.field, bad.message)
    try:
        record = SeedRecord.model_validate(raw)
    except ValidationError as exc:
        error = exc.errors()[0]
        loc = ".".join(map(str, error["loc"])) or "<record>"
        field_name = str(error["loc"][0]) if error["loc"] else "<record>"
        raise RecordRejected(field_name, f"{error['msg']} (at {loc})") from None
    extra = record.extra_fields()
    if len(json.dumps(extra, ensure_ascii=False).encode()) > MAX_EXTRA_BYTES:
        raise RecordRejected("<extra>", f"extra fields exceed {MAX_EXTRA_BYTES} bytes")
    image_bytes = resolver.load(record.image_path)
    suffix = decode_image(image_bytes)
    image_sha = sha256_hex(image_bytes)
    split = extra.get("split") if isinstance(extra.get("split"), str) else None
    return _Accepted(
        index=index, record=record, image_bytes=image_bytes, image_sha=image_sha, image_suffix=suffix,
        content_hash=content_hash(record.question, str(record.correct_answer), image_sha), split=split,
    )


def ingest_file(path: str | Path, settings: Settings, *, store: ObjectStore | None = None,
                progress: Callable[[int, int], None] | None = None) -> IngestReport:
    """Ingest a JSON array / JSONL seed file; never raises for a bad record (see the report).

    ``progress(done, total)`` is called after each record.
    """
    path = Path(path)
    engine = get_engine(settings)
    require_schema(engine)
    store = store or open_store(settings)
    resolver = ImageResolver(path, settings)
    report = IngestReport(source=str(path.resolve()))
    report.total = count_records(path)

    seen_ids: dict[str, int] = {}
    seen_hashes: dict[str, str] = {}
    batch: list[_Accepted] = []
    batch_bytes = 0
    # Raw excerpts of rejected records wait on disk, in the order of report.rejected, for the
    # quarantine report: a file of many bad records is never held in memory.
    excerpts = tempfile.TemporaryFile("w+", encoding="utf-8")

    def reject(index: int, raw: Any, exc: RecordRejected) -> None:
        rid = raw.get("id") if isinstance(raw, dict) else None
        rid = str(rid)[:200] if isinstance(rid, (str, int)) and not isinstance(rid, bool) else None
        report.rejected.append(Rejection(index, rid, exc.field, exc.message))
        excerpts.write(json.dumps(_raw_excerpt(raw)) + "\n")

    def land(items: list[_Accepted]) -> None:
        before = len(report.rejected)
        _land(items, engine, store, report)
        by_index = {item.index: item for item in items}
        for rejection in report.rejected[before:]:  # already in the index under another content
            excerpts.write(json.dumps(_raw_excerpt(by_index[rejection.record_index].raw())) + "\n")

    with excerpts:
        for done, (index, raw) in enumerate(read_records(path), start=1):
            try:
                accepted = _validate(index, raw, resolver)
                rid = accepted.record.id
                if rid in seen_ids:
                    raise RecordRejected("id", f"duplicate id {rid!r}: already used by record {seen_ids[rid]} of this file")
                if accepted.content_hash in seen_hashes:
                    raise RecordRejected("<record>", f"duplicate content: same question, answer and image as id {seen_hashes[accepted.content_hash]!r}")
                seen_ids[rid] = index
                seen_hashes[accepted.content_hash] = rid
                batch.append(accepted)
                batch_bytes += len(accepted.image_bytes)
            except RecordRejected as exc:
                reject(index, raw, exc)
            if len(batch) >= BATCH_SIZE or batch_bytes >= BATCH_IMAGE_BYTES:
                land(batch)
                batch, batch_bytes = [], 0
            if progress is not None:
                progress(done, report.total)
        if batch:
            land(batch)
        if report.rejected:
            report.quarantine_uri = _write_quarantine(path, store, report, excerpts)
    return report


def _write_quarantine(path: Path, store: ObjectStore, report: IngestReport, excerpts: IO[str]) -> str:
    """The quarantine report (every rejection, with its raw excerpt), written through a temporary
    file and streamed up.  Raw excerpts only from a file that is a seed file (some record was
    valid): a file with no valid record at all may be anything (a passwords file), and is not copied."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    key = f"quarantine/ingest/{path.stem}-{stamp}.json"
    with_raw = bool(report.inserted + report.unchanged)
    excerpts.seek(0)
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", suffix=".json") as out:
        out.write('{"source": ' + json.dumps(report.source) + ', "rejected": [')
        for i, (rejection, excerpt) in enumerate(zip(report.rejected, excerpts)):
            entry = asdict(rejection) | ({"raw": json.loads(excerpt)} if with_raw and excerpt.strip() != '""' else {})
            out.write((", " if i else "") + json.dumps(entry, ensure_ascii=False))
        out.write("]}")
        out.flush()
        return store.put_file(key, out.name, "application/json")


def _raw_excerpt(raw: Any, limit: int = 2000) -> str:
    if isinstance(raw, RecordRejected):
        return ""
    text = json.dumps(raw, ensure_ascii=True, default=str)
    return text if len(text) <= limit else text[:limit] + "...(truncated)"


def _settle_landed(conn: sa.Connection, items: list[_Accepted], report: IngestReport) -> list[_Accepted]:
    """Count as unchanged, or reject by name, the items whose id or content is already in the
    index; return the others (still to insert)."""
    by_id = dict(conn.execute(sa.text("SELECT problem_id, content_hash FROM seed_problems WHERE problem_id = ANY(:ids)"),
                              {"ids": [a.record.id for a in items]}).all())
    by_hash = dict(conn.execute(sa.text("SELECT content_hash, problem_id FROM seed_problems WHERE content_hash = ANY(:h)"),
                                {"h": [a.content_hash for a in items]}).all())
    free = []
    for item in items:
        rid = item.record.id
        if by_id.get(rid) == item.content_hash:
            report.unchanged += 1
        elif rid in by_id:
            report.rejected.append(Rejection(item.index, rid, "id", f"id {rid!r} is already ingested with different content"))
        elif item.content_hash in by_hash:
            report.rejected.append(Rejection(item.index, rid, "<record>",
                                             f"duplicate content: already ingested as id {by_hash[item.content_hash]!r}"))
        else:
            free.append(item)
    return free


def _land(batch: list[_Accepted], engine: sa.Engine, store: ObjectStore, report: IngestReport) -> None:
    """Insert one batch in one transaction; images are stored first (content-addressed, idempotent)."""
    with engine.begin() as conn:
        to_insert = _settle_landed(conn, batch, report)
        rows = []
        for item in to_insert:
            image_key = f"images/{item.image_sha}{item.image_suffix}"
            if not store.exists(image_key):
                store.put_bytes(image_key, item.image_bytes, "image/" + item.image_suffix.lstrip("."))
                report.images_stored += 1
            rows.append({
                "problem_id": item.record.id, "question": item.record.question,
                "correct_answer": str(item.record.correct_answer), "image_path": item.record.image_path,
                "image_key": image_key,
                "image_sha256": item.image_sha, "content_hash": item.content_hash, "source": report.source,
                "split": item.split, "extra": item.record.extra_fields(),
            })
        if rows:
            statement = pg_insert(_SEED_TABLE).values(rows).on_conflict_do_nothing().returning(_SEED_TABLE.c.problem_id)
            inserted = set(conn.execute(statement).scalars())
            report.inserted += len(inserted)
            # A concurrent ingest landed these between the check and the insert (which waited for
            # it and skipped them): settle them as if they had been there at the check.
            lost = [item for item in to_insert if item.record.id not in inserted]
            if lost and _settle_landed(conn, lost, report):
                raise RuntimeError("seed insert skipped rows that are not in the index")
