"""What the pipeliner keeps track of: units waiting for replies, batches sent, lanes.

Plain records, with no behaviour: ``kvstore.redis.pipeline`` decides what happens to
them, and its deadline sweep (``kvstore.redis.deadlines``) finds units wherever these
hold them.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kvstore.redis.wire import Command


class Pending:
    """A unit of commands waiting for its replies."""

    # Slots: thousands may be in flight, and every garbage collection walks them.
    __slots__ = (
        "alone",
        "call",
        "commands",
        "drops",
        "durable",
        "failures",
        "future",
        "hard_end",
        "large_reply",
        "retry_until",
        "size",
        "streamed",
    )

    def __init__(
        self,
        commands: Sequence[Command],
        future: asyncio.Future[list[Any]],
        size: int,
        retry_until: float,
        hard_end: float,
        alone: bool = False,
        large_reply: bool = False,
        streamed: bool = False,
        durable: bool = False,
    ) -> None:
        self.commands = commands
        self.future = future
        self.size = size
        self.retry_until = retry_until  # not tried again after this
        self.hard_end = hard_end  # failed at this, wherever it waits
        self.alone = alone
        self.large_reply = large_reply
        self.streamed = streamed
        self.durable = durable  # its replies end with the reply to its batch's trailer
        self.drops = 0  # how often the server dropped the connection carrying it alone
        self.failures = 0  # transient failures in a row, for its backoff
        self.call: Any = None  # the observed call it belongs to (telemetry), if any


@dataclass(eq=False, slots=True)
class Batch:
    units: list[Pending]
    size: int
    deadline: float | None  # when the server's replies must all have come
    alone: bool  # one unit, with nothing else on its connection until it is answered
    durable: bool = False  # holds a durable unit: the trailer follows once it is answered
    # For the trailer itself: the replies of the batch it follows, handed out with its own.
    held: list[Any] | None = None


class Lane:
    """A pooled connection the pipeliner holds, with the batches sent on it whose replies
    are still to be read, in the order they were sent."""

    __slots__ = ("alone", "connection", "in_flight", "lock", "reader", "size", "units")

    def __init__(self) -> None:
        self.connection: Any = None
        self.in_flight: deque[Batch] = deque()
        # Units and bytes in flight, or taken by a writer that has not sent them yet.
        self.units = 0
        self.size = 0
        self.lock = asyncio.Lock()  # one writer at a time, so replies come in sent order
        self.reader: asyncio.Task[None] | None = None
        self.alone = False  # carries a unit sent alone: nothing else may join it
