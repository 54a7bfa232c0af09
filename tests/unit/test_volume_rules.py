"""The allow-list decision over resolved root disks, as a table."""

from __future__ import annotations

import pytest

from watcher.core.volume_rules import VolumeIdentity, lv_paths, refusal

FILE = VolumeIdentity("/var/lib/libvirt/images/web1.img", "/var/lib/libvirt/images/web1.img",
                      pool_type="dir")
LINK = VolumeIdentity("/srv/vm/web1.img", "/etc/shadow")
LV = VolumeIdentity("/dev/vg0/web1-root", "/dev/dm-3", lv_paths("vg0", "web1-root"), "vg0")
LV_IN_POOL = VolumeIdentity("/dev/vg0/web1-root", "/dev/dm-3", lv_paths("vg0", "web1-root"),
                            "vg0", pool_type="logical")
LOOP = VolumeIdentity("/dev/loop7", "/dev/loop7")


@pytest.mark.parametrize(
    ("volume", "allow", "vgs", "allowed"),
    [
        pytest.param(FILE, ["/var/lib/libvirt/images/*"], [], True, id="file-matching-glob"),
        pytest.param(FILE, ["/srv/*"], [], False, id="file-outside-glob"),
        pytest.param(FILE, [], [], False, id="dir-pool-file-without-allow-list"),
        pytest.param(LINK, ["/srv/vm/*"], [], False, id="symlink-escaping-the-glob"),
        pytest.param(LV, ["/dev/vg0/*"], [], True, id="lv-by-canonical-path"),
        pytest.param(LV, ["/dev/mapper/vg0-web1--root"], [], True, id="lv-by-mapper-name"),
        pytest.param(LV, ["/dev/vg1/*"], [], False, id="lv-outside-glob"),
        pytest.param(LV, [], ["vg0"], True, id="lv-of-listed-vg"),
        pytest.param(LV, ["/dev/vg1/*"], ["vg0"], True, id="lv-of-listed-vg-beside-a-glob"),
        pytest.param(LV, [], ["vg1"], False, id="lv-of-unlisted-vg"),
        pytest.param(LV_IN_POOL, [], [], True, id="logical-pool-volume-by-default"),
        pytest.param(LV_IN_POOL, ["/srv/*"], [], False, id="logical-pool-not-enough-with-globs"),
        pytest.param(LOOP, ["/dev/loop*"], [], True, id="loop-device-allowed-by-glob"),
        pytest.param(LOOP, [], ["vg0"], False, id="non-lv-device-not-covered-by-vgs"),
    ],
)
def test_only_allowed_volumes_may_be_written(
        volume: VolumeIdentity, allow: list[str], vgs: list[str], allowed: bool) -> None:
    assert (refusal(volume, allow, vgs) is None) == allowed


def test_refusal_names_the_path_and_where_it_resolves() -> None:
    assert refusal(LINK, ["/srv/vm/*"], []) == (
        "root disk /srv/vm/web1.img (/etc/shadow) matches no volumes.allow pattern")
