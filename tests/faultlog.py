"""The fault-injection suite's table: each fault test records every run here, and conftest.py's
``pytest_terminal_summary`` prints the table at the end of the pytest run (fault, runs, bit-exact, clean errors,
worst time to notice)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Row:
    runs: int = 0
    bit_exact: int = 0
    clean_errors: int = 0
    #: seconds from the fault to the moment it was noticed (a source given up, a slot freed), worst run
    worst_notice: float | None = None
    #: what "noticed" means for this fault, and the limit it must stay under
    detail: str = ""


TABLE: dict[str, Row] = {}


def record(fault: str, *, bit_exact: bool = False, clean_error: bool = False, noticed: float | None = None,
           detail: str = "") -> None:
    """One run of ``fault``: it ended bit-exact, or with a clean ``NetloaderError`` (the test checked the type), or
    neither (then the test fails, and the table shows it); ``noticed``: seconds the fault took to be noticed."""
    row = TABLE.setdefault(fault, Row())
    row.runs += 1
    row.bit_exact += bool(bit_exact)
    row.clean_errors += bool(clean_error)
    if noticed is not None:
        row.worst_notice = noticed if row.worst_notice is None else max(row.worst_notice, noticed)
    if detail:
        row.detail = detail


def lines() -> list[str]:
    if not TABLE:
        return []
    width = max(len(f) for f in TABLE)
    out = [f"{'fault':<{width}}  runs  bit-exact  clean errors  worst time to notice",
           f"{'-' * width}  ----  ---------  ------------  --------------------"]
    for fault, row in TABLE.items():
        notice = "-" if row.worst_notice is None else f"{row.worst_notice:.2f} s"
        out.append(f"{fault:<{width}}  {row.runs:>4}  {row.bit_exact:>9}  {row.clean_errors:>12}  {notice:>8}"
                   + (f"  ({row.detail})" if row.detail else ""))
    return out
