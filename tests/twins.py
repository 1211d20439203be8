"""Tiny random-weight twins of the vision-language families users bring (issue 24).

Each twin is built from its family's own config, model, processor, image-processor (the PIL
variants: no torchvision) and tokenizer classes, with sizes cut to the bone (hidden <= 64, 1-2
layers, a small vision tower) and a tokenizer trained offline here (byte-level BPE, or
SentencePiece-style ``▁`` pieces for Gemma) that carries the family's special tokens and a chat
template laid out as the family's own.  Nothing is downloaded.  :func:`build_twin` saves one with
``save_pretrained`` so the platform loads it exactly as a user's checkpoint folder.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import transformers as tf
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from mmprm_tasks.families import image_only

HIDDEN = 64
VISION_HIDDEN = 32
HEADS = 4

# Words the tiny BPE learns; "Yes" and "No" are whole tokens in every real family's vocabulary.
_CORPUS = [
    "Your task is to answer the question below. Give complete reasoning steps before you answer, "
    "and when you are ready to answer, use Answer: The final answer is ..",
    "Question: What is the sum of the numbers? Process: The numbers are 5, 1 and 2. 5 + 1 = 6.",
    "Previous Steps: Read 9. 9 is odd. The answer is 7. What is the product? What is it?",
    "Yes No Yes No user assistant system model image picture",
]


# ------------------------------------------------------------------------------- tokenizers


def _bpe(special: list[str], *, sentencepiece: bool) -> tuple[dict[str, int], list[str]]:
    """A vocabulary and merges trained on :data:`_CORPUS`; ``special`` tokens first."""
    tok = Tokenizer(models.BPE())
    if sentencepiece:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
        alphabet = sorted({c for text in _CORPUS for c in text.replace(" ", "▁")} | {"\n"})
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=special, initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    data = tok.to_str()
    import json

    model = json.loads(data)["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    vocab = dict(model["vocab"])
    for word in ("Yes", "No", "▁Yes", "▁No") if sentencepiece else ("Yes", "No", "ĠYes", "ĠNo"):
        assert word in vocab, f"the tiny corpus must make {word!r} a token"
    return vocab, merges


def _special(tokenizer: Any, tokens: list[str]) -> Any:
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in tokens], special_tokens=True)
    return tokenizer


# ChatML with the image placeholder the family's processor expands; message content is a string or
# a list of {"type": "image"} / {"type": "text"} parts.
def _chatml(image: str, system: str | None = None) -> str:
    head = ("{%- if messages[0]['role'] != 'system' -%}{{- '<|im_start|>system\n" + system + "<|im_end|>\n' -}}"
            "{%- endif -%}") if system else ""
    return head + _turns("'<|im_start|>' + message['role'] + '\n'", image, "'<|im_end|>\n'",
                         "'<|im_start|>assistant\n'")


def _turns(start: str, image: str, end: str, generation: str, role_map: str = "") -> str:
    return (
        "{%- for message in messages -%}" + role_map +
        "{{- " + start + " -}}"
        "{%- if message['content'] is string -%}{{- message['content'] -}}{%- else -%}"
        "{%- for part in message['content'] -%}"
        "{%- if part['type'] == 'image' -%}{{- '" + image + "' -}}"
        "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
        "{%- endfor -%}{%- endif -%}"
        "{{- " + end + " -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- " + generation + " -}}{%- endif -%}"
    )


CHATML = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def qwen2_tokenizer(extra: list[str], template: str, named: dict[str, str] | None = None) -> Any:
    """A Qwen2 tokenizer with ChatML, ``extra`` special tokens and ``named`` ones (attributes the
    family's processor reads, e.g. InternVL's ``context_image_token``)."""
    vocab, merges = _bpe(CHATML + extra, sentencepiece=False)
    tokenizer = tf.Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>", extra_special_tokens=named or {})
    _special(tokenizer, CHATML + extra)
    tokenizer.chat_template = template
    return tokenizer


# ---------------------------------------------------------------------------------- twins


@dataclass(frozen=True)
class Twin:
    """One family's tiny twin: ``build(out_dir)`` saves model and processor there."""

    name: str  # the family's config model_type
    build: Callable[[Path], None]
    # Why this install cannot build or run the family's processor (None: it can); its tests skip
    # with this reason shown.
    missing: Callable[[], str | None] = lambda: None


def _save(model: Any, processor: Any, out: Path, eos_ids: list[int], pad_id: int) -> None:
    model.generation_config = tf.GenerationConfig(eos_token_id=eos_ids, pad_token_id=pad_id, max_new_tokens=16)
    model.save_pretrained(out)
    processor.save_pretrained(out)


def _qwen2_text(tokenizer: Any, **extra: Any) -> dict[str, Any]:
    return dict(vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=2,
                num_attention_heads=HEADS, num_key_value_heads=2, max_position_embeddings=1024,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None, **extra)


def _siglip(image_size: int, patch: int) -> tf.SiglipVisionConfig:
    return tf.SiglipVisionConfig(hidden_size=VISION_HIDDEN, intermediate_size=2 * VISION_HIDDEN, num_hidden_layers=1,
                                 num_attention_heads=HEADS, image_size=image_size, patch_size=patch,
                                 vision_use_head=False)


def build_llava(out: Path) -> None:
    """The shipped family: the toy builders, as ``mmprm toy`` makes its models."""
    from mmprm_tasks.toy.model import build_tiny_vlm
    from mmprm_tasks.toy.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    model, processor = build_tiny_vlm(tokenizer, vision_hidden=VISION_HIDDEN, vision_layers=1, text_hidden=HIDDEN,
                                      text_layers=2, seed=0)
    _save(model, processor, out, [tokenizer.eos_token_id], tokenizer.pad_token_id)


def build_internvl(out: Path) -> None:
    """HF-native InternVL (the ``-hf`` checkpoints): InternViT + pixel shuffle + Qwen2."""
    tokenizer = qwen2_tokenizer(["<img>", "</img>", "<IMG_CONTEXT>", "<video>"],
                                _chatml("<IMG_CONTEXT>\n", system="You are a helpful assistant."),
                                {"start_image_token": "<img>", "end_image_token": "</img>",
                                 "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"})
    image_processor = tf.GotOcr2ImageProcessorPil(size={"height": 56, "width": 56}, crop_to_patches=False)
    processor = image_only(tf.InternVLProcessor)(image_processor=image_processor, tokenizer=tokenizer,
                                                 image_seq_length=4, chat_template=tokenizer.chat_template)
    torch.manual_seed(0)
    vision = tf.InternVLVisionConfig(hidden_size=VISION_HIDDEN, intermediate_size=2 * VISION_HIDDEN,
                                     num_hidden_layers=1, num_attention_heads=HEADS, image_size=[56, 56],
                                     patch_size=[14, 14])
    config = tf.InternVLConfig(vision_config=vision, text_config=tf.Qwen2Config(**_qwen2_text(tokenizer)),
                               image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"), image_seq_length=4,
                               downsample_ratio=0.5)
    _save(tf.InternVLForConditionalGeneration(config), processor, out, [tokenizer.eos_token_id], tokenizer.pad_token_id)


_QWEN_VL_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]


def _build_qwen_vl(out: Path, config_class: type, model_class: type, processor_class: type,
                   vision: dict[str, Any]) -> None:
    tokenizer = qwen2_tokenizer(_QWEN_VL_TOKENS, _chatml("<|vision_start|><|image_pad|><|vision_end|>",
                                                         system="You are a helpful assistant."))
    # Dynamic resolution: 56x56 pixels = 4x4 patches of 14, merged 2x2 into 4 image tokens.
    image_processor = tf.Qwen2VLImageProcessorPil(size={"shortest_edge": 56 * 56, "longest_edge": 56 * 56},
                                                  patch_size=14, merge_size=2, temporal_patch_size=2)
    processor = image_only(processor_class)(image_processor=image_processor, tokenizer=tokenizer,
                                            chat_template=tokenizer.chat_template)
    torch.manual_seed(0)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in _QWEN_VL_TOKENS}
    # Multimodal rotary sections (temporal, height, width) split the head's 8 frequency pairs.
    text = _qwen2_text(tokenizer, rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3],
                                                   "rope_theta": 10000.0})
    config = config_class(text_config=text, vision_config=dict(depth=1, num_heads=HEADS, patch_size=14,
                                                               spatial_merge_size=2, temporal_patch_size=2, **vision),
                          image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                          vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    _save(model_class(config), processor, out, [tokenizer.eos_token_id], tokenizer.pad_token_id)


def build_qwen2_vl(out: Path) -> None:
    _build_qwen_vl(out, tf.Qwen2VLConfig, tf.Qwen2VLForConditionalGeneration, tf.Qwen2VLProcessor,
                   dict(embed_dim=VISION_HIDDEN, hidden_size=HIDDEN, mlp_ratio=2))


def build_qwen2_5_vl(out: Path) -> None:
    # Window attention over 56-pixel windows, the one block also a full-attention block.
    _build_qwen_vl(out, tf.Qwen2_5_VLConfig, tf.Qwen2_5_VLForConditionalGeneration, tf.Qwen2_5_VLProcessor,
                   dict(hidden_size=VISION_HIDDEN, intermediate_size=2 * VISION_HIDDEN, out_hidden_size=HIDDEN,
                        window_size=56, fullatt_block_indexes=[0]))


def build_llava_onevision(out: Path) -> None:
    """LLaVA-OneVision: SigLIP + Qwen2 with anyres tiling (a base tile plus the grid the image's
    aspect ratio picks, newline tokens between rows)."""
    tokenizer = qwen2_tokenizer(["<image>", "<video>"], _chatml("<image>\n"))
    pinpoints = [[28, 28], [28, 56], [56, 28], [56, 56]]
    image_processor = tf.LlavaOnevisionImageProcessorPil(size={"height": 28, "width": 28},
                                                         image_grid_pinpoints=pinpoints)
    processor = image_only(tf.LlavaOnevisionProcessor)(
        image_processor=image_processor, tokenizer=tokenizer, num_image_tokens=4,
        vision_feature_select_strategy="full", chat_template=tokenizer.chat_template)
    torch.manual_seed(0)
    config = tf.LlavaOnevisionConfig(vision_config=_siglip(28, 14), text_config=tf.Qwen2Config(**_qwen2_text(tokenizer)),
                                     image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                                     video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
                                     image_grid_pinpoints=pinpoints, vision_feature_select_strategy="full",
                                     vision_feature_layer=-1, vision_aspect_ratio="anyres_max_9")
    _save(tf.LlavaOnevisionForConditionalGeneration(config), processor, out, [tokenizer.eos_token_id],
          tokenizer.pad_token_id)


_IDEFICS3_TOKENS = ["<|endoftext|>", "<|begin_of_text|>", "<|im_start|>", "<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"] + [
    f"<row_{r}_col_{c}>" for r in range(1, 4) for c in range(1, 4)]


def _build_idefics3(out: Path, processor: Callable[..., Any], config_class: type, vision_class: type,
                    model_class: type, turn_start: str) -> None:
    vocab, merges = _bpe(_IDEFICS3_TOKENS, sentencepiece=False)
    tokenizer = _special(tf.GPT2Tokenizer(vocab=vocab, merges=merges, eos_token="<end_of_utterance>",
                                          pad_token="<|endoftext|>"), _IDEFICS3_TOKENS)
    tokenizer.chat_template = _turns(turn_start + "message['role'] | capitalize + ':'", "<image>",
                                     "'<end_of_utterance>\\n'", "'Assistant:'")
    # 112-pixel images split into 56-pixel tiles (2x2) plus the whole image, 4 tokens each.
    image_processor = tf.Idefics3ImageProcessorPil(size={"longest_edge": 112}, max_image_size={"longest_edge": 56})
    processor = processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=4,
                          chat_template=tokenizer.chat_template)
    torch.manual_seed(0)
    text = tf.LlamaConfig(vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=2 * HIDDEN,
                          num_hidden_layers=2, num_attention_heads=HEADS, num_key_value_heads=2,
                          max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id)
    vision = vision_class(hidden_size=VISION_HIDDEN, intermediate_size=2 * VISION_HIDDEN, num_hidden_layers=1,
                          num_attention_heads=HEADS, image_size=56, patch_size=14)
    config = config_class(vision_config=vision, text_config=text, scale_factor=2,
                          image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    _save(model_class(config), processor, out, [tokenizer.eos_token_id], tokenizer.pad_token_id)


def build_idefics3(out: Path) -> None:
    """Idefics3: SigLIP-style encoder on image tiles + pixel shuffle + Llama."""
    _build_idefics3(out, tf.Idefics3Processor, tf.Idefics3Config, tf.Idefics3VisionConfig,
                    tf.Idefics3ForConditionalGeneration, "('<|begin_of_text|>' if loop.first else '') + ")


def _smolvlm_missing() -> str | None:
    import importlib.util

    lacking = [m for m in ("num2words", "torchvision") if importlib.util.find_spec(m) is None]
    if not lacking:
        return None
    return (f"SmolVLMProcessor needs {' and '.join(lacking)} (not installed): it spells numbers with num2words and "
            "its apply_chat_template reads video_processor.num_frames, and every transformers video processor is "
            "built on torchvision; Idefics3, the same architecture, is covered")


def build_smolvlm(out: Path) -> None:
    """SmolVLM: Idefics3's architecture with its own classes and a ChatML-style start."""
    _build_idefics3(out, partial(image_only(tf.SmolVLMProcessor), video_processor=None), tf.SmolVLMConfig,
                    tf.SmolVLMVisionConfig, tf.SmolVLMForConditionalGeneration, "('<|im_start|>' if loop.first else '') + ")


_GEMMA_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>",
                 "<start_of_image>", "<end_of_image>", "<image_soft_token>"]


def build_gemma3(out: Path) -> None:
    """Gemma 3: SigLIP + average-pooled image tokens + Gemma 3 text (sliding-window layers), with a
    SentencePiece-style vocabulary (``▁Yes`` and ``Yes`` are different tokens)."""
    vocab, merges = _bpe(_GEMMA_TOKENS, sentencepiece=True)
    tokenizer = tf.GemmaTokenizer(vocab=vocab, merges=merges, extra_special_tokens={
        "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"})
    _special(tokenizer, _GEMMA_TOKENS)
    tokenizer.chat_template = "{{- bos_token -}}" + _turns(
        "'<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\n'",
        "<start_of_image>", "'<end_of_turn>\n'", "'<start_of_turn>model\n'")
    image_processor = tf.Gemma3ImageProcessorPil(size={"height": 56, "width": 56})
    processor = tf.Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_length=4,
                                   chat_template=tokenizer.chat_template)
    torch.manual_seed(0)
    text = tf.Gemma3TextConfig(vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=2 * HIDDEN,
                               num_hidden_layers=2, num_attention_heads=HEADS, num_key_value_heads=2, head_dim=16,
                               sliding_window=32, max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id,
                               eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in _GEMMA_TOKENS}
    config = tf.Gemma3Config(text_config=text, vision_config=_siglip(56, 14), mm_tokens_per_image=4,
                             boi_token_index=ids["<start_of_image>"], eoi_token_index=ids["<end_of_image>"],
                             image_token_index=ids["<image_soft_token>"])
    _save(tf.Gemma3ForConditionalGeneration(config), processor, out,
          [tokenizer.eos_token_id, ids["<end_of_turn>"]], tokenizer.pad_token_id)


_LLAMA3_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                  "<|image|>", "<|finetune_right_pad_id|>", "<|python_tag|>"]


def build_mllama(out: Path) -> None:
    """Mllama (Llama 3.2 Vision): tiled vision encoder whose features enter the text model through
    cross-attention layers; the text holds one ``<|image|>`` token per image."""
    vocab, merges = _bpe(_LLAMA3_TOKENS, sentencepiece=False)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = tf.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin_of_text|>",
                                           eos_token="<|eot_id|>", pad_token="<|finetune_right_pad_id|>")
    _special(tokenizer, _LLAMA3_TOKENS)
    tokenizer.chat_template = "{{- bos_token -}}" + _turns(
        "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'", "<|image|>", "'<|eot_id|>'",
        "'<|start_header_id|>assistant<|end_header_id|>\n\n'")
    image_processor = tf.MllamaImageProcessorPil(size={"height": 28, "width": 28}, max_image_tiles=2)
    processor = tf.MllamaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                   chat_template=tokenizer.chat_template)
    torch.manual_seed(0)
    vision = tf.MllamaVisionConfig(hidden_size=VISION_HIDDEN, intermediate_size=2 * VISION_HIDDEN,
                                   num_hidden_layers=1, num_global_layers=1, attention_heads=HEADS, image_size=28,
                                   patch_size=14, max_num_tiles=2, intermediate_layers_indices=[0],
                                   vision_output_dim=2 * VISION_HIDDEN,
                                   supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]])
    text = tf.MllamaTextConfig(vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=2 * HIDDEN,
                               num_hidden_layers=2, num_attention_heads=HEADS, num_key_value_heads=2,
                               cross_attention_layers=[1], max_position_embeddings=1024,
                               pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                               bos_token_id=tokenizer.bos_token_id)
    config = tf.MllamaConfig(vision_config=vision, text_config=text,
                             image_token_index=tokenizer.convert_tokens_to_ids("<|image|>"))
    _save(tf.MllamaForConditionalGeneration(config), processor, out, [tokenizer.eos_token_id], tokenizer.pad_token_id)


TWINS: dict[str, Twin] = {t.name: t for t in [
    Twin("llava", build_llava),
    Twin("internvl", build_internvl),
    Twin("qwen2_vl", build_qwen2_vl),
    Twin("qwen2_5_vl", build_qwen2_5_vl),
    Twin("llava_onevision", build_llava_onevision),
    Twin("idefics3", build_idefics3),
    Twin("smolvlm", build_smolvlm, missing=_smolvlm_missing),
    Twin("gemma3", build_gemma3),
    Twin("mllama", build_mllama),
]}


def build_twin(name: str, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    TWINS[name].build(out)
    return out
