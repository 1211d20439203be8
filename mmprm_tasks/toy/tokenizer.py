"""An offline tokenizer for the tiny toy policy (built with ``tokenizers``, nothing downloaded).

Byte-level BPE trained in well under a second on generated toy text, wrapped as a
:class:`~transformers.PreTrainedTokenizerFast` with a ChatML chat template. Numbers are grouped as
modern tokenizers group them (Llama 3 and GPT-4 split digit runs into groups of up to three): every
whole number 0-999 is one token, with or without the space before it, so ``3 + 5 = 9.`` is five
tokens and a minus sign is its own. That
matters for the toy PRM: a tiny model judges "x op y = z" right or wrong from whole-number tokens
(step AUC 0.95 after 1,000 steps) but not from one token per digit (0.60-0.68 after 3,000; measured
in issue 11).

Token roles:

* special (dropped by ``decode(skip_special_tokens=True)``): ``<|endoftext|>`` (pad),
  ``<|im_start|>``, ``<|im_end|>`` (eos, ends an assistant turn), ``<image>`` (registered as the
  ``image_token`` so ``LlavaProcessor`` finds ``image_token_id``) and ``<prm>`` (the PRM's step
  separator, SPEC §6);
* added but NOT special (they survive decoding, so :func:`mmprm_tasks.rollouts.parse_rollout`
  sees them): ``<step>``, ``</step>``, ``<answer>``, ``</answer>``, ``Yes`` and ``No`` (each a
  single token: the PRM reads their logits), and the numbers ``0`` to ``999`` (matched longest
  first, so ``1234`` is ``123`` + ``4``).
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
IMAGE_TOKEN = "<image>"
PRM_TOKEN = "<prm>"
SPECIAL_TOKENS = [PAD_TOKEN, IM_START, IM_END, IMAGE_TOKEN, PRM_TOKEN]
TAG_TOKENS = ["<step>", "</step>", "<answer>", "</answer>"]
LABEL_TOKENS = ["Yes", "No"]
# Whole numbers, bare and after a space (" 8" is one token, as "▁8" is in SentencePiece vocabularies).
NUMBER_TOKENS = [str(n) for n in range(1000)] + [f" {n}" for n in range(1000)]

# ChatML. Message content is either a string or a list of parts ({"type": "image"} renders as
# <image>, {"type": "text", "text": ...} as its text), as processors and chat backends send it.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{- '<image>' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)

DEFAULT_VOCAB_SIZE = 512


def default_corpus() -> list[str]:
    """Generated toy text: prompts, questions and solutions of the synthetic world."""
    from mmprm_tasks.toy.world import corpus_texts

    return corpus_texts()


def build_tokenizer(
    corpus_texts: Iterable[str] | None = None, *, vocab_size: int = DEFAULT_VOCAB_SIZE
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``corpus_texts`` (default: the toy world's text) and wrap it.

    Deterministic for a given corpus. ``vocab_size`` counts the 256 byte symbols, the merges and
    the special/added tokens.
    """
    texts = list(corpus_texts) if corpus_texts is not None else default_corpus()
    tok = Tokenizer(models.BPE())
    # Digits never reach the BPE: every number up to 999 is an added token (below), so the BPE
    # vocabulary is spent on words.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    # Non-special added tokens: matched before pre-tokenization, kept by skip_special_tokens.
    tok.add_tokens(
        [
            AddedToken(t, special=False, normalized=False)
            for t in TAG_TOKENS + LABEL_TOKENS + NUMBER_TOKENS
        ]
    )

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD_TOKEN,
        eos_token=IM_END,
        unk_token=None,
        bos_token=None,
        extra_special_tokens={
            "image_token": IMAGE_TOKEN,
            "prm_token": PRM_TOKEN,
            "im_start_token": IM_START,
        },
        model_max_length=2048,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast
