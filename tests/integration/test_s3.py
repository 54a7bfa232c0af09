"""The S3 adapter against a real S3 server, with connections cut on purpose.

A relay between the client and the server (``testsupport.proxy``) cuts one response
after a set number of bytes, which is how a flaky link looks to the client; the download
must resume from where it stopped, never start over, and notice a replaced object.
"""

from __future__ import annotations

import hashlib
import io
import random
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from minio import Minio

from testsupport.proxy import Proxy, address_of
from watcher.adapters.s3 import S3Store
from watcher.core.backoff import Backoff
from watcher.core.errors import PermanentError, TemporaryError
from watcher.settings import S3Settings

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
QUICK = Backoff(base=0.05, cap=0.2, attempts=4)


@pytest.fixture
def settings(services_env: dict[str, str]) -> S3Settings:
    return S3Settings(
        endpoint=services_env["LVW_S3_ENDPOINT"],
        access_key=services_env["LVW_S3_ACCESS_KEY"],
        secret_key=services_env["LVW_S3_SECRET_KEY"],
    )


@pytest.fixture
def minio(settings: S3Settings) -> Minio:
    return Minio(settings.host, settings.access_key, settings.secret_key, secure=False,
                 region=settings.region)


@pytest.fixture
def proxy_factory(settings: S3Settings,
                  proxy_to: Callable[..., Proxy]) -> Callable[..., Proxy]:
    """``make(cut_after=N, reset=..., on_cut=...)``: a relay to the S3 server that cuts the
    first response passing N bytes (counted per connection), once, then relays faithfully."""
    def make(*, cut_after: int, reset: bool = True,
             on_cut: Callable[[], None] | None = None) -> Proxy:
        proxy = proxy_to(address_of(settings.endpoint))
        proxy.cut_response_after(cut_after, reset=reset, on_cut=on_cut)
        return proxy

    return make


def via(proxy: Proxy, settings: S3Settings) -> S3Settings:
    return S3Settings(endpoint=f"http://127.0.0.1:{proxy.port}", access_key=settings.access_key,
                      secret_key=settings.secret_key, region=settings.region)


def upload(minio: Minio, bucket: str, key: str, size: int, seed: int = 1) -> bytes:
    data = random.Random(seed).randbytes(size)
    minio.put_object(bucket, key, io.BytesIO(data), size)
    return data


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- lookups -------------------------------------------------------------------------------


def test_stat_describes_an_object_and_returns_none_when_missing(
    settings: S3Settings, minio: Minio, s3_bucket: str
) -> None:
    upload(minio, s3_bucket, "images/a b+c.qcow2", 1000)
    store = S3Store(settings)

    info = store.stat(s3_bucket, "images/a b+c.qcow2")

    assert info is not None
    assert (info.bucket, info.key, info.size) == (s3_bucket, "images/a b+c.qcow2", 1000)
    assert info.etag and '"' not in info.etag
    assert info.last_modified is not None
    assert store.stat(s3_bucket, "images/missing.qcow2") is None
    assert store.stat(f"{s3_bucket}-absent", "images/a b+c.qcow2") is None


def test_list_objects_is_recursive_under_the_prefix(
    settings: S3Settings, minio: Minio, s3_bucket: str
) -> None:
    for key in ("u/24.04/a.qcow2", "u/24.04/a.qcow2.sha256", "u/deep/er/b.qcow2", "other/c"):
        upload(minio, s3_bucket, key, 10)
    store = S3Store(settings)

    listed = store.list_objects(s3_bucket, "u/")

    assert sorted(o.key for o in listed) == [
        "u/24.04/a.qcow2", "u/24.04/a.qcow2.sha256", "u/deep/er/b.qcow2",
    ]
    assert all(o.size == 10 and o.etag for o in listed)


def test_list_objects_of_a_missing_bucket_is_a_permanent_error(
    settings: S3Settings, s3_bucket: str
) -> None:
    with pytest.raises(PermanentError, match="NoSuchBucket"):
        S3Store(settings).list_objects(f"{s3_bucket}-absent", "")


def test_read_small_returns_content_none_when_missing_and_refuses_large_objects(
    settings: S3Settings, minio: Minio, s3_bucket: str
) -> None:
    minio.put_object(s3_bucket, "a.qcow2.sha256", io.BytesIO(b"abc\n"), 4)
    upload(minio, s3_bucket, "big.sha256", 5000)
    store = S3Store(settings)

    assert store.read_small(s3_bucket, "a.qcow2.sha256") == b"abc\n"
    assert store.read_small(s3_bucket, "none.sha256") is None
    with pytest.raises(PermanentError, match=f"{s3_bucket}/big.sha256 is 5000 bytes"):
        store.read_small(s3_bucket, "big.sha256")


# -- download ------------------------------------------------------------------------------


def test_download_writes_the_object_and_its_digest(
    settings: S3Settings, minio: Minio, s3_bucket: str, tmp_path: Path
) -> None:
    data = upload(minio, s3_bucket, "img.qcow2", 9 * MiB + 123)
    seen: list[int] = []
    dest = tmp_path / "img.part"

    result = S3Store(settings).download(s3_bucket, "img.qcow2", dest, on_bytes=seen.append)

    assert (result.sha256, result.size, result.resumed) == (sha256(data), len(data), 0)
    assert result.etag == minio.stat_object(s3_bucket, "img.qcow2").etag
    assert dest.read_bytes() == data
    assert sum(seen) == len(data) and max(seen) <= MiB


@pytest.fixture
def small_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs: a download bigger than that fails with ENOSPC part-way."""
    mountpoint = tmp_path / "small"
    mountpoint.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mountpoint)],
                   check=True, timeout=30)
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", str(mountpoint)], check=False, timeout=30)


def test_a_full_disk_fails_the_download_cleanly_and_removes_the_partial_file(
    settings: S3Settings, minio: Minio, s3_bucket: str, small_filesystem: Path
) -> None:
    upload(minio, s3_bucket, "big.qcow2", 5 * MiB)
    dest = small_filesystem / "big.part"
    with pytest.raises(TemporaryError, match="No space left on device"):
        S3Store(settings).download(s3_bucket, "big.qcow2", dest)
    assert list(small_filesystem.iterdir()) == []
    assert not [t for t in threading.enumerate() if t.name == "file-sink" and t.is_alive()]


def test_download_of_a_missing_object_is_a_permanent_error_naming_it(
    settings: S3Settings, s3_bucket: str, tmp_path: Path
) -> None:
    dest = tmp_path / "x.part"
    with pytest.raises(PermanentError, match=f"{s3_bucket}/nothing.qcow2: NoSuchKey"):
        S3Store(settings).download(s3_bucket, "nothing.qcow2", dest)
    assert not dest.exists()


def test_download_with_a_stale_expected_etag_is_a_temporary_error(
    settings: S3Settings, minio: Minio, s3_bucket: str, tmp_path: Path
) -> None:
    upload(minio, s3_bucket, "img.qcow2", 1000)
    dest = tmp_path / "img.part"
    with pytest.raises(TemporaryError, match="changed"):
        S3Store(settings).download(s3_bucket, "img.qcow2", dest,
                                   expected_etag='"0123456789abcdef0123456789abcdef"')
    assert not dest.exists()


@pytest.mark.parametrize("reset", [True, False], ids=["connection-reset", "connection-closed"])
def test_interrupted_download_resumes_from_where_it_stopped(
    settings: S3Settings, minio: Minio, s3_bucket: str, tmp_path: Path,
    proxy_factory: Callable[..., Proxy], reset: bool,
) -> None:
    data = upload(minio, s3_bucket, "img.qcow2", 12 * MiB)
    proxy = proxy_factory(cut_after=8 * MiB + 777, reset=reset)
    attempts: list[str] = []
    store = S3Store(via(proxy, settings), backoff=QUICK, log=attempts.append)
    dest = tmp_path / "img.part"

    result = store.download(s3_bucket, "img.qcow2", dest)

    assert proxy.cuts == 1
    assert result.resumed >= 1
    assert (result.sha256, result.size) == (sha256(data), len(data))
    assert dest.read_bytes() == data
    # Starting over would send 20 MiB; a resume re-sends at most what was in flight
    # (socket buffers on both sides of the proxy: a few MiB on a loaded machine).
    assert proxy.bytes_to_client < len(data) + 6 * MiB
    assert any("attempt 2/4" in line for line in attempts)


def test_object_replaced_while_interrupted_fails_and_leaves_no_partial_file(
    settings: S3Settings, minio: Minio, s3_bucket: str, tmp_path: Path,
    proxy_factory: Callable[..., Proxy],
) -> None:
    upload(minio, s3_bucket, "img.qcow2", 8 * MiB, seed=1)
    proxy = proxy_factory(
        cut_after=3 * MiB, on_cut=lambda: upload(minio, s3_bucket, "img.qcow2", 8 * MiB, seed=2)
    )
    store = S3Store(via(proxy, settings), backoff=QUICK)
    dest = tmp_path / "img.part"

    with pytest.raises(TemporaryError, match=f"{s3_bucket}/img.qcow2 changed"):
        store.download(s3_bucket, "img.qcow2", dest)

    assert proxy.cuts == 1
    assert not dest.exists()


def test_stop_aborts_the_download_promptly_and_removes_the_partial_file(
    settings: S3Settings, minio: Minio, s3_bucket: str, tmp_path: Path
) -> None:
    upload(minio, s3_bucket, "img.qcow2", 16 * MiB)
    stop = threading.Event()
    seen: list[int] = []

    def progress(count: int) -> None:
        seen.append(count)
        if sum(seen) >= 2 * MiB:
            stop.set()

    dest = tmp_path / "img.part"
    with pytest.raises(TemporaryError, match="download cancelled"):
        S3Store(settings).download(s3_bucket, "img.qcow2", dest, on_bytes=progress, stop=stop)

    assert sum(seen) < 4 * MiB
    assert not dest.exists()


def test_stop_wakes_a_download_waiting_to_retry(
    settings: S3Settings, minio: Minio, s3_bucket: str, tmp_path: Path,
    proxy_factory: Callable[..., Proxy],
) -> None:
    upload(minio, s3_bucket, "img.qcow2", 8 * MiB)
    stop = threading.Event()
    proxy = proxy_factory(cut_after=2 * MiB, on_cut=stop.set)
    # The shortest retry delay would be 3 s; the abort must come well before.
    store = S3Store(via(proxy, settings), backoff=Backoff(base=30, cap=30, attempts=3))
    dest = tmp_path / "img.part"

    started = time.monotonic()
    with pytest.raises(TemporaryError, match="download cancelled"):
        store.download(s3_bucket, "img.qcow2", dest, stop=stop)

    assert time.monotonic() - started < 15  # well before the first 30 s retry delay
    assert not dest.exists()


def test_unreachable_server_exhausts_retries_with_a_temporary_error(
    settings: S3Settings, tmp_path: Path
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        dead_port = probe.getsockname()[1]
    dead = S3Settings(endpoint=f"http://127.0.0.1:{dead_port}", access_key=settings.access_key,
                      secret_key=settings.secret_key)
    attempts: list[str] = []
    store = S3Store(dead, backoff=Backoff(base=0.01, cap=0.02, attempts=3), log=attempts.append)
    dest = tmp_path / "img.part"

    with pytest.raises(TemporaryError, match=r"vm-images/img\.qcow2 failed after 3 attempts"):
        store.download("vm-images", "img.qcow2", dest)

    assert [line.split(": attempt ")[1][:3] for line in attempts] == ["2/3", "3/3"]
    assert not dest.exists()
