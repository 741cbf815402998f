"""`mar-rt` sub-command module (simulate): defines `register(app)`."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this module's command(s) to the app (filled in by its issue)."""
