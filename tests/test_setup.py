"""``kvstore setup``: an operator loads the kvstore library for engines that may not.

Each test runs ``python -m kvstore`` in a subprocess, against the real servers of
``conftest``, the embedded server, and a cluster (in ``test_cluster``).
"""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest
from redis import Redis

from kvstore.redis.scripts import LIBRARY
from kvstore.server_process import LocalServer

from .test_acl import rule_for
from .test_cli import fails, kv, ok
from .test_store_library import impostor_text

# Each test runs the command line in subprocesses.
pytestmark = pytest.mark.slow


def library_loaded(port: int) -> bool:
    with Redis(port=port) as raw:
        return bool(raw.function_list(library=LIBRARY.name))


def test_setup_loads_the_library_and_says_so(server: LocalServer) -> None:
    with Redis(port=server.port) as raw:
        raw.function_flush()
    assert not library_loaded(server.port)
    said = ok("setup", "--url", server.url)
    assert said == f"127.0.0.1:{server.port}: loaded {LIBRARY.name}\n"
    assert library_loaded(server.port)
    # Idempotent: a second run changes nothing and says so.
    said = ok("setup", "--url", server.url)
    assert said == f"127.0.0.1:{server.port}: {LIBRARY.name} was loaded already\n"


def test_setup_reports_another_library_of_this_release_s_name(server: LocalServer) -> None:
    with Redis(port=server.port) as raw:
        raw.function_load(impostor_text(), replace=True)
    try:
        err = fails(kv("setup", "--url", server.url), "is not this release's kvstore library")
        assert f"`FUNCTION DELETE {LIBRARY.name}`, then run `kvstore setup" in err
        assert "was loaded already" not in err
    finally:
        with Redis(port=server.port) as raw:
            raw.function_load(LIBRARY.text, replace=True)


def test_setup_on_the_embedded_server(tmp_path: Path) -> None:
    said = ok("setup", "--data-dir", str(tmp_path / "data"))
    assert LIBRARY.name in said


def test_setup_with_a_credential_that_may_not_load_says_so_in_one_line(
    server: LocalServer,
) -> None:
    name, password = f"engine-{secrets.token_hex(4)}", secrets.token_hex(8)
    with Redis(port=server.port) as admin:
        admin.function_flush()
        admin.execute_command("ACL", "SETUSER", name, "on", f">{password}", *rule_for("aion"))
        try:
            url = f"redis://{name}:{password}@127.0.0.1:{server.port}"
            # Not "run kvstore setup": this is it. Run it with a credential that may.
            err = fails(kv("setup", "--url", url), "this credential may not FUNCTION LOAD")
            assert "run setup again with a credential that may" in err
            assert password not in err
            assert not library_loaded(server.port)
        finally:
            admin.execute_command("ACL", "DELUSER", name)
            admin.function_load(LIBRARY.text)
