"""Cells, actions and coordinates: Web-Mercator tiles, the k x k zoom grid, ENU and UTM.

A *cell* is a Web-Mercator tile ``mercantile.Tile(x, y, z)`` (XYZ scheme: y grows southwards).
One zoom step with a k x k grid (k = 2**j) goes from a cell at zoom z to one of its k**2
descendants at zoom z + j. Action ``a`` maps to ``row, col = divmod(a, k)``; row 0 is the
northern row, col 0 the western column.

Angles are degrees, distances metres. Nothing here imports torch or rclpy.
"""

from functools import lru_cache
import math

import mercantile
import numpy as np
from pyproj import CRS, Geod, Transformer

from geozoom_ros.errors import InputError

Cell = mercantile.Tile

#: WGS84 semi-major axis (m): the sphere radius of Web-Mercator.
EARTH_RADIUS_M = 6378137.0
#: Web-Mercator's latitude limit (degrees).
MAX_LAT = 85.0511287798066

_GEOD = Geod(ellps='WGS84')


# --------------------------------------------------------------------------------------------
# Grid and actions

def grid_levels(k):
    """Zoom levels per step for a k x k grid (k must be a power of two >= 2)."""
    if k < 2 or k & (k - 1):
        raise InputError(f'grid size k={k} is not a power of two >= 2; use 2, 4, 8, ...')
    return k.bit_length() - 1


def action_to_rowcol(action, k=4):
    """Return ``(row, col)`` of an action; row 0 = north, col 0 = west."""
    if not 0 <= action < k * k:
        raise InputError(f'action {action} is outside 0..{k * k - 1} for a {k}x{k} grid')
    return divmod(int(action), k)


def rowcol_to_action(row, col, k=4):
    """Return the action of grid position ``(row, col)``."""
    if not (0 <= row < k and 0 <= col < k):
        raise InputError(f'grid position ({row}, {col}) is outside a {k}x{k} grid')
    return int(row) * k + int(col)


def child(cell, action, k=4):
    """Return the descendant cell selected by ``action`` (zoom ``cell.z + log2(k)``)."""
    j = grid_levels(k)
    row, col = action_to_rowcol(action, k)
    return Cell(cell.x * k + col, cell.y * k + row, cell.z + j)


def children(cell, k=4):
    """Return the k*k descendants of ``cell`` in action order (row-major, north-west first)."""
    return [child(cell, a, k) for a in range(k * k)]


def action_of(parent, descendant, k=4):
    """Return the action that leads from ``parent`` to its grid descendant ``descendant``."""
    j = grid_levels(k)
    if descendant.z != parent.z + j:
        raise InputError(f'{descendant} is not {j} zoom levels below {parent}')
    row = descendant.y - parent.y * k
    col = descendant.x - parent.x * k
    if not (0 <= row < k and 0 <= col < k):
        raise InputError(f'{descendant} is not a descendant of {parent}')
    return rowcol_to_action(row, col, k)


def descend(root, actions, k=4):
    """Return the cell reached from ``root`` by a sequence of actions."""
    cell = root
    for a in actions:
        cell = child(cell, a, k)
    return cell


def ancestor(cell, zoom):
    """Return the ancestor of ``cell`` at ``zoom`` (``zoom <= cell.z``)."""
    if zoom > cell.z:
        raise InputError(f'zoom {zoom} is below {cell}; an ancestor needs zoom <= {cell.z}')
    shift = cell.z - zoom
    return Cell(cell.x >> shift, cell.y >> shift, zoom)


def actions_between(root, descendant, k=4):
    """Return the action path from ``root`` down to ``descendant``.

    ``descendant.z - root.z`` must be a multiple of log2(k) and ``descendant`` must lie inside
    ``root``.
    """
    j = grid_levels(k)
    dz = descendant.z - root.z
    if dz < 0 or dz % j:
        raise InputError(f'{descendant} is not a whole number of {k}x{k} steps below {root}')
    if ancestor(descendant, root.z) != root:
        raise InputError(f'{descendant} does not lie inside {root}')
    path = []
    for z in range(root.z + j, descendant.z + 1, j):
        parent = ancestor(descendant, z - j)
        path.append(action_of(parent, ancestor(descendant, z), k))
    return path


def cell_at(lat, lon, zoom):
    """Return the cell at ``zoom`` containing a point (degrees)."""
    check_latlon(lat, lon)
    return Cell(*mercantile.tile(lon, lat, zoom))


def path_to(root, lat, lon, steps, k=4):
    """Return the actions that zoom from ``root`` to the cell holding (lat, lon).

    Raises InputError if the point lies outside ``root``.
    """
    target = cell_at(lat, lon, root.z + steps * grid_levels(k))
    return actions_between(root, target, k)


# --------------------------------------------------------------------------------------------
# Cell geometry

def cell_bounds(cell):
    """Return ``(west, south, east, north)`` of a cell in degrees."""
    b = mercantile.bounds(cell)
    return b.west, b.south, b.east, b.north


def cell_xy_bounds(cell):
    """Return ``(left, bottom, right, top)`` of a cell in EPSG:3857 metres."""
    b = mercantile.xy_bounds(cell)
    return b.left, b.bottom, b.right, b.top


def cell_center(cell):
    """Return ``(lat, lon)`` of the cell's centre (the centre in Mercator metres)."""
    return tile_center(cell.x, cell.y, cell.z)


def tile_center(x, y, z):
    """Return ``(lat, lon)`` degrees (Python floats) of the centre of cell (x, y) at zoom z.

    Closed-form spherical Mercator, for per-frame use without building a cell.
    """
    n = float(2 ** z)
    lat = math.atan(math.sinh(math.pi * (1.0 - 2.0 * (float(y) + 0.5) / n)))
    return math.degrees(lat), (float(x) + 0.5) / n * 360.0 - 180.0


def cell_size_m(cell):
    """Return the ground side length of a cell in metres at its centre latitude."""
    lat, _ = cell_center(cell)
    return 2.0 * math.pi * EARTH_RADIUS_M * math.cos(math.radians(lat)) / (2 ** cell.z)


def ground_resolution_m(zoom, lat, tile_size=256):
    """Return metres per pixel of a ``tile_size`` tile at ``zoom`` and latitude ``lat``."""
    return 2.0 * math.pi * EARTH_RADIUS_M * math.cos(math.radians(lat)) / (tile_size * 2 ** zoom)


def zoom_for_resolution(m_per_px, lat, tile_size=256):
    """Return the smallest integer zoom whose tiles are at least as fine as ``m_per_px``."""
    z = math.log2(2.0 * math.pi * EARTH_RADIUS_M * math.cos(math.radians(lat))
                  / (tile_size * m_per_px))
    return max(0, int(math.ceil(z - 1e-9)))


# --------------------------------------------------------------------------------------------
# Coordinates

def check_latlon(lat, lon):
    """Raise InputError unless (lat, lon) is a finite point Web-Mercator can hold."""
    if not (np.all(np.isfinite(lat)) and np.all(np.isfinite(lon))):
        raise InputError(f'position ({lat}, {lon}) is not finite')
    if np.any(np.abs(lat) > MAX_LAT) or np.any(np.abs(lon) > 180.0):
        raise InputError(f'position ({lat}, {lon}) is off the map: latitude must be within '
                         f'+-{MAX_LAT:.4f} and longitude within +-180 degrees')


def geodesic_distance_m(lat1, lon1, lat2, lon2):
    """Return the WGS84 geodesic distance in metres (scalars or arrays, broadcast)."""
    lat1, lon1, lat2, lon2 = np.broadcast_arrays(*(np.asarray(v, dtype=float)
                                                   for v in (lat1, lon1, lat2, lon2)))
    _, _, dist = _GEOD.inv(lon1, lat1, lon2, lat2)
    dist = np.asarray(dist, dtype=float)
    return float(dist) if dist.ndim == 0 else dist


def geodesic_bearing_deg(lat1, lon1, lat2, lon2):
    """Return the forward azimuth from point 1 to point 2 (degrees clockwise from north)."""
    az, _, _ = _GEOD.inv(lon1, lat1, lon2, lat2)
    return float(np.mod(az, 360.0)) if np.ndim(az) == 0 else np.mod(az, 360.0)


def destination(lat, lon, bearing_deg, distance_m):
    """Return ``(lat, lon)`` reached from a point along a geodesic."""
    lon2, lat2, _ = _GEOD.fwd(lon, lat, bearing_deg, distance_m)
    return lat2, lon2


def utm_epsg(lat, lon):
    """Return the EPSG code of the UTM zone (WGS84) that holds a point."""
    check_latlon(lat, lon)
    zone = int((lon + 180.0) // 6.0) % 60 + 1
    return (32600 if lat >= 0 else 32700) + zone


@lru_cache(maxsize=64)
def _transformer(src, dst):
    return Transformer.from_crs(CRS.from_user_input(src), CRS.from_user_input(dst),
                                always_xy=True)


def latlon_to_utm(lat, lon, epsg=None):
    """Return ``(easting, northing, epsg)`` in metres; the zone of the point unless given."""
    epsg = epsg or utm_epsg(float(np.mean(lat)), float(np.mean(lon)))
    e, n = _transformer(4326, epsg).transform(lon, lat)
    return e, n, epsg


def utm_to_latlon(easting, northing, epsg):
    """Return ``(lat, lon)`` of UTM coordinates in the zone ``epsg``."""
    lon, lat = _transformer(epsg, 4326).transform(easting, northing)
    return lat, lon


class LocalFrame:
    """A local East-North-Up frame (metres) anchored at a geodetic origin.

    Uses PROJ's topocentric conversion on the WGS84 ellipsoid, so it stays exact far from the
    origin (no flat-Earth approximation).
    """

    def __init__(self, lat0, lon0, h0=0.0):
        check_latlon(lat0, lon0)
        self.lat0, self.lon0, self.h0 = float(lat0), float(lon0), float(h0)
        pipeline = ('+proj=pipeline +step +proj=cart +ellps=WGS84 '
                    f'+step +proj=topocentric +ellps=WGS84 +lat_0={self.lat0!r} '
                    f'+lon_0={self.lon0!r} +h_0={self.h0!r}')
        self._fwd = Transformer.from_pipeline(pipeline)

    def to_enu(self, lat, lon, h=0.0):
        """Return ``(east, north, up)`` in metres of geodetic points."""
        e, n, u = self._fwd.transform(lon, lat, h)
        return e, n, u

    def to_latlon(self, east, north, up=0.0):
        """Return ``(lat, lon, h)`` of ENU points."""
        lon, lat, h = self._fwd.transform(east, north, up, direction='INVERSE')
        return lat, lon, h

    def __repr__(self):
        return f'LocalFrame(lat0={self.lat0}, lon0={self.lon0}, h0={self.h0})'
