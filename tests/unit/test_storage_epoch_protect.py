"""The epoch file and its directory are immutable on disk between writes (node/storage.py)."""

from pathlib import Path

import pytest

from node.storage import Storage, set_immutable


@pytest.fixture
def storage(tmp_path: Path):
    st = Storage(tmp_path)
    st.mountpoint("home").mkdir(parents=True)
    meta = st.mountpoint("home") / ".nfs-ha"
    yield st
    # pytest must be able to delete its temporary directory afterwards
    for path in (meta / "epoch", meta):
        if path.exists():
            set_immutable(path, False)


def test_the_epoch_cannot_be_changed_deleted_or_renamed_between_writes(storage: Storage) -> None:
    try:
        storage.write_epoch("home", 41)
    except Exception as exc:  # only xfs/ext4 matter; a test machine on another fs cannot check this
        pytest.skip(f"no FS_IMMUTABLE_FL here: {exc}")
    storage.write_epoch("home", 42)
    meta = storage.mountpoint("home") / ".nfs-ha"
    epoch = meta / "epoch"
    assert storage.read_epoch("home") == 42
    for attempt in (lambda: epoch.write_text("1\n"), epoch.unlink, lambda: meta.rename(meta.with_name("x")),
                    lambda: (meta / "new").write_text("x")):
        with pytest.raises(PermissionError):
            attempt()
    assert storage.read_epoch("home") == 42
    # what the NFS servers write into stays writable
    (meta / "nfs-recovery" / "record").write_text("client")
    (meta / "statd" / "sm").mkdir()
