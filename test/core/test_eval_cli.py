"""`geozoom index`, `geozoom eval` (every method, index.csv and a drive bag) and `localize`."""

import csv
import json
from pathlib import Path
import sys

import cv2
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_bundle import make_world  # noqa: E402,I100

from geozoom_ros.cli import main  # noqa: E402,I100
from geozoom_ros.geo import cell_center, destination, LocalFrame  # noqa: E402
from geozoom_ros.search import DEFAULT_ZOOM_WEIGHT  # noqa: E402

pytest.importorskip('torch')

REQUIRED = ('n', 'recall@25m', 'recall@50m', 'recall@100m', 'median_error_m', 'p90_error_m',
            'nees_mean', 'step_accuracy', 'latency_ms_p50', 'latency_ms_p95', 'chance')


@pytest.fixture(scope='module')
def world(tmp_path_factory):
    folder = tmp_path_factory.mktemp('evalcli')
    w = make_world(folder, with_retrieval=True)
    # Ground images at the centres of the map's level-1 cells, a train and a test split.
    from geozoom_ros.bundle import load_bundle
    b = load_bundle(w['bundle'])
    (folder / 'ground').mkdir()
    rows = []
    rng = np.random.default_rng(0)
    for i, cell in enumerate(b.levels[1].cells()):
        lat, lon = cell_center(cell)
        if not (b.bounds[1] < lat < b.bounds[3] and b.bounds[0] < lon < b.bounds[2]):
            continue
        for split in ('train', 'test-same'):
            name = f'ground/{i}_{split}.jpg'
            img = rng.integers(0, 255, (36, 48, 3), dtype=np.uint8)
            cv2.imwrite(str(folder / name), img)
            jlat, jlon = destination(lat, lon, 45.0 * i, 10.0)
            rows.append({'path': name, 'lat': jlat, 'lon': jlon, 'heading_deg': 30.0 * i,
                         'split': split})
    rows.append({'path': 'ground/missing.jpg', 'lat': lat, 'lon': lon, 'heading_deg': 0,
                 'split': 'test-same'})
    with open(folder / 'index.csv', 'w', newline='') as f:
        wr = csv.DictWriter(f, fieldnames=['path', 'lat', 'lon', 'heading_deg', 'split'])
        wr.writeheader()
        wr.writerows(rows)
    w['index'] = folder / 'index.csv'
    w['n_test'] = sum(r['split'] == 'test-same' for r in rows) - 1
    w['folder'] = folder
    return w


def _run_json(capsys, argv):
    assert main(argv) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    return json.loads(out[0])


@pytest.mark.parametrize('method, model', [('zoom', 'policy'), ('zoom-beam', 'policy'),
                                           ('zoom-fused', 'policy'), ('retrieval', 'retr'),
                                           ('sim-zoom', 'retr'), ('ground-knn', 'retr')])
def test_eval_json_has_every_key_for_every_method(world, capsys, method, model):
    fused = ['--retrieval-model', str(world['retr'])] if method == 'zoom-fused' else []
    res = _run_json(capsys, ['eval', '--bundle', str(world['bundle']), '--model',
                             str(world[model]), '--data', str(world['index']), '--split',
                             'test-same', '--method', method, '--beam-width', '3', '--json',
                             *fused])
    for key in REQUIRED:
        assert key in res, key
    assert res['method'] == method and res['n'] == world['n_test']
    assert res['skipped_rows'] == 1 and res['fixes'] == world['n_test']
    for d in (25, 50, 100):
        assert 0 <= res[f'recall@{d}m'] <= 1 and 0 < res['chance'][f'recall@{d}m'] < 1
    assert res['recall@25m'] <= res['recall@50m'] <= res['recall@100m']
    assert res['median_error_m'] <= res['p90_error_m'] < 2000
    assert res['nees_mean'] > 0 and res['latency_ms_p95'] >= res['latency_ms_p50'] > 0
    if method == 'retrieval' or method == 'ground-knn':
        assert res['step_accuracy'] is None
        assert res['chance']['step_accuracy'] == [0.25, 0.25]
    else:
        # Chance is 1 / (children with imagery): 1/4 inside the map, more at its edges.
        assert res['chance']['step_accuracy_uniform'] == [0.25, 0.25]
        assert all(0.25 <= c <= 1 for c in res['chance']['step_accuracy'])
        assert res['chance']['step_accuracy'][0] > 0.25  # the map covers part of each root
        assert len(res['step_accuracy']) == 2
        assert all(0 <= a <= 1 for a in res['step_accuracy'])
    if method == 'ground-knn':
        assert res['train_images'] == world['n_test']
    if method == 'zoom-fused':
        from geozoom_ros.model.io import model_hash

        assert res['zoom_weight'] == DEFAULT_ZOOM_WEIGHT and res['beam_width'] == 3
        assert res['retrieval_model_sha256'] == model_hash(world['retr'])
        assert res['use_heading'] is True
        blind = _run_json(capsys, ['eval', '--bundle', str(world['bundle']), '--model',
                                   str(world[model]), '--data', str(world['index']), '--split',
                                   'test-same', '--method', method, '--json', '--no-heading',
                                   '--zoom-weight', '0', *fused])
        assert blind['use_heading'] is False and blind['zoom_weight'] == 0.0
        assert blind['n'] == res['n']
        # North-up crops (a retrieval model not heading-aligned) need no heading.
        assert blind['frames_run_as_zoom_beam'] == res['frames_run_as_zoom_beam'] == 0


def test_eval_with_a_prior_and_a_limit(world, capsys):
    res = _run_json(capsys, ['eval', '--bundle', str(world['bundle']), '--model',
                             str(world['policy']), '--data', str(world['index']), '--split',
                             'test-same', '--prior-sigma-m', '5', '--limit', '2', '--json'])
    assert res['n'] == 2 and res['prior_sigma_m'] == 5.0
    # A 5 m prior pins the search to the truth's neighbourhood: within a terminal cell or two.
    assert res['p90_error_m'] < 200


def test_eval_reads_a_drive_bag(world, capsys, tmp_path):
    from geozoom_ros.world.drive import write_drive_bag_from_poses

    w, s, e, n = world['bounds']
    frame = LocalFrame((s + n) / 2, (w + e) / 2)
    t = np.arange(4) * 0.2
    enu = np.stack([t * 50.0, t * 20.0], axis=1)
    images = [np.random.default_rng(i).integers(0, 255, (36, 48, 3), dtype=np.uint8)
              for i in range(4)]
    bag = write_drive_bag_from_poses(tmp_path / 'drive.mcap', frame, t, enu, images,
                                     progress=False)
    res = _run_json(capsys, ['eval', '--bundle', str(world['bundle']), '--model',
                             str(world['policy']), '--data', str(bag), '--method', 'zoom',
                             '--json'])
    assert res['n'] == 4 and res['fixes'] == 4


def test_index_and_localize_commands(world, capsys, tmp_path):
    out = tmp_path / 'bundle'
    assert main(['index', '--map', str(world['map']), '--model', str(world['policy']), '-o',
                 str(out), '--no-progress']) == 0
    text = capsys.readouterr().out
    assert '2 root(s) at zoom 16' in text and (out / 'manifest.json').is_file()
    img = tmp_path / 'q.png'
    cv2.imwrite(str(img), np.full((40, 40, 3), 120, np.uint8))
    assert main(['localize', '--bundle', str(out), '--model', str(world['policy']), str(img),
                 str(img), '--json']) == 0
    lines = [json.loads(s) for s in capsys.readouterr().out.strip().splitlines()]
    assert len(lines) == 2 and lines[0]['lat'] == lines[1]['lat']
    assert np.all(np.linalg.eigvalsh(np.array(lines[0]['cov_en_m2'])) > 0)
    assert main(['localize', '--bundle', str(out), '--model', str(world['policy']),
                 str(img)]) == 0
    assert 'confidence' in capsys.readouterr().out
    # The fused search needs the bundle with the retrieval embeddings.
    fused = ['localize', '--model', str(world['policy']), str(img), '--json', '--method',
             'zoom-fused', '--retrieval-model', str(world['retr']), '--heading', '90']
    assert main(fused + ['--bundle', str(world['bundle'])]) == 0
    line = json.loads(capsys.readouterr().out)
    assert np.all(np.linalg.eigvalsh(np.array(line['cov_en_m2'])) > 0)
    assert main(fused + ['--bundle', str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert 'has no retrieval embeddings' in err[-1]


@pytest.mark.parametrize('argv_tail, message', [
    (['--data', 'nowhere.csv'], 'does not exist'),
    (['--data', '{index}', '--split', 'nope'], "no rows of split 'nope'"),
    (['--data', '{index}', '--method', 'retrieval', '--model', '{other}'], 'not a retrieval'),
    (['--data', '{index}', '--model', '{other}'], 'was built for model'),
    (['--data', '{index}', '--beam-width', '0'], 'must be a positive'),
    (['--data', '{index}', '--method', 'zoom-fused'], 'needs --retrieval-model'),
    (['--data', '{index}', '--method', 'zoom-fused', '--retrieval-model', '{retr}',
      '--zoom-weight', '-1'], '--zoom-weight -1.0 must be'),
    (['--data', '{index}', '--method', 'zoom-fused', '--retrieval-model', '{other}'],
     'not a retrieval'),
])
def test_eval_bad_input_is_one_line_exit_2(world, capsys, argv_tail, message):
    argv = ['eval', '--bundle', str(world['bundle']), '--model', str(world['policy'])]
    argv += [a.format(index=world['index'], other=world['other'], retr=world['retr'])
             for a in argv_tail]
    assert main(argv + ['--json']) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith('geozoom eval: error:') and message in err[-1]


def test_calibrate_writes_beside_the_model_and_eval_reports_both_nees(world, capsys, tmp_path):
    import shutil

    from geozoom_ros import calibration as C

    model = tmp_path / 'model'
    shutil.copytree(world['policy'], model)
    base = ['--bundle', str(world['bundle']), '--model', str(model), '--data',
            str(world['index'])]
    # The default fit (a Gaussian plus far misses) needs 10 fixes; this world has fewer.
    assert main(['calibrate', *base, '--split', 'test-same', '--no-progress']) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith('geozoom calibrate: error:') and 'at least 10 fixes' in err[-1]
    assert not (model / 'calibration.json').exists()
    for method in ('zoom', 'zoom-beam'):
        res = _run_json(capsys, ['calibrate', *base, '--split', 'train', '--method', method,
                                 '--beam-width', '3', '--single-gaussian', '--json'])
        assert res['method'] == method and res['n'] == world['n_test']
        assert res['path'] == str(model / 'calibration.json')
        # One Gaussian fitted by maximum likelihood: NEES 2 on its own data (3 parameters).
        assert 0.5 < res['nees_calibrated']['nees_mean'] < 2.5
        assert res['gate']['target_precision'] == 0.8 and res['gate']['within_m'] == 50.0
        assert res['gate']['n_queries'] == res['n']
    cal = C.load(model / 'calibration.json')
    assert set(cal.models) == {'zoom', 'zoom-beam'} and cal.info['zoom']['split'] == 'train'
    assert set(cal.gates) == {'zoom', 'zoom-beam'}
    res = _run_json(capsys, ['calibrate', *base, '--split', 'train', '--beam-width', '3',
                             '--single-gaussian', '--gate-within-m', '1e7', '--gate-precision',
                             '1', '--json'])
    # Fewer fixes than a gate needs: no threshold, and no precision to report.
    assert res['n'] < res['gate']['min_fixes']
    assert res['gate']['min_confidence'] is None and res['gate']['best_precision'] is None
    for bad, message in ((['--gate-precision', '0'], '--gate-precision 0.0 must be in (0, 1]'),
                         (['--gate-within-m', '-5'], '--gate-within-m -5.0 must be positive')):
        assert main(['calibrate', *base, '--split', 'train', *bad, '--no-progress']) == 2
        assert message in capsys.readouterr().err.strip().splitlines()[-1]
    assert main(['calibrate', *base, '--split', 'train', '--single-gaussian', '--beam-width',
                 '3']) == 0
    text = capsys.readouterr().out
    assert 'cov = ' in text and 'NEES before' in text and 'NEES after' in text
    assert '  gate: ' in text

    argv = ['eval', *base, '--split', 'train', '--method', 'zoom-beam', '--beam-width', '3']
    res = _run_json(capsys, argv + ['--json', '--report', str(tmp_path / 'report')])
    beam_cal = cal.models['zoom-beam']
    assert res['calibration']['a'] == pytest.approx(beam_cal.a)
    assert res['nees_mean'] == res['nees_calibrated_mean'] != res['nees_raw_mean']
    assert 0.5 < res['nees_calibrated_mean'] < 2.5
    raw = _run_json(capsys, argv + ['--json', '--no-calibration'])
    assert raw['calibration'] is None and raw['nees_calibrated_mean'] is None
    assert raw['nees_mean'] == pytest.approx(res['nees_raw_mean'])
    # Random images on a random map: the average precision is undefined without a fix
    # within 50 m, and the curve then says so.
    ap = res['gate_average_precision']
    assert ap is None if res['recall@50m'] == 0 else 0 <= ap <= 1
    assert res['gate_base_rate'] == pytest.approx(res['recall@50m'])
    names = sorted(p.name for p in (tmp_path / 'report').iterdir())
    assert names == ['gate_pr.png', 'summary.json', 'summary.md']
    assert (tmp_path / 'report' / 'gate_pr.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    md = (tmp_path / 'report' / 'summary.md').read_text()
    assert 'NEES mean, calibrated' in md and 'gate average precision' in md
    assert json.loads((tmp_path / 'report' / 'summary.json').read_text())['n'] == res['n']
    # Text output names both, and a bad calibration file is one line.
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert 'uncalibrated' in text and 'average precision' in text
    bad = tmp_path / 'bad.json'
    bad.write_text('{"format": "geozoom-calibration", "format_version": 1}')
    assert main(argv + ['--calibration', str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith('geozoom eval: error:') and 'no "methods"' in err[-1]
    # A fitted gate threshold: eval says what it publishes on these queries, which is the
    # point of the gate curve at the same threshold.
    assert res['gate_calibrated'] is None  # too few fixes here to fit one
    cal.gates['zoom-beam'] = {'min_confidence': 0.25}
    C.save(cal, model / 'calibration.json')
    res = _run_json(capsys, argv + ['--json'])
    point = next(p for p in res['gate'] if p['threshold'] == 0.25)
    g = res['gate_calibrated']
    assert g['min_confidence'] == 0.25 and g['published'] == pytest.approx(point['published'])
    assert g['precision'] == (None if point['published'] == 0 else
                              pytest.approx(point['precision']))
    assert main(argv) == 0
    assert 'calibrated gate (confidence >= 0.250)' in capsys.readouterr().out
