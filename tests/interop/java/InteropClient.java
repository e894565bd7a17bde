// Interop client on the official Java library (Debian's libthrift-java 0.16).
//
// Usage: InteropClient HOST PORT binary|compact framed|buffered on|off CA_FILE|-
//
// Runs the scenario of tests/interop/test_clients.py, printing one JSON line
// per check; stops with status 1 at the first check that fails. libthrift has
// no THeader transport; "buffered" is its plain TSocket (buffered streams).
// TLS: a JDK socket that trusts the PEM CA_FILE, wrapped in libthrift's TSocket.

import java.io.FileInputStream;
import java.nio.ByteBuffer;
import java.nio.charset.StandardCharsets;
import java.security.KeyStore;
import java.security.cert.CertificateFactory;
import java.security.cert.X509Certificate;
import java.util.Arrays;
import java.util.HashMap;
import java.util.HashSet;
import java.util.List;
import java.util.Map;
import java.util.Set;
import javax.net.ssl.SSLContext;
import javax.net.ssl.SSLParameters;
import javax.net.ssl.SSLSocket;
import javax.net.ssl.TrustManagerFactory;
import org.apache.thrift.TApplicationException;
import org.apache.thrift.protocol.TBinaryProtocol;
import org.apache.thrift.protocol.TCompactProtocol;
import org.apache.thrift.protocol.TMessage;
import org.apache.thrift.protocol.TMessageType;
import org.apache.thrift.protocol.TProtocol;
import org.apache.thrift.transport.TSocket;
import org.apache.thrift.transport.TTransport;
import org.apache.thrift.transport.layered.TFramedTransport;
import org.thriftsidecar.interop.*;

public final class InteropClient {
  interface Check {
    void run() throws Exception;
  }

  static String host;
  static int port;
  static String protocol;
  static String transport;
  static boolean tls;
  static String caFile;

  static String json(String s) {
    StringBuilder out = new StringBuilder("\"");
    for (char c : s.toCharArray()) {
      if (c == '"' || c == '\\') {
        out.append('\\').append(c);
      } else if (c < 0x20) {
        out.append(String.format("\\u%04x", (int) c));
      } else {
        out.append(c);
      }
    }
    return out.append('"').toString();
  }

  static void run(String check, Check body) {
    String error = null;
    try {
      body.run();
    } catch (Throwable e) {
      error = e.toString();
    }
    StringBuilder line = new StringBuilder("{\"lang\":\"java\",\"check\":").append(json(check));
    line.append(",\"ok\":").append(error == null);
    if (error != null) {
      line.append(",\"detail\":").append(json(error));
    }
    System.out.println(line.append('}'));
    System.out.flush();
    if (error != null) {
      System.exit(1);
    }
  }

  static void expect(boolean condition, String what) {
    if (!condition) {
      throw new AssertionError("expected " + what);
    }
  }

  static final class Connection {
    TTransport transport;
    TProtocol protocol;
    Interop.Client client;
  }

  static Connection open() throws Exception {
    if (!transport.equals("framed") && !transport.equals("buffered")) {
      throw new IllegalArgumentException("libthrift 0.16 has no " + transport + " transport");
    }
    TSocket socket;
    if (tls) {
      CertificateFactory certs = CertificateFactory.getInstance("X.509");
      KeyStore trust = KeyStore.getInstance(KeyStore.getDefaultType());
      trust.load(null, null);
      try (FileInputStream in = new FileInputStream(caFile)) {
        trust.setCertificateEntry("ca", (X509Certificate) certs.generateCertificate(in));
      }
      TrustManagerFactory tmf = TrustManagerFactory.getInstance(TrustManagerFactory.getDefaultAlgorithm());
      tmf.init(trust);
      SSLContext context = SSLContext.getInstance("TLS");
      context.init(null, tmf.getTrustManagers(), null);
      SSLSocket ssl = (SSLSocket) context.getSocketFactory().createSocket(host, port);
      SSLParameters params = ssl.getSSLParameters();
      params.setEndpointIdentificationAlgorithm("HTTPS");
      ssl.setSSLParameters(params);
      ssl.setSoTimeout(5000);
      ssl.startHandshake();
      socket = new TSocket(ssl);
    } else {
      socket = new TSocket(host, port, 5000);
      socket.open();
    }
    TTransport trans = transport.equals("framed") ? new TFramedTransport(socket) : socket;
    TProtocol proto =
        protocol.equals("compact") ? new TCompactProtocol(trans) : new TBinaryProtocol(trans);
    Connection c = new Connection();
    c.transport = trans;
    c.protocol = proto;
    c.client = new Interop.Client(proto);
    return c;
  }

  static void checkAdd(Interop.Client c, long a, long b, long want) throws Exception {
    long got = c.add(a, b);
    expect(got == want, "add(" + a + ", " + b + ") == " + want + ", got " + got);
  }

  static <T> Set<T> setOf(T... values) {
    return new HashSet<>(Arrays.asList(values));
  }

  static AllTypes sample() {
    Leaf leaf = new Leaf("leaf-ü", Integer.MIN_VALUE);
    List<Item> items = new java.util.ArrayList<>();
    for (long i = 0; i < 3; i++) {
      Map<String, String> attributes = new HashMap<>();
      attributes.put("k", "v");
      attributes.put("", "");
      Item item = new Item(i, "item-" + i, i * 1.5, i == 0 ? setOf() : setOf("a", "b"), attributes,
          Status.BACKORDERED);
      if (i == 0) {
        item.setDescription("zero");
      }
      items.add(item);
    }
    Map<String, List<Item>> groups = new HashMap<>();
    groups.put("all", items);
    groups.put("none", List.of());
    byte[] binary = new byte[256];
    for (int i = 0; i < 256; i++) {
      binary[i] = (byte) i;
    }
    Map<String, Long> aMap = new HashMap<>();
    aMap.put("min", Long.MIN_VALUE);
    aMap.put("max", Long.MAX_VALUE);
    Map<Integer, Set<Long>> deep0 = new HashMap<>();
    deep0.put(1, setOf(Long.MIN_VALUE, Long.MAX_VALUE));
    deep0.put(-5, setOf());
    Map<Status, List<ByteBuffer>> byStatus = new HashMap<>();
    byStatus.put(Status.AVAILABLE,
        List.of(ByteBuffer.wrap(new byte[] {0, (byte) 0xff}), ByteBuffer.wrap(new byte[0])));
    byStatus.put(Status.ARCHIVED, List.of(ByteBuffer.wrap(new byte[] {(byte) 0x80, 1})));
    Map<Byte, Double> byteToDouble = new HashMap<>();
    byteToDouble.put((byte) 127, Double.POSITIVE_INFINITY);
    byteToDouble.put((byte) -1, 0.1);
    byteToDouble.put((byte) -128, Double.MIN_VALUE);
    Inner inner = new Inner("inner", leaf, List.of(leaf, new Leaf("", 0)));
    inner.setMaybeLeaf(leaf);
    return new AllTypes()
        .setABool(true)
        .setAByte(Byte.MIN_VALUE)
        .setAnI16(Short.MAX_VALUE)
        .setAnI32(Integer.MIN_VALUE)
        .setAnI64(Long.MAX_VALUE)
        .setADouble(-Double.MAX_VALUE)
        .setAString("héllo wörld ✓ 日本語 🎉")
        .setABinary(binary)
        .setAList(List.of(0, -1, Integer.MAX_VALUE, Integer.MIN_VALUE))
        .setASet(setOf("x", "y", "ünïcode"))
        .setAMap(aMap)
        .setItemsByGroup(groups)
        .setInner(inner)
        .setStatus(Status.ARCHIVED)
        .setAUnion(Value.listValue(List.of("one", "two")))
        .setAnOptional("present")
        .setWithDefault(-1)
        .setStringWithDefault("")
        .setDeep(List.of(deep0, new HashMap<>()))
        .setBinariesByStatus(byStatus)
        .setOptionalInners(List.of(new Inner("only", leaf, List.of())))
        .setSmallNumbers(setOf(Short.MIN_VALUE, (short) 0, Short.MAX_VALUE))
        .setFlags(List.of(true, false, true))
        .setByteToDouble(byteToDouble)
        .setMatrix(List.of(List.of("a"), List.of(), List.of("b", "c")));
  }

  public static void main(String[] args) throws Exception {
    if (args.length != 6) {
      System.err.println("usage: InteropClient HOST PORT binary|compact framed|buffered on|off CA_FILE|-");
      System.exit(2);
    }
    host = args[0];
    port = Integer.parseInt(args[1]);
    protocol = args[2];
    transport = args[3];
    tls = args[4].equals("on");
    caFile = args[5];
    Connection[] conn = new Connection[1];
    run("connect", () -> conn[0] = open());
    Interop.Client c = conn[0].client;
    run("add", () -> {
      checkAdd(c, Long.MAX_VALUE - 1, 1, Long.MAX_VALUE);
      checkAdd(c, Long.MIN_VALUE + 1, -1, Long.MIN_VALUE);
    });
    run("void", c::ping);
    run("echoAll", () -> {
      AllTypes sent = sample();
      AllTypes got = c.echoAll(sent);
      expect(got.getAnI64() == Long.MAX_VALUE && got.getAByte() == Byte.MIN_VALUE
          && got.getADouble() == -Double.MAX_VALUE && Arrays.equals(got.getABinary(), sent.getABinary())
          && got.getAMap().get("min") == Long.MIN_VALUE, "base types at their limits back unchanged");
      expect(got.equals(sent), "echoAll to return every field unchanged, got " + got);
    });
    run("items", () -> {
      Item item = c.getItem(4);
      expect(item.getId() == 4 && item.getName().equals("item-4") && item.getPrice() == 6.0
          && item.getTags().equals(setOf("even")) && item.getAttributes().equals(Map.of("id", "4"))
          && item.getStatus() == Status.AVAILABLE && "the item numbered 4".equals(item.getDescription()),
          "getItem(4) fields, got " + item);
      List<Item> listed = c.listItems(3);
      expect(listed.size() == 3 && listed.get(0).getId() == 1 && listed.get(2).getId() == 3
          && !listed.get(2).isSetDescription(), "listItems(3), got " + listed);
      OrderReceipt receipt = c.placeOrder(new Order("c", List.of(new OrderLine(2, 3))));
      expect(receipt.getCustomer().equals("c") && receipt.getTotal() == 9.0 && receipt.getItemCount() == 3
          && receipt.getOrderId() > 0, "placeOrder receipt, got " + receipt);
    });
    run("declaredExceptions", () -> {
      try {
        c.getItem(-7);
        expect(false, "NotFound");
      } catch (NotFound e) {
        expect(e.getId() == -7 && e.getMessage().equals("no item -7"), "NotFound(-7), got " + e);
      }
      try {
        c.getItem(interopConstants.BUSY_ITEM_ID);
        expect(false, "ServiceBusy");
      } catch (ServiceBusy e) {
        expect(e.getMessage().equals("busy, try later") && e.getRetryAfterMs() == 50, "ServiceBusy, got " + e);
      }
      try {
        c.placeOrder(new Order("x", List.of()));
        expect(false, "InvalidOrder");
      } catch (InvalidOrder e) {
        expect(e.getReason().equals("an order needs at least one line"), "InvalidOrder, got " + e);
      }
    });
    run("undeclaredError", () -> {
      try {
        c.crash();
        expect(false, "TApplicationException");
      } catch (TApplicationException e) {
        expect(e.getType() == TApplicationException.INTERNAL_ERROR, "INTERNAL_ERROR, got " + e.getType());
      }
      checkAdd(c, 1, 2, 3);
    });
    run("oneway", () -> {
      String tag = "java-" + ProcessHandle.current().pid() + "-" + String.join("-", protocol, transport, args[4]);
      c.notify(tag);
      checkAdd(c, 40, 2, 42);
      for (int i = 0; i < 100; i++) {
        if (c.notifications().contains(tag)) {
          return;
        }
        Thread.sleep(100);
      }
      expect(false, "notify(" + tag + ") delivered within 10 s");
    });
    run("largeBinary", () -> {
      byte[] data = new byte[1 << 20];
      for (int i = 0; i < data.length; i++) {
        data[i] = (byte) (i * 7 + (i >> 8));
      }
      ByteBuffer got = c.echoBinary(ByteBuffer.wrap(data));
      byte[] back = new byte[got.remaining()];
      got.get(back);
      expect(Arrays.equals(back, data), "1 MiB back unchanged, got " + back.length + " bytes");
    });
    run("pipelined", () -> {
      // Interop.Client checks that a reply has the last seqid sent, so three
      // calls are written with the library's protocol and generated structs.
      TProtocol p = conn[0].protocol;
      for (int i = 0; i < 3; i++) {
        p.writeMessageBegin(new TMessage("add", TMessageType.CALL, 1000 + i));
        new Interop.add_args(i, 100).write(p);
        p.writeMessageEnd();
        p.getTransport().flush();
      }
      for (int i = 0; i < 3; i++) {
        TMessage m = p.readMessageBegin();
        Interop.add_result r = new Interop.add_result();
        r.read(p);
        p.readMessageEnd();
        expect(m.name.equals("add") && m.type == TMessageType.REPLY && m.seqid == 1000 + i,
            "reply " + i + " to be add/REPLY/seqid " + (1000 + i) + ", got " + m);
        expect(r.isSetSuccess() && r.getSuccess() == i + 100, "reply " + i + " == " + (i + 100) + ", got " + r);
      }
    });
    conn[0].transport.close();
    run("reconnect", () -> {
      Connection again = open();
      checkAdd(again.client, -5, 8, 3);
      again.client.ping();
      again.transport.close();
    });
  }
}
