"""ONNX export and the onnxruntime backend: valid graphs and parity with torch through search.

Tolerances: ground tokens and logits within 1e-4 absolute of torch (float32 graphs), step
softmax probabilities and path probabilities within 1e-4 absolute; action sequences and the
estimate must be identical.
"""

import json
import subprocess
import sys

import numpy as np
import pytest

from geozoom_ros.bundle import load_bundle, make_levels, write_bundle
from geozoom_ros.errors import InputError
from geozoom_ros.geo import cell_at, cell_bounds, cell_center, child
from geozoom_ros.runtime import BackendUnavailable, load_backend
from geozoom_ros.search import beam, children_logits, greedy

torch = pytest.importorskip('torch')
ort = pytest.importorskip('onnxruntime')
onnx = pytest.importorskip('onnx')

from geozoom_ros.model.config import PolicyConfig  # noqa: E402,I100
from geozoom_ros.model.io import model_hash, save_model  # noqa: E402
from geozoom_ros.model.policy import ZoomPolicy  # noqa: E402
from geozoom_ros.runtime.export import (FORMAT_VERSION, is_current,  # noqa: E402
                                        read_manifest)
from geozoom_ros.runtime.onnx_backend import OnnxBackend, preprocess  # noqa: E402
from geozoom_ros.runtime.torch_backend import TorchBackend  # noqa: E402

TOL = 1e-4
K, STEPS, ROOT_Z, D = 4, 3, 14, 32


def _policy(folder, heading=False, seed=0, head='linear', tokens='interleaved', layers=2):
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    cfg = PolicyConfig(embed_dim=D, grid_k=K, steps=STEPS, root_zoom=ROOT_Z, view_size=32,
                       ground_size=(48, 32), decoder_layers=layers, decoder_heads=4,
                       dropout=0.0, heading_input=heading, action_head=head, match_dim=8,
                       decoder_tokens=tokens)
    model = ZoomPolicy(cfg, pretrained=False).eval()
    with torch.no_grad():
        # Spread the untrained decoder's logits so the paths are decided by clear margins.
        model.decoder.head.weight.mul_(30.0)
    return save_model(model, folder)


def _bundle(folder, digest, match_dim=0):
    # Two root cells side by side, so the search also ranks paths across roots.
    root = cell_at(48.137, 11.575, ROOT_Z)
    w, s, _, n = cell_bounds(root)
    _, _, e, _ = cell_bounds(type(root)(root.x + 1, root.y, root.z))
    eps = 1e-7
    levels = make_levels((w + eps, s + eps, e - eps, n - eps), ROOT_Z, K, STEPS)
    count = sum(lv.count for lv in levels if lv.offset >= 0)
    tokens = np.random.default_rng(1).standard_normal((count, D)).astype(np.float32)
    extra = {'grid_k': K, 'steps': STEPS, 'root_zoom': ROOT_Z, 'view_size': 32,
             'map': {'path': 'synthetic', 'sha256': 'x', 'bounds': [w, s, e, n]},
             'model': {'hash': digest}}
    keys = None
    if match_dim:
        keys = np.random.default_rng(2).standard_normal(
            (sum(lv.count for lv in levels), match_dim))
        keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    return load_bundle(write_bundle(folder, levels, tokens, extra, np.ones(count, np.float32),
                                    keys=keys))


def _images(n=4):
    rng = np.random.default_rng(7)
    return [rng.integers(0, 256, (40 + 13 * i, 70 + 9 * i, 3), dtype=np.uint8) for i in range(n)]


def _io_shapes(graph):
    """Return ``{name: dims}`` of an ONNX graph's inputs and outputs."""
    return {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim]
            for i in list(graph.input) + list(graph.output)}


def _prefixes(rng, batches):
    """Yield random decoder inputs ``(g, sat, actions)`` for each batch size and every step."""
    for n in batches:
        for t in range(STEPS):
            yield (rng.standard_normal((n, D)).astype(np.float32),
                   rng.standard_normal((n, t + 1, D)).astype(np.float32),
                   rng.integers(0, K * K, (n, t)))


def _backends(root, tokens='interleaved', layers=2):
    model = _policy(root / 'model', tokens=tokens, layers=layers)
    tb = TorchBackend(model)
    ob = OnnxBackend(model, threads=1)
    bundle = _bundle(root / 'bundle', tb.model_hash)
    return {'model': model, 'torch': tb, 'onnx': ob, 'bundle': bundle}


@pytest.fixture(scope='module')
def plain(tmp_path_factory):
    return _backends(tmp_path_factory.mktemp('rt'))


@pytest.fixture(scope='module')
def fused(tmp_path_factory):
    return _backends(tmp_path_factory.mktemp('rt-fused'), tokens='fused')


@pytest.fixture(scope='module')
def fused_one_layer(tmp_path_factory):
    # The shipped model's decoder: one block over the fused sequence.
    return _backends(tmp_path_factory.mktemp('rt-fused-l1'), tokens='fused', layers=1)


def test_numpy_preprocessing_equals_torch(plain):
    model = plain['torch'].model
    for img in _images() + [np.zeros((32, 48, 3), np.uint8)]:
        ref = model.preprocess_ground([img]).numpy()
        np.testing.assert_array_equal(preprocess([img], (48, 32)), ref)


def test_export_writes_checked_static_graphs(plain, tmp_path):
    manifest = read_manifest(plain['model'] / 'onnx')
    assert manifest['model_hash'] == model_hash(plain['model'])
    assert manifest['opset'] == 17 and manifest['decoder'] == 'kv'
    searches = [f'search_{t}_w{w}' for t in range(STEPS) for w in (1, 8)] + \
        ['search_0_w1_roots', 'search_0_w8_roots']
    assert sorted(manifest['files']) == sorted(['encoder', 'kv_0', 'kv_0_b1', 'kv_1',
                                                'kv_1_b1', 'kv_2', 'kv_2_b1'] + searches)
    for name, fname in manifest['files'].items():
        path = plain['model'] / 'onnx' / fname
        onnx.checker.check_model(str(path))
        graph = onnx.load(str(path)).graph
        # Static shapes, except the search graphs' map arrays.
        dynamic = {'tokens': [0], 'usable': [0]} if name.startswith('search_') else {}
        shapes = _io_shapes(graph)
        for tensor, dims in shapes.items():
            fixed = [v for i, v in enumerate(dims) if i not in dynamic.get(tensor, [])]
            assert all(v > 0 for v in fixed), (name, tensor, dims)
        if name.startswith('kv_'):
            t, b = int(name[3]), 1 if name.endswith('_b1') else 8
            assert shapes['sat'] == [b, D] and shapes['logits'] == [b, K * K]
            assert shapes['keys'] == [2, b, 4, 2 * t + 2, D // 4]
            if t:
                assert shapes['past_k'] == [2, b, 4, 2 * t, D // 4] and shapes['action'] == [b]
    assert is_current(plain['model'] / 'onnx', model_hash(plain['model']))
    assert not is_current(plain['model'] / 'onnx', 'f' * 64)
    # The stateless per-step and the fixed-length full-sequence exports give the same logits.
    full = OnnxBackend(plain['model'], threads=1, onnx_dir=tmp_path / 'full', decoder='full',
                       beam=4)
    step = OnnxBackend(plain['model'], threads=1, onnx_dir=tmp_path / 'step',
                       decoder='per-step', beam=3)
    assert sorted(step.manifest['files']) == ['encoder', 'step_0', 'step_1', 'step_2']
    assert json.loads((tmp_path / 'full' / 'manifest.json').read_text())['files'] == {
        'encoder': 'encoder.onnx', 'decoder_full': 'decoder_full.onnx'}
    for g, sat, acts in _prefixes(np.random.default_rng(3), (1, 4, 11)):
        ref = plain['torch'].step_logits(g, sat, acts)
        # The cache misses here (random prefixes): the kv backend recomputes them.
        for backend in (plain['onnx'], full, step):
            out = backend.step_logits(g, sat, acts)
            assert out.shape == (len(g), K * K)
            np.testing.assert_allclose(out, ref, atol=TOL, rtol=0)


def _softmax(x):
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_search_parity_greedy_and_beam(plain):
    tb, ob, bundle = plain['torch'], plain['onnx'], plain['bundle']
    images = _images()
    gt, go = tb.encode_ground(images), ob.encode_ground(images)
    np.testing.assert_allclose(go, gt, atol=TOL, rtol=0)
    # Untrained encoders map all frames to similar tokens; random tokens add varied paths.
    rand = np.random.default_rng(5).standard_normal((4, D)).astype(np.float32)
    pairs = list(zip(gt, go)) + list(zip(rand, rand))
    distinct = set()
    for i, (g_t, g_o) in enumerate(pairs):
        for run in (lambda b, g: greedy(b, bundle, g), lambda b, g: beam(b, bundle, g, 8)):
            rt, ro = run(tb, g_t), run(ob, g_o)
            assert [h.path for h in ro.hypotheses] == [h.path for h in rt.hypotheses]
            assert [h.cell for h in ro.hypotheses] == [h.cell for h in rt.hypotheses]
            assert ro.estimate == rt.estimate
            np.testing.assert_allclose([h.prob for h in ro.hypotheses],
                                       [h.prob for h in rt.hypotheses], atol=TOL, rtol=0)
            distinct.add(rt.hypotheses[0].path)
        # Step softmax probabilities of the root step.
        sat = np.asarray(bundle.tokens[:2], np.float32)[:, None]
        g2 = np.repeat(g_t[None], 2, axis=0)
        acts = np.zeros((2, 0), np.int64)
        np.testing.assert_allclose(_softmax(ob.step_logits(g2, sat, acts)),
                                   _softmax(tb.step_logits(g2, sat, acts)), atol=TOL, rtol=0)
    assert len(distinct) > 1  # the frames lead to different paths: parity is not vacuous


def _assert_same_search(tb, ob, bundle, gs):
    """Greedy and beam search give the same paths and probabilities on both backends."""
    paths = set()
    for g in np.asarray(gs, np.float32):
        for run in (lambda b: greedy(b, bundle, g), lambda b: beam(b, bundle, g, 8)):
            rt, ro = run(tb), run(ob)
            assert [h.path for h in ro.hypotheses] == [h.path for h in rt.hypotheses]
            np.testing.assert_allclose([h.prob for h in ro.hypotheses],
                                       [h.prob for h in rt.hypotheses], atol=TOL, rtol=0)
            paths.add(rt.hypotheses[0].path)
    assert len(paths) > 1  # the tokens lead to different paths: parity is not vacuous


@pytest.mark.parametrize('layout,layers', [('fused', 2), ('fused_one_layer', 1)])
def test_fused_layout_cache_holds_one_token_per_step_and_matches_torch(layout, layers, request):
    backends = request.getfixturevalue(layout)
    model, tb, ob = backends['model'], backends['torch'], backends['onnx']
    for name in ('kv_1', 'kv_2'):
        shapes = _io_shapes(onnx.load(str(model / 'onnx' / ob.manifest['files'][name])).graph)
        t = int(name[3])
        assert shapes['past_k'] == [layers, 8, 4, t + 1, D // 4]
        assert shapes['keys'] == [layers, 8, 4, t + 2, D // 4]
    for g, sat, acts in _prefixes(np.random.default_rng(4), (1, 8, 11)):
        np.testing.assert_allclose(ob.step_logits(g, sat, acts),
                                   tb.step_logits(g, sat, acts), atol=TOL, rtol=0)
    _assert_same_search(tb, ob, backends['bundle'],
                        np.random.default_rng(6).standard_normal((6, D)))


def test_match_head_parity_through_search_and_keys_decide_the_path(tmp_path):
    model = _policy(tmp_path / 'model', head='match')
    tb, ob = TorchBackend(model), OnnxBackend(model, threads=1)
    assert ob.step_dim == 8 and ob.uses_children
    bundle = _bundle(tmp_path / 'bundle', tb.model_hash, match_dim=8)
    rng = np.random.default_rng(4)
    for g, sat, acts in _prefixes(rng, (3,)):
        np.testing.assert_allclose(ob.step_logits(g, sat, acts), tb.step_logits(g, sat, acts),
                                   atol=TOL, rtol=0)
    _assert_same_search(tb, ob, bundle, rng.standard_normal((4, D)))
    # The keys decide: swapping two children's keys swaps their logits and nothing else.
    g = rng.standard_normal((1, D)).astype(np.float32)
    root = bundle.roots[0]
    out = tb.step_logits(g, np.asarray(bundle.tokens_for([root]))[None], np.zeros((1, 0), int))
    ar = np.arange(K * K)
    cx, cy = root.x * K + ar[None] % K, root.y * K + ar[None] // K
    before = children_logits(tb, bundle, out, 1, cx, cy)
    rows, ok = bundle.key_rows(1, cx[0, :2], cy[0, :2])
    assert ok.all()
    keys = np.array(bundle.keys)
    keys[rows] = keys[rows[::-1]]
    bundle.keys = keys
    after = children_logits(tb, bundle, out, 1, cx, cy)
    np.testing.assert_allclose(after[0, [1, 0]], before[0, :2], atol=1e-6)
    np.testing.assert_allclose(after[0, 2:], before[0, 2:], atol=1e-6)
    assert abs(before[0, 0] - before[0, 1]) > 1e-3


def test_heading_model_with_and_without_heading(tmp_path):
    model = _policy(tmp_path / 'hmodel', heading=True, seed=1)
    tb, ob = TorchBackend(model), OnnxBackend(model, threads=1)
    assert read_manifest(model / 'onnx')['heading_input'] is True
    images = _images(3)
    for headings in ([30.0, 200.0, None], None):
        ref = tb.encode_ground(images, headings)
        np.testing.assert_allclose(ob.encode_ground(images, headings), ref, atol=TOL, rtol=0)
    with_h = ob.encode_ground(images[:1], [30.0])
    assert np.abs(with_h - ob.encode_ground(images[:1])).max() > 1e-3
    with pytest.raises(InputError, match='headings for'):
        ob.encode_ground(images, [1.0])


def test_stale_export_is_redone(tmp_path):
    model = _policy(tmp_path / 'm', seed=2)
    OnnxBackend(model, threads=1)
    first = read_manifest(model / 'onnx')['model_hash']
    _policy(tmp_path / 'm', seed=3)  # new weights in the same folder
    backend = OnnxBackend(model, threads=1)
    assert backend.model_hash == model_hash(model) != first
    assert read_manifest(model / 'onnx')['model_hash'] == backend.model_hash
    # An export written by another version of the package is redone too.
    manifest_path = model / 'onnx' / 'manifest.json'
    manifest = json.loads(manifest_path.read_text())
    manifest['format_version'] = 1
    manifest_path.write_text(json.dumps(manifest))
    assert not is_current(model / 'onnx', backend.model_hash)
    OnnxBackend(model, threads=1)
    assert read_manifest(model / 'onnx')['format_version'] == FORMAT_VERSION


def test_tensorrt_unavailable_in_one_line_and_auto_falls_back(plain):
    try:
        import tensorrt  # noqa: F401
        has_trt = True
    except ImportError:
        has_trt = False
    if not has_trt:
        with pytest.raises(BackendUnavailable) as exc:
            load_backend('tensorrt', plain['model'])
        assert 'tensorrt' in str(exc.value) and '\n' not in str(exc.value)
        auto = load_backend('auto', plain['model'], threads=1)
        assert auto.name == 'onnxruntime'
    else:
        pytest.skip('tensorrt is installed here; its parity is checked on the GPU machine')


def test_backend_module_imports_no_torch():
    code = ('import sys; import geozoom_ros.runtime.onnx_backend, geozoom_ros.runtime.export, '
            'geozoom_ros.runtime.tensorrt_backend, geozoom_ros.runtime.cli; '
            'assert "torch" not in sys.modules and "onnxruntime" not in sys.modules')
    subprocess.run([sys.executable, '-c', code], check=True)


def test_export_cli(plain, tmp_path, capsys):
    from geozoom_ros.cli import main

    assert main(['export', '--model', str(tmp_path / 'nope'), '-o', str(tmp_path / 'x')]) == 2
    err = capsys.readouterr().err.strip()
    assert 'does not exist' in err and '\n' not in err and err.startswith('geozoom export:')
    out = tmp_path / 'exp'
    assert main(['export', '--model', str(plain['model']), '-o', str(out), '--quiet']) == 0
    assert read_manifest(out)['model_hash'] == plain['torch'].model_hash
    if not _has_trt():
        assert main(['export', '--model', str(plain['model']), '-o', str(out), '--format',
                     'tensorrt', '--quiet']) == 2
        assert 'tensorrt' in capsys.readouterr().err


def _has_trt():
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


def _count_kv_runs(ob, monkeypatch):
    """Return the list the steps of ``ob``'s cached decoder runs are appended to."""
    calls = []
    run = ob._kv_run

    def counting(t, *args):
        calls.append(t)
        return run(t, *args)
    monkeypatch.setattr(ob, '_kv_run', counting)
    return calls


def test_kv_cache_serves_the_search_without_recomputation(plain, monkeypatch):
    ob, bundle = plain['onnx'], plain['bundle']
    calls = _count_kv_runs(ob, monkeypatch)
    g = np.random.default_rng(9).standard_normal(D).astype(np.float32)
    # Greedy search over the 2 roots keeps a path per root: it runs step by step.
    result = greedy(ob, bundle, g)
    assert result.decoder_calls == STEPS
    # One run per step (the 2 roots fit one batch): no prefix redone.
    assert calls == list(range(STEPS))


@pytest.mark.parametrize('layout', ['plain', 'fused', 'fused_one_layer'])
@pytest.mark.parametrize('backend', ['onnx', 'torch'])
def test_whole_search_graph_equals_the_stepwise_search(backend, layout, request, monkeypatch):
    # The fused layout's graphs run later steps through single-token blocks (rotation folded
    # into the projection); the interleaved one through the general cached blocks. The torch
    # backend runs the module the export traces, eagerly.
    backends = request.getfixturevalue(layout)
    ob, bundle = backends[backend], backends['bundle']
    rng = np.random.default_rng(12)
    used = []
    graph = ob.search_graph

    def counted(width, level, starts=1):
        run = graph(width, level, starts)
        return None if run is None else (lambda *a: used.append((width, level)) or run(*a))
    cases = []
    for g in rng.standard_normal((6, D)).astype(np.float32):
        # Priors start the search below the roots (at level 1 and 2: their 3-sigma boxes fit
        # in one cell there) and cut the levels to their box; the widest one starts at a root.
        mid = child(bundle.roots[0], 5, K)
        priors = [(*cell_center(mid), 60.0), (*cell_center(child(mid, 10, K)), 10.0),
                  (*cell_center(mid), 900.0)]
        for kw in [{}] + [{'prior': p} for p in priors]:
            cases += [(beam, g, dict(width=8, **kw)), (greedy, g, kw),
                      (beam, g, dict(width=3, **kw))]
    monkeypatch.setattr(ob, 'search_graph', counted)
    with_graph = [fn(ob, bundle, g, **kw) for fn, g, kw in cases]
    monkeypatch.setattr(ob, 'search_graph', lambda width, level, starts=1: None)
    stepwise = [fn(ob, bundle, g, **kw) for fn, g, kw in cases]
    for a, b in zip(with_graph, stepwise):
        assert [h.path for h in a.hypotheses] == [h.path for h in b.hypotheses]
        assert [h.root for h in a.hypotheses] == [h.root for h in b.hypotheses]
        np.testing.assert_allclose([h.prob for h in a.hypotheses],
                                   [h.prob for h in b.hypotheses], atol=1e-5, rtol=0)
        np.testing.assert_allclose(a.cov_en, b.cov_en, rtol=1e-4)
    # Beam over both roots and every prior start used a graph; the exported graphs have no
    # width 3 (the eager module has every width), and greedy search over several roots keeps
    # one path per root, which the graphs do not.
    widths = {1, 8} if backend == 'onnx' else {1, 3, 8}
    assert {w for w, _ in used} == widths and {lv for _, lv in used} == {0, 1, 2}
    assert len({a.hypotheses[0].path for a in with_graph}) > 3


def test_content_cache_reuses_reordered_prefixes(plain, monkeypatch):
    ob, tb = plain['onnx'], plain['torch']
    rng = np.random.default_rng(4)
    n = 3
    g = rng.standard_normal((n, D)).astype(np.float32)
    sat = rng.standard_normal((n, 2, D)).astype(np.float32)
    ob.step_logits(g, sat[:, :1], np.zeros((n, 0), np.int64))
    # Step 1 extends the previous rows in another order (a beam's survivors).
    order = np.array([2, 0, 0])
    g1, sat1 = g[order], sat[order]
    acts = np.array([[5], [1], [7]], np.int64)
    want = tb.step_logits(g1, sat1, acts)
    calls = _count_kv_runs(ob, monkeypatch)
    got = ob.step_logits(g1, sat1, acts)
    assert calls == [1]  # the cached step 0 served every row
    np.testing.assert_allclose(got, want, atol=1e-4)
    # Rows whose prefix the previous call did not hold are recomputed from step 0.
    calls.clear()
    other = rng.standard_normal((n, 2, D)).astype(np.float32)
    np.testing.assert_allclose(ob.step_logits(g1, other, acts),
                               tb.step_logits(g1, other, acts), atol=1e-4)
    assert calls == [0, 1]


def test_decoding_state_keeps_the_cache_and_equals_step_logits(plain, monkeypatch):
    ob, tb = plain['onnx'], plain['torch']
    rng = np.random.default_rng(8)
    g = rng.standard_normal(D).astype(np.float32)
    sat = rng.standard_normal((3, STEPS, D)).astype(np.float32)
    acts = rng.integers(0, K * K, (3, STEPS - 1))
    for t0 in (0, 1):  # from the roots, or from a deeper start (a prior)
        calls = _count_kv_runs(ob, monkeypatch)
        (so, out_o), (st, out_t) = (b.start_decoding(g, sat[:, :t0 + 1], acts[:, :t0])
                                    for b in (ob, tb))
        np.testing.assert_allclose(out_o, out_t, atol=TOL)
        rows, hist_sat, hist_act = np.arange(3), sat[:, :t0 + 1], acts[:, :t0]
        for t in range(t0 + 1, STEPS):
            parents = np.array([2, 0, 0])  # survivors in another order, one kept twice
            new_sat = rng.standard_normal((3, D)).astype(np.float32)
            new_act = rng.integers(0, K * K, 3)
            got = so.step(new_sat, new_act, parents)
            np.testing.assert_allclose(got, st.step(new_sat, new_act, parents), atol=TOL)
            rows = rows[parents]
            hist_sat = np.concatenate([hist_sat[parents], new_sat[:, None]], axis=1)
            hist_act = np.concatenate([hist_act[parents], new_act[:, None]], axis=1)
            want = tb.step_logits(np.repeat(g[None], 3, axis=0), hist_sat, hist_act)
            np.testing.assert_allclose(got, want, atol=TOL)
        # One cached run per step: the prefix at the start, then one per step() call.
        assert calls == list(range(STEPS))
        monkeypatch.undo()


def test_search_graph_wider_than_one_step_keeps_every_path(plain, tmp_path, monkeypatch):
    # Width 32 > 16 children of one start cell: later steps choose 32 of 32 * 16 candidates.
    ob = OnnxBackend(plain['model'], threads=1, onnx_dir=tmp_path / 'wide', beam=32)
    bundle = plain['bundle']
    assert ob.search_graph(32, 0, 2) is not None
    gs = np.random.default_rng(13).standard_normal((3, D)).astype(np.float32)
    with_graph = [beam(ob, bundle, g, 32) for g in gs]
    monkeypatch.setattr(ob, 'search_graph', lambda width, level, starts=1: None)
    for g, a in zip(gs, with_graph):
        b = beam(ob, bundle, g, 32)
        assert len(a.hypotheses) == len(b.hypotheses) == 32
        assert [h.path for h in a.hypotheses] == [h.path for h in b.hypotheses]
        np.testing.assert_allclose([h.prob for h in a.hypotheses],
                                   [h.prob for h in b.hypotheses], atol=1e-5, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='CUDA is not available here')
@pytest.mark.parametrize('layout', ['plain', 'fused', 'fused_one_layer'])
def test_cuda_graphs_replay_the_eager_results(layout, request):
    # Captured once per shape, then replayed with new inputs: every frame's answer must be
    # its own (the inputs are copied in), and equal to eager CUDA and to the CPU.
    backends = request.getfixturevalue(layout)
    cpu, bundle = backends['torch'], backends['bundle']
    graphed = TorchBackend(backends['model'], device='cuda')
    eager = TorchBackend(backends['model'], device='cuda', cuda_graphs=False)
    assert graphed.cuda_graphs and not eager.cuda_graphs and not cpu.cuda_graphs
    images = _images()
    for img in images + images:
        want = cpu.encode_ground([img])
        for backend in (graphed, eager):
            np.testing.assert_allclose(backend.encode_ground([img]), want, atol=1e-4, rtol=0)
    rng = np.random.default_rng(21)
    paths = set()
    for g in rng.standard_normal((5, D)).astype(np.float32):
        for fn, kw in [(beam, {'width': 8}), (greedy, {}),
                       (beam, {'width': 8, 'prior': (*cell_center(bundle.roots[0]), 900.0)})]:
            want = fn(cpu, bundle, g, **kw)
            for backend in (graphed, eager):
                got = fn(backend, bundle, g, **kw)
                assert [h.path for h in got.hypotheses] == [h.path for h in want.hypotheses]
                np.testing.assert_allclose([h.prob for h in got.hypotheses],
                                           [h.prob for h in want.hypotheses], atol=1e-4, rtol=0)
            paths.add(want.hypotheses[0].path)
    assert len(paths) > 1  # different inputs, different answers: the replays saw them
    assert 0 < len(graphed._captured) <= TorchBackend.MAX_CAPTURED


def test_a_failed_cuda_graph_capture_falls_back_to_eager(plain, monkeypatch):
    # A capture that fails (an operation CUDA graphs cannot hold) must not fail the frame:
    # the backend warns once and runs the kernels one by one from then on. Checked on the
    # CPU by forcing the graph path and making the capture fail.
    import geozoom_ros.runtime.torch_backend as tbm

    backend = TorchBackend(plain['model'])
    want = backend.encode_ground(_images(1))
    g = np.random.default_rng(2).standard_normal(D).astype(np.float32)
    want_path = beam(backend, plain['bundle'], g, width=8).hypotheses[0].path

    def fail(*args, **kwargs):
        raise RuntimeError('operation not permitted when stream is capturing\nmore detail')
    monkeypatch.setattr(tbm, '_CapturedCall', fail)
    backend.cuda_graphs = True
    with pytest.warns(RuntimeWarning, match='CUDA graph capture failed .operation not '
                                            'permitted when stream is capturing.; running'):
        got = backend.encode_ground(_images(1))
    np.testing.assert_array_equal(got, want)
    assert backend.cuda_graphs is False and not backend._captured
    assert beam(backend, plain['bundle'], g, width=8).hypotheses[0].path == want_path


def test_retrieval_ground_encoder_on_onnxruntime_equals_torch(tmp_path, monkeypatch):
    import os

    from geozoom_ros.model.retrieval import RetrievalModel
    from geozoom_ros.runtime import load_retrieval
    from geozoom_ros.runtime.onnx_backend import OnnxRetrieval, RETRIEVAL_GRAPH
    from geozoom_ros.runtime.torch_backend import TorchRetrieval

    torch.manual_seed(3)
    cfg = PolicyConfig(embed_dim=D, view_size=32, ground_size=(48, 32), decoder_heads=2,
                       context_m=60.0, heading_aligned=True)
    mdir = save_model(RetrievalModel(cfg, pretrained=True).eval(), tmp_path / 'retr')
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (40 + 8 * i, 64, 3), dtype=np.uint8) for i in range(3)]
    onnx_retr = OnnxRetrieval(mdir, threads=1)
    torch_retr = TorchRetrieval(mdir)
    np.testing.assert_allclose(onnx_retr.embed_ground(images), torch_retr.embed_ground(images),
                               atol=TOL)
    assert onnx_retr.scale() == pytest.approx(torch_retr.scale(), rel=1e-6)
    assert onnx_retr.model_hash == torch_retr.model_hash == model_hash(mdir)
    graph = mdir / 'onnx' / RETRIEVAL_GRAPH
    stamp = graph.stat().st_mtime_ns
    OnnxRetrieval(mdir)  # current: not exported again
    assert graph.stat().st_mtime_ns == stamp
    # Beside a policy on onnxruntime the fused search gets this encoder; beside torch, torch's.
    policy = load_backend('onnxruntime', _policy(tmp_path / 'p'))
    assert isinstance(load_retrieval(mdir, policy), OnnxRetrieval)
    assert isinstance(load_retrieval(mdir, TorchBackend(_policy(tmp_path / 'p2'))),
                      TorchRetrieval)
    with pytest.raises(InputError, match='not a retrieval model'):
        OnnxRetrieval(tmp_path / 'p')
    # A model folder it may not write to (an installed package) exports into the cache.
    ro = save_model(RetrievalModel(cfg, pretrained=True).eval(), tmp_path / 'ro')
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
    writable = os.access
    monkeypatch.setattr(os, 'access', lambda p, mode: False if str(p) == str(ro)
                        else writable(p, mode))
    OnnxRetrieval(ro)
    assert not (ro / 'onnx').exists()
    assert list((tmp_path / 'cache').rglob(RETRIEVAL_GRAPH))
