"""Peer scoring (gossip.Scores) with a fake clock: the penalty decays, the limit ignores a
source for a while, then it starts afresh; memory is bounded however many sources appear."""

from __future__ import annotations

from p2pml import gossip
from p2pml.gossip import INVALID_HALF_LIFE_S, Scores


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_limit_ignores_for_a_while_then_forgets():
    clock = Clock()
    s = Scores(limit=10, ignore_s=30, clock=clock)
    s.penalize("address a", 9)
    assert not s.ignored("address a")
    s.penalize("address a")
    assert s.ignored("address a") == 30
    assert not s.ignored("address b")
    clock.t += 29
    assert 0 < s.ignored("address a") <= 1
    clock.t += 1.5
    assert s.ignored("address a") == 0
    s.penalize("address a", 9)  # afresh: nine more are not yet the limit
    assert not s.ignored("address a")


def test_penalty_decays_with_its_half_life():
    clock = Clock()
    s = Scores(limit=10, ignore_s=30, clock=clock)
    s.penalize("peer bo", 8)
    clock.t += INVALID_HALF_LIFE_S  # 8 -> 4
    s.penalize("peer bo", 5)  # 9 < 10
    assert not s.ignored("peer bo")
    assert s.view()["suspect"] == {"peer bo": 9.0}
    s.penalize("peer bo", 1)
    assert s.ignored("peer bo") and s.view()["ignored"] == {"peer bo": 30.0}


def test_memory_is_bounded(monkeypatch):
    monkeypatch.setattr(gossip, "MAX_SOURCES", 50)
    s = Scores(limit=10, ignore_s=30, clock=Clock())
    for i in range(500):
        s.penalize(f"address 10.0.{i // 256}.{i % 256}", 1 + i % 5)
    assert len(s._penalty) <= 50
    # the most suspect were kept
    assert min(c for c, _ in s._penalty.values()) >= 4
