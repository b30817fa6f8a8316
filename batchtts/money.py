"""Money as people read it: dollars to the cent from $1, smaller amounts to the digits that tell them
apart, and "?" where a price is unknown."""

from __future__ import annotations


def usd(value: float | None, exact: bool = False, cents: bool = False) -> str:
    """Dollars: to the cent from $1, else to a hundredth of a cent; `exact` adds the digits that tell
    small amounts apart ($0.019995 taken on, the next row needs $0.000009); `cents` always rounds to
    the cent (prices per million characters)."""
    if value is None:
        return "?"
    if value >= 1 or cents:
        return f"${value:,.2f}"
    digits = f"{value:.6f}".rstrip("0")
    return "$" + (digits if exact and len(digits.split(".")[1]) > 4 else f"{value:.4f}")
