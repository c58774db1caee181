"""Network-aware layer problems: the layer's input as the compressed network produces it.

Layer-wise solves on the original network's inputs x ignore what the layers before did: at
low bits or high sparsity their errors add up. With the same synthesized images run through
the compressed network so far, the layer sees x̃ instead, and the right objective is to
reproduce the original output from x̃ (GPTQ and AdaRound feed each layer the quantized
network's inputs for this reason):

    min over Ŵ, b̂ of  E‖W x + b − Ŵ x̃ − b̂‖²

With centred statistics Cov[x̃] = H̃ and Cov[x, x̃] = C (K, K per group), the unconstrained
optimum is W* = W C H̃⁻¹, and for any Ŵ the objective equals (W* − Ŵ) H̃ (W* − Ŵ)ᵀ up to a
constant, with b̂ = b + W E[x] − Ŵ E[x̃]. So the problem becomes an ordinary
:class:`LayerProblem` with weight W*, input statistics of x̃ and bias b + W E[x] − W* E[x̃]:
every solver (quantization, pruning) and its own bias correction then apply unchanged.
W* is written as W + W (C − H̃)(H̃ + λI)⁻¹, so that it is exactly W when x̃ = x; λ is
``damping`` times the mean of diag(H̃).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .problem import LayerProblem, input_stats


def network_aware(
    p: LayerProblem, x: np.ndarray, xc: np.ndarray, damping: float = 0.01
) -> tuple[LayerProblem, dict[str, float]]:
    """The problem of ``p`` (weight (G, O, K), bias) posed on ``xc``, the compressed
    network's sampled input columns (M, G, K), with ``x`` the original network's columns at
    the same positions. Returns the new problem and stats (the relative input error and
    the relative change of the weight).

    With fewer samples than inputs (M < K) the cross-covariance cannot be inverted: only
    the mean shift moves into the bias.
    """
    m, g, k = x.shape
    w = np.asarray(p.weight, np.float64)
    mu = x.mean(axis=0, dtype=np.float64)  # (G, K)
    mean_c, cov_c, samples_c = input_stats(xc)
    dx = (xc - x).astype(np.float64)
    err = float(np.mean(dx**2) / max(np.mean(np.square(x, dtype=np.float64)), 1e-30))
    b = np.zeros(w.shape[:2]) if p.bias is None else np.asarray(p.bias, np.float64)
    stats = {"input_rel_error": err, "weight_change": 0.0}
    if cov_c is None or err == 0.0:
        w_new = w
    else:
        import scipy.linalg  # here, not at import: only pruning runs this (start-up of W8A8)

        xt = (x.transpose(1, 0, 2) - mu[:, None, :]).astype(np.float64)  # (G, M, K)
        ct = (xc.transpose(1, 0, 2) - mean_c[:, None, :]).astype(np.float64)
        cross = np.matmul(xt.transpose(0, 2, 1), ct) / m  # Cov[x, x̃] (G, K, K)
        h = np.asarray(cov_c, np.float64)
        diag = np.diagonal(h, axis1=1, axis2=2)
        load = damping * np.maximum(diag.mean(axis=1), 1e-12)
        w_new = np.empty_like(w)
        for j in range(g):
            hd = h[j] + load[j] * np.eye(k)
            # W (C − H̃) (H̃ + λI)⁻¹: solve (H̃ + λI) Zᵀ = (C − H̃)ᵀ Wᵀ (symmetric H̃).
            rhs = (cross[j] - h[j]).T @ w[j].T  # (K, O)
            z = scipy.linalg.solve(hd, rhs, assume_a="pos", check_finite=False)
            w_new[j] = w[j] + z.T
        stats["weight_change"] = float(
            np.linalg.norm(w_new - w) / max(np.linalg.norm(w), 1e-30)
        )
    bias = b + np.einsum("gok,gk->go", w, mu) - np.einsum("gok,gk->go", w_new, mean_c)
    q = dataclasses.replace(
        p,
        weight=w_new.astype(np.float32),
        bias=bias.astype(np.float32),
        mean=mean_c,
        cov=cov_c,
        x=samples_c,
        count=m,
        xq_mean=None,  # x̃ already went through the activation quantizers
    )
    return q, stats
