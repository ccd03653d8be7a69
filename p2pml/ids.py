"""Compact tables of ids: what a long-running node must remember of every message it ever held.

A dict entry keyed by a 32-byte id costs about 200 bytes of Python objects (the bytes object,
the entry, the value); kept for every message, that was most of a node's growth once old rounds
left memory. Here entries are merged, in batches, into sorted numpy arrays: about 40 bytes each.
The arrays come in chunks of at most CHUNK ids, so that a merge never copies more than one
chunk (at 4 million ids, merging into one array took over a second on the event loop). The
newest entries stay in a dict, which is also where lookups of recent ids (most of them) are
answered. ``get`` and ``have`` are safe from another thread while the owning thread adds and
merges (a merge publishes the new chunks in one assignment before it empties the dict); the
listings are for the owning thread.
"""

from __future__ import annotations

import bisect

import numpy as np

MERGE_MIN = 4096  # entries the dict takes before the first merge
MERGE_SHARE = 16  # later, a merge once the dict holds 1/16 of the open chunk (~16 copies each)
CHUNK = 1 << 20  # ids in a chunk: a merge copies at most this many (40 MB, ~0.1 s)
FILTER_BITS_PER_ID = 8  # at least: about 1 in 9 ids not held needs a search of a chunk
FILTER_MIN_BITS = 1 << 16  # 8 KiB


class _Chunk:
    """Sorted ids, their values, and a Bloom filter with one hash (ids are hashes): a bit for
    each value of the first 32 - ``shift`` bits of an id, set if an id here starts so."""

    __slots__ = ("bits", "ids", "shift", "values")

    def __init__(self, ids: np.ndarray, values: np.ndarray, width: int):
        self.ids, self.values = ids, values
        size = max(FILTER_MIN_BITS, 1 << (FILTER_BITS_PER_ID * len(ids) - 1).bit_length())
        self.shift = 33 - size.bit_length()
        first = np.ascontiguousarray(ids.view(np.uint8).reshape(-1, width)[:, :4]).view(">u4").ravel()
        b = first >> self.shift
        bits = np.zeros(size // 8, np.uint8)
        np.bitwise_or.at(bits, b >> 3, (1 << (b & 7)).astype(np.uint8))
        self.bits = bits.tobytes()

    def find(self, key: bytes) -> int | None:
        """The value of ``key`` (None if not here), by a search (callers check ``bits`` first)."""
        ids = self.ids
        i = int(ids.searchsorted(key))
        if i < len(ids) and ids[i] == key.rstrip(b"\0"):
            return int(self.values[i])
        return None


class IdTable:
    """Fixed-width ids (``width`` bytes, at least 4) mapped to integers in [0, 2**63),
    insert-only."""

    def __init__(self, width: int):
        if width < 4:
            raise ValueError("ids of at least 4 bytes")
        self.width = width
        self._dtype = np.dtype(f"S{width}")  # strips trailing zero bytes: see _full
        self._recent: dict[bytes, int] = {}
        self._chunks: tuple[_Chunk, ...] = ()  # the last one is open: merges go into it
        self._merged = 0  # ids in the chunks

    def __len__(self) -> int:
        return len(self._recent) + self._merged

    def __contains__(self, key: bytes) -> bool:
        return self.get(key) is not None

    def get(self, key: bytes, default: int | None = None) -> int | None:
        found = self._recent.get(key)
        if found is not None:
            return found
        first = int.from_bytes(key[:4], "big")
        for chunk in self._chunks:
            b = first >> chunk.shift
            if chunk.bits[b >> 3] >> (b & 7) & 1:
                found = chunk.find(key)
                if found is not None:
                    return found
        return default

    def have(self, keys: list[bytes]) -> list[bool]:
        """Whether each of ``keys`` is held: one vectorized search a chunk for them all
        (anti-entropy checks thousands of ids at once)."""
        recent = self._recent
        out = [k in recent for k in keys]
        for chunk in self._chunks:
            rest = [i for i, found in enumerate(out) if not found]
            if not rest:
                break
            asked = np.array([keys[i] for i in rest], self._dtype)
            at = np.minimum(chunk.ids.searchsorted(asked), len(chunk.ids) - 1)
            for i, found in zip(rest, (chunk.ids[at] == asked).tolist()):
                out[i] = found
        return out

    def add(self, key: bytes, value: int = 0) -> None:
        """Map ``key`` (not held yet: the caller checks) to ``value``."""
        if len(key) != self.width:
            raise ValueError(f"an id here is {self.width} bytes, not {len(key)}")
        self._recent[key] = value
        open_size = len(self._chunks[-1].ids) if self._chunks else 0
        if len(self._recent) >= max(MERGE_MIN, open_size // MERGE_SHARE):
            self._merge()

    def _merge(self) -> None:
        chunks = list(self._chunks)
        new = np.array(list(self._recent), self._dtype)
        order = new.argsort(kind="stable")
        new = new[order]
        new_values = np.fromiter(self._recent.values(), np.int64, len(self._recent))[order]
        if chunks and len(chunks[-1].ids) + len(new) <= CHUNK:
            last = chunks.pop()
            at = last.ids.searchsorted(new)
            new, new_values = np.insert(last.ids, at, new), np.insert(last.values, at, new_values)
        chunks.append(_Chunk(new, new_values, self.width))
        # one assignment: a reader in another thread sees the old chunks or the new ones
        self._chunks = tuple(chunks)
        self._merged += len(self._recent)
        self._recent = {}

    def _full(self, key: np.bytes_) -> bytes:
        return bytes(key).ljust(self.width, b"\0")

    def view(self) -> IdView:
        """Every id held now, by index, without making a bytes object of each until asked:
        a ledger rebuild goes through millions of them, in another thread."""
        return IdView([chunk.ids for chunk in self._chunks], list(self._recent), self.width)

    def newest_by_first_byte(self) -> dict[int, list[bytes]]:
        """The ids not merged yet, by first byte (one pass: for listing many buckets)."""
        out: dict[int, list[bytes]] = {}
        for key in self._recent:
            out.setdefault(key[0], []).append(key)
        return out

    def in_bucket(self, b: int, after: bytes | None = None, limit: int | None = None,
                  newest: dict[int, list[bytes]] | None = None) -> list[bytes]:
        """The ids whose first byte is ``b``, sorted; only those greater than ``after`` if
        given; the first ``limit`` of them if given (``newest``: ``newest_by_first_byte()``,
        when listing many buckets)."""
        out: list[bytes] = []
        for chunk in self._chunks:
            ids = chunk.ids
            lo = int(ids.searchsorted(after if after is not None else bytes([b])))
            if after is not None and lo < len(ids) and ids[lo] == after.rstrip(b"\0"):
                lo += 1
            hi = len(ids) if b == 255 else int(ids.searchsorted(bytes([b + 1])))
            if limit is not None:
                hi = min(hi, lo + limit)
            out += [self._full(k) for k in ids[lo:hi]]
        more = (newest if newest is not None else self.newest_by_first_byte()).get(b, ())
        out += [k for k in more if after is None or k > after]
        out.sort()  # sorted runs, one a chunk, and a short one: about linear
        if limit is not None:
            del out[limit:]
        return out


class IdView:
    """A fixed sequence of ids: sorted arrays (numpy ``S`` dtype) and then a list of bytes."""

    def __init__(self, arrays: list[np.ndarray], tail: list[bytes], width: int):
        self._arrays, self._tail, self._width = arrays, tail, width
        self._starts = [0]
        for a in arrays:
            self._starts.append(self._starts[-1] + len(a))

    def __len__(self) -> int:
        return self._starts[-1] + len(self._tail)

    def __getitem__(self, i: int) -> bytes:
        if not 0 <= i < len(self):
            raise IndexError(i)
        if i >= self._starts[-1]:
            return self._tail[i - self._starts[-1]]
        k = bisect.bisect_right(self._starts, i) - 1
        return bytes(self._arrays[k][i - self._starts[k]]).ljust(self._width, b"\0")

    def extended(self, more: list[bytes]) -> IdView:
        return IdView(self._arrays, self._tail + more, self._width)
