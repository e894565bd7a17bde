"""A reload applies ``upstream.max_in_flight``, the one ``upstream`` key that needs no restart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from sidecar.app import limits
from sidecar.app.reload import kept_for_restart
from sidecar.config import SidecarConfig, load_config
from tests.support.sidecar import base_config, merged


def _load(tmp_path: Path, raw: dict[str, Any], name: str) -> SidecarConfig:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return load_config(str(path), environ={})


def test_a_new_limit_alone_needs_no_restart(tmp_path: Path) -> None:
    raw = base_config(["127.0.0.1:9"])
    old = _load(tmp_path, raw, "old.yaml")
    changed = _load(tmp_path, merged(raw, {"upstream": {"max_in_flight": 5}}), "new.yaml")
    new, ignored = kept_for_restart(old, changed)
    assert ignored == []
    assert new.upstream.max_in_flight == 5
    back, ignored = kept_for_restart(new, old)
    assert ignored == []
    assert back.upstream.max_in_flight is None


def test_a_new_limit_applies_beside_upstream_keys_that_wait_for_a_restart(
    tmp_path: Path,
) -> None:
    raw = base_config(["127.0.0.1:9"])
    old = _load(tmp_path, raw, "old.yaml")
    changed = merged(raw, {"upstream": {"max_in_flight": 5, "pool_size": 8}})
    new, ignored = kept_for_restart(old, _load(tmp_path, changed, "new.yaml"))
    assert ignored == ["upstream"]
    assert new.upstream.pool_size == old.upstream.pool_size
    assert new.upstream.max_in_flight == 5


def test_adaptive_settings_apply_on_reload_and_unchanged_ones_keep_their_state(
    tmp_path: Path,
) -> None:
    raw = base_config(["127.0.0.1:9"])
    old = _load(tmp_path, raw, "old.yaml")
    adaptive = {"upstream": {"adaptive_concurrency": {"min_concurrency": 2}}}
    new, ignored = kept_for_restart(old, _load(tmp_path, merged(raw, adaptive), "new.yaml"))
    assert ignored == []
    limit = limits.limiter(old)
    assert limit.adaptive is None
    limits.reconfigure_limiter(limit, new)
    gradient = limit.adaptive
    assert gradient is not None
    assert gradient.settings.min_concurrency == 2
    gradient.advance(0.0)  # measuring: some state to keep
    limits.reconfigure_limiter(limit, new)  # the same settings: the same controller
    assert limit.adaptive is gradient
    other = _load(tmp_path, merged(raw, {"upstream": {"adaptive_concurrency": {}}}), "3.yaml")
    limits.reconfigure_limiter(limit, other)  # other settings: measured afresh
    assert limit.adaptive is not gradient
    limits.reconfigure_limiter(limit, old)
    assert limit.adaptive is None
