"""The process reward model: loss, batching, training and step scoring (SPEC §6).

The PRM is the vision-language model itself with ``<prm>`` added as a special token.  A path's
text ``"Question: {question}\\nProcess: {process}"`` (one ``<prm>`` after each step group) is the
user turn, after the image.  At every ``<prm>`` position the logits of the two tokens ``Yes`` and
``No`` are read (no shift: the logits *at* the separator, as the original release does) and

    loss = mean over all <prm> positions of the batch of  CE(softmax([yes, no]), [mc, 1 - mc])

(hard-label variant: target ``[1, 0]`` if ``mc > 0`` else ``[0, 1]``).  Other positions carry no
loss.  At inference the step score is ``softmax([yes, no])[0]``, P(Yes).

Differences from the original release (InternVL fine-tuning script), deliberate:

* the text is the *user* turn after the image (the release puts it, oddly, in an assistant turn
  after an empty user turn); training and :class:`PRMScorer` use the same layout, built by
  :func:`mmprm_tasks.traverse.render_process` (the release scores with ``"<prm>".join(steps)``,
  without the blank lines it trains with);
* the number of ``<prm>`` tokens is checked against the number of labels (the release would
  crash on a mismatch, or silently mislabel after truncation).

GPU extras (DeepSpeed, flash-attn) are imported lazily and only when asked for / available.
"""

from __future__ import annotations

import importlib.util
import inspect
import io
import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import PrinterCallback

from mmprm_tasks.formats import PROCESS_MARK, chat_messages
from mmprm_tasks.settings import PACKAGE_DIR, ConfigurationError, TrainConfig
from mmprm_tasks.traverse import PRM_SEPARATOR, render_process

log = logging.getLogger(__name__)

PRM_TOKEN = PRM_SEPARATOR
YES_TOKEN = "Yes"
NO_TOKEN = "No"
IGNORE_LABEL = -100.0
PRM_CONFIG_FILE = "prm_config.json"
DEEPSPEED_CONFIG_DIR = PACKAGE_DIR / "deepspeed_configs"
# Sequence-aligned processor outputs, truncated together with input_ids.
_SEQUENCE_KEYS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")
# Module path components of vision encoders in Hugging Face VLMs (LLaVA, Gemma3, PaliGemma,
# InternVL-HF: vision_tower; Qwen2/2.5-VL: visual; Idefics3/SmolVLM/mllama: vision_model).
_VISION_MODULE_NAMES = ("vision_tower", "visual", "vision_model")


class PRMDataError(ValueError):
    """A training/scoring record that cannot be turned into PRM inputs as labelled."""


# --------------------------------------------------------------------------------------- loss


def _labels_at_prm(
    mask: torch.Tensor, labels_per_prm: Any, device: torch.device
) -> torch.Tensor:
    """The label of every ``<prm>`` position, flattened in row-major order.

    ``labels_per_prm`` is one of: a tensor shaped like ``input_ids`` (read at the ``<prm>``
    positions), a 1-D tensor/sequence with one value per ``<prm>`` position of the batch
    (row-major), or a sequence of per-row sequences.
    """
    count = int(mask.sum())
    if isinstance(labels_per_prm, torch.Tensor):
        labels = labels_per_prm.to(device)
        if labels.shape == mask.shape:
            return labels[mask].float()
        if labels.dim() == 1:
            if labels.numel() != count:
                raise PRMDataError(f"{labels.numel()} labels for {count} <prm> positions")
            return labels.float()
        raise PRMDataError(f"labels of shape {tuple(labels.shape)} for input {tuple(mask.shape)}")
    labels_list = list(labels_per_prm)
    if labels_list and isinstance(labels_list[0], Sequence | torch.Tensor):
        per_row = mask.sum(dim=1).tolist()
        if len(labels_list) != len(per_row):
            raise PRMDataError(f"{len(labels_list)} label rows for a batch of {len(per_row)}")
        for row, (row_labels, n) in enumerate(zip(labels_list, per_row, strict=True)):
            if len(row_labels) != n:
                raise PRMDataError(f"row {row}: {len(row_labels)} labels for {n} <prm> positions")
        flat = [float(v) for row_labels in labels_list for v in row_labels]
    else:
        flat = [float(v) for v in labels_list]
        if len(flat) != count:
            raise PRMDataError(f"{len(flat)} labels for {count} <prm> positions")
    return torch.tensor(flat, dtype=torch.float32, device=device)


def prm_loss(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    labels_per_prm: Any,
    prm_token_id: int,
    yes_id: int,
    no_id: int,
    hard: bool = False,
) -> torch.Tensor:
    """Mean cross-entropy at the ``<prm>`` positions between ``softmax([yes, no])`` and the target.

    ``logits``: ``[batch, seq, vocab]`` aligned with ``input_ids`` ``[batch, seq]`` (no shift).
    Soft target ``[mc, 1 - mc]`` (``mc`` must lie in [0, 1]); ``hard=True``: ``[1, 0]`` if
    ``mc > 0`` else ``[0, 1]``.  A batch without any ``<prm>`` gives a zero loss that still
    depends on ``logits`` (so distributed backward passes stay in step).
    """
    if logits.shape[:2] != input_ids.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} do not align with input_ids {tuple(input_ids.shape)}"
        )
    mask = input_ids == prm_token_id
    targets = _labels_at_prm(mask, labels_per_prm, logits.device)
    if targets.numel() == 0:
        return logits.sum() * 0.0
    if hard:
        positive = (targets > 0).float()
    else:
        if bool(((targets < 0) | (targets > 1)).any()):
            raise PRMDataError(f"soft labels must lie in [0, 1], got {targets.tolist()}")
        positive = targets
    pair = logits[mask][:, [yes_id, no_id]].float()  # [M, 2]
    target = torch.stack([positive, 1.0 - positive], dim=-1)
    return -(target * F.log_softmax(pair, dim=-1)).sum(dim=-1).mean()


# ------------------------------------------------------------------------------ tokens/images


@dataclass(frozen=True)
class PRMTokens:
    prm_token_id: int
    yes_id: int
    no_id: int


def _vocab_token_id(tokenizer: Any, token: str) -> int:
    """The id of ``token`` as a vocabulary entry, resolved as the original release resolves its
    reward tokens (``convert_tokens_to_ids``), not by encoding the text: on a SentencePiece-style
    vocabulary ``tokenizer("Yes")`` gives ``▁Yes`` (a word-initial piece) while the release reads
    the logit of ``Yes``, so encoding would train and score a real checkpoint on the wrong token
    without any error."""
    token_id = tokenizer.convert_tokens_to_ids(token)
    unknown = token_id is None or (
        tokenizer.unk_token_id is not None and token_id == tokenizer.unk_token_id and token != tokenizer.unk_token
    )
    if unknown:
        pieces = tokenizer.tokenize(token)
        raise ValueError(
            f"the PRM reads the logit of {token!r}, which must be a single token in the vocabulary; this "
            f"tokenizer has no token {token!r} (the text splits into {len(pieces)} pieces {pieces}). Use a "
            f"checkpoint whose vocabulary has {YES_TOKEN!r} and {NO_TOKEN!r} as tokens."
        )
    return int(token_id)


def ensure_prm_tokens(processor: Any, model: Any | None = None) -> PRMTokens:
    """Add ``<prm>`` as a special token when missing (resizing ``model``'s embeddings when the
    new id does not fit) and return the ids of ``<prm>``, ``Yes`` and ``No``.

    ``Yes`` and ``No`` are resolved with ``convert_tokens_to_ids`` as the release does; fails
    clearly, naming the token, when one is not in the vocabulary or ``<prm>`` does not tokenize as
    one token.
    """
    from tokenizers import AddedToken

    tokenizer = getattr(processor, "tokenizer", processor)
    probe = f"a{PRM_TOKEN}\n\nb"
    prm_id = tokenizer.convert_tokens_to_ids(PRM_TOKEN)
    encoded = tokenizer(probe, add_special_tokens=False)["input_ids"]
    if prm_id is None or prm_id == tokenizer.unk_token_id or encoded.count(prm_id) != 1:
        tokenizer.add_tokens(
            [AddedToken(PRM_TOKEN, special=True, normalized=False, lstrip=False, rstrip=False)],
            special_tokens=True,
        )
        prm_id = tokenizer.convert_tokens_to_ids(PRM_TOKEN)
        encoded = tokenizer(probe, add_special_tokens=False)["input_ids"]
        if encoded.count(prm_id) != 1:
            raise ValueError(f"{PRM_TOKEN!r} does not tokenize as one token after adding it")
    if model is not None:
        embeddings = model.get_input_embeddings()
        if prm_id >= embeddings.num_embeddings:
            model.resize_token_embeddings(len(tokenizer))
    tokens = PRMTokens(
        prm_token_id=int(prm_id),
        yes_id=_vocab_token_id(tokenizer, YES_TOKEN),
        no_id=_vocab_token_id(tokenizer, NO_TOKEN),
    )
    if model is not None:
        model.config.prm_token_id = tokens.prm_token_id
        model.config.prm_reward_token_ids = [tokens.yes_id, tokens.no_id]
    return tokens


def load_image(image: Any, loader: Callable[[str], Any] | None = None):
    """A PIL RGB image from bytes, a PIL image, or a path (through ``loader`` when given)."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, bytes | bytearray | memoryview):
        return Image.open(io.BytesIO(bytes(image))).convert("RGB")
    if isinstance(image, str | os.PathLike):
        if loader is not None:
            return load_image(loader(str(image)))
        with Image.open(image) as img:
            return img.convert("RGB")
    raise TypeError(f"cannot read an image from {type(image).__name__}")


# --------------------------------------------------------------------------------- collator


@dataclass
class PRMCollator:
    """Builds model inputs for path records ``{question, process, labels, image | image_path}``.

    The user turn is ``[image, "Question: ...\\nProcess: ..."]`` rendered by the processor's chat
    template; batches are right-padded.  ``prm_labels`` (same shape as ``input_ids``) holds each
    path's label at its ``<prm>`` positions and :data:`IGNORE_LABEL` elsewhere.

    Checks, failing loudly (:class:`PRMDataError`): the process holds exactly one ``<prm>`` per
    label; the tokenized text holds exactly one ``<prm>`` token per label; truncation to
    ``max_length`` never cuts image tokens.  When truncation cuts trailing ``<prm>`` tokens, the
    labels of the cut steps are dropped with them (``truncation="drop"``, counted in
    ``truncated_examples``/``dropped_labels``) or the batch fails (``truncation="error"``); after
    truncation the count of ``<prm>`` tokens equals the count of kept labels, always.
    """

    processor: Any
    tokens: PRMTokens
    max_length: int | None = None
    truncation: Literal["drop", "error"] = "drop"
    image_loader: Callable[[str], Any] | None = None
    truncated_examples: int = field(default=0, init=False)
    dropped_labels: int = field(default=0, init=False)

    def _image(self, record: dict[str, Any]):
        image = record.get("image")
        if image is None:
            image = record.get("image_path")
        if image is None:
            raise PRMDataError(f"record {record.get('id')}: no image or image_path")
        return load_image(image, self.image_loader)

    def text(self, record: dict[str, Any]) -> str:
        messages = chat_messages(record["question"], record["process"])
        if getattr(self.processor, "chat_template", None) is None:
            raise ValueError("the processor has no chat template; the PRM needs one")
        return self.processor.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=False
        )

    def __call__(self, records: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        texts, images, labels = [], [], []
        for record in records:
            row_labels = [float(v) for v in record["labels"]]
            separators = record["process"].count(PRM_TOKEN)
            if separators != len(row_labels):
                raise PRMDataError(
                    f"record {record.get('id')}: {separators} {PRM_TOKEN} in the process for "
                    f"{len(row_labels)} labels"
                )
            texts.append(self.text(record))
            images.append(self._image(record))
            labels.append(row_labels)
        batch = dict(
            self.processor(
                text=texts, images=images, padding=True, padding_side="right", return_tensors="pt"
            )
        )
        input_ids = batch["input_ids"]
        full_counts = (input_ids == self.tokens.prm_token_id).sum(dim=1).tolist()
        for row, (n, row_labels) in enumerate(zip(full_counts, labels, strict=True)):
            if n != len(row_labels):
                raise PRMDataError(
                    f"record {records[row].get('id')}: the tokenized text has {n} {PRM_TOKEN} "
                    f"tokens for {len(row_labels)} labels (does a step contain '{PRM_TOKEN}'?)"
                )
        if self.max_length is not None and input_ids.shape[1] > self.max_length:
            image_token_id = getattr(self.processor, "image_token_id", None)
            if image_token_id is not None:
                before = (input_ids == image_token_id).sum(dim=1)
                after = (input_ids[:, : self.max_length] == image_token_id).sum(dim=1)
                if bool((before != after).any()):
                    raise PRMDataError(
                        f"max_length {self.max_length} cuts into the image tokens; raise it"
                    )
            for key in _SEQUENCE_KEYS:
                if key in batch and isinstance(batch[key], torch.Tensor):
                    batch[key] = batch[key][:, : self.max_length]
            input_ids = batch["input_ids"]
        mask = input_ids == self.tokens.prm_token_id
        prm_labels = torch.full(input_ids.shape, IGNORE_LABEL, dtype=torch.float32)
        for row, row_labels in enumerate(labels):
            n = int(mask[row].sum())
            if n < len(row_labels):
                if self.truncation == "error":
                    raise PRMDataError(
                        f"record {records[row].get('id')}: max_length {self.max_length} keeps "
                        f"{n} of {len(row_labels)} {PRM_TOKEN} tokens"
                    )
                self.truncated_examples += 1
                self.dropped_labels += len(row_labels) - n
            kept = row_labels[:n]
            prm_labels[row, mask[row]] = torch.tensor(kept, dtype=torch.float32)
            if int((prm_labels[row] != IGNORE_LABEL).sum()) != n:  # invariant
                raise PRMDataError(f"row {row}: labels do not cover the {PRM_TOKEN} tokens")
        batch["prm_labels"] = prm_labels
        return batch


# ---------------------------------------------------------------------------------- trainer


def record_length(record: dict[str, Any]) -> int:
    """How long a path record's text is (characters of question and process): the image's tokens
    are the same for every record of a model, so this orders records as their token counts do."""
    return len(str(record.get("question", ""))) + len(str(record.get("process", "")))


def _accepts_logits_to_keep(model: Any) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def prm_forward(model: Any, inputs: dict[str, Any], prm_token_id: int):
    """Run ``model`` and return ``(outputs, input_ids, extra)`` where ``outputs.logits``,
    ``input_ids`` and ``extra`` (``prm_labels`` when present, popped from ``inputs``) are
    restricted to the columns of the batch holding a ``<prm>`` when the model supports
    ``logits_to_keep`` (the vocabulary is then projected only there), else full length."""
    inputs = dict(inputs)
    extra = {k: inputs.pop(k) for k in ("prm_labels",) if k in inputs}
    input_ids = inputs["input_ids"]
    base = model
    while hasattr(base, "module"):  # DDP / DeepSpeed engine wrappers
        base = base.module
    columns = (input_ids == prm_token_id).any(dim=0).nonzero().squeeze(-1)
    # DataParallel would scatter the index tensor along with the batch: full logits there.
    if _accepts_logits_to_keep(base) and not isinstance(model, torch.nn.DataParallel):
        keep = columns if columns.numel() else 1
        outputs = model(**inputs, use_cache=False, logits_to_keep=keep)
        if columns.numel():
            input_ids = input_ids[:, columns]
            extra = {k: v[:, columns] for k, v in extra.items()}
        else:
            input_ids = input_ids[:, -1:]
            extra = {k: v[:, -1:] for k, v in extra.items()}
    else:
        outputs = model(**inputs, use_cache=False)
    return outputs, input_ids, extra


class PRMTrainer(Trainer):
    """``transformers.Trainer`` with the PRM loss (:func:`prm_loss`) in ``compute_loss``.  Token
    ids come from the model config (``prm_token_id``, ``prm_reward_token_ids`` set by
    :func:`ensure_prm_tokens`), the label mode from ``prm_label_mode`` ("soft"/"hard").  The loss
    is a per-batch mean, so the Trainer divides it by the gradient-accumulation steps
    (``loss_is_scaled_for_ga = False``).

    ``train_lengths`` (one per record, any proxy of its token count) puts records of similar
    length in one batch, as the Trainer's own ``group_by_length`` does for tokenised datasets
    (path records are tokenised by the collator, so the Trainer cannot measure them itself):
    less padding computed, the same records each epoch."""

    loss_is_scaled_for_ga = False

    def __init__(self, *args: Any, train_lengths: Sequence[int] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.train_lengths = list(train_lengths) if train_lengths is not None else None

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        if self.train_lengths is None:
            return super()._get_train_sampler(train_dataset)
        from transformers.trainer_pt_utils import LengthGroupedSampler

        return LengthGroupedSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                    lengths=self.train_lengths,
                                    generator=torch.Generator().manual_seed(self.args.seed))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        config = self.accelerator.unwrap_model(model).config
        prm_token_id = int(config.prm_token_id)
        yes_id, no_id = (int(i) for i in config.prm_reward_token_ids)
        hard = getattr(config, "prm_label_mode", "soft") == "hard"
        if "prm_labels" not in inputs:
            raise PRMDataError("the batch has no prm_labels (use PRMCollator)")
        outputs, input_ids, extra = prm_forward(model, inputs, prm_token_id)
        loss = prm_loss(
            outputs.logits, input_ids, extra["prm_labels"], prm_token_id, yes_id, no_id, hard
        )
        return (loss, outputs) if return_outputs else loss


# ----------------------------------------------------------------------------------- config


def flash_attn_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


def resolve_deepspeed_config(name_or_path: str | None) -> str | None:
    """``"zero1"``/``"zero2"``/``"zero3"`` (shipped configs) or a path to a JSON config."""
    if not name_or_path:
        return None
    shipped = DEEPSPEED_CONFIG_DIR / f"{name_or_path}.json"
    if shipped.is_file():
        return str(shipped)
    path = Path(name_or_path)
    if path.is_file():
        return str(path)
    raise FileNotFoundError(
        f"DeepSpeed config {name_or_path!r}: neither one of zero1/zero2/zero3 nor a file"
    )


@dataclass
class PRMTrainingConfig:
    """PRM training settings (defaults: the released script, SPEC §6).

    ``bf16=None``: on when CUDA supports bf16.  ``deepspeed``: ``zero1``/``zero2``/``zero3`` or a
    JSON path (DeepSpeed is imported only then, and must be installed: the ``gpu`` extra).
    ``attn_implementation=None``: ``flash_attention_2`` when flash-attn is installed and CUDA is
    present, else the model's default.
    """

    learning_rate: float = 2e-6
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.05
    num_train_epochs: float = 3.0
    per_device_train_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    max_steps: int = -1
    max_length: int | None = 4096
    freeze_vision_tower: bool = True
    label_mode: Literal["soft", "hard"] = "soft"
    bf16: bool | None = None
    deepspeed: str | None = None
    attn_implementation: str | None = None
    gradient_checkpointing: bool = False
    truncation: Literal["drop", "error"] = "drop"
    logging_steps: int = 1
    dataloader_num_workers: int = 0
    max_grad_norm: float = 1.0
    group_by_length: bool = False

    @classmethod
    def from_train_config(cls, cfg: TrainConfig, **overrides: Any) -> PRMTrainingConfig:
        names = {f for f in cls.__dataclass_fields__}
        values = {k: v for k, v in cfg.model_dump().items() if k in names}
        values.update(overrides)
        return cls(**values)

    def use_bf16(self) -> bool:
        if self.bf16 is not None:
            return self.bf16
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()

    def resolved_attn_implementation(self) -> str | None:
        if self.attn_implementation is not None:
            return self.attn_implementation
        return "flash_attention_2" if flash_attn_available() and self.use_bf16() else None

    def resolved_deepspeed(self) -> str | None:
        path = resolve_deepspeed_config(self.deepspeed)
        if path is not None and importlib.util.find_spec("deepspeed") is None:
            raise RuntimeError(
                f"deepspeed={self.deepspeed!r} but DeepSpeed is not installed (the gpu extra)"
            )
        return path

    def training_arguments(self, output_dir: str | os.PathLike, seed: int):
        from transformers import TrainingArguments

        warmup = min(self.warmup_ratio, 0.9999)  # a float < 1 is a ratio of the total steps
        # transformers 5.x renamed gradient_checkpointing to activation_checkpointing.
        prefix = (
            "activation_checkpointing"
            if "activation_checkpointing" in TrainingArguments.__dataclass_fields__
            else "gradient_checkpointing"
        )
        checkpointing: dict[str, Any] = {prefix: self.gradient_checkpointing}
        if self.gradient_checkpointing:
            checkpointing[f"{prefix}_kwargs"] = {"use_reentrant": False}
        return TrainingArguments(
            output_dir=str(output_dir),
            learning_rate=self.learning_rate,
            lr_scheduler_type=self.lr_scheduler_type,
            warmup_steps=warmup,
            weight_decay=self.weight_decay,
            num_train_epochs=self.num_train_epochs,
            max_steps=self.max_steps,
            per_device_train_batch_size=self.per_device_train_batch_size,
            gradient_accumulation_steps=self.gradient_accumulation_steps,
            max_grad_norm=self.max_grad_norm,
            bf16=self.use_bf16(),
            deepspeed=self.resolved_deepspeed(),
            **checkpointing,
            logging_steps=self.logging_steps,
            save_strategy="no",
            report_to="none",
            remove_unused_columns=False,
            label_names=["prm_labels"],
            prediction_loss_only=True,
            dataloader_num_workers=self.dataloader_num_workers,
            seed=seed,
            data_seed=seed,
            use_cpu=not torch.cuda.is_available(),
            disable_tqdm=True,
        )


class LossLogCallback(TrainerCallback):
    """Replaces the Trainer's PrinterCallback (one printed dict per ``logging_steps``, i.e. per
    step here, which buried the demo's output): the full history stays in ``state.log_history``,
    and about ``1 / every_fraction`` lines per run go to this module's logger."""

    def __init__(self, every_fraction: float = 0.05) -> None:
        self.every_fraction = every_fraction

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return
        every = max(1, round(state.max_steps * self.every_fraction))
        if state.global_step % every == 0 or state.global_step in (1, state.max_steps):
            log.info(
                "PRM training step %d/%d: loss %.4f, learning rate %.3g",
                state.global_step, state.max_steps, float(logs["loss"]),
                float(logs.get("learning_rate", float("nan"))),
            )


def freeze_vision_tower(model: torch.nn.Module) -> int:
    """Freeze the vision encoder's parameters (not the projector); returns how many were frozen."""
    frozen = 0
    for name, param in model.named_parameters():
        if any(part in _VISION_MODULE_NAMES for part in name.split(".")):
            param.requires_grad_(False)
            frozen += param.numel()
    if frozen == 0:
        log.warning("freeze_vision_tower: no vision encoder parameters found; nothing frozen")
    return frozen


# ---------------------------------------------------------------------------------- training


def train_prm(
    base_model_dir: str | os.PathLike,
    train_records: Iterable[dict[str, Any]],
    out_dir: str | os.PathLike,
    cfg: TrainConfig | PRMTrainingConfig,
    seed: int,
    *,
    image_loader: Callable[[str], Any] | None = None,
    eval_records: Iterable[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Train a PRM from any ``AutoModelForImageTextToText`` checkpoint and save it to ``out_dir``.

    ``train_records`` are path records (``{question, process, labels, image | image_path}``, as
    :func:`mmprm_tasks.traverse.build_paths`, :func:`mmprm_tasks.formats.read_chat` or
    :func:`~mmprm_tasks.formats.read_internvl` give them); ``image_path`` values are read with
    ``image_loader`` (path -> bytes/PIL) when given, else as local files.  ``<prm>`` is added as
    a special token when missing (embeddings resized); ``Yes``/``No`` must be single tokens.
    Saves model + processor with ``save_pretrained`` and ``prm_config.json``.  Returns metrics.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor, set_seed

    if isinstance(cfg, TrainConfig):
        cfg = PRMTrainingConfig.from_train_config(cfg)
    records = list(train_records)
    if not records:
        raise ConfigurationError("no training records: the dataset is empty (annotate problems whose root MC "
                                 "value lies strictly between 0 and 1 first)")
    set_seed(seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    bf16 = cfg.use_bf16()
    deepspeed_config = cfg.resolved_deepspeed()
    attn = cfg.resolved_attn_implementation()
    load_kwargs: dict[str, Any] = {
        # DeepSpeed keeps fp32 master weights itself; without it, fp32 weights + autocast.
        "dtype": torch.bfloat16 if (deepspeed_config and bf16) else torch.float32,
    }
    if attn is not None:
        load_kwargs["attn_implementation"] = attn
    processor = AutoProcessor.from_pretrained(base_model_dir)
    model = AutoModelForImageTextToText.from_pretrained(base_model_dir, **load_kwargs)
    tokens = ensure_prm_tokens(processor, model)
    model.config.prm_label_mode = cfg.label_mode
    frozen = freeze_vision_tower(model) if cfg.freeze_vision_tower else 0
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    collator = PRMCollator(
        processor,
        tokens,
        max_length=cfg.max_length,
        truncation=cfg.truncation,
        image_loader=image_loader,
    )
    trainer = PRMTrainer(
        model=model,
        args=cfg.training_arguments(out_dir, seed),
        train_dataset=records,
        eval_dataset=list(eval_records) if eval_records is not None else None,
        data_collator=collator,
        processing_class=processor,
        train_lengths=[record_length(r) for r in records] if cfg.group_by_length else None,
    )
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(LossLogCallback())
    result = trainer.train()
    metrics: dict[str, Any] = dict(result.metrics)
    if eval_records is not None:
        metrics.update(trainer.evaluate())
    trainer.save_model(str(out_dir))
    if trainer.is_world_process_zero():
        processor.save_pretrained(str(out_dir))
        prm_config = {
            "prm_token": PRM_TOKEN,
            "yes_token": YES_TOKEN,
            "no_token": NO_TOKEN,
            **asdict(tokens),
            "label_mode": cfg.label_mode,
            "base_model": str(base_model_dir),
            "seed": seed,
            "training": asdict(cfg),
        }
        (out_dir / PRM_CONFIG_FILE).write_text(json.dumps(prm_config, indent=2))
        stray = out_dir / "training_args.bin"
        if stray.exists():
            stray.unlink()
    losses = [
        {"step": e["step"], "loss": e["loss"]} for e in trainer.state.log_history if "loss" in e
    ]
    metrics.update(
        {
            "global_step": trainer.state.global_step,
            "num_examples": len(records),
            "loss_history": losses,
            "first_loss": losses[0]["loss"] if losses else math.nan,
            "last_loss": losses[-1]["loss"] if losses else math.nan,
            # counted where batches are collated: in this process when dataloader_num_workers=0
            "truncated_examples": collator.truncated_examples,
            "dropped_labels": collator.dropped_labels,
            "trainable_params": trainable,
            "frozen_params": frozen,
            "bf16": bf16,
            "deepspeed": deepspeed_config,
            "attn_implementation": attn,
            "label_mode": cfg.label_mode,
            **asdict(tokens),
        }
    )
    return metrics


# ---------------------------------------------------------------------------------- scoring


class _StepScorer:
    """Loads a checkpoint for step scoring and lays candidates out exactly as the PRM is trained:
    each step its own group, rendered by :func:`mmprm_tasks.traverse.render_process` (a literal
    ``<prm>`` or image token inside a step is removed).  Loads on CUDA in bf16 when available
    (flash-attn when installed), else CPU fp32.  Subclasses say what a step's score is."""

    def __init__(
        self,
        model_dir: str | os.PathLike,
        *,
        device: str | None = None,
        dtype: torch.dtype | None = None,
        batch_size: int = 16,
        max_length: int | None = None,
    ) -> None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype is None:
            cuda_bf16 = self.device.type == "cuda" and torch.cuda.is_bf16_supported()
            dtype = torch.bfloat16 if cuda_bf16 else torch.float32
        kwargs: dict[str, Any] = {"dtype": dtype}
        if self.device.type == "cuda" and dtype != torch.float32 and flash_attn_available():
            kwargs["attn_implementation"] = "flash_attention_2"
        self.processor = AutoProcessor.from_pretrained(model_dir)
        self.model = AutoModelForImageTextToText.from_pretrained(model_dir, **kwargs)
        self.model.to(self.device).eval()
        self.tokens = ensure_prm_tokens(self.processor)  # no resize: the model must know <prm>
        if self.tokens.prm_token_id >= self.model.get_input_embeddings().num_embeddings:
            raise ValueError(f"{model_dir}: the model has no embedding for {PRM_TOKEN}")
        self.batch_size = batch_size
        self.collator = PRMCollator(
            self.processor, self.tokens, max_length=max_length, truncation="error"
        )
        # The longest input this scorer takes: ``max_length`` when given, and never more than
        # the model's positions (a longer input would be read past what the model knows).
        config = getattr(self.model.config, "text_config", None) or self.model.config
        limits = [n for n in (max_length, getattr(config, "max_position_embeddings", None)) if n]
        self.max_input_tokens: int | None = min(limits) if limits else None

    def input_length(self, question: str, image: Any, steps: Sequence[str]) -> int:
        """Tokens of one candidate's input, image tokens included, as :meth:`score` lays it out
        (tokenised only: nothing runs through the model)."""
        record = {"question": question, "process": self.process_text(steps), "labels": [0.0] * len(steps)}
        text = self.collator.text(record)
        return int(self.processor(text=[text], images=[load_image(image)], return_tensors="pt")["input_ids"].shape[1])

    def process_text(self, steps: Sequence[str]) -> str:
        """The process of a candidate (literal ``<prm>``/image tokens in a step are removed)."""
        image_token = getattr(self.processor, "image_token", None) or "<image>"
        return render_process(
            [[s.replace(PRM_TOKEN, "").replace(image_token, "")] for s in steps]
        )

    def _inputs(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collator(records)
        batch.pop("prm_labels")
        batch = {
            k: (v.to(self.device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()
        }
        if "pixel_values" in batch and batch["pixel_values"].is_floating_point():
            batch["pixel_values"] = batch["pixel_values"].to(self.model.dtype)
        return batch

    def _score_batch(self, records: list[dict[str, Any]]) -> list[list[float]]:
        raise NotImplementedError

    def score_many(self, items: Sequence[tuple[str, Any, Sequence[str]]]) -> list[list[float]]:
        """Scores for ``(question, image, steps)`` items (image: bytes, PIL or path), batched."""
        results: list[list[float] | None] = [None] * len(items)
        pending = []
        for index, (question, image, steps) in enumerate(items):
            if not steps:
                results[index] = []
                continue
            pending.append(
                (
                    index,
                    {
                        "id": index,
                        "question": question,
                        "process": self.process_text(steps),
                        "labels": [0.0] * len(steps),
                        "image": image,
                    },
                )
            )
        for start in range(0, len(pending), self.batch_size):
            chunk = pending[start : start + self.batch_size]
            scores = self._score_batch([record for _, record in chunk])
            for (index, record), row in zip(chunk, scores, strict=True):
                if len(row) != len(record["labels"]):
                    raise PRMDataError(
                        f"item {index}: {len(row)} scores for {len(record['labels'])} steps"
                    )
                results[index] = row
        return [r if r is not None else [] for r in results]

    def score(
        self, question: str, image_bytes: Any, steps_batch: Sequence[Sequence[str]]
    ) -> list[list[float]]:
        """One list of step scores per candidate in ``steps_batch`` (same question and image)."""
        image = load_image(image_bytes)  # decode once for the whole batch
        return self.score_many([(question, image, steps) for steps in steps_batch])


class PRMScorer(_StepScorer):
    """Step scores of a trained PRM: P(Yes) = ``softmax([yes, no])[0]`` at each ``<prm>``."""

    @torch.no_grad()
    def _score_batch(self, records: list[dict[str, Any]]) -> list[list[float]]:
        batch = self._inputs(records)
        outputs, input_ids, _ = prm_forward(self.model, batch, self.tokens.prm_token_id)
        mask = input_ids == self.tokens.prm_token_id
        pair = outputs.logits[..., [self.tokens.yes_id, self.tokens.no_id]].float()
        probs = pair.softmax(dim=-1)[..., 0]
        return [probs[row][mask[row]].tolist() for row in range(input_ids.shape[0])]


class StepLikelihoodScorer(_StepScorer):
    """A generative verifier: each step's probability under a language model (typically the PRM's
    base), read in the PRM layout. The score of step ``i`` is ``P(tokens of step i | image,
    question, steps before it)``: the product of its tokens' probabilities, so one unlikely token
    (a wrong result, a misread digit) sinks the step. The tokens of step ``i`` are those after the
    ``i``-th ``<prm>`` (after ``Process:`` for the first step) up to and including the next
    ``<prm>``; the separator and blank line are near-certain for a model that has read this layout
    and cost nothing.

    It needs no training and no labels, so it is the honest baseline for a PRM fine-tuned from the
    same base: how much of the PRM's judgement was in the base model already.
    """

    @torch.no_grad()
    def _score_batch(self, records: list[dict[str, Any]]) -> list[list[float]]:
        batch = self._inputs(records)
        input_ids = batch["input_ids"]
        logits = self.model(**batch, use_cache=False).logits.float()
        token_logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(
            -1, input_ids[:, 1:, None]
        )[..., 0]
        prm = input_ids == self.tokens.prm_token_id
        head = self._process_starts(records)
        scores = []
        for row in range(input_ids.shape[0]):
            ends = prm[row].nonzero().squeeze(-1).tolist()
            starts = [head[row]] + [e + 1 for e in ends[:-1]]
            # token t is predicted at position t - 1
            scores.append([
                math.exp(float(token_logp[row, start - 1 : end].sum()))
                for start, end in zip(starts, ends, strict=True)
            ])
        return scores

    def _process_starts(self, records: list[dict[str, Any]]) -> list[int]:
        """Index of the first process token of each record (right padding: counted from 0)."""
        starts = []
        for record in records:
            text = self.collator.text(record)
            head = text[: text.index(PROCESS_MARK) + len(PROCESS_MARK)].rstrip(" ")
            ids = self.processor(
                text=[head], images=[self.collator._image(record)], return_tensors="pt"
            )["input_ids"][0]
            starts.append(int(ids.shape[0]))
        return starts
