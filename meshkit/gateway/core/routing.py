"""A compiled segment trie that routes HTTP paths to templates.

Every template is inserted once at load; a request walks the trie segment by
segment (literal children first, then ``*``, then a ``**`` tail), so matching
costs the path's depth, not the number of rules. Two templates that route the
same paths for the same HTTP method are rejected at load, naming both.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Generic, TypeVar
from urllib.parse import unquote

from meshkit.gateway.core.httprule import DEEP, WILD, PathTemplate

T = TypeVar("T")

_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_SLASH_ESCAPE = re.compile(r"%2[Ff]")


class RoutingError(ValueError):
    """Rules that cannot be routed (ambiguous or conflicting); raised at load."""


class BadPathError(ValueError):
    """The request path is not valid percent-encoded UTF-8."""


@dataclass(slots=True)
class _Node(Generic[T]):
    literals: dict[str, _Node[T]] = field(default_factory=dict)
    wild: _Node[T] | None = None
    # verb -> HTTP method -> (template, target); at the end of the path or after "**".
    leaf: dict[str | None, dict[str, tuple[PathTemplate, T]]] | None = None
    deep: dict[str | None, dict[str, tuple[PathTemplate, T]]] | None = None


@dataclass(frozen=True, slots=True)
class Match(Generic[T]):
    """A routed request: its target, template and the raw (still escaped) segments."""

    target: T
    template: PathTemplate
    segments: list[str]

    def bindings(self) -> list[tuple[tuple[str, ...], str]]:
        """Decode each variable's value per the spec; raise :class:`BadPathError`."""
        out = []
        segs = self.segments
        for var in self.template.variables:
            raw = segs[var.start] if var.end is not None and var.end - var.start == 1 else None
            if raw is not None:
                out.append((var.field_path, _decode(raw, keep_slash=False)))
            else:
                joined = "/".join(segs[var.start : var.end])
                out.append((var.field_path, _decode(joined, keep_slash=True)))
        return out


def _decode(raw: str, *, keep_slash: bool) -> str:
    if "%" not in raw:
        return raw
    if _BAD_ESCAPE.search(raw):
        raise BadPathError(f"bad percent-encoding in {raw!r}")
    try:
        if keep_slash:
            return "%2F".join(unquote(p, errors="strict") for p in _SLASH_ESCAPE.split(raw))
        return unquote(raw, errors="strict")
    except UnicodeDecodeError as exc:
        raise BadPathError(f"percent-encoding in {raw!r} is not UTF-8") from exc


class Router(Generic[T]):
    """The trie. ``add`` at load, ``match`` per request."""

    def __init__(self) -> None:
        self._root: _Node[T] = _Node()
        self._owners: dict[tuple[tuple[str, ...], str | None, str], str] = {}

    def add(self, http_method: str, template: PathTemplate, target: T, owner: str) -> None:
        """Insert a route; ``owner`` (such as the RPC's name) appears in conflict errors."""
        key = (template.segments, template.verb, http_method)
        prior = self._owners.get(key)
        if prior is not None:
            raise RoutingError(
                f"{owner}: {http_method} {template.source} is ambiguous with {prior}"
            )
        self._owners[key] = f"{owner} ({http_method} {template.source})"
        node = self._root
        for seg in template.segments:
            if seg == DEEP:
                if node.deep is None:
                    node.deep = {}
                node.deep.setdefault(template.verb, {})[http_method] = (template, target)
                return
            if seg == WILD:
                if node.wild is None:
                    node.wild = _Node()
                node = node.wild
            else:
                node = node.literals.setdefault(seg, _Node())
        if node.leaf is None:
            node.leaf = {}
        node.leaf.setdefault(template.verb, {})[http_method] = (template, target)

    def match(self, path: str, http_method: str) -> Match[T] | list[str] | None:
        """Route ``path`` (raw, percent-encoded, without the query).

        Returns the match; or the allowed methods when the path is known but the
        method is not; or None when nothing matches the path at all.
        """
        segments = path[1:].split("/") if path.startswith("/") else [path]
        allowed: list[str] = []
        last = segments[-1]
        colon = last.rfind(":")
        if colon >= 0:
            with_verb = [*segments[:-1], last[:colon]]
            verb = last[colon + 1 :]
            found = self._find(with_verb, verb, http_method, allowed)
            if found is not None:
                return found
        found = self._find(segments, None, http_method, allowed)
        if found is not None:
            return found
        return sorted(set(allowed)) if allowed else None

    def _find(
        self, segments: list[str], verb: str | None, method: str, allowed: list[str]
    ) -> Match[T] | None:
        decoded = [_decode(s, keep_slash=False) if "%" in s else s for s in segments]
        hit = self._search(self._root, decoded, 0, verb, method, allowed)
        return None if hit is None else Match(hit[1], hit[0], segments)

    def _search(
        self,
        node: _Node[T],
        segs: list[str],
        i: int,
        verb: str | None,
        method: str,
        allowed: list[str],
    ) -> tuple[PathTemplate, T] | None:
        # Depth first in priority order (literal, then "*", then a "**" tail at this
        # node); the first candidate with ``method`` wins, the others' methods are the
        # allowed ones. Plain recursion: a generator chain cost a frame per level per
        # request.
        if i == len(segs):
            if node.leaf is not None:
                methods = node.leaf.get(verb)
                if methods is not None:
                    hit = methods.get(method)
                    if hit is not None:
                        return hit
                    allowed.extend(methods)
        else:
            seg = segs[i]
            child = node.literals.get(seg)
            if child is not None:
                hit = self._search(child, segs, i + 1, verb, method, allowed)
                if hit is not None:
                    return hit
            if node.wild is not None and seg:
                hit = self._search(node.wild, segs, i + 1, verb, method, allowed)
                if hit is not None:
                    return hit
        if node.deep is not None:
            methods = node.deep.get(verb)
            if methods is not None:
                hit = methods.get(method)
                if hit is not None:
                    return hit
                allowed.extend(methods)
        return None
