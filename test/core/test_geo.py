"""Cells, actions and coordinate conversions: known values and property-based round trips."""

import math

from hypothesis import given, settings
from hypothesis import strategies as st
import mercantile
import numpy as np
import pytest

from geozoom_ros import geo
from geozoom_ros.errors import InputError

lats = st.floats(min_value=-80.0, max_value=80.0, allow_nan=False)
lons = st.floats(min_value=-179.9, max_value=179.9, allow_nan=False)


def test_children_order_row0_north_col0_west():
    parent = geo.Cell(10, 20, 5)
    kids = geo.children(parent, k=4)
    assert len(kids) == 16
    assert all(c.z == 7 for c in kids)
    # Action 0 is the north-west corner, action 3 north-east, action 12 south-west.
    assert kids[0] == geo.Cell(40, 80, 7)
    assert kids[3] == geo.Cell(43, 80, 7)
    assert kids[12] == geo.Cell(40, 83, 7)
    w0, s0, e0, n0 = geo.cell_bounds(kids[0])
    w12, s12, e12, n12 = geo.cell_bounds(kids[12])
    w3, s3, e3, n3 = geo.cell_bounds(kids[3])
    assert n0 > n12 and w0 == pytest.approx(w12)  # row 0 is north of row 3
    assert w0 < w3 and n0 == pytest.approx(n3)  # col 0 is west of col 3
    # The children tile the parent exactly.
    pw, ps, pe, pn = geo.cell_bounds(parent)
    assert (w0, n0) == pytest.approx((pw, pn))
    assert geo.cell_bounds(kids[15])[1:3] == pytest.approx((ps, pe))


def test_action_rowcol_known_values():
    assert geo.action_to_rowcol(0) == (0, 0)
    assert geo.action_to_rowcol(7) == (1, 3)
    assert geo.action_to_rowcol(15) == (3, 3)
    assert geo.action_to_rowcol(5, k=8) == (0, 5)
    assert geo.rowcol_to_action(2, 1) == 9
    with pytest.raises(InputError):
        geo.action_to_rowcol(16)
    with pytest.raises(InputError):
        geo.grid_levels(3)
    assert geo.grid_levels(2) == 1 and geo.grid_levels(4) == 2 and geo.grid_levels(8) == 3


@settings(max_examples=200, deadline=None)
@given(lat=lats, lon=lons, root_zoom=st.integers(0, 14), steps=st.integers(1, 4),
       k=st.sampled_from([2, 4, 8]))
def test_path_round_trip(lat, lon, root_zoom, steps, k):
    root = geo.cell_at(lat, lon, root_zoom)
    path = geo.path_to(root, lat, lon, steps, k)
    assert len(path) == steps and all(0 <= a < k * k for a in path)
    leaf = geo.descend(root, path, k)
    assert leaf == geo.cell_at(lat, lon, root_zoom + steps * geo.grid_levels(k))
    assert geo.actions_between(root, leaf, k) == path
    w, s, e, n = geo.cell_bounds(leaf)
    assert w - 1e-9 <= lon <= e + 1e-9 and s - 1e-9 <= lat <= n + 1e-9


def test_path_outside_root_is_refused():
    root = geo.cell_at(47.0, 8.0, 12)
    with pytest.raises(InputError, match='does not lie inside'):
        geo.path_to(root, 48.0, 9.0, 4)


def test_cell_size_known_values():
    # Zoom 0 spans the equator's circumference; a zoom-20 cell at 38.9 N is about 29.5 m.
    assert geo.cell_size_m(geo.Cell(0, 0, 0)) == pytest.approx(2 * math.pi * 6378137.0, rel=1e-9)
    dc = geo.cell_at(38.9, -77.03, 20)
    expected = 2 * math.pi * 6378137.0 * math.cos(math.radians(geo.cell_center(dc)[0])) / 2 ** 20
    assert geo.cell_size_m(dc) == pytest.approx(expected)
    assert 29.0 < geo.cell_size_m(dc) < 30.0
    # Root zoom 12 at 45 N is about 6.9 km; four 4x4 steps end at zoom 20.
    assert 6850 < geo.cell_size_m(geo.cell_at(45.0, 7.0, 12)) < 6950


@pytest.mark.parametrize('cell', [geo.Cell(2200, 1400, 12), geo.Cell(0, 0, 3),
                                  geo.cell_at(-33.86, 151.21, 20), geo.cell_at(47.38, 8.54, 20)])
def test_cell_center_inside_and_at_mercator_midpoint(cell):
    lat, lon = geo.cell_center(cell)
    w, s, e, n = geo.cell_bounds(cell)
    assert lon == pytest.approx((w + e) / 2, abs=1e-9)
    assert s < lat < n
    x, y = mercantile.xy(lon, lat)
    left, bottom, right, top = geo.cell_xy_bounds(cell)
    assert x == pytest.approx((left + right) / 2, abs=1e-6)
    assert y == pytest.approx((bottom + top) / 2, abs=1e-6)


def test_zoom_for_resolution():
    # 0.3 m/px at 47 N needs zoom 19 (0.2 m/px) rather than 18 (0.41 m/px).
    assert geo.zoom_for_resolution(0.3, 47.0) == 19
    assert geo.ground_resolution_m(19, 47.0) <= 0.3 < geo.ground_resolution_m(18, 47.0)


def test_geodesic_known_values():
    # One degree of latitude at the equator is 110 574 m on WGS84.
    assert geo.geodesic_distance_m(0, 0, 1, 0) == pytest.approx(110574.4, abs=1.0)
    d = geo.geodesic_distance_m([0, 0], [0, 0], [0, 1], [1, 0])
    assert d.shape == (2,) and d[0] == pytest.approx(111319.5, abs=1.0)
    assert geo.geodesic_bearing_deg(0, 0, 0, 1) == pytest.approx(90.0)
    lat, lon = geo.destination(47.0, 8.0, 45.0, 1000.0)
    assert geo.geodesic_distance_m(47.0, 8.0, lat, lon) == pytest.approx(1000.0, abs=1e-3)


def test_utm_known_values():
    assert geo.utm_epsg(47.37, 8.54) == 32632
    assert geo.utm_epsg(-33.9, 18.4) == 32734
    # The central meridian of zone 32 (9 E) on the equator is easting 500 000, northing 0.
    e, n, epsg = geo.latlon_to_utm(0.0, 9.0)
    assert epsg == 32632 and e == pytest.approx(500000.0) and n == pytest.approx(0.0, abs=1e-6)


@settings(max_examples=100, deadline=None)
@given(lat=lats, lon=lons)
def test_utm_round_trip(lat, lon):
    e, n, epsg = geo.latlon_to_utm(lat, lon)
    lat2, lon2 = geo.utm_to_latlon(e, n, epsg)
    assert geo.geodesic_distance_m(lat, lon, lat2, lon2) < 1e-3


@settings(max_examples=100, deadline=None)
@given(lat0=lats, lon0=lons, east=st.floats(-20000, 20000), north=st.floats(-20000, 20000),
       up=st.floats(-100, 1000))
def test_enu_round_trip(lat0, lon0, east, north, up):
    frame = geo.LocalFrame(lat0, lon0)
    lat, lon, h = frame.to_latlon(east, north, up)
    e2, n2, u2 = frame.to_enu(lat, lon, h)
    assert (e2, n2, u2) == pytest.approx((east, north, up), abs=1e-4)


def test_enu_known_values():
    frame = geo.LocalFrame(47.0, 8.0)
    assert frame.to_enu(47.0, 8.0) == pytest.approx((0.0, 0.0, 0.0), abs=1e-6)
    # A point 1 km due north along the geodesic is about 1 km north in ENU (tangent plane:
    # up drops by d^2 / 2R, about 8 cm).
    lat, lon = geo.destination(47.0, 8.0, 0.0, 1000.0)
    e, n, u = frame.to_enu(lat, lon)
    assert e == pytest.approx(0.0, abs=1e-6)
    assert n == pytest.approx(1000.0, abs=0.01)
    assert u == pytest.approx(-0.0785, abs=0.01)
    e, n, _ = frame.to_enu(*geo.destination(47.0, 8.0, 90.0, 500.0))
    assert e == pytest.approx(500.0, abs=0.01) and abs(n) < 0.1


def test_bad_positions_are_refused():
    for lat, lon in ((91.0, 0.0), (0.0, 181.0), (float('nan'), 0.0), (86.0, 0.0)):
        with pytest.raises(InputError):
            geo.check_latlon(lat, lon)
    with pytest.raises(InputError):
        geo.LocalFrame(95.0, 0.0)
    assert np.isfinite(geo.cell_size_m(geo.cell_at(85.0, 0.0, 3)))
