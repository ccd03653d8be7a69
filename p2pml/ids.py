"""Compact tables of ids: what a long-running node must remember of every message it ever held.

A dict entry keyed by a 32-byte id costs about 200 bytes of Python objects (the bytes object,
the entry, the value); kept for every message, that was most of a node's growth once old rounds
left memory. Here entries are merged, in batches, into sorted numpy arrays: about 40 bytes each.
The newest entries stay in a dict, which is also where lookups of recent ids (most of them)
are answered. Safe to read from another thread while the event loop writes: a merge replaces
the arrays in one assignment before it empties the dict.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

MERGE_MIN = 4096  # entries the dict takes before the first merge
MERGE_SHARE = 16  # later, a merge once the dict holds 1/16 of the arrays (each entry copied ~16x)
FILTER_BITS_PER_ID = 8  # at least: about 1 in 9 ids not held needs a search of the arrays
FILTER_MIN_BITS = 1 << 19  # 64 KiB


class IdTable:
    """Fixed-width ids (``width`` bytes, at least 4) mapped to integers in [0, 2**63),
    insert-only."""

    def __init__(self, width: int):
        self.width = width
        self._dtype = np.dtype(f"S{width}")  # strips trailing zero bytes: see _full
        self._recent: dict[bytes, int] = {}
        # (ids, values, filter, shift), replaced whole at a merge. The filter has a bit for
        # each value of the first 32 - shift bits of an id, set if a sorted id starts so (a
        # Bloom filter with one hash: ids are hashes). A new message is looked up in two or
        # three tables: a search of the arrays costs 2.5 us, the filter 0.5.
        self._sorted = (np.empty(0, self._dtype), np.empty(0, np.int64), b"", 32)

    def __len__(self) -> int:
        return len(self._recent) + len(self._sorted[0])

    def __contains__(self, key: bytes) -> bool:
        return self.get(key) is not None

    def get(self, key: bytes, default: int | None = None) -> int | None:
        found = self._recent.get(key)
        if found is not None:
            return found
        keys, values, bits, shift = self._sorted
        if not bits:
            return default
        b = int.from_bytes(key[:4], "big") >> shift
        if not bits[b >> 3] >> (b & 7) & 1:
            return default
        i = int(keys.searchsorted(key))
        if i < len(keys) and keys[i] == key.rstrip(b"\0"):
            return int(values[i])
        return default

    def add(self, key: bytes, value: int = 0) -> None:
        """Map ``key`` (not held yet: the caller checks) to ``value``."""
        if len(key) != self.width:
            raise ValueError(f"an id here is {self.width} bytes, not {len(key)}")
        self._recent[key] = value
        if len(self._recent) >= max(MERGE_MIN, len(self._sorted[0]) // MERGE_SHARE):
            self._merge()

    def _merge(self) -> None:
        keys, values, _, _ = self._sorted
        new = np.array(list(self._recent), self._dtype)
        order = new.argsort(kind="stable")
        new = new[order]
        new_values = np.fromiter(self._recent.values(), np.int64, len(self._recent))[order]
        at = keys.searchsorted(new)
        keys, values = np.insert(keys, at, new), np.insert(values, at, new_values)
        size = max(FILTER_MIN_BITS, 1 << (FILTER_BITS_PER_ID * len(keys) - 1).bit_length())
        shift = 33 - size.bit_length()
        first = keys.view(np.uint8).reshape(-1, self.width)[:, :4].astype(np.uint32)
        b = ((first[:, 0] << 24) | (first[:, 1] << 16) | (first[:, 2] << 8) | first[:, 3]) >> shift
        flags = np.zeros(size, bool)
        flags[b] = True
        # one assignment: a reader in another thread sees the old tables or the new ones
        self._sorted = (keys, values, np.packbits(flags, bitorder="little").tobytes(), shift)
        self._recent = {}

    def have(self, keys: list[bytes]) -> list[bool]:
        """Whether each of ``keys`` is held: one vectorized search for them all (anti-entropy
        checks thousands of ids at once)."""
        recent = self._recent
        out = [k in recent for k in keys]
        ids = self._sorted[0]
        rest = [i for i, found in enumerate(out) if not found]
        if rest and len(ids):
            asked = np.array([keys[i] for i in rest], self._dtype)
            at = np.minimum(ids.searchsorted(asked), len(ids) - 1)
            for i, found in zip(rest, (ids[at] == asked).tolist()):
                out[i] = found
        return out

    def _full(self, key: np.bytes_) -> bytes:
        return bytes(key).ljust(self.width, b"\0")

    def __iter__(self) -> Iterator[bytes]:
        keys = self._sorted[0]
        recent = list(self._recent)
        for k in keys:
            yield self._full(k)
        yield from recent

    def items(self) -> Iterator[tuple[bytes, int]]:
        keys, values = self._sorted[:2]
        recent = list(self._recent.items())
        for k, v in zip(keys, values.tolist()):
            yield self._full(k), v
        yield from recent

    def by_first_byte(self, firsts: Iterable[int], after: dict[int, bytes] | None = None,
                      limit: int | None = None) -> dict[int, list[bytes]]:
        """The ids whose first byte is in ``firsts``, by that byte, in order; with ``after``,
        only those greater than ``after[byte]``; with ``limit``, the first ``limit`` of them."""
        keys = self._sorted[0]
        after = after or {}
        out: dict[int, list[bytes]] = {}
        for b in sorted(set(firsts)):
            lo = int(keys.searchsorted(after[b] if b in after else bytes([b])))
            if b in after and lo < len(keys) and keys[lo] == after[b].rstrip(b"\0"):
                lo += 1
            hi = len(keys) if b == 255 else int(keys.searchsorted(bytes([b + 1])))
            if limit is not None:
                hi = min(hi, lo + limit)
            out[b] = [self._full(k) for k in keys[lo:hi]]
        newest: dict[int, list[bytes]] = {}
        for key in list(self._recent):
            if key[0] in out and (key[0] not in after or key > after[key[0]]):
                newest.setdefault(key[0], []).append(key)
        for b, ids in newest.items():
            ids = sorted(out[b] + ids)
            out[b] = ids if limit is None else ids[:limit]
        return out
