"""The name this project is installed by, which is not its import name.

The import name is ``kvstore`` and so is the command; the distribution on the package
index is ``kvstore-redis``, because ``kvstore`` there is an unrelated project: telling a
user to ``pip install kvstore`` would install that one. Every message that says what to
install, and ``kvstore --version``, take the name from here.
"""

from __future__ import annotations

DISTRIBUTION = "kvstore-redis"


def pip_install(extra: str) -> str:
    """The command that installs this project with ``extra``, quoted for a shell."""
    return f"pip install '{DISTRIBUTION}[{extra}]'"
