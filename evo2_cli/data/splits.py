"""The split hash, shared by preprocess and finetune: which of train, val and test a record belongs to."""

from __future__ import annotations

import hashlib
import math

SPLITS = ("train", "val", "test")


def split_of(key: bytes, seed: int, split: tuple[float, float, float]) -> int:
    """0 train, 1 val, 2 test: a uniform draw from a 64-bit hash of (seed, key), the same on every machine."""
    digest = hashlib.blake2b(b"%d\0" % seed + key, digest_size=8).digest()
    draw = int.from_bytes(digest, "big") / 2.0**64
    train, val, _ = split
    return 0 if draw < train else 1 if draw < train + val else 2


def position_cuts(length: int, split: tuple[float, float, float]) -> tuple[int, int]:
    """Where `split_by: position` cuts a record of `length` bases: train is the first floor(length * train)
    bases, test the last floor(length * test), val the bases between (so val takes the rounding)."""
    train, _, test = split
    train_end = math.floor(length * train)
    return train_end, max(train_end, length - math.floor(length * test))
