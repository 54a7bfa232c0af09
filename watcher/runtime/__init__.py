"""The long-running process: supervisor, signals, reconciling, observability."""
