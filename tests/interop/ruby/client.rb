# Interop client on the official Ruby library (Debian's ruby-thrift 0.14).
#
# Usage: ruby -I GEN_DIR client.rb HOST PORT binary|compact framed|buffered on|off CA_FILE|-
#
# Runs the scenario of tests/interop/test_clients.py, printing one JSON line
# per check; stops with status 1 at the first check that fails. The library
# has no THeader transport. Its client sends every call with seqid 0 and does
# not check the reply's seqid, so "pipelined" sends three calls with seqid 0.
require 'json'
require 'openssl'
require 'set'
require 'thrift'
require 'interop'
require 'interop_constants'

if ARGV.length != 6
  warn 'usage: client.rb HOST PORT binary|compact framed|buffered on|off CA_FILE|-'
  exit 2
end
HOST, PORT, PROTOCOL, TRANSPORT, TLS_FLAG, CA_FILE = ARGV
I64_MAX = 2**63 - 1
I64_MIN = -2**63

def report(check, error)
  line = { 'lang' => 'ruby', 'check' => check, 'ok' => error.nil? }
  line['detail'] = "#{error.class}: #{error.message}" unless error.nil?
  puts JSON.generate(line)
  $stdout.flush
  exit 1 unless error.nil?
end

def run(check)
  yield
  report(check, nil)
rescue StandardError, Thrift::Exception => e
  report(check, e)
end

def expect(condition, what)
  raise "expected #{what}" unless condition
end

def open_connection
  raise ArgumentError, "ruby-thrift 0.14 has no #{TRANSPORT} transport" unless %w[framed buffered].include?(TRANSPORT)

  if TLS_FLAG == 'on'
    context = OpenSSL::SSL::SSLContext.new
    context.ca_file = CA_FILE
    context.verify_mode = OpenSSL::SSL::VERIFY_PEER
    # No read timeout: with one, the library's SSLSocket waits in select() for
    # bytes OpenSSL has already decrypted, and a framed reply's body times out.
    socket = Thrift::SSLSocket.new(HOST, PORT.to_i, nil, context)
  else
    socket = Thrift::Socket.new(HOST, PORT.to_i, 5)
  end
  transport = TRANSPORT == 'framed' ? Thrift::FramedTransport.new(socket) : Thrift::BufferedTransport.new(socket)
  protocol = PROTOCOL == 'compact' ? Thrift::CompactProtocol.new(transport) : Thrift::BinaryProtocol.new(transport)
  transport.open
  [transport, Interop::Client.new(protocol)]
end

def check_add(client, a, b, want)
  got = client.add(a, b)
  expect(got == want, "add(#{a}, #{b}) == #{want}, got #{got}")
end

def expect_raises(klass)
  yield
  raise "expected #{klass}, got a result"
rescue klass => e
  e
end

def sample
  leaf = Leaf.new(label: 'leaf-ü', weight: -2**31)
  items = (0..2).map do |i|
    Item.new(id: i, name: "item-#{i}", price: i * 1.5, tags: i.zero? ? Set.new : Set['a', 'b'],
             attributes: { 'k' => 'v', '' => '' }, status: Status::BACKORDERED,
             description: i.zero? ? 'zero' : nil)
  end
  AllTypes.new(
    aBool: true, aByte: -128, anI16: 32_767, anI32: -2**31, anI64: I64_MAX,
    aDouble: -Float::MAX, aString: 'héllo wörld ✓ 日本語 🎉',
    aBinary: (0..255).to_a.pack('C*'), aList: [0, -1, 2**31 - 1, -2**31],
    aSet: Set['x', 'y', 'ünïcode'], aMap: { 'min' => I64_MIN, 'max' => I64_MAX },
    itemsByGroup: { 'all' => items, 'none' => [] },
    inner: Inner.new(name: 'inner', leaf: leaf, leaves: [leaf, Leaf.new(label: '', weight: 0)], maybeLeaf: leaf),
    status: Status::ARCHIVED, aUnion: Value.new(:listValue, %w[one two]),
    anOptional: 'present', withDefault: -1, stringWithDefault: '',
    deep: [{ 1 => Set[I64_MIN, I64_MAX], -5 => Set.new }, {}],
    binariesByStatus: { Status::AVAILABLE => ["\x00\xff".b, ''.b], Status::ARCHIVED => ["\x80\x01".b] },
    optionalInners: [Inner.new(name: 'only', leaf: leaf, leaves: [])],
    smallNumbers: Set[-32_768, 0, 32_767], flags: [true, false, true],
    byteToDouble: { 127 => Float::INFINITY, -1 => 0.1, -128 => 5e-324 },
    matrix: [['a'], [], %w[b c]]
  )
end

transport = client = nil
run('connect') { transport, client = open_connection }
run('add') do
  check_add(client, I64_MAX - 1, 1, I64_MAX)
  check_add(client, I64_MIN + 1, -1, I64_MIN)
end
run('void') { expect(client.ping.nil?, 'ping() to return nothing') }
run('echoAll') do
  sent = sample
  got = client.echoAll(sent)
  expect(got.anI64 == I64_MAX && got.aByte == -128 && got.aDouble == -Float::MAX &&
         got.aBinary.b == sent.aBinary && got.aMap['min'] == I64_MIN, 'base types at their limits back unchanged')
  expect(got == sent, "echoAll to return every field unchanged, got #{got.inspect}")
end
run('items') do
  item = client.getItem(4)
  expect(item.id == 4 && item.name == 'item-4' && item.price == 6.0 && item.tags == Set['even'] &&
         item.attributes == { 'id' => '4' } && item.status == Status::AVAILABLE &&
         item.description == 'the item numbered 4', "getItem(4) fields, got #{item.inspect}")
  listed = client.listItems(3)
  expect(listed.map(&:id) == [1, 2, 3] && listed[2].description.nil?, "listItems(3), got #{listed.inspect}")
  receipt = client.placeOrder(Order.new(customer: 'c', lines: [OrderLine.new(itemId: 2, quantity: 3)]))
  expect(receipt.customer == 'c' && receipt.total == 9.0 && receipt.itemCount == 3 && receipt.orderId.positive?,
         "placeOrder receipt, got #{receipt.inspect}")
end
run('declaredExceptions') do
  e = expect_raises(NotFound) { client.getItem(-7) }
  expect(e.id == -7 && e.message == 'no item -7', "NotFound(-7), got #{e.inspect}")
  e = expect_raises(ServiceBusy) { client.getItem(BUSY_ITEM_ID) }
  expect(e.message == 'busy, try later' && e.retryAfterMs == 50, "ServiceBusy, got #{e.inspect}")
  e = expect_raises(InvalidOrder) { client.placeOrder(Order.new(customer: 'x', lines: [])) }
  expect(e.reason == 'an order needs at least one line', "InvalidOrder, got #{e.inspect}")
end
run('undeclaredError') do
  e = expect_raises(Thrift::ApplicationException) { client.crash }
  expect(e.type == Thrift::ApplicationException::INTERNAL_ERROR, "INTERNAL_ERROR, got #{e.type}")
  check_add(client, 1, 2, 3)
end
run('oneway') do
  tag = "ruby-#{Process.pid}-#{PROTOCOL}-#{TRANSPORT}-#{TLS_FLAG}"
  client.notify(tag)
  check_add(client, 40, 2, 42)
  delivered = (1..100).any? do
    found = client.notifications.include?(tag)
    sleep 0.1 unless found
    found
  end
  expect(delivered, "notify(#{tag}) delivered within 10 s")
end
run('largeBinary') do
  data = Array.new(1 << 20) { |i| (i * 7 + (i >> 8)) & 0xff }.pack('C*')
  got = client.echoBinary(data)
  expect(got.b == data, "1 MiB back unchanged, got #{got.bytesize} bytes")
end
run('pipelined') do
  3.times { |i| client.send_add(i, 100) }
  3.times do |i|
    got = client.recv_add
    expect(got == i + 100, "pipelined reply #{i} == #{i + 100}, got #{got}")
  end
end
transport.close
run('reconnect') do
  again, again_client = open_connection
  check_add(again_client, -5, 8, 3)
  again_client.ping
  again.close
end
