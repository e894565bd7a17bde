/*
 * example.thrift: the demo service of thrift-sidecar (`sidecar demo`).
 *
 * A small shop catalog: three reads that are safe to repeat (getItem,
 * listItems, ping) and one write that is not (placeOrder). The sidecar's
 * example config marks `get*`, `list*` and `ping` idempotent, so only the
 * reads are retried and served from the fallback cache; an order is never
 * placed twice by a retry.
 */

namespace py catalog
namespace java org.thriftsidecar.example

enum ItemStatus {
  IN_STOCK = 1,
  OUT_OF_STOCK = 2,
  DISCONTINUED = 3,
}

/** One product of the catalog. */
struct Item {
  1: i64 id,
  2: string name,
  /** Price in cents, to keep money out of floating point. */
  3: i64 priceCents,
  4: ItemStatus status = ItemStatus.IN_STOCK,
  5: list<string> tags,
  6: optional string description,
}

struct OrderLine {
  1: i64 itemId,
  2: i32 quantity,
}

/** What a customer asks for. */
struct Order {
  1: string customer,
  2: list<OrderLine> lines,
  /** Chosen by the client; lets a server spot a duplicate submission. */
  3: optional string idempotencyKey,
}

/** The server's answer to a placed order. */
struct Receipt {
  1: i64 orderId,
  2: i64 totalCents,
  /** Unix time in milliseconds when the order was accepted. */
  3: i64 placedAtMs,
}

/** No item has this id. A business answer: never retried, never a breaker failure. */
exception ItemNotFound {
  1: i64 id,
  2: string message,
}

/** The order cannot be placed as given (unknown item, quantity below 1, no lines). */
exception InvalidOrder {
  1: string reason,
}

service Catalog {
  /** Liveness check; safe to repeat. */
  void ping(),

  /** One item by id; safe to repeat and to serve from the fallback cache. */
  Item getItem(1: i64 id) throws (1: ItemNotFound notFound),

  /** Up to `limit` items in id order; safe to repeat and to cache. */
  list<Item> listItems(1: i32 limit),

  /** Places an order: a write, NOT safe to repeat, never cached. */
  Receipt placeOrder(1: Order order) throws (1: InvalidOrder invalid, 2: ItemNotFound notFound),
}
