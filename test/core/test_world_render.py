"""The OpenGL renderer: determinism, presets, styles, and ground/overhead consistency."""

import math

import numpy as np
import pytest

from geozoom_ros.errors import InputError
from geozoom_ros.world import styles as S
from geozoom_ros.world.city import make_city
from geozoom_ros.world.render_gl import camera_axes, GroundRenderer

ORIGIN = (47.3769, 8.5417)


@pytest.fixture(scope='module')
def city():
    return make_city(5, 500, ORIGIN, 'summer')


@pytest.fixture(scope='module')
def renderer(city):
    r = GroundRenderer(city, 128, 96)
    yield r
    r.close()


def _pose(city, k=0):
    road = city.roads[k]
    a, b = road.polyline
    p = a + (b - a) * 0.4
    return float(p[0]), float(p[1])


def test_same_seed_gives_the_same_images(city, renderer):
    x, y = _pose(city)
    light = S.sample_lighting('summer', np.random.default_rng(1), city.knobs)
    img1 = renderer.render(x, y, 1.8, 40.0, 80.0, lighting=light)
    other = GroundRenderer(make_city(5, 500, ORIGIN, 'summer'), 128, 96)
    try:
        img2 = other.render(x, y, 1.8, 40.0, 80.0, lighting=light)
    finally:
        other.close()
    assert img1.shape == (96, 128, 3) and img1.dtype == np.uint8
    diff = np.abs(img1.astype(int) - img2.astype(int))
    assert diff.mean() < 0.5 and np.mean(diff > 8) < 0.002
    # Another heading shows something else.
    img3 = renderer.render(x, y, 1.8, 220.0, 80.0, lighting=light)
    assert np.abs(img1.astype(int) - img3.astype(int)).mean() > 5


def test_views_look_like_a_street(city, renderer):
    x, y = _pose(city, 3)
    a, b = city.roads[3].polyline
    along = math.degrees(math.atan2(b[0] - a[0], b[1] - a[1]))
    img = renderer.render(x, y, 1.8, along, 90.0).astype(float)
    top, bottom = img[:20].mean(axis=(0, 1)), img[-20:].mean(axis=(0, 1))
    assert top[2] > top[0]  # sky at the top is blue
    assert abs(bottom[0] - bottom[2]) < 40  # the ground below is grey road or pavement
    assert img.std() > 15


def test_presets_drone_and_panorama(city, renderer):
    x, y = _pose(city, 1)
    drone = renderer.render_drone(x, y, 80.0, 30.0, -70.0, size=(96, 96))
    assert drone.shape == (96, 96, 3)
    assert drone[:10].mean() < 250  # looking down: no blank sky on top
    with pytest.raises(InputError, match='altitude'):
        renderer.render_drone(x, y, 10.0, 30.0, -70.0)
    with pytest.raises(InputError, match='pitch'):
        renderer.render_drone(x, y, 80.0, 30.0, -10.0)
    pano = renderer.render_pano(x, y, 1.8, 0.0, size=(256, 64))
    assert pano.shape == (64, 256, 3)
    # A full circle: the left and right edges meet.
    seam = np.abs(pano[:, 0].astype(int) - pano[:, -1].astype(int)).mean()
    assert seam < 25
    # The panorama's columns at azimuth 45 match a plain view looking north-east.
    ne = renderer.render(x, y, 1.8, 45.0, 30.0, size=(64, 64), vfov_deg=90.0)
    col = pano[:, 31:34].astype(float).mean(axis=(1, 2))
    ref = ne[:, 30:34].astype(float).mean(axis=(1, 2))
    assert np.corrcoef(col, ref)[0, 1] > 0.7


def test_styles_change_both_views_consistently(city):
    winter = make_city(5, 500, ORIGIN, 'winter')
    box = (-100, -100, 100, 100, 160, 160)
    r1, r2 = GroundRenderer(city, 96, 72), GroundRenderer(winter, 96, 72)
    try:
        o1, o2 = r1.render_ortho_box(*box), r2.render_ortho_box(*box)
        l1 = r1.render_ortho_box(*box, labels=True)
        l2 = r2.render_ortho_box(*box, labels=True)
        x, y = _pose(city, 2)
        light = S.Lighting(shadows=False)
        heads = (0, 90, 180, 270)
        g1 = np.stack([r1.render(x, y, 1.8, h, 90.0, lighting=light) for h in heads])
        g2 = np.stack([r2.render(x, y, 1.8, h, 90.0, lighting=light) for h in heads])
    finally:
        r1.close()
        r2.close()
    assert np.array_equal(l1, l2)  # same geometry
    # Snow: the winter world is brighter and less green from above and from the street.
    assert o2.mean() > o1.mean() + 20
    assert g2[:, 40:].mean() > g1[:, 40:].mean() + 8
    green1 = o1[..., 1].astype(float) - o1[..., [0, 2]].mean(-1)
    green2 = o2[..., 1].astype(float) - o2[..., [0, 2]].mean(-1)
    assert green1.mean() > green2.mean() + 5


def _building_hits(renderer, city, x, y, h, heading, fov, size=(128, 96)):
    """Return (bearing_deg, distance_m, building id) of pixels that see a building."""
    ids, depth = renderer.render_labels(x, y, h, heading, fov, size=size)
    w, hh = size
    right, up, fwd = camera_axes(heading)
    tx = math.tan(math.radians(fov) / 2)
    ty = tx * hh / w
    rows, cols = np.nonzero((ids > 0) & (ids <= len(city.buildings)) & np.isfinite(depth))
    out = []
    for r, c in zip(rows[::7], cols[::7]):
        xn = (c + 0.5) / w * 2 - 1
        yn = 1 - (r + 0.5) / hh * 2
        ray = fwd + xn * tx * right + yn * ty * up
        p = np.array([x, y, h]) + ray * depth[r, c]
        dx, dy = p[0] - x, p[1] - y
        out.append((math.degrees(math.atan2(dx, dy)) % 360, math.hypot(dx, dy), ids[r, c]))
    return out


def test_a_building_seen_at_bearing_b_distance_d_is_there_in_the_orthophoto(city, renderer):
    from geozoom_ros.world.city import points_in_polygon
    agree = total = inside = 0
    box = 250.0
    n = 500
    top = renderer.render_ortho_box(-box, -box, box, box, n, n, labels=True)
    m_px = 2 * box / n
    for k in range(6):
        x, y = _pose(city, k)
        hits = _building_hits(renderer, city, x, y, 1.8, 60.0 * k, 80.0)
        for bearing, dist, bid in hits:
            if dist > 150:
                continue
            d = dist + 0.8  # just behind the wall: on the roof in the top view
            ex = x + d * math.sin(math.radians(bearing))
            ny = y + d * math.cos(math.radians(bearing))
            col, row = int((ex + box) / m_px), int((box - ny) / m_px)
            total += 1
            agree += int(top[row, col] == bid)
            # And the city model agrees: the point lies in that building's footprint.
            fp = city.buildings[bid - 1].footprint
            inside += int(points_in_polygon(np.array([[ex, ny]]), fp)[0])
    assert total > 50
    assert agree / total > 0.85
    assert inside / total > 0.85


def test_missing_egl_is_one_line_naming_the_packages(tmp_path):
    import os
    import subprocess
    import sys
    env = dict(os.environ, __EGL_VENDOR_LIBRARY_FILENAMES=str(tmp_path / 'none.json'))
    import geozoom_ros
    root = os.path.dirname(os.path.dirname(os.path.abspath(geozoom_ros.__file__)))
    env['PYTHONPATH'] = os.pathsep.join([root] + sys.path)
    proc = subprocess.run(
        [sys.executable, '-m', 'geozoom_ros.cli', 'world', 'make', '--seed', '1', '--size-m',
         '200', '--origin', '52.5,13.4', '-o', str(tmp_path / 'w'), '--quiet', '--no-drive'],
        env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert '\n' not in err and 'EGL' in err
    assert 'libegl1 libgl1 libegl-mesa0 libgl1-mesa-dri' in err


def test_supersampling_is_the_box_filter_of_a_larger_render(city):
    """2x anti-aliasing equals the 2x2 box filter of a view rendered at twice the size."""
    import cv2
    x, y = _pose(city, 4)
    light = S.sample_lighting('summer', np.random.default_rng(3), city.knobs)
    light = S.Lighting(**{**light.__dict__, 'clouds': 0.5})
    aa = GroundRenderer(city, 96, 72, supersample=2)
    big = GroundRenderer(city, 192, 144, supersample=1)
    try:
        imgs = [(aa.render(x, y, 1.8, h, 80.0, lighting=light),
                 big.render(x, y, 1.8, h, 80.0, lighting=light)) for h in (10.0, 130.0, 250.0)]
    finally:
        aa.close()
        big.close()
    for small, large in imgs:
        box = cv2.resize(large, (96, 72), interpolation=cv2.INTER_AREA)
        d = np.abs(small.astype(int) - box.astype(int))
        # The sky is shaded once per output pixel instead of four times: it is smooth.
        assert d.mean() < 0.5 and np.mean(d > 12) < 0.005
        # And it is anti-aliased: fewer hard steps between neighbours than one sample.
        one = large[::2, ::2].astype(int)
        assert np.abs(np.diff(small.astype(int), axis=1)).mean() < np.abs(
            np.diff(one, axis=1)).mean()


def test_meshes_face_outwards_so_back_faces_can_be_culled(city):
    """Every triangle is wound counter-clockwise seen from the side its normal points to."""
    from geozoom_ros.world.city import chunk_mesh
    seen = set()
    for i in (-1, 0):
        for j in (-1, 0):
            flat, _, solid, _ = chunk_mesh(city, (i * 256, j * 256, (i + 1) * 256,
                                                  (j + 1) * 256))
            for arr in (flat, solid):
                t = arr.reshape(-1, 3, arr.shape[1])
                g = np.cross(t[:, 1, :3] - t[:, 0, :3], t[:, 2, :3] - t[:, 0, :3])
                assert np.all(np.einsum('ij,ij->i', g, t[:, :, 3:6].mean(1)) > 0)
                seen |= set(np.unique(t[:, 0, 6]).astype(int).tolist())
    assert {1, 3, 4, 5, 6, 8, 9} <= seen  # roads, roofs, walls, trees, grass, landmarks


def test_indexed_meshes_keep_every_triangle():
    from geozoom_ros.world.render_gl import _indexed
    rng = np.random.default_rng(0)
    pool = rng.random((7, 12)).astype(np.float32)
    tris = pool[rng.integers(0, 7, 60)]
    verts, index = _indexed(tris)
    assert len(verts) <= 7 and index.dtype == np.uint32
    assert np.array_equal(verts[index], tris)
    v0, i0 = _indexed(np.zeros((0, 12), np.float32))
    assert len(v0) == 0 and len(i0) == 0


def test_a_mirrored_orthophoto_grid_is_the_mirror_image(renderer):
    """Culling follows the winding of the grid: a grid mirrored east-west still shows roofs."""
    n, half = 64, 60.0
    a = [[2 * half / n, 0.0, -half], [0.0, -2 * half / n, half]]
    mirrored = [[-2 * half / n, 0.0, half], [0.0, -2 * half / n, half]]
    ids = renderer.render_ortho(a, n, n, labels=True)
    ids_m = renderer.render_ortho(mirrored, n, n, labels=True)
    assert (ids > 0).mean() > 0.05  # buildings in the box
    assert np.mean(ids_m[:, ::-1] == ids) > 0.98
    rgb = renderer.render_ortho(a, n, n).astype(int)
    rgb_m = renderer.render_ortho(mirrored, n, n).astype(int)
    assert np.abs(rgb_m[:, ::-1] - rgb).mean() < 1.0


def test_bench_world_latency_and_a_bad_train_size(city, renderer, capsys):
    from geozoom_ros.cli import main
    from geozoom_ros.world import dataset as D
    from geozoom_ros.world.bench import _latency
    views = D.sample_views(city, 3)
    res = _latency(renderer, views, (64, 48), n=3)
    assert 0.0 < res['wall_p50_ms'] < 10000.0 and res['cpu_p50_ms'] > 0.0
    assert main(['bench', 'world', '--train-size', '256by192', '--big-m', '0']) == 2
    err = capsys.readouterr().err.strip()
    assert '\n' not in err and '--train-size' in err and 'WxH' in err
