"""Load one of the repository's scripts (scripts/*.py, benchmarks/*.py) as a module, by path: they are not a package."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_script(relpath: str, name: str | None = None):
    """The module of ROOT/`relpath`, executed fresh (each call a new module object, not registered in sys.modules)."""
    path = ROOT / relpath
    spec = importlib.util.spec_from_file_location(name or path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_main(module, argv: list[str]) -> int:
    """`module.main(argv)` with the suite's torch thread count restored afterwards (benchmarks set their own)."""
    import torch

    threads = torch.get_num_threads()
    try:
        return module.main(argv)
    finally:
        torch.set_num_threads(threads)
