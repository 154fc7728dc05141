"""Spans and metrics of a store's calls, by OpenTelemetry's conventions for database clients.

The store sends its commands on connections of its own, pipelined, so redis-py's
instrumentation sees none of them: this module observes the store's calls instead. It
needs ``opentelemetry-api`` (the ``telemetry`` extra) and only the API: spans and metrics
go to whatever SDK the application configured, and nowhere when it configured none.

Off by default (``RedisPackageStore(..., telemetry=False)``), it costs nothing: this
module is not even imported, the store's methods are the class's own, and the pipeliner
pays one attribute check per call and per batch. ``telemetry=True`` makes the store an
``ObservedPackageStore``, defined here: each of its methods hands the call to the store's
``Observer`` (``Observer.call``, ``Observer.iterate``), which runs the class's own
method inside its span. Nothing is replaced on an instance. Off is the default,
not "on when the API is installed": the API often comes in with other packages, and even
its no-op spans cost a couple of microseconds per call.

Each call of the store is one span of kind ``CLIENT``, named by its operation
(``put_package``, ``get_package_route``, ``iter_packages``, ``ping``, …), with:

==============================  ==================================================
``db.system.name``              ``"redis"`` (the protocol; Valkey speaks it too)
``db.operation.name``           the store's operation, as in the span name
``db.stored_procedure_name``    the library function a write calls (``FCALL``)
``db.namespace``                the database index, for a single server
``server.address``              host, or the socket's path; ``server.port``
``kvstore.namespace``           the store's key prefix
``kvstore.attempts``            tries of the call's commands: 1 + retries, 0 when
                                the route cache answered without the server
``error.type``                  on failure: the cause's class (``redis.exceptions.
                                TimeoutError``) or kvstore's error class
``db.response.status_code``     on a server's refusal: its error prefix (``NOPERM``)
``db.response.returned_rows``   for a walk (``iter_packages``): the rows it returned
==============================  ==================================================

Never an archive, a workflow type or a content hash: they are unbounded in number, and
an archive may be large or private. A call made inside another call of the same store
(``list_packages`` walks ``iter_packages``) is part of it, not a span of its own.

Metrics (meter ``kvstore``):

- ``db.client.operation.duration`` (histogram, s): every call, with the span's
  attributes (``error.type`` on failure), so failures by kind are counted there too;
- ``kvstore.client.retries`` (counter): transient failures retried, by ``error.type``;
- ``kvstore.client.failures`` (counter): calls failed, by operation and ``error.type``;
- ``kvstore.pipeline.batch.size`` (histogram, ``{unit}``): calls sent per batch;
- ``kvstore.route_cache.live`` (gauge, observed at collection): 1 live, 0 not;
- ``kvstore.route_cache.reloads`` (counter, observed at collection): full reloads.
"""

from __future__ import annotations

import asyncio
import atexit
import contextvars
import logging
import math
import queue
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable
from typing import TYPE_CHECKING, Any, Final, TypeVar

from opentelemetry import metrics, trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from redis.exceptions import ResponseError

from kvstore.errors import BackendError
from kvstore.records import PackageHead, PackageRecord, PackageRouteRecord
from kvstore.redis.listing import LISTING_BYTES
from kvstore.redis.scripts import DELETE_PACKAGE, PUT_PACKAGE, PUT_ROUTE
from kvstore.redis.store import RedisPackageStore

if TYPE_CHECKING:
    from kvstore.redis.route_cache import RouteCache

__all__ = ["CALLS", "ITERATORS", "ObservedPackageStore", "Observer", "drain"]

_log = logging.getLogger("kvstore.redis.telemetry")

R = TypeVar("R")
Y = TypeVar("Y")

VERSION = "0.1.0"
# The store's calls that are observed: coroutines, and async iterators.
CALLS: Final = (
    "put_package",
    "put_package_with_routes",
    "get_package",
    "get_package_head",
    "delete_package",
    "put_package_route",
    "get_package_route",
    "list_packages",
    "list_package_routes",
    "load_library",
    "ping",
)
ITERATORS: Final = ("iter_packages", "iter_package_heads")
_FUNCTIONS: Final = {
    "put_package": PUT_PACKAGE.name,
    "put_package_with_routes": PUT_PACKAGE.name,
    "delete_package": DELETE_PACKAGE.name,
    "put_package_route": PUT_ROUTE.name,
}
# OpenTelemetry's advice for db.client.operation.duration.
_DURATION_BUCKETS: Final = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0)
_BATCH_BUCKETS: Final = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0)


class Call:
    """What the pipeliner tells about one observed call while it runs."""

    __slots__ = ("observer", "retries", "units")

    def __init__(self, observer: Observer) -> None:
        self.observer = observer
        self.units = 0  # units the pipeliner was given
        self.retries = 0  # of those, tries after a transient failure

    @property
    def attempts(self) -> int:
        return (1 if self.units else 0) + self.retries


# The observed call under way in this context, if any.
_CURRENT: contextvars.ContextVar[Call | None] = contextvars.ContextVar("kvstore_call", default=None)


class _Instruments:
    """The meter's instruments, made once per process and shared by every store."""

    def __init__(self) -> None:
        meter = metrics.get_meter("kvstore", VERSION)
        self.duration = _histogram(
            meter,
            "db.client.operation.duration",
            "s",
            "Duration of the store's calls, retries included.",
            _DURATION_BUCKETS,
        )
        self.batch = _histogram(
            meter,
            "kvstore.pipeline.batch.size",
            "{unit}",
            "Calls sent together in one pipelined batch.",
            _BATCH_BUCKETS,
        )
        self.retries = meter.create_counter(
            "kvstore.client.retries", "{retry}", "Transient failures the store retried."
        )
        self.failures = meter.create_counter(
            "kvstore.client.failures", "{call}", "Store calls that failed, by kind."
        )
        self.stores: weakref.WeakSet[Observer] = weakref.WeakSet()
        meter.create_observable_gauge(
            "kvstore.route_cache.live",
            [self._live],
            "1",
            "Whether the route cache answers from memory (1) or not (0).",
        )
        meter.create_observable_counter(
            "kvstore.route_cache.reloads",
            [self._reloads],
            "{reload}",
            "Full reloads of the route cache (connects, lost messages, resets).",
        )

    def _live(self, options: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
        for observer in list(self.stores):
            cache = observer.route_cache
            if cache is not None:
                yield metrics.Observation(int(cache.live), observer.base)

    def _reloads(self, options: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
        for observer in list(self.stores):
            cache = observer.route_cache
            if cache is not None:
                yield metrics.Observation(cache.reloads, observer.base)


def _histogram(
    meter: metrics.Meter, name: str, unit: str, description: str, buckets: tuple[float, ...]
) -> metrics.Histogram:
    try:  # the bucket advice is in opentelemetry-api 1.23 and later
        return meter.create_histogram(
            name, unit, description, explicit_bucket_boundaries_advisory=list(buckets)
        )
    except TypeError:
        return meter.create_histogram(name, unit, description)


_instruments: _Instruments | None = None


def _shared() -> _Instruments:
    global _instruments
    if _instruments is None:
        _instruments = _Instruments()
    return _instruments


class Observer:
    """The telemetry of one store: its spans, its share of the metrics, and the hooks
    the pipeliner calls (``current``, ``batch``, ``retried``)."""

    def __init__(self, attributes: dict[str, Any], route_cache: RouteCache | None) -> None:
        self.route_cache = route_cache
        self._broken_said_at = -math.inf
        self.base: dict[str, Any] = {"db.system.name": "redis", **attributes}
        self._tracer = trace.get_tracer("kvstore", VERSION)
        self._instruments = _shared()
        self._instruments.stores.add(self)
        # Attributes per operation, made once.
        self._attributes = {
            name: {
                **self.base,
                "db.operation.name": name,
                **({"db.stored_procedure_name": _FUNCTIONS[name]} if name in _FUNCTIONS else {}),
            }
            for name in (*CALLS, *ITERATORS)
        }

    # The pipeliner's hooks.

    def current(self) -> Call | None:
        """The observed call a unit given to the pipeliner now belongs to."""
        call = _CURRENT.get()
        if call is not None and call.observer is self:
            call.units += 1
            return call
        return None

    def batch(self, units: int) -> None:
        try:
            self._instruments.batch.record(units, self.base)
        except Exception as exc:
            self._broken(exc)

    def retried(self, calls: Iterable[Call | None], exc: BaseException) -> None:
        count = 0
        for call in calls:
            count += 1
            if call is not None:
                call.retries += 1
        try:
            self._instruments.retries.add(count, {**self.base, "error.type": _type_of(exc)})
        except Exception as failure:
            self._broken(failure)

    def _broken(self, exc: Exception) -> None:
        """Telemetry itself failed (a span processor, an exporter, an instrument): the
        call goes on as if it were off, and the failure is logged, once a minute at most."""
        now = time.monotonic()
        if now >= self._broken_said_at + 60.0:
            self._broken_said_at = now
            _log.warning(
                "telemetry failed, the store's calls go on: %s: %s", type(exc).__name__, exc
            )

    # Observing a call: what the store's observed methods hand over.

    async def call(self, name: str, work: Coroutine[Any, Any, R]) -> R:
        """Run ``work``, the coroutine of the store's operation ``name``, as one call."""
        if (outer := _CURRENT.get()) is not None and outer.observer is self:
            return await work  # part of a call already observed
        attributes = self._attributes[name]
        call = Call(self)
        token = _CURRENT.set(call)
        start = time.perf_counter()
        outcome = attributes
        span = self._start(name, attributes)
        try:
            return await work
        except BaseException as exc:
            outcome = self._failed(span, attributes, exc)
            raise
        finally:
            _CURRENT.reset(token)
            self._end(span, start, outcome, {"kvstore.attempts": call.attempts})

    def iterate(self, name: str, work: AsyncIterator[Y]) -> AsyncIterator[Y]:
        """``work``, the async iterator of the store's operation ``name``, as one call."""
        if (outer := _CURRENT.get()) is not None and outer.observer is self:
            return work
        return self._iterate(name, self._attributes[name], work)

    async def _iterate(
        self, name: str, attributes: dict[str, Any], inner: AsyncIterator[Y]
    ) -> AsyncIterator[Y]:
        # The span covers the whole walk; the call is current only while the walk
        # itself runs, not while the caller's loop body does between items.
        call = Call(self)
        start = time.perf_counter()
        span = self._start(name, attributes)
        rows = 0
        outcome = attributes
        try:
            while True:
                token = _CURRENT.set(call)
                try:
                    item = await inner.__anext__()
                except StopAsyncIteration:
                    break
                finally:
                    _CURRENT.reset(token)
                rows += 1
                yield item
        except BaseException as exc:
            if not isinstance(exc, GeneratorExit):  # the caller stopped early: no failure
                outcome = self._failed(span, attributes, exc)
            raise
        finally:
            aclose = getattr(inner, "aclose", None)
            if aclose is not None:
                await aclose()
            ending = {"kvstore.attempts": call.attempts, "db.response.returned_rows": rows}
            self._end(span, start, outcome, ending)

    def _start(self, name: str, attributes: dict[str, Any]) -> trace.Span | None:
        """The call's span, or ``None`` if telemetry failed to make one."""
        try:
            # A child of the caller's span; not made current, as nothing within the call
            # makes spans of its own (which saves two context switches per call).
            return self._tracer.start_span(name, kind=SpanKind.CLIENT, attributes=attributes)
        except Exception as exc:
            self._broken(exc)
            return None

    def _end(
        self,
        span: trace.Span | None,
        start: float,
        outcome: dict[str, Any],
        attributes: dict[str, Any],
    ) -> None:
        try:
            self._instruments.duration.record(time.perf_counter() - start, outcome)
        except Exception as exc:
            self._broken(exc)
        if span is not None and not _ENDER.end(span, attributes, self._broken):
            self._broken(RuntimeError(f"{_ENDING_LIMIT} spans wait to end: this one is dropped"))

    def _failed(
        self, span: trace.Span | None, attributes: dict[str, Any], exc: BaseException
    ) -> dict[str, Any]:
        """Mark ``span`` failed by ``exc``; the attributes of the call's duration."""
        kind = _type_of(exc)
        outcome = {**attributes, "error.type": kind}
        try:
            if span is not None:
                span.set_attribute("error.type", kind)
                cause = exc.__cause__ if isinstance(exc, BackendError) else None
                if isinstance(cause, ResponseError):
                    span.set_attribute("db.response.status_code", str(cause).split(" ", 1)[0])
                # The class only: a message may name a key, and so a workflow type.
                span.set_status(Status(StatusCode.ERROR, kind))
            if kind != "cancelled":  # a caller that gave up is not a failure of the store
                self._instruments.failures.add(1, outcome)
        except Exception as failure:
            self._broken(failure)
        return outcome


# At most this many spans wait for the ending thread; beyond, a call's span is dropped.
_ENDING_LIMIT = 10_000


class _Ender:
    """Ends spans on a thread of its own, in order. A span processor that exports each
    span as it ends (the SDK's ``SimpleSpanProcessor``) runs its exporter there, so an
    exporter that stalls delays the spans, never the store's calls nor its event loop."""

    def __init__(self) -> None:
        self._queue: queue.Queue[tuple[trace.Span, dict[str, Any], Callable[[Exception], None]]]
        self._queue = queue.Queue(maxsize=_ENDING_LIMIT)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def end(
        self, span: trace.Span, attributes: dict[str, Any], broken: Callable[[Exception], None]
    ) -> bool:
        """Hand ``span`` over to be ended with ``attributes`` set; ``False`` if too many
        wait already (it is then dropped). ``broken`` is told of a failure to end it."""
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._run, name="kvstore-telemetry", daemon=True
                    )
                    self._thread.start()
        try:
            self._queue.put_nowait((span, attributes, broken))
        except queue.Full:
            return False
        return True

    def _run(self) -> None:
        while True:
            span, attributes, broken = self._queue.get()
            try:
                span.set_attributes(attributes)
                span.end()
            except Exception as exc:
                broken(exc)
            finally:
                self._queue.task_done()

    def drain(self, timeout: float) -> bool:
        """Whether every span handed over so far was ended, waiting up to ``timeout``."""
        end = time.monotonic() + timeout
        while self._queue.unfinished_tasks:
            if time.monotonic() >= end:
                return False
            time.sleep(0.001)
        return True


_ENDER = _Ender()
# A process that ends soon after its last call still hands its spans to the SDK, whose
# own exit handler (registered earlier, so run later) then exports them.
atexit.register(_ENDER.drain, 1.0)


def drain(timeout: float = 5.0) -> bool:
    """Whether the spans of every call that has returned were ended (handed to the span
    processors), waiting up to ``timeout`` seconds: spans are ended on a thread of
    their own, so a test that reads an in-memory exporter calls this first."""
    return _ENDER.drain(timeout)


def _type_of(exc: BaseException) -> str:
    """``error.type``: what failed, in a few dozen values at most."""
    if isinstance(exc, asyncio.CancelledError):
        return "cancelled"
    if isinstance(exc, BackendError) and exc.__cause__ is not None:
        exc = exc.__cause__
    cls = type(exc)
    module = cls.__module__
    if module == "builtins":
        return cls.__qualname__
    if module.startswith("kvstore."):
        module = "kvstore"
    return f"{module}.{cls.__qualname__}"


class ObservedPackageStore(RedisPackageStore):
    """A ``RedisPackageStore`` whose every call is observed: what
    ``RedisPackageStore(..., telemetry=True)`` makes. Each method hands the class's own
    to the store's ``Observer``, which makes it one span and one measurement."""

    @property
    def _observed(self) -> Observer:
        observer = self.observer
        assert observer is not None, "an observed store is made with telemetry=True"
        return observer

    async def ping(self) -> None:
        await self._observed.call("ping", super().ping())

    async def load_library(self) -> list[str]:
        return await self._observed.call("load_library", super().load_library())

    async def put_package(self, record: PackageRecord) -> None:
        await self._observed.call("put_package", super().put_package(record))

    async def put_package_with_routes(
        self, record: PackageRecord, route_workflow_types: Iterable[str]
    ) -> None:
        await self._observed.call(
            "put_package_with_routes",
            super().put_package_with_routes(record, route_workflow_types),
        )

    async def delete_package(self, workflow_type: str, content_hash: str) -> None:
        await self._observed.call(
            "delete_package", super().delete_package(workflow_type, content_hash)
        )

    async def put_package_route(self, workflow_type: str, content_hash: str) -> None:
        await self._observed.call(
            "put_package_route", super().put_package_route(workflow_type, content_hash)
        )

    async def get_package(self, workflow_type: str, content_hash: str) -> PackageRecord | None:
        return await self._observed.call(
            "get_package", super().get_package(workflow_type, content_hash)
        )

    async def get_package_head(self, workflow_type: str, content_hash: str) -> PackageHead | None:
        return await self._observed.call(
            "get_package_head", super().get_package_head(workflow_type, content_hash)
        )

    async def get_package_route(self, workflow_type: str) -> str | None:
        return await self._observed.call(
            "get_package_route", super().get_package_route(workflow_type)
        )

    async def list_package_routes(self) -> list[PackageRouteRecord]:
        return await self._observed.call("list_package_routes", super().list_package_routes())

    async def list_packages(self) -> list[PackageRecord]:
        return await self._observed.call("list_packages", super().list_packages())

    def iter_packages(
        self, *, chunk: int = 1000, max_bytes: int = LISTING_BYTES
    ) -> AsyncIterator[PackageRecord]:
        return self._observed.iterate(
            "iter_packages", super().iter_packages(chunk=chunk, max_bytes=max_bytes)
        )

    def iter_package_heads(self, *, chunk: int = 1000) -> AsyncIterator[PackageHead]:
        return self._observed.iterate("iter_package_heads", super().iter_package_heads(chunk=chunk))
