"""Map bundles built from a real MBTiles file with a real (tiny, untrained) ZoomPolicy."""

import json
import sqlite3

import cv2
import numpy as np
import pytest

from geozoom_ros.bundle import (build_bundle, load_bundle, make_levels, MANIFEST, tile_range,
                                TOKENS_FILE)
from geozoom_ros.errors import InputError, MismatchError
from geozoom_ros.geo import Cell, cell_at, cell_bounds

pytest.importorskip('torch')

ROOT_Z, K, STEPS = 16, 2, 2
WEST_ROOT = cell_at(48.137, 11.575, ROOT_Z)


def map_bounds():
    """Bounds over two zoom-16 roots: the east half of one and the west part of the next."""
    w, s, e, n = cell_bounds(WEST_ROOT)
    e2 = cell_bounds(Cell(WEST_ROOT.x + 1, WEST_ROOT.y, ROOT_Z))[2]
    return ((w + e) / 2, s + 0.2 * (n - s), e + 0.3 * (e2 - e), n - 0.1 * (n - s))


def write_mbtiles(path, bounds, zooms=(15, 16, 17, 18), seed=0):
    """Write a real MBTiles file (PNG tiles, TMS rows) with a blocky random texture."""
    conn = sqlite3.connect(path)
    conn.execute('CREATE TABLE metadata (name TEXT, value TEXT)')
    conn.execute('CREATE TABLE tiles (zoom_level INTEGER, tile_column INTEGER, '
                 'tile_row INTEGER, tile_data BLOB)')
    meta = {'name': 'test', 'format': 'png', 'bounds': ','.join(f'{v:.9f}' for v in bounds),
            'minzoom': str(min(zooms)), 'maxzoom': str(max(zooms))}
    conn.executemany('INSERT INTO metadata VALUES (?, ?)', list(meta.items()))
    for z in zooms:
        x0, y0, x1, y1 = tile_range(bounds, z)
        for x in range(x0, x1 + 1):
            for y in range(y0, y1 + 1):
                rng = np.random.default_rng([seed, z, x, y])
                img = cv2.resize(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8), (256, 256),
                                 interpolation=cv2.INTER_NEAREST)
                ok, png = cv2.imencode('.png', img)
                conn.execute('INSERT INTO tiles VALUES (?, ?, ?, ?)',
                             (z, x, (1 << z) - 1 - y, png.tobytes()))
    conn.commit()
    conn.close()
    return path


def make_models(folder):
    """Save a tiny untrained ZoomPolicy and RetrievalModel; return their folders."""
    from geozoom_ros.model.config import PolicyConfig
    from geozoom_ros.model.io import save_model
    from geozoom_ros.model.policy import ZoomPolicy
    from geozoom_ros.model.retrieval import RetrievalModel
    import torch

    torch.manual_seed(0)
    cfg = PolicyConfig(embed_dim=16, grid_k=K, steps=STEPS, root_zoom=ROOT_Z, view_size=32,
                       ground_size=(32, 32), decoder_layers=1, decoder_heads=2, dropout=0.0)
    policy = save_model(ZoomPolicy(cfg, pretrained=True), folder / 'policy')
    other = save_model(ZoomPolicy(cfg, pretrained=True), folder / 'policy2')
    rcfg = PolicyConfig(embed_dim=16, grid_k=K, steps=STEPS, root_zoom=ROOT_Z, view_size=32,
                        ground_size=(32, 32), decoder_heads=2, context_m=100.0)
    retr = save_model(RetrievalModel(rcfg, pretrained=True), folder / 'retr')
    return policy, other, retr


def make_world(folder, with_retrieval=True):
    """Return a dict of paths: map, policy, other policy, retrieval model, built bundle."""
    folder.mkdir(parents=True, exist_ok=True)
    bounds = map_bounds()
    mbtiles = write_mbtiles(folder / 'map.mbtiles', bounds)
    policy, other, retr = make_models(folder)
    bundle = build_bundle(mbtiles, policy, folder / 'bundle', batch_size=8, progress=False,
                          retrieval_model=retr if with_retrieval else None)
    return {'map': mbtiles, 'policy': policy, 'other': other, 'retr': retr, 'bundle': bundle,
            'bounds': bounds}


@pytest.fixture(scope='module')
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp('bundle'))


def test_manifest_describes_the_map_and_model(world):
    from geozoom_ros.model.io import model_hash

    b = load_bundle(world['bundle'], model_hash(world['policy']))
    m = b.manifest
    assert m['grid_k'] == K and m['steps'] == STEPS and m['root_zoom'] == ROOT_Z
    assert m['embed_dim'] == 16 and m['view_size'] == 32
    assert m['model']['hash'] == model_hash(world['policy'])
    assert len(m['map']['sha256']) == 64
    assert m['package_version'] and m['created']
    # Two roots; levels 0 and 1 hold tokens, level 2 (terminal) does not.
    assert b.roots == [WEST_ROOT, Cell(WEST_ROOT.x + 1, WEST_ROOT.y, ROOT_Z)]
    levels = make_levels(world['bounds'], ROOT_Z, K, STEPS)
    assert m['cells_per_level'] == [lv.count for lv in levels]
    assert m['num_tokens'] == levels[0].count + levels[1].count
    assert b.tokens.shape == (m['num_tokens'], 16) and b.tokens.dtype == np.float16
    assert isinstance(b.tokens, np.memmap)
    assert b.retrieval.shape == (sum(lv.count for lv in levels), 16)
    assert m['retrieval']['context_m'] == 100.0
    # The index is pickle-free: manifest JSON and .npy arrays only.
    names = sorted(p.name for p in world['bundle'].iterdir())
    assert names == ['coverage.f16.npy', MANIFEST, 'retrieval.f16.npy', TOKENS_FILE]
    assert not [p for p in world['bundle'].parent.iterdir() if p.name.startswith('.bundle')]


def test_tokens_equal_the_model_encoding_of_each_cell_view(world):
    from geozoom_ros.model.io import load_model
    from geozoom_ros.tiles.store import open_store
    from geozoom_ros.tiles.views import render_view
    import torch

    b = load_bundle(world['bundle'])
    model = load_model(world['policy'])
    store = open_store(world['map'])
    cells = [b.roots[1], *b.levels[1].cells()[:3]]
    views = [render_view(store, c, 32).image for c in cells]
    with torch.inference_mode():
        want = model.encode_map(model.preprocess_map(views)).numpy()
    got = b.tokens_for(cells)
    assert got.dtype == np.float32 and got.shape == (4, 16)
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=1e-4)
    # Each token is its own cell's: distinct views give tokens far apart at float16 precision.
    spread = np.abs(got[:, None] - got[None]).max(axis=2)
    assert spread[~np.eye(4, dtype=bool)].min() > 2e-3
    np.testing.assert_array_equal(b.token(cells[2]), got[2])
    # Rows are arithmetic: offset + (y - y0) * nx + (x - x0).
    lv = b.levels[1]
    c = cells[3]
    assert b.row_of(c) == lv.offset + (c.y - lv.y0) * lv.nx + (c.x - lv.x0)
    assert float(b.coverage[b.row_of(b.roots[0])]) < 1.0  # the map covers part of this root
    with pytest.raises(InputError, match='no token'):
        b.token(Cell(0, 0, ROOT_Z))


def test_usable_children_are_held_cells_with_imagery(world):
    from geozoom_ros.bundle import MIN_COVERAGE

    b = load_bundle(world['bundle'])
    for level in range(1, b.steps + 1):
        lv = b.levels[level]
        # Every cell of the level, plus a ring of cells just outside it.
        xs, ys = np.meshgrid(np.arange(lv.x0 - 1, lv.x0 + lv.nx + 1),
                             np.arange(lv.y0 - 1, lv.y0 + lv.ny + 1))
        idx, ok = b.usable_children(level, xs.ravel(), ys.ravel())
        inside = lv.inside(xs.ravel(), ys.ravel())
        want = inside.copy()
        if lv.offset >= 0:
            local, _ = lv.local_index(xs.ravel(), ys.ravel())
            cov = np.asarray(b.coverage[local + lv.offset], np.float32)
            want &= cov >= MIN_COVERAGE
            assert (inside & ~want).any() or level == 1  # some held views have no imagery
        np.testing.assert_array_equal(ok, want)
        assert (idx[~inside] == 0).all()
        np.testing.assert_array_equal(idx[inside], lv.local_index(xs.ravel(), ys.ravel())[0]
                                      [inside])


def test_mismatched_model_is_refused_with_one_line(world):
    from geozoom_ros.model.io import model_hash
    from geozoom_ros.runtime.torch_backend import TorchBackend

    other = TorchBackend(world['other'])
    with pytest.raises(MismatchError) as exc:
        load_bundle(world['bundle'], other)
    msg = str(exc.value)
    assert '\n' not in msg and 'geozoom index' in msg
    assert model_hash(world['policy'])[:8] in msg and other.model_hash[:8] in msg
    with pytest.raises(MismatchError):
        load_bundle(world['bundle'], 'deadbeef' * 8)


def test_rebuild_is_skipped_when_current_and_replaces_atomically(world, tmp_path):
    out = world['bundle']
    before = (out / TOKENS_FILE).stat().st_mtime_ns
    assert build_bundle(world['map'], world['policy'], out, progress=False,
                        retrieval_model=world['retr']) == out
    assert (out / TOKENS_FILE).stat().st_mtime_ns == before
    # A bundle for another model replaces the old one in place, without retrieval this time.
    second = tmp_path / 'b2'
    build_bundle(world['map'], world['policy'], second, progress=False)
    build_bundle(world['map'], world['other'], second, progress=False)
    m = json.loads((second / MANIFEST).read_text())
    from geozoom_ros.model.io import model_hash
    assert m['model']['hash'] == model_hash(world['other']) and m['retrieval'] is None
    # Adding retrieval embeddings later keeps the policy tokens (same map and model).
    tokens = (second / TOKENS_FILE).read_bytes()
    build_bundle(world['map'], world['other'], second, progress=False,
                 retrieval_model=world['retr'])
    assert (second / TOKENS_FILE).read_bytes() == tokens
    assert load_bundle(second).retrieval is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == ['b2']


def test_bad_inputs_are_one_line_errors(world, tmp_path):
    with pytest.raises(InputError, match='does not exist'):
        load_bundle(tmp_path / 'nope')
    (tmp_path / 'notbundle').mkdir()
    (tmp_path / 'notbundle' / 'x.txt').write_text('x')
    with pytest.raises(InputError, match='not a map bundle'):
        load_bundle(tmp_path / 'notbundle')
    with pytest.raises(InputError, match='not a map bundle'):
        build_bundle(world['map'], world['policy'], tmp_path / 'notbundle', progress=False)
    with pytest.raises(InputError, match='does not exist'):
        build_bundle(tmp_path / 'missing.mbtiles', world['policy'], tmp_path / 'o',
                     progress=False)
    # A truncated token array is refused, not half-read.
    broken = tmp_path / 'broken'
    broken.mkdir()
    for p in world['bundle'].iterdir():
        (broken / p.name).write_bytes(p.read_bytes())
    data = (broken / TOKENS_FILE).read_bytes()
    (broken / TOKENS_FILE).write_bytes(data[:len(data) // 2])
    with pytest.raises(InputError, match='rebuild'):
        load_bundle(broken)
    assert not (tmp_path / 'o').exists()


def test_heading_aligned_retrieval_stores_rotated_terminal_crops(world, tmp_path):
    from geozoom_ros.model.config import PolicyConfig
    from geozoom_ros.model.io import save_model
    from geozoom_ros.model.retrieval import RetrievalModel

    cfg = PolicyConfig(embed_dim=16, grid_k=K, steps=STEPS, root_zoom=ROOT_Z, view_size=32,
                       ground_size=(32, 32), decoder_heads=2, context_m=60.0,
                       heading_aligned=True)
    retr = save_model(RetrievalModel(cfg, pretrained=True), tmp_path / 'retr_h')
    b = load_bundle(build_bundle(world['map'], world['policy'], tmp_path / 'bh',
                                 progress=False, retrieval_model=retr))
    term = b.terminal
    assert b.manifest['retrieval']['heading_bins'] == 8
    assert b.manifest['retrieval']['context_m'] == 60.0
    assert b.retrieval_heading.shape == (8, term.count, 16)
    north = np.asarray(b.retrieval[term.retrieval_offset:term.retrieval_offset + term.count],
                       np.float32)
    np.testing.assert_allclose(np.asarray(b.retrieval_heading[0], np.float32), north,
                               rtol=2e-3, atol=1e-4)
    east = np.asarray(b.retrieval_heading[2], np.float32)
    # Rotated crops embed differently (except crops inside one uniform block of the texture).
    assert np.mean(np.abs(east - north).max(axis=1) > 1e-2) > 0.5


def test_match_head_bundle_holds_a_key_for_every_cell_of_every_level(world, tmp_path):
    from geozoom_ros.model.config import PolicyConfig
    from geozoom_ros.model.io import save_model
    from geozoom_ros.model.policy import ZoomPolicy
    from geozoom_ros.runtime.torch_backend import TorchBackend
    from geozoom_ros.tiles.store import open_store
    from geozoom_ros.tiles.views import render_view
    import torch

    torch.manual_seed(1)
    cfg = PolicyConfig(embed_dim=16, grid_k=K, steps=STEPS, root_zoom=ROOT_Z, view_size=32,
                       ground_size=(32, 32), decoder_layers=1, decoder_heads=2, dropout=0.0,
                       action_head='match', match_dim=8)
    model_dir = save_model(ZoomPolicy(cfg, pretrained=False), tmp_path / 'match')
    out = build_bundle(world['map'], model_dir, tmp_path / 'bundle', batch_size=8,
                       progress=False)
    backend = TorchBackend(model_dir)
    b = load_bundle(out, backend)
    levels = make_levels(world['bounds'], ROOT_Z, K, STEPS)
    assert b.keys.shape == (sum(lv.count for lv in levels), 8) and b.keys.dtype == np.float16
    assert b.manifest['keys']['shape'] == [sum(lv.count for lv in levels), 8]
    # Token levels: the key of the stored token; the terminal level: the key of its view.
    lv1, term = b.levels[1], b.terminal
    c1 = lv1.cells()[2]
    rows, _ = b.key_rows(1, np.array([c1.x]), np.array([c1.y]))
    np.testing.assert_allclose(b.keys[rows[0]], backend.match_keys(b.tokens_for([c1]))[0],
                               atol=2e-3)
    store = open_store(world['map'])
    ct = term.cells()[5]
    want = backend.match_keys(backend.encode_map([render_view(store, ct, 32).image]))[0]
    rows, _ = b.key_rows(term.index, np.array([ct.x]), np.array([ct.y]))
    np.testing.assert_allclose(b.keys[rows[0]], want, atol=2e-3)
    assert np.allclose(np.linalg.norm(np.asarray(b.keys, np.float32), axis=1), 1.0, atol=2e-3)
    # A bundle without keys is refused for a match-head model, in one line.
    (out / 'keys.f16.npy').unlink()
    m = json.loads((out / MANIFEST).read_text())
    m['keys'] = None
    (out / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(MismatchError, match='no match keys') as err:
        load_bundle(out, backend)
    assert '\n' not in str(err.value)
