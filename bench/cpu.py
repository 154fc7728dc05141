"""What a burst of puts costs each process: the writer, the server, another engine.

The figure of thousands of puts in flight with route caching on is bound by the CPU
that three processes share: the writer (the store, and the burst's own tasks), the
server, and another engine following the route changes. This tells them apart.

A burst is ``puts`` ``put_package`` calls in flight on one store; ``rounds`` bursts run
one after another on that store, in each of four configurations: route caching off and
on in the writer, each without and with another engine (a caching store of the
namespace in a process of its own, ``python -m bench.processes subscribe``; each burst
starts once it has applied the one before). For each configuration: the CPU time per put
of each process over the bursts (the writer's from ``time.process_time()``; the server's
and the other engine's from their main thread's ``/proc/<pid>/schedstat``, where each
does its work; Linux only), the median rate, and the bursts in which the writer's garbage
collector made a full collection, with how long one took and the median rate of those
bursts and of the others. With ``freeze``, the writer's objects are put out of the
collector's sight (``gc.freeze()``) before the bursts, as a long-running engine may do
once it has started: a full collection then walks only what the bursts made.

``await burst_costs(url, server_pid, ...)`` returns them; ``python -m bench.cpu`` prints
them for a server it starts itself.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

from bench import figures as F
from kvstore.server_process import LocalServer

CONFIGURATIONS = ((False, False), (True, False), (False, True), (True, True))


@dataclass(frozen=True)
class Costs:
    """One configuration's bursts. CPU times are µs per put; rates, puts a second."""

    cached: bool
    other_engine: bool
    writer_us: float
    server_us: float
    other_us: float | None  # None without another engine
    rate: float
    bursts: int
    full_collections: int  # bursts in which the writer made a full collection
    full_collection_ms: float | None  # the median time one took
    rate_with_full: float | None
    rate_without_full: float | None

    @property
    def label(self) -> str:
        caching = "caching on" if self.cached else "caching off"
        return f"{caching}, other engine" if self.other_engine else caching


def thread_cpu(pid: int) -> float:
    """Seconds of CPU the main thread of process ``pid`` has used."""
    with open(f"/proc/{pid}/schedstat") as f:
        return int(f.read().split()[0]) / 1e9


class _FullCollections:
    """A ``gc.callbacks`` entry that counts full collections and times each."""

    def __init__(self) -> None:
        self.count = 0
        self.took: list[float] = []
        self._start = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if info["generation"] != 2:
            return
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.count += 1
            self.took.append(time.perf_counter() - self._start)


async def burst_costs(
    url: str,
    server_pid: int,
    *,
    cached: bool,
    other_engine: bool,
    rounds: int = 12,
    puts: int = 4000,
    freeze: bool = False,
) -> Costs:
    """The costs of ``rounds`` bursts of ``puts`` puts in flight, in a namespace of
    their own, on the server ``server_pid`` serves at ``url``."""
    ns = F.namespace()
    async with AsyncExitStack() as stack:
        other_pid = None
        if other_engine:
            other_pid = await stack.enter_async_context(F.other_engine(url, ns))
        store = await stack.enter_async_context(F.writer(url, ns, cached))
        await store.put_package(F.records(1)[0])
        await asyncio.sleep(F.LANES_CONNECT)
        if other_pid is not None:
            await F.quiet(other_pid)
        full = _FullCollections()
        rates: list[float] = []
        with_full: list[bool] = []
        writer_cpu = server_cpu = other_cpu = 0.0
        if freeze:
            gc.collect()
            gc.freeze()
        gc.callbacks.append(full)
        try:
            for _ in range(rounds):
                # Each burst's records made outside its CPU times, as the bench makes them.
                batch = F.records(puts)
                before = full.count
                writer, server = time.process_time(), thread_cpu(server_pid)
                other = thread_cpu(other_pid) if other_pid is not None else 0.0
                start = time.perf_counter()
                await asyncio.gather(*(store.put_package(r) for r in batch))
                rates.append(puts / (time.perf_counter() - start))
                writer_cpu += time.process_time() - writer
                server_cpu += thread_cpu(server_pid) - server
                with_full.append(full.count > before)
                if other_pid is not None:
                    await F.quiet(other_pid)  # what the burst sent it, applied
                    other_cpu += thread_cpu(other_pid) - other
        finally:
            gc.callbacks.remove(full)
            if freeze:
                gc.unfreeze()
    done = rounds * puts
    slow = [r for r, f in zip(rates, with_full, strict=True) if f]
    fast = [r for r, f in zip(rates, with_full, strict=True) if not f]
    return Costs(
        cached,
        other_engine,
        writer_cpu / done * 1e6,
        server_cpu / done * 1e6,
        other_cpu / done * 1e6 if other_pid is not None else None,
        statistics.median(rates),
        rounds,
        len(slow),
        statistics.median(full.took) * 1e3 if full.took else None,
        statistics.median(slow) if slow else None,
        statistics.median(fast) if fast else None,
    )


def table(costs: list[Costs]) -> str:
    """The costs as a table, a configuration a line."""

    def rate(value: float | None) -> str:
        return "-" if value is None else f"{value:.0f}"

    lines = [
        f"{'configuration':28} {'writer us':>9} {'server us':>9} {'other us':>8} "
        f"{'puts/s':>7}  full collections: bursts, ms each, puts/s with / without"
    ]
    for c in costs:
        other = "-" if c.other_us is None else f"{c.other_us:.1f}"
        took = "-" if c.full_collection_ms is None else f"{c.full_collection_ms:.1f}"
        lines.append(
            f"{c.label:28} {c.writer_us:>9.1f} {c.server_us:>9.1f} {other:>8} "
            f"{c.rate:>7.0f}  {c.full_collections} of {c.bursts}, {took}, "
            f"{rate(c.rate_with_full)} / {rate(c.rate_without_full)}"
        )
    return "\n".join(lines)


async def _main(url: str, server_pid: int, rounds: int, puts: int, freeze: bool) -> None:
    costs = []
    for cached, other_engine in CONFIGURATIONS:
        costs.append(
            await burst_costs(
                url,
                server_pid,
                cached=cached,
                other_engine=other_engine,
                rounds=rounds,
                puts=puts,
                freeze=freeze,
            )
        )
    frozen = ", the writer's heap frozen (gc.freeze())" if freeze else ""
    print(
        f"{puts} puts in flight, 1 KiB, {rounds} bursts in a row on one store{frozen}; CPU per put"
    )
    print(table(costs))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cpu", description=__doc__)
    parser.add_argument("--rounds", type=int, default=12, help="bursts per configuration")
    parser.add_argument("--puts", type=int, default=4000, help="puts in flight per burst")
    parser.add_argument("--freeze", action="store_true", help="gc.freeze() before the bursts")
    parser.add_argument("--server-binary", help="the server to start (default: Valkey)")
    args = parser.parse_args(argv)
    options: dict[str, Any] = {}
    if args.server_binary:
        options["binary"] = args.server_binary
    with LocalServer(**options) as server:
        assert server.pid is not None
        asyncio.run(_main(server.url, server.pid, args.rounds, args.puts, args.freeze))
    return 0


if __name__ == "__main__":
    sys.exit(main())
