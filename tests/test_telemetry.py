"""Spans and metrics of the store's calls, read back with the OpenTelemetry SDK's
in-memory exporters, on fakeredis and on real servers that are stalled mid-call."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any, ClassVar

import fakeredis
import pytest
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from redis.asyncio import Redis

from kvstore import BackendError, RedisPackageStore, SerializationError
from kvstore.conformance import run_package_store_suite
from kvstore.redis import telemetry
from kvstore.redis.keyspace import Keyspace
from kvstore.redis.scripts import PUT_PACKAGE
from kvstore.server_process import LocalServer

from .conftest import fresh_namespace
from .support import pkg
from .topology import eventually

# The SDK's providers can be set once per process: every test here shares them and
# reads what its own store (its own namespace) produced.
_SPANS = InMemorySpanExporter()
_READER = InMemoryMetricReader()


@pytest.fixture(scope="module", autouse=True)
def providers() -> Iterator[None]:
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(_SPANS))
        trace.set_tracer_provider(provider)
    if not isinstance(metrics.get_meter_provider(), MeterProvider):
        metrics.set_meter_provider(MeterProvider(metric_readers=[_READER]))
    yield


def spans(namespace: str) -> list[ReadableSpan]:
    assert telemetry.drain(), "spans are ended on a thread of their own, within moments"
    return [
        s
        for s in _SPANS.get_finished_spans()
        if s.attributes is not None and s.attributes.get("kvstore.namespace") == namespace
    ]


def attrs(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def points(name: str, namespace: str) -> list[Any]:
    """The data points of metric ``name`` that carry ``namespace``."""
    data = _READER.get_metrics_data()
    assert data is not None
    found = []
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name == name:
                    found += [
                        p
                        for p in metric.data.data_points
                        if p.attributes is not None
                        and p.attributes.get("kvstore.namespace") == namespace
                    ]
    return found


@pytest.fixture
async def store() -> AsyncIterator[RedisPackageStore]:
    async with RedisPackageStore(
        fakeredis.FakeAsyncRedis(), namespace=fresh_namespace(), telemetry=True
    ) as made:
        yield made


async def test_a_put_is_one_client_span_with_the_conventional_attributes(
    store: RedisPackageStore,
) -> None:
    await store.put_package(pkg())
    (span,) = spans(store.namespace)
    assert span.name == "put_package"
    assert span.kind is SpanKind.CLIENT
    assert span.status.status_code is StatusCode.UNSET
    assert dict(span.attributes or {}) == {
        "db.system.name": "redis",
        "db.operation.name": "put_package",
        "db.stored_procedure_name": PUT_PACKAGE.name,
        "db.namespace": "0",
        "server.address": store.server.split(":")[0],
        "server.port": 6379,
        "kvstore.namespace": store.namespace,
        "kvstore.attempts": 1,
    }


async def test_no_span_or_measurement_carries_an_archive_a_type_or_a_hash(
    store: RedisPackageStore,
) -> None:
    await store.put_package_with_routes(
        pkg("secret-type", "secret-hash", b"secret-archive-bytes"), ["other-secret"]
    )
    await store.get_package("secret-type", "secret-hash")
    await store.get_package_route("secret-type")
    await store.list_packages()
    said = repr([dict(s.attributes or {}) for s in spans(store.namespace)])
    said += repr(
        [dict(p.attributes) for p in points("db.client.operation.duration", store.namespace)]
    )
    for secret in ("secret-archive", "secret-type", "secret-hash", "other-secret"):
        assert secret not in said


async def test_a_head_lookup_is_one_span_of_its_own(store: RedisPackageStore) -> None:
    await store.put_package(pkg())
    assert await store.get_package_head("wf", "h1") is not None
    span = spans(store.namespace)[-1]
    assert (span.name, attrs(span)["db.operation.name"]) == ("get_package_head",) * 2
    assert "db.stored_procedure_name" not in attrs(span)  # a read, no function called


async def test_a_listing_is_one_span_and_one_duration_however_it_walks(
    store: RedisPackageStore,
) -> None:
    for i in range(5):
        await store.put_package(pkg(content_hash=f"h{i}"))
    assert len(await store.list_packages()) == 5
    listed = [s for s in spans(store.namespace) if s.name != "put_package"]
    assert [s.name for s in listed] == ["list_packages"]  # its walk is part of it
    walked = [r async for r in store.iter_packages(chunk=2)]
    assert len(walked) == 5
    (walk,) = [s for s in spans(store.namespace) if s.name == "iter_packages"]
    assert attrs(walk)["db.response.returned_rows"] == 5
    assert attrs(walk)["kvstore.attempts"] == 1
    durations = {
        p.attributes["db.operation.name"]: p.count
        for p in points("db.client.operation.duration", store.namespace)
    }
    assert durations == {"put_package": 5, "list_packages": 1, "iter_packages": 1}
    sizes = points("kvstore.pipeline.batch.size", store.namespace)
    assert sum(p.count for p in sizes) >= 1


async def test_a_walk_left_early_ends_its_span_without_an_error(
    store: RedisPackageStore,
) -> None:
    for i in range(3):
        await store.put_package(pkg(content_hash=f"h{i}"))
    walk = store.iter_packages(chunk=1)
    async for _ in walk:
        break
    await walk.aclose()  # type: ignore[attr-defined]
    (span,) = [s for s in spans(store.namespace) if s.name == "iter_packages"]
    assert span.status.status_code is StatusCode.UNSET
    assert "error.type" not in attrs(span)


async def test_a_failed_call_says_its_error_type_in_its_span_and_the_failures() -> None:
    client = fakeredis.FakeAsyncRedis()
    namespace = fresh_namespace()
    await client.set(Keyspace(namespace).format, b"999")  # a later layout
    async with RedisPackageStore(client, namespace=namespace, telemetry=True) as store:
        with pytest.raises(SerializationError):
            await store.get_package("wf", "h1")
    (span,) = spans(namespace)
    assert span.status.status_code is StatusCode.ERROR
    assert attrs(span)["error.type"] == "kvstore.SerializationError"
    (failed,) = points("kvstore.client.failures", namespace)
    assert failed.value == 1
    assert attrs(failed)["error.type"] == "kvstore.SerializationError"
    assert attrs(failed)["db.operation.name"] == "get_package"


async def test_a_route_answered_from_memory_made_no_attempt() -> None:
    async with RedisPackageStore(
        fakeredis.FakeAsyncRedis(), namespace=fresh_namespace(), telemetry=True, cache_routes=True
    ) as store:
        await store.put_package(pkg())
        assert await store.route_cache_ready()
        assert await store.get_package_route("wf") == "h1"
        (lookup,) = [s for s in spans(store.namespace) if s.name == "get_package_route"]
        assert attrs(lookup)["kvstore.attempts"] == 0


@pytest.fixture
def own_server() -> Iterator[LocalServer]:
    """A server of the test's own, which it may stop (SIGSTOP) or kill."""
    with LocalServer() as running:
        yield running
        if running.pid is not None:
            os.kill(running.pid, signal.SIGCONT)


@pytest.mark.slow
async def test_a_call_retried_across_a_stalled_server_counts_its_attempts(
    own_server: LocalServer,
) -> None:
    async with RedisPackageStore.from_url(
        own_server.url, namespace=fresh_namespace(), timeout=0.3, retry_budget=10.0, telemetry=True
    ) as store:
        await store.put_package(pkg(content_hash="before"))
        assert own_server.pid is not None
        os.kill(own_server.pid, signal.SIGSTOP)
        try:
            put = asyncio.create_task(store.put_package(pkg(content_hash="across")))
            await asyncio.sleep(1.0)  # several attempts time out meanwhile
        finally:
            os.kill(own_server.pid, signal.SIGCONT)
        await asyncio.wait_for(put, 10.0)
        across = [s for s in spans(store.namespace) if s.name == "put_package"][-1]
        assert attrs(across)["kvstore.attempts"] >= 2
        assert across.status.status_code is StatusCode.UNSET
        retries = points("kvstore.client.retries", store.namespace)
        assert {p.attributes["error.type"] for p in retries} == {"redis.exceptions.TimeoutError"}
        assert sum(p.value for p in retries) == attrs(across)["kvstore.attempts"] - 1


async def test_a_call_that_spends_its_budget_fails_with_the_cause_as_its_error_type(
    own_server: LocalServer,
) -> None:
    async with RedisPackageStore.from_url(
        own_server.url, namespace=fresh_namespace(), timeout=0.2, retry_budget=0.3, telemetry=True
    ) as store:
        await store.ping()
        own_server.kill()
        with pytest.raises(BackendError):
            await store.get_package("wf", "h1")
        failed = [s for s in spans(store.namespace) if s.name == "get_package"][-1]
        assert failed.status.status_code is StatusCode.ERROR
        assert attrs(failed)["error.type"].startswith("redis.exceptions.")
        durations = points("db.client.operation.duration", store.namespace)
        assert any(p.attributes.get("error.type") for p in durations)


async def test_the_route_cache_gauge_and_reloads_follow_a_lost_subscription(
    own_server: LocalServer,
) -> None:
    async with RedisPackageStore.from_url(
        own_server.url,
        namespace=fresh_namespace(),
        cache_routes=True,
        route_health_interval=0.2,
        telemetry=True,
    ) as store:
        assert await store.route_cache_ready()
        (live,) = points("kvstore.route_cache.live", store.namespace)
        (reloads,) = points("kvstore.route_cache.reloads", store.namespace)
        assert (live.value, reloads.value) == (1, 1)
        async with Redis.from_url(own_server.url) as raw:
            await raw.execute_command("CLIENT", "KILL", "TYPE", "pubsub")  # type: ignore[no-untyped-call]

        def reloaded() -> bool:
            (count,) = points("kvstore.route_cache.reloads", store.namespace)
            return bool(count.value >= 2 and store.route_cache and store.route_cache.live)

        await eventually(reloaded, within=10.0, what="the cache reloaded after its subscription")
        (live,) = points("kvstore.route_cache.live", store.namespace)
        assert live.value == 1


@pytest.mark.slow
@pytest.mark.parametrize("cache_routes", [False, True])
async def test_an_observed_store_keeps_every_promise_of_the_contract(
    valkey_server: LocalServer, cache_routes: bool
) -> None:
    def make() -> RedisPackageStore:
        return RedisPackageStore.from_url(
            valkey_server.url,
            namespace=fresh_namespace(),
            telemetry=True,
            cache_routes=cache_routes,
        )

    await run_package_store_suite(make)


@pytest.mark.slow
async def test_a_store_without_telemetry_leaves_its_calls_as_they_are() -> None:
    # redis-py itself may import opentelemetry when it is installed; kvstore's telemetry
    # is not loaded, and the store's methods are the class's own.
    probe = (
        "import asyncio, sys, fakeredis\n"
        "from kvstore import RedisPackageStore\n"
        "async def main():\n"
        "    async with RedisPackageStore(fakeredis.FakeAsyncRedis()) as s:\n"
        "        await s.ping(); await s.list_packages()\n"
        "        assert not set(vars(s)) & {'put_package', 'iter_packages', 'ping'}\n"
        "        assert s.observer is None\n"
        "asyncio.run(main())\n"
        "print('kvstore.redis.telemetry' in sys.modules)\n"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    assert loaded.strip() == "False"


@pytest.mark.slow
def test_telemetry_without_opentelemetry_installed_is_refused_naming_the_extra() -> None:
    probe = (
        "import sys\n"
        "sys.modules['opentelemetry'] = None  # as if not installed\n"
        "import fakeredis\n"
        "from kvstore import RedisPackageStore\n"
        "try:\n"
        "    RedisPackageStore(fakeredis.FakeAsyncRedis(), telemetry=True)\n"
        "except ValueError as exc:\n"
        "    print(exc)\n"
    )
    said = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    assert "pip install 'kvstore-redis[telemetry]'" in said


def test_telemetry_must_be_a_bool() -> None:
    with pytest.raises(TypeError, match="telemetry"):
        RedisPackageStore(fakeredis.FakeAsyncRedis(), telemetry="yes")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "redis://:pw@10.0.0.5:6380/4",
            {"server.address": "10.0.0.5", "server.port": 6380, "db.namespace": "4"},
        ),
        ("unix:///run/redis.sock?db=3", {"server.address": "/run/redis.sock", "db.namespace": "3"}),
        ("redis+cluster://:pw@10.0.0.7:7000", {"server.address": "10.0.0.7", "server.port": 7000}),
        ("redis+sentinel://:pw@10.0.0.9:26379/svc/2", {"db.namespace": "2"}),
    ],
)
async def test_every_shape_of_deployment_names_its_server_and_never_a_password(
    url: str, expected: dict[str, Any]
) -> None:
    namespace = fresh_namespace()
    store = RedisPackageStore.from_url(url, namespace=namespace, telemetry=True)
    try:
        assert store.observer is not None
        assert store.observer.base == {
            "db.system.name": "redis",
            "kvstore.namespace": namespace,
            **expected,
        }
    finally:
        await store.aclose()


class Exploding(SpanProcessor):
    """A span processor that raises on the spans of the namespaces in ``targets``."""

    targets: ClassVar[set[str]] = set()

    def _hit(self, span: ReadableSpan) -> bool:
        return (span.attributes or {}).get("kvstore.namespace") in self.targets

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        if self._hit(span) and "start" in span.attributes.get("kvstore.namespace", ""):
            raise RuntimeError("the span processor failed on start")

    def on_end(self, span: ReadableSpan) -> None:
        if self._hit(span):
            raise RuntimeError("the span processor failed on end")


@pytest.fixture(scope="module")
def exploding() -> Iterator[type[Exploding]]:
    provider = trace.get_tracer_provider()
    assert isinstance(provider, TracerProvider)
    provider.add_span_processor(Exploding())
    yield Exploding
    Exploding.targets.clear()


@pytest.mark.parametrize("where", ["start", "end"])
async def test_a_span_processor_that_raises_changes_no_calls_outcome(
    exploding: type[Exploding], where: str, caplog: pytest.LogCaptureFixture
) -> None:
    namespace = f"{where}-{fresh_namespace()}"
    exploding.targets.add(namespace)
    async with RedisPackageStore(
        fakeredis.FakeAsyncRedis(), namespace=namespace, telemetry=True
    ) as store:
        for i in range(5):
            await store.put_package(pkg("wf", f"h{i}"))
        with pytest.raises(ValueError, match="NUL"):
            await store.get_package("wf", "h\x00")  # a caller's mistake still raises as it is
        await store.put_package_route("wf", "h2")
        assert [r.content_hash for r in await store.list_packages()] == [f"h{i}" for i in range(5)]
        assert [r async for r in store.iter_package_heads()] != []
        assert await store.get_package_route("wf") == "h2"
    # Spans end on a thread of their own: the failure on end is logged from there.
    assert telemetry.drain()
    assert "telemetry failed, the store's calls go on" in caplog.text
    assert caplog.text.count("telemetry failed") == 1, "once a minute at most"


class Broken:
    """An instrument whose every measurement raises."""

    def record(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("the instrument failed")

    add = record


async def test_an_instrument_that_raises_changes_no_calls_outcome(
    store: RedisPackageStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    instruments = telemetry._shared()
    for name in ("duration", "batch", "retries", "failures"):
        monkeypatch.setattr(instruments, name, Broken())
    await asyncio.gather(*(store.put_package(pkg("wf", f"h{i}")) for i in range(50)))
    assert len(await store.list_packages()) == 50
    with pytest.raises(ValueError):
        await store.delete_package("", "h1")


class Stalling(SpanExporter):
    """An exporter that stalls on every span of the namespaces in ``targets``, as one
    whose collector does not answer."""

    targets: ClassVar[set[str]] = set()
    stall = 0.5

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if any((s.attributes or {}).get("kvstore.namespace") in self.targets for s in spans):
            time.sleep(self.stall)
        return SpanExportResult.SUCCESS


async def test_an_exporter_that_stalls_breaks_no_calls_time_bound() -> None:
    provider = trace.get_tracer_provider()
    assert isinstance(provider, TracerProvider)
    provider.add_span_processor(SimpleSpanProcessor(Stalling()))
    namespace = fresh_namespace()
    Stalling.targets.add(namespace)
    try:
        async with RedisPackageStore(
            fakeredis.FakeAsyncRedis(),
            namespace=namespace,
            telemetry=True,
            timeout=1,
            retry_budget=1,
        ) as store:
            loop = asyncio.get_running_loop()
            started = loop.time()
            # On the event loop, each span's export would hold every call for 0.5 s: 20 s.
            await asyncio.gather(*(store.put_package(pkg("wf", f"h{i}")) for i in range(40)))
            assert loop.time() - started < 2.0  # each call within timeout + retry_budget
            assert len(await store.list_packages()) == 40
    finally:
        Stalling.targets.discard(namespace)  # the spans still waiting export at once
    assert len(spans(namespace)) == 41
