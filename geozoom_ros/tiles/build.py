"""Build an MBTiles pyramid from GeoTIFF / COG orthophotos.

Every input goes through GDAL's warper (a ``rasterio.vrt.WarpedVRT`` onto the Web-Mercator
pixel grid of the maximum zoom, bilinear), so any CRS GDAL knows works. Bands: 1 = grey
(replicated to RGB), 2 = grey + alpha, 3 = RGB, 4 = RGB + alpha; a band GDAL marks as alpha is
used as alpha wherever it is. Pixels are valid where the source has data (nodata value, mask
band, alpha at least half its maximum, finite values).

Scaling: uint8 sources are used as they are. Other sample types (uint16, int16, float, ...)
are stretched linearly so that the 2nd..98th percentile of the valid samples of all
non-8-bit inputs together (pooled over their colour bands, read from an overview of at most
1024 px per side) maps to 0..255, clipped; one stretch for all of them keeps colours
consistent across a mosaic and between bands.

Tiles: the maximum zoom defaults to the first zoom at least as fine as the finest input's
native ground sampling distance (:func:`geozoom_ros.geo.zoom_for_resolution`); the minimum
zoom defaults to the zoom where the whole map fits in about one tile. Lower zooms are built
by downsampling their four children (INTER_AREA, weighted by coverage). Tiles without any
valid pixel are not written; partly covered tiles are transparent there (PNG, WebP) or black
(JPEG). Where inputs overlap, the later input wins.

Robustness: the pyramid is written to ``<output>.partial`` and renamed into place at the end.
Progress (finished chunks of the maximum zoom, finished zooms) is committed to its metadata
table together with the tiles, so a killed build re-run with the same inputs and settings
continues where it stopped; a partial file from other settings or an unreadable one is
started afresh.
"""

import concurrent.futures as cf
import dataclasses
import json
import math
import multiprocessing
import os
import pathlib
import signal
import sqlite3
import sys
import warnings

import cv2
import mercantile
import numpy as np

from geozoom_ros import __version__, geo
from geozoom_ros.errors import GeoZoomError, InputError

MAX_ZOOM_LIMIT = 24
#: Tiles per side of one unit of work at the maximum zoom.
CHUNK_TILES = 8
#: Inputs whose footprints are further apart than this (metres) are not one map.
OVERLAP_TOLERANCE_M = 100.0
#: A build larger than this many tiles at the maximum zoom is refused as a likely mistake.
MAX_TILES = 50_000_000
_FORMATS = {'jpeg': 'jpg', 'jpg': 'jpg', 'png': 'png', 'webp': 'webp'}
_STATS_SIDE = 1024
_PARENT_BATCH = 32


@dataclasses.dataclass
class _Source:
    path: str
    count: int
    colour_bands: list
    alpha_band: int      # 1-based band of the warped dataset holding alpha, 0 if none
    alpha_threshold: float
    add_alpha: bool      # the warped dataset gets GDAL's validity band as its last band
    dtype: str
    bounds: tuple        # west, south, east, north (degrees)
    gsd_m: float
    tile_range: tuple = None  # tx0, ty0, tx1, ty1 (exclusive) at the maximum zoom


@dataclasses.dataclass
class _Plan:
    sources: list
    zoom: int
    fmt: str
    quality: int
    tile_size: int
    stretch: tuple  # (low, high) for non-uint8 sources, or None


def _one_line(text):
    return ' '.join(str(text).split())


def inspect_input(path):
    """Check one input raster and return what the builder needs to know about it.

    Raises InputError (one line naming the file) for a missing file, a file GDAL cannot read
    as a raster, or a raster without CRS / georeferencing or with an unusable band layout.
    """
    import rasterio
    from rasterio.enums import ColorInterp
    from rasterio.errors import NotGeoreferencedWarning, RasterioError
    from rasterio.warp import transform_bounds

    path = str(path)
    if not os.path.exists(path):
        raise InputError(f'{path}: no such file')
    if os.path.isdir(path):
        raise InputError(f'{path}: is a directory, not a raster file')
    try:
        with warnings.catch_warnings():
            # Reported below as one clear line instead.
            warnings.simplefilter('ignore', NotGeoreferencedWarning)
            src = rasterio.open(path)
    except RasterioError as exc:
        raise InputError(f'{path}: not a raster GDAL can read ({_one_line(exc)})') from None
    with src:
        if src.crs is None or (src.transform.is_identity and not src.gcps[0]):
            raise InputError(f'{path}: has no CRS / georeferencing; assign them first (e.g. '
                             'gdal_translate -a_srs EPSG:NNNN -a_ullr ...)')
        if src.transform.is_identity:
            raise InputError(f'{path}: is georeferenced by ground control points only; '
                             'warp it first (gdalwarp) into a CRS')
        if not 1 <= src.count <= 4:
            raise InputError(f'{path}: has {src.count} bands; expected 1 (grey), 2 (grey + '
                             'alpha), 3 (RGB) or 4 (RGB + alpha)')
        dtype = src.dtypes[0]
        if np.dtype(dtype).kind not in 'uif':
            raise InputError(f'{path}: sample type {dtype} is not supported (use integer or '
                             'float bands)')
        colour = [1] if src.count <= 2 else [1, 2, 3]
        recognised = [i + 1 for i, ci in enumerate(src.colorinterp) if ci == ColorInterp.alpha]
        alpha_band = recognised[0] if recognised else (src.count if src.count in (2, 4) else 0)
        colour = [b for b in colour if b != alpha_band] or [1]
        try:
            west, south, east, north = transform_bounds(src.crs, 'EPSG:4326', *src.bounds,
                                                        densify_pts=21)
        except Exception as exc:  # noqa: B902 - PROJ raises several types
            raise InputError(f'{path}: its CRS cannot be transformed to WGS84 '
                             f'({_one_line(exc)})') from None
        if not all(map(math.isfinite, (west, south, east, north))):
            raise InputError(f'{path}: its bounds do not transform to WGS84; check its CRS')
        south, north = max(south, -geo.MAX_LAT), min(north, geo.MAX_LAT)
        if south >= north or west >= east:
            raise InputError(f'{path}: lies outside the Web-Mercator map (latitude beyond '
                             f'+-{geo.MAX_LAT:.2f} or crossing the antimeridian)')
        gsd = _native_gsd_m(src)
        threshold = 0.0
        if alpha_band:
            amax = float(np.nanmax(src.read(alpha_band, out_shape=_stats_shape(src))))
            if amax <= 0:
                raise InputError(f'{path}: is fully transparent (alpha 0 everywhere); '
                                 'nothing to build')
            threshold = 0.5 * amax
        return _Source(path=os.path.abspath(path), count=src.count, colour_bands=colour,
                       alpha_band=alpha_band, alpha_threshold=threshold,
                       add_alpha=not recognised, dtype=dtype,
                       bounds=(west, south, east, north), gsd_m=gsd)


def _stats_shape(src):
    scale = min(1.0, _STATS_SIDE / max(src.width, src.height))
    return max(1, int(round(src.height * scale))), max(1, int(round(src.width * scale)))


def _native_gsd_m(src):
    """Return the ground size (metres) of a pixel at the raster's centre."""
    from rasterio.warp import transform

    col, row = src.width / 2.0, src.height / 2.0
    pts = [src.transform @ (col, row), src.transform @ (col + 1, row),
           src.transform @ (col, row + 1)]
    lons, lats = transform(src.crs, 'EPSG:4326', [p[0] for p in pts], [p[1] for p in pts])
    dx = geo.geodesic_distance_m(lats[0], lons[0], lats[1], lons[1])
    dy = geo.geodesic_distance_m(lats[0], lons[0], lats[2], lons[2])
    gsd = math.sqrt(dx * dy)
    if not (gsd > 0 and math.isfinite(gsd)):
        raise InputError(f'{src.name}: pixel size cannot be determined; check its '
                         'georeferencing')
    return gsd


def _gap_m(a, b):
    """Return the distance (metres, approximate) between two lon/lat boxes; 0 if they touch."""
    dlon = max(0.0, max(a[0], b[0]) - min(a[2], b[2]))
    dlat = max(0.0, max(a[1], b[1]) - min(a[3], b[3]))
    lat = math.radians((max(a[1], b[1]) + min(a[3], b[3])) / 2.0)
    return math.hypot(dlon * 111320.0 * math.cos(lat), dlat * 110574.0)


def check_overlap(sources, tolerance_m=OVERLAP_TOLERANCE_M):
    """Raise InputError unless the inputs' footprints form one connected map."""
    if len(sources) < 2:
        return
    linked = {0}
    frontier = [0]
    while frontier:
        i = frontier.pop()
        for j, s in enumerate(sources):
            if j not in linked and _gap_m(sources[i].bounds, s.bounds) <= tolerance_m:
                linked.add(j)
                frontier.append(j)
    if len(linked) < len(sources):
        lone = next(j for j in range(len(sources)) if j not in linked)
        gap = min(_gap_m(sources[lone].bounds, sources[i].bounds) for i in linked)
        raise InputError(f'{sources[lone].path}: does not overlap the other inputs (nearest '
                         f'{gap / 1000.0:.2f} km away); build separate maps or add the imagery '
                         'between them')


def _robust_stretch(sources):
    """Return (low, high) from the 2nd..98th percentiles of the non-8-bit inputs, or None."""
    import rasterio

    samples = []
    for s in sources:
        if s.dtype == 'uint8':
            continue
        with rasterio.open(s.path) as src:
            shape = _stats_shape(src)
            data = src.read(s.colour_bands, out_shape=(len(s.colour_bands),) + shape,
                            masked=True).astype(np.float64)
            valid = ~np.ma.getmaskarray(data)
            if s.alpha_band:
                alpha = src.read(s.alpha_band, out_shape=shape)
                valid &= (alpha >= s.alpha_threshold)[None]
            values = data.data[valid]
            samples.append(values[np.isfinite(values)])
    if not samples:
        return None
    values = np.concatenate(samples)
    if values.size == 0:
        raise InputError(f'{sources[0].path}: has no valid pixels (all nodata or transparent)')
    low, high = np.percentile(values, [2.0, 98.0])
    if not high > low:
        high = low + 1.0
    return float(low), float(high)


def _tile_range(bounds, zoom):
    west, south, east, north = bounds
    eps = 1e-9
    ul = mercantile.tile(west + eps, north - eps, zoom)
    lr = mercantile.tile(east - eps, south + eps, zoom)
    return ul.x, ul.y, lr.x + 1, lr.y + 1


def default_min_zoom(bounds, max_zoom):
    """Return the zoom where a lon/lat box fits in about one tile (at most ``max_zoom``)."""
    west, south, east, north = bounds
    x0, y0 = mercantile.xy(west, north)
    x1, y1 = mercantile.xy(east, south)
    extent = max(abs(x1 - x0), abs(y1 - y0), 1e-3)
    z = int(math.floor(math.log2(2.0 * math.pi * geo.EARTH_RADIUS_M / extent)))
    return max(0, min(max_zoom, z))


# --------------------------------------------------------------------------------------------
# Work done in the worker processes

_WORKER = {}


def _init_worker(plan, in_pool=False):
    if in_pool:
        # Ctrl-C is the main process's business: it stops the pool and keeps the partial file.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    _close_worker()
    _WORKER['plan'] = plan
    _WORKER['vrts'] = {}


def _close_worker():
    for src, vrt in _WORKER.get('vrts', {}).values():
        vrt.close()
        src.close()
    _WORKER.clear()


def _vrt(index):
    import rasterio
    from rasterio.enums import Resampling
    from rasterio.transform import Affine
    from rasterio.vrt import WarpedVRT

    vrts = _WORKER['vrts']
    if index not in vrts:
        plan = _WORKER['plan']
        s = plan.sources[index]
        ts, z = plan.tile_size, plan.zoom
        res = 2.0 * math.pi * geo.EARTH_RADIUS_M / (ts * (1 << z))
        tx0, ty0, tx1, ty1 = s.tile_range
        half = math.pi * geo.EARTH_RADIUS_M
        transform = Affine(res, 0.0, -half + tx0 * ts * res, 0.0, -res, half - ty0 * ts * res)
        src = rasterio.open(s.path)
        vrt = WarpedVRT(src, crs='EPSG:3857', transform=transform, width=(tx1 - tx0) * ts,
                        height=(ty1 - ty0) * ts, resampling=Resampling.bilinear,
                        add_alpha=s.add_alpha)
        vrts[index] = (src, vrt)
    return vrts[index][1]


def _to_uint8(data, dtype, stretch):
    if dtype == 'uint8':
        return data.astype(np.uint8, copy=False)
    low, high = stretch
    out = (data.astype(np.float32) - np.float32(low)) * np.float32(255.0 / (high - low))
    np.nan_to_num(out, copy=False, nan=0.0, posinf=255.0, neginf=0.0)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def _encode(rgb, valid, fmt, quality):
    """Encode an RGB tile; ``valid`` is a bool mask or None when fully valid."""
    if fmt == 'jpg':
        if valid is not None:
            rgb = np.where(valid[..., None], rgb, 0).astype(np.uint8)
        ok, buf = cv2.imencode('.jpg', cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
                               [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    else:
        if valid is None:
            img = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
        else:
            img = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGRA)
            img[..., 3] = np.where(valid, 255, 0)
        params = ([cv2.IMWRITE_PNG_COMPRESSION, 6] if fmt == 'png'
                  else [cv2.IMWRITE_WEBP_QUALITY, int(quality)])
        ok, buf = cv2.imencode('.' + fmt, img, params)
    if not ok:
        raise RuntimeError(f'OpenCV failed to encode a {fmt} tile')
    return buf.tobytes()


def _render_chunk(chunk):
    """Warp one chunk of the maximum zoom; return ``[(x, y, bytes), ...]`` of tiles with data."""
    from rasterio.errors import RasterioError
    from rasterio.windows import Window

    plan = _WORKER['plan']
    ts, c = plan.tile_size, CHUNK_TILES
    cx, cy, source_ids = chunk
    gx0, gy0 = cx * c, cy * c  # first tile of the chunk
    n = 1 << plan.zoom
    nx, ny = min(c, n - gx0), min(c, n - gy0)
    rgb = np.zeros((ny * ts, nx * ts, 3), np.uint8)
    valid = np.zeros((ny * ts, nx * ts), bool)
    for index in source_ids:
        s = plan.sources[index]
        vrt = _vrt(index)
        tx0, ty0, _, _ = s.tile_range
        col0, row0 = (gx0 - tx0) * ts, (gy0 - ty0) * ts
        c0, r0 = max(col0, 0), max(row0, 0)
        c1, r1 = min(col0 + nx * ts, vrt.width), min(row0 + ny * ts, vrt.height)
        if c1 <= c0 or r1 <= r0:
            continue
        bands = list(s.colour_bands)
        if s.alpha_band:
            bands.append(s.alpha_band)
        if s.add_alpha:
            bands.append(vrt.count)
        try:
            data = vrt.read(bands, window=Window(c0, r0, c1 - c0, r1 - r0))
        except RasterioError as exc:
            detail = _one_line(exc.__cause__ or exc)[:200]
            raise InputError(f'{s.path}: read failed ({detail}); the file is truncated or '
                             'corrupt') from None
        nc = len(s.colour_bands)
        ok = np.ones(data.shape[1:], bool)
        if s.add_alpha:
            ok &= data[-1] > 0
        if s.alpha_band:
            ok &= data[nc] >= s.alpha_threshold
        colour = data[:nc]
        if np.dtype(s.dtype).kind == 'f':
            ok &= np.all(np.isfinite(colour), axis=0)
        if not ok.any():
            continue
        colour = _to_uint8(colour, s.dtype, plan.stretch)
        if nc == 1:
            colour = np.repeat(colour, 3, axis=0)
        colour = np.moveaxis(colour, 0, -1)
        ys, xs = slice(r0 - row0, r1 - row0), slice(c0 - col0, c1 - col0)
        np.copyto(rgb[ys, xs], colour, where=ok[..., None])
        valid[ys, xs] |= ok
    out = []
    for j in range(ny):
        for i in range(nx):
            v = valid[j * ts:(j + 1) * ts, i * ts:(i + 1) * ts]
            if not v.any():
                continue
            tile = rgb[j * ts:(j + 1) * ts, i * ts:(i + 1) * ts]
            data = _encode(tile, None if v.all() else v, plan.fmt, plan.quality)
            out.append((gx0 + i, gy0 + j, data))
    return out


def _render_parents(batch):
    """Downsample children into parents; ``batch`` is ``[(x, y, [child bytes | None] * 4)]``."""
    from geozoom_ros.tiles.store import decode_tile_rgba

    plan = _WORKER['plan']
    ts = plan.tile_size
    out = []
    for x, y, kids in batch:
        rgb = np.zeros((2 * ts, 2 * ts, 3), np.uint8)
        weight = np.zeros((2 * ts, 2 * ts), np.uint8)
        for k, data in enumerate(kids):
            if data is None:
                continue
            decoded = decode_tile_rgba(data)
            if decoded is None:
                raise InputError(f'tile of zoom {plan.zoom} under {x}/{y} does not decode; '
                                 'delete the .partial file and build again')
            r, c = (k // 2) * ts, (k % 2) * ts
            kid_rgb, kid_alpha = decoded
            if kid_rgb.shape[:2] != (ts, ts):
                kid_rgb = cv2.resize(kid_rgb, (ts, ts), interpolation=cv2.INTER_AREA)
                if kid_alpha is not None:
                    kid_alpha = cv2.resize(kid_alpha, (ts, ts), interpolation=cv2.INTER_NEAREST)
            rgb[r:r + ts, c:c + ts] = kid_rgb
            weight[r:r + ts, c:c + ts] = 255 if kid_alpha is None else (kid_alpha >= 128) * 255
        if weight.min() == 255:
            small = cv2.resize(rgb, (ts, ts), interpolation=cv2.INTER_AREA)
            out.append((x, y, _encode(small, None, plan.fmt, plan.quality)))
            continue
        w = weight.astype(np.float32) / 255.0
        num = cv2.resize(rgb.astype(np.float32) * w[..., None], (ts, ts),
                         interpolation=cv2.INTER_AREA)
        den = cv2.resize(w, (ts, ts), interpolation=cv2.INTER_AREA)
        valid = den >= 0.25
        small = np.clip(num / np.maximum(den, 1e-6)[..., None] + 0.5, 0, 255).astype(np.uint8)
        if not valid.any():
            continue
        out.append((x, y, _encode(small, None if valid.all() else valid, plan.fmt,
                                  plan.quality)))
    return out


# --------------------------------------------------------------------------------------------
# The MBTiles file being built

_SCHEMA = """
CREATE TABLE IF NOT EXISTS metadata (name TEXT, value TEXT);
CREATE UNIQUE INDEX IF NOT EXISTS metadata_name ON metadata (name);
CREATE TABLE IF NOT EXISTS tiles (zoom_level INTEGER, tile_column INTEGER, tile_row INTEGER,
                                  tile_data BLOB);
CREATE UNIQUE INDEX IF NOT EXISTS tile_index ON tiles (zoom_level, tile_column, tile_row);
"""
_KEY_SETTINGS = 'geozoom_build_settings'
_KEY_CHUNK = 'geozoom_build_done_chunk:'  # one row per finished chunk: '...:cx,cy'
_KEY_ZOOMS = 'geozoom_build_done_zooms'


class _Partial:
    """The ``.partial`` MBTiles file: schema, tile writes and resumable progress."""

    def __init__(self, path, settings, say):
        self.path = pathlib.Path(path)
        self.done_chunks = set()
        self.done_zooms = set()
        if self.path.exists():
            if self._resumable(settings):
                say(f'resuming from {self.path}')
            else:
                say(f'discarding {self.path} (unreadable or built with other settings)')
                for suffix in ('', '-journal', '-wal', '-shm'):
                    p = pathlib.Path(str(self.path) + suffix)
                    if p.exists():
                        p.unlink()
        self.conn = sqlite3.connect(str(self.path))
        # WAL: a kill loses at most the uncommitted unit of work, with one fsync per
        # checkpoint rather than per commit; finish() turns it back into a single file.
        self.conn.execute('PRAGMA journal_mode=WAL')
        self.conn.execute('PRAGMA synchronous=NORMAL')
        self.conn.executescript(_SCHEMA)
        self._set(_KEY_SETTINGS, settings)
        self.conn.commit()

    def _resumable(self, settings):
        try:
            conn = sqlite3.connect(str(self.path))
            try:
                rows = dict(conn.execute('SELECT name, value FROM metadata'))
                conn.execute('SELECT count(*) FROM tiles').fetchone()
                ok = conn.execute('PRAGMA quick_check').fetchone()[0] == 'ok'
            finally:
                conn.close()
        except sqlite3.DatabaseError:
            return False
        if not ok or rows.get(_KEY_SETTINGS) != settings:
            return False
        self.done_chunks = {tuple(int(v) for v in k[len(_KEY_CHUNK):].split(','))
                            for k in rows if k.startswith(_KEY_CHUNK)}
        self.done_zooms = set(json.loads(rows.get(_KEY_ZOOMS, '[]')))
        return True

    def _set(self, name, value):
        self.conn.execute('INSERT OR REPLACE INTO metadata (name, value) VALUES (?, ?)',
                          (name, str(value)))

    def write_tiles(self, zoom, tiles):
        n = 1 << zoom
        self.conn.executemany(
            'INSERT OR REPLACE INTO tiles (zoom_level, tile_column, tile_row, tile_data) '
            'VALUES (?, ?, ?, ?)', ((zoom, x, n - 1 - y, sqlite3.Binary(d)) for x, y, d in tiles))

    def chunk_done(self, chunk):
        self.done_chunks.add(chunk)
        self._set(f'{_KEY_CHUNK}{chunk[0]},{chunk[1]}', 1)
        self.conn.commit()

    def zoom_done(self, zoom):
        self.done_zooms.add(zoom)
        self._set(_KEY_ZOOMS, json.dumps(sorted(self.done_zooms)))
        self.conn.commit()

    def tiles_at(self, zoom):
        n = 1 << zoom
        return {(x, n - 1 - r) for x, r in self.conn.execute(
            'SELECT tile_column, tile_row FROM tiles WHERE zoom_level=?', (zoom,))}

    def tile(self, zoom, x, y):
        row = self.conn.execute('SELECT tile_data FROM tiles WHERE zoom_level=? AND '
                                'tile_column=? AND tile_row=?',
                                (zoom, x, (1 << zoom) - 1 - y)).fetchone()
        return None if row is None else bytes(row[0])

    def finish(self, meta):
        self.conn.execute("DELETE FROM metadata WHERE name LIKE 'geozoom\\_build\\_%' "
                          "ESCAPE '\\'")
        for k, v in meta.items():
            self._set(k, v)
        self.conn.commit()
        self.conn.execute('PRAGMA journal_mode=DELETE')
        self.conn.close()

    def close(self):
        self.conn.close()


# --------------------------------------------------------------------------------------------
# The build

def _check_zoom(value, name):
    if value is None:
        return None
    if int(value) != value or not 0 <= value <= MAX_ZOOM_LIMIT:
        raise InputError(f'{name} {value} is out of range; use an integer in '
                         f'0..{MAX_ZOOM_LIMIT}')
    return int(value)


def _settings_json(sources, min_zoom, max_zoom, fmt, quality, tile_size):
    files = []
    for s in sources:
        st = os.stat(s.path)
        files.append([s.path, st.st_size, st.st_mtime_ns])
    return json.dumps({'inputs': files, 'min_zoom': min_zoom, 'max_zoom': max_zoom,
                       'format': fmt, 'quality': quality, 'tile_size': tile_size,
                       'chunk_tiles': CHUNK_TILES, 'version': __version__}, sort_keys=True)


class _Runner:
    """Runs tasks inline (one worker) or on a process pool, in submission windows."""

    def __init__(self, plan, workers):
        self.workers = workers
        self.pool = None
        if workers > 1:
            method = 'fork' if 'fork' in multiprocessing.get_all_start_methods() else None
            ctx = multiprocessing.get_context(method)
            self.pool = cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx,
                                               initializer=_init_worker, initargs=(plan, True))
        else:
            _init_worker(plan)

    def map(self, fn, items):
        """Yield ``(item, result)`` as results come in (order not kept with a pool)."""
        if self.pool is None:
            for item in items:
                yield item, fn(item)
            return
        items = iter(items)
        pending = {}
        window = 2 * self.workers + 2
        for item in items:
            pending[self.pool.submit(fn, item)] = item
            if len(pending) >= window:
                break
        while pending:
            done, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
            for fut in done:
                item = pending.pop(fut)
                yield item, fut.result()
                nxt = next(items, None)
                if nxt is not None:
                    pending[self.pool.submit(fn, nxt)] = nxt

    def close(self, cancel=False):
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=cancel)
        else:
            _close_worker()


def build_mbtiles(inputs, output, min_zoom=None, max_zoom=None, fmt='jpeg', quality=90,
                  workers=None, progress=True, tile_size=256, name=None, attribution='',
                  on_progress=None):
    """Build an MBTiles pyramid from GeoTIFF / COG files and return the output path.

    ``min_zoom``/``max_zoom`` default as the module docstring says; ``fmt`` is 'jpeg', 'png' or
    'webp'; ``quality`` 1..100 (JPEG, WebP); ``workers`` processes (default: all cores);
    ``tile_size`` pixels. ``on_progress(stage, done, total)`` is called after each committed
    unit of work. Raises InputError (one line, nothing written) for bad inputs or settings.
    """
    from tqdm import tqdm

    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    inputs = [str(p) for p in inputs]
    if not inputs:
        raise InputError('no input rasters given; pass one or more GeoTIFF files')
    output = pathlib.Path(output)
    fmt_key = str(fmt).lower()
    if fmt_key not in _FORMATS:
        raise InputError(f'format {fmt!r} is not supported; use jpeg, png or webp')
    fmt = _FORMATS[fmt_key]
    if int(quality) != quality or not 1 <= quality <= 100:
        raise InputError(f'quality {quality} is out of range; use 1..100')
    if tile_size not in (256, 512):
        raise InputError(f'tile size {tile_size} is not supported; use 256 or 512')
    min_zoom = _check_zoom(min_zoom, 'min zoom')
    max_zoom = _check_zoom(max_zoom, 'max zoom')
    if min_zoom is not None and max_zoom is not None and min_zoom > max_zoom:
        raise InputError(f'min zoom {min_zoom} is above max zoom {max_zoom}; swap them')
    if not output.parent.exists():
        raise InputError(f'{output}: its folder {output.parent} does not exist')
    if output.is_dir():
        raise InputError(f'{output}: is a directory; give an .mbtiles file name')
    for p in inputs:
        if os.path.abspath(p) == os.path.abspath(output):
            raise InputError(f'{output}: is also an input; choose another output name')

    sources = [inspect_input(p) for p in inputs]
    check_overlap(sources)
    west = min(s.bounds[0] for s in sources)
    south = min(s.bounds[1] for s in sources)
    east = max(s.bounds[2] for s in sources)
    north = max(s.bounds[3] for s in sources)
    bounds = (west, south, east, north)
    centre_lat = (south + north) / 2.0
    if max_zoom is None:
        gsd = min(s.gsd_m for s in sources)
        max_zoom = min(MAX_ZOOM_LIMIT, geo.zoom_for_resolution(gsd, centre_lat, tile_size))
        if min_zoom is not None and min_zoom > max_zoom:
            raise InputError(f'min zoom {min_zoom} is above the native max zoom {max_zoom} '
                             f'({gsd:.2f} m/px); lower it or pass --max-zoom')
    if min_zoom is None:
        min_zoom = default_min_zoom(bounds, max_zoom)
    for s in sources:
        s.tile_range = _tile_range(s.bounds, max_zoom)
    n_max = sum((s.tile_range[2] - s.tile_range[0]) * (s.tile_range[3] - s.tile_range[1])
                for s in sources)
    if n_max > MAX_TILES:
        raise InputError(f'max zoom {max_zoom} would need about {n_max:,} tiles (more than '
                         f'{MAX_TILES:,}); pass a lower --max-zoom')
    stretch = _robust_stretch(sources)
    plan = _Plan(sources=sources, zoom=max_zoom, fmt=fmt, quality=int(quality),
                 tile_size=tile_size, stretch=stretch)

    # Units of work at the max zoom: CHUNK_TILES x CHUNK_TILES tiles with their inputs.
    chunks = {}
    for index, s in enumerate(sources):
        tx0, ty0, tx1, ty1 = s.tile_range
        for cy in range(ty0 // CHUNK_TILES, (ty1 - 1) // CHUNK_TILES + 1):
            for cx in range(tx0 // CHUNK_TILES, (tx1 - 1) // CHUNK_TILES + 1):
                chunks.setdefault((cx, cy), []).append(index)

    def say(msg):
        if progress:
            print(msg, file=sys.stderr)

    partial_path = pathlib.Path(str(output) + '.partial')
    settings = _settings_json(sources, min_zoom, max_zoom, fmt, quality, tile_size)
    if workers is None:
        workers = (len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity')
                   else os.cpu_count() or 1)
    workers = int(workers)
    if workers < 1:
        raise InputError(f'workers {workers} must be at least 1')
    runner = _Runner(plan, workers)
    partial = None
    completed = False
    try:
        partial = _Partial(partial_path, settings, say)
        todo = [(cx, cy, ids) for (cx, cy), ids in sorted(chunks.items())
                if (cx, cy) not in partial.done_chunks]
        bar = tqdm(total=len(chunks), initial=len(chunks) - len(todo), unit='chunk',
                   desc=f'zoom {max_zoom}', disable=not progress, leave=False)
        done = len(chunks) - len(todo)
        with bar:
            for (cx, cy, _), tiles in runner.map(_render_chunk, todo):
                partial.write_tiles(max_zoom, tiles)
                partial.chunk_done((cx, cy))
                bar.update(1)
                done += 1
                if on_progress:
                    on_progress(f'zoom {max_zoom}', done, len(chunks))
        for z in range(max_zoom - 1, min_zoom - 1, -1):
            if z in partial.done_zooms:
                continue
            children = partial.tiles_at(z + 1)
            parents = sorted({(x >> 1, y >> 1) for x, y in children} - partial.tiles_at(z),
                             key=lambda t: (t[1], t[0]))
            batches = [parents[i:i + _PARENT_BATCH]
                       for i in range(0, len(parents), _PARENT_BATCH)]

            def tasks(batches=batches, z=z, children=children):
                for batch in batches:
                    yield [(x, y, [partial.tile(z + 1, 2 * x + dx, 2 * y + dy)
                                   if (2 * x + dx, 2 * y + dy) in children else None
                                   for dy in (0, 1) for dx in (0, 1)]) for x, y in batch]

            with tqdm(total=len(parents), unit='tile', desc=f'zoom {z}',
                      disable=not progress, leave=False) as bar:
                done = 0
                for batch, tiles in runner.map(_render_parents, tasks()):
                    partial.write_tiles(z, tiles)
                    partial.conn.commit()
                    bar.update(len(batch))
                    done += len(batch)
                    if on_progress:
                        on_progress(f'zoom {z}', done, len(parents))
            partial.zoom_done(z)
        counts = dict(partial.conn.execute(
            'SELECT zoom_level, count(*) FROM tiles GROUP BY zoom_level'))
        if not counts:
            partial.close()
            partial = None
            partial_path.unlink()
            raise InputError(f'{inputs[0]}: has no valid pixels (all nodata or transparent); '
                             'nothing to build')
        stem = output.name[:-len('.mbtiles')] if output.name.endswith('.mbtiles') else output.name
        meta = {
            'name': name or stem, 'format': fmt, 'type': 'baselayer', 'version': '1.1',
            'description': 'orthophoto pyramid built by geozoom tiles build from '
                           + ', '.join(os.path.basename(p) for p in inputs),
            'attribution': attribution or '',
            'bounds': ','.join(f'{v:.8f}' for v in bounds),
            'center': f'{(west + east) / 2.0:.8f},{centre_lat:.8f},'
                      f'{(min_zoom + max_zoom) // 2}',
            'minzoom': str(min_zoom), 'maxzoom': str(max_zoom),
            'tile_size': str(tile_size),
            'generator': f'geozoom_ros {__version__}',
            'geozoom_tile_counts': json.dumps({str(k): v for k, v in sorted(counts.items())}),
        }
        partial.finish(meta)
        partial = None
        os.replace(partial_path, output)
        completed = True
    except KeyboardInterrupt:
        say(f'interrupted; run the same command again to continue from {partial_path}')
        raise
    except GeoZoomError:
        # Bad input found while building: re-running cannot succeed, so leave nothing behind.
        if partial is not None:
            partial.close()
            partial = None
        for suffix in ('', '-journal', '-wal', '-shm'):
            p = pathlib.Path(str(partial_path) + suffix)
            if p.exists():
                p.unlink()
        raise
    finally:
        if partial is not None:
            partial.close()
        runner.close(cancel=not completed)
    total = sum(counts.values())
    say(f'{output}: {total} tiles, zooms {min_zoom}..{max_zoom}, {fmt}')
    return output
