"""Hedging and a reload: the new settings apply to new calls; the answer times are kept."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.app.reload import apply
from sidecar.config import SidecarConfig, load_config
from tests.support.clients import thriftpy2_client
from tests.support.hold import Hold, held_server
from tests.support.servers import Thriftpy2Server
from tests.support.sidecar import SidecarThread, base_config, merged

BASE: dict[str, Any] = {
    "retry": {"max_attempts": 1, "per_try_timeout": "20s", "deadline": "30s"},
    "hedge": {"min_samples": 1, "initial_delay": "10s"},
}


@pytest.fixture
def upstream() -> Iterator[tuple[Thriftpy2Server, Hold]]:
    with held_server() as upstream:
        yield upstream


def _load(tmp_path: Path, raw: dict[str, Any]) -> SidecarConfig:
    path = tmp_path / "reloaded.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_config(str(path), environ={})


def test_a_reload_turns_hedging_on_and_keeps_the_answer_times(
    upstream: tuple[Thriftpy2Server, Hold], tmp_path: Path
) -> None:
    server, hold = upstream
    p50 = base_config([server.address], **merged(BASE, {"hedge": {"delay": "p50"}}))
    off = merged(p50, {"methods": {"getItem": {"hedge": {"max_extra": 0}}}})
    budget = merged(p50, {"hedge": {"budget": {"ratio": 0.5}}})  # and getItem hedges
    with SidecarThread(off) as sc, thriftpy2_client(sc.address, "framed") as client:
        assert sc.sidecar is not None
        sidecar = sc.sidecar
        assert client.getItem(1).id == 1
        assert client.listItems(2)[1].id == 2  # listItems hedges at p50: its time is kept
        before = sc.call(lambda: sidecar.parts.server.context.hedging)  # type: ignore[union-attr]
        window = before.window("listItems")
        assert window is not None
        assert len(window) == 1

        # getItem's hedging is turned on (and the budget changed): a held call is hedged.
        assert sc.call(lambda: apply(sidecar, _load(tmp_path, budget))) == []
        after = sc.call(lambda: sidecar.parts.server.context.hedging)  # type: ignore[union-attr]
        assert after is not before
        assert after.window("listItems") is window
        assert after.budget is not before.budget
        assert after.budget.ratio == 0.5
        assert client.getItem(2).id == 2  # its first answer time: the p50 from now
        hold.arm("getItem")
        assert client.getItem(3).id == 3  # without the reload: held for 10 s
        assert sc.metrics().value("thrift_sidecar_hedges_won_total", method="getItem") == 1
        hold.release()

        # The same settings again: the budget (and its tokens spent) stays.
        assert sc.call(lambda: apply(sidecar, _load(tmp_path, budget))) == []
        again = sc.call(lambda: sidecar.parts.server.context.hedging)  # type: ignore[union-attr]
        assert again.budget is after.budget
        assert again.window("listItems") is window
