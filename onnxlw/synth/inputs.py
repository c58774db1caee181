"""Seeded synthetic graph inputs with a declared distribution."""

from __future__ import annotations

import numpy as np

from ..config import InputDistribution


def synthetic_input(
    shape: tuple[int, ...],
    dist: InputDistribution,
    rng: np.random.Generator,
    value_range: tuple[float, float] | None = None,
) -> np.ndarray:
    """Draw a float32 batch of ``shape`` (N, C, *spatial).

    Every channel has zero mean and unit variance over the batch. ``PINK`` gives each image a
    1/f amplitude spectrum over its spatial dims (natural images are close to 1/f), so
    neighbouring pixels are correlated and spatial averages keep realistic spread; ``GAUSSIAN``
    is i.i.d. per element. With ``value_range`` (the declared range of real inputs) every
    value lies inside it: clipped, re-standardized and clipped again a few times, so the draw
    keeps zero mean and unit variance where the range allows (real inputs never leave it).
    """
    x = rng.standard_normal(shape)
    if dist is InputDistribution.PINK and len(shape) >= 3:
        axes = tuple(range(2, len(shape)))
        spec = np.fft.rfftn(x, axes=axes)
        freqs = [np.fft.fftfreq(n) for n in shape[2:-1]] + [np.fft.rfftfreq(shape[-1])]
        grid = np.meshgrid(*freqs, indexing="ij")
        f = np.sqrt(sum(g**2 for g in grid))
        f[(0,) * f.ndim] = f.flat[1] if f.size > 1 else 1.0
        spec = spec / f
        x = np.fft.irfftn(spec, s=shape[2:], axes=axes)
    red = (0,) + tuple(range(2, len(shape)))
    x = (x - x.mean(axis=red, keepdims=True)) / (x.std(axis=red, keepdims=True) + 1e-12)
    if value_range is not None:
        lo, hi = value_range
        for _ in range(4):
            x = np.clip(x, lo, hi)
            x = (x - x.mean(axis=red, keepdims=True)) / (x.std(axis=red, keepdims=True) + 1e-12)
        x = np.clip(x, lo, hi)
    return x.astype(np.float32)
