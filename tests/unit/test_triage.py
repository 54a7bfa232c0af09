"""Which bucket events ask for which images: a table over the pure decision."""

from __future__ import annotations

import pytest

from watcher.core.events import ObjectEvent
from watcher.core.policy import DomainRule, ImageSpec, PolicySet
from watcher.core.triage import WarmRequest, plan_warms

POLICIES = PolicySet(
    images={
        "ubuntu": ImageSpec("ubuntu", "vm-images", "ubuntu/noble.qcow2", None, "qcow2"),
        "debian": ImageSpec("debian", "vm-images", None, "debian/12/", "qcow2"),
        "other-bucket": ImageSpec("other-bucket", "elsewhere", "ubuntu/noble.qcow2", None, "raw"),
    },
    rules=(DomainRule("web-*", "ubuntu"),),
)


def created(bucket: str, key: str) -> ObjectEvent:
    return ObjectEvent("s3:ObjectCreated:Put", bucket, key, 1, "e")


@pytest.mark.parametrize(
    ("events", "expected"),
    [
        pytest.param([created("vm-images", "ubuntu/noble.qcow2")],
                     [WarmRequest("ubuntu", "vm-images/ubuntu/noble.qcow2")], id="exact-key"),
        pytest.param([created("vm-images", "ubuntu/noble.qcow2.sha256")],
                     [WarmRequest("ubuntu", "vm-images/ubuntu/noble.qcow2.sha256")],
                     id="sidecar-of-exact-key"),
        pytest.param([created("vm-images", "debian/12/2026-11-01.qcow2")],
                     [WarmRequest("debian", "vm-images/debian/12/2026-11-01.qcow2")],
                     id="under-prefix"),
        pytest.param([created("vm-images", "debian/12/2026-11-01.qcow2.sha256")],
                     [WarmRequest("debian", "vm-images/debian/12/2026-11-01.qcow2.sha256")],
                     id="sidecar-under-prefix"),
        pytest.param([created("vm-images", "debian/11/old.qcow2")], [], id="outside-prefix"),
        pytest.param([created("vm-images", "ubuntu/noble.qcow2.bak")], [], id="similar-key"),
        pytest.param([created("unrelated", "ubuntu/noble.qcow2")], [], id="other-bucket-no-image"),
        pytest.param([created("elsewhere", "ubuntu/noble.qcow2")],
                     [WarmRequest("other-bucket", "elsewhere/ubuntu/noble.qcow2")],
                     id="same-key-other-bucket"),
        pytest.param([ObjectEvent("s3:ObjectRemoved:Delete", "vm-images", "ubuntu/noble.qcow2",
                                  None, None)], [], id="removal-ignored"),
        pytest.param([created("vm-images", "ubuntu/noble.qcow2"),
                      created("vm-images", "ubuntu/noble.qcow2.sha256")],
                     [WarmRequest("ubuntu", "vm-images/ubuntu/noble.qcow2")],
                     id="image-and-sidecar-in-one-message-warm-once"),
    ],
)
def test_plan_warms_asks_only_for_policy_images(
        events: list[ObjectEvent], expected: list[WarmRequest]) -> None:
    assert plan_warms(events, POLICIES) == expected


def test_every_defined_image_is_kept_warm_in_name_order() -> None:
    assert [i.name for i in POLICIES.images_to_keep_warm()] == ["debian", "other-bucket", "ubuntu"]
