"""Connected components of every upper level set of a batch of byte maps, at once (numpy).

For an integer image ``v`` the upper level sets ``U(L) = {p : v[p] > L}`` only grow as ``L``
drops, so their connected components only merge: they form a tree (the *component tree*).
We build it without tracing anything per level:

1. **Basins.** Every pixel of the set points to the neighbour (itself included) with the
   largest ``(v, secondary key, raster index)`` (the secondary key is the float map before
   byte quantisation, so byte plateaus do not shatter into many basins); following the
   pointers (pointer jumping) leads every pixel to a root, a local maximum. A basin is the
   set of pixels reaching the same root. Along a pointer path ``v`` never decreases, so
   ``basin ∩ U(L)`` is connected for every ``L``: each of its pixels reaches the root
   through pixels at least as high.
2. **Kruskal on basins.** Two basins touch at level ``L`` when some adjacent pair of their
   pixels has ``min(v_p, v_q) > L``. Processing the (few) basin adjacencies by decreasing
   weight with a union-find gives the merge tree; a node created by a merge at weight ``w``
   is alive for ``L < w`` until its own parent is created.
3. **Tables per (basin, level).** Bounding boxes, raster-first pixel and cell areas are
   scattered into ``(basin, value)`` tables and reverse-cumulated over the value axis, then
   reduced per (tree node, level).

All steps are vectorised over a batch of maps; only step 2 loops in Python, over basin
adjacencies (tens per smooth 224×224 map). :mod:`._levelsets_torch` is the same algorithm in
torch, used on GPU.

When numba is installed, the CPU path uses instead the compiled sweep at the end of this
module (:func:`sweep_scores`): one union-find pass over the pixels sorted by byte value gives
the same component statistics level by level, and the best IoU of every needed level is
computed inside it (about 10× faster than the vectorised trees on 224×224 CAMs). Both are
tested equal entry by entry; the numpy trees stay as the fallback without numba.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Neighbour offsets in increasing raster order; "self" sits at its rank in that order, so the
# rank breaks ties of equal values exactly as the raster index does.
_OFF8 = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 0), (0, 1), (1, -1), (1, 0), (1, 1))
_OFF4 = ((-1, 0), (0, -1), (0, 0), (0, 1), (1, 0))
_HALF8 = ((0, 1), (1, -1), (1, 0), (1, 1))
_HALF4 = ((0, 1), (1, 0))
_BIG = np.int64(1 << 40)
_BIG32 = np.int32(1 << 30)


@dataclass
class NodeTable:
    """Per alive (tree node, level) statistics of the components of ``U(L)`` (1-D arrays).

    Coordinates are in the unpadded frame (columns ``x``, rows ``y``); ``first`` is the raster
    index ``y * W + x`` of the component's first pixel; ``area2`` is twice the outer-contour
    polygon area (only when requested).
    """

    node: np.ndarray
    level: np.ndarray
    image: np.ndarray
    x0: np.ndarray
    y0: np.ndarray
    x1: np.ndarray
    y1: np.ndarray
    first: np.ndarray
    area2: np.ndarray | None


@dataclass
class Forest:
    """The component tree of a padded batch (internal)."""

    basin_of: np.ndarray  # int64 (N,) basin id of each padded pixel, -1 outside the set
    num_basins: int
    comp: np.ndarray  # int64 (C, nlev): node alive at level L above canonical leaf c, or -1
    image_of_node: np.ndarray  # int64 (n_nodes,)
    num_nodes: int
    rep: np.ndarray  # int64 (n_nodes,): the leaf of highest peak below each node
    canon_row: np.ndarray  # int64 (R,): row of ``comp`` valid for basin j at levels < peak_j
    peak: np.ndarray  # int64 (R,): highest value of each basin


def ar_dtype(n: int):
    """Smallest index dtype for n elements."""
    return np.int32 if n < 2**31 else np.int64


def _shift(t: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """View of the padded array (B, Hp, Wp) at offset (dy, dx) over the region [1:-1, 1:-1]."""
    _, hp, wp = t.shape
    return t[:, 1 + dy:hp - 1 + dy, 1 + dx:wp - 1 + dx]


def pad_batch(values: np.ndarray, inner: int, dtype=np.int16) -> np.ndarray:
    """(B, H, W) -> (B, H + 4, W + 4): a ring of ``inner`` then an outer ring of 0."""
    b, h, w = values.shape
    out = np.zeros((b, h + 4, w + 4), dtype=dtype)
    out[:, 1:-1, 1:-1] = inner
    out[:, 2:-2, 2:-2] = values
    return out


def build_forest(v: np.ndarray, conn: int, nlev: int, sub: np.ndarray | None = None) -> Forest:
    """Component tree of the upper level sets ``{v > L}``, ``L = 0..nlev-1``.

    Args:
        v: int16 (B, Hp, Wp) with values in [0, 2047]; the outermost ring must be 0.
        conn: 8 or 4 (pixel connectivity).
        nlev: number of levels to tabulate.
        sub: optional int (B, Hp, Wp) in [0, 2**18), a secondary key that orders pixels of
            equal ``v`` for the pointers (e.g. the float map before byte quantisation). Any
            order gives the same tree; a smooth one gives few basins on byte plateaus.
    """
    b, hp, wp = v.shape
    n = b * hp * wp
    offs = _OFF8 if conn == 8 else _OFF4
    # (v, sub, rank) packed in one integer: the max over the neighbourhood names the target,
    # and the rank of the offset (raster order) breaks the remaining ties like the index does.
    if sub is None:
        base = (v * np.int16(16)).reshape(-1)
    else:
        base = (((v.astype(np.int32) << 18) | sub.astype(np.int32)) << 4).reshape(-1)
    # Work on the flat array: pixel i and its neighbour i + d for i in [lo, hi) covers the
    # inner region [1:-1, 1:-1] of every map (the extra positions are outermost-ring pixels,
    # never in the set, whose result is discarded).
    lo, hi = wp + 1, n - wp - 1
    dtab = np.array([dy * wp + dx for dy, dx in offs], dtype=ar_dtype(n))
    best = base[lo + dtab[0]:hi + dtab[0]].copy()  # rank 0
    tmp = np.empty_like(best)
    for rank, d in enumerate(dtab.tolist()[1:], start=1):
        np.add(base[lo + d:hi + d], base.dtype.type(rank), out=tmp)
        np.maximum(best, tmp, out=best)
    self_rank = offs.index((0, 0))
    vf = v.reshape(-1)
    inset = vf[lo:hi] > 0
    ar = np.arange(n, dtype=ar_dtype(n))
    ptr = ar.copy()
    rank = best & 15
    step = dtab[rank]
    step[~inset] = 0
    ptr[lo:hi] += step
    roots = np.flatnonzero(inset & (rank == self_rank)) + lo
    # Pointer jumping: rounds over every pixel while most paths are unresolved (cheap, local
    # accesses; ascent paths are up to ~H + W long), then only over the pixels whose pointer
    # is not a root yet.
    full_rounds = max(1, int(np.ceil(np.log2(max(hp, wp)))) - (2 if conn == 8 else 1))
    for _ in range(full_rounds):
        ptr = ptr.take(ptr)
    act = np.flatnonzero(ptr.take(ptr) != ptr)
    while act.size:
        p = ptr.take(act)
        pp = ptr.take(p)
        ptr[act] = pp
        act = act[pp != p]
    r = int(roots.size)
    bid = np.full(n, -1, dtype=np.int32)
    bid[roots] = np.arange(r, dtype=np.int32)
    basin_of = bid.take(ptr)  # pixels outside the set point to themselves and are not roots
    peak = vf[roots].astype(np.int64)
    image_of_basin = roots // (hp * wp)

    ea, eb, ew = [], [], []
    for dy, dx in (_HALF8 if conn == 8 else _HALF4):
        d = dy * wp + dx
        m = np.flatnonzero(basin_of[lo:hi] != basin_of[lo + d:hi + d]) + lo
        a_, b_ = basin_of.take(m), basin_of.take(m + d)
        ok = (a_ >= 0) & (b_ >= 0)
        m = m[ok]
        ea.append(a_[ok].astype(np.int64))
        eb.append(b_[ok].astype(np.int64))
        ew.append(np.minimum(vf.take(m), vf.take(m + d)).astype(np.int64))
    parent = [-1] * r
    birth = peak.tolist()
    img = image_of_basin.tolist()
    rep = list(range(r))
    a_ = np.concatenate(ea)
    if a_.size:
        b_ = np.concatenate(eb)
        w_ = np.concatenate(ew)
        k = np.minimum(a_, b_) * r + np.maximum(a_, b_)
        # max weight per basin pair
        if r * r <= 1 << 22:  # few basins: a dense (pair) table
            dense = np.zeros(r * r, dtype=np.int64)
            np.maximum.at(dense, k, w_)
            ks = np.flatnonzero(dense)
            ws_ = dense[ks]
        else:  # sort by (pair, weight) and keep the last of each pair
            order = np.lexsort((w_, k))
            ks, ws_ = k[order], w_[order]
            last = np.ones(ks.size, dtype=bool)
            last[:-1] = ks[1:] != ks[:-1]
            ks, ws_ = ks[last], ws_[last]
        o2 = np.argsort(-ws_, kind="stable")
        lo = (ks[o2] // r).tolist()
        hi = (ks[o2] % r).tolist()
        ws = ws_[o2].tolist()
        uf = list(range(r))
        top = list(range(r))
        for e in range(len(ws)):
            x = lo[e]
            while uf[x] != x:
                uf[x] = uf[uf[x]]
                x = uf[x]
            y = hi[e]
            while uf[y] != y:
                uf[y] = uf[uf[y]]
                y = uf[y]
            if x == y:
                continue
            node = len(parent)
            parent.append(-1)
            birth.append(ws[e])
            img.append(img[lo[e]])
            rx, ry = rep[top[x]], rep[top[y]]
            rep.append(rx if birth[rx] >= birth[ry] else ry)
            parent[top[x]] = node
            parent[top[y]] = node
            uf[y] = x
            top[x] = node
    num_nodes = len(parent)
    parent_a = np.asarray(parent, dtype=np.int64)
    birth_a = np.asarray(birth, dtype=np.int64)
    rep_a = np.asarray(rep, dtype=np.int64)
    # Canonical leaf of basin j: below j's highest ancestor born at peak_j, the highest leaf.
    # Both have the same alive ancestor at every level L < peak_j, so only canonical leaves
    # need a row in the (leaf, level) table (plateau basins that never stand alone drop out).
    cur = np.arange(r, dtype=np.int64)
    while True:
        par = parent_a[cur]
        move = par >= 0
        move[move] = birth_a[par[move]] == birth_a[cur[move]]
        if not move.any():
            break
        cur[move] = par[move]
    canon = rep_a[cur]
    canon_u, canon_row = np.unique(canon, return_inverse=True)
    comp = _alive_table(parent_a, birth_a, canon_u, peak[canon_u], nlev)
    return Forest(basin_of, r, comp, np.asarray(img, dtype=np.int64), num_nodes, rep_a,
                  canon_row.astype(np.int64), peak)


def _alive_table(parent: np.ndarray, birth: np.ndarray, leaves: np.ndarray, peak: np.ndarray,
                 nlev: int) -> np.ndarray:
    """``comp[i, L]``: the ancestor of ``leaves[i]`` alive at level L (-1 if ``L >= peak_i``).

    Node a is alive for ``birth[parent[a]] <= L < birth[a]``; along a leaf's ancestor chain
    births do not increase and ids increase, so marking each ancestor at ``birth - 1`` (the
    larger id winning a shared mark) and filling every level from the nearest mark above
    gives the alive ancestor.
    """
    r = leaves.size
    marks = np.full((r, nlev), -1, dtype=np.int64)
    cur = leaves.astype(np.int64)
    rows = np.arange(r, dtype=np.int64)
    while cur.size:
        pos = np.minimum(birth[cur] - 1, nlev - 1)
        np.maximum.at(marks, (rows, pos), cur)
        nxt = parent[cur]
        keep = nxt >= 0
        cur, rows = nxt[keep], rows[keep]
    lev = np.arange(nlev, dtype=np.int64)
    pos = np.where(marks >= 0, lev[None, :], np.int64(nlev))
    nearest = np.flip(np.minimum.accumulate(np.flip(pos, 1), 1), 1)
    comp = np.take_along_axis(marks, np.minimum(nearest, nlev - 1), 1)
    comp[lev[None, :] >= peak[:, None]] = -1
    return comp


_COORDS: dict = {}


def _coords(b: int, hp: int, wp: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Column ``x`` and raster index ``y * width + x`` of every padded pixel (cached)."""
    key = (b, hp, wp, width)
    if key not in _COORDS:
        yy, xx = np.mgrid[-2:hp - 2, -2:wp - 2]
        x = np.broadcast_to(xx, (b, hp, wp)).reshape(-1).astype(np.int32)
        ras = np.broadcast_to(yy * width + xx, (b, hp, wp)).reshape(-1).astype(np.int32)
        _COORDS.clear()
        _COORDS[key] = (x, ras)
    return _COORDS[key]


def _rev_cum(table: np.ndarray, op) -> np.ndarray:
    """``out[:, L] = op over value > L of table[:, value]`` (shape (R, V - 1))."""
    f = op.accumulate(table[:, ::-1], axis=1)[:, ::-1]
    return f[:, 1:]


def node_table(v: np.ndarray, forest: Forest, nlev: int, width: int,
               cells: bool = False, exclude: np.ndarray | None = None) -> NodeTable:
    """Bounding boxes (and outer-contour areas if ``cells``) per alive (node, level).

    ``v`` is the padded batch (B, H + 4, W + 4) whose interior starts at (2, 2).
    ``cells=True`` adds ``area2``, twice ``cv2.contourArea`` of the outer contour of each
    component, valid when the components have no holes (the caller passes hole-filled maps):
    a 2×2 cell of pixel centres counts 1 when its 4 pixels are in the component and 1/2 when
    3 are (the traced polygon cuts it along the diagonal); fewer contribute nothing.
    ``exclude`` (int (B, nlev)): per map and level a node whose statistics are not needed
    (the outside of the background); pixels already in it at the highest level they count at
    stay in it below and are skipped, and that node's rows come out incomplete.
    """
    b, hp, wp = v.shape
    vcols = max(int(v.max()) + 2, nlev + 1)
    comp = forest.comp
    basin = forest.basin_of
    # A pixel of value v only counts at levels L < v, where its component is the one alive at
    # v - 1: any leaf below that node stands for it. Using the node's highest leaf ("rep")
    # gathers the pixels on few rows (plateau basins that are never alone disappear).
    rows_of_leaf = np.full(forest.num_basins, -1, dtype=np.int64)
    alive_nodes = comp[comp >= 0]
    rep_leaves = np.unique(forest.rep[alive_nodes])
    canon_row = forest.canon_row
    r = int(rep_leaves.size)
    rows_of_leaf[rep_leaves] = np.arange(r)
    ncomp = comp.shape[1]
    size = r * vcols
    # slot[j, v]: table slot of a pixel of basin j and value v; value 0 (outside the set) and
    # the extra last row (basin -1, reached by negative indexing) go to the dummy slot `size`.
    vals = np.arange(vcols)
    node = comp[canon_row][:, np.minimum(np.maximum(vals - 1, 0), ncomp - 1)]
    slot = np.full((forest.num_basins + 1, vcols), size, dtype=np.int32)
    ok = (node >= 0) & (vals[None, :] > 0)
    if exclude is not None:
        img = forest.image_of_node[: forest.num_basins]
        lev_of_val = np.minimum(np.maximum(vals - 1, 0), exclude.shape[1] - 1)
        ok &= node != exclude[img][:, lev_of_val]
    slot[:-1][ok] = (rows_of_leaf[forest.rep[node[ok]]] * vcols
                     + np.broadcast_to(vals, node.shape)[ok])
    slot_flat = slot.reshape(-1)
    idx = slot_flat.take(basin * vcols + v.reshape(-1))
    x, ras = _coords(b, hp, wp, width)
    if exclude is not None:
        keep = np.flatnonzero(idx != size)
        idx, x, ras = idx[keep], x[keep], ras[keep]

    def red(vals_: np.ndarray, ufunc, fill) -> np.ndarray:
        t = np.full(size + 1, fill, dtype=np.int32)
        ufunc.at(t, idx, vals_)
        return t[:size].reshape(r, vcols)

    tx0 = _rev_cum(red(x, np.minimum, _BIG32), np.minimum)[:, :nlev]
    tx1 = _rev_cum(red(x, np.maximum, -_BIG32), np.maximum)[:, :nlev]
    tfi = _rev_cum(red(ras, np.minimum, _BIG32), np.minimum)[:, :nlev]
    tla = _rev_cum(red(ras, np.maximum, -_BIG32), np.maximum)[:, :nlev]
    tar = None
    if cells:
        vv = v if v.min() >= 0 else np.maximum(v, 0)
        a, bb, c, d = vv[:, :-1, :-1], vv[:, :-1, 1:], vv[:, 1:, :-1], vv[:, 1:, 1:]
        lo1, hi1 = np.minimum(a, bb), np.maximum(a, bb)
        lo2, hi2 = np.minimum(c, d), np.maximum(c, d)
        v3 = np.minimum(np.maximum(lo1, lo2), np.minimum(hi1, hi2))
        v4 = np.minimum(lo1, lo2)
        # at most one pixel of the cell is below v3, so the top-left or the bottom-right pixel
        # is in the cell's component; cells with fewer than 3 pixels in the set (v3 == 0) go
        # to the dummy slot (their v4 is 0 too)
        bo = basin.reshape(b, hp, wp)
        cb = np.where(a >= v3, bo[:, :-1, :-1], bo[:, 1:, 1:])
        i3 = slot_flat.take((cb * np.int32(vcols) + v3).reshape(-1))
        i4 = i3 + (v4 - v3).reshape(-1)  # same row, column v4 (0: never read)
        t = np.bincount(i3, minlength=size + 1)[:size]
        t += np.bincount(i4, minlength=size + 1)[:size]
        tar = _rev_cum(t.reshape(r, vcols).astype(np.int64), np.add)[:, :nlev]

    lev = np.arange(nlev)
    crows = comp[canon_row[rep_leaves]]
    crows = np.where(lev[None, :] < forest.peak[rep_leaves][:, None], crows, -1)
    bi, li = np.nonzero(crows >= 0)
    nodes_all = crows[bi, li]
    mark = np.zeros(forest.num_nodes, dtype=bool)
    mark[nodes_all] = True
    nodes_u = np.flatnonzero(mark)
    nodes = (np.cumsum(mark) - 1)[nodes_all]
    slot = nodes * nlev + li
    tsize = int(nodes_u.size) * nlev

    def agg(vals: np.ndarray, ufunc, fill) -> np.ndarray:
        t = np.full(tsize, fill, dtype=np.int32)
        ufunc.at(t, slot, vals)
        return t

    nx0 = agg(tx0[bi, li], np.minimum, _BIG32)
    used = np.flatnonzero(nx0 < _BIG32)
    out_node = nodes_u[used // nlev]
    out_lev = used % nlev
    nx1 = agg(tx1[bi, li], np.maximum, -_BIG32)[used].astype(np.int64)
    nfi = agg(tfi[bi, li], np.minimum, _BIG32)[used].astype(np.int64)
    nla = agg(tla[bi, li], np.maximum, -_BIG32)[used].astype(np.int64)
    nar = None
    if tar is not None:
        nar = np.bincount(slot, weights=tar[bi, li], minlength=tsize)[used].astype(np.int64)
    return NodeTable(out_node, out_lev, forest.image_of_node[out_node],
                     nx0[used].astype(np.int64),
                     nfi // width, nx1, nla // width, nfi, nar)


# ---------------------------------------------------------------------------------------------
# Compiled sweep (numba): the same component statistics, level by level, with a union-find.
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

try:  # numba is optional: without it the vectorised numpy path above is used
    import numba as _numba

    HAVE_NUMBA = True

    def _jit(f):
        return _numba.njit(cache=True, nogil=True)(f)
except ImportError:  # pragma: no cover - exercised only where numba is absent
    HAVE_NUMBA = False

    def _jit(f):
        return f


@_jit
def _box_iou(x0, y0, x1, y1, gt, k):
    """Best inclusive IoU of box (x0, y0, x1, y1) over gt[:k] (float64, as ``_best_iou``)."""
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
    """Best IoU per (map, level) of both box rules, compiled (numba) or pure Python.

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
