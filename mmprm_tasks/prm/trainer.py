"""PRM training: the Trainer with the PRM loss, the frozen vision tower, :func:`train_prm`."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import PrinterCallback

from mmprm_tasks.families import checkpoint_model_type, family, family_of, load_checkpoint
from mmprm_tasks.prm.collator import PRMCollator, record_length
from mmprm_tasks.prm.config import PRM_CONFIG_FILE, PRMTrainingConfig
from mmprm_tasks.prm.loss import PRMDataError, prm_forward, prm_loss
from mmprm_tasks.prm.tokens import PRM_TOKEN, ensure_prm_tokens
from mmprm_tasks.progress import training_progress_callback
from mmprm_tasks.settings import ConfigurationError, TrainConfig

log = logging.getLogger(__name__)


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


def freeze_vision_tower(model: torch.nn.Module, vision_modules: Sequence[str] | None = None) -> int:
    """Freeze the vision encoder's parameters (not the projector): every parameter under a module
    named as the model's family says (:mod:`mmprm_tasks.families`).  Returns how many were frozen;
    a family whose vision module matches nothing is an error, not a silently trained tower."""
    names = tuple(vision_modules) if vision_modules is not None else family_of(model).vision_modules
    frozen = 0
    for name, param in model.named_parameters():
        if any(part in names for part in name.split(".")):
            param.requires_grad_(False)
            frozen += param.numel()
    if frozen == 0:
        raise ValueError(f"freeze_vision_tower: no parameter lies under a module named {' or '.join(names)} in "
                         f"{type(model).__name__}; fix vision_modules in mmprm_tasks/families.py")
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
    from transformers import set_seed

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
    attn = cfg.resolved_attn_implementation(family(checkpoint_model_type(base_model_dir)))
    load_kwargs: dict[str, Any] = {
        # DeepSpeed keeps fp32 master weights itself; without it, fp32 weights + autocast.
        "dtype": torch.bfloat16 if (deepspeed_config and bf16) else torch.float32,
    }
    if attn is not None:
        load_kwargs["attn_implementation"] = attn
    processor, model, fam = load_checkpoint(base_model_dir, trust_remote_code=cfg.trust_remote_code, **load_kwargs)
    tokens = ensure_prm_tokens(processor, model, fam)
    model.config.prm_label_mode = cfg.label_mode
    frozen = freeze_vision_tower(model, fam.vision_modules) if cfg.freeze_vision_tower else 0
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    collator = PRMCollator(
        processor,
        tokens,
        max_length=cfg.max_length,
        truncation=cfg.truncation,
        image_loader=image_loader,
        image_token_id=getattr(model.config, "image_token_id", None),
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
    trainer.add_callback(training_progress_callback())
    result = trainer.train()
    metrics: dict[str, Any] = dict(result.metrics)
    if eval_records is not None:
        metrics.update(trainer.evaluate())
    trainer.save_model(str(out_dir))
    if trainer.is_world_process_zero():
        processor.save_pretrained(str(out_dir))
        prm_config = {
            "prm_token": PRM_TOKEN,
            "yes_token": fam.yes_token,
            "no_token": fam.no_token,
            # Scoring loads the checkpoint as training loaded its base.
            "trust_remote_code": cfg.trust_remote_code,
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
