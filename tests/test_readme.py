"""The README's example runs as written, against a real server."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from kvstore.server_process import LocalServer

README = Path(__file__).resolve().parent.parent / "README.md"
# A checkout's extras (the Quick start), or the distribution by its own name.
INSTALL = r"pip install (-e '\.\[\w+\]'|'?kvstore-redis[\[ '`]|kvstore-redis$)"


def test_the_example_runs(valkey_server: LocalServer) -> None:
    text = README.read_text(encoding="utf-8")
    example = re.search(r"## Example\s+```python\n(.*?)```", text, re.S)
    assert example is not None
    code = example.group(1).replace("redis://127.0.0.1:6379", valkey_server.url)
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert "[PackageRecord(workflow_type='order', content_hash='3f2a'" in done.stdout
    assert "PackageRouteRecord(workflow_type='order', content_hash='19c7')" in done.stdout


def test_every_install_line_names_the_projects_own_distribution() -> None:
    # PyPI's "kvstore" is another project: "pip install kvstore" would install it.
    for doc in (README, README.with_name("CONTRIBUTING.md")):
        for line in re.findall(r"pip install [^`\n]*", doc.read_text(encoding="utf-8")):
            assert re.match(INSTALL, line), (doc.name, line)
