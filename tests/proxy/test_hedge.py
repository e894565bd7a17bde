"""`Hedging`: how long a call waits before its hedge, fixed or from recent answer times.

And `hedge_copy`: the hedge is written from bytes of its own, so patching its
seqid never touches bytes a transport may still hold for the first attempt.
"""

from __future__ import annotations

from sidecar.config.hedge import HedgeDelay, parse_hedge_delay
from sidecar.protocol.auto import decoder_for
from sidecar.protocol.framing import Transport, frame, make_decoder
from sidecar.protocol.theader import THeaderFrame, encode_theader
from sidecar.proxy.hedge import MAX_WINDOWS, HedgePlan, Hedging, hedge_copy
from sidecar.proxy.translate import set_theader_headers
from sidecar.resilience.budget import RetryBudget
from tests.support.raw import encode_call


def hedging(initial: float = 0.05, min_samples: int = 20) -> Hedging:
    return Hedging(RetryBudget(0.1, 1.0, 10.0), 200, min_samples, initial)


def test_a_fixed_delay() -> None:
    plan = HedgePlan(parse_hedge_delay("20ms"), 1)
    h = hedging()
    assert h.delay(plan, "getItem") == 0.02
    h.record(plan, "getItem", 1.0)  # not kept: a fixed plan needs no samples
    assert h.window("getItem") is None


def test_a_percentile_delay_follows_the_methods_recent_answer_times() -> None:
    plan = HedgePlan(parse_hedge_delay("p90"), 1)
    h = hedging(initial=0.05, min_samples=20)
    assert h.delay(plan, "getItem") == 0.05  # nothing measured: initial_delay
    for _ in range(19):
        h.record(plan, "getItem", 0.004)
    assert h.delay(plan, "getItem") == 0.05  # 19 < min_samples
    h.record(plan, "getItem", 0.004)
    assert h.delay(plan, "getItem") == 0.004
    # The upstream slows down: after the window has turned over, the delay follows.
    for _ in range(200):
        h.record(plan, "getItem", 0.030)
    assert h.delay(plan, "getItem") == 0.030
    # Each method has its own window.
    assert h.delay(plan, "listItems") == 0.05


def test_windows_survive_a_reload_of_the_same_size() -> None:
    plan = HedgePlan(HedgeDelay(percentile=50), 1)
    h = hedging(min_samples=1)
    h.record(plan, "getItem", 0.007)
    same = h.reconfigured(RetryBudget(0.2, 1.0, 10.0), 200, 1, 0.05)
    assert same.delay(plan, "getItem") == 0.007
    resized = h.reconfigured(RetryBudget(0.2, 1.0, 10.0), 500, 1, 0.05)
    assert resized.delay(plan, "getItem") == 0.05


def test_the_number_of_windows_is_bounded() -> None:
    plan = HedgePlan(HedgeDelay(percentile=50), 1)
    h = hedging(min_samples=1)
    for i in range(MAX_WINDOWS + 5):
        h.record(plan, f"m{i}", 0.001)
    assert h.window(f"m{MAX_WINDOWS - 1}") is not None
    assert h.window(f"m{MAX_WINDOWS}") is None


def test_a_hedge_copy_has_bytes_of_its_own() -> None:
    wire = frame(encode_call("getItem", {"id": 7}, seqid=5), Transport.FRAMED)
    [message] = make_decoder(Transport.FRAMED, 1 << 20).receive_data(wire)
    first = message.to_wire(Transport.FRAMED)
    copy = hedge_copy(message)
    copy.set_seqid(99)
    assert bytes(message.to_wire(Transport.FRAMED)) == bytes(first) == wire
    assert copy.to_wire(Transport.FRAMED) != first
    message.set_seqid(5)
    copy2 = hedge_copy(message)
    assert bytes(copy2.to_wire(Transport.FRAMED)) == wire


def test_a_hedge_copy_of_a_theader_call_has_headers_of_its_own() -> None:
    info = THeaderFrame(headers={b"client_timeout": b"500"})
    info.seqid = 5
    wire = encode_theader(info, encode_call("getItem", {"id": 7}, seqid=5))
    [message] = decoder_for(Transport.THEADER).receive_data(wire)
    assert message.theader is not None
    copy = hedge_copy(message)
    set_theader_headers(copy, 2, 100)
    copy.set_seqid(99)
    assert message.theader.seqid == 5
    assert message.theader.get_header("client_timeout") == "500"
    assert copy.theader is not None
    assert copy.theader.get_header("client_timeout") == "500"
    assert message.to_wire(Transport.THEADER) == wire
    assert copy.to_wire(Transport.THEADER) != wire
