"""Registers FisherTune (and Rein) with PEFT when `peft` is imported, so a script that only imports `peft`
(`PeftModel.from_pretrained`, `AutoPeftModel...`) loads their adapters without `import peft_fishertune`.

PEFT 0.21 has no plugin mechanism (no entry points): `PeftModel.from_pretrained` looks the saved `peft_type` up in
`peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING`, a plain dict, and raises `KeyError: 'FISHERTUNE'` if nothing added it.
So the package installs `peft_fishertune_autoload.pth` into site-packages (setup.py), whose one line calls
`install()` at interpreter start. That only puts a finder on `sys.meta_path`; nothing is imported until `peft`
itself is. When `peft` has finished importing, `peft_fishertune` is imported (it registers its peft types).

Turn it off with the environment variable PEFT_FISHERTUNE_NO_AUTOLOAD=1 (then `import peft_fishertune` yourself).
This module must stay tiny and import nothing heavy: it runs in every Python process of the environment.
"""

from __future__ import annotations

import os
import sys

ENV_OFF = "PEFT_FISHERTUNE_NO_AUTOLOAD"


def _register() -> None:
    try:
        import peft_fishertune  # noqa: F401  (registers "FISHERTUNE" and "REIN" with peft.mapping)
    except Exception as exc:  # never break `import peft` because of us
        import warnings

        warnings.warn(f"peft-fishertune: registering FisherTune with PEFT after `import peft` failed "
                      f"({type(exc).__name__}: {exc}); `import peft_fishertune` before loading its adapters",
                      stacklevel=2)


class _AfterPeftImport:
    """A meta-path finder: lets the normal finders find `peft`, and runs `_register` after it executed; then it
    removes itself. A spec that is only looked up (`importlib.util.find_spec("peft")`, as transformers does to see
    whether peft is installed) is never executed, so the finder stays until a real import runs."""

    _busy = False

    def find_spec(self, name, path=None, target=None):
        if name != "peft" or self._busy:
            return None
        from importlib.util import find_spec

        self._busy = True  # our own lookup below goes through sys.meta_path again
        try:
            spec = find_spec(name)
        finally:
            self._busy = False
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        original = loader.exec_module

        def exec_module(module):
            original(module)
            try:
                sys.meta_path.remove(self)
            except ValueError:
                pass
            _register()

        loader.exec_module = exec_module
        return spec


def install() -> None:
    """Called by the .pth line at start-up: register now if `peft` is already imported, else when it is."""
    if os.environ.get(ENV_OFF, "").strip().lower() in ("1", "true", "yes", "on"):
        return
    if "peft" in sys.modules:
        _register()
        return
    if not any(isinstance(f, _AfterPeftImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterPeftImport())
