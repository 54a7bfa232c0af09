"""Benchmarks of the watcher's data path and event path, run with ``python -m bench``.

They measure the real daemon against real services on this machine and print tables of
ratios taken side by side in one run, never absolute numbers compared across machines.
Timings live here and never in the tests.
"""
