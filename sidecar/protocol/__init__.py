"""Sans-I/O Thrift protocols: envelopes, message boundaries, skipping, exceptions, transcoding.

Binary and compact protocols, framed, buffered and THeader transports;
detection of what a client speaks (and an answer for JSON clients, which are
not proxied). Nothing in this package touches a socket, a clock, a random
source or an event loop; it turns bytes into message boundaries and back, and
is tested with byte strings alone.
"""
