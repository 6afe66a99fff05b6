"""Gratuitous ARP is withheld the moment the holding stops being valid (node/arp.py announce)."""

from __future__ import annotations

from typing import ClassVar

import pytest

from node import arp


class FakeSocket:
    sent: ClassVar[list[bytes]] = []

    def __init__(self, iface: str) -> None:
        self.mac = bytes.fromhex("020000000001")

    def __enter__(self) -> FakeSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def send(self, frame: bytes) -> None:
        FakeSocket.sent.append(frame)


@pytest.fixture(autouse=True)
def fake_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    FakeSocket.sent = []
    monkeypatch.setattr(arp, "ArpSocket", FakeSocket)


def test_valid_holding_sends_request_and_reply_claiming_the_vip() -> None:
    assert arp.announce("eth0", "10.77.0.100", lambda: True) is True
    parsed = [arp.parse_frame(f) for f in FakeSocket.sent]
    assert [p[0] for p in parsed if p] == [arp.ARP_REQUEST, arp.ARP_REPLY]
    assert all(p and p[2] == bytes([10, 77, 0, 100]) and p[4] == bytes([10, 77, 0, 100]) for p in parsed)


def test_validity_is_asked_before_every_frame() -> None:
    answers = iter([True, False])  # lost between the two frames (e.g. frozen and resumed)
    assert arp.announce("eth0", "10.77.0.100", lambda: next(answers)) is False
    assert len(FakeSocket.sent) == 1
    FakeSocket.sent = []
    assert arp.announce("eth0", "10.77.0.100", lambda: False) is False
    assert FakeSocket.sent == []
