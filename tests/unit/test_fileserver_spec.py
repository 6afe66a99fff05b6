import dataclasses
import json
import socket
from pathlib import Path

import pytest

from controller.spec import SpecError, parse_spec
from controller.spec_nfs import NfsSpecError, StorageSpec, check_export, check_storage
from node.ganesha import NfsServerError, _quote, listening, render_config
from node.kernel_nfsd import plan_exports, render_exports_file
from node.nfs_server import NfsInstance
from node.storage import Storage, StorageError, set_immutable

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
    epoch = st.mountpoint("home") / ".nfs-ha" / "epoch"
    set_immutable(epoch, False)  # the agent keeps it immutable; pretend something wrote it anyway
    epoch.write_text("garbage")
    with pytest.raises(StorageError, match="not an epoch"):
        st.read_epoch("home")
    set_immutable(epoch.parent, False)  # so pytest can delete tmp_path


# --- issue 8 §3: strict grammars, refused in the spec and again by the renderers --------------

INJECTION = "fe80::1%x,*; Squash = No_Root_Squash; Access_Type = RW; }"


@pytest.mark.parametrize("changes, fragment", [
    ({"exports__clients": [INJECTION]}, r"exports\[0\]\.clients: .* no host names, wildcards or scope ids"),
    ({"exports__clients": ["fe80::1%eth0"]}, r"exports\[0\]\.clients"),
    ({"exports__clients": ["fe80::%1/64"]}, r"exports\[0\]\.clients"),
    ({"exports__clients": ["host.example.com"]}, r"exports\[0\]\.clients"),
    ({"exports__clients": ["@netgroup"]}, r"exports\[0\]\.clients"),
    ({"exports__clients": ["10.0.0.*"]}, r"exports\[0\]\.clients"),
    ({"exports__clients": [" 10.0.0.0/24"]}, r"exports\[0\]\.clients"),
    ({"exports__clients": ["::ffff:10.0.0.0/104"]}, "IPv4-mapped"),
    ({"exports__clients": ["0.0.0.0/0"]}, "cannot read a /0 network"),
    ({"exports__clients": ["::/0"]}, "cannot read a /0 network"),
    ({"exports__clients": ["fd00::/112"]}, "/100 to /127"),
    ({"exports__clients": [10]}, r"exports\[0\]\.clients"),
    ({"exports__path": "/.nfs-ha"}, "nfs-ha's own metadata"),
    ({"exports__path": "/.nfs-ha/epoch"}, "nfs-ha's own metadata"),
    ({"exports__path": "/data/.nfs-ha"}, "nfs-ha's own metadata"),
    ({"exports__path": "//.nfs-ha//"}, "nfs-ha's own metadata"),
    ({"exports__pseudo": "/.nfs-ha"}, "nfs-ha's own metadata"),
    ({"exports__path": "/" + "a" * 256}, "at most 255"),
    ({"exports__path": "/a" * 600}, "at most 1024"),
    ({"storage__options": "nobarrier"}, "'nobarrier' is refused: it turns write barriers off"),
    ({"storage": {"device": "/dev/loop3", "fstype": "ext4", "options": "barrier=0"}}, "'barrier=0' is refused"),
    ({"storage": {"device": "/dev/loop3", "fstype": "ext4", "options": "errors=continue"}}, "errors=continue"),
    ({"storage": {"device": "/dev/loop3", "fstype": "ext4", "options": "data=writeback"}}, "data=writeback"),
    ({"storage__options": "ro"}, "read-write"),
    ({"storage__options": "norecovery"}, "journal replay"),
    ({"storage__options": "nouuid"}, "already mounted"),
    ({"storage__options": "noatime,noatime"}, "more than once"),
    ({"storage__options": "data=journal"}, "not an allowed mount option for xfs"),  # ext4 only
    ({"storage__options": "logbufs=9"}, "not an allowed mount option for xfs"),
    ({"storage__options": "NOATIME"}, "not an allowed mount option"),
    ({"storage": {"device": "/dev/loop3", "fstype": "ext4", "options": "commit=301"}}, "commit=301"),
    ({"storage": {"device": "/dev/loop3", "fstype": "ext4", "options": "commit=٣"}}, "not an allowed"),
    ({"storage__device": "/dev/./sda"}, "no '.' or '..'"),
    ({"storage__device": "/dev/" + "a" * 300}, "device path"),
    ({"nfs": {"grace_seconds": 5, "lease_seconds": 10}}, r"nfs\.grace_seconds \(5\) must be at least nfs\.lease"),
    ({"nfs": {"grace_seconds": 1, "lease_seconds": 600}}, "at least nfs.lease_seconds"),
    ({"nfs": {"lease_seconds": 11}}, "at least nfs.lease_seconds"),  # the default grace is 10
    ({"nfs": {"grace_seconds": 10.0}}, "nfs.grace_seconds must be an integer"),
])
def test_hostile_fileserver_specs(changes, fragment):
    with pytest.raises(SpecError, match=fragment):
        parse_spec("home", spec_with(**changes))


@pytest.mark.parametrize("fstype, options", [
    ("xfs", "noatime,inode64,logbsize=256k,logbufs=8,allocsize=64m,discard,prjquota,largeio"),
    ("xfs", "relatime,nodiratime,lazytime,sunit=512,swidth=2048,uquota,gqnoenforce"),
    ("ext4", "noatime,data=ordered,commit=30,errors=remount-ro,barrier=1,journal_checksum,discard,usrquota"),
    ("ext4", "relatime,data=journal,errors=panic,barrier,stripe=16,inode_readahead_blks=64,max_batch_time=15000"),
    ("xfs", ""),
    ("ext4", "noatime,,relatime"),
])
def test_allowed_mount_options(fstype, options):
    spec = parse_spec("home", spec_with(storage={"device": "/dev/loop3", "fstype": fstype, "options": options}))
    assert spec.storage.options == tuple(o for o in options.split(",") if o)


def test_grace_zero_is_graceless_and_allowed_with_any_lease():
    spec = parse_spec("home", spec_with(nfs={"grace_seconds": 0, "lease_seconds": 600}))
    assert spec.nfs.grace_seconds == 0 and spec.nfs.lease_seconds == 600


def test_clients_are_normalised_and_deduplicated():
    spec = parse_spec("home", spec_with(exports__clients=["10.77.0.5/24", "10.77.0.0/24", "FD00:0::1", "10.0.0.1"]))
    assert spec.exports[0].clients == ("10.77.0.0/24", "fd00::1/128", "10.0.0.1/32")


def test_the_kernel_backend_takes_what_ganesha_cannot_read():
    spec = parse_spec("home", spec_with(exports__clients=["fd00::/112", "0.0.0.0/0"], nfs={"backend": "kernel"}))
    assert spec.exports[0].clients == ("fd00::/112", "0.0.0.0/0")


def test_an_ipv6_host_is_rendered_as_an_address_ganesha_can_read(tmp_path):
    conf = render_config(instance(tmp_path, exports__clients=["fd00::1", "10.77.0.0/24", "fd00::/64"]))
    assert "CLIENT { Clients = fd00::1, 10.77.0.0/24, fd00::/64; Access_Type = RW; }" in conf


def hand_built(tmp_path: Path, **changes) -> NfsInstance:
    """An NfsInstance that did not come through parse_spec: what the renderers must re-check."""
    good = instance(tmp_path)
    export_changes = {k: v for k, v in changes.items() if k in ("path", "pseudo", "access", "clients", "squash")}
    exports = (dataclasses.replace(good.exports[0], **export_changes),)
    rest = {k: v for k, v in changes.items() if k not in export_changes}
    return dataclasses.replace(good, exports=exports, **rest)


@pytest.mark.parametrize("changes", [
    {"clients": (INJECTION,)},
    {"clients": ("*",)},
    {"clients": ("10.77.0.0/24 *",)},
    {"clients": ("10.77.0.5/24",)},  # not normalised
    {"clients": ("0.0.0.0/0",)},  # ganesha cannot read it
    {"clients": ("fd00::/120",)},
    {"clients": ()},
    {"path": "/.nfs-ha"},
    {"path": "/a/../b"},
    {"path": "/a//b"},
    {"pseudo": '/x"; Path = "/etc'},
    {"pseudo": "/"},
    {"pseudo": "/a b"},
    {"access": "RW"},
    {"squash": "none; Access_Type = RW"},
    {"vip": "10.77.0.100; Bind_addr = 0.0.0.0"},
    {"vip": "fe80::1%eth0"},
    {"vip": "10.77.0.100/24"},
    {"vfs": "home\nEXPORT {"},
    {"grace_seconds": 5, "lease_seconds": 10},
    {"grace_seconds": -1},
    {"lease_seconds": True},
    {"epoch": "42\nEXPORT {"},
    {"mountpoint": Path("/srv/a b")},
    {"mountpoint": Path('/srv/"x')},
])
def test_the_ganesha_renderer_refuses_what_the_validator_would(tmp_path, changes):
    with pytest.raises(NfsServerError, match="refusing"):
        render_config(hand_built(tmp_path, **changes))


def test_the_ganesha_renderer_refuses_duplicate_pseudo_paths(tmp_path):
    inst = instance(tmp_path)
    with pytest.raises(NfsServerError, match="pseudo path twice"):
        render_config(dataclasses.replace(inst, exports=inst.exports * 2))


@pytest.mark.parametrize("value", ["", "a b", 'a"b', "a\\b", "a\nb", "a;b", "a{b", "a#b", "é", 5, None])
def test_quote_takes_plain_path_characters_only(value):
    with pytest.raises(NfsServerError):
        _quote(value)


@pytest.mark.parametrize("changes", [
    {"clients": (INJECTION,)}, {"clients": ("fe80::1%x",)}, {"path": "/.nfs-ha"}, {"access": "all"},
])
def test_the_kernel_renderer_refuses_what_the_validator_would(tmp_path, changes):
    inst = hand_built(tmp_path, **changes)
    with pytest.raises(NfsServerError, match="refusing"):
        plan_exports(inst)


def test_the_kernel_backend_refuses_a_symlink_into_the_metadata_dir(tmp_path):
    inst = instance(tmp_path, exports__path="/pub")
    (inst.mountpoint / ".nfs-ha").mkdir(parents=True)
    (inst.mountpoint / "pub").symlink_to(".nfs-ha")  # what an NFS client with write access could make
    with pytest.raises(NfsServerError, match=r"inside \.nfs-ha"):
        plan_exports(inst)


def test_the_kernel_exports_file_refuses_odd_header_values(tmp_path):
    inst = instance(tmp_path)
    for changes in ({"vfs": "x\n10.0.0.0/8(rw)"}, {"vip": "10.77.0.100 x"}, {"epoch": "1\n/ *(rw)"},
                    {"mountpoint": Path("/m n")}):
        with pytest.raises(NfsServerError, match="refusing"):
            render_exports_file(dataclasses.replace(inst, **changes), [])


def test_check_storage_and_check_export_accept_only_what_the_parser_makes():
    spec = parse_spec("home", json.dumps(FULL))
    assert check_storage(spec.storage) == spec.storage and check_export(spec.exports[0]) == spec.exports[0]
    for storage in (StorageSpec("/dev/loop3", "xfs", ("nobarrier",)), StorageSpec("/dev/loop3", "xfs", ("a,b",)),
                    StorageSpec("/dev/loop3", "xfs", ["noatime"]), StorageSpec("/etc/x", "xfs")):
        with pytest.raises(NfsSpecError):
            check_storage(storage)
    with pytest.raises(NfsSpecError):
        check_export(dataclasses.replace(spec.exports[0], clients=("10.77.0.0/24", "fe80::1%x")))
