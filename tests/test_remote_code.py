"""A checkpoint whose modelling code ships inside its folder (``auto_map`` in config.json), as the
original release's InternVL2.5 checkpoints do: loaded only with ``trust_remote_code``, then trained
as a PRM, scored and used as the policy through the platform's unchanged paths.  The test writes
the tiny model's own ``configuration_*.py`` / ``modeling_*.py``, imports them from that folder and
saves it with ``save_pretrained`` (which copies the code beside the weights, as a release does)."""

from __future__ import annotations

import importlib
import io
import math
import sys
from pathlib import Path

import pytest
import torch

from helpers import policy_requests

from mmprm_tasks.policy.hf import TransformersPolicy
from mmprm_tasks.prm import PRMScorer, PRMTrainingConfig, train_prm
from mmprm_tasks.settings import PolicyConfig, SamplingConfig
from mmprm_tasks.traverse import render_process

CONFIGURATION = '''
from transformers import PretrainedConfig


class TinyChatConfig(PretrainedConfig):
    """InternVL2.5's layout in miniature: vision_model -> mlp1 -> language_model."""

    model_type = "internvl_chat"

    def __init__(self, vocab_size=32, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                 num_key_value_heads=2, image_token_id=0, patch_size=8, vision_hidden=32, pad_token_id=None,
                 eos_token_id=None, **kwargs):
        self.vocab_size, self.hidden_size, self.image_token_id = vocab_size, hidden_size, image_token_id
        self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
        self.num_key_value_heads, self.patch_size, self.vision_hidden = num_key_value_heads, patch_size, vision_hidden
        super().__init__(pad_token_id=pad_token_id, eos_token_id=eos_token_id, **kwargs)
'''

MODELING = '''
import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel, Qwen2Config, Qwen2ForCausalLM

from .configuration_tiny_chat import TinyChatConfig


class TinyChatModel(PreTrainedModel, GenerationMixin):
    config_class = TinyChatConfig
    base_model_prefix = ""
    _supports_sdpa = True

    def __init__(self, config):
        super().__init__(config)
        self.vision_model = nn.Conv2d(3, config.vision_hidden, config.patch_size, config.patch_size)
        self.mlp1 = nn.Linear(config.vision_hidden, config.hidden_size)
        self.language_model = Qwen2ForCausalLM(Qwen2Config(
            vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=2 * config.hidden_size,
            num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
            num_key_value_heads=config.num_key_value_heads, max_position_embeddings=1024,
            pad_token_id=config.pad_token_id, eos_token_id=config.eos_token_id))
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value):
        self.language_model.set_output_embeddings(value)

    def forward(self, input_ids=None, pixel_values=None, attention_mask=None, inputs_embeds=None, **kwargs):
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
            image = input_ids == self.config.image_token_id
            if pixel_values is not None and bool(image.any()):
                patches = self.vision_model(pixel_values.to(self.vision_model.weight.dtype))
                features = self.mlp1(patches.flatten(2).transpose(1, 2)).reshape(-1, inputs_embeds.shape[-1])
                inputs_embeds = inputs_embeds.masked_scatter(image[..., None], features.to(inputs_embeds.dtype))
        return self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)
'''


@pytest.fixture(scope="module")
def remote_code_dir(tmp_path_factory) -> Path:
    from mmprm_tasks.toy.model import PATCH_SIZE, build_processor
    from mmprm_tasks.toy.tokenizer import build_tokenizer

    code = tmp_path_factory.mktemp("remote_code_src") / "tiny_chat"
    code.mkdir()
    (code / "__init__.py").write_text("")
    (code / "configuration_tiny_chat.py").write_text(CONFIGURATION)
    (code / "modeling_tiny_chat.py").write_text(MODELING)
    sys.path.insert(0, str(code.parent))
    try:
        modeling = importlib.import_module("tiny_chat.modeling_tiny_chat")
    finally:
        sys.path.remove(str(code.parent))
    # What a release does before save_pretrained: the classes register for the Auto classes, so
    # the checkpoint's config.json names them in auto_map and the code files are copied beside it.
    modeling.TinyChatConfig.register_for_auto_class()
    modeling.TinyChatModel.register_for_auto_class("AutoModelForImageTextToText")
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    config = modeling.TinyChatConfig(vocab_size=len(tokenizer), image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                                     patch_size=PATCH_SIZE, pad_token_id=tokenizer.pad_token_id,
                                     eos_token_id=tokenizer.eos_token_id)
    out = tmp_path_factory.mktemp("remote_code_checkpoint")
    modeling.TinyChatModel(config).save_pretrained(out)
    build_processor(tokenizer).save_pretrained(out)
    assert (out / "modeling_tiny_chat.py").is_file() and "auto_map" in (out / "config.json").read_text()
    return out


def png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (20, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


RECORDS = [{"id": 0, "question": "What is 3 + 4?", "process": render_process([["3 + 4 = 7."], ["The answer is 7."]]),
            "labels": [1.0, 0.5], "image": png()}]


def test_remote_code_needs_trust_remote_code(remote_code_dir, tmp_path):
    cfg = PRMTrainingConfig(max_steps=1, per_device_train_batch_size=1)
    with pytest.raises(ValueError, match="trust_remote_code"):
        train_prm(remote_code_dir, RECORDS, tmp_path / "prm", cfg, seed=0)


def test_remote_code_checkpoint_trains_scores_and_generates(remote_code_dir, tmp_path):
    cfg = PRMTrainingConfig(max_steps=1, per_device_train_batch_size=1, learning_rate=1e-3, warmup_ratio=0.0,
                            bf16=False, trust_remote_code=True)
    metrics = train_prm(remote_code_dir, RECORDS, tmp_path / "prm", cfg, seed=0)
    assert metrics["global_step"] == 1 and math.isfinite(metrics["first_loss"])
    # internvl_chat's vision encoder is `vision_model` (the families table): frozen, mlp1 trained.
    assert metrics["frozen_params"] == sum(p.numel() for p in torch.nn.Conv2d(3, 32, 8, 8).parameters())
    assert (tmp_path / "prm" / "modeling_tiny_chat.py").is_file()

    # The PRM records that it needs remote code; scoring loads it so without being told.
    scores = PRMScorer(tmp_path / "prm").score("What is 3 + 4?", png(), [["3 + 4 = 7.", "The answer is 7."]])
    assert len(scores[0]) == 2 and all(0 < p < 1 for p in scores[0])

    policy = TransformersPolicy(remote_code_dir, policy=PolicyConfig(model=str(remote_code_dir), engine="generate",
                                                                     trust_remote_code=True),
                                sampling=SamplingConfig(max_new_tokens=4))
    requests = policy_requests([png()] * 3)
    assert [len(r) for r in policy.generate(requests, seed=1)] == [r.n for r in requests]
    policy.close()
