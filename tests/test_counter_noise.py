"""The counter-based weight noise ξ of the variational estimator (fisher/seeds.py): its integer hash, its
distribution, independence between keys and between neighbours, eager = compiled, and a failed compile."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from script_modules import load_script

from peft_fishertune.fisher import seeds
from peft_fishertune.fisher.fused import sample, sample_counter


def _lowbias32_reference(x: int) -> int:
    m = 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & m
    x ^= x >> 15
    x = (x * 0x846CA68B) & m
    return x ^ (x >> 16)


def _words(xs: torch.Tensor) -> list[int]:
    """int32 tensor -> the 32-bit words it holds, as non-negative Python ints."""
    return [int(x) & 0xFFFFFFFF for x in xs.tolist()]


def test_integer_hash_equals_python_big_int_arithmetic():
    """The int32 tensor hash (products wrapping modulo 2^32, logical shifts by masking) equals the same hash in exact
    Python integers across the whole 32-bit range, eager and compiled (a length with a scalar tail loop)."""
    g = torch.Generator().manual_seed(0)
    xs = torch.cat([torch.tensor([0, 1, 2, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF]),
                    torch.randint(0, 1 << 32, (2003,), generator=g, dtype=torch.int64)])
    expected = [_lowbias32_reference(int(x)) for x in xs]
    words = xs.to(torch.int32)
    assert _words(words) == [int(x) for x in xs]  # the cast keeps the bits
    assert _words(seeds._lowbias32(words)) == expected
    compiled = torch.compile(seeds._lowbias32, dynamic=True, fullgraph=True)
    assert _words(compiled(words)) == expected


def _counter_normal_int64(index, k1, k2, k3):
    """The formula as written before 2026-12-05 (eighth round): int64 words, each product split in 16-bit halves
    (kept in benchmarks/noise_words_ab.py, which times the two)."""
    return load_script("benchmarks/noise_words_ab.py").noise_int64(index, k1, k2, k3)


def test_int32_words_give_the_int64_formulas_numbers_bit_for_bit():
    """The switch to int32 words changed no number: the noise at any position and keys is what the int64 formula
    gave (so estimates and resumed runs are unchanged)."""
    g = torch.Generator().manual_seed(1)
    idx = torch.cat([torch.arange(0, 5000), torch.randint(0, 1 << 32, (5000,), generator=g, dtype=torch.int64),
                     torch.tensor([(1 << 31) - 1, 1 << 31, (1 << 32) - 1])])
    high = 0
    for keys in [(0xE1, 7, 3, 5), (1, 2, 3), (0xE1, 2**40 + 9, 0, 1)]:
        k = seeds.counter_keys(*keys)
        high += sum(w >= 1 << 31 for w in k)  # words that are negative as int32: the sign handling is exercised
        assert torch.equal(seeds.counter_normal_at(idx, *k), _counter_normal_int64(idx, *k))
        kt = seeds.counter_key_tensors(*keys)
        assert all(t.dtype == torch.int32 for t in kt)
        assert torch.equal(seeds.counter_normal_at(idx, *kt), _counter_normal_int64(idx, *k))
    assert high >= 3


def _ks_statistic(z: torch.Tensor) -> float:
    """Kolmogorov-Smirnov distance between the sample and N(0, 1)."""
    z = z.double().sort().values
    n = z.numel()
    cdf = 0.5 * (1 + torch.erf(z / math.sqrt(2)))
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return float(torch.maximum(i / n - cdf, cdf - (i - 1) / n).max())


def test_noise_is_standard_normal_and_independent():
    n = 1 << 20
    z = seeds.derived_normal((n,), 0xE1, 7, 3, 5).double()
    bound = 5 / math.sqrt(n)  # five standard errors
    assert abs(float(z.mean())) < bound
    assert abs(float(z.var()) - 1) < 5 * math.sqrt(2 / n)
    assert abs(float(((z - z.mean()) ** 4).mean() / z.var() ** 2) - 3) < 0.05
    assert _ks_statistic(z) * math.sqrt(n) < 1.95  # p > 0.001
    assert float(z.abs().max()) < 6.0  # the tail is cut at 5.9
    others = {"next step": (0xE1, 7, 4, 5), "next layer": (0xE1, 7, 3, 6), "other seed": (0xE1, 8, 3, 5)}
    for what, keys in others.items():
        w = seeds.derived_normal((n,), *keys).double()
        r = float(torch.corrcoef(torch.stack([z, w]))[0, 1])
        assert abs(r) < bound, (what, r)
        # not a permutation of the same numbers either (a one-round hash of index ^ key would be)
        assert not torch.equal(z.sort().values, w.sort().values), what
    for lag in (1, 2, 768):
        r = float(torch.corrcoef(torch.stack([z[:-lag], z[lag:]]))[0, 1])
        assert abs(r) < bound, (lag, r)
    r = float(torch.corrcoef(torch.stack([z[0::2], z[1::2]]))[0, 1])
    assert abs(r) < 2 * bound


def test_same_keys_same_numbers_in_any_shape_and_buffer():
    a = seeds.derived_normal((300, 1000), 1, 2, 3)
    b = seeds.derived_normal((300_000,), 1, 2, 3)
    assert torch.equal(a.view(-1), b)
    out = torch.full((300, 1000), float("nan"))
    assert seeds.derived_normal((300, 1000), 1, 2, 3, out=out) is out and torch.equal(out, a)


def test_compiled_fill_equals_the_eager_formula(monkeypatch):
    n = seeds.COMPILE_MIN_ELEMENTS + 1001
    compiled = seeds.counter_fill(torch.empty(n), 9, 8, 7)
    monkeypatch.setattr(seeds, "COMPILE_MIN_ELEMENTS", 1 << 40)
    eager = seeds.counter_fill(torch.empty(n), 9, 8, 7)
    assert torch.allclose(compiled, eager, rtol=1e-5, atol=1e-6)
    k = seeds.counter_keys(9, 8, 7)
    idx = torch.tensor([0, 1, n - 1])
    assert torch.allclose(eager[idx], seeds.counter_normal_at(idx, *k), rtol=0, atol=0)


def test_fused_sample_computes_the_same_noise_inline():
    """θ = θ̂ + sign·σ⊙ξ with ξ computed inside the loop equals the sample made from the drawn ξ (same keys)."""
    g = torch.Generator().manual_seed(0)
    p = torch.randn(512, 600, generator=g)
    prec = (torch.rand(512, 600, generator=g) * 50).to(torch.bfloat16)
    prior, sign = torch.tensor(100.0), torch.tensor(-1.0)
    keys = (0xE1, 4, 2, 11)
    kt = seeds.counter_key_tensors(*keys)
    xi = seeds.derived_normal(p.shape, *keys)
    ref = sample(p, prec, xi, prior, sign)
    assert torch.allclose(sample_counter(p, prec, prior, sign, *kt), ref, rtol=0, atol=1e-6)
    compiled = torch.compile(sample_counter, dynamic=True, fullgraph=True)
    assert torch.allclose(compiled(p, prec, prior, sign, *kt), ref, rtol=1e-6, atol=1e-6)
    assert not torch.equal(ref, p)


def test_a_failed_compile_is_logged_once_and_the_eager_formula_runs(monkeypatch, caplog):
    n = seeds.COMPILE_MIN_ELEMENTS + 5

    def broken(*args, **kwargs):
        def run(*a):
            raise RuntimeError("no compiler here")
        return run

    monkeypatch.setattr(seeds, "_FILL", seeds._FILL.fresh())
    monkeypatch.setattr(torch, "compile", broken)
    with caplog.at_level(logging.WARNING, logger="peft_fishertune.fisher"):
        a = seeds.counter_fill(torch.empty(n), 1, 2)
        b = seeds.counter_fill(torch.empty(n), 1, 2)
    assert torch.equal(a, b)
    assert [r.getMessage().count("no compiler here") for r in caplog.records] == [1]
    monkeypatch.setattr(seeds, "COMPILE_MIN_ELEMENTS", 1 << 40)
    assert torch.equal(seeds.counter_fill(torch.empty(n), 1, 2), a)


def test_more_than_two_to_the_32_elements_and_other_buffers_are_refused():
    with pytest.raises(ValueError, match="2\\*\\*32"):
        seeds.counter_fill(torch.empty(1).expand(1 << 33), 1)  # a view: nothing of that size is allocated
    with pytest.raises(ValueError, match="contiguous float32 CPU tensor, got torch.float64"):
        seeds.counter_fill(torch.empty(10, dtype=torch.float64), 1)
    with pytest.raises(ValueError, match="not contiguous"):
        seeds.counter_fill(torch.empty(10, 10).t(), 1)
