"""Zoom search on a real bundle file with a planted-path backend (numpy, no torch)."""

from types import SimpleNamespace

import numpy as np
import pytest

from geozoom_ros.bundle import load_bundle, make_levels, write_bundle
from geozoom_ros.errors import InputError
from geozoom_ros.geo import (actions_between, ancestor, Cell, cell_at, cell_bounds, cell_center,
                             cell_size_m, child, geodesic_distance_m)
from geozoom_ros.runtime.base import PolicyBackend
from geozoom_ros.search import (beam, fused, greedy, hypotheses_covariance, Prior,
                                retrieval_evidence)

K, STEPS, ROOT_Z, D = 4, 3, 14, 8
E = 6  # retrieval embedding size
ROOT = cell_at(48.137, 11.575, ROOT_Z)


def _make_bundle(tmp_path, bounds, coverage_fn=None, name='b', retrieval_seed=None):
    levels = make_levels(bounds, ROOT_Z, K, STEPS)
    n = sum(lv.count for lv in levels if lv.offset >= 0)
    tokens = np.zeros((n, D), np.float32)
    tokens[:, 0] = np.arange(n)  # a token names its own row: float16 holds ints < 2048 exactly
    tokens[:, 1] = 1.0
    coverage = np.ones(n, np.float32)
    if coverage_fn is not None:
        for lv in levels[:-1]:
            for i, c in enumerate(lv.cells()):
                coverage[lv.offset + i] = coverage_fn(c)
    extra = {'grid_k': K, 'steps': STEPS, 'root_zoom': ROOT_Z, 'view_size': 64,
             'map': {'path': 'test.mbtiles', 'sha256': 'x', 'bounds': list(bounds)},
             'model': {'hash': 'f' * 64}}
    retrieval = None
    if retrieval_seed is not None:  # unit retrieval embeddings of every level's cells
        rng = np.random.default_rng(retrieval_seed)
        retrieval = rng.normal(size=(sum(lv.count for lv in levels), E))
        retrieval /= np.linalg.norm(retrieval, axis=1, keepdims=True)
        extra['retrieval'] = {'model_hash': 'e' * 64}
    return load_bundle(write_bundle(tmp_path / name, levels, tokens, extra, coverage,
                                    retrieval=retrieval))


def _shrink(bounds, eps=1e-6):
    w, s, e, n = bounds
    return (w + eps, s + eps, e - eps, n - eps)


class PlantedBackend(PolicyBackend):
    """Scores actions from a table keyed by the current cell, read back from its token.

    ``table`` maps a cell to a [k*k] logit vector; other cells get uniform logits. Every call
    checks that the tokens it receives belong to the cells its action history reaches.
    """

    name = 'planted'

    def __init__(self, bundle, table):
        self.config = SimpleNamespace(grid_k=K, steps=STEPS, root_zoom=ROOT_Z, embed_dim=D)
        self.model_hash = 'f' * 64
        self.table = table
        self.calls = []
        self.row_cell = {}
        for lv in bundle.levels[:-1]:
            for i, c in enumerate(lv.cells()):
                self.row_cell[lv.offset + i] = c

    def encode_ground(self, images, headings=None):
        return np.ones((len(images), D), np.float32)

    def step_logits(self, g, sat, actions):
        b, t1, _ = sat.shape
        assert g.shape == (b, D) and actions.shape == (b, t1 - 1)
        assert actions.dtype == np.int64
        self.calls.append(b)
        out = np.zeros((b, K * K), np.float32)
        for i in range(b):
            cells = [self.row_cell[int(round(r))] for r in sat[i, :, 0]]
            for t, a in enumerate(actions[i]):
                assert child(cells[t], int(a), K) == cells[t + 1]
            out[i] = self.table.get(cells[-1], np.zeros(K * K))
        return out


def _plant(table, target, root, strength=5.0):
    """Make every ancestor of ``target`` (from ``root``) favour the step towards it."""
    path = actions_between(root, target, K)
    cell = root
    for a in path:
        logits = np.zeros(K * K)
        logits[a] = strength
        table[cell] = logits
        cell = child(cell, a, K)
    return path


def _softmax(v):
    e = np.exp(v - v.max())
    return e / e.sum()


def _path_prob(backend, root, path):
    p, cell = 1.0, root
    for a in path:
        p *= _softmax(backend.table.get(cell, np.zeros(K * K)))[a]
        cell = child(cell, a, K)
    return p


@pytest.fixture(scope='module')
def one_root(tmp_path_factory):
    return _make_bundle(tmp_path_factory.mktemp('search'), _shrink(cell_bounds(ROOT)))


def _terminal(root, actions):
    cell = root
    for a in actions:
        cell = child(cell, a, K)
    return cell


def test_greedy_and_beam_return_the_planted_cell(one_root):
    target = _terminal(ROOT, [5, 10, 3])
    table = {}
    _plant(table, target, ROOT)
    backend = PlantedBackend(one_root, table)
    for result in (greedy(backend, one_root, np.ones(D)),
                   beam(backend, one_root, np.ones(D), width=4)):
        best = result.hypotheses[0]
        assert best.cell == target and best.path == (5, 10, 3)
        p_step = np.exp(5.0) / (np.exp(5.0) + 15)
        assert best.prob == pytest.approx(p_step ** 3, rel=1e-5)
        assert result.confidence == pytest.approx(best.prob)
        lat, lon = cell_center(target)
        assert geodesic_distance_m(lat, lon, *result.estimate) < 0.05
    # One batched decoder call per level, whatever the width.
    assert backend.calls[-3:] == [1, 4, 4]


def test_beam_escapes_a_first_step_trap_that_greedy_falls_into(one_root):
    table = {}
    good = _terminal(ROOT, [9, 6, 12])
    _plant(table, good, ROOT, strength=8.0)
    root_logits = np.zeros(K * K)
    root_logits[2] = 2.0   # the trap: slightly better first step, then no idea at all
    root_logits[9] = 1.8
    table[ROOT] = root_logits
    backend = PlantedBackend(one_root, table)
    g = greedy(backend, one_root, np.ones(D))
    b = beam(backend, one_root, np.ones(D), width=4)
    assert g.hypotheses[0].path[0] == 2
    assert b.hypotheses[0].cell == good
    assert b.confidence > 10 * g.confidence
    # Probabilities are products of step softmaxes, sorted, and sum to at most 1.
    probs = [h.prob for h in b.hypotheses]
    assert probs == sorted(probs, reverse=True)
    assert sum(probs) <= 1.0 + 1e-9
    for h in b.hypotheses:
        assert h.prob == pytest.approx(_path_prob(backend, ROOT, h.path), rel=1e-5)
        assert _terminal(ROOT, h.path) == h.cell
    assert len(b.hypotheses) == 4


def test_covariance_is_positive_definite_and_at_least_quantisation(one_root):
    table = {}
    _plant(table, _terminal(ROOT, [0, 15, 7]), ROOT, strength=1.0)  # a weak, spread beam
    backend = PlantedBackend(one_root, table)
    result = beam(backend, one_root, np.ones(D), width=8)
    side = cell_size_m(result.cell)
    q = side * side / 12.0
    eig = np.linalg.eigvalsh(result.cov_en)
    assert np.all(np.isfinite(result.cov_en)) and np.allclose(result.cov_en, result.cov_en.T)
    assert eig.min() >= q * (1 - 1e-6)
    assert eig.max() > 2 * q  # the beam's spread adds to the quantisation
    single = greedy(backend, one_root, np.ones(D))
    assert np.allclose(single.cov_en, np.eye(2) * q, rtol=1e-3)


def test_hypotheses_covariance_matches_hand_computation():
    z = 20
    c0 = cell_at(0.0001, 0.0001, z)
    c1 = Cell(c0.x + 2, c0.y, z)  # two cells east
    side = cell_size_m(c0)
    cov = hypotheses_covariance((np.array([c0.x, c1.x]), np.array([c0.y, c1.y])), z,
                                [0.3, 0.1], best=0)
    # weights 0.75 / 0.25; offset of the second centre: 2 sides east
    expect_ee = 0.25 * (2 * side) ** 2 + side ** 2 / 12
    assert cov[0, 0] == pytest.approx(expect_ee, rel=1e-3)
    assert cov[1, 1] == pytest.approx(side ** 2 / 12, rel=1e-3)
    assert abs(cov[0, 1]) < 1e-6 * expect_ee


def test_several_roots(tmp_path):
    east = Cell(ROOT.x + 1, ROOT.y, ROOT_Z)
    w, s, _, n = cell_bounds(ROOT)
    bounds = (w + 0.01, s + 0.001, cell_bounds(east)[2] - 0.01, n - 0.001)
    bundle = _make_bundle(tmp_path, bounds)
    assert bundle.roots == [ROOT, east]
    # Terminal cells outside the map's bounds are not in the bundle: plant inside.
    lat, lon = cell_center(Cell(east.x * 4 + 1, east.y * 4 + 2, ROOT_Z + 2))
    target = cell_at(lat, lon, ROOT_Z + 2 * STEPS)
    table = {}
    _plant(table, target, east, strength=6.0)
    backend = PlantedBackend(bundle, table)
    for result in (greedy(backend, bundle, np.ones(D)), beam(backend, bundle, np.ones(D), 6)):
        assert result.hypotheses[0].cell == target
        assert result.hypotheses[0].root == east
        assert sum(h.prob for h in result.hypotheses) <= 1 + 1e-9
        assert result.info['roots_searched'] == 2
    assert backend.calls[0] == 2  # both roots decoded in one call


def test_children_outside_the_map_or_without_imagery_are_never_chosen(tmp_path):
    w, s, e, n = cell_bounds(ROOT)
    half = (w + 1e-6, s + 1e-6, (w + e) / 2 - 1e-6, n - 1e-6)  # the west half of the root
    blank = Cell(ROOT.x * 4, ROOT.y * 4, ROOT_Z + 2)           # north-west child: no imagery
    bundle = _make_bundle(tmp_path, half, coverage_fn=lambda c: 0.0 if c == blank else 1.0)
    table = {ROOT: np.where(np.arange(16) % 4 >= 2, 9.0, 0.0)}  # loves the eastern columns
    table[ROOT][0] = 8.0
    backend = PlantedBackend(bundle, table)
    result = beam(backend, bundle, np.ones(D), width=16)
    for h in result.hypotheses:
        assert h.path[0] % 4 < 2 and h.path[0] != 0
    assert sum(h.prob for h in result.hypotheses) <= 1 + 1e-9


def test_prior_excludes_a_planted_answer_outside_its_region(one_root):
    target = _terminal(ROOT, [0, 0, 0])           # north-west corner of the root
    table = {}
    _plant(table, target, ROOT, strength=10.0)
    backend = PlantedBackend(one_root, table)
    lat, lon = cell_center(_terminal(ROOT, [15]))  # far south-east
    prior = Prior.from_sigma(lat, lon, 300.0)
    result = beam(backend, one_root, np.ones(D), width=4, prior=prior)
    assert result.hypotheses[0].cell != target
    for h in result.hypotheses:
        hl, ho = h.center
        assert geodesic_distance_m(hl, ho, lat, lon) < 3 * 300 * 1.5 + cell_size_m(h.cell)
    assert greedy(backend, one_root, np.ones(D)).hypotheses[0].cell == target


def test_small_prior_starts_deeper_with_forced_actions(one_root):
    mid = _terminal(ROOT, [6, 9])                # a level-2 cell (zoom 18)
    target = _terminal(ROOT, [6, 9, 5])  # a central child: inside the prior
    table = {}
    _plant(table, target, ROOT)
    backend = PlantedBackend(one_root, table)
    lat, lon = cell_center(mid)
    result = greedy(backend, one_root, np.ones(D), prior=(lat, lon, 4.0))
    assert result.start == mid and result.info['start_level'] == 2
    assert result.decoder_calls == 1
    best = result.hypotheses[0]
    assert best.cell == target and best.path == (6, 9, 5)
    # The forced steps count with probability 1: only the last step's softmax remains, over
    # the four central children that overlap the 12 m prior region.
    assert best.prob == pytest.approx(np.exp(5.0) / (np.exp(5.0) + 3), rel=1e-5)
    assert {h.path[-1] for h in beam(backend, one_root, np.ones(D), 16,
                                     prior=(lat, lon, 4.0)).hypotheses} == {5, 6, 9, 10}
    # A wider prior starts at the level whose cell holds its region, or at the root.
    wide = greedy(backend, one_root, np.ones(D), prior=(lat, lon, 60.0))
    assert wide.info['start_level'] < 2
    assert ancestor(wide.hypotheses[0].cell, ROOT_Z) == ROOT


def test_bad_prior_and_bad_token_are_one_line_errors(one_root):
    backend = PlantedBackend(one_root, {})
    with pytest.raises(InputError, match='outside the map bundle'):
        beam(backend, one_root, np.ones(D), prior=(10.0, 10.0, 50.0))
    with pytest.raises(InputError, match='positive finite'):
        beam(backend, one_root, np.ones(D), prior=(48.1, 11.5, -5.0))
    with pytest.raises(InputError, match='not symmetric positive definite'):
        beam(backend, one_root, np.ones(D), prior=(48.1, 11.5, [[1.0, 2.0], [2.0, 1.0]]))
    with pytest.raises(InputError, match='not finite'):
        beam(backend, one_root, np.ones(D), prior=(float('nan'), 11.5, 5.0))
    with pytest.raises(InputError, match='ground token'):
        beam(backend, one_root, np.ones(D + 1))
    with pytest.raises(InputError, match='beam width'):
        beam(backend, one_root, np.ones(D), width=0)


def test_residual_covariance_counts_the_mass_outside_the_hypotheses(one_root):
    table = {}
    _plant(table, _terminal(ROOT, [3, 3, 3]), ROOT, strength=2.0)
    backend = PlantedBackend(one_root, table)
    plain = greedy(backend, one_root, np.ones(D))
    res = greedy(backend, one_root, np.ones(D), residual=True)
    mass = plain.confidence
    assert res.info['mass'] == pytest.approx(mass) and mass < 0.5
    side = cell_size_m(ROOT)
    extra = res.cov_en - plain.cov_en
    np.testing.assert_allclose(extra, np.eye(2) * (1 - mass) * side ** 2 / 12, rtol=1e-3)
    # With a prior, the residual spreads over the prior's region only.
    lat, lon = cell_center(_terminal(ROOT, [3, 3, 3]))
    pr = greedy(backend, one_root, np.ones(D), prior=(lat, lon, 400.0), residual=True)
    assert np.trace(pr.cov_en) < np.trace(res.cov_en)


# --------------------------------------------------------------------------------------------
# The fused search: decoder x retrieval evidence

def _terminal_scores(bundle, e, scale):
    """Return (cells, scale * cos) of every terminal cell, brute force."""
    vecs = np.asarray(bundle.terminal_retrieval(), np.float32)
    return bundle.terminal.cells(), scale * (vecs @ e.astype(np.float32)).astype(np.float64)


@pytest.fixture(scope='module')
def two_roots(tmp_path_factory):
    east = Cell(ROOT.x + 1, ROOT.y, ROOT_Z)
    w, s, _, n = cell_bounds(ROOT)
    bounds = (w + 0.01, s + 0.001, cell_bounds(east)[2] - 0.01, n - 0.001)
    return _make_bundle(tmp_path_factory.mktemp('fused'), bounds, name='two',
                        retrieval_seed=3)


def test_retrieval_evidence_is_the_log_mass_of_the_terminal_cells_inside(two_roots):
    b = two_roots
    e = np.random.default_rng(1).normal(size=E)
    e /= np.linalg.norm(e)
    ev = retrieval_evidence(b, e, 7.0)
    cells, scores = _terminal_scores(b, e, 7.0)
    assert len(ev) == STEPS + 1 and np.allclose(ev[-1], scores, atol=1e-5)
    for level in range(STEPS):
        z = b.levels[level].zoom
        for i, c in enumerate(b.levels[level].cells()):
            inside = [s for t, s in zip(cells, scores) if ancestor(t, z) == c]
            want = np.logaddexp.reduce(inside) if inside else -np.inf
            assert ev[level][i] == pytest.approx(want, abs=1e-5), (level, c)
    # The roots hold all the mass.
    assert np.logaddexp.reduce(ev[0]) == pytest.approx(np.logaddexp.reduce(scores), abs=1e-5)
    with pytest.raises(InputError, match='retrieval embedding has shape'):
        retrieval_evidence(b, np.ones(E + 1), 7.0)


def test_fused_without_the_decoder_is_retrieval_over_the_whole_map(two_roots):
    b = two_roots
    cells, _ = _terminal_scores(b, np.ones(E), 1.0)
    table = {}
    _plant(table, cells[0], ancestor(cells[0], ROOT_Z), strength=9.0)  # ignored at weight 0
    backend = PlantedBackend(b, table)
    rng = np.random.default_rng(2)
    for _ in range(5):
        e = rng.normal(size=E)
        e /= np.linalg.norm(e)
        _, scores = _terminal_scores(b, e, 20.0)
        res = fused(backend, b, np.ones(D), retrieval_evidence(b, e, 20.0), width=64,
                    zoom_weight=0.0)
        best = int(np.argmax(scores))
        # The chain of the retrieval softmax's conditionals is the softmax over all cells,
        # across both roots.
        assert res.hypotheses[0].cell == cells[best]
        p = np.exp(scores - np.logaddexp.reduce(scores))
        assert res.confidence == pytest.approx(p[best], rel=1e-4)
        assert sum(h.prob for h in res.hypotheses) <= 1 + 1e-9


def test_fused_with_flat_evidence_is_the_zoom_beam(one_root, tmp_path):
    table = {}
    good = _terminal(ROOT, [9, 6, 12])
    _plant(table, good, ROOT, strength=3.0)
    table[ROOT][2] = 2.5
    backend = PlantedBackend(one_root, table)
    # Equal scores everywhere: every child of a full root holds the same mass.
    flat = [np.full(lv.count, 0.0) for lv in one_root.levels]
    want = beam(backend, one_root, np.ones(D), width=4)
    got = fused(backend, one_root, np.ones(D), flat, width=4, zoom_weight=1.0)
    assert [h.cell for h in got.hypotheses] == [h.cell for h in want.hypotheses]
    np.testing.assert_allclose([h.prob for h in got.hypotheses],
                               [h.prob for h in want.hypotheses], rtol=1e-9)


def test_the_zoom_weight_trades_the_decoder_against_retrieval(one_root):
    decoder_says = _terminal(ROOT, [5, 10, 3])
    retrieval_says = _terminal(ROOT, [12, 1, 7])
    table = {}
    _plant(table, decoder_says, ROOT, strength=4.0)
    backend = PlantedBackend(one_root, table)
    term = one_root.terminal
    scores = np.zeros(term.count)
    scores[term.local_index([retrieval_says.x], [retrieval_says.y])[0][0]] = 6.0
    ev = [None] * STEPS + [scores]
    for level in range(STEPS - 1, -1, -1):  # the log mass of the cells below
        lv, below = one_root.levels[level], one_root.levels[level + 1]
        bx, by = below.cell_arrays()
        parent = lv.local_index(bx // K, by // K)[0]
        ev[level] = np.full(lv.count, -np.inf)
        np.logaddexp.at(ev[level], parent, ev[level + 1])
    picks = {w: fused(backend, one_root, np.ones(D), ev, width=8, zoom_weight=w)
             for w in (0.0, 0.5, 3.0)}
    assert picks[0.0].cell == retrieval_says
    assert picks[3.0].cell == decoder_says
    # Each expert's cell keeps some probability in between.
    mid = {h.cell: h.prob for h in picks[0.5].hypotheses}
    assert decoder_says in mid and retrieval_says in mid


def test_fused_bad_input_is_one_line(one_root, two_roots):
    backend = PlantedBackend(one_root, {})
    flat = [np.zeros(lv.count) for lv in one_root.levels]
    with pytest.raises(InputError, match='needs retrieval evidence'):
        fused(backend, one_root, np.ones(D), None)
    with pytest.raises(InputError, match='needs retrieval evidence'):
        fused(backend, one_root, np.ones(D), flat[:-1])
    with pytest.raises(InputError, match='zoom weight'):
        fused(backend, one_root, np.ones(D), flat, zoom_weight=-1.0)
    with pytest.raises(InputError, match='beam width'):
        fused(backend, one_root, np.ones(D), flat, width=0)
    with pytest.raises(InputError, match='no retrieval embeddings'):
        retrieval_evidence(one_root, np.ones(E), 1.0)


def test_fused_with_a_small_prior_starts_deeper_and_stays_inside(two_roots):
    b = two_roots
    cells, _ = _terminal_scores(b, np.ones(E), 1.0)
    backend = PlantedBackend(b, {})
    e = np.random.default_rng(5).normal(size=E)
    e /= np.linalg.norm(e)
    ev = retrieval_evidence(b, e, 20.0)
    # A 30 m box about the centre of a level-2 cell (about 150 m): the search starts there.
    lat, lon = cell_center(ancestor(cells[len(cells) // 2], b.levels[2].zoom))
    res = fused(backend, b, np.ones(D), ev, width=8, zoom_weight=0.0, prior=(lat, lon, 5.0))
    assert res.info['start_level'] > 0
    start = res.start
    assert all(ancestor(h.cell, start.z) == start for h in res.hypotheses)
    # Inside the prior's box the search is retrieval's softmax restricted to the box.
    from geozoom_ros.search import _overlaps

    box = Prior.from_sigma(lat, lon, 5.0).merc_box()
    inside = [i for i, c in enumerate(cells) if ancestor(c, start.z) == start
              and _overlaps(box, c.x, c.y, c.z)]
    assert 0 < len(inside) < 16
    _, scores = _terminal_scores(b, e, 20.0)
    best = inside[int(np.argmax(scores[inside]))]
    assert res.hypotheses[0].cell == cells[best]
    p = np.exp(scores[inside] - np.logaddexp.reduce(scores[inside]))
    assert res.confidence == pytest.approx(p.max(), rel=1e-4)
