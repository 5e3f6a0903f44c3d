"""GeoZoomLocalizer with the torch backend, a real tiny ZoomPolicy and a real MBTiles bundle."""

from pathlib import Path
import sys

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_bundle import make_world  # noqa: E402,I100

from geozoom_ros.errors import ConfigError, InputError, MismatchError  # noqa: E402,I100
from geozoom_ros.geo import ancestor, cell_center, geodesic_distance_m  # noqa: E402
from geozoom_ros.localizer import Fix, GeoZoomLocalizer  # noqa: E402
from geozoom_ros.runtime import BackendUnavailable, load_backend  # noqa: E402
from geozoom_ros.search import beam, fused, retrieval_evidence  # noqa: E402

pytest.importorskip('torch')


@pytest.fixture(scope='module')
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp('loc'), with_retrieval=False)


@pytest.fixture(scope='module')
def loc(world):
    return GeoZoomLocalizer(world['bundle'], world['policy'], backend='auto', beam_width=4)


def _image(seed, h=48, w=64):
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


def test_localize_returns_a_fix_inside_the_map(loc):
    fix = loc.localize(_image(1))
    assert isinstance(fix, Fix)
    assert loc.bundle.contains(fix.cell)
    assert ancestor(fix.cell, loc.bundle.root_zoom) in loc.bundle.roots
    w, s, e, n = loc.bundle.bounds
    assert geodesic_distance_m(fix.lat, fix.lon, *cell_center(fix.cell)) < 0.05
    assert s - 0.002 < fix.lat < n + 0.002 and w - 0.003 < fix.lon < e + 0.003
    assert np.all(np.linalg.eigvalsh(fix.cov_en) > 0) and np.all(np.isfinite(fix.cov_en))
    assert 0 < fix.confidence <= 1
    assert 1 <= len(fix.hypotheses) <= 4
    assert sum(h.prob for h in fix.hypotheses) <= 1 + 1e-9
    assert set(fix.latency_ms) == {'encoder', 'search', 'total'}
    assert fix.latency_ms['total'] >= fix.latency_ms['encoder'] > 0
    cov9 = fix.position_covariance()
    assert len(cov9) == 9 and cov9[0] == fix.cov_en[0, 0] and cov9[8] > 0


def test_localize_matches_the_search_on_the_backend_directly(loc):
    img = _image(2, 40, 40)
    fix = loc.localize(img)
    g = loc.backend.encode_ground([img])[0]
    res = beam(loc.backend, loc.bundle, g, width=4)
    assert fix.cell == res.cell and fix.confidence == pytest.approx(res.confidence, rel=1e-5)
    np.testing.assert_allclose(fix.cov_en, res.cov_en, rtol=1e-5)


def test_greedy_and_prior(world, loc):
    greedy = GeoZoomLocalizer(world['bundle'], world['policy'], backend='torch', method='zoom')
    fix = greedy.localize(_image(3))
    assert fix is not None and len(fix.hypotheses) == 2  # one greedy path per root
    target = loc.bundle.levels[1].cells()[-1]
    lat, lon = cell_center(target)
    pfix = loc.localize(_image(3), prior=(lat, lon, 20.0))
    assert geodesic_distance_m(pfix.lat, pfix.lon, lat, lon) < 3 * 20 * 1.5 + 160


@pytest.mark.parametrize('bad, match', [
    (np.zeros((0, 10, 3), np.uint8), 'at least 8x8'),
    (np.zeros((32, 32, 3), np.float32), 'dtype float32'),
    (np.zeros((32, 32), np.uint8), 'shape'),
    (np.zeros((32, 32, 4), np.uint8), 'shape'),
    ([[1, 2, 3]], 'not a numpy array'),
])
def test_bad_images_are_one_line_input_errors(loc, bad, match):
    with pytest.raises(InputError, match=match) as exc:
        loc.localize(bad)
    assert '\n' not in str(exc.value)


def test_bad_heading_prior_and_configuration(world, loc):
    with pytest.raises(InputError, match='heading'):
        loc.localize(_image(4), heading_deg=float('nan'))
    with pytest.raises(InputError, match='outside the map'):
        loc.localize(_image(4), prior=(0.0, 0.0, 10.0))
    with pytest.raises(InputError, match='prior'):
        loc.localize(_image(4), prior='here')
    with pytest.raises(MismatchError, match='geozoom index'):
        GeoZoomLocalizer(world['bundle'], world['other'], backend='torch')
    with pytest.raises(ConfigError, match='unknown'):
        load_backend('nope', world['policy'])
    with pytest.raises(ConfigError, match='method'):
        GeoZoomLocalizer(world['bundle'], world['policy'], method='teleport')
    with pytest.raises(InputError, match='does not exist'):
        GeoZoomLocalizer(world['bundle'], world['bundle'] / 'missing-model', backend='torch')


def test_unavailable_backend_says_why_in_one_line(world):
    try:
        load_backend('tensorrt', world['policy'])
    except BackendUnavailable as exc:
        assert '\n' not in str(exc) and 'tensorrt' in str(exc)
    except Exception as exc:  # noqa: B902 - a later, installed backend may fail otherwise
        pytest.skip(f'tensorrt backend present here: {exc}')


def test_a_heading_model_gets_the_heading(world, tmp_path):
    from geozoom_ros.bundle import build_bundle
    from geozoom_ros.model.config import PolicyConfig
    from geozoom_ros.model.io import save_model
    from geozoom_ros.model.policy import ZoomPolicy

    cfg = PolicyConfig(embed_dim=16, grid_k=2, steps=2, root_zoom=16, view_size=32,
                       ground_size=(32, 32), decoder_layers=1, decoder_heads=2, dropout=0.0,
                       heading_input=True)
    model = save_model(ZoomPolicy(cfg, pretrained=True), tmp_path / 'hmodel')
    bundle = build_bundle(world['map'], model, tmp_path / 'hb', progress=False)
    loc = GeoZoomLocalizer(bundle, model, backend='torch')
    assert loc.heading_input
    # Without a heading the model runs in its heading-free mode: no heading term at all.
    free = loc.backend.encode_ground([_image(5)], headings=[None])
    np.testing.assert_allclose(free, loc.backend.encode_ground([_image(5)]), atol=0)
    assert loc.localize(_image(5)) is not None
    g0 = loc.backend.encode_ground([_image(5)], headings=[0.0])
    assert np.abs(g0 - free).max() > 1e-4
    g90 = loc.backend.encode_ground([_image(5)], headings=[90.0])
    g450 = loc.backend.encode_ground([_image(5)], headings=[450.0])
    assert np.abs(g0 - g90).max() > 1e-4
    np.testing.assert_allclose(g90, g450, atol=1e-5)
    assert loc.localize(_image(5), heading_deg=-270.0) is not None


def test_the_localizer_applies_calibration_json_beside_the_model(world, loc, tmp_path):
    import shutil

    from geozoom_ros import calibration as C
    from geozoom_ros.model.io import model_hash

    model = tmp_path / 'model'
    shutil.copytree(world['policy'], model)
    beam_cal = C.CovarianceModel(a=0.5, b0_m=12.0, b1_m=30.0)
    C.save(C.Calibration({'zoom-beam': beam_cal}, model_hash(model)), model / 'calibration.json')
    img = _image(6)
    raw = loc.localize(img)  # the module's localizer: its model folder has no calibration
    assert loc.calibration is None
    cal = GeoZoomLocalizer(world['bundle'], model, backend=loc.backend, beam_width=4)
    fix = cal.localize(img)
    assert cal.calibration.path == model / 'calibration.json'
    assert fix.cell == raw.cell and fix.confidence == pytest.approx(raw.confidence, rel=1e-6)
    want = 0.5 * raw.cov_en + (144.0 + 900.0 * (1.0 - raw.confidence)) * np.eye(2)
    np.testing.assert_allclose(fix.cov_en, want, rtol=1e-6)
    assert fix.position_covariance()[0] == pytest.approx(want[0, 0])
    # Turned off, another file, a method without an entry, cov_scale on top.
    off = GeoZoomLocalizer(world['bundle'], model, backend=loc.backend, beam_width=4,
                           calibration=None)
    np.testing.assert_allclose(off.localize(img).cov_en, raw.cov_en, rtol=1e-9)
    other = C.save(C.Calibration({'zoom-beam': C.CovarianceModel(2.0, 1.0, 0.0)}),
                   tmp_path / 'other.json')
    two = GeoZoomLocalizer(world['bundle'], model, backend=loc.backend, beam_width=4,
                           calibration=str(other), cov_scale=3.0)
    np.testing.assert_allclose(two.localize(img).cov_en, 3.0 * (2.0 * raw.cov_en + np.eye(2)),
                               rtol=1e-6)
    greedy = GeoZoomLocalizer(world['bundle'], model, backend=loc.backend, method='zoom')
    assert greedy.calibration is not None and greedy.cov_model is None
    # A file fitted for other weights is refused in one line.
    C.save(C.Calibration({'zoom-beam': beam_cal}, 'ef' * 32), model / 'calibration.json')
    with pytest.raises(MismatchError, match='calibration .* fitted for model efefefef'):
        GeoZoomLocalizer(world['bundle'], model, backend=loc.backend)
    (model / 'calibration.json').write_text('{"format": "geozoom-calibration"')
    with pytest.raises(InputError, match='not readable JSON'):
        GeoZoomLocalizer(world['bundle'], model, backend=loc.backend)


def test_the_exported_search_graphs_follow_the_beam_width(world, loc):
    # 'auto' takes onnxruntime here: its whole-search graphs are exported for the localizer's
    # beam width, so a beam search of that width is one graph call, not a step-by-step search.
    pytest.importorskip('onnxruntime')
    assert loc.backend.name == 'onnxruntime' and loc.backend.beam == 4
    assert loc.backend.search_graph(4, 0) is not None
    assert loc.backend.search_graph(8, 0) is None
    # Greedy search needs no beam graphs (width 1 is always exported); an explicit backend
    # option wins; the torch backend, which takes no width, still loads.
    greedy = GeoZoomLocalizer(world['bundle'], world['policy'], backend='onnxruntime',
                              method='zoom', beam_width=4, threads=1)
    assert greedy.backend.beam == 8 and greedy.backend.search_graph(1, 0) is not None
    explicit = GeoZoomLocalizer(world['bundle'], world['policy'], backend='onnxruntime',
                                beam_width=4, beam=2, threads=1)
    assert explicit.backend.beam == 2
    on_torch = GeoZoomLocalizer(world['bundle'], world['policy'], backend='torch', beam_width=4)
    assert on_torch.backend.name == 'torch'
    img = _image(5)
    assert on_torch.localize(img).cell == loc.localize(img).cell


def test_the_fused_localizer_weighs_the_zoom_steps_with_retrieval(world, tmp_path):
    fw = make_world(tmp_path / 'fused', with_retrieval=True)
    loc = GeoZoomLocalizer(fw['bundle'], fw['policy'], backend='torch', beam_width=4,
                           method='zoom-fused', retrieval_model=fw['retr'], zoom_weight=0.7)
    img = _image(5)
    fix = loc.localize(img, heading_deg=30.0)
    g = loc.backend.encode_ground([img])[0]
    e = loc.retrieval.embed_ground([img])[0]
    ev = retrieval_evidence(loc.bundle, e, loc.retrieval_scale, 30.0)
    want = fused(loc.backend, loc.bundle, g, ev, width=4, zoom_weight=0.7)
    assert fix.cell == want.cell
    assert fix.confidence == pytest.approx(want.confidence, rel=1e-5)
    assert [h.cell for h in fix.hypotheses] == [h.cell for h in want.hypotheses]
    # Retrieval alone (weight 0) is another search: the decoder's weight matters.
    alone = fused(loc.backend, loc.bundle, g, ev, width=4, zoom_weight=0.0)
    plain = beam(loc.backend, loc.bundle, g, width=4)
    assert [h.prob for h in alone.hypotheses] != [h.prob for h in plain.hypotheses]
    with pytest.raises(ConfigError, match='needs retrieval_model'):
        GeoZoomLocalizer(fw['bundle'], fw['policy'], backend='torch', method='zoom-fused')
    with pytest.raises(ConfigError, match='zoom_weight'):
        GeoZoomLocalizer(fw['bundle'], fw['policy'], backend='torch', method='zoom-fused',
                         retrieval_model=fw['retr'], zoom_weight=float('nan'))
    with pytest.raises(InputError, match='no retrieval embeddings'):
        GeoZoomLocalizer(world['bundle'], world['policy'], backend='torch',
                         method='zoom-fused', retrieval_model=fw['retr'])
    with pytest.raises(InputError, match='not a retrieval model'):
        GeoZoomLocalizer(fw['bundle'], fw['policy'], backend='torch', method='zoom-fused',
                         retrieval_model=fw['other'])


def test_the_fused_search_uses_the_heading_with_heading_aligned_crops(tmp_path):
    from geozoom_ros.bundle import build_bundle
    from geozoom_ros.model.config import PolicyConfig
    from geozoom_ros.model.io import save_model
    from geozoom_ros.model.retrieval import RetrievalModel

    fw = make_world(tmp_path / 'w', with_retrieval=False)
    cfg = PolicyConfig(embed_dim=16, grid_k=2, steps=2, root_zoom=16, view_size=32,
                       ground_size=(32, 32), decoder_heads=2, context_m=60.0,
                       heading_aligned=True)
    retr = save_model(RetrievalModel(cfg, pretrained=True), tmp_path / 'retr_h')
    bundle = build_bundle(fw['map'], fw['policy'], tmp_path / 'bh', progress=False,
                          retrieval_model=retr)
    loc = GeoZoomLocalizer(bundle, fw['policy'], backend='torch', method='zoom-fused',
                           retrieval_model=retr)
    assert loc.uses_heading and not loc.heading_input
    img = _image(6)
    north = loc.retrieval_evidence(img, 0.0)[-1]
    east = loc.retrieval_evidence(img, 90.0)[-1]
    # A heading picks the crops rotated to it (heading 0: the north-up crops').
    assert not np.allclose(north, east)
    e = loc.retrieval.embed_ground([img])[0]
    np.testing.assert_allclose(retrieval_evidence(loc.bundle, e, loc.retrieval_scale)[-1],
                               north, atol=2e-2)
    plain = GeoZoomLocalizer(bundle, fw['policy'], backend='torch')
    assert not plain.uses_heading
    # Without a heading such crops would mislead: the frame runs the zoom beam alone.
    assert loc.retrieval_evidence(img, None) is None
    blind, beam_fix = loc.localize(img), plain.localize(img)
    assert blind.method == 'zoom-beam' and beam_fix.method == 'zoom-beam'
    assert blind.cell == beam_fix.cell and blind.confidence == pytest.approx(beam_fix.confidence)
    assert loc.localize(img, heading_deg=90.0).method == 'zoom-fused'
