"""Write small georeferenced GeoTIFFs for tests: several CRSs, band counts, sample types.

The pixels form a grid of uniformly coloured square blocks, so the colour at a block's centre
survives reprojection, resampling and JPEG compression within a small tolerance.
"""

import math

from affine import Affine
import numpy as np
from pyproj import Transformer
import rasterio

from geozoom_ros import geo

#: Default place of the test rasters (Zurich; UTM zone 32N, inside EPSG:3035's area).
LAT0, LON0 = 47.37, 8.54


def block_pattern(height, width, block=50, bands=3, dtype='uint8', seed=0):
    """Return ``(bands, height, width)`` pixels: square blocks of distinct random colours.

    uint8 blocks use values 20..235; uint16 blocks 1000..41000; float blocks 0.05..0.95.
    """
    rng = np.random.default_rng(seed)
    nby, nbx = math.ceil(height / block), math.ceil(width / block)
    unit = rng.uniform(0.0, 1.0, size=(bands, nby, nbx))
    unit = np.repeat(np.repeat(unit, block, axis=1), block, axis=2)[:, :height, :width]
    kind = np.dtype(dtype)
    if kind == np.uint8:
        return np.round(20 + unit * 215).astype(np.uint8)
    if kind == np.uint16:
        return np.round(1000 + unit * 40000).astype(np.uint16)
    return (0.05 + unit * 0.9).astype(kind)


def from_origin(west, north, xsize, ysize):
    """Return the north-up affine transform of a grid with its north-west corner at a point."""
    return Affine(xsize, 0.0, west, 0.0, -ysize, north)


def write_no_crs(path, bands=3, size=16):
    """Write a GeoTIFF without CRS or geotransform (a plain image in a .tif)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter('ignore', rasterio.errors.NotGeoreferencedWarning)
        with rasterio.open(path, 'w', driver='GTiff', width=size, height=size, count=bands,
                           dtype='uint8') as dst:
            dst.write(np.zeros((bands, size, size), np.uint8))
    return path


def grid_for(crs, lat, lon, gsd_m, width, height):
    """Return ``(crs, transform)`` of a north-up grid of ``gsd_m`` metres centred on a point.

    ``crs`` is an EPSG string, or 'utm' for the point's UTM zone; for a geographic CRS the
    pixel size is converted to degrees at the point's latitude.
    """
    if crs == 'utm':
        crs = f'EPSG:{geo.utm_epsg(lat, lon)}'
    tr = Transformer.from_crs('EPSG:4326', crs, always_xy=True)
    x, y = tr.transform(lon, lat)
    if rasterio.crs.CRS.from_user_input(crs).is_geographic:
        dx = gsd_m / (111320.0 * math.cos(math.radians(lat)))
        dy = gsd_m / 110574.0
    else:
        dx = dy = gsd_m
    return crs, from_origin(x - dx * width / 2.0, y + dy * height / 2.0, dx, dy)


def write_geotiff(path, data, crs, transform, nodata=None, alpha=False, tiled=False):
    """Write ``(bands, H, W)`` pixels as a GeoTIFF; ``alpha=True`` marks the last band alpha."""
    bands, height, width = data.shape
    profile = dict(driver='GTiff', width=width, height=height, count=bands,
                   dtype=data.dtype.name, crs=crs, transform=transform)
    if nodata is not None:
        profile['nodata'] = nodata
    if tiled:
        profile.update(tiled=True, blockxsize=256, blockysize=256)
    if bands >= 3:
        profile['photometric'] = 'RGB'
    if alpha:
        profile['alpha'] = 'YES'
    with rasterio.open(path, 'w', **profile) as dst:
        dst.write(data)
    return path


def make_raster(path, crs='utm', bands=3, dtype='uint8', size=(400, 400), gsd_m=0.5,
                lat=LAT0, lon=LON0, nodata=None, nodata_cols=0, alpha=False, alpha_cols=0,
                block=50, seed=0):
    """Write a block-pattern GeoTIFF and return its pixels ``(bands, H, W)``.

    ``nodata_cols`` western columns are set to ``nodata``; with ``alpha`` a last band is added
    (255 / 65535 opaque) whose ``alpha_cols`` western columns are 0.
    """
    height, width = size
    data = block_pattern(height, width, block, bands, dtype, seed)
    if nodata is not None:
        data[data == nodata] = data[data == nodata] + 1
        if nodata_cols:
            data[:, :, :nodata_cols] = nodata
    if alpha:
        full = 255 if np.dtype(dtype) == np.uint8 else 65535
        a = np.full((1, height, width), full, data.dtype)
        a[:, :, :alpha_cols] = 0
        data = np.concatenate([data, a])
    crs, transform = grid_for(crs, lat, lon, gsd_m, width, height)
    write_geotiff(path, data, crs, transform, nodata=nodata, alpha=alpha)
    return data


def pixel_latlon(path, row, col):
    """Return ``(lat, lon)`` of the centre of pixel ``(row, col)`` of a raster."""
    with rasterio.open(path) as src:
        x, y = src.transform @ (col + 0.5, row + 0.5)
        tr = Transformer.from_crs(src.crs, 'EPSG:4326', always_xy=True)
        lon, lat = tr.transform(x, y)
    return lat, lon


def block_centres(size, block=50, margin=1):
    """Yield ``(row, col)`` of block centres, skipping ``margin`` blocks at each edge."""
    height, width = size
    for r in range(margin, height // block - margin):
        for c in range(margin, width // block - margin):
            yield r * block + block // 2, c * block + block // 2
