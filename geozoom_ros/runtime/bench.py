"""`geozoom bench runtime`: per-frame latency by backend, scaling with map area, memory.

Three parts, measured in one run (ratios are what to read on a noisy machine):

1. Latency per frame on a real map bundle, for every backend that loads (torch,
   onnxruntime, tensorrt): p50/p95 of the encoder, the beam search (width 8) and the total, in
   milliseconds, and the ratio search / encoder. With a retrieval model, the fused search too
   (``onnxruntime-fused``: its encoder time holds both encoders and the retrieval evidence).
   Resident memory growth over the frames and tracemalloc's Python allocations per frame
   after warm-up (onnxruntime backend).
2. Scaling with map area (1, 100, 10 000 km2 by default): zoom beam search on bundles whose
   tokens are synthetic (a fixed pool's rows, then zeros, in a memory-mapped file as a real
   bundle's: the search's cost does not depend on token values), once over every root and
   once with the root shortlist (the model's cross-view embedding ranks the roots, the best
   ``max_roots`` are searched; see
   ``geozoom_ros.shortlist``), brute-force retrieval (numpy inner products) and FAISS (exact
   flat index and an IVF index) over a synthetic gallery of one 64-float embedding per zoom
   ``root + 3 j`` cell (about 100 m at mid-latitudes, the retrieval baseline's crop).
   Latencies are also given as ratios to the 1 km2 figure. Each zoom variant is timed over
   the areas in turn (round-robin), so that drift on a noisy machine hits them alike and no
   search finds the caches warmed by an identical one just before.
3. Bundle bytes per km2 (tokens float16 + coverage, as the bundle format stores them; a loaded
   bundle is memory-mapped, so this bounds its resident memory) and the resident memory per
   km2 of the retrieval gallery (held in RAM, fully written: its size). Brute force uses
   ``np.einsum`` (single-threaded) and FAISS one OpenMP thread.

Without ``--model`` the command measures the shipped model on a small real map (GeoTIFF ->
MBTiles, 400 m) built in a temporary folder; :func:`run_bench` without a model builds an
untrained policy with the CPU recipe's sizes (``config/train/cpu.yaml``:
EfficientNet-Lite0, ground 128x96, views 96, embed 256, 4 decoder layers, 4 steps of a 4x4
grid from zoom 12) and its bundle: the per-frame cost is the real one whether or not the
weights are trained.
"""

import json
import os
from pathlib import Path
import tempfile
import time
import tracemalloc

import numpy as np

#: Sizes of the CPU training recipe (config/train/cpu.yaml).
CPU_RECIPE = dict(root_zoom=12, grid_k=4, steps=4, embed_dim=256, ground_size=(128, 96),
                  view_size=96, encoder_layers=4)
RETRIEVAL_DIM = 64


def register(bench_sub):
    """Add `geozoom bench runtime`."""
    p = bench_sub.add_parser('runtime', help='per-frame latency by backend, scaling with map '
                                             'area, bundle size and memory')
    p.add_argument('--model', default=None,
                   help='zoom policy folder (default: the shipped model, on a 400 m synthetic '
                        'map unless --bundle is given)')
    p.add_argument('--bundle', default=None,
                   help='map bundle of --model (default: built over a small synthetic map)')
    p.add_argument('--frames', type=int, default=100, help='timed frames per backend (100)')
    p.add_argument('--warmup', type=int, default=5, help='untimed frames per backend (5)')
    p.add_argument('--areas', default='1,100,10000',
                   help='map areas in km2 for the scaling benchmark (1,100,10000)')
    p.add_argument('--threads', type=int, default=1, help='CPU threads per backend (1)')
    p.add_argument('--beam', type=int, default=8, help='beam width (8)')
    p.add_argument('--retrieval-model', default=None, metavar='RETRIEVAL_MODEL',
                   help='also time the fused search (onnxruntime-fused: the policy on '
                        'onnxruntime, the retrieval model on torch); the bundle must hold its '
                        'embeddings (built here when --bundle is not given)')
    p.add_argument('--backends', default='torch,torch-cuda,onnxruntime,tensorrt',
                   help='backends to try (those that cannot load are reported and skipped; '
                        'default torch,torch-cuda,onnxruntime,tensorrt); torch-cuda runs the '
                        'torch backend on the GPU with CUDA graphs, torch-cuda-eager without '
                        'them')
    p.add_argument('--json', action='store_true', help='print the figures as JSON')
    p.set_defaults(func=_run)


def _pct(values):
    a = np.asarray(values, float)
    return {'p50': float(np.percentile(a, 50)), 'p95': float(np.percentile(a, 95))}


def _frames(count, width=640, height=480, seed=0):
    import cv2

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        small = rng.integers(0, 256, (27, 36, 3), dtype=np.uint8)
        out.append(cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR))
    return out


def _rss():
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


def _prepare(folder, model=None, bundle=None, retrieval_model=None):
    """Return ``(model, bundle, note)``; build what is missing in ``folder``.

    A bundle built here holds ``retrieval_model``'s embeddings when one is given.
    """
    from geozoom_ros.errors import InputError

    if bundle is not None and model is None:
        raise InputError('--bundle needs --model (the model the bundle was built with)')
    if model is not None and bundle is not None:
        return Path(model), Path(bundle), 'given model and bundle'
    from geozoom_ros.ros.bench import make_small_world

    if model is None:
        world = make_small_world(folder, size_m=400.0, gsd_m=0.5, **CPU_RECIPE)
        note = 'untrained policy with the CPU recipe sizes (random init) on a 400 m synthetic map'
        if retrieval_model is None:
            return world['model'], world['bundle'], note
        from geozoom_ros.bundle import build_bundle
        out = build_bundle(world['map'], world['model'], Path(folder) / 'bundle-fused',
                           batch_size=16, progress=False, retrieval_model=retrieval_model)
        return world['model'], out, note
    from geozoom_ros.bundle import build_bundle
    from geozoom_ros.tiles.bench import synthetic_ortho
    from geozoom_ros.tiles.build import build_mbtiles

    synthetic_ortho(Path(folder) / 'ortho.tif', size_m=400.0, gsd_m=0.5)
    mbtiles = build_mbtiles(Path(folder) / 'ortho.tif', Path(folder) / 'map.mbtiles',
                            workers=1, progress=False)
    out = build_bundle(mbtiles, model, Path(folder) / 'bundle', batch_size=16, progress=False,
                       retrieval_model=retrieval_model)
    return Path(model), out, 'given model on a 400 m synthetic map'


def _backend_latency(backend, bundle_path, model, frames, warmup, beam, threads,
                     retrieval_model=None):
    from geozoom_ros.localizer import GeoZoomLocalizer

    kind, kwargs = backend, {}
    if backend in ('onnxruntime', 'onnxruntime-fused'):
        kind, kwargs = 'onnxruntime', {'threads': threads}
        if backend == 'onnxruntime-fused':
            from geozoom_ros.runtime import BackendUnavailable
            if retrieval_model is None:
                raise BackendUnavailable(f'backend {backend}: give --retrieval-model')
            kwargs.update(method='zoom-fused', retrieval_model=retrieval_model)
    elif backend in ('torch-cuda', 'torch-cuda-eager'):  # the torch backend on the GPU
        import torch

        from geozoom_ros.runtime import BackendUnavailable
        if not torch.cuda.is_available():
            raise BackendUnavailable(f'backend {backend}: CUDA is not available here')
        # With CUDA graphs (the default), or eager: kernels launched one by one.
        kind, kwargs = 'torch', {'device': 'cuda', 'cuda_graphs': backend == 'torch-cuda'}
    # The localizer loads the backend, with exported search graphs of its beam width.
    loc = GeoZoomLocalizer(bundle_path, model, backend=kind, beam_width=beam, **kwargs)
    images = _frames(8)
    heading = 0.0 if loc.uses_heading else None  # a heading model, heading-aligned crops
    for i in range(warmup):
        loc.localize(images[i % len(images)], heading_deg=heading)
    # Preallocated: lists growing by a float per frame would show up as resident memory.
    lat = {key: np.empty(frames) for key in ('encoder', 'search', 'total', 'graph')}
    rss0 = _rss()
    # Resident memory is sampled after every tenth of the frames: a leak grows linearly to
    # the end, while the allocators' one-off growth (pools, arenas) levels off early.
    tenth, samples = max(1, frames // 10), []
    timer = _GraphTimer(loc.backend)
    try:
        for i in range(frames):
            timer.elapsed = np.nan
            fix = loc.localize(images[i % len(images)], heading_deg=heading)
            for key in ('encoder', 'search', 'total'):
                lat[key][i] = fix.latency_ms[key]
            lat['graph'][i] = timer.elapsed
            if (i + 1) % tenth == 0:
                samples.append(_rss())
        rss_end = _rss()  # before the statistics below allocate anything
        back_to_back = timer.replay(frames)
    finally:
        timer.remove()
    graph = lat.pop('graph')
    row = {key: _pct(v) for key, v in lat.items()}
    if np.all(np.isfinite(graph)):  # every search ran in one graph call
        row['search_split'] = {'graph': _pct(graph), 'python': _pct(lat['search'] - graph),
                               'graph_back_to_back': _pct(back_to_back)}
    row['search_over_encoder_p50'] = row['search']['p50'] / row['encoder']['p50']
    row['rss_growth_bytes'] = rss_end - rss0
    row['rss_samples_bytes'] = samples
    row['rss_growth_second_half_bytes'] = rss_end - samples[len(samples) // 2 - 1] \
        if len(samples) >= 2 else 0
    row['frames'] = frames
    return row, loc


class _GraphTimer:
    """Times the whole-search graph call inside each of a backend's searches.

    It wraps the backend's ``search_graph`` (an instance attribute shadows the method until
    :meth:`remove`), so the localizer runs as it does, and the rest of the search's time is
    the Python around the graph. :meth:`replay` repeats the last call back to back, its
    weights and code left in the caches by the call before.
    """

    def __init__(self, backend):
        self.backend = backend
        self.elapsed = np.nan
        self.last = None
        self._graph = getattr(backend, 'search_graph', None)
        if self._graph is not None:
            backend.search_graph = self._search_graph

    def _search_graph(self, width, level, starts=1):
        run = self._graph(width, level, starts)
        if run is None:
            return None

        def timed(*args):
            t0 = time.perf_counter()
            out = run(*args)
            self.elapsed = (time.perf_counter() - t0) * 1e3
            self.last = (run, args)
            return out
        timed.rows = run.rows
        return timed

    def replay(self, repeats):
        """Return the last graph call's times in ms, repeated back to back ([NaN] if none)."""
        if self.last is None:
            return np.full(1, np.nan)
        run, args = self.last
        out = np.empty(repeats)
        run(*args)
        for i in range(repeats):
            t0 = time.perf_counter()
            run(*args)
            out[i] = (time.perf_counter() - t0) * 1e3
        return out

    def remove(self):
        """Give the backend its own ``search_graph`` back."""
        if self._graph is not None:
            del self.backend.search_graph


def compute_cost(model_path, beam=8):
    """Return multiply-adds (millions) of the encoder per frame and of the decoder per search.

    The encoder is counted by torch's FLOP counter on one ground frame. The decoder is counted
    the same way on the first step of one path (ground and root tokens) and scaled to the
    tokens a cached (key/value) beam search feeds it: 2 at the first step, then per live path
    and step 2 (an action and a view token) or, with the fused layout, 1; attention over the
    few cached keys is included in the first step's count and is a small part. This is what
    the search's decoder must compute, whatever the backend; the latency ratio cannot fall
    much below it.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from geozoom_ros.model.io import load_model

    model = load_model(model_path).eval()
    cfg = model.config
    w, h = cfg.ground_size
    x = torch.zeros(1, 3, h, w)
    d = cfg.embed_dim
    with torch.no_grad():
        with FlopCounterMode(display=False) as enc:
            g = model.encode_ground(x, torch.zeros(1) if cfg.heading_input else None)
        with FlopCounterMode(display=False) as dec:
            model.step_logits(g, torch.zeros(1, 1, d), torch.zeros(1, 0, dtype=torch.long))
    per_step = 1 if cfg.decoder_tokens == 'fused' else 2
    tokens = 2 + per_step * int(beam) * (cfg.steps - 1)
    enc_mmac = enc.get_total_flops() / 2e6
    dec_mmac = dec.get_total_flops() / 2e6 / 2 * tokens
    return {'encoder_mmac_per_frame': enc_mmac, 'decoder_mmac_per_search': dec_mmac,
            'decoder_tokens_per_search': tokens, 'decoder_over_encoder': dec_mmac / enc_mmac,
            'embed_dim': d, 'decoder_layers': int(cfg.decoder_layers), 'steps': int(cfg.steps)}


def _allocations(loc, frames=20):
    """Return tracemalloc figures per frame (after the warm-up the caller already did)."""
    images = _frames(4, seed=1)
    heading = 0.0 if loc.uses_heading else None  # a heading model, heading-aligned crops
    tracemalloc.start()
    try:
        loc.localize(images[0], heading_deg=heading)
        base, _ = tracemalloc.get_traced_memory()
        snap0 = tracemalloc.take_snapshot()
        peaks = []
        for i in range(frames):
            tracemalloc.reset_peak()
            before, _ = tracemalloc.get_traced_memory()
            loc.localize(images[i % len(images)], heading_deg=heading)
            _, peak = tracemalloc.get_traced_memory()
            peaks.append(peak - before)
        snap1 = tracemalloc.take_snapshot()
        end, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    diff = snap1.compare_to(snap0, 'filename')
    blocks = sum(max(s.count_diff, 0) for s in diff)
    return {'frames': frames, 'peak_python_bytes_per_frame': float(np.median(peaks)),
            'net_python_bytes_per_frame': (end - base) / frames,
            'net_python_blocks_per_frame': blocks / frames}


class SyntheticTokens:
    """Token rows drawn from a fixed pool: ``tokens[rows]`` like a bundle's token array."""

    def __init__(self, count, dim, pool=4096, seed=0):
        rng = np.random.default_rng(seed)
        self.pool = rng.standard_normal((pool, dim)).astype(np.float16)
        self.shape = (int(count), int(dim))

    def __getitem__(self, rows):
        return self.pool[np.asarray(rows) % len(self.pool)]

    def __len__(self):
        return self.shape[0]


def square_bounds(area_km2, lat=47.37, lon=8.54):
    """Return (west, south, east, north) degrees of a square of ``area_km2`` around a point."""
    half = 500.0 * float(area_km2) ** 0.5  # metres
    dlat = half / 111320.0
    dlon = half / (111320.0 * np.cos(np.radians(lat)))
    return (lon - dlon, lat - dlat, lon + dlon, lat + dlat)


def synthetic_bundle(area_km2, config, model_hash, folder=None):
    """Return a Bundle over a square map of ``area_km2`` with synthetic tokens.

    Without ``folder`` the tokens are drawn from a small pool in memory
    (:class:`SyntheticTokens`). With one they are a float16 memory map in that folder, as a
    loaded bundle's are (what the whole-search graphs need): the pool's rows first, zeros
    after (a sparse file: nothing is written or read that the search does not touch).
    """
    from geozoom_ros.bundle import Bundle, make_levels

    bounds = square_bounds(area_km2)
    levels = make_levels(bounds, config.root_zoom, config.grid_k, config.steps)
    count = sum(lv.count for lv in levels if lv.offset >= 0)
    manifest = {'grid_k': config.grid_k, 'steps': config.steps, 'root_zoom': config.root_zoom,
                'embed_dim': config.embed_dim, 'levels': [lv.to_json() for lv in levels],
                'roots': [[int(x), int(y), levels[0].zoom]
                          for x, y in zip(*levels[0].cell_arrays())],
                'map': {'bounds': list(bounds)}, 'model': {'hash': model_hash}}
    tokens = SyntheticTokens(count, config.embed_dim)
    if folder is not None:
        pool = tokens.pool
        tokens = np.lib.format.open_memmap(Path(folder) / f'tokens-{area_km2:g}km2.npy',
                                           mode='w+', dtype=np.float16,
                                           shape=(count, config.embed_dim))
        tokens[:len(pool)] = pool[:count]
    keys = None
    if getattr(config, 'action_head', 'linear') == 'match':
        keys = SyntheticTokens(sum(lv.count for lv in levels), config.step_dim, seed=1)
    return Bundle('<memory>', manifest, tokens, keys=keys), levels


def _time(fn, repeats, min_s=0.0):
    fn()
    times = []
    t_end = time.perf_counter() + min_s
    while len(times) < repeats or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
        if len(times) >= 10 * repeats:
            break
    return _pct(times)


def _time_round_robin(fns, repeats, before=None):
    """Time every function of ``{key: fn}`` in turn, ``repeats`` rounds; return ``{key: pct}``.

    Round-robin, so that a noisy machine's drift hits every key alike and no call follows an
    identical one (whose caches it would find warm). ``before``, when given, runs untimed
    before every timed call.
    """
    for fn in fns.values():
        fn()
    times = {key: [] for key in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            if before is not None:
                before()
            t0 = time.perf_counter()
            fn()
            times[key].append((time.perf_counter() - t0) * 1e3)
    return {key: _pct(t) for key, t in times.items()}


def scaling(backend, areas, beam=8, repeats=10, seed=0, max_roots=4, folder=None,
            frame=None):
    """Return the scaling figures (see the module docstring) for map areas in km2.

    With ``folder`` the synthetic bundles' tokens are memory maps there (as a real bundle's).
    With ``frame`` (uint8 RGB) the shortlisted search is also timed right after an encoder
    pass over it, as the localizer runs it (``zoom_beam_shortlist_after_encoder_ms``).
    """
    try:
        import faiss
    except ImportError:  # the FAISS columns are left out; the rest does not need it
        faiss = None

    from geozoom_ros.search import beam as beam_search
    from geozoom_ros.shortlist import load_aux_weights, RootShortlist

    if faiss is not None:
        faiss.omp_set_num_threads(1)
    cfg = backend.config
    rng = np.random.default_rng(seed)
    g = rng.standard_normal(cfg.embed_dim).astype(np.float32)
    rows = []
    # The zoom searches of each area, by variant (timed after the loop).
    searches = {'zoom_beam_ms': [], 'zoom_beam_shortlist_ms': []}
    for area in areas:
        bundle, levels = synthetic_bundle(area, cfg, backend.model_hash, folder)
        token_count = len(bundle.tokens)
        t0 = time.perf_counter()
        shortlist = RootShortlist(bundle, load_aux_weights(backend.model_path))
        shortlist_build_ms = (time.perf_counter() - t0) * 1e3
        searches['zoom_beam_ms'].append(
            lambda bundle=bundle: beam_search(backend, bundle, g, width=beam))
        searches['zoom_beam_shortlist_ms'].append(
            lambda bundle=bundle, shortlist=shortlist: beam_search(
                backend, bundle, g, width=beam, shortlist=shortlist, max_roots=max_roots))
        # Retrieval gallery: one embedding per cell of the level whose cells are ~100 m.
        gallery_level = levels[min(3, len(levels) - 1)]
        n = gallery_level.count
        gallery = rng.standard_normal((n, RETRIEVAL_DIM), dtype=np.float32)
        gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
        q = gallery[n // 2] + 0.1 * rng.standard_normal(RETRIEVAL_DIM, dtype=np.float32)
        # einsum, not BLAS: a multi-threaded BLAS on a loaded 2-core machine times contention.
        brute = _time(lambda: int(np.argmax(np.einsum('nd,d->n', gallery, q))), repeats)
        nlist = int(max(1, min(4096, round(4 * n ** 0.5))))
        faiss_rows = {} if faiss is None else _faiss_times(faiss, gallery, q, nlist, rng,
                                                           repeats)
        bundle_bytes = token_count * cfg.embed_dim * 2 + token_count * 2
        if bundle.keys is not None:
            bundle_bytes += len(bundle.keys) * bundle.keys.shape[1] * 2
        rows.append({'area_km2': float(area), 'roots': len(bundle.roots),
                     'tokens': token_count, 'gallery': n,
                     'max_roots': int(max_roots), 'shortlist_build_ms': shortlist_build_ms,
                     'brute_force_ms': brute, **faiss_rows, 'faiss_ivf_nlist': nlist,
                     'bundle_bytes': bundle_bytes,
                     'bundle_bytes_per_km2': bundle_bytes / float(area),
                     'gallery_resident_bytes_per_km2': gallery.nbytes / float(area)})
    # Each zoom variant over the areas in turn (the retrieval baselines grow by orders of
    # magnitude; the zoom ratios are the ones near 1 that drift would blur). The variants apart:
    # a search over all 256 roots streams so much through the caches that whatever runs next
    # pays for it.
    timings = [('zoom_beam_ms', 'zoom_beam_ms', None),
               ('zoom_beam_shortlist_ms', 'zoom_beam_shortlist_ms', None)]
    if frame is not None:
        # The encoder streams its weights through the caches before every search, as in the
        # localizer: the figure of the search as a robot runs it.
        timings.append(('zoom_beam_shortlist_ms', 'zoom_beam_shortlist_after_encoder_ms',
                        lambda: backend.encode_ground([frame])))
    for key, name, before in timings:
        variant = dict(enumerate(searches[key]))  # by the area's row
        for i, pct in _time_round_robin(variant, repeats, before).items():
            rows[i][name] = pct
    base = rows[0]
    for row in rows:
        for key in ('zoom_beam_ms', 'zoom_beam_shortlist_ms', 'brute_force_ms', 'faiss_flat_ms',
                    'faiss_ivf_ms', 'zoom_beam_shortlist_after_encoder_ms'):
            if key in row:
                row[key.replace('_ms', '_ratio_p50')] = row[key]['p50'] / base[key]['p50']
    return rows


def _faiss_times(faiss, gallery, q, nlist, rng, repeats):
    """Time FAISS flat and IVF searches of ``q`` over ``gallery``; return their rows."""
    flat = faiss.IndexFlatIP(RETRIEVAL_DIM)
    flat.add(gallery)
    rows = {'faiss_flat_ms': _time(lambda: flat.search(q[None], 1), repeats)}
    quant = faiss.IndexFlatIP(RETRIEVAL_DIM)
    ivf = faiss.IndexIVFFlat(quant, RETRIEVAL_DIM, nlist, faiss.METRIC_INNER_PRODUCT)
    ivf.train(gallery[rng.choice(len(gallery), size=min(len(gallery), 40 * nlist),
                                 replace=False)])
    ivf.add(gallery)
    ivf.nprobe = min(nlist, 8)
    rows['faiss_ivf_ms'] = _time(lambda: ivf.search(q[None], 1), repeats)
    return rows


def run_bench(model=None, bundle=None, frames=100, warmup=5, areas=(1, 100, 10000), threads=1,
              beam=8, backends=('torch', 'torch-cuda', 'onnxruntime', 'tensorrt'),
              scaling_repeats=50, folder=None, retrieval_model=None):
    """Run the benchmark; return a dict of measured figures (see the module docstring).

    With ``retrieval_model`` the fused search is timed too (backend 'onnxruntime-fused').
    """
    import torch

    from geozoom_ros.runtime import BackendUnavailable

    torch.set_num_threads(int(threads))
    with tempfile.TemporaryDirectory(prefix='geozoom-bench-') as tmp:
        folder = Path(folder or tmp)
        model, bundle, note = _prepare(folder, model, bundle, retrieval_model)
        if retrieval_model is not None and 'onnxruntime-fused' not in backends:
            backends = tuple(backends) + ('onnxruntime-fused',)
        rss_start = _rss()
        out = {'model': note, 'threads': int(threads), 'beam': int(beam),
               'bundle_bytes': sum(p.stat().st_size for p in Path(bundle).rglob('*')
                                   if p.is_file()),
               'backends': {}, 'unavailable': {}}
        locs = {}
        for name in backends:
            try:
                row, loc = _backend_latency(name, bundle, model, frames, warmup, beam, threads,
                                            retrieval_model)
            except BackendUnavailable as exc:
                out['unavailable'][name] = str(exc)
                continue
            out['backends'][name] = row
            locs[name] = loc
        if not locs:
            raise BackendUnavailable('no backend could load: '
                                     + '; '.join(out['unavailable'].values()))
        # The allocation and scaling figures are the plain zoom search's.
        plain = {n: loc for n, loc in locs.items() if loc.method != 'zoom-fused'} or locs
        chosen = plain.get('onnxruntime') or next(iter(plain.values()))
        out['allocations'] = {'backend': chosen.backend.name, **_allocations(chosen)}
        out['compute'] = compute_cost(model, beam)
        out['scaling_backend'] = chosen.backend.name
        out['scaling'] = scaling(chosen.backend, [float(a) for a in areas], beam,
                                 scaling_repeats, folder=folder, frame=_frames(1)[0])
        out['rss_bytes'] = _rss()
        out['rss_growth_from_start_bytes'] = out['rss_bytes'] - rss_start
    return out


def _print(res):
    print(f'model: {res["model"]}; {res["threads"]} thread(s), beam {res["beam"]}')
    print(f'{"backend":<17} {"enc p50":>8} {"enc p95":>8} {"srch p50":>9} {"srch p95":>9} '
          f'{"tot p50":>8} {"tot p95":>8} {"srch/enc":>8}  (ms)')
    for name, r in res['backends'].items():
        print(f'{name:<17} {r["encoder"]["p50"]:8.2f} {r["encoder"]["p95"]:8.2f} '
              f'{r["search"]["p50"]:9.2f} {r["search"]["p95"]:9.2f} {r["total"]["p50"]:8.2f} '
              f'{r["total"]["p95"]:8.2f} {r["search_over_encoder_p50"]:8.2f}  '
              f'rss growth {r["rss_growth_bytes"] / 1e6:.1f} MB over {r["frames"]} frames '
              f'({r["rss_growth_second_half_bytes"] / 1e6:.1f} MB over the second half)')
    for name, why in res['unavailable'].items():
        print(f'{name:<17} unavailable: {why}')
    for name, r in res['backends'].items():
        split = r.get('search_split')
        if split:
            print(f'search of {name}, p50: the graph call {split["graph"]["p50"]:.2f} ms and the '
                  f'Python around it {split["python"]["p50"]:.2f} ms; the same call back to '
                  f'back {split["graph_back_to_back"]["p50"]:.2f} ms (caches warm)')
    c = res['compute']
    print(f'compute: encoder {c["encoder_mmac_per_frame"]:.1f} M multiply-adds per frame, '
          f'decoder {c["decoder_mmac_per_search"]:.1f} M per search ({c["embed_dim"]} floats, '
          f'{c["decoder_layers"]} layer{"s" if c["decoder_layers"] != 1 else ""}, '
          f'{c["decoder_tokens_per_search"]} tokens): '
          f'{c["decoder_over_encoder"]:.2f} of the encoder')
    a = res['allocations']
    print(f'allocations ({a["backend"]}, after warm-up): peak '
          f'{a["peak_python_bytes_per_frame"]:.0f} B/frame, net '
          f'{a["net_python_bytes_per_frame"]:.1f} B/frame, '
          f'{a["net_python_blocks_per_frame"]:.2f} blocks/frame')
    print(f'scaling (synthetic tokens/gallery, {res["scaling_backend"]}; p50 ms, x = ratio to '
          'the smallest area):')
    for r in res['scaling']:
        print(f'  {r["area_km2"]:>8.0f} km2  roots {r["roots"]:>4}  zoom all roots '
              f'{r["zoom_beam_ms"]["p50"]:7.2f} ({r["zoom_beam_ratio_p50"]:.2f}x)  zoom '
              f'shortlist {r["max_roots"]} {r["zoom_beam_shortlist_ms"]["p50"]:7.2f} '
              f'({r["zoom_beam_shortlist_ratio_p50"]:.2f}x)  after an encoder pass '
              f'{r["zoom_beam_shortlist_after_encoder_ms"]["p50"]:7.2f} '
              f'({r["zoom_beam_shortlist_after_encoder_ratio_p50"]:.2f}x)  brute '
              f'{r["brute_force_ms"]["p50"]:8.3f} '
              f'({r["brute_force_ratio_p50"]:.1f}x)  ' + (
                  f'faiss flat {r["faiss_flat_ms"]["p50"]:8.3f} '
                  f'({r["faiss_flat_ratio_p50"]:.1f}x)  faiss ivf {r["faiss_ivf_ms"]["p50"]:6.3f} '
                  f'({r["faiss_ivf_ratio_p50"]:.1f}x)' if 'faiss_flat_ms' in r
                  else 'faiss not installed') +
              f'  bundle {r["bundle_bytes_per_km2"] / 1e3:.0f} '
              f'kB/km2  gallery {r["gallery_resident_bytes_per_km2"] / 1e3:.0f} kB/km2')


def _run(args):
    from geozoom_ros.errors import InputError

    try:
        areas = [float(a) for a in args.areas.split(',') if a.strip()]
    except ValueError:
        raise InputError(f'--areas {args.areas!r}: give comma-separated km2 values') from None
    if not areas or min(areas) <= 0:
        raise InputError(f'--areas {args.areas!r}: areas must be positive km2 values')
    if args.frames < 1 or args.warmup < 0:
        raise InputError('--frames must be >= 1 and --warmup >= 0')
    model = args.model
    if model is None and args.bundle is None:
        from geozoom_ros.demo import SHIPPED_MODEL
        model = SHIPPED_MODEL
    res = run_bench(model, args.bundle, args.frames, args.warmup, areas, args.threads,
                    args.beam, tuple(b for b in args.backends.split(',') if b),
                    retrieval_model=args.retrieval_model)
    if args.json:
        print(json.dumps(res, indent=2, sort_keys=True))
    else:
        _print(res)
    return 0
