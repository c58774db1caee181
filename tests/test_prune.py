"""Pruning solver properties: exact sparsity and patterns, saliency + refit beat magnitude on
correlated inputs, bias correction, and the degenerate cases."""

from __future__ import annotations

import numpy as np
import pytest

from onnxlw.solve import LayerProblem
from onnxlw.solve.prune import PruneSpec, prune_layer


def layer(seed: int, o: int = 16, k: int = 64, g: int = 1, m: int = 4096, noise: float = 0.3):
    """A layer with strongly correlated, non-zero-mean inputs: k inputs driven by k/4 factors
    plus independent noise (like a conv's neighbouring pixels and channels)."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((max(k // 4, 1), k))
    offset = rng.uniform(0.2, 1.0, k)

    def draw() -> np.ndarray:
        z = rng.standard_normal((m, g, mix.shape[0])) @ mix
        return (z + noise * rng.standard_normal((m, g, k)) + offset).astype(np.float32)

    x, held = draw(), draw()
    w = rng.standard_normal((g, o, k)).astype(np.float32) * 0.2
    b = rng.normal(0, 0.1, (g, o)).astype(np.float32)
    return LayerProblem.from_samples(w, x, bias=b), held


def out_err(p: LayerProblem, sol, x: np.ndarray) -> float:
    """Mean squared output error on inputs ``x`` (M, G, K), biases included."""
    ref = np.einsum("gok,mgk->mgo", p.weight.astype(np.float64), x) + p.bias
    got = np.einsum("gok,mgk->mgo", sol.weight.astype(np.float64), x) + sol.bias
    return float(np.mean((ref - got) ** 2))


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7])
@pytest.mark.parametrize("method", ["obs", "magnitude"])
def test_sparsity_is_exact(sparsity: float, method: str) -> None:
    p, _ = layer(0, g=3, k=40)
    sol = prune_layer(p, PruneSpec(sparsity=sparsity, method=method))
    zeros = float((sol.weight == 0).mean())
    assert abs(zeros - sparsity) < 0.01
    assert sol.stats["sparsity"] == pytest.approx(zeros, abs=1e-9)
    assert np.array_equal(sol.encoding.mask, sol.weight != 0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_obs_with_refit_beats_magnitude_on_held_out_inputs(seed: int) -> None:
    p, held = layer(seed)
    spec = PruneSpec(sparsity=0.5)
    obs = prune_layer(p, spec)
    mask_only = prune_layer(p, PruneSpec(sparsity=0.5, refit=False))
    mag = prune_layer(p, PruneSpec(sparsity=0.5, method="magnitude"))
    e_obs, e_mask, e_mag = out_err(p, obs, held), out_err(p, mask_only, held), out_err(p, mag, held)
    assert e_obs < 0.3 * e_mag, (e_obs, e_mag)
    assert e_obs < 0.3 * e_mask, (e_obs, e_mask)  # the refit is what pays


def test_refit_is_close_to_the_exact_least_squares_for_its_mask() -> None:
    p, held = layer(3, o=4, k=24)
    sol = prune_layer(p, PruneSpec(sparsity=0.5, damping=1e-6))
    h = p.cov[0].astype(np.float64)
    exact = np.zeros_like(sol.weight[0], dtype=np.float64)
    for r in range(4):
        keep = sol.encoding.mask[0, r]
        w = p.weight[0, r].astype(np.float64)
        # minimize (w - v)ᵀ H (w - v) with v zero off the mask
        v = np.linalg.solve(h[np.ix_(keep, keep)], h[keep] @ w)
        exact[r, keep] = v
    d_got = sol.weight[0] - p.weight[0]
    d_opt = exact - p.weight[0]
    e_got = float(np.einsum("ok,kl,ol->", d_got, h, d_got))
    e_opt = float(np.einsum("ok,kl,ol->", d_opt, h, d_opt))
    assert e_opt * (1 - 1e-9) <= e_got <= 1.02 * e_opt, (e_got, e_opt)


@pytest.mark.parametrize("method", ["obs", "magnitude"])
def test_n_m_pattern_in_the_given_order(method: str) -> None:
    p, _ = layer(4, g=2, k=36)
    order = np.random.default_rng(0).permutation(36)
    sol = prune_layer(p, PruneSpec(n=2, m=4, method=method), order=order)
    nz = (sol.weight != 0)[..., order].reshape(2, 16, 9, 4)
    assert (nz.sum(axis=-1) <= 2).all() and sol.encoding.pattern == "2:4"
    assert sol.stats["sparsity"] == pytest.approx(0.5, abs=0.01)


def test_n_m_keeps_a_trailing_partial_group() -> None:
    p, _ = layer(5, k=10)
    sol = prune_layer(p, PruneSpec(n=2, m=4))
    assert (sol.weight[..., 8:] != 0).all()
    assert ((sol.weight[..., :8] != 0).reshape(1, 16, 2, 4).sum(-1) == 2).all()


def test_bias_correction_removes_the_mean_output_shift() -> None:
    p, held = layer(6)
    sol = prune_layer(p, PruneSpec(sparsity=0.6, method="magnitude"))
    ref = np.einsum("gok,mgk->mgo", p.weight.astype(np.float64), held) + p.bias
    got = np.einsum("gok,mgk->mgo", sol.weight.astype(np.float64), held) + sol.bias
    none = prune_layer(p, PruneSpec(sparsity=0.6, method="magnitude", bias_correction=False))
    got0 = np.einsum("gok,mgk->mgo", none.weight.astype(np.float64), held) + none.bias
    shift = np.abs((ref - got).mean(axis=0)).max()
    assert shift < 0.1 * np.abs((ref - got0).mean(axis=0)).max()


def test_iid_inputs_give_magnitude_masks() -> None:
    """With H ∝ I the saliency is w² up to a constant: OBS picks the magnitude mask."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((20000, 1, 32)).astype(np.float32)
    w = rng.standard_normal((1, 8, 32)).astype(np.float32)
    p = LayerProblem.from_samples(w, x)
    obs = prune_layer(p, PruneSpec(sparsity=0.25, refit=False, block=32))
    mag = prune_layer(p, PruneSpec(sparsity=0.25, method="magnitude"))
    assert (obs.encoding.mask == mag.encoding.mask).mean() > 0.95


def test_zero_sparsity_changes_nothing_and_dead_inputs_are_harmless() -> None:
    p, _ = layer(8, k=20)
    sol = prune_layer(p, PruneSpec(sparsity=0.0))
    np.testing.assert_allclose(sol.weight, p.weight, rtol=1e-6)
    x = np.random.default_rng(1).standard_normal((2048, 1, 12)).astype(np.float32)
    x[..., 3] = 0.0  # a dead input
    q = LayerProblem.from_samples(np.ones((1, 4, 12), np.float32), x)
    s = prune_layer(q, PruneSpec(sparsity=0.5))
    assert np.isfinite(s.weight).all() and s.stats["sparsity"] == pytest.approx(0.5, abs=0.05)


def test_samples_problems_and_groups() -> None:
    """Fewer samples than inputs (H from samples, damped) and depthwise-like groups."""
    rng = np.random.default_rng(9)
    x = rng.standard_normal((64, 1, 128)).astype(np.float32)
    p = LayerProblem.from_samples(rng.standard_normal((1, 6, 128)).astype(np.float32), x)
    assert p.cov is None
    s = prune_layer(p, PruneSpec(sparsity=0.5))
    assert np.isfinite(s.weight).all() and s.stats["sparsity"] == pytest.approx(0.5, abs=0.01)
    xd = rng.standard_normal((4096, 32, 9)).astype(np.float32)
    pd = LayerProblem.from_samples(rng.standard_normal((32, 1, 9)).astype(np.float32), xd)
    sd = prune_layer(pd, PruneSpec(sparsity=0.4))
    assert sd.weight.shape == (32, 1, 9)
