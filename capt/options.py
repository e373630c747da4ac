"""One way to read a config section into a dataclass: unknown keys are an error that names them."""
from __future__ import annotations

from dataclasses import asdict, fields


class Options:
    """Mixin for config dataclasses; ``SECTION`` names them in error messages."""

    SECTION = "config"

    @classmethod
    def from_dict(cls, values: dict | None):
        values = dict(values or {})
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown {cls.SECTION} option(s): {sorted(unknown)}")
        return cls(**cls._convert(values))

    @classmethod
    def _convert(cls, values: dict) -> dict:
        return values

    def to_dict(self) -> dict:
        return asdict(self)
