"""``python -m kvstore``: the operator's command line."""

from kvstore.cli import main

raise SystemExit(main())
