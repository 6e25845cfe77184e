"""The implementation behind :func:`meshkit.codegen.generate`."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from meshkit.errors import MeshkitError

log = logging.getLogger("meshkit.codegen")

_MANIFEST = ".meshkit-gen.json"
# Bump when the output format changes, so stale outputs are regenerated.
_FORMAT_VERSION = 1
_PROTOC_LOCATION = re.compile(r"^(?P<file>[^:\s]+\.proto):(?P<line>\d+):(?P<col>\d+): (?P<msg>.*)$")
_IMPORT_NOT_FOUND = re.compile(r'Import "(?P<imp>[^"]+)" was not found or had errors\.')
_FILE_NOT_FOUND = re.compile(r"^(?P<file>[^:\s]+\.proto): File not found\.$")


class CodegenError(MeshkitError):
    """Code generation failed; ``errors`` holds one ``path:line:col: message`` per problem."""

    code = "INVALID_ARGUMENT"

    def __init__(self, message: str, errors: Sequence[str] = ()) -> None:
        super().__init__(message if not errors else message + "\n" + "\n".join(errors))
        self.errors = list(errors)


@dataclass(frozen=True)
class GenerateResult:
    """What :func:`generate` did.

    ``changed`` is True when an output file was written or removed (the manifest
    aside); with ``check=True`` nothing is ever written and ``stale`` lists the
    output files that are missing, different or no longer generated.
    """

    protos: tuple[str, ...]
    files: tuple[str, ...]
    changed: bool
    package_dir: Path
    descriptor_set: Path | None = None
    stale: tuple[str, ...] = field(default_factory=tuple)


def include_paths() -> list[str]:
    """The include directories every compilation gets: well-known types and googleapis."""
    import grpc_tools

    paths = [os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")]
    try:
        import google.api.annotations_pb2 as annotations

        # google/api/annotations.proto sits two levels below the site-packages root.
        paths.append(str(Path(annotations.__file__).resolve().parent.parent.parent))
    except ImportError:  # pragma: no cover - googleapis-common-protos is a dependency
        log.warning("googleapis-common-protos is not installed: google/api imports will fail")
    return paths


def generate(
    proto_root: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    package: str | None = None,
    descriptor_set: str | os.PathLike[str] | None = None,
    only: Iterable[str] = (),
    includes: Iterable[str | os.PathLike[str]] = (),
    check: bool = False,
    force: bool = False,
) -> GenerateResult:
    """Compile the protos under ``proto_root`` into an importable package.

    ``out`` is the directory on ``sys.path``; with ``package="a.b"`` the modules
    go to ``out/a/b/<proto path>`` and import each other as ``a.b.<proto path>``.
    ``only`` restricts compilation to these subdirectories (or files) of the
    root, which stays on the include path. ``descriptor_set`` also writes a
    ``FileDescriptorSet`` with imports and source info. Unchanged inputs skip
    all work unless ``force``. With ``check=True`` nothing is written.

    Raises :class:`CodegenError` with ``path:line:col: message`` lines when
    protoc rejects the input; the previous output is then left as it was.
    """
    if package is not None:
        _check_package(package)
    root = Path(proto_root).resolve()
    if not root.is_dir():
        raise CodegenError(f"proto root {str(proto_root)!r} is not a directory")
    protos = _find_protos(root, only)
    if not protos:
        raise CodegenError(
            f"no .proto files under {proto_root}" + (f" in {list(only)}" if only else "")
        )
    out_dir = Path(out).resolve()
    package_dir = out_dir.joinpath(*package.split(".")) if package else out_dir
    search = [str(root), *(str(Path(p).resolve()) for p in includes), *include_paths()]
    desc_path = Path(descriptor_set).resolve() if descriptor_set else None
    digest = _digest(root, protos, package, search, desc_path is not None)
    tools = _tool_versions()
    manifest = _read_manifest(package_dir)

    if (
        not check
        and not force
        and manifest.get("digest") == digest
        and manifest.get("tools") == tools
        and _outputs_exist(package_dir, manifest, desc_path)
    ):
        log.debug("protos unchanged: %d files, nothing to do", len(protos))
        files = manifest.get("files")
        listed = tuple(str(f) for f in files) if isinstance(files, list) else ()
        return GenerateResult(tuple(protos), listed, False, package_dir, desc_path)

    with tempfile.TemporaryDirectory(prefix="meshkit-gen-") as tmp:
        staging = Path(tmp) / "out"
        staging.mkdir()
        staged_desc = Path(tmp) / "descriptors.binpb" if desc_path else None
        _run_protoc(root, protos, search, staging, staged_desc)
        generated = _finish_modules(staging, protos, package)
        if check:
            stale = _compare(staging, package_dir, generated, manifest)
            if (
                desc_path is not None
                and staged_desc is not None
                and (not desc_path.exists() or desc_path.read_bytes() != staged_desc.read_bytes())
            ):
                stale.append(str(desc_path))
            return GenerateResult(
                tuple(protos), tuple(generated), bool(stale), package_dir, desc_path, tuple(stale)
            )
        wrote = _install(staging, package_dir, generated, manifest, out_dir, package)
        if desc_path is not None and staged_desc is not None:
            data = staged_desc.read_bytes()
            if not desc_path.exists() or desc_path.read_bytes() != data:
                _atomic_write(desc_path, data)
                wrote = True
    fresh = {"digest": digest, "files": generated, "format": _FORMAT_VERSION, "tools": tools}
    # Other tool versions that produce the same bytes leave the manifest alone: a
    # committed package must not change because one machine has newer tools (the
    # next run regenerates and compares again; ``force`` records the new versions).
    same_inputs = all(manifest.get(k) == fresh[k] for k in ("digest", "files", "format"))
    if force or wrote or not same_inputs or "tools" not in manifest:
        _write_manifest(package_dir, fresh)
    log.debug("compiled %d protos into %s (%d files)", len(protos), package_dir, len(generated))
    return GenerateResult(tuple(protos), tuple(generated), wrote, package_dir, desc_path)


def _check_package(package: str) -> None:
    """Refuse a package name Python could not import (``app-gen``, ``1gen``, ``a..b``)."""
    import keyword

    for part in package.split("."):
        if not part.isidentifier() or keyword.iskeyword(part):
            hint = f" (try {part.replace('-', '_')!r})" if "-" in part else ""
            raise CodegenError(
                f"--package {package!r}: {part!r} is not a valid Python identifier, so the "
                f"generated modules could not be imported{hint}"
            )


def _find_protos(root: Path, only: Iterable[str]) -> list[str]:
    selected = [root / o for o in only] or [root]
    found: set[str] = set()
    for base in selected:
        if base.is_file() and base.suffix == ".proto":
            found.add(base.relative_to(root).as_posix())
            continue
        if not base.exists():
            raise CodegenError(f"{base} does not exist under the proto root {root}")
        for path in base.rglob("*.proto"):
            found.add(path.relative_to(root).as_posix())
    return sorted(found)


def _digest(
    root: Path, protos: list[str], package: str | None, search: list[str], desc: bool
) -> str:
    """A content hash of the inputs that shape the output, independent of where the
    checkout or the virtualenv lives and of the tools' versions (a committed manifest
    must match on every machine; the tools are compared separately)."""
    h = hashlib.sha256()
    h.update(json.dumps([_FORMAT_VERSION, package, desc]).encode())
    for rel in protos:
        h.update(rel.encode() + b"\0" + (root / rel).read_bytes() + b"\0")
    # Imports from the user's extra include dirs change the output too; the built-in ones
    # come with the tools, whose versions the manifest records.
    builtin = set(include_paths())
    for inc in search[1:]:
        if inc in builtin:
            continue
        for path in sorted(Path(inc).rglob("*.proto")):
            h.update(path.relative_to(inc).as_posix().encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def _tool_versions() -> dict[str, str]:
    """The versions of the packages that generate code and ship the built-in protos."""
    from importlib import metadata

    return {dist: metadata.version(dist) for dist in ("grpcio-tools", "googleapis-common-protos")}


def _read_manifest(package_dir: Path) -> dict[str, object]:
    path = package_dir / _MANIFEST
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_manifest(package_dir: Path, data: dict[str, object]) -> None:
    _atomic_write(package_dir / _MANIFEST, (json.dumps(data, indent=1) + "\n").encode())


def _outputs_exist(package_dir: Path, manifest: dict[str, object], desc: Path | None) -> bool:
    files = manifest.get("files")
    if not isinstance(files, list):
        return False
    if desc is not None and not desc.exists():
        return False
    return all((package_dir / f).exists() for f in files)


def _run_protoc(
    root: Path, protos: list[str], search: list[str], staging: Path, desc: Path | None
) -> None:
    args = [sys.executable, "-m", "grpc_tools.protoc"]
    args += [f"-I{p}" for p in search]
    args += [f"--python_out={staging}", f"--pyi_out={staging}", f"--grpc_python_out={staging}"]
    if desc is not None:
        args += [f"--descriptor_set_out={desc}", "--include_imports", "--include_source_info"]
    args += protos
    proc = subprocess.run(args, cwd=root, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise CodegenError(
            f"protoc failed on {len(protos)} files under {root}",
            _explain(proc.stderr, root, search),
        )


def _explain(stderr: str, root: Path, search: list[str]) -> list[str]:
    """Turn protoc's output into ``path:line:col: message`` lines that say what to do."""
    lines: list[str] = []
    for raw in stderr.splitlines():
        line = raw.strip()
        if not line or line.startswith("Warning") or "warning:" in line:
            continue
        missing = _FILE_NOT_FOUND.match(line)
        if missing:
            # The importing line below says who wanted it; this one only repeats the name.
            continue
        located = _PROTOC_LOCATION.match(line)
        if located:
            imp = _IMPORT_NOT_FOUND.search(located["msg"])
            where = f"{_display(root, located['file'])}:{located['line']}:{located['col']}"
            if imp:
                lines.append(
                    f"{where}: import {imp['imp']!r} not found; searched: {', '.join(search)}"
                )
            else:
                lines.append(f"{where}: {located['msg']}")
        else:
            lines.append(line)
    return lines or [stderr.strip() or "protoc failed without a message"]


def _display(root: Path, rel: str) -> str:
    path = root / rel
    relative = os.path.relpath(path)
    return str(path) if relative.startswith("..") else relative


def _module_names(protos: Iterable[str]) -> set[str]:
    """Dotted module names protoc creates for these protos (without the _pb2 suffix)."""
    return {p[: -len(".proto")].replace("/", ".").replace("-", "_") for p in protos}


def _finish_modules(staging: Path, protos: list[str], package: str | None) -> list[str]:
    """Rewrite imports, drop service-less _pb2_grpc files, add __init__.py files."""
    ours = _module_names(protos)
    generated: list[str] = []
    for path in sorted(staging.rglob("*")):
        if not path.is_file():
            continue
        rel = path.relative_to(staging).as_posix()
        text = path.read_text()
        if rel.endswith("_pb2_grpc.py") and "def add_" not in text and "Stub(" not in text:
            # protoc writes a _grpc module even for files without services: it would
            # only pin a grpcio version and import nothing useful.
            path.unlink()
            continue
        if package:
            text = _rewrite_imports(text, ours, package)
            path.write_text(text)
        generated.append(rel)
    dirs = {Path(rel).parent for rel in generated}
    for d in list(dirs):
        dirs.update(d.parents)
    for d in sorted(dirs):
        init = staging / d / "__init__.py"
        if not init.exists():
            init.write_text("")
            generated.append((d / "__init__.py").as_posix())
    return sorted(set(generated))


def _rewrite_imports(text: str, ours: set[str], package: str) -> str:
    def from_import(match: re.Match[str]) -> str:
        module, name = match["module"], match["name"]
        full = f"{module}.{name}" if module else name
        if full.removesuffix("_pb2").removesuffix("_pb2_grpc") in ours or (
            full.endswith("_pb2_grpc") and full[: -len("_pb2_grpc")] in ours
        ):
            return f"{match['indent']}from {package}{'.' + module if module else ''} import {name}"
        return match[0]

    def plain_import(match: re.Match[str]) -> str:
        module = match["module"]
        if module.removesuffix("_pb2") in ours:
            parent, _, leaf = module.rpartition(".")
            target = f"{package}.{parent}" if parent else package
            return f"{match['indent']}from {target} import {leaf}"
        return match[0]

    text = re.sub(
        r"^(?P<indent>\s*)from (?P<module>[\w.]*) import (?P<name>\w+_pb2(?:_grpc)?)\b",
        from_import,
        text,
        flags=re.M,
    )
    return re.sub(
        r"^(?P<indent>\s*)import (?P<module>[\w.]+_pb2)(?= as )", plain_import, text, flags=re.M
    )


def _compare(
    staging: Path, package_dir: Path, generated: list[str], manifest: dict[str, object]
) -> list[str]:
    stale: list[str] = []
    for rel in generated:
        target = package_dir / rel
        if not target.exists() or target.read_bytes() != (staging / rel).read_bytes():
            stale.append(str(target))
    previous = manifest.get("files")
    if isinstance(previous, list):
        stale += [str(package_dir / rel) for rel in previous if rel not in generated]
    return stale


def _install(
    staging: Path,
    package_dir: Path,
    generated: list[str],
    manifest: dict[str, object],
    out_dir: Path,
    package: str | None,
) -> bool:
    """Move the staged files into place, writing only those whose bytes differ; True
    when anything was written or removed."""
    wrote = False
    package_dir.mkdir(parents=True, exist_ok=True)
    if package:
        # Parents of the package become packages too, without touching existing ones.
        d = package_dir
        while d != out_dir and out_dir in d.parents:
            d = d.parent
            if d != out_dir and not (d / "__init__.py").exists():
                (d / "__init__.py").write_text("")
                wrote = True
    for rel in generated:
        target = package_dir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        data = (staging / rel).read_bytes()
        if not target.exists() or target.read_bytes() != data:
            _atomic_write(target, data)
            wrote = True
    previous = manifest.get("files")
    if isinstance(previous, list):
        for rel in previous:
            if rel not in generated and (package_dir / rel).exists():
                (package_dir / rel).unlink()
                wrote = True
    return wrote


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def clean(package_dir: Path) -> None:
    """Remove a generated package directory (used by ``make clean``)."""
    shutil.rmtree(package_dir, ignore_errors=True)
