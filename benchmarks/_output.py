"""How a benchmark hands back its results: one JSON line and a Markdown table, printed, and written to --out / --md."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional


def emit(line: str, text: str, out: Optional[Path] = None, md: Optional[Path] = None) -> None:
    """Print the JSON line and the Markdown text; write each to its file where one is given (folders made)."""
    for path, content in ((out, line + "\n"), (md, text)):
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content)
    print(line)
    print(text)


def add_run_args(ap: argparse.ArgumentParser) -> None:
    """--threads (torch threads, 2 by default: the project's CPU machine) and the two output files of `emit`."""
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, help="write the JSON line here")
    ap.add_argument("--md", type=Path, help="write the Markdown table here")
