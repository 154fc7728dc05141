"""``status.warnings``: each setting under which an acknowledged put can be lost, and the
advice given for it, as a table of settings and the warnings they give.

Each row starts from settings that lose nothing (append-only file fsynced on every write,
no eviction, this release's layout) and changes what it names. A warning is matched by
the words that name the risk and the fix; ``tests/test_status.py`` reads the same
warnings off real servers through the command line.
"""

from __future__ import annotations

from typing import Any

import pytest

from kvstore.redis.keyspace import FORMAT_VERSION
from kvstore.tools.status import Status, durability_levels, warnings

DURABLE: dict[str, Any] = {
    "appendonly": True,
    "appendfsync": "always",
    "save": "",
    "maxmemory": 0,
    "maxmemory_policy": "noeviction",
    "layout": FORMAT_VERSION.decode(),
}


def status(**settings: Any) -> Status:
    """A status with ``DURABLE`` settings but for ``settings``."""
    server: dict[str, Any] = {
        "server": "valkey",
        "version": "8.1.0",
        "role": "master",
        "connected_replicas": 0,
        "used_memory": 1 << 20,
        "namespace": "aion",
        "packages": 0,
        "routes": 0,
        "archive_bytes": 0,
        "functions": [],
    }
    return Status(**{**server, **DURABLE, **settings})


UNREADABLE_PERSISTENCE = "the persistence settings are not readable with this credential"
EVICTS = "evicts any key"
CAN_DISAPPEAR = "packages, the index and routes can silently disappear"

# (settings changed from DURABLE, the words of each warning in order)
TABLE = [
    pytest.param({}, [], id="durable"),
    # appendonly
    pytest.param(
        {"appendonly": None},
        [[UNREADABLE_PERSISTENCE, "or a restart may lose packages"]],
        id="appendonly-unreadable",
    ),
    pytest.param(
        {"appendonly": None, "appendfsync": None, "save": None},
        [[UNREADABLE_PERSISTENCE]],
        id="appendonly-unreadable-says-nothing-of-the-rest",
    ),
    pytest.param(
        {"appendonly": False, "save": ""},
        [["no persistence", "a restart of the server loses every package", "set appendonly yes"]],
        id="no-persistence",
    ),
    pytest.param(
        {"appendonly": False, "save": "3600 1"},
        [
            [
                "only RDB snapshots (save '3600 1')",
                "a crash loses every package written since the last snapshot",
                "set appendonly yes",
            ]
        ],
        id="snapshots-only",
    ),
    pytest.param(
        {"appendonly": False, "save": None},
        [
            [
                "appendonly is no and the RDB snapshot rules are not readable",
                "without snapshots a restart loses every package",
                "set appendonly yes",
            ]
        ],
        id="snapshots-unreadable",
    ),
    pytest.param(
        {"appendonly": False, "save": "", "appendfsync": "everysec"},
        [["no persistence"]],
        id="appendfsync-unheeded-without-appendonly",
    ),
    # appendfsync
    pytest.param({"save": None}, [], id="always-needs-no-snapshots"),
    pytest.param(
        {"appendfsync": None},
        [["appendfsync is not readable", "unless it is always", "a crash of the machine"]],
        id="appendfsync-unreadable",
    ),
    pytest.param(
        {"appendfsync": "everysec"},
        [
            [
                "appendfsync everysec",
                "about the last second of acknowledged packages",
                "a crash of the server process alone loses none",
                "set appendfsync always",
            ]
        ],
        id="everysec",
    ),
    pytest.param(
        {"appendfsync": "no"},
        [
            [
                "appendfsync no",
                "the operating system decides",
                "more than the last second",
                "set appendfsync always",
            ]
        ],
        id="appendfsync-no",
    ),
    # maxmemory-policy
    pytest.param(
        {"maxmemory_policy": None},
        [["maxmemory-policy is not readable", "an allkeys-* policy would evict packages"]],
        id="policy-unreadable",
    ),
    *(
        pytest.param(
            {"maxmemory_policy": policy, "maxmemory": 0},
            [
                [
                    f"maxmemory-policy {policy} {EVICTS}",
                    "as soon as a maxmemory is set (it is 0, no limit, now)",
                    CAN_DISAPPEAR,
                    "set maxmemory-policy noeviction",
                ]
            ],
            id=f"{policy}-no-limit",
        )
        for policy in ["allkeys-lru", "allkeys-lfu", "allkeys-random"]
    ),
    pytest.param(
        {"maxmemory_policy": "allkeys-lru", "maxmemory": 100 << 20},
        [["maxmemory-policy allkeys-lru", "when the server reaches maxmemory", CAN_DISAPPEAR]],
        id="allkeys-with-a-limit",
    ),
    pytest.param(
        {"maxmemory_policy": "allkeys-lfu", "maxmemory": None},
        [["maxmemory-policy allkeys-lfu", "when the server reaches maxmemory"]],
        id="allkeys-with-the-limit-unreadable",
    ),
    *(
        pytest.param({"maxmemory_policy": policy, "maxmemory": 100 << 20}, [], id=policy)
        for policy in ["volatile-lru", "volatile-lfu", "volatile-random", "volatile-ttl"]
    ),
    # layout
    pytest.param({"layout": None}, [], id="nothing-written-yet"),
    pytest.param({"layout": "2"}, [], id="blob-layout"),
    pytest.param(
        {"layout": "3"},
        [["the namespace holds layout '3'", "this kvstore neither reads nor writes"]],
        id="another-layout",
    ),
    # the library of this release's name
    pytest.param({"library_matches": True}, [], id="this-release-s-library"),
    pytest.param({"library_matches": None}, [], id="library-absent-or-unreadable"),
    pytest.param(
        {"library_matches": False},
        [
            [
                "is not this release's kvstore library (its code differs)",
                "acknowledges puts it may not store",
                "FUNCTION DELETE kvstore_",
                "then run `kvstore setup`",
            ]
        ],
        id="another-library-of-this-release-s-name",
    ),
    # together: persistence first, then eviction, then the layout
    pytest.param(
        {
            "appendonly": False,
            "save": "",
            "maxmemory_policy": "allkeys-random",
            "layout": "0",
        },
        [["no persistence"], ["maxmemory-policy allkeys-random"], ["holds layout '0'"]],
        id="every-risk-at-once",
    ),
    pytest.param(
        {"appendonly": None, "maxmemory_policy": None},
        [[UNREADABLE_PERSISTENCE], ["maxmemory-policy is not readable"]],
        id="nothing-readable",
    ),
]


@pytest.mark.parametrize(("settings", "expected"), TABLE)
def test_each_setting_that_can_lose_a_package_gives_its_warning(
    settings: dict[str, Any], expected: list[list[str]]
) -> None:
    found = warnings(status(**settings))
    assert len(found) == len(expected), found
    for warning, words in zip(found, expected, strict=True):
        for word in words:
            assert word in warning, (word, warning)


LEVELS = [
    pytest.param({}, ["durability='memory'", "durability='fsync'"], id="append-only-7.2-and-later"),
    pytest.param({"appendonly": False}, ["durability='memory'"], id="no-append-only-file"),
    pytest.param({"version": "7.0.15"}, ["durability='memory'"], id="redis-7.0-no-waitaof"),
    pytest.param({"version": "7.2.4"}, ["durability='memory'", "durability='fsync'"], id="7.2"),
    pytest.param(
        {"connected_replicas": 2},
        [
            "durability='memory'",
            "durability='memory', min_replicas up to 2",
            "durability='fsync'",
            "durability='fsync', min_replicas up to 2 (if their appendonly is on)",
        ],
        id="two-replicas",
    ),
    pytest.param({"version": None}, None, id="version-not-readable"),
    pytest.param({"appendonly": None}, None, id="persistence-not-readable"),
    pytest.param({"version": "unstable"}, None, id="version-not-a-number"),
]


@pytest.mark.parametrize(("settings", "expected"), LEVELS)
def test_status_says_which_durability_the_server_can_give(
    settings: dict[str, Any], expected: list[str] | None
) -> None:
    assert durability_levels(status(**settings)) == expected
