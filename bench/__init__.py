"""Benchmarks of ``RedisPackageStore`` against raw redis-py on the same server.

``python -m bench`` starts its own server on loopback, times each figure for the store
and for the same work done with raw redis-py calls (the floor), and prints medians over
several interleaved rounds with the ratio and its target. Every ratio compares figures
measured in the same run on the same server; absolute times depend on the machine,
ratios much less. ``figures`` holds the figures (and the one place that says how the
raw side calls the put), ``growth`` the tables of how cost grows, ``processes`` the
other processes a figure needs, ``report`` how figures are judged and printed.

Beside it, modules with a ``python -m`` entry of their own: ``bench.durability`` (what
``durability="fsync"`` costs) and ``bench.cluster`` (what layout 2 does for a namespace
on a cluster of three primaries: archives spread, memory, engines listing at once).
"""
