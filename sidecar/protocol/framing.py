"""Where the protocol package's decoding names have always been importable from.

The decoders are in decoders.py (framed, buffered), theader_decoder.py and
detect.py (detection), auto.py (`AutoDecoder`, `make_decoder`, `decoder_for`); `Message` and
`Transport` in message.py.
"""

from __future__ import annotations

from sidecar.protocol.auto import AutoDecoder, decoder_for, make_decoder
from sidecar.protocol.decoders import (
    DEFAULT_MAX_MESSAGE_SIZE,
    BufferedDecoder,
    FramedDecoder,
)
from sidecar.protocol.detect import Detected, detect, detect_transport
from sidecar.protocol.message import Message, Transport, encode_frame, frame, frame_reply
from sidecar.protocol.theader_decoder import THeaderDecoder

__all__ = [
    "DEFAULT_MAX_MESSAGE_SIZE",
    "AutoDecoder",
    "BufferedDecoder",
    "Detected",
    "FramedDecoder",
    "Message",
    "THeaderDecoder",
    "Transport",
    "decoder_for",
    "detect",
    "detect_transport",
    "encode_frame",
    "frame",
    "frame_reply",
    "make_decoder",
]
