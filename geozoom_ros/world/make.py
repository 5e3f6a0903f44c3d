"""`geozoom world make`: generate a city and write its orthophoto, pyramid, views and drive.

Writes into ``DIR``:

* ``ortho.tif``: georeferenced RGB orthophoto (UTM zone of the origin, 0.3-0.5 m/px);
* ``map.mbtiles``: the tile pyramid built from it by :func:`geozoom_ros.tiles.build.build_mbtiles`;
* ``ground/<split>/*.jpg`` and ``ground/index.csv``: the ground views (see ``dataset``);
* ``drive.mcap/``: a rosbag2 drive along the streets (when ``geozoom_ros.world.drive`` exists);
* ``world.json``: seed, size, origin, style, knobs, counts, splits, timings and versions.

Rendering runs in ``workers`` processes, each with its own EGL context created after the
process starts. Every artefact is written under a temporary name and renamed into place.
"""

import json
import math
import multiprocessing as mp
import os
from pathlib import Path
import platform
import shutil
import time

import numpy as np

from geozoom_ros import __version__
from geozoom_ros.errors import InputError
from geozoom_ros.world import dataset as D
from geozoom_ros.world import ortho as orthophoto
from geozoom_ros.world import styles as S
from geozoom_ros.world.city import make_city

_W = {}


def _worker_init(city, size, supersample):
    from geozoom_ros.world.render_gl import GroundRenderer
    _W['renderer'] = GroundRenderer(city, size[0], size[1], supersample=supersample)
    _W['city'] = city


def _worker_ortho(args):
    task, lighting = args
    return orthophoto.render_tile(_W['renderer'], task, lighting)


def _worker_views(args):
    views, root, size, effects = args
    rows = []
    style = _W['city'].style
    for v in views:
        img = D.render_view(_W['renderer'], v, size, effects)
        D.write_jpeg(Path(root) / v['path'], img, v['jpeg_quality'])
        rows.append((v['index'], D.index_row(v, style, size)))
    return rows


class RenderPool:
    """Worker processes that each own a GroundRenderer (or the caller's process if 1)."""

    def __init__(self, city, size, workers=None, supersample=2):
        self.workers = max(1, int(workers or os.cpu_count() or 1))
        self.pool = None
        if self.workers > 1:
            ctx = mp.get_context('spawn')
            self.pool = ctx.Pool(self.workers, _worker_init, (city, size, supersample))
        else:
            _worker_init(city, size, supersample)

    def imap(self, fn, items, chunksize=1):
        """Map over items in the workers, results in completion order."""
        if self.pool is None:
            return map(fn, items)
        return self.pool.imap_unordered(fn, items, chunksize)

    def close(self):
        """Stop the workers (or release the in-process renderer)."""
        if self.pool is not None:
            self.pool.close()
            self.pool.join()
            self.pool = None
        elif 'renderer' in _W:
            _W.pop('renderer').close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is not None and self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None
        self.close()


def parse_origin(text):
    """Return (lat, lon) from 'LAT,LON'; InputError if it is not a point on the Earth."""
    try:
        lat, lon = (float(v) for v in str(text).split(','))
    except ValueError:
        raise InputError(f'--origin {text!r} is not LAT,LON in degrees (e.g. 48.137,11.575)')
    if not (math.isfinite(lat) and math.isfinite(lon)) or abs(lat) > 80 or abs(lon) > 180:
        raise InputError(f'--origin {text!r} is off the Earth or outside the UTM band: use a '
                         'latitude within +-80 and a longitude within +-180 degrees')
    return lat, lon


def _check_out_dir(out_dir):
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f'output {out} exists and is not a folder; choose another -o')
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f'.write-test-{os.getpid()}'
        probe.write_bytes(b'')
        probe.unlink()
    except OSError as exc:
        raise InputError(f'output folder {out} is not writable ({exc.strerror or exc}); '
                         'choose a writable -o') from None
    return out


def _versions():
    import moderngl
    v = dict(geozoom_ros=__version__, numpy=np.__version__, moderngl=moderngl.__version__,
             python=platform.python_version())
    try:
        import rasterio
        v['rasterio'] = rasterio.__version__
    except ImportError:
        pass
    return v


def make_world(out_dir, seed, size_m, origin, style='summer', n_ground=2000,
               ground_size=None, knobs=None, workers=None, progress=True, drive=True,
               preset='street', difficulty='default', tile_px=1024, mbtiles=True,
               fractions=None, drive_size=(320, 240)):
    """Generate a world into ``out_dir`` and return its path (see the module docstring).

    ``seed`` (int), ``size_m`` (city side, metres), ``origin`` (lat, lon degrees, the centre),
    ``style`` (summer/autumn/winter), ``n_ground`` ground views of ``ground_size`` (width,
    height) pixels (default 512x384; 1024x256 for the pano preset), ``preset`` street, drone
    or pano, ``difficulty`` easy/default/hard with ``knobs`` overrides (dict), ``workers``
    render processes (default: all cores), ``drive_size`` (width, height) pixels of the drive
    bag's camera (smaller than the dataset's views: the bag holds raw and JPEG images).
    """
    t_start = time.time()
    if isinstance(origin, str):
        origin = parse_origin(origin)
    S.check_style(style)
    if preset not in D.PRESETS:
        raise InputError(f'preset {preset!r} is unknown; use one of: {", ".join(D.PRESETS)}')
    if int(n_ground) != n_ground or n_ground < 0:
        raise InputError(f'n_ground={n_ground!r} must be a non-negative integer')
    if ground_size is None:
        from geozoom_ros.world.render_gl import PANO_SIZE
        ground_size = PANO_SIZE if preset == 'pano' else (512, 384)
    ground_size = (int(ground_size[0]), int(ground_size[1]))
    if min(ground_size) < 16 or max(ground_size) > 4096:
        raise InputError(f'ground size {ground_size[0]}x{ground_size[1]} is out of range; use '
                         '16..4096 pixels per side')
    if workers is not None and int(workers) < 1:
        raise InputError(f'workers={workers} must be at least 1')
    knob_values = S.make_knobs(knobs, difficulty)
    out = _check_out_dir(out_dir)
    # Fail here with the packages to install, not in the workers (a pool would respawn them).
    from geozoom_ros.world.render_gl import create_context
    probe = create_context()
    gl_renderer = str(probe.info.get('GL_RENDERER', ''))
    probe.release()
    timings = {}

    t = time.time()
    city = make_city(seed, size_m, origin, style, knob_values)
    timings['city_s'] = time.time() - t
    if progress:
        print(f'world: city of {city.size_m:.0f} m (seed {seed}, {style}): '
              + ', '.join(f'{v} {k}' for k, v in city.counts().items()), flush=True)
    grid = orthophoto.ortho_grid(city)
    views = D.sample_views(city, int(n_ground), preset, fractions)
    n_workers = max(1, int(workers or os.cpu_count() or 1))

    ground_tmp = out / f'.ground.tmp-{os.getpid()}'
    if ground_tmp.exists():
        shutil.rmtree(ground_tmp)
    for split in D.SPLITS:
        (ground_tmp / split).mkdir(parents=True, exist_ok=True)
    light = S.ortho_lighting(style, city.origin[0])
    try:
        with RenderPool(city, ground_size, n_workers) as pool:
            t = time.time()
            tasks = orthophoto.ortho_tasks(city, grid, tile_px)
            tiles = pool.imap(_worker_ortho, [(task, light) for task in tasks])
            orthophoto.write_ortho(out / 'ortho.tif', grid, tiles, len(tasks), progress)
            timings['ortho_s'] = time.time() - t

            t = time.time()
            rows = {}
            ordered = D.spatial_order(views)
            batch = 16
            batches = [(ordered[k:k + batch], str(ground_tmp), ground_size,
                        knob_values.camera_effects) for k in range(0, len(ordered), batch)]
            from tqdm import tqdm
            with tqdm(total=len(views), desc='ground views', unit='img',
                      disable=not progress) as bar:
                for result in pool.imap(_worker_views, batches):
                    rows.update(result)
                    bar.update(len(result))
            timings['ground_s'] = time.time() - t
        D.write_index(ground_tmp / 'index.csv', [rows[k] for k in sorted(rows)])
        final = out / 'ground'
        if final.exists():
            shutil.rmtree(final)
        os.replace(ground_tmp, final)
    finally:
        if ground_tmp.exists():
            shutil.rmtree(ground_tmp, ignore_errors=True)

    if mbtiles:
        t = time.time()
        from geozoom_ros.tiles.build import build_mbtiles
        build_mbtiles([str(out / 'ortho.tif')], str(out / 'map.mbtiles'), fmt='jpeg',
                      quality=90, workers=n_workers, progress=progress)
        timings['mbtiles_s'] = time.time() - t

    # Artefacts of an earlier make in this folder would not match the new world.
    for name, made in (('map.mbtiles', mbtiles), ('drive.mcap', drive)):
        stale = out / name
        if not made and stale.exists():
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    drive_info = None
    if drive:
        t = time.time()
        drive_info = _make_drive(city, out, drive_size, seed, progress)
        timings['drive_s'] = time.time() - t
    timings['total_s'] = time.time() - t_start

    counts = dict(city.counts())
    for split in D.SPLITS:
        counts[f'views_{split}'] = sum(1 for v in views if v['split'] == split)
    blocks = D.cross_blocks(city)
    info = dict(
        seed=int(seed), size_m=city.size_m, origin=list(city.origin), style=style,
        preset=preset, difficulty=difficulty, knobs=knob_values.to_dict(),
        ground_size=list(ground_size), n_ground=int(n_ground), counts=counts,
        frame=dict(kind='ENU', lat0=city.frame.lat0, lon0=city.frame.lon0,
                   bounds_enu=list(city.bounds_enu), rotation_deg=city.rotation_deg),
        ortho=dict(grid.to_dict(), path='ortho.tif', lighting=light.to_dict()),
        mbtiles='map.mbtiles' if mbtiles else None,
        ground=dict(index='ground/index.csv', columns=list(D.INDEX_COLUMNS)),
        splits=dict(names=list(D.SPLITS), cross_blocks_enu=blocks.round(3).tolist(),
                    block_m=knob_values.block_m, margin_m=knob_values.margin_m),
        drive=drive_info, timings={k: round(v, 2) for k, v in timings.items()},
        workers=n_workers, versions=dict(_versions(), gl_renderer=gl_renderer))
    tmp = out / f'.world.json.{os.getpid()}.tmp'
    tmp.write_text(json.dumps(info, indent=2))
    os.replace(tmp, out / 'world.json')
    if progress:
        print(f'world: wrote {out} in {timings["total_s"]:.0f} s', flush=True)
    return out


def _make_drive(city, out, size, seed, progress):
    try:
        from geozoom_ros.world import drive as drive_mod
    except ModuleNotFoundError as exc:
        if exc.name != 'geozoom_ros.world.drive':
            raise
        print('world: note: geozoom_ros.world.drive is not available; no drive bag written',
              flush=True)
        return None
    from geozoom_ros.world.render_gl import GroundRenderer
    target = out / 'drive.mcap'
    if target.exists():
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    light = S.sample_lighting(city.style, np.random.default_rng([int(seed), 23]), city.knobs,
                              city.origin[0])
    renderer = GroundRenderer(city, size[0], size[1])
    try:
        # The route planner draws a random walk; when one falls short, the next seed is used.
        for attempt in range(6):
            try:
                path = drive_mod.write_drive_bag(city, renderer, target, length_m=2000.0,
                                                 rate_hz=5.0, seed=seed + attempt,
                                                 progress=progress, lighting=light)
                break
            except InputError as exc:
                error = exc
        else:
            # A small city may hold no 2 km route: the rest of the world is still useful.
            print(f'world: note: no drive bag written: {error}', flush=True)
            return dict(error=str(error))
    finally:
        renderer.close()
    return dict(path=Path(path).name, length_m=2000.0, rate_hz=5.0, seed=seed + attempt)
