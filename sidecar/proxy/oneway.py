"""Which methods are oneway: declared, or learned from the wire.

The message type does not say it: Apache Thrift before 0.9.3 and the official
Go library send oneway methods as CALL, and servers answer a two-way method
even when a client marked it ONEWAY. So a method is oneway when

- the IDL declares it ``oneway``, or ``methods.<name>.oneway: true`` says so
  (the policy's ``oneway``), or
- it was learned: a Thrift server answers one connection's calls in order, so
  a reply to a later call on the same upstream connection proves that an
  earlier unanswered CALL was oneway (`sidecar.proxy.upstream` tells the call,
  the call tells this table). The later call is the client's next one, or,
  when none comes soon, the sidecar's probe (`sidecar.proxy.oneway_probe`).

A method that has been answered once is two-way for good. Learned names are
bounded (`MAX_NAMES`): names come from the wire. The table outlives reloads.
"""

from __future__ import annotations

from typing import Any, Final

from sidecar.protocol.envelope import shown_name

# Most names remembered per kind; a client inventing names cannot grow the process.
MAX_NAMES: Final = 10_000


class OnewayMethods:
    """What the sidecar learned about methods that clients send as CALL."""

    __slots__ = ("learned", "two_way")

    def __init__(self) -> None:
        self.learned: set[str] = set()  # learned to be oneway (read on every call)
        self.two_way: set[str] = set()  # answered at least once (read on every reply)

    def is_oneway(self, name: str) -> bool:
        """Learned to be oneway (a CALL of it is sent without waiting for a reply)."""
        return name in self.learned

    def is_two_way(self, name: str) -> bool:
        """Answered at least once."""
        return name in self.two_way

    def answered(self, name: str) -> None:
        """A reply to a call of ``name`` arrived: it is two-way."""
        if name not in self.two_way and len(self.two_way) < MAX_NAMES:
            self.two_way.add(name)
            self.learned.discard(name)

    def unanswered(self, name: str) -> None:
        """A later call's reply came first: this CALL of ``name`` was oneway."""
        if name not in self.two_way and len(self.learned) < MAX_NAMES:
            self.learned.add(name)

    def describe(self) -> dict[str, Any]:
        """The ``oneway`` part of ``/state``."""
        return {
            "learned_oneway": sorted(shown_name(name) for name in self.learned),
            "answered_methods": len(self.two_way),
        }
