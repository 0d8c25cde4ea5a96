"""The head every generated page under docs/results/ opens with: what ran, at which commit, when, where.

A page is rewritten whole by the script that measured it, so its numbers are replaced, never
accumulated; the head says how to reproduce them.
"""

from __future__ import annotations

import datetime
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def commit() -> str:
    """The checked-out commit, short (read at the start of a long run: it may outlive commits)."""
    return subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO
    ).stdout.strip()


def machine_line() -> str:
    from ann_mlp.planner import machine

    here = machine()
    return f"{here['cpu']}, {here['cores']} cores, torch {here['torch']} on {here['torch_threads']} threads"


def head(title: str, command: str, at_commit: str | None = None, machine_note: str = "") -> list[str]:
    """The page's first lines: its title, then command, commit, date and machine."""
    return [
        f"# {title}",
        "",
        f"Command: `{command}`  ",
        f"Commit: {at_commit or commit()}  ",
        f"Date: {datetime.date.today().isoformat()}  ",
        f"Machine: {machine_line()}{machine_note}",
        "",
    ]
