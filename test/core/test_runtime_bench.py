"""`geozoom bench runtime` on a tiny real map and policy: runs and reports every figure."""

import json

import numpy as np
import pytest

pytest.importorskip('torch')
pytest.importorskip('onnxruntime')
pytest.importorskip('faiss')

from geozoom_ros.ros.bench import make_small_world  # noqa: E402,I100
from geozoom_ros.runtime.bench import (  # noqa: E402
    _frames, _GraphTimer, run_bench, synthetic_bundle)


@pytest.fixture(scope='module')
def world(tmp_path_factory):
    return make_small_world(tmp_path_factory.mktemp('rtbench'))


def _check_latency(row):
    for part in ('encoder', 'search', 'total'):
        assert row[part]['p95'] >= row[part]['p50'] > 0
    assert row['search_over_encoder_p50'] > 0 and row['frames'] == 3
    assert 'rss_growth_second_half_bytes' in row and len(row['rss_samples_bytes']) == 3


def test_bench_reports_every_figure(world):
    import torch

    res = run_bench(world['model'], world['bundle'], frames=3, warmup=1, areas=(1, 4),
                    scaling_repeats=2, backends=('torch', 'onnxruntime', 'tensorrt',
                                                 'torch-cuda'))
    assert {'torch', 'onnxruntime'} <= set(res['backends'])
    if not torch.cuda.is_available():
        assert res['unavailable']['torch-cuda'] == \
            'backend torch-cuda: CUDA is not available here'
    for name, row in res['backends'].items():
        _check_latency(row)
        # Every search ran in one graph call (both backends have one for this policy), timed
        # inside the search: the call and the Python around it split the search's time.
        split = row['search_split']
        assert 0 < split['graph']['p50'] <= row['search']['p95']
        assert split['python']['p50'] > 0 and split['graph_back_to_back']['p50'] > 0
    if 'tensorrt' not in res['backends']:
        assert '\n' not in res['unavailable']['tensorrt']
    alloc = res['allocations']
    assert alloc['backend'] == 'onnxruntime' and alloc['peak_python_bytes_per_frame'] > 0
    small, big = res['scaling']
    assert (small['area_km2'], big['area_km2']) == (1.0, 4.0)
    assert big['tokens'] > small['tokens'] and big['gallery'] > small['gallery']
    assert small['zoom_beam_ratio_p50'] == 1.0
    for key in ('zoom_beam_ms', 'zoom_beam_shortlist_ms', 'brute_force_ms', 'faiss_flat_ms',
                'faiss_ivf_ms', 'zoom_beam_shortlist_after_encoder_ms'):
        assert big[key]['p50'] > 0 and key.replace('_ms', '_ratio_p50') in big
    assert big['max_roots'] == 4 and big['shortlist_build_ms'] > 0
    assert big['bundle_bytes_per_km2'] > 0 and big['gallery_resident_bytes_per_km2'] > 0
    assert res['bundle_bytes'] > 0
    c = res['compute']
    assert c['encoder_mmac_per_frame'] > 0
    assert c['decoder_tokens_per_search'] == 2 + 2 * 8 * (c['steps'] - 1)
    # A decoder token costs about 12 d^2 multiply-adds per layer (qkv, output projection and
    # a SwiGLU of width 8d/3), attention over a handful of keys being small.
    d, layers = c['embed_dim'], c['decoder_layers']
    analytic = c['decoder_tokens_per_search'] * layers * 12 * d * d / 1e6
    assert 0.9 * analytic < c['decoder_mmac_per_search'] < 1.5 * analytic
    json.dumps(res)


def test_graph_timer_times_the_localizers_graph_call_and_gives_the_method_back(world):
    from geozoom_ros.localizer import GeoZoomLocalizer

    loc = GeoZoomLocalizer(world['bundle'], world['model'], backend='onnxruntime')
    timer = _GraphTimer(loc.backend)
    assert 'search_graph' in vars(loc.backend)
    fix = loc.localize(_frames(1)[0])
    assert 0 < timer.elapsed < fix.latency_ms['search']
    again = timer.replay(3)
    assert again.shape == (3,) and np.all(again > 0)
    timer.remove()
    assert 'search_graph' not in vars(loc.backend)
    assert loc.backend.search_graph(8, 0) is not None  # the backend's own method again


def test_synthetic_bundle_grows_with_area(world):
    from dataclasses import replace

    from geozoom_ros.runtime import load_backend

    backend = load_backend('torch', world['model'])
    small, _ = synthetic_bundle(1.0, backend.config, backend.model_hash)
    big, levels = synthetic_bundle(100.0, backend.config, backend.model_hash)
    assert len(big.tokens) > 50 * len(small.tokens)
    assert big.tokens[[0, 5]].shape == (2, backend.config.embed_dim)
    assert big.keys is None
    # A match-head model's bundle also holds a key per cell of every level.
    cfg = replace(backend.config, action_head='match', match_dim=8)
    matched, _ = synthetic_bundle(100.0, cfg, backend.model_hash)
    assert len(matched.keys) == sum(lv.count for lv in levels)
    assert matched.keys[[0, 3]].shape == (2, 8)


def test_bench_cli_json(world, capsys):
    from geozoom_ros.cli import main

    assert main(['bench', 'runtime', '--model', str(world['model']), '--bundle',
                 str(world['bundle']), '--frames', '2', '--warmup', '0', '--areas', '1',
                 '--backends', 'onnxruntime', '--json']) == 0
    res = json.loads(capsys.readouterr().out)
    assert set(res['backends']) == {'onnxruntime'} and len(res['scaling']) == 1
    assert main(['bench', 'runtime', '--bundle', str(world['bundle'])]) == 2
    assert '--bundle needs --model' in capsys.readouterr().err


def test_bench_times_the_fused_search_beside_the_plain_one(world, tmp_path):
    from geozoom_ros.bundle import build_bundle, load_bundle
    from geozoom_ros.model.config import PolicyConfig
    from geozoom_ros.model.io import save_model
    from geozoom_ros.model.retrieval import RetrievalModel

    cfg = PolicyConfig(embed_dim=16, view_size=32, ground_size=(32, 32), decoder_heads=2,
                       context_m=60.0)
    retr = save_model(RetrievalModel(cfg, pretrained=True), tmp_path / 'retr')
    bundle = build_bundle(world['map'], world['model'], tmp_path / 'bundle', batch_size=8,
                          progress=False, retrieval_model=retr)
    assert load_bundle(bundle).retrieval is not None
    res = run_bench(world['model'], bundle, frames=3, warmup=1, areas=(1,),
                    scaling_repeats=2, backends=('onnxruntime',), retrieval_model=retr)
    assert set(res['backends']) == {'onnxruntime', 'onnxruntime-fused'}
    for row in res['backends'].values():
        _check_latency(row)
    # The fused search's encoder time holds the retrieval encoder too, and it decodes step by
    # step (no whole-search graph).
    fused, plain = res['backends']['onnxruntime-fused'], res['backends']['onnxruntime']
    assert fused['encoder']['p50'] > plain['encoder']['p50']
    assert 'search_split' not in fused and 'search_split' in plain
    assert res['allocations']['backend'] == 'onnxruntime'
