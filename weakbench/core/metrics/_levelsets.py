"""Best box IoU of every upper level set of a batch of byte maps, compiled (numba) on the CPU.

The CPU engine of :func:`weakbench.core.metrics.wsol.box_scores`: for every map and every byte
level ``L`` it finds the connected components of ``{b > L}`` (8-connected foreground, the
4-connected holes, and the hole-filled foreground for the largest contour), each with its
bounding box, raster-first pixel and (filled maps) twice its outer-contour area, and scores
their boxes against the GT boxes inside the sweep (:func:`sweep_scores`), with a union-find
over the pixels sorted by byte value. Levels no threshold maps to are skipped.

numba is a hard dependency (``pyproject.toml``); the functions are compiled on first use and
cached (``cache=True``). :mod:`._levelsets_torch` computes the same component tables with
vectorised component trees in torch and is the engine on an accelerator; the two are tested
equal entry by entry, and both against the OpenCV reference in ``tests/wsol_reference.py``.
"""

from __future__ import annotations

import numba
import numpy as np

# ---------------------------------------------------------------------------------------------
# Compiled sweep (numba): component statistics level by level, with a union-find.
#
# For the foreground rule the pixels are added by decreasing byte value t (counting sort);
# after the pixels of value t are merged with their active 8-neighbours, the union-find roots
# are exactly the 8-connected components of ``{v > t - 1}``, each carrying its bounding box,
# raster-first pixel and (filled maps) twice its outer-contour area, merged by min / max /
# sum. The background is swept by increasing t with 4-connectivity from the border ring (one
# component, the outside): the other roots after adding the pixels of value t are the holes
# of ``{b > t}``. Hole filling is the minimax ("priority flood") distance from the border:
# ``g[p] = min over 4-paths from the outside of the max byte along the path``, i.e. the level
# at which p's background component joins the outside, computed with a 256-bucket queue.
# Every step is O(pixels · neighbours) per map plus, per evaluated level, one pass over the
# alive roots; only the levels some threshold maps to are evaluated.
# ---------------------------------------------------------------------------------------------


def _jit(f):
    return numba.njit(cache=True, nogil=True)(f)


@_jit
def _box_iou(x0, y0, x1, y1, gt, k):
    """Best IoU of the *inclusive* box (x0, y0, x1, y1) over gt[:k]: the arithmetic of
    :func:`weakbench.core.boxes.iou_inclusive` (float64), compiled for the sweep."""
    best = -1.0
    aa = (x1 - x0 + 1) * (y1 - y0 + 1)
    for j in range(k):
        iw = min(x1, gt[j, 2]) - max(x0, gt[j, 0]) + 1
        ih = min(y1, gt[j, 3]) - max(y0, gt[j, 1]) + 1
        if iw < 0:
            iw = 0
        if ih < 0:
            ih = 0
        inter = iw * ih
        ab = (gt[j, 2] - gt[j, 0] + 1) * (gt[j, 3] - gt[j, 1] + 1)
        un = aa + ab - inter
        iou = 0.0
        if un > 0:
            iou = inter / un
        if iou > best:
            best = iou
    return best


@_jit
def _bucket(v, h, w, hist, order, ox, oy, counted=False):
    """Counting sort of the interior pixels by value: the pixels of value t (padded indices
    in ``order``, unpadded columns / rows in ``ox`` / ``oy``) sit at ``hist[t]:hist[t + 1]``
    (hist has 257 entries), in raster order within a value. ``counted``: ``hist[t + 1]``
    already holds the number of pixels of value t."""
    wp = w + 2
    if not counted:
        hist[:] = 0
        for y in range(h):
            row = (y + 1) * wp + 1
            for x in range(w):
                hist[v[row + x] + 1] += 1
    for t in range(256):
        hist[t + 1] += hist[t]
    pos = hist[:256].copy()
    for y in range(h):
        row = (y + 1) * wp + 1
        for x in range(w):
            t = v[row + x]
            i = pos[t]
            order[i] = row + x
            ox[i] = x
            oy[i] = y
            pos[t] += 1


def _neighbour_tables():
    """Per mask of active 8-neighbours (bit j: neighbour j in circular order NW, N, NE, E,
    SE, S, SW, W): one neighbour per group of mutually 8-connected active neighbours (they
    are already in one component, so one ``find`` per group suffices), and the cell-area
    increment: each of the 4 cells around the pixel with 2 (3) active other pixels becomes a
    3-pixel (4-pixel) cell when the pixel arrives, adding 1 to twice its contour area."""
    pos = [(-1, -1), (-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1)]
    cells = ((0, 1, 7), (1, 2, 3), (3, 4, 5), (5, 6, 7))
    rep = np.zeros((256, 4), np.int64)
    nrep = np.zeros(256, np.int64)
    cell = np.zeros(256, np.int32)
    for m in range(256):
        on = [j for j in range(8) if m >> j & 1]
        group = {j: j for j in on}

        def root(j):
            while group[j] != j:
                j = group[j]
            return j
        for a in on:
            for b in on:
                if max(abs(pos[a][0] - pos[b][0]), abs(pos[a][1] - pos[b][1])) == 1:
                    ra, rb = root(a), root(b)
                    if ra != rb:
                        group[ra] = rb
        reps = sorted({root(j) for j in on})
        nrep[m] = len(reps)
        rep[m, :len(reps)] = reps
        cell[m] = sum(sum(m >> j & 1 for j in c) >= 2 for c in cells)
    return rep, nrep, cell


_REP, _NREP, _CELL = _neighbour_tables()


@_jit
def _fg_sweep(v, h, w, vmax, largest, need, gt, k, out, hist, order, ox, oy, rep, nrep, cell,
              par, size, sx0, sy0, sx1, sy1, sfirst, area, dirty, cache, rl):
    """Union-find sweep over the upper level sets ``{v > L}`` (8-connected) of the padded
    map ``v`` (int32 (h+2)(w+2), ring 0), pixels added by decreasing value.

    ``largest=False``: ``out[L]`` = best IoU over all components' boxes. ``largest=True``
    (``v`` hole-filled): ``out[L]`` = IoU of the component of largest outer-contour area
    (twice ``cv2.contourArea``, counted on cells, see :func:`_neighbour_tables`), ties to the
    component whose first pixel comes last in raster order (OpenCV's order). Only needed
    levels below ``vmax`` are written. ``par`` must be -1 on entry (inactive); a pixel
    joining one component is attached to its root directly; components merge by size, with
    min / max / sum statistics.
    """
    wp = w + 2
    hw1 = h * w + 1
    offs = np.array([-wp - 1, -wp, -wp + 1, 1, wp + 1, wp, wp - 1, -1])
    nr = 0
    for t in range(255, 0, -1):
        for i in range(hist[t], hist[t + 1]):
            p = order[i]
            m = 0
            for j in range(8):
                m |= ((par[p + offs[j]] >> 31) + 1) << j
            r = -1
            for jj in range(nrep[m]):
                q = p + offs[rep[m, jj]]
                while par[q] != q:
                    par[q] = par[par[q]]
                    q = par[q]
                if r < 0:
                    r = q
                elif q != r:  # merge two components
                    if size[r] < size[q]:
                        r, q = q, r
                    par[q] = r
                    size[r] += size[q]
                    sx0[r] = min(sx0[r], sx0[q])
                    sy0[r] = min(sy0[r], sy0[q])
                    sx1[r] = max(sx1[r], sx1[q])
                    sy1[r] = max(sy1[r], sy1[q])
                    sfirst[r] = min(sfirst[r], sfirst[q])
                    area[r] += area[q]
            x = ox[i]
            y = oy[i]
            if r < 0:  # a new component
                par[p] = p
                size[p] = 1
                sx0[p] = x
                sx1[p] = x
                sy0[p] = y
                sy1[p] = y
                sfirst[p] = y * w + x
                area[p] = 0
                dirty[p] = True
                rl[nr] = p
                nr += 1
            else:  # (sizes count merged components only: a balance heuristic)
                par[p] = r
                sx0[r] = min(sx0[r], x)
                sy0[r] = min(sy0[r], y)
                sx1[r] = max(sx1[r], x)
                sy1[r] = max(sy1[r], y)
                sfirst[r] = min(sfirst[r], y * w + x)
                area[r] += cell[m]
                dirty[r] = True
        lev = t - 1
        if lev >= vmax or not need[lev]:
            continue
        j = 0
        best = -1.0
        bkey = -1
        broot = -1
        for i in range(nr):
            r = rl[i]
            if par[r] != r:
                continue
            rl[j] = r
            j += 1
            if largest:
                key = np.int64(area[r]) * hw1 + sfirst[r]
                if key > bkey:
                    bkey = key
                    broot = r
            else:
                if dirty[r]:
                    cache[r] = _box_iou(sx0[r], sy0[r], min(sx1[r] + 1, w - 1),
                                        min(sy1[r] + 1, h - 1), gt, k)
                    dirty[r] = False
                if cache[r] > best:
                    best = cache[r]
        nr = j
        if largest:
            r = broot
            best = _box_iou(sx0[r], sy0[r], min(sx1[r] + 1, w - 1), min(sy1[r] + 1, h - 1),
                            gt, k)
        out[lev] = best


@_jit
def _hole_sweep(v, g, h, w, vmax, need, gt, k, out, hist, order, ox, oy,
                par, sx0, sy0, sx1, sy1, dirty, cache, rl):
    """``out[L] = max(out[L], best IoU of the hole boxes of {v > L})`` for needed L < vmax.

    The holes at level L are the 4-connected components of ``{v <= L < g}`` (``g`` the
    hole-filled map: a background component either is the outside or lies entirely outside
    it), so only the pixels with ``g > v`` take part, added by increasing ``v``; a component
    dies at once when it joins the outside (all its pixels then have ``g = L``). A hole's
    contour runs through the foreground pixels around it: its box is the hole's bounding box
    grown by one pixel.
    """
    wp = w + 2
    hist[:] = 0
    nh = 0
    for y in range(h):
        row = (y + 1) * wp + 1
        for x in range(w):
            if g[row + x] > v[row + x]:
                hist[v[row + x] + 1] += 1
                nh += 1
    if nh == 0:
        return
    for t in range(256):
        hist[t + 1] += hist[t]
    pos = hist[:256].copy()
    for y in range(h):
        row = (y + 1) * wp + 1
        for x in range(w):
            p = row + x
            if g[p] > v[p]:
                i = pos[v[p]]
                order[i] = p
                ox[i] = x
                oy[i] = y
                pos[v[p]] += 1
    nr = 0
    for t in range(vmax):
        for i in range(hist[t], hist[t + 1]):
            p = order[i]
            r = -1
            for d in (-wp, -1, 1, wp):
                q = p + d
                if par[q] < 0:
                    continue
                while par[q] != q:
                    par[q] = par[par[q]]
                    q = par[q]
                if r < 0:
                    r = q
                elif q != r:
                    par[q] = r
                    sx0[r] = min(sx0[r], sx0[q])
                    sy0[r] = min(sy0[r], sy0[q])
                    sx1[r] = max(sx1[r], sx1[q])
                    sy1[r] = max(sy1[r], sy1[q])
                    dirty[r] = True
            x = ox[i]
            y = oy[i]
            if r < 0:
                par[p] = p
                sx0[p] = x
                sx1[p] = x
                sy0[p] = y
                sy1[p] = y
                dirty[p] = True
                rl[nr] = p
                nr += 1
            else:
                par[p] = r
                sx0[r] = min(sx0[r], x)
                sy0[r] = min(sy0[r], y)
                sx1[r] = max(sx1[r], x)
                sy1[r] = max(sy1[r], y)
                dirty[r] = True
        if not need[t] or nr == 0:
            continue
        j = 0
        best = out[t]
        for i in range(nr):
            r = rl[i]
            if par[r] != r or g[r] <= t:  # merged, or joined the outside (for good)
                continue
            rl[j] = r
            j += 1
            if dirty[r]:
                cache[r] = _box_iou(sx0[r] - 1, sy0[r] - 1, min(sx1[r] + 2, w - 1),
                                    min(sy1[r] + 2, h - 1), gt, k)
                dirty[r] = False
            if cache[r] > best:
                best = cache[r]
        nr = j
        out[t] = best


@_jit
def _fill_holes(v, h, w, g, head, ent_pix, ent_next, done):
    """Grey-level hole filling of the padded map ``v`` (ring 0): ``g[p]`` = the smallest
    level L at which p belongs to the outside, the 4-connected component of ``{v <= L}``
    holding the border, i.e. the minimax value of 4-paths from the ring to p
    (reconstruction by erosion).

    A raster and an anti-raster scan of ``g = max(v, min(g, g of the neighbour before))``
    from ``g = 255`` give an upper bound; where it equals ``v`` it is exact (``g >= v``).
    The few other pixels (in or near holes) are settled by a priority flood (Dijkstra on
    256 buckets) from their bounds, lowered first by their exact neighbours. ``ent_pix`` /
    ``ent_next`` hold the bucket entries (at most 5 per pixel: one at its bound and one per
    improving neighbour). Returns ``nc``: ``ent_pix[:nc]`` lists every pixel with ``g > v``
    (and possibly some with ``g == v``).
    """
    wp = w + 2
    hp = h + 2
    g[:] = 0
    for y in range(1, hp - 1):  # raster scan (the left neighbour's value kept in a register)
        left = 0
        for x in range(1, wp - 1):
            p = y * wp + x
            left = max(v[p], min(g[p - wp], left))
            g[p] = left
    nc = 0
    for y in range(hp - 2, 0, -1):  # anti-raster scan; the pixels above v are listed
        right = 0
        for x in range(wp - 2, 0, -1):
            p = y * wp + x
            right = max(v[p], min(g[p], g[p + wp], right))
            g[p] = right
            exact = right == v[p]
            done[p] = exact
            if not exact:
                ent_pix[nc] = p
                nc += 1
    head[:] = -1
    for e in range(nc):
        p = ent_pix[e]
        best = 256
        for q in (p - wp, p - 1, p + 1, p + wp):
            if g[q] == v[q] and g[q] < best:  # exact neighbour (ring included)
                best = g[q]
        if best < 256 and max(best, v[p]) < g[p]:
            g[p] = max(best, v[p])
        ent_next[e] = head[g[p]]  # every listed pixel enters at its bound (achievable)
        head[g[p]] = e
    ne = nc
    for lev in range(256):
        while head[lev] >= 0:
            e = head[lev]
            head[lev] = ent_next[e]
            p = ent_pix[e]
            if done[p] or g[p] != lev:
                continue
            done[p] = True
            for q in (p - wp, p - 1, p + 1, p + wp):
                if not done[q]:
                    key = max(lev, v[q])
                    if key < g[q]:
                        g[q] = key
                        ent_pix[ne] = q
                        ent_next[ne] = head[key]
                        head[key] = ne
                        ne += 1
    return nc


@_jit
def sweep_scores(b, gt, nk, need, multi, largest, out_multi, out_largest, rep, nrep, cell):
    """Best IoU per (map, level) of both box rules, compiled with numba.

    Args:
        b: uint8 (n, h, w) byte maps.
        gt: int64 (n, K, 4) GT boxes; nk: int64 (n,) valid boxes of each map (≥ 1).
        need: bool (n, 256): levels to evaluate (others are left at their input value).
        multi, largest: which rules to compute.
        out_multi, out_largest: float64 (n, 256), filled with -1 by the caller; entry
            ``[i, L]`` for a needed ``L < max(b_i)`` becomes the best IoU at ``{b_i > L}``.
        rep, nrep, cell: :data:`_REP`, :data:`_NREP`, :data:`_CELL`.
    """
    n, h, w = b.shape
    wp, hp = w + 2, h + 2
    npx = hp * wp
    v = np.zeros(npx, np.int32)
    g = np.zeros(npx, np.int32)
    hist = np.zeros(257, np.int64)
    order = np.zeros(h * w, np.int32)
    ox = np.zeros(h * w, np.int32)
    oy = np.zeros(h * w, np.int32)
    par = np.zeros(npx, np.int32)
    size = np.zeros(npx, np.int32)
    sx0 = np.zeros(npx, np.int32)
    sy0 = np.zeros(npx, np.int32)
    sx1 = np.zeros(npx, np.int32)
    sy1 = np.zeros(npx, np.int32)
    sfirst = np.zeros(npx, np.int32)
    area = np.zeros(npx, np.int32)
    dirty = np.zeros(npx, np.bool_)
    cache = np.zeros(npx, np.float64)
    rl = np.zeros(h * w, np.int32)
    head = np.zeros(256, np.int64)
    ent_pix = np.zeros(5 * npx, np.int32)
    ent_next = np.zeros(5 * npx, np.int64)
    done = np.zeros(npx, np.bool_)
    hv = np.zeros(257, np.int64)
    for i in range(n):
        vmax = 0
        hv[:] = 0
        for y in range(h):
            row = (y + 1) * wp + 1
            for x in range(w):
                val = np.int32(b[i, y, x])
                v[row + x] = val
                hv[val + 1] += 1
                vmax = max(vmax, val)
        if vmax == 0:
            continue
        k = nk[i]
        gi = gt[i]
        nc = _fill_holes(v, h, w, g, head, ent_pix, ent_next, done)
        if multi:
            hist[:] = hv
            _bucket(v, h, w, hist, order, ox, oy, True)
            par[:] = -1
            _fg_sweep(v, h, w, vmax, False, need[i], gi, k, out_multi[i], hist, order, ox, oy,
                      rep, nrep, cell, par, size, sx0, sy0, sx1, sy1, sfirst, area, dirty,
                      cache, rl)
            par[:] = -1
            _hole_sweep(v, g, h, w, vmax, need[i], gi, k, out_multi[i], hist, order, ox, oy,
                        par, sx0, sy0, sx1, sy1, dirty, cache, rl)
        if largest:
            hist[:] = hv  # the histogram of g: v's, moved for the pixels the filling raised
            for e in range(nc):
                p = ent_pix[e]
                hist[v[p] + 1] -= 1
                hist[g[p] + 1] += 1
            _bucket(g, h, w, hist, order, ox, oy, True)
            par[:] = -1
            _fg_sweep(g, h, w, vmax, True, need[i], gi, k, out_largest[i], hist, order, ox, oy,
                      rep, nrep, cell, par, size, sx0, sy0, sx1, sy1, sfirst, area, dirty,
                      cache, rl)
