"""The oneway probe's call, as each upstream transport and protocol carries it."""

from __future__ import annotations

import pytest

from sidecar.protocol.auto import decoder_for
from sidecar.protocol.envelope import MessageType, Protocol
from sidecar.protocol.message import Transport
from sidecar.proxy.oneway_probe import PROBE_NAME, probe_message


@pytest.mark.parametrize("transport", list(Transport))
@pytest.mark.parametrize("protocol", list(Protocol))
@pytest.mark.parametrize("service", ["", "Interop"])
def test_the_probe_is_a_call_with_no_arguments_in_the_upstreams_form(
    transport: Transport, protocol: Protocol, service: str
) -> None:
    probe = probe_message(service, transport, protocol)
    wire = probe.wire_with_seqid(41, transport, False)
    # What the upstream reads: one whole message, nothing left over.
    decoder = decoder_for(transport, protocol)
    (read,) = decoder.receive_data(bytes(wire))
    assert decoder.receive_data(b"") == []
    header = read.header
    assert header.name == (f"{service}:{PROBE_NAME}" if service else PROBE_NAME)
    assert header.type is MessageType.CALL
    assert header.protocol is protocol
    assert header.seqid == 41
    assert bytes(read.body()) == b"\x00"  # an empty argument struct: its stop field
