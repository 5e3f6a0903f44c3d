"""Read-only tile stores: MBTiles files and XYZ directories, optionally preloaded into memory.

Tiles are addressed in the XYZ scheme (``y`` grows southwards, as in :mod:`geozoom_ros.geo`);
the TMS row flip of MBTiles (``tile_row = 2**z - 1 - y``) is handled here and nowhere else.

A store is safe to read from several threads: an MBTiles file is opened read-only (a
``file:...?mode=ro`` URI) with one SQLite connection per thread, and the decoded-tile cache is
guarded by a lock. Decoded tiles are shared, read-only ``(H, W, 3)`` uint8 RGB arrays.
"""

import collections
import dataclasses
import json
import math
import os
import pathlib
import sqlite3
import threading

import cv2
import mercantile
import numpy as np

from geozoom_ros.errors import TileStoreError

#: Tile formats a store can hold, as the MBTiles ``format`` metadata spells them.
TILE_FORMATS = ('jpg', 'png', 'webp')
_FORMAT_ALIASES = {'jpg': 'jpg', 'jpeg': 'jpg', 'png': 'png', 'webp': 'webp'}
_EXTENSIONS = {'jpg': ('jpg', 'jpeg'), 'png': ('png',), 'webp': ('webp',)}
_SQLITE_MAGIC = b'SQLite format 3\x00'
_MISSING = object()


@dataclasses.dataclass(frozen=True)
class TileMetadata:
    """What a tile pyramid holds.

    ``bounds`` is ``(west, south, east, north)`` in degrees (WGS84), ``center`` is
    ``(lon, lat, zoom)`` as in the MBTiles specification, ``tile_size`` is the tile side in
    pixels and ``format`` one of :data:`TILE_FORMATS`.
    """

    name: str
    format: str
    bounds: tuple
    minzoom: int
    maxzoom: int
    tile_size: int = 256
    attribution: str = ''
    center: tuple = None


def normalise_format(fmt, source='format'):
    """Return the MBTiles spelling ('jpg', 'png', 'webp') of a tile format name.

    Raises TileStoreError naming ``source`` (a file or parameter) for any other format.
    """
    key = str(fmt or '').strip().lower()
    if key not in _FORMAT_ALIASES:
        raise TileStoreError(f'{source}: unsupported tile format {fmt!r}; '
                             'use jpeg, png or webp')
    return _FORMAT_ALIASES[key]


def sniff_format(data):
    """Return the tile format ('jpg', 'png', 'webp') of encoded tile bytes, or None."""
    if data[:3] == b'\xff\xd8\xff':
        return 'jpg'
    if data[:8] == b'\x89PNG\r\n\x1a\n':
        return 'png'
    if data[:4] == b'RIFF' and data[8:12] == b'WEBP':
        return 'webp'
    return None


def decode_tile_rgba(data):
    """Decode tile bytes into ``(rgb, alpha)``.

    ``rgb`` is an ``(H, W, 3)`` uint8 RGB array; ``alpha`` an ``(H, W)`` uint8 array, or None
    when the tile is opaque. Returns None when the bytes are not a decodable image.
    """
    buf = np.frombuffer(data, np.uint8)
    img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    if img is None:
        return None
    if img.dtype != np.uint8:  # 16-bit PNGs from other tools
        img = (img // 257).astype(np.uint8)
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2RGB), None
    if img.shape[2] == 4:
        alpha = np.ascontiguousarray(img[:, :, 3])
        rgb = cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)
        if alpha.min() == 255:
            alpha = None
        return rgb, alpha
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB), None


class TileStore:
    """Base class of the tile stores; use :func:`open_store` to get one.

    Subclasses provide ``_read(z, x, y) -> bytes | None``, ``_iter_keys()`` and ``_zooms()``.
    """

    def __init__(self, path, cache_tiles=256):
        self.path = pathlib.Path(path)
        self._cache_tiles = int(cache_tiles)
        self._cache = collections.OrderedDict()
        self._cache_lock = threading.Lock()
        self._memory = None
        self._zoom_list = None
        self.metadata = None

    # ---- subclass hooks
    def _read(self, z, x, y):
        raise NotImplementedError

    def _iter_items(self):
        """Yield ``(z, x, y, bytes)`` for every tile (XYZ scheme)."""
        raise NotImplementedError

    def _stored_zooms(self):
        raise NotImplementedError

    def _total_bytes(self):
        return sum(len(b) for _, _, _, b in self._iter_items())

    # ---- public API
    def zooms(self):
        """Return the sorted list of zoom levels that hold tiles."""
        if self._zoom_list is None:
            if self._memory is not None:
                self._zoom_list = sorted({k[0] for k in self._memory})
            else:
                self._zoom_list = sorted(self._stored_zooms())
        return list(self._zoom_list)

    def get_tile_bytes(self, z, x, y):
        """Return the encoded tile at XYZ ``(z, x, y)``, or None where there is none."""
        if self._memory is not None:
            return self._memory.get((z, x, y))
        return self._read(int(z), int(x), int(y))

    def get_tile_rgba(self, z, x, y):
        """Return ``(rgb, alpha)`` of a tile (see :func:`decode_tile_rgba`), or None.

        Decoded tiles are cached (LRU) and shared: the arrays are read-only.
        """
        key = (int(z), int(x), int(y))
        with self._cache_lock:
            hit = self._cache.get(key, _MISSING)
            if hit is not _MISSING:
                self._cache.move_to_end(key)
                return hit
        data = self.get_tile_bytes(*key)
        if data is None:
            value = None
        else:
            value = decode_tile_rgba(data)
            if value is None:
                raise TileStoreError(f'{self.path}: tile {key[0]}/{key[1]}/{key[2]} does not '
                                     'decode as an image; rebuild the map')
            for arr in value:
                if arr is not None:
                    arr.flags.writeable = False
        if self._cache_tiles > 0:
            with self._cache_lock:
                self._cache[key] = value
                self._cache.move_to_end(key)
                while len(self._cache) > self._cache_tiles:
                    self._cache.popitem(last=False)
        return value

    def get_tile(self, z, x, y):
        """Return the decoded tile as an ``(H, W, 3)`` uint8 RGB array (read-only), or None."""
        value = self.get_tile_rgba(z, x, y)
        return None if value is None else value[0]

    def tiles(self):
        """Yield ``(z, x, y, bytes)`` of every tile (XYZ scheme)."""
        if self._memory is not None:
            for (z, x, y), data in self._memory.items():
                yield z, x, y, data
        else:
            yield from self._iter_items()

    def count_tiles(self):
        """Return ``{zoom: number of tiles}``."""
        counts = collections.Counter()
        for z, _, _, _ in self.tiles():
            counts[z] += 1
        return dict(sorted(counts.items()))

    def tile_bytes(self):
        """Return the total size in bytes of all encoded tiles."""
        if self._memory is not None:
            return self.preloaded_bytes
        return self._total_bytes()

    @property
    def preloaded(self):
        """True when every tile is held in memory."""
        return self._memory is not None

    @property
    def preloaded_bytes(self):
        """Return the encoded bytes held in memory by a preloaded store (0 otherwise)."""
        if self._memory is None:
            return 0
        return sum(len(b) for b in self._memory.values())

    def preload(self, memory_budget_mb=2048):
        """Load every encoded tile into memory.

        Raises TileStoreError when the tiles need more than ``memory_budget_mb`` megabytes
        (10**6 bytes); nothing is kept in that case.
        """
        budget = float(memory_budget_mb) * 1e6
        total = self._total_bytes()
        if total > budget:
            raise TileStoreError(
                f'{self.path}: preloading needs {total / 1e6:.1f} MB of tiles, more than the '
                f'memory budget of {memory_budget_mb} MB; raise the budget or do not preload')
        memory = {}
        loaded = 0
        for z, x, y, data in self._iter_items():
            loaded += len(data)
            if loaded > budget:  # the store changed under us; stay within the promise
                raise TileStoreError(f'{self.path}: tiles exceed the memory budget of '
                                     f'{memory_budget_mb} MB while preloading')
            memory[(z, x, y)] = bytes(data)
        self._memory = memory
        self._zoom_list = None
        return self

    def clear_cache(self):
        """Drop every decoded tile from the cache."""
        with self._cache_lock:
            self._cache.clear()

    def close(self):
        """Release files and memory held by the store."""
        self._memory = None
        self.clear_cache()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f'{type(self).__name__}({str(self.path)!r})'

    # ---- helpers for subclasses
    def _finish_metadata(self, raw):
        """Build :class:`TileMetadata` from raw key/values, filling gaps from the tiles."""
        zooms = self.zooms()
        if not zooms:
            raise TileStoreError(f'{self.path}: holds no tiles; build it again')
        sample = None
        for z, x, y, data in self._first_tiles():
            sample = data
            break
        fmt_raw = raw.get('format') or (sniff_format(sample) if sample else None)
        fmt = normalise_format(fmt_raw, f'{self.path}')
        tile_size = 256
        if sample is not None:
            decoded = decode_tile_rgba(sample)
            if decoded is None:
                raise TileStoreError(f'{self.path}: its first tile does not decode as an image; '
                                     'the file is corrupt, rebuild it')
            tile_size = int(decoded[0].shape[1])
        minzoom = _int_or(raw.get('minzoom'), zooms[0])
        maxzoom = _int_or(raw.get('maxzoom'), zooms[-1])
        bounds = _floats(raw.get('bounds'), 4)
        if bounds is None:
            bounds = self._bounds_from_tiles(maxzoom if maxzoom in zooms else zooms[-1])
        center = _floats(raw.get('center'), 3)
        if center is None:
            center = ((bounds[0] + bounds[2]) / 2.0, (bounds[1] + bounds[3]) / 2.0,
                      (minzoom + maxzoom) // 2)
        return TileMetadata(
            name=str(raw.get('name') or self.path.stem), format=fmt, bounds=tuple(bounds),
            minzoom=minzoom, maxzoom=maxzoom, tile_size=tile_size,
            attribution=str(raw.get('attribution') or ''), center=tuple(center))

    def _first_tiles(self):
        return self._iter_items()

    def _bounds_from_tiles(self, zoom):
        xs, ys = [], []
        for z, x, y, _ in self._iter_items():
            if z == zoom:
                xs.append(x)
                ys.append(y)
        west, north = mercantile.ul(min(xs), min(ys), zoom)
        east, south = mercantile.ul(max(xs) + 1, max(ys) + 1, zoom)
        return west, south, east, north


def _int_or(value, default):
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return int(default)


def _floats(value, n):
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        parts = value
    else:
        parts = str(value).split(',')
    try:
        out = [float(v) for v in parts]
    except ValueError:
        return None
    if len(out) != n or not all(math.isfinite(v) for v in out):
        return None
    return out


class MBTilesStore(TileStore):
    """An MBTiles file opened read-only, one SQLite connection per thread."""

    def __init__(self, path, cache_tiles=256):
        super().__init__(path, cache_tiles)
        self._check_file()
        self._local = threading.local()
        self._conns = []
        self._conns_lock = threading.Lock()
        self._closed = False
        try:
            conn = self._conn()
            tables = {r[0] for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type IN ('table', 'view')")}
            missing = {'tiles', 'metadata'} - tables
            if missing:
                raise TileStoreError(f'{self.path}: not an MBTiles file (no '
                                     f'{" or ".join(sorted(missing))} table)')
            raw = dict(conn.execute('SELECT name, value FROM metadata').fetchall())
        except sqlite3.DatabaseError as exc:
            self.close()
            raise TileStoreError(f'{self.path}: not a readable MBTiles file ({exc}); '
                                 'rebuild it') from None
        except TileStoreError:
            self.close()
            raise
        try:
            self.metadata = self._finish_metadata(raw)
        except TileStoreError:
            self.close()
            raise

    def _check_file(self):
        if not self.path.is_file():
            raise TileStoreError(f'{self.path}: no such file')
        size = self.path.stat().st_size
        with open(self.path, 'rb') as f:
            header = f.read(100)
        if len(header) < 100 or not header.startswith(_SQLITE_MAGIC):
            raise TileStoreError(f'{self.path}: not an MBTiles (SQLite) file')
        page_size = int.from_bytes(header[16:18], 'big')
        page_size = 65536 if page_size == 1 else page_size
        pages = int.from_bytes(header[28:32], 'big')
        change = int.from_bytes(header[24:28], 'big')
        valid_for = int.from_bytes(header[92:96], 'big')
        # The header's page count is only trustworthy when written by the same transaction.
        if pages and change == valid_for and size < pages * page_size:
            raise TileStoreError(f'{self.path}: truncated ({size} of {pages * page_size} '
                                 'bytes); copy or build it again')

    def _conn(self):
        conn = getattr(self._local, 'conn', None)
        if conn is None:
            if self._closed:
                raise TileStoreError(f'{self.path}: store is closed')
            uri = self.path.resolve().as_uri() + '?mode=ro'
            try:
                conn = sqlite3.connect(uri, uri=True, check_same_thread=False)
            except sqlite3.Error as exc:
                raise TileStoreError(f'{self.path}: cannot open read-only ({exc})') from None
            self._local.conn = conn
            with self._conns_lock:
                self._conns.append(conn)
        return conn

    def _query(self, sql, args=()):
        try:
            return self._conn().execute(sql, args)
        except sqlite3.DatabaseError as exc:
            raise TileStoreError(f'{self.path}: read failed ({exc}); the file is corrupt, '
                                 'rebuild it') from None

    def _read(self, z, x, y):
        row = self._query('SELECT tile_data FROM tiles WHERE zoom_level=? AND tile_column=? '
                          'AND tile_row=?', (z, x, (1 << z) - 1 - y)).fetchone()
        return None if row is None else bytes(row[0])

    def _iter_items(self):
        try:
            cur = self._query('SELECT zoom_level, tile_column, tile_row, tile_data FROM tiles')
            for z, x, row, data in cur:
                yield z, x, (1 << z) - 1 - row, data
        except sqlite3.DatabaseError as exc:
            raise TileStoreError(f'{self.path}: read failed ({exc}); the file is corrupt, '
                                 'rebuild it') from None

    def _first_tiles(self):
        row = self._query('SELECT zoom_level, tile_column, tile_row, tile_data FROM tiles '
                          'LIMIT 1').fetchone()
        if row is not None:
            yield row[0], row[1], (1 << row[0]) - 1 - row[2], row[3]

    def _stored_zooms(self):
        return [r[0] for r in self._query('SELECT DISTINCT zoom_level FROM tiles')]

    def _bounds_from_tiles(self, zoom):
        x0, x1, r0, r1 = self._query(
            'SELECT min(tile_column), max(tile_column), min(tile_row), max(tile_row) '
            'FROM tiles WHERE zoom_level=?', (zoom,)).fetchone()
        n = 1 << zoom
        west, north = mercantile.ul(x0, n - 1 - r1, zoom)
        east, south = mercantile.ul(x1 + 1, n - r0, zoom)
        return west, south, east, north

    def _total_bytes(self):
        return int(self._query('SELECT coalesce(sum(length(tile_data)), 0) FROM tiles')
                   .fetchone()[0])

    def count_tiles(self):
        """Return ``{zoom: number of tiles}``."""
        if self._memory is not None:
            return super().count_tiles()
        return dict(self._query('SELECT zoom_level, count(*) FROM tiles GROUP BY zoom_level '
                                'ORDER BY zoom_level').fetchall())

    def recorded_counts(self):
        """Return ``{zoom: tiles}`` the builder recorded in the metadata, or None."""
        row = self._query("SELECT value FROM metadata WHERE name='geozoom_tile_counts'")
        row = row.fetchone()
        if row is None:
            return None
        try:
            return {int(k): int(v) for k, v in json.loads(row[0]).items()}
        except (ValueError, TypeError, AttributeError):
            return None

    def close(self):
        """Close every thread's connection and drop cached tiles."""
        super().close()
        self._closed = True
        with self._conns_lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            conn.close()
        self._local = threading.local()


class XYZStore(TileStore):
    """A directory of ``{z}/{x}/{y}.{ext}`` tiles (XYZ scheme).

    Metadata come from ``metadata.json`` in the directory (MBTiles keys, or TileJSON's
    ``minzoom``/``maxzoom``/``bounds``/``center``) when present, otherwise from the tiles.
    """

    def __init__(self, path, cache_tiles=256):
        super().__init__(path, cache_tiles)
        if not self.path.is_dir():
            raise TileStoreError(f'{self.path}: no such directory')
        self._index = self._scan()
        if not self._index:
            raise TileStoreError(f'{self.path}: no {{z}}/{{x}}/{{y}}.jpg|png|webp tiles found')
        exts = {p.suffix.lstrip('.').lower() for p in self._index.values()}
        fmts = {_FORMAT_ALIASES.get(e) for e in exts}
        if len(fmts) != 1:
            raise TileStoreError(f'{self.path}: tiles of several formats ({", ".join(exts)}); '
                                 'keep one format per pyramid')
        raw = {}
        meta_path = self.path / 'metadata.json'
        if meta_path.is_file():
            try:
                raw = json.loads(meta_path.read_text())
            except (ValueError, OSError) as exc:
                raise TileStoreError(f'{meta_path}: unreadable JSON ({exc})') from None
            if not isinstance(raw, dict):
                raise TileStoreError(f'{meta_path}: expected a JSON object')
        raw.setdefault('format', fmts.pop())
        self.metadata = self._finish_metadata(raw)

    def _scan(self):
        index = {}
        for zdir in self.path.iterdir():
            if not (zdir.is_dir() and zdir.name.isdigit()):
                continue
            z = int(zdir.name)
            for xdir in zdir.iterdir():
                if not (xdir.is_dir() and xdir.name.isdigit()):
                    continue
                x = int(xdir.name)
                for f in xdir.iterdir():
                    stem, _, ext = f.name.partition('.')
                    if stem.isdigit() and ext.lower() in _FORMAT_ALIASES:
                        index[(z, x, int(stem))] = f
        return index

    def _read(self, z, x, y):
        f = self._index.get((z, x, y))
        if f is None:
            return None
        try:
            return f.read_bytes()
        except OSError as exc:
            raise TileStoreError(f'{f}: cannot read tile ({exc})') from None

    def _iter_items(self):
        for (z, x, y) in sorted(self._index):
            yield z, x, y, self._read(z, x, y)

    def _stored_zooms(self):
        return {k[0] for k in self._index}

    def _total_bytes(self):
        return sum(p.stat().st_size for p in self._index.values())


def open_store(path, preload=False, memory_budget_mb=2048, cache_tiles=256):
    """Open a tile pyramid read-only: an MBTiles file or an XYZ ``{z}/{x}/{y}.{ext}`` directory.

    ``preload=True`` reads every encoded tile into memory (raising TileStoreError if they need
    more than ``memory_budget_mb`` megabytes); ``cache_tiles`` decoded tiles (about 192 KiB each
    at 256 px) are kept in a thread-safe LRU cache. Raises TileStoreError, naming the file, for
    a missing, corrupt, truncated or non-MBTiles file or an unsupported tile format.
    """
    path = pathlib.Path(os.fspath(path))
    if not path.exists():
        raise TileStoreError(f'{path}: no such file or directory')
    store = XYZStore(path, cache_tiles) if path.is_dir() else MBTilesStore(path, cache_tiles)
    if preload:
        try:
            store.preload(memory_budget_mb)
        except TileStoreError:
            store.close()
            raise
    return store


def _tile_range_ll(bounds, zoom, inset_deg):
    west, south, east, north = bounds
    west, east = west + inset_deg, east - inset_deg
    south, north = south + inset_deg, north - inset_deg
    if west >= east or south >= north:
        return None
    south, north = max(south, -85.0511), min(north, 85.0511)
    ul = mercantile.tile(west, north, zoom)
    lr = mercantile.tile(east, south, zoom)
    return ul.x, ul.y, lr.x, lr.y


def verify_pyramid(store, progress=False):
    """Check a pyramid and return a list of one-line problems (empty when it is sound).

    Checks that every tile decodes to one tile size, every zoom from minzoom to maxzoom holds
    tiles and no other zoom does, each zoom's tiles span the metadata bounds (to about a
    pixel) and no more, every tile below the top zoom has its parent and every tile above the
    bottom zoom has at least one child, and the tile counts recorded at build time (when
    present) match.
    """
    from tqdm import tqdm

    meta = store.metadata
    problems = []
    keys = collections.defaultdict(set)
    sizes = set()
    total = sum(store.count_tiles().values())
    for z, x, y, data in tqdm(store.tiles(), total=total, unit='tile', desc='decoding',
                              disable=not progress, leave=False):
        decoded = decode_tile_rgba(data) if data else None
        if decoded is None:
            problems.append(f'tile {z}/{x}/{y} does not decode as an image')
            continue
        h, w = decoded[0].shape[:2]
        if h != w or h != meta.tile_size:
            sizes.add((w, h))
        keys[z].add((x, y))
    if sizes:
        problems.append(f'tiles of size {sorted(sizes)[0]} px among {meta.tile_size} px tiles')
    for z in range(meta.minzoom, meta.maxzoom + 1):
        if not keys.get(z):
            problems.append(f'zoom {z} has no tiles (metadata says {meta.minzoom}..'
                            f'{meta.maxzoom})')
    for z in sorted(keys):
        if not meta.minzoom <= z <= meta.maxzoom:
            problems.append(f'zoom {z} holds tiles outside minzoom..maxzoom '
                            f'({meta.minzoom}..{meta.maxzoom})')
    for z in sorted(keys):
        xs = [k[0] for k in keys[z]]
        ys = [k[1] for k in keys[z]]
        px_deg = 360.0 / (meta.tile_size * (1 << z))
        inner = _tile_range_ll(meta.bounds, z, 1.5 * px_deg)
        outer = _tile_range_ll(meta.bounds, z, -1.5 * px_deg)
        have = (min(xs), min(ys), max(xs), max(ys))
        if inner and (have[0] > inner[0] or have[1] > inner[1] or have[2] < inner[2]
                      or have[3] < inner[3]):
            problems.append(f'zoom {z}: tiles x {have[0]}..{have[2]}, y {have[1]}..{have[3]} '
                            f'do not reach the bounds (x {inner[0]}..{inner[2]}, '
                            f'y {inner[1]}..{inner[3]})')
        if outer and (have[0] < outer[0] or have[1] < outer[1] or have[2] > outer[2]
                      or have[3] > outer[3]):
            problems.append(f'zoom {z}: tiles x {have[0]}..{have[2]}, y {have[1]}..{have[3]} '
                            'lie outside the bounds')
        if z - 1 in keys:
            orphans = [k for k in keys[z] if (k[0] >> 1, k[1] >> 1) not in keys[z - 1]]
            if orphans:
                x, y = orphans[0]
                problems.append(f'zoom {z - 1}: {len(orphans)} tiles have no parent (e.g. '
                                f'{z}/{x}/{y}): overviews are incomplete')
        if z + 1 in keys:
            parents = {(x >> 1, y >> 1) for x, y in keys[z + 1]}
            barren = keys[z] - parents
            if barren:
                x, y = sorted(barren)[0]
                problems.append(f'zoom {z + 1}: tiles missing under {len(barren)} tiles of '
                                f'zoom {z} (e.g. {z}/{x}/{y})')
    recorded = getattr(store, 'recorded_counts', lambda: None)()
    if recorded:
        for z, n in sorted(recorded.items()):
            if len(keys.get(z, ())) != n:
                problems.append(f'zoom {z} has {len(keys.get(z, ()))} tiles; the build wrote {n}')
    return problems
