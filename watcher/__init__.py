"""libvirt-volume-watcher: pre-warms VM base images and reprovisions root volumes on request.

The package is built in floors: ``core`` (pure rules and parsing), ``config``,
``adapters`` (one per real system), the jobs ``cache``, ``prewarm`` and ``reprovision``, the
``runtime`` that owns the asyncio tasks, and the faces ``cli`` and ``http``.
Each floor imports only floors below it; ``pyproject.toml`` holds the contract.
"""

__version__ = "0.1.0"
