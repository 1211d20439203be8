"""Path records to model inputs, with ``prm_labels`` exactly at the ``<prm>`` positions."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from mmprm_tasks.families import per_text_images
from mmprm_tasks.formats import chat_messages
from mmprm_tasks.prm.loss import IGNORE_LABEL, PRMDataError
from mmprm_tasks.prm.tokens import PRM_TOKEN, PRMTokens, load_image

# Sequence-aligned processor outputs, truncated together with input_ids.
# (Mllama's cross_attention_mask says which text positions attend to which image tile.)
_SEQUENCE_KEYS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids", "cross_attention_mask")


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

    ``image_token_id``: the token whose positions carry image features (the model config's
    ``image_token_id``), which the truncation check counts; default the processor's, which for
    some families is only the placeholder before them (Gemma 3's ``<start_of_image>``).
    """

    processor: Any
    tokens: PRMTokens
    max_length: int | None = None
    truncation: Literal["drop", "error"] = "drop"
    image_loader: Callable[[str], Any] | None = None
    image_token_id: int | None = None
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
                text=texts, images=per_text_images([[image] for image in images]), padding=True,
                padding_side="right", return_tensors="pt"
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
            image_token_id = self.image_token_id
            if image_token_id is None:
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



def record_length(record: dict[str, Any]) -> int:
    """How long a path record's text is (characters of question and process): the image's tokens
    are the same for every record of a model, so this orders records as their token counts do."""
    return len(str(record.get("question", ""))) + len(str(record.get("process", "")))
