"""`sidecar.testing.ports`: free ports below the kernel's ephemeral range, one block per run."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from sidecar.testing import ports


def test_a_free_port_is_below_the_ephemeral_range_and_can_be_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(ports.PORT_BLOCK_VARIABLE, raising=False)
    low = ports.ephemeral_low()
    for _ in range(20):
        port = ports.free_port()
        assert ports.LOWEST <= port < low
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_each_run_picks_from_its_own_block(monkeypatch: pytest.MonkeyPatch) -> None:
    low = ports.ephemeral_low()
    picked = {}
    for index in (0, 1):
        monkeypatch.setenv(ports.PORT_BLOCK_VARIABLE, f"{index}/2")
        block = ports.port_range(low, (index, 2))
        picked[index] = {ports.free_port() for _ in range(30)}
        assert all(port in block for port in picked[index]), (index, block)
    first, second = ports.port_range(low, (0, 2)), ports.port_range(low, (1, 2))
    assert first.stop <= second.start
    assert first.start == ports.LOWEST
    assert second.stop <= low


@pytest.mark.parametrize(
    ("value", "block"),
    [
        ("1/2", (1, 2)),
        ("0/3", (0, 3)),
        ("", (0, 1)),
        ("2/2", (0, 1)),
        ("x/2", (0, 1)),
        ("1", (0, 1)),
    ],
)
def test_the_block_variable_is_read_or_ignored_whole(value: str, block: tuple[int, int]) -> None:
    assert ports.port_block({ports.PORT_BLOCK_VARIABLE: value}) == block


def test_the_ephemeral_range_is_read_from_the_kernel_or_defaulted(tmp_path: Path) -> None:
    given = tmp_path / "range"
    given.write_text("40000\t60999\n")
    assert ports.ephemeral_low(given) == 40000
    assert ports.ephemeral_low(tmp_path / "missing") == 32768


def test_a_process_is_not_handed_a_port_it_was_handed_lately(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two picks for one config must differ: from a block of 400, 200 picks are distinct
    (random picks would repeat about 50 times)."""
    monkeypatch.setattr(ports, "ephemeral_low", lambda: ports.LOWEST + 400)
    monkeypatch.delenv(ports.PORT_BLOCK_VARIABLE, raising=False)
    picked = [ports.free_port() for _ in range(200)]
    assert len(set(picked)) == len(picked)
    assert all(ports.LOWEST <= port < ports.LOWEST + 400 for port in picked)


def test_without_room_below_the_range_the_kernel_picks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ports, "ephemeral_low", lambda: ports.LOWEST + 50)
    monkeypatch.delenv(ports.PORT_BLOCK_VARIABLE, raising=False)
    port = ports.free_port()
    assert port >= ports.LOWEST + 50  # from the kernel's own range, not the 50 below it
