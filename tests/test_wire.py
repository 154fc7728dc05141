"""The store's own packing of commands is the Redis protocol, byte for byte."""

from __future__ import annotations

import hiredis
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvstore.redis.wire import Command, Recurring, flatten, pack_commands

# Arguments as the store passes them: bytes, text (any that encodes as UTF-8), integers.
arguments = st.one_of(
    st.binary(max_size=40),
    st.text(st.characters(codec="utf-8"), max_size=20),
    st.integers(),
)
runs = st.lists(arguments, min_size=1, max_size=4).map(lambda args: Recurring(*args))
commands = st.lists(st.one_of(arguments, runs), min_size=1, max_size=8).map(tuple)


@given(st.lists(commands, max_size=6))
def test_packed_commands_are_what_hiredis_packs_with_runs_spelled_out(
    batch: list[Command],
) -> None:
    expected = b"".join(hiredis.pack_command(flatten(command)) for command in batch)
    assert pack_commands(batch) == expected


@given(commands)
def test_flatten_spells_out_every_run_in_place(command: Command) -> None:
    expected: list[object] = []
    for arg in command:
        expected.extend(arg.args if isinstance(arg, Recurring) else [arg])
    flat = flatten(command)
    assert flat == tuple(expected)
    assert not any(isinstance(arg, Recurring) for arg in flat)


def test_a_command_without_runs_is_returned_as_it_is() -> None:
    command = ("GET", b"key", 3)
    assert flatten(command) is command


def test_a_run_is_packed_once_when_it_is_made() -> None:
    run = Recurring("EVALSHA", b"abc", 2)
    assert run.packed == b"$7\r\nEVALSHA\r\n$3\r\nabc\r\n$1\r\n2\r\n"
    assert pack_commands([(run, b"k")]) == b"*4\r\n" + run.packed + b"$1\r\nk\r\n"


def test_an_empty_run_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one"):
        Recurring()
