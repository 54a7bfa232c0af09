"""Lets ``python -m watcher`` behave exactly like the console script."""

from watcher.cli import main

raise SystemExit(main())
