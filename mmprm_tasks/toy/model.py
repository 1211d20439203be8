"""A tiny LLaVA (SigLIP vision tower + Qwen2 text model) built from configs, no weights fetched.

About 1 M parameters: the whole pipeline (rollouts, search, PRM training, Best-of-N) runs on a
CPU with it. It saves and loads with ``save_pretrained`` / ``AutoModelForImageTextToText`` and
``AutoProcessor``; the processor is a ``LlavaProcessor`` with ``LlavaImageProcessorPil`` (no
torchvision needed).
"""

from __future__ import annotations

import torch
from transformers import (
    GenerationConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaImageProcessorPil,
    LlavaProcessor,
    PreTrainedTokenizerBase,
    Qwen2Config,
    SiglipVisionConfig,
)

from mmprm_tasks.toy.tokenizer import CHAT_TEMPLATE
from mmprm_tasks.toy.world import IMAGE_SIZE

PATCH_SIZE = 8
NUM_IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2


def build_processor(tokenizer: PreTrainedTokenizerBase) -> LlavaProcessor:
    image_processor = LlavaImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_center_crop=False,
        do_resize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    if tokenizer.chat_template is None:
        tokenizer.chat_template = CHAT_TEMPLATE
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="full",  # SigLIP has no CLS token
        num_additional_image_tokens=0,
        chat_template=tokenizer.chat_template,
    )


def build_tiny_vlm(
    tokenizer: PreTrainedTokenizerBase,
    *,
    vision_hidden: int = 96,
    vision_layers: int = 2,
    text_hidden: int = 128,
    text_layers: int = 4,
    seed: int | None = 0,
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A freshly initialised tiny LLaVA and its processor for ``tokenizer``."""
    if seed is not None:
        torch.manual_seed(seed)
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    vision = SiglipVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=vision_hidden * 2,
        num_hidden_layers=vision_layers,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        vision_use_head=False,
    )
    text = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=text_hidden,
        intermediate_size=text_hidden * 2,
        num_hidden_layers=text_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_id,
        image_seq_length=NUM_IMAGE_TOKENS,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
        tie_word_embeddings=True,
    )
    model = LlavaForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_new_tokens=128,
    )
    return model, build_processor(tokenizer)
