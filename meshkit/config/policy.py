"""The :class:`Policy`: a validated, compiled policy document (its rules, the
per-method cache, the checks and warnings). The live state its interceptors use
(breakers, budgets, bulkheads, limiters) is in its :attr:`Policy.registry`, a
:class:`~meshkit.resilience.registry.ResilienceRegistry` that outlives the document.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshkit.config.compile import MethodPolicy, _compile
from meshkit.config.sections import SECTIONS, _read_sections
from meshkit.config.values import _fail, _fmt, _join, _mapping, _show
from meshkit.config.yaml import located, read_yaml
from meshkit.errors import ConfigError
from meshkit.resilience.breaker import CircuitBreakerConfig
from meshkit.resilience.budget import RetryBudget, RetryBudgetConfig
from meshkit.resilience.fallback import FallbackPolicy, FallbackTrigger
from meshkit.resilience.registry import MAX_INSTANCES as MAX_INSTANCES
from meshkit.resilience.registry import ResilienceRegistry
from meshkit.resilience.retry import RetryPolicy

_log = logging.getLogger("meshkit.config")


# Upper bound on the methods whose compiled policy is cached.
MAX_COMPILED_METHODS = 10_000


# --------------------------------------------------------------------------------------
# The document.
# --------------------------------------------------------------------------------------

_SERVICE = r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*"
_MATCH = re.compile(rf"/?({_SERVICE})(?:/([A-Za-z_][A-Za-z0-9_]*))?")


@dataclass(frozen=True, slots=True)
class Rule:
    """One validated rule: what it matches and the sections it sets."""

    index: int
    matches: tuple[tuple[str, str], ...]  # (service, method or "")
    sections: Mapping[str, Any]

    @property
    def label(self) -> str:
        """``rules[<index>]``."""
        return f"rules[{self.index}]"


class Policy:
    """A validated, compiled policy document over a registry of live resilience state.

    Build one with :meth:`load`, :meth:`from_dict` or :meth:`from_text`; share it
    between every channel and server of a process. The Policy itself is the
    document (immutable once built, apart from its per-method cache); the breakers,
    budgets, bulkheads, limiters and the last-good cache are in :attr:`registry`
    (``policy.registry.breakers()``...), which a reload hands to the next Policy
    (:meth:`with_registry`) so their state survives a changed document.
    """

    def __init__(
        self,
        defaults: Mapping[str, Any] | None = None,
        rules: Sequence[Rule] = (),
        *,
        source: str | None = None,
        registry: ResilienceRegistry | None = None,
    ) -> None:
        self.source = source
        #: The live state this policy's interceptors share (a fresh registry unless
        #: one is given): instances by name and config, see :class:`ResilienceRegistry`.
        self.registry = registry if registry is not None else ResilienceRegistry()
        #: The document this policy was read from (set by :meth:`from_dict`), so a
        #: reload can tell an unchanged policy and keep this one, breakers and all.
        self.document: Mapping[str, Any] | None = None
        self._defaults: dict[str, Any] = dict(defaults or {})
        self.rules: tuple[Rule, ...] = tuple(rules)
        self._by_service: dict[str, Rule] = {}
        self._by_method: dict[tuple[str, str], Rule] = {}
        for rule in self.rules:
            for service, method in rule.matches:
                if method:
                    self._by_method[(service, method)] = rule
                else:
                    self._by_service[service] = rule
        self._compiled: dict[str, MethodPolicy] = {}
        self._compile_lock = threading.Lock()
        # The retry budget config each target got first (one budget per target).
        self._budget_configs: dict[str, RetryBudgetConfig] = {}
        self.warnings: list[str] = self.check()
        for warning in self.warnings:
            _log.warning("%s%s", f"{source}: " if source else "", warning)

    # -- construction --------------------------------------------------------------

    @classmethod
    def from_dict(
        cls,
        document: Mapping[str, Any] | None,
        source: str | None = None,
        *,
        registry: ResilienceRegistry | None = None,
    ) -> Policy:
        """Validate and compile a document given as a dict (``None``: an empty policy)."""
        try:
            defaults, rules = _read_document(document)
        except ConfigError as exc:
            if source and exc.source is None:
                raise ConfigError(exc.path, exc.reason, source=source) from None
            raise
        policy = cls(defaults, rules, source=source, registry=registry)
        policy.document = document
        return policy

    @classmethod
    def from_text(
        cls,
        text: str,
        source: str | None = None,
        *,
        format: str | None = None,
        registry: ResilienceRegistry | None = None,
    ) -> Policy:
        """Parse YAML (default) or JSON (``format="json"``) text, then :meth:`from_dict`.

        Syntax errors and invalid values report ``source:line:col``.
        """
        where = source or "<policy>"
        if format == "json":
            try:
                document = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ConfigError("", exc.msg, source=f"{where}:{exc.lineno}:{exc.colno}") from None
            marks: dict[str, tuple[int, int]] = {}
        elif format in (None, "yaml"):
            document, marks = read_yaml(text, where)
        else:
            raise ValueError(f"format must be 'yaml' or 'json', not {format!r}")
        if document is not None and not isinstance(document, Mapping):
            raise ConfigError(
                "", f"expected a mapping at the top level, got {_show(document)}", source=where
            )
        try:
            return cls.from_dict(document, source, registry=registry)
        except ConfigError as exc:
            raise located(exc, where, marks) from None

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], *, registry: ResilienceRegistry | None = None
    ) -> Policy:
        """Load a ``.yaml``/``.yml`` or ``.json`` file (by extension; others as YAML)."""
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(
                "", f"cannot read the policy: {exc.strerror or exc}", source=str(p)
            ) from None
        fmt = "json" if p.suffix.lower() == ".json" else "yaml"
        return cls.from_text(text, str(p), format=fmt, registry=registry)

    def with_registry(self, registry: ResilienceRegistry) -> Policy:
        """This document over ``registry`` (``self`` when it already uses it).

        A reload with a changed document builds a new Policy and hands it the old
        one's registry this way: every breaker, budget, bulkhead and limiter whose
        name and config are unchanged keeps its state. Nothing is validated or
        logged again.
        """
        if registry is self.registry:
            return self
        other = copy.copy(self)
        other.registry = registry
        other._compiled = dict(self._compiled)
        other._compile_lock = threading.Lock()
        other._budget_configs = {}
        other.warnings = list(self.warnings)
        return other

    # -- lookup --------------------------------------------------------------------

    def for_method(self, full_method: str) -> MethodPolicy:
        """The compiled policy of ``/pkg.Service/Method`` (or ``pkg.Service/Method``).

        Precedence: a rule matching the method beats one matching its service, which
        beats the defaults; each section comes whole from the most specific layer
        that sets it. Cached: after the first call this is one dict lookup.
        """
        mp = self._compiled.get(full_method)
        if mp is not None:
            return mp
        service, _, method = full_method.lstrip("/").partition("/")
        layers: list[tuple[str, dict[str, Any]]] = [("defaults", self._defaults)]
        srule = self._by_service.get(service)
        if srule is not None:
            layers.append((srule.label, dict(srule.sections)))
        mrule = self._by_method.get((service, method)) if method else None
        if mrule is not None:
            layers.append((mrule.label, dict(mrule.sections)))
        mp = _compile(service, method, layers)
        if len(self._compiled) < MAX_COMPILED_METHODS:
            with self._compile_lock:
                mp = self._compiled.setdefault(full_method, mp)
        return mp

    def retry_budget(
        self, target: str, config: RetryBudgetConfig | None = None
    ) -> RetryBudget | None:
        """The retry budget of ``target`` (from :attr:`registry`): one per target for
        this document, with the first ``config`` asked for (default: the
        ``retry.budget`` of the document's ``defaults``, else
        :class:`RetryBudgetConfig`'s defaults). ``None`` only when no config is given
        and the defaults turn the budget off.

        This is the document's choice of config; the instance is the registry's, so
        a reload that keeps a target's budget config keeps the budget's state.
        """
        chosen = self._budget_configs.get(target)
        if chosen is None:
            if config is None:
                retry = self._defaults.get("retry")
                if isinstance(retry, RetryPolicy):
                    if retry.budget is None:
                        return None
                    config = retry.budget
                else:
                    config = RetryBudgetConfig()
            chosen = config
            if len(self._budget_configs) < MAX_INSTANCES:
                chosen = self._budget_configs.setdefault(target, config)
        return self.registry.retry_budget(target, chosen)

    # -- checks ------------------------------------------------------------------------

    def check(self) -> list[str]:
        """Warnings about sound-but-suspect settings (timeout budgets and friends).

        Checked for the defaults and for each rule as it applies (merged over the
        defaults and, for a method rule, over its service's rule):

        * a timeout shorter than its retries' worst case (``max_attempts x
          per_attempt_timeout`` plus the longest backoffs): the upper level's
          timeout must exceed the sum below it;
        * a timeout that ends before the last hedge is sent;
        * a breaker whose ``slow_call_duration`` is not below the timeout;
        * a ``deadline_margin`` or a bulkhead ``max_wait`` not below the timeout;
        * a fallback on ``circuit_open`` without a breaker.
        """
        out: list[str] = []
        base = self._check_one(_compile("", "", [("defaults", self._defaults)]))
        out.extend(f"defaults: {w}" for w in base)
        by_service: dict[str, list[str]] = {}
        # Service rules first, so a method rule repeats nothing its service rule said.
        ordered = sorted(
            ((rule, m) for rule in self.rules for m in rule.matches), key=lambda x: bool(x[1][1])
        )
        found: list[tuple[int, str]] = []
        for rule, (service, method) in ordered:
            layers: list[tuple[str, dict[str, Any]]] = [("defaults", self._defaults)]
            parent = base
            if method and service in self._by_service:
                srule = self._by_service[service]
                layers.append((srule.label, dict(srule.sections)))
                parent = by_service.get(service, base)
            layers.append((rule.label, dict(rule.sections)))
            mine = self._check_one(_compile("", "", layers))
            if not method:
                by_service[service] = mine
            what = f"{service}/{method}" if method else service
            found.extend(
                (rule.index, f"{rule.label} ({what}): {w}") for w in mine if w not in parent
            )
        out.extend(text for _, text in sorted(found, key=lambda x: x[0]))
        return out

    @staticmethod
    def _check_one(mp: MethodPolicy) -> list[str]:
        out: list[str] = []
        t = mp.timeout
        retry = mp.retry
        if t is not None and retry is not None and retry.max_attempts > 1:
            worst = retry.worst_case()
            if worst is not None and worst > t:
                backoffs = worst - retry.max_attempts * (retry.per_attempt_timeout or 0.0)
                out.append(
                    f"timeout {_fmt(t)} is shorter than its retries' worst case "
                    f"{_fmt(worst)} ({retry.max_attempts} attempts x "
                    f"{_fmt(retry.per_attempt_timeout or 0.0)} + backoffs {_fmt(backoffs)}); "
                    "later attempts will be cut short (a timeout must exceed the sum of the "
                    "attempts and waits below it)"
                )
        hedging = mp.hedging
        if t is not None and hedging is not None and hedging.max_attempts > 1:
            last = hedging.delay * (hedging.max_attempts - 1)
            if last >= t:
                out.append(
                    f"timeout {_fmt(t)} ends before the last hedge would be sent "
                    f"({hedging.max_attempts - 1} x delay {_fmt(hedging.delay)} = {_fmt(last)})"
                )
        cb = mp.circuit_breaker
        if (
            t is not None
            and cb is not None
            and cb.slow_call_duration >= t
            and "slow_call_duration" in _explicit_breaker_keys(cb)
        ):
            out.append(
                f"circuit_breaker.slow_call_duration {_fmt(cb.slow_call_duration)} "
                f"is not below the timeout {_fmt(t)}, so no call is ever slow"
            )
        if t is not None and mp.deadline_margin >= t:
            out.append(
                f"deadline_margin {_fmt(mp.deadline_margin)} is not below the timeout {_fmt(t)}"
            )
        if t is not None and mp.bulkhead is not None and mp.bulkhead.max_wait >= t:
            out.append(
                f"bulkhead.max_wait {_fmt(mp.bulkhead.max_wait)} is not below the "
                f"timeout {_fmt(t)}: a queued call may spend its whole deadline waiting"
            )
        fb = mp.fallback
        if (
            fb is not None
            and FallbackTrigger.CIRCUIT_OPEN in fb.on
            and cb is None
            and fb.on != FallbackPolicy().on
        ):
            out.append("fallback.on lists circuit_open but no circuit_breaker is set")
        return out

    def __repr__(self) -> str:
        return f"Policy(source={self.source!r}, rules={len(self.rules)})"


def _explicit_breaker_keys(cb: CircuitBreakerConfig) -> set[str]:
    """Keys of ``cb`` that differ from the defaults (a default 60s slow-call
    duration under a short timeout is not worth a warning)."""
    base = CircuitBreakerConfig()
    return {f.name for f in dataclasses.fields(cb) if getattr(cb, f.name) != getattr(base, f.name)}


def _read_match(value: Any, path: str) -> tuple[tuple[str, str], ...]:
    expected = 'a service "pkg.Service" or a method "pkg.Service/Method" (or a list of them)'
    items = value if isinstance(value, list) else [value]
    if not items:
        raise _fail(path, expected, value)
    out = []
    for i, item in enumerate(items):
        p = f"{path}[{i}]" if isinstance(value, list) else path
        if not isinstance(item, str):
            raise _fail(p, expected, item)
        m = _MATCH.fullmatch(item.strip())
        if not m:
            raise _fail(p, expected, item)
        out.append((m.group(1), m.group(2) or ""))
    return tuple(out)


def _read_document(document: Mapping[str, Any] | None) -> tuple[dict[str, Any], list[Rule]]:
    if document is None:
        return {}, []
    d = _mapping(document, "", ("version", "defaults", "rules"))
    if "version" in d and (isinstance(d["version"], bool) or d["version"] != 1):
        raise _fail("version", "1", d["version"])
    defaults: dict[str, Any] = {}
    if d.get("defaults") is not None:
        raw = _mapping(d["defaults"], "defaults", SECTIONS)
        defaults = _read_sections(raw, "defaults")
    rules: list[Rule] = []
    seen: dict[tuple[str, str], str] = {}
    raw_rules = d.get("rules")
    if raw_rules is None:
        raw_rules = []
    if not isinstance(raw_rules, list):
        raise _fail("rules", "a list of rules", raw_rules)
    for i, raw_rule in enumerate(raw_rules):
        path = f"rules[{i}]"
        r = _mapping(raw_rule, path, ("match", *SECTIONS), required=("match",))
        matches = _read_match(r["match"], _join(path, "match"))
        for m in matches:
            if m in seen:
                what = f"{m[0]}/{m[1]}" if m[1] else m[0]
                raise ConfigError(_join(path, "match"), f'"{what}" is already matched by {seen[m]}')
            seen[m] = path
        rules.append(Rule(i, matches, _read_sections(r, path)))
    return defaults, rules


def compile_policy(
    document: Any, path: str = "policy", *, source: str | None = None
) -> Policy | None:
    """The ``policy:`` section as a :class:`~meshkit.config.Policy`, built now so a bad
    one stops the start (``policy.defaults.retry.max_attempts: expected ...``) rather
    than failing every request later. ``None`` (absent) is no policy."""
    if document is None:
        return None
    if not isinstance(document, Mapping):
        raise ConfigError(
            path,
            f"expected a mapping (meshkit's client policy), got {json.dumps(document, default=repr)}",
        )
    try:
        return Policy.from_dict(document, source)
    except ConfigError as exc:
        inner = f"{path}.{exc.path}" if exc.path else path
        raise ConfigError(inner, exc.reason) from None


def carry_policy(old: Policy | None, new: Policy | None) -> Policy | None:
    """The policy to use after a reload from ``old`` to ``new``.

    ``old`` itself when ``new`` was read from the same document (its compiled cache
    and all). Otherwise ``new`` over ``old``'s registry: the live state outlives the
    document, so every breaker, budget, bulkhead and limiter whose name and config
    the change left alone keeps its state (an OPEN breaker stays OPEN when another
    rule's timeout changed); one whose config changed starts afresh."""
    if old is None or new is None:
        return new
    if old.document == new.document:
        return old
    return new.with_registry(old.registry)
