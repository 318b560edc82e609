"""How a benchmark hands back its results: one JSON line and a Markdown table, printed, and written to --out / --md."""

from __future__ import annotations

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
