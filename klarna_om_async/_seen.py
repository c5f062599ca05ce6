"""A set of strings in 8 to 24 bytes each: a batch's memory of the items it has taken.

A million item keys in a ``set`` of ``str`` take about 100 MiB; their 64-bit hashes in an
open-addressed ``array`` take 16 MiB. Two different strings share a hash with odds of about
n²/2⁶⁵ (1 in 37 million for a million items): the later one is then taken for a duplicate
and refused, which moves no money and says so (a rerun sends it), while a missed duplicate
could capture twice. The hashes are Python's own (SipHash, seeded per process, so nobody can
craft a collision), or BLAKE2b where the platform's hash is narrower than 64 bits.
"""

from __future__ import annotations

import hashlib
import sys
from array import array

__all__ = ("SeenSet",)

_BITS = 64
_MASK = (1 << _BITS) - 1


def _blake2b(value: str) -> int:
    return int.from_bytes(hashlib.blake2b(value.encode(), digest_size=8).digest(), "little")


_hash = hash if sys.hash_info.width >= _BITS else _blake2b


class SeenSet:
    """Remembers strings by a 64-bit hash; ``add`` says whether one was already there."""

    def __init__(self) -> None:
        # 0 marks an empty slot; a hash of 0 is stored as 1.
        self._slots = array("Q", bytes(8 * 1024))
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def __contains__(self, value: str) -> bool:
        digest = (_hash(value) & _MASK) or 1
        return self._slots[self._index(digest)] == digest

    def add(self, value: str) -> bool:
        """Remember ``value``; False if it (or a string with its hash) was already here."""
        digest = (_hash(value) & _MASK) or 1
        slots = self._slots
        index = self._index(digest)
        if slots[index]:
            return False
        slots[index] = digest
        self._count += 1
        if 3 * self._count > 2 * len(slots):
            self._grow()
        return True

    def _index(self, digest: int) -> int:
        """The slot holding ``digest``, or the empty slot where it belongs."""
        slots = self._slots
        mask = len(slots) - 1
        index = digest & mask
        while (held := slots[index]) and held != digest:
            index = (index + 1) & mask  # linear probing: the table stays under 2/3 full
        return index

    def _grow(self) -> None:
        old = self._slots
        self._slots = slots = array("Q", bytes(16 * len(old)))
        mask = len(slots) - 1
        for digest in old:
            if digest:
                index = digest & mask
                while slots[index]:
                    index = (index + 1) & mask
                slots[index] = digest
