"""``python -m bench.telemetry [--calls N] [--rounds N]``: what ``telemetry=True`` costs.

Times the same calls on stores made with ``telemetry`` off and on, side by side and
interleaved, on one local server: with telemetry on, first with no OpenTelemetry SDK
configured (the API's no-op providers), then with the SDK recording every span (batched
to an exporter that drops them) and every measurement (aggregated in memory): what the
SDK costs before any exporter sends anything. Needs the ``telemetry`` extra and
``opentelemetry-sdk``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone

from kvstore import PackageRecord, RedisPackageStore
from kvstore.server_process import LocalServer

Measure = Callable[[RedisPackageStore, int], Awaitable[float]]


def _record(i: int) -> PackageRecord:
    return PackageRecord("wf", f"h{i}", b"x" * 1024, datetime.now(timezone.utc))


async def put_one(store: RedisPackageStore, calls: int) -> float:
    start = time.perf_counter()
    for i in range(calls):
        await store.put_package(_record(i))
    return (time.perf_counter() - start) / calls


async def put_concurrent(store: RedisPackageStore, calls: int) -> float:
    records = [_record(i) for i in range(calls * 4)]
    start = time.perf_counter()
    await asyncio.gather(*(store.put_package(r) for r in records))
    return (time.perf_counter() - start) / len(records)


async def cached_route(store: RedisPackageStore, calls: int) -> float:
    # From memory: no round trip, so the telemetry is most of what is left.
    start = time.perf_counter()
    for _ in range(calls * 10):
        await store.get_package_route("wf")
    return (time.perf_counter() - start) / (calls * 10)


async def _round(url: str, telemetry: bool, measure: Measure, calls: int) -> float:
    async with RedisPackageStore.from_url(
        url, namespace="bench-telemetry", telemetry=telemetry, cache_routes=True
    ) as store:
        await store.put_package(_record(0))  # connect and load outside the timing
        await store.route_cache_ready()
        return await measure(store, calls)


async def _compare(url: str, calls: int, rounds: int) -> dict[str, tuple[float, float]]:
    figures = {}
    for measure in (put_one, put_concurrent, cached_route):
        off, on = [], []
        for _ in range(rounds):  # interleaved, so drift in the machine hits both
            off.append(await _round(url, False, measure, calls))
            on.append(await _round(url, True, measure, calls))
        figures[measure.__name__] = (statistics.median(off), statistics.median(on))
    return figures


def _configure_sdk() -> None:
    """The SDK as a service configures it: spans batched to an exporter (here one that
    drops them, so only the SDK's own work is timed), metrics aggregated in memory."""
    from collections.abc import Sequence

    from opentelemetry import metrics, trace
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        SpanExporter,
        SpanExportResult,
    )

    class Dropped(SpanExporter):
        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(Dropped()))
    trace.set_tracer_provider(provider)
    metrics.set_meter_provider(MeterProvider(metric_readers=[InMemoryMetricReader()]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.telemetry", description=__doc__)
    parser.add_argument("--calls", type=int, default=2000, help="calls per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (median is reported)")
    args = parser.parse_args(argv)
    print(f"{'figure':<15} {'sdk':<8} {'off us':>9} {'on us':>9} {'added us':>9}")
    with LocalServer() as server:
        for sdk in ("none", "batched"):
            if sdk == "batched":
                _configure_sdk()
            figures = asyncio.run(_compare(server.url, args.calls, args.rounds))
            for name, (off, on) in figures.items():
                print(
                    f"{name:<15} {sdk:<8} {off * 1e6:>9.2f} {on * 1e6:>9.2f} "
                    f"{(on - off) * 1e6:>9.2f}"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
