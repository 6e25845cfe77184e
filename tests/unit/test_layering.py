"""Layers point one way (docs/architecture.md): each rule lists the imports a package
must never make, read from the source with :mod:`ast` (imports inside functions and
``TYPE_CHECKING`` blocks count too: a lazy import is still a dependency)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "meshkit"

HTTP = ("httptools", "uvicorn", "starlette", "websockets", "h11", "httpx")
NATS = ("nats",)
GRPC = ("grpc", "grpc_health", "grpc_reflection")

#: package (path under meshkit/) -> module prefixes it must not import
RULES: dict[str, tuple[str, ...]] = {
    "resilience": (
        *GRPC,
        *HTTP,
        *NATS,
        "meshkit.config",
        "meshkit.gateway",
        "meshkit.grpc",
        "meshkit.saga",
        "meshkit.nats",
        "meshkit.auth",
    ),
    "grpc": ("meshkit.gateway", "meshkit.saga"),
    "auth": (*GRPC, *HTTP, "meshkit.gateway", "meshkit.grpc", "meshkit.saga"),
    "saga": ("meshkit.gateway",),
    # The gateway's rooms, top to bottom: serve -> edge -> core -> upstream, and
    # gateway/_asgi.py (ASGI types and scope helpers) beneath them all.
    "gateway/edge": ("meshkit.gateway.serve",),
    "gateway/core": ("meshkit.gateway.serve", "meshkit.gateway.edge", "meshkit.gateway.openapi"),
    "gateway/upstream": (
        "meshkit.gateway.serve",
        "meshkit.gateway.edge",
        "meshkit.gateway.core",
        "meshkit.gateway.openapi",
    ),
    "gateway/_asgi.py": ("meshkit",),
}


def imported_modules(path: Path, package: str | None = None) -> list[tuple[int, str]]:
    """(line, module) of every import in ``path`` (of ``package``, by default the one
    it sits in); relative imports resolved."""
    if package is None:
        package = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts)
        if path.name != "__init__.py":
            package = package.rpartition(".")[0]
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            out.append((node.lineno, base))
            # ``from meshkit import gateway`` imports the submodule.
            out.extend((node.lineno, f"{base}.{alias.name}") for alias in node.names)
    return out


def _matches(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


@pytest.mark.parametrize("package", sorted(RULES))
def test_layer_imports_point_one_way(package: str) -> None:
    where = ROOT / package
    files = [where] if where.suffix == ".py" else sorted(where.rglob("*.py"))
    assert files, f"meshkit/{package}/ has no modules"
    bad = [
        f"{path.relative_to(ROOT.parent)}:{line} imports {module}"
        for path in files
        for line, module in imported_modules(path)
        for prefix in RULES[package]
        if _matches(module, prefix)
    ]
    assert not bad, "layering broken:\n" + "\n".join(bad)


def test_the_checker_sees_violations(tmp_path: Path) -> None:
    """The rules above are not vacuous: a lazy, a relative and a ``from x import y``
    import are all seen."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        "def f():\n    from meshkit.gateway.core import app\nfrom .. import saga\nimport nats.js\n"
    )
    modules = [m for _, m in imported_modules(probe, "meshkit.grpc")]
    assert "meshkit.gateway.core.app" in modules
    assert "meshkit.saga" in modules
    assert "nats.js" in modules


#: Beyond this many lines a module must say, in its docstring, why it is one module.
MAX_LINES = 700
WHY_LONG = "Why this module is long:"


def test_long_modules_say_why() -> None:
    long = [
        f"{path.relative_to(ROOT.parent)} ({n} lines)"
        for path in sorted(ROOT.rglob("*.py"))
        if "_pb" not in path.relative_to(ROOT).parts
        and (n := len(path.read_text().splitlines())) > MAX_LINES
        and WHY_LONG not in (ast.get_docstring(ast.parse(path.read_text())) or "")
    ]
    assert not long, (
        f"modules over {MAX_LINES} lines: split them by concern, or write "
        f"'{WHY_LONG} ...' in the module docstring:\n" + "\n".join(long)
    )
