"""What the scripts writing docs/results/ share: the head every page opens with (what ran, at
which commit, when, where), the CLI runner, and the main of a per-store tables script.

A page is rewritten whole by the script that measured it, so its numbers are replaced, never
accumulated; the head says how to reproduce them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
from collections.abc import Callable
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
    threads = here["torch_threads"]
    return f"{here['cpu']}, {here['cores']} cores, torch {here['torch']} on {threads} thread{'s' * (threads != 1)}"


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


def write_table_page(
    page: Path, title: str, started_at: str, description: str, columns: list[str], rows: list[str]
) -> None:
    """Rewrite `page` whole: its head (this script's command line, the commit the run started
    at), a paragraph saying what was measured and how, and the table of `rows`."""
    script = Path(sys.argv[0]).resolve().relative_to(REPO)
    command = " ".join(["python", str(script), *sys.argv[1:]])
    page.write_text(
        "\n".join(
            [
                *head(title, command, started_at),
                description,
                "",
                "| " + " | ".join(columns) + " |",
                "| " + " | ".join("---" for _ in columns) + " |",
                *rows,
                "",
            ]
        )
    )
    print(f"wrote {page}")


def ann_mlp(*args: str) -> None:
    """Run the real CLI, as a user would, echoing the command."""
    print("+ ann-mlp", " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "ann_mlp", *args], check=True, cwd=REPO)


def current(store: Path) -> bool:
    """A store of this format version (an older one is rebuilt)."""
    from ann_mlp.config import STORE_FORMAT_VERSION

    manifest = store / "manifest.json"
    return manifest.exists() and json.loads(manifest.read_text()).get("format_version") == STORE_FORMAT_VERSION


def end_to_end(report: dict) -> str:
    """An eval report's end-to-end measures in words, for the kind of model it measured."""
    e2e = report["end_to_end"]
    if report["kind"] == "encoder":
        text = (
            f"embedding cosine {e2e['embedding_cosine_mean']:.3f} (min {e2e['embedding_cosine_min']:.3f}), "
            f"nearest-neighbour agreement {e2e['neighbour_agreement']:.3f}"
        )
        original = report.get("extra", {}).get("approx_vs_reference")
        if original:
            text += (
                f"; against {report['extra']['reference']}: cosine {original['embedding_cosine_mean']:.3f}, "
                f"agreement {original['neighbour_agreement']:.3f}"
            )
        return text
    return (
        f"next-token agreement {e2e['next_token_agreement']:.3f}, KL {e2e['kl_mean']:.4f}, "
        f"perplexity {e2e['perplexity_exact']:.1f} → {e2e['perplexity_approx']:.1f}"
    )


def store_tables_main(
    doc: str,
    script: str,
    stores: list[str],
    results: Path,
    page: Path,
    measure: Callable[[Path, list[str]], None],
    render: Callable[[Path, list[str], str], str],
) -> int:
    """The command line of a script that measures some stores and writes one page of them:
    --stores picks the stores (the page holds those alone), --table-only re-renders the last results."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table-only", action="store_true", help="rewrite the page from the last run's results")
    parser.add_argument("--stores", nargs="+", default=stores, choices=stores)
    parser.add_argument("--results", type=Path, default=results)
    args = parser.parse_args()
    command = f"python {script}" + ("" if args.stores == stores else " --stores " + " ".join(args.stores))
    if not args.table_only:
        measure(args.results, args.stores)
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(render(args.results, args.stores, command))
    print(f"wrote {page}")
    return 0
