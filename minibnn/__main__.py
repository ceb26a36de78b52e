"""``python -m minibnn train | eval | bench``."""

from .cli import main

raise SystemExit(main())
