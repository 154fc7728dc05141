"""``python -m bench.charts RESULTS.json [--out DIR]``: the bench's figures as SVG charts.

Reads what ``python -m bench --json RESULTS.json`` writes and draws, into ``DIR``
(default ``docs/assets``), for the documentation's benchmarks page:

- ``bench-ratios.svg``: every figure judged by its ratio against raw redis-py, with its
  target: times (store / raw, lower is better) and rates (higher is better);
- ``bench-catalogue-growth.svg``: a put and a listing per package as the catalogue grows,
  store beside raw;
- ``bench-route-growth.svg``: a route lookup as the routes table grows, cached, uncached
  and raw ``HGET``;
- ``bench-stall.svg``: the event loop's longest stall during a put and a get of the run's
  largest archive, store beside raw (when the run measured it).

``python -m bench.charts --fleet FLEET.json [--out DIR]`` (or a fleet's JSON given as
``RESULTS.json``: its ``kind`` says so) draws, from what ``python -m bench.fleet --json``
writes, ``bench-fleet.svg``: an engine's time and the bytes the primary sent against the
engines restarting at once, without a cache, with a cold one, with a warm one and, where
the JSON has it, reading from replicas without a cache (with the bytes the replicas
sent beside the primary's), for the 1 MiB catalogue (else the largest).

Needs matplotlib, which the ``docs`` extra brings. The charts are drawn as they are in
the JSON: nothing is measured here.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure as Chart
except ModuleNotFoundError as missing:  # the docs extra is not installed
    raise SystemExit(
        f"python -m bench.charts needs {missing.name}, which the docs extra brings: "
        "pip install -e '.[docs]'"
    ) from None

from bench.report import sig3

STORE = "#3f51b5"  # the store: Material's indigo, as the site's theme
RAW = "#9e9e9e"  # raw redis-py, or the reference a figure names
MISSED = "#e53935"
# Written byte for byte the same from the same JSON: no date, fixed ids.
SVG_METADATA = {"Date": None, "Creator": "kvstore bench.charts"}


def _style() -> None:
    plt.rcParams.update(
        {
            "svg.hashsalt": "kvstore",
            "svg.fonttype": "path",  # text as outlines: the page needs no font
            "font.size": 9,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "axes.grid": True,
            "grid.alpha": 0.3,
        }
    )


def _subtitle(results: dict[str, Any]) -> str:
    kind = "small run" if results.get("small") else "full run"
    return (
        f"{results['server_version']}, Python {results['python']}, redis-py "
        f"{results['redis_py']}; {kind}, medians of {results['rounds']} rounds"
    )


def _save(chart: Chart, out: Path, name: str) -> Path:
    path = out / name
    chart.savefig(path, format="svg", metadata=SVG_METADATA, bbox_inches="tight")
    plt.close(chart)
    return path


def _ratio_panel(axes: Axes, figures: list[dict[str, Any]], title: str, log: bool) -> None:
    names = [f["name"] for f in figures]
    ratios = [f["ratio"] for f in figures]
    colours = [MISSED if f["met"] is False else STORE for f in figures]
    rows = range(len(figures))
    axes.barh(rows, ratios, color=colours, height=0.6)
    for row, figure in zip(rows, figures, strict=True):
        target = figure["target"]
        axes.plot([target, target], [row - 0.4, row + 0.4], color="black", linewidth=1.5)
        axes.annotate(
            f" {sig3(figure['ratio'])} (target {figure['sense']} {sig3(target)})",
            (max(figure["ratio"], target), row),
            va="center",
            fontsize=8,
        )
    axes.set_yticks(list(rows), names)
    axes.invert_yaxis()
    axes.set_title(title, loc="left", fontsize=9)
    if log:
        axes.set_xscale("log")
        axes.set_xlim(right=max(ratios + [f["target"] for f in figures]) * 30)
    else:
        axes.axvline(1.0, color=RAW, linewidth=1, linestyle="--")
        axes.set_xlim(0, max(ratios + [f["target"] for f in figures]) * 1.6)


def ratios(results: dict[str, Any], out: Path) -> Path:
    """Each figure judged by its ratio, as a bar beside the black tick of its target."""
    judged = [
        f
        for f in results["figures"].values()
        if f["judged"] == "ratio" and f["target"] is not None and f["ratio"] is not None
    ]
    times = [f for f in judged if f["sense"] == "<="]
    rates = [f for f in judged if f["sense"] == ">="]
    chart, (top, bottom) = plt.subplots(
        2,
        1,
        figsize=(8, 0.35 * (len(times) + len(rates)) + 2.2),
        height_ratios=[max(len(times), 1), max(len(rates), 1)],
    )
    _ratio_panel(top, times, "Time against raw redis-py (store / raw; lower is better)", False)
    _ratio_panel(
        bottom,
        rates,
        "Rates and speed-ups against their reference (higher is better; log scale)",
        True,
    )
    chart.suptitle(f"The store against the raw client\n{_subtitle(results)}", fontsize=10)
    chart.tight_layout()
    return _save(chart, out, "bench-ratios.svg")


def catalogue_growth(results: dict[str, Any], out: Path) -> Path:
    """A put and a listing per package against the catalogue's size, store and raw."""
    rows = results["catalogue_growth"]
    packages = [row["packages"] for row in rows]
    chart, (put, listing) = plt.subplots(1, 2, figsize=(8, 3.2))
    for axes, store, raw, label in (
        (put, "put_us", "put_raw_us", "put, one at a time (µs)"),
        (listing, "list_us_per_package", "list_raw_us_per_package", "listing, per package (µs)"),
    ):
        axes.plot(packages, [row[store] for row in rows], "o-", color=STORE, label="store")
        axes.plot(packages, [row[raw] for row in rows], "s--", color=RAW, label="raw redis-py")
        axes.set_xscale("log")
        axes.set_xticks(packages, [f"{n:,}" for n in packages])
        axes.minorticks_off()
        axes.set_ylim(bottom=0)
        axes.set_xlabel("packages stored")
        axes.set_title(label, loc="left", fontsize=9)
        axes.legend(frameon=False)
    chart.suptitle(
        f"How cost grows with the catalogue (1 KiB archives, route caching on)\n"
        f"{_subtitle(results)}",
        fontsize=10,
    )
    chart.tight_layout()
    return _save(chart, out, "bench-catalogue-growth.svg")


def route_growth(results: dict[str, Any], out: Path) -> Path:
    """A route lookup against the routes table's size: cached, uncached, raw ``HGET``."""
    rows = results["route_growth"]
    routes = [row["routes"] for row in rows]
    chart, axes = plt.subplots(figsize=(8, 3.2))
    for key, style, colour, label in (
        ("cached_us", "o-", STORE, "store, route cache on"),
        ("uncached_us", "^-", "#7986cb", "store, route cache off"),
        ("raw_hget_us", "s--", RAW, "raw HGET"),
    ):
        axes.plot(routes, [row[key] for row in rows], style, color=colour, label=label)
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xticks(routes, [f"{n:,}" for n in routes])
    axes.minorticks_off()
    axes.set_xlabel("routes in the table")
    axes.set_ylabel("µs per get_package_route")
    axes.legend(frameon=False)
    axes.set_title(
        f"How a route lookup grows with the routes\n{_subtitle(results)}", loc="left", fontsize=9
    )
    chart.tight_layout()
    return _save(chart, out, "bench-route-growth.svg")


def stall(results: dict[str, Any], out: Path) -> Path | None:
    """The event loop's longest stall during a put and a get, store beside raw."""
    found = results.get("stall")
    if not found:
        return None
    size = int(found["size"])
    mib = f"{size // (1 << 20)} MiB" if size >= 1 << 20 else f"{size // 1024} KiB"
    calls = ("put", "get")
    chart, axes = plt.subplots(figsize=(8, 2.8))
    positions = range(len(calls))
    width = 0.38
    for offset, side, colour, label in (
        (-width / 2, "store", STORE, "store"),
        (width / 2, "raw", RAW, "raw redis-py"),
    ):
        values = [found[f"{side}_{call}_ms"] for call in calls]
        bars = axes.barh(
            [p + offset for p in positions], values, height=width, color=colour, label=label
        )
        axes.bar_label(bars, [f" {sig3(v)} ms" for v in values], fontsize=8)
    axes.set_yticks(list(positions), [f"{call} of {mib}" for call in calls])
    axes.invert_yaxis()
    axes.set_xlabel("the event loop's longest stall (ms)")
    axes.set_xlim(0, max(found[f"{s}_{c}_ms"] for s in ("store", "raw") for c in calls) * 1.25)
    axes.legend(frameon=False, loc="lower right")
    axes.set_title(
        f"Event-loop stall with a large archive\n{_subtitle(results)}", loc="left", fontsize=9
    )
    chart.tight_layout()
    return _save(chart, out, "bench-stall.svg")


FLEET_LINES = (
    ("none", "s--", RAW, "no cache"),
    ("cold", "^-", "#7986cb", "cold cache"),
    ("warm", "o-", STORE, "warm cache"),
    ("replicas", "D-", "#00897b", "replicas"),
)


def fleet(results: dict[str, Any], out: Path) -> Path:
    """``python -m bench.fleet``: an engine's time and the primary's bytes against the
    engines restarting at once, for the 1 MiB catalogue (else the largest); reading from
    replicas only if the run measured it (runs before it did not)."""
    sizes = {c["size"]: c for c in results["catalogues"]}
    catalogue = sizes.get(1 << 20) or sizes[max(sizes)]
    fleets = catalogue["fleets"]
    engines = [f["engines"] for f in fleets]
    replicas = all("replicas" in f for f in fleets)
    chart, (times, sent) = plt.subplots(1, 2, figsize=(8, 3.4))
    for config, style, colour, label in FLEET_LINES:
        if config == "replicas" and not replicas:
            continue
        times.plot(
            engines,
            [f[config]["median_s"] for f in fleets],
            style,
            color=colour,
            label=f"{label}, median engine",
        )
        times.plot(
            engines,
            [f[config]["max_s"] for f in fleets],
            ":",
            color=colour,
            linewidth=1,
            label=f"{label}, slowest",
        )
        sent.plot(
            engines,
            [f[config]["sent_bytes"] / (1 << 20) for f in fleets],
            style,
            color=colour,
            label=f"{label}, the primary" if config == "replicas" else label,
        )
    if replicas:
        sent.plot(
            engines,
            [sum(f["replicas"]["replica_sent_bytes"]) / (1 << 20) for f in fleets],
            ":",
            color=FLEET_LINES[-1][2],
            linewidth=1,
            label="replicas, the replicas",
        )
    for axes in (times, sent):
        axes.set_xticks(engines, [str(k) for k in engines])
        axes.minorticks_off()
        axes.set_xlabel("engines restarting at once")
    times.set_ylim(bottom=0)
    times.set_ylabel("s")
    times.set_title("time per engine: listing and routes", loc="left", fontsize=9)
    times.legend(frameon=False, fontsize=7)
    sent.set_yscale("log")
    sent.set_ylabel("MiB (log scale)")
    sent.set_title(
        "bytes the primary sent, per fleet (dotted: the replicas)"
        if replicas
        else "bytes the server sent, per fleet",
        loc="left",
        fontsize=9,
    )
    sent.legend(frameon=False, fontsize=7)
    size = catalogue["size"]
    mib = f"{size >> 20} MiB" if size % (1 << 20) == 0 else f"{size} bytes"
    rounds = fleets[0]["none"]["rounds"]
    servers, shared = ("one server", "the server")
    if replicas:
        servers, shared = (f"one primary and {results.get('replicas', 2)} replicas", "the servers")
    chart.suptitle(
        f"A fleet restarting: {catalogue['archives']} archives of {mib}, {servers}\n"
        f"{results['server_version']}, Python {results['python']}; {results['cores']} cores "
        f"shared by {shared} and every engine; medians of {rounds} rounds",
        fontsize=10,
    )
    chart.tight_layout()
    return _save(chart, out, "bench-fleet.svg")


def draw(results: dict[str, Any], out: Path) -> list[Path]:
    """Every chart the results hold, written into ``out``; their paths."""
    _style()
    out.mkdir(parents=True, exist_ok=True)
    if results.get("kind") == "fleet":
        return [fleet(results, out)]
    drawn = [
        ratios(results, out),
        catalogue_growth(results, out),
        route_growth(results, out),
        stall(results, out),
    ]
    return [path for path in drawn if path is not None]


def _read(parser: argparse.ArgumentParser, path: Path) -> dict[str, Any]:
    try:
        results: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        parser.error(f"cannot read {path}: {exc}")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.charts", description=__doc__)
    parser.add_argument(
        "results",
        type=Path,
        nargs="?",
        help="the JSON of python -m bench --json (or of python -m bench.fleet --json)",
    )
    parser.add_argument("--fleet", type=Path, help="the JSON of python -m bench.fleet --json")
    parser.add_argument(
        "--out", type=Path, default=Path("docs/assets"), help="folder for the SVG files"
    )
    args = parser.parse_args(argv)
    if args.results is None and args.fleet is None:
        parser.error("give RESULTS.json, --fleet FLEET.json, or both")
    drawn: list[Path] = []
    if args.results is not None:
        drawn += draw(_read(parser, args.results), args.out)
    if args.fleet is not None:
        fleet_results = _read(parser, args.fleet)
        if fleet_results.get("kind") != "fleet":
            parser.error(f"{args.fleet} is not the JSON of python -m bench.fleet")
        drawn += draw(fleet_results, args.out)
    for path in drawn:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
