"""The offline toy tokenizer: special-token roles and the chat template."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from mmprm_tasks.rollouts import build_prompt, format_rollout, parse_rollout
from mmprm_tasks.toy.tokenizer import build_tokenizer

STEPS = ["The numbers are 3, 5 and 7.", "3 + 5 = 8.", "8 - 7 = 1.", "1"]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_is_deterministic_and_small(tok):
    again = build_tokenizer()
    assert again.get_vocab() == tok.get_vocab()
    # ~400 BPE tokens plus the 2,000 whole-number tokens
    assert 2000 <= len(tok) <= 3000


def test_yes_and_no_are_single_non_special_tokens(tok):
    for word in ("Yes", "No"):
        ids = tok.encode(word, add_special_tokens=False)
        assert len(ids) == 1 and tok.convert_ids_to_tokens(ids) == [word]
        assert word not in tok.all_special_tokens
        assert tok.decode(ids, skip_special_tokens=True) == word
    assert tok.convert_tokens_to_ids("Yes") != tok.convert_tokens_to_ids("No")


def test_prm_and_image_are_special_tokens(tok):
    for token in ("<prm>", "<image>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        assert token in tok.all_special_tokens
        assert len(tok.encode(token, add_special_tokens=False)) == 1
    assert tok.image_token == "<image>"
    assert tok.image_token_id == tok.convert_tokens_to_ids("<image>")
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tok.pad_token_id != tok.eos_token_id
    ids = tok.encode("a<prm>b<prm>", add_special_tokens=False)
    assert ids.count(tok.convert_tokens_to_ids("<prm>")) == 2


def test_step_tags_survive_decoding_and_whole_numbers_are_one_token(tok):
    text = "<|im_start|>assistant\n" + format_rollout(STEPS) + "<|im_end|>"
    ids = tok.encode(text, add_special_tokens=False)
    for tag in ("<step>", "</step>", "<answer>", "</answer>"):
        assert tok.convert_tokens_to_ids(tag) in ids
        assert tag not in tok.all_special_tokens
    decoded = tok.decode(ids, skip_special_tokens=True)
    assert decoded == "assistant\n" + format_rollout(STEPS)
    assert parse_rollout(decoded) == STEPS
    assert tok.decode(ids) == text
    assert tok.convert_ids_to_tokens(tok.encode("128", add_special_tokens=False)) == ["128"]
    assert tok.convert_ids_to_tokens(tok.encode("8 - 17 = -9.", add_special_tokens=False)) == [
        "8", "Ġ-", " 17", "Ġ=", "Ġ-", "9", ".",
    ]
    # longest match first: four digits are a three-digit number and a digit
    assert tok.convert_ids_to_tokens(tok.encode("1234", add_special_tokens=False)) == ["123", "4"]
    assert tok.decode(tok.encode("x = 135, 7 and 99.", add_special_tokens=False)) == "x = 135, 7 and 99."


def test_chat_template_handles_parts_and_strings(tok):
    prompt = build_prompt("What is the sum?", STEPS[:1])
    parts = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]},
        {"role": "assistant", "content": format_rollout(STEPS[1:])},
    ]
    rendered = tok.apply_chat_template(parts, tokenize=False)
    assert rendered == (
        f"<|im_start|>user\n<image>{prompt}<|im_end|>\n"
        f"<|im_start|>assistant\n{format_rollout(STEPS[1:])}<|im_end|>\n"
    )
    plain = tok.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    assert plain == f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"


def test_round_trips_through_save_pretrained(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "<image>" + build_prompt("q") + format_rollout(STEPS) + "<prm>Yes"
    assert loaded.encode(text) == tok.encode(text)
    assert loaded.image_token_id == tok.image_token_id
    assert loaded.chat_template == tok.chat_template
