"""Call latency is measured, not rounded: sub-millisecond calls keep their sub-millisecond part.

Under uvloop the loop's clock moves in whole milliseconds, so durations read
from it are 0, 1, 2 ms ...: the 0.25 ms and 0.5 ms buckets of
request_duration_seconds were always equal and its ``_sum`` a multiple of
0.001. The sidecar (run as a user runs it, on uvloop) now measures a call on
a high-resolution clock.
"""

from __future__ import annotations

from tests.support.clients import thriftpy2_client
from tests.support.servers import thriftpy2_server
from tests.support.sidecar import run_sidecar

CALLS = 200
NAME = "thrift_sidecar_request_duration_seconds"


def test_durations_keep_their_sub_millisecond_part() -> None:
    with (
        thriftpy2_server("framed") as upstream,
        run_sidecar([upstream.address]) as sc,
        thriftpy2_client(sc.address, "framed") as client,
    ):
        for i in range(CALLS):
            assert client.add(i, 1) == i + 1
        metrics = sc.metrics()
        count = metrics.value(NAME + "_count", method="add")
        total = metrics.value(NAME + "_sum", method="add")
    assert count == CALLS
    assert total > 0
    in_ms = total * 1000
    # Whole milliseconds would leave no fraction (beyond float rounding).
    assert abs(in_ms - round(in_ms)) > 1e-6, f"_sum is {total!r}: whole milliseconds"
