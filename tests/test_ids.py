"""IdTable: the compact id tables behave as a dict, whatever merges happened, and are compact."""

from __future__ import annotations

import hashlib
import threading
import tracemalloc

from hypothesis import given, settings
from hypothesis import strategies as st

from p2pml import ids as ids_module
from p2pml.ids import IdTable

# ids that end (or start) in zero bytes: the numpy dtype strips trailing zeros
ID = st.one_of(st.binary(min_size=32, max_size=32),
               st.binary(min_size=1, max_size=31).map(lambda b: b.ljust(32, b"\0")),
               st.binary(min_size=1, max_size=31).map(lambda b: b.rjust(32, b"\0")))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(ID, st.integers(0, 2**63 - 1)), max_size=120), st.lists(ID, max_size=20))
def test_an_id_table_answers_as_a_dict_would(entries, probes):
    old = ids_module.MERGE_MIN
    ids_module.MERGE_MIN = 7  # merge often: most entries go through the sorted arrays
    old_chunk, ids_module.CHUNK = ids_module.CHUNK, 20  # and in several chunks
    try:
        table, ref = IdTable(32), {}
        for key, value in entries:
            if key not in ref:
                table.add(key, value)
                ref[key] = value
        for key in [k for k, _ in entries] + probes:
            assert table.get(key) == ref.get(key) and (key in table) == (key in ref)
        assert len(table) == len(ref)
        view = table.view()  # what a rebuild reads, by index
        assert len(view) == len(ref) and sorted(view[i] for i in range(len(view))) == sorted(ref)
        asked = [k for k, _ in entries] + probes
        assert table.have(asked) == [k in ref for k in asked]
        firsts = {k[0] for k in ref} | {0, 255}
        for b in firsts:
            assert table.in_bucket(b) == sorted(k for k in ref if k[0] == b)
        # paging: the ids after a given one (held or not), at most a few
        after = {p[0]: p for p in probes} | {k[0]: k for k in list(ref)[::3]}
        newest = table.newest_by_first_byte()
        for b in firsts:
            assert table.in_bucket(b, after.get(b), 3, newest) == sorted(k for k in ref if k[0] == b and (b not in after or k > after[b]))[:3]
    finally:
        ids_module.MERGE_MIN, ids_module.CHUNK = old, old_chunk


def test_an_id_table_rejects_an_id_of_another_width():
    table = IdTable(16)
    try:
        table.add(b"x" * 32)
    except ValueError as exc:
        assert "16 bytes, not 32" in str(exc)
    else:
        raise AssertionError("a 32-byte id went into a 16-byte table")


def test_a_reader_thread_never_misses_an_entry_during_merges():
    """Holdings.get runs in worker threads while the event loop adds (and merges)."""
    table = IdTable(32)
    keys = [hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(60_000)]
    added = 0
    missed: list[int] = []
    done = threading.Event()

    def reader():
        while not done.is_set():
            n = added
            for i in range(max(0, n - 50), n):
                if table.get(keys[i]) != i:
                    missed.append(i)

    t = threading.Thread(target=reader)
    t.start()
    try:
        for i, key in enumerate(keys):
            table.add(key, i)
            added = i + 1
    finally:
        done.set()
        t.join(10)
    assert missed == [] and len(table) == len(keys)


def test_an_id_table_takes_a_fraction_of_a_dicts_memory():
    keys = [hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(300_000)]
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        as_dict = {bytes(bytearray(k)): i for i, k in enumerate(keys)}  # fresh ids, as decoded ones
        dict_bytes = tracemalloc.get_traced_memory()[0] - base
        del as_dict
        base = tracemalloc.get_traced_memory()[0]
        table = IdTable(32)
        for i, k in enumerate(keys):
            table.add(k, i)
        table_bytes = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert table.get(keys[12345]) == 12345
    per_entry = table_bytes / len(keys)
    assert per_entry < 60, per_entry  # 40 in the arrays, the dict of the newest, a 2 MiB filter
    assert table_bytes * 2.5 < dict_bytes  # about 145 bytes an entry, (table_bytes, dict_bytes)


def test_a_node_fixes_glibcs_mmap_threshold():
    """With glibc (this machine's C library) the node keeps the mmap threshold where it starts,
    so the tables' replaced arrays go back to the system instead of fragmenting the heap."""
    import platform

    from p2pml.node import steady_malloc

    assert steady_malloc() is (platform.libc_ver()[0] == "glibc")
