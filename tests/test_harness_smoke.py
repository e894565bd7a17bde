"""The test harness itself: a sidecar process and a sidecar thread forward a call."""

from __future__ import annotations

import os
import re
import signal
import tempfile
from pathlib import Path

import pytest
import yaml

from tests.support.clients import thriftpy2_client
from tests.support.servers import thriftpy2_server
from tests.support.sidecar import FORK, SidecarThread, base_config, run_sidecar, sidecar_environ
from tests.support.wait import wait_until
from tests.support.zygote import ForkedProcess, Zygote


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


# The zygote (tests/support/zygote.py): a forked sidecar is the command as it would run.


def descriptor_kinds(pid: int) -> list[str]:
    """What a process's descriptors are (``socket``, ``pipe``, ``anon_inode:[eventfd]``, a
    file's name), sorted."""
    kinds = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except FileNotFoundError:  # closed since the listing (a readiness check's socket)
            continue
        kinds.append(target.split(":[")[0] if target[:1] != "/" else Path(target).name)
    return sorted(kinds)


@pytest.mark.skipif(not FORK, reason="THRIFT_SIDECAR_TEST_FORK=0: no zygote")
def test_a_forked_sidecar_is_the_zygotes_child_and_the_command_as_run() -> None:
    with thriftpy2_server("framed") as upstream, run_sidecar([upstream.address]) as sc:
        assert isinstance(sc.proc, ForkedProcess)
        status = Path(f"/proc/{sc.proc.pid}/status").read_text()
        parent = int(re.search(r"^PPid:\s+(\d+)", status, re.M).group(1))  # type: ignore[union-attr]
        assert parent != os.getpid()  # the zygote's, not this process's
        # The same descriptors as the command started afresh: the zygote's are closed.
        with run_sidecar([upstream.address], prefix=[]) as fresh:
            assert not isinstance(fresh.proc, ForkedProcess)
            forked, started = descriptor_kinds(sc.proc.pid), descriptor_kinds(fresh.proc.pid)
        # (sockets come and go with the readiness checks' connections)
        assert [k for k in forked if k != "socket"] == [k for k in started if k != "socket"]
        assert set(forked) == set(started)
        assert Path(f"/proc/{sc.proc.pid}/cwd").resolve() == sc.config_path.parent.resolve()
        with thriftpy2_client(sc.address, "framed") as client:
            assert client.add(1, 2) == 3
        assert sc.proc.poll() is None
        assert sc.stop() == 0


def test_a_forked_sidecar_gets_the_exit_status_environment_and_limits_asked_for() -> None:
    # A bad setting from the environment: the command exits 2 and says why, as it would.
    with run_sidecar(
        ["127.0.0.1:1"], env={"SIDECAR_RETRY__MAX_ATTEMPTS": "abc"}, wait_ready=False
    ) as sc:
        assert sc.proc.wait(30) == 2
    assert "SIDECAR_RETRY__MAX_ATTEMPTS" in sc.log()
    with (
        thriftpy2_server("framed") as upstream,
        run_sidecar([upstream.address], open_files=512) as sc,
    ):
        limits = Path(f"/proc/{sc.proc.pid}/limits").read_text()
        assert re.search(r"^Max open files\s+512\s+512\s", limits, re.M), limits
        sc.signal(signal.SIGKILL)
        assert sc.proc.wait(10) == -signal.SIGKILL


@pytest.mark.skipif(not FORK, reason="THRIFT_SIDECAR_TEST_FORK=0: no zygote")
def test_sidecars_end_with_a_zygote_killed_outright(tmp_path: Path) -> None:
    """A zygote of its own (the session's serves other tests' sidecars)."""
    own = Zygote(sidecar_environ())
    try:
        config = tmp_path / "sidecar.yaml"
        config.write_text(yaml.safe_dump(base_config(["127.0.0.1:1"])))
        with (tmp_path / "log").open("w") as log:
            child = own.fork(["run", "--config", str(config)], own.env, tmp_path, log.fileno())
        wait_until(lambda: "listening" in (tmp_path / "log").read_text(), timeout=20)
        os.kill(own.pid, signal.SIGKILL)
        wait_until(lambda: not Path(f"/proc/{child.pid}").exists() or zombie(child.pid), 20)
    finally:
        own.close()


def zombie(pid: int) -> bool:
    """Has the process exited and not been reaped yet (its parent is gone too)?"""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True
