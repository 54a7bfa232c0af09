"""Helpers shared by the tests, the benchmarks and the demo.

Kept outside ``tests/`` so that ``bench/`` and ``scripts/demo.py`` can use them without
importing test modules: polling (``polling``), the daemon in this loop or as a child
process (``daemon``), metrics read as Prometheus reads them (``metrics``), a relay that
breaks one connection to a shared service (``proxy``), and the services' test data:
configs, images and MinIO-shaped bucket notifications (``services``).
"""
