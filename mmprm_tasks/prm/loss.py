"""The PRM loss (SPEC §6) and the forward pass that reads logits at the ``<prm>`` columns only."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

IGNORE_LABEL = -100.0


class PRMDataError(ValueError):
    """A training/scoring record that cannot be turned into PRM inputs as labelled."""


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
