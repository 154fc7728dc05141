"""The command line's reading of a store's failure: each message the store gives when it
cannot reach or enter a server, and the sentence the operator sees instead. The messages
are the store's own (``<server>: <error>: <detail>``), as the subprocess tests in
``tests/test_cli*.py`` meet them; no server is started here."""

from __future__ import annotations

import pytest

from kvstore.tools.cli.explain import explain_failure, is_final

LOCAL = "127.0.0.1:6379"
URL = f"redis://{LOCAL}"
REFUSED = f"{LOCAL}: ConnectionError: Error 111 connecting to {LOCAL}. Connect call failed"
NEEDS = (
    f"{LOCAL}: AuthenticationError: HELLO must be called with the client already "
    "authenticated, otherwise the HELLO <proto> AUTH <user> <pass> option can be used"
)
WRONG = f"{LOCAL}: AuthenticationError: invalid username-password pair or user is disabled."
SENTINEL_TIMEOUT = "sentinel service svc: TimeoutError: no reply within 2 s, retries included"
CLUSTER_REFUSED = (
    "redis cluster: RedisClusterException: Redis Cluster cannot be connected. Please provide "
    "at least one reachable node: Error 111 connecting to 127.0.0.1:7000. Connect call failed"
)

NO_SERVER = f"no server listens at {LOCAL} (connection refused): is it running there?"
HOW_TO_GIVE = (
    f"the server at {LOCAL} needs a password: put it in the URL "
    "(redis://:PASSWORD@host:port) or KVSTORE_URL"
)
REFUSED_PASSWORD = (
    f"the server at {LOCAL} refused the password in the URL: it is wrong, or the user is "
    "unknown or disabled"
)


@pytest.mark.parametrize(
    ("message", "url", "timeout", "expected"),
    [
        # Nothing listens.
        pytest.param(REFUSED, URL, 5.0, NO_SERVER, id="refused-by-errno"),
        pytest.param(
            f"{LOCAL}: ConnectionError: Connection refused", URL, 5.0, NO_SERVER, id="refused"
        ),
        pytest.param(REFUSED, None, 5.0, NO_SERVER, id="refused-embedded"),
        # A host that is not known.
        pytest.param(
            "nohost.invalid:6379: ConnectionError: Error -2 connecting to nohost.invalid:6379. "
            "Name or service not known.",
            "redis://nohost.invalid:6379",
            5.0,
            "the host of nohost.invalid:6379 is not known (its name does not resolve)",
            id="unknown-host",
        ),
        pytest.param(
            "db.example:6379: ConnectionError: Error -3 connecting to db.example:6379. "
            "Temporary failure in name resolution.",
            "redis://db.example:6379",
            5.0,
            "the host of db.example:6379 is not known (its name does not resolve)",
            id="name-resolution-fails",
        ),
        # Passwords: missing, wrong, and the embedded server's own.
        pytest.param(NEEDS, URL, 5.0, HOW_TO_GIVE, id="needs-password"),
        pytest.param(
            f"{LOCAL}: ResponseError: NOAUTH Authentication required.",
            URL,
            5.0,
            HOW_TO_GIVE,
            id="noauth",
        ),
        pytest.param(
            WRONG, f"redis://:wrong-one@{LOCAL}", 5.0, REFUSED_PASSWORD, id="wrong-password"
        ),
        pytest.param(
            WRONG, f"redis://nobody:wrong-one@{LOCAL}", 5.0, REFUSED_PASSWORD, id="unknown-user"
        ),
        pytest.param(
            WRONG, f"{URL}?password=wrong-one", 5.0, REFUSED_PASSWORD, id="password-in-query"
        ),
        pytest.param(
            f"{LOCAL}: ResponseError: WRONGPASS invalid username-password pair",
            f"redis://:wrong-one@{LOCAL}/0",
            5.0,
            REFUSED_PASSWORD,
            id="wrongpass",
        ),
        pytest.param(WRONG, None, 5.0, WRONG, id="embedded-password-is-its-own"),
        # A database the server does not have.
        pytest.param(
            f"{LOCAL}: ResponseError: DB index is out of range",
            f"{URL}/99",
            5.0,
            f"the server at {LOCAL} has no database of the number the URL names (/DB)",
            id="no-such-database",
        ),
        # No reply in time: the operator's --timeout, as given.
        pytest.param(
            f"{LOCAL}: TimeoutError: no reply within 5 s, retries included",
            URL,
            5.0,
            f"the server at {LOCAL} did not reply within 5 s (--timeout)",
            id="timeout",
        ),
        pytest.param(
            f"{LOCAL}: TimeoutError",
            URL,
            0.25,
            f"the server at {LOCAL} did not reply within 0.25 s (--timeout)",
            id="timeout-bare",
        ),
        # Through a sentinel or a cluster: the hosts the URL gave, without its password.
        pytest.param(
            SENTINEL_TIMEOUT,
            "redis+sentinel://:pw-9c1@127.0.0.1:26379,127.0.0.1:26380/svc",
            2.0,
            "the server at sentinel service svc (via 127.0.0.1:26379,127.0.0.1:26380) did not "
            "reply within 2 s (--timeout)",
            id="sentinel-timeout",
        ),
        pytest.param(
            CLUSTER_REFUSED,
            "redis+cluster://127.0.0.1:7000",
            5.0,
            "no server listens at redis cluster (via 127.0.0.1:7000) (connection refused): is "
            "it running there?",
            id="cluster-refused",
        ),
        pytest.param(
            "sentinel service svc: AuthenticationError: invalid username-password pair",
            "redis+sentinel://u:pw-9c1@10.0.0.5:26379/svc",
            5.0,
            "the server at sentinel service svc (via 10.0.0.5:26379) refused the password in "
            "the URL: it is wrong, or the user is unknown or disabled",
            id="sentinel-wrong-password",
        ),
        # Anything else is already exact: as it is.
        pytest.param(
            "unix:///run/no.sock: ConnectionError: Error 2 connecting to /run/no.sock. "
            "No such file or directory.",
            "unix:///run/no.sock",
            5.0,
            "unix:///run/no.sock: ConnectionError: Error 2 connecting to /run/no.sock. "
            "No such file or directory.",
            id="other-connection-error",
        ),
        pytest.param(
            f"{LOCAL}: ResponseError: OOM command not allowed when used memory > 'maxmemory'.",
            URL,
            5.0,
            f"{LOCAL}: ResponseError: OOM command not allowed when used memory > 'maxmemory'.",
            id="other-server-error",
        ),
        pytest.param("connection refused", URL, 5.0, "connection refused", id="no-server-part"),
        pytest.param(REFUSED, "redis://[::1:6379", 5.0, REFUSED, id="url-that-does-not-parse"),
    ],
)
def test_a_store_failure_reads_as_what_to_do(
    message: str, url: str | None, timeout: float, expected: str
) -> None:
    assert explain_failure(message, url, timeout) == expected


@pytest.mark.parametrize(
    ("message", "final"),
    [
        (REFUSED, True),
        (CLUSTER_REFUSED, True),
        (
            "h:6379: ConnectionError: Error -2 connecting to h:6379. Name or service not known.",
            True,
        ),
        (f"{LOCAL}: TimeoutError: no answer to PING within 5 s", True),
        (NEEDS, False),  # the command's store says what to do
        (f"{LOCAL}: ResponseError: LOADING Redis is loading the dataset in memory", False),
        (f"{LOCAL}: ConnectionError: Connection reset by peer", False),
    ],
)
def test_a_first_contact_is_final_when_retrying_could_only_wait(message: str, final: bool) -> None:
    assert is_final(message) is final
