"""Root shortlist: ranking roots by the cross-view embedding, and the search it restricts."""

import numpy as np
import pytest
from safetensors.numpy import save_file
from test_search import _make_bundle, _plant, _terminal, D, PlantedBackend, ROOT, ROOT_Z

from geozoom_ros.errors import InputError
from geozoom_ros.geo import ancestor, Cell, cell_bounds
from geozoom_ros.search import beam, greedy
from geozoom_ros.shortlist import load_aux_weights, RootShortlist

# The planted-path backend reads a token's row from dims 0-1; the embedding uses dims 2+.
MASK = np.diag([0.0, 0.0] + [1.0] * (D - 2)).astype(np.float32)


def _weights(scale=1.0):
    return {'aux_ground.weight': MASK * scale, 'aux_ground.bias': np.zeros(D, np.float32),
            'aux_map.weight': MASK.copy(), 'aux_map.bias': np.zeros(D, np.float32)}


@pytest.fixture(scope='module')
def six_roots(tmp_path_factory):
    """A bundle over 3 x 2 root cells whose tokens carry random embedding dims."""
    w, _, _, n = cell_bounds(ROOT)
    far = Cell(ROOT.x + 2, ROOT.y + 1, ROOT_Z)
    _, s, e, _ = cell_bounds(far)
    bundle = _make_bundle(tmp_path_factory.mktemp('shortlist'),
                          (w + 1e-4, s + 1e-4, e - 1e-4, n - 1e-4))
    rng = np.random.default_rng(3)
    tokens = np.array(bundle.tokens, np.float32)
    tokens[:, 2:] = rng.standard_normal((len(tokens), D - 2))
    bundle.tokens = tokens.astype(np.float16)
    assert len(bundle.roots) == 6
    return bundle


def _level1_cell(bundle, root, index=5):
    lv = bundle.levels[1]
    cells = [c for c in lv.cells() if ancestor(c, ROOT_Z) == root]
    return cells[index]


def test_the_root_holding_the_most_similar_cell_ranks_first(six_roots):
    b = six_roots
    sl = RootShortlist(b, _weights(), level=1)
    assert len(sl) == b.levels[1].count  # every level-1 cell has imagery here
    for want in (b.roots[0], b.roots[4]):
        g = b.token(_level1_cell(b, want)).astype(np.float32)
        scores = sl.root_scores(g)
        assert scores.shape == (6,)
        assert scores[b.roots.index(want)] == pytest.approx(1.0, abs=2e-3)  # cosine of itself
        assert np.all(scores <= 1.0 + 1e-3)
        order = sl.select(g, 3)
        assert len(order) == 3 and b.roots[order[0]] == want
        # Restricted to other roots (a prior's region), the ranking is the same without it.
        others = [i for i in range(6) if i != order[0]]
        assert np.array_equal(sl.select(g, 2, among=others), order[1:3])
        # The query's scale does not matter: it is normalised.
        assert np.array_equal(RootShortlist(b, _weights(7.0)).select(g, 3), order)


def test_search_with_a_shortlist_only_decodes_the_chosen_roots(six_roots):
    b = six_roots
    root = b.roots[4]
    target = _terminal(root, [5, 6, 9])
    table = {}
    _plant(table, target, root, strength=6.0)
    sl = RootShortlist(b, _weights(), level=1)
    g_right = b.token(_level1_cell(b, root)).astype(np.float32)
    g_wrong = b.token(_level1_cell(b, b.roots[1])).astype(np.float32)
    for search in (greedy, beam):
        backend = PlantedBackend(b, table)
        full = search(backend, b, g_right)
        assert full.info['roots_searched'] == 6 and full.info['roots_total'] == 6
        assert backend.calls[0] == 6
        backend = PlantedBackend(b, table)
        short = search(backend, b, g_right, shortlist=sl, max_roots=2)
        assert short.info['roots_searched'] == 2 and short.info['roots_total'] == 6
        assert backend.calls[0] == 2
        assert short.hypotheses[0].cell == full.hypotheses[0].cell == target
        # A query that resembles another root confines the search there: the planted
        # answer is out of reach, every hypothesis lies under the chosen root.
        backend = PlantedBackend(b, table)
        elsewhere = search(backend, b, g_wrong, shortlist=sl, max_roots=1)
        assert {h.root for h in elsewhere.hypotheses} == {b.roots[1]}
        # max_roots 0, or at least the number of roots, searches every root.
        for m in (0, 6, 10):
            backend = PlantedBackend(b, table)
            assert search(backend, b, g_wrong, shortlist=sl, max_roots=m).info[
                'roots_searched'] == 6


def test_roots_without_imagery_are_never_shortlisted(tmp_path):
    w, _, _, n = cell_bounds(ROOT)
    east = Cell(ROOT.x + 1, ROOT.y, ROOT_Z)
    _, s, e, _ = cell_bounds(east)

    def coverage(c):
        return 0.0 if ancestor(c, ROOT_Z) == east else 1.0

    b = _make_bundle(tmp_path, (w + 1e-4, s + 1e-4, e - 1e-4, n - 1e-4), coverage)
    b.tokens = np.random.default_rng(0).standard_normal(b.tokens.shape).astype(np.float16)
    sl = RootShortlist(b, _weights(), level=1)
    g = np.asarray(b.tokens[b.row_of(_level1_cell(b, east))], np.float32)
    scores = sl.root_scores(g)
    assert scores[b.roots.index(east)] == -np.inf
    assert [b.roots[i] for i in sl.select(g, 2)] == [ROOT]


def test_aux_weights_load_from_safetensors_and_bad_inputs_are_one_line(tmp_path, six_roots):
    w = _weights()
    save_file(w, str(tmp_path / 'model.safetensors'))
    got = load_aux_weights(tmp_path)
    assert set(got) == set(w) and all(np.array_equal(got[k], w[k]) for k in w)
    save_file({'aux_ground.weight': MASK}, str(tmp_path / 'other.safetensors'))
    with pytest.raises(InputError, match='aux_ground.bias') as e:
        load_aux_weights(tmp_path / 'other.safetensors')
    assert '\n' not in str(e.value)
    with pytest.raises(InputError, match='does not exist'):
        load_aux_weights(tmp_path / 'missing')
    with pytest.raises(InputError, match='shape'):
        RootShortlist(six_roots, {**w, 'aux_map.weight': np.eye(D + 1, dtype=np.float32)})
    with pytest.raises(InputError, match='level'):
        RootShortlist(six_roots, w, level=7)
