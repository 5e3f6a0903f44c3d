"""The orthophoto of a city: a georeferenced RGB GeoTIFF in the UTM zone of its origin.

The raster grid is north-up in UTM; each tile of it is rendered as an orthographic top-down
view of the city's ENU model through the exact local affine map UTM -> ENU of that tile, so the
georeferencing holds to centimetres even far from the central meridian (where UTM grid north
and true north differ by degrees). Tiles are rendered and written one at a time, so a 10 km
world needs the memory of a tile, not of the image.
"""

from dataclasses import dataclass
import math
import os
from pathlib import Path

import numpy as np

from geozoom_ros.errors import InputError
from geozoom_ros.geo import latlon_to_utm, utm_epsg, utm_to_latlon


@dataclass(frozen=True)
class OrthoGrid:
    """The pixel grid of an orthophoto: UTM ``epsg``, top-left corner (m), ``m_per_px``."""

    epsg: int
    west: float
    north: float
    m_per_px: float
    width: int
    height: int

    def transform(self):
        """Return the rasterio Affine of the grid (pixel corner -> UTM metres)."""
        from rasterio.transform import Affine
        return Affine(self.m_per_px, 0.0, self.west, 0.0, -self.m_per_px, self.north)

    def tiles(self, tile_px):
        """Yield ``(col0, row0, w, h)`` windows of at most ``tile_px`` pixels covering the grid."""
        for row0 in range(0, self.height, tile_px):
            for col0 in range(0, self.width, tile_px):
                yield col0, row0, min(tile_px, self.width - col0), min(tile_px, self.height - row0)

    def to_dict(self):
        """Return a JSON-friendly dict (with the GDAL geotransform)."""
        return dict(epsg=self.epsg, crs=f'EPSG:{self.epsg}', m_per_px=self.m_per_px,
                    width=self.width, height=self.height,
                    geotransform=[self.west, self.m_per_px, 0.0, self.north, 0.0,
                                  -self.m_per_px])


def ortho_grid(city, m_per_px=None):
    """Return the UTM pixel grid that covers the city's bounds (snapped to whole pixels)."""
    res = float(m_per_px or city.knobs.ortho_m_per_px)
    lat0, lon0 = city.origin
    epsg = utm_epsg(lat0, lon0)
    x0, y0, x1, y1 = city.bounds_enu
    xs = np.array([x0, x1, x1, x0, 0.5 * (x0 + x1), x0, x1, 0.5 * (x0 + x1)])
    ys = np.array([y0, y0, y1, y1, y0, 0.5 * (y0 + y1), 0.5 * (y0 + y1), y1])
    lat, lon, _ = city.frame.to_latlon(xs, ys, np.zeros_like(xs))
    e, n, _ = latlon_to_utm(np.asarray(lat), np.asarray(lon), epsg)
    e, n = np.asarray(e), np.asarray(n)
    west = math.floor(e.min() / res) * res
    north = math.ceil(n.max() / res) * res
    width = int(math.ceil((e.max() - west) / res))
    height = int(math.ceil((north - n.min()) / res))
    return OrthoGrid(epsg, west, north, res, width, height)


def tile_px_to_enu(city, grid, col0, row0, w, h):
    """Return the 2x3 affine (pixel corner of the tile -> ENU metres) of a window.

    Fitted by least squares to the exact UTM -> WGS84 -> ENU transform at 9 points of the
    window; the residual is far below a pixel for windows of a few hundred metres.
    """
    cs = np.array([0.0, w / 2.0, w])
    rs = np.array([0.0, h / 2.0, h])
    cc, rr = np.meshgrid(cs, rs)
    cc, rr = cc.ravel(), rr.ravel()
    e = grid.west + (col0 + cc) * grid.m_per_px
    n = grid.north - (row0 + rr) * grid.m_per_px
    lat, lon = utm_to_latlon(e, n, grid.epsg)
    x, y, _ = city.frame.to_enu(np.asarray(lat), np.asarray(lon), np.zeros(len(cc)))
    a = np.stack([cc, rr, np.ones_like(cc)], 1)
    coef, *_ = np.linalg.lstsq(a, np.stack([np.asarray(x), np.asarray(y)], 1), rcond=None)
    return coef.T  # (2, 3)


def ortho_tasks(city, grid, tile_px=1024):
    """Return the render tasks ``(col0, row0, w, h, px_to_enu)`` of the orthophoto."""
    return [(c, r, w, h, tile_px_to_enu(city, grid, c, r, w, h))
            for c, r, w, h in grid.tiles(tile_px)]


def render_tile(renderer, task, lighting=None):
    """Render one orthophoto task with a GroundRenderer; return (col0, row0, RGB array)."""
    col0, row0, w, h, a = task
    return col0, row0, renderer.render_ortho(a, w, h, lighting)


def write_ortho(path, grid, tiles, n_tiles=None, progress=True, compress='deflate'):
    """Write a tiled RGB GeoTIFF from an iterable of ``(col0, row0, rgb)`` tiles.

    Written to a temporary name in the same folder and renamed into place, so a crash never
    leaves a half-written ``path``. Returns the path.
    """
    import rasterio
    from tqdm import tqdm
    path = Path(path)
    tmp = path.with_name(f'.{path.name}.{os.getpid()}.tmp')
    profile = dict(driver='GTiff', width=grid.width, height=grid.height, count=3,
                   dtype='uint8', crs=f'EPSG:{grid.epsg}', transform=grid.transform(),
                   tiled=True, blockxsize=512, blockysize=512, compress=compress,
                   photometric='RGB', interleave='pixel', BIGTIFF='IF_SAFER')
    if compress == 'deflate':
        profile['predictor'] = 2
    try:
        with rasterio.open(tmp, 'w', **profile) as dst:
            dst.colorinterp = [rasterio.enums.ColorInterp.red, rasterio.enums.ColorInterp.green,
                               rasterio.enums.ColorInterp.blue]
            for col0, row0, rgb in tqdm(tiles, total=n_tiles, desc='orthophoto', unit='tile',
                                        disable=not progress):
                h, w = rgb.shape[:2]
                window = rasterio.windows.Window(col0, row0, w, h)
                dst.write(np.moveaxis(rgb, -1, 0), window=window)
        os.replace(tmp, path)
    except OSError as exc:
        raise InputError(f'cannot write the orthophoto {path}: {exc}') from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def read_window(path, lat, lon, half_m, out_px=None):
    """Return the north-up RGB crop (h, w, 3) of an orthophoto around a point (for checks)."""
    import rasterio
    with rasterio.open(path) as src:
        e, n, _ = latlon_to_utm(lat, lon, src.crs.to_epsg())
        row, col = src.index(e, n)
        r = int(round(half_m / src.res[0]))
        window = rasterio.windows.Window(col - r, row - r, 2 * r, 2 * r)
        data = src.read(window=window, boundless=True, fill_value=0)
    img = np.moveaxis(data, 0, -1)
    if out_px:
        import cv2
        img = cv2.resize(img, (out_px, out_px), interpolation=cv2.INTER_AREA)
    return img
