"""The route cache's version rules, as a table of cases without a server.

``RouteTable`` makes every decision about versions (``kvstore.redis.route_table``); the
cache only carries out what it answers. Each case names what the table was fed and what
it must answer; the last test drives it against a model of the server through flushes,
restarts and restores of older snapshots, and checks that it always ends equal to the
server, and that a store always sees its own writes.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import cast

from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.redis.route_table import ASK_SERVER, Message, RouteTable

CLOCK = 1_700_000_000_000_000  # a counter made anew starts at the server's microseconds


def loaded(version: int = 10, **routes: str) -> RouteTable:
    table = RouteTable()
    assert table.apply_snapshot(version, routes, table.mark()) == sorted(routes.items())
    return table


def test_before_a_snapshot_every_lookup_asks_the_server() -> None:
    table = RouteTable()
    assert table.lookup("order") is ASK_SERVER
    table.note_write(3, "h1", ["order"])
    assert table.lookup("order") is ASK_SERVER
    assert not table.answering


def test_a_snapshot_no_one_watches_lists_no_changes_and_answers_all_the_same() -> None:
    table = loaded(10, order="h1")
    assert table.apply_snapshot(12, {"order": "h2", "billing": "h3"}, 10, changes=False) == []
    assert (table.lookup("order"), table.lookup("billing")) == ("h2", "h3")
    assert table.stream_table() == [("billing", "h3"), ("order", "h2")]
    assert table.apply_message(13, "h4", ["order"]) is Message.APPLIED


def test_a_snapshot_answers_its_routes_and_none_for_the_rest() -> None:
    table = loaded(10, order="h1")
    assert table.answering
    assert table.lookup("order") == "h1"
    assert table.lookup("never") is None


def test_messages_in_order_are_applied() -> None:
    table = loaded(10, order="h1")
    assert table.apply_message(11, "h2", ["order", "billing"]) is Message.APPLIED
    assert table.apply_message(12, "h3", ["order"]) is Message.APPLIED
    assert (table.lookup("order"), table.lookup("billing")) == ("h3", "h2")
    assert table.stream_table() == [("billing", "h2"), ("order", "h3")]


def test_messages_at_or_below_the_snapshot_before_the_first_applied_one_are_skipped() -> None:
    table = loaded(10, order="h10")
    # Published before the snapshot was read, delivered after: already in it.
    assert table.apply_message(9, "h9", ["order"]) is Message.SKIPPED
    assert table.apply_message(10, "h10", ["order"]) is Message.SKIPPED
    assert table.lookup("order") == "h10"
    assert table.answering


def test_a_skipped_version_stops_answering_until_a_reload() -> None:
    table = loaded(10, order="h1")
    assert table.apply_message(12, "h3", ["order"]) is Message.RELOAD
    assert table.lookup("order") is ASK_SERVER
    assert table.apply_snapshot(12, {"order": "h3"}, table.mark()) == [("order", "h3")]
    assert table.lookup("order") == "h3"


def test_a_message_without_types_reloads() -> None:
    table = loaded(10)
    assert table.apply_message(11, "h1", []) is Message.RELOAD
    assert not table.answering


def test_a_lower_message_after_an_applied_one_means_the_server_went_back() -> None:
    table = loaded(10, order="h10")
    assert table.apply_message(11, "h11", ["order"]) is Message.APPLIED
    assert table.apply_message(6, "restored", ["order"]) is Message.RELOAD
    assert table.lookup("order") is ASK_SERVER
    # The versions of the lost timeline are forgotten: the server's table at 6 wins.
    assert table.apply_snapshot(6, {"order": "restored"}, table.mark()) == [("order", "restored")]
    assert table.lookup("order") == "restored"
    assert table.apply_message(7, "h7", ["order"]) is Message.APPLIED
    assert table.lookup("order") == "h7"


def test_a_repeated_message_after_an_applied_one_means_the_server_went_back() -> None:
    table = loaded(10)
    assert table.apply_message(11, "h11", ["order"]) is Message.APPLIED
    assert table.apply_message(11, "other", ["order"]) is Message.RELOAD


def test_a_lower_message_once_settled_means_the_server_went_back() -> None:
    table = loaded(10, order="h10")
    table.settled()  # every message published before the snapshot has been delivered
    assert table.apply_message(4, "h4", ["order"]) is Message.RELOAD
    assert not table.answering


def test_a_snapshot_below_the_highest_version_seen_is_refused_and_resets() -> None:
    table = loaded(10, order="h10")
    table.note_write(20, "own", ["order"])
    floor = table.mark()
    assert table.apply_snapshot(8, {"order": "h8"}, floor) is None
    assert not table.answering
    # Taken again, the lower version is accepted, and the lost own write is dropped.
    assert table.apply_snapshot(8, {"order": "h8"}, table.mark()) == [("order", "h8")]
    assert table.lookup("order") == "h8"


def test_an_own_write_newer_than_the_snapshot_is_kept() -> None:
    table = loaded(10, order="h10")
    floor = table.mark()
    table.note_write(12, "own", ["order"])  # committed after the snapshot was read
    assert table.apply_snapshot(11, {"order": "h11"}, floor) == [("order", "h11")]
    assert table.lookup("order") == "own"
    assert table.apply_message(12, "own", ["order"]) is Message.APPLIED
    assert table.lookup("order") == "own"


def test_an_own_write_is_seen_at_once_and_an_older_message_does_not_undo_it() -> None:
    table = loaded(10, order="h10")
    table.note_write(12, "own", ["order"])
    assert table.lookup("order") == "own"
    assert table.apply_message(11, "h11", ["order"]) is Message.APPLIED
    assert table.lookup("order") == "own"


def test_an_own_write_after_a_backwards_move_is_seen() -> None:
    table = loaded(10, order="h10")
    assert table.apply_message(11, "h11", ["order"]) is Message.APPLIED
    assert table.apply_message(5, "h5", ["order"]) is Message.RELOAD
    assert table.apply_snapshot(5, {"order": "h5"}, table.mark()) is not None
    table.note_write(6, "own", ["order"])
    assert table.lookup("order") == "own"


def test_an_own_write_not_newer_than_the_entry_asks_the_server_until_shown_current() -> None:
    table = loaded(10, order="h10")
    assert table.apply_message(11, "h11", ["order"]) is Message.APPLIED
    # Version 6: a restore the table has not seen yet, or a write that lost to 11.
    table.note_write(6, "own", ["order"])
    assert table.lookup("order") is ASK_SERVER
    assert table.lookup("billing") is None, "other types still answer"
    # The server's version, read on its own, is at least 11: the write lost to 11.
    assert not table.version_read(11, table.mark())
    assert table.lookup("order") == "h11"


def test_an_own_write_not_newer_that_names_the_same_hash_needs_no_server() -> None:
    table = loaded(10, order="h10")
    table.note_write(9, "h10", ["order"])
    assert table.lookup("order") == "h10"


def test_an_own_write_below_every_version_seen_is_placed_by_the_reload_it_causes() -> None:
    table = loaded(10, order="h10")
    table.note_write(6, "own", ["order"])  # the server was restored to 5, unseen yet
    assert table.lookup("order") is ASK_SERVER
    assert table.version_read(6, table.mark()), "6 is below the 10 already seen: backwards"
    assert table.apply_snapshot(6, {"order": "own"}, table.mark()) is not None
    assert table.lookup("order") == "own"


def test_a_version_read_below_the_floor_resets_and_one_at_it_does_not() -> None:
    table = loaded(10, order="h10")
    assert not table.version_read(10, table.mark())
    assert not table.version_read(15, table.mark()), "messages still on their way"
    assert table.answering
    assert table.version_read(0, table.mark()), "FLUSHDB: the counter is gone"
    assert not table.answering
    assert table.apply_snapshot(0, {}, table.mark()) == []
    assert table.lookup("order") is None


def test_an_own_write_noted_while_a_read_was_on_its_way_is_no_backwards_move() -> None:
    table = loaded(10)
    floor = table.mark()
    table.note_write(11, "own", ["order"])  # committed after the GET was answered
    assert not table.version_read(10, floor)
    assert table.lookup("order") == "own"


def test_the_first_message_of_a_counter_made_anew_is_applied() -> None:
    table = loaded(10, order="h10")
    assert table.version_read(0, table.mark())
    assert table.apply_snapshot(0, {}, table.mark()) == []
    assert table.apply_message(CLOCK + 1, "new", ["order"]) is Message.APPLIED
    assert table.lookup("order") == "new"
    assert table.apply_message(CLOCK + 2, "newer", ["order"]) is Message.APPLIED


def test_a_namespace_never_written_takes_its_first_message() -> None:
    table = loaded(0)
    assert table.apply_message(CLOCK + 1, "h1", ["order"]) is Message.APPLIED
    assert table.lookup("order") == "h1"


def test_an_own_write_that_made_the_counter_is_applied_when_its_reply_came_first() -> None:
    # The store's first write makes the counter, at the clock; its reply can be noted
    # before its message arrives. That message is the counter's first, not a lost one.
    table = loaded(0)
    table.note_write(CLOCK + 1, "h1", ["order", "billing"])
    table.note_write(CLOCK + 2, "h2", ["order"])  # a second put, answered before either
    assert table.apply_message(CLOCK + 1, "h1", ["order", "billing"]) is Message.APPLIED
    assert table.answering
    assert table.stream_table() == [("billing", "h1"), ("order", "h1")]
    assert table.apply_message(CLOCK + 2, "h2", ["order"]) is Message.APPLIED
    assert table.lookup("order") == "h2"


def test_an_own_write_of_a_lost_counter_is_not_taken_for_a_new_ones_first() -> None:
    table = loaded(10, order="h10")
    table.note_write(12, "mine", ["order"])  # then FLUSHDB, before its message came
    assert table.version_read(0, table.mark())
    assert table.apply_snapshot(0, {}, table.mark()) == []
    assert table.apply_message(12, "mine", ["order"]) is Message.RELOAD


def test_a_counter_made_anew_at_a_version_seen_of_another_counter_is_reloaded() -> None:
    table = loaded(10, order="h10")
    assert table.apply_message(11, "h11", ["order"]) is Message.APPLIED
    assert table.version_read(0, table.mark())
    assert table.apply_snapshot(0, {}, table.mark()) == []
    # Not this store's write: a version no higher than one seen is not trusted.
    assert table.apply_message(11, "other", ["order"]) is Message.RELOAD


def test_a_message_of_a_counter_made_anew_after_an_old_one_is_a_skip() -> None:
    table = loaded(10, order="h10")
    assert table.apply_message(11, "h11", ["order"]) is Message.APPLIED
    # FLUSHDB, then a write: the new counter starts at the clock, far ahead.
    assert table.apply_message(CLOCK + 1, "new", ["order"]) is Message.RELOAD
    assert table.apply_snapshot(CLOCK + 1, {"order": "new"}, table.mark()) is not None
    assert table.lookup("order") == "new"


def test_a_reload_reports_to_watches_what_changed_since_the_stream_table() -> None:
    table = loaded(10, order="h10", billing="b10")
    table.note_write(11, "own", ["order"])  # not in the stream table until its message
    assert table.version_read(0, table.mark())
    assert table.apply_snapshot(3, {"order": "h3", "billing": "b10"}, table.mark()) == [
        ("order", "h3")
    ]
    assert table.stream_table() == [("billing", "b10"), ("order", "h3")]


def test_going_down_stops_answering_and_a_snapshot_resumes() -> None:
    table = loaded(10, order="h10")
    table.go_down()
    assert table.lookup("order") is ASK_SERVER
    assert table.apply_snapshot(10, {"order": "h10"}, table.mark()) == []
    assert table.lookup("order") == "h10"


# The table against a model of the server.


@dataclass
class Server:
    """A namespace's routes, counter and subscription, as the scripts keep them."""

    clock: int = CLOCK
    counter: int | None = None
    routes: dict[str, str] = field(default_factory=dict)
    # What the cache's subscription has yet to deliver: messages and PING answers.
    queue: deque[tuple[int, str, list[str]] | int] = field(default_factory=deque)
    saved: tuple[int | None, dict[str, str]] | None = None

    def write(self, content_hash: str, types: list[str]) -> int:
        self.clock += 1_000  # microseconds pass; writes are far slower than a million a second
        if self.counter is None:
            self.counter = self.clock
        self.counter += 1
        for workflow_type in types:
            self.routes[workflow_type] = content_hash
        self.queue.append((self.counter, content_hash, types))
        return self.counter


class Cache:
    """What ``RouteCache`` does with the table, against the model server."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.table = RouteTable()
        self.generation = 0
        self.reload()

    def reload(self) -> None:
        for _ in range(5):
            floor = self.table.mark()
            snapshot = (self.server.counter or 0, dict(self.server.routes))
            if self.table.apply_snapshot(*snapshot, floor) is not None:
                self.generation += 1
                self.server.queue.append(self.generation)  # the PING after a snapshot
                return
        raise AssertionError("a model server never goes back twice in a row")

    def deliver(self) -> None:
        item = self.server.queue.popleft()
        if isinstance(item, int):
            if item == self.generation:
                self.table.settled()
        elif self.table.apply_message(*item) is Message.RELOAD:
            self.reload()

    def check(self) -> None:
        floor = self.table.mark()
        if self.table.version_read(self.server.counter or 0, floor):
            self.reload()

    def reconnect(self) -> None:
        self.server.queue.clear()  # a restarted server ends the subscription
        self.table.go_down()
        self.reload()


types = st.sampled_from(["a", "b", "c"])
hashes = st.sampled_from(["x", "y", "z"])
operations = st.lists(
    st.one_of(
        st.tuples(st.sampled_from(["own", "other"]), hashes, st.lists(types, min_size=1)),
        st.tuples(
            st.sampled_from(
                ["deliver", "deliver", "check", "flush", "save", "restore", "empty-restart"]
            )
        ),
    ),
    max_size=60,
)


@settings(max_examples=400, deadline=None)
@given(operations)
def test_the_table_always_ends_equal_to_the_server_and_shows_own_writes(
    ops: list[tuple[object, ...]],
) -> None:
    server = Server()
    cache = Cache(server)
    # The own writes the server still holds: a lookup must give them or ask the server.
    own: dict[str, str] = {}
    for op in ops:
        kind = op[0]
        if kind in ("own", "other"):
            content_hash, written = str(op[1]), [str(t) for t in cast(list[str], op[2])]
            version = server.write(content_hash, written)
            for workflow_type in written:
                own.pop(workflow_type, None)
            if kind == "own":
                cache.table.note_write(version, content_hash, written)
                own.update(dict.fromkeys(written, content_hash))
        elif kind == "deliver" and server.queue:
            cache.deliver()
        elif kind == "check":
            cache.check()
        elif kind == "flush":
            server.counter, server.routes = None, {}  # the subscription lives on
            own.clear()
        elif kind == "save":
            server.saved = (server.counter, dict(server.routes))
        elif kind == "restore" and server.saved is not None:
            server.counter, server.routes = server.saved[0], dict(server.saved[1])
            own.clear()
            cache.reconnect()
        elif kind == "empty-restart":
            server.counter, server.routes = None, {}
            own.clear()
            cache.reconnect()
        for workflow_type, content_hash in own.items():
            assert cache.table.lookup(workflow_type) in (content_hash, ASK_SERVER)

    # Quiet: every message delivered, then the version read on its own.
    for _ in range(2):
        while server.queue:
            cache.deliver()
        cache.check()
    assert cache.table.answering
    for workflow_type in "abc":
        assert cache.table.lookup(workflow_type) == server.routes.get(workflow_type)
