"""The saga bus's header parser gives exactly nats-py's result, for any bytes."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from nats.aio.client import Client as NatsClient

from meshkit._compat import nats as nats_compat
from meshkit.saga._client import Client, parse_header_lines

nats_parse = NatsClient._parse_header_lines


@pytest.mark.parametrize(
    "raw",
    [
        b"Nats-Msg-Id: abc\r\nMeshkit-Event-Type: shop.v1.OrderCreated\r\n\r\n",
        b"a:b\r\n",
        b"k:\tv \r\n",
        b" k : v\r\n",
        b":v\r\n",
        b"noColon\r\n",
        b"a b: c\r\n",  # whitespace inside a name: dropped
        b"x\x1cy: 1\r\n",  # a character str.isspace() accepts
        b"\xff: x\r\n",  # a name that is not ASCII: dropped
        b"k\xc3\xa9: v\r\n",
        b"k: \xff\xfe\r\n",  # invalid UTF-8 in a value: replaced
        b"k: caf\xc3\xa9\r\n",
        b"k: a\xc2\xa0\r\n",  # a non-ASCII space at the end of a value is kept
        b"k: v\x0b\r\n",
        b"k: 1\r\nk: 2\r\n",  # the last one wins
        b"k: a:b:c\r\n",
        b"k: a\nb\r\n",
        b"",
    ],
)
def test_matches_nats_py_on_edge_cases(raw: bytes) -> None:
    assert parse_header_lines(raw) == nats_parse(raw)


_pieces = st.sampled_from(
    [b"\r\n", b":", b" ", b"\t", b"\x0b", b"\x1c", b"\xff", b"\xc3\xa9", b"\xc2\xa0", b"a", b"K-1"]
)


@given(st.lists(st.one_of(_pieces, st.binary(max_size=4)), max_size=30).map(b"".join))
def test_matches_nats_py_on_any_bytes(raw: bytes) -> None:
    assert parse_header_lines(raw) == nats_parse(raw)


def test_the_bus_client_uses_it_where_its_fast_path_is_on() -> None:
    # Only through meshkit._compat.nats, on the tested nats-py series; elsewhere (or with
    # MESHKIT_COMPAT=off) the bus connects with nats-py's own client.
    if nats_compat.FAST_PATHS["parse_headers"]:
        assert Client._parse_header_lines is parse_header_lines
    else:
        assert Client._parse_header_lines is nats_parse
    if nats_compat.FAST_PATHS["publish"]:
        assert Client._send_publish is not NatsClient._send_publish
    else:
        assert Client._send_publish is NatsClient._send_publish


@pytest.mark.parametrize(
    "headers",
    [
        {"Nats-Msg-Id": "abc", "Meshkit-Event-Type": "shop.v1.OrderCreated"},
        {" K ": " v ", "": "skipped", "a": "x\r\ny\nz"},
        {"k": "caf\u00e9", "k2": ""},
    ],
)
def test_header_encoding_is_nats_py_s(headers: dict[str, str]) -> None:
    from meshkit.saga._client import encode_headers

    hdr = bytearray(b"NATS/1.0\r\n")
    for k, v in headers.items():  # nats-py's own loop (Client._send_publish)
        key = k.strip()
        if not key:
            continue
        hdr.extend(key.encode() + b": " + v.strip().replace("\r", " ").replace("\n", " ").encode())
        hdr.extend(b"\r\n")
    hdr.extend(b"\r\n")
    assert encode_headers(headers) == bytes(hdr)


@pytest.mark.parametrize("bad", ["a b", "a:b", "k\r\nPUB x 1", "\u00e9"])
def test_a_header_name_nats_py_rejects_is_rejected(bad: str) -> None:
    import nats.errors

    from meshkit.saga._client import encode_headers

    with pytest.raises(nats.errors.BadHeaderError):
        encode_headers({bad: "v"})
