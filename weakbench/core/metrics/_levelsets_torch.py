"""Connected components of every upper level set of a batch of byte maps, at once (torch).

The accelerator engine of :func:`weakbench.core.metrics.wsol.box_scores`, used when the
evaluation runs on a GPU; on the CPU the compiled union-find sweep of :mod:`._levelsets` (numba)
is faster. Both give the same tables, tested equal entry by entry.

For an integer image ``v`` the upper level sets ``U(L) = {p : v[p] > L}`` only grow as ``L``
drops, so their connected components only merge: they form a tree (the *component tree*).
We build it without tracing anything per level:

1. **Basins.** Every pixel of the set points to its neighbour with the largest key
   ``v * N + index`` (a strict total order) when that key beats its own; following the
   pointers (pointer jumping) leads every pixel to a root, a local maximum of the key. A basin
   is the set of pixels reaching the same root. Along a pointer path ``v`` never decreases,
   so ``basin ∩ U(L)`` is connected for every ``L`` (each pixel reaches the root through
   pixels at least as high).
2. **Kruskal on basins.** Two basins touch at level ``L`` when some adjacent pair of their
   pixels has ``min(v_p, v_q) > L``. Processing the (few) basin adjacencies by decreasing
   weight with a union-find gives the merge tree; a node created by a merge at weight ``w``
   is alive for ``L < w`` until its own parent is created.
3. **Tables per (basin, level).** Bounding boxes, raster-first pixel and cell areas are
   scattered into ``(basin, value)`` tables and reverse-cumulated over the value axis, then
   reduced per (tree node, level).

Everything is vectorised in torch (CPU or CUDA) over a batch; only step 2 loops in Python,
over basin adjacencies (tens per smooth 224×224 map).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_OFF8 = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))
_OFF4 = ((-1, 0), (0, -1), (0, 1), (1, 0))
_HALF8 = ((0, 1), (1, -1), (1, 0), (1, 1))
_HALF4 = ((0, 1), (1, 0))
_BIG = 1 << 40


@dataclass
class NodeTable:
    """Per (tree node, level) statistics of the components of ``U(L)``.

    Rows are the alive (node, level) pairs; all tensors are 1-D of the same length.
    Coordinates are in the unpadded frame (0-based columns ``x``, rows ``y``).
    """

    node: torch.Tensor  # int64 node id (global in the batch)
    level: torch.Tensor  # int64 level L (component of {v > L})
    image: torch.Tensor  # int64 index of the map in the batch
    x0: torch.Tensor
    y0: torch.Tensor
    x1: torch.Tensor
    y1: torch.Tensor
    first: torch.Tensor  # raster index y * W + x of the component's first pixel
    area2: torch.Tensor | None  # twice the polygon area of the outer contour (if requested)


@dataclass
class Forest:
    """The component tree of a padded batch (internal)."""

    basin_of: torch.Tensor  # int64 (N,) basin id of each padded pixel, -1 outside the set
    num_basins: int
    comp: torch.Tensor  # int64 (R, nlev) node alive at level L containing basin, -1 if none
    image_of_node: torch.Tensor  # int64 (n_nodes,)
    num_nodes: int
    canon_row: torch.Tensor  # int64 (R,): row of ``comp`` for each basin (identity here)
    peak: torch.Tensor  # int64 (R,)


def _shift(t: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """View of the padded tensor (B, Hp, Wp) at offset (dy, dx) over the region [1:-1, 1:-1]."""
    _, hp, wp = t.shape
    return t[:, 1 + dy:hp - 1 + dy, 1 + dx:wp - 1 + dx]


def build_forest(v: torch.Tensor, conn: int, nlev: int) -> Forest:
    """Component tree of the upper level sets ``{v > L}``, ``L = 0..nlev-1``.

    Args:
        v: int64 (B, Hp, Wp), the outermost ring of every map must be ``<= 0`` (never in a set).
        conn: 8 or 4 (pixel connectivity).
        nlev: number of levels to tabulate.
    """
    b, hp, wp = v.shape
    dev = v.device
    n = b * hp * wp
    vf = v.reshape(-1)
    inset = vf > 0
    ar = torch.arange(n, device=dev, dtype=torch.int64)
    key = torch.where(inset, vf * n + ar, torch.full_like(vf, -1)).view(b, hp, wp)
    offs = _OFF8 if conn == 8 else _OFF4
    ar3 = ar.view(b, hp, wp)
    best_key = _shift(key, 0, 0).clone()
    best_ptr = _shift(ar3, 0, 0).clone()
    for dy, dx in offs:
        sk = _shift(key, dy, dx)
        upd = sk > best_key
        best_key = torch.where(upd, sk, best_key)
        best_ptr = torch.where(upd, _shift(ar3, dy, dx), best_ptr)
    ptr = ar3.clone()
    ptr[:, 1:-1, 1:-1] = best_ptr
    ptr = torch.where(inset, ptr.reshape(-1), ar)
    is_root = inset & (ptr == ar)
    # Pointer jumping: every pixel to its root.
    while True:
        nxt = ptr[ptr]
        if torch.equal(nxt, ptr):
            break
        ptr = nxt
    roots = torch.nonzero(is_root).squeeze(1)
    r = int(roots.numel())
    bid = torch.full((n,), -1, dtype=torch.int64, device=dev)
    bid[roots] = torch.arange(r, device=dev)
    basin_of = torch.where(inset, bid[ptr], bid.new_full((), -1))
    peak = vf[roots]  # value at each root = max of the basin
    image_of_basin = roots // (hp * wp)

    # Basin adjacencies with their weight min(v_p, v_q), the highest level they connect at + 1.
    bo = basin_of.view(b, hp, wp)
    ea, eb, ew = [], [], []
    center_b, center_v = _shift(bo, 0, 0), _shift(v, 0, 0)
    for dy, dx in (_HALF8 if conn == 8 else _HALF4):
        ob, ov = _shift(bo, dy, dx), _shift(v, dy, dx)
        m = (center_b >= 0) & (ob >= 0) & (center_b != ob)
        if bool(m.any()):
            ea.append(center_b[m])
            eb.append(ob[m])
            ew.append(torch.minimum(center_v[m], ov[m]))
    parent = [-1] * r
    birth = peak.tolist()
    if ea:
        a_ = torch.cat(ea)
        b_ = torch.cat(eb)
        w_ = torch.cat(ew)
        k = torch.minimum(a_, b_) * r + torch.maximum(a_, b_)
        uk, inv = torch.unique(k, return_inverse=True)
        wmax = torch.zeros(uk.shape, dtype=torch.int64, device=dev).scatter_reduce(
            0, inv, w_, reduce="amax", include_self=False)
        order = torch.argsort(-wmax, stable=True)
        lo = (uk // r)[order].tolist()
        hi = (uk % r)[order].tolist()
        ws = wmax[order].tolist()
        uf = list(range(r))
        top = list(range(r))
        img = image_of_basin.tolist()
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
            parent[top[x]] = node
            parent[top[y]] = node
            uf[y] = x
            top[x] = node
    num_nodes = len(parent)
    parent_t = torch.tensor(parent, dtype=torch.int64, device=dev)
    birth_t = torch.tensor(birth, dtype=torch.int64, device=dev)
    # Ancestor alive at each level: climb while the parent is born above L.
    lev = torch.arange(nlev, device=dev, dtype=torch.int64)
    cur = torch.arange(r, device=dev, dtype=torch.int64)[:, None].expand(r, nlev).clone()
    if num_nodes > r:
        while True:
            par = parent_t[cur]
            move = (par >= 0) & (birth_t[par.clamp(min=0)] > lev)
            if not bool(move.any()):
                break
            cur = torch.where(move, par, cur)
    comp = torch.where(lev[None, :] < peak[:, None], cur, cur.new_full((), -1))
    if num_nodes > r:
        image_of_node = torch.tensor(img, dtype=torch.int64, device=dev)
    else:
        image_of_node = image_of_basin
    return Forest(basin_of, r, comp, image_of_node, num_nodes,
                  torch.arange(r, device=dev), peak)


def _rev_cum(table: torch.Tensor, op: str) -> torch.Tensor:
    """``out[:, L] = op over value > L of table[:, value]`` for L = 0..V-2 (shape (R, V-1))."""
    f = torch.flip(table, (1,))
    if op == "min":
        c = torch.cummin(f, 1).values
    elif op == "max":
        c = torch.cummax(f, 1).values
    else:
        c = torch.cumsum(f, 1)
    c = torch.flip(c, (1,))
    return c[:, 1:]


def node_table(v: torch.Tensor, forest: Forest, nlev: int, width: int,
               cells: bool = False) -> NodeTable:
    """Bounding boxes (and outer-contour areas if ``cells``) per alive (node, level).

    ``v`` is the padded int64 batch (B, H + 4, W + 4) whose interior starts at (2, 2).
    ``cells=True`` adds ``area2``, twice ``cv2.contourArea`` of the outer contour of each
    component, valid when the components have no holes (the caller passes hole-filled maps):
    a 2×2 cell of pixel centres counts 1 when its 4 pixels are in the component and 1/2 when 3
    are (the traced polygon cuts it along the diagonal); fewer contribute nothing.
    """
    b, hp, wp = v.shape
    dev = v.device
    vmax = int(v.max().item()) + 2
    vcols = max(vmax, nlev + 1)
    r = forest.num_basins
    basin = forest.basin_of
    sel = torch.nonzero(basin >= 0).squeeze(1)
    bsel = basin[sel]
    vsel = v.reshape(-1)[sel]
    local = sel % (hp * wp)
    y = local // wp - 2
    x = local % wp - 2
    first = y * width + x
    idx = bsel * vcols + vsel
    size = r * vcols

    def red(vals: torch.Tensor, how: str, fill: int) -> torch.Tensor:
        t = torch.full((size,), fill, dtype=torch.int64, device=dev)
        t.scatter_reduce_(0, idx, vals, reduce=how, include_self=True)
        return t.view(r, vcols)

    big = _BIG
    tx0 = _rev_cum(red(x, "amin", big), "min")[:, :nlev]
    ty0 = _rev_cum(red(y, "amin", big), "min")[:, :nlev]
    tx1 = _rev_cum(red(x, "amax", -big), "max")[:, :nlev]
    ty1 = _rev_cum(red(y, "amax", -big), "max")[:, :nlev]
    tfi = _rev_cum(red(first, "amin", big), "min")[:, :nlev]
    tar = None
    if cells:
        vv = torch.where(v > 0, v, v.new_zeros(()))
        n = b * hp * wp
        ar = torch.arange(n, device=dev, dtype=torch.int64).view(b, hp, wp)
        key = torch.where(vv > 0, vv * n + ar, ar.new_full((), -1))
        a, bb, c, d = vv[:, :-1, :-1], vv[:, :-1, 1:], vv[:, 1:, :-1], vv[:, 1:, 1:]
        lo1, hi1 = torch.minimum(a, bb), torch.maximum(a, bb)
        lo2, hi2 = torch.minimum(c, d), torch.maximum(c, d)
        v4 = torch.minimum(lo1, lo2)
        v3 = torch.minimum(torch.maximum(lo1, lo2), torch.minimum(hi1, hi2))
        km = torch.maximum(torch.maximum(key[:, :-1, :-1], key[:, :-1, 1:]),
                           torch.maximum(key[:, 1:, :-1], key[:, 1:, 1:]))
        m = v3 > 0
        pix = km[m] % n
        cb = basin[pix]
        c3 = v3[m]
        c4 = v4[m]
        t = torch.zeros(size, dtype=torch.int64, device=dev)
        t.index_add_(0, cb * vcols + c3, torch.ones_like(c3))
        t.index_add_(0, cb * vcols + c4, torch.ones_like(c4))  # c4 == 0 lands in column 0: unused
        tar = _rev_cum(t.view(r, vcols), "sum")[:, :nlev]

    comp = forest.comp
    alive = comp >= 0
    bi, li = torch.nonzero(alive, as_tuple=True)
    nodes = comp[bi, li]
    slot = nodes * nlev + li
    tsize = forest.num_nodes * nlev

    def agg(vals: torch.Tensor, how: str, fill: int) -> torch.Tensor:
        t = torch.full((tsize,), fill, dtype=torch.int64, device=dev)
        if how == "sum":
            t.index_add_(0, slot, vals)
        else:
            t.scatter_reduce_(0, slot, vals, reduce=how, include_self=True)
        return t

    nx0 = agg(tx0[bi, li], "amin", big)
    used = torch.nonzero(nx0 < big).squeeze(1)
    out_node = used // nlev
    out_lev = used % nlev
    ny0 = agg(ty0[bi, li], "amin", big)[used]
    nx1 = agg(tx1[bi, li], "amax", -big)[used]
    ny1 = agg(ty1[bi, li], "amax", -big)[used]
    nfi = agg(tfi[bi, li], "amin", big)[used]
    nar = agg(tar[bi, li], "sum", 0)[used] if tar is not None else None
    return NodeTable(out_node, out_lev, forest.image_of_node[out_node], nx0[used], ny0, nx1,
                     ny1, nfi, nar)


def pad_batch(bytes_: torch.Tensor, inner: int) -> torch.Tensor:
    """(B, H, W) int64 -> (B, H + 4, W + 4): a ring of ``inner`` then an outer ring of 0."""
    t = torch.nn.functional.pad(bytes_, (1, 1, 1, 1), value=inner)
    return torch.nn.functional.pad(t, (1, 1, 1, 1), value=0)


__all__ = ["Forest", "NodeTable", "build_forest", "node_table", "pad_batch"]
