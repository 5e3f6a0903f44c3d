"""`geozoom bench tiles`: build throughput, view render times and preloaded memory per km^2.

Writes a synthetic textured orthophoto (0.3 m/px, UTM 32N, near Zurich) to a temporary folder,
builds its pyramid with every core, renders 384 x 384 views of random cells from a preloaded
store and from disk, and measures the memory of the preloaded pyramid. Memory per km^2 at
zoom 20 is extrapolated from the measured bytes per preloaded tile and the number of zoom-20
tiles per km^2 at the map's latitude (times 4/3 for the overview zooms above it).
"""


def register(bench_sub):
    """Add `geozoom bench tiles`."""
    p = bench_sub.add_parser('tiles', help='tile pyramid: build throughput, view latency, '
                                           'memory per km^2')
    p.add_argument('--size-m', type=float, default=1000.0,
                   help='side of the synthetic orthophoto in metres (1000)')
    p.add_argument('--views', type=int, default=300, help='views per measurement (300)')
    p.add_argument('--workers', type=int, default=None, help='build processes (all cores)')
    p.add_argument('--json', action='store_true', help='print the figures as JSON')
    p.set_defaults(func=run)


def synthetic_ortho(path, size_m=1000.0, gsd_m=0.3, lat=47.37, lon=8.54, seed=0):
    """Write a textured RGB uint8 GeoTIFF (UTM) of ``size_m`` metres at ``gsd_m`` m/px.

    Fields, roads and building roofs over multi-scale noise, so JPEG tiles compress about as
    real suburban imagery does. Returns the raster's ``(width, height)`` in pixels.
    """
    import cv2
    import numpy as np
    import rasterio
    from rasterio.transform import from_origin

    from geozoom_ros import geo

    rng = np.random.default_rng(seed)
    n = int(round(size_m / gsd_m))
    img = np.zeros((n, n, 3), np.float32)
    for octave in (8, 32, 128, 512):
        small = rng.uniform(-1, 1, (octave, octave, 3)).astype(np.float32)
        img += cv2.resize(small, (n, n), interpolation=cv2.INTER_CUBIC) * (40.0 / octave ** 0.3)
    img += np.array([95, 110, 80], np.float32)
    img = np.clip(img, 0, 255).astype(np.uint8)
    px = 1.0 / gsd_m
    for _ in range(int(size_m * size_m / 800.0)):  # roofs, about one per 800 m^2
        x, y = rng.integers(0, n, 2)
        w, h = rng.integers(int(6 * px), int(20 * px), 2)
        colour = tuple(int(c) for c in rng.integers(60, 230, 3))
        cv2.rectangle(img, (int(x), int(y)), (int(x + w), int(y + h)), colour, -1)
    for _ in range(int(size_m / 60.0)):  # roads
        p0 = tuple(int(v) for v in rng.integers(0, n, 2))
        p1 = tuple(int(v) for v in rng.integers(0, n, 2))
        cv2.line(img, p0, p1, (70, 70, 72), int(7 * px))
    img = cv2.add(img, rng.integers(0, 12, img.shape, dtype=np.uint8))
    epsg = geo.utm_epsg(lat, lon)
    e, nn, _ = geo.latlon_to_utm(lat, lon, epsg)
    transform = from_origin(e - size_m / 2.0, nn + size_m / 2.0, gsd_m, gsd_m)
    with rasterio.open(path, 'w', driver='GTiff', width=n, height=n, count=3, dtype='uint8',
                       crs=f'EPSG:{epsg}', transform=transform, tiled=True, blockxsize=512,
                       blockysize=512, photometric='RGB') as dst:
        dst.write(np.moveaxis(img, -1, 0))
    return n, n


def _percentiles(times_s):
    import numpy as np

    ms = np.asarray(times_s) * 1000.0
    return {'p50_ms': float(np.percentile(ms, 50)), 'p95_ms': float(np.percentile(ms, 95)),
            'mean_ms': float(ms.mean())}


def _time_views(store, cells, size=384):
    import time

    from geozoom_ros.tiles.views import render_view

    times = []
    for cell in cells:
        t0 = time.perf_counter()
        render_view(store, cell, size)
        times.append(time.perf_counter() - t0)
    return _percentiles(times)


def run(args):
    """Run the benchmark and print its figures; return 0."""
    import json
    import os
    import random
    import tempfile
    import time
    import tracemalloc

    from geozoom_ros import geo
    from geozoom_ros.tiles.build import build_mbtiles
    from geozoom_ros.tiles.store import open_store

    workers = args.workers or (len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity')
                               else os.cpu_count())
    with tempfile.TemporaryDirectory(prefix='geozoom-bench-') as tmp:
        tif = os.path.join(tmp, 'ortho.tif')
        t0 = time.perf_counter()
        width, height = synthetic_ortho(tif, size_m=args.size_m)
        gen_s = time.perf_counter() - t0
        source_mb = width * height * 3 / 1e6
        out = os.path.join(tmp, 'ortho.mbtiles')
        t0 = time.perf_counter()
        build_mbtiles([tif], out, workers=workers, progress=not args.json)
        build_s = time.perf_counter() - t0

        with open_store(out) as disk:
            meta = disk.metadata
            counts = disk.count_tiles()
            tiles_total = sum(counts.values())
            tile_bytes = disk.tile_bytes()
            max_tiles = counts[meta.maxzoom]
            max_bytes = sum(len(b) for z, _, _, b in disk.tiles() if z == meta.maxzoom)
        west, south, east, north = meta.bounds
        rng = random.Random(0)
        cells = []
        for _ in range(args.views):
            lat, lon = rng.uniform(south, north), rng.uniform(west, east)
            # Any cell: from coarser than the pyramid to deeper than it.
            zoom = rng.randint(max(0, meta.minzoom - 1), meta.maxzoom + 2)
            cells.append(geo.cell_at(lat, lon, zoom))

        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        pre = open_store(out, preload=True)
        preload_bytes_py = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        with pre:
            pre_cold = _time_views(pre, cells)
        # A decode cache big enough for the whole pyramid (about 192 KiB per 256 px tile).
        with open_store(out, preload=True, cache_tiles=tiles_total) as pre:
            _time_views(pre, cells)
            pre_warm = _time_views(pre, cells)
        with open_store(out) as disk:
            disk_cold = _time_views(disk, cells)
        with open_store(out, cache_tiles=0) as disk:
            disk_nocache = _time_views(disk, cells)

    lat_c = (south + north) / 2.0
    tile_side_m = geo.ground_resolution_m(20, lat_c, meta.tile_size) * meta.tile_size
    tiles_per_km2_z20 = 1e6 / tile_side_m ** 2
    bytes_per_tile_mem = preload_bytes_py / tiles_total
    pyramid_factor = 4.0 / 3.0  # zoom 20 plus every coarser zoom above it
    mem_per_km2 = bytes_per_tile_mem * tiles_per_km2_z20 * pyramid_factor
    area_km2 = (args.size_m / 1000.0) ** 2
    figures = {
        'machine_cpus': os.cpu_count(), 'workers': workers,
        'load_average_1min': os.getloadavg()[0],
        'source': {'size_m': args.size_m, 'gsd_m': 0.3, 'pixels': [width, height],
                   'megabytes_rgb': source_mb, 'generate_s': gen_s},
        'pyramid': {'minzoom': meta.minzoom, 'maxzoom': meta.maxzoom, 'format': meta.format,
                    'tiles': tiles_total, 'tiles_per_zoom': counts, 'tile_bytes': tile_bytes,
                    'mean_bytes_per_tile_at_maxzoom': max_bytes / max_tiles},
        'build': {'seconds': build_s, 'tiles_per_s': tiles_total / build_s,
                  'source_mb_per_s': source_mb / build_s},
        'views_384': {'preloaded_cold_cache': pre_cold, 'preloaded_warm_cache': pre_warm,
                      'disk_cold_cache': disk_cold, 'disk_no_cache': disk_nocache,
                      'cells': args.views},
        'memory': {'preloaded_bytes_measured': preload_bytes_py,
                   'preloaded_mb_per_km2_measured': preload_bytes_py / 1e6 / area_km2,
                   'bytes_per_tile_in_memory': bytes_per_tile_mem,
                   'tiles_per_km2_at_z20': tiles_per_km2_z20,
                   'mb_per_km2_at_z20_extrapolated': mem_per_km2 / 1e6,
                   'note': ('extrapolated: measured in-memory bytes per tile (encoded tiles of '
                            f'this synthetic texture, zoom {meta.maxzoom}) x zoom-20 tiles per '
                            f'km^2 at latitude {lat_c:.2f} x 4/3 for the coarser zooms; real '
                            'imagery compresses differently')},
    }
    if args.json:
        print(json.dumps(figures, indent=2))
        return 0
    b, v, m = figures['build'], figures['views_384'], figures['memory']
    print(f"machine  {os.cpu_count()} cpus, load average {os.getloadavg()[0]:.1f} "
          '(timings scale with other work on the machine)')
    print(f"source   {width}x{height} px RGB ({source_mb:.1f} MB), 0.3 m/px, "
          f"{args.size_m:.0f} m side, UTM")
    print(f"pyramid  zooms {meta.minzoom}..{meta.maxzoom}, {tiles_total} {meta.format} tiles, "
          f"{tile_bytes / 1e6:.1f} MB")
    print(f"build    {b['seconds']:.2f} s with {workers} workers: {b['tiles_per_s']:.0f} tiles/s, "
          f"{b['source_mb_per_s']:.1f} source MB/s")
    for key, label in (('preloaded_cold_cache', 'preloaded, cold decode cache'),
                       ('preloaded_warm_cache', 'preloaded, all tiles decoded'),
                       ('disk_cold_cache', 'from disk, cold decode cache'),
                       ('disk_no_cache', 'from disk, no decode cache')):
        print(f"view 384 {label:31s} p50 {v[key]['p50_ms']:6.2f} ms  "
              f"p95 {v[key]['p95_ms']:6.2f} ms")
    print(f"memory   preloaded {m['preloaded_bytes_measured'] / 1e6:.1f} MB "
          f"({m['bytes_per_tile_in_memory']:.0f} B/tile); at zoom 20: "
          f"{m['tiles_per_km2_at_z20']:.0f} tiles/km^2 -> about "
          f"{m['mb_per_km2_at_z20_extrapolated']:.0f} MB/km^2 ({m['note']})")
    return 0
