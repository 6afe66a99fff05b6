"""KernelNfsd on generated commands and files only (no kernel nfsd, no root needed)."""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

import pytest

from controller.spec_nfs import ExportSpec
from node.kernel_nfsd import (
    KernelExport,
    KernelNfsd,
    check_client,
    export_options,
    exportfs_target,
    fsid_for,
    parse_exports_file,
    run_command,
)
from node.nfs_server import NfsInstance, NfsServerError

VIP = "10.77.0.100"


class Recorder:
    """A fake runner: records every argv; fails the commands it is told to."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.timeouts: list[float] = []
        self.fail: dict[tuple[str, ...], str] = {}

    def __call__(self, argv: list[str], timeout: float) -> None:
        assert isinstance(argv, list) and all(isinstance(a, str) for a in argv)
        self.calls.append(list(argv))
        self.timeouts.append(timeout)
        message = self.fail.get(tuple(argv))
        if message is not None:
            raise NfsServerError(f"{' '.join(argv)} failed with exit 1: {message}")


def export(path: str = "/", pseudo: str = "/data", access: str = "rw", clients: tuple[str, ...] = ("10.77.0.0/24",),
           squash: str = "root") -> ExportSpec:
    return ExportSpec(path=path, pseudo=pseudo, access=access, clients=clients, squash=squash)


def instance(tmp_path: Path, *exports: ExportSpec, vfs: str = "vfs1", vip: str = VIP) -> NfsInstance:
    return NfsInstance(vfs=vfs, vip=vip, mountpoint=tmp_path / "mnt" / vfs, workdir=tmp_path / "work" / vfs,
                       exports=exports or (export(),), grace_seconds=10, lease_seconds=10, epoch=3)


def backend(tmp_path: Path, run: Recorder, mounted: bool = True) -> KernelNfsd:
    (tmp_path / "nfsd").mkdir(exist_ok=True)
    (tmp_path / "nfsd" / "unlock_filesystem").touch()
    return KernelNfsd(tmp_path / "work", run=run, host_statd_dir=tmp_path / "host-statd",
                      nfsd_dir=tmp_path / "nfsd", is_mountpoint=lambda _path: mounted)


@pytest.fixture
def run() -> Recorder:
    return Recorder()


def two_exports() -> tuple[ExportSpec, ExportSpec]:
    return (export("/", "/all", "rw", ("10.77.0.0/24", "10.78.0.5/32"), "root"),
            export("/pub", "/pub", "ro", ("10.0.0.0/8",), "all"))


def test_start_runs_exportfs_per_client_in_spec_order(tmp_path, run):
    inst = instance(tmp_path, *two_exports())
    backend(tmp_path, run).start(inst, 10.0)
    root, pub = str(inst.mountpoint), str(inst.mountpoint / "pub")
    all_opts = export_options("vfs1", inst.exports[0])
    pub_opts = export_options("vfs1", inst.exports[1])
    assert run.calls == [
        ["exportfs", "-i", "-o", all_opts, f"10.77.0.0/24:{root}"],
        ["exportfs", "-i", "-o", all_opts, f"10.78.0.5/32:{root}"],
        ["exportfs", "-i", "-o", pub_opts, f"10.0.0.0/8:{pub}"],
    ]
    assert all(0 < t <= 10.0 for t in run.timeouts)


def test_start_notifies_recorded_lock_holders_from_the_vfs_disk(tmp_path, run):
    inst = instance(tmp_path)
    statd = inst.mountpoint / ".nfs-ha" / "statd"
    (statd / "sm").mkdir(parents=True)
    (statd / "sm" / "client1").write_text("0100007f 000186b5 00000003 00000010 cookie 10.77.0.9 node-a\n")
    backend(tmp_path, run).start(inst, 10.0)
    assert run.calls[-2:] == [
        ["sysctl", "-q", "-w", "net.ipv4.ip_nonlocal_bind=1"],
        ["sm-notify", "-f", "-v", VIP, "-P", str(statd)],
    ]


def test_start_counts_unfinished_notifications_in_sm_bak(tmp_path, run):
    inst = instance(tmp_path)
    statd = inst.mountpoint / ".nfs-ha" / "statd"
    (statd / "sm.bak").mkdir(parents=True)
    (statd / "sm.bak" / "client1").write_text("record\n")
    backend(tmp_path, run).start(inst, 10.0)
    assert run.calls[-1][0] == "sm-notify"


def test_start_without_lock_holders_runs_no_sm_notify(tmp_path, run):
    # sm-notify with nothing to do ends lockd's host-wide grace period; it must not run.
    backend(tmp_path, run).start(instance(tmp_path), 10.0)
    assert [c[0] for c in run.calls] == ["exportfs"]


def test_statd_dirs_are_created_on_the_vfs_disk(tmp_path, run):
    inst = instance(tmp_path)
    backend(tmp_path, run).start(inst, 10.0)
    assert (inst.mountpoint / ".nfs-ha" / "statd" / "sm").is_dir()
    assert (inst.mountpoint / ".nfs-ha" / "statd" / "sm.bak").is_dir()


def test_sm_notify_failure_does_not_fail_the_start(tmp_path, run, caplog):
    inst = instance(tmp_path)
    statd = inst.mountpoint / ".nfs-ha" / "statd"
    (statd / "sm").mkdir(parents=True)
    (statd / "sm" / "client1").write_text("record\n")
    run.fail[("sm-notify", "-f", "-v", VIP, "-P", str(statd))] = "my_name '10.77.0.100' is unusable"
    nfsd = backend(tmp_path, run)
    with caplog.at_level(logging.WARNING):
        nfsd.start(inst, 10.0)
    assert nfsd.alive("vfs1")
    assert "not notified" in caplog.text and "unusable" in caplog.text


@pytest.mark.parametrize("access, squash, expected", [
    ("rw", "root", "rw,sync,no_subtree_check,root_squash"),
    ("rw", "all", "rw,sync,no_subtree_check,all_squash"),
    ("rw", "none", "rw,sync,no_subtree_check,no_root_squash"),
    ("ro", "root", "ro,sync,no_subtree_check,root_squash"),
    ("ro", "all", "ro,sync,no_subtree_check,all_squash"),
    ("ro", "none", "ro,sync,no_subtree_check,no_root_squash"),
])
def test_option_mapping(access, squash, expected):
    spec = export(access=access, squash=squash)
    assert export_options("vfs1", spec) == f"{expected},fsid={fsid_for('vfs1', spec)}"


def test_an_export_with_access_none_is_not_exported_at_all(tmp_path, run):
    hidden = export("/secret", "/secret", "none", ("10.77.0.0/24",))
    inst = instance(tmp_path, export(), hidden)
    backend(tmp_path, run).start(inst, 10.0)
    assert len(run.calls) == 1
    assert all("secret" not in arg for call in run.calls for arg in call)
    assert "secret" not in (inst.workdir / "exports").read_text()


def test_fsid_is_a_stable_uuid_distinct_per_vfs_and_export():
    a, b = export("/a", "/a"), export("/b", "/b")
    fsid = fsid_for("vfs1", a)
    assert uuid.UUID(fsid).version == 5
    assert sum(c in "0123456789abcdef" for c in fsid) == 32  # what exports(5) accepts as a uuid
    assert fsid == fsid_for("vfs1", export("/a", "/a"))
    assert fsid == "dc819552-bb4e-57cf-8bf3-eec289b319bd"  # in every process and release: clients hold it
    assert len({fsid, fsid_for("vfs1", b), fsid_for("vfs2", a), fsid_for("vfs2", b)}) == 4
    # The fsid names the directory: a second export of it (other pseudo, other clients) agrees.
    assert fsid == fsid_for("vfs1", export("/a", "/elsewhere", "ro", ("10.9.0.0/16",), "all"))


def test_fsid_does_not_depend_on_the_node_or_object(tmp_path):
    first, second = Recorder(), Recorder()
    inst_a = NfsInstance(vfs="vfs1", vip=VIP, mountpoint=tmp_path / "node-a" / "vfs1", workdir=tmp_path / "wa",
                         exports=(export(),), grace_seconds=10, lease_seconds=10, epoch=1)
    inst_b = NfsInstance(vfs="vfs1", vip=VIP, mountpoint=tmp_path / "node-b" / "vfs1", workdir=tmp_path / "wb",
                         exports=(export(),), grace_seconds=10, lease_seconds=10, epoch=2)
    KernelNfsd(tmp_path / "wa", run=first, is_mountpoint=lambda _p: True).start(inst_a, 10.0)
    KernelNfsd(tmp_path / "wb", run=second, is_mountpoint=lambda _p: True).start(inst_b, 10.0)
    assert first.calls[0][3] == second.calls[0][3]


def test_exports_file_content(tmp_path, run):
    inst = instance(tmp_path, *two_exports())
    backend(tmp_path, run).start(inst, 10.0)
    all_opts = export_options("vfs1", inst.exports[0])
    pub_opts = export_options("vfs1", inst.exports[1])
    lines = (inst.workdir / "exports").read_text().splitlines()
    assert lines[0].startswith("# nfs-ha: kernel nfsd exports of VFS vfs1 (VIP 10.77.0.100, epoch 3)")
    assert lines[1].startswith("#") and "exportfs -i" in lines[1]
    assert lines[2:] == [
        f"# mountpoint={inst.mountpoint}",
        f"{inst.mountpoint} 10.77.0.0/24({all_opts}) 10.78.0.5/32({all_opts})",
        f"{inst.mountpoint / 'pub'} 10.0.0.0/8({pub_opts})",
    ]


def test_exports_file_parses_back_and_skips_what_is_not_ours():
    text = ("# comment\n# mountpoint=/srv/m/vfs1\n\n"
            "/srv/m/vfs1 10.0.0.0/24(rw,sync) [fd00::]/64(rw)\n"
            "/srv/m/vfs1/x *(rw) 10.1.0.0/16(ro) 10.2.0.0/16\n"
            "/srv/m/../../etc 10.3.0.0/16(rw)\n")
    mountpoint, exports = parse_exports_file(text)
    assert mountpoint == Path("/srv/m/vfs1")
    assert exports == [KernelExport("10.0.0.0/24", "/srv/m/vfs1", "rw,sync"),
                       KernelExport("10.1.0.0/16", "/srv/m/vfs1/x", "ro")]


def test_stop_unexports_everything_then_flushes_and_unlocks(tmp_path, run):
    inst = instance(tmp_path, *two_exports())
    nfsd = backend(tmp_path, run)
    nfsd.start(inst, 10.0)
    run.calls.clear()
    nfsd.stop("vfs1", 5.0)
    root, pub = str(inst.mountpoint), str(inst.mountpoint / "pub")
    assert run.calls == [
        ["exportfs", "-u", f"10.77.0.0/24:{root}"],
        ["exportfs", "-u", f"10.78.0.5/32:{root}"],
        ["exportfs", "-u", f"10.0.0.0/8:{pub}"],
        ["exportfs", "-f"],
    ]
    assert (tmp_path / "nfsd" / "unlock_filesystem").read_text() == f"{inst.mountpoint}\n"
    assert not (inst.workdir / "exports").exists()
    assert not nfsd.alive("vfs1")


def test_stop_is_idempotent(tmp_path, run):
    nfsd = backend(tmp_path, run)
    nfsd.start(instance(tmp_path), 10.0)
    nfsd.stop("vfs1", 5.0)
    run.calls.clear()
    nfsd.stop("vfs1", 5.0)
    nfsd.stop("never-started", 5.0)
    assert run.calls == []


def test_stop_ignores_not_exported(tmp_path, run):
    inst = instance(tmp_path)
    nfsd = backend(tmp_path, run)
    nfsd.start(inst, 10.0)
    run.fail[("exportfs", "-u", f"10.77.0.0/24:{inst.mountpoint}")] = (
        f"exportfs: Could not find '10.77.0.0/24:{inst.mountpoint}' to unexport.")
    nfsd.stop("vfs1", 5.0)
    assert not nfsd.alive("vfs1")
    assert run.calls[-1] == ["exportfs", "-f"]


def test_failed_unexport_keeps_the_record_for_a_retry(tmp_path, run):
    inst = instance(tmp_path, *two_exports())
    nfsd = backend(tmp_path, run)
    nfsd.start(inst, 10.0)
    run.fail[("exportfs", "-u", f"10.78.0.5/32:{inst.mountpoint}")] = "exportfs: some real failure"
    with pytest.raises(NfsServerError, match="some real failure"):
        nfsd.stop("vfs1", 5.0)
    assert ["exportfs", "-u", f"10.0.0.0/8:{inst.mountpoint / 'pub'}"] in run.calls  # went on past it
    assert nfsd.alive("vfs1") and (inst.workdir / "exports").exists()
    assert not (tmp_path / "nfsd" / "unlock_filesystem").read_text()
    run.fail.clear()
    nfsd.stop("vfs1", 5.0)
    assert not nfsd.alive("vfs1") and not (inst.workdir / "exports").exists()


def test_remove_leftovers_after_an_agent_restart(tmp_path, run):
    inst = instance(tmp_path, *two_exports())
    backend(tmp_path, run).start(inst, 10.0)
    run.calls.clear()
    fresh = backend(tmp_path, run)  # a new agent: nothing in memory, only the file
    assert not fresh.alive("vfs1")
    assert fresh.remove_leftovers("vfs1") is True
    root, pub = str(inst.mountpoint), str(inst.mountpoint / "pub")
    assert run.calls == [
        ["exportfs", "-u", f"10.77.0.0/24:{root}"],
        ["exportfs", "-u", f"10.78.0.5/32:{root}"],
        ["exportfs", "-u", f"10.0.0.0/8:{pub}"],
        ["exportfs", "-f"],
    ]
    assert (tmp_path / "nfsd" / "unlock_filesystem").read_text() == f"{inst.mountpoint}\n"
    assert not (inst.workdir / "exports").exists()
    run.calls.clear()
    assert fresh.remove_leftovers("vfs1") is False
    assert run.calls == []


def test_stop_of_an_untracked_vfs_uses_the_record(tmp_path, run):
    inst = instance(tmp_path)
    backend(tmp_path, run).start(inst, 10.0)
    run.calls.clear()
    backend(tmp_path, run).stop("vfs1", 5.0)
    assert run.calls == [["exportfs", "-u", f"10.77.0.0/24:{inst.mountpoint}"], ["exportfs", "-f"]]


def test_leftovers_do_not_unlock_a_filesystem_that_is_no_longer_mounted(tmp_path, run):
    inst = instance(tmp_path)
    backend(tmp_path, run).start(inst, 10.0)
    fresh = backend(tmp_path, run, mounted=False)
    assert fresh.remove_leftovers("vfs1") is True
    assert not (tmp_path / "nfsd" / "unlock_filesystem").read_text()  # would hit the parent fs


def test_start_is_idempotent(tmp_path, run):
    nfsd = backend(tmp_path, run)
    nfsd.start(instance(tmp_path), 10.0)
    run.calls.clear()
    nfsd.start(instance(tmp_path), 10.0)
    assert run.calls == []
    assert nfsd.alive("vfs1") and nfsd.pid("vfs1") is None


def test_start_failure_undoes_the_exports_done(tmp_path, run):
    inst = instance(tmp_path, *two_exports())
    opts = export_options("vfs1", inst.exports[0])
    run.fail[("exportfs", "-i", "-o", opts, f"10.78.0.5/32:{inst.mountpoint}")] = "exportfs: no such thing"
    nfsd = backend(tmp_path, run)
    with pytest.raises(NfsServerError, match=r"exportfs -i -o .* 10\.78\.0\.5/32:.*no such thing"):
        nfsd.start(inst, 10.0)
    assert run.calls[-2:] == [["exportfs", "-u", f"10.77.0.0/24:{inst.mountpoint}"], ["exportfs", "-f"]]
    assert not nfsd.alive("vfs1")
    assert not (inst.workdir / "exports").exists()


def test_default_runner_failure_is_an_nfs_server_error_naming_the_command():
    with pytest.raises(NfsServerError, match=r"sh -c 'echo boom >&2; exit 3' failed with exit 3: boom"):
        run_command(["sh", "-c", "echo boom >&2; exit 3"], 5.0)
    with pytest.raises(NfsServerError, match=r"no-such-nfs-tool.*could not run"):
        run_command(["no-such-nfs-tool", "-f"], 5.0)
    with pytest.raises(NfsServerError, match="sleep 5 timed out"):
        run_command(["sleep", "5"], 0.2)
    run_command(["true"], 5.0)


@pytest.mark.parametrize("client", [
    "10.0.0.0/24 *(rw)", "10.0.0.0/24(rw)", "*", "@netgroup", "host.example.com", "10.0.0.1/24",
    "10.0.0.0/24\n/etc *", "", "10.0.0.0/24,10.1.0.0/16",
])
def test_a_malicious_client_is_refused_even_past_spec_validation(tmp_path, run, client):
    inst = instance(tmp_path, export(clients=(client,)))
    nfsd = backend(tmp_path, run)
    with pytest.raises(NfsServerError, match="refusing client"):
        nfsd.start(inst, 10.0)
    assert run.calls == []
    assert not (inst.workdir / "exports").exists()


def test_check_client_accepts_normal_cidrs():
    assert check_client("10.77.0.0/24") == "10.77.0.0/24"
    assert check_client("fd00::/64") == "fd00::/64"


def test_ipv6_clients_go_in_brackets_for_exportfs():
    assert exportfs_target("fd00::/64", "/m/vfs1") == "[fd00::]/64:/m/vfs1"
    assert exportfs_target("10.0.0.0/8", "/m/vfs1") == "10.0.0.0/8:/m/vfs1"


def test_a_symlink_out_of_the_vfs_is_refused(tmp_path, run):
    inst = instance(tmp_path, export("/escape", "/escape"))
    inst.mountpoint.mkdir(parents=True)
    (inst.mountpoint / "escape").symlink_to("/etc")
    with pytest.raises(NfsServerError, match="outside the VFS filesystem"):
        backend(tmp_path, run).start(inst, 10.0)
    assert run.calls == []


def test_an_unmounted_mountpoint_is_refused(tmp_path, run):
    with pytest.raises(NfsServerError, match="not a mount point"):
        backend(tmp_path, run, mounted=False).start(instance(tmp_path), 10.0)
    assert run.calls == []


@pytest.mark.parametrize("vip", ["10.77.0.100 -x", "-f", "10.77.0.100/24", "host"])
def test_a_bad_vip_is_refused(tmp_path, run, vip):
    with pytest.raises(NfsServerError, match="refusing VIP"):
        backend(tmp_path, run).start(instance(tmp_path, vip=vip), 10.0)
    assert run.calls == []


def test_an_odd_mountpoint_is_refused(tmp_path, run):
    inst = NfsInstance(vfs="vfs1", vip=VIP, mountpoint=tmp_path / "a b", workdir=tmp_path / "work" / "vfs1",
                       exports=(export(),), grace_seconds=10, lease_seconds=10, epoch=1)
    with pytest.raises(NfsServerError, match="refusing mountpoint"):
        backend(tmp_path, run).start(inst, 10.0)
    assert run.calls == []


def test_one_directory_twice_to_one_client_is_refused(tmp_path, run):
    inst = instance(tmp_path, export("/", "/a"), export("/", "/b", "ro"))
    with pytest.raises(NfsServerError, match="exported twice"):
        backend(tmp_path, run).start(inst, 10.0)
    assert run.calls == []


def test_mirror_copies_the_hosts_statd_records_and_prunes_stale_ones(tmp_path, run):
    inst = instance(tmp_path)
    nfsd = backend(tmp_path, run)
    nfsd.start(inst, 10.0)
    host_sm = tmp_path / "host-statd" / "sm"
    host_sm.mkdir(parents=True)
    (host_sm / "10.77.0.9").write_text("record 9\n")
    (host_sm / "client-b.example").write_text("record b\n")
    (host_sm / "weird name").write_text("not a statd record\n")
    vfs_sm = inst.mountpoint / ".nfs-ha" / "statd" / "sm"
    (vfs_sm / "gone.example").write_text("old\n")
    assert nfsd.mirror_statd_records("vfs1") == 2
    assert sorted(p.name for p in vfs_sm.iterdir()) == ["10.77.0.9", "client-b.example"]
    assert (vfs_sm / "10.77.0.9").read_text() == "record 9\n"
    assert nfsd.mirror_statd_records("not-served") == 0


def test_stop_leaves_the_lock_holders_on_the_vfs_disk_for_the_next_owner(tmp_path, run):
    inst = instance(tmp_path)
    nfsd = backend(tmp_path, run)
    nfsd.start(inst, 10.0)
    host_sm = tmp_path / "host-statd" / "sm"
    host_sm.mkdir(parents=True)
    (host_sm / "10.77.0.9").write_text("record 9\n")
    nfsd.stop("vfs1", 5.0)
    assert (inst.mountpoint / ".nfs-ha" / "statd" / "sm" / "10.77.0.9").exists()
    run.calls.clear()
    backend(tmp_path, run).start(inst, 10.0)  # the next owner (same disk)
    assert run.calls[-1] == ["sm-notify", "-f", "-v", VIP, "-P", str(inst.mountpoint / ".nfs-ha" / "statd")]


def test_on_exit_is_accepted_and_name_is_kernel(tmp_path, run):
    nfsd = backend(tmp_path, run)
    nfsd.on_exit(lambda vfs: None)
    assert nfsd.name == "kernel"


def test_a_filesystem_error_while_preparing_is_an_nfs_server_error(tmp_path, run):
    inst = instance(tmp_path)
    inst.mountpoint.parent.mkdir(parents=True)
    inst.mountpoint.write_text("a file where the filesystem should be\n")
    with pytest.raises(NfsServerError, match="preparing the exports of vfs1 failed"):
        backend(tmp_path, run).start(inst, 10.0)
    assert run.calls == []
