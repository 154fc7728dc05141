"""The Lua files ship inside the built wheel and sdist, and the library is built from there."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

from kvstore.redis.scripts import LIBRARY

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
            "print(sorted(s.LIBRARY.functions)); print(s.LIBRARY.name)",
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
