"""Zoom search over the cell tree: greedy and beam decoding, an optional prior, hypotheses.

The search encodes nothing: map-view tokens come from the bundle, the camera frame's ground
token ``g`` is given, and each zoom level costs one batched decoder step over all live
hypotheses (``backend.start_decoding``, then ``state.step`` with the view each survivor zoomed
into and the hypothesis it extends, so a backend with a key/value cache feeds the decoder only
the new tokens). For a policy with a match head a step returns a query per hypothesis, and the
children's logits are its dot products with their keys, read from the bundle.

Probabilities. A hypothesis's probability is the product of its step softmax probabilities.
Children that hold no imagery (outside the bundle's cells, or views with zero coverage) and,
with a prior, children outside the prior's 3-sigma region are masked out before the softmax:
the search conditions on the truth lying in the map (and in the prior region). When a map has
several roots, each root's paths are scored by the decoder independently (it was trained
within one root, so its step logits are not comparable across roots, while path probabilities
are), and the roots are weighted by their best surviving path probability; a hypothesis's
probability is its path probability times its root's weight, so probabilities sum to at most 1.
``confidence`` is the best hypothesis's probability.

Fused search (``method='zoom-fused'``). A contrastive retrieval model's embedding of the
frame ``e`` scores every terminal cell of the bundle by ``scale * cos(e, crop)``; read as a
softmax over the map, a cell at any level holds the probability mass of the terminal cells
inside it, so its log mass is their log-sum-exp (:func:`retrieval_evidence`, one pass per
frame). At every level the children's logits become ``zoom_weight * decoder logit + log
retrieval mass`` before the softmax: a product of the two experts' step distributions. With
``zoom_weight`` 0 the beam's path probability is the retrieval softmax itself (the chain of
conditionals telescopes), so a wide enough beam returns the retrieval baseline's answer; with
retrieval evidence that is uniform it is the zoom beam. The roots start with their retrieval
mass, so several roots need no separate weighting.

Covariance. The published position is the best terminal cell's centre. Its covariance (east,
north; m^2) is the probability-weighted second moment of the hypotheses' terminal centres about
that estimate (weights renormalised over the hypotheses) plus the terminal cell's quantisation
(side^2 / 12 per axis), so it is never singular. Optionally (``residual=True``) the
probability mass the hypotheses do not hold is counted as spread uniformly over the searched
region (the map, the prior's region or the cell the search started from). Offsets use the local
tangent plane of the Web-Mercator sphere at the estimate (Mercator metres times
cos(latitude)), accurate to about 0.1% within a root cell: plenty for a covariance.

numpy only: no torch.
"""

from dataclasses import dataclass, field
import math

import numpy as np

from geozoom_ros.bundle import MIN_COVERAGE  # noqa: F401 (a name users import from here)
from geozoom_ros.errors import InputError
from geozoom_ros.geo import (actions_between, ancestor, Cell, cell_at, cell_size_m,
                             check_latlon, child, EARTH_RADIUS_M, tile_center)

_HALF = math.pi * EARTH_RADIUS_M  # half the Web-Mercator world width (m)
#: A prior region spans this many standard deviations.
PRIOR_SIGMAS = 3.0
#: The decoder's weight in the fused search, chosen on the demo city's validation split (README,
#: "The fused search").
DEFAULT_ZOOM_WEIGHT = 0.5


@dataclass(frozen=True)
class Prior:
    """A Gaussian position prior: centre (degrees) and 2x2 east/north covariance (m^2)."""

    lat: float
    lon: float
    cov_en: np.ndarray

    @classmethod
    def from_sigma(cls, lat, lon, sigma_m):
        """Return an isotropic prior with standard deviation ``sigma_m`` metres."""
        sigma_m = float(sigma_m)
        if not (np.isfinite(sigma_m) and sigma_m > 0):
            raise InputError(f'prior sigma {sigma_m} m must be a positive finite number of '
                             'metres')
        return cls(float(lat), float(lon), np.eye(2) * sigma_m * sigma_m)

    @classmethod
    def coerce(cls, prior):
        """Return a validated Prior from a Prior or ``(lat, lon, sigma_m | cov 2x2)``."""
        if prior is None or isinstance(prior, Prior):
            p = prior
        else:
            try:
                lat, lon, spread = prior
            except (TypeError, ValueError):
                raise InputError('prior must be (lat, lon, sigma_m) or (lat, lon, 2x2 '
                                 f'covariance m^2), got {prior!r}') from None
            spread = np.asarray(spread, dtype=float)
            if spread.ndim == 0:
                p = cls.from_sigma(lat, lon, float(spread))
            else:
                p = cls(float(lat), float(lon), spread)
        if p is not None:
            p.validate()
        return p

    def validate(self):
        """Raise InputError unless the prior is finite, on the map and positive definite."""
        check_latlon(self.lat, self.lon)
        cov = np.asarray(self.cov_en, dtype=float)
        if cov.shape != (2, 2) or not np.all(np.isfinite(cov)):
            raise InputError(f'prior covariance {cov.tolist()} must be a finite 2x2 matrix '
                             '(m^2)')
        if not np.allclose(cov, cov.T, rtol=1e-6, atol=1e-9) or cov[0, 0] <= 0 \
                or np.linalg.det(cov) <= 0:
            raise InputError(f'prior covariance {cov.tolist()} is not symmetric positive '
                             'definite; give a positive sigma (m)')

    def merc_box(self):
        """Return the 3-sigma bounding box in Mercator metres: (xmin, ymin, xmax, ymax)."""
        cov = np.asarray(self.cov_en, dtype=float)
        scale = 1.0 / math.cos(math.radians(self.lat))  # ground metres -> Mercator metres
        cx, cy = _lonlat_to_merc(self.lon, self.lat)
        hx = PRIOR_SIGMAS * math.sqrt(cov[0, 0]) * scale
        hy = PRIOR_SIGMAS * math.sqrt(cov[1, 1]) * scale
        return cx - hx, cy - hy, cx + hx, cy + hy


@dataclass
class Hypothesis:
    """A terminal cell with its probability and the actions that reach it from its root."""

    cell: Cell
    prob: float
    path: tuple
    root: Cell = None

    @property
    def center(self):
        """``(lat, lon)`` of the cell's centre in degrees."""
        return tile_center(self.cell.x, self.cell.y, self.cell.z)


@dataclass
class SearchResult:
    """Outcome of a search.

    Attributes:
        hypotheses: terminal hypotheses, most probable first.
        estimate: ``(lat, lon)`` degrees of the best terminal cell's centre.
        cov_en: 2x2 east/north covariance of the estimate in m^2 (local ENU at the estimate).
        confidence: the best hypothesis's probability (0..1).
        start: the cell the decoder started from (a root, or deeper with a prior).
    """

    hypotheses: list
    estimate: tuple
    cov_en: np.ndarray
    confidence: float
    start: Cell = None
    decoder_calls: int = 0
    info: dict = field(default_factory=dict)

    @property
    def cell(self):
        """The best terminal cell."""
        return self.hypotheses[0].cell


# --------------------------------------------------------------------------------------------
# Vectorised Web-Mercator helpers (spherical, EPSG:3857 metres)

def _cell_merc_bounds(x, y, z):
    size = 2.0 * _HALF / (2 ** z)
    x = np.asarray(x, float)
    y = np.asarray(y, float)
    left = -_HALF + x * size
    top = _HALF - y * size
    return left, top - size, left + size, top


def _lonlat_to_merc(lon, lat):
    x = EARTH_RADIUS_M * math.radians(lon)
    y = EARTH_RADIUS_M * math.log(math.tan(math.pi / 4 + math.radians(lat) / 2))
    return x, y


def merc_to_latlon(x, y):
    """Return ``(lat, lon)`` degrees of Mercator metres (arrays or scalars)."""
    lon = np.degrees(np.asarray(x, float) / EARTH_RADIUS_M)
    lat = np.degrees(np.arctan(np.sinh(np.asarray(y, float) / EARTH_RADIUS_M)))
    return lat, lon


def _overlaps(box, x, y, z):
    left, bottom, right, top = _cell_merc_bounds(x, y, z)
    xmin, ymin, xmax, ymax = box
    return (left < xmax) & (right > xmin) & (bottom < ymax) & (top > ymin)


# --------------------------------------------------------------------------------------------
# Covariance

def hypotheses_covariance(cells_xy, zoom, probs, best=0):
    """Return the 2x2 east/north covariance (m^2) of a set of terminal hypotheses.

    ``cells_xy`` is ``(x, y)`` int sequences of terminal cells at ``zoom``; ``probs`` their
    probabilities (renormalised here); ``best`` the index of the published estimate. The result
    is the weighted second moment about the estimate plus the quantisation of one cell
    (side^2 / 12 per axis).
    """
    x, y, w = (a.tolist() if isinstance(a, np.ndarray) else list(a) for a in (*cells_xy, probs))
    # Offsets in whole cells (exact integers), times the cell side in ground metres at the
    # estimate's latitude; tile rows grow southward, north is up. Plain Python: a search has a
    # handful of hypotheses, fewer than numpy's per-call costs would pay for.
    x0, y0 = x[best], y[best]
    lat, _ = tile_center(x0, y0, zoom)
    side = 2.0 * _HALF / (2 ** zoom) * math.cos(math.radians(lat))
    total = math.fsum(w)
    w = [p / total for p in w] if total > 0 and math.isfinite(total) else [1.0 / len(w)] * len(w)
    exx = exy = eyy = 0.0
    for xi, yi, wi in zip(x, y, w):
        dx, dy = (xi - x0) * side, (y0 - yi) * side
        exx += wi * dx * dx
        exy += wi * dx * dy
        eyy += wi * dy * dy
    q = side * side / 12.0
    return np.array([[exx + q, exy], [exy, eyy + q]])


# --------------------------------------------------------------------------------------------
# Search

def _plain(array):
    """Return a memory map as a plain ndarray view (zero-copy); anything else unchanged."""
    return array.view(np.ndarray) if isinstance(array, np.memmap) else array


def _log_softmax(logits):
    """Row-wise log-softmax of float64 logits that may hold -inf (a row of -inf stays -inf)."""
    # The floor keeps a row of -inf from becoming NaN; a finite row's sum is at least 1, so the
    # tiny term never changes it.
    z = logits - np.maximum(logits.max(axis=1, keepdims=True), -1e300)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True) + 1e-300)


def _prior_start(bundle, prior, box):
    """Return ``(start level, start cell or None, roots)`` for a prior's 3-sigma box."""
    roots = [r for r in bundle.roots if _overlaps(box, r.x, r.y, r.z)]
    if not roots:
        raise InputError(f'prior at ({prior.lat:.6f}, {prior.lon:.6f}) and its 3-sigma region '
                         f'lie outside the map bundle {bundle.path}; search without a prior')
    lat_c, lon_c = prior.lat, prior.lon
    box_lat, box_lon = merc_to_latlon(np.array([box[0], box[2]]), np.array([box[3], box[1]]))
    # The deepest token level at which one cell holds the whole box.
    for level in range(bundle.steps - 1, 0, -1):
        z = bundle.levels[level].zoom
        corners = set()
        for la, lo in ((box_lat[0], box_lon[0]), (box_lat[1], box_lon[1]), (lat_c, lon_c)):
            la = float(np.clip(la, -85.0, 85.0))
            lo = float(np.clip(lo, -180.0, 179.999999))
            corners.add(cell_at(la, lo, z))
        if len(corners) == 1:
            cell = corners.pop()
            if bundle.contains(cell):
                return level, cell, [ancestor(cell, bundle.root_zoom)]
    return 0, None, roots


def children_logits(backend, bundle, out, level, cx, cy):
    """Return float64 ``[n, k*k]`` logits of the children ``(cx, cy)`` (at ``level``).

    ``out`` is the step output of ``backend.step_logits``: the logits themselves for a linear
    action head; for a match head a query per row, whose dot products with the children's keys
    (computed once per map, in the bundle) are the logits.
    """
    n = len(cx)
    if getattr(backend, 'uses_children', False):
        rows, _ = bundle.key_rows(level, cx, cy)
        keys = np.asarray(bundle.keys[rows.ravel()], np.float32).reshape(n, rows.shape[1], -1)
        out = np.einsum('nd,nkd->nk', np.asarray(out, np.float32).reshape(n, -1), keys)
    return np.array(out, dtype=np.float64).reshape(n, -1)  # a copy the caller may change


def _root_cells(bundle, roots):
    """Return ``(x, y [R], start [R, 2], views [R, 1, D])`` of root cells.

    The arrays of all the bundle's roots are built once per bundle; a subset (a shortlist, a
    prior's roots) is picked from them.
    """
    table = bundle.derived.get('root_cells')
    if table is None:
        xs = np.array([r.x for r in bundle.roots], np.int64)
        ys = np.array([r.y for r in bundle.roots], np.int64)
        table = (xs, ys, np.stack([xs, ys], axis=1), bundle.tokens_for(bundle.roots)[:, None])
        bundle.derived['root_cells'] = table
    if len(roots) == len(bundle.roots):
        return table
    pick = np.array([bundle.root_index[(r.x, r.y)] for r in roots], np.int64)
    return tuple(a[pick] for a in table)


def _shortlist_roots(roots, bundle, shortlist, g, max_roots):
    """Return the ``max_roots`` of ``roots`` that ``shortlist`` ranks best for ``g``."""
    among = None if len(roots) == len(bundle.roots) else \
        [bundle.root_index[(r.x, r.y)] for r in roots]
    return [bundle.roots[i] for i in shortlist.select(g, max_roots, among)] or roots[:1]


def _decode_levels(backend, bundle, tokens, g, sat, actions, xs, ys, root_id, level, width,
                   per_root, box, fusion=None):
    """Decode from ``level`` to the terminal level, one batched decoder step per level.

    ``tokens`` is the bundle's token array; ``per_root``: keep the ``width`` best paths of
    every root (else of all roots together); ``fusion``: ``(evidence, zoom_weight, logp0)``
    for the fused search (:func:`retrieval_evidence`, the decoder's weight, the start cells'
    log probabilities). Returns ``(logp, xs, ys, root_id, actions, decoder calls)`` of the
    surviving terminal paths, best first within each root, or None when every child is
    masked.
    """
    k, steps = bundle.k, bundle.steps
    kk = k * k
    logp = np.zeros(len(xs)) if fusion is None else np.array(fusion[2], np.float64)
    ar = np.arange(kk)
    rr, cc = ar // k, ar % k
    state, out = backend.start_decoding(g, sat, actions)
    calls = 1
    for lv in range(level, steps):
        nxt = bundle.levels[lv + 1]
        cx = xs[:, None] * k + cc
        cy = ys[:, None] * k + rr
        logits = children_logits(backend, bundle, out, lv + 1, cx, cy)
        idx, valid = bundle.usable_children(lv + 1, cx, cy)
        if fusion is not None:
            evidence, zoom_weight = fusion[0][lv + 1], fusion[1]
            with np.errstate(invalid='ignore'):  # 0 * -inf: masked below
                logits = zoom_weight * logits + evidence[idx]
        if box is not None:
            valid &= _overlaps(box, cx, cy, nxt.zoom)
        logits[~(valid & np.isfinite(logits))] = -np.inf
        cand = logp[:, None] + _log_softmax(logits)  # [n, kk]
        flat = cand.ravel()
        if per_root:
            keep = []
            for r in np.unique(root_id):
                sel = np.flatnonzero(np.repeat(root_id == r, kk))
                keep.append(sel[np.argsort(-flat[sel], kind='stable')[:width]])
            keep = np.concatenate(keep)
        elif width == 1:
            keep = np.argmax(flat)[None]
        else:
            keep = np.argsort(-flat, kind='stable')[:width]
        keep = keep[flat[keep] > -np.inf]
        if not keep.size:
            return None
        parent, act = np.divmod(keep, kk)
        logp = flat[keep]
        xs, ys = cx[parent, act], cy[parent, act]
        root_id = root_id[parent]
        actions = np.concatenate([actions[parent], act[:, None]], axis=1)
        if lv + 1 < steps:
            new_tok = tokens[idx[parent, act] + nxt.offset].astype(np.float32)
            out = state.step(new_tok, act, parent)
            calls += 1
    return logp, xs, ys, root_id, actions, calls


def _allowed_range(lo, hi, z, axis, box):
    """Return the first and last cell index in ``[lo, hi]`` whose cells overlap ``box``.

    Along ``axis`` (0: x, 1: y) at zoom ``z``, with the arithmetic of :func:`_overlaps`;
    ``(lo, hi)`` without a box and ``(lo, lo - 1)`` when no cell overlaps it.
    """
    if box is None:
        return lo, hi
    idx = np.arange(lo, hi + 1)
    left, bottom, right, top = _cell_merc_bounds(idx, idx, z)
    xmin, ymin, xmax, ymax = box
    ok = (left < xmax) & (right > xmin) if axis == 0 else (bottom < ymax) & (top > ymin)
    hit = idx[ok]
    return (int(hit[0]), int(hit[-1])) if hit.size else (lo, lo - 1)


def _level_geometry(bundle, level, box):
    """Return the search graphs' ``geom`` rows for the child levels below ``level``.

    One row per level (see :mod:`geozoom_ros.runtime.graphs`): the strides and offsets that
    give a cell's imagery-mask index and token row, and the allowed cell ranges (the level's
    cells, cut to ``box``). Cached per bundle without a box.
    """
    cache = bundle.derived.setdefault('graph_geometry', {})
    if box is None and level in cache:
        return cache[level]
    _, use_offset = bundle.imagery_table()
    geom = np.zeros((bundle.steps - level, 8), np.int64)
    for i, lv in enumerate(range(level, bundle.steps)):
        nxt = bundle.levels[lv + 1]
        xr = _allowed_range(nxt.x0, nxt.x0 + nxt.nx - 1, nxt.zoom, 0, box)
        yr = _allowed_range(nxt.y0, nxt.y0 + nxt.ny - 1, nxt.zoom, 1, box)
        geom[i, :2] = (1, nxt.nx)
        if nxt.offset >= 0:  # a token level: its cells' imagery-mask index and token row
            use = use_offset[lv + 1]
            geom[i, 2:4] = (use - nxt.x0 - nxt.nx * nxt.y0, nxt.offset - use)
        geom[i, 4:] = (xr[0], yr[0], xr[1], yr[1])
    if box is None:
        cache[level] = geom
    return geom


def _graph_levels(run, bundle, tokens, g, sat, actions, start_xy, level, box):
    """Decode with a backend's whole-search graph: one call per frame.

    The start cells (``start_xy`` [R, 2] at ``level``) share one beam, as in
    :func:`_decode_levels` without ``per_root``; same selection, float32 instead of float64
    scores. Returns its tuple with Python lists in place of arrays, or None when every child
    is masked.
    """
    usable, _ = bundle.imagery_table()
    geom = _level_geometry(bundle, level, box)
    logp, cx, cy, paths, origin = run(g, sat, actions, start_xy, tokens, usable, geom)
    # A handful of paths: lists from here (one call per array) cost less than numpy's calls.
    logp = logp.tolist()
    # Paths come best first, so the dead ones (-inf) are at the end.
    n = len(logp)
    while n and logp[n - 1] == -math.inf:
        n -= 1
    if not n:
        return None
    return (logp[:n], cx.tolist()[:n], cy.tolist()[:n], origin.tolist()[:n],
            paths.tolist()[:n], bundle.steps - level)


def _search(backend, bundle, g, width, per_root, prior, residual=False, shortlist=None,
            max_roots=0, evidence=None, zoom_weight=1.0):
    k = bundle.k
    g = np.ascontiguousarray(g, dtype=np.float32).reshape(1, -1)
    # A float64 sum is finite exactly when every float32 entry is (one reduction).
    if g.shape[1] != bundle.embed_dim or not math.isfinite(np.add.reduce(g, None, np.float64)):
        raise InputError(f'ground token has shape {g.shape} (finite: '
                         f'{bool(np.all(np.isfinite(g)))}); expected finite [1, '
                         f'{bundle.embed_dim}]')
    prior = Prior.coerce(prior)
    box = prior.merc_box() if prior is not None else None

    if box is not None:
        level, start_cell, roots = _prior_start(bundle, prior, box)
    else:
        level, start_cell, roots = 0, None, list(bundle.roots)

    roots_total = len(roots)
    if start_cell is None and shortlist is not None and 0 < max_roots < len(roots):
        roots = _shortlist_roots(roots, bundle, shortlist, g, int(max_roots))

    if start_cell is not None:
        root = roots[0]
        forced = actions_between(root, start_cell, k)
        chain = [root]
        for a in forced:
            chain.append(child(chain[-1], a, k))
        sat = bundle.tokens_for(chain)[None]
        xs = np.array([start_cell.x], np.int64)
        ys = np.array([start_cell.y], np.int64)
        start_xy = np.array([[start_cell.x, start_cell.y]], np.int64)
        actions = np.array([forced], dtype=np.int64).reshape(1, len(forced))
        root_id = np.zeros(1, np.int64)
        roots = [root]
    else:
        xs, ys, start_xy, sat = _root_cells(bundle, roots)
        actions = root_id = None  # no actions from the roots; the root ids as needed below
    tokens = _plain(bundle.tokens)
    start = start_cell if start_cell is not None else (roots[0] if len(roots) == 1 else None)

    per_root = per_root and len(roots) > 1
    run = None
    graph = getattr(backend, 'search_graph', None)
    # The graphs take the bundle's float16 token array as it is (no copy).
    if graph is not None and not per_root and evidence is None \
            and isinstance(tokens, np.ndarray) and tokens.dtype == np.float16:
        run = graph(width, level, len(xs))
    if run is not None:
        decoded = _graph_levels(run, bundle, tokens, g, sat, actions, start_xy, level, box)
    else:
        if root_id is None:
            actions = np.zeros((len(roots), 0), np.int64)
            root_id = np.arange(len(roots), dtype=np.int64)
        fusion = None
        if evidence is not None:
            # The start cells' retrieval mass (one start cell: probability 1).
            start_lv = bundle.levels[level]
            ev = evidence[level][start_lv.local_index(xs, ys)[0]]
            total = np.logaddexp.reduce(ev)
            fusion = (evidence, float(zoom_weight),
                      ev - total if np.isfinite(total) else np.zeros(len(ev)))
        decoded = _decode_levels(backend, bundle, tokens, g, sat, actions, xs, ys, root_id,
                                 level, width, per_root, box, fusion)
        if decoded is not None:
            decoded = [a.tolist() if isinstance(a, np.ndarray) else a for a in decoded]
    if decoded is None:
        return None
    # Python ints and floats from here: tolist() converts an array in one call, and a handful
    # of hypotheses costs less in plain Python than in numpy calls.
    logp, xs, ys, root_id, paths, calls = decoded
    probs = [math.exp(v) for v in logp]
    tz = bundle.terminal.zoom
    if len(roots) > 1 and evidence is None:
        # Weight roots by their best surviving path; the weights can reorder the paths (a
        # single root's come best first).
        best = [0.0] * len(roots)
        for p, r in zip(probs, root_id):
            best[r] = max(best[r], p)
        total = math.fsum(best)
        probs = [p * best[r] / total if total > 0 else 0.0 for p, r in zip(probs, root_id)]
        order = sorted(range(len(probs)), key=lambda i: -probs[i])  # stable, as argsort
        xs, ys, probs, root_id, paths = ([a[i] for i in order]
                                         for a in (xs, ys, probs, root_id, paths))
    hyps = [Hypothesis(Cell(x, y, tz), p, tuple(path), roots[r])
            for x, y, p, path, r in zip(xs, ys, probs, paths, root_id)]
    cov = hypotheses_covariance((xs, ys), tz, probs, best=0)
    mass = min(1.0, math.fsum(probs))
    if residual and mass < 1.0:
        # The probability the search lost (paths pruned or never explored) lies somewhere in
        # the region it started from: count it as uniform over that region.
        lv0 = bundle.levels[0]
        side = max(lv0.nx, lv0.ny) * cell_size_m(roots[0])
        if start_cell is not None:
            side = cell_size_m(start_cell)
        elif box is not None:
            side = min(side, 2.0 * PRIOR_SIGMAS * math.sqrt(float(np.max(np.diag(
                np.asarray(prior.cov_en, float))))))
        cov = cov + np.eye(2) * (1.0 - mass) * side * side / 12.0
    return SearchResult(hyps, tile_center(xs[0], ys[0], tz), cov, probs[0], start, calls,
                        {'roots_searched': len(roots), 'roots_total': roots_total,
                         'start_level': level, 'mass': mass})


def greedy(backend, bundle, g, prior=None, residual=False, shortlist=None, max_roots=0):
    """Decode greedily (argmax at every level) from every root; return a SearchResult.

    ``g`` is the frame's ground token ``[D]`` or ``[1, D]``; ``prior`` a :class:`Prior` or
    ``(lat, lon, sigma_m | 2x2 covariance m^2)``. With several roots, one greedy path per root
    is decoded (one batched decoder call per level) and the roots are weighted by their path
    probabilities. ``residual=True`` adds the probability mass the hypotheses do not hold,
    spread uniformly over the searched region, to the covariance (an honest covariance for
    low-confidence fixes; off by default). With a
    :class:`~geozoom_ros.shortlist.RootShortlist` and ``max_roots`` > 0, a map with more roots
    than that searches only the ``max_roots`` the shortlist ranks best. Returns None when no
    cell can be reached (every child masked).
    """
    return _search(backend, bundle, g, 1, True, prior, residual, shortlist, max_roots)


def beam(backend, bundle, g, width=8, prior=None, residual=False, shortlist=None,
         max_roots=0):
    """Beam search keeping the ``width`` most probable partial paths; return a SearchResult.

    All roots start the beam; at each level the children of every live path are scored in one
    batched decoder call and the ``width`` best by path probability survive. ``residual``,
    ``shortlist`` and ``max_roots`` as in :func:`greedy`. Returns None when no cell can be
    reached.
    """
    width = int(width)
    if width < 1:
        raise InputError(f'beam width {width} must be >= 1')
    return _search(backend, bundle, g, width, False, prior, residual, shortlist, max_roots)


def fused(backend, bundle, g, evidence, width=8, zoom_weight=DEFAULT_ZOOM_WEIGHT, prior=None,
          residual=False, shortlist=None, max_roots=0):
    """Beam search on the product of the decoder's and a retrieval model's step distributions.

    ``evidence`` comes from :func:`retrieval_evidence` for the same frame; ``zoom_weight``
    scales the decoder's logits (0: retrieval alone, searched down the tree). Otherwise as
    :func:`beam`. Always decoded step by step (the whole-search graphs hold no evidence).
    """
    width = int(width)
    if width < 1:
        raise InputError(f'beam width {width} must be >= 1')
    zoom_weight = float(zoom_weight)
    if not (math.isfinite(zoom_weight) and zoom_weight >= 0):
        raise InputError(f'zoom weight {zoom_weight} must be a finite number >= 0')
    if evidence is None or len(evidence) != bundle.steps + 1:
        raise InputError('the fused search needs retrieval evidence for every level of bundle '
                         f'{bundle.path} (search.retrieval_evidence)')
    return _search(backend, bundle, g, width, False, prior, residual, shortlist, max_roots,
                   evidence, zoom_weight)


def search(backend, bundle, g, method='zoom-beam', width=8, prior=None, residual=False,
           shortlist=None, max_roots=0, evidence=None, zoom_weight=DEFAULT_ZOOM_WEIGHT):
    """Run ``method`` ('zoom' = greedy, 'zoom-beam' = beam of ``width``, 'zoom-fused').

    'zoom-fused' without ``evidence`` (a frame :func:`evidence_usable` rules out) runs as
    'zoom-beam'. The result's ``info['method']`` names the search that ran.
    """
    kw = dict(prior=prior, residual=residual, shortlist=shortlist, max_roots=max_roots)
    if method == 'zoom-fused' and evidence is None:
        method = 'zoom-beam'
    if method == 'zoom':
        res = greedy(backend, bundle, g, **kw)
    elif method == 'zoom-beam':
        res = beam(backend, bundle, g, width=width, **kw)
    elif method == 'zoom-fused':
        res = fused(backend, bundle, g, evidence, width=width, zoom_weight=zoom_weight, **kw)
    else:
        raise InputError(f'search method {method!r} is unknown; use zoom, zoom-beam or '
                         'zoom-fused')
    if res is not None:
        res.info['method'] = method
    return res


def evidence_usable(bundle, heading_deg):
    """Whether the fused search can weigh a frame with the bundle's retrieval crops.

    Not when the crops are heading-aligned (the retrieval model was trained against crops
    turned to the camera's heading) and the frame's heading is unknown: north-up crops would
    mislead it (on the demo city's test-same views 29.3 % within 50 m against 38.2 % for the
    zoom beam alone), so such a frame runs the zoom beam alone.
    """
    return heading_deg is not None or bundle.retrieval_heading is None


def _terminal_groups(bundle):
    """Return, per level above the terminal one, how its cells group the level below.

    Entry ``level`` is ``(order, starts, parents)``: the order that sorts the cells of level
    ``level + 1`` by their parent, where each parent's run starts, and which parent (index in
    ``level``) each run belongs to. Cached per bundle.
    """
    groups = bundle.derived.get('evidence_groups')
    if groups is None:
        groups = []
        for level in range(bundle.steps):
            below = bundle.levels[level + 1]
            x, y = below.cell_arrays()
            parent, ok = bundle.levels[level].local_index(x // bundle.k, y // bundle.k)
            parent = np.where(ok, parent, -1)
            order = np.argsort(parent, kind='stable')
            order = order[parent[order] >= 0]
            sp = parent[order]
            starts = np.flatnonzero(np.r_[True, sp[1:] != sp[:-1]]) if len(sp) else \
                np.zeros(0, np.int64)
            groups.append((order, starts, sp[starts]))
        bundle.derived['evidence_groups'] = groups
    return groups


def retrieval_evidence(bundle, embedding, scale, heading_deg=None):
    """Return the fused search's per-level log retrieval mass of every cell of a bundle.

    ``embedding`` is the frame's L2-normalised retrieval embedding ``[E]``, ``scale`` the
    retrieval model's softmax scale (its learned inverse temperature); the terminal cells are
    scored by ``scale * cos`` against the bundle's crops (the bin nearest ``heading_deg`` for
    heading-aligned embeddings). Entry ``level`` is a float64 array over that level's cells
    (row order): the log-sum-exp of the scores of the terminal cells inside each cell (-inf
    for a cell with none). One matrix-vector product over the terminal cells per frame.
    """
    e = np.asarray(embedding, np.float32).reshape(-1)
    vecs = bundle.terminal_retrieval(heading_deg)
    if vecs.shape[1] != e.shape[0] or not np.all(np.isfinite(e)):
        raise InputError(f'retrieval embedding has shape {e.shape} (finite: '
                         f'{bool(np.all(np.isfinite(e)))}); bundle {bundle.path} holds '
                         f'embeddings of {vecs.shape[1]} floats')
    # einsum, not BLAS: a BLAS matrix-vector product of this size starts a thread pool whose
    # spinning threads then slow the next frame's encoder passes several times over.
    scores = float(scale) * np.einsum('te,e->t', np.asarray(vecs, np.float32),
                                      e).astype(np.float64)
    out = [None] * (bundle.steps + 1)
    out[-1] = scores
    for level in range(bundle.steps - 1, -1, -1):
        order, starts, parents = _terminal_groups(bundle)[level]
        below = out[level + 1][order]
        top = np.maximum.reduceat(below, starts) if len(starts) else np.zeros(0)
        safe = np.where(np.isfinite(top), top, 0.0)
        with np.errstate(divide='ignore'):
            mass = safe + np.log(np.add.reduceat(np.exp(below - np.repeat(
                safe, np.diff(np.r_[starts, len(below)]))), starts)) if len(starts) else top
        level_ev = np.full(bundle.levels[level].count, -np.inf)
        level_ev[parents] = mass
        out[level] = level_ev
    return out


def terminal_size_m(bundle, lat):
    """Return the side of a terminal cell in metres at latitude ``lat``."""
    return cell_size_m(cell_at(lat, 0.0, bundle.terminal.zoom))
