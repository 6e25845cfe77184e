"""The ``google.api.http`` path template grammar, parsed into flat segment lists.

Grammar (google/api/http.proto)::

    Template = "/" Segments [ Verb ] ;
    Segments = Segment { "/" Segment } ;
    Segment  = "*" | "**" | LITERAL | Variable ;
    Variable = "{" FieldPath [ "=" Segments ] "}" ;
    FieldPath = IDENT { "." IDENT } ;
    Verb     = ":" LITERAL ;

A parsed template is a tuple of segments (a literal string, ``WILD`` for ``*``
or ``DEEP`` for ``**``), an optional verb and the variables, each naming the
half-open range of segments it captures. ``**`` may only be the last segment,
so a variable that contains it captures "from ``start`` to the end".
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

WILD: Final = "\x00*"
DEEP: Final = "\x00**"

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
# RFC 3986 pchar minus "/" and the characters the grammar uses ({ } = * :).
_LITERAL = re.compile(r"(?:[A-Za-z0-9\-._~!$&'()+,;@]|%[0-9A-Fa-f]{2})+\Z")


class TemplateError(ValueError):
    """A path template does not follow the grammar; the message says where."""

    def __init__(self, template: str, message: str) -> None:
        super().__init__(f"invalid path template {template!r}: {message}")
        self.template = template


@dataclass(frozen=True, slots=True)
class Variable:
    """A ``{field.path=...}`` capture over segments ``[start, end)``; ``end`` is None
    when the capture ends in ``**`` (it runs to the end of the path)."""

    field_path: tuple[str, ...]
    start: int
    end: int | None

    @property
    def multi_segment(self) -> bool:
        """True when the value may span several segments (then ``%2F`` stays encoded)."""
        return self.end is None or self.end - self.start != 1


@dataclass(frozen=True, slots=True)
class PathTemplate:
    """A parsed template: segments, verb and variables."""

    source: str
    segments: tuple[str, ...]
    verb: str | None
    variables: tuple[Variable, ...]

    @property
    def shape(self) -> tuple[tuple[str, ...], str | None]:
        """What routing sees: two templates with the same shape are indistinguishable."""
        return self.segments, self.verb

    def __str__(self) -> str:
        return self.source


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.segments: list[str] = []
        self.variables: list[Variable] = []
        self.in_variable = False

    def fail(self, message: str) -> TemplateError:
        return TemplateError(self.text, f"{message} at offset {self.pos}")

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def parse(self) -> PathTemplate:
        if not self.text.startswith("/"):
            raise TemplateError(self.text, "must start with '/'")
        self.pos = 1
        self.parse_segments()
        verb: str | None = None
        if self.peek() == ":":
            self.pos += 1
            verb = self.take_literal()
            if not verb:
                raise self.fail("empty verb")
        if self.pos != len(self.text):
            raise self.fail(f"unexpected {self.peek()!r}")
        if DEEP in self.segments[:-1]:
            raise TemplateError(self.text, "'**' must be the last segment")
        seen: set[tuple[str, ...]] = set()
        for var in self.variables:
            if var.field_path in seen:
                raise TemplateError(self.text, f"variable {'.'.join(var.field_path)!r} bound twice")
            seen.add(var.field_path)
        return PathTemplate(self.text, tuple(self.segments), verb, tuple(self.variables))

    def parse_segments(self) -> None:
        self.parse_segment()
        while self.peek() == "/":
            self.pos += 1
            self.parse_segment()

    def parse_segment(self) -> None:
        ch = self.peek()
        if ch == "*":
            if self.text.startswith("**", self.pos):
                self.pos += 2
                self.segments.append(DEEP)
            else:
                self.pos += 1
                self.segments.append(WILD)
        elif ch == "{":
            self.parse_variable()
        else:
            lit = self.take_literal()
            if not lit:
                raise self.fail(
                    "empty segment" if ch in ("/", "", ":") else f"bad character {ch!r}"
                )
            self.segments.append(lit)

    def take_literal(self) -> str:
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] not in "/{}=*:":
            self.pos += 1
        lit = self.text[start : self.pos]
        if lit and not _LITERAL.match(lit):
            raise TemplateError(self.text, f"bad literal {lit!r}")
        return lit

    def parse_variable(self) -> None:
        if self.in_variable:
            raise self.fail("nested variable")
        self.pos += 1
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] not in "=}":
            self.pos += 1
        path = tuple(self.text[start : self.pos].split("."))
        if not all(_IDENT.match(p) for p in path):
            raise TemplateError(self.text, f"bad field path {self.text[start : self.pos]!r}")
        first = len(self.segments)
        if self.peek() == "=":
            self.pos += 1
            self.in_variable = True
            self.parse_segments()
            self.in_variable = False
        else:
            self.segments.append(WILD)
        if self.peek() != "}":
            raise self.fail("unterminated variable")
        self.pos += 1
        end: int | None = len(self.segments)
        if self.segments[-1] == DEEP:
            end = None
        self.variables.append(Variable(path, first, end))


def parse_template(text: str) -> PathTemplate:
    """Parse ``text``; raise :class:`TemplateError` naming the problem."""
    return _Parser(text).parse()
