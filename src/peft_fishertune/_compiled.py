"""CPU kernels compiled once per process, with the eager code as the fallback: the one place for that pattern.

The package compiles a few small functions with inductor where eager torch pays for several passes or a serial
loop (the SDDMM operand transposes in tuner/sparse_delta.py, the stage-2 fused loops in fisher/fused.py, the counter
noise in fisher/seeds.py). Each group is a `CompiledKernels`: every function is compiled on its first call (dynamic
shapes, one graph; called without grad mode on detached tensors, so one compile serves every caller's grad mode;
a call that autograd must record, with grad mode on and an input that requires grad, runs the eager function),
and the first error of the group, at compile or at run time (e.g. no C++ compiler for inductor, or torch.compile's
recompile limit), is logged once, naming it and what runs instead; from then on every call of the group runs the
eager function. The eager functions give the same values (each caller's tests check it), so a failure costs time
only.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

import torch


def error_line(exc: BaseException) -> str:
    """`Type: first line of the message` (compile errors carry pages of generated code after it)."""
    text = str(exc)
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


class CompiledKernels:
    """A group of functions compiled on first use, sharing one failure state (see the module docstring).

    `where` and `logger` say who reports (e.g. "FisherTune layers"); `instead` says what a failure costs (e.g. "the
    eager copy runs instead (same gradients, slower)").
    """

    def __init__(self, functions: dict[str, Callable], *, where: str, what: str, instead: str,
                 logger: logging.Logger, announce: Optional[str] = None):
        self.functions = dict(functions)
        self.where, self.what, self.instead, self.logger, self.announce = where, what, instead, logger, announce
        self.compiled: dict[str, Callable] = {}
        self.failed: Optional[str] = None  # the group's first error, `Type: message`

    def fresh(self) -> "CompiledKernels":
        """The same group, nothing compiled and no failure (tests)."""
        return CompiledKernels(self.functions, where=self.where, what=self.what, instead=self.instead,
                               logger=self.logger, announce=self.announce)

    @property
    def available(self) -> bool:
        """Whether a call would run compiled code: torch.compile exists, the group has not failed, and this is not
        itself being traced by torch.compile (then the eager function is traced instead)."""
        return self.failed is None and hasattr(torch, "compile") and not torch.compiler.is_compiling()

    def is_compiled(self, name: str) -> bool:
        return name in self.compiled

    def __call__(self, name: str, *args: Any, eager: Optional[Callable] = None) -> Any:
        """`name`'s function on `args`, compiled; where the group cannot compile (now or before), `eager(*args)`
        (default: the function itself, uncompiled)."""
        fallback = eager if eager is not None else self.functions[name]
        if not self.available:
            return fallback(*args)
        if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            # autograd records this call (a backward with create_graph=True): the eager function, differentiable as
            # written; the compiled kernels run detached (below)
            return self.functions[name](*args)
        fn = self.compiled.get(name)
        if fn is None:
            if self.announce and not self.compiled:
                self.logger.info("%s: compiling %s (once per process)", self.where, self.announce)
            fn = self.compiled[name] = torch.compile(self.functions[name], dynamic=True, fullgraph=True)
        try:
            # the kernels compute values, nothing autograd records: run them without grad mode and on detached
            # tensors, so that neither the caller's grad mode (a forward warms a kernel that backward runs) nor an
            # input's requires_grad makes torch.compile guard-fail and compile the same kernel again (seconds each,
            # and 8 variants end in its recompile limit)
            with torch.no_grad():
                return fn(*[a.detach() if isinstance(a, torch.Tensor) else a for a in args])
        except Exception as exc:  # noqa: BLE001 - any compile failure: say which, then the eager code
            self.failed = error_line(exc)
            self.logger.warning("%s: torch.compile of %s failed (%s, in %r); %s", self.where, self.what, self.failed,
                                name, self.instead)
            return fallback(*args)
