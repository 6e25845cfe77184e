"""YAML as every meshkit document is read: safe, duplicate keys are errors, booleans
only ``true``/``false``, and the position of every node kept by key path so an
error can name ``file:line:col``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import yaml

from meshkit.config.values import _join
from meshkit.errors import ConfigError

# --------------------------------------------------------------------------------------
# YAML with positions and without silent duplicate keys.
# --------------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """A safe loader that rejects duplicate keys (PyYAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                dup = key in seen
            except TypeError:
                dup = False
            if dup:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


# YAML 1.1 reads on/off/yes/no as booleans, so ``fallback: {on: [...]}`` would get
# the key True. Booleans are only true/false here, as in YAML 1.2 and JSON.
_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool",
    re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
    list("tTfF"),
)


def read_yaml(text: str, source: str) -> tuple[Any, dict[str, tuple[int, int]]]:
    """Parse YAML the way every meshkit document is read: safe, duplicate keys are
    errors, booleans only ``true``/``false`` (so ``on:`` stays a string key).

    Returns the document (``None`` when empty) and the positions of its nodes by key
    path, for :func:`located`. A syntax error is a ConfigError naming
    ``source:line:col``."""
    try:
        return _load_yaml(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        pos = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        problem = "; ".join(str(p) for p in (exc.context, exc.problem) if p)
        raise ConfigError("", problem or str(exc), source=f"{source}{pos}") from None
    except yaml.YAMLError as exc:
        raise ConfigError("", str(exc), source=source) from None


def located(exc: ConfigError, source: str, marks: Mapping[str, tuple[int, int]]) -> ConfigError:
    """``exc`` again, its source now ``source:line:col`` of the node its key path
    names (of the key itself for an unknown key), as ``meshkit policy check`` reports.
    An error that already names another source (a key file, say) is returned unchanged."""
    if exc.source is not None and exc.source != source:
        return exc
    pos = _mark_for(exc.path, marks, at_key=exc.reason.startswith("unknown key"))
    return ConfigError(exc.path, exc.reason, source=f"{source}{pos}")


def _load_yaml(text: str) -> tuple[Any, dict[str, tuple[int, int]]]:
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, {}
        document = loader.construct_document(node)
    finally:
        loader.dispose()
    marks: dict[str, tuple[int, int]] = {}
    _collect_marks(node, "", marks)
    return document, marks


def _collect_marks(node: yaml.Node, path: str, marks: dict[str, tuple[int, int]]) -> None:
    marks[path] = (node.start_mark.line + 1, node.start_mark.column + 1)
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                child = _join(path, str(key_node.value))
                _collect_marks(value_node, child, marks)
                # An unknown key is reported at the key itself.
                marks.setdefault(
                    child + "#key", (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
                )
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _collect_marks(item, f"{path}[{i}]", marks)


def _mark_for(path: str, marks: Mapping[str, tuple[int, int]], *, at_key: bool = False) -> str:
    """``:line:col`` of the deepest known node on ``path`` ("" if none); of the key
    itself rather than its value when ``at_key``."""
    if not marks:
        return ""
    p = path
    while True:
        hit = (marks.get(p + "#key") or marks.get(p)) if at_key else marks.get(p)
        if hit is not None:
            return f":{hit[0]}:{hit[1]}"
        if not p:
            return ""
        cut = max(p.rfind("."), p.rfind("["))
        p = p[:cut] if cut > 0 else ""
