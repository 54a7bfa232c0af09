"""The HTTP job API's input rules: what is accepted, and a table of hostile inputs refused."""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path
from typing import Any

import pytest

from watcher.core.api_requests import (
    DEFAULT_LIMIT,
    IMAGE_TYPES,
    MAX_LIMIT,
    MAX_URL_LENGTH,
    MAX_VOLUME_SIZE_GB,
    BadRequest,
    BodyTooLarge,
    FetchRequest,
    ImageRef,
    ProvisionRequest,
    UploadRequest,
    check_cache_key,
    check_job_id,
    check_volume_name,
    named_host,
    parse_fetch,
    parse_image_url,
    parse_paging,
    parse_provision,
    parse_upload_headers,
)

ENDPOINT = "http://127.0.0.1:9000"
DIGEST = "a" * 64


# --- image URLs

@pytest.mark.parametrize(("url", "endpoint", "bucket", "key"), [
    pytest.param("s3://vm-images/ubuntu/24.04.qcow2", ENDPOINT, "vm-images", "ubuntu/24.04.qcow2",
                 id="s3-form"),
    pytest.param("S3://vm-images/a.qcow2", ENDPOINT, "vm-images", "a.qcow2", id="scheme-any-case"),
    pytest.param("http://127.0.0.1:9000/vm-images/a/b.qcow2", ENDPOINT, "vm-images", "a/b.qcow2",
                 id="path-style"),
    pytest.param("http://LOCALHOST/b1b/k", "http://localhost:80", "b1b", "k",
                 id="host-case-and-default-port-in-endpoint"),
    pytest.param("http://localhost:80/b1b/k", "http://localhost", "b1b", "k",
                 id="explicit-default-port-in-url"),
    pytest.param("https://s3.example.org:443/b1b/k", "https://s3.example.org", "b1b", "k",
                 id="https-default-port"),
    pytest.param("http://[::1]:9000/b1b/k", "http://[::1]:9000", "b1b", "k", id="ipv6-host"),
    pytest.param("http://127.0.0.1:9000/b1b/k", "127.0.0.1:9000", "b1b", "k",
                 id="endpoint-without-scheme-is-http"),
    pytest.param("http://127.0.0.1:9000/b1b/k", "http://127.0.0.1:9000/", "b1b", "k",
                 id="endpoint-with-trailing-slash"),
    pytest.param("http://h:9000/s3/b1b/k", "http://h:9000/s3", "b1b", "k",
                 id="endpoint-with-path-prefix"),
    pytest.param("http://127.0.0.1:9000/b1b/my%20image.qcow2", ENDPOINT, "b1b", "my image.qcow2",
                 id="escaped-space-decoded-once"),
    pytest.param("s3://b1b/100%25.qcow2", ENDPOINT, "b1b", "100%.qcow2", id="escaped-percent"),
    pytest.param("s3://b1b/%C3%A9t%C3%A9.qcow2", ENDPOINT, "b1b", "\u00e9t\u00e9.qcow2",
                 id="utf8-escapes"),
    pytest.param("s3://b1b/\u00e9t\u00e9.qcow2", ENDPOINT, "b1b", "\u00e9t\u00e9.qcow2",
                 id="raw-non-ascii"),
    pytest.param("s3://my.bucket-1/.hidden/a..b", ENDPOINT, "my.bucket-1", ".hidden/a..b",
                 id="dots-inside-segments"),
    pytest.param("s3://b1b/a.sha256.qcow2", ENDPOINT, "b1b", "a.sha256.qcow2",
                 id="sha256-not-at-the-end"),
])
def test_an_image_url_of_the_own_s3_parses_into_bucket_and_key(
    url: str, endpoint: str, bucket: str, key: str,
) -> None:
    assert parse_image_url(url, endpoint) == ImageRef(bucket, key)


HOSTILE_URLS = [
    pytest.param(None, id="not-a-string"),
    pytest.param(42, id="a-number"),
    pytest.param("", id="empty"),
    pytest.param("ftp://127.0.0.1:9000/b1b/k", id="other-scheme"),
    pytest.param("file:///etc/passwd", id="file-scheme"),
    pytest.param("http://127.0.0.1:9000.evil.example/b1b/k", id="port-with-host-suffix"),
    pytest.param("http://127.0.0.1:9000:80/b1b/k", id="two-ports"),
    pytest.param("http://user:pass@127.0.0.1:9000/b1b/k", id="userinfo"),
    pytest.param("http://evil.example@127.0.0.1:9000/b1b/k", id="user-only"),
    pytest.param("s3://user@b1b/k", id="s3-userinfo"),
    pytest.param("s3://b1b:9000/k", id="s3-port"),
    pytest.param("http://127.0.0.1:9000\\@evil.example/b1b/k", id="backslash-in-host"),
    pytest.param("http:///b1b/k", id="no-host"),
    pytest.param("http://127.0.0.1:9000/b1b/k?versionId=1", id="query"),
    pytest.param("http://127.0.0.1:9000/b1b/k?", id="empty-query"),
    pytest.param("http://127.0.0.1:9000/b1b/k#frag", id="fragment"),
    pytest.param("s3://b1b/k#frag", id="s3-fragment"),
    pytest.param("http://127.0.0.1:9000/b1b", id="bucket-only"),
    pytest.param("http://127.0.0.1:9000/b1b/", id="empty-key"),
    pytest.param("http://127.0.0.1:9000/", id="no-bucket"),
    pytest.param("http://127.0.0.1:9000//b1b/k", id="empty-bucket-segment"),
    pytest.param("s3://b1b", id="s3-bucket-only"),
    pytest.param("s3://b1b/", id="s3-empty-key"),
    pytest.param("s3:///k", id="s3-no-bucket"),
    pytest.param("s3://b1b/dir/", id="key-ends-in-slash"),
    pytest.param("s3://b1b/a//b", id="empty-segment"),
    pytest.param("s3://b1b/../etc/passwd", id="dotdot-segment"),
    pytest.param("s3://b1b/a/./b", id="dot-segment"),
    pytest.param("s3://b1b/a/..", id="trailing-dotdot"),
    pytest.param("s3://b1b/%2e%2e/x", id="encoded-dotdot"),
    pytest.param("s3://b1b/%2E%2E%2Fx", id="encoded-dotdot-slash"),
    pytest.param("s3://b1b/a%2f..%2fb", id="encoded-slashes-around-dotdot"),
    pytest.param("s3://b1b/%252e%252e/x", id="double-encoded-dotdot"),
    pytest.param("s3://b1b/a%00b", id="encoded-nul"),
    pytest.param("s3://b1b/a\x00b", id="raw-nul"),
    pytest.param("s3://b1b/a%0Ab", id="encoded-newline"),
    pytest.param("s3://b1b/a\nb", id="raw-newline"),
    pytest.param("s3://b1b/a%7Fb", id="encoded-del"),
    pytest.param("s3://b1b/a%C2%85b", id="encoded-c1-control"),
    pytest.param("s3://b1b/a%E2%80%AEb", id="encoded-bidi-override"),
    pytest.param("s3://b1b/a\u2028b", id="raw-line-separator"),
    pytest.param("s3://b1b/a\ud800b", id="lone-surrogate"),
    pytest.param("s3://b1b/a%5C..%5Cb", id="encoded-backslashes"),
    pytest.param("s3://b1b/a b", id="raw-space"),
    pytest.param("s3://b1b/a\tb", id="raw-tab"),
    pytest.param("s3://b1b/%ZZ", id="bad-escape"),
    pytest.param("s3://b1b/100%", id="lone-percent"),
    pytest.param("s3://b1b/%C3", id="truncated-utf8"),
    pytest.param("s3://b1b/%FF", id="invalid-utf8"),
    pytest.param("s3://b1b/image.qcow2.sha256", id="sidecar"),
    pytest.param("s3://b1b/image.qcow2%2Esha256", id="encoded-sidecar"),
    pytest.param("s3://b1b/" + "k" * 1025, id="key-too-long"),
    pytest.param("s3://" + "b" * 2048 + "/k", id="url-too-long"),
    pytest.param("s3://ab/k", id="bucket-too-short"),
    pytest.param("s3://" + "b" * 64 + "/k", id="bucket-too-long"),
    pytest.param("s3://Vm-Images/k", id="bucket-uppercase"),
    pytest.param("s3://vm_images/k", id="bucket-underscore"),
    pytest.param("s3://-bucket/k", id="bucket-leading-hyphen"),
    pytest.param("s3://bucket./k", id="bucket-trailing-dot"),
    pytest.param("s3://my..bucket/k", id="bucket-double-dot"),
    pytest.param("s3://192.168.1.1/k", id="bucket-ip-address"),
    pytest.param("http://127.0.0.1:9000/b%31b/k", id="bucket-percent-encoded"),
    pytest.param("http://127.0.0.1:9000/%2e%2e/k", id="bucket-encoded-dotdot"),
]


@pytest.mark.parametrize(("url", "host"), [
    pytest.param("http://minio:9000/b1b/k", "minio:9000", id="the-orchestrators-name"),
    pytest.param("https://127.0.0.1:9000/b1b/k", "127.0.0.1:9000", id="other-scheme"),
    pytest.param("http://evil.example:9000/b1b/k", "evil.example:9000", id="other-host"),
    pytest.param("http://127.0.0.1:9001/b1b/k", "127.0.0.1:9001", id="other-port"),
    pytest.param("http://127.0.0.1/b1b/k", "127.0.0.1", id="default-port-is-not-9000"),
    pytest.param("http://127.0.0.1.:9000/b1b/k", "127.0.0.1.:9000", id="trailing-dot-host"),
    pytest.param("http://10.0.0.1/b1b/k", "10.0.0.1", id="an-address"),
    pytest.param("http://127.0.0.1:9000/b1b/k", None, id="the-endpoint"),
    pytest.param("HTTP://127.0.0.1:9000/b1b/k", None, id="the-endpoint-upper-case"),
    pytest.param("http://127.0.0.1:80/b1b/k", "127.0.0.1:80", id="explicit-port"),
    pytest.param("s3://b1b/k", None, id="s3"),
])
def test_any_host_names_a_bucket_and_key_of_the_own_s3_and_is_only_noted(
    url: str, host: str | None,
) -> None:
    assert parse_image_url(url, ENDPOINT) == ImageRef("b1b", "k")
    assert named_host(url, ENDPOINT) == host
    assert parse_fetch({"image_url": url}, ENDPOINT).named_host == host


def test_an_endpoint_with_a_path_prefix_takes_its_own_urls_with_the_prefix() -> None:
    endpoint = "http://gw.example:8080/s3"
    assert parse_image_url("http://gw.example:8080/s3/b1b/k", endpoint) == ImageRef("b1b", "k")
    assert parse_image_url("http://other:9000/b1b/k", endpoint) == ImageRef("b1b", "k")


@pytest.mark.parametrize("url", HOSTILE_URLS)
def test_a_hostile_image_url_is_refused_naming_the_field(url: object) -> None:
    with pytest.raises(BadRequest) as caught:
        parse_image_url(url, ENDPOINT)
    assert caught.value.field == "image_url"
    assert str(caught.value).startswith("image_url ")


@pytest.mark.parametrize("key", ["a/b c.qcow2", "100%.qcow2", "\u00e9/x", "a+b~c"])
def test_the_canonical_url_of_an_image_parses_back_to_it(key: str) -> None:
    image = ImageRef("b1b", key)
    assert parse_image_url(image.url, ENDPOINT) == image


def test_the_canonical_url_reads_plainly_for_ordinary_keys() -> None:
    assert ImageRef("vm-images", "ubuntu/24.04.qcow2").url == "s3://vm-images/ubuntu/24.04.qcow2"


# --- provision and fetch bodies

GOOD = {"image_url": "s3://vm-images/a.qcow2", "volume_name": "vm-1-root", "volume_size_gb": 10}


def test_a_provision_body_with_the_required_fields_gets_defaults() -> None:
    request = parse_provision(dict(GOOD), ENDPOINT)
    assert request == ProvisionRequest(
        image=ImageRef("vm-images", "a.qcow2"), image_url="s3://vm-images/a.qcow2",
        image_type="qcow2", named_host=None, volume_name="vm-1-root", volume_size_gb=10,
        correlation_id=None)
    assert request.volume_size == 10 * 1024**3


def test_a_provision_body_keeps_its_optional_fields_and_ignores_unknown_ones() -> None:
    body = {**GOOD, "image_type": "raw", "correlation_id": "deploy/42:a@b+c", "extra": [1]}
    request = parse_provision(body, ENDPOINT)
    assert (request.image_type, request.correlation_id) == ("raw", "deploy/42:a@b+c")


@pytest.mark.parametrize(("size", "parsed"), [(1, 1), (65536, 65536), (10.0, 10)])
def test_the_volume_size_is_a_whole_number_of_gib(size: object, parsed: int) -> None:
    assert parse_provision({**GOOD, "volume_size_gb": size}, ENDPOINT).volume_size_gb == parsed


def test_null_optional_fields_mean_absent() -> None:
    request = parse_provision({**GOOD, "image_type": None, "correlation_id": None}, ENDPOINT)
    assert (request.image_type, request.correlation_id) == ("qcow2", None)


@pytest.mark.parametrize(("body", "field"), [
    pytest.param([GOOD], "body", id="a-list"),
    pytest.param("{}", "body", id="a-string"),
    pytest.param(None, "body", id="null"),
    pytest.param({k: v for k, v in GOOD.items() if k != "image_url"}, "image_url",
                 id="no-image-url"),
    pytest.param({**GOOD, "image_url": None}, "image_url", id="null-image-url"),
    pytest.param({**GOOD, "image_url": "s3://b1b/k.sha256"}, "image_url", id="sidecar-url"),
    pytest.param({k: v for k, v in GOOD.items() if k != "volume_name"}, "volume_name",
                 id="no-volume-name"),
    pytest.param({**GOOD, "volume_name": "../etc"}, "volume_name", id="traversal-volume"),
    pytest.param({**GOOD, "volume_name": 7}, "volume_name", id="numeric-volume"),
    pytest.param({k: v for k, v in GOOD.items() if k != "volume_size_gb"}, "volume_size_gb",
                 id="no-size"),
    pytest.param({**GOOD, "volume_size_gb": 0}, "volume_size_gb", id="size-zero"),
    pytest.param({**GOOD, "volume_size_gb": -1}, "volume_size_gb", id="size-negative"),
    pytest.param({**GOOD, "volume_size_gb": 65537}, "volume_size_gb", id="size-too-large"),
    pytest.param({**GOOD, "volume_size_gb": 10**100}, "volume_size_gb", id="size-huge"),
    pytest.param({**GOOD, "volume_size_gb": True}, "volume_size_gb", id="size-bool"),
    pytest.param({**GOOD, "volume_size_gb": 10.5}, "volume_size_gb", id="size-fraction"),
    pytest.param({**GOOD, "volume_size_gb": float("nan")}, "volume_size_gb", id="size-nan"),
    pytest.param({**GOOD, "volume_size_gb": float("inf")}, "volume_size_gb", id="size-inf"),
    pytest.param({**GOOD, "volume_size_gb": "10"}, "volume_size_gb", id="size-string"),
    pytest.param({**GOOD, "image_type": "vmdk"}, "image_type", id="other-type"),
    pytest.param({**GOOD, "image_type": "QCOW2"}, "image_type", id="type-uppercase"),
    pytest.param({**GOOD, "image_type": ["qcow2"]}, "image_type", id="type-list"),
    pytest.param({**GOOD, "correlation_id": ""}, "correlation_id", id="empty-correlation"),
    pytest.param({**GOOD, "correlation_id": "x" * 129}, "correlation_id",
                 id="long-correlation"),
    pytest.param({**GOOD, "correlation_id": "a b"}, "correlation_id", id="space-correlation"),
    pytest.param({**GOOD, "correlation_id": "a\nb"}, "correlation_id",
                 id="newline-correlation"),
    pytest.param({**GOOD, "correlation_id": 5}, "correlation_id", id="numeric-correlation"),
])
def test_a_bad_provision_body_is_refused_naming_the_field(body: object, field: str) -> None:
    with pytest.raises(BadRequest) as caught:
        parse_provision(body, ENDPOINT)
    assert caught.value.field == field


def test_a_fetch_body_needs_only_the_image_url() -> None:
    assert parse_fetch({"image_url": "http://127.0.0.1:9000/b1b/k.raw", "image_type": "raw"},
                       ENDPOINT) == FetchRequest(ImageRef("b1b", "k.raw"),
                                                 "http://127.0.0.1:9000/b1b/k.raw", "raw", None)
    with pytest.raises(BadRequest, match="image_url is required"):
        parse_fetch({}, ENDPOINT)
    with pytest.raises(BadRequest, match="image_url"):
        parse_fetch({"image_url": "ftp://10.0.0.1/b1b/k"}, ENDPOINT)


# --- names, keys, ids

@pytest.mark.parametrize("name", ["vm-1-root", "A", "a.b_c+d-e", "_x", "+x", "9", "x" * 127,
                                  "my_snapshot", "data_tdat"])
def test_a_plain_volume_name_is_accepted(name: str) -> None:
    assert check_volume_name(name) == name


@pytest.mark.parametrize("name", [
    pytest.param("", id="empty"),
    pytest.param(".", id="dot"),
    pytest.param("..", id="dotdot"),
    pytest.param(".hidden", id="leading-dot"),
    pytest.param("-x", id="leading-hyphen"),
    pytest.param("a/b", id="slash"),
    pytest.param("../x", id="traversal"),
    pytest.param("a b", id="space"),
    pytest.param("a\x00", id="nul"),
    pytest.param("a\n", id="trailing-newline"),
    pytest.param("\u00e9", id="non-ascii"),
    pytest.param("x" * 128, id="too-long"),
    pytest.param("snapshot1", id="lvm-snapshot-prefix"),
    pytest.param("pvmove0", id="lvm-pvmove-prefix"),
    pytest.param("root_tmeta", id="lvm-tmeta"),
    pytest.param("a_tdata_b", id="lvm-tdata-inside"),
    pytest.param("x_rimage_0", id="lvm-rimage"),
    pytest.param("x_mlog", id="lvm-mlog"),
    pytest.param("x_pmspare", id="lvm-pmspare"),
    pytest.param("x_vorigin", id="lvm-vorigin"),
    pytest.param("x_cdata", id="lvm-cdata"),
    pytest.param(None, id="null"),
    pytest.param(3, id="number"),
])
def test_a_bad_volume_name_is_refused(name: object) -> None:
    with pytest.raises(BadRequest) as caught:
        check_volume_name(name, "X-Volume-Name")
    assert caught.value.field == "X-Volume-Name"


def test_a_cache_key_is_64_lowercase_hex() -> None:
    assert check_cache_key(DIGEST) == DIGEST
    for bad in ["A" * 64, "a" * 63, "a" * 65, "g" * 64, "../" + "a" * 61, "a" * 64 + "\n", ""]:
        with pytest.raises(BadRequest) as caught:
            check_cache_key(bad)
        assert caught.value.field == "sha256"


def test_a_job_id_is_a_lowercase_canonical_uuid() -> None:
    good = "0f8fad5b-d9cb-469f-a165-70867728950e"
    assert check_job_id(good) == good
    for bad in [good.upper(), good.replace("-", ""), "{" + good + "}", good + "\n", "../x", ""]:
        with pytest.raises(BadRequest) as caught:
            check_job_id(bad)
        assert caught.value.field == "job_id"


# --- upload headers

def test_upload_headers_name_the_volume_and_default_the_pool() -> None:
    headers = {"x-volume-name": "seed-1.iso", "content-length": "4096"}
    assert parse_upload_headers(headers, max_bytes=1 << 30) == UploadRequest(
        "seed-1.iso", "cloud-init", 4096)
    headers = {"X-Volume-Name": "seed", "X-Pool-Name": "isos", "Content-Length": "1"}
    assert parse_upload_headers(headers, max_bytes=1).pool == "isos"


class MultiHeaders(dict[str, str]):
    """A header mapping that, like a real request's, can hold one name twice."""

    def __init__(self, pairs: list[tuple[str, str]]) -> None:
        super().__init__(pairs)
        self._pairs = pairs

    def items(self) -> Any:
        return list(self._pairs)


@pytest.mark.parametrize(("headers", "field"), [
    pytest.param({"Content-Length": "10"}, "X-Volume-Name", id="no-volume"),
    pytest.param({"X-Volume-Name": "../x", "Content-Length": "10"}, "X-Volume-Name",
                 id="bad-volume"),
    pytest.param({"X-Volume-Name": "v", "X-Pool-Name": "a/b", "Content-Length": "10"},
                 "X-Pool-Name", id="bad-pool"),
    pytest.param({"X-Volume-Name": "v", "X-Pool-Name": "", "Content-Length": "10"},
                 "X-Pool-Name", id="empty-pool"),
    pytest.param({"X-Volume-Name": "v"}, "Content-Length", id="no-length"),
    pytest.param({"X-Volume-Name": "v", "Transfer-Encoding": "chunked"}, "Content-Length",
                 id="chunked"),
    pytest.param({"X-Volume-Name": "v", "Transfer-Encoding": "chunked", "Content-Length": "5"},
                 "Content-Length", id="chunked-and-length"),
    pytest.param({"X-Volume-Name": "v", "Content-Length": "0"}, "Content-Length", id="empty"),
    pytest.param({"X-Volume-Name": "v", "Content-Length": "-1"}, "Content-Length",
                 id="negative"),
    pytest.param({"X-Volume-Name": "v", "Content-Length": "+5"}, "Content-Length", id="plus"),
    pytest.param({"X-Volume-Name": "v", "Content-Length": "0x10"}, "Content-Length", id="hex"),
    pytest.param({"X-Volume-Name": "v", "Content-Length": "1e3"}, "Content-Length", id="float"),
    pytest.param({"X-Volume-Name": "v", "Content-Length": "5, 5"}, "Content-Length",
                 id="list"),
    pytest.param({"X-Volume-Name": "v", "Content-Length": "\uff15"}, "Content-Length",
                 id="non-ascii-digit"),
    pytest.param({"X-Volume-Name": "v", "Content-Length": "9" * 40}, "Content-Length",
                 id="absurd"),
    pytest.param(MultiHeaders([("X-Volume-Name", "v"), ("Content-Length", "5"),
                               ("content-length", "6")]), "Content-Length",
                 id="repeated-length"),
    pytest.param(MultiHeaders([("X-Volume-Name", "a"), ("X-Volume-Name", "b"),
                               ("Content-Length", "5")]), "X-Volume-Name",
                 id="repeated-volume"),
])
def test_bad_upload_headers_are_refused_naming_the_header(
    headers: dict[str, str], field: str,
) -> None:
    with pytest.raises(BadRequest) as caught:
        parse_upload_headers(headers, max_bytes=1 << 30)
    assert caught.value.field == field
    assert not isinstance(caught.value, BodyTooLarge)


def test_an_upload_over_the_limit_is_too_large_rather_than_bad() -> None:
    headers = {"X-Volume-Name": "v", "Content-Length": "1025"}
    with pytest.raises(BodyTooLarge, match="Content-Length is 1025 bytes; at most 1024"):
        parse_upload_headers(headers, max_bytes=1024)
    assert parse_upload_headers({**headers, "Content-Length": "1024"}, max_bytes=1024)


def test_a_chunked_upload_is_refused_with_a_clear_message() -> None:
    with pytest.raises(BadRequest, match="not chunked"):
        parse_upload_headers({"X-Volume-Name": "v", "Transfer-Encoding": "chunked"},
                             max_bytes=10)


# --- paging

@pytest.mark.parametrize(("query", "paging"), [
    ({}, (0, 100)),
    ({"offset": "", "limit": ""}, (0, 100)),
    ({"offset": "20", "limit": "5"}, (20, 5)),
    ({"limit": "1000"}, (0, 1000)),
    ({"limit": "1"}, (0, 1)),
])
def test_paging_has_defaults_and_bounds(query: dict[str, str], paging: tuple[int, int]) -> None:
    assert parse_paging(query) == paging


@pytest.mark.parametrize(("query", "field"), [
    ({"offset": "-1"}, "offset"),
    ({"offset": "1.5"}, "offset"),
    ({"offset": "x"}, "offset"),
    ({"offset": "9" * 30}, "offset"),
    ({"limit": "0"}, "limit"),
    ({"limit": "1001"}, "limit"),
    ({"limit": " 5"}, "limit"),
])
def test_bad_paging_is_refused(query: dict[str, str], field: str) -> None:
    with pytest.raises(BadRequest) as caught:
        parse_paging(query)
    assert caught.value.field == field


# --- the OpenAPI document describes these rules and every route

OPENAPI = Path(__file__).resolve().parents[2] / "watcher" / "http" / "openapi.json"
ROUTES = {
    ("get", "/health"), ("get", "/healthz"), ("get", "/livez"), ("get", "/metrics"),
    ("get", "/api/v1/openapi.json"),
    ("post", "/api/v1/jobs"), ("post", "/api/v1/provision"),
    ("get", "/api/v1/jobs/{job_id}"), ("get", "/api/v1/status/{job_id}"),
    ("post", "/api/v1/jobs/{job_id}/cancel"), ("delete", "/api/v1/cancel/{job_id}"),
    ("get", "/api/v1/cache/images"), ("post", "/api/v1/cache/fetch"),
    ("delete", "/api/v1/cache/images/{sha256}"), ("put", "/volumes/upload-content"),
}
OPEN_ROUTES = {"/health", "/healthz", "/livez", "/metrics"}


@pytest.fixture(scope="module")
def openapi() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(OPENAPI.read_text())
    return document


def _resolve(document: dict[str, Any], node: Any) -> Any:
    while isinstance(node, dict) and "$ref" in node:
        target: Any = document
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        own = [node["$ref"]] if "$ref" in node else []
        return own + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def _operations(document: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(method, path, operation) for path, item in document["paths"].items()
            for method, operation in item.items()]


def test_the_document_has_exactly_the_routes_of_the_api(openapi: dict[str, Any]) -> None:
    assert {(method, path) for method, path, _ in _operations(openapi)} == ROUTES


def test_every_reference_in_the_document_resolves(openapi: dict[str, Any]) -> None:
    refs = _refs(openapi)
    assert refs
    for ref in refs:
        assert ref.startswith("#/")
        assert _resolve(openapi, {"$ref": ref}) is not None, ref


def test_every_response_carries_the_request_id_and_errors_have_one_shape(
    openapi: dict[str, Any],
) -> None:
    error = {"$ref": "#/components/schemas/Error"}
    for method, path, operation in _operations(openapi):
        for status, response in operation["responses"].items():
            response = _resolve(openapi, response)
            assert "X-Request-ID" in response["headers"], (method, path, status)
            if int(status) >= 400:
                assert response["content"]["application/json"]["schema"] == error
    assert _resolve(openapi, error)["required"] == ["error", "message", "code"]


def test_only_health_and_metrics_are_open(openapi: dict[str, Any]) -> None:
    schemes = set(openapi["components"]["securitySchemes"])
    assert [next(iter(s)) for s in openapi["security"]] == ["bearer", "apiToken"]
    assert schemes == {"bearer", "apiToken"}
    for _method, path, operation in _operations(openapi):
        if path in OPEN_ROUTES:
            assert operation["security"] == []
        else:
            assert "security" not in operation
            assert {"401", "500"} <= set(operation["responses"]), path
            assert "403" not in operation["responses"], path  # a wrong token is 401 too
            unauthorized = _resolve(openapi, operation["responses"]["401"])
            assert "WWW-Authenticate" in unauthorized["headers"], path


def test_the_documented_body_rules_are_the_ones_enforced(openapi: dict[str, Any]) -> None:
    schemas = openapi["components"]["schemas"]
    provision = schemas["ProvisionRequest"]["properties"]
    assert schemas["ProvisionRequest"]["required"] == ["image_url", "volume_name",
                                                      "volume_size_gb"]
    size = provision["volume_size_gb"]
    assert (size["type"], size["minimum"], size["maximum"]) == ("integer", 1, MAX_VOLUME_SIZE_GB)
    # OpenAPI 3.0: nullable does not widen an enum, so null must be one of its values.
    assert provision["image_type"]["enum"] == [*IMAGE_TYPES, None]
    assert schemas["FetchRequest"]["properties"]["image_type"]["enum"] == [*IMAGE_TYPES, None]
    assert provision["image_url"]["maxLength"] == MAX_URL_LENGTH
    limit = openapi["components"]["parameters"]["Limit"]["schema"]
    assert (limit["maximum"], limit["default"]) == (MAX_LIMIT, DEFAULT_LIMIT)
    volume_pattern = re.compile(provision["volume_name"]["pattern"])
    for name in ["vm-1-root", "x" * 127, "x" * 128, "-x", ".x", "a/b", "a b", "+_.", "\u00e9"]:
        assert bool(volume_pattern.fullmatch(name)) == _accepted(check_volume_name, name), name
    correlation = re.compile(provision["correlation_id"]["pattern"])
    for value in ["deploy/42:a@b+c", "", "x" * 129, "a b", "a\nb", "a,b"]:
        assert bool(correlation.fullmatch(value)) == _accepted(
            lambda v: parse_provision({**GOOD, "correlation_id": v}, ENDPOINT), value), value
    job_id = re.compile(openapi["components"]["parameters"]["JobId"]["schema"]["pattern"])
    for value in [str(uuid.uuid4()), str(uuid.uuid4()).upper(), "x"]:
        assert bool(job_id.fullmatch(value)) == _accepted(check_job_id, value)


def _accepted(check: Any, value: object) -> bool:
    try:
        check(value)
    except BadRequest:
        return False
    return True


def test_the_document_is_valid_openapi(openapi: dict[str, Any]) -> None:
    validator = pytest.importorskip("openapi_spec_validator")
    validator.validate(openapi)
    assert openapi["openapi"] == "3.0.3"
