"""``sidecar top``: a live view of a running sidecar, and the same table for the admin index.

`snapshot` reads one scrape (``/metrics`` and ``/state``) into per-method
counters; `table` turns two snapshots into rates and latency quantiles over
the interval between them; `screen` draws them as terminal text, `html` as
the admin port's index page; `live` scrapes over HTTP and redraws once an
interval. The admin server builds snapshots from its own registry, so the
index and ``sidecar top`` compute the same figures the same way.
"""
