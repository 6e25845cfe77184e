"""The policy document: load, validate, match rules to methods, compile.

A document has ``defaults`` (apply to every method) and ``rules`` (each matching a
service ``pkg.Service`` or one method ``pkg.Service/Method``). For a method, the
sections of its service rule replace those of the defaults and the sections of its
method rule replace those again: a section is replaced whole, never merged key by
key. docs/policy.md documents every key and default.

The document is validated once at load; a bad one raises
:class:`meshkit.errors.ConfigError` naming the key path, the bad value and what was
expected (``rules[0].retry.max_attempts: expected an integer >= 1, got "four"``),
prefixed with ``file:line:col`` when it came from a file. Each method's policy is
compiled once into a frozen :class:`MethodPolicy` and cached.

The live state is not the document's: a :class:`Policy` uses a
:class:`~meshkit.resilience.registry.ResilienceRegistry` (``policy.registry``), so
every interceptor on every channel using the policy shares the same breakers,
budgets, bulkheads and limiters, and a reload hands the registry to the next
Policy (:meth:`Policy.with_registry`), keeping the state of what did not change.

The package, by concern: :mod:`~meshkit.config.values` (value readers: durations,
sizes, codes...), :mod:`~meshkit.config.sections` (one reader per section),
:mod:`~meshkit.config.compile` (per-method compilation into :class:`MethodPolicy`),
:mod:`~meshkit.config.policy` (:class:`Policy`, its checks and warnings) and
:mod:`~meshkit.config.yaml` (YAML with position marks). Import from
``meshkit.config``: the names below are its public API.
"""

from meshkit.config.compile import MethodPolicy
from meshkit.config.policy import MAX_COMPILED_METHODS as MAX_COMPILED_METHODS
from meshkit.config.policy import MAX_INSTANCES as MAX_INSTANCES
from meshkit.config.policy import Policy, carry_policy, compile_policy
from meshkit.config.policy import Rule as Rule
from meshkit.config.sections import DEFAULT_DEADLINE_MARGIN as DEFAULT_DEADLINE_MARGIN
from meshkit.config.sections import SECTIONS as SECTIONS
from meshkit.config.values import (
    parse_duration,
    parse_size,
    read_bool,
    read_code,
    read_codes,
    read_int,
    read_mapping,
    read_number,
    read_str,
    show_value,
)
from meshkit.config.yaml import located, read_yaml
from meshkit.errors import ConfigError as ConfigError

__all__ = [
    "MethodPolicy",
    "Policy",
    "carry_policy",
    "compile_policy",
    "located",
    "parse_duration",
    "parse_size",
    "read_bool",
    "read_code",
    "read_codes",
    "read_int",
    "read_mapping",
    "read_number",
    "read_str",
    "read_yaml",
    "show_value",
]
