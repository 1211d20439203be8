"""``<prm>``, ``Yes`` and ``No``: adding the separator, resolving the reward tokens per family,
and reading images."""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mmprm_tasks.families import Family
from mmprm_tasks.traverse import PRM_SEPARATOR

PRM_TOKEN = PRM_SEPARATOR
YES_TOKEN = "Yes"
NO_TOKEN = "No"


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
    # A vocabulary entry spelled differently (a normalizer, a ▁/Ġ-prefixed piece standing in) would
    # put the loss on another word's logit: the id must decode to the token itself.
    if not unknown and tokenizer.decode([token_id]) != token:
        raise ValueError(
            f"the PRM reads the logit of {token!r}, but this tokenizer maps it to id {token_id}, which decodes to "
            f"{tokenizer.decode([token_id])!r}; fix the family's yes_token/no_token in mmprm_tasks/families.py")
    if unknown:
        pieces = tokenizer.tokenize(token)
        raise ValueError(
            f"the PRM reads the logit of {token!r}, which must be a single token in the vocabulary; this "
            f"tokenizer has no token {token!r} (the text splits into {len(pieces)} pieces {pieces}). Use a "
            f"checkpoint whose vocabulary has {YES_TOKEN!r} and {NO_TOKEN!r} as tokens."
        )
    return int(token_id)


def ensure_prm_tokens(processor: Any, model: Any | None = None, family: Family | None = None) -> PRMTokens:
    """Add ``<prm>`` as a special token when missing (resizing ``model``'s embeddings when the
    new id does not fit) and return the ids of ``<prm>``, ``Yes`` and ``No``.

    ``Yes`` and ``No`` are spelled as ``family`` says (default ``Yes``/``No``) and resolved with
    ``convert_tokens_to_ids`` as the release does; each id must decode to its token; fails
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
        yes_id=_vocab_token_id(tokenizer, family.yes_token if family else YES_TOKEN),
        no_id=_vocab_token_id(tokenizer, family.no_token if family else NO_TOKEN),
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
