"""Round trips GeoTIFF -> MBTiles -> views: pixels land where the source raster has them."""

import math

import mercantile
import numpy as np
import pytest
from rasters import block_centres, block_pattern, from_origin, LAT0, LON0, make_raster
from rasters import pixel_latlon
from rasters import write_geotiff

from geozoom_ros import geo
from geozoom_ros.tiles.build import build_mbtiles
from geozoom_ros.tiles.store import open_store
from geozoom_ros.tiles.views import latlon_to_view_px, render_crop, render_view
from geozoom_ros.tiles.views import view_px_to_latlon

SIZE = (400, 400)
BLOCK = 50
FILL = (255, 0, 255)

# name: (crs, bands, dtype, nodata, nodata_cols, alpha, alpha_cols, tile format, tolerance)
CASES = {
    'utm-rgb-uint8-jpeg': ('utm', 3, 'uint8', None, 0, False, 0, 'jpeg', 6),
    'wgs84-grey-uint16-nodata-png': ('EPSG:4326', 1, 'uint16', 0, 100, False, 0, 'png', 2),
    'laea-rgba-uint8-webp': ('EPSG:3035', 3, 'uint8', None, 0, True, 100, 'webp', 8),
    'lv95-rgb-uint16-nodata-jpeg': ('EPSG:2056', 3, 'uint16', 7, 100, False, 0, 'jpeg', 6),
}


def _expected_uint8(data, colour_bands, valid):
    """Apply the builder's documented stretch: 2nd..98th percentile of valid samples."""
    colour = data[colour_bands].astype(np.float64)
    if data.dtype == np.uint8:
        return colour
    lo, hi = np.percentile(colour[:, valid], [2.0, 98.0])
    return np.clip((colour - lo) * 255.0 / (hi - lo) + 0.5, 0, 255).astype(np.uint8)


@pytest.fixture(scope='module', params=sorted(CASES))
def case(request, tmp_path_factory):
    name = request.param
    crs, bands, dtype, nodata, ncols, alpha, acols, fmt, tol = CASES[name]
    d = tmp_path_factory.mktemp(name)
    tif = d / f'{name}.tif'
    data = make_raster(tif, crs=crs, bands=bands, dtype=dtype, size=SIZE, gsd_m=0.5,
                       nodata=nodata, nodata_cols=ncols, alpha=alpha, alpha_cols=acols,
                       block=BLOCK, seed=len(name))
    valid = np.ones(SIZE, bool)
    valid[:, :max(ncols, acols)] = False
    expected = _expected_uint8(data, list(range(bands)), valid)
    if bands == 1:
        expected = np.repeat(expected, 3, axis=0)
    out = build_mbtiles([tif], d / 'map.mbtiles', fmt=fmt, quality=95, workers=1,
                        progress=False)
    store = open_store(out, preload=True)
    yield dict(tif=tif, expected=expected, store=store, tol=tol, dead_cols=max(ncols, acols),
               fmt=fmt)
    store.close()


def _live_centres(case):
    return [(r, c) for r, c in block_centres(SIZE, BLOCK) if c > case['dead_cols'] + BLOCK // 2]


def test_view_pixels_match_the_source(case):
    store, exp = case['store'], case['expected']
    meta = store.metadata
    errors = []
    for r, c in _live_centres(case):
        lat, lon = pixel_latlon(case['tif'], r, c)
        cell = geo.cell_at(lat, lon, meta.maxzoom - 1)
        view = render_view(store, cell, 384, fill=FILL)
        assert view.zoom == meta.maxzoom and view.image.shape == (384, 384, 3)
        col, row = latlon_to_view_px(cell, lat, lon, 384)
        got = view.image[int(row), int(col)].astype(int)
        errors.append(np.abs(got - exp[:, r, c].astype(int)).max())
    assert len(errors) >= 12
    assert max(errors) <= case['tol'], errors


def test_crops_match_the_source_at_any_heading(case):
    store, exp = case['store'], case['expected']
    rng = np.random.default_rng(3)
    for r, c in _live_centres(case)[::2]:
        lat, lon = pixel_latlon(case['tif'], r, c)
        heading = float(rng.uniform(0, 360))
        crop = render_crop(store, lat, lon, side_m=12.0, size=33, heading_deg=heading, fill=FILL)
        assert crop.coverage == pytest.approx(1.0)
        got = crop.image[16, 16].astype(int)
        assert np.abs(got - exp[:, r, c].astype(int)).max() <= case['tol']


def test_no_data_gets_the_fill(case):
    if not case['dead_cols'] or case['fmt'] == 'jpeg':
        pytest.skip('no transparent area in this case (JPEG keeps none)')
    lat, lon = pixel_latlon(case['tif'], 200, case['dead_cols'] // 2)
    crop = render_crop(case['store'], lat, lon, side_m=10.0, size=32, fill=FILL)
    assert crop.coverage == pytest.approx(0.0, abs=0.02)
    assert (crop.image.reshape(-1, 3) == FILL).all(axis=1).mean() > 0.95


def test_deeper_and_coarser_cells(case):
    store, exp = case['store'], case['expected']
    meta = store.metadata
    r, c = _live_centres(case)[len(_live_centres(case)) // 2]
    lat, lon = pixel_latlon(case['tif'], r, c)
    deep = geo.cell_at(lat, lon, meta.maxzoom + 3)
    view = render_view(store, deep, 96, fill=FILL)
    assert view.zoom == meta.maxzoom and view.coverage == pytest.approx(1.0)
    col, row = latlon_to_view_px(deep, lat, lon, 96)
    assert np.abs(view.image[int(row), int(col)].astype(int) - exp[:, r, c]).max() <= \
        case['tol']
    coarse = geo.cell_at(lat, lon, meta.minzoom - 3)
    view = render_view(store, coarse, 384, fill=FILL)
    assert view.zoom == meta.minzoom and 0.0 < view.coverage < 0.05
    far = geo.cell_at(lat + 1.0, lon, meta.maxzoom)
    view = render_view(store, far, 64, fill=FILL)
    assert view.coverage == 0.0 and (view.image == FILL).all()


@pytest.mark.parametrize('fmt', ['png', 'jpeg'])
def test_coverage_of_a_half_covered_cell(tmp_path, fmt):
    cell = geo.cell_at(LAT0, LON0, 16)
    left, bottom, right, top = geo.cell_xy_bounds(cell)
    res = (right - left) / 512.0
    data = block_pattern(512, 256, 64, 3, 'uint8', seed=5)
    write_geotiff(tmp_path / 'west.tif', data, 'EPSG:3857', from_origin(left, top, res, res))
    out = build_mbtiles([tmp_path / 'west.tif'], tmp_path / 'west.mbtiles', fmt=fmt,
                        workers=1, progress=False)
    with open_store(out) as store:
        view = render_view(store, cell, 384, fill=FILL)
        assert view.coverage == pytest.approx(0.5, abs=0.01)
        assert (view.image[:, 196:] == FILL).all()
        # Source pixel (row, col) sits at view pixel (row, col) * 384 / 512.
        for row, col in [(32, 32), (288, 160), (480, 224)]:
            got = view.image[row * 3 // 4, col * 3 // 4].astype(int)
            assert np.abs(got - data[:, row, col]).max() <= 6
        # The same cell's north-eastern child holds no data at all.
        ne = geo.child(cell, 1, k=2)
        assert render_view(store, ne, 128).coverage == 0.0


def test_heading_rotates_the_crop(case):
    store = case['store']
    r, c = _live_centres(case)[0]
    lat, lon = pixel_latlon(case['tif'], r + 10, c + 10)
    north = render_crop(store, lat, lon, 40.0, 64, heading_deg=0.0).image.astype(int)
    east = render_crop(store, lat, lon, 40.0, 64, heading_deg=90.0).image.astype(int)
    south = render_crop(store, lat, lon, 40.0, 64, heading_deg=180.0).image.astype(int)
    # East up: the north-up image turned a quarter counter-clockwise.
    assert np.median(np.abs(east - np.rot90(north, 1))) <= 2
    assert np.median(np.abs(south - np.rot90(north, 2))) <= 2
    assert np.median(np.abs(east - north)) > 10


def test_view_pixel_helpers_round_trip():
    cell = geo.cell_at(LAT0, LON0, 18)
    lat, lon = view_px_to_latlon(cell, 100.5, 300.25, 384)
    col, row = latlon_to_view_px(cell, lat, lon, 384)
    assert (col, row) == pytest.approx((100.5, 300.25), abs=1e-6)
    west, south, east, north = geo.cell_bounds(cell)
    assert view_px_to_latlon(cell, 0, 0, 384) == pytest.approx((north, west))
    b = mercantile.bounds(cell)
    assert view_px_to_latlon(cell, 384, 384, 384) == pytest.approx((b.south, b.east))
    assert math.isclose(latlon_to_view_px(cell, north, west)[0], 0.0, abs_tol=1e-6)
