"""Best-of-N candidates as records: stored with every evaluation, scored by any PRM, and
exchanged with the original release's evaluation format.

**Stored record** (the project's own format; JSONL, one line per problem).  Every Best-of-N
run writes ``reports/<evaluation_id>/candidates.jsonl`` in the object store and one row per
candidate in Postgres (``bon_candidates``); ``mmprm score`` reads and writes the same lines::

    {"problem_id": "p1", "question": "...", "answer": "7",          # gold answer (may be null)
     "image_key": "images/<sha256>.png",                            # or "image": a path or URI
     "candidates": [{"index": 0,                                    # position among the N sampled
                     "steps": ["step 1", "...", "the answer part"], # the rollout (SPEC §2)
                     "final_answer": "7",                           # steps[-1], null when no steps
                     "correct": true,                               # verified against the gold
                     "step_scores": {"prm": [0.91, 0.40, 0.88],     # one score per step, per scorer
                                     "base-model likelihood": [...]}}, ...]}

``image_key`` names the image by its key in the platform's object store (what an evaluation
stores: a key, never the store's URI, so a home or a bucket can move); a file from elsewhere
names it by ``image`` instead: an object URI, an absolute path, or a path relative to the file's
folder.

Scorer names: ``prm`` is the checkpoint an evaluation ran (or the one ``mmprm score`` used,
unless ``--name`` says otherwise); ``base-model likelihood`` is the evaluation's baseline.

**Postgres** ``bon_candidates``: one row per ``(evaluation_id, problem_id, candidate_index)``
with ``steps`` (JSONB list), ``final_answer``, ``correct`` and ``step_scores`` (JSONB object as
above); re-running an evaluation upserts the same keys.

**The release's evaluation format** (``eval/prm/evaluate_*_prm.py`` of ModalMinds/MM-PRM): a
JSON array, one record per problem, ``{"question", "image_path", "solutions_splits": [[step,
...] per candidate], "labels": [1 or 0 per candidate]}``; its scoring script adds
``"prm_scores": [[P(Yes) per step] per candidate]`` and its ``extract_calculate.py`` computes the
accuracies from ``labels`` and ``prm_scores``.  ``image_path`` is relative to the evaluation's
image root.  A release record carries no id or gold answer: on import the problem id is the
record's ``id`` when present, else ``#<position>``, and the final answer is the last step (the
answer part of a rollout, as :func:`mmprm_tasks.evaluate.sample_candidates` sets it).
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from pydantic import BaseModel, Field, ValidationError, model_validator

from .seeds import Rejection, decode_image
from .settings import ConfigurationError
from .storage import ObjectNotFound, ObjectStore
from .threads import apply_torch_threads
from .validation import find_bad_value

PRM_SCORER = "prm"
BASE_LIKELIHOOD_SCORER = "base-model likelihood"


class Candidate(BaseModel):
    """One sampled solution of a problem (see the module docstring)."""

    index: int = Field(ge=0)
    steps: list[str]
    final_answer: str | None = None
    correct: bool
    step_scores: dict[str, list[float]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_score_per_step(self) -> "Candidate":
        for name, scores in self.step_scores.items():
            if len(scores) != len(self.steps):
                raise ValueError(f"step_scores[{name!r}] has {len(scores)} scores for {len(self.steps)} steps")
            if any(math.isnan(s) or not 0.0 <= s <= 1.0 for s in scores):
                raise ValueError(f"step_scores[{name!r}] holds a value outside [0, 1]")
        return self


class ProblemCandidates(BaseModel):
    """A problem and its candidates: one line of the stored JSONL."""

    problem_id: str
    question: str
    answer: str | None = None
    image: str | None = None
    image_key: str | None = None
    candidates: list[Candidate]

    @model_validator(mode="after")
    def _distinct_indices(self) -> "ProblemCandidates":
        indices = [c.index for c in self.candidates]
        if len(set(indices)) != len(indices):
            raise ValueError("candidate indices repeat")
        if (self.image is None) == (self.image_key is None):
            raise ValueError("needs exactly one of image (a path or URI) and image_key (a key of the store)")
        return self

    @property
    def image_source(self) -> str:
        """Where the image is, as written (the key or the path/URI): the cache key of loaders."""
        return self.image_key if self.image_key is not None else self.image  # type: ignore[return-value]


class CandidateFileError(ConfigurationError):
    """A candidate file that cannot be read at all (not a JSON array or JSONL, or holding both
    formats): a one-line error of the command, exit 1."""


# ------------------------------------------------------------------------------ conversions


def from_sampled(problem_id: str, question: str, answer: str | None, image_key: str,
                 sampled: Sequence[dict[str, Any]], scores: dict[str, Sequence[Sequence[float]]]) -> ProblemCandidates:
    """A record from :func:`~mmprm_tasks.evaluate.sample_candidates` output (``sampled``) and the
    step scores of each scorer (``scores[name][i]`` for candidate ``i``); the image is its key in
    the store."""
    return ProblemCandidates(
        problem_id=problem_id, question=question, answer=answer, image_key=image_key,
        candidates=[Candidate(index=i, steps=c["steps"], final_answer=c.get("final_answer"),
                              correct=c["correct"], step_scores={n: list(s[i]) for n, s in scores.items()})
                    for i, c in enumerate(sampled)])


def best_of_n_input(problems: Sequence[ProblemCandidates], scorer: str = PRM_SCORER) -> list[list[dict[str, Any]]]:
    """What :func:`~mmprm_tasks.evaluate.best_of_n` takes, with ``scorer``'s step scores (every
    candidate must have them: ValueError naming the problem otherwise)."""
    out = []
    for problem in problems:
        row = []
        for cand in sorted(problem.candidates, key=lambda c: c.index):
            if scorer not in cand.step_scores:
                raise ValueError(f"problem {problem.problem_id}: candidate {cand.index} has no "
                                 f"{scorer!r} step scores (has {sorted(cand.step_scores) or 'none'})")
            row.append({"step_scores": cand.step_scores[scorer], "correct": cand.correct,
                        "final_answer": cand.final_answer})
        out.append(row)
    return out


def to_release(problem: ProblemCandidates, image_path: str, scorer: str | None = PRM_SCORER) -> dict[str, Any]:
    """The release's evaluation record of ``problem`` (``prm_scores`` from ``scorer`` when every
    candidate has them; the problem id and gold answer ride along as extra fields, which the
    release's scripts ignore)."""
    cands = sorted(problem.candidates, key=lambda c: c.index)
    record: dict[str, Any] = {
        "id": problem.problem_id, "question": problem.question, "image_path": image_path,
        "solutions_splits": [list(c.steps) for c in cands], "labels": [int(c.correct) for c in cands],
    }
    if problem.answer is not None:
        record["answer"] = problem.answer
    if scorer and cands and all(scorer in c.step_scores for c in cands):
        record["prm_scores"] = [list(c.step_scores[scorer]) for c in cands]
    return record


def _from_release(record: dict[str, Any], position: int, scorer: str) -> ProblemCandidates:
    missing = [f for f in ("question", "image_path", "solutions_splits", "labels") if f not in record]
    if missing:
        raise _FieldError(missing[0], "missing")
    splits, labels = record["solutions_splits"], record["labels"]
    if not isinstance(splits, list) or not all(isinstance(s, list) for s in splits):
        raise _FieldError("solutions_splits", "must be a list of step lists")
    if not isinstance(labels, list) or len(labels) != len(splits):
        raise _FieldError("labels", f"must hold one 0/1 label per candidate ({len(splits)})")
    if any(label not in (0, 1) for label in labels):  # True/False compare equal to 1/0
        raise _FieldError("labels", "labels must be 0 or 1")
    scores = record.get("prm_scores")
    if scores is not None and (not isinstance(scores, list) or len(scores) != len(splits)):
        raise _FieldError("prm_scores", f"must hold one score list per candidate ({len(splits)})")
    for i, (steps, given) in enumerate(zip(splits, scores or [], strict=False)):
        if not isinstance(given, list) or len(given) != len(steps):
            raise _FieldError("prm_scores", f"candidate {i}: needs one score per step ({len(steps)})")
    cands = []
    for i, (steps, label) in enumerate(zip(splits, labels, strict=True)):
        step_scores = {scorer: scores[i]} if scores is not None else {}
        cands.append({"index": i, "steps": steps, "final_answer": steps[-1] if steps else None,
                      "correct": bool(label), "step_scores": step_scores})
    return ProblemCandidates(problem_id=str(record.get("id", f"#{position}")), question=record["question"],
                             answer=record.get("answer"), image=record["image_path"], candidates=cands)


class _FieldError(ValueError):
    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def _records(text: str, jsonl: bool | None = None) -> list[Any]:
    """The file's records: JSONL when ``jsonl`` (a ``.jsonl`` name: its first record may be an
    array), a JSON array when not, and when None a JSON array if the text starts with ``[``."""
    stripped = text.lstrip()
    if jsonl is False or (jsonl is None and stripped.startswith("[")):
        try:
            data = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise CandidateFileError(f"not a JSON array: {exc}") from exc
        except RecursionError:
            raise CandidateFileError("not a JSON array this reader can read: a record is nested too deeply") from None
        if not isinstance(data, list):
            raise CandidateFileError(f"not a JSON array: the file holds one {type(data).__name__}")
        return data
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as exc:
            out.append(CandidateFileError(f"line {number}: not JSON: {exc}"))
        except RecursionError:
            out.append(CandidateFileError(f"line {number}: JSON nested too deeply to read"))
    return out


def read_candidates(text: str, *, scorer: str = PRM_SCORER, jsonl: bool | None = None
                    ) -> tuple[str, list[ProblemCandidates], list[Rejection]]:
    """Parse a candidate file: a JSON array or JSONL of release records (``solutions_splits``)
    or of the project's records (``candidates``).  Returns the format (``"release"`` or
    ``"mmprm"``), the good records and one :class:`~mmprm_tasks.seeds.Rejection` per bad one
    (position, id and field); a release file's ``prm_scores`` become ``step_scores[scorer]``.
    ``jsonl``: see :func:`_records`."""
    kind, good, rejected = _read_records(_records(text, jsonl), scorer)
    return kind, [problem for _, problem in good], rejected


def _file_kind(records: list[Any]) -> str:
    """The file's format, from the records that show theirs (a record missing both defining
    fields is judged, and rejected, in the file's format)."""
    kinds = {kind for r in records if isinstance(r, dict)
             for kind, marker in (("release", "solutions_splits"), ("mmprm", "candidates")) if marker in r}
    if len(kinds) > 1:
        raise CandidateFileError("the file mixes release records (solutions_splits) and mmprm records (candidates)")
    return kinds.pop() if kinds else "mmprm"


def _read_records(records: list[Any], scorer: str) -> tuple[str, list[tuple[int, ProblemCandidates]], list[Rejection]]:
    """:func:`read_candidates` with each good record's position in the file."""
    kind = _file_kind(records)
    good: list[tuple[int, ProblemCandidates]] = []
    rejected: list[Rejection] = []
    seen: dict[str, int] = {}
    for position, record in enumerate(records):
        if not isinstance(record, dict):
            rejected.append(Rejection(position, None, "<record>", str(record) if isinstance(record, Exception)
                                      else f"expected a JSON object, got {type(record).__name__}"))
            continue
        rid = record.get("problem_id", record.get("id"))
        rid = rid if isinstance(rid, str) and find_bad_value(rid) is None else None
        try:
            bad = find_bad_value(record)
            if bad:
                raise _FieldError(bad.field, bad.message)
            problem = (_from_release(record, position, scorer) if kind == "release"
                       else ProblemCandidates.model_validate(record))
            if problem.problem_id in seen:
                raise _FieldError("problem_id" if kind == "mmprm" else "id",
                                  f"{problem.problem_id!r} repeats record {seen[problem.problem_id]}")
            seen[problem.problem_id] = position
            good.append((position, problem))
        except _FieldError as exc:
            rejected.append(Rejection(position, rid, exc.field, str(exc)))
        except ValidationError as exc:
            err = exc.errors()[0]
            # The image rule spans two fields: it names ``image``, the one a file usually has.
            field = ".".join(str(p) for p in err["loc"]) or ("image" if "image_key" in err["msg"] else "<record>")
            rejected.append(Rejection(position, rid, field, err["msg"]))
    return kind, good, rejected


def jsonl(problems: Iterable[ProblemCandidates]) -> bytes:
    """The stored JSONL of ``problems`` (one line each)."""
    return "".join(p.model_dump_json(exclude={"image"} if p.image is None else {"image_key"}) + "\n"
                   for p in problems).encode()


# ------------------------------------------------------------------------------ scoring


def score_problems(scorer: Any, problems: Sequence[ProblemCandidates], name: str,
                   load_image: Callable[[ProblemCandidates], bytes]) -> list[ProblemCandidates]:
    """Copies of ``problems`` with ``step_scores[name]`` for every candidate, from ``scorer``
    (e.g. :class:`mmprm_tasks.prm.PRMScorer`); ``load_image`` reads a record's image."""
    from .evaluate import score_candidates

    inputs = [{"question": p.question, "image": load_image(p)} for p in problems]
    scored = score_candidates(scorer, inputs, [[{"steps": c.steps} for c in p.candidates] for p in problems])
    out = []
    for problem, rows in zip(problems, scored, strict=True):
        cands = [c.model_copy(update={"step_scores": {**c.step_scores, name: list(r["step_scores"])}})
                 for c, r in zip(problem.candidates, rows, strict=True)]
        out.append(problem.model_copy(update={"candidates": cands}))
    return out


# ------------------------------------------------------------------------------ storage


def image_reader(settings: Any, root: Path | None = None) -> Callable[[ProblemCandidates], bytes]:
    """Reads a record's image: its ``image_key`` from the configured store, or its ``image``: an
    object URI (``s3://``, ``file://``), an absolute path, or a path relative to ``root`` (the
    release's image root; the candidate file's folder by default)."""
    from .storage import open_store, open_uri

    platform_store = functools.cache(lambda: open_store(settings))  # opened once, when a key needs it

    def load(problem: ProblemCandidates) -> bytes:
        if problem.image_key is not None:
            return platform_store().get_bytes(problem.image_key)
        image = problem.image_source
        if image.startswith(("s3://", "file://")):
            store, key = open_uri(image, settings)
            return store.get_bytes(key)
        path = Path(image)
        if not path.is_absolute() and root is not None:
            path = root / path
        return path.read_bytes()

    return load


def candidates_key(evaluation_id: str) -> str:
    return f"reports/{evaluation_id}/candidates.jsonl"


def store_candidates(engine: sa.Engine, store: ObjectStore, evaluation_id: str,
                     problems: Sequence[ProblemCandidates]) -> str:
    """Write an evaluation's candidates: the JSONL object and the ``bon_candidates`` rows (upserted
    by evaluation, problem and candidate index; candidates no longer in the evaluation are
    removed).  The ``evaluations`` row must exist.  Returns the object's URI."""
    key = candidates_key(evaluation_id)
    uri = store.put_bytes(key, jsonl(problems), "application/x-ndjson")
    rows = [{"e": evaluation_id, "p": p.problem_id, "i": c.index, "s": json.dumps(c.steps, ensure_ascii=False),
             "a": c.final_answer, "c": c.correct, "sc": json.dumps(c.step_scores)}
            for p in problems for c in p.candidates]
    with engine.begin() as conn:
        if rows:
            conn.execute(sa.text(
                "INSERT INTO bon_candidates (evaluation_id, problem_id, candidate_index, steps, final_answer,"
                " correct, step_scores) VALUES (:e, :p, :i, CAST(:s AS JSONB), :a, :c, CAST(:sc AS JSONB))"
                " ON CONFLICT (evaluation_id, problem_id, candidate_index) DO UPDATE SET steps = EXCLUDED.steps,"
                " final_answer = EXCLUDED.final_answer, correct = EXCLUDED.correct, step_scores = EXCLUDED.step_scores"),
                rows)
        conn.execute(sa.text(
            "DELETE FROM bon_candidates b WHERE b.evaluation_id = :e AND NOT EXISTS (SELECT 1 FROM"
            " jsonb_to_recordset(CAST(:keys AS JSONB)) AS k(p TEXT, i INT) WHERE k.p = b.problem_id"
            " AND k.i = b.candidate_index)"),
            {"e": evaluation_id, "keys": json.dumps([{"p": r["p"], "i": r["i"]} for r in rows])})
        conn.execute(sa.text("UPDATE evaluations SET candidates_key = :k WHERE evaluation_id = :e"),
                     {"k": key, "e": evaluation_id})
    return uri


def load_candidates(store: ObjectStore, evaluation_id: str) -> list[ProblemCandidates]:
    """An evaluation's stored candidates (LookupError when it has none)."""
    key = candidates_key(evaluation_id)
    if not store.exists(key):
        raise LookupError(f"evaluation {evaluation_id} has no stored candidates ({key}); re-run `mmprm evaluate`")
    kind, problems, rejected = read_candidates(store.get_bytes(key).decode())
    if rejected:
        raise ValueError(f"{key}: {rejected[0].describe()}")
    return problems


def export_release(problems: Sequence[ProblemCandidates], out_dir: Path, name: str,
                   load_image: Callable[[ProblemCandidates], bytes], scorer: str | None = PRM_SCORER) -> Path:
    """Write ``<out_dir>/<name>.json`` in the release's evaluation format, with each image under
    ``<out_dir>/images/`` (``image_path`` relative to ``out_dir``, the release's image root)."""
    from .storage import sha256_hex

    out_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for problem in problems:
        data = load_image(problem)
        suffix = Path(problem.image_source).suffix or ".png"
        rel = f"images/{sha256_hex(data)}{suffix}"
        target = out_dir / rel
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        records.append(to_release(problem, rel, scorer))
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(records, ensure_ascii=False, indent=1))
    return path


# ------------------------------------------------------------------------------ commands


def _read_text(source: str, settings: Any) -> str:
    """The candidate file's text; a file that is not there (or not UTF-8) is a one-line error."""
    try:
        if source.startswith(("s3://", "file://")):
            from .storage import open_uri

            store, key = open_uri(source, settings)
            return store.get_bytes(key).decode()
        return Path(source).read_text()
    except (ObjectNotFound, OSError, UnicodeDecodeError) as exc:
        reason = exc.args[0] if isinstance(exc, ObjectNotFound) and exc.args else (
            getattr(exc, "strerror", None) or str(exc))
        raise CandidateFileError(f"{source}: cannot be read: {reason}") from None


def resolve_checkpoint(settings: Any, checkpoint: str) -> str:
    """A local model directory for ``checkpoint``: a checkpoint id of the index, or a directory
    path / object URI of a PRM checkpoint."""
    from .db import get_engine
    from .policy import resolve_model_path
    from .storage import location, open_store

    if not checkpoint.startswith(("s3://", "file://")) and not Path(checkpoint).exists():
        with get_engine(settings).connect() as conn:
            row = conn.execute(sa.text("SELECT checkpoint_key, uri FROM checkpoints WHERE checkpoint_id = :c"),
                               {"c": checkpoint}).one_or_none()
        if row is None:
            raise LookupError(f"{checkpoint!r} is neither a checkpoint id in the index nor a path or URI")
        checkpoint = location(open_store(settings), row.checkpoint_key, row.uri)
    return resolve_model_path(checkpoint, settings)


def score_file(settings: Any, source: str, checkpoint: str, out: Path | None = None, *,
               name: str = PRM_SCORER, image_root: Path | None = None) -> dict[str, Any]:
    """Score every step of every candidate in ``source`` (a release evaluation file or the
    project's candidate JSONL; path or object URI) with the PRM ``checkpoint`` and write the
    file again in its own format: a release file gains ``prm_scores``, a project file
    ``step_scores[name]``.  Bad records are reported by position, id and field (and left out of
    the output); the others are scored.  Returns a summary with the Best-of-N report of the
    scored candidates."""
    from .evaluate import best_of_n
    from .prm import PRMScorer

    text = _read_text(source, settings)
    records = _records(text, jsonl=True if source.endswith((".jsonl", ".ndjson")) else None)
    kind, good, rejected = _read_records(records, name)
    local = not source.startswith(("s3://", "file://"))
    root = image_root or (Path(source).resolve().parent if local else None)
    apply_torch_threads(settings.torch_threads, "scorer")
    good, images = _with_images(good, image_reader(settings, root), rejected)
    scorer = PRMScorer(resolve_checkpoint(settings, checkpoint), batch_size=settings.eval.prm_batch_size,
                       max_length=settings.eval.max_input_tokens)
    good = _within_length(good, scorer, images, kind, rejected)
    problems = [problem for _, problem in good]
    scored = score_problems(scorer, problems, name, lambda p: images[p.image_source])
    if out is None:
        stem = Path(source.rsplit("/", 1)[-1]).stem
        out = (Path(source).parent if local else Path(".")) / f"{stem}.scored.{'json' if kind == 'release' else 'jsonl'}"
    out.parent.mkdir(parents=True, exist_ok=True)
    if kind == "release":
        # The records as given (their other fields kept), each with its prm_scores, as the
        # release's scoring script writes them.
        kept = [records[position] for position, _ in good]
        for record, problem in zip(kept, scored, strict=True):
            record["prm_scores"] = [c.step_scores[name] for c in sorted(problem.candidates, key=lambda c: c.index)]
        out.write_text(json.dumps(kept, ensure_ascii=False, indent=1))
    else:
        out.write_bytes(jsonl(scored))
    report = best_of_n(best_of_n_input(scored, name), settings.eval.ns, settings.seed,
                       headline=settings.eval.headline_aggregator) if scored else None
    rejected.sort(key=lambda r: r.record_index)
    return {"format": kind, "out": str(out), "problems": len(scored),
            "candidates": sum(len(p.candidates) for p in scored),
            "steps_scored": sum(len(c.steps) for p in scored for c in p.candidates),
            "rejected": [r.describe() for r in rejected], "report": report}


def _with_images(good: list[tuple[int, ProblemCandidates]], load_image: Callable[[ProblemCandidates], bytes],
                 rejected: list[Rejection]) -> tuple[list[tuple[int, ProblemCandidates]], dict[str, bytes]]:
    """The records whose image can be read, and their images by ``image``; a record whose image is
    missing or unreadable is rejected (field ``image``), the others are still scored.  An outage of
    the store is not a record's fault and is raised."""
    kept, images = [], {}
    for position, problem in good:
        try:
            if problem.image_source not in images:
                data = load_image(problem)
                decode_image(data)  # RecordRejected (a ValueError) when it is not an image
                images[problem.image_source] = data
            kept.append((position, problem))
        except (OSError, ObjectNotFound, ValueError) as exc:
            reason = exc.args[0] if isinstance(exc, ObjectNotFound) and exc.args else exc
            rejected.append(Rejection(position, problem.problem_id, "image", f"cannot be read: {reason}"))
    return kept, images


def _within_length(good: list[tuple[int, ProblemCandidates]], scorer: Any, images: dict[str, bytes], kind: str,
                   rejected: list[Rejection]) -> list[tuple[int, ProblemCandidates]]:
    """The records whose every candidate fits the scorer's input limit; a record with a longer
    candidate is rejected naming it (its tokens are counted, never run through the model)."""
    limit = scorer.max_input_tokens
    kept = []
    for position, problem in good:
        too_long = None
        for cand in sorted(problem.candidates, key=lambda c: c.index) if limit else []:
            tokens = scorer.input_length(problem.question, images[problem.image_source], cand.steps) if cand.steps else 0
            if tokens > limit:
                too_long = (cand.index, tokens)
                break
        if too_long is None:
            kept.append((position, problem))
            continue
        index, tokens = too_long
        field = f"solutions_splits[{index}]" if kind == "release" else f"candidates[{index}].steps"
        rejected.append(Rejection(position, problem.problem_id, field,
                                  f"{tokens:,} tokens, over the PRM's input limit of {limit:,} (setting "
                                  "eval.max_input_tokens, and the model's positions)"))
    return kept


def export_evaluation(settings: Any, evaluation_id: str | None, out_dir: Path, *,
                      scorer: str = PRM_SCORER) -> Path:
    """Write an evaluation's candidates (the latest evaluation's by default) in the release's
    evaluation format: ``<out_dir>/<evaluation_id>.json`` plus ``images/``, ``prm_scores`` from
    ``scorer``; the release's ``extract_calculate.py`` runs on it as is."""
    from .db import get_engine
    from .storage import open_store

    if evaluation_id is None:
        with get_engine(settings).connect() as conn:
            evaluation_id = conn.execute(sa.text(
                "SELECT evaluation_id FROM evaluations WHERE candidates_key IS NOT NULL"
                " ORDER BY created_at DESC LIMIT 1")).scalar_one_or_none()
        if evaluation_id is None:
            raise LookupError("no evaluation with stored candidates in the index: run `mmprm evaluate` first")
    problems = load_candidates(open_store(settings), evaluation_id)
    return export_release(problems, out_dir, evaluation_id, image_reader(settings), scorer)
