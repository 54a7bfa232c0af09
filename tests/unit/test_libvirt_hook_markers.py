"""The start interlock for volumes an API job writes: markers written by ``write_markers``
and read by the libvirt hook, which refuses a domain with a disk on a marked volume."""

from __future__ import annotations

import io
import json
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from watcher import libvirt_hook
from watcher.adapters import write_markers
from watcher.adapters.write_markers import VolumeMarked, marked_writing, stale_markers_removed


def domain(*disks: str) -> str:
    return f"<domain><name>web-1</name><devices>{''.join(disks)}</devices></domain>"


def file_disk(path: str | Path, device: str = "disk") -> str:
    return f"<disk type='file' device='{device}'><source file='{path}'/></disk>"


def block_disk(path: str | Path) -> str:
    return f"<disk type='block' device='disk'><source dev='{path}'/></disk>"


def volume_disk(pool: str, volume: str) -> str:
    return f"<disk type='volume' device='disk'><source pool='{pool}' volume='{volume}'/></disk>"


def dead_pid() -> int:
    """A pid no process can have: above the kernel's limit."""
    return int(Path("/proc/sys/kernel/pid_max").read_text()) + 1


def hook(domain_xml: str, directory: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[int, str]:
    monkeypatch.setenv(libvirt_hook.WRITING_DIR_ENV, str(directory))
    err = io.StringIO()
    status = libvirt_hook.main(["web-1", "prepare", "begin", "-"], io.StringIO(domain_xml), err)
    return status, err.getvalue()


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    path = tmp_path / "images" / "root.img"
    path.parent.mkdir()
    path.write_bytes(b"")
    return path


@pytest.fixture
def markers(tmp_path: Path) -> Path:
    return tmp_path / "writing"


# ---- the marker file ----------------------------------------------------------------------


def test_marker_is_named_by_the_path_hash_readable_by_all_and_gone_after_the_block(
        disk: Path, markers: Path) -> None:
    with marked_writing(str(disk), pool="api", volume="root.img", job_id="job-1",
                        directory=markers) as marker:
        assert marker == write_markers.marker_path(str(disk), markers)
        assert len(marker.stem) == 64 and marker.suffix == ".json"
        assert stat.S_IMODE(marker.stat().st_mode) == 0o644
        assert stat.S_IMODE(markers.stat().st_mode) == 0o755
        content = json.loads(marker.read_text())
        assert {k: content[k] for k in ("real_path", "pool", "volume", "job_id", "pid")} == {
            "real_path": str(disk), "pool": "api", "volume": "root.img", "job_id": "job-1",
            "pid": os.getpid()}
        assert content["started"].endswith("+00:00")
        assert content["pid_start_time"] == write_markers.process_start_time(os.getpid())
        assert os.listdir(markers) == [marker.name]  # no temp file left beside it
    assert os.listdir(markers) == []


def test_marker_is_removed_when_the_write_fails(disk: Path, markers: Path) -> None:
    with pytest.raises(RuntimeError), marked_writing(str(disk), pool=None, volume=None,
                                                     job_id="job-1", directory=markers):
        raise RuntimeError("write failed")
    assert os.listdir(markers) == []


def test_a_second_live_writer_of_the_same_path_is_refused(disk: Path, markers: Path) -> None:
    with marked_writing(str(disk), pool=None, volume=None, job_id="job-1", directory=markers):
        with pytest.raises(VolumeMarked, match="job-1"), marked_writing(
                str(disk), pool=None, volume=None, job_id="job-2", directory=markers):
            pass
        assert len(os.listdir(markers)) == 1


def write_foreign_marker(directory: Path, real_path: str, *, pid: int, start: int | None,
                         job_id: str = "old-job") -> Path:
    directory.mkdir(exist_ok=True)
    path = write_markers.marker_path(real_path, directory)
    path.write_text(json.dumps({"real_path": real_path, "pool": None, "volume": None,
                                "job_id": job_id, "started": "2024-01-01T00:00:00+00:00",
                                "pid": pid, "pid_start_time": start}))
    return path


def test_a_dead_writers_marker_is_replaced(disk: Path, markers: Path) -> None:
    write_foreign_marker(markers, str(disk), pid=dead_pid(), start=1)
    with marked_writing(str(disk), pool=None, volume=None, job_id="job-2",
                        directory=markers) as marker:
        assert json.loads(marker.read_text())["job_id"] == "job-2"


def test_start_up_removes_the_markers_and_temp_files_of_dead_writers_only(
        disk: Path, markers: Path, tmp_path: Path) -> None:
    me = os.getpid()
    live = write_foreign_marker(markers, str(disk), pid=me,
                                start=write_markers.process_start_time(me))
    write_foreign_marker(markers, str(tmp_path / "a"), pid=dead_pid(), start=1)
    write_foreign_marker(markers, str(tmp_path / "b"), pid=me, start=-1)  # pid reused
    (markers / "torn.json").write_text("{")
    (markers / f".tmp-{dead_pid()}-x").write_text("")
    (markers / f".tmp-{me}-y").write_text("")

    assert stale_markers_removed(markers) == 4
    assert sorted(os.listdir(markers)) == sorted([live.name, f".tmp-{me}-y"])
    assert stale_markers_removed(markers / "missing") == 0


# ---- the hook -----------------------------------------------------------------------------


def test_hook_refuses_a_domain_whose_file_disk_is_marked_naming_volume_and_job(
        disk: Path, markers: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with marked_writing(str(disk), pool="api", volume="root.img", job_id="job-7",
                        directory=markers):
        status, err = hook(domain(file_disk(disk)), markers, monkeypatch)
    assert status == 1
    assert "volume root.img of pool api" in err and "job job-7" in err
    assert hook(domain(file_disk(disk)), markers, monkeypatch) == (0, "")


@pytest.mark.parametrize("make_disk", [
    pytest.param(lambda p, link: file_disk(link), id="file-through-a-symlink"),
    pytest.param(lambda p, link: file_disk(p, device="cdrom"), id="cdrom"),
    pytest.param(lambda p, link: block_disk(p), id="block"),
    pytest.param(lambda p, link: volume_disk("api", "root.img"), id="volume-by-pool-and-name"),
    pytest.param(lambda p, link: (
        "<disk type='file' device='disk'><source file='/elsewhere/top.qcow2'/>"
        f"<backingStore type='file'><source file='{p}'/></backingStore></disk>"),
        id="backing-file"),
])
def test_hook_refuses_every_way_a_disk_can_be_on_the_marked_volume(
        make_disk: Callable[[Path, Path], str], disk: Path, markers: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    link = tmp_path / "link.img"
    link.symlink_to(disk)
    xml = domain(file_disk(tmp_path / "other.img"), make_disk(disk, link))
    with marked_writing(str(disk), pool="api", volume="root.img", job_id="job-7",
                        directory=markers):
        status, err = hook(xml, markers, monkeypatch)
    assert (status, "job job-7" in err) == (1, True)


def test_hook_allows_domains_on_other_disks_and_volumes(
        disk: Path, markers: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    xml = domain(file_disk(tmp_path / "other.img"), volume_disk("api", "other.img"),
                 volume_disk("elsewhere", "root.img"))
    with marked_writing(str(disk), pool="api", volume="root.img", job_id="job-7",
                        directory=markers):
        assert hook(xml, markers, monkeypatch) == (0, "")


def test_a_marker_without_pool_matches_only_by_path(
        disk: Path, markers: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with marked_writing(str(disk), pool=None, volume=None, job_id="job-7", directory=markers):
        assert hook(domain(volume_disk("api", "root.img")), markers, monkeypatch) == (0, "")
        status, err = hook(domain(block_disk(disk)), markers, monkeypatch)
    assert status == 1 and f"writing {disk} for job job-7" in err


@pytest.mark.parametrize(("pid", "start"), [
    pytest.param(None, 1, id="writer-dead"),
    pytest.param(os.getpid(), -1, id="pid-reused"),
])
def test_hook_ignores_a_marker_whose_writer_is_gone(
        pid: int | None, start: int, disk: Path, markers: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    write_foreign_marker(markers, str(disk), pid=pid or dead_pid(), start=start)
    assert hook(domain(file_disk(disk)), markers, monkeypatch) == (0, "")


def test_hook_counts_a_marker_of_another_live_process(
        disk: Path, markers: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    parent = os.getppid()
    write_foreign_marker(markers, str(disk), pid=parent,
                         start=libvirt_hook.process_start_time(parent), job_id="job-9")
    status, err = hook(domain(file_disk(disk)), markers, monkeypatch)
    assert status == 1 and "job job-9" in err


@pytest.mark.parametrize("content", ["{", "[]", '{"job_id": "x"}', '{"real_path": 3}'])
def test_hook_notes_and_ignores_a_malformed_marker(
        content: str, disk: Path, markers: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    markers.mkdir()
    (markers / "broken.json").write_text(content)
    (markers / ".tmp-1-partial").write_text("{")
    status, err = hook(domain(file_disk(disk)), markers, monkeypatch)
    assert status == 0
    assert "ignoring unreadable marker" in err and "broken.json" in err
    assert ".tmp-" not in err


def test_hook_allows_the_start_when_the_markers_cannot_be_checked(
        disk: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    status, err = hook(domain(file_disk(disk)), not_a_dir, monkeypatch)
    assert status == 0 and "ignoring its markers" in err
    assert hook(domain(file_disk(disk)), tmp_path / "missing", monkeypatch) == (0, "")


def test_the_hook_reads_the_marker_directory_the_writer_uses_by_default(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(libvirt_hook.WRITING_DIR_ENV, raising=False)
    assert libvirt_hook.writing_dir() == str(write_markers.WRITING_DIR)


@pytest.mark.parametrize("xml", [
    pytest.param("<domain><metadata><vw:provisioning xmlns:vw='urn:other:1' image='u'/>"
                 "</metadata></domain>", id="same-name-other-namespace"),
    pytest.param("<domain><devices><disk type='file'><mirror type='file'><source file='DISK'/>"
                 "</mirror><source file='/elsewhere'/></disk></devices></domain>",
                 id="a-mirror-is-not-the-disk"),
    pytest.param("<domain><devices><hostdev><source file='DISK'/></hostdev></devices>"
                 "</domain>", id="not-a-disk"),
    pytest.param("<domain><metadata><devices><disk type='file'><source file='DISK'/></disk>"
                 "</devices></metadata></domain>", id="disk-inside-metadata"),
])
def test_the_hook_reads_only_the_elements_libvirt_means(
        xml: str, disk: Path, markers: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with marked_writing(str(disk), pool="api", volume="root.img", job_id="job-7",
                        directory=markers):
        assert hook(xml.replace("DISK", str(disk)), markers, monkeypatch) == (0, "")


def test_the_hook_follows_a_backing_chain_to_any_depth(
        disk: Path, markers: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    chain = (f"<disk type='file'><source file='/a'/><backingStore type='file'>"
             f"<source file='/b'/><backingStore type='block'><source dev='{disk}'/>"
             f"<backingStore/></backingStore></backingStore></disk>")
    with marked_writing(str(disk), pool="api", volume="root.img", job_id="job-7",
                        directory=markers):
        assert hook(domain(chain), markers, monkeypatch)[0] == 1
