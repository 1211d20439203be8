"""Training examples of the toy models."""

from __future__ import annotations

from mmprm_tasks.toy.model import build_tiny_vlm
from mmprm_tasks.toy.tokenizer import build_tokenizer
from mmprm_tasks.toy.train_policy import _encode_process_example


def test_process_layout_example_puts_the_loss_on_the_process_only():
    tokenizer = build_tokenizer()
    _, processor = build_tiny_vlm(tokenizer)
    steps = ["The numbers are 2 and 5.", "2 * 5 = 10.", "10"]
    ids, labels = _encode_process_example(processor, "What is the product?", steps)
    assert len(ids) == len(labels)
    target = tokenizer.decode([i for i, lab in zip(ids, labels) if lab != -100])
    assert target == " The numbers are 2 and 5.\n\n2 * 5 = 10.\n\n10<|im_end|>"
    context = tokenizer.decode([i for i, lab in zip(ids, labels) if lab == -100])
    assert context.endswith("Question: What is the product?\nProcess:")
    assert "<prm>" not in tokenizer.decode(ids)
    # targets are the inputs themselves (next-token labels are shifted inside the model)
    assert all(lab == i for i, lab in zip(ids, labels) if lab != -100)
