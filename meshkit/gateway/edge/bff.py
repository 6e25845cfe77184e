"""BFF composition: one HTTP route that composes several gRPC calls into one JSON document.

A composite route names its calls; a call's request is a JSON template whose
``"{...}"`` strings take values from the path (``{path.order_id}``), the query
(``{query.lang}``) or an earlier call's result (``{order.customerId}``). Calls
whose inputs are ready run concurrently; a call waits only for the calls it
references. Each call has its own timeout, always inside the route's deadline
(``timeout`` or the client's ``Grpc-Timeout``, whichever is shorter).

A failing *required* call fails the request with that call's status (mapped to
HTTP as the gateway maps it). A failing *optional* call leaves its key out and
adds ``{"call", "code", "status", "message"}`` to the ``errors`` list; calls that
depend on it are skipped the same way. The document can then be trimmed with a
field mask (see :mod:`meshkit.gateway.edge.shaping`).

Messages are dynamic (built from the gateway's descriptor catalog); calls go
through the gateway's upstream registry, so balancing, canaries and meshkit's
client policy apply as they do to transcoded calls.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from meshkit._sections import get_bool, get_duration, get_str, section
from meshkit.errors import ConfigError
from meshkit.gateway._asgi import ASGIApp, Receive, Scope, Send, notes
from meshkit.gateway.core._fastjson import DescT
from meshkit.gateway.core._paths import route_path
from meshkit.gateway.core.config import GatewayOptions
from meshkit.gateway.core.descriptors import Catalog, MethodInfo
from meshkit.gateway.core.errors import CODE_NAME, CODE_NUMBER, GatewayError, status_from_rpc_error
from meshkit.gateway.core.httprule import PathTemplate, TemplateError, parse_template
from meshkit.gateway.core.metadata import read_headers
from meshkit.gateway.core.routing import BadPathError, Match, Router, RoutingError
from meshkit.gateway.core.transcoding import JsonCodec
from meshkit.gateway.edge._responses import send_error, send_json
from meshkit.gateway.edge.shaping import ShapingRule
from meshkit.gateway.upstream.upstreams import UpstreamRegistry

_REF = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)((?:\.[A-Za-z_][A-Za-z0-9_]*)*)\}")
_SOURCES = ("path", "query", "header")


@dataclass(frozen=True, slots=True)
class CallSpec:
    """One call of a composite: the RPC, its request template, timeout, optional flag."""

    name: str
    rpc: str
    request: Mapping[str, Any]
    timeout: float | None = None
    optional: bool = False
    depends: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class CompositeSpec:
    """A composite route: HTTP method + path template, calls, deadline, output mask."""

    name: str
    http_method: str
    path: str
    calls: tuple[CallSpec, ...]
    timeout: float = 5.0
    shaping: ShapingRule = field(default_factory=ShapingRule)

    @classmethod
    def from_mapping(cls, raw: object, path: str) -> CompositeSpec:
        """Validate one ``bff:`` entry (dependency cycles and unknown references are errors)."""
        m = section(raw, path, ("name", "method", "path", "calls", "timeout", "fields", "rename"))
        name = get_str(m, "name", path)
        calls_raw = m.get("calls")
        if not isinstance(calls_raw, Mapping) or not calls_raw:
            raise ConfigError(
                f"{path}.calls", "expected a mapping of call name to {rpc, request, ...}"
            )
        calls: list[CallSpec] = []
        for cname, craw in calls_raw.items():
            cp = f"{path}.calls.{cname}"
            if cname in _SOURCES or cname == "errors":
                raise ConfigError(cp, f"{cname!r} is reserved")
            cm = section(craw, cp, ("rpc", "request", "timeout", "optional"))
            req = cm.get("request") or {}
            if not isinstance(req, Mapping):
                raise ConfigError(f"{cp}.request", "expected a mapping (a JSON request template)")
            deps = sorted({ref for ref in _refs(req) if ref not in _SOURCES})
            calls.append(
                CallSpec(
                    str(cname),
                    get_str(cm, "rpc", cp),
                    dict(req),
                    get_duration(cm, "timeout", cp, None),
                    get_bool(cm, "optional", cp, False),
                    tuple(deps),
                )
            )
        names = {c.name for c in calls}
        for c in calls:
            for d in c.depends:
                if d not in names:
                    raise ConfigError(
                        f"{path}.calls.{c.name}.request", f"references unknown call {d!r}"
                    )
        _check_acyclic(calls, path)
        method = get_str(m, "method", path, "GET").upper()
        tpl = get_str(m, "path", path)
        try:
            parse_template(tpl)
        except TemplateError as exc:
            raise ConfigError(f"{path}.path", str(exc)) from None
        shaping = ShapingRule.from_mapping({k: m[k] for k in ("fields", "rename") if k in m}, path)
        return cls(name, method, tpl, tuple(calls), get_duration(m, "timeout", path, 5.0), shaping)


def _refs(obj: Any) -> list[str]:
    out: list[str] = []
    if isinstance(obj, str):
        out.extend(mt.group(1) for mt in _REF.finditer(obj))
    elif isinstance(obj, Mapping):
        for v in obj.values():
            out.extend(_refs(v))
    elif isinstance(obj, list):
        for v in obj:
            out.extend(_refs(v))
    return out


def _check_acyclic(calls: list[CallSpec], path: str) -> None:
    deps = {c.name: set(c.depends) for c in calls}
    done: set[str] = set()
    while deps:
        ready = [n for n, d in deps.items() if d <= done]
        if not ready:
            raise ConfigError(
                f"{path}.calls", f"calls depend on each other in a cycle: {', '.join(sorted(deps))}"
            )
        for n in ready:
            done.add(n)
            del deps[n]


class _Missing(Exception):
    pass


def _lookup(env: Mapping[str, Any], ref: str, dotted: str) -> Any:
    cur: Any = env.get(ref)
    if cur is None:
        raise _Missing(ref)
    for part in dotted.split(".")[1:] if dotted else ():
        if not isinstance(cur, Mapping) or part not in cur:
            return None
        cur = cur[part]
    return cur


def render(template: Any, env: Mapping[str, Any]) -> Any:
    """Fill a request template: a string that is exactly one reference takes the value
    as is (numbers stay numbers); references inside longer strings are interpolated."""
    if isinstance(template, str):
        whole = _REF.fullmatch(template)
        if whole:
            return _lookup(env, whole.group(1), whole.group(2))
        return _REF.sub(lambda mt: str(_lookup(env, mt.group(1), mt.group(2)) or ""), template)
    if isinstance(template, Mapping):
        out = {k: render(v, env) for k, v in template.items()}
        return {k: v for k, v in out.items() if v is not None}
    if isinstance(template, list):
        return [render(v, env) for v in template]
    return template


class _CallFailed(Exception):
    def __init__(
        self,
        call: str,
        code: str,
        message: str,
        status: Any = None,
        details: Sequence[Message] = (),
    ) -> None:
        super().__init__(message)
        self.call = call
        self.code = code
        self.message = message
        self.status = status
        self.details = details


def _check_template(template: Mapping[str, Any], desc: DescT, path: str) -> None:
    """Every field name written in a request template must be a field of its message
    (a misspelt one would otherwise be dropped without a word); nested objects are
    checked against their field's message. Values are checked per request."""
    fields: dict[str, Any] = {}
    for fd in desc.fields:
        fields[fd.name] = fd
        fields[fd.json_name] = fd
    for key, value in template.items():
        if key.startswith("["):
            continue  # an extension: json_format resolves it per request
        fd = fields.get(key)
        if fd is None:
            raise ConfigError(f"{path}.{key}", f"no field {key!r} in {desc.full_name}")
        md = fd.message_type
        if md is None or md.GetOptions().map_entry or md.full_name.startswith("google.protobuf."):
            continue  # a scalar, a map (any keys) or a well-known type (its own JSON)
        if isinstance(value, Mapping):
            _check_template(value, md, f"{path}.{key}")
        elif fd.is_repeated and isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, Mapping):
                    _check_template(item, md, f"{path}.{key}[{i}]")


class Composite:
    """A compiled composite route."""

    def __init__(
        self,
        spec: CompositeSpec,
        catalog: Catalog,
        upstreams: UpstreamRegistry,
        *,
        generate_request_id: bool = True,
        config_path: str | None = None,
        codec: JsonCodec | None = None,
    ) -> None:
        self.spec = spec
        self.catalog = catalog
        self.upstreams = upstreams
        self.generate_request_id = generate_request_id
        # The transcoding routes' codec: a request built from the template is checked as a
        # request body is (wrong-shaped values, unknown enum names: 400 naming the field).
        self.codec = codec if codec is not None else JsonCodec(catalog.pool, GatewayOptions())
        where = config_path or f"bff.{spec.name}"
        by_name = {m.full_name: m for m in catalog.methods}
        self.methods: dict[str, MethodInfo] = {}
        for c in spec.calls:
            mi = by_name.get(c.rpc)
            if mi is None:
                raise ConfigError(f"{where}.calls.{c.name}.rpc", f"unknown RPC {c.rpc!r}")
            if mi.client_streaming or mi.server_streaming:
                raise ConfigError(
                    f"{where}.calls.{c.name}.rpc",
                    f"{c.rpc} is streaming; only unary calls compose",
                )
            _check_template(c.request, mi.input_type.DESCRIPTOR, f"{where}.calls.{c.name}.request")
            self.methods[c.name] = mi
        self.template: PathTemplate = parse_template(spec.path)

    async def run(
        self, env: dict[str, Any], metadata: list[tuple[str, Any]], deadline: float, scope: Scope
    ) -> dict[str, Any]:
        """Run every call; return the composed document (before shaping)."""
        futures: dict[str, asyncio.Future[Any]] = {}
        errors: list[dict[str, Any]] = []
        loop = asyncio.get_running_loop()
        for c in self.spec.calls:
            futures[c.name] = loop.create_future()

        async def one(c: CallSpec) -> None:
            fut = futures[c.name]
            try:
                local = dict(env)
                for d in c.depends:
                    dep = await futures[d]
                    if dep is None:
                        raise _CallFailed(c.name, "FAILED_PRECONDITION", f"skipped: {d!r} failed")
                    local[d] = dep
                result = await self._call(c, render(c.request, local), metadata, deadline, scope)
                fut.set_result(result)
            except _CallFailed as exc:
                if not c.optional:
                    fut.set_exception(exc)
                    return
                errors.append(
                    {
                        "call": c.name,
                        "code": _num(exc.code),
                        "status": exc.code,
                        "message": exc.message,
                    }
                )
                fut.set_result(None)
            except BaseException as exc:
                fut.set_exception(exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise

        tasks = [asyncio.create_task(one(c)) for c in self.spec.calls]
        try:
            await asyncio.gather(*tasks)
            out: dict[str, Any] = {}
            for c in self.spec.calls:
                val = futures[c.name].result()
                if val is not None:
                    out[c.name] = val
        finally:
            for t in tasks:
                t.cancel()
            for f in futures.values():
                if f.done() and not f.cancelled():
                    f.exception()  # mark retrieved
        if errors:
            order = {c.name: i for i, c in enumerate(self.spec.calls)}
            out["errors"] = sorted(errors, key=lambda e: order[e["call"]])
        return out

    async def _call(
        self,
        c: CallSpec,
        request: Any,
        metadata: list[tuple[str, Any]],
        deadline: float,
        scope: Scope,
    ) -> Any:
        mi = self.methods[c.name]
        msg = mi.input_type()
        try:
            self.codec.merge(request, msg, where="request")
        except GatewayError as err:
            raise _CallFailed(
                c.name, err.code, f"cannot build the request: {err.message}", details=err.details
            ) from None
        remaining = deadline - time.monotonic()
        timeout = min(c.timeout, remaining) if c.timeout is not None else remaining
        if timeout <= 0:
            raise _CallFailed(
                c.name, "DEADLINE_EXCEEDED", "no time left before the route's deadline"
            )
        up = self.upstreams.for_service(mi.service)
        if up is None:
            raise _CallFailed(c.name, "UNAVAILABLE", f"no upstream serves {mi.service}")
        channel = up.channel(scope)
        call = channel.unary_unary(
            mi.path,
            request_serializer=mi.input_type.SerializeToString,
            response_deserializer=mi.output_type.FromString,
        )
        try:
            resp = await call(msg, timeout=timeout, metadata=tuple(metadata))
        except grpc.aio.AioRpcError as err:
            rid = next((str(v) for k, v in metadata if k == "x-request-id"), "")
            st = status_from_rpc_error(err, rid)
            raise _CallFailed(
                c.name, CODE_NAME.get(st.code, "UNKNOWN"), st.message, status=st
            ) from None
        return json_format.MessageToDict(resp, descriptor_pool=self.catalog.pool)


def _num(code: str) -> int:
    return CODE_NUMBER.get(code, 2)


class BffApp:
    """ASGI app serving composite routes; other requests go to ``fallback`` (the gateway)."""

    def __init__(
        self,
        composites: list[Composite],
        fallback: ASGIApp | None = None,
        *,
        route_middleware: Any = None,
    ) -> None:
        self.fallback = fallback
        self.router: Router[tuple[Composite, ASGIApp]] = Router()
        for comp in composites:
            handler: ASGIApp = self._handler(comp)
            if route_middleware is not None:
                handler = route_middleware(comp, handler)
            try:
                self.router.add(
                    comp.spec.http_method, comp.template, (comp, handler), f"bff.{comp.spec.name}"
                )
            except RoutingError as exc:
                raise ConfigError(f"bff.{comp.spec.name}.path", str(exc)) from None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path = route_path(scope)
            try:
                found = self.router.match(path, scope["method"])
            except BadPathError:
                found = None
            if isinstance(found, Match):
                comp, handler = found.target
                try:
                    values = found.bindings()
                except BadPathError as exc:
                    await send_error(send, GatewayError("INVALID_ARGUMENT", str(exc)))
                    return
                scope["path_params"] = {".".join(fp): v for fp, v in values}
                notes(scope)["route"] = f"bff.{comp.spec.name}"
                await handler(scope, receive, send)
                return
        if self.fallback is None:
            await send_error(send, GatewayError("NOT_FOUND", "no route"))
            return
        await self.fallback(scope, receive, send)

    def _handler(self, comp: Composite) -> ASGIApp:
        async def handle(scope: Scope, receive: Receive, send: Send) -> None:
            try:
                hdrs = read_headers(
                    scope["headers"],
                    scope.get("client"),
                    generate_request_id=comp.generate_request_id,
                )
            except GatewayError as err:
                await send_error(send, err)
                return
            budget = (
                comp.spec.timeout if hdrs.timeout is None else min(hdrs.timeout, comp.spec.timeout)
            )
            deadline = time.monotonic() + budget
            env: dict[str, Any] = {
                "path": dict(scope.get("path_params") or {}),
                "query": dict(parse_qsl(scope.get("query_string", b"").decode("latin-1"))),
                "header": {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]},
            }
            rid = [(b"x-request-id", hdrs.request_id.encode())] if hdrs.request_id else []
            try:
                doc = await asyncio.wait_for(
                    comp.run(env, hdrs.metadata, deadline, scope), budget + 0.05
                )
            except _CallFailed as exc:
                msg = f"{exc.call}: {exc.message}"
                await send_error(
                    send, GatewayError(exc.code, msg, details=exc.details, headers=rid)
                )
                return
            except TimeoutError:
                await send_error(
                    send,
                    GatewayError("DEADLINE_EXCEEDED", "composite deadline exceeded", headers=rid),
                )
                return
            errors = doc.pop("errors", None)
            if comp.spec.shaping.touches_body:
                doc = comp.spec.shaping.shape(doc)
            if errors:
                doc["errors"] = errors  # never masked away: clients must see what is missing
            body = json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()
            await send_json(send, 200, body, rid)

        return handle
