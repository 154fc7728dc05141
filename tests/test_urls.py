"""URLs: a password never shows, whatever the URL's shape; bad URLs are refused at once."""

from __future__ import annotations

from urllib.parse import quote

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from kvstore import RedisPackageStore
from kvstore.redis.urls import redact_url
from kvstore.server_process import free_port
from tests.test_cli import fails, kv

# Long enough never to occur in a message by chance.
secrets = st.text(
    st.characters(codec="utf-8", exclude_characters="\x00"), min_size=8, max_size=24
).filter(lambda s: len(s.strip()) >= 8)

PREFIXES = [
    "redis://",
    "rediss://",
    "unix://",
    "redis+sentinel://",
    "redis+cluster://",
    "redis:/",
    "redis//",
    "redis:",
    "redis+sentinel:/",
    "REDIS://",
    "http://",
    "",
]


def url_with(secret: str, place: str, prefix: str, host: str, tail: str) -> str:
    encoded = quote(secret, safe="")
    if place == "password":
        return f"{prefix}:{encoded}@{host}{tail}"
    if place == "user-and-password":
        return f"{prefix}user:{encoded}@{host}{tail}"
    if place == "raw-password":  # not percent-encoded, as people do type them
        return f"{prefix}:{secret}@{host}{tail}"
    if place == "password-only":
        return f"{prefix}{encoded}@{host}{tail}"
    separator = "&" if "?" in tail else "?"
    name = {"query": "password", "query-requirepass": "requirepass", "query-pass": "Pass"}[place]
    return f"{prefix}{host}{tail}{separator}{name}={encoded}"


PLACES = [
    "password",
    "user-and-password",
    "raw-password",
    "password-only",
    "query",
    "query-requirepass",
    "query-pass",
]
TAILS = ["", "/0", "/abc", "/svc", "/svc/x", "?foo=bar", "?db=x", "?db=1", ":bad/1"]


def leaks(secret: str, text: str) -> bool:
    return secret in text or quote(secret, safe="") in text


@settings(max_examples=300, deadline=None)
@given(
    secret=secrets,
    place=st.sampled_from(PLACES),
    prefix=st.sampled_from(PREFIXES),
    host=st.sampled_from(["host:6379", "h", "127.0.0.1:1,127.0.0.1:2", "[::1]:1", "host:badport"]),
    tail=st.sampled_from(TAILS),
)
def test_no_url_shows_its_password(
    secret: str, place: str, prefix: str, host: str, tail: str
) -> None:
    # The same URL with another password says nothing that contains this one by chance
    # (a secret such as "redis+se" is part of the scheme's name, not a leak).
    other = "Zq9-placeholder"
    assume(not leaks(secret, said(url_with(other, place, prefix, host, tail)).replace(other, "")))
    text = said(url_with(secret, place, prefix, host, tail))
    assert not leaks(secret, text), text


def said(url: str) -> str:
    """All the library says of ``url``: its redacted form, and the error or the store."""
    try:
        store = RedisPackageStore.from_url(url, timeout=0.1)
    except (ValueError, TypeError) as exc:
        return f"{redact_url(url)}\n{exc}"
    return f"{redact_url(url)}\n{store!r}"


@pytest.mark.parametrize(
    "url",
    [
        "redis:/:pw-secret-1@host:6379",
        "redis//:pw-secret-1@host",
        "redis://host:badport?password=pw-secret-1",
        "redis+sentinel:/:pw-secret-1@h/svc",
        "redis://u:pw-secret-1@h:1?password=pw-secret-1&db=x",
        "pw-secret-1@host:6379",  # no scheme: what looks like one is the password
        "pw-secret-1//:x@host",
    ],
)
def test_malformed_urls_are_refused_without_their_password(url: str) -> None:
    with pytest.raises(ValueError) as raised:
        RedisPackageStore.from_url(url)
    assert "pw-secret-1" not in str(raised.value)
    assert "***" in str(raised.value)


def test_a_database_that_is_not_a_number_is_refused() -> None:
    with pytest.raises(ValueError, match=r"database .* must be a number"):
        RedisPackageStore.from_url("redis://h:1/abc")
    with pytest.raises(ValueError, match="Invalid value for 'db'"):
        RedisPackageStore.from_url("redis://h:1?db=abc")
    RedisPackageStore.from_url("redis://h:1/3")  # a number is fine


@pytest.mark.parametrize(
    "url",
    [
        "redis://h:0",
        "redis://:pw@h:0/1",
        "rediss://h:65536",
        "redis://[::1]:99999",
        "redis://h:-1",
        "redis+cluster://h:1,h:0",
        "redis+sentinel://h:70000,h:1/svc",
    ],
)
def test_a_port_outside_1_to_65535_is_refused_for_every_scheme(url: str) -> None:
    # redis-py reads port 0 as its default port, 6379: another server than the one named.
    with pytest.raises(ValueError, match="port must be a number from 1 to 65535"):
        RedisPackageStore.from_url(url)


@pytest.mark.parametrize(
    "url",
    [
        "redis://%ff:pw-secret-1@h:1",
        "redis://:pw-secret-1%ff@h:1",
        "redis://u\udcff:pw-secret-1@h:1",  # a byte 0xff in a command line's argument
        "rediss://h:1?client_name=%c3",
        "unix://%ff:pw-secret-1@/tmp/socket",
        "redis+cluster://%ff:pw-secret-1@h:1",
        "redis+sentinel://:pw-secret-1\udcff@h:1/svc",
    ],
)
def test_a_url_that_is_not_utf_8_is_refused_without_its_password(url: str) -> None:
    with pytest.raises(ValueError, match=r"url is not UTF-8 \(as typed or %-encoded\)") as raised:
        RedisPackageStore.from_url(url)
    assert "pw-secret-1" not in str(raised.value)


def test_an_unknown_url_option_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="unknown option 'foo'"):
        RedisPackageStore.from_url("redis://h:1?foo=bar")
    with pytest.raises(ValueError, match="no options after"):
        RedisPackageStore.from_url("redis+sentinel://h:1/svc?foo=bar")
    # Options redis-py knows are still taken.
    RedisPackageStore.from_url("redis://h:1?socket_keepalive=true&client_name=x")


@pytest.mark.slow
@settings(max_examples=12, deadline=None)
@given(
    secret=secrets.filter(lambda s: not s.startswith("-")),
    place=st.sampled_from(PLACES),
    prefix=st.sampled_from(["redis://", "redis:/", "redis//", "redis+sentinel:/", "unix://"]),
    tail=st.sampled_from(["", "/abc", "?foo=bar", "/0"]),
)
def test_the_command_line_never_prints_a_password(
    secret: str, place: str, prefix: str, tail: str
) -> None:
    url = url_with(secret, place, prefix, f"127.0.0.1:{free_port()}", tail)
    result = kv("ls", "--url", url, "--timeout", "0.5")
    output = result.stdout.decode(errors="replace") + result.stderr.decode(errors="replace")
    assert result.returncode in (1, 2), output
    assert not leaks(secret, output), output
    assert "Traceback" not in output


@pytest.mark.slow
@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis://127.0.0.1:1/abc", "must be a number"),
        ("redis://127.0.0.1:1?foo=bar", "unknown option 'foo'"),
        ("redis:/:pw-secret-1@127.0.0.1:1", "url must start with"),
    ],
)
def test_the_command_line_refuses_bad_urls_in_one_line(url: str, says: str) -> None:
    err = fails(kv("ls", "--url", url, "--timeout", "1"), says, 2)
    assert "pw-secret-1" not in err
