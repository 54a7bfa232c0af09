"""The image cache: verified images on local disk, named by their SHA-256.

Why it is a package: the files (``store``: layout, records, refs, lock, clean-up,
verification, an in-memory index) and fetching into them (``warmer``: S3, sidecar,
download, inspection) change for different reasons and are tested apart.
"""

from watcher.cache.entry import CacheEntry, Source, VerifyResult
from watcher.cache.store import CacheStore, EntryPinned
from watcher.cache.warmer import FetchProgress, ImageWarmer

__all__ = ["CacheEntry", "CacheStore", "EntryPinned", "FetchProgress", "ImageWarmer", "Source",
           "VerifyResult"]
