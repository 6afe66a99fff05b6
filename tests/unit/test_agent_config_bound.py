"""release_bound and reset_command in the agent configuration (node/config.py)."""

import pytest

from node import config

BASE = ["--name", "node-a", "--etcd", "http://127.0.0.1:2379", "--interface", "eth0"]


def test_defaults_and_options() -> None:
    cfg = config.load(BASE)
    assert cfg.release_bound == 10.0 and cfg.reset_command == ()
    cfg = config.load([*BASE, "--release-bound", "4.5", "--reset-command", '["/usr/local/sbin/reset", "now"]'])
    assert cfg.release_bound == 4.5 and cfg.reset_command == ("/usr/local/sbin/reset", "now")


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "0", "1.9", "601"])
def test_release_bound_out_of_range_is_refused(value: str) -> None:
    with pytest.raises(ValueError, match=r"release_bound must be 2\.\.600 seconds"):
        config.load([*BASE, "--release-bound", value])


def test_reset_command_must_be_an_absolute_argv() -> None:
    with pytest.raises(ValueError, match="reset_command must start with an absolute path"):
        config.load([*BASE, "--reset-command", '["reboot"]'])
    with pytest.raises(ValueError, match="list of strings"):
        config.load([*BASE, "--reset-command", '"/sbin/reboot -f"'])


def check_config(*args: str) -> tuple[int, str, str]:
    """`nfs-ha-agent --check-config ARGS` in a process of its own: exit code, stdout, stderr."""
    import subprocess
    import sys
    from pathlib import Path

    proc = subprocess.run([sys.executable, "-m", "node.agent", "--check-config", *args], capture_output=True,
                          text=True, timeout=60, cwd=Path(__file__).resolve().parents[2],
                          env={"PATH": "/usr/bin:/bin"})
    return proc.returncode, proc.stdout, proc.stderr


def test_check_config_prints_the_settings_and_says_ok() -> None:
    code, out, err = check_config(*BASE, "--fence-command", '["/bin/true", "{node}"]')
    assert code == 0, err
    assert 'fence_command = ["/bin/true", "{node}"]' in out and "configuration OK" in err


@pytest.mark.parametrize(("args", "message"), [
    (["--log-level", "LOUD"], "log_level must be one of ['DEBUG', 'INFO', 'WARNING', 'ERROR', 'CRITICAL']"),
    (["--fence-command", "[/bin/true"], "fence_command must be a JSON list of strings"),
    (["--fence-command", '["/nonexistent/fence"]'], "fence_command: /nonexistent/fence is not an executable file"),
    (["--lease-ttl", "x"], "argument --lease-ttl: invalid int value: 'x'"),
    (["--etcd", "https://root:pw@e:2379"], "no credentials in the URL"),
])
def test_check_config_names_the_bad_setting_without_a_traceback(args: list[str], message: str) -> None:
    code, out, err = check_config(*BASE, *args)
    assert code == 2 and message in err and "Traceback" not in err, err
    assert "pw@" not in err + out


def test_the_environment_to_load_from_can_be_given() -> None:
    """SIGHUP reloads from the environment the agent started with: the password was taken out of
    os.environ by then (so that no child inherits it)."""
    env = {"NFS_HA_ETCD_USER": "node-a", "NFS_HA_ETCD_PASSWORD": "pw", "NFS_HA_LOG_LEVEL": "warning"}
    cfg = config.load(["--name", "node-a", "--etcd", "https://127.0.0.1:2379", "--interface", "eth0"], env)
    assert cfg.etcd_password == "pw" and cfg.log_level == "warning"
    with pytest.raises(ValueError, match="etcd_user needs a password"):
        config.load(["--name", "node-a", "--etcd", "https://127.0.0.1:2379", "--interface", "eth0"],
                    {"NFS_HA_ETCD_USER": "node-a"})
