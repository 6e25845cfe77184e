"""Path templates (grammar, errors) and the segment trie (priority, verbs, 405, ambiguity)."""

from __future__ import annotations

from urllib.parse import quote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshkit.gateway.core.httprule import DEEP, WILD, TemplateError, Variable, parse_template
from meshkit.gateway.core.routing import BadPathError, Match, Router, RoutingError

pytestmark = pytest.mark.unit


# --------------------------------------------------------------------------- parser


@pytest.mark.parametrize(
    ("text", "segments", "verb", "variables"),
    [
        ("/v1/orders", ("v1", "orders"), None, ()),
        ("/v1/orders/{order_id}", ("v1", "orders", WILD), None, (Variable(("order_id",), 2, 3),)),
        (
            "/v1/{name=orders/*}:cancel",
            ("v1", "orders", WILD),
            "cancel",
            (Variable(("name",), 1, 3),),
        ),
        ("/v1/{order.order_id}", ("v1", WILD), None, (Variable(("order", "order_id"), 1, 2),)),
        ("/v1/files/{path=**}", ("v1", "files", DEEP), None, (Variable(("path",), 2, None),)),
        ("/v1/{a=x/*/b/**}", ("v1", "x", WILD, "b", DEEP), None, (Variable(("a",), 1, None),)),
        ("/v1/*/x/**:get", ("v1", WILD, "x", DEEP), "get", ()),
        ("/v1/orders:watch", ("v1", "orders"), "watch", ()),
        ("/a", ("a",), None, ()),
    ],
)
def test_parse_valid(
    text: str, segments: tuple[str, ...], verb: str | None, variables: tuple[Variable, ...]
) -> None:
    t = parse_template(text)
    assert t.segments == segments
    assert t.verb == verb
    assert t.variables == variables


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("v1/orders", "must start with '/'"),
        ("/v1//orders", "empty segment"),
        ("/v1/{a={b}}", "nested variable"),
        ("/v1/{a", "unterminated"),
        ("/v1/{1abc}", "bad field path"),
        ("/v1/**/x", "'**' must be the last"),
        ("/v1/{a}/{a}", "bound twice"),
        ("/v1/x:", "empty verb"),
        ("/v1/x:a:b", "unexpected"),
        ("/v1/a b", "bad literal"),
        ("/v1/{a.}", "bad field path"),
    ],
)
def test_parse_invalid_names_problem(text: str, needle: str) -> None:
    with pytest.raises(TemplateError) as exc:
        parse_template(text)
    assert needle in str(exc.value)
    assert text in str(exc.value)


def test_variable_multi_segment_flag() -> None:
    t = parse_template("/v1/{a}/{b=x/*}/{c=**}")
    assert [v.multi_segment for v in t.variables] == [False, True, True]


# --------------------------------------------------------------------------- router


def _router(*specs: tuple[str, str]) -> Router[str]:
    r: Router[str] = Router()
    for method, text in specs:
        r.add(method, parse_template(text), f"{method} {text}", owner=f"rpc {text}")
    return r


def _match(r: Router[str], path: str, method: str = "GET") -> Match[str]:
    m = r.match(path, method)
    assert isinstance(m, Match), m
    return m


def test_literal_beats_wildcard_beats_deep() -> None:
    r = _router(("GET", "/v1/orders/{id}"), ("GET", "/v1/orders/special"), ("GET", "/v1/{rest=**}"))
    assert _match(r, "/v1/orders/special").target == "GET /v1/orders/special"
    assert _match(r, "/v1/orders/42").target == "GET /v1/orders/{id}"
    m = _match(r, "/v1/orders/42/items")
    assert m.target == "GET /v1/{rest=**}"
    assert m.bindings() == [(("rest",), "orders/42/items")]


def test_backtracks_when_literal_branch_dead_ends() -> None:
    r = _router(("GET", "/v1/a/b"), ("GET", "/v1/{x}/c"))
    assert _match(r, "/v1/a/c").bindings() == [(("x",), "a")]


def test_custom_verb_and_fallback_to_literal_colon() -> None:
    r = _router(("POST", "/v1/{name=orders/*}:cancel"), ("GET", "/v1/{name=**}"))
    m = _match(r, "/v1/orders/7:cancel", "POST")
    assert m.bindings() == [(("name",), "orders/7")]
    # No GET rule with a verb: the colon stays part of the value.
    assert _match(r, "/v1/orders/7:cancel", "GET").bindings() == [(("name",), "orders/7:cancel")]


def test_deep_matches_zero_segments() -> None:
    r = _router(("GET", "/v1/files/{path=**}"))
    assert _match(r, "/v1/files").bindings() == [(("path",), "")]


def test_wrong_method_lists_allowed_methods() -> None:
    r = _router(("GET", "/v1/x/{id}"), ("DELETE", "/v1/x/{id}"), ("POST", "/v1/x"))
    assert r.match("/v1/x/1", "PUT") == ["DELETE", "GET"]
    assert r.match("/v1/y", "GET") is None


def test_percent_decoding_single_vs_multi_segment() -> None:
    r = _router(("GET", "/v1/a/{one}"), ("GET", "/v1/b/{many=**}"))
    assert _match(r, "/v1/a/x%2Fy%20z").bindings() == [(("one",), "x/y z")]
    assert _match(r, "/v1/b/x%2Fy/%C3%A9").bindings() == [(("many",), "x%2Fy/é")]


def test_literal_segments_match_after_decoding() -> None:
    r = _router(("GET", "/v1/a-b"))
    assert _match(r, "/v1/a%2Db").target == "GET /v1/a-b"


@pytest.mark.parametrize("bad", ["/v1/a/%zz", "/v1/a/%", "/v1/a/%C3", "/v1/a/%FF%FE"])
def test_bad_percent_encoding_raises(bad: str) -> None:
    r = _router(("GET", "/v1/a/{one}"))

    def route_and_bind() -> None:
        m = r.match(bad, "GET")
        assert isinstance(m, Match)
        m.bindings()

    with pytest.raises(BadPathError):
        route_and_bind()


def test_ambiguous_rules_rejected_naming_both() -> None:
    r = _router(("GET", "/v1/{a}/x"))
    with pytest.raises(RoutingError) as exc:
        r.add("GET", parse_template("/v1/{b}/x"), "other", owner="pkg.S.Other")
    msg = str(exc.value)
    assert "pkg.S.Other" in msg and "/v1/{b}/x" in msg and "/v1/{a}/x" in msg
    # Same shape, different method or verb: fine.
    r.add("POST", parse_template("/v1/{b}/x"), "ok", owner="pkg.S.Post")
    r.add("GET", parse_template("/v1/{b}/x:do"), "ok", owner="pkg.S.Verb")


# --------------------------------------------------------------------------- properties

_ident = st.from_regex(r"[a-z][a-z0-9_]{0,6}", fullmatch=True)
_literal = st.from_regex(r"[a-z0-9][a-z0-9.\-_~]{0,6}", fullmatch=True)
_value_seg = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="/"),
    min_size=1,
    max_size=8,
)
# Values of a multi-segment capture may hold an encoded "/" inside one segment.
_tail_seg = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=8)


@st.composite
def template_and_path(draw: st.DrawFn) -> tuple[str, str, dict[str, str]]:
    """A random template plus a concrete path it matches and the values it binds."""
    parts: list[str] = []
    path: list[str] = []
    expected: dict[str, str] = {}
    names = draw(st.lists(_ident, unique=True, min_size=0, max_size=3))
    n = draw(st.integers(1, 5))
    var_iter = iter(names)
    for _ in range(n):
        kind = draw(st.sampled_from(["lit", "wild", "var"]))
        if kind == "lit":
            lit = draw(_literal)
            parts.append(lit)
            path.append(lit)
        elif kind == "wild":
            parts.append("*")
            path.append(quote(draw(_value_seg), safe=""))
        else:
            name = next(var_iter, None)
            if name is None:
                parts.append("*")
                path.append(quote(draw(_value_seg), safe=""))
                continue
            value = draw(_value_seg)
            parts.append("{" + name + "}")
            path.append(quote(value, safe=""))
            expected[name] = value
    tail = draw(st.booleans())
    if tail and (name := next(var_iter, None)) is not None:
        segs = draw(st.lists(_tail_seg, min_size=1, max_size=3))
        parts.append("{" + name + "=**}")
        path.extend(quote(s, safe="") for s in segs)
        # Multi-segment: "/" separates; an encoded "/" inside a segment stays %2F.
        expected[name] = "/".join(s.replace("/", "%2F") for s in segs)
    verb = draw(st.one_of(st.none(), _literal))
    template = "/" + "/".join(parts) + (f":{verb}" if verb else "")
    url = "/" + "/".join(path) + (f":{verb}" if verb else "")
    return template, url, expected


@settings(max_examples=200, deadline=None)
@given(template_and_path())
def test_property_generated_paths_match_and_bind(case: tuple[str, str, dict[str, str]]) -> None:
    template, url, expected = case
    t = parse_template(template)
    assert [".".join(v.field_path) for v in t.variables] == list(expected)
    r: Router[str] = Router()
    r.add("GET", t, "target", owner="rpc")
    m = r.match(url, "GET")
    assert isinstance(m, Match), (template, url)
    got = {".".join(k): v for k, v in m.bindings()}
    assert got == expected


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_property_parser_never_crashes(text: str) -> None:
    try:
        t = parse_template(text)
    except TemplateError:
        return
    assert t.source == text
    assert DEEP not in t.segments[:-1]


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="/%:abc*{}=.2F", max_size=30))
def test_property_matcher_never_crashes(path: str) -> None:
    r = _router(("GET", "/a/{x}"), ("GET", "/a/b:c"), ("GET", "/{y=**}"), ("POST", "/a/*/c"))
    try:
        m = r.match(path, "GET")
        if isinstance(m, Match):
            m.bindings()
    except BadPathError:
        pass


@pytest.mark.parametrize(
    ("raw", "path", "root", "want"),
    [
        (b"/api/v1/x", "/api/v1/x", "/api", "/v1/x"),  # Starlette's Mount: full path + root
        (b"/api", "/api", "/api", "/"),
        (b"/my%20api/v1/a%2Fb", "/my api/v1/a/b", "/my api", "/v1/a%2Fb"),  # root decoded
        (b"/%61pi/v1/x", "/api/v1/x", "/api/", "/v1/x"),
        (b"/apix/v1", "/apix/v1", "/api", "/apix/v1"),  # not under the root
        (b"/v1/x", "/v1/x", "/api", "/v1/x"),  # a host that already stripped it
        (b"/v1/x", "/v1/x", "", "/v1/x"),
        (None, "/api/v1/caf\u00e9", "/api", "/v1/caf\u00e9"),  # no raw_path at all
    ],
)
def test_route_path_is_below_the_mount_point(
    raw: bytes | None, path: str, root: str, want: str
) -> None:
    from meshkit.gateway.core._paths import route_path, unmounted

    scope = {"type": "http", "path": path, "root_path": root}
    if raw is not None:
        scope["raw_path"] = raw
    assert route_path(scope) == want
    inner = unmounted(scope)
    assert inner["root_path"] == "" or not root
    assert route_path(inner) == want
