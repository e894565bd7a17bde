"""What every config section shares: the base model, key paths, outcome names.

Sections are frozen pydantic models that refuse unknown keys. A validator that
checks a whole section raises `FieldProblem` to blame one key below it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, model_validator

KeyPath = tuple[str, ...]

Outcome = Literal[
    "ok",
    "declared_exception",
    "app_exception",
    "internal_error",
    "connect_error",
    "connection_closed",
    "timeout",
    "protocol_error",
]
RetryableOutcome = Literal[
    "internal_error", "connect_error", "connection_closed", "timeout", "protocol_error"
]
FailureOutcome = RetryableOutcome


class FieldProblem(ValueError):
    """A validation problem that belongs to a key below the one being validated.

    Model validators see a whole section; raising this lets the error message
    name the exact key (``fallback.cache.path``) and its value.
    """

    def __init__(self, key: str | KeyPath, message: str, value: Any = None) -> None:
        super().__init__(message)
        self.key: KeyPath = tuple(key.split(".")) if isinstance(key, str) else key
        self.value = value


class Section(BaseModel):
    """Base of every section: frozen, unknown keys refused, null means defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _empty_means_defaults(cls, data: Any) -> Any:
        """``retry:`` with every key under it commented out is YAML null: use the defaults."""
        return {} if data is None else data
