"""The test harness itself: a sidecar process and a sidecar thread forward a call."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from tests.support.clients import thriftpy2_client
from tests.support.servers import thriftpy2_server
from tests.support.sidecar import SidecarThread, base_config, run_sidecar


def test_subprocess_sidecar_forwards_and_exits_zero() -> None:
    with thriftpy2_server("framed") as upstream, run_sidecar([upstream.address]) as sidecar:
        with thriftpy2_client(sidecar.address, "framed") as client:
            assert client.add(2, 3) == 5
        assert sidecar.metrics().value("thrift_sidecar_requests_total", method="add") == 1
        assert sidecar.stop() == 0


def test_thread_sidecar_forwards() -> None:
    with (
        thriftpy2_server("buffered") as upstream,
        SidecarThread(base_config([upstream.address])) as sidecar,
    ):
        with thriftpy2_client(sidecar.address, "buffered") as client:
            assert client.add(20, 22) == 42
        assert upstream.calls["add"] == 1


def test_run_sidecar_removes_its_directory_and_keeps_the_log() -> None:
    with thriftpy2_server("framed") as upstream:
        with run_sidecar([upstream.address]) as sc:
            workdir = sc.config_path.parent
            assert workdir.is_dir()
        assert not workdir.exists()
    assert "listening" in sc.log().lower()


def test_thread_sidecar_from_a_dict_leaves_no_config_file_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with (
        thriftpy2_server("framed") as upstream,
        SidecarThread(base_config([upstream.address])) as sidecar,
        thriftpy2_client(sidecar.address, "framed") as client,
    ):
        assert client.add(1, 1) == 2
    assert list(tmp_path.iterdir()) == []
