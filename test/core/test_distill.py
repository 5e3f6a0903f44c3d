"""`geozoom distill`: a student decoder on the teacher's frozen encoders, and its errors."""

from pathlib import Path
import sys

import pytest
import torch
import torch.nn.functional as F

from geozoom_ros.bundle import build_bundle, load_bundle
from geozoom_ros.cli import main as geozoom_main
from geozoom_ros.errors import MismatchError
from geozoom_ros.model.config import TrainConfig, TrainPreset
from geozoom_ros.model.io import load_model, map_hash, model_hash, save_model
from geozoom_ros.train.distill import cache_tokens, distill, student_decoder
from geozoom_ros.train.loop import load_data, train

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train_data import make_world, tiny_config  # noqa: E402, I100
from test_train_loop import one_thread  # noqa: E402, F401 - autouse: one intra-op thread


@pytest.fixture(scope='module')
def teacher(tmp_path_factory):
    """A two-layer tiny zoom policy overfitted to a tiny world (peaked step distributions)."""
    tmp = tmp_path_factory.mktemp('distill')
    splits = ['train'] * 24 + ['val'] * 4 + ['test-same'] * 4
    tiles, csv_path, _ = make_world(tmp, n_rows=32, splits=splits)
    preset = TrainPreset(method='zoom', model=tiny_config(decoder_layers=2),
                         train=TrainConfig(epochs=20, batch_size=8, threads=1, val_every=20,
                                           seed=3, lr=3e-3, label_smoothing=0.0))
    torch.manual_seed(0)
    out = train([(tiles, csv_path)], tmp / 'teacher', preset, progress=False)
    return out, tiles, csv_path


def _kl_to_teacher(student, teacher_model, cache):
    """Mean KL(teacher || student) of the teacher-forced steps over the cached training rows."""
    g, a, m = cache['ground'][0], cache['actions'], cache['masks']
    sat = cache['cells'][cache['paths']]
    with torch.no_grad():
        s = torch.log_softmax(student(g, sat, a[:, :-1]).masked_fill(~m, -1e4), -1)
        t = torch.log_softmax(teacher_model.decoder(g, sat, a[:, :-1]).masked_fill(~m, -1e4), -1)
    return float(F.kl_div(s, t, log_target=True, reduction='batchmean')) / a.shape[1]


def test_student_keeps_the_encoders_and_learns_the_teacher(teacher, tmp_path):
    path, tiles, csv_path = teacher
    out, report = distill(path, [(tiles, csv_path)], tmp_path / 'student', layers=1,
                          passes=2, steps=80, batch_size=16, lr=3e-3, kd_weight=10.0,
                          progress=False)
    t, s = load_model(path), load_model(out)
    assert s.config.decoder_layers == 1 and len(s.decoder.blocks) == 1
    assert t.config.decoder_layers == 2
    # Everything but the decoder is the teacher's, so a bundle's map tokens are the same.
    ts, ss = t.state_dict(), s.state_dict()
    for k, v in ts.items():
        if not k.startswith('decoder.'):
            assert torch.equal(v, ss[k]), k
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(t.encode_map(x), s.encode_map(x))
    # The student's block was trained, and it now follows the teacher more closely than the
    # teacher's own first block with the read-out did at the start.
    assert not torch.equal(ts['decoder.blocks.0.mlp.w3.weight'],
                           ss['decoder.blocks.0.mlp.w3.weight'])
    preset = TrainPreset(method='zoom', model=t.config,
                         train=TrainConfig(batch_size=16, aug_color=0.0, aug_blur=0.0))
    data = load_data([(tiles, csv_path)], preset, progress=False)
    cache = cache_tokens(t, data, 1, torch.Generator().manual_seed(0), progress=False)
    before = _kl_to_teacher(student_decoder(t, 1).eval(), t, cache)
    after = _kl_to_teacher(s.decoder, t, cache)
    assert after < 0.5 * before, (before, after)
    # The report names the teacher and holds both models' validation figures.
    meta = s.meta['distill']
    assert meta['teacher']['hash'] == model_hash(path) and meta['layers'] == 1
    assert meta['val']['n'] == meta['teacher_val']['n'] == 4
    assert len(meta['val']['step_accuracy']) == 2
    assert report == meta


def test_cache_holds_every_training_row_and_path_cell(teacher):
    path, tiles, csv_path = teacher
    t = load_model(path)
    preset = TrainPreset(method='zoom', model=t.config, train=TrainConfig(batch_size=8))
    data = load_data([(tiles, csv_path)], preset, progress=False)
    cache = cache_tokens(t, data, 3, torch.Generator().manual_seed(0), progress=False)
    n, steps, d = len(data.train), t.config.steps, t.config.embed_dim
    assert cache['ground'].shape == (3, n, d) and cache['paths'].shape == (n, steps)
    assert cache['masks'].shape == (n, steps, t.config.num_actions)
    assert cache['val_ground'].shape == (len(data.val), d)
    # Pass 0 is unaugmented; later passes differ from it.
    assert not torch.allclose(cache['ground'][0], cache['ground'][1])
    # Each path row points at the token of that row's cell: re-encode one and compare.
    s = data.sample(data.train[5])
    cell = s.cells[1]
    img = data.worlds[0].view(cell, t.config.view_size)
    from geozoom_ros.model.encoders import normalise
    with torch.no_grad():
        tok = t.encode_map(normalise(torch.from_numpy(img[None]).permute(0, 3, 1, 2).float()))
    assert torch.allclose(cache['cells'][cache['paths'][5, 1]], tok[0], atol=1e-5)
    assert torch.equal(cache['actions'][5], torch.tensor(list(s.actions[:steps])))


def test_cli_distils_and_refuses_bad_requests_in_one_line(teacher, tmp_path, capsys):
    path, tiles, csv_path = teacher
    base = ['distill', '--teacher', str(path), '--map', str(tiles), '--data', str(csv_path)]
    rc = geozoom_main(base + ['-o', str(tmp_path / 's'), '--passes', '1', '--steps', '5',
                              '--batch-size', '8', '--threads', '1'])
    out = capsys.readouterr()
    assert rc == 0 and 'teacher: val R@25/50/100 m' in out.out and 'student:' in out.out
    assert load_model(tmp_path / 's').config.decoder_layers == 1
    for extra, needle in ((['--layers', '3'], 'teacher has 2'),
                          (['--steps', '0'], '--steps 0'),
                          (['--kd-weight', '-1'], '--kd-weight'),
                          (['-o', str(path)], "teacher's folder"),
                          (['-o', str(tmp_path / 's')], 'already holds a model')):
        args = base + (['-o', str(tmp_path / 'x')] if '-o' not in extra else []) + extra
        rc = geozoom_main(args)
        err = capsys.readouterr().err
        assert rc == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    if not torch.cuda.is_available():
        rc = geozoom_main(base + ['-o', str(tmp_path / 'x'), '--device', 'cuda'])
        err = capsys.readouterr().err
        assert rc == 2 and 'CUDA is not available' in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / 'x').exists()
    rc = geozoom_main(['distill', '--teacher', str(tmp_path / 'none'), '--map', str(tiles),
                       '--data', str(csv_path), '-o', str(tmp_path / 'y')])
    err = capsys.readouterr().err
    assert rc == 2 and 'none' in err and len(err.strip().splitlines()) == 1


def test_teacher_bundle_serves_the_student_and_nothing_else(teacher, tmp_path):
    path, tiles, csv_path = teacher
    from geozoom_ros.runtime.onnx_backend import OnnxBackend
    from geozoom_ros.runtime.torch_backend import TorchBackend

    student, _ = distill(path, [(tiles, csv_path)], tmp_path / 'student', passes=1, steps=3,
                         batch_size=8, progress=False)
    assert model_hash(student) != model_hash(path) and map_hash(student) == map_hash(path)
    bundle_dir = build_bundle(tiles, path, tmp_path / 'bundle', progress=False)
    before = (bundle_dir / 'tokens.f16.npy').stat().st_mtime_ns
    # The student's backends accept the teacher's bundle: its tokens are the same numbers.
    for backend in (TorchBackend(student), OnnxBackend(student, threads=1)):
        assert load_bundle(bundle_dir, backend).model_hash == model_hash(path)
    # Indexing with the student reuses the bundle instead of encoding the map again.
    assert build_bundle(tiles, student, bundle_dir, progress=False) == bundle_dir
    assert (bundle_dir / 'tokens.f16.npy').stat().st_mtime_ns == before
    # A model whose map head differs is refused in one line naming the bundle.
    other = load_model(student)
    with torch.no_grad():
        other.map_head.mlp[0].bias.add_(0.01)
    save_model(other, tmp_path / 'other')
    with pytest.raises(MismatchError, match='was built for model'):
        load_bundle(bundle_dir, TorchBackend(tmp_path / 'other'))
