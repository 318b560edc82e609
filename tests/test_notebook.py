"""The quickstart notebook runs top to bottom (so it cannot rot).

It is executed with nbclient on a kernel that runs *this* interpreter: a kernelspec
pointing at `sys.executable` is written to a temporary directory and found through
JUPYTER_PATH, so the test needs no kernel installed by hand (CI's fresh venv works).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
ipykernel_spec = pytest.importorskip("ipykernel.kernelspec")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"
KERNEL = "peft-fishertune-test"


def _text_outputs(nb) -> str:
    out = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            if o.get("output_type") == "stream":
                out.append(o.get("text", ""))
            elif "data" in o and "text/plain" in o["data"]:
                out.append(o["data"]["text/plain"])
    return "\n".join(out)


def test_quickstart_notebook_executes(tmp_path, monkeypatch):
    spec_dir = tmp_path / "jupyter" / "kernels" / KERNEL
    ipykernel_spec.write_kernel_spec(str(spec_dir), overrides={"display_name": "peft-fishertune (test)"})
    argv = __import__("json").loads((spec_dir / "kernel.json").read_text())["argv"]
    assert argv[0] == sys.executable, "the kernel must run the interpreter running the tests"
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))

    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert any(c.cell_type == "markdown" for c in nb.cells) and any(c.cell_type == "code" for c in nb.cells)
    client = nbclient.NotebookClient(
        nb, timeout=300, kernel_name=KERNEL, resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError (with the cell's traceback) if any cell fails

    text = _text_outputs(nb)
    assert "max |difference| after reload: 0.0" in text
    assert "max |difference| after merge:" in text
    figures = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert figures, "the last section must display the plot_selection figure"
