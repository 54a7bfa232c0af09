"""Real images made by qemu-img itself go through inspection and are written onto real targets."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Iterator
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
        # qemu-img times its LUKS key derivation from thread CPU usage, and on a busy
        # virtual machine that sometimes fails ("Unable to get accurate CPU usage").
        for _attempt in range(10):
            created = subprocess.run(
                ["qemu-img", "create", "-q", "-f", "qcow2", "--object", "secret,id=sec0,data=x",
                 "-o", "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
                 str(image), str(SIZE)], capture_output=True, text=True, timeout=60)
            if created.returncode == 0:
                break
        assert created.returncode == 0, created.stderr
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
