"""Map bundles: the policy's map-view tokens, encoded once per map and model.

The satellite views the policy looks at do not depend on the query, so every view it can visit
is encoded offline into a bundle directory::

    BUNDLE/manifest.json        what the bundle holds and what it was built from (JSON)
    BUNDLE/tokens.f16.npy       float16 [N, D] policy tokens, memory-mapped at load
    BUNDLE/coverage.f16.npy     float16 [N] imagery coverage fraction of each token's view
    BUNDLE/keys.f16.npy         float16 [M, K] match keys, for a policy whose action head is
                                'match': a unit key per cell of every level (the terminal
                                level too), compared with the decoder's query
    BUNDLE/retrieval.f16.npy    optional float16 [M, E] retrieval-baseline embeddings
    BUNDLE/retrieval_heading.f16.npy  optional float16 [8, T, E]: terminal cells' crops rotated
                                to 8 headings, for heading-aligned retrieval models

Levels are numbered from the roots (level 0, zoom ``root_zoom``) down to the terminal level
``steps`` (zoom ``root_zoom + steps * log2(k)``). Tokens exist for levels ``0 .. steps - 1``:
the views the decoder consumes. At each level the bundle covers the rectangle of cells
(``x0 .. x0 + nx - 1``, ``y0 .. y0 + ny - 1``) that intersect the map's bounds, so a cell's row
is computed, not looked up: ``row = offset[level] + (y - y0) * nx + (x - x0)``. Arrays with
a row for every level (keys, retrieval) use ``retrieval_offset`` in place of ``offset``. Cells
outside that rectangle hold no imagery and are never visited by the search.

Nothing here imports torch: building a bundle imports the torch backend inside
:func:`build_bundle`; loading one needs only numpy.
"""

from dataclasses import dataclass
import datetime
import hashlib
import json
import math
import os
from pathlib import Path
import shutil

import numpy as np

from geozoom_ros import __version__
from geozoom_ros.errors import InputError, MismatchError
from geozoom_ros.geo import Cell, cell_center, cell_size_m, grid_levels, MAX_LAT

FORMAT = 'geozoom-bundle'
FORMAT_VERSION = 1
MANIFEST = 'manifest.json'
TOKENS_FILE = 'tokens.f16.npy'
COVERAGE_FILE = 'coverage.f16.npy'
RETRIEVAL_FILE = 'retrieval.f16.npy'
KEYS_FILE = 'keys.f16.npy'
RETRIEVAL_HEADING_FILE = 'retrieval_heading.f16.npy'
#: Views with less imagery coverage than this are treated as holding none.
MIN_COVERAGE = 1e-3
#: Headings (evenly spaced from north) at which heading-aligned retrieval crops are stored.
HEADING_BINS = 8


# --------------------------------------------------------------------------------------------
# Layout: which cells a bundle holds and where

@dataclass(frozen=True)
class Level:
    """One zoom level of a bundle: a rectangle of cells and its first row in the arrays.

    ``offset`` is the first token row (-1 for the terminal level, which has no tokens);
    ``retrieval_offset`` the first row in the retrieval embeddings.
    """

    index: int
    zoom: int
    x0: int
    y0: int
    nx: int
    ny: int
    offset: int
    retrieval_offset: int

    @property
    def count(self):
        """Number of cells at this level."""
        return self.nx * self.ny

    def inside(self, x, y):
        """Return a bool array: which cells (x, y) (arrays, this zoom) the level holds."""
        x = np.asarray(x, dtype=np.int64)
        y = np.asarray(y, dtype=np.int64)
        return (x >= self.x0) & (x < self.x0 + self.nx) & (y >= self.y0) & (y < self.y0 + self.ny)

    def local_index(self, x, y):
        """Return ``(index within the level, valid)`` for cell coordinate arrays.

        Invalid cells get index 0 so that the result can index arrays safely; use ``valid``.
        """
        x = np.asarray(x, dtype=np.int64)
        y = np.asarray(y, dtype=np.int64)
        valid = self.inside(x, y)
        idx = np.where(valid, (y - self.y0) * self.nx + (x - self.x0), 0)
        return idx, valid

    def cell_arrays(self):
        """Return ``(x, y)`` int64 arrays of every cell of the level in row order."""
        ys, xs = np.divmod(np.arange(self.count, dtype=np.int64), self.nx)
        return xs + self.x0, ys + self.y0

    def cells(self):
        """Return the level's cells in row order."""
        xs, ys = self.cell_arrays()
        return [Cell(int(x), int(y), self.zoom) for x, y in zip(xs, ys)]

    def to_json(self):
        return {'level': self.index, 'zoom': self.zoom, 'x0': self.x0, 'y0': self.y0,
                'nx': self.nx, 'ny': self.ny, 'cells': self.count,
                'token_offset': self.offset if self.offset >= 0 else None,
                'retrieval_offset': self.retrieval_offset}

    @classmethod
    def from_json(cls, d):
        off = d['token_offset']
        return cls(int(d['level']), int(d['zoom']), int(d['x0']), int(d['y0']), int(d['nx']),
                   int(d['ny']), -1 if off is None else int(off), int(d['retrieval_offset']))


def tile_range(bounds, zoom):
    """Return ``(x0, y0, x1, y1)`` (inclusive) of the cells at ``zoom`` intersecting bounds.

    ``bounds`` is ``(west, south, east, north)`` in degrees. Edges that fall exactly on a cell
    border do not pull in the neighbouring cell.
    """
    west, south, east, north = (float(v) for v in bounds)
    n = 2 ** zoom

    def fx(lon):
        return (lon + 180.0) / 360.0 * n

    def fy(lat):
        lat = max(-MAX_LAT, min(MAX_LAT, lat))
        s = math.sin(math.radians(lat))
        return (0.5 - math.log((1 + s) / (1 - s)) / (4 * math.pi)) * n

    eps = 1e-9
    x0 = int(math.floor(fx(west) + eps))
    x1 = int(math.ceil(fx(east) - eps)) - 1
    y0 = int(math.floor(fy(north) + eps))
    y1 = int(math.ceil(fy(south) - eps)) - 1
    x0, y0 = max(0, x0), max(0, y0)
    x1, y1 = min(n - 1, max(x0, x1)), min(n - 1, max(y0, y1))
    return x0, y0, x1, y1


def make_levels(bounds, root_zoom, k, steps):
    """Return the :class:`Level` list (levels ``0 .. steps``) covering ``bounds``."""
    j = grid_levels(k)
    if steps < 1:
        raise InputError(f'steps={steps}: a zoom policy needs at least one step')
    west, south, east, north = bounds
    if not (west < east and south < north):
        raise InputError(f'map bounds {tuple(bounds)} are empty; the map covers no area')
    levels = []
    offset = 0
    roffset = 0
    for i in range(steps + 1):
        zoom = root_zoom + i * j
        x0, y0, x1, y1 = tile_range(bounds, zoom)
        nx, ny = x1 - x0 + 1, y1 - y0 + 1
        tok = offset if i < steps else -1
        levels.append(Level(i, zoom, x0, y0, nx, ny, tok, roffset))
        if i < steps:
            offset += nx * ny
        roffset += nx * ny
    return levels


def bounds_area_m2(bounds):
    """Return the ground area in m^2 of a (west, south, east, north) box in degrees."""
    west, south, east, north = bounds
    r = 6371008.8
    return abs(math.radians(east - west)) * r * r * abs(
        math.sin(math.radians(north)) - math.sin(math.radians(south)))


# --------------------------------------------------------------------------------------------
# Loading

class Bundle:
    """A loaded map bundle (read-only, tokens memory-mapped).

    Attributes:
        path: the bundle directory.
        manifest: the parsed ``manifest.json``.
        k, steps, root_zoom, embed_dim: the policy geometry the bundle was built for.
        levels: list of :class:`Level` (0 = roots .. ``steps`` = terminal cells).
        roots: list of root cells.
        tokens: float16 ``[N, D]`` memory map.
        coverage: float16 ``[N]`` imagery coverage of each token's view (0..1).
        retrieval: float16 ``[M, E]`` retrieval embeddings of every level's cells, or None.
        keys: float16 ``[M, K]`` match keys of every level's cells (match-head policies), or
            None.
        retrieval_heading: float16 ``[bins, T, E]`` terminal-cell embeddings of crops rotated
            to ``bins`` evenly spaced headings (heading-aligned retrieval models), or None.
        model_hash: the hash of the model the tokens were made with.
    """

    def __init__(self, path, manifest, tokens, coverage=None, retrieval=None, keys=None):
        self.path = Path(path)
        self.manifest = manifest
        self.k = int(manifest['grid_k'])
        self.steps = int(manifest['steps'])
        self.root_zoom = int(manifest['root_zoom'])
        self.embed_dim = int(manifest['embed_dim'])
        self.levels = [Level.from_json(d) for d in manifest['levels']]
        self.roots = [Cell(int(x), int(y), int(z)) for x, y, z in manifest['roots']]
        #: Index in ``roots`` of each root, by ``(x, y)``.
        self.root_index = {(r.x, r.y): i for i, r in enumerate(self.roots)}
        self.bounds = tuple(float(v) for v in manifest['map']['bounds'])
        self.model_hash = manifest['model']['hash']
        self.tokens = tokens
        self.coverage = coverage
        self.retrieval = retrieval
        self.keys = keys
        self.retrieval_heading = None
        self._zoom_to_level = {lv.zoom: lv for lv in self.levels}
        self._imagery = {}
        #: Arrays derived from the bundle by its users, computed once (e.g. the search
        #: graphs' level geometry).
        self.derived = {}

    @property
    def terminal(self):
        """The terminal :class:`Level`."""
        return self.levels[-1]

    @property
    def retrieval_model_hash(self):
        """Hash of the retrieval model of the embeddings, or None."""
        r = self.manifest.get('retrieval')
        return r['model_hash'] if r else None

    @property
    def area_m2(self):
        """Ground area of the map's bounds in m^2."""
        return bounds_area_m2(self.bounds)

    def level_of(self, cell):
        """Return the :class:`Level` at ``cell``'s zoom; InputError if no level has it."""
        lv = self._zoom_to_level.get(cell.z)
        if lv is None:
            raise InputError(f'cell {tuple(cell)} is at zoom {cell.z}; bundle {self.path} holds '
                             f'zooms {sorted(self._zoom_to_level)}')
        return lv

    def contains(self, cell):
        """Return True if the bundle holds ``cell`` (at any level, terminal included)."""
        lv = self._zoom_to_level.get(cell.z)
        return bool(lv is not None and lv.inside(cell.x, cell.y))

    def token_rows(self, level, x, y):
        """Return ``(rows, valid)`` token rows of cells (x, y arrays) at a level index."""
        lv = self.levels[level]
        if lv.offset < 0:
            raise InputError(f'level {level} (zoom {lv.zoom}) is terminal and holds no tokens')
        idx, valid = lv.local_index(x, y)
        return idx + lv.offset, valid

    def usable_children(self, level, x, y):
        """Return ``(index within the level, usable)`` of cells (x, y int arrays) at a level.

        A cell is usable when the level holds it and, above the terminal level, its view has
        imagery (coverage >= MIN_COVERAGE): the search and the evaluation never pick others.
        Unusable cells get index 0, so the index can address arrays safely.
        """
        idx, ok = self.levels[level].local_index(x, y)
        has = self._has_imagery(level)
        if has is not None:
            ok &= has[idx]
        return idx, ok

    def imagery_table(self):
        """Return ``(usable, offsets)``: the imagery masks of the token levels below the roots.

        ``usable`` is one bool array over the cells of levels 1 .. steps - 1, one level after
        another (row order within a level); ``offsets[level]`` is where a level starts. Cached.
        """
        if 'table' not in self._imagery:
            parts, offsets, n = [], {}, 0
            for level in range(1, self.steps):
                has = self._has_imagery(level)
                if has is None:
                    has = np.ones(self.levels[level].count, bool)
                offsets[level] = n
                parts.append(has)
                n += len(has)
            usable = np.concatenate(parts) if parts else np.ones(1, bool)
            self._imagery['table'] = (usable, offsets)
        return self._imagery['table']

    def _has_imagery(self, level):
        """Return a cached bool array over a level's cells (None: terminal or no coverage)."""
        if level not in self._imagery:
            lv = self.levels[level]
            has = None
            if lv.offset >= 0 and self.coverage is not None:
                cov = np.asarray(self.coverage[lv.offset:lv.offset + lv.count], np.float32)
                has = cov >= MIN_COVERAGE
            self._imagery[level] = has
        return self._imagery[level]

    def row_of(self, cell):
        """Return the token row of a cell; InputError if the bundle has no token for it."""
        lv = self.level_of(cell)
        if lv.offset < 0 or not lv.inside(cell.x, cell.y):
            raise InputError(f'cell {tuple(cell)} has no token in bundle {self.path}; it lies '
                             'outside the map or at the terminal level')
        return int(lv.offset + (cell.y - lv.y0) * lv.nx + (cell.x - lv.x0))

    def token(self, cell):
        """Return the float32 ``[D]`` token of a cell."""
        return np.asarray(self.tokens[self.row_of(cell)], dtype=np.float32)

    def tokens_for(self, cells):
        """Return the float32 ``[N, D]`` tokens of a list of cells."""
        rows = np.array([self.row_of(c) for c in cells], dtype=np.int64)
        return np.asarray(self.tokens[rows], dtype=np.float32).reshape(len(rows), -1)

    def key_rows(self, level, x, y):
        """Return ``(rows, valid)`` rows in :attr:`keys` of cells (x, y arrays) at a level."""
        if self.keys is None:
            raise InputError(f'bundle {self.path} has no match keys; rebuild it with geozoom '
                             'index for a model whose action head is match')
        return self._all_level_rows(level, x, y)

    def retrieval_rows(self, level, x, y):
        """Return ``(rows, valid)`` rows in :attr:`retrieval` of cells at a level index."""
        self.check_retrieval_model()
        return self._all_level_rows(level, x, y)

    def check_retrieval_model(self, model_hash=None, model_path='RETRIEVAL_MODEL'):
        """Raise unless the bundle holds retrieval embeddings (of this model, given a hash).

        InputError without any; MismatchError for another model's. ``model_path`` names the
        model in the one-line message.
        """
        if self.retrieval is None:
            raise InputError(f'bundle {self.path} has no retrieval embeddings; rebuild it with '
                             f'geozoom index ... --with-retrieval {model_path}')
        if model_hash is not None and self.retrieval_model_hash != model_hash:
            raise MismatchError(
                f'bundle {self.path} holds retrieval embeddings of model '
                f'{str(self.retrieval_model_hash)[:8]}, not {model_hash[:8]} ({model_path}); '
                f'rebuild it with geozoom index ... --with-retrieval {model_path}')

    def terminal_retrieval(self, heading_deg=None):
        """Return float16 ``[T, E]`` retrieval embeddings of the terminal cells (row order).

        With a camera heading and heading-aligned embeddings (:attr:`retrieval_heading`), the
        bin nearest the heading; otherwise the north-up crops'. Raises InputError without
        retrieval embeddings.
        """
        self.check_retrieval_model()
        b = self.heading_bin(heading_deg)
        if b is not None:
            return self.retrieval_heading[b]
        term = self.terminal
        return self.retrieval[term.retrieval_offset:term.retrieval_offset + term.count]

    def heading_bin(self, heading_deg):
        """Return the heading-aligned retrieval bin nearest ``heading_deg``, or None.

        None when the bundle holds no heading-aligned embeddings or the heading is unknown.
        """
        rh = self.retrieval_heading
        if rh is None or heading_deg is None or not math.isfinite(heading_deg):
            return None
        bins = rh.shape[0]
        return int(round(heading_deg / (360.0 / bins))) % bins

    def _all_level_rows(self, level, x, y):
        """Rows of cells at a level in the arrays with a row for every level's cells."""
        lv = self.levels[level]
        idx, valid = lv.local_index(x, y)
        return idx + lv.retrieval_offset, valid

    def check_model(self, backend_or_hash):
        """Raise MismatchError unless the bundle was built for this backend / model hash."""
        if backend_or_hash is None:
            return
        want = backend_or_hash if isinstance(backend_or_hash, str) else \
            backend_or_hash.model_hash
        # A model with the same map side (e.g. a distilled decoder) makes the same bundle.
        same_map = getattr(backend_or_hash, 'map_hash', None)
        same_map = same_map is not None and same_map == self.manifest['model'].get('map_hash')
        if want != self.model_hash and not same_map:
            m = self.manifest
            raise MismatchError(
                f'bundle {self.path} was built for model {self.model_hash[:8]}, not '
                f'{str(want)[:8]}; rebuild it with geozoom index --map '
                f'{m["map"].get("path", "MAP.mbtiles")} --model MODEL -o {self.path}')
        cfg = getattr(backend_or_hash, 'config', None)
        if getattr(cfg, 'action_head', 'linear') == 'match' and self.keys is None:
            raise MismatchError(f'bundle {self.path} has no match keys, which this model\'s '
                                'match head needs; rebuild it with geozoom index')
        if cfg is not None:
            for key in ('grid_k', 'steps', 'root_zoom', 'embed_dim'):
                value = getattr(cfg, key, None)
                have = self.manifest[key]
                if value is not None and int(value) != int(have):
                    raise MismatchError(f'bundle {self.path} has {key}={have} but the model has '
                                        f'{key}={value}; rebuild the bundle with geozoom index')

    def __repr__(self):
        return (f'Bundle({str(self.path)!r}, roots={len(self.roots)}, tokens={len(self.tokens)}, '
                f'model={self.model_hash[:8]})')


def _read_manifest(path):
    mpath = path / MANIFEST
    if not path.is_dir():
        raise InputError(f'map bundle {path} does not exist or is not a directory; build it '
                         'with geozoom index --map MAP.mbtiles --model MODEL -o BUNDLE')
    if not mpath.is_file():
        raise InputError(f'{path} is not a map bundle ({MANIFEST} is missing); build one with '
                         'geozoom index')
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f'{mpath} is not readable JSON ({exc}); rebuild the bundle with '
                         'geozoom index') from None
    if not isinstance(manifest, dict) or manifest.get('format') != FORMAT:
        raise InputError(f'{mpath} is not a geozoom map bundle manifest; rebuild the bundle '
                         'with geozoom index')
    if int(manifest.get('format_version', 0)) > FORMAT_VERSION:
        raise InputError(f'bundle {path} has format version {manifest.get("format_version")}, '
                         f'newer than this package reads ({FORMAT_VERSION}); update geozoom_ros')
    required = ('grid_k', 'steps', 'root_zoom', 'embed_dim', 'levels', 'roots', 'map', 'model',
                'num_tokens')
    missing = [key for key in required if key not in manifest]
    if missing:
        raise InputError(f'{mpath} lacks {", ".join(missing)}; rebuild the bundle with '
                         'geozoom index')
    return manifest


def _open_array(path, shape, what):
    if not path.is_file():
        raise InputError(f'{path} is missing; rebuild the bundle with geozoom index')
    try:
        array = np.load(path, mmap_mode='r', allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InputError(f'{path} is not a readable .npy array ({exc}); rebuild the bundle '
                         'with geozoom index') from None
    if array.dtype != np.float16 or tuple(array.shape) != tuple(shape):
        raise InputError(f'{path} holds {array.dtype} {tuple(array.shape)}, the manifest says '
                         f'float16 {tuple(shape)}: the bundle is corrupt; rebuild it with '
                         'geozoom index')
    return array


def load_bundle(path, backend_or_model_hash=None):
    """Open a map bundle; check it belongs to a model if a backend or model hash is given.

    Returns a :class:`Bundle` whose arrays are memory-mapped (nothing large is read). Raises
    InputError for a missing or corrupt bundle and MismatchError when it was built for another
    model.
    """
    path = Path(path)
    manifest = _read_manifest(path)
    n, d = int(manifest['num_tokens']), int(manifest['embed_dim'])
    tokens = _open_array(path / TOKENS_FILE, (n, d), 'tokens')
    coverage = None
    if (path / COVERAGE_FILE).is_file():
        coverage = _open_array(path / COVERAGE_FILE, (n,), 'coverage')
    retrieval = heading = None
    if manifest.get('retrieval'):
        r = manifest['retrieval']
        retrieval = _open_array(path / RETRIEVAL_FILE, tuple(r['shape']), 'retrieval')
        if r.get('heading_bins'):
            term = manifest['levels'][-1]['cells']
            heading = _open_array(path / RETRIEVAL_HEADING_FILE,
                                  (int(r['heading_bins']), term, r['shape'][1]), 'retrieval')
    keys = None
    if manifest.get('keys'):
        keys = _open_array(path / KEYS_FILE, tuple(manifest['keys']['shape']), 'keys')
    bundle = Bundle(path, manifest, tokens, coverage, retrieval, keys)
    bundle.retrieval_heading = heading
    bundle.check_model(backend_or_model_hash)
    return bundle


# --------------------------------------------------------------------------------------------
# Writing

def file_sha256(path, chunk=1 << 20):
    """Return the sha256 hex digest of a file, or of a folder's files (names and contents)."""
    path = Path(path)
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob('*') if p.is_file()) if path.is_dir() else [path]
    for fp in files:
        if path.is_dir():
            h.update(str(fp.relative_to(path)).encode() + b'\0')
        with open(fp, 'rb') as f:
            for block in iter(lambda: f.read(chunk), b''):
                h.update(block)
    return h.hexdigest()


def _tmp_sibling(out_dir, tag):
    return out_dir.parent / f'.{out_dir.name}.{tag}-{os.getpid()}'


def _install_dir(tmp, out_dir):
    """Move a finished bundle directory into place, replacing an older bundle atomically."""
    old = None
    if out_dir.exists():
        old = _tmp_sibling(out_dir, 'old')
        os.replace(out_dir, old)
    try:
        os.replace(tmp, out_dir)
    except OSError:
        if old is not None:
            os.replace(old, out_dir)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _check_out_dir(out_dir):
    if out_dir.exists():
        if not out_dir.is_dir():
            raise InputError(f'output {out_dir} exists and is not a directory; choose another '
                             '-o path')
        if any(out_dir.iterdir()) and not (out_dir / MANIFEST).is_file():
            raise InputError(f'output {out_dir} is a non-empty directory that is not a map '
                             'bundle; choose another -o path')
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f'cannot create the output folder {out_dir.parent}: '
                         f'{exc.strerror}') from None
    if not os.access(out_dir.parent, os.W_OK):
        raise InputError(f'output folder {out_dir.parent} is not writable')


def write_bundle(out_dir, levels, tokens, manifest_extra, coverage=None, retrieval=None,
                 keys=None):
    """Write a bundle from arrays already in memory (atomically) and return its path.

    ``tokens`` is ``[N, D]`` for the token levels of ``levels`` in row order; ``coverage`` is
    ``[N]``; ``retrieval`` optionally ``[M, E]`` and ``keys`` (match heads) ``[M, K]`` for all
    levels. ``manifest_extra`` must give
    ``grid_k``, ``steps``, ``root_zoom``, ``map`` (with ``bounds``) and ``model`` (with
    ``hash``).
    """
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    tokens = np.asarray(tokens)
    n = sum(lv.count for lv in levels if lv.offset >= 0)
    if tokens.ndim != 2 or tokens.shape[0] != n:
        raise ValueError(f'tokens have shape {tokens.shape}, the levels need {n} rows')
    tmp = _tmp_sibling(out_dir, 'tmp')
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        np.save(tmp / TOKENS_FILE, tokens.astype(np.float16))
        cov = np.ones(n, np.float16) if coverage is None else np.asarray(coverage, np.float16)
        np.save(tmp / COVERAGE_FILE, cov)
        ret_info = None
        if retrieval is not None:
            np.save(tmp / RETRIEVAL_FILE, np.asarray(retrieval, np.float16))
            ret_info = dict(manifest_extra.get('retrieval') or {})
            ret_info['shape'] = list(np.shape(retrieval))
        if keys is not None:
            np.save(tmp / KEYS_FILE, np.asarray(keys, np.float16))
            manifest_extra = dict(manifest_extra, keys={
                'file': KEYS_FILE, 'shape': list(np.shape(keys)), 'dtype': 'float16'})
        manifest = _manifest(levels, tokens.shape[1], manifest_extra, ret_info)
        _write_json(tmp / MANIFEST, manifest)
        _install_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _manifest(levels, embed_dim, extra, retrieval_info):
    manifest = {
        'format': FORMAT,
        'format_version': FORMAT_VERSION,
        'created': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
        'package_version': __version__,
        'grid_k': int(extra['grid_k']),
        'steps': int(extra['steps']),
        'root_zoom': int(extra['root_zoom']),
        'terminal_zoom': int(levels[-1].zoom),
        'embed_dim': int(embed_dim),
        'view_size': extra.get('view_size'),
        'map': extra['map'],
        'model': extra['model'],
        'roots': [[int(x), int(y), levels[0].zoom] for x, y in zip(*levels[0].cell_arrays())],
        'levels': [lv.to_json() for lv in levels],
        'cells_per_level': [lv.count for lv in levels],
        'num_tokens': sum(lv.count for lv in levels if lv.offset >= 0),
        'tokens': {'file': TOKENS_FILE, 'dtype': 'float16'},
        'retrieval': retrieval_info,
        'keys': extra.get('keys'),
    }
    return manifest


def _write_json(path, obj):
    tmp = path.with_name(path.name + '.tmp')
    tmp.write_text(json.dumps(obj, indent=1) + '\n')
    os.replace(tmp, path)


def _batches(items, size):
    for i in range(0, len(items), size):
        yield i, items[i:i + size]


def _encode_cells(cells, render, encode, out, batch_size, progress, desc, coverage=None):
    """Render and encode ``cells`` in batches into ``out`` rows (rendering ahead in a thread)."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    def render_batch(batch):
        views = [render(c) for c in batch]
        return [v.image for v in views], [float(v.coverage) for v in views]

    bar = tqdm(total=len(cells), desc=desc, unit='view', disable=not progress, leave=False)
    batches = list(_batches(cells, batch_size))
    with ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(render_batch, batches[0][1]) if batches else None
        for n, (start, batch) in enumerate(batches):
            images, cov = future.result()
            if n + 1 < len(batches):
                future = pool.submit(render_batch, batches[n + 1][1])
            emb = encode(images)
            out[start:start + len(batch)] = emb.astype(np.float16)
            if coverage is not None:
                coverage[start:start + len(batch)] = cov
            bar.update(len(batch))
    bar.close()


def _existing_matches(out_dir, map_sha, backend, retrieval_hash):
    try:
        manifest = _read_manifest(out_dir)
    except InputError:
        return False
    have_r = (manifest.get('retrieval') or {}).get('model_hash')
    model = manifest['model']
    same_model = model['hash'] == backend.model_hash or \
        (backend.map_hash is not None and model.get('map_hash') == backend.map_hash)
    return (manifest['map'].get('sha256') == map_sha and same_model
            and (retrieval_hash is None or have_r == retrieval_hash)
            and (out_dir / TOKENS_FILE).is_file())


def build_bundle(map_path, model_path, out_dir, batch_size=32, progress=True,
                 retrieval_model=None, device='cpu', overwrite=False, context_m=None):
    """Encode every view the policy can visit over a map into a bundle; return its path.

    Roots are the cells at the model's root zoom that intersect the map's bounds; views are
    rendered (``tiles.views.render_view``, ``view_size`` pixels) for every level from the roots
    down to the parent of the terminal level and encoded by the model's map encoder. With
    ``retrieval_model``, every level's cells also get retrieval embeddings of a north-up crop
    centred on the cell, of side ``max(cell size, context_m)`` metres (default: the retrieval
    model's training context, about 100 m); a heading-aligned retrieval model also gets the
    terminal cells' crops at 8 headings. A bundle already at ``out_dir`` for the same map and
    models (or a policy with the same map side, :func:`geozoom_ros.model.io.map_hash`) is
    reused unless ``overwrite`` (and its policy tokens are reused when only retrieval
    embeddings are added); anything else there that is a bundle is replaced atomically once the
    new one is complete.
    """
    from geozoom_ros.runtime.torch_backend import TorchBackend, TorchRetrieval
    from geozoom_ros.tiles.store import open_store
    from geozoom_ros.tiles.views import render_crop, render_view

    map_path, out_dir = Path(map_path), Path(out_dir)
    if not map_path.exists():
        raise InputError(f'map {map_path} does not exist; build one with geozoom tiles build')
    _check_out_dir(out_dir)
    backend = TorchBackend(model_path, device=device)
    retr = TorchRetrieval(retrieval_model, device=device) if retrieval_model else None
    map_sha = file_sha256(map_path)
    if not overwrite and _existing_matches(out_dir, map_sha, backend,
                                           retr.model_hash if retr else None):
        return out_dir
    store = open_store(map_path)
    cfg = backend.config
    k, steps, root_zoom = int(cfg.grid_k), int(cfg.steps), int(cfg.root_zoom)
    view_size = int(cfg.view_size)
    bounds = tuple(float(v) for v in store.metadata.bounds)
    levels = make_levels(bounds, root_zoom, k, steps)
    token_levels = [lv for lv in levels if lv.offset >= 0]
    n = sum(lv.count for lv in token_levels)
    d = int(cfg.embed_dim)

    tmp = _tmp_sibling(out_dir, 'tmp')
    shutil.rmtree(tmp, ignore_errors=True)
    # Policy tokens of the same map and model are reused when only retrieval is added.
    reuse = not overwrite and _existing_matches(out_dir, map_sha, backend, None) \
        and (out_dir / COVERAGE_FILE).is_file()
    tmp.mkdir()
    try:
        keys_info = None
        if reuse:
            shutil.copyfile(out_dir / TOKENS_FILE, tmp / TOKENS_FILE)
            shutil.copyfile(out_dir / COVERAGE_FILE, tmp / COVERAGE_FILE)
            if backend.uses_children:
                shutil.copyfile(out_dir / KEYS_FILE, tmp / KEYS_FILE)
                keys_info = _read_manifest(out_dir).get('keys')
        else:
            tokens = np.lib.format.open_memmap(tmp / TOKENS_FILE, mode='w+', dtype=np.float16,
                                               shape=(n, d))
            coverage = np.lib.format.open_memmap(tmp / COVERAGE_FILE, mode='w+',
                                                 dtype=np.float16, shape=(n,))
            for lv in token_levels:
                sl = slice(lv.offset, lv.offset + lv.count)
                _encode_cells(lv.cells(), lambda c: render_view(store, c, view_size),
                              backend.encode_map, tokens[sl], batch_size, progress,
                              f'level {lv.index} (zoom {lv.zoom})', coverage[sl])
            tokens.flush()
            coverage.flush()
            if backend.uses_children:
                keys_info = _build_keys(store, levels, backend, tokens, tmp, batch_size,
                                        progress, render_view)
            del tokens, coverage
        ret_info = None
        if retr is not None:
            ret_info = _build_retrieval(store, levels, retr, tmp, batch_size, progress,
                                        context_m, render_crop)
        extra = {
            'grid_k': k, 'steps': steps, 'root_zoom': root_zoom, 'view_size': view_size,
            'map': {'path': str(map_path), 'sha256': map_sha, 'bounds': list(bounds)},
            'model': {'hash': backend.model_hash, 'map_hash': backend.map_hash,
                      'path': str(model_path), 'encoder': getattr(cfg, 'encoder', None)},
            'keys': keys_info,
        }
        manifest = _manifest(levels, d, extra, ret_info)
        _write_json(tmp / MANIFEST, manifest)
        _install_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        store.close()
    return out_dir


def _build_keys(store, levels, backend, tokens, tmp, batch_size, progress, render_view):
    """Write the match keys of every level's cells (terminal views are encoded here)."""
    m = sum(lv.count for lv in levels)
    dim = int(backend.step_dim)
    out = np.lib.format.open_memmap(tmp / KEYS_FILE, mode='w+', dtype=np.float16,
                                    shape=(m, dim))
    size = int(backend.config.view_size)
    for lv in levels:
        sl = slice(lv.retrieval_offset, lv.retrieval_offset + lv.count)
        if lv.offset >= 0:
            for start in range(0, lv.count, 4096):
                stop = min(lv.count, start + 4096)
                tok = np.asarray(tokens[lv.offset + start:lv.offset + stop], np.float32)
                out[sl.start + start:sl.start + stop] = backend.match_keys(tok)
        else:
            _encode_cells(lv.cells(), lambda c: render_view(store, c, size),
                          lambda views: backend.match_keys(backend.encode_map(views)),
                          out[sl], batch_size, progress, f'keys level {lv.index} (zoom {lv.zoom})')
    out.flush()
    del out
    return {'file': KEYS_FILE, 'shape': [m, dim], 'dtype': 'float16'}


def _build_retrieval(store, levels, retr, tmp, batch_size, progress, context_m, render_crop):
    size = retr.map_size()
    context = float(context_m or retr.context_m())
    m = sum(lv.count for lv in levels)
    probe = retr.embed_map([np.zeros((size, size, 3), np.uint8)])
    e = probe.shape[1]
    out = np.lib.format.open_memmap(tmp / RETRIEVAL_FILE, mode='w+', dtype=np.float16,
                                    shape=(m, e))
    for lv in levels:
        cells = lv.cells()
        side = max(cell_size_m(cells[0]), context)

        def render(c, side=side):
            lat, lon = cell_center(c)
            return render_crop(store, lat, lon, side, size)

        sl = slice(lv.retrieval_offset, lv.retrieval_offset + lv.count)
        _encode_cells(cells, render, retr.embed_map, out[sl], batch_size, progress,
                      f'retrieval level {lv.index} (zoom {lv.zoom})')
    out.flush()
    del out
    info = {'model_hash': retr.model_hash, 'context_m': context, 'crop_size': size,
            'file': RETRIEVAL_FILE, 'shape': [m, e], 'heading_bins': 0}
    if getattr(retr.config, 'heading_aligned', False):
        # A heading-aligned model compares the camera with crops rotated to its heading: store
        # the terminal cells at HEADING_BINS headings; a query uses its nearest bin.
        term = levels[-1]
        cells = term.cells()
        side = max(cell_size_m(cells[0]), context)
        hout = np.lib.format.open_memmap(tmp / RETRIEVAL_HEADING_FILE, mode='w+',
                                         dtype=np.float16,
                                         shape=(HEADING_BINS, term.count, e))
        for b in range(HEADING_BINS):
            heading = b * 360.0 / HEADING_BINS

            def render(c, heading=heading):
                lat, lon = cell_center(c)
                return render_crop(store, lat, lon, side, size, heading_deg=heading)

            _encode_cells(cells, render, retr.embed_map, hout[b], batch_size, progress,
                          f'retrieval terminal cells, heading {heading:.0f} deg')
        hout.flush()
        del hout
        info['heading_bins'] = HEADING_BINS
        info['heading_file'] = RETRIEVAL_HEADING_FILE
    return info
