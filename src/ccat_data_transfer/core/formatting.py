"""Human-readable values shared by the command line and the web dashboard."""

from __future__ import annotations

#: Decimal (SI) byte units, smallest first.
SI_BYTE_UNITS = ("B", "kB", "MB", "GB", "TB", "PB")


def human_bytes(
    n: int | float | None, *, missing: str = "—", units: tuple[str, ...] = SI_BYTE_UNITS
) -> str:
    """``n`` bytes in decimal units (steps of 1000, up to the last of ``units``).

    Bytes are shown as a whole number, larger units with one decimal; ``None`` (an unknown
    size) is shown as ``missing``.  The dashboard and the command line both use this one
    rule, so a size reads the same wherever it is shown; only the labels differ.
    """
    if n is None:
        return missing
    value = float(n)
    for unit in units:
        if abs(value) < 1000 or unit == units[-1]:
            return f"{value:.0f} {unit}" if unit == units[0] else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} {units[-1]}"
