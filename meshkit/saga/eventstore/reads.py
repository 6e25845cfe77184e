"""Reading a stream without a consumer: one message by direct get (any replica
answers) or from the stream leader (``STREAM.MSG.GET``), a stream's subjects with
their counts, and every message on a filter through batched direct gets
(:func:`read_batches`, ADR-31), or an ephemeral consumer when the stream has no
direct gets.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import typing
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.js import api

from meshkit.saga import _client
from meshkit.saga.eventstore.errors import EventStoreError, EventStoreUnavailable

log = logging.getLogger("meshkit.saga.eventstore")


@dataclass(frozen=True)
class RawMessage:
    """A stored message as read back: subject, sequence, headers, payload, and how
    many messages matching the read's filter follow it."""

    subject: str
    seq: int
    headers: Mapping[str, str]
    data: bytes
    pending: int


async def direct_get(
    nc: NATS, stream: str, request: Mapping[str, Any], wait_s: float
) -> RawMessage | None:
    """One message by direct get (``request`` as ADR-31 has it); None for 404."""
    msg = await _client.replies(nc).request(
        f"$JS.API.DIRECT.GET.{stream}",
        json.dumps(request).encode(),
        None,
        wait_s,
    )
    h = msg.headers or {}
    status = h.get("Status")
    if status == "404":
        return None
    what = f"direct get {json.dumps(request)} from stream {stream}"
    if status in ("503", "408"):
        raise EventStoreUnavailable(f"{what}: {status} {h.get('Description', '')}".rstrip())
    if status:
        raise EventStoreError(f"{what}: {status} {h.get('Description', '')}".rstrip())
    return RawMessage(
        subject=h.get("Nats-Subject", ""),
        seq=int(h.get("Nats-Sequence", "0")),
        headers=h,
        data=bytes(msg.data),
        pending=0,
    )


async def leader_get(
    nc: NATS, stream: str, request: Mapping[str, Any], wait_s: float
) -> RawMessage | None:
    """One message through the stream leader (``STREAM.MSG.GET``); None for 404."""
    what = f"reading {json.dumps(request)} from the leader of stream {stream}"
    try:
        msg = await _client.replies(nc).request(
            f"$JS.API.STREAM.MSG.GET.{stream}",
            json.dumps(request).encode(),
            None,
            wait_s,
        )
    except nats.errors.NoRespondersError:
        raise EventStoreUnavailable(f"{what}: no responders") from None
    except nats.errors.TimeoutError:
        raise EventStoreUnavailable(f"{what}: no answer in {wait_s}s") from None
    h = msg.headers or {}
    if h.get("Status") in ("503", "408"):
        raise EventStoreUnavailable(f"{what}: {h.get('Status')} {h.get('Description', '')}")
    resp = json.loads(msg.data)
    err = resp.get("error")
    if err:
        if err.get("err_code") == 10037 or err.get("code") == 404:
            return None
        if err.get("code") == 503:
            raise EventStoreUnavailable(f"{what}: {err.get('description', err)}")
        raise EventStoreError(f"{what}: {err.get('description', err)}")
    m = resp["message"]
    return RawMessage(
        subject=m["subject"],
        seq=int(m["seq"]),
        headers=_parse_headers(base64.b64decode(m.get("hdrs") or b"")),
        data=base64.b64decode(m.get("data") or b""),
        pending=0,
    )


async def stream_subjects(
    nc: NATS, stream: str, subjects_filter: str, wait_s: float
) -> dict[str, int]:
    """The stream's subjects matching ``subjects_filter``, with their message counts.

    Read page by page: the server answers at most 100,000 subjects at a time.
    """
    out: dict[str, int] = {}
    while True:
        request = {"subjects_filter": subjects_filter, "offset": len(out)}
        msg = await _client.replies(nc).request(
            f"$JS.API.STREAM.INFO.{stream}",
            json.dumps(request).encode(),
            None,
            wait_s,
        )
        resp = json.loads(msg.data)
        if "error" in resp:
            raise nats.js.errors.APIError.from_error(resp["error"])
        page = (resp.get("state") or {}).get("subjects") or {}
        out.update(page)
        if not page or len(out) >= int(resp.get("total", 0) or 0):
            return out


def _parse_headers(raw: bytes) -> dict[str, str]:
    """A NATS header block (``NATS/1.0`` then ``Name: value`` lines) as a dict."""
    out: dict[str, str] = {}
    for line in raw.decode(errors="replace").split("\r\n")[1:]:
        name, sep, value = line.partition(":")
        if sep and name:
            out[name.strip()] = value.strip()
    return out


# Per connection, the streams known to lack allow_direct (read through a consumer instead).
_NO_DIRECT: weakref.WeakKeyDictionary[NATS, set[str]] = weakref.WeakKeyDictionary()


async def read_batches(
    nc: NATS, stream: str, subject: str, start_seq: int, batch: int, wait_s: float
) -> typing.AsyncGenerator[list[RawMessage], None]:
    """Every message on ``subject`` (wildcards allowed) from ``start_seq``, in batches.

    Uses batched direct gets (ADR-31) when the stream allows them; otherwise an
    ephemeral ordered pull consumer, so streams declared elsewhere work too.
    """
    no_direct = _NO_DIRECT.setdefault(nc, set())
    if stream not in no_direct:
        try:
            seq = start_seq
            while True:
                got = await _direct_batch(nc, stream, subject, seq, batch, wait_s)
                if got:
                    yield got
                if not got or got[-1].pending == 0:
                    return
                seq = got[-1].seq + 1
        except _NoDirect:
            # "No responders" also answers while a restarting server's JetStream is
            # not up yet: fall back for good only when the stream really lacks direct
            # gets, otherwise fail this read (callers retry) and stay on the fast path.
            if await _allows_direct(nc, stream, wait_s):
                raise EventStoreUnavailable(
                    f"reading {subject} from stream {stream}: direct get has no responders "
                    "(server starting?)"
                ) from None
            no_direct.add(stream)
            log.info("stream %s has no direct get; reading through a consumer", stream)
    async for chunk in _consumer_batches(nc, stream, subject, start_seq, batch, wait_s):
        yield chunk


class _NoDirect(Exception):
    """The stream answers no batched direct get: read through a consumer instead."""


async def _allows_direct(nc: NATS, stream: str, wait_s: float) -> bool:
    try:
        info = await nc.jetstream(timeout=wait_s).stream_info(stream)
    except nats.js.errors.NotFoundError:
        raise EventStoreError(f"stream {stream} not found") from None
    return bool(info.config.allow_direct)


async def _direct_batch(
    nc: NATS, stream: str, subject: str, start_seq: int, batch: int, wait_s: float
) -> list[RawMessage]:
    """One batched direct get: up to ``batch`` messages on ``subject`` from ``start_seq``."""
    # A batch answers with many messages on one reply subject: the connection's
    # shared reply subscription carries them (no SUB and UNSUB per read).
    replies = _client.replies(nc)
    await replies.ready()
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    out: list[RawMessage] = []

    def on_msg(msg: Any) -> None:
        if done.done():
            return
        h = msg.headers or {}
        status = h.get("Status")
        if status:
            if status in ("204", "404"):  # end of batch / nothing there
                done.set_result(None)
            elif status == "503":  # no responders: the stream does not allow direct get
                done.set_exception(_NoDirect())
            else:
                desc = next((str(v) for k, v in h.items() if str(k).endswith("Description")), "")
                done.set_exception(
                    EventStoreError(f"reading {subject} from stream {stream}: {status} {desc}")
                )
            return
        out.append(
            RawMessage(
                subject=h.get("Nats-Subject", subject),
                seq=int(h.get("Nats-Sequence", "0")),
                headers=h,
                data=bytes(msg.data),
                pending=int(h.get("Nats-Num-Pending", "0") or 0),
            )
        )

    reply = replies.listen(on_msg)
    try:
        request = {"seq": start_seq, "next_by_subj": subject, "batch": batch}
        await nc.publish(f"$JS.API.DIRECT.GET.{stream}", json.dumps(request).encode(), reply=reply)
        try:
            await asyncio.wait_for(done, wait_s)
        except TimeoutError:
            raise EventStoreUnavailable(
                f"reading {subject} from stream {stream}: no answer in {wait_s}s"
            ) from None
        return out
    finally:
        replies.forget(reply)


async def _consumer_batches(
    nc: NATS, stream: str, subject: str, start_seq: int, batch: int, wait_s: float
) -> typing.AsyncGenerator[list[RawMessage], None]:
    js = nc.jetstream(timeout=wait_s)
    try:
        psub = await js.pull_subscribe(
            subject,
            stream=stream,
            config=api.ConsumerConfig(
                deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
                opt_start_seq=max(1, start_seq),
                ack_policy=api.AckPolicy.NONE,
                inactive_threshold=30.0,
                mem_storage=True,
            ),
        )
    except nats.js.errors.NotFoundError:
        raise EventStoreError(f"stream {stream} not found") from None
    try:
        info = await psub.consumer_info()
        if info.num_pending == 0:
            return
        while True:
            try:
                msgs = await psub.fetch(batch, timeout=min(wait_s, 1.0))
            except nats.errors.TimeoutError:
                return
            out = []
            for m in msgs:
                md = m.metadata
                out.append(
                    RawMessage(
                        subject=m.subject,
                        seq=int(md.sequence.stream),
                        headers=dict(m.headers or {}),
                        data=bytes(m.data),
                        pending=int(md.num_pending or 0),
                    )
                )
            if out:
                yield out
            if not out or out[-1].pending == 0:
                return
    finally:
        with contextlib.suppress(Exception):
            await js.delete_consumer(stream, (await psub.consumer_info()).name)
        with contextlib.suppress(Exception):
            await psub.unsubscribe()
