// Interop client on the official C++ library (Debian's libthrift 0.17).
//
// Usage: client HOST PORT binary|compact framed|buffered|header on|off CA_FILE|-
//
// Runs the scenario of tests/interop/test_clients.py, printing one JSON line
// per check; stops with status 1 at the first check that fails.
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <iostream>
#include <limits>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <unistd.h>

#include <thrift/TApplicationException.h>
#include <thrift/protocol/TBinaryProtocol.h>
#include <thrift/protocol/TCompactProtocol.h>
#include <thrift/protocol/THeaderProtocol.h>
#include <thrift/transport/TBufferTransports.h>
#include <thrift/transport/TSSLSocket.h>
#include <thrift/transport/TSocket.h>

#include "Interop.h"
#include "interop_constants.h"

using namespace apache::thrift;
using namespace apache::thrift::protocol;
using namespace apache::thrift::transport;

namespace {

struct Options {
  std::string host;
  int port;
  std::string protocol, transport, ca;
  bool tls;
};

struct Connection {
  std::shared_ptr<TTransport> transport;
  std::shared_ptr<TProtocol> protocol;
  std::unique_ptr<InteropClient> client;
};

std::string jsonString(const std::string& s) {
  std::ostringstream out;
  out << '"';
  for (unsigned char c : s) {
    if (c == '"' || c == '\\') {
      out << '\\' << c;
    } else if (c < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\u%04x", c);
      out << buf;
    } else {
      out << c;
    }
  }
  out << '"';
  return out.str();
}

void run(const std::string& check, const std::function<void()>& body) {
  std::string error;
  try {
    body();
  } catch (const std::exception& e) {
    error = std::string(typeid(e).name()) + ": " + e.what();
  }
  std::cout << "{\"lang\":\"cpp\",\"check\":" << jsonString(check)
            << ",\"ok\":" << (error.empty() ? "true" : "false");
  if (!error.empty()) {
    std::cout << ",\"detail\":" << jsonString(error);
  }
  std::cout << "}" << std::endl;
  if (!error.empty()) {
    std::exit(1);
  }
}

void expect(bool condition, const std::string& what) {
  if (!condition) {
    throw std::runtime_error("expected " + what);
  }
}

std::shared_ptr<TSSLSocketFactory> tlsFactory;

Connection open(const Options& o) {
  std::shared_ptr<TSocket> socket;
  if (o.tls) {
    if (!tlsFactory) {
      tlsFactory = std::make_shared<TSSLSocketFactory>();
      tlsFactory->loadTrustedCertificates(o.ca.c_str());
      tlsFactory->authenticate(true);
    }
    socket = tlsFactory->createSocket(o.host, o.port);
  } else {
    socket = std::make_shared<TSocket>(o.host, o.port);
  }
  socket->setConnTimeout(5000);
  socket->setRecvTimeout(5000);
  socket->setSendTimeout(5000);
  Connection c;
  if (o.transport == "header") {
    c.transport = socket;
    c.protocol = std::make_shared<THeaderProtocol>(
        socket, o.protocol == "compact" ? T_COMPACT_PROTOCOL : T_BINARY_PROTOCOL);
  } else {
    if (o.transport == "framed") {
      c.transport = std::make_shared<TFramedTransport>(socket);
    } else {
      c.transport = std::make_shared<TBufferedTransport>(socket);
    }
    if (o.protocol == "compact") {
      c.protocol = std::make_shared<TCompactProtocol>(c.transport);
    } else {
      c.protocol = std::make_shared<TBinaryProtocol>(c.transport);
    }
  }
  c.transport->open();
  c.client = std::make_unique<InteropClient>(c.protocol);
  return c;
}

void checkAdd(InteropClient& c, int64_t a, int64_t b, int64_t want) {
  int64_t got = c.add(a, b);
  expect(got == want, "add(" + std::to_string(a) + ", " + std::to_string(b) + ") == " +
                          std::to_string(want) + ", got " + std::to_string(got));
}

AllTypes sample() {
  Leaf leaf;
  leaf.__set_label("leaf-\xc3\xbc");
  leaf.__set_weight(std::numeric_limits<int32_t>::min());
  std::vector<Item> items;
  for (int64_t i = 0; i < 3; i++) {
    Item item;
    item.__set_id(i);
    item.__set_name("item-" + std::to_string(i));
    item.__set_price(i * 1.5);
    if (i) {
      item.__set_tags({"a", "b"});
    } else {
      item.__set_tags({});
      item.__set_description("zero");
    }
    item.__set_attributes({{"k", "v"}, {"", ""}});
    item.__set_status(Status::BACKORDERED);
    items.push_back(item);
  }
  Leaf empty;
  empty.__set_label("");
  empty.__set_weight(0);
  Inner inner;
  inner.__set_name("inner");
  inner.__set_leaf(leaf);
  inner.__set_leaves({leaf, empty});
  inner.__set_maybeLeaf(leaf);
  Inner only;
  only.__set_name("only");
  only.__set_leaf(leaf);
  only.__set_leaves({});
  Value value;
  value.__set_listValue({"one", "two"});
  std::string binary;
  for (int i = 0; i < 256; i++) binary.push_back(static_cast<char>(i));

  AllTypes v;
  v.__set_aBool(true);
  v.__set_aByte(std::numeric_limits<int8_t>::min());
  v.__set_anI16(std::numeric_limits<int16_t>::max());
  v.__set_anI32(std::numeric_limits<int32_t>::min());
  v.__set_anI64(std::numeric_limits<int64_t>::max());
  v.__set_aDouble(-std::numeric_limits<double>::max());
  v.__set_aString("h\xc3\xa9llo w\xc3\xb6rld \xe2\x9c\x93 \xe6\x97\xa5\xe6\x9c\xac\xe8\xaa\x9e \xf0\x9f\x8e\x89");
  v.__set_aBinary(binary);
  v.__set_aList({0, -1, std::numeric_limits<int32_t>::max(), std::numeric_limits<int32_t>::min()});
  v.__set_aSet({"x", "y", "\xc3\xbc" "n" "\xc3\xaf" "code"});
  v.__set_aMap({{"min", std::numeric_limits<int64_t>::min()}, {"max", std::numeric_limits<int64_t>::max()}});
  v.__set_itemsByGroup({{"all", items}, {"none", {}}});
  v.__set_inner(inner);
  v.__set_status(Status::ARCHIVED);
  v.__set_aUnion(value);
  v.__set_anOptional("present");
  v.__set_withDefault(-1);
  v.__set_stringWithDefault("");
  v.__set_deep({{{1, {std::numeric_limits<int64_t>::min(), std::numeric_limits<int64_t>::max()}}, {-5, {}}}, {}});
  v.__set_binariesByStatus({{Status::AVAILABLE, {std::string("\x00\xff", 2), ""}},
                            {Status::ARCHIVED, {std::string("\x80\x01", 2)}}});
  v.__set_optionalInners({only});
  v.__set_smallNumbers({std::numeric_limits<int16_t>::min(), 0, std::numeric_limits<int16_t>::max()});
  v.__set_flags({true, false, true});
  v.__set_byteToDouble({{127, std::numeric_limits<double>::infinity()}, {-1, 0.1},
                        {-128, std::numeric_limits<double>::denorm_min()}});
  v.__set_matrix({{"a"}, {}, {"b", "c"}});
  return v;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 7) {
    std::cerr << "usage: client HOST PORT binary|compact framed|buffered|header on|off CA_FILE|-\n";
    return 2;
  }
  Options o{argv[1], std::atoi(argv[2]), argv[3], argv[4], argv[6], std::string(argv[5]) == "on"};
  Connection conn;
  run("connect", [&] { conn = open(o); });
  InteropClient& c = *conn.client;
  run("add", [&] {
    checkAdd(c, std::numeric_limits<int64_t>::max() - 1, 1, std::numeric_limits<int64_t>::max());
    checkAdd(c, std::numeric_limits<int64_t>::min() + 1, -1, std::numeric_limits<int64_t>::min());
  });
  run("void", [&] { c.ping(); });
  run("echoAll", [&] {
    AllTypes sent = sample();
    AllTypes got;
    c.echoAll(got, sent);
    expect(got.anI64 == std::numeric_limits<int64_t>::max() && got.aByte == -128 &&
               got.aDouble == -std::numeric_limits<double>::max() && got.aBinary == sent.aBinary &&
               got.aMap.at("min") == std::numeric_limits<int64_t>::min(),
           "base types at their limits back unchanged");
    expect(got == sent, "echoAll to return every field unchanged");
  });
  run("items", [&] {
    Item item;
    c.getItem(item, 4);
    expect(item.id == 4 && item.name == "item-4" && item.price == 6.0 &&
               item.tags == std::set<std::string>{"even"} &&
               item.attributes == std::map<std::string, std::string>{{"id", "4"}} &&
               item.status == Status::AVAILABLE && item.__isset.description &&
               item.description == "the item numbered 4",
           "getItem(4) fields");
    std::vector<Item> listed;
    c.listItems(listed, 3);
    expect(listed.size() == 3 && listed[0].id == 1 && listed[2].id == 3 && !listed[2].__isset.description,
           "listItems(3)");
    Order order;
    order.__set_customer("c");
    OrderLine line;
    line.__set_itemId(2);
    line.__set_quantity(3);
    order.__set_lines({line});
    OrderReceipt receipt;
    c.placeOrder(receipt, order);
    expect(receipt.customer == "c" && receipt.total == 9.0 && receipt.itemCount == 3 && receipt.orderId > 0,
           "placeOrder receipt");
  });
  run("declaredExceptions", [&] {
    Item item;
    try {
      c.getItem(item, -7);
      expect(false, "NotFound");
    } catch (const NotFound& e) {
      expect(e.id == -7 && e.message == "no item -7", "NotFound(-7, 'no item -7')");
    }
    try {
      c.getItem(item, g_interop_constants.BUSY_ITEM_ID);
      expect(false, "ServiceBusy");
    } catch (const ServiceBusy& e) {
      expect(e.message == "busy, try later" && e.retryAfterMs == 50, "ServiceBusy fields");
    }
    Order order;
    order.__set_customer("x");
    order.__set_lines({});
    OrderReceipt receipt;
    try {
      c.placeOrder(receipt, order);
      expect(false, "InvalidOrder");
    } catch (const InvalidOrder& e) {
      expect(e.reason == "an order needs at least one line", "InvalidOrder reason");
    }
  });
  run("undeclaredError", [&] {
    try {
      c.crash();
      expect(false, "TApplicationException");
    } catch (const TApplicationException& e) {
      expect(e.getType() == TApplicationException::INTERNAL_ERROR, "INTERNAL_ERROR");
    }
    checkAdd(c, 1, 2, 3);
  });
  run("oneway", [&] {
    std::string tag = "cpp-" + std::to_string(getpid()) + "-" + o.protocol + "-" + o.transport + "-" + argv[5];
    c.notify(tag);
    checkAdd(c, 40, 2, 42);
    for (int i = 0; i < 100; i++) {
      std::vector<std::string> tags;
      c.notifications(tags);
      for (const auto& t : tags) {
        if (t == tag) return;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    expect(false, "notify(" + tag + ") delivered within 10 s");
  });
  run("largeBinary", [&] {
    std::string data(1 << 20, '\0');
    for (size_t i = 0; i < data.size(); i++) data[i] = static_cast<char>(i * 7 + (i >> 8));
    std::string got;
    c.echoBinary(got, data);
    expect(got == data, "1 MiB back unchanged");
  });
  run("pipelined", [&] {
    for (int64_t i = 0; i < 3; i++) c.send_add(i, 100);
    for (int64_t i = 0; i < 3; i++) {
      int64_t got = c.recv_add();
      expect(got == i + 100, "pipelined reply " + std::to_string(i) + " == " + std::to_string(i + 100));
    }
  });
  conn.transport->close();
  run("reconnect", [&] {
    Connection again = open(o);
    checkAdd(*again.client, -5, 8, 3);
    again.client->ping();
    again.transport->close();
  });
  return 0;
}
