"""``meshkit gen``: imports inside a package, googleapis, --check, incremental runs, errors."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from meshkit.cli import main
from meshkit.codegen import CodegenError, generate

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def shop_protos(tmp_path: Path) -> Path:
    root = tmp_path / "protos"
    shutil.copytree(ROOT / "proto" / "shop", root / "shop")
    return root


def run_python(code: str, path: Path) -> subprocess.CompletedProcess[str]:
    # A fresh interpreter: the same proto files may already sit in this process's pool.
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=path,
        capture_output=True,
        text=True,
        check=False,
        env={"PYTHONPATH": str(path), "PATH": "/usr/bin:/bin"},
    )


def test_package_imports_resolve_across_files_and_googleapis(
    shop_protos: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    result = generate(shop_protos, out, package="acme.gen", descriptor_set=out / "api.binpb")
    assert result.changed
    assert "shop/v1/orders_pb2_grpc.py" in result.files
    # Files without services get no _grpc module.
    assert "shop/v1/events_pb2_grpc.py" not in result.files
    assert (out / "acme" / "__init__.py").exists()
    proc = run_python(
        """
        from acme.gen.shop.v1 import orders_pb2, orders_pb2_grpc, common_pb2
        order = orders_pb2.Order(order_id="o1", items=[common_pb2.LineItem(sku="a", quantity=2)])
        assert order.items[0].quantity == 2
        assert hasattr(orders_pb2_grpc, "OrderServiceStub")
        assert hasattr(orders_pb2_grpc, "add_OrderServiceServicer_to_server")
        print(orders_pb2.DESCRIPTOR.services_by_name["OrderService"].full_name)
        """,
        out,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "shop.v1.OrderService"
    text = (out / "acme/gen/shop/v1/orders_pb2.py").read_text()
    assert "from acme.gen.shop.v1 import common_pb2" in text
    assert "from google.api import annotations_pb2" in text  # installed package, not rewritten


def test_descriptor_set_has_imports_source_info_and_http_rules(
    shop_protos: Path, tmp_path: Path
) -> None:
    desc = tmp_path / "api.binpb"
    generate(shop_protos, tmp_path / "out", package="p", descriptor_set=desc)
    fds = descriptor_pb2.FileDescriptorSet.FromString(desc.read_bytes())
    names = {f.name for f in fds.file}
    assert {
        "shop/v1/orders.proto",
        "google/api/http.proto",
        "google/protobuf/timestamp.proto",
    } <= names
    orders = next(f for f in fds.file if f.name == "shop/v1/orders.proto")
    assert orders.source_code_info.location, "source info is needed for docs and OpenAPI"
    create = next(m for m in orders.service[0].method if m.name == "CreateOrder")
    assert create.options.ByteSize() > 0  # carries the google.api.http extension


def test_without_package_writes_absolute_imports(tmp_path: Path) -> None:
    root = tmp_path / "p"
    root.mkdir()
    (root / "base.proto").write_text(
        'syntax = "proto3";\npackage t;\nmessage Base { int32 v = 1; }\n'
    )
    (root / "top.proto").write_text(
        'syntax = "proto3";\npackage t;\nimport "base.proto";\nmessage Top { Base b = 1; }\n'
    )
    out = tmp_path / "out"
    generate(root, out)
    proc = run_python("import top_pb2; print(top_pb2.Top(b={'v': 3}).b.v)", out)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "3"
    # And with a package, `import base_pb2` becomes a package import.
    generate(root, tmp_path / "pkg", package="flat")
    proc = run_python(
        "from flat import top_pb2; print(top_pb2.Top(b={'v': 4}).b.v)", tmp_path / "pkg"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "4"


def test_incremental_and_check(
    shop_protos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    first = generate(shop_protos, out, package="g")
    target = out / "g/shop/v1/orders_pb2.py"
    stamp = target.stat().st_mtime_ns
    second = generate(shop_protos, out, package="g")
    assert not second.changed
    assert target.stat().st_mtime_ns == stamp
    assert set(second.files) == set(first.files)

    args = ["gen", str(shop_protos), "--out", str(out), "--package", "g", "--check"]
    assert main(args) == 0
    orders = shop_protos / "shop/v1/orders.proto"
    orders.write_text(
        orders.read_text().replace(
            "string cancel_reason = 8;", "string cancel_reason = 8;\n  int32 priority = 10;"
        )
    )
    capsys.readouterr()
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "out of date" in err
    assert "orders_pb2.py" in err
    assert "payment_pb2.py" not in err  # only what changed is listed
    assert target.stat().st_mtime_ns == stamp, "--check never writes"

    assert generate(shop_protos, out, package="g").changed
    assert main(args) == 0


def test_removed_proto_removes_its_outputs(shop_protos: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    generate(shop_protos, out, package="g")
    (shop_protos / "shop/v1/events.proto").unlink()
    generate(shop_protos, out, package="g")
    assert not (out / "g/shop/v1/events_pb2.py").exists()
    assert (out / "g/shop/v1/orders_pb2.py").exists()


def test_syntax_error_reports_location_and_keeps_previous_output(
    shop_protos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    generate(shop_protos, out, package="g")
    before = (out / "g/shop/v1/payment_pb2.py").read_bytes()
    payment = shop_protos / "shop/v1/payment.proto"
    lines = payment.read_text().splitlines()
    broken_line = next(i for i, line in enumerate(lines) if "string reason = 2;" in line)
    lines[broken_line] = "  string reason = 2"  # missing semicolon
    payment.write_text("\n".join(lines) + "\n")

    code = main(["gen", str(shop_protos), "--out", str(out), "--package", "g"])
    assert code == 1
    err = capsys.readouterr().err
    # protoc reports the token after the missing ';', on the next line.
    assert f"payment.proto:{broken_line + 2}:" in err
    assert 'Expected ";"' in err
    assert (out / "g/shop/v1/payment_pb2.py").read_bytes() == before


def test_missing_import_names_importer_and_search_path(tmp_path: Path) -> None:
    root = tmp_path / "p"
    (root / "a").mkdir(parents=True)
    (root / "a/x.proto").write_text(
        'syntax = "proto3";\npackage a;\n\nimport "b/missing.proto";\nmessage X { int32 y = 1; }\n'
    )
    with pytest.raises(CodegenError) as info:
        generate(root, tmp_path / "out")
    (line,) = info.value.errors
    assert "a/x.proto:4:1" in line
    assert "'b/missing.proto' not found" in line
    assert str(root) in line and "grpc_tools" in line


def test_bad_root_and_empty_root(tmp_path: Path) -> None:
    with pytest.raises(CodegenError, match="not a directory"):
        generate(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CodegenError, match=r"no \.proto files"):
        generate(tmp_path / "empty", tmp_path / "out")


def test_committed_meshkit_protos_are_current() -> None:
    result = generate(ROOT / "proto", ROOT, package="meshkit._pb", only=["meshkit"], check=True)
    assert not result.stale, f"run `make proto`: {result.stale}"


def test_other_tool_versions_with_the_same_output_write_nothing(
    shop_protos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A fresh clone set up with newer tools must not rewrite a committed manifest when
    # the generated code comes out the same; `force` records the new versions.
    from meshkit.codegen import _generate

    out = tmp_path / "out"
    generate(shop_protos, out, package="g")
    manifest = out / "g" / ".meshkit-gen.json"
    before = manifest.read_bytes()
    target = out / "g/shop/v1/orders_pb2.py"
    stamp = target.stat().st_mtime_ns
    newer = {"grpcio-tools": "99.0.0", "googleapis-common-protos": "99.0.0"}
    monkeypatch.setattr(_generate, "_tool_versions", lambda: newer)

    again = generate(shop_protos, out, package="g")
    assert not again.changed
    assert manifest.read_bytes() == before
    assert target.stat().st_mtime_ns == stamp

    generate(shop_protos, out, package="g", force=True)
    assert '"99.0.0"' in manifest.read_text()
    assert not generate(shop_protos, out, package="g").changed  # fast path again


def test_committed_manifest_names_the_locked_tools() -> None:
    # `make setup` installs uv.lock; if the manifest named other versions, every setup
    # would regenerate (and could rewrite) meshkit/_pb. `make lock` refreshes both.
    import json
    import tomllib

    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    locked = {p["name"]: p.get("version") for p in lock["package"]}
    manifest = json.loads((ROOT / "meshkit/_pb/.meshkit-gen.json").read_text())
    for dist, version in manifest["tools"].items():
        assert locked[dist] == version, (
            f"meshkit/_pb was generated with {dist} {version}, uv.lock has {locked[dist]}: "
            "run `make lock` (it regenerates with --force) and commit both"
        )


@pytest.mark.parametrize("package", ["app-gen", "1gen", "a..b", "app.class", "app gen"])
def test_a_package_python_cannot_import_is_refused(
    package: str, shop_protos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["gen", str(shop_protos), "--out", str(tmp_path / "out"), "--package", package])
    assert code == 1
    err = capsys.readouterr().err
    assert f"--package {package!r}" in err and "not a valid Python identifier" in err
    assert not (tmp_path / "out").exists()  # nothing written
    if package == "app-gen":
        assert "'app_gen'" in err


def test_check_says_how_to_regenerate(
    shop_protos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["gen", str(shop_protos), "--out", str(tmp_path / "out"), "--package", "g", "--check"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "run the same command without --check" in err
    assert "make proto" not in err  # this repository's target, not the user's
