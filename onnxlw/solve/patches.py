"""Sample layer-input columns (im2col at random output positions), numpy only."""

from __future__ import annotations

import numpy as np


def conv_patches(
    x: np.ndarray,
    *,
    group: int,
    kernel: tuple[int, int],
    strides: tuple[int, int],
    pads: tuple[int, int, int, int],
    dilations: tuple[int, int],
    positions: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Input patches of a 2-D conv at up to ``positions`` random output positions.

    ``x``: (N, C, H, W). Returns (M, G, C/G * kh * kw) in the weight's (c, kh, kw) order.
    """
    n, c, h, w = x.shape
    kh, kw = kernel
    sh, sw = strides
    pt, pl, pb, pr = pads
    dh, dw = dilations
    oh = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1
    ow = (w + pl + pr - dw * (kw - 1) - 1) // sw + 1
    total = n * oh * ow
    m = min(positions, total)
    idx = np.sort(rng.choice(total, size=m, replace=False)) if m < total else np.arange(total)
    bi, rem = np.divmod(idx, oh * ow)
    yi, xi = np.divmod(rem, ow)
    ky = np.arange(kh) * dh
    kx = np.arange(kw) * dw
    rows = (yi * sh)[:, None, None] + ky[None, :, None] - pt  # (M, kh, 1), unpadded coords
    cols = (xi * sw)[:, None, None] + kx[None, None, :] - pl  # (M, 1, kw)
    inside = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)  # (M, kh, kw); else a pad
    patches = x[bi[:, None, None], :, np.clip(rows, 0, h - 1), np.clip(cols, 0, w - 1)]
    if not inside.all():
        patches *= inside[..., None]  # (M, kh, kw, C); padded positions read zeros
    patches = np.moveaxis(patches, 3, 1)  # (M, C, kh, kw)
    return patches.reshape(m, group, (c // group) * kh * kw)


def dense_rows(x: np.ndarray, positions: int, rng: np.random.Generator) -> np.ndarray:
    """Rows of a dense layer's input. ``x``: (N, ..., K) -> (M, 1, K)."""
    flat = x.reshape(-1, x.shape[-1])
    if len(flat) > positions:
        flat = flat[np.sort(rng.choice(len(flat), size=positions, replace=False))]
    return flat[:, None, :]
