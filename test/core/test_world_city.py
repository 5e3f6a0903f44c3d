"""The procedural city: determinism, a connected road network, shared palettes, splits, errors."""

from collections import Counter, deque

import numpy as np
import pytest

from geozoom_ros.errors import ConfigError, InputError
from geozoom_ros.world import dataset as D
from geozoom_ros.world import styles as S
from geozoom_ros.world.city import make_city, points_in_polygon

ORIGIN = (47.3769, 8.5417)


@pytest.fixture(scope='module')
def city():
    return make_city(11, 1200, ORIGIN, 'summer')


def _same(a, b):
    assert a.counts() == b.counts()
    assert np.array_equal(a.nodes, b.nodes)
    for x, y in zip(a.buildings, b.buildings):
        assert np.array_equal(x.footprint, y.footprint)
        assert (x.height_m, x.roof_color, x.facade_color) == (y.height_m, y.roof_color,
                                                              y.facade_color)
    for key in a.trees:
        assert np.array_equal(a.trees[key], b.trees[key])


def test_same_seed_same_city_new_seed_new_city(city):
    _same(city, make_city(11, 1200, ORIGIN, 'summer'))
    # The style changes colours only: the geometry of a seed is the same in every season.
    _same(city, make_city(11, 1200, ORIGIN, 'winter'))
    other = make_city(12, 1200, ORIGIN, 'summer')
    assert other.rotation_deg != city.rotation_deg
    assert other.counts() != city.counts()


def test_city_has_everything_the_issue_asks_for(city):
    c = city.counts()
    assert c['buildings'] > 300 and c['trees'] > 300
    assert c['parks'] >= 1 and c['plazas'] >= 1 and c['landmarks'] == 3
    kinds = {r.kind for r in city.all_roads()}
    assert kinds == {'arterial', 'street', 'lane'}
    widths = [r.width_m for r in city.all_roads()]
    assert min(widths) < 8 < 18 < max(widths)
    heights = np.array([b.height_m for b in city.buildings])
    assert heights.min() < 8 and heights.max() > 30  # houses and towers
    assert {b.roof_kind for b in city.buildings} == {'flat', 'gable'}
    xmin, ymin, xmax, ymax = city.bounds_enu
    assert (xmin, ymin, xmax, ymax) == (-600, -600, 600, 600)


def test_routable_roads_form_one_connected_network_inside_the_bounds(city):
    nodes, edges = city.road_graph()
    assert len(edges) == len(city.roads) > 20
    for k, road in enumerate(city.roads):
        assert np.allclose(road.polyline[0], nodes[edges[k, 0]])
        assert np.allclose(road.polyline[-1], nodes[edges[k, 1]])
    assert np.all(np.abs(nodes) <= 600)
    adj = {i: [] for i in range(len(nodes))}
    for a, b in edges:
        adj[a].append(b)
        adj[b].append(a)
    seen, queue = {0}, deque([0])
    while queue:
        for m in adj[queue.popleft()]:
            if m not in seen:
                seen.add(m)
                queue.append(m)
    assert len(seen) == len(nodes)


def test_colours_come_from_small_shared_palettes(city):
    roofs = Counter(b.roof_color for b in city.buildings)
    facades = Counter(b.facade_color for b in city.buildings)
    k = city.knobs.palette_size
    assert set(roofs) <= set(range(k)) and set(facades) <= set(range(k))
    # Every colour in use is shared by many buildings: no colour identifies a place.
    assert min(roofs.values()) >= 10 and min(facades.values()) >= 10
    small = make_city(11, 1200, ORIGIN, 'summer', {'palette_size': 3})
    assert len({b.roof_color for b in small.buildings}) == 3


def test_buildings_do_not_stand_on_roads(city):
    rng = np.random.default_rng(0)
    pts = []
    for road in rng.choice(city.roads, 40):
        a, b = road.polyline
        pts.append(a + (b - a) * rng.uniform(0.2, 0.8))
    pts = np.array(pts)
    for b in city.buildings:
        assert not points_in_polygon(pts, b.footprint).any()


def test_test_cross_blocks_keep_training_views_out_with_a_margin(city):
    blocks = D.cross_blocks(city)
    assert len(blocks) >= 2
    area = np.sum((blocks[:, 2] - blocks[:, 0]) * (blocks[:, 3] - blocks[:, 1]))
    assert 0.1 < area / 1200 ** 2 < 0.3
    views = D.sample_views(city, 1000)
    counts = Counter(v['split'] for v in views)
    assert counts == {'train': 700, 'val': 100, 'test-same': 100, 'test-cross': 100}
    xy = np.array([[v['east_m'], v['north_m']] for v in views])
    split = np.array([v['split'] for v in views])
    d = D.distance_to_boxes(xy, blocks)
    assert np.all(d[split == 'test-cross'] == 0)
    assert np.all(d[split != 'test-cross'] > city.knobs.margin_m)
    rows = [dict(east_m=v['east_m'], north_m=v['north_m'], split=v['split']) for v in views]
    assert D.check_splits(city, rows) == 0
    # Poses: headings cover the circle, FOV and camera height within the knobs.
    h = np.array([v['heading_deg'] for v in views])
    assert np.histogram(h, bins=8, range=(0, 360))[0].min() > 80
    fov = np.array([v['fov_deg'] for v in views])
    assert 60 <= fov.min() and fov.max() <= 100 and fov.max() - fov.min() > 30
    hm = np.array([v['height_m'] for v in views])
    assert 1.4 <= hm.min() and hm.max() <= 2.5
    # Nobody stands inside a building.
    for b in city.buildings[::7]:
        assert not points_in_polygon(xy, b.footprint).any()


@pytest.mark.parametrize('kwargs, match', [
    (dict(size_m=0), 'size_m'),
    (dict(size_m=float('nan')), 'size_m'),
    (dict(origin_latlon=(95.0, 8.0)), 'origin'),
    (dict(origin_latlon=(47.0, 200.0)), 'origin'),
    (dict(style='spring'), 'style'),
])
def test_bad_arguments_raise_one_clear_line(kwargs, match):
    args = dict(seed=1, size_m=500, origin_latlon=ORIGIN, style='summer')
    args.update(kwargs)
    with pytest.raises(InputError, match=match) as info:
        make_city(**args)
    assert '\n' not in str(info.value)


def test_knobs_are_strict():
    with pytest.raises(ConfigError, match='palete_size'):
        S.make_knobs({'palete_size': 4})
    with pytest.raises(ConfigError, match='fov_deg'):
        S.make_knobs({'fov_deg': (100, 60)})
    hard, easy = S.make_knobs(None, 'hard'), S.make_knobs(None, 'easy')
    assert hard.palette_size < S.Knobs().palette_size < easy.palette_size
    assert hard.n_landmarks < easy.n_landmarks


def test_lighting_and_camera_effects_are_seeded():
    k = S.Knobs()
    a = S.sample_lighting('autumn', np.random.default_rng(3), k)
    b = S.sample_lighting('autumn', np.random.default_rng(3), k)
    assert a == b
    img = np.full((48, 64, 3), 128, np.uint8)
    e1 = S.camera_effects(img, np.random.default_rng(5), 1.0)
    e2 = S.camera_effects(img, np.random.default_rng(5), 1.0)
    assert np.array_equal(e1, e2) and not np.array_equal(e1, img)
    assert np.array_equal(S.camera_effects(img, np.random.default_rng(5), 0.0), img)
