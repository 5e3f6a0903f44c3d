"""A procedural city model: roads, blocks, buildings, trees, parks, water, plazas, landmarks.

Everything lives in the local East-North-Up frame of the city's centre (metres, x east, y
north). The model is pure numpy and deterministic per seed: every block draws from its own
``np.random.default_rng([seed, stream, i, j])`` stream, so a city of any size is generated block
by block and two runs give the same city.

The road network is a perturbed lattice, rotated by a random angle, with arterials, streets
and lanes of different widths; ``City.roads`` holds the connected part inside the city bounds
(routes are planned on it), ``City.outer_roads`` the rest that is drawn around the edges.

:func:`chunk_mesh` turns the part of the model that lies in a rectangle into triangles for the
renderers (see ``render_gl``).
"""

from dataclasses import dataclass, field
import math

import numpy as np

from geozoom_ros.errors import InputError
from geozoom_ros.geo import LocalFrame
from geozoom_ros.world import styles as S

ROAD_KINDS = ('arterial', 'street', 'lane')
_WIDTH = {'arterial': (19.0, 25.0), 'street': (10.0, 13.5), 'lane': (6.0, 7.5)}
_SIDEWALK = {'arterial': (3.5, 5.0), 'street': (2.5, 3.8), 'lane': (1.5, 2.2)}
_MAX_SIZE_M = 20000.0
_EXTRA_M = 160.0  # geometry drawn beyond the bounds, so views near the edge see a city


@dataclass
class Road:
    """A road centreline: ``polyline`` (N, 2) ENU metres, carriageway ``width_m``, ``kind``."""

    polyline: np.ndarray
    width_m: float
    kind: str
    sidewalk_m: float = 3.0
    trees: bool = False


@dataclass
class Building:
    """A building: CCW footprint (N, 2) ENU metres, wall height and roof (metres above ground).

    ``roof_color`` and ``facade_color`` index the style's shared palettes; ``roof_kind`` is
    'flat' or 'gable' (ridge ``ridge_m`` above the walls, along the longer side); ``params``
    in 0..1 varies window layouts.
    """

    footprint: np.ndarray
    height_m: float
    roof_color: int
    facade_color: int
    roof_kind: str = 'flat'
    ridge_m: float = 0.0
    params: float = 0.5


@dataclass
class Landmark:
    """A distinctive structure ('tower', 'dome', 'spire', 'obelisk') at ``xy`` (ENU metres)."""

    kind: str
    xy: np.ndarray
    size_m: float
    height_m: float
    color: int
    heading_deg: float = 0.0


@dataclass
class Block:
    """A city block: the CCW polygon inside its sidewalks, its use and its zone."""

    polygon: np.ndarray
    kind: str  # buildings | park | plaza | water | parking
    zone: str  # downtown | midrise | residential | industrial | green
    index: tuple = (0, 0)


@dataclass
class City:
    """The generated city (ENU metres in ``frame``, centred on the origin)."""

    seed: int
    size_m: float
    origin: tuple
    style: str
    knobs: S.Knobs
    frame: LocalFrame
    rotation_deg: float
    roads: list
    outer_roads: list
    nodes: np.ndarray
    edges: np.ndarray
    blocks: list
    buildings: list
    trees: dict
    parks: list
    water: list
    plazas: list
    landmarks: list
    centres: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))

    @property
    def bounds_enu(self):
        """Return ``(xmin, ymin, xmax, ymax)`` of the mapped area in ENU metres."""
        h = self.size_m / 2.0
        return (-h, -h, h, h)

    def all_roads(self):
        """Return every drawn road (routable ones first)."""
        return self.roads + self.outer_roads

    def counts(self):
        """Return the number of each kind of object (a JSON-friendly dict)."""
        return dict(roads=len(self.roads), outer_roads=len(self.outer_roads),
                    blocks=len(self.blocks), buildings=len(self.buildings),
                    trees=int(len(self.trees['xy'])), parks=len(self.parks),
                    water=len(self.water), plazas=len(self.plazas),
                    landmarks=len(self.landmarks))

    def __getstate__(self):
        # The PROJ transformer and the chunk index are rebuilt on the other side.
        state = dict(self.__dict__)
        state.pop('frame', None)
        state.pop('_anchors', None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.frame = LocalFrame(*self.origin)

    def road_graph(self):
        """Return ``(nodes (M, 2), edges (K, 2) int)``: routable roads as a graph.

        Edge k joins ``nodes[edges[k, 0]]`` and ``nodes[edges[k, 1]]`` and is ``roads[k]``.
        """
        return self.nodes, self.edges


# --------------------------------------------------------------------------------------------
# Geometry helpers

def polygon_area(poly):
    """Return the signed area (m^2) of a polygon (positive when counter-clockwise)."""
    x, y = poly[:, 0], poly[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


def points_in_polygon(pts, poly):
    """Return a bool mask of the points (N, 2) inside a polygon (even-odd rule)."""
    pts = np.asarray(pts, float).reshape(-1, 2)
    inside = np.zeros(len(pts), bool)
    x, y = pts[:, 0], pts[:, 1]
    n = len(poly)
    for i in range(n):
        x1, y1 = poly[i]
        x2, y2 = poly[(i + 1) % n]
        cond = (y1 > y) != (y2 > y)
        with np.errstate(divide='ignore', invalid='ignore'):
            xc = x1 + (y - y1) * (x2 - x1) / (y2 - y1)
        inside ^= cond & (x < xc)
    return inside


def _inset_quad(quad, offsets):
    """Return a CCW quad with each edge k moved inwards by ``offsets[k]`` metres."""
    n = len(quad)
    lines = []
    for k in range(n):
        a, b = quad[k], quad[(k + 1) % n]
        d = b - a
        d = d / np.linalg.norm(d)
        normal = np.array([-d[1], d[0]])
        lines.append((a + normal * offsets[k], d))
    out = []
    for k in range(n):
        p1, d1 = lines[k - 1]
        p2, d2 = lines[k]
        m = np.array([d1, -d2]).T
        t = np.linalg.solve(m, p2 - p1)
        out.append(p1 + d1 * t[0])
    return np.array(out)


def _bilinear(q, s, t):
    """Return points of quad q (corners at (s, t) = (0,0),(1,0),(1,1),(0,1)) for arrays s, t."""
    s = np.asarray(s, float)[..., None]
    t = np.asarray(t, float)[..., None]
    return ((1 - s) * (1 - t) * q[0] + s * (1 - t) * q[1] + s * t * q[2] + (1 - s) * t * q[3])


def _sub_quad(q, s0, s1, t0, t1):
    return _bilinear(q, np.array([s0, s1, s1, s0]), np.array([t0, t0, t1, t1]))


# --------------------------------------------------------------------------------------------
# The city

def _check_args(seed, size_m, origin_latlon):
    try:
        size = float(size_m)
    except (TypeError, ValueError):
        raise InputError(f'size_m={size_m!r} is not a number; give the city side in metres')
    if not math.isfinite(size) or size < 100.0 or size > _MAX_SIZE_M:
        raise InputError(f'size_m={size_m!r} is out of range; give a city side between 100 '
                         f'and {_MAX_SIZE_M:.0f} metres')
    try:
        lat, lon = (float(v) for v in origin_latlon)
    except (TypeError, ValueError):
        raise InputError(f'origin {origin_latlon!r} is not LAT,LON in degrees')
    if not (math.isfinite(lat) and math.isfinite(lon)) or abs(lat) > 80.0 or abs(lon) > 180.0:
        raise InputError(f'origin ({lat}, {lon}) is off the Earth or outside the UTM band; '
                         'give a latitude within +-80 and a longitude within +-180 degrees')
    if int(seed) != seed or seed < 0:
        raise InputError(f'seed={seed!r} must be a non-negative integer')
    return int(seed), size, (lat, lon)


def make_city(seed, size_m, origin_latlon, style='summer', knobs=None):
    """Generate a city of ``size_m`` x ``size_m`` metres centred on ``origin_latlon``.

    ``style`` is one of :data:`styles.STYLES`; ``knobs`` a :class:`styles.Knobs`, a dict of
    knob overrides or None. Deterministic per (seed, size_m, knobs); the style only changes
    colours, so every style of a seed has the same geometry.
    """
    seed, size, origin = _check_args(seed, size_m, origin_latlon)
    S.check_style(style)
    knobs = S.make_knobs(knobs)
    frame = LocalFrame(*origin)
    rng = np.random.default_rng([seed, 1])
    rotation = float(rng.uniform(0.0, 90.0))
    half = size / 2.0 + _EXTRA_M
    ext = half * (abs(math.cos(math.radians(rotation))) + abs(math.sin(math.radians(rotation))))
    ext += 200.0
    us, ukind = _lattice_lines(rng, ext)
    vs, vkind = _lattice_lines(rng, ext)
    nu, nv = len(us), len(vs)
    c, s = math.cos(math.radians(rotation)), math.sin(math.radians(rotation))
    rot = np.array([[c, -s], [s, c]])
    # Jitter nodes along lines that are not arterials: streets bend, arterials stay straight.
    ju = rng.normal(0.0, 3.0, (nu, nv)).clip(-7, 7)
    jv = rng.normal(0.0, 3.0, (nu, nv)).clip(-7, 7)
    ju[np.array([k == 'arterial' for k in ukind])] = 0.0
    jv[:, np.array([k == 'arterial' for k in vkind])] = 0.0
    uv = np.stack(np.broadcast_arrays(us[:, None] + ju, vs[None, :] + jv), -1)
    xy = uv @ rot.T  # (nu, nv, 2) ENU
    inside_draw = np.all(np.abs(xy) <= half, axis=-1)
    margin_in = size / 2.0 - 4.0
    inside_route = np.all(np.abs(xy) <= margin_in, axis=-1)

    widths_u = [_line_profile(rng, k) for k in ukind]  # per column i (lines along v)
    widths_v = [_line_profile(rng, k) for k in vkind]  # per row j (lines along u)

    # Edges of the lattice: along u (row j fixed) and along v (column i fixed).
    edge_list = []
    for i in range(nu):
        for j in range(nv):
            if i + 1 < nu:
                edge_list.append(((i, j), (i + 1, j), widths_v[j], vkind[j]))
            if j + 1 < nv:
                edge_list.append(((i, j), (i, j + 1), widths_u[i], ukind[i]))
    routable, outer = [], []
    for a, b, prof, kind in edge_list:
        if not (inside_draw[a] or inside_draw[b]):
            continue
        (w, sw, trees) = prof
        road = Road(np.array([xy[a], xy[b]]), w, kind, sw, trees)
        if inside_route[a] and inside_route[b]:
            routable.append((a, b, road))
        else:
            outer.append(road)
    roads, nodes, edges, dropped = _largest_component(routable)
    outer.extend(dropped)

    # Zoning: one downtown per (2 km)^2, the rest midrise, residential or industrial.
    n_centres = max(1, int(round((size / 2000.0) ** 2)))
    centres = rng.uniform(-size * 0.3, size * 0.3, (n_centres, 2))
    blocks, buildings, parks, water, plazas = [], [], [], [], []
    tree_parts = []
    for i in range(nu - 1):
        for j in range(nv - 1):
            corners = np.array([xy[i, j], xy[i + 1, j], xy[i + 1, j + 1], xy[i, j + 1]])
            if not np.any(np.all(np.abs(corners) <= half, axis=1)):
                continue
            offs = [widths_v[j][0] / 2 + widths_v[j][1], widths_u[i + 1][0] / 2 +
                    widths_u[i + 1][1], widths_v[j + 1][0] / 2 + widths_v[j + 1][1],
                    widths_u[i][0] / 2 + widths_u[i][1]]
            inner = _inset_quad(corners, offs)
            if polygon_area(inner) < 200.0:
                continue
            brng = np.random.default_rng([seed, 7, i, j])
            centre = inner.mean(0)
            d = float(np.min(np.linalg.norm(centres - centre, axis=1)))
            block = _make_block(brng, inner, centre, d, size, (i, j))
            blocks.append(block)
            b, t, extra = _fill_block(brng, block, knobs)
            buildings.extend(b)
            tree_parts.append(t)
            parks.extend(extra.get('parks', []))
            water.extend(extra.get('water', []))
            plazas.extend(extra.get('plazas', []))
    tree_parts.append(_street_trees(np.random.default_rng([seed, 3]), roads + outer, knobs))
    landmarks = _place_landmarks(np.random.default_rng([seed, 5]), blocks, buildings,
                                 tree_parts, plazas, knobs, size)
    trees = _concat_trees(tree_parts)
    trees = _drop_trees_near_buildings(trees, buildings)
    return City(seed=seed, size_m=size, origin=origin, style=style, knobs=knobs, frame=frame,
                rotation_deg=rotation, roads=roads, outer_roads=outer, nodes=nodes,
                edges=edges, blocks=blocks, buildings=buildings, trees=trees, parks=parks,
                water=water, plazas=plazas, landmarks=landmarks, centres=centres)


def _lattice_lines(rng, ext):
    """Return line offsets (metres) covering [-ext, ext] and their kinds."""
    pos, kinds = [], []
    x = -ext
    next_art = int(rng.integers(0, 4))
    k = 0
    while x <= ext:
        pos.append(x)
        if k == next_art:
            kinds.append('arterial')
            next_art = k + int(rng.integers(3, 7))
        else:
            kinds.append('lane' if rng.random() < 0.15 else 'street')
        x += float(rng.choice([rng.uniform(65.0, 110.0), rng.uniform(110.0, 170.0)],
                              p=[0.6, 0.4]))
        k += 1
    return np.array(pos), kinds


def _line_profile(rng, kind):
    w = float(rng.uniform(*_WIDTH[kind]))
    sw = float(rng.uniform(*_SIDEWALK[kind]))
    trees = bool(rng.random() < {'arterial': 0.7, 'street': 0.45, 'lane': 0.1}[kind])
    return (w, sw, trees)


def _largest_component(routable):
    """Keep the largest connected part of the routable edges; return roads, nodes, edges."""
    index = {}
    for a, b, _ in routable:
        for n in (a, b):
            index.setdefault(n, len(index))
    parent = list(range(len(index)))

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x
    for a, b, _ in routable:
        ra, rb = find(index[a]), find(index[b])
        if ra != rb:
            parent[ra] = rb
    if not index:
        return [], np.zeros((0, 2)), np.zeros((0, 2), int), [r for _, _, r in routable]
    roots = np.array([find(k) for k in range(len(index))])
    best = np.bincount(roots).argmax()
    keep_nodes = {}
    roads, edges, dropped = [], [], []
    node_xy = []
    for a, b, road in routable:
        if roots[index[a]] != best:
            dropped.append(road)
            continue
        ids = []
        for n, p in ((a, road.polyline[0]), (b, road.polyline[-1])):
            if n not in keep_nodes:
                keep_nodes[n] = len(node_xy)
                node_xy.append(p)
            ids.append(keep_nodes[n])
        roads.append(road)
        edges.append(ids)
    return roads, np.array(node_xy, float), np.array(edges, int).reshape(-1, 2), dropped


def _make_block(rng, inner, centre, d_centre, size, index):
    scale = min(size, 2000.0)
    p_down = math.exp(-(d_centre / (0.18 * scale)) ** 2)
    p_mid = math.exp(-(d_centre / (0.42 * scale)) ** 2) - p_down
    u = rng.random()
    if u < 0.06:
        return Block(inner, 'park', 'green', index)
    if u < 0.08:
        return Block(inner, 'water', 'green', index)
    if u < 0.105 and d_centre < 0.5 * scale:
        return Block(inner, 'plaza', 'downtown', index)
    if u < 0.12:
        return Block(inner, 'parking', 'industrial', index)
    z = rng.random()
    if z < p_down:
        zone = 'downtown'
    elif z < p_down + p_mid:
        zone = 'midrise'
    else:
        zone = 'industrial' if rng.random() < 0.15 else 'residential'
    return Block(inner, 'buildings', zone, index)


_ZONES = {
    # lot frontage (m), depth (m), floors (lo, hi), gable probability, gap probability
    'downtown': dict(lot=(16, 30), depth=(16, 26), floors=(6, 22), gable=0.0, gap=0.04,
                     interior=0.7, setback=(0.0, 1.0)),
    'midrise': dict(lot=(12, 22), depth=(11, 16), floors=(3, 7), gable=0.25, gap=0.1,
                    interior=0.15, setback=(0.0, 2.5)),
    'residential': dict(lot=(13, 20), depth=(8, 12), floors=(1, 3), gable=0.75, gap=0.12,
                        interior=0.0, setback=(3.0, 7.0)),
    'industrial': dict(lot=(30, 60), depth=(20, 40), floors=(1, 3), gable=0.05, gap=0.15,
                       interior=1.0, setback=(2.0, 6.0)),
}


def _palette_pick(rng, knobs):
    k = int(knobs.palette_size)
    # Mildly skewed frequencies: some colours are common, none is unique.
    w = 1.0 / (1.0 + 0.15 * np.arange(k))
    w /= w.sum()
    return int(rng.choice(k, p=w)), int(rng.choice(k, p=w))


def _new_building(rng, fp, zone_cfg, knobs, floors=None, roof_kind=None):
    lo, hi = zone_cfg['floors']
    if floors is None:
        floors = int(round(np.exp(rng.uniform(np.log(lo), np.log(hi + 0.99)))))
        floors = int(np.clip(floors, lo, hi))
    floor_h = float(rng.uniform(2.9, 3.4))
    roof_c, facade_c = _palette_pick(rng, knobs)
    if roof_kind is None:
        roof_kind = 'gable' if rng.random() < zone_cfg['gable'] else 'flat'
    ridge = float(rng.uniform(1.8, 3.5)) if roof_kind == 'gable' else 0.0
    if polygon_area(fp) < 0:
        fp = fp[::-1]
    return Building(fp.astype(np.float64), floors * floor_h + float(rng.uniform(0.2, 1.0)),
                    roof_c, facade_c, roof_kind, ridge, float(rng.random()))


def _fill_block(rng, block, knobs):
    """Return (buildings, trees dict, extras) of one block."""
    q = block.polygon
    trees = []
    extras = {}
    dens = knobs.tree_density
    ls = 0.5 * (np.linalg.norm(q[1] - q[0]) + np.linalg.norm(q[2] - q[3]))
    lt = 0.5 * (np.linalg.norm(q[3] - q[0]) + np.linalg.norm(q[2] - q[1]))
    if block.kind in ('park', 'water'):
        extras['parks'] = [q]
        lake = None
        if block.kind == 'water':
            c = q.mean(0)
            r = 0.3 * min(ls, lt)
            ang = np.sort(rng.uniform(0, 2 * np.pi, 18))
            rad = r * rng.uniform(0.75, 1.25, 18)
            lake = c + np.stack([np.cos(ang) * rad * 1.3, np.sin(ang) * rad], 1)
            ang_q = math.atan2(*(q[1] - q[0])[::-1])
            rot = np.array([[math.cos(ang_q), -math.sin(ang_q)],
                            [math.sin(ang_q), math.cos(ang_q)]])
            lake = (lake - c) @ rot.T + c
            extras['water'] = [lake]
        n = int(ls * lt / 320.0 * dens)
        pts = _bilinear(q, rng.uniform(0.04, 0.96, n), rng.uniform(0.04, 0.96, n))
        if lake is not None:
            pts = pts[~points_in_polygon(pts, lake * 1.0 + (lake - lake.mean(0)) * 0.15)]
        trees.append(_tree_set(rng, pts, conifer_p=0.3))
        return [], _concat_trees(trees), extras
    if block.kind == 'plaza':
        extras['plazas'] = [q]
        n = int(2 * (ls + lt) / 14.0 * dens)
        s = rng.uniform(0, 4, n)
        side = s.astype(int)
        f = s - side
        ss = np.where(side == 0, f, np.where(side == 1, 0.94, np.where(side == 2, 1 - f, 0.06)))
        tt = np.where(side == 0, 0.06, np.where(side == 1, f, np.where(side == 2, 0.94, 1 - f)))
        trees.append(_tree_set(rng, _bilinear(q, ss, tt), conifer_p=0.0, small=True))
        return [], _concat_trees(trees), extras
    if block.kind == 'parking':
        extras['plazas'] = []
        return [], _concat_trees(trees), {'parking': [q]}

    cfg = _ZONES[block.zone]
    buildings = []
    if block.zone == 'industrial':
        ns = max(1, int(round(ls / rng.uniform(*cfg['lot']))))
        nt = max(1, int(round(lt / rng.uniform(*cfg['lot']))))
        m = 4.0 / max(ls, 1.0), 4.0 / max(lt, 1.0)
        for a in range(ns):
            for b in range(nt):
                if rng.random() < cfg['gap']:
                    continue
                s0, s1 = a / ns + m[0], (a + 1) / ns - m[0]
                t0, t1 = b / nt + m[1], (b + 1) / nt - m[1]
                if s1 - s0 <= 0 or t1 - t0 <= 0:
                    continue
                buildings.append(_new_building(rng, _sub_quad(q, s0, s1, t0, t1), cfg, knobs))
        return buildings, _concat_trees(trees), extras

    depth = float(rng.uniform(*cfg['depth']))
    ds = min(0.5, depth / max(ls, 1.0))
    dt = min(0.5, depth / max(lt, 1.0))
    # Four sides of lots: bottom and top take the full length, left and right the rest.
    sides = [('s', 0.0, ds, dt, 0), ('s', 1.0, ds, dt, 2)]
    lots = []
    for axis, edge_pos, dss, dtt, side in sides:
        lot_w = float(rng.uniform(*cfg['lot']))
        n = max(1, int(round(ls / lot_w)))
        cuts = np.sort(np.concatenate([[0.0, 1.0], rng.uniform(0.05, 0.95, n - 1)]))
        cuts = _even_cuts(cuts, n)
        for k in range(n):
            t0, t1 = (0.0, dtt) if side == 0 else (1.0 - dtt, 1.0)
            lots.append(('t', side, cuts[k], cuts[k + 1], t0, t1))
    for side in (1, 3):
        inner_len = lt * (1 - 2 * dt)
        if inner_len < 8.0:
            continue
        lot_w = float(rng.uniform(*cfg['lot']))
        n = max(1, int(round(inner_len / lot_w)))
        cuts = dt + (1 - 2 * dt) * _even_cuts(np.linspace(0, 1, n + 1), n)
        for k in range(n):
            s0, s1 = (1.0 - ds, 1.0) if side == 1 else (0.0, ds)
            lots.append(('s', side, s0, s1, cuts[k], cuts[k + 1]))
    for lot in lots:
        if rng.random() < cfg['gap']:
            continue
        fp = _lot_footprint(rng, q, lot, cfg, block.zone, ls, lt)
        if fp is None:
            continue
        if block.zone in ('downtown', 'midrise') and rng.random() < 0.25:
            # A lower rear wing: footprints become L- or step-shaped in height.
            front, back = _split_front_back(fp, lot, rng)
            b1 = _new_building(rng, front, cfg, knobs)
            floors = max(1, int(b1.height_m / 3.2 * rng.uniform(0.4, 0.7)))
            b2 = _new_building(rng, back, cfg, knobs, floors=floors, roof_kind='flat')
            b2.roof_color, b2.facade_color = b1.roof_color, b1.facade_color
            buildings.extend([b1, b2])
        else:
            buildings.append(_new_building(rng, fp, cfg, knobs))
    interior = _sub_quad(q, ds + 0.02, 1 - ds - 0.02, dt + 0.02, 1 - dt - 0.02)
    area_in = polygon_area(interior)
    if area_in > 150.0 and ds < 0.45 and dt < 0.45:
        if rng.random() < cfg['interior']:
            if block.zone == 'downtown' and rng.random() < 0.25:
                c = interior.mean(0)
                r = min(ls * (1 - 2 * ds), lt * (1 - 2 * dt)) * 0.35
                if r > 6:
                    ang = np.linspace(0, 2 * np.pi, 13)[:-1]
                    fp = c + r * np.stack([np.cos(ang), np.sin(ang)], 1)
                    buildings.append(_new_building(rng, fp, cfg, knobs,
                                                   floors=int(rng.integers(12, 30))))
            else:
                fp = _sub_quad(q, ds + 0.06, 1 - ds - 0.06, dt + 0.06, 1 - dt - 0.06)
                if polygon_area(fp) > 80.0:
                    buildings.append(_new_building(rng, fp, cfg, knobs))
        else:
            n = int(area_in / 220.0 * dens)
            pts = _bilinear(interior, rng.uniform(0.1, 0.9, n), rng.uniform(0.1, 0.9, n))
            trees.append(_tree_set(rng, pts, conifer_p=0.2))
    return buildings, _concat_trees(trees), extras


def _even_cuts(cuts, n):
    even = np.linspace(0.0, 1.0, n + 1)
    return 0.6 * even + 0.4 * cuts


def _lot_footprint(rng, q, lot, cfg, zone, ls, lt):
    axis, side, a0, a1, b0, b1 = lot
    setback = float(rng.uniform(*cfg['setback']))
    gap = float(rng.uniform(0.0, 1.5)) if zone != 'residential' else float(rng.uniform(1.5, 4))
    if axis == 't':  # along s, front at t=0 (side 0) or t=1 (side 2)
        s0, s1 = a0 + gap / ls, a1 - gap / ls
        if side == 0:
            t0, t1 = b0 + setback / lt, b1
        else:
            t0, t1 = b0, b1 - setback / lt
        if zone == 'residential':
            tw = (t1 - t0) * rng.uniform(0.6, 0.95)
            t0, t1 = (t0, t0 + tw) if side == 0 else (t1 - tw, t1)
    else:
        t0, t1 = b0 + gap / lt, b1 - gap / lt
        if side == 1:
            s0, s1 = a0, a1 - setback / ls
        else:
            s0, s1 = a0 + setback / ls, a1
        if zone == 'residential':
            sw = (s1 - s0) * rng.uniform(0.6, 0.95)
            s0, s1 = (s1 - sw, s1) if side == 1 else (s0, s0 + sw)
    if (s1 - s0) * ls < 4.0 or (t1 - t0) * lt < 4.0:
        return None
    return _sub_quad(q, s0, s1, t0, t1)


def _split_front_back(fp, lot, rng):
    axis, side = lot[0], lot[1]
    f = float(rng.uniform(0.45, 0.7))
    a, b, c, d = fp  # corners at (s0,t0), (s1,t0), (s1,t1), (s0,t1)
    if axis == 't':
        if side == 0:
            m0, m1 = a + (d - a) * f, b + (c - b) * f
            return np.array([a, b, m1, m0]), np.array([m0, m1, c, d])
        m0, m1 = d + (a - d) * f, c + (b - c) * f
        return np.array([m0, m1, c, d]), np.array([a, b, m1, m0])
    if side == 1:
        m0, m1 = b + (a - b) * f, c + (d - c) * f
        return np.array([m0, b, c, m1]), np.array([a, m0, m1, d])
    m0, m1 = a + (b - a) * f, d + (c - d) * f
    return np.array([a, m0, m1, d]), np.array([m0, b, c, m1])


def _tree_set(rng, pts, conifer_p=0.2, small=False):
    n = len(pts)
    kind = (rng.random(n) < conifer_p).astype(np.int8)
    height = rng.uniform(6.0, 14.0, n) * (0.75 if small else 1.0)
    crown = np.where(kind == 1, rng.uniform(1.6, 2.8, n), rng.uniform(2.2, 4.2, n))
    crown *= (0.8 if small else 1.0)
    color = np.where(kind == 1, S.CONIFER0 + rng.integers(0, S.N_CONIFER, n),
                     S.FOLIAGE0 + rng.integers(0, S.N_FOLIAGE, n))
    return dict(xy=np.asarray(pts, float).reshape(-1, 2), height=height, crown=crown,
                kind=kind, color=color.astype(np.int16))


def _concat_trees(parts):
    parts = [p for p in parts if len(p['xy'])]
    if not parts:
        return dict(xy=np.zeros((0, 2)), height=np.zeros(0), crown=np.zeros(0),
                    kind=np.zeros(0, np.int8), color=np.zeros(0, np.int16))
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _street_trees(rng, roads, knobs):
    pts = []
    for road in roads:
        if not road.trees:
            continue
        a, b = road.polyline[0], road.polyline[-1]
        d = b - a
        length = float(np.linalg.norm(d))
        if length < 30:
            continue
        u = d / length
        nrm = np.array([-u[1], u[0]])
        spacing = float(rng.uniform(9.0, 14.0))
        ts = np.arange(14.0, length - 14.0, spacing)
        off = road.width_m / 2 + road.sidewalk_m * 0.55
        for sgn in (-1.0, 1.0):
            keep = rng.random(len(ts)) < 0.85 * min(1.0, knobs.tree_density)
            pts.append(a + u * ts[keep, None] + nrm * sgn * off)
    pts = np.concatenate(pts) if pts else np.zeros((0, 2))
    t = _tree_set(rng, pts, conifer_p=0.05, small=True)
    t['crown'] = np.minimum(t['crown'], 3.0)
    return t


def _drop_trees_near_buildings(trees, buildings):
    if not len(trees['xy']) or not buildings:
        return trees
    keep = np.ones(len(trees['xy']), bool)
    cent = np.array([b.footprint.mean(0) for b in buildings])
    rad = np.array([np.max(np.linalg.norm(b.footprint - b.footprint.mean(0), axis=1))
                    for b in buildings])
    cell = 64.0
    grid = {}
    for k, c in enumerate(cent):
        grid.setdefault((int(c[0] // cell), int(c[1] // cell)), []).append(k)
    for t, p in enumerate(trees['xy']):
        gx, gy = int(p[0] // cell), int(p[1] // cell)
        for dx in (-1, 0, 1):
            for dy in (-1, 0, 1):
                for k in grid.get((gx + dx, gy + dy), ()):
                    if np.linalg.norm(p - cent[k]) < rad[k] + 3 and \
                            points_in_polygon(p[None], _grow(buildings[k].footprint, 1.5))[0]:
                        keep[t] = False
    return {k: v[keep] for k, v in trees.items()}


def _grow(poly, d):
    c = poly.mean(0)
    v = poly - c
    n = np.linalg.norm(v, axis=1, keepdims=True)
    return c + v * (1 + d / np.maximum(n, 1e-6))


def _place_landmarks(rng, blocks, buildings, tree_parts, plazas, knobs, size):
    """Turn a few blocks into plazas with a landmark; return the landmarks."""
    n = int(knobs.n_landmarks)
    if n == 0 or not blocks:
        return []
    h = size / 2.0 - 30.0
    cand = [k for k, b in enumerate(blocks)
            if np.all(np.abs(b.polygon.mean(0)) < h) and polygon_area(b.polygon) > 1500
            and b.kind in ('buildings', 'plaza', 'parking')]
    if not cand:
        return []
    chosen = []
    # Spread them out: farthest-point sampling from a random start.
    order = list(rng.permutation(cand))
    chosen.append(order[0])
    cents = np.array([blocks[k].polygon.mean(0) for k in cand])
    while len(chosen) < min(n, len(cand)):
        cc = np.array([blocks[k].polygon.mean(0) for k in chosen])
        d = np.min(np.linalg.norm(cents[:, None] - cc[None], axis=2), axis=1)
        chosen.append(cand[int(np.argmax(d))])
    kinds = ['tower', 'dome', 'spire', 'obelisk']
    out = []
    for m, k in enumerate(chosen):
        blk = blocks[k]
        poly = blk.polygon
        # Clear the block: landmarks stand on an open plaza.
        buildings[:] = [b for b in buildings
                        if not points_in_polygon(b.footprint.mean(0)[None], poly)[0]]
        for part in tree_parts:
            if len(part['xy']):
                keep = ~points_in_polygon(part['xy'], poly)
                for key in part:
                    part[key] = part[key][keep]
        blk.kind, blk.zone = 'plaza', 'downtown'
        plazas.append(poly)
        c = poly.mean(0)
        kind = kinds[(m + int(rng.integers(0, 4))) % 4]
        r = min(np.linalg.norm(poly[1] - poly[0]), np.linalg.norm(poly[3] - poly[0]))
        size_m = {'tower': 7.0, 'dome': 0.3 * r, 'spire': 0.35 * r, 'obelisk': 3.0}[kind]
        size_m = float(min(size_m, 26.0) * rng.uniform(0.85, 1.15))
        height = {'tower': rng.uniform(70, 120), 'dome': rng.uniform(25, 40),
                  'spire': rng.uniform(45, 70), 'obelisk': rng.uniform(30, 45)}[kind]
        heading = math.degrees(math.atan2(*(poly[1] - poly[0])))
        out.append(Landmark(kind, c, size_m, float(height),
                            S.LANDMARK0 + int(rng.integers(0, S.N_LANDMARK)), heading))
    return out


# --------------------------------------------------------------------------------------------
# Mesh

# Vertex layout shared with the renderers: position (3), normal (3), material, colour slot,
# uv (2), tint, object id.
VERTEX_FLOATS = 12
MAT_GROUND, MAT_ASPHALT, MAT_PAINT, MAT_ROOF, MAT_FACADE = 0, 1, 2, 3, 4
MAT_FOLIAGE, MAT_BARK, MAT_WATER, MAT_GRASS, MAT_LANDMARK, MAT_PAVING = 5, 6, 7, 8, 9, 10
# Flat layers, drawn in this order (painter's order on the flat ground).
FLAT_LAYERS = ('base', 'block', 'detail', 'sidewalk', 'asphalt', 'paint')
# Each flat layer floats a centimetre above the one below. Seen from a camera h metres up at
# distance d, a lift dz moves the visible surface by dz * d / h along the ray, far more than
# the depth buffer's resolution, so layers never z-fight and can be drawn top first (each
# ground pixel is shaded once).
LAYER_Z = {name: 0.01 * k for k, name in enumerate(FLAT_LAYERS)}


class _MeshBuf:
    def __init__(self, z=0.0):
        self.parts = []
        self.z = z  # lift of a flat layer (metres) above the ground

    def tris(self, pos, nrm, mat, col, uv=None, tint=1.0, obj=0.0):
        """Add triangles: pos (3k, 3); nrm (3k, 3) or (3,)."""
        pos = np.asarray(pos, np.float32).reshape(-1, 3)
        n = len(pos)
        if n == 0:
            return
        v = np.empty((n, VERTEX_FLOATS), np.float32)
        v[:, 0:3] = pos
        v[:, 2] += self.z
        v[:, 3:6] = nrm
        v[:, 6] = mat
        v[:, 7] = col
        v[:, 8:10] = 0.0 if uv is None else uv
        v[:, 10] = tint
        v[:, 11] = obj
        self.parts.append(v)

    def poly(self, poly, z, mat, col, tint=1.0):
        """Add a flat convex-or-star polygon (fan from its centroid) at height z."""
        poly = np.asarray(poly, float)
        c = poly.mean(0)
        a = poly
        b = np.roll(poly, -1, axis=0)
        cc = np.broadcast_to(c, a.shape)
        tri = np.stack([cc, a, b], 1)  # (n, 3, 2)
        if polygon_area(poly) < 0:
            tri = tri[:, ::-1]
        pos = np.concatenate([tri, np.full(tri.shape[:2] + (1,), z)], -1)
        self.tris(pos, (0, 0, 1), mat, col, pos[..., :2].reshape(-1, 2), tint)

    def quads(self, quads, z, mat, col, tint=1.0):
        """Add flat quads, an array (k, 4, 2), as two triangles each (any orientation)."""
        q = np.asarray(quads, float).reshape(-1, 4, 2)
        if not len(q):
            return
        area = 0.5 * np.sum(q[:, :, 0] * np.roll(q[:, :, 1], -1, 1)
                            - q[:, :, 1] * np.roll(q[:, :, 0], -1, 1), axis=1)
        q = np.where((area < 0)[:, None, None], q[:, ::-1], q)
        tri = q[:, [0, 1, 2, 0, 2, 3]]
        pos = np.concatenate([tri, np.full(tri.shape[:2] + (1,), z)], -1)
        self.tris(pos, (0, 0, 1), mat, col, pos[..., :2].reshape(-1, 2), tint)

    def array(self):
        if not self.parts:
            return np.zeros((0, VERTEX_FLOATS), np.float32)
        return np.concatenate(self.parts)


def _road_quads(a, b, half, ext0=0.0, ext1=0.0):
    d = b - a
    length = np.linalg.norm(d)
    u = d / max(length, 1e-9)
    n = np.array([-u[1], u[0]])
    a2, b2 = a - u * ext0, b + u * ext1
    return np.array([a2 - n * half, b2 - n * half, b2 + n * half, a2 + n * half])


def _in_box(p, box):
    return box[0] <= p[0] < box[2] and box[1] <= p[1] < box[3]


def chunk_mesh(city, box):
    """Return the triangles of the model whose anchor lies in ``box`` (xmin, ymin, xmax, ymax).

    Returns ``(flat, flat_ranges, solid, solid_ranges)``: ``flat`` (n, VERTEX_FLOATS) float32
    ground-level triangles sorted by layer, ``flat_ranges`` {layer: (first, count)} in
    vertices, ``solid`` the 3D objects and ``solid_ranges`` {'structures' (buildings and
    landmarks), 'trees': (first, count)}. Anchors: a road's midpoint, a
    block's or building's centroid, a tree's trunk; the base ground is the box itself.
    """
    layers = {name: _MeshBuf(LAYER_Z[name]) for name in FLAT_LAYERS}
    solid = _MeshBuf()
    x0, y0, x1, y1 = box
    idx = _anchor_index(city)

    def inside(points):
        points = points.reshape(-1, 2)
        return np.flatnonzero((points[:, 0] >= x0) & (points[:, 0] < x1)
                              & (points[:, 1] >= y0) & (points[:, 1] < y1))
    h = city.size_m / 2.0 + _EXTRA_M + 400.0
    layers['base'].quads([[(x0, y0), (x1, y0), (x1, y1), (x0, y1)]], 0.0, MAT_GRASS,
                         S.FIELD if max(abs(x0), abs(y0), abs(x1), abs(y1)) > h else S.YARD)
    for k in inside(idx['blocks']):
        blk = city.blocks[k]
        col, mat = {'buildings': (S.YARD, MAT_GRASS), 'park': (S.PARK, MAT_GRASS),
                    'water': (S.PARK, MAT_GRASS), 'plaza': (S.PLAZA, MAT_PAVING),
                    'parking': (S.PARKING, MAT_ASPHALT)}[blk.kind]
        if blk.kind == 'buildings' and blk.zone in ('downtown', 'industrial'):
            col, mat = (S.PLAZA, MAT_PAVING) if blk.zone == 'downtown' else (S.PARKING,
                                                                             MAT_ASPHALT)
        layers['block'].poly(blk.polygon, 0.0, mat, col)
        if blk.kind == 'parking':
            _parking_marks(layers['paint'], blk.polygon)
        if blk.kind in ('park', 'water'):
            q = blk.polygon
            for (p, r) in ((q[0], q[2]), (q[1], q[3])):
                layers['detail'].quads([_road_quads(p, r, 1.3)], 0.0, MAT_PAVING, S.SIDEWALK)
    for k in inside(idx['water']):
        layers['paint'].poly(city.water[k], 0.0, MAT_WATER, S.WATER)
    roads = city.all_roads()
    nodes_half = idx['junctions']
    for k in inside(idx['roads']):
        road = roads[k]
        a, b = road.polyline[0], road.polyline[-1]
        layers['sidewalk'].quads([_road_quads(a, b, road.width_m / 2 + road.sidewalk_m)], 0.0,
                                 MAT_PAVING, S.SIDEWALK)
        col = S.ASPHALT_DARK if road.kind == 'arterial' else S.ASPHALT
        layers['asphalt'].quads([_road_quads(a, b, road.width_m / 2)], 0.0, MAT_ASPHALT, col)
        _road_paint(layers['paint'], road, nodes_half)
    keys = idx['junction_keys']
    for k in inside(idx['junction_xy']):
        p = idx['junction_xy'][k]
        rs = nodes_half[keys[k]]
        # The junction: fill the area where the roads meet with asphalt (and sidewalk).
        dirs = []
        for r in rs:
            a, b = r.polyline[0], r.polyline[-1]
            d = b - a if np.allclose(a, p, atol=1e-3) else a - b
            dirs.append((d / np.linalg.norm(d), r))
        dirs.sort(key=lambda ur: math.atan2(ur[0][1], ur[0][0]))
        for layer, grow in (('sidewalk', True), ('asphalt', False)):
            poly = _junction_polygon(p, dirs, grow)
            if len(poly) >= 3:
                layers[layer].poly(poly, 0.005, MAT_PAVING if grow else MAT_ASPHALT,
                                   S.SIDEWALK if grow else S.ASPHALT)
        _junction_paint(layers['paint'], p, dirs)
    for k in inside(idx['buildings']):
        _building_mesh(solid, city.buildings[k], k + 1)
    nb = len(city.buildings)
    for m in inside(idx['landmarks']):
        _landmark_mesh(solid, city.landmarks[m], nb + 1 + m)
    structures = solid.array()
    trees = _MeshBuf()
    t = city.trees
    if len(t['xy']):
        sel = inside(t['xy'])
        _trees_mesh(trees, {key: v[sel] for key, v in t.items()})
    trees = trees.array()
    solid_ranges = {'structures': (0, len(structures)), 'trees': (len(structures), len(trees))}
    # Stored top layer first: one draw call per chunk then shades each ground pixel once.
    ranges, arrays, first = {}, [], 0
    for name in reversed(FLAT_LAYERS):
        arr = layers[name].array()
        ranges[name] = (first, len(arr))
        first += len(arr)
        arrays.append(arr)
    return np.concatenate(arrays), ranges, np.concatenate([structures, trees]), solid_ranges


def _anchor_index(city):
    """Return (and cache on the city) the anchor points of every object, for chunking."""
    idx = getattr(city, '_anchors', None)
    if idx is not None:
        return idx
    roads = city.all_roads()
    junctions = {}
    for road in roads:
        for p in (road.polyline[0], road.polyline[-1]):
            junctions.setdefault((round(float(p[0]), 3), round(float(p[1]), 3)), []).append(road)
    keys = list(junctions)

    def arr(points):
        return np.array(points, float).reshape(-1, 2)
    idx = dict(
        blocks=arr([b.polygon.mean(0) for b in city.blocks]),
        water=arr([w.mean(0) for w in city.water]),
        roads=arr([(r.polyline[0] + r.polyline[-1]) / 2 for r in roads]),
        buildings=arr([b.footprint.mean(0) for b in city.buildings]),
        landmarks=arr([lm.xy for lm in city.landmarks]),
        junctions=junctions, junction_keys=keys, junction_xy=arr(keys))
    city._anchors = idx
    return idx


def _junction_polygon(p, dirs, grow):
    """Return the polygon where the arms of a junction overlap (arms sorted by angle)."""
    pts = []
    m = len(dirs)
    for i in range(m):
        u1, r1 = dirs[i]
        u2, r2 = dirs[(i + 1) % m]
        h1 = r1.width_m / 2 + (r1.sidewalk_m if grow else 0.0)
        h2 = r2.width_m / 2 + (r2.sidewalk_m if grow else 0.0)
        n1 = np.array([-u1[1], u1[0]])
        n2 = np.array([-u2[1], u2[0]])
        a = p + n1 * h1  # left edge of arm i
        b = p - n2 * h2  # right edge of arm i + 1
        cross = u1[0] * u2[1] - u1[1] * u2[0]
        if m > 1 and abs(cross) > 0.2:
            t = np.linalg.solve(np.array([u1, -u2]).T, b - a)
            q = a + u1 * t[0]
            if np.linalg.norm(q - p) < 3.0 * max(h1, h2):
                pts.append(q)
                continue
        pts.extend([a, b])
    return np.array(pts)


def _junction_paint(buf, p, dirs):
    """Zebra crossings across each street arm of a junction."""
    if len(dirs) < 3:
        return
    arms_half = max(r.width_m / 2 for _, r in dirs)
    for u, r in dirs:
        if r.kind == 'lane':
            continue
        n = np.array([-u[1], u[0]])
        start = arms_half + r.sidewalk_m + 0.8
        stripes = []
        for off in np.arange(-r.width_m / 2 + 0.6, r.width_m / 2 - 0.4, 1.1):
            c0 = p + u * start + n * off
            stripes.append([c0, c0 + u * 3.0, c0 + u * 3.0 + n * 0.55, c0 + n * 0.55])
        buf.quads(stripes, 0.0, MAT_PAINT, S.PAINT_WHITE)


def _road_paint(buf, road, nodes_half):
    a, b = road.polyline[0], road.polyline[-1]
    d = b - a
    length = float(np.linalg.norm(d))
    u = d / length
    n = np.array([-u[1], u[0]])

    def junction_half(p):
        rs = nodes_half.get((round(p[0], 3), round(p[1], 3)), [])
        return max([r.width_m / 2 + r.sidewalk_m for r in rs] + [0.0]) + 4.5

    s0, s1 = junction_half(a), length - junction_half(b)
    if s1 - s0 < 4.0:
        return
    quads = []
    if road.kind == 'street':
        for s in np.arange(s0, s1 - 3.0, 9.0):
            quads.append(_road_quads(a + u * s, a + u * (s + 3.0), 0.08))
        buf.quads(quads, 0.0, MAT_PAINT, S.PAINT_WHITE)
    elif road.kind == 'arterial':
        yel = [_road_quads(a + u * s0 + n * o, a + u * s1 + n * o, 0.09) for o in (-0.2, 0.2)]
        buf.quads(yel, 0.0, MAT_PAINT, S.PAINT_YELLOW)
        lane = road.width_m / 4
        for o in (-lane, lane):
            for s in np.arange(s0, s1 - 3.0, 10.0):
                quads.append(_road_quads(a + u * s + n * o, a + u * (s + 3.0) + n * o, 0.08))
        for o in (-road.width_m / 2 + 0.35, road.width_m / 2 - 0.35):
            quads.append(_road_quads(a + u * s0 + n * o, a + u * s1 + n * o, 0.07))
        buf.quads(quads, 0.0, MAT_PAINT, S.PAINT_WHITE)


def _parking_marks(buf, q):
    quads = []
    c = q.mean(0)
    u = (q[1] - q[0]) / np.linalg.norm(q[1] - q[0])
    n = np.array([-u[1], u[0]])
    ls = np.linalg.norm(q[1] - q[0]) * 0.42
    lt = np.linalg.norm(q[3] - q[0]) * 0.42
    for row in np.arange(-lt + 3, lt - 3, 14.0):
        for s in np.arange(-ls + 2, ls - 2, 2.6):
            p = c + u * s + n * row
            quads.append([p, p + n * 5.0, p + n * 5.0 + u * 0.12, p + u * 0.12])
    buf.quads(quads, 0.0, MAT_PAINT, S.PAINT_WHITE)


def _walls(buf, fp, z0, z1, mat, col, tint, obj):
    a = fp
    b = np.roll(fp, -1, axis=0)
    d = b - a
    length = np.linalg.norm(d, axis=1)
    keep = length > 1e-6
    a, b, d, length = a[keep], b[keep], d[keep], length[keep]
    nrm = np.stack([d[:, 1] / length, -d[:, 0] / length, np.zeros(len(d))], 1)
    k = len(a)
    p00 = np.concatenate([a, np.full((k, 1), z0)], 1)
    p10 = np.concatenate([b, np.full((k, 1), z0)], 1)
    p11 = np.concatenate([b, np.full((k, 1), z1)], 1)
    p01 = np.concatenate([a, np.full((k, 1), z1)], 1)
    pos = np.stack([p00, p10, p11, p00, p11, p01], 1)
    s0 = np.concatenate([[0.0], np.cumsum(length)[:-1]])
    uv = np.stack([np.stack([s0, np.full(k, z0)], 1), np.stack([s0 + length, np.full(k, z0)], 1),
                   np.stack([s0 + length, np.full(k, z1)], 1),
                   np.stack([s0, np.full(k, z0)], 1),
                   np.stack([s0 + length, np.full(k, z1)], 1),
                   np.stack([s0, np.full(k, z1)], 1)], 1)
    buf.tris(pos, np.repeat(nrm, 6, axis=0), mat, col, uv.reshape(-1, 2), tint, obj)


def _building_mesh(buf, b, obj):
    fp = b.footprint
    h = b.height_m
    tint = 0.5 + b.params  # 0.5..1.5 encodes the window layout; brightness from its decimals
    _walls(buf, fp, 0.0, h, MAT_FACADE, S.FACADE0 + b.facade_color, tint, obj)
    roof_col = S.ROOF0 + b.roof_color
    if b.roof_kind == 'gable' and len(fp) == 4:
        e0 = np.linalg.norm(fp[1] - fp[0]) + np.linalg.norm(fp[3] - fp[2])
        e1 = np.linalg.norm(fp[2] - fp[1]) + np.linalg.norm(fp[0] - fp[3])
        q = fp if e0 >= e1 else np.roll(fp, -1, axis=0)
        # Ridge along q0-q1 direction, between the mid-points of q0q3 and q1q2.
        m0 = (q[0] + q[3]) / 2
        m1 = (q[1] + q[2]) / 2
        top = h + b.ridge_m
        P = lambda xy, z: np.array([xy[0], xy[1], z])  # noqa: E731
        r0, r1 = P(m0, top), P(m1, top)
        slopes = [(P(q[0], h), P(q[1], h), r1, r0), (P(q[2], h), P(q[3], h), r0, r1)]
        for s in slopes:
            nrm = np.cross(s[1] - s[0], s[3] - s[0])
            nrm /= np.linalg.norm(nrm) + 1e-9
            if nrm[2] < 0:
                nrm = -nrm
                s = s[::-1]
            pos = np.array([s[0], s[1], s[2], s[0], s[2], s[3]])
            buf.tris(pos, nrm, MAT_ROOF, roof_col, pos[:, :2], tint, obj)
        for (c0, c1, m) in ((q[3], q[0], r0), (q[1], q[2], r1)):
            tri = np.array([P(c0, h), P(c1, h), m])
            d = c1 - c0
            nrm = np.array([d[1], -d[0], 0.0]) / (np.linalg.norm(d) + 1e-9)
            uv = np.array([[0.0, h], [np.linalg.norm(d), h], [np.linalg.norm(d) / 2, top]])
            buf.tris(tri, nrm, MAT_FACADE, S.FACADE0 + b.facade_color, uv, tint, obj)
    else:
        c = fp.mean(0)
        tri = np.stack([np.broadcast_to(c, fp.shape), fp, np.roll(fp, -1, axis=0)], 1)
        pos = np.concatenate([tri, np.full(tri.shape[:2] + (1,), h)], -1)
        buf.tris(pos, (0, 0, 1), MAT_ROOF, roof_col, pos[..., :2].reshape(-1, 2), tint, obj)


_ICO = None


def _icosahedron():
    global _ICO
    if _ICO is None:
        t = (1 + 5 ** 0.5) / 2
        v = np.array([[-1, t, 0], [1, t, 0], [-1, -t, 0], [1, -t, 0], [0, -1, t], [0, 1, t],
                      [0, -1, -t], [0, 1, -t], [t, 0, -1], [t, 0, 1], [-t, 0, -1], [-t, 0, 1]],
                     float)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        f = np.array([[0, 11, 5], [0, 5, 1], [0, 1, 7], [0, 7, 10], [0, 10, 11], [1, 5, 9],
                      [5, 11, 4], [11, 10, 2], [10, 7, 6], [7, 1, 8], [3, 9, 4], [3, 4, 2],
                      [3, 2, 6], [3, 6, 8], [3, 8, 9], [4, 9, 5], [2, 4, 11], [6, 2, 10],
                      [8, 6, 7], [9, 8, 1]])
        _ICO = (v, f)
    return _ICO


def _trees_mesh(buf, t):
    n = len(t['xy'])
    if not n:
        return
    v, f = _icosahedron()
    tri = v[f]  # (20, 3, 3)
    # Deciduous crowns: squashed icosahedra; conifers: 6-sided cones.
    dec = t['kind'] == 0
    crown_base = np.maximum(3.2, t['height'] - 2.0 * t['crown'] * 0.9)
    if dec.any():
        xy, ht, cr = t['xy'][dec], t['height'][dec], t['crown'][dec]
        base = np.maximum(3.2, ht - 2 * cr * 0.9)
        centre = np.concatenate([xy, (base + cr * 0.9)[:, None]], 1)
        scale = np.stack([cr, cr, cr * 0.9], 1)
        pos = centre[:, None, None, :] + tri[None] * scale[:, None, None, :]
        # Smooth normals (the sphere's) make crowns look round under the sun.
        nrm = tri[None] * np.ones((len(xy), 1, 1, 1))
        col = np.repeat(t['color'][dec], 60)
        buf.tris(pos.reshape(-1, 3), nrm.reshape(-1, 3), MAT_FOLIAGE, col,
                 pos.reshape(-1, 3)[:, :2], 1.0)
    con = ~dec
    if con.any():
        xy, ht, cr = t['xy'][con], t['height'][con], t['crown'][con]
        base = np.full(len(xy), 1.5)
        k = 6
        ang = np.linspace(0, 2 * np.pi, k + 1)
        ring = np.stack([np.cos(ang), np.sin(ang)], 1)
        pos, nrm = [], []
        for j in range(k):
            a, b = ring[j], ring[j + 1]
            pa = np.concatenate([xy + a * cr[:, None], base[:, None]], 1)
            pb = np.concatenate([xy + b * cr[:, None], base[:, None]], 1)
            top = np.concatenate([xy, ht[:, None]], 1)
            pos.append(np.stack([pa, pb, top], 1))
            mid = (a + b) / 2
            nn = np.concatenate([np.broadcast_to(mid, (len(xy), 2)) * (ht - base)[:, None],
                                 cr[:, None]], 1)
            nn /= np.linalg.norm(nn, axis=1, keepdims=True)
            nrm.append(np.repeat(nn[:, None], 3, 1))
        pos = np.stack(pos, 1)
        nrm = np.stack(nrm, 1)
        col = np.repeat(t['color'][con], 3 * k)
        buf.tris(pos.reshape(-1, 3), nrm.reshape(-1, 3), MAT_FOLIAGE, col,
                 pos.reshape(-1, 3)[:, :2], 1.0)
    # Trunks: thin triangular prisms up to the crown.
    r = 0.25
    top = np.where(dec, crown_base + 0.8, 1.6)
    ang = np.radians([90.0, 210.0, 330.0])
    sq = r * np.stack([np.cos(ang), np.sin(ang)], 1)
    for j in range(3):
        a, b = sq[j], sq[(j + 1) % 3]
        pa0 = np.concatenate([t['xy'] + a, np.zeros((n, 1))], 1)
        pb0 = np.concatenate([t['xy'] + b, np.zeros((n, 1))], 1)
        pa1 = np.concatenate([t['xy'] + a, top[:, None]], 1)
        pb1 = np.concatenate([t['xy'] + b, top[:, None]], 1)
        pos = np.stack([pa0, pb0, pb1, pa0, pb1, pa1], 1)
        nn = np.array([(a + b)[0], (a + b)[1], 0.0])
        nn /= np.linalg.norm(nn)
        buf.tris(pos.reshape(-1, 3), nn, MAT_BARK, S.BARK, None, 1.0)


def _prism(buf, centre, radius, z0, z1, sides, mat, col, obj, angle=0.0, tint=1.0):
    ang = np.linspace(0, 2 * np.pi, sides + 1)[:-1] + angle
    fp = centre + radius * np.stack([np.cos(ang), np.sin(ang)], 1)
    _walls(buf, fp, z0, z1, mat, col, tint, obj)
    return fp


def _cap(buf, fp, z, apex_z, mat, col, obj, tint=1.0):
    c = fp.mean(0)
    for i in range(len(fp)):
        a, b = fp[i], fp[(i + 1) % len(fp)]
        tri = np.array([[a[0], a[1], z], [b[0], b[1], z], [c[0], c[1], apex_z]])
        nrm = np.cross(tri[1] - tri[0], tri[2] - tri[0])
        nrm /= np.linalg.norm(nrm) + 1e-9
        buf.tris(tri, nrm, mat, col, tri[:, :2], tint, obj)


def _landmark_mesh(buf, lm, obj):
    c = np.asarray(lm.xy, float)
    r, h, col = lm.size_m, lm.height_m, lm.color
    alt = S.LANDMARK0 + (lm.color - S.LANDMARK0 + 7) % S.N_LANDMARK
    rot = math.radians(lm.heading_deg)
    if lm.kind == 'tower':
        n_seg = 5
        for k in range(n_seg):
            z0, z1 = h * k / n_seg, h * (k + 1) / n_seg
            _prism(buf, c, r * (1 - 0.06 * k), z0, z1, 8, MAT_LANDMARK,
                   col if k % 2 == 0 else alt, obj, rot)
        fp = _prism(buf, c, r * 1.6, h, h + 6, 8, MAT_LANDMARK, alt, obj, rot)
        _cap(buf, fp, h + 6, h + 6, MAT_LANDMARK, alt, obj)
        fp = _prism(buf, c, 0.5, h + 6, h + 22, 4, MAT_LANDMARK, col, obj, rot)
    elif lm.kind == 'dome':
        drum = _prism(buf, c, r, 0, h * 0.45, 16, MAT_LANDMARK, S.LANDMARK0 + 7, obj, rot)
        _cap(buf, drum, h * 0.45, h * 0.45, MAT_LANDMARK, S.LANDMARK0 + 7, obj)
        # Dome: stacked rings of a hemisphere.
        rings = 6
        for k in range(rings):
            a0 = math.pi / 2 * k / rings
            a1 = math.pi / 2 * (k + 1) / rings
            r0, r1 = r * 0.92 * math.cos(a0), r * 0.92 * math.cos(a1)
            z0 = h * 0.45 + r * 0.92 * math.sin(a0) * 0.9
            z1 = h * 0.45 + r * 0.92 * math.sin(a1) * 0.9
            ang = np.linspace(0, 2 * np.pi, 17)
            for i in range(16):
                p = [(r0, ang[i], z0), (r0, ang[i + 1], z0), (r1, ang[i + 1], z1),
                     (r1, ang[i], z1)]
                q = np.array([[c[0] + rr * math.cos(aa), c[1] + rr * math.sin(aa), zz]
                              for rr, aa, zz in p])
                nrm = np.cross(q[1] - q[0], q[3] - q[0]) if r1 > 1e-6 else \
                    np.cross(q[1] - q[0], q[2] - q[0])
                nrm /= np.linalg.norm(nrm) + 1e-9
                quad = q[[0, 1, 2, 0, 2, 3]]
                buf.tris(quad, nrm, MAT_LANDMARK, col, quad[:, :2], 1.0, obj)
        _prism(buf, c, 1.0, h * 0.45 + r * 0.83, h, 6, MAT_LANDMARK, col, obj)
    elif lm.kind == 'spire':
        u = np.array([math.sin(rot), math.cos(rot)])
        n = np.array([-u[1], u[0]])
        L, W = r * 1.6, r * 0.6
        fp = np.array([c - u * L / 2 - n * W / 2, c + u * L / 2 - n * W / 2,
                       c + u * L / 2 + n * W / 2, c - u * L / 2 + n * W / 2])
        if polygon_area(fp) < 0:
            fp = fp[::-1]
        hall = Building(fp, 14.0, 0, 0, 'gable', 7.0, 0.5)
        sub = _MeshBuf()
        _building_mesh(sub, hall, obj)
        arr = sub.array()
        arr[:, 6] = MAT_LANDMARK
        arr[:, 7] = np.where(arr[:, 5] > 0.5, S.LANDMARK0 + 12, S.LANDMARK0 + 7)
        buf.parts.append(arr)
        tc = c + u * L / 2
        fp = _prism(buf, tc, W * 0.45, 0, h * 0.45, 4, MAT_LANDMARK, S.LANDMARK0 + 7, obj,
                    rot + math.pi / 4)
        _cap(buf, fp, h * 0.45, h, MAT_LANDMARK, col, obj)
    else:  # obelisk
        fp = _prism(buf, c, 6.0, 0, 1.5, 4, MAT_LANDMARK, S.LANDMARK0 + 15, obj, rot)
        _cap(buf, fp, 1.5, 1.5, MAT_LANDMARK, S.LANDMARK0 + 15, obj)
        fp = _prism(buf, c, r, 1.5, h, 4, MAT_LANDMARK, col, obj, rot)
        _cap(buf, fp, h, h + r * 2.5, MAT_LANDMARK, col, obj)
