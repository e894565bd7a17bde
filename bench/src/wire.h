/*
 * Thrift binary-protocol wire helpers shared by the benchmark upstream and
 * load generator: big-endian reads and writes, envelope parsing (strict and
 * non-strict), and finding where a message ends in a byte buffer, framed or
 * buffered (unframed), without building any values.
 *
 * The compact protocol (envelope, varints, struct skipping) and the THeader
 * transport's frame header have the same kind of helpers below the binary
 * ones.
 *
 * Every parser here works on a prefix of a stream: it returns the number of
 * bytes a complete item takes, WIRE_MORE (0) when the prefix is too short to
 * tell, or WIRE_BAD (-1) when the bytes cannot be Thrift binary protocol.
 * Callers re-run it from the message start when more bytes arrive; the cost
 * is a few loads per field, since string/binary bodies are jumped over.
 */
#ifndef BENCH_WIRE_H
#define BENCH_WIRE_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define WIRE_MORE 0
#define WIRE_BAD (-1)

/* Largest message either tool accepts (matches the sidecar's default
 * max_frame_size of 16 MiB, with room to spare). */
#define WIRE_MAX_MESSAGE (64u << 20)
/* Nesting limit for containers and structs (the sidecar uses 64 as well). */
#define WIRE_MAX_DEPTH 64

/* Thrift type ids (binary protocol). */
enum {
    T_STOP = 0, T_BOOL = 2, T_BYTE = 3, T_DOUBLE = 4, T_I16 = 6, T_I32 = 8,
    T_I64 = 10, T_STRING = 11, T_STRUCT = 12, T_MAP = 13, T_SET = 14,
    T_LIST = 15, T_UUID = 16
};

/* Message types. */
enum { M_CALL = 1, M_REPLY = 2, M_EXCEPTION = 3, M_ONEWAY = 4 };

#define VERSION_1 0x80010000u
#define VERSION_MASK 0xffff0000u

static inline uint32_t rd32(const uint8_t *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

static inline void wr32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

static inline void wr16(uint8_t *p, uint16_t v) {
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}

/* Fixed sizes of the scalar types; 0 for the others. */
static inline long wire_fixed_size(int type) {
    switch (type) {
    case T_BOOL: case T_BYTE: return 1;
    case T_I16: return 2;
    case T_I32: return 4;
    case T_DOUBLE: case T_I64: return 8;
    case T_UUID: return 16;
    default: return 0;
    }
}

/* Bytes taken by one value of `type` at p[0..n). */
static inline long wire_skip(const uint8_t *p, size_t n, int type, int depth) {
    long fixed = wire_fixed_size(type);
    if (fixed) return (size_t)fixed <= n ? fixed : WIRE_MORE;
    if (depth > WIRE_MAX_DEPTH) return WIRE_BAD;
    switch (type) {
    case T_STRING: {
        if (n < 4) return WIRE_MORE;
        uint32_t len = rd32(p);
        if (len > WIRE_MAX_MESSAGE) return WIRE_BAD;
        return 4 + (size_t)len <= n ? 4 + (long)len : WIRE_MORE;
    }
    case T_STRUCT: {
        size_t at = 0;
        for (;;) {
            if (at >= n) return WIRE_MORE;
            int ftype = p[at];
            if (ftype == T_STOP) return (long)at + 1;
            if (at + 3 > n) return WIRE_MORE;
            at += 3;
            long used = wire_skip(p + at, n - at, ftype, depth + 1);
            if (used <= 0) return used;
            at += (size_t)used;
        }
    }
    case T_MAP: {
        if (n < 6) return WIRE_MORE;
        int kt = p[0], vt = p[1];
        uint32_t count = rd32(p + 2);
        if (count > WIRE_MAX_MESSAGE) return WIRE_BAD;
        size_t at = 6;
        for (uint32_t i = 0; i < count; i++) {
            long used = wire_skip(p + at, n - at, kt, depth + 1);
            if (used <= 0) return used;
            at += (size_t)used;
            used = wire_skip(p + at, n - at, vt, depth + 1);
            if (used <= 0) return used;
            at += (size_t)used;
        }
        return (long)at;
    }
    case T_SET: case T_LIST: {
        if (n < 5) return WIRE_MORE;
        int et = p[0];
        uint32_t count = rd32(p + 1);
        if (count > WIRE_MAX_MESSAGE) return WIRE_BAD;
        size_t at = 5;
        long fixed_el = wire_fixed_size(et);
        if (count && fixed_el) {
            size_t total = (size_t)count * (size_t)fixed_el;
            return at + total <= n ? (long)(at + total) : WIRE_MORE;
        }
        for (uint32_t i = 0; i < count; i++) {
            long used = wire_skip(p + at, n - at, et, depth + 1);
            if (used <= 0) return used;
            at += (size_t)used;
        }
        return (long)at;
    }
    default:
        return WIRE_BAD;
    }
}

/* A parsed message envelope; offsets are from the message start. */
struct envelope {
    int strict;          /* 1: 0x8001 version word; 0: old non-strict form */
    int type;            /* M_CALL ... */
    const uint8_t *name; /* method name bytes (not NUL-terminated) */
    uint32_t name_len;
    uint32_t seqid;
    size_t seqid_off;    /* where the seqid is, for rewriting */
    size_t body_off;     /* where the struct starts */
};

/* Parse the envelope at p[0..n). Returns the header length, WIRE_MORE or WIRE_BAD. */
static inline long wire_envelope(const uint8_t *p, size_t n, struct envelope *env) {
    if (n < 4) return WIRE_MORE;
    uint32_t first = rd32(p);
    size_t at;
    if (first & 0x80000000u) {
        if ((first & VERSION_MASK) != VERSION_1) return WIRE_BAD;
        env->strict = 1;
        env->type = (int)(first & 0xff);
        if (n < 8) return WIRE_MORE;
        env->name_len = rd32(p + 4);
        if (env->name_len > 65536) return WIRE_BAD;
        at = 8 + env->name_len;
        env->name = p + 8;
        if (n < at + 4) return WIRE_MORE;
    } else {
        env->strict = 0;
        env->name_len = first;
        if (env->name_len > 65536) return WIRE_BAD;
        env->name = p + 4;
        at = 4 + env->name_len;
        if (n < at + 5) return WIRE_MORE;
        env->type = p[at];
        at += 1;
    }
    if (env->type < M_CALL || env->type > M_ONEWAY) return WIRE_BAD;
    env->seqid = rd32(p + at);
    env->seqid_off = at;
    env->body_off = at + 4;
    return (long)env->body_off;
}

/* Length of the whole message at p[0..n) in buffered (unframed) transport. */
static inline long wire_buffered_len(const uint8_t *p, size_t n, struct envelope *env) {
    long head = wire_envelope(p, n, env);
    if (head <= 0) return head;
    long body = wire_skip(p + head, n - (size_t)head, T_STRUCT, 0);
    if (body <= 0) return body;
    if ((size_t)(head + body) > WIRE_MAX_MESSAGE) return WIRE_BAD;
    return head + body;
}

/* Length of the whole frame (4-byte length included) at p[0..n). The frame's
 * content is not checked here; call wire_envelope on p + 4. */
static inline long wire_framed_len(const uint8_t *p, size_t n) {
    if (n < 4) return WIRE_MORE;
    uint32_t len = rd32(p);
    if (len < 8 || len > WIRE_MAX_MESSAGE) return WIRE_BAD;
    return 4 + (size_t)len <= n ? 4 + (long)len : WIRE_MORE;
}

/* Write a strict envelope; returns bytes written (12 + name_len). */
static inline size_t wire_put_envelope(uint8_t *out, int type, const uint8_t *name, uint32_t name_len,
                                uint32_t seqid) {
    wr32(out, VERSION_1 | (uint32_t)type);
    wr32(out + 4, name_len);
    memcpy(out + 8, name, name_len);
    wr32(out + 8 + name_len, seqid);
    return 12 + name_len;
}

/* Write a non-strict envelope; returns bytes written (9 + name_len). */
static inline size_t wire_put_envelope_old(uint8_t *out, int type, const uint8_t *name,
                                    uint32_t name_len, uint32_t seqid) {
    wr32(out, name_len);
    memcpy(out + 4, name, name_len);
    out[4 + name_len] = (uint8_t)type;
    wr32(out + 5 + name_len, seqid);
    return 9 + name_len;
}

/* --- compact protocol ------------------------------------------------------ */

#define COMPACT_ID 0x82
#define COMPACT_VERSION 1

/* Compact type ids. */
enum {
    CT_STOP = 0, CT_TRUE = 1, CT_FALSE = 2, CT_BYTE = 3, CT_I16 = 4, CT_I32 = 5, CT_I64 = 6,
    CT_DOUBLE = 7, CT_BINARY = 8, CT_LIST = 9, CT_SET = 10, CT_MAP = 11, CT_STRUCT = 12,
    CT_UUID = 13
};

/* Read an unsigned varint (at most 10 bytes); returns its length, WIRE_MORE or WIRE_BAD. */
static inline long rd_varint(const uint8_t *p, size_t n, uint64_t *out) {
    uint64_t v = 0;
    for (size_t i = 0; i < 10; i++) {
        if (i >= n) return WIRE_MORE;
        v |= (uint64_t)(p[i] & 0x7f) << (7 * i);
        if (!(p[i] & 0x80)) {
            *out = v;
            return (long)i + 1;
        }
    }
    return WIRE_BAD;
}

/* Write an unsigned varint; returns its length (1 to 10). */
static inline size_t wr_varint(uint8_t *p, uint64_t v) {
    size_t i = 0;
    while (v >= 0x80) {
        p[i++] = (uint8_t)(v | 0x80);
        v >>= 7;
    }
    p[i++] = (uint8_t)v;
    return i;
}

/* Bytes taken by one compact value of type `ctype` at p[0..n). `in_field`:
 * a struct field's bool carries its value in the type, no byte follows. */
static inline long compact_skip(const uint8_t *p, size_t n, int ctype, int depth, int in_field) {
    uint64_t v;
    long used;
    if (depth > WIRE_MAX_DEPTH) return WIRE_BAD;
    switch (ctype) {
    case CT_TRUE: case CT_FALSE:
        if (in_field) return 0;
        return n >= 1 ? 1 : WIRE_MORE;
    case CT_BYTE: return n >= 1 ? 1 : WIRE_MORE;
    case CT_DOUBLE: return n >= 8 ? 8 : WIRE_MORE;
    case CT_UUID: return n >= 16 ? 16 : WIRE_MORE;
    case CT_I16: case CT_I32: case CT_I64: return rd_varint(p, n, &v);
    case CT_BINARY:
        used = rd_varint(p, n, &v);
        if (used <= 0) return used;
        if (v > WIRE_MAX_MESSAGE) return WIRE_BAD;
        return (size_t)used + v <= n ? used + (long)v : WIRE_MORE;
    case CT_STRUCT: {
        size_t at = 0;
        for (;;) {
            if (at >= n) return WIRE_MORE;
            int head = p[at++];
            if (head == CT_STOP) return (long)at;
            int ftype = head & 0x0f;
            if (!(head & 0xf0)) { /* long form: the field id follows as a zigzag varint */
                used = rd_varint(p + at, n - at, &v);
                if (used <= 0) return used;
                at += (size_t)used;
            }
            used = compact_skip(p + at, n - at, ftype, depth + 1, 1);
            if (used < 0 || (used == 0 && ftype != CT_TRUE && ftype != CT_FALSE))
                return used;
            at += (size_t)used;
        }
    }
    case CT_LIST: case CT_SET: case CT_MAP: {
        size_t at = 0;
        uint64_t count;
        int kt, vt = -1;
        if (ctype == CT_MAP) {
            used = rd_varint(p, n, &count);
            if (used <= 0) return used;
            at = (size_t)used;
            if (count == 0) return (long)at;
            if (at >= n) return WIRE_MORE;
            kt = p[at] >> 4;
            vt = p[at] & 0x0f;
            at++;
        } else {
            if (n < 1) return WIRE_MORE;
            kt = p[0] & 0x0f;
            count = p[0] >> 4;
            at = 1;
            if (count == 15) {
                used = rd_varint(p + 1, n - 1, &count);
                if (used <= 0) return used;
                at += (size_t)used;
            }
        }
        if (count > WIRE_MAX_MESSAGE) return WIRE_BAD;
        for (uint64_t i = 0; i < count; i++) {
            used = compact_skip(p + at, n - at, kt, depth + 1, 0);
            if (used <= 0) return used;
            at += (size_t)used;
            if (vt >= 0) {
                used = compact_skip(p + at, n - at, vt, depth + 1, 0);
                if (used <= 0) return used;
                at += (size_t)used;
            }
        }
        return (long)at;
    }
    default:
        return WIRE_BAD;
    }
}

/* Parse a compact envelope at p[0..n): 0x82, type<<5 | version, varint
 * seqid, varint name length, name. Returns the header length, WIRE_MORE or
 * WIRE_BAD. seqid_off is not meaningful (the varint's length varies). */
static inline long compact_envelope(const uint8_t *p, size_t n, struct envelope *env) {
    if (n < 2) return WIRE_MORE;
    if (p[0] != COMPACT_ID || (p[1] & 0x1f) != COMPACT_VERSION) return WIRE_BAD;
    env->strict = 1;
    env->type = p[1] >> 5;
    if (env->type < M_CALL || env->type > M_ONEWAY) return WIRE_BAD;
    uint64_t seqid, name_len;
    long used = rd_varint(p + 2, n - 2, &seqid);
    if (used <= 0) return used;
    if (seqid > 0xffffffffu) return WIRE_BAD;
    size_t at = 2 + (size_t)used;
    used = rd_varint(p + at, n - at, &name_len);
    if (used <= 0) return used;
    if (name_len > 65536) return WIRE_BAD;
    at += (size_t)used;
    if (at + name_len > n) return WIRE_MORE;
    env->seqid = (uint32_t)seqid;
    env->seqid_off = 2;
    env->name = p + at;
    env->name_len = (uint32_t)name_len;
    env->body_off = at + name_len;
    return (long)env->body_off;
}

/* Length of a whole compact message at p[0..n) in buffered transport. */
static inline long compact_buffered_len(const uint8_t *p, size_t n, struct envelope *env) {
    long head = compact_envelope(p, n, env);
    if (head <= 0) return head;
    long body = compact_skip(p + head, n - (size_t)head, CT_STRUCT, 0, 0);
    if (body <= 0) return body;
    if ((size_t)(head + body) > WIRE_MAX_MESSAGE) return WIRE_BAD;
    return head + body;
}

/* Write a compact envelope; returns bytes written (at most 12 + name_len). */
static inline size_t compact_put_envelope(uint8_t *out, int type, const uint8_t *name,
                                          uint32_t name_len, uint32_t seqid) {
    out[0] = COMPACT_ID;
    out[1] = (uint8_t)((type << 5) | COMPACT_VERSION);
    size_t at = 2 + wr_varint(out + 2, seqid);
    at += wr_varint(out + at, name_len);
    memcpy(out + at, name, name_len);
    return at + name_len;
}

/* --- THeader transport --------------------------------------------------------
 * A frame: length (4, of what follows), magic 0x0FFF (2), flags (2), seqid
 * (4), header length in 4-byte words (2), then the header: varint protocol
 * id, varint transform count and transforms, info headers, zero padding;
 * then the message. */

#define THEADER_MAGIC 0x0fff
#define THEADER_PROTO_BINARY 0
#define THEADER_PROTO_COMPACT 2

struct theader {
    uint16_t flags;
    uint32_t seqid;
    int protocol;       /* THEADER_PROTO_* */
    uint64_t transforms; /* how many; the tools accept none */
    size_t payload_off; /* where the message starts, from the frame content's start */
};

/* Parse a THeader frame's content p[0..n) (after the 4-byte length). Returns
 * the payload offset, or WIRE_BAD. Info headers are jumped over unread. */
static inline long theader_parse(const uint8_t *p, size_t n, struct theader *th) {
    if (n < 10 || p[0] != 0x0f || p[1] != 0xff) return WIRE_BAD;
    th->flags = (uint16_t)((p[2] << 8) | p[3]);
    th->seqid = rd32(p + 4);
    size_t words = (size_t)((p[8] << 8) | p[9]);
    size_t end = 10 + 4 * words;
    if (end > n) return WIRE_BAD;
    uint64_t v;
    long used = rd_varint(p + 10, end - 10, &v);
    if (used <= 0) return WIRE_BAD;
    th->protocol = (int)v;
    long more = rd_varint(p + 10 + used, end - 10 - (size_t)used, &th->transforms);
    if (more <= 0) return WIRE_BAD;
    th->payload_off = end;
    return (long)end;
}

/* Write a THeader frame prefix (length included) for a message of msg_len
 * bytes, no transforms, no info headers; returns bytes written (18). */
static inline size_t theader_put(uint8_t *out, int protocol, uint16_t flags, uint32_t seqid,
                                 size_t msg_len) {
    wr32(out, (uint32_t)(14 + msg_len));
    wr16(out + 4, THEADER_MAGIC);
    wr16(out + 6, flags);
    wr32(out + 8, seqid);
    wr16(out + 12, 1);
    out[14] = (uint8_t)protocol;
    out[15] = 0; /* no transforms */
    out[16] = 0;
    out[17] = 0;
    return 18;
}

#endif
