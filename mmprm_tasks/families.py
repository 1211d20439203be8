"""What differs between vision-language model families, in one table keyed by config ``model_type``.

Everything the platform needs to know about a checkpoint's family is a lookup here, never an
``if`` on a model name elsewhere:

* ``vision_modules``: the module path component(s) of the vision encoder, which PRM training
  freezes (LLaVA, Gemma 3, LLaVA-OneVision, InternVL-HF: ``vision_tower``; Qwen2/2.5-VL:
  ``visual``; Idefics3/SmolVLM, Mllama and the release's InternVL2.5: ``vision_model``);
* ``image_tokens``: how the image reaches the language model.  ``expanded``: the chat template's
  placeholder becomes as many image tokens in the text as the image has features (tiling and
  dynamic resolution change the count), so the ``<prm>`` positions depend on the image;
  ``cross_attention`` (Mllama): one ``<|image|>`` token in the text, the features enter through
  cross-attention layers;
* ``yes_token`` / ``no_token``: the vocabulary entries whose logits the PRM reads (the release
  reads ``Yes``/``No`` with ``convert_tokens_to_ids``; a SentencePiece vocabulary also has the
  word-initial ``▁Yes``, which is a different token);
* ``turn_end_tokens``: the tokens that end an assistant turn whatever the checkpoint's ``eos``
  says (``<|im_end|>``, ``<end_of_turn>``, ``<|eot_id|>``, ``<end_of_utterance>``): the policy stops there;
* ``flash_attention``: whether the family's transformers classes take ``flash_attention_2`` (the
  GPU default for training and scoring when flash-attn is installed; Gemma 3 and Mllama do not);
* ``continuous_engine``: whether :mod:`mmprm_tasks.policy.hf_engine`'s continuous-batching
  engine drives its decode exactly (a decoder with 1-D rotary positions and a standard cache
  whose forward takes ``pixel_values`` alone; multimodal rotary positions (Qwen2-VL),
  cross-attention (Mllama), image grids (LLaVA-OneVision, Idefics3) or sliding-window layers
  (Gemma 3) stay on ``model.generate``).

A checkpoint whose ``model_type`` is not here is refused with one line naming what is missing.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal


class UnknownFamilyError(ValueError):
    """A checkpoint of a model family the platform has no entry for."""


@dataclass(frozen=True)
class Family:
    model_type: str
    vision_modules: tuple[str, ...]
    image_tokens: Literal["expanded", "cross_attention"] = "expanded"
    yes_token: str = "Yes"
    no_token: str = "No"
    turn_end_tokens: tuple[str, ...] = ("<|im_end|>",)
    flash_attention: bool = True
    continuous_engine: bool = False


FAMILIES: dict[str, Family] = {f.model_type: f for f in [
    Family("llava", ("vision_tower",), continuous_engine=True),
    Family("internvl", ("vision_tower",)),
    # The original release's InternVL2.5 checkpoints (remote code, trust_remote_code=True).
    Family("internvl_chat", ("vision_model",), flash_attention=False),
    Family("qwen2_vl", ("visual",)),
    Family("qwen2_5_vl", ("visual",)),
    Family("llava_onevision", ("vision_tower",)),
    Family("idefics3", ("vision_model",), turn_end_tokens=("<end_of_utterance>",)),
    Family("smolvlm", ("vision_model",), turn_end_tokens=("<end_of_utterance>",)),
    Family("gemma3", ("vision_tower",), turn_end_tokens=("<end_of_turn>",), flash_attention=False),
    Family("mllama", ("vision_model",), image_tokens="cross_attention", turn_end_tokens=("<|eot_id|>",),
           flash_attention=False),
]}

CONTINUOUS_FAMILIES = frozenset(f.model_type for f in FAMILIES.values() if f.continuous_engine)


def family(model_type: str | None) -> Family:
    """The table entry for ``model_type``; a one-line :class:`UnknownFamilyError` when there is none."""
    found = FAMILIES.get(model_type or "")
    if found is None:
        raise UnknownFamilyError(
            f"model_type {model_type!r} has no entry in mmprm_tasks/families.py (known: {', '.join(sorted(FAMILIES))}); "
            "add one naming its vision module, image-token rule, Yes/No tokens and turn-end tokens")
    return found


def family_of(model: Any) -> Family:
    """The family of a loaded model (from its config's ``model_type``)."""
    return family(getattr(model.config, "model_type", None))


def checkpoint_model_type(model_dir: str | Path) -> str | None:
    """``model_type`` of a checkpoint's config.json (None when unreadable: the load then says why)."""
    try:
        return json.loads((Path(model_dir) / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


# ------------------------------------------------------------------------------ processors


def torchvision_available() -> bool:
    return importlib.util.find_spec("torchvision") is not None


def image_only(processor_class: type) -> type:
    """``processor_class`` without its video processor: transformers builds every video processor
    on torchvision, which a CPU-only install may lack, and the platform feeds images only.  The
    subclass keeps the family's class name, so a saved processor loads as the family's own."""
    if "video_processor" not in processor_class.get_attributes():
        return processor_class
    attributes = [a for a in processor_class.get_attributes() if a != "video_processor"]
    return type(processor_class.__name__, (processor_class,),
                {"get_attributes": classmethod(lambda cls: list(attributes)), "__module__": processor_class.__module__})


def load_processor(model_dir: str | Path, *, trust_remote_code: bool = False) -> Any:
    """The checkpoint's ``AutoProcessor``; without torchvision, its image-only variant
    (:func:`image_only`) for families whose processor also takes videos."""
    from transformers import AutoProcessor
    from transformers.models.auto.processing_auto import processor_class_from_name

    if torchvision_available():
        return AutoProcessor.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    name = _processor_class_name(Path(model_dir))
    processor_class = processor_class_from_name(name) if name else None
    if processor_class is None:
        return AutoProcessor.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    return image_only(processor_class).from_pretrained(model_dir, trust_remote_code=trust_remote_code)


def _processor_class_name(model_dir: Path) -> str | None:
    for name in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        try:
            value = json.loads((model_dir / name).read_text()).get("processor_class")
        except (OSError, ValueError, AttributeError):
            continue
        if value:
            return value
    return None


def per_text_images(images: Sequence[Sequence[Any]]) -> list[list[Any]] | None:
    """Images for a processor call, nested one list per text: every family's processor reads
    that layout, while a flat list is read by Gemma 3's and Mllama's as all the images of the
    first text.  None when there are none."""
    nested = [list(of_text) for of_text in images]
    return nested if any(nested) else None


def load_checkpoint(model_dir: str | Path, *, trust_remote_code: bool = False, **model_kwargs: Any) -> tuple[Any, Any, Family]:
    """Processor, model and family of a checkpoint folder: ``AutoProcessor`` (:func:`load_processor`)
    and ``AutoModelForImageTextToText``.  The family is checked from ``config.json`` before any
    weight is read.  ``trust_remote_code``: run the modelling code shipped inside the folder (the
    original release's InternVL2.5 checkpoints), never code from anywhere else."""
    from transformers import AutoModelForImageTextToText

    found = family(checkpoint_model_type(model_dir))
    processor = load_processor(model_dir, trust_remote_code=trust_remote_code)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, trust_remote_code=trust_remote_code, **model_kwargs)
    return processor, model, found
