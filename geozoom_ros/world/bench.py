"""`geozoom bench world`: the cost of making synthetic worlds, measured on this machine.

Figures:

* city generation time of a ``--size-m`` city (default 2 km);
* ground-view latency in one process (wall and CPU milliseconds, p50) at 512x384, 256x192 and
  128x96, all with 2x supersampling and cast shadows, and at 512x384 with the camera effects
  (exposure, blur, noise) that every written view gets;
* a real ``make_world`` of that city with ``--n-ground`` views at 512x384, its pyramid and
  the 2 km drive bag, using every core; the time for 20 000 views is extrapolated from the
  measured per-view throughput (said so in the output);
* training-resolution throughput (``--train-size`` views, default 256x192, rendered and
  written as JPEG by the workers), extrapolated to 100 000 views;
* peak memory (the largest resident set of the main process and of a worker);
* with ``--big-m`` (default 10 km): generation time and memory of that city, its orthophoto
  grid and the time of one orthophoto tile, extrapolated to the whole orthophoto.
"""


def register(bench_sub):
    """Add `geozoom bench world`."""
    p = bench_sub.add_parser('world', help='synthetic world: image latency, world make time, '
                                           'training-view throughput, memory')
    p.add_argument('--size-m', type=float, default=2000.0, help='city side in metres (2000)')
    p.add_argument('--n-ground', type=int, default=600,
                   help='512x384 views actually made (600; 20 000 is extrapolated)')
    p.add_argument('--n-train', type=int, default=1500,
                   help='training views actually made (1500; 100 000 is extrapolated)')
    p.add_argument('--train-size', default='256x192',
                   help='training view size WxH in pixels (256x192)')
    p.add_argument('--big-m', type=float, default=10000.0,
                   help='side of the big city to check (10000; 0 skips it)')
    p.add_argument('--no-drive', action='store_true', help='skip the drive bag')
    p.add_argument('--no-make', action='store_true',
                   help='skip the world make and the training-view runs')
    p.add_argument('--workers', type=int, default=None, help='render processes (all cores)')
    p.add_argument('--seed', type=int, default=7, help='city seed (7)')
    p.add_argument('--json', action='store_true', help='print the figures as JSON')
    p.set_defaults(func=run)


def _rss_mb():
    import resource
    self_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    child_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0
    return self_mb, child_mb


def _parse_size(text):
    from geozoom_ros.errors import InputError
    try:
        w, h = (int(v) for v in str(text).lower().split('x'))
    except ValueError:
        w = h = 0
    if w < 8 or h < 8:
        raise InputError(f'--train-size {text!r} is not a size; use WxH pixels, e.g. 256x192')
    return w, h


def _latency(renderer, views, size, n=20, effects=False):
    """Return the p50 wall and CPU milliseconds of one view (CPU: all threads of the process).

    The chunks the views need are built before the clock starts: a worker builds them once.
    """
    import time

    import numpy as np

    from geozoom_ros.world.dataset import render_view
    for v in views[:n]:
        render_view(renderer, v, size, 0.0)  # warm the chunk cache
    wall, cpu = [], []
    for v in views[:n]:
        t0, c0 = time.perf_counter(), time.process_time()
        if effects:
            render_view(renderer, v, size)
        else:
            renderer.render(v['east_m'], v['north_m'], v['height_m'], v['heading_deg'],
                            v['fov_deg'], v['pitch_deg'], v['roll_deg'], v['lighting'],
                            size=size)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {'wall_p50_ms': float(np.median(wall) * 1000),
            'cpu_p50_ms': float(np.median(cpu) * 1000)}


def run(args):
    """Run the benchmark and print its figures; return 0."""
    import json
    import os
    import time

    from geozoom_ros.world import dataset as D
    from geozoom_ros.world import ortho as orthophoto
    from geozoom_ros.world.city import make_city

    workers = args.workers or len(os.sched_getaffinity(0))
    train_size = _parse_size(args.train_size)
    origin = (47.3769, 8.5417)
    res = dict(workers=workers, size_m=args.size_m, load_avg_start=os.getloadavg()[0])
    say = (lambda *a: None) if args.json else (lambda *a: print(*a, flush=True))

    t0 = time.perf_counter()
    city = make_city(args.seed, args.size_m, origin, 'summer')
    res['city_gen_s'] = time.perf_counter() - t0
    say(f'city {args.size_m:.0f} m: generated in {res["city_gen_s"]:.1f} s '
        f'({city.counts()["buildings"]} buildings, {city.counts()["trees"]} trees)')

    # Latency in one process.
    from geozoom_ros.world.render_gl import GroundRenderer
    views = D.spatial_order(D.sample_views(city, 40))
    renderer = GroundRenderer(city, 512, 384)
    latency_keys = []
    try:
        for size in ((512, 384), (256, 192), (128, 96)):
            key = f'latency_{size[0]}x{size[1]}'
            res[key] = _latency(renderer, views, size)
            latency_keys.append(key)
        res['latency_512x384_with_effects'] = _latency(renderer, views, (512, 384),
                                                       effects=True)
        a = orthophoto.ortho_tasks(city, orthophoto.ortho_grid(city), 1024)[0]
        t0 = time.perf_counter()
        orthophoto.render_tile(renderer, a)
        res['ortho_tile_1024_s'] = time.perf_counter() - t0
    finally:
        renderer.close()
    for key in latency_keys:
        r = res[key]
        say(f'{key}: {r["wall_p50_ms"]:.1f} ms wall, {r["cpu_p50_ms"]:.1f} ms CPU '
            f'(one process, 2x supersampling, shadows)')
    r = res['latency_512x384_with_effects']
    say(f'latency_512x384 with camera effects: {r["wall_p50_ms"]:.1f} ms wall, '
        f'{r["cpu_p50_ms"]:.1f} ms CPU')

    if not args.no_make:
        _make_runs(args, city, origin, workers, res, say, train_size)

    if args.big_m > 0:
        import resource
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
        t0 = time.perf_counter()
        big = make_city(args.seed, args.big_m, origin, 'summer')
        res['big_city_gen_s'] = time.perf_counter() - t0
        grid = orthophoto.ortho_grid(big)
        tasks = orthophoto.ortho_tasks(big, grid, 1024)
        renderer = GroundRenderer(big, 512, 384)
        try:
            mid = tasks[len(tasks) // 2]
            orthophoto.render_tile(renderer, mid)
            t0 = time.perf_counter()
            orthophoto.render_tile(renderer, tasks[len(tasks) // 2 + 1])
            tile_s = time.perf_counter() - t0
            # Views of a neighbourhood, as the spatially ordered make renders them; the first
            # pass builds the chunk meshes (timed apart), the second is the render itself.
            bv = D.spatial_order(D.sample_views(big, 400))[:10]
            built0 = renderer.stats['chunks_built']
            t0 = time.perf_counter()
            for v in bv:
                D.render_view(renderer, v, (512, 384))
            cold_s = time.perf_counter() - t0
            built = max(1, renderer.stats['chunks_built'] - built0)
            res['big_chunk_build_ms'] = 1000 * cold_s / built
            res['big_latency_512x384'] = _latency(renderer, bv, (512, 384), n=10)
        finally:
            renderer.close()
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
        res['big'] = dict(size_m=args.big_m, counts=big.counts(), ortho_px=[grid.width,
                                                                            grid.height],
                          ortho_tiles=len(tasks), ortho_tile_s=tile_s,
                          extrapolated_ortho_min=len(tasks) * tile_s / workers / 60.0,
                          rss_growth_mb=after - before)
        b = res['big']
        say(f'big city {args.big_m:.0f} m: generated in {res["big_city_gen_s"]:.0f} s, '
            f'{b["counts"]["buildings"]} buildings, orthophoto {grid.width}x{grid.height} px in '
            f'{len(tasks)} tiles of {tile_s:.2f} s -> EXTRAPOLATED '
            f'{b["extrapolated_ortho_min"]:.0f} min with {workers} workers; 512x384 view '
            f'{res["big_latency_512x384"]["wall_p50_ms"]:.0f} ms wall, '
            f'{res["big_latency_512x384"]["cpu_p50_ms"]:.0f} ms CPU once its chunks are built '
            f'(about {res["big_chunk_build_ms"]:.0f} ms per 256 m chunk, built once per '
            'worker and kept)')
    res['load_avg_end'] = os.getloadavg()[0]
    say(f'machine load average (1 min): {res["load_avg_start"]:.1f} at the start, '
        f'{res["load_avg_end"]:.1f} at the end, on {os.cpu_count()} cores')
    self_mb, child_mb = _rss_mb()
    res['peak_rss_main_mb'] = self_mb
    res['peak_rss_worker_mb'] = child_mb
    res['peak_total_upper_bound_mb'] = self_mb + workers * child_mb
    say(f'peak memory: main {self_mb:.0f} MB, largest worker {child_mb:.0f} MB '
        f'(upper bound of the sum: {res["peak_total_upper_bound_mb"]:.0f} MB)')
    if args.json:
        print(json.dumps(res, indent=2))
    return 0


def _make_runs(args, city, origin, workers, res, say, train_size=(256, 192)):
    """Time a real make_world and a training-resolution run; add the figures to ``res``."""
    import json
    import os
    import tempfile
    import time

    from geozoom_ros.world import dataset as D
    from geozoom_ros.world import make as M

    with tempfile.TemporaryDirectory(prefix='geozoom-bench-world-') as tmp:
        out = os.path.join(tmp, 'world')
        t0 = time.perf_counter()
        M.make_world(out, args.seed, args.size_m, origin, 'summer', n_ground=args.n_ground,
                     workers=workers, progress=not args.json, drive=not args.no_drive)
        res['make_s'] = time.perf_counter() - t0
        with open(os.path.join(out, 'world.json')) as f:
            timings = json.load(f)['timings']
        res['make_timings'] = timings
        per_view = timings['ground_s'] / max(1, args.n_ground)
        fixed = timings['total_s'] - timings['ground_s']
        res['ground_512_throughput_ms'] = per_view * 1000
        res['extrapolated_20000_views_min'] = (fixed + 20000 * per_view) / 60.0
        say(f'make_world {args.size_m:.0f} m, {args.n_ground} views 512x384: '
            + ', '.join(f'{k} {v:.0f} s' for k, v in timings.items()))
        say(f'  {per_view * 1000:.1f} ms per 512x384 view with {workers} workers; '
            f'EXTRAPOLATED: {args.size_m:.0f} m world + pyramid + drive + 20 000 views = '
            f'{res["extrapolated_20000_views_min"]:.1f} min')

        # Training resolution: rendered (with camera effects) and written by the workers.
        train = D.spatial_order(D.sample_views(city, args.n_train, seed=args.seed + 1))
        root = os.path.join(tmp, 'train')
        for split in D.SPLITS:
            os.makedirs(os.path.join(root, split), exist_ok=True)
        batches = [(train[k:k + 32], root, train_size, 1.0) for k in range(0, len(train), 32)]
        with M.RenderPool(city, train_size, workers) as pool:
            list(pool.imap(M._worker_views, batches[:2]))  # start-up and warm-up
            t0 = time.perf_counter()
            done = sum(len(r) for r in pool.imap(M._worker_views, batches[2:]))
            dt = time.perf_counter() - t0
        per = dt / max(1, done)
        tw, th = train_size
        res['train_size'] = [tw, th]
        res[f'train_{tw}x{th}_throughput_ms'] = per * 1000
        res['extrapolated_100000_train_views_min'] = 100000 * per / 60.0
        say(f'training views {tw}x{th}: {per * 1000:.1f} ms per view with {workers} workers '
            f'({done} measured); EXTRAPOLATED: 100 000 views = '
            f'{res["extrapolated_100000_train_views_min"]:.1f} min')
