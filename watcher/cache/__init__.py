"""The image cache: verified images on local disk, named by their SHA-256.

Why it is a package: the files (``store``: ``CacheDir``, the layout, records, refs, lock,
clean-up, verification, an in-memory index, all blocking) and fetching into them
(``warmer``: ``Cache``, S3, sidecar, download, inspection) change for different reasons
and are tested apart. Outside this package only ``Cache`` is used, never ``CacheDir``.
"""

from watcher.cache.entry import CacheEntry, Source, VerifyResult
from watcher.cache.store import EntryPinned
from watcher.cache.warmer import Cache

__all__ = ["Cache", "CacheEntry", "EntryPinned", "Source", "VerifyResult"]
