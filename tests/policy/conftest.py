"""Fixtures for the policy backends: a real tiny LLaVA checkpoint and real HTTP peers.

``policy_dir`` is the shipped toy policy (``mmprm_tasks/assets/toy_policy``) when it exists, else
a randomly initialised tiny model built with the toy builders.  ``random_policy_dir`` is always
the random one (its completions carry no step tags, which some tests rely on).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from helpers import HTTPPeer

from mmprm_tasks.settings import TOY_POLICY_DIR


def _build_random_policy(out: Path) -> Path:
    from mmprm_tasks.toy.model import build_tiny_vlm
    from mmprm_tasks.toy.tokenizer import build_tokenizer

    model, processor = build_tiny_vlm(build_tokenizer(), seed=0)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


@pytest.fixture(autouse=True, scope="package")
def _one_torch_thread():
    """The models here are tiny: one intra-op thread is faster than two, and far faster when the
    cores are shared (OpenMP workers spin-wait for a busy core)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def random_policy_dir(tmp_path_factory) -> Path:
    return _build_random_policy(tmp_path_factory.mktemp("random_policy"))


@pytest.fixture(scope="session")
def policy_dir(tmp_path_factory) -> Path:
    if (TOY_POLICY_DIR / "config.json").exists():
        return TOY_POLICY_DIR
    return _build_random_policy(tmp_path_factory.mktemp("policy"))


def png_bytes(color: tuple[int, int, int] = (255, 255, 255), text: str = "") -> bytes:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (64, 64), color)
    if text:
        ImageDraw.Draw(image).text((4, 20), text, fill=(0, 0, 0))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="session")
def images() -> list[bytes]:
    return [png_bytes(text="3 4"), png_bytes((230, 230, 255), "5 1 2"), png_bytes(text="9")]


@pytest.fixture
def http_peer() -> Iterator[Callable[..., HTTPPeer]]:
    peers: list[HTTPPeer] = []

    def make(handler: Callable[[str, dict], tuple[int, dict]]) -> HTTPPeer:
        peer = HTTPPeer(handler)
        peers.append(peer)
        return peer

    yield make
    for peer in peers:
        peer.close()
