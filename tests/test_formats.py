"""Training formats (SPEC §6): exact strings and round trips."""

from __future__ import annotations

import json

import pytest

from mmprm_tasks.formats import (
    jsonl_text,
    read_chat,
    read_internvl,
    split_user_text,
    to_chat,
    to_internvl,
    user_text,
)

PATHS = [
    {
        "question": "What is 3 + 4?",
        "answer": "7",
        "image_path": "images/a.png",
        "process": "Add 3 and 4.<prm>\n\nThe answer is 7.<prm>",
        "labels": [0.5, 1.0],
        "mc_values": [0.5, 1.0],
    },
    {
        "question": "Größe: 2 × 5?",
        "answer": "10",
        "image_path": "s3://bucket/images/b.png",
        "process": "2 × 5 = 12.<prm>",
        "labels": [0.0],
    },
]


def test_internvl_exact_lines_and_description():
    lines, description = to_internvl(PATHS, name="k12_prm", root="/data/images", annotation="prm.jsonl")
    assert lines[0] == (
        '{"id": 0, "image": "images/a.png", "conversations": [{"from": "human", "value": '
        '"Question: What is 3 + 4?\\nProcess: Add 3 and 4.<prm>\\n\\nThe answer is 7.<prm>"}, '
        '{"from": "gpt", "value": [0.5, 1.0]}]}'
    )
    assert lines[1] == (
        '{"id": 1, "image": "s3://bucket/images/b.png", "conversations": [{"from": "human", '
        '"value": "Question: Größe: 2 × 5?\\nProcess: 2 × 5 = 12.<prm>"}, {"from": "gpt", '
        '"value": [0.0]}]}'
    )
    assert description == {
        "k12_prm": {
            "root": "/data/images",
            "annotation": "prm.jsonl",
            "data_augment": False,
            "repeat_time": 1,
            "length": 2,
        }
    }


def test_internvl_round_trip():
    lines, _ = to_internvl(PATHS)
    back = read_internvl(jsonl_text(lines))
    assert [b["id"] for b in back] == [0, 1]
    for original, read in zip(PATHS, back, strict=True):
        for key in ("question", "process", "labels", "image_path"):
            assert read[key] == original[key]


def test_chat_exact_record_and_round_trip():
    lines = to_chat(PATHS)
    record = json.loads(lines[0])
    assert record["messages"] == [
        {
            "role": "user",
            "content": [
                {"type": "image"},
                {"type": "text", "text": "Question: What is 3 + 4?\nProcess: Add 3 and 4.<prm>\n\nThe answer is 7.<prm>"},
            ],
        }
    ]
    assert record["labels"] == [0.5, 1.0] and record["image"] == "images/a.png"
    assert json.loads(lines[1])["mc_values"] == [0.0]  # defaults to the labels
    back = read_chat(lines)
    for original, read in zip(PATHS, back, strict=True):
        for key in ("question", "process", "labels", "image_path", "answer"):
            assert read[key] == original[key]
    # a record without the clear-text copies is parsed from its message text
    bare = {k: v for k, v in record.items() if k not in ("question", "process")}
    assert read_chat([json.dumps(bare)])[0]["process"] == PATHS[0]["process"]


def test_user_text_split():
    text = user_text("q\nwith a newline", "p<prm>")
    assert text == "Question: q\nwith a newline\nProcess: p<prm>"
    assert split_user_text(text) == ("q\nwith a newline", "p<prm>")
    with pytest.raises(ValueError):
        split_user_text("no markers here")


def test_pathset_accepted():
    from mmprm_tasks.traverse import PathSet

    lines, description = to_internvl(PathSet(paths=[PATHS[0]], counts={}))
    assert len(lines) == 1 and description["mmprm_prm"]["length"] == 1
    assert jsonl_text(lines).endswith("\n")
