"""Evaluate a method on a query set: the engine behind ``geozoom eval``.

Queries come from an ``index.csv`` table (path, lat, lon[, heading_deg, split]) or a drive bag
(rosbag2, MCAP or sqlite3: camera images matched by timestamp to the ground-truth NavSatFix).
The methods:

- ``zoom``: greedy zoom search; ``zoom-beam``: beam search (width ``beam_width``).
- ``zoom-fused``: beam search on the product of the zoom decoder's and a retrieval model's
  step distributions (``retrieval_model``, whose embeddings the bundle holds; the decoder's
  logits weighted by ``zoom_weight``; see :mod:`geozoom_ros.search`). Its latency counts both
  encoders.
- ``retrieval``: nearest terminal-cell embedding (brute force numpy, or FAISS when importable)
  of a contrastive retrieval model, over the bundle's context crops.
- ``sim-zoom``: coarse retrieval over the level-1 cells, then at each finer level the most
  similar child by the contrastive embeddings.
- ``ground-knn``: the nearest training-split ground image by the retrieval model's ground
  embedding (no map at all).

Each query's latency is measured as a single-frame pass (encoder + search), as a robot runs it.

Covariances: when the model folder holds a ``calibration.json`` (``geozoom calibrate``; see
``geozoom_ros.calibration``) with an entry for the method, ``nees_mean`` scores the calibrated
covariance a localizer publishes; the summary always carries ``nees_raw_*`` (the method's own)
and ``nees_calibrated_*`` too, and the confidence gate's precision/recall and average precision
for fixes within 50 m.
"""

import csv
from dataclasses import dataclass
import math
import os
from pathlib import Path
import sys
import time

import numpy as np

from geozoom_ros.bundle import load_bundle
from geozoom_ros.errors import InputError
from geozoom_ros.eval import metrics
from geozoom_ros.geo import (actions_between, ancestor, cell_at, check_latlon, destination,
                             tile_center)
from geozoom_ros.search import (children_logits, DEFAULT_ZOOM_WEIGHT, evidence_usable,
                                hypotheses_covariance, Prior, retrieval_evidence, search)

METHODS = ('zoom', 'zoom-beam', 'zoom-fused', 'retrieval', 'sim-zoom', 'ground-knn')
#: Methods run by a zoom policy (the others by a retrieval model).
ZOOM_METHODS = ('zoom', 'zoom-beam', 'zoom-fused')
DEFAULT_GT_TOPIC = '/gps/fix_truth'


@dataclass
class Query:
    """One evaluation query: how to get its image, and where it truly is (degrees)."""

    name: str
    lat: float
    lon: float
    heading_deg: float = None
    path: str = None
    image: np.ndarray = None

    def load(self):
        """Return the uint8 RGB image, or None if it cannot be read."""
        if self.image is not None:
            return self.image
        import cv2

        bgr = cv2.imread(self.path, cv2.IMREAD_COLOR)
        if bgr is None:
            return None
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _warn(msg):
    print(f'geozoom eval: warning: {msg}', file=sys.stderr)


# --------------------------------------------------------------------------------------------
# Query sets

def read_index(path, split=None, limit=None):
    """Return ``(queries, skipped)`` from an index.csv (paths relative to the file's folder).

    Rows with a missing image file or a non-finite / off-map position are skipped and counted.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f'data {path} does not exist; pass an index.csv or a drive bag')
    try:
        with open(path, newline='') as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f'data {path} is not a readable CSV ({exc})') from None
    if not rows:
        raise InputError(f'data {path} holds no rows')
    cols = set(rows[0])
    missing = {'path', 'lat', 'lon'} - cols
    if missing:
        raise InputError(f'data {path} lacks the column(s) {", ".join(sorted(missing))}; an '
                         'index needs path, lat, lon')
    if split:
        if 'split' not in cols:
            raise InputError(f'data {path} has no split column; drop --split')
        splits = sorted({r['split'] for r in rows})
        rows = [r for r in rows if r['split'] == split]
        if not rows:
            raise InputError(f'data {path} has no rows of split {split!r}; it has '
                             f'{", ".join(splits)}')
    queries, skipped = [], 0
    for r in rows:
        if limit and len(queries) >= limit:
            break
        try:
            lat, lon = float(r['lat']), float(r['lon'])
            check_latlon(lat, lon)
        except (TypeError, ValueError, InputError):
            skipped += 1
            continue
        img = (path.parent / r['path']) if not os.path.isabs(r['path']) else Path(r['path'])
        if not img.is_file():
            skipped += 1
            continue
        heading = r.get('heading_deg')
        try:
            heading = float(heading) if heading not in (None, '') else None
        except ValueError:
            heading = None
        queries.append(Query(r['path'], lat, lon, heading, str(img)))
    return queries, skipped


def read_bag(path, image_topic=None, gt_topic=DEFAULT_GT_TOPIC, limit=None, every=1):
    """Return ``(queries, skipped)`` from a drive bag (images matched to ground truth).

    Reading, the choice of the image topic and the truth at each image's stamp (interpolated
    between NavSatFix messages, none across a gap) are :func:`geozoom_ros.eval.bag.read_bag`'s;
    frames without truth or that cannot be decoded are skipped and counted.
    """
    from geozoom_ros.eval import bag as B

    bag = B.read_bag(path, image_topic=image_topic, gt_topic=gt_topic, quiet=True)
    if bag.gt is None:
        raise InputError(f'bag {path} has no ground-truth topic {gt_topic!r}; pass --gt-topic')
    queries, skipped = [], 0
    for fr in bag.images(every=every, limit=limit):
        lat, lon, _ = bag.gt.at(np.array([fr.t]))
        if fr.error or not np.isfinite(lat[0]):
            skipped += 1
            continue
        queries.append(Query(f'{bag.image_topic}@{fr.t:.3f}', float(lat[0]), float(lon[0]),
                             None, image=fr.rgb))
    return queries, skipped


def read_queries(data, split=None, limit=None, image_topic=None, gt_topic=DEFAULT_GT_TOPIC):
    """Return ``(queries, skipped)`` from an index.csv or a bag (by the path's form)."""
    p = Path(data)
    if p.suffix.lower() == '.csv':
        return read_index(p, split, limit)
    if p.suffix.lower() in ('.mcap', '.db3') or (p.is_dir() and (p / 'metadata.yaml').exists()):
        # A rosbag2 is a folder; accept the storage file inside it too.
        bag = p.parent if p.is_file() and (p.parent / 'metadata.yaml').exists() else p
        return read_bag(bag, image_topic, gt_topic, limit)
    raise InputError(f'data {data} is neither an index.csv nor a rosbag2 (.mcap, .db3 or a bag '
                     'folder)')


# --------------------------------------------------------------------------------------------
# Step accuracy given the true path

def true_paths(bundle, lats, lons):
    """Return ``(rows [N, steps], actions [N, steps], ok [N])``: the true zoom path per query.

    ``rows`` are token rows of the true cells at levels 0..steps-1; ``ok`` is False for queries
    whose terminal cell is outside the bundle.
    """
    n, steps, k = len(lats), bundle.steps, bundle.k
    rows = np.zeros((n, steps), np.int64)
    acts = np.zeros((n, steps), np.int64)
    ok = np.zeros(n, bool)
    for i, (lat, lon) in enumerate(zip(lats, lons)):
        term = cell_at(lat, lon, bundle.terminal.zoom)
        if not bundle.contains(term):
            continue
        root = ancestor(term, bundle.root_zoom)
        acts[i] = actions_between(root, term, k)
        for lv in range(steps):
            rows[i, lv] = bundle.row_of(ancestor(term, bundle.levels[lv].zoom))
        ok[i] = True
    return rows, acts, ok


def _valid_children(bundle, level, parent_rows_xy):
    px, py = parent_rows_xy
    k = bundle.k
    ar = np.arange(k * k)
    cx = px[:, None] * k + (ar % k)[None]
    cy = py[:, None] * k + (ar // k)[None]
    _, valid = bundle.usable_children(level + 1, cx, cy)
    return valid, cx, cy


def step_chance(bundle, lats, lons):
    """Return per-step chance accuracy: the mean of 1 / (children with imagery) on true paths.

    The search never picks a child without imagery, so a uniform random choice among the
    remaining children is the fair chance level (1 / k^2 only where every child has imagery).
    """
    _, _, ok = true_paths(bundle, lats, lons)
    out = []
    terms = [cell_at(lat, lon, bundle.terminal.zoom) for lat, lon, o in zip(lats, lons, ok) if o]
    if not terms:
        return [1.0 / (bundle.k * bundle.k)] * bundle.steps
    for t in range(bundle.steps):
        parents = [ancestor(c, bundle.levels[t].zoom) for c in terms]
        valid, _, _ = _valid_children(bundle, t, (np.array([p.x for p in parents]),
                                                  np.array([p.y for p in parents])))
        out.append(float(np.mean(1.0 / np.maximum(valid.sum(axis=1), 1))))
    return out


def zoom_step_correct(backend, bundle, gs, lats, lons, batch=256):
    """Return ``[N, steps]`` 1/0/NaN: teacher-forced argmax == true action at each step."""
    rows, acts, ok = true_paths(bundle, lats, lons)
    n, steps = len(lats), bundle.steps
    out = np.full((n, steps), np.nan)
    idx = np.flatnonzero(ok)
    for s in range(0, len(idx), batch):
        b = idx[s:s + batch]
        sat_all = np.asarray(bundle.tokens[rows[b].ravel()], np.float32).reshape(
            len(b), steps, -1)
        term = [cell_at(lats[i], lons[i], bundle.terminal.zoom) for i in b]
        for t in range(steps):
            out_t = backend.step_logits(gs[b], sat_all[:, :t + 1], acts[b, :t])
            parents = [ancestor(c, bundle.levels[t].zoom) for c in term]
            valid, cx, cy = _valid_children(bundle, t, (np.array([p.x for p in parents]),
                                                        np.array([p.y for p in parents])))
            logits = children_logits(backend, bundle, out_t, t + 1, cx, cy)
            logits = np.where(valid, logits, -np.inf)
            out[b, t] = (np.argmax(logits, axis=1) == acts[b, t]).astype(float)
    return out


# --------------------------------------------------------------------------------------------
# Retrieval-based methods

class _Nearest:
    """Inner-product nearest neighbours over fixed L2-normalised vectors (FAISS if present)."""

    def __init__(self, vectors):
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.index = None
        try:
            import faiss
        except ImportError:
            faiss = None
        if faiss is not None:
            self.index = faiss.IndexFlatIP(self.vectors.shape[1])
            self.index.add(self.vectors)
        self.backend = 'faiss' if self.index is not None else 'numpy'

    def search(self, q, k):
        q = np.ascontiguousarray(q, dtype=np.float32).reshape(1, -1)
        k = min(k, len(self.vectors))
        if self.index is not None:
            sims, idx = self.index.search(q, k)
            return sims[0], idx[0]
        sims = self.all_sims(q[0])
        top = np.argpartition(-sims, k - 1)[:k]
        top = top[np.argsort(-sims[top])]
        return sims[top], top

    def all_sims(self, q):
        # einsum, not BLAS: see search.retrieval_evidence (BLAS threads slow the encoder).
        return np.einsum('ne,e->n', self.vectors, np.asarray(q, np.float32).reshape(-1))


def _softmax(x):
    x = np.asarray(x, float)
    e = np.exp(x - np.max(x))
    return e / e.sum()


def _level_vectors(bundle, level):
    lv = bundle.levels[level]
    sl = slice(lv.retrieval_offset, lv.retrieval_offset + lv.count)
    return np.asarray(bundle.retrieval[sl], np.float32)


def _fix_from_cells(xs, ys, zoom, probs):
    """Return (lat, lon, cov_en, confidence) from candidate cells sorted best first."""
    lat, lon = tile_center(xs[0], ys[0], zoom)
    return lat, lon, hypotheses_covariance((xs, ys), zoom, probs, best=0), float(probs[0])


# --------------------------------------------------------------------------------------------
# The evaluation loop

@dataclass
class EvalOptions:
    """Options of :func:`evaluate` (mirrors the ``geozoom eval`` flags)."""

    method: str = 'zoom-beam'
    beam_width: int = 8
    prior_sigma_m: float = None
    seed: int = 0
    backend: str = 'auto'
    device: str = 'cpu'
    knn_index: str = None
    retrieval_model: str = None
    zoom_weight: float = DEFAULT_ZOOM_WEIGHT
    use_heading: bool = True
    top_k: int = 8
    residual_cov: bool = False
    progress: bool = True
    calibration: object = 'auto'
    step_accuracy: bool = True


@dataclass
class Run:
    """Per-query outcome of :func:`run_queries` (``N`` queries).

    Attributes:
        method: the method run.
        truth: ``[N, 2]`` true (lat, lon) degrees.
        estimate: ``[N, 2]`` estimated (lat, lon) degrees (NaN without a fix).
        cov_en: ``[N, 2, 2]`` the method's own east/north covariance, m^2 (NaN without a fix).
        confidence: ``[N]`` the method's confidence (0 without a fix).
        latency_ms: per-query latencies (queries with a readable image).
        step_correct: ``[N, steps]`` teacher-forced step correctness, or None.
        bundle: the loaded map bundle.
        model_sha256: hash of the model that ran.
        unreadable: queries whose image could not be read.
        extra: method-specific figures for the summary.
        ran_beam: ``[N]`` bool, zoom-fused queries that ran the zoom beam alone (no usable
            heading for heading-aligned crops), or None.
    """

    method: str
    truth: np.ndarray
    estimate: np.ndarray
    cov_en: np.ndarray
    confidence: np.ndarray
    latency_ms: list
    step_correct: np.ndarray
    bundle: object
    model_sha256: str
    unreadable: int
    extra: dict
    ran_beam: np.ndarray = None

    def errors_m(self):
        """Return ``[N]`` geodesic errors in metres (``inf`` without a fix)."""
        return metrics.error_m(self.estimate[:, 0], self.estimate[:, 1], self.truth[:, 0],
                               self.truth[:, 1])

    def errors_en(self):
        """Return ``[N, 2]`` east/north offsets (m) of the truth from each estimate."""
        return metrics.error_en(self.estimate[:, 0], self.estimate[:, 1], self.truth[:, 0],
                                self.truth[:, 1])


def evaluate(bundle_path, model_path, queries, options, skipped=0):
    """Run ``options.method`` on ``queries``; return the summary dict (see summarize_run)."""
    calibration = calibration_for(model_path, options)
    run = run_queries(bundle_path, model_path, queries, options)
    return summarize_run(run, options, skipped, calibration)


def calibration_for(model_path, options):
    """Return the Calibration ``options.calibration`` names for this model, or None.

    'auto' takes ``<model_dir>/calibration.json`` when present; None/False turns it off; a
    path names a file. Checked before any query runs: a file fitted for another model raises
    MismatchError.
    """
    from geozoom_ros import calibration as C
    from geozoom_ros.model.io import model_hash

    cal = C.resolve(options.calibration, model_path)
    if cal is not None and cal.model_sha256:
        cal.check_model(model_hash(model_path))
    return cal


def run_queries(bundle_path, model_path, queries, options):
    """Run ``options.method`` on ``queries``; return the per-query :class:`Run`."""
    from tqdm import tqdm

    method = options.method
    if method not in METHODS:
        raise InputError(f'method {method!r} is unknown; use one of {", ".join(METHODS)}')
    if not queries:
        raise InputError('no usable queries (every row was skipped or the split is empty)')
    rng = np.random.default_rng(options.seed)
    n = len(queries)
    est = np.full((n, 2), np.nan)
    covs = np.full((n, 2, 2), np.nan)
    conf = np.zeros(n)
    lat_ms = []
    step_correct = None
    ran_beam = np.zeros(n, bool) if method == 'zoom-fused' else None
    truth = np.array([[q.lat, q.lon] for q in queries])
    # The camera heading of each query (None: unknown, as for a robot without one).
    headings = [q.heading_deg if options.use_heading else None for q in queries]
    unreadable = 0
    extra = {}

    if method in ZOOM_METHODS:
        from geozoom_ros.runtime import load_backend, load_retrieval, search_defaults

        backend = load_backend(options.backend, model_path,
                               defaults=search_defaults(method, options.beam_width),
                               device=options.device)
        bundle = load_bundle(bundle_path, backend)
        retr = None
        if method == 'zoom-fused':
            if not options.retrieval_model:
                raise InputError('method zoom-fused needs a retrieval model (--retrieval-model '
                                 'RETRIEVAL_MODEL) whose embeddings the bundle holds')
            retr = load_retrieval(options.retrieval_model, backend, device=options.device,
                                  bundle=bundle)
            scale = retr.scale()
            extra['retrieval_model_sha256'] = retr.model_hash
        gs = np.zeros((n, bundle.embed_dim), np.float32)
        have_g = np.zeros(n, bool)
        prior_misses = 0
        for i, q in enumerate(tqdm(queries, desc=f'eval {method}', disable=not options.progress)):
            img = q.load()
            if img is None:
                unreadable += 1
                continue
            prior = None
            if options.prior_sigma_m:
                s = float(options.prior_sigma_m)
                de, dn = rng.normal(0.0, s, 2)
                plat, plon = destination(q.lat, q.lon, math.degrees(math.atan2(de, dn)),
                                         math.hypot(de, dn))
                prior = Prior.from_sigma(plat, plon, s)
            t0 = time.perf_counter()
            g = backend.encode_ground([img], headings=[headings[i]])[0]
            evidence = None
            if retr is not None and not evidence_usable(bundle, headings[i]):
                ran_beam[i] = True
            elif retr is not None:
                e = retr.embed_ground([img], headings=[headings[i]])[0]
                evidence = retrieval_evidence(bundle, e, scale, headings[i])
            try:
                res = search(backend, bundle, g, method, options.beam_width, prior=prior,
                             residual=options.residual_cov, evidence=evidence,
                             zoom_weight=options.zoom_weight)
            except InputError:
                if prior is None:
                    raise
                res = None  # the drawn prior fell off the map: no fix, counted
                prior_misses += 1
            lat_ms.append((time.perf_counter() - t0) * 1e3)
            gs[i], have_g[i] = g, True
            if res is None:
                continue
            est[i] = res.estimate
            covs[i] = res.cov_en
            conf[i] = res.confidence
        if options.step_accuracy:
            sc = np.full((n, bundle.steps), np.nan)
            idx = np.flatnonzero(have_g)
            if idx.size:
                sc[idx] = zoom_step_correct(backend, bundle, gs[idx], truth[idx, 0],
                                            truth[idx, 1])
            step_correct = sc
        extra['prior_outside_map'] = prior_misses
        if ran_beam is not None:
            extra['frames_run_as_zoom_beam'] = int(ran_beam.sum())
        model_sha256 = backend.model_hash
    else:
        from geozoom_ros.runtime import load_retrieval

        bundle = load_bundle(bundle_path)
        # retrieval and sim-zoom search the bundle's crops: they must be this model's.
        retr = load_retrieval(model_path, device=options.device,
                              bundle=bundle if method in ('retrieval', 'sim-zoom') else None)
        model_sha256 = retr.model_hash
        scale = retr.scale()
        if method == 'retrieval':
            term = bundle.terminal
            nn_index = _Nearest(_level_vectors(bundle, bundle.steps))
            txs, tys = term.cell_arrays()
            extra['index_backend'] = nn_index.backend
            rh = bundle.retrieval_heading
            heading_indices = {}
            extra['heading_bins'] = 0 if rh is None else int(rh.shape[0])
        elif method == 'sim-zoom':
            level_vecs = [_level_vectors(bundle, lv) for lv in range(bundle.steps + 1)]
            step_correct = np.full((n, bundle.steps), np.nan)
            paths = true_paths(bundle, truth[:, 0], truth[:, 1])
        else:
            train_q, _ = read_index(options.knn_index, 'train')
            vecs, pos = [], []
            for s in tqdm(range(0, len(train_q), 32), desc='encode train split',
                          disable=not options.progress):
                imgs, ps = [], []
                for q in train_q[s:s + 32]:
                    img = q.load()
                    if img is not None:
                        imgs.append(img)
                        ps.append((q.lat, q.lon, q.heading_deg))
                if imgs:
                    vecs.append(retr.embed_ground(imgs, headings=[p[2] for p in ps]))
                    pos.extend(ps)
            if not pos:
                raise InputError(f'{options.knn_index}: no readable train-split images')
            nn_index = _Nearest(np.concatenate(vecs))
            pos = np.array([p[:2] for p in pos])
            tz = bundle.terminal.zoom
            extra['index_backend'] = nn_index.backend
            extra['train_images'] = len(pos)

        for i, q in enumerate(tqdm(queries, desc=f'eval {method}', disable=not options.progress)):
            img = q.load()
            if img is None:
                unreadable += 1
                continue
            t0 = time.perf_counter()
            e = retr.embed_ground([img], headings=[headings[i]])[0]
            if method == 'retrieval':
                index = nn_index
                b = bundle.heading_bin(headings[i])
                if b is not None:
                    if b not in heading_indices:
                        heading_indices[b] = _Nearest(np.asarray(rh[b], np.float32))
                    index = heading_indices[b]
                sims, idx = index.search(e, options.top_k)
                probs = _softmax(scale * index.all_sims(e))[idx] if len(txs) < 200000 \
                    else _softmax(scale * sims)
                lat, lon, cov, c = _fix_from_cells(txs[idx], tys[idx], term.zoom, probs)
            elif method == 'sim-zoom':
                lat, lon, cov, c, chosen = _sim_zoom(bundle, level_vecs, e, scale)
                if paths[2][i]:
                    step_correct[i] = _sim_zoom_steps(bundle, level_vecs, e, truth[i])
            else:
                sims, idx = nn_index.search(e, options.top_k)
                probs = _softmax(scale * sims)
                lat, lon = pos[idx[0]]
                cells = [cell_at(a, b, tz) for a, b in pos[idx]]
                _, _, cov, _ = _fix_from_cells(np.array([cl.x for cl in cells]),
                                               np.array([cl.y for cl in cells]), tz, probs)
                c = float(probs[0])
            lat_ms.append((time.perf_counter() - t0) * 1e3)
            est[i] = (lat, lon)
            covs[i] = cov
            conf[i] = c

    return Run(method, truth, est, covs, conf, lat_ms, step_correct, bundle, model_sha256,
               unreadable, extra, ran_beam)


def summarize_run(run, options, skipped=0, calibration=None):
    """Return the summary dict of a :class:`Run` (see metrics.summarize), JSON-ready.

    NEES: ``nees_mean`` / ``nees_mean_within_100m`` score the covariance a localizer would
    publish (calibrated when ``calibration`` has an entry for the method); ``nees_raw_*`` the
    search's own and ``nees_calibrated_*`` the calibrated one (None without calibration).
    The gate figures score the method's confidence against fixes within 50 m.
    """
    bundle, method = run.bundle, run.method
    errors = run.errors_m()
    err_en = run.errors_en()
    raw = metrics.nees(err_en, run.cov_en)
    model = calibration.model_for(method) if calibration is not None else None
    cal = None
    if model is not None:
        cal_cov = model.apply(run.cov_en, run.confidence)
        beam_model = calibration.model_for('zoom-beam')
        if run.ran_beam is not None and run.ran_beam.any() and beam_model is not None:
            # Those queries ran the zoom beam: its calibration, as the localizer publishes.
            rows = run.ran_beam
            cal_cov[rows] = beam_model.apply(run.cov_en[rows], run.confidence[rows])
        cal = metrics.nees(err_en, cal_cov)
    summary = metrics.summarize(errors, raw if cal is None else cal, run.step_correct,
                                run.latency_ms, run.confidence, k=bundle.k, steps=bundle.steps,
                                area_m2=bundle.area_m2,
                                gate_thresholds=metrics.gate_thresholds_for(run.confidence))
    summary = {'method': method, **summary}
    near = errors <= 100.0
    for name, v in (('raw', raw), ('calibrated', cal)):
        fin = None if v is None else np.isfinite(v)
        summary[f'nees_{name}_mean'] = None if v is None else metrics.mean_finite(v)
        summary[f'nees_{name}_mean_within_100m'] = None if v is None else \
            metrics.mean_finite(v[fin & near])
    summary['calibration'] = None if model is None else {
        'path': str(calibration.path) if calibration.path else None, **model.to_dict()}
    summary['gate_calibrated'] = _calibrated_gate(
        run, calibration, errors, summary.get('gate_distance_m', 50.0))
    if run.step_correct is not None:
        summary['chance']['step_accuracy_uniform'] = summary['chance']['step_accuracy']
        summary['chance']['step_accuracy'] = step_chance(bundle, run.truth[:, 0],
                                                         run.truth[:, 1])
    summary['skipped_rows'] = int(skipped)
    summary['unreadable_images'] = int(run.unreadable)
    summary['beam_width'] = options.beam_width if method in ('zoom-beam', 'zoom-fused') \
        else None
    summary['zoom_weight'] = options.zoom_weight if method == 'zoom-fused' else None
    summary['use_heading'] = bool(options.use_heading)
    summary['prior_sigma_m'] = options.prior_sigma_m
    summary['residual_cov'] = options.residual_cov if method in ZOOM_METHODS else None
    summary['map_area_km2'] = bundle.area_m2 / 1e6
    summary.update(run.extra)
    return metrics.json_ready(summary)


def _calibrated_gate(run, calibration, errors, within_m):
    """Return how the confidence threshold fitted for the method gates these queries, or None.

    ``{'min_confidence', 'published', 'precision'}``: the share of queries published and the
    share of those within ``within_m``. Queries a fused search ran as the zoom beam (no
    heading) take the zoom beam's threshold, as the node does.
    """
    fitted = calibration.gate_thresholds() if calibration is not None else {}
    if run.method not in fitted:
        return None
    thr = np.full(len(errors), fitted[run.method])
    if run.ran_beam is not None and 'zoom-beam' in fitted:
        thr[run.ran_beam] = fitted['zoom-beam']
    pub = np.isfinite(errors) & (np.nan_to_num(run.confidence, nan=-1.0) >= thr)
    return {'min_confidence': fitted[run.method], 'published': float(pub.mean()),
            'precision': float(np.mean(errors[pub] <= within_m)) if pub.any() else None}


def _sim_zoom(bundle, level_vecs, e, scale):
    """Coarse retrieval over level-1 cells, then the most similar child per finer level."""
    k = bundle.k
    lv1 = bundle.levels[1]
    sims = level_vecs[1] @ e
    probs = _softmax(scale * sims)
    best = int(np.argmax(sims))
    conf = float(probs[best])
    all_x, all_y = lv1.cell_arrays()
    x, y = all_x[best:best + 1], all_y[best:best + 1]
    last = (all_x, all_y, probs)
    ar = np.arange(k * k)
    for level in range(1, bundle.steps):
        nxt = bundle.levels[level + 1]
        cx = x[0] * k + ar % k
        cy = y[0] * k + ar // k
        idx, valid = nxt.local_index(cx, cy)
        s = level_vecs[level + 1][idx] @ e
        s = np.where(valid, s, -np.inf)
        p = _softmax(scale * s)
        a = int(np.argmax(s))
        conf *= float(p[a])
        x, y = np.array([cx[a]]), np.array([cy[a]])
        last = (cx[valid], cy[valid], p[valid])
    tx, ty, tp = last
    order = np.argsort(-tp)[:64]
    lat, lon, cov, _ = _fix_from_cells(tx[order], ty[order], bundle.terminal.zoom, tp[order])
    return lat, lon, cov, conf, (int(x[0]), int(y[0]))


def _sim_zoom_steps(bundle, level_vecs, e, truth):
    """Return per-step correctness of the most similar child given the true parent."""
    k = bundle.k
    term = cell_at(truth[0], truth[1], bundle.terminal.zoom)
    out = np.full(bundle.steps, np.nan)
    ar = np.arange(k * k)
    for t in range(bundle.steps):
        parent = ancestor(term, bundle.levels[t].zoom)
        true_child = ancestor(term, bundle.levels[t + 1].zoom)
        nxt = bundle.levels[t + 1]
        cx = parent.x * k + ar % k
        cy = parent.y * k + ar // k
        idx, valid = nxt.local_index(cx, cy)
        s = np.where(valid, level_vecs[t + 1][idx] @ e, -np.inf)
        a = int(np.argmax(s))
        out[t] = float(cx[a] == true_child.x and cy[a] == true_child.y)
    return out
