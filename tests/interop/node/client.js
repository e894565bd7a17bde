// Interop client on the official Node.js library (npm's thrift 0.17.0).
//
// Usage: node client.js HOST PORT binary|compact framed|buffered|header on|off CA_FILE|-
//
// Runs the scenario of tests/interop/test_clients.py, printing one JSON line
// per check; stops with status 1 at the first check that fails. THeader is
// the library's THeaderProtocol over its buffered transport (a THeaderTransport).
'use strict';

const fs = require('fs');
const path = require('path');
const thrift = require('thrift');
const Int64 = thrift.Int64;
const Interop = require(path.join(__dirname, 'gen-nodejs', 'Interop'));
const types = require(path.join(__dirname, 'gen-nodejs', 'interop_types'));

const [host, portText, protocol, transport, tlsFlag, caFile] = process.argv.slice(2);
if (process.argv.length !== 8) {
  process.stderr.write('usage: client.js HOST PORT binary|compact framed|buffered|header on|off CA_FILE|-\n');
  process.exit(2);
}
const port = Number(portText);
const CALL_TIMEOUT_MS = 5000;
const Thrift = thrift.Thrift;
const I64_MAX = new Int64('7fffffffffffffff');
const I64_MIN = new Int64('8000000000000000');

function report(check, error) {
  const line = { lang: 'node', check, ok: !error };
  if (error) line.detail = String(error && error.stack ? error.stack.split('\n').slice(0, 3).join(' | ') : error);
  process.stdout.write(JSON.stringify(line) + '\n');
  if (error) process.exit(1);
}

async function run(check, body) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`no answer within ${CALL_TIMEOUT_MS} ms`)), CALL_TIMEOUT_MS * 3);
  });
  try {
    await Promise.race([body(), timeout]);
    report(check, null);
  } catch (e) {
    report(check, e);
  } finally {
    clearTimeout(timer);
  }
}

function expect(condition, what) {
  if (!condition) throw new Error('expected ' + what);
}

// A connection and its client; any connection error fails the check running.
function open() {
  return new Promise((resolve, reject) => {
    const options = {
      transport: transport === 'framed' ? thrift.TFramedTransport : thrift.TBufferedTransport,
      protocol: transport === 'header' ? thrift.THeaderProtocol
        : protocol === 'compact' ? thrift.TCompactProtocol : thrift.TBinaryProtocol,
      connect_timeout: CALL_TIMEOUT_MS,
      max_attempts: 1,
    };
    let connection;
    if (tlsFlag === 'on') {
      connection = thrift.createSSLConnection(host, port, Object.assign(options, { ca: fs.readFileSync(caFile) }));
    } else {
      connection = thrift.createConnection(host, port, options);
    }
    connection.on('error', (err) => reject(err));
    connection.on('connect', () => {
      const client = thrift.createClient(Interop, connection);
      if (transport === 'header' && protocol === 'compact') {
        client.output.setProtocolId(2);  // THeaderTransport.SubprotocolId.COMPACT
      }
      connection.on('error', (err) => report('connection', err));
      resolve({ connection, client });
    });
  });
}

// A comparable form: Int64 and Buffer as hex, sets sorted, unset fields dropped.
const SET_FIELDS = new Set(['aSet', 'smallNumbers', 'tags']);
function canonical(value, sortAsSet) {
  if (value === null || value === undefined) return null;
  if (value instanceof Int64) return { i64: value.toOctetString() };
  if (Buffer.isBuffer(value)) return { binary: value.toString('hex') };
  if (typeof value === 'number') return Number.isFinite(value) ? value : String(value);
  if (Array.isArray(value)) {
    const items = value.map((v) => canonical(v, false));
    if (sortAsSet) items.sort((a, b) => (JSON.stringify(a) < JSON.stringify(b) ? -1 : 1));
    return items;
  }
  if (typeof value === 'object') {
    const out = {};
    for (const key of Object.keys(value).sort()) {
      if (value[key] === null || value[key] === undefined) continue;
      out[key] = canonical(value[key], SET_FIELDS.has(key));
    }
    return out;
  }
  return value;
}

function sample() {
  const leaf = new types.Leaf({ label: 'leaf-ü', weight: -2147483648 });
  const items = [0, 1, 2].map((i) => new types.Item({
    id: new Int64(i), name: `item-${i}`, price: i * 1.5, tags: i ? ['a', 'b'] : [],
    attributes: { k: 'v', '': '' }, status: types.Status.BACKORDERED, description: i ? null : 'zero',
  }));
  const inner = new types.Inner({ name: 'inner', leaf, leaves: [leaf, new types.Leaf({ label: '', weight: 0 })], maybeLeaf: leaf });
  return new types.AllTypes({
    aBool: true, aByte: -128, anI16: 32767, anI32: -2147483648, anI64: I64_MAX,
    aDouble: -Number.MAX_VALUE, aString: 'héllo wörld ✓ 日本語 🎉',
    aBinary: Buffer.from(Array.from({ length: 256 }, (_, i) => i)),
    aList: [0, -1, 2147483647, -2147483648], aSet: ['x', 'y', 'ünïcode'],
    aMap: { min: I64_MIN, max: I64_MAX }, itemsByGroup: { all: items, none: [] }, inner,
    status: types.Status.ARCHIVED, aUnion: new types.Value({ listValue: ['one', 'two'] }),
    anOptional: 'present', withDefault: -1, stringWithDefault: '',
    deep: [{ 1: [I64_MIN, I64_MAX], '-5': [] }, {}],
    binariesByStatus: { [types.Status.AVAILABLE]: [Buffer.from([0x00, 0xff]), Buffer.alloc(0)], [types.Status.ARCHIVED]: [Buffer.from([0x80, 0x01])] },
    optionalInners: [new types.Inner({ name: 'only', leaf, leaves: [] })],
    smallNumbers: [-32768, 0, 32767], flags: [true, false, true],
    byteToDouble: { 127: Infinity, '-1': 0.1, '-128': Number.MIN_VALUE },
    matrix: [['a'], [], ['b', 'c']],
  });
}

function sortDeepSets(v) {
  for (const m of v.deep || []) {
    for (const k of Object.keys(m)) m[k] = [...m[k]].sort((a, b) => (a.toOctetString() < b.toOctetString() ? -1 : 1));
  }
  return v;
}

async function expectThrows(promise, cls, check) {
  try {
    await promise;
  } catch (e) {
    expect(e instanceof cls, `${cls.name}, got ${e}`);
    check(e);
    return;
  }
  throw new Error(`expected ${cls.name}, got a result`);
}

function i64Equals(value, want) {
  const v = value instanceof Int64 ? value : new Int64(value);
  return v.toOctetString() === want.toOctetString();
}

async function main() {
  let conn;
  await run('connect', async () => { conn = await open(); });
  const c = conn.client;
  await run('add', async () => {
    expect(i64Equals(await c.add(new Int64('7ffffffffffffffe'), 1), I64_MAX), 'add(MAX-1, 1) == MAX');
    expect(i64Equals(await c.add(new Int64('8000000000000001'), -1), I64_MIN), 'add(MIN+1, -1) == MIN');
  });
  await run('void', async () => { expect((await c.ping()) == null, 'ping() to return nothing'); });
  await run('echoAll', async () => {
    const sent = sample();
    const got = await c.echoAll(sent);
    expect(i64Equals(got.anI64, I64_MAX) && got.aByte === -128 && got.aDouble === -Number.MAX_VALUE
      && Buffer.compare(got.aBinary, sent.aBinary) === 0 && i64Equals(got.aMap.min, I64_MIN),
    'base types at their limits back unchanged');
    const a = JSON.stringify(canonical(sortDeepSets(got)));
    const b = JSON.stringify(canonical(sortDeepSets(sample())));
    expect(a === b, `echoAll to return every field unchanged:\n got ${a}\nsent ${b}`);
  });
  await run('items', async () => {
    const item = await c.getItem(4);
    expect(i64Equals(item.id, new Int64(4)) && item.name === 'item-4' && item.price === 6.0
      && JSON.stringify(item.tags) === '["even"]' && JSON.stringify(item.attributes) === '{"id":"4"}'
      && item.status === types.Status.AVAILABLE && item.description === 'the item numbered 4', `getItem(4) fields, got ${JSON.stringify(item)}`);
    const listed = await c.listItems(3);
    expect(listed.length === 3 && i64Equals(listed[0].id, new Int64(1)) && i64Equals(listed[2].id, new Int64(3))
      && listed[2].description == null, 'listItems(3)');
    const receipt = await c.placeOrder(new types.Order({ customer: 'c', lines: [new types.OrderLine({ itemId: 2, quantity: 3 })] }));
    expect(receipt.customer === 'c' && receipt.total === 9.0 && receipt.itemCount === 3
      && receipt.orderId.toNumber(true) > 0, `placeOrder receipt, got ${JSON.stringify(receipt)}`);
  });
  await run('declaredExceptions', async () => {
    await expectThrows(c.getItem(-7), types.NotFound, (e) => expect(i64Equals(e.id, new Int64(-7)) && e.message === 'no item -7', 'NotFound(-7)'));
    await expectThrows(c.getItem(types.BUSY_ITEM_ID), types.ServiceBusy, (e) => expect(e.message === 'busy, try later' && e.retryAfterMs === 50, 'ServiceBusy fields'));
    await expectThrows(c.placeOrder(new types.Order({ customer: 'x', lines: [] })), types.InvalidOrder, (e) => expect(e.reason === 'an order needs at least one line', 'InvalidOrder reason'));
  });
  await run('undeclaredError', async () => {
    await expectThrows(c.crash(), Thrift.TApplicationException, (e) => expect(e.type === Thrift.TApplicationExceptionType.INTERNAL_ERROR, `INTERNAL_ERROR, got ${e.type}`));
    expect(i64Equals(await c.add(1, 2), new Int64(3)), 'add(1, 2) == 3 after the error');
  });
  await run('oneway', async () => {
    const tag = `node-${process.pid}-${protocol}-${transport}-${tlsFlag}`;
    await c.notify(tag);
    expect(i64Equals(await c.add(40, 2), new Int64(42)), 'add(40, 2) == 42 after oneway');
    for (let i = 0; i < 100; i++) {
      if ((await c.notifications()).includes(tag)) return;
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
    throw new Error(`notify(${tag}) not delivered within 10 s`);
  });
  await run('largeBinary', async () => {
    const data = Buffer.alloc(1 << 20);
    for (let i = 0; i < data.length; i++) data[i] = (i * 7 + (i >> 8)) & 0xff;
    const got = await c.echoBinary(data);
    expect(Buffer.compare(got, data) === 0, `1 MiB back unchanged, got ${got.length} bytes`);
  });
  await run('pipelined', async () => {
    // Three calls written before any reply arrives; each promise gets its own answer.
    const replies = await Promise.all([0, 1, 2].map((i) => c.add(i, 100)));
    replies.forEach((r, i) => expect(i64Equals(r, new Int64(i + 100)), `reply ${i} == ${i + 100}, got ${r}`));
  });
  conn.connection.end();
  await run('reconnect', async () => {
    const again = await open();
    expect(i64Equals(await again.client.add(-5, 8), new Int64(3)), 'add(-5, 8) == 3');
    await again.client.ping();
    again.connection.end();
  });
  process.exit(0);
}

main().catch((e) => report('unexpected', e));
