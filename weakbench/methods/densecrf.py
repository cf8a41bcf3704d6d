"""Two-label dense CRF of an image, mean-field inference compiled with numba.

The fully connected CRF of Krähenbühl & Koltun ("Efficient Inference in Fully Connected CRFs
with Gaussian Edge Potentials", NIPS 2011) with Potts compatibilities, a Gaussian (positional)
and a bilateral (position and colour) kernel, each filtered on the permutohedral lattice of
Adams, Baek & Davis ("Fast High-Dimensional Filtering Using the Permutohedral Lattice",
Eurographics 2010), as Krähenbühl's 2013 ``densecrf`` library does it (the library behind
``pydensecrf``, which BBAM's official code calls): the same lattice (elevation, rounding to
the nearest remainder-0 point, barycentric weights, vertices numbered in order of first use,
blur along the d + 1 axes in order with the ½ ·(n₁ + n₂) stencil, slicing scaled by
``1 / (1 + 2^−d)``), symmetric normalisation ``K(x) = n ⊙ L(n ⊙ x)`` with
``n = 1 / √(L(1) + 1e−20)`` (``NORMALIZE_SYMMETRIC``), and ``inference(T)``:
``Q = softmax(−U)``, then ``T`` times ``Q = softmax(−U + Σ_k w_k K_k(Q))``, all in float32.

With two labels ``Q_bg = 1 − Q_fg`` and the filter is linear, so
``K(Q_bg) = K(1) − K(Q_fg)``: one channel is filtered per kernel and iteration, ``K(1)`` once per
image; the lattices are built once per image (:class:`DenseCRF2`) and reused by every unary.
Otherwise the arithmetic is densecrf's, operation for operation in float32 (its SSE lattice
build: round half to even), so the marginals differ from ``pydensecrf``'s only by the rounding
of that one-channel update and of ``exp``: at most 1e-5 on coco128 images with BBAM's unaries
and the same ``> 0.9`` masks (``tests/test_bbam_ops.py``; docs/bbam.md has the figures and the
speed). Layout (ours, same results): the splat vertices and weights are stored remainder by
remainder, ``(d + 1, N)``; the blur neighbours are found by one merge pass per axis over the
sorted keys.

numba is a hard dependency (``pyproject.toml``); the functions are compiled on first use and
cached (``cache=True``).
"""

from __future__ import annotations

import math

import numba
import numpy as np

__all__ = ["DenseCRF2", "lattice_filter"]

_KEY_LIMIT = 32767  # densecrf stores lattice keys as 16-bit integers


def _jit(f):
    return numba.njit(cache=True, nogil=True)(f)


@_jit
def _pack(probe, d):
    """A key of ``d <= 6`` 16-bit integers as two words: components 0-3 in ``w0``, 4-5 in the
    high half of ``w1`` (the low half of a table's ``w1`` holds the vertex index + 1)."""
    w0 = np.uint64(0)
    w1 = np.uint64(0)
    for k in range(d):
        c = np.uint64(probe[k] & 0xFFFF)
        if k < 4:
            w0 |= c << np.uint64(16 * k)
        else:
            w1 |= c << np.uint64(32 + 16 * (k - 4))
    return w0, w1


@_jit
def _slot(table, w0, w1, shift):
    """First slot of ``table`` (uint64 ``(cap, 2)``, open addressing, linear probing) that holds
    the key ``(w0, w1)`` or is empty."""
    cap = table.shape[0]
    h = np.int64(((w0 * np.uint64(0x9E3779B97F4A7C15)) ^ (w1 * np.uint64(0xC2B2AE3D27D4EB4F))) >> shift)
    low = np.uint64(0xFFFFFFFF)
    high = ~low
    while True:
        t1 = table[h, 1]
        if t1 == 0 or (table[h, 0] == w0 and (t1 & high) == w1):
            return h
        h += 1
        if h == cap:
            h = 0


@_jit
def _build_lattice(feat, scale, inv_d1, d1f, row):
    """Permutohedral lattice of ``feat`` (float32 ``(N, d)``, ``d <= 6``), as densecrf's SSE
    ``Permutohedral::init``: splat vertices ``offset`` (int32 ``(d + 1, N)``, 1-based, 0 = the
    empty slot), barycentric weights (float32 ``(d + 1, N)``), the vertices' keys (int16
    ``(M, d)``, numbered in order of first use), their hash table and its shift (for
    :func:`_lattice_neighbours`), and whether a key left the 16-bit range."""
    N, d = feat.shape
    d1 = d + 1
    cap = 1024
    while cap < 2 * N:
        cap *= 2
    bits = 0
    while (1 << bits) < cap:
        bits += 1
    shift = np.uint64(64 - bits)
    table = np.zeros((cap, 2), np.uint64)
    low = np.uint64(0xFFFFFFFF)
    high = ~low
    keys = np.empty((N * d1, d), np.int16)
    offset = np.empty((d1, N), np.int32)
    bary = np.empty((d1, N), np.float32)
    canonical = np.empty((d1, d1), np.int32)
    for i in range(d1):
        for j in range(d1 - i):
            canonical[i, j] = i
        for j in range(d1 - i, d1):
            canonical[i, j] = i - d1
    elev = np.empty(d1, np.float32)
    rem0 = np.empty(d1, np.float32)
    rank = np.empty(d1, np.float32)
    b = np.empty(d1 + 1, np.float32)
    probe = np.empty(d1, np.int32)
    zero = np.float32(0.0)
    one = np.float32(1.0)
    filled = 0
    overflow = False
    vw0 = np.empty(N * d1, np.uint64)  # each vertex's packed key
    vw1 = np.empty(N * d1, np.uint64)
    for n in range(N):
        sm = zero
        for j in range(d, 0, -1):
            cf = feat[n, j - 1] * scale[j - 1]
            elev[j] = sm - np.float32(j) * cf
            sm += cf
        elev[0] = sm
        total = zero
        for i in range(d1):
            v = np.float32(np.rint(inv_d1 * elev[i]))  # round half to even, as SSE's cvtps2dq
            rem0[i] = v * d1f
            total += v
        for i in range(d1):
            rank[i] = zero
        for i in range(d):
            di = elev[i] - rem0[i]
            for j in range(i + 1, d1):
                dj = elev[j] - rem0[j]
                if di < dj:
                    rank[i] += one
                else:
                    rank[j] += one
        for i in range(d1):
            rank[i] += total
            if rank[i] < zero:
                rank[i] += d1f
                rem0[i] += d1f
            elif rank[i] >= d1f:
                rank[i] -= d1f
                rem0[i] -= d1f
        for i in range(d1 + 1):
            b[i] = zero
        for i in range(d1):
            v = (elev[i] - rem0[i]) * inv_d1
            p = d - np.int64(rank[i])
            b[p] += v
            b[p + 1] -= v
        b[0] += one + b[d1]
        for r in range(d1):
            for i in range(d):
                kv = np.int64(rem0[i]) + canonical[r, np.int64(rank[i])]
                if kv > _KEY_LIMIT or kv < -_KEY_LIMIT - 1:
                    overflow = True
                probe[i] = kv
            if 2 * filled >= cap:  # grow the table and re-insert
                old = table
                cap *= 2
                bits += 1
                shift = np.uint64(64 - bits)
                table = np.zeros((cap, 2), np.uint64)
                for h in range(old.shape[0]):
                    if old[h, 1] != 0:
                        s = _slot(table, old[h, 0], old[h, 1] & high, shift)
                        table[s, 0] = old[h, 0]
                        table[s, 1] = old[h, 1]
            w0, w1 = _pack(probe, d)
            e = 0  # the vertex of the pixel before or above (row > 0: an image's width), if the same
            if n >= 1:
                c = offset[r, n - 1]
                if vw0[c - 1] == w0 and vw1[c - 1] == w1:
                    e = c
            if e == 0 and row > 0 and n >= row:
                c = offset[r, n - row]
                if vw0[c - 1] == w0 and vw1[c - 1] == w1:
                    e = c
            if e == 0:
                s = _slot(table, w0, w1, shift)
                if table[s, 1] == 0:
                    table[s, 0] = w0
                    table[s, 1] = w1 | np.uint64(filled + 1)
                    for i in range(d):
                        keys[filled, i] = probe[i]
                    vw0[filled] = w0
                    vw1[filled] = w1
                    filled += 1
                e = np.int32(table[s, 1] & low)
            offset[r, n] = e
            bary[r, n] = b[r]
    return offset, bary, keys[:filled], table, shift, overflow


@_jit
def _lattice_neighbours(keys, table, shift):
    """Blur neighbours (int32 ``(d + 1, M, 2)``, 1-based, 0 = absent) of the ``M`` lattice
    vertices ``keys`` (int16 ``(M, d)``), looked up in their hash ``table``."""
    M, d = keys.shape
    d1 = d + 1
    low = np.uint64(0xFFFFFFFF)
    probe = np.empty(d1, np.int32)
    # blur neighbours along axis j: n1 = key - 1 + (d + 1) e_j, n2 = key + 1 - (d + 1) e_j (the
    # d-component key drops the last coordinate); n2 is the inverse of n1, so only n1 is looked up
    nbr = np.zeros((d1, M, 2), np.int32)
    for j in range(d1):
        for i in range(M):
            for k in range(d):
                probe[k] = keys[i, k] - 1
            if j < d:
                probe[j] = keys[i, j] + d
            w0, w1 = _pack(probe, d)
            s = _slot(table, w0, w1, shift)
            if table[s, 1] != 0:
                m = np.int32(table[s, 1] & low)
                nbr[j, i, 0] = m
                nbr[j, m - 1, 1] = i + 1
    return nbr


@_jit
def _lattice_neighbours_sorted(keys):
    """:func:`_lattice_neighbours` by sorting instead of hashing, when the keys pack into 62
    bits (each component offset to start at d + 1 in a field wide enough for ± d + 1): a
    neighbour's key is the key plus a constant vector, i.e. its packed key plus a constant, so
    one merge pass over the sorted keys per axis finds them all. Returns ``(nbr, ok)``."""
    M, d = keys.shape
    d1 = d + 1
    nbr = np.zeros((d1, M, 2), np.int32)
    lo = np.empty(d, np.int64)
    shift = np.empty(d, np.int64)
    total = 0
    for k in range(d):
        mn = 1 << 30
        mx = -(1 << 30)
        for i in range(M):
            v = np.int64(keys[i, k])
            mn = min(mn, v)
            mx = max(mx, v)
        lo[k] = mn - d1
        span = mx + d1 - lo[k] + 1
        b = 1
        while (1 << b) < span:
            b += 1
        shift[k] = total
        total += b
    if total > 62 or M == 0:
        return nbr, M == 0
    packed = np.empty(M, np.int64)
    for i in range(M):
        v = np.int64(0)
        for k in range(d):
            v += (np.int64(keys[i, k]) - lo[k]) << shift[k]
        packed[i] = v
    order = np.argsort(packed)
    srt = packed[order]
    for j in range(d1):
        delta = np.int64(0)
        for k in range(d):
            delta += (np.int64(d) if k == j else np.int64(-1)) << shift[k]
        p = 0
        for t in range(M):
            target = srt[t] + delta
            while p < M and srt[p] < target:
                p += 1
            if p == M:
                break
            if srt[p] == target:
                i = order[t]
                m = order[p]
                nbr[j, i, 0] = m + 1
                nbr[j, m, 1] = i + 1
    return nbr, True


@_jit
def _lattice_compute(inp, offset, bary, nbr, alpha, values, new_values, out):
    """``out = L(inp)`` for one channel (float32 ``(N,)``): splat, blur, slice. ``offset`` and
    ``bary`` are ``(d + 1, N)``; ``values`` and ``new_values`` are float32 ``(M + 1,)`` scratch
    buffers. A vertex's remainder r is fixed by its key (its coordinates are ≡ r mod d + 1), so
    splatting r by r adds each vertex's terms in pixel order, as densecrf's pixel-by-pixel loop."""
    d1, N = offset.shape
    values[:] = 0.0
    new_values[0] = 0.0
    for r in range(d1):
        for n in range(N):
            values[offset[r, n]] += bary[r, n] * inp[n]
    M = nbr.shape[1]
    for j in range(d1):
        for i in range(M):
            new_values[i + 1] = values[i + 1] + np.float32(0.5) * (values[nbr[j, i, 0]] + values[nbr[j, i, 1]])
        values, new_values = new_values, values
    out[:] = 0.0
    for r in range(d1):
        for n in range(N):
            out[n] += bary[r, n] * values[offset[r, n]] * alpha


@_jit
def _softmax2(a, c):
    """``exp(a) / (exp(a) + exp(c))`` as densecrf's ``expAndNormalize`` computes it (the larger
    energy subtracted first, so its exponential is exactly 1), with one ``exp``."""
    if a >= c:
        return np.float32(1.0) / (np.float32(1.0) + np.exp(c - a))
    e = np.exp(a - c)
    return e / (e + np.float32(1.0))


@_jit
def _mean_field(u_fg, u_bg, n_iter, kernels_norm, kernels_one, weights,
                off0, bary0, nbr0, alpha0, off1, bary1, nbr1, alpha1):
    """Foreground marginal after ``n_iter`` mean-field steps with two kernels (see the module)."""
    N = u_fg.shape[0]
    q = np.empty(N, np.float32)
    for n in range(N):
        q[n] = _softmax2(-u_fg[n], -u_bg[n])
    x = np.empty(N, np.float32)
    f0 = np.empty(N, np.float32)
    f1 = np.empty(N, np.float32)
    v0a = np.zeros(nbr0.shape[1] + 1, np.float32)
    v0b = np.zeros(nbr0.shape[1] + 1, np.float32)
    v1a = np.zeros(nbr1.shape[1] + 1, np.float32)
    v1b = np.zeros(nbr1.shape[1] + 1, np.float32)
    w0 = weights[0]
    w1 = weights[1]
    for _ in range(n_iter):
        for n in range(N):
            x[n] = q[n] * kernels_norm[0, n]
        _lattice_compute(x, off0, bary0, nbr0, alpha0, v0a, v0b, f0)
        for n in range(N):
            x[n] = q[n] * kernels_norm[1, n]
        _lattice_compute(x, off1, bary1, nbr1, alpha1, v1a, v1b, f1)
        for n in range(N):
            k0 = f0[n] * kernels_norm[0, n]
            k1 = f1[n] * kernels_norm[1, n]
            a = -u_fg[n] + w0 * k0 + w1 * k1
            c = -u_bg[n] + w0 * (kernels_one[0, n] - k0) + w1 * (kernels_one[1, n] - k1)
            q[n] = _softmax2(a, c)
    return q


class _Lattice:
    """One kernel's lattice over features float32 ``(N, d)`` and its symmetric normalisation."""

    def __init__(self, feat: np.ndarray, row: int = 0):
        feat = np.ascontiguousarray(feat, dtype=np.float32)
        if feat.ndim != 2 or not 1 <= feat.shape[1] <= 6 or not np.isfinite(feat).all():
            raise ValueError(f"features must be finite (N, d) with 1 <= d <= 6, got shape {feat.shape}")
        N, d = feat.shape
        inv_std = np.float32(math.sqrt(2.0 / 3.0) * (d + 1))
        scale = np.array([1.0 / math.sqrt((i + 2) * (i + 1)) * float(inv_std) for i in range(d)], dtype=np.float32)
        self.offset, self.bary, keys, table, shift, overflow = _build_lattice(
            feat, scale, np.float32(1.0 / (d + 1)), np.float32(d + 1), int(row))
        if overflow:
            raise ValueError(f"the CRF features span more than densecrf's 16-bit lattice keys allow "
                             f"(max |feature| {float(np.abs(feat).max()):.0f}): use a smaller image or larger σ")
        self.nbr, ok = _lattice_neighbours_sorted(keys)
        if not ok:  # keys too spread to pack in 62 bits
            self.nbr = _lattice_neighbours(keys, table, shift)
        self.M = len(keys)
        self.alpha = np.float32(1.0 / (1.0 + 2.0 ** -d))
        ones = np.ones(N, np.float32)
        raw = self.compute(ones)
        self.norm = (1.0 / np.sqrt(raw.astype(np.float64) + 1e-20)).astype(np.float32)
        self.one = self.compute(self.norm) * self.norm  # K(1)

    def compute(self, x: np.ndarray) -> np.ndarray:
        out = np.empty(len(x), np.float32)
        v = np.empty(self.M + 1, np.float32)
        _lattice_compute(np.ascontiguousarray(x, dtype=np.float32), self.offset, self.bary, self.nbr,
                         self.alpha, v, np.empty_like(v), out)
        return out


def lattice_filter(features: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Permutohedral-lattice Gaussian filter ``L(values)`` (unnormalised, Adams et al. 2010 as in
    densecrf) of one channel.

    Args:
        features: float ``(N, d)``, ``1 <= d <= 6``, finite: positions already divided by the
            kernel's σ (computed in float32).
        values: float ``(N,)``.

    Returns:
        float32 ``(N,)``: ``Σ_m k(f_n, f_m) v_m`` up to the lattice's approximation, without the
        normalisation (the CRF's kernels normalise it symmetrically).

    Raises:
        ValueError: shapes disagree, ``d`` outside 1-6, a non-finite feature, or a lattice key
            leaves densecrf's 16-bit range.
    """
    f = np.asarray(features)
    v = np.asarray(values)
    if f.ndim != 2 or v.shape != (f.shape[0],):
        raise ValueError(f"features must be (N, d) and values (N,), got {f.shape} and {v.shape}")
    return _Lattice(f).compute(v)


class DenseCRF2:
    """Two-label dense CRF of one image (see the module): Potts weights ``pos_w`` (Gaussian
    kernel, σ ``pos_xy_std`` px) and ``bi_w`` (bilateral, σ ``bi_xy_std`` px and ``bi_rgb_std``
    colour levels), as ``pydensecrf``'s ``DenseCRF2D(W, H, 2)`` with ``addPairwiseGaussian`` and
    ``addPairwiseBilateral`` (``DIAG_KERNEL``, ``NORMALIZE_SYMMETRIC``). The lattices are built
    here, once; each call runs inference from a new unary.

    Args:
        image_uint8: uint8 ``(H, W, 3)`` (the bilateral kernel's colours, in that channel order).
        pos_xy_std, pos_w, bi_xy_std, bi_rgb_std, bi_w: positive floats.

    Raises:
        ValueError: the image is not uint8 ``(H, W, 3)``, a σ is not positive, or the lattice
            keys leave densecrf's 16-bit range (images of more than about 10,000 px a side at σ = 1).
    """

    def __init__(self, image_uint8: np.ndarray, *, pos_xy_std: float, pos_w: float, bi_xy_std: float,
                 bi_rgb_std: float, bi_w: float):
        img = np.asarray(image_uint8)
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"image_uint8 must be uint8 (H, W, 3), got {img.dtype} {img.shape}")
        for name, s in (("pos_xy_std", pos_xy_std), ("bi_xy_std", bi_xy_std), ("bi_rgb_std", bi_rgb_std)):
            if not s > 0:
                raise ValueError(f"{name}={s}: must be > 0")
        H, W = img.shape[:2]
        self.shape = (H, W)
        jj, ii = np.meshgrid(np.arange(H, dtype=np.float32), np.arange(W, dtype=np.float32), indexing="ij")
        sxy, bxy, srgb = np.float32(pos_xy_std), np.float32(bi_xy_std), np.float32(bi_rgb_std)
        pos = np.stack([ii.ravel() / sxy, jj.ravel() / sxy], axis=1)
        bil = np.concatenate([np.stack([ii.ravel() / bxy, jj.ravel() / bxy], axis=1),
                              img.reshape(-1, 3).astype(np.float32) / srgb], axis=1)
        self._lat = (_Lattice(pos, W), _Lattice(bil, W))
        self._norm = np.stack([lat.norm for lat in self._lat])
        self._one = np.stack([lat.one for lat in self._lat])
        self._w = np.array([pos_w, bi_w], dtype=np.float32)

    def inference(self, unary_fg: np.ndarray, unary_bg: np.ndarray, n_iterations: int) -> np.ndarray:
        """Foreground marginal, float32 ``(H, W)`` in ``[0, 1]``, after ``n_iterations`` mean-field
        steps from the unaries (energies, float ``(H, W)`` each; ``−log p`` for probabilities).

        Raises:
            ValueError: a unary is not ``(H, W)``, or ``n_iterations < 0``.
        """
        for name, u in (("unary_fg", unary_fg), ("unary_bg", unary_bg)):
            if np.shape(u) != self.shape:
                raise ValueError(f"{name} is {np.shape(u)}, expected {self.shape} (the image's size)")
        if n_iterations < 0:
            raise ValueError(f"n_iterations={n_iterations}: must be >= 0")
        g, b = self._lat
        q = _mean_field(np.ascontiguousarray(unary_fg, dtype=np.float32).ravel(),
                        np.ascontiguousarray(unary_bg, dtype=np.float32).ravel(), int(n_iterations),
                        self._norm, self._one, self._w,
                        g.offset, g.bary, g.nbr, g.alpha, b.offset, b.bary, b.nbr, b.alpha)
        return q.reshape(self.shape)

