"""What an API job is called: its key on the job engine and its image's name in the cache.

Why it exists: the key decides what runs one after another (every job for one volume,
in the order accepted; fetches of one object) and the image name is what the cache and
``cache list`` show for an image an API request names only by URL. Both are read by
more than the job's own module, so they are defined once, here.
"""

from __future__ import annotations

import hashlib

from watcher.core.api_requests import ImageRef


def api_image_name(image: ImageRef) -> str:
    """The cache's name for an image an API request names by URL (an identifier)."""
    return "api-" + hashlib.sha256(f"{image.bucket}/{image.key}".encode()).hexdigest()[:16]


def volume_key(pool: str, volume: str) -> str:
    return f"volume {pool}/{volume}"


def fetch_key(image: ImageRef) -> str:
    return f"fetch {image.bucket}/{image.key}"
