"""PRM training settings (the released script's values) and the GPU extras they select."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from mmprm_tasks.families import Family
from mmprm_tasks.settings import PACKAGE_DIR, TrainConfig

PRM_CONFIG_FILE = "prm_config.json"
DEEPSPEED_CONFIG_DIR = PACKAGE_DIR / "deepspeed_configs"


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
    trust_remote_code: bool = False

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

    def resolved_attn_implementation(self, family: Family | None = None) -> str | None:
        """The setting when given, else flash-attn for a family that takes it (bf16 on CUDA)."""
        if self.attn_implementation is not None:
            return self.attn_implementation
        takes_flash = family is None or family.flash_attention
        return "flash_attention_2" if takes_flash and flash_attn_available() and self.use_bf16() else None

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
