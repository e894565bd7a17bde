"""A buffered message that is slow to walk costs its own connection, in slices.

A list of empty structs costs the sidecar a step of its walk per byte (the
walk finds where an unframed message ends). The client connection walks at
most `WALK_STEPS` steps per turn of the loop and lets every other connection
run in between; the message still reaches the upstream whole, and a client
that half-closes right after sending it still gets its reply.
"""

from __future__ import annotations

import struct
import threading
import time

from tests.protocol.test_walk_budget import empty_structs_call
from tests.support.clients import thriftpy2_client
from tests.support.raw import decode_reply, raw_send
from tests.support.servers import thriftpy2_server
from tests.support.sidecar import run_sidecar

# Eight million elements: some sixteen million steps, thousands of slices.
ELEMENTS = 8_000_000


def test_a_slow_walk_is_sliced_others_are_served_and_the_call_arrives_whole() -> None:
    with (
        thriftpy2_server("buffered") as upstream,
        run_sidecar(
            [upstream.address],
            config={"retry": {"max_attempts": 1, "per_try_timeout": "30s", "deadline": "60s"}},
        ) as sidecar,
    ):
        reply: list[bytes] = []
        sender = threading.Thread(
            target=lambda: reply.append(
                raw_send(sidecar.address, empty_structs_call(ELEMENTS, seqid=77), timeout=120)
            )
        )
        sender.start()
        served_before_it_arrived = 0
        with thriftpy2_client(sidecar.address, "buffered") as good:
            deadline = time.monotonic() + 120
            while upstream.calls["ping"] == 0 and time.monotonic() < deadline:
                assert good.getItem(4).name == "item-4"
                served_before_it_arrived += 1
        sender.join(120)
        print(f"good calls served while the walk went on: {served_before_it_arrived}")
        # The good client kept being served while the big message was walked, ...
        assert served_before_it_arrived >= 5
        # ... which then reached the upstream and was answered, EOF right behind it.
        assert upstream.calls["ping"] == 1
    [data] = reply
    assert decode_reply("ping", data) is None  # a ping reply, not an error
    assert struct.unpack_from(">i", data, 8 + len("ping"))[0] == 77  # its seqid
