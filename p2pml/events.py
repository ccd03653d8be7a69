"""What a node tells its log about the ledger: one INFO line per notable change of a member (a
slash with its reason, an ejection, a seat taken or lost), found by comparing the ledger's state
with the one last logged, a few times a second: never one line per message."""

from __future__ import annotations

from dataclasses import dataclass

from p2pml.ledger import ACCURACY_WINDOW, BPS, MIN_AGREEMENT_BPS, STATUS_EJECTED, State


@dataclass(frozen=True, slots=True)
class Seen:
    name: str
    stake: int
    slashed: int
    status: str
    reason: str
    equivocation: tuple | None


def snapshot(state: State) -> dict[str, Seen]:
    return {pid: Seen(p.name, p.stake, p.slashed, p.status, p.reason, p.equivocation)
            for pid, p in state.peers.items()}


def changes(before: dict[str, Seen], after: dict[str, Seen]) -> list[str]:
    """The log lines for what changed from ``before`` to ``after`` (peer id -> Seen)."""
    lines = []
    for pid, a in sorted(after.items(), key=lambda kv: kv[1].name):
        b = before.get(pid)
        who = f"{a.name} ({pid[:12]})"
        if b is None:
            lines.append(f"member {who} holds seat {a.name!r} with stake {a.stake}")
            continue
        if a.slashed > b.slashed:
            if a.equivocation is not None and b.equivocation is None:
                why = f"{a.reason}: signed contradictory votes on round {a.equivocation[0][:16]}"
            else:
                why = (f"agreed with the consensus on less than {MIN_AGREEMENT_BPS * 100 // BPS}% "
                       f"of a {ACCURACY_WINDOW}-vote window")
            lines.append(f"slashed {who}: {a.slashed - b.slashed} tokens to the peers that agreed, "
                         f"stake {b.stake} -> {a.stake} ({why})")
        if a.status == STATUS_EJECTED and b.status != STATUS_EJECTED:
            lines.append(f"ejected {who}: {a.reason}; its votes no longer count")
    for pid, b in sorted(before.items(), key=lambda kv: kv[1].name):
        if pid not in after:
            lines.append(f"{b.name} ({pid[:12]}) no longer holds seat {b.name!r} "
                         f"(another registration won it)")
    return lines
