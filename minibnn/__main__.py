"""``python -m minibnn train | eval | freeze | predict``: see ``minibnn.cli``."""

from .cli import main

raise SystemExit(main())
