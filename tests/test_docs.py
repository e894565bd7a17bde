"""The generated references cannot drift from the code.

docs/config-reference.md is generated from the config models, and
docs/metrics-reference.md from the live metrics registry.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sidecar.docs import (
    config_keys,
    key_paths,
    main,
    metric_docs,
    render_config_reference,
    render_metrics_reference,
)
from sidecar.metrics import LABEL_DOCS, PROTOCOL_ERROR_KINDS, SidecarMetrics
from sidecar.proxy import call
from sidecar.resilience import retry
from sidecar.resilience.outcome import Outcome
from tests.support.sidecar import REPO_ROOT
from tests.test_metrics import DESIGN_METRICS, MORE_METRICS

REFERENCE = REPO_ROOT / "docs" / "metrics-reference.md"
CONFIG_REFERENCE = REPO_ROOT / "docs" / "config-reference.md"


# the configuration reference


def test_every_key_has_a_description() -> None:
    keys = config_keys()
    assert len(keys) == len(key_paths()) > 60
    assert all(k.description.strip() for k in keys)


def test_config_reference_is_up_to_date() -> None:
    checked_in = CONFIG_REFERENCE.read_text()
    assert checked_in == render_config_reference(), (
        "docs/config-reference.md is stale: run "
        "`python -m sidecar.docs config --write docs/config-reference.md`"
    )
    for key in config_keys():
        heading = "." not in key.path and (key.section or key.type == "mapping of sections")
        assert (f"## `{key.path}`" if heading else f"| `{key.path}` |") in checked_in
    for variable in ("SIDECAR_REDIS_URL", "SIDECAR_UPSTREAM", "SIDECAR_LOG_FORMAT"):
        assert f"`{variable}`" in checked_in


def test_docs_check_flag_detects_drift(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stale = tmp_path / "ref.md"
    stale.write_text(render_config_reference().replace("`250ms`", "`300ms`", 1) + "x\n")
    assert main(["config", "--check", str(stale)]) == 1
    assert "out of date" in capsys.readouterr().err
    assert main(["config", "--write", str(stale)]) == 0
    assert main(["config", "--check", str(stale)]) == 0


# the metrics reference


def _exported_name(family_name: str, kind: str) -> str:
    return family_name + "_total" if kind == "counter" else family_name


def test_the_checked_in_reference_is_what_the_code_generates() -> None:
    assert REFERENCE.read_text(encoding="utf-8") == render_metrics_reference(), (
        "docs/metrics-reference.md is stale: run "
        "`python -m sidecar.docs metrics --write docs/metrics-reference.md`"
    )


def test_check_flag_passes_on_the_file_and_fails_on_a_stale_copy(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "sidecar.docs", "metrics", "--check"]
    env = {"PYTHONPATH": str(REPO_ROOT)}
    ok = subprocess.run([*command, str(REFERENCE)], env=env, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    stale = tmp_path / "metrics-reference.md"
    stale.write_text(REFERENCE.read_text().replace("| gauge |", "| counter |", 1))
    bad = subprocess.run([*command, str(stale)], env=env, capture_output=True, text=True)
    assert bad.returncode == 1
    assert "python -m sidecar.docs metrics --write docs/metrics-reference.md" in bad.stderr
    printed = subprocess.run(command[:-1], env=env, capture_output=True, text=True, check=True)
    assert printed.stdout == REFERENCE.read_text()


def test_every_metric_of_the_registry_is_documented_with_its_type_and_labels() -> None:
    metrics = SidecarMetrics()
    families = {
        _exported_name(f.name, f.type): (f.type, f.documentation)
        for f in metrics.registry.collect()
    }
    docs = {d.name: d for d in metric_docs()}
    assert set(docs) == set(families)
    text = REFERENCE.read_text()
    for name, (kind, help_text) in families.items():
        assert docs[name].type == kind
        assert docs[name].help == help_text
        labels = ", ".join(f"`{label}`" for label in metrics.label_names[name]) or "-"
        assert f"| `{name}` | {kind} | {labels} | {help_text} |" in text
    for short, kind in {**DESIGN_METRICS, **MORE_METRICS}.items():
        name = _exported_name("thrift_sidecar_" + short, kind)
        assert docs[name].type == kind, name


def test_every_label_value_the_code_uses_is_documented() -> None:
    """The values of the bounded labels, from the code, all appear in the reference."""
    text = REFERENCE.read_text()
    values = {
        *(o.value for o in Outcome),
        *call.REQUEST_OUTCOMES,
        *retry.GIVE_UP_REASONS,
        *PROTOCOL_ERROR_KINDS,
        "cache",
        "static",
        "busy",
        "idle",
        "half-open",
    }
    for value in values:
        assert f"`{value}`" in text, value
    assert set(LABEL_DOCS) >= {label for d in metric_docs() for label in d.labels}
