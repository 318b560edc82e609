"""_compiled.CompiledKernels: compiled once per process, the group's first failure logged once, eager from then on."""

from __future__ import annotations

import logging

import torch

from peft_fishertune._compiled import CompiledKernels

log = logging.getLogger("peft_fishertune.test_compiled")


def _double(t):
    return t * 2


def _plus_one(t):
    return t + 1


def _group():
    return CompiledKernels({"double": _double, "plus_one": _plus_one}, where="Test", what="the test kernels",
                           instead="the eager code runs instead", logger=log)


def test_functions_compile_once_and_give_the_eager_values():
    kernels = _group()
    t = torch.randn(1000)
    assert torch.equal(kernels("double", t), t * 2)
    assert kernels.is_compiled("double") and not kernels.is_compiled("plus_one")
    fn = kernels.compiled["double"]
    assert torch.equal(kernels("double", torch.arange(7.0)), torch.arange(7.0) * 2)  # another shape: same graph
    assert kernels.compiled["double"] is fn and kernels.failed is None and kernels.available


def test_the_first_failure_is_logged_once_and_the_whole_group_runs_eager(monkeypatch, caplog):
    calls = []

    def broken_compile(fn, **kwargs):
        calls.append(fn.__name__)

        def run(*args):
            raise RuntimeError("no C++ compiler found\n<pages of generated code>")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    kernels = _group()
    t = torch.arange(5.0)
    with caplog.at_level(logging.WARNING, logger=log.name):
        assert torch.equal(kernels("double", t), t * 2)
        assert torch.equal(kernels("double", t), t * 2)
        assert torch.equal(kernels("plus_one", t), t + 1)
        assert kernels("plus_one", t, eager=lambda x: x - 1).equal(t - 1)  # a caller's own fallback
    assert calls == ["_double"]  # after the failure nothing else is compiled
    assert kernels.failed == "RuntimeError: no C++ compiler found" and not kernels.available
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1
    assert warned[0].startswith("Test: torch.compile of the test kernels failed (RuntimeError: no C++ compiler found")
    assert "'double'" in warned[0] and "eager code runs instead" in warned[0]
    fresh = kernels.fresh()
    assert fresh.failed is None and not fresh.compiled and fresh.functions == kernels.functions


def test_one_compile_serves_every_grad_mode_and_requires_grad(monkeypatch):
    """A kernel warmed in a forward (grad mode on) and run in backward (off), on inputs that do and do not require
    grad, compiles once: torch.compile would otherwise guard on both and compile again (three graphs here; eight
    end in its recompile limit, and the group falls back to eager)."""
    real_compile = torch.compile
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, backend=counting_backend, **kw))

    def _twice(t):  # a code object of its own: no cache entries from other tests
        return t * 2

    kernels = CompiledKernels({"double": _twice}, where="Test", what="the test kernels", instead="eager", logger=log)
    t = torch.randn(64)
    with torch.enable_grad():
        a = kernels("double", t)
    with torch.no_grad():
        b = kernels("double", t.clone().requires_grad_(True))
        c = kernels("double", t)
    assert len(graphs) == 1, f"{len(graphs)} graphs compiled"
    assert all(torch.equal(r, t * 2) and not r.requires_grad for r in (a, b, c))
    assert kernels.failed is None


def test_a_call_autograd_records_stays_differentiable():
    """With grad mode on and an input that requires grad (a backward with create_graph=True), the result carries the
    gradient: the eager function runs, since the compiled kernels run detached."""
    kernels = _group()
    t = torch.randn(64).requires_grad_(True)
    with torch.enable_grad():
        out = kernels("double", t)
    assert out.requires_grad and torch.equal(out, t.detach() * 2)
    (g,) = torch.autograd.grad(out.pow(2).sum(), [t])
    assert torch.allclose(g, 8 * t.detach())
    with torch.no_grad():  # the same input without grad mode: the compiled kernel, detached
        assert not kernels("double", t).requires_grad and kernels.is_compiled("double")
