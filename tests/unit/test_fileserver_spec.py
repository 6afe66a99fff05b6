import json
import socket
from pathlib import Path

import pytest

from controller.spec import SpecError, parse_spec
from node.ganesha import NfsServerError, _quote, listening, render_config
from node.nfs_server import NfsInstance
from node.storage import Storage, StorageError

BASE = {"vip": "10.77.0.100/24", "candidates": ["node-a", "node-b"]}
FULL = {**BASE,
        "storage": {"device": "/dev/loop3", "fstype": "xfs", "options": "noatime"},
        "exports": [{"path": "/", "pseudo": "/home", "access": "rw", "clients": ["10.77.0.0/24"], "squash": "root"}],
        "nfs": {"backend": "ganesha", "grace_seconds": 10, "lease_seconds": 10}}


def spec_with(**changes):
    data = json.loads(json.dumps(FULL))
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            target = data[section][0] if isinstance(data[section], list) else data[section]
            target[field] = value
        else:
            data[section] = value
    return json.dumps(data)


def test_full_spec_parses():
    spec = parse_spec("home", json.dumps(FULL))
    assert spec.storage.device == "/dev/loop3" and spec.storage.options == ("noatime",)
    assert spec.exports[0].pseudo == "/home" and spec.exports[0].clients == ("10.77.0.0/24",)
    assert spec.nfs.grace_seconds == 10


def test_vip_only_spec_has_no_fileserver():
    spec = parse_spec("home", json.dumps(BASE))
    assert spec.storage is None and spec.exports == () and spec.nfs is None


@pytest.mark.parametrize("changes, fragment", [
    ({"storage__device": "/etc/passwd"}, "device path under /dev/"),
    ({"storage__device": "/dev/../etc/shadow"}, "device path under /dev/"),
    ({"storage__fstype": "btrfs"}, "storage.fstype"),
    ({"storage__options": "noatime,remount"}, "not an allowed mount option"),
    ({"storage__options": "noatime;reboot"}, "not an allowed mount option"),
    ({"exports__path": "/../etc"}, "no '..'"),
    ({"exports__path": "relative"}, "absolute path"),
    ({"exports__pseudo": "/"}, "pseudo root"),
    ({"exports__pseudo": "/a b"}, "path parts"),
    ({"exports__access": "write"}, "access"),
    ({"exports__squash": "some"}, "squash"),
    ({"exports__clients": ["10.77.0.0/33"]}, "not an IP network"),
    ({"exports__clients": ["*(rw)"]}, "not an IP network"),
    ({"exports__clients": []}, "non-empty list"),
    ({"nfs__backend": "samba"}, "nfs.backend"),
    ({"nfs__grace_seconds": -1}, "grace_seconds"),
    ({"exports": []}, "non-empty list"),
])
def test_bad_fileserver_specs(changes, fragment):
    with pytest.raises(SpecError, match=fragment):
        parse_spec("home", spec_with(**changes))


def test_exports_need_storage_and_storage_needs_exports():
    with pytest.raises(SpecError, match="need 'storage'"):
        parse_spec("home", json.dumps({**BASE, "exports": FULL["exports"]}))
    with pytest.raises(SpecError, match="needs 'exports'"):
        parse_spec("home", json.dumps({**BASE, "storage": FULL["storage"]}))


def instance(tmp_path: Path, **spec_changes) -> NfsInstance:
    spec = parse_spec("home-1", spec_with(**spec_changes))
    return NfsInstance(vfs="home-1", vip="10.77.0.100", mountpoint=tmp_path / "mnt", workdir=tmp_path / "w",
                       exports=spec.exports, grace_seconds=10, lease_seconds=7, epoch=42)


def test_ganesha_config(tmp_path):
    conf = render_config(instance(tmp_path))
    assert "Bind_addr = 10.77.0.100;" in conf
    assert f'RecoveryRoot = "{tmp_path}/mnt/.nfs-ha/nfs-recovery";' in conf
    assert "Grace_Period = 10;" in conf and "Lease_Lifetime = 7;" in conf and "Graceless = false;" in conf
    assert 'Dbus_Name_Prefix = "nfsha_home_1";' in conf
    assert f'Path = "{tmp_path}/mnt";' in conf and 'Pseudo = "/home";' in conf
    assert "Squash = Root_Squash;" in conf
    assert "CLIENT { Clients = 10.77.0.0/24; Access_Type = RW; }" in conf
    assert "Access_Type = None;" in conf  # nothing for clients outside the list
    assert conf.count("{") == conf.count("}")


def test_ganesha_config_subdir_ro_all_squash(tmp_path):
    conf = render_config(instance(tmp_path, exports__path="/data/x", exports__access="ro", exports__squash="all"))
    assert f'Path = "{tmp_path}/mnt/data/x";' in conf
    assert "Access_Type = RO;" in conf and "Squash = All_Squash;" in conf


def test_ganesha_config_refuses_quotes():
    with pytest.raises(NfsServerError):
        _quote('x"; Bind_addr = 0.0.0.0; "')


def test_listening_parses_proc_net():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as srv:
        srv.bind(("127.0.0.1", 0))
        port = srv.getsockname()[1]
        assert listening("127.0.0.1", port) is False  # bound, not listening yet
        srv.listen()
        assert listening("127.0.0.1", port) is True
        assert listening("127.0.0.2", port) is False  # another address, same port
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as srv6:
        srv6.bind(("::ffff:127.0.0.1", 0))  # how Ganesha binds a v4 VIP: a v4-mapped v6 socket
        srv6.listen()
        assert listening("127.0.0.1", srv6.getsockname()[1]) is True


def test_storage_epoch_roundtrip(tmp_path):
    st = Storage(tmp_path)
    st.mountpoint("home").mkdir(parents=True)
    assert st.read_epoch("home") == 0
    st.write_epoch("home", 1234)
    assert st.read_epoch("home") == 1234
    (st.mountpoint("home") / ".nfs-ha" / "epoch").write_text("garbage")
    with pytest.raises(StorageError, match="not an epoch"):
        st.read_epoch("home")
