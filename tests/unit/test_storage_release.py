"""node/storage.py: "unmounted" means the kernel no longer uses the disk, and the epoch write
never follows a symlink or opens a client-made entry below the mount point.

The epoch tests run on tmp_path (a plain directory stands in for the mount point; ext4 and xfs
support FS_IMMUTABLE_FL). The release tests on a real loop device need root, losetup, mkfs.ext4
and unshare, and are skipped otherwise.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import os
import shutil
import stat
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.takeover import MountStep
from node import storage as storage_mod
from node.storage import FS_IMMUTABLE_FL, FS_IOC_GETFLAGS, Storage, StorageError, device_in_use, set_immutable
from tests.unit.test_takeover_steps import FakeHost, ctx

# --- helpers ------------------------------------------------------------------------------------


def immutable(path: Path) -> bool:
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    try:
        buf = array.array("i", [0])
        fcntl.ioctl(fd, FS_IOC_GETFLAGS, buf, True)
        return bool(buf[0] & FS_IMMUTABLE_FL)
    finally:
        os.close(fd)


def unlock_all(top: Path) -> None:
    """Clear every immutable flag below `top` (never through a symlink), so pytest can delete it."""
    for dirpath, dirnames, filenames in os.walk(top):
        for name in [*dirnames, *filenames]:
            path = Path(dirpath) / name
            mode = os.lstat(path).st_mode
            if stat.S_ISDIR(mode) or stat.S_ISREG(mode):
                with contextlib.suppress(StorageError):
                    set_immutable(path, False)


def snapshot(top: Path) -> dict[str, object]:
    """Everything below `top` that could change: names, types, contents, immutable flags."""
    seen: dict[str, object] = {".": (stat.S_IFMT(os.lstat(top).st_mode), immutable(top))}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in [*dirnames, *filenames]:
            path = Path(dirpath) / name
            mode = os.lstat(path).st_mode
            content = path.read_bytes() if stat.S_ISREG(mode) else None
            flag = immutable(path) if stat.S_ISDIR(mode) or stat.S_ISREG(mode) else None
            seen[str(path.relative_to(top))] = (stat.S_IFMT(mode), content, flag)
    return seen


class Disk:
    """A VFS mount point on tmp_path (as a mount would be) and a sentinel directory outside it."""

    def __init__(self, tmp_path: Path) -> None:
        self.storage = Storage(tmp_path / "state")
        self.mnt = self.storage.mountpoint("home")
        self.mnt.mkdir(parents=True)
        self.meta = self.mnt / ".nfs-ha"
        self.outside = tmp_path / "outside"  # the server's own files: must never be touched
        self.outside.mkdir()
        (self.outside / "passwd").write_text("root:x:0:0\n")
        (self.outside / "epoch").write_text("999999\n")  # what a followed symlink would read
        self.before = snapshot(self.outside)

    def untouched(self) -> bool:
        return snapshot(self.outside) == self.before

    def invalid(self) -> list[Path]:
        return sorted(self.mnt.glob(".nfs-ha.invalid-*"))

    def written(self, epoch: int) -> bool:
        """Our layout: a real directory with a real epoch file, both immutable, and the subdirs."""
        epoch_file = self.meta / "epoch"
        return (stat.S_ISDIR(os.lstat(self.meta).st_mode) and stat.S_ISREG(os.lstat(epoch_file).st_mode)
                and epoch_file.read_text() == f"{epoch}\n" and immutable(self.meta) and immutable(epoch_file)
                and all(stat.S_ISDIR(os.lstat(self.meta / s).st_mode) for s in ("nfs-recovery", "statd"))
                and not (self.meta / "epoch.tmp").exists() and self.storage.read_epoch("home") == epoch)


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Disk]:
    d = Disk(tmp_path)
    probe = tmp_path / "probe"
    probe.write_text("")
    try:
        set_immutable(probe, True)
        set_immutable(probe, False)
    except StorageError as exc:
        pytest.skip(f"no FS_IMMUTABLE_FL on tmp_path here: {exc}")
    try:
        yield d
    finally:
        unlock_all(tmp_path)


# --- the epoch write: odd layouts a client may have made ----------------------------------------


def test_meta_dir_symlinked_out_of_the_mount_is_moved_aside_not_followed(disk: Disk) -> None:
    disk.meta.symlink_to(disk.outside)
    assert disk.storage.read_epoch("home") == 0  # not the 999999 behind the link
    disk.storage.write_epoch("home", 5)
    assert disk.written(5) and disk.untouched()
    [aside] = disk.invalid()
    assert os.readlink(aside) == str(disk.outside)  # the link itself moved, its target untouched


@pytest.mark.parametrize("make", [
    lambda d: d.meta.write_text("a client's file\n"),
    lambda d: d.meta.symlink_to(d.outside / "does-not-exist"),
    lambda d: d.meta.symlink_to(d.outside / "passwd"),
    lambda d: os.mkfifo(d.meta),
], ids=["regular-file", "dangling-symlink", "symlink-to-file", "fifo"])
def test_meta_of_the_wrong_type_is_moved_aside(disk: Disk, make) -> None:
    make(disk)
    kind = stat.S_IFMT(os.lstat(disk.meta).st_mode)
    assert disk.storage.read_epoch("home") == 0
    disk.storage.write_epoch("home", 6)
    assert disk.written(6) and disk.untouched()
    [aside] = disk.invalid()
    assert stat.S_IFMT(os.lstat(aside).st_mode) == kind


@pytest.mark.parametrize("make", [
    lambda d: (d.meta / "epoch").mkdir() or (d.meta / "epoch" / "junk").write_text("x"),
    lambda d: (d.meta / "epoch").symlink_to(d.outside / "epoch"),
    lambda d: (d.meta / "epoch").symlink_to(d.outside),
    lambda d: os.mkfifo(d.meta / "epoch"),
], ids=["directory", "symlink-to-file", "symlink-to-dir", "fifo"])
def test_epoch_of_the_wrong_type_reads_as_zero_and_is_moved_aside(disk: Disk, make) -> None:
    disk.meta.mkdir()
    make(disk)
    result: list[object] = []
    reader = threading.Thread(target=lambda: result.append(disk.storage.read_epoch("home")), daemon=True)
    reader.start()
    reader.join(5)  # a FIFO opened for reading would block here
    assert result == [0]
    disk.storage.write_epoch("home", 7)
    assert disk.written(7) and disk.untouched()
    assert len(disk.invalid()) == 1


@pytest.mark.parametrize("target", ["passwd", "new-file"])
def test_a_symlinked_leftover_tmp_file_is_not_written_through(disk: Disk, target: str) -> None:
    disk.meta.mkdir()
    (disk.meta / "epoch.tmp").symlink_to(disk.outside / target)
    disk.storage.write_epoch("home", 8)
    assert disk.written(8) and disk.untouched()  # passwd unchanged, no new-file created
    assert disk.invalid() == []  # a leftover tmp is just removed


def test_a_leftover_tmp_directory_is_moved_aside(disk: Disk) -> None:
    disk.meta.mkdir()
    (disk.meta / "epoch.tmp").mkdir()
    disk.storage.write_epoch("home", 9)
    assert disk.written(9) and len(disk.invalid()) == 1


@pytest.mark.parametrize("sub", ["nfs-recovery", "statd"])
def test_a_symlinked_server_directory_is_replaced(disk: Disk, sub: str) -> None:
    # The NFS servers write into these as root: a link out of the disk would take their writes along.
    disk.meta.mkdir()
    (disk.meta / sub).symlink_to(disk.outside)
    disk.storage.write_epoch("home", 10)
    assert disk.written(10) and disk.untouched()
    (disk.meta / sub / "record").write_text("client")  # stays writable, and on the disk
    assert not (disk.outside / "record").exists()
    [aside] = disk.invalid()
    assert aside.is_symlink()


def test_rewriting_our_own_layout_moves_nothing(disk: Disk) -> None:
    disk.storage.write_epoch("home", 11)
    (disk.meta / "nfs-recovery" / "client-record").write_text("kept")
    disk.storage.write_epoch("home", 12)
    assert disk.written(12) and disk.invalid() == []
    assert (disk.meta / "nfs-recovery" / "client-record").read_text() == "kept"


def test_a_client_swapping_the_directory_during_the_write_fails_it(disk: Disk, monkeypatch) -> None:
    """While `.nfs-ha` is writable a client renames it away and puts a symlink in its place: the
    write must notice (it would otherwise leave the epoch where nobody reads it)."""
    real = storage_mod._ensure_dir

    def racing_client(name, dir_fd, root_fd, shown):
        if name == "statd" and not (disk.mnt / "renamed").exists():
            os.rename(disk.meta, disk.mnt / "renamed")
            disk.meta.symlink_to(disk.outside)
        return real(name, dir_fd, root_fd, shown)

    monkeypatch.setattr(storage_mod, "_ensure_dir", racing_client)
    with pytest.raises(StorageError, match="was changed while the epoch was written"):
        disk.storage.write_epoch("home", 13)
    assert disk.untouched()
    assert immutable(disk.mnt / "renamed")  # left locked after the failure
    monkeypatch.setattr(storage_mod, "_ensure_dir", real)
    disk.storage.write_epoch("home", 14)  # the next takeover repairs it
    assert disk.written(14) and disk.untouched() and len(disk.invalid()) == 1


@pytest.mark.parametrize("content", [b"12x\n", "\u00b2\n".encode(), b"1" * 100 + b"\n", b""])
def test_an_epoch_file_that_is_not_a_number_is_refused(disk: Disk, content: bytes) -> None:
    disk.meta.mkdir()
    (disk.meta / "epoch").write_bytes(content)
    with pytest.raises(StorageError, match="not an epoch"):
        disk.storage.read_epoch("home")


def test_set_immutable_refuses_a_symlink(disk: Disk) -> None:
    link = disk.mnt / "link"
    link.symlink_to(disk.outside)
    with pytest.raises(StorageError, match="symlink"):
        set_immutable(link, True)
    assert disk.untouched()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")
def test_a_meta_dir_on_another_filesystem_is_refused(disk: Disk) -> None:
    disk.meta.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "nfsha-test", str(disk.meta)], check=True)
    try:
        with pytest.raises(StorageError, match="another filesystem"):
            disk.storage.write_epoch("home", 15)
        with pytest.raises(StorageError, match="another filesystem"):
            disk.storage.read_epoch("home")
        assert os.listdir(disk.meta) == []
    finally:
        subprocess.run(["umount", str(disk.meta)], check=True)


# --- release: the kernel must not use the device any more ---------------------------------------


def test_mount_step_down_passes_the_device() -> None:
    host = FakeHost()
    MountStep(host).down(ctx())  # type: ignore[arg-type]
    assert host.unmounted == ["/dev/loop3"]


def test_a_device_that_does_not_exist_is_not_in_use(tmp_path: Path) -> None:
    st = Storage(tmp_path)
    st.mountpoint("home").mkdir(parents=True)
    assert not device_in_use(str(tmp_path / "no-such-device"))
    st.unmount("home", str(tmp_path / "no-such-device"))


def test_a_path_that_is_not_a_block_device_cannot_be_checked(tmp_path: Path) -> None:
    st = Storage(tmp_path)
    st.mountpoint("home").mkdir(parents=True)
    (tmp_path / "image").write_bytes(b"\0" * 4096)
    with pytest.raises(StorageError, match="not a block device"):
        st.unmount("home", str(tmp_path / "image"))
    st.unmount("home")  # without a device (leftover cleanup): only the mount point counts


NEEDS = ("losetup", "mkfs.ext4", "unshare", "mount", "umount")
real_disk = pytest.mark.skipif(os.geteuid() != 0 or not all(shutil.which(c) for c in NEEDS),
                               reason="needs root, " + ", ".join(NEEDS))


@pytest.fixture
def loop(tmp_path: Path) -> Iterator[str]:
    """A 32 MB ext4 loop device, detached (by its name) afterwards."""
    image = tmp_path / "disk.img"
    with open(image, "wb") as fh:
        fh.truncate(32 << 20)
    device = subprocess.run(["losetup", "--find", "--show", str(image)], check=True, capture_output=True,
                            text=True).stdout.strip()
    try:
        subprocess.run(["mkfs.ext4", "-q", device], check=True, capture_output=True)
        yield device
    finally:
        subprocess.run(["losetup", "-d", device], check=False)


@contextlib.contextmanager
def mounted_in_another_namespace(device: str, point: Path, net: bool = False) -> Iterator[subprocess.Popen[str]]:
    """`device` mounted at `point` in a new mount namespace (and network namespace: `net`, which
    makes it "another node" in the lab's sense) kept alive by a process of its own."""
    point.mkdir(parents=True, exist_ok=True)
    namespaces = ["--mount", "--net"] if net else ["--mount"]
    proc = subprocess.Popen(["unshare", *namespaces, "--propagation", "private", "sh", "-c",
                             'mount -- "$0" "$1" && echo ready && exec sleep 60', device, str(point)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield proc
    finally:
        proc.kill()
        proc.wait()


@real_disk
def test_plain_unmount_releases_the_device(tmp_path: Path, loop: str) -> None:
    st = Storage(tmp_path)
    st.mount("home", loop, "ext4", ())
    try:
        assert device_in_use(loop)
        st.unmount("home", loop)
        assert st.mounted("home") is False and not device_in_use(loop)
    finally:
        subprocess.run(["umount", str(st.mountpoint("home"))], check=False, capture_output=True)


@real_disk
def test_a_mount_in_another_namespace_is_not_released(tmp_path: Path, loop: str) -> None:
    pauses: list[float] = []
    st = Storage(tmp_path, sleep=pauses.append)
    st.mountpoint("home").mkdir(parents=True)
    with mounted_in_another_namespace(loop, tmp_path / "other") as proc:
        with pytest.raises(StorageError, match="still in use by the kernel"):
            st.unmount("home", loop)  # nothing mounted at our path: that alone is not enough
        assert len(pauses) == len(storage_mod.RELEASE_CHECK_PAUSES)  # it looked again, briefly
        proc.kill()
        proc.wait()
    st.unmount("home", loop)  # the namespace is gone, and with it the superblock


@real_disk
def test_a_superblock_that_goes_while_we_look_again_is_released(tmp_path: Path, loop: str) -> None:
    with mounted_in_another_namespace(loop, tmp_path / "other") as proc:
        def sleep(_seconds: float) -> None:
            proc.kill()
            proc.wait()

        st = Storage(tmp_path, sleep=sleep)
        st.mountpoint("home").mkdir(parents=True)
        st.unmount("home", loop)


@real_disk
def test_a_lazily_detached_superblock_in_use_is_not_released(tmp_path: Path, loop: str) -> None:
    st = Storage(tmp_path, sleep=lambda _s: None)
    target = st.mount("home", loop, "ext4", ())
    held = open(target / "open-file", "w")  # noqa: SIM115 - held across the lazy unmount
    try:
        subprocess.run(["umount", "-l", str(target)], check=True)
        assert not st.mounted("home")
        with pytest.raises(StorageError, match="lazily detached"):
            st.unmount("home", loop)
    finally:
        held.close()
    st.unmount("home", loop)


# --- the lab's one kernel (NFS_HA_LAB_SHARED_KERNEL=1) ----------------------------------------------


@real_disk
def test_lab_mode_accepts_a_disk_only_another_node_mounts(tmp_path: Path, loop: str, monkeypatch) -> None:
    st = Storage(tmp_path, sleep=lambda _s: None)
    st.mountpoint("home").mkdir(parents=True)
    with mounted_in_another_namespace(loop, tmp_path / "other", net=True):
        with pytest.raises(StorageError, match="still in use by the kernel"):
            st.unmount("home", loop)  # a real node: its own kernel would not show another node's mount
        monkeypatch.setenv(storage_mod.SHARED_KERNEL_ENV, "1")
        Storage(tmp_path, sleep=lambda _s: None).unmount("home", loop)


@real_disk
def test_lab_mode_still_refuses_a_mount_of_this_node(tmp_path: Path, loop: str, monkeypatch) -> None:
    monkeypatch.setenv(storage_mod.SHARED_KERNEL_ENV, "1")
    st = Storage(tmp_path, sleep=lambda _s: None)
    st.mountpoint("home").mkdir(parents=True)
    with mounted_in_another_namespace(loop, tmp_path / "copy"), pytest.raises(StorageError, match="in use"):
        st.unmount("home", loop)  # another mount namespace, same network namespace: this node


@real_disk
def test_lab_mode_still_refuses_what_this_node_holds_while_another_mounts(tmp_path: Path, loop: str,
                                                                          monkeypatch) -> None:
    monkeypatch.setenv(storage_mod.SHARED_KERNEL_ENV, "1")
    st = Storage(tmp_path, sleep=lambda _s: None)
    target = st.mount("home", loop, "ext4", ())
    held = open(target / "open-file", "w")  # noqa: SIM115 - held across the lazy unmount
    try:
        subprocess.run(["umount", "-l", str(target)], check=True)
        with mounted_in_another_namespace(loop, tmp_path / "other", net=True), \
                pytest.raises(StorageError, match="lazily detached"):
            st.unmount("home", loop)
    finally:
        held.close()
    st.unmount("home", loop)


def test_a_device_that_is_not_a_block_device_is_refused_before_mounting(tmp_path):
    """The lab's "no path to the disk" (/dev/null bound over the device node): refused without
    running mount, so the takeover fails without anything to undo (not critical)."""
    from node.storage import MountRefused, Storage

    st = Storage(tmp_path)
    with pytest.raises(MountRefused, match="not mounting /dev/null") as err:
        st.mount("home", "/dev/null", "xfs", ())
    assert err.value.mounted_nothing
    assert not (tmp_path / "mnt" / "home").is_mount()
