"""Training data: worlds (a tile pyramid + a table of geotagged ground images), samples, views.

A *world* pairs one map (MBTiles file or XYZ folder) with one data source: an ``index.csv``
with a header holding at least ``path, lat, lon`` (optional ``heading_deg`` degrees clockwise
from north and ``split``; paths relative to the CSV's folder; other columns are ignored) or a
folder of JPEGs with EXIF GPS tags. Several worlds train together.

Bad rows (missing image, unreadable image, position outside the map, a row that does not parse,
a missing heading when the model needs one) are skipped and counted per reason; the counts and
the first few examples are reported, never fatal.

Each sample knows its zoom path: the root cell (at ``root_zoom``, one of the cells that
intersect the map's bounds), the actions to its terminal cell (``geo.path_to``) and every cell
on the way. Cell views are rendered from the tile store once and cached (many samples share
them); when a split column marks held-out rows, the children that hold held-out rows but no
training row are recorded per step so the loss can leave them out of the softmax.
"""

import csv
from dataclasses import dataclass, field
import math
from pathlib import Path
import threading

import mercantile
import numpy as np

from geozoom_ros import geo
from geozoom_ros.errors import InputError

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png')


@dataclass
class Sample:
    """One geotagged ground image and its zoom path (cells[0] = root, cells[-1] = terminal)."""

    world: int
    path: str
    lat: float
    lon: float
    heading: float
    split: str
    cells: tuple
    actions: tuple


@dataclass
class LoadReport:
    """What reading a data source found: row counts and skip reasons with examples."""

    source: str
    rows: int = 0
    kept: int = 0
    skipped: dict = field(default_factory=dict)
    examples: list = field(default_factory=list)

    def skip(self, reason, detail):
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        if len(self.examples) < 5:
            self.examples.append(f'{reason}: {detail}')

    @property
    def n_skipped(self):
        return sum(self.skipped.values())

    def summary(self):
        """Return a one-paragraph human-readable summary."""
        text = f'{self.source}: {self.kept} of {self.rows} rows usable'
        if self.skipped:
            parts = ', '.join(f'{n} {r}' for r, n in sorted(self.skipped.items()))
            text += f'; skipped {self.n_skipped} ({parts})'
            text += ''.join(f'\n  e.g. {e}' for e in self.examples)
        return text


#: The unshifted grid.
NO_SHIFT = (0, 0)


def _tile_lon(x, z):
    return x / 2.0 ** z * 360.0 - 180.0


def _tile_lat(y, z):
    return math.degrees(math.atan(math.sinh(math.pi * (1.0 - 2.0 * y / 2.0 ** z))))


def _tile_xy(lat, lon, z):
    n = 2.0 ** z
    s = math.sin(math.radians(lat))
    return (lon + 180.0) / 360.0 * n, (0.5 - math.log((1 + s) / (1 - s)) / (4 * math.pi)) * n


def shifted_bounds(cell, shift, shift_zoom):
    """Return ``(west, south, east, north)`` degrees of ``cell`` in a shifted grid.

    The grid is moved by ``shift`` = (sx, sy) whole cells of ``shift_zoom`` (east, south); a
    cell of that zoom or deeper stays a cell of the map's own grid.
    """
    if shift == NO_SHIFT:
        return geo.cell_bounds(cell)
    f = 2.0 ** (shift_zoom - cell.z)
    x0, y0 = cell.x + shift[0] / f, cell.y + shift[1] / f
    return (_tile_lon(x0, cell.z), _tile_lat(y0 + 1, cell.z), _tile_lon(x0 + 1, cell.z),
            _tile_lat(y0, cell.z))


def unshift(cell, shift, shift_zoom):
    """Return the map-grid cell that ``cell`` (zoom >= ``shift_zoom``) of a shifted grid is."""
    m = 2 ** (cell.z - shift_zoom)
    return geo.Cell(cell.x + shift[0] * m, cell.y + shift[1] * m, cell.z)


def square_id(cell, shift, shift_zoom):
    """Return a hashable identity of the square ``cell`` covers in a shifted grid.

    The map-grid cell where the square is one (no shift, or a zoom from ``shift_zoom`` down),
    else ``(cell, shift)``.
    """
    if shift == NO_SHIFT:
        return cell
    if cell.z >= shift_zoom:
        return unshift(cell, shift, shift_zoom)
    return (cell, shift)


def shifted_path(sample, shift, shift_zoom, root_zoom, steps, k):
    """Return ``(cells, actions)`` of a sample's zoom path in a shifted grid.

    Training on grids moved by random offsets shows the policy many more distinct coarse
    views than the map's one grid has (a 1 km city holds a handful of 400 m cells); it is
    meant to keep the policy from winning by recognising the few views that held training
    images (measured in the README: it did not help at the budgets tried).
    """
    if shift == NO_SHIFT:
        return sample.cells, sample.actions
    x, y = _tile_xy(sample.lat, sample.lon, shift_zoom)
    lat, lon = _tile_lat(y - shift[1], shift_zoom), _tile_lon(x - shift[0], shift_zoom)
    root = geo.cell_at(lat, lon, root_zoom)
    actions = tuple(geo.path_to(root, lat, lon, steps, k))
    cells = [root]
    for a in actions:
        cells.append(geo.child(cells[-1], a, k))
    return tuple(cells), actions


class World:
    """A map and its samples. ``store`` is a tile store (``tiles.store.open_store``).

    ``render_view(cell, size)`` and ``render_crop(lat, lon, side_m, size, heading_deg)`` return
    uint8 RGB arrays; they default to ``geozoom_ros.tiles.views`` over ``store``. Rendered views
    are cached (thread-safe) up to ``cache_mb`` megabytes.
    """

    def __init__(self, name, store, bounds, render_view=None, render_crop=None,
                 cache_mb=4096):
        self.name = name
        self.store = store
        self.bounds = tuple(float(b) for b in bounds)
        self._render_view = render_view
        self._render_crop = render_crop
        self.samples = []
        self._cache = {}
        self._cache_bytes = 0
        self._cache_limit = int(cache_mb * 1e6)
        self._lock = threading.Lock()
        self.heldout_only = {}

    def reopen(self):
        """Open this world's map again (a DataLoader worker must not share SQLite handles)."""
        if self._render_view is None and Path(self.name).exists():
            from geozoom_ros.tiles.store import open_store
            self.store = open_store(self.name)

    def roots(self, root_zoom):
        """Return the cells at ``root_zoom`` that intersect the map's bounds (west->east)."""
        w, s, e, n = self.bounds
        eps = 1e-9
        return [geo.Cell(*t) for t in mercantile.tiles(w + eps, s + eps, e - eps, n - eps,
                                                       [root_zoom])]

    def coverage(self, cell, shift=NO_SHIFT, shift_zoom=0):
        """Return the fraction (0..1, in degrees) of a cell inside the map's bounds.

        With ``shift`` the cell is the square of a shifted grid (see :func:`shifted_bounds`).
        """
        w, s, e, n = self.bounds
        cw, cs, ce, cn = shifted_bounds(cell, shift, shift_zoom)
        dx = min(e, ce) - max(w, cw)
        dy = min(n, cn) - max(s, cs)
        if dx <= 0 or dy <= 0:
            return 0.0
        return float(dx * dy / ((ce - cw) * (cn - cs)))

    def contains(self, lat, lon):
        """Return whether a point (degrees) lies inside the map's bounds."""
        w, s, e, n = self.bounds
        return w <= lon <= e and s <= lat <= n

    def _cached(self, key, render):
        with self._lock:
            img = self._cache.get(key)
        if img is None:
            img = np.ascontiguousarray(render())
            with self._lock:
                if self._cache_bytes + img.nbytes <= self._cache_limit:
                    self._cache[key] = img
                    self._cache_bytes += img.nbytes
        return img

    def view(self, cell, size):
        """Return the north-up view of ``cell`` (size x size x 3 uint8), cached."""
        def render():
            if self._render_view is not None:
                return self._render_view(cell, size)
            from geozoom_ros.tiles.views import render_view
            return render_view(self.store, cell, size).image
        return self._cached(('v', cell, size), render)

    def shifted_view(self, cell, shift, shift_zoom, size):
        """Return the north-up view of ``cell``'s square in a shifted grid, cached.

        At zooms from ``shift_zoom`` down the shifted square is a cell of the map's own grid
        (the shift is whole cells there); above it the square straddles cells and is rendered
        as a crop of the same ground size.
        """
        if shift == NO_SHIFT:
            return self.view(cell, size)
        if cell.z >= shift_zoom:
            return self.view(unshift(cell, shift, shift_zoom), size)
        f = 2.0 ** (shift_zoom - cell.z)
        lon = _tile_lon(cell.x + shift[0] / f + 0.5, cell.z)
        lat = _tile_lat(cell.y + shift[1] / f + 0.5, cell.z)
        side = geo.cell_size_m(geo.cell_at(lat, lon, cell.z))
        return self.crop(lat, lon, side, size, 0.0, key=('shift', cell, shift, shift_zoom))

    def crop(self, lat, lon, side_m, size, heading_deg=0.0, key=None):
        """Return a crop of ``side_m`` metres centred on (lat, lon), heading up; cached by key."""
        def render():
            if self._render_crop is not None:
                return self._render_crop(lat, lon, side_m, size, heading_deg)
            from geozoom_ros.tiles.views import render_crop
            return render_crop(self.store, lat, lon, side_m, size, heading_deg).image
        if key is None:
            return np.ascontiguousarray(render())
        return self._cached(('c', key, side_m, size), render)


def _float(value):
    v = float(value)
    if not math.isfinite(v):
        raise ValueError('not finite')
    return v


def read_table(data_path):
    """Return ``(rows, report)``: dicts with path, lat, lon, heading (nan if absent), split.

    ``data_path`` is an index.csv or a folder of JPEGs with EXIF GPS tags.
    """
    data_path = Path(data_path)
    if data_path.is_dir():
        return _read_exif_folder(data_path)
    if not data_path.is_file():
        raise InputError(f'{data_path}: no such data file or folder; pass an index.csv '
                         '(path, lat, lon[, heading_deg, split]) or a folder of geotagged JPEGs')
    report = LoadReport(str(data_path))
    rows = []
    try:
        with open(data_path, newline='') as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in (reader.fieldnames or [])]
            missing = {'path', 'lat', 'lon'} - set(header)
            if missing:
                raise InputError(f'{data_path}: header lacks column(s) '
                                 f'{", ".join(sorted(missing))}; the first line must name '
                                 'path, lat, lon[, heading_deg, split]')
            reader.fieldnames = header
            for i, rec in enumerate(reader, start=2):
                report.rows += 1
                try:
                    path = (rec.get('path') or '').strip()
                    if not path:
                        raise ValueError('empty path')
                    lat, lon = _float(rec['lat']), _float(rec['lon'])
                    head = (rec.get('heading_deg') or '').strip()
                    heading = _float(head) % 360.0 if head else float('nan')
                except (TypeError, ValueError, KeyError) as exc:
                    report.skip('unparsable row', f'line {i}: {exc}')
                    continue
                full = Path(path) if Path(path).is_absolute() else data_path.parent / path
                rows.append({'path': str(full), 'lat': lat, 'lon': lon, 'heading': heading,
                             'split': (rec.get('split') or '').strip(), 'line': i})
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f'{data_path}: cannot read the table ({exc}); pass a UTF-8 CSV') \
            from None
    return rows, report


def _exif_gps(path):
    from PIL import Image

    with Image.open(path) as img:
        gps = img.getexif().get_ifd(0x8825)
    if not gps or 2 not in gps or 4 not in gps:
        return None

    def dms(v):
        d, m, s = (float(x) for x in v)
        return d + m / 60.0 + s / 3600.0

    lat = dms(gps[2]) * (-1 if gps.get(1, 'N') in ('S', b'S') else 1)
    lon = dms(gps[4]) * (-1 if gps.get(3, 'E') in ('W', b'W') else 1)
    heading = float(gps[17]) % 360.0 if 17 in gps else float('nan')
    return lat, lon, heading


def _read_exif_folder(folder):
    report = LoadReport(str(folder))
    rows = []
    files = sorted(p for p in folder.rglob('*') if p.suffix.lower() in ('.jpg', '.jpeg'))
    if not files:
        raise InputError(f'{folder}: no .jpg files found; pass a folder of geotagged JPEGs or '
                         'an index.csv')
    for p in files:
        report.rows += 1
        try:
            gps = _exif_gps(p)
        except Exception as exc:  # noqa: B902 - PIL raises many types for broken files
            report.skip('unreadable image', f'{p}: {exc.__class__.__name__}')
            continue
        if gps is None:
            report.skip('no EXIF GPS', str(p))
            continue
        rows.append({'path': str(p), 'lat': gps[0], 'lon': gps[1], 'heading': gps[2],
                     'split': '', 'line': report.rows})
    return rows, report


def decode_image(path, size=None):
    """Return an RGB uint8 image (resized to ``size`` = (w, h) if given) or None if unreadable."""
    import cv2

    data = np.fromfile(path, dtype=np.uint8)
    img = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if img is None:
        return None
    img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    if size is not None and img.shape[1::-1] != tuple(size):
        interp = cv2.INTER_AREA if img.shape[1] > size[0] else cv2.INTER_LINEAR
        img = cv2.resize(img, tuple(int(s) for s in size), interpolation=interp)
    return img


def assign_splits(rows, train_split, val_split, val_frac, seed):
    """Give rows without a split ``train`` or ``val`` (a seeded draw of ``val_frac``)."""
    rng = np.random.default_rng(seed)
    draws = rng.random(len(rows))
    for r, u in zip(rows, draws):
        if not r['split']:
            r['split'] = val_split if u < val_frac else train_split


def load_world(map_path, data_path, config, train_cfg, world_index=0, store=None,
               render_view=None, render_crop=None, need_heading=False, check_images=True,
               progress=True):
    """Read one world: open its map, read its table, keep the rows that can train.

    Returns ``(world, report)``. ``store`` may be given (e.g. an in-memory store); otherwise
    ``map_path`` is opened with ``tiles.store.open_store``. ``check_images`` decodes every
    image once so an unreadable file is skipped here rather than failing mid-training.
    """
    if store is None:
        from geozoom_ros.tiles.store import open_store
        store = open_store(map_path)
    bounds = store.metadata.bounds
    world = World(str(map_path), store, bounds, render_view, render_crop)
    rows, report = read_table(data_path)
    assign_splits(rows, train_cfg.train_split, train_cfg.val_split, train_cfg.val_frac,
                  train_cfg.seed + world_index)
    roots = set(world.roots(config.root_zoom))
    it = rows
    if progress and check_images:
        from tqdm import tqdm
        it = tqdm(rows, desc=f'checking {Path(data_path).name}', unit='img', leave=False)
    for r in it:
        where = f'{data_path} line {r["line"]}' if Path(data_path).is_file() else r['path']
        if not world.contains(r['lat'], r['lon']):
            report.skip('outside the map', f'{where}: ({r["lat"]:.6f}, {r["lon"]:.6f})')
            continue
        root = geo.cell_at(r['lat'], r['lon'], config.root_zoom)
        if root not in roots:
            report.skip('outside the map', f'{where}: ({r["lat"]:.6f}, {r["lon"]:.6f})')
            continue
        if need_heading and not math.isfinite(r['heading']):
            report.skip('no heading', where)
            continue
        if not Path(r['path']).is_file():
            report.skip('missing image', r['path'])
            continue
        if check_images and decode_image(r['path']) is None:
            report.skip('unreadable image', r['path'])
            continue
        actions = tuple(geo.path_to(root, r['lat'], r['lon'], config.steps, config.grid_k))
        cells = [root]
        for a in actions:
            cells.append(geo.child(cells[-1], a, config.grid_k))
        world.samples.append(Sample(world_index, r['path'], r['lat'], r['lon'], r['heading'],
                                    r['split'], tuple(cells), actions))
        report.kept += 1
    _mark_heldout(world, train_cfg.train_split)
    return world, report


def _mark_heldout(world, train_split):
    """Record the cells (any level) holding held-out samples but no training sample."""
    train, held = set(), set()
    for s in world.samples:
        (train if s.split == train_split else held).update(s.cells[1:])
    world.heldout_only = held - train


def shifted_mask(world, cells, actions, shift, shift_zoom, k, min_coverage):
    """Return a bool array [T, k*k] for a match head's softmax on a (shifted) grid path.

    Children with less than ``min_coverage`` of their square on the map are left out, and so
    are map-grid children holding only held-out samples; the true child always competes.
    """
    t = len(actions)
    mask = np.ones((t, k * k), dtype=bool)
    for i in range(t):
        for a, c in enumerate(geo.children(cells[i], k)):
            if (shift == NO_SHIFT or c.z >= shift_zoom) \
                    and unshift(c, shift, shift_zoom) in world.heldout_only:
                mask[i, a] = False
            elif world.coverage(c, shift, shift_zoom) < min_coverage:
                mask[i, a] = False
        mask[i, actions[i]] = True
    return mask


def softmax_mask(sample, world, k):
    """Return a bool array [T, k*k]: True where a child may enter the training softmax."""
    t = len(sample.actions)
    mask = np.ones((t, k * k), dtype=bool)
    if world.heldout_only:
        for i in range(t):
            for a, c in enumerate(geo.children(sample.cells[i], k)):
                if c in world.heldout_only:
                    mask[i, a] = False
    return mask
