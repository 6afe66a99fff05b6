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
