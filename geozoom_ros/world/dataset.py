"""Ground-view datasets of a city: camera poses, the train/val/test splits, JPEGs, index.csv.

Splits:

* ``train``, ``val``: views outside the test-cross blocks and their margin.
* ``test-same``: new positions, headings and lighting in the same area as train (a robot
  revisiting a surveyed area).
* ``test-cross``: views inside spatial blocks (``Knobs.block_m`` squares covering about
  ``Knobs.cross_fraction`` of the city, spread like a knight's-move pattern) with no train,
  val or test-same view inside a block or within ``Knobs.margin_m`` of it (a robot in a place
  nobody photographed from the ground).

Poses lie on carriageways, sidewalks and plazas; headings are uniform over 0-360 degrees
(clockwise from north), the horizontal FOV, camera height (metres) and tilt follow the knobs.
Every view draws from its own ``default_rng([seed, 11, index])`` stream, so the images do not
depend on how the work is shared between processes.
"""

import csv
from dataclasses import replace
import math
import os
from pathlib import Path

import numpy as np

from geozoom_ros.world import styles as S

SPLITS = ('train', 'val', 'test-same', 'test-cross')
DEFAULT_FRACTIONS = {'train': 0.7, 'val': 0.1, 'test-same': 0.1, 'test-cross': 0.1}
PRESETS = ('street', 'drone', 'pano')
INDEX_COLUMNS = ('path', 'lat', 'lon', 'heading_deg', 'fov_deg', 'height_m', 'pitch_deg',
                 'roll_deg', 'style', 'split', 'preset', 'east_m', 'north_m',
                 'sun_azimuth_deg', 'sun_elevation_deg', 'overcast', 'width', 'height')


# --------------------------------------------------------------------------------------------
# Test-cross blocks

def cross_blocks(city):
    """Return the test-cross blocks as an (K, 4) array of ENU boxes (xmin, ymin, xmax, ymax).

    A grid of ``block_m`` squares is laid over the city with a seed-dependent offset; the cells
    with ``(i + 2 j + offset) mod p == 0`` (p = round(1 / cross_fraction)) are test blocks: an
    even spread where every row and column has one block in p.
    """
    k = city.knobs
    if k.cross_fraction <= 0:
        return np.zeros((0, 4))
    period = max(2, int(round(1.0 / k.cross_fraction)))
    rng = np.random.default_rng([city.seed, 13])
    b = float(k.block_m)
    x0, y0, x1, y1 = city.bounds_enu
    ox, oy = rng.uniform(0, b, 2)
    off = int(rng.integers(0, period))
    boxes = []
    for i in range(int(math.floor((x0 - ox) / b)), int(math.ceil((x1 - ox) / b)) + 1):
        for j in range(int(math.floor((y0 - oy) / b)), int(math.ceil((y1 - oy) / b)) + 1):
            if (i + 2 * j + off) % period:
                continue
            bx0, by0 = ox + i * b, oy + j * b
            box = (max(bx0, x0), max(by0, y0), min(bx0 + b, x1), min(by0 + b, y1))
            # Slivers at the border are too small to test in; leave them to training.
            if (box[2] - box[0]) >= 0.4 * b and (box[3] - box[1]) >= 0.4 * b:
                boxes.append(box)
    return np.array(boxes, float).reshape(-1, 4)


def distance_to_boxes(xy, boxes):
    """Return each point's distance (m) to the nearest box (0 inside); inf without boxes."""
    xy = np.asarray(xy, float).reshape(-1, 2)
    if not len(boxes):
        return np.full(len(xy), np.inf)
    dx = np.maximum(np.maximum(boxes[None, :, 0] - xy[:, None, 0], 0),
                    xy[:, None, 0] - boxes[None, :, 2])
    dy = np.maximum(np.maximum(boxes[None, :, 1] - xy[:, None, 1], 0),
                    xy[:, None, 1] - boxes[None, :, 3])
    return np.min(np.hypot(np.maximum(dx, 0), np.maximum(dy, 0)), axis=1)


# --------------------------------------------------------------------------------------------
# Poses

class _PoseSampler:
    """Draws camera positions on carriageways, sidewalks and plazas of a city."""

    def __init__(self, city):
        self.city = city
        x0, y0, x1, y1 = city.bounds_enu
        m = 12.0
        self.box = (x0 + m, y0 + m, x1 - m, y1 - m)
        roads = [r for r in city.all_roads()
                 if self._inside(0.5 * (r.polyline[0] + r.polyline[-1]))]
        self.roads = roads
        lengths = np.array([np.linalg.norm(r.polyline[-1] - r.polyline[0]) for r in roads])
        self.road_p = lengths / lengths.sum() if len(roads) else None
        self.plazas = [p for p in city.plazas if self._inside(p.mean(0))]
        trees = city.trees['xy']
        self.trees = trees
        self.tree_grid = {}
        for k, p in enumerate(trees):
            self.tree_grid.setdefault((int(p[0] // 8), int(p[1] // 8)), []).append(k)
        self.landmarks = [(lm.xy, lm.size_m * 2.0 + 3.0) for lm in city.landmarks]

    def _inside(self, p):
        return (self.box[0] <= p[0] <= self.box[2]) and (self.box[1] <= p[1] <= self.box[3])

    def _clear(self, p):
        if not self._inside(p):
            return False
        gx, gy = int(p[0] // 8), int(p[1] // 8)
        for dx in (-1, 0, 1):
            for dy in (-1, 0, 1):
                for k in self.tree_grid.get((gx + dx, gy + dy), ()):
                    if np.hypot(*(self.trees[k] - p)) < 1.5:
                        return False
        for c, r in self.landmarks:
            if np.hypot(*(c - p)) < r:
                return False
        return True

    def draw(self, rng):
        """Return ``(xy, where)`` of one position; where is road, sidewalk or plaza."""
        for _ in range(200):
            u = rng.random()
            if u < 0.15 and self.plazas:
                q = self.plazas[int(rng.integers(len(self.plazas)))]
                s, t = rng.uniform(0.05, 0.95, 2)
                p = ((1 - s) * (1 - t) * q[0] + s * (1 - t) * q[1] + s * t * q[2]
                     + (1 - s) * t * q[3])
                where = 'plaza'
            elif self.roads:
                r = self.roads[int(rng.choice(len(self.roads), p=self.road_p))]
                a, b = r.polyline[0], r.polyline[-1]
                d = b - a
                n = np.array([-d[1], d[0]]) / (np.linalg.norm(d) + 1e-9)
                t = rng.random()
                if u < 0.6:
                    off = rng.uniform(-1, 1) * max(0.3, r.width_m / 2 - 1.2)
                    where = 'road'
                else:
                    off = (r.width_m / 2 + rng.uniform(0.3, max(0.4, r.sidewalk_m - 0.3))) \
                        * (1 if rng.random() < 0.5 else -1)
                    where = 'sidewalk'
                p = a + d * t + n * off
            else:
                p = rng.uniform(self.box[:2], self.box[2:])
                where = 'open'
            if self._clear(p):
                return p, where
        return p, where


def sample_views(city, n, preset='street', fractions=None, seed=None):
    """Return ``n`` view records (dicts) with poses, lighting, split and output names.

    Views are drawn split by split (train, val, test-same, test-cross) in the counts of
    ``fractions`` (default 70/10/10/10 %); train/val/test-same views avoid the test-cross
    blocks and their margin, test-cross views lie inside the blocks. Records are ordered by
    split and then by position along the block grid, so nearby views render together.
    """
    if preset not in PRESETS:
        from geozoom_ros.errors import InputError
        raise InputError(f'preset {preset!r} is unknown; use one of: {", ".join(PRESETS)}')
    fractions = dict(fractions or DEFAULT_FRACTIONS)
    seed = city.seed if seed is None else int(seed)
    blocks = cross_blocks(city)
    if not len(blocks):
        fractions['test-cross'] = 0.0
    total = sum(fractions.values())
    counts = {s: int(math.floor(n * fractions.get(s, 0.0) / total)) for s in SPLITS}
    counts['train'] += n - sum(counts.values())
    sampler = _PoseSampler(city)
    knobs = city.knobs
    margin = float(knobs.margin_m)
    views = []
    index = 0
    for split in SPLITS:
        rng = np.random.default_rng([seed, 17, SPLITS.index(split)])
        made = 0
        tries = 0
        while made < counts[split]:
            tries += 1
            if tries > 400 * max(1, counts[split]) + 10000:
                raise RuntimeError(f'could not place {counts[split]} {split} views')
            if preset == 'drone':
                xy = rng.uniform(sampler.box[:2], sampler.box[2:])
            else:
                xy, _ = sampler.draw(rng)
            d = distance_to_boxes(xy, blocks)[0]
            if split == 'test-cross':
                if d > 0:
                    continue
            elif d <= margin:
                continue
            views.append(_make_view(city, xy, split, preset, index, seed))
            index += 1
            made += 1
    return views


def _make_view(city, xy, split, preset, index, seed):
    k = city.knobs
    rng = np.random.default_rng([seed, 11, index])
    heading = float(rng.uniform(0.0, 360.0))
    if preset == 'drone':
        height = float(rng.uniform(30.0, 120.0))
        pitch = float(rng.uniform(-90.0, -30.0))
        fov = float(rng.uniform(60.0, 90.0))
        roll = float(np.clip(rng.normal(0.0, k.roll_jitter_deg), -10, 10))
    else:
        height = float(rng.uniform(*k.height_m))
        fov = float(rng.uniform(*k.fov_deg)) if preset == 'street' else 360.0
        pitch = float(np.clip(rng.normal(0.0, k.pitch_jitter_deg), -12, 12))
        roll = float(np.clip(rng.normal(0.0, k.roll_jitter_deg), -8, 8))
        if preset == 'pano':
            pitch = roll = 0.0
    light = S.sample_lighting(city.style, rng, k, city.origin[0])
    if split == 'test-same' and light.season is None and k.sun_mismatch > 0:
        # Revisits see another time of day than the survey, never the survey's own light.
        light = replace(light, sun_azimuth_deg=float((light.sun_azimuth_deg + 180.0
                                                      + rng.uniform(-90, 90)) % 360.0))
    lat, lon, _ = city.frame.to_latlon(float(xy[0]), float(xy[1]), 0.0)
    return dict(index=index, split=split, preset=preset, east_m=float(xy[0]),
                north_m=float(xy[1]), lat=float(lat), lon=float(lon), heading_deg=heading,
                fov_deg=fov, height_m=height, pitch_deg=pitch, roll_deg=roll, lighting=light,
                effects_seed=[int(seed), 19, int(index)],
                jpeg_quality=int(rng.integers(80, 96)),
                path=f'{split}/{index:07d}.jpg')


def render_view(renderer, view, size, effects=1.0):
    """Render one view record; return the RGB uint8 image with camera effects applied."""
    light = view['lighting']
    if view['preset'] == 'pano':
        img = renderer.render_pano(view['east_m'], view['north_m'], view['height_m'],
                                   view['heading_deg'], light, size=size)
    else:
        img = renderer.render(view['east_m'], view['north_m'], view['height_m'],
                              view['heading_deg'], view['fov_deg'], view['pitch_deg'],
                              view['roll_deg'], light, size=size)
    rng = np.random.default_rng(view['effects_seed'])
    return S.camera_effects(img, rng, effects)


def write_jpeg(path, rgb, quality=90):
    """Write an RGB image as a JPEG (temporary name, then renamed into place)."""
    import cv2
    path = Path(path)
    ok, buf = cv2.imencode('.jpg', rgb[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError(f'JPEG encoding failed for {path}')
    tmp = path.with_name(f'.{path.name}.tmp')
    tmp.write_bytes(buf.tobytes())
    os.replace(tmp, path)


def index_row(view, style, size):
    """Return the index.csv row (dict) of a view record."""
    light = view['lighting']
    return dict(path=view['path'], lat=f"{view['lat']:.8f}", lon=f"{view['lon']:.8f}",
                heading_deg=f"{view['heading_deg']:.3f}", fov_deg=f"{view['fov_deg']:.3f}",
                height_m=f"{view['height_m']:.3f}", pitch_deg=f"{view['pitch_deg']:.3f}",
                roll_deg=f"{view['roll_deg']:.3f}", style=light.season or style,
                split=view['split'], preset=view['preset'], east_m=f"{view['east_m']:.3f}",
                north_m=f"{view['north_m']:.3f}",
                sun_azimuth_deg=f'{light.sun_azimuth_deg:.1f}',
                sun_elevation_deg=f'{light.sun_elevation_deg:.1f}',
                overcast=int(not light.shadows), width=size[0], height=size[1])


def write_index(path, rows):
    """Write index.csv (temporary name, then renamed into place)."""
    path = Path(path)
    tmp = path.with_name(f'.{path.name}.tmp')
    with open(tmp, 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=INDEX_COLUMNS)
        w.writeheader()
        for row in rows:
            w.writerow(row)
    os.replace(tmp, path)


def read_index(path):
    """Return the rows of an index.csv as dicts (numbers as floats where numeric)."""
    rows = []
    with open(path, newline='') as f:
        for row in csv.DictReader(f):
            for key in ('lat', 'lon', 'heading_deg', 'fov_deg', 'height_m', 'pitch_deg',
                        'roll_deg', 'east_m', 'north_m', 'sun_azimuth_deg',
                        'sun_elevation_deg'):
                if row.get(key) not in (None, ''):
                    row[key] = float(row[key])
            rows.append(row)
    return rows


def spatial_order(views, cell_m=256.0):
    """Return the views sorted along a Z-order curve of ``cell_m`` cells (cache locality)."""
    def key(v):
        i = int(math.floor(v['east_m'] / cell_m)) + 512
        j = int(math.floor(v['north_m'] / cell_m)) + 512
        z = 0
        for b in range(10):
            z |= ((i >> b) & 1) << (2 * b) | ((j >> b) & 1) << (2 * b + 1)
        return z
    return sorted(views, key=key)


def check_splits(city, rows):
    """Return the number of train/val/test-same rows that violate the test-cross margin."""
    blocks = cross_blocks(city)
    xy = np.array([[r['east_m'], r['north_m']] for r in rows
                   if r['split'] != 'test-cross'], float).reshape(-1, 2)
    if not len(xy):
        return 0
    return int(np.sum(distance_to_boxes(xy, blocks) <= city.knobs.margin_m))
