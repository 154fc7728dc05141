"""The store's own packing of commands is the Redis protocol, byte for byte."""

from __future__ import annotations

import hiredis
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvstore.redis.wire import SLICE, Command, PrePacked, flatten, pack_commands, pack_parts

# Arguments as the store passes them: bytes, text (any that encodes as UTF-8), integers.
arguments = st.one_of(
    st.binary(max_size=40),
    st.binary(min_size=250, max_size=300),  # across the longest header formatted once
    st.text(st.characters(codec="utf-8"), max_size=20),
    st.integers(),
)
runs = st.lists(arguments, min_size=1, max_size=4).map(lambda args: PrePacked(*args))
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
        expected.extend(arg.args if isinstance(arg, PrePacked) else [arg])
    flat = flatten(command)
    assert flat == tuple(expected)
    assert not any(isinstance(arg, PrePacked) for arg in flat)


def test_a_command_without_runs_is_returned_as_it_is() -> None:
    command = ("GET", b"key", 3)
    assert flatten(command) is command


def test_a_run_is_packed_once_when_it_is_made() -> None:
    run = PrePacked("EVALSHA", b"abc", 2)
    assert run.packed == b"$7\r\nEVALSHA\r\n$3\r\nabc\r\n$1\r\n2\r\n"
    assert pack_commands([(run, b"k")]) == b"*4\r\n" + run.packed + b"$1\r\nk\r\n"


def test_an_empty_run_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one"):
        PrePacked()


@given(st.lists(commands, max_size=6), st.integers(min_value=1, max_value=50))
def test_parts_joined_are_the_packed_commands(batch: list[Command], slice_size: int) -> None:
    parts = pack_parts(batch, slice_size)
    assert b"".join(parts) == pack_commands(batch)
    assert all(len(part) > 0 for part in parts)
    assert all(len(part) <= slice_size for part in parts if isinstance(part, memoryview))


@pytest.mark.parametrize(
    "size", [0, 1, SLICE - 1, SLICE, SLICE + 1, 2 * SLICE, 5 * SLICE + 12345, 9 * SLICE]
)
def test_a_large_archive_is_sent_in_slices_never_copied(size: int) -> None:
    archive = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
    run = PrePacked("EVALSHA", b"abc", 2)
    batch: list[Command] = [("GET", b"f"), (run, b"row", archive, "\u00e9", 7), ("PING",)]
    parts = pack_parts(batch)
    assert b"".join(parts) == pack_commands(batch)
    views = [part for part in parts if isinstance(part, memoryview)]
    if size < SLICE:
        assert views == [] and len(parts) == 1
    else:
        # Slices of the archive itself, in order, each at most SLICE bytes.
        assert all(view.obj is archive for view in views)
        assert [len(view) for view in views] == [
            min(SLICE, size - start) for start in range(0, size, SLICE)
        ]
        assert len(parts) == len(views) + 2  # the protocol before, and after


def test_a_slice_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="slice_size"):
        pack_parts([("PING",)], 0)
