"""Sans-I/O Thrift binary protocol: envelopes, message boundaries, skipping, exceptions.

Nothing in this package touches a socket, a clock, a random source or an event
loop; it turns bytes into message boundaries and back, and is tested with byte
strings alone.
"""
