"""What the terminal views share: the colours of statuses, and rows that hold data verbatim."""

from __future__ import annotations

from rich.console import RenderableType
from rich.table import Table
from rich.text import Text

__all__ = ["STATUS_STYLE", "add_row", "status_style"]

STATUS_STYLE: dict[str, str] = {
    # sagas
    "running": "blue",
    "compensating": "yellow",
    "completed": "green",
    "compensated": "cyan",
    "stuck": "bold magenta",
    "rejected": "red",
    # steps (the ones not named above)
    "pending": "dim",
    "retrying": "yellow",
    "succeeded": "green",
    "failed": "red",
    "unknown": "bold red",
    "compensation_retrying": "yellow",
}
"""A `rich` style per saga or step status value."""


def status_style(status: str) -> str:
    """The style of a saga or step status value (none for a value it does not know)."""
    return STATUS_STYLE.get(status, "")


def add_row(table: Table, *cells: RenderableType) -> None:
    """Adds a row whose text cells are shown as they are.

    `rich` reads a plain string cell as markup, so an id, a name or an error message holding
    ``[...]`` (``error=[business] ...``) would lose it or change style; each is made a `Text`.
    """
    table.add_row(*(Text(c) if isinstance(c, str) else c for c in cells))
