"""Overhead views of cells and of metric crops, rendered from a tile store.

A *view* of a cell is a north-up ``(size, size, 3)`` uint8 RGB image of exactly the cell's
Web-Mercator square, stitched from the tiles of the zoom whose resolution matches the view
(``tile_size * 2**(zoom - cell.z)`` closest to ``size`` in log scale, clamped to the store's
zooms) and resampled with OpenCV: ``INTER_AREA`` when shrinking, ``INTER_LINEAR`` when
enlarging (cells deeper than the pyramid's maximum zoom are upsampled from it).

Pixels without map data (no tile, a transparent tile pixel, or outside the pyramid's bounds)
get the ``fill`` colour; ``coverage`` is the fraction (0..1) of the view's pixels with data.
JPEG tiles carry no transparency, so inside a JPEG pyramid's bounds coverage follows tile
presence.
"""

import math
from typing import NamedTuple

import cv2
import mercantile
import numpy as np

from geozoom_ros import geo
from geozoom_ros.errors import InputError

_WORLD_M = 2.0 * math.pi * geo.EARTH_RADIUS_M
_HALF_WORLD_M = _WORLD_M / 2.0
# Views above this many source pixels per side are pre-shrunk before warping, so a coarse
# crop from a fine zoom does not alias.
_MAX_WARP_SHRINK = 1.5


class View(NamedTuple):
    """A rendered view: ``image`` (size, size, 3) uint8 RGB, ``coverage`` 0..1, ``zoom`` used."""

    image: np.ndarray
    coverage: float
    zoom: int


def _fill_rgb(fill):
    fill = tuple(int(v) for v in fill)
    if len(fill) != 3 or not all(0 <= v <= 255 for v in fill):
        raise InputError(f'fill {fill} is not an RGB triple of 0..255 values')
    return fill


def _check_size(size):
    if int(size) != size or not 1 <= size <= 8192:
        raise InputError(f'view size {size} is not an integer number of pixels in 1..8192')
    return int(size)


def _pick_zoom(store, wanted):
    zooms = store.zooms()
    if not zooms:
        raise InputError(f'{store.path}: holds no tiles')
    if wanted <= zooms[0]:
        return zooms[0]
    if wanted >= zooms[-1]:
        return zooms[-1]
    finer = [z for z in zooms if z >= wanted]
    return finer[0]


def global_px(lat, lon, zoom, tile_size=256):
    """Return ``(gx, gy)``: global Web-Mercator pixel coordinates at ``zoom``.

    Pixel ``(0, 0)``'s corner is the north-west corner of the world; x grows east, y south.
    """
    lat = max(-geo.MAX_LAT, min(geo.MAX_LAT, lat))
    mx, my = mercantile.xy(lon, lat)
    scale = tile_size * (1 << zoom) / _WORLD_M
    return (mx + _HALF_WORLD_M) * scale, (_HALF_WORLD_M - my) * scale


def _bounds_px(store, zoom):
    """Return the store's bounds as global pixel rectangle ``(x0, y0, x1, y1)`` at ``zoom``."""
    west, south, east, north = store.metadata.bounds
    ts = store.metadata.tile_size
    x0, y0 = global_px(north, west, zoom, ts)
    x1, y1 = global_px(south, east, zoom, ts)
    return x0, y0, x1, y1


def stitch(store, zoom, tx0, ty0, tx1, ty1, fill=(0, 0, 0)):
    """Stitch tiles ``tx0 <= x < tx1, ty0 <= y < ty1`` of ``zoom`` into one canvas.

    Returns ``(canvas, mask)``: ``canvas`` is ``(H, W, 3)`` uint8 RGB with ``fill`` where
    there is no data; ``mask`` is an ``(H, W)`` uint8 array (255 = data, 0 = none), or None
    when every pixel has data.
    """
    ts = store.metadata.tile_size
    h, w = (ty1 - ty0) * ts, (tx1 - tx0) * ts
    canvas = np.empty((h, w, 3), np.uint8)
    mask = np.zeros((h, w), np.uint8)
    complete = True
    n = 1 << zoom
    for ty in range(ty0, ty1):
        for tx in range(tx0, tx1):
            r, c = (ty - ty0) * ts, (tx - tx0) * ts
            got = store.get_tile_rgba(zoom, tx % n, ty) if 0 <= ty < n else None
            if got is None:
                canvas[r:r + ts, c:c + ts] = fill
                complete = False
                continue
            rgb, alpha = got
            canvas[r:r + ts, c:c + ts] = rgb
            if alpha is None:
                mask[r:r + ts, c:c + ts] = 255
            else:
                mask[r:r + ts, c:c + ts] = np.where(alpha >= 128, 255, 0)
                complete = False
    bx0, by0, bx1, by1 = _bounds_px(store, zoom)
    cx0, cy0 = int(round(bx0)) - tx0 * ts, int(round(by0)) - ty0 * ts
    cx1, cy1 = int(round(bx1)) - tx0 * ts, int(round(by1)) - ty0 * ts
    if cx0 > 0 or cy0 > 0 or cx1 < w or cy1 < h:
        complete = False
        mask[:, :max(0, min(w, cx0))] = 0
        mask[:, max(0, cx1):] = 0
        mask[:max(0, min(h, cy0)), :] = 0
        mask[max(0, cy1):, :] = 0
    if complete:
        return canvas, None
    canvas[mask == 0] = fill
    return canvas, mask


def _empty(size, fill, zoom):
    img = np.empty((size, size, 3), np.uint8)
    img[:] = fill
    return View(img, 0.0, int(zoom))


def render_view(store, cell, size=384, fill=(0, 0, 0)):
    """Render the north-up view of a Web-Mercator cell ``(x, y, z)`` at ``size`` x ``size`` px.

    Returns a :class:`View` (image RGB uint8, coverage 0..1, tile zoom used).
    """
    size = _check_size(size)
    fill = _fill_rgb(fill)
    cell = geo.Cell(*cell) if not isinstance(cell, geo.Cell) else cell
    ts = store.metadata.tile_size
    zoom = _pick_zoom(store, cell.z + int(round(math.log2(size / ts))))
    if zoom >= cell.z:
        return _render_aligned(store, cell, zoom, size, fill)
    return _render_deep(store, cell, zoom, size, fill)


def _data_tile_range(store, zoom):
    ts = store.metadata.tile_size
    bx0, by0, bx1, by1 = _bounds_px(store, zoom)
    n = 1 << zoom
    return (max(0, int(math.floor(bx0 / ts))), max(0, int(math.floor(by0 / ts))),
            min(n, int(math.ceil(bx1 / ts))), min(n, int(math.ceil(by1 / ts))))


def _render_aligned(store, cell, zoom, size, fill):
    ts = store.metadata.tile_size
    n = 1 << (zoom - cell.z)
    dx0, dy0, dx1, dy1 = _data_tile_range(store, zoom)
    tx0, ty0 = max(cell.x * n, dx0), max(cell.y * n, dy0)
    tx1, ty1 = min(cell.x * n + n, dx1), min(cell.y * n + n, dy1)
    if tx0 >= tx1 or ty0 >= ty1:
        return _empty(size, fill, zoom)
    canvas, mask = stitch(store, zoom, tx0, ty0, tx1, ty1, fill)
    per_tile = size / n
    ox0, oy0 = int(round((tx0 - cell.x * n) * per_tile)), int(round((ty0 - cell.y * n) * per_tile))
    ox1, oy1 = int(round((tx1 - cell.x * n) * per_tile)), int(round((ty1 - cell.y * n) * per_tile))
    if ox1 <= ox0 or oy1 <= oy0:
        return _empty(size, fill, zoom)
    full = (ox0, oy0, ox1, oy1) == (0, 0, size, size)
    interp = cv2.INTER_AREA if per_tile < ts else cv2.INTER_LINEAR
    part = canvas if canvas.shape[:2] == (oy1 - oy0, ox1 - ox0) else cv2.resize(
        canvas, (ox1 - ox0, oy1 - oy0), interpolation=interp)
    if full:
        image = np.ascontiguousarray(part)
    else:
        image = np.empty((size, size, 3), np.uint8)
        image[:] = fill
        image[oy0:oy1, ox0:ox1] = part
    if mask is None:
        covered = float((ox1 - ox0) * (oy1 - oy0))
    else:
        mpart = mask if mask.shape == part.shape[:2] else cv2.resize(
            mask, (ox1 - ox0, oy1 - oy0), interpolation=interp)
        covered = float(np.count_nonzero(mpart >= 128))
    return View(image, min(1.0, covered / (size * size)), int(zoom))


def _warp_region(store, zoom, center_px, size, k, heading_deg, fill):
    """Warp a square of ``size * k`` global pixels at ``zoom``, centred on ``center_px``.

    The output's up direction is ``heading_deg`` (clockwise from north).
    """
    ts = store.metadata.tile_size
    cx, cy = center_px
    h = math.radians(heading_deg)
    cos_h, sin_h = math.cos(h), math.sin(h)
    half = 0.5 * size * k * (abs(cos_h) + abs(sin_h)) + 2.0
    n = 1 << zoom
    dx0, dy0, dx1, dy1 = _data_tile_range(store, zoom)
    tx0 = max(int(math.floor((cx - half) / ts)), dx0)
    ty0 = max(int(math.floor((cy - half) / ts)), dy0, 0)
    tx1 = min(int(math.floor((cx + half) / ts)) + 1, dx1)
    ty1 = min(int(math.floor((cy + half) / ts)) + 1, dy1, n)
    if tx0 >= tx1 or ty0 >= ty1:
        return _empty(size, fill, zoom)
    canvas, mask = stitch(store, zoom, tx0, ty0, tx1, ty1, fill)
    ox, oy = cx - tx0 * ts, cy - ty0 * ts  # view centre in canvas pixels (corner origin)
    if k > _MAX_WARP_SHRINK:
        shrink = 1.0 / k
        w = max(1, int(round(canvas.shape[1] * shrink)))
        hh = max(1, int(round(canvas.shape[0] * shrink)))
        sx, sy = w / canvas.shape[1], hh / canvas.shape[0]
        canvas = cv2.resize(canvas, (w, hh), interpolation=cv2.INTER_AREA)
        if mask is not None:
            mask = cv2.resize(mask, (w, hh), interpolation=cv2.INTER_AREA)
        ox, oy, k = ox * sx, oy * sy, k * sx
    # Output pixel centre (u + .5, v + .5) -> canvas pixel centre coordinates (index space).
    half_out = size / 2.0
    a, b = k * cos_h, -k * sin_h
    c, d = k * sin_h, k * cos_h
    tx = ox - 0.5 + a * (0.5 - half_out) + b * (0.5 - half_out)
    ty = oy - 0.5 + c * (0.5 - half_out) + d * (0.5 - half_out)
    m = np.array([[a, b, tx], [c, d, ty]], np.float64)
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    image = cv2.warpAffine(canvas, m, (size, size), flags=flags,
                           borderMode=cv2.BORDER_CONSTANT, borderValue=fill)
    if mask is None:
        full = np.full(canvas.shape[:2], 255, np.uint8)
        cov = cv2.warpAffine(full, m, (size, size), flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP,
                             borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        covered = np.count_nonzero(cov)
        if covered < size * size:
            image[cov == 0] = fill
    else:
        cov = cv2.warpAffine(mask, m, (size, size), flags=flags,
                             borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        covered = np.count_nonzero(cov >= 128)
    return View(image, min(1.0, covered / float(size * size)), int(zoom))


def _render_deep(store, cell, zoom, size, fill):
    ts = store.metadata.tile_size
    scale = ts * (1 << zoom)  # global pixels per world side at the tile zoom
    f = 1 << cell.z
    side_px = scale / f
    cx = (cell.x + 0.5) * side_px
    cy = (cell.y + 0.5) * side_px
    return _warp_region(store, zoom, (cx, cy), size, side_px / size, 0.0, fill)


def render_crop(store, lat, lon, side_m, size, heading_deg=0.0, fill=(0, 0, 0)):
    """Render a square crop of ``side_m`` ground metres centred on (lat, lon) degrees.

    The crop is ``size`` x ``size`` px; its up direction points ``heading_deg`` degrees
    clockwise from north (0 = north-up). Ground metres are converted to Web-Mercator with the
    scale at ``lat``. Tiles come from the zoom whose ground resolution is closest to
    ``side_m / size`` metres per pixel (clamped to the store's zooms).
    """
    size = _check_size(size)
    fill = _fill_rgb(fill)
    geo.check_latlon(lat, lon)
    if not (side_m > 0 and math.isfinite(side_m)):
        raise InputError(f'crop side {side_m} m is not a positive number of metres')
    ts = store.metadata.tile_size
    m_per_px = side_m / size
    z_exact = math.log2(_WORLD_M * math.cos(math.radians(lat)) / (ts * m_per_px))
    zoom = _pick_zoom(store, int(round(z_exact)))
    k = side_m / geo.ground_resolution_m(zoom, lat, ts) / size
    center = global_px(lat, lon, zoom, ts)
    return _warp_region(store, zoom, center, size, k, float(heading_deg), fill)


def latlon_to_view_px(cell, lat, lon, size=384):
    """Return ``(col, row)`` pixel coordinates (corner origin) of a point in a cell's view."""
    left, bottom, right, top = geo.cell_xy_bounds(cell)
    mx, my = mercantile.xy(lon, lat)
    return ((mx - left) / (right - left) * size, (top - my) / (top - bottom) * size)


def view_px_to_latlon(cell, col, row, size=384):
    """Return ``(lat, lon)`` of pixel coordinates (corner origin) in a cell's view."""
    left, bottom, right, top = geo.cell_xy_bounds(cell)
    mx = left + (right - left) * col / size
    my = top - (top - bottom) * row / size
    lon, lat = mercantile.lnglat(mx, my)
    return lat, lon
