"""``python -m minibnn train | eval``: see ``minibnn.cli``."""

from .cli import main

raise SystemExit(main())
