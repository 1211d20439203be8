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

The package keeps one file per concern: :mod:`~mmprm_tasks.prm.loss` (the loss, the forward pass
at ``<prm>`` columns), :mod:`~mmprm_tasks.prm.tokens` (``<prm>``/``Yes``/``No`` per tokenizer),
:mod:`~mmprm_tasks.prm.collator`, :mod:`~mmprm_tasks.prm.config`, :mod:`~mmprm_tasks.prm.trainer`
and :mod:`~mmprm_tasks.prm.scorer`; every name is importable from ``mmprm_tasks.prm`` as before.
"""

from mmprm_tasks.prm.collator import PRMCollator, record_length
from mmprm_tasks.prm.config import (DEEPSPEED_CONFIG_DIR, PRM_CONFIG_FILE, PRMTrainingConfig, flash_attn_available,
                                    resolve_deepspeed_config)
from mmprm_tasks.prm.loss import IGNORE_LABEL, PRMDataError, prm_forward, prm_loss
from mmprm_tasks.prm.scorer import PRMScorer, StepLikelihoodScorer
from mmprm_tasks.prm.tokens import NO_TOKEN, PRM_TOKEN, YES_TOKEN, PRMTokens, ensure_prm_tokens, load_image
from mmprm_tasks.prm.trainer import LossLogCallback, PRMTrainer, freeze_vision_tower, train_prm

__all__ = ["DEEPSPEED_CONFIG_DIR", "IGNORE_LABEL", "LossLogCallback", "NO_TOKEN", "PRMCollator", "PRMDataError", "PRMScorer", "PRMTokens", "PRMTrainer", "PRMTrainingConfig", "PRM_CONFIG_FILE", "PRM_TOKEN", "StepLikelihoodScorer", "YES_TOKEN", "ensure_prm_tokens", "flash_attn_available", "freeze_vision_tower", "load_image", "prm_forward", "prm_loss", "record_length", "resolve_deepspeed_config", "train_prm"]
