"""Training-data formats for PRM paths (SPEC §6).

* :func:`to_internvl` — the original release's InternVL conversation JSONL plus the dataset
  description (``meta.json`` entry) its fine-tuning script reads.  The human turn carries no
  ``<image>`` placeholder, exactly as the release writes it (InternVL's loader prepends
  ``<image>\\n`` itself); the gpt turn's value is the label list.
* :func:`to_chat` — a generic chat format for any Hugging Face processor: one user message with
  an image part and a text part, plus the labels (one per ``<prm>``).  This is what
  :func:`mmprm_tasks.prm.train_prm` consumes after :func:`read_chat`.

Readers turn either format back into path records ``{id, question, process, labels,
image_path}`` (plus ``answer``/``mc_values`` when the chat record has them).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

USER_TEXT_TEMPLATE = "Question: {question}\nProcess: {process}"
PROCESS_MARK = "\nProcess:"
_QUESTION_MARK = "Question: "


def user_text(question: str, process: str) -> str:
    """The text the PRM reads: ``"Question: {question}\\nProcess: {process}"``."""
    return USER_TEXT_TEMPLATE.format(question=question, process=process)


def split_user_text(text: str) -> tuple[str, str]:
    """Inverse of :func:`user_text` (splits at the first ``"\\nProcess: "``)."""
    if not text.startswith(_QUESTION_MARK) or PROCESS_MARK + " " not in text:
        raise ValueError(f"not a 'Question: ...\\nProcess: ...' text: {text[:80]!r}")
    question, process = text[len(_QUESTION_MARK) :].split(PROCESS_MARK + " ", 1)
    return question, process


def _records(paths: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return list(getattr(paths, "paths", paths))


def _lines(lines: Iterable[str] | str) -> Iterable[str]:
    if isinstance(lines, str):
        lines = lines.splitlines()
    return (line for line in lines if line.strip())


def to_internvl(
    paths: Iterable[dict[str, Any]],
    *,
    name: str = "mmprm_prm",
    root: str = "",
    annotation: str = "train.jsonl",
    data_augment: bool = False,
    repeat_time: int = 1,
) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """InternVL JSONL lines (no trailing newlines) and the dataset description.

    Line ``n`` (0-based) is ``{"id": n, "image": image_path, "conversations": [{"from":
    "human", "value": "Question: {question}\\nProcess: {process}"}, {"from": "gpt", "value":
    [label, ...]}]}``.  The description is ``{name: {"root": root, "annotation": annotation,
    "data_augment": data_augment, "repeat_time": repeat_time, "length": number of lines}}``.
    """
    lines = [internvl_line(n, p) for n, p in enumerate(_records(paths))]
    return lines, internvl_description(name, root=root, annotation=annotation, data_augment=data_augment,
                                       repeat_time=repeat_time, length=len(lines))


def internvl_line(n: int, p: dict[str, Any]) -> str:
    """Line ``n`` of :func:`to_internvl` (one path; written as a stream by the format stage)."""
    record = {
        "id": n,
        "image": p["image_path"],
        "conversations": [
            {"from": "human", "value": user_text(p["question"], p["process"])},
            {"from": "gpt", "value": [float(v) for v in p["labels"]]},
        ],
    }
    return json.dumps(record, ensure_ascii=False)


def internvl_description(name: str, *, root: str, annotation: str, length: int, data_augment: bool = False,
                         repeat_time: int = 1) -> dict[str, dict[str, Any]]:
    return {name: {"root": root, "annotation": annotation, "data_augment": data_augment,
                   "repeat_time": repeat_time, "length": length}}


def read_internvl(lines: Iterable[str] | str) -> list[dict[str, Any]]:
    """Path records from InternVL JSONL lines (or the whole text)."""
    out = []
    for line in _lines(lines):
        record = json.loads(line)
        human, gpt = record["conversations"][0], record["conversations"][1]
        if human["from"] != "human" or gpt["from"] != "gpt":
            raise ValueError(f"record {record.get('id')}: expected a human then a gpt turn")
        question, process = split_user_text(human["value"])
        out.append(
            {
                "id": record["id"],
                "question": question,
                "process": process,
                "labels": [float(v) for v in gpt["value"]],
                "image_path": record["image"],
            }
        )
    return out


def chat_messages(question: str, process: str) -> list[dict[str, Any]]:
    """The user turn a PRM reads: an image part then the question/process text."""
    return [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": user_text(question, process)}],
        }
    ]


def to_chat(paths: Iterable[dict[str, Any]]) -> list[str]:
    """Generic chat JSONL lines (no trailing newlines).

    Line ``n``: ``{"id": n, "image": image_key or image_path, "messages": [user turn], "labels":
    [...], "question", "process", "answer", "mc_values"}`` (question and process are repeated in
    clear so readers never parse the text back).  ``image`` is the stored copy's key when the path
    has one (what training reads: relative to the object store, as the release's image paths are
    to their image root, so a home or a bucket can move); otherwise the path's ``image_uri`` (paths
    written before keys) or ``image_path``.
    """
    return [chat_line(n, p) for n, p in enumerate(_records(paths))]


def chat_line(n: int, p: dict[str, Any]) -> str:
    """Line ``n`` of :func:`to_chat` (one path; written as a stream by the format stage)."""
    record = {
        "id": n,
        "image": p.get("image_key") or p.get("image_uri") or p["image_path"],
        "messages": chat_messages(p["question"], p["process"]),
        "labels": [float(v) for v in p["labels"]],
        "question": p["question"],
        "process": p["process"],
        "answer": p.get("answer"),
        "mc_values": [float(v) for v in p.get("mc_values", p["labels"])],
    }
    return json.dumps(record, ensure_ascii=False)


def read_chat(lines: Iterable[str] | str) -> list[dict[str, Any]]:
    """Path records from chat JSONL lines (or the whole text)."""
    out = []
    for line in _lines(lines):
        record = json.loads(line)
        if "question" in record and "process" in record:
            question, process = record["question"], record["process"]
        else:
            texts = [
                part["text"]
                for part in record["messages"][0]["content"]
                if part.get("type") == "text"
            ]
            question, process = split_user_text("".join(texts))
        item = {
            "id": record["id"],
            "question": question,
            "process": process,
            "labels": [float(v) for v in record["labels"]],
            "image_path": record["image"],
        }
        for key in ("answer", "mc_values"):
            if record.get(key) is not None:
                item[key] = record[key]
        out.append(item)
    return out


def jsonl_text(lines: Iterable[str]) -> str:
    """Lines joined as a JSONL document (newline-terminated)."""
    return "".join(line + "\n" for line in lines)
