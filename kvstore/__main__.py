"""``python -m kvstore``: the operator's command line."""

from kvstore.tools.cli import main

raise SystemExit(main())
