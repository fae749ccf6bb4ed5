"""The record state table: walked pair by pair, and only two functions of the spool's code
write a state (the spool itself is held to it in ``tests/component/test_states_spool.py``)."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest

from gateway.spool.records import (
    LIVE,
    TRANSITIONS,
    IllegalTransition,
    State,
    check_transition,
    sources_of,
)

LEGAL = {
    (State.QUEUED, State.DELIVERED),
    (State.QUEUED, State.HELD),
    (State.QUEUED, State.ERASED),
    (State.HELD, State.QUEUED),
    (State.HELD, State.ERASED),
    (State.DELIVERED, State.ERASED),
}
"""Written out by hand: the table must say exactly this."""


@pytest.mark.parametrize(("old", "new"), list(itertools.product(State, State)))
def test_every_pair_of_states_is_legal_exactly_when_the_table_says(old: State, new: State) -> None:
    if (old, new) in LEGAL:
        check_transition(old, new)
        assert new in TRANSITIONS[old] and old in sources_of(new)
    else:
        with pytest.raises(IllegalTransition, match=f"from {old} to {new}"):
            check_transition(old, new)
        assert old not in sources_of(new)


def test_erased_is_final_and_every_other_state_may_be_erased() -> None:
    assert TRANSITIONS[State.ERASED] == frozenset()
    assert set(LIVE) == {State.QUEUED, State.HELD, State.DELIVERED}


def test_no_statement_outside_the_two_state_changers_writes_the_state() -> None:
    """Only queries.move and queries.erase_rows change a record's state: every UPDATE of
    ``state`` in the spool's code is in one of them."""
    root = Path(__file__).resolve().parents[2] / "gateway" / "spool"
    writers = []
    for path in root.glob("*.py"):
        for match in re.finditer(r"UPDATE records SET[^\"]*state=", path.read_text()):
            writers.append((path.name, match.group(0)))
    assert {name for name, _ in writers} == {"queries.py"}
    text = (root / "queries.py").read_text()
    functions = [m.group(1) for m in re.finditer(r"^def (\w+)\(", text, re.M)]
    holders = set()
    for name in functions:
        body = text.split(f"def {name}(", 1)[1].split("\ndef ", 1)[0]
        if re.search(r"UPDATE records SET[^\"]*state=", body):
            holders.add(name)
    assert holders == {"move", "erase_rows"}
