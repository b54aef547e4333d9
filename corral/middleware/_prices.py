"""Price tables: what a model costs at one deployment, as listed on a date.

A spend cap is only as good as its prices, and prices change: every table says when it was
true (``as_of``), so a budget report can say which list it used. A deployment carries its own
table (a relay resells at its own prices); a table may hold one price for every model it
serves (``default``) or a price per model, and falls back to nothing: an unpriced model is
refused by a ``Budget`` rather than counted as free.

Costs are computed in nano-dollars (1e-9 USD), rounded up, so ledgers add integers exactly.
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Mapping
from types import MappingProxyType

import attrs

from corral.core._wire import Usage
from corral.middleware._metrics import DEFAULT_PRICES, Price

__all__ = [
    "DEFAULT_PRICE_TABLE",
    "NANO",
    "PriceTable",
    "nano",
    "usage_nano",
    "worst_case_nano",
]

#: Nano-dollars per dollar.
NANO = 1_000_000_000


def _frozen(prices: Mapping[str, Price]) -> Mapping[str, Price]:
    return MappingProxyType(dict(prices))


@attrs.frozen
class PriceTable:
    """USD per million tokens, by model, as listed on ``as_of`` (None: undated).

    ``default`` prices any model the table does not name (one price for a whole deployment).
    """

    as_of: datetime.date | None
    models: Mapping[str, Price] = attrs.field(factory=dict, converter=_frozen)
    default: Price | None = None

    def get(self, model: str | None) -> Price | None:
        """The price of ``model`` here, or None when this table does not price it."""
        if model is not None:
            price = self.models.get(model)
            if price is not None:
                return price
        return self.default


#: OpenAI's list prices (``corral.middleware.DEFAULT_PRICES``) and their date.
DEFAULT_PRICE_TABLE = PriceTable(datetime.date(2026, 11, 1), DEFAULT_PRICES)


def nano(usd: float) -> int:
    """Dollars as whole nano-dollars, rounded up (a cost is never rounded down)."""
    return math.ceil(usd * NANO - 1e-6)


def usage_nano(price: Price, usage: Usage) -> int:
    """What ``usage`` cost at ``price`` (cached prompt and reasoning tokens at their rates)."""
    return nano(price.usd(usage))


def worst_case_nano(price: Price, prompt_tokens: int, max_output_tokens: int) -> int:
    """The most a call can cost: every prompt token at the dearer of the input rates, every
    output token at the dearer of the output and reasoning rates."""
    input_rate = max(price.input, price.cached_input or 0.0)
    output_rate = max(price.output, price.reasoning or 0.0)
    return nano((prompt_tokens * input_rate + max_output_tokens * output_rate) / 1e6)
