"""The tiny LLaVA: size, processor behaviour, save/load through the Auto classes."""

from __future__ import annotations

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration

from mmprm_tasks.rollouts import build_prompt
from mmprm_tasks.toy.model import NUM_IMAGE_TOKENS, build_tiny_vlm
from mmprm_tasks.toy.tokenizer import build_tokenizer
from mmprm_tasks.toy.world import render_image


def _inputs(processor):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": build_prompt("q")}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return processor(text=[text], images=[render_image((3, 5, 7))], return_tensors="pt")


def test_build_save_and_load_round_trip(tmp_path):
    model, processor = build_tiny_vlm(build_tokenizer())
    assert isinstance(model, LlavaForConditionalGeneration)
    n_params = sum(p.numel() for p in model.parameters())
    assert 500_000 < n_params < 2_000_000

    enc = _inputs(processor)
    image_id = processor.tokenizer.image_token_id
    assert processor.image_token_id == image_id == model.config.image_token_id
    assert int((enc["input_ids"] == image_id).sum()) == NUM_IMAGE_TOKENS
    assert tuple(enc["pixel_values"].shape) == (1, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        logits = model(**enc).logits
    assert logits.shape[-1] == len(processor.tokenizer)

    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    loaded_proc = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded_proc.image_processor).__name__ == "LlavaImageProcessorPil"
    enc2 = _inputs(loaded_proc)
    assert torch.equal(enc2["input_ids"], enc["input_ids"])
    assert torch.equal(enc2["pixel_values"], enc["pixel_values"])
    with torch.no_grad():
        assert torch.equal(loaded(**enc2).logits, logits)
    assert loaded.generation_config.eos_token_id == processor.tokenizer.eos_token_id
