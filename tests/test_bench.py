"""The bench's own code: its report, its helpers against a real server, and a short run.

Only what the bench computes and prints is checked, never how fast anything is: speed
is the bench's business, not the tests'.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import types
from dataclasses import replace
from pathlib import Path

import pytest
from redis.asyncio import Redis

from bench import cpu
from bench import figures as F
from bench.report import Figure, missed, sig3, table
from kvstore.redis.keyspace import Keyspace
from kvstore.server_process import LocalServer

# The bench, in processes of its own.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
SIZES = ("1KiB", "1MiB", "16MiB")
FIGURES = {
    "put_one",
    "put_one_cached",
    "put_concurrent",
    "put_concurrent_cached",
    "put_vs_server_limit",
    "get_1KiB",
    "list_1KiB",
    "put_1MiB",
    "get_1MiB",
    "list_1MiB",
    "put_16MiB",
    "get_16MiB",
    "list_16MiB",
    "route_lookup",
    "route_staleness",
    "iter_packages_rss",
    "memory",
    "cache_list_1MiB",
    "cache_list_1MiB_sent",
    *(f"layout_{what}_{size}" for what in ("put", "get", "list") for size in SIZES),
}


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (0.0012345, "0.00123"),
        (1.5, "1.50"),
        (0.9996, "1.00"),
        (99.96, "100"),
        (12345.0, "12300"),
        (52798.31, "52800"),
        (204.4, "204"),
        (0.0, "0"),
        (-3.14159, "-3.14"),
    ],
)
def test_every_figure_prints_with_three_significant_digits(value: float, shown: str) -> None:
    assert sig3(value) == shown


def test_a_figure_is_judged_on_its_ratio_or_on_the_store_s_own_value() -> None:
    slower = Figure("a", "", 2.0, 1.0, "us", 2.0, 1.1, "<=")
    faster = Figure("b", "", 4.0, 1.0, "/s", 4.0, 3.5, ">=")
    bounded = Figure("c", "", 250.0, 1024.0, "MiB", 0.24, 200.0, "<=", "store")
    reported = Figure("d", "", 500.0, 441.0, "B", 1.13)
    skipped = Figure("e", "skipped", 1.0, None, "/s", None, 0.4, ">=")
    assert [f.met for f in (slower, faster, bounded, reported, skipped)] == [
        False,
        True,
        False,
        None,
        False,
    ]
    assert missed([slower, faster, bounded, reported]) == [slower, bounded]
    assert bounded.target_text() == "<= 200 MiB" and slower.target_text() == "<= 1.10"
    printed = table([slower, reported])
    assert "MISSED" in printed and "reported" in printed and "1.10" in printed


async def test_the_raw_put_stores_what_the_store_lists(valkey_server: LocalServer) -> None:
    raw = Redis.from_url(valkey_server.url)
    await F.load_put(raw)
    ns = F.namespace()
    keys = Keyspace(ns)
    written = F.records(3)
    for record in written:
        await F.call(raw, F.raw_put_command(keys, record))
    await raw.aclose()
    async with F.writer(valkey_server.url, ns, cached=False) as store:
        assert await store.list_packages() == written


@pytest.mark.skipif(F.benchmark_binary() is None, reason="no redis-benchmark")
async def test_redis_benchmark_runs_the_store_s_put_on_one_row_and_one_route(
    valkey_server: LocalServer,
) -> None:
    raw = Redis.from_url(valkey_server.url)
    await F.load_put(raw)
    keys = Keyspace(F.namespace())
    command = F.benchmark_command(valkey_server.url, keys, 2000)
    rate = await F.run_benchmark(command)
    rows = await raw.zcard(keys.index)
    routes = await raw.hlen(keys.routes)
    await raw.aclose()
    assert rate > 0
    # Every put writes the same row (the function refuses a row key that is not its row
    # id's) and re-points the same route, so the namespace stays small.
    assert rows == 1 and routes == 1


async def test_the_other_engine_subscribes_from_another_process(
    valkey_server: LocalServer,
) -> None:
    raw = Redis.from_url(valkey_server.url)
    ns = F.namespace()
    channel = Keyspace(ns).route_changes

    async def subscribers() -> int:
        reply = await raw.execute_command("PUBSUB", "SHARDNUMSUB", channel)  # type: ignore[no-untyped-call]
        return int(reply[1])

    async with F.other_engine(valkey_server.url, ns) as pid:
        assert pid != os.getpid()
        assert await subscribers() == 1
    for _ in range(100):
        if await subscribers() == 0:
            break
        await asyncio.sleep(0.05)
    assert await subscribers() == 0, "the other engine outlived its block"
    await raw.aclose()


async def test_staleness_is_measured_by_another_process_that_applies_every_write(
    valkey_server: LocalServer,
) -> None:
    # A sample the other engine never reports counts as 2 s: every one must be reported.
    ns = F.namespace()
    async with F.writer(valkey_server.url, ns, cached=False) as plain:
        samples = await F.cross_engine_staleness(valkey_server.url, ns, plain, 5)
    assert len(samples) == 5
    assert all(0.0 <= s < 2.0 for s in samples), samples


async def test_the_listing_process_reports_its_peak_above_its_baseline(
    valkey_server: LocalServer,
) -> None:
    sizes = replace(F.SMALL, rss_archive=F.MIB, rss_packages=4)
    figure = await F.listing_memory(valkey_server.url, sizes)
    assert figure.name == "iter_packages_rss" and figure.unit == "MiB"
    assert figure.floor == 4.0
    assert figure.extra["peak_mib"] >= figure.extra["baseline_mib"] > 0
    assert figure.store == pytest.approx(figure.extra["peak_mib"] - figure.extra["baseline_mib"])


def test_a_short_run_reports_every_figure_and_check_fails_only_on_a_missed_target(
    tmp_path: Path,
) -> None:
    report = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--small", "--rounds", "1", "--check", "--json", report],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode in (0, 1), done.stderr[-3000:]
    found = json.loads(report.read_text())
    figures = found["figures"]
    assert set(figures) == FIGURES
    any_missed = any(f["met"] is False for f in figures.values())
    assert done.returncode == (1 if any_missed else 0)
    for name, figure in figures.items():
        assert name in done.stdout, "the table names every figure"
        if figure["extra"].get("skipped"):
            continue
        assert figure["store"] >= 0, name
        assert figure["met"] in (True, False, None), name
    assert [row["packages"] for row in found["catalogue_growth"]] == [1000, 10_000]
    assert [row["routes"] for row in found["route_growth"]] == [10, 10_000]
    assert "How cost grows with the catalogue" in done.stdout
    assert "Event-loop stall" in done.stdout


def test_ci_runs_the_small_bench_after_the_tests_and_never_judges_speed() -> None:
    script = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    commands = [line.strip() for line in script.splitlines() if line.strip()]
    commands = [line for line in commands if not line.startswith(("#", "echo"))]
    assert "set -euo pipefail" in commands, "a bench that crashes fails CI"
    bench = [line for line in commands if "python -m bench" in line]
    assert bench == ["python -m bench --small"]
    assert commands.index(bench[0]) > commands.index('bash -c "$test_line"')


async def test_the_stall_figure_is_taken_from_bench_stall_when_it_exists(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from bench import __main__ as cli

    calls: list[tuple[str, int]] = []

    async def loop_stall(url: str, size: int) -> dict[str, float]:
        calls.append((url, size))
        return {"store_put_ms": 1.5}

    monkeypatch.setitem(sys.modules, cli.STALL_MODULE, types.SimpleNamespace(loop_stall=loop_stall))
    assert await cli.loop_stall("redis://127.0.0.1:1", F.MIB) == {"store_put_ms": 1.5}
    assert calls == [("redis://127.0.0.1:1", F.MIB)]
    assert "store_put_ms = 1.50" in cli.stall_text({"size": F.MIB, "store_put_ms": 1.5})


async def test_without_bench_stall_the_report_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    from bench import __main__ as cli

    monkeypatch.setitem(sys.modules, cli.STALL_MODULE, None)  # as if the file were absent
    assert await cli.loop_stall("redis://127.0.0.1:1", F.MIB) is None
    assert "not measured" in cli.stall_text(None)


async def test_quiet_waits_for_a_busy_process_to_stop_using_the_cpu() -> None:
    # Busy for a bounded while, then asleep: quiet returns once the busy part is over.
    busy = (
        "import time\n"
        "end = time.process_time() + 0.5\n"
        "while time.process_time() < end: pass\n"
        "time.sleep(30)"
    )
    process = await asyncio.create_subprocess_exec(sys.executable, "-c", busy)
    try:
        await F.quiet(process.pid, within=20.0)
        assert F.cpu_seconds(process.pid) >= 0.45
        assert process.returncode is None  # it went quiet, and is still there
    finally:
        process.kill()
        await process.wait()


async def test_quiet_gives_up_on_a_process_that_never_goes_quiet() -> None:
    spin = "while True: pass"
    process = await asyncio.create_subprocess_exec(sys.executable, "-c", spin)
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        await F.quiet(process.pid, within=0.5)
        assert loop.time() - started >= 0.5
    finally:
        process.kill()
        await process.wait()


@pytest.mark.parametrize("other_engine", [False, True])
async def test_burst_costs_count_every_put_in_each_process(
    valkey_server: LocalServer, other_engine: bool
) -> None:
    assert valkey_server.pid is not None
    costs = await cpu.burst_costs(
        valkey_server.url,
        valkey_server.pid,
        cached=True,
        other_engine=other_engine,
        rounds=3,
        puts=200,
    )
    assert costs.bursts == 3 and 0 <= costs.full_collections <= 3
    assert costs.writer_us > 0 and costs.server_us > 0 and costs.rate > 0
    # The other engine applied 600 route changes: it used some CPU, and only it has it.
    assert (costs.other_us is not None and costs.other_us > 0) == other_engine
    split = [costs.rate_with_full, costs.rate_without_full]
    assert sum(rate is not None for rate in split) == 1 + (0 < costs.full_collections < 3)
    line = cpu.table([costs]).splitlines()[1]
    assert line.startswith("caching on, other engine" if other_engine else "caching on ")
