"""Price table: USD per 1M tokens for API models, USD per hour for local ones.

Defaults ship in prices.toml next to this file (the review's $/1M output-token figures); a user
file passed with --prices is merged over them, entry by entry.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_PRICES = Path(__file__).with_name("prices.toml")


class PriceError(ValueError):
    """The price file is unreadable or malformed, or a needed price is missing."""


@dataclass(frozen=True)
class Price:
    model: str
    output_per_1m: float
    input_per_1m: float = 0.0

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        return (input_tokens * self.input_per_1m + output_tokens * self.output_per_1m) / 1e6


def _key(name: str) -> str:
    return name.strip().lower().rsplit("/", 1)[-1]


class PriceTable:
    """Look up a model's price by name or alias."""

    def __init__(self, models: dict[str, dict[str, Any]], usd_per_hour: float | None = None):
        self._by_name: dict[str, Price] = {}
        for name, entry in models.items():
            try:
                price = Price(name, float(entry["output"]), float(entry.get("input", 0.0)))
            except (KeyError, TypeError, ValueError):
                raise PriceError(f"price entry {name!r} needs a numeric 'output' (USD per 1M output tokens)") from None
            for alias in [name, *entry.get("aliases", [])]:
                self._by_name[_key(alias)] = price
        self.usd_per_hour = usd_per_hour

    @classmethod
    def load(cls, user_file: str | Path | None = None) -> PriceTable:
        """Defaults, with `user_file` (TOML, same layout as prices.toml) merged over them."""
        data = _read(DEFAULT_PRICES)
        if user_file is not None:
            user = _read(Path(user_file))
            data.setdefault("models", {}).update(user.get("models", {}))
            data.setdefault("local", {}).update(user.get("local", {}))
        rate = data.get("local", {}).get("usd_per_hour")
        return cls(data.get("models", {}), float(rate) if rate is not None else None)

    def get(self, model: str) -> Price | None:
        return self._by_name.get(_key(model))


def _read(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise PriceError(f"price file not found: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise PriceError(f"price file {path} is not valid TOML: {e}") from None


def local_cost(seconds: float, usd_per_hour: float) -> float:
    """Cost of `seconds` of generation on hardware rented at `usd_per_hour`."""
    return seconds / 3600.0 * usd_per_hour
