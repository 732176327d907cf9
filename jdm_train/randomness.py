"""Random draws keyed by what they are for: a generator seeded by a hash of the whole key, so no
two keys share a stream (an arithmetic key such as micro + 1000 * repeat can collide) and a draw
does not depend on what was drawn before it (a resumed run repeats an uninterrupted one)."""

from __future__ import annotations

import hashlib

import torch


def keyed_generator(key: tuple, device: torch.device | str = "cpu") -> torch.Generator:
    digest = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))
