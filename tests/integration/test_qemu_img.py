"""Real images made by qemu-img itself go through inspection and are written onto real targets.

Foreign formats are made by ``qemu-img create`` where it can make them and by hand
(bochs, cloop, dmg) where it cannot. The hand-made bochs and cloop images are checked to be
what QEMU itself probes them as; the dmg sample is only data and a ``koly`` trailer, since
QEMU recognises dmg by file name and our cache names files by digest.
"""

from __future__ import annotations

import asyncio
import json
import os
import struct
import subprocess
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from watcher.adapters.qemu_img import (
    QemuImgLimits,
    convert_argv,
    inspect_image_file,
    qemu_img_info,
    write_image,
)
from watcher.core.errors import ImageRejected, ImageWriteError
from watcher.core.inspect import HEADER_BYTES
from watcher.core.policy import ImageFormat

MiB = 1024 * 1024
SIZE = 4 * MiB

integration = pytest.mark.integration


def run(*argv: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in argv], check=True, capture_output=True, text=True,
                          timeout=60)


def make_qcow2(path: Path, *options: str) -> Path:
    """A qcow2 of SIZE bytes with a recognisable pattern in its first 3 MiB."""
    run("qemu-img", "create", "-q", "-f", "qcow2", *options, path, str(SIZE))
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 1M", "-c", "write -P 0xa5 2M 1M", path)
    return path


def create_with_luks(*argv: str | Path) -> None:
    """Run a ``qemu-img create`` that sets up LUKS encryption, retrying its spurious failure.

    qemu-img times its LUKS key derivation from thread CPU usage, and on a busy virtual
    machine that sometimes fails ("Unable to get accurate CPU usage").
    """
    for _attempt in range(10):
        created = subprocess.run([str(a) for a in argv], capture_output=True, text=True,
                                 timeout=60, check=False)
        if created.returncode == 0:
            return
    raise AssertionError(created.stderr)


def probed_format(path: Path) -> object:
    """The format QEMU itself guesses for ``path`` when it is not told one."""
    return json.loads(run("qemu-img", "info", "--output=json", path).stdout)["format"]


def make_raw(path: Path, size: int = SIZE) -> Path:
    with path.open("wb") as handle:
        handle.write(b"\x11" * MiB)
        handle.truncate(size)
    return path


@pytest.fixture
def qcow2_image(tmp_path: Path) -> Path:
    return make_qcow2(tmp_path / "plain.qcow2")


@pytest.fixture
def qcow2_renamed_raw(qcow2_image: Path) -> Path:
    return qcow2_image.rename(qcow2_image.with_suffix(".raw"))


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB loop block device, always detached afterwards."""
    backing = tmp_path / "loop.img"
    backing.write_bytes(b"\xff" * SIZE)
    device = Path(run("losetup", "--find", "--show", backing).stdout.strip())
    try:
        yield device
    finally:
        subprocess.run(["losetup", "--detach", str(device)], check=False, timeout=30)


def assert_same_content(source: Path, source_format: str, target: Path) -> None:
    result = subprocess.run(["qemu-img", "compare", "-f", source_format, "-F", "raw",
                             str(source), str(target)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def child_qemu_img_pids() -> list[int]:
    """qemu-img processes whose parent is this test process."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        if comm == "qemu-img" and ppid == os.getpid():
            pids.append(int(entry.name))
    return pids


@integration
class TestInspectRealImages:
    async def test_plain_qcow2_is_accepted(self, qcow2_image: Path) -> None:
        facts = await inspect_image_file(qcow2_image, "qcow2")
        assert facts.format == "qcow2"
        assert facts.virtual_size == SIZE
        assert facts.cluster_size == 65536
        assert facts.qcow2_version == 3
        assert facts.actual_size is not None and facts.actual_size > 0

    async def test_compressed_qcow2_is_accepted(self, tmp_path: Path) -> None:
        source = make_raw(tmp_path / "source.raw")
        compressed = tmp_path / "compressed.qcow2"
        run("qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", source, compressed)
        facts = await inspect_image_file(compressed, "qcow2")
        assert (facts.format, facts.virtual_size, facts.compression_type) == (
            "qcow2", SIZE, "zlib")

    async def test_raw_image_is_accepted(self, tmp_path: Path) -> None:
        facts = await inspect_image_file(make_raw(tmp_path / "disk.raw"), "raw")
        assert (facts.format, facts.virtual_size, facts.cluster_size) == ("raw", SIZE, None)

    async def test_qcow2_with_backing_file_is_rejected(self, tmp_path: Path) -> None:
        make_raw(tmp_path / "base.raw")
        child = tmp_path / "child.qcow2"
        run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", child)
        with pytest.raises(ImageRejected) as caught:
            await inspect_image_file(child, "qcow2")
        assert caught.value.reason == "backing_file"
        assert "'base.raw'" in str(caught.value)

    async def test_qcow2_with_external_data_file_is_rejected(self, tmp_path: Path) -> None:
        image = tmp_path / "split.qcow2"
        data_file = tmp_path / "split.data"
        run("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"data_file={data_file}", image,
            str(SIZE))
        with pytest.raises(ImageRejected) as caught:
            await inspect_image_file(image, "qcow2")
        assert caught.value.reason == "data_file"
        assert f"'{data_file}'" in str(caught.value)

    async def test_encrypted_qcow2_is_rejected(self, tmp_path: Path) -> None:
        image = tmp_path / "secret.qcow2"
        create_with_luks(
            "qemu-img", "create", "-q", "-f", "qcow2", "--object", "secret,id=sec0,data=x",
            "-o", "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
            image, str(SIZE))
        with pytest.raises(ImageRejected) as caught:
            await inspect_image_file(image, "qcow2")
        assert caught.value.reason == "encrypted"

    async def test_qcow2_declared_raw_is_rejected(self, qcow2_renamed_raw: Path) -> None:
        with pytest.raises(ImageRejected) as caught:
            await inspect_image_file(qcow2_renamed_raw, "raw")
        assert caught.value.reason == "format_mismatch"

    async def test_raw_declared_qcow2_is_rejected(self, tmp_path: Path) -> None:
        with pytest.raises(ImageRejected) as caught:
            await inspect_image_file(make_raw(tmp_path / "disk.qcow2"), "qcow2")
        assert caught.value.reason == "format_mismatch"

    @pytest.mark.parametrize("keep_bytes", [pytest.param(100, id="inside-header"),
                                            pytest.param(128 * 1024, id="before-l1-table")])
    async def test_truncated_qcow2_is_rejected(self, qcow2_image: Path, keep_bytes: int) -> None:
        os.truncate(qcow2_image, keep_bytes)
        with pytest.raises(ImageRejected) as caught:
            await inspect_image_file(qcow2_image, "qcow2")
        assert caught.value.reason == "bad_header"

    async def test_info_under_a_tiny_address_space_fails_cleanly(self, qcow2_image: Path) -> None:
        with pytest.raises(ImageRejected) as caught:
            await qemu_img_info(qcow2_image, "qcow2", QemuImgLimits(address_space=16 * MiB))
        assert caught.value.reason == "qemu_img_failed"
        assert "qemu-img info" in str(caught.value)
        assert "16777216 bytes of memory" in str(caught.value)

    async def test_info_that_hangs_is_stopped_by_the_wall_clock_limit(
        self, tmp_path: Path,
    ) -> None:
        # qemu-img blocks opening a FIFO nobody writes to.
        fifo = tmp_path / "stuck.fifo"
        os.mkfifo(fifo)
        with pytest.raises(ImageRejected) as caught:
            await qemu_img_info(fifo, "raw", QemuImgLimits(wall_seconds=0.5))
        assert caught.value.reason == "qemu_img_failed"
        assert "did not finish within 0.5 s" in str(caught.value)
        assert child_qemu_img_pids() == []

    async def test_a_fifo_in_place_of_an_image_is_rejected_without_hanging(
        self, tmp_path: Path,
    ) -> None:
        fifo = tmp_path / "image.qcow2"
        os.mkfifo(fifo)
        with pytest.raises(ImageRejected) as caught:
            await asyncio.wait_for(inspect_image_file(fifo, "qcow2"), timeout=5)
        assert caught.value.reason == "not_a_file"

    async def test_info_with_default_limits_reports_the_image(self, qcow2_image: Path) -> None:
        info = await qemu_img_info(qcow2_image, "qcow2")
        assert (info["format"], info["virtual-size"]) == ("qcow2", SIZE)

    async def test_info_on_a_missing_file_reports_qemu_img_stderr(self, tmp_path: Path) -> None:
        with pytest.raises(ImageRejected) as caught:
            await qemu_img_info(tmp_path / "nothing.qcow2", "qcow2")
        assert caught.value.reason == "qemu_img_failed"
        assert "exited with code 1" in str(caught.value)
        assert "No such file or directory" in str(caught.value)

def bochs_image(path: Path) -> Path:
    """A growing Bochs image of SIZE bytes with nothing allocated, as QEMU reads one."""
    extent = 64 * 1024
    header = (b"Bochs Virtual HD Image".ljust(32, b"\0") + b"Redolog".ljust(16, b"\0")
              + b"Growing".ljust(16, b"\0") + struct.pack("<II", 0x00020000, 512)
              + struct.pack("<IIIIQ", SIZE // extent, 512, extent, 0, SIZE))
    path.write_bytes(header.ljust(512, b"\0") + b"\xff\xff\xff\xff" * (SIZE // extent))
    return path


def cloop_image(path: Path) -> Path:
    """A version 2 cloop image holding one compressed 64 KiB block of zeros."""
    block = zlib.compress(bytes(64 * 1024))
    header = (b"#!/bin/sh\n#V2.0 Format\n"
              b"modprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n").ljust(128, b"\0")
    header += struct.pack(">II", 64 * 1024, 1)
    start = len(header) + 16
    path.write_bytes(header + struct.pack(">QQ", start, start + len(block)) + block)
    return path


def dmg_image(path: Path) -> Path:
    """Data followed by a DMG ``koly`` trailer, placed beyond the header QEMU or we read."""
    koly = b"koly" + struct.pack(">III", 4, 512, 1)
    with path.open("wb") as handle:
        handle.write(b"\x11" * MiB)
        handle.truncate(HEADER_BYTES + MiB)
        handle.seek(0, os.SEEK_END)
        handle.write(koly.ljust(512, b"\0"))
    return path


QEMU_IMG_FORMATS = [
    pytest.param("vmdk", (), "vmdk", id="vmdk-monolithic-sparse"),
    pytest.param("vmdk", ("-o", "subformat=streamOptimized"), "vmdk", id="vmdk-stream-optimized"),
    pytest.param("vdi", (), "vdi", id="vdi"),
    pytest.param("vhdx", (), "vhdx", id="vhdx"),
    pytest.param("vpc", (), "vpc", id="vpc-dynamic"),
    pytest.param("vpc", ("-o", "subformat=fixed"), "vpc", id="vpc-fixed"),
    pytest.param("qed", (), "qed", id="qed"),
    pytest.param("parallels", (), "parallels", id="parallels"),
]

DESCRIPTOR_PREFIXES = [
    pytest.param("# Exported by the image pipeline\n# build 42\n", True, id="after-comments"),
    pytest.param("\n", False, id="after-an-empty-line"),
    pytest.param("#!\r\n  \r\n", True, id="after-crlf-lines"),
]


@integration
class TestForeignFormatsDeclaredRaw:
    """A file declared raw that any format QEMU can probe recognises is refused."""

    @pytest.mark.parametrize(("fmt", "options", "detected"), QEMU_IMG_FORMATS)
    async def test_an_image_made_by_qemu_img_is_refused(
        self, tmp_path: Path, fmt: str, options: tuple[str, ...], detected: str,
    ) -> None:
        image = tmp_path / "disk.raw"
        run("qemu-img", "create", "-q", "-f", fmt, *options, image, str(SIZE))
        run("qemu-img", "info", "-f", fmt, image)  # QEMU opens it as that format
        with pytest.raises(ImageRejected) as caught:
            await inspect_image_file(image, "raw")
        assert caught.value.reason == "format_mismatch"
        assert f"that of a {detected} image" in str(caught.value)

    async def test_a_luks_image_is_refused(self, tmp_path: Path) -> None:
        image = tmp_path / "disk.raw"
        create_with_luks("qemu-img", "create", "-q", "-f", "luks",
                         "--object", "secret,id=sec0,data=x",
                         "-o", "key-secret=sec0,iter-time=10", image, str(SIZE))
        with pytest.raises(ImageRejected) as caught:
            await inspect_image_file(image, "raw")
        assert caught.value.reason == "format_mismatch"
        assert "that of a luks image" in str(caught.value)

    @pytest.mark.parametrize(("prefix", "qemu_probes_it"), DESCRIPTOR_PREFIXES)
    async def test_a_flat_vmdk_descriptor_not_on_the_first_line_is_refused(
        self, tmp_path: Path, prefix: str, qemu_probes_it: bool,
    ) -> None:
        """The descriptor points QEMU at another file, whatever lines come before it."""
        descriptor = tmp_path / "made.vmdk"
        run("qemu-img", "create", "-q", "-f", "vmdk", "-o", "subformat=monolithicFlat",
            descriptor, str(SIZE))
        image = tmp_path / "disk.raw"
        image.write_text(prefix + descriptor.read_text())
        # QEMU's vmdk driver follows the extent; its probe sees it too unless a bare
        # empty line comes first.
        assert json.loads(run("qemu-img", "info", "--output=json", "-f", "vmdk", image).stdout)[
            "format-specific"]["data"]["create-type"] == "monolithicFlat"
        assert (probed_format(image) == "vmdk") is qemu_probes_it
        with pytest.raises(ImageRejected) as caught:
            await inspect_image_file(image, "raw")
        assert caught.value.reason == "format_mismatch"
        assert "that of a vmdk image" in str(caught.value)

    @pytest.mark.parametrize(("make", "detected"), [
        pytest.param(bochs_image, "bochs", id="bochs"),
        pytest.param(cloop_image, "cloop", id="cloop"),
    ])
    async def test_a_hand_made_image_qemu_would_probe_is_refused(
        self, tmp_path: Path, make: Callable[[Path], Path], detected: str,
    ) -> None:
        image = make(tmp_path / "disk.raw")
        assert probed_format(image) == detected
        with pytest.raises(ImageRejected) as caught:
            await inspect_image_file(image, "raw")
        assert caught.value.reason == "format_mismatch"
        assert f"its header is that of a {detected} image" in str(caught.value)

    async def test_a_dmg_trailer_beyond_the_header_is_refused(self, tmp_path: Path) -> None:
        image = dmg_image(tmp_path / "disk.raw")
        with pytest.raises(ImageRejected) as caught:
            await inspect_image_file(image, "raw")
        assert caught.value.reason == "format_mismatch"
        assert "its trailer is that of a dmg image" in str(caught.value)

    async def test_a_fixed_vhd_footer_beyond_the_header_is_refused(self, tmp_path: Path) -> None:
        """qemu-img probes a fixed VHD as raw; written raw it is harmless, but mislabelled."""
        image = tmp_path / "disk.raw"
        run("qemu-img", "create", "-q", "-f", "vpc", "-o", "subformat=fixed", image, str(SIZE))
        assert image.stat().st_size > HEADER_BYTES
        with pytest.raises(ImageRejected) as caught:
            await inspect_image_file(image, "raw")
        assert "its trailer is that of a vpc image" in str(caught.value)


@integration
class TestVirtualSizeLimit:
    async def test_a_one_pib_qcow2_is_refused_by_default(self, tmp_path: Path) -> None:
        image = tmp_path / "huge.qcow2"
        run("qemu-img", "create", "-q", "-f", "qcow2", image, "1P")
        with pytest.raises(ImageRejected) as caught:
            await inspect_image_file(image, "qcow2")
        assert caught.value.reason == "virtual_size"
        assert "1125899906842624 bytes" in str(caught.value)

    async def test_a_one_pib_qcow2_passes_the_header_checks_under_a_higher_limit(
        self, tmp_path: Path,
    ) -> None:
        image = tmp_path / "huge.qcow2"
        run("qemu-img", "create", "-q", "-f", "qcow2", image, "1P")
        facts = await inspect_image_file(image, "qcow2", max_virtual_size=2 * 1024**5)
        assert facts.virtual_size == 1024**5

    @pytest.mark.parametrize("fmt", ["qcow2", "raw"])
    async def test_an_image_above_a_configured_limit_is_refused(
        self, tmp_path: Path, fmt: ImageFormat,
    ) -> None:
        image = make_qcow2(tmp_path / "disk") if fmt == "qcow2" else make_raw(tmp_path / "disk")
        with pytest.raises(ImageRejected) as caught:
            await inspect_image_file(image, fmt, max_virtual_size=SIZE - 1)
        assert caught.value.reason == "virtual_size"

    async def test_an_image_at_the_limit_is_accepted(self, qcow2_image: Path) -> None:
        facts = await inspect_image_file(qcow2_image, "qcow2", max_virtual_size=SIZE)
        assert facts.virtual_size == SIZE


@integration
class TestWriteImage:
    async def test_qcow2_written_onto_a_file_matches_the_source(
        self, qcow2_image: Path, tmp_path: Path,
    ) -> None:
        target = tmp_path / "volume.raw"
        target.write_bytes(b"\xff" * SIZE)
        progress: list[float] = []
        await write_image(qcow2_image, "qcow2", target, on_progress=progress.append)
        assert_same_content(qcow2_image, "qcow2", target)
        assert progress, "no progress was reported"
        assert progress == sorted(set(progress))
        assert progress[-1] == 100.0

    async def test_qcow2_written_onto_a_zeroed_file_matches_the_source(
        self, qcow2_image: Path, tmp_path: Path,
    ) -> None:
        target = tmp_path / "fresh.raw"
        target.touch()
        os.truncate(target, SIZE)
        await write_image(qcow2_image, "qcow2", target, target_is_zero=True)
        assert_same_content(qcow2_image, "qcow2", target)

    async def test_qcow2_written_onto_a_block_device_matches_the_source(
        self, qcow2_image: Path, loop_device: Path,
    ) -> None:
        progress: list[float] = []
        await write_image(qcow2_image, "qcow2", loop_device, on_progress=progress.append)
        assert_same_content(qcow2_image, "qcow2", loop_device)
        assert progress[-1] == 100.0

    async def test_raw_written_onto_a_block_device_matches_the_source(
        self, tmp_path: Path, loop_device: Path,
    ) -> None:
        source = make_raw(tmp_path / "disk.raw")
        await write_image(source, "raw", loop_device)
        assert_same_content(source, "raw", loop_device)

    async def test_a_target_path_with_a_comma_is_written(
        self, qcow2_image: Path, tmp_path: Path,
    ) -> None:
        target = tmp_path / "vm,1=root.raw"
        target.write_bytes(b"\xff" * SIZE)
        await write_image(qcow2_image, "qcow2", target)
        assert_same_content(qcow2_image, "qcow2", target)

    async def test_zero_ranges_are_zeroed_in_place_not_punched_out(
        self, qcow2_image: Path, tmp_path: Path,
    ) -> None:
        """A volume that held data keeps its blocks: zero ranges are written, not freed."""
        target = tmp_path / "volume.raw"
        target.write_bytes(b"\xff" * SIZE)
        allocated_before = os.stat(target).st_blocks
        await write_image(qcow2_image, "qcow2", target)
        assert_same_content(qcow2_image, "qcow2", target)
        assert os.stat(target).st_blocks == allocated_before

    async def test_writing_onto_a_too_small_target_raises_with_exit_code_and_stderr(
        self, qcow2_image: Path, tmp_path: Path,
    ) -> None:
        target = make_raw(tmp_path / "small.raw", size=MiB)
        with pytest.raises(ImageWriteError) as caught:
            await write_image(qcow2_image, "qcow2", target)
        assert caught.value.device == str(target)
        assert caught.value.exit_code == 1
        assert "smaller than input" in caught.value.stderr
        assert caught.value.temporary is False

    async def test_writing_onto_a_missing_target_raises_with_exit_code_and_stderr(
        self, qcow2_image: Path, tmp_path: Path,
    ) -> None:
        target = tmp_path / "absent.raw"
        with pytest.raises(ImageWriteError) as caught:
            await write_image(qcow2_image, "qcow2", target)
        assert caught.value.exit_code == 1
        assert "No such file or directory" in caught.value.stderr
        assert "exit 1" in str(caught.value)
        assert not target.exists()

    async def test_cancelling_a_write_kills_and_reaps_qemu_img(self, tmp_path: Path) -> None:
        # qemu-img blocks opening a FIFO nobody writes to: a write that never ends.
        source = tmp_path / "stuck.fifo"
        os.mkfifo(source)
        target = make_raw(tmp_path / "volume.raw")
        task = asyncio.create_task(write_image(source, "raw", target))
        for _ in range(100):
            if child_qemu_img_pids():
                break
            await asyncio.sleep(0.05)
        assert child_qemu_img_pids(), "qemu-img never started"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert child_qemu_img_pids() == []


class TestConvertArgv:
    """The flags alone; no process is started."""

    def test_file_target_without_direct_io_uses_the_page_cache(self) -> None:
        argv = convert_argv(Path("/c/img"), "qcow2", Path("/v/disk"),
                            target_is_block=False, direct_io=False)
        assert argv == ["qemu-img", "convert", "-p", "-f", "qcow2", "-n", "-W",
                        "-t", "writeback", "--target-image-opts", "/c/img",
                        "driver=raw,file.driver=file,file.filename=/v/disk,"
                        "file.discard=ignore"]

    def test_block_target_gets_direct_io_and_the_host_device_driver(self) -> None:
        argv = convert_argv(Path("/c/img"), "raw", Path("/dev/vg/root"),
                            target_is_block=True, direct_io=True, target_is_zero=True)
        assert argv == ["qemu-img", "convert", "-p", "-f", "raw", "-n", "-W",
                        "-t", "none", "--target-is-zero", "--target-image-opts", "/c/img",
                        "driver=raw,file.driver=host_device,file.filename=/dev/vg/root,"
                        "file.discard=ignore"]

    def test_commas_in_the_target_path_are_escaped(self) -> None:
        argv = convert_argv(Path("/c/img"), "qcow2", Path("/v/a,b=c"),
                            target_is_block=False, direct_io=True)
        assert argv[-1] == ("driver=raw,file.driver=file,file.filename=/v/a,,b=c,"
                            "file.discard=ignore")

    def test_target_is_zero_always_comes_with_no_create(self) -> None:
        argv = convert_argv(Path("a"), "qcow2", Path("b"), target_is_block=False,
                            direct_io=True, target_is_zero=True)
        assert "--target-is-zero" in argv and "-n" in argv
