"""What the Redis fallback store keeps in Redis: the value layout and the batch script.

A value is a header (`HEADER`: layout, stored_at, seqid offset, argument
length), the call's argument bytes and the reply message (`encode_value`,
`decode_value`). `SCRIPT` applies one batch of queued
puts, touches and deletes (`PUT`, `TOUCH`, `DELETE`) and keeps the upstream's
entries within ``max_entries`` and ``max_bytes`` (LRU). The keys, the layout and
the constants: docs/fallback-stores.md ("Redis").
"""

from __future__ import annotations

import struct

from sidecar.fallback.store import CachedReply

# The value: layout byte (1), stored_at (float64, big-endian), seqid offset
# (uint32), argument length (uint32), then the arguments and the message:
# 17 bytes on top of them. A value of another layout is not served (and is
# deleted when read).
LAYOUT = 2
HEADER = struct.Struct(">BdII")
# Bytes counted per entry beyond key, message and arguments: the value's
# header, the key prefix and the upstream name in the key, the index and
# size-hash entries that repeat the cache key, and Redis's object headers and
# allocator slack. Measured with INFO used_memory over 10,000 entries on Redis
# 7.0 with the default key prefix: 460-530 bytes for messages of 64 B to 4 KiB
# with layout 1; layout 2's four more header bytes take a 300 B value past an
# allocator size class (587 bytes there, on a Redis of its own), hence 600
# (tests/fallback/test_redis_store.py measures it again
# for 300 B messages, prints it, and fails when it exceeds this by more than
# 10 %). L1 counts at least as much per entry (`_L1` in
# `sidecar.fallback.redis`), so that it evicts no later than Redis does.
ENTRY_OVERHEAD = 600

# Queued operations by cache key.
PUT = "P"  # (PUT, CachedReply)
TOUCH = "T"  # (TOUCH,)
DELETE = "D"  # (DELETE, prefix): delete when the value starts with prefix (b"": always)

SCRIPT = """
local idx, sizes, meta = KEYS[1], KEYS[2], KEYS[3]
local prefix = ARGV[1]
local max_entries = tonumber(ARGV[2])
local max_bytes = tonumber(ARGV[3])
local keep_ms = tonumber(ARGV[4])
local sweep = tonumber(ARGV[5])
local total = tonumber(redis.call('HGET', meta, 'bytes') or '0')
local function forget(member)
  local size = redis.call('HGET', sizes, member)
  if size then
    total = total - tonumber(size)
    redis.call('HDEL', sizes, member)
  end
  redis.call('ZREM', idx, member)
  redis.call('DEL', prefix .. member)
end
for i = 6, #ARGV, 5 do
  local kind, member = ARGV[i], ARGV[i + 1]
  if kind == 'P' then
    forget(member)
    local cost = tonumber(ARGV[i + 4])
    if cost <= max_bytes then
      local seq = redis.call('HINCRBY', meta, 'seq', 1)
      redis.call('SET', prefix .. member, ARGV[i + 2], 'PX', ARGV[i + 3])
      redis.call('ZADD', idx, seq, member)
      redis.call('HSET', sizes, member, cost)
      total = total + cost
    end
  elseif kind == 'T' then
    if redis.call('EXISTS', prefix .. member) == 1 then
      if redis.call('ZSCORE', idx, member) then
        redis.call('ZADD', idx, redis.call('HINCRBY', meta, 'seq', 1), member)
      end
    else
      forget(member)
    end
  else
    local value = redis.call('GET', prefix .. member)
    local head = ARGV[i + 2]
    if not value or string.sub(value, 1, #head) == head then
      forget(member)
    end
  end
end
local count = redis.call('ZCARD', idx)
for _, member in ipairs(redis.call('ZRANGE', idx, 0, sweep - 1)) do
  if redis.call('EXISTS', prefix .. member) == 0 then
    forget(member)
    count = count - 1
  end
end
while count > max_entries or (count > 0 and total > max_bytes) do
  local popped = redis.call('ZRANGE', idx, 0, 0)
  forget(popped[1])
  count = count - 1
end
if count == 0 then
  total = 0
end
redis.call('HSET', meta, 'bytes', total)
redis.call('PEXPIRE', idx, keep_ms)
redis.call('PEXPIRE', sizes, keep_ms)
redis.call('PEXPIRE', meta, keep_ms)
return {count, total}
"""


def encode_value(reply: CachedReply) -> bytes:
    """The Redis value of a reply (layout: `HEADER`)."""
    head = HEADER.pack(LAYOUT, reply.stored_at, reply.seqid_offset, len(reply.args))
    return b"".join((head, reply.args, reply.message))


def same_reply(a: CachedReply, b: CachedReply) -> bool:
    """Same arguments, and the same message apart from the seqid (the upstream pool chose it)."""
    offset = a.seqid_offset
    if offset != b.seqid_offset or len(a.message) != len(b.message) or a.args != b.args:
        return False
    x, y = memoryview(a.message), memoryview(b.message)
    return x[:offset] == y[:offset] and x[offset + 4 :] == y[offset + 4 :]


def decode_value(raw: bytes) -> CachedReply | None:
    """A reply from its Redis value; None if it is not one of ours."""
    if len(raw) < HEADER.size:
        return None
    layout, stored_at, offset, nargs = HEADER.unpack_from(raw)
    if layout != LAYOUT:
        return None
    start = HEADER.size + nargs
    message = raw[start:]
    if start > len(raw) or offset + 4 > len(message):
        return None
    return CachedReply(message, offset, stored_at, raw[HEADER.size : start])
