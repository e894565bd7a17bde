"""The log, read from a real sidecar's output: one line per event an operator acts on.

Breaker transitions, ejections, config reloads (applied, rejected, needing a
restart) and protocol errors each make one line; a flood of protocol errors
makes at most a burst of lines, a "suppressing" notice and a summary with the
count; a fallback served is a debug line. ``--log-format json`` writes one
JSON object per line; ``text`` writes readable lines; ``--log-level`` filters.
"""

from __future__ import annotations

import copy
import json
import logging
import re
import signal
import time
from typing import Any

import pytest
import thriftpy2.thrift

from sidecar import logs
from sidecar.logs import DEFAULT_BURST, DEFAULT_PERIOD
from sidecar.protocol.envelope import MessageType, encode_header, parse_header
from tests.support.clients import thriftpy2_client
from tests.support.ops import (
    GARBAGE,
    PREFIX,
    json_log,
    log_lines,
    rig,
    sample,
    scrape,
    send_garbage,
)
from tests.support.raw import raw_call
from tests.support.servers import thriftpy2_server
from tests.support.sidecar import free_port, run_sidecar
from tests.support.wait import wait_until

TAE = thriftpy2.thrift.TApplicationException
FLOOD = 1_000
JSON_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
TEXT_LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR)\s+sidecar[.\w]*: .+$"
)


def _messages(records: list[dict[str, Any]], pattern: str) -> list[dict[str, Any]]:
    return [r for r in records if re.search(pattern, r["message"])]


def test_json_lines_for_every_event_an_operator_acts_on() -> None:
    dead = f"127.0.0.1:{free_port()}"  # nothing listens: connect_error, then ejected
    config: dict[str, Any] = {
        "upstream": {"ejection": {"consecutive_failures": 2, "base_time": "5m"}},
        "breaker": {"fail_max": 2, "reset_timeout": "5m"},
        "retry": {"budget": {"min_retries_per_second": 1000}},
        "fallback": {"serve_on": ["breaker_open"]},
    }
    args = ["--log-format", "json", "--log-level", "debug"]
    with rig(config, args=args, extra_upstreams=[dead]) as r:
        sc = r.sidecar
        proxy = r.upstream_address
        breaker = f"{proxy},{dead}"

        # A flood of garbage: a burst of lines, one notice, then (at the window's end) a count.
        flood_started = time.monotonic()
        for _ in range(FLOOD):
            send_garbage(sc.address)
        wait_until(
            lambda: (
                sample(scrape(sc), PREFIX + "protocol_errors", "_total", kind="garbage") == FLOOD
            ),
            message="every garbage connection counted",
        )

        with thriftpy2_client(sc.address, "framed") as c:
            # The dead address fails twice and is ejected; every call still succeeds.
            for _ in range(10):
                assert c.getItem(1).id == 1
                if sample(scrape(sc), PREFIX + "upstream_ejected", upstream=dead) == 1:
                    break
            assert sample(scrape(sc), PREFIX + "upstream_ejected", upstream=dead) == 1

            # Two failures open the breaker; then a cached reply is served.
            r.proxy.plan.extend_schedule(["internal_error", "internal_error"])
            for _ in range(2):
                with pytest.raises(TAE):
                    c.getItem(3)
            assert c.getItem(1).id == 1

        # Reloads: unchanged, rejected, and one that needs a restart.
        def reloads(result: str) -> float | None:
            return sample(scrape(sc), PREFIX + "config_reloads", "_total", result=result)

        sc.signal(signal.SIGHUP)
        wait_until(lambda: reloads("ok") == 1, message="first reload")
        sc.write_config("retry: {max_attempts: many}\n")
        sc.signal(signal.SIGHUP)
        wait_until(lambda: reloads("error") == 1, message="rejected reload")
        moved = copy.deepcopy(sc.config)
        moved["listen"] = f"127.0.0.1:{free_port()}"
        moved["retry"]["max_attempts"] = 2
        sc.write_config(moved)
        sc.signal(signal.SIGHUP)
        wait_until(lambda: reloads("ok") == 2, message="second reload")

        # The flood's summary comes when its window ends.
        wait_until(
            lambda: _messages(json_log(sc), r"protocol error lines suppressed"),
            timeout=DEFAULT_PERIOD + 10,
            message="suppression summary",
        )
        flood_took = time.monotonic() - flood_started
        records = json_log(sc)

    for record in records:
        assert {"time", "level", "logger", "message"} <= set(record), record
        assert JSON_TIME.match(record["time"]), record
        assert record["level"] in ("debug", "info", "warning", "error"), record
        assert record["logger"].startswith("sidecar"), record

    # Protocol errors: at most a burst per window, then a notice and a count.
    closing = _messages(records, r"^closing client 127\.0\.0\.1:\d+: .*\(garbage\)$")
    notices = _messages(records, r"^more than \d+ protocol error lines in \d+s: suppressing")
    summaries = _messages(records, r"^\d+ protocol error lines suppressed in the last [\d.]+s$")
    windows = 1 + int(flood_took // DEFAULT_PERIOD)
    assert 1 <= len(closing) <= DEFAULT_BURST * windows
    assert {c["kind"] for c in closing} == {"garbage"}
    assert all(c["level"] == "warning" and c["logger"] == "sidecar.server" for c in closing)
    assert 1 <= len(notices) <= windows
    assert len(closing) + sum(s["suppressed"] for s in summaries) == FLOOD
    assert len(records) < 100, "the flood flooded the log"

    [ejected] = _messages(records, r"^upstream address .* ejected for")
    assert ejected["upstream"] == dead
    assert ejected["level"] == "warning"
    assert "ejected for 300s" in ejected["message"]

    [opened] = _messages(records, r"^circuit breaker ")
    assert opened["level"] == "warning"
    assert opened["logger"] == "sidecar.breaker"
    assert (opened["breaker"], opened["from_state"], opened["to_state"]) == (
        breaker,
        "closed",
        "open",
    )
    assert "for 300s" in opened["message"]

    [served] = _messages(records, r"^serving cached reply for getItem \(breaker_open\)$")
    assert served["level"] == "debug"

    [unchanged, restart] = _messages(records, r"^config reloaded")
    assert unchanged["level"] == "info"
    assert unchanged["message"] == "config reloaded (version 2): no changes applied"
    assert restart["level"] == "warning"
    assert restart["message"] == (
        "config reloaded (version 3): changed retry; changes to listen need a restart "
        "and were not applied"
    )
    assert restart["restart_needed_for"] == ["listen"]
    [rejected] = _messages(records, r"^config reload rejected")
    assert rejected["level"] == "error"
    assert "retry.max_attempts" in rejected["message"]
    assert "'many'" in rejected["message"]


def test_text_lines_and_the_log_level() -> None:
    with run_sidecar(
        [f"127.0.0.1:{free_port()}"], args=["--log-format", "text", "--log-level", "warning"]
    ) as sc:
        send_garbage(sc.address, GARBAGE)
        wait_until(lambda: "closing client" in sc.log(), message="the protocol error line")
        sc.stop()
        lines = log_lines(sc)
    for line in lines:
        assert TEXT_LINE.match(line), line
    [closing] = [line for line in lines if "closing client" in line]
    assert re.search(r" WARNING sidecar\.server: closing client 127\.0\.0\.1:\d+: ", closing)
    assert closing.endswith("(garbage)")
    assert not [line for line in lines if " INFO " in line or " DEBUG " in line]


def test_info_is_the_default_and_says_what_happens_at_start_and_stop() -> None:
    with run_sidecar([f"127.0.0.1:{free_port()}"]) as sc:
        assert sc.stop() == 0
        lines = log_lines(sc)
    for line in lines:
        assert TEXT_LINE.match(line), line
    text = "\n".join(lines)
    assert " INFO    sidecar: thrift-sidecar " in text
    assert " listening on 127.0.0.1:" in text
    assert "SIGTERM received: shutting down" in text
    assert "draining" in text
    assert lines[-1].endswith(" INFO    sidecar: stopped")
    assert " DEBUG " not in text


def test_rate_limiter_windows_with_a_fake_clock(caplog: pytest.LogCaptureFixture) -> None:
    """Burst, notice, summary on the next window; counts add up; no loop needed."""
    from sidecar.logs import RateLimitedLog

    now = [100.0]
    logger = logging.getLogger("tests.ops.ratelimit")
    limited = RateLimitedLog(logger, burst=3, period=10.0, what="test lines", clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger=logger.name):
        written = [limited.warning("line %d", i) for i in range(8)]
        assert written == [True] * 3 + [False] * 5
        now[0] += 9.9  # same window
        assert limited.warning("late") is False
        now[0] += 0.2  # next window: the summary, then the line itself
        assert limited.warning("next window") is True
        limited.flush()  # nothing suppressed since: writes nothing
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "line 0",
        "line 1",
        "line 2",
        "more than 3 test lines in 10s: suppressing them for 10.0s",
        "6 test lines suppressed in the last 10.0s",
        "next window",
    ]
    assert limited.suppressed_total == 6


def test_the_access_log_one_line_per_call_sampled_without_payload() -> None:
    secret = "a-payload-that-must-never-be-logged"
    access = {"log": {"format": "json", "access": {"sample_rate": 1}}}
    with (
        thriftpy2_server("framed") as upstream,
        run_sidecar([upstream.address], config=access) as sc,
        thriftpy2_client(sc.address, "framed") as client,
    ):
        assert client.add(1, 2) == 3
        assert client.getItem(4).id == 4
        assert client.echoBinary(secret.encode()) == secret.encode()

        def lines() -> list[dict[str, Any]]:
            return [r for r in json_log(sc) if r["logger"] == "sidecar.access"]

        found = wait_until(lambda: len(lines()) == 3 and lines(), message="three access lines")
    assert [r["method"] for r in found] == ["add", "getItem", "echoBinary"]
    for record in found:
        assert record["outcome"] == "ok"
        assert record["attempts"] == 1
        assert record["upstream"] == upstream.address
        assert 0 < record["duration_ms"] < 10_000
        assert record["fallback"] is None
        assert isinstance(record["seqid"], int)
    assert secret not in sc.log()


def test_no_access_log_by_default() -> None:
    with (
        thriftpy2_server("framed") as upstream,
        run_sidecar([upstream.address], config={"log": {"format": "json"}}) as sc,
        thriftpy2_client(sc.address, "framed") as client,
    ):
        for i in range(20):
            assert client.add(i, 1) == i + 1
        assert not [r for r in json_log(sc) if r["logger"] == "sidecar.access"]


def test_a_workers_json_lines_carry_its_index(capsys: pytest.CaptureFixture[str]) -> None:
    try:
        logs.set_worker(1)
        logs.configure_logging("info", "json")
        logging.getLogger("sidecar.test").info("hello", extra={"peer": "p"})
        line = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
        assert (line["message"], line["worker"], line["peer"]) == ("hello", 1, "p")
    finally:
        logs._worker = None
        logs.configure_logging("info", "text")


def test_a_text_line_stays_one_line_whatever_it_quotes(capsys: pytest.CaptureFixture[str]) -> None:
    try:
        logs.configure_logging("info", "text")
        logging.getLogger("sidecar.test").warning("quoted %s", "a\r\nb\tc\x1b[31md\x7f")
        err = capsys.readouterr().err
        assert err.count("\n") == 1  # the record's own line end only
        assert err.rstrip("\n").endswith("quoted a\\r\\nb\\tc\\x1b[31md\\x7f")
    finally:
        logs.configure_logging("info", "text")


def test_a_method_name_cannot_forge_a_log_line() -> None:
    """A client's method name with a line break, logged by the access log in text format,
    stays inside its own line: no line of the log starts with what the client wrote."""
    forged = "2030-01-01 00:00:00,000 ERROR   sidecar.server: forged by a client"
    name = "getItem\n" + forged
    access = {"log": {"format": "text", "access": {"sample_rate": 1}}}
    with (
        thriftpy2_server("framed") as upstream,
        run_sidecar([upstream.address], config=access) as sc,
    ):
        call = encode_header(name, MessageType.CALL, 7) + b"\x00"
        reply = raw_call(sc.address, call, "framed")
        assert parse_header(reply).name == name  # proxied byte for byte
        wait_until(lambda: "getItem\\n2030" in sc.log(), message="the access line")
        assert not [line for line in sc.log().splitlines() if line.startswith(forged[:10])]
