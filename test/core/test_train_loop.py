"""Training loop: overfitting a tiny set, exact resume, the CLI, DDP on two CPU processes."""

import os
from pathlib import Path
import subprocess
import sys

import pytest
import torch

from geozoom_ros.cli import main as geozoom_main
from geozoom_ros.model.config import TrainConfig, TrainPreset
from geozoom_ros.model.io import load_model
from geozoom_ros.model.retrieval import multi_positive_infonce
from geozoom_ros.train.loop import (build_batch, load_data, lr_factor, param_groups,
                                    read_checkpoint, smoothed_masked_ce, train, TrainStep)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train_data import make_world, tiny_config  # noqa: E402, I100

ROOT = Path(__file__).resolve().parents[2]


def _preset(method='zoom', **train_kw):
    kw = dict(epochs=2, batch_size=8, threads=1, val_every=1, seed=3)
    kw.update(train_kw)
    return TrainPreset(method=method, model=tiny_config(dropout=0.1),
                       train=TrainConfig(**kw))


@pytest.fixture(autouse=True)
def one_thread():
    # The test machines are small and shared: one intra-op thread avoids oversubscription.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope='module')
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('world')
    splits = ['train'] * 24 + ['val'] * 4 + ['test-same'] * 4
    return make_world(tmp, n_rows=32, splits=splits)


@pytest.mark.parametrize('method,head', [('zoom', 'linear'), ('zoom', 'match'),
                                         ('zoom', 'linear-fused'), ('retrieval', 'linear')])
def test_teacher_forced_loss_decreases_on_a_tiny_set(world, method, head):
    tiles, csv_path, _ = world
    torch.manual_seed(0)
    preset = _preset(method, aug_color=0.0, aug_blur=0.0, aug_crop_min=1.0,
                     aug_map_rot_deg=0.0, aug_map_shift=0.0, aug_map_color=0.0,
                     heading_noise_deg=0.0, label_smoothing=0.0, lr=1e-3,
                     aux_contrastive_weight=0.0)
    preset.model.dropout = 0.0
    head, _, layout = head.partition('-')
    preset.model.action_head = head
    preset.model.decoder_tokens = layout or 'interleaved'
    data = load_data([(tiles, csv_path)], preset, progress=False)
    from geozoom_ros.model.policy import ZoomPolicy
    from geozoom_ros.model.retrieval import RetrievalModel
    model = (ZoomPolicy if method == 'zoom' else RetrievalModel)(preset.model)
    step = TrainStep(model, method, preset.train)
    batch = build_batch(data, list(range(8)), torch.Generator().manual_seed(0), method)
    if head == 'match':
        # Every step's k*k children are rendered and indexed; the true child is among them.
        kids, idx = batch['child_idx'], batch['view_idx']
        k2 = preset.model.num_actions
        assert kids.shape == (8, preset.model.steps, k2)
        true = kids.gather(2, batch['actions'][..., None]).squeeze(2)
        assert torch.equal(true[:, :-1], idx[:, 1:])
        # Children outside the map never enter the softmax; the true child always does.
        assert batch['mask'].gather(2, batch['actions'][..., None]).all()
    opt = torch.optim.AdamW(param_groups(model, preset.train))
    model.train()
    losses = []
    for _ in range(30):
        loss, _ = step(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert sum(losses[-3:]) / 3 < 0.75 * losses[0], losses


def test_masked_smoothed_ce():
    logits = torch.tensor([[2.0, 0.0, 50.0, -1.0]])
    mask = torch.tensor([[True, True, False, True]])
    target = torch.tensor([0])
    loss = smoothed_masked_ce(logits, target, mask, 0.0)
    ref = torch.nn.functional.cross_entropy(torch.tensor([[2.0, 0.0, -1.0]]), target)
    assert torch.isclose(loss, ref)
    sm = smoothed_masked_ce(logits, target, mask, 0.1)
    ref = torch.nn.functional.cross_entropy(torch.tensor([[2.0, 0.0, -1.0]]), target,
                                            label_smoothing=0.1)
    assert torch.isclose(sm, ref)


def test_schedule():
    assert lr_factor(0, 100, 0.05, 0.1) == pytest.approx(0.2)
    assert lr_factor(4, 100, 0.05, 0.1) == pytest.approx(1.0)
    assert lr_factor(99, 100, 0.05, 0.1) == pytest.approx(0.1, abs=1e-3)


def test_resume_reproduces_an_uninterrupted_run(world, tmp_path):
    tiles, csv_path, _ = world
    full = train([(tiles, csv_path)], tmp_path / 'full', _preset(), progress=False)
    part = train([(tiles, csv_path)], tmp_path / 'part', _preset(), max_steps=4,
                 progress=False)
    t_part, s_part = read_checkpoint(part / 'checkpoint.safetensors')
    assert s_part['global_step'] == 4  # stopped mid-epoch 2 (3 batches per epoch)
    train([(tiles, csv_path)], tmp_path / 'part', resume=True, progress=False)
    t_full, s_full = read_checkpoint(full / 'checkpoint.safetensors')
    t_res, s_res = read_checkpoint(part / 'checkpoint.safetensors')
    assert s_full['global_step'] == s_res['global_step'] == 6
    assert set(t_full) == set(t_res)
    for k in t_full:
        assert torch.equal(t_full[k], t_res[k]), k
    assert s_full['best_metric'] == s_res['best_metric']
    m = load_model(full)
    assert m.kind == 'zoom_policy' and m.meta['val']['n'] == 4
    assert 0.0 <= m.meta['val']['recall@50m'] <= 1.0 and len(m.meta['val']['step_accuracy']) == 2


def test_cli_errors_are_one_line(world, tmp_path, capsys):
    tiles, csv_path, _ = world
    out = tmp_path / 'm'
    rc = geozoom_main(['train', '--map', str(tiles), '--data', str(csv_path),
                       '--map', str(tiles), '-o', str(out)])
    assert rc == 2 and 'must come in pairs' in capsys.readouterr().err
    rc = geozoom_main(['train', '--map', str(tmp_path / 'no.mbtiles'), '--data',
                       str(csv_path), '-o', str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and 'no.mbtiles' in err and len(err.strip().splitlines()) == 1
    rc = geozoom_main(['train', '--map', str(tiles), '--data', str(csv_path), '-o', str(out),
                       '--resume'])
    assert rc == 2 and 'no checkpoint' in capsys.readouterr().err
    bad = tmp_path / 'bad.yaml'
    bad.write_text('train: {epoks: 3}\n')
    rc = geozoom_main(['train', '--map', str(tiles), '--data', str(csv_path), '-o', str(out),
                       '--config', str(bad)])
    assert rc == 2 and 'epoks' in capsys.readouterr().err


def test_cli_trains_retrieval_and_ddp_on_two_cpu_processes(world, tmp_path):
    tiles, csv_path, _ = world
    cfg = tmp_path / 'tiny.yaml'
    c = tiny_config()
    cfg.write_text(
        'method: retrieval\n'
        f'model: {{embed_dim: 32, steps: {c.steps}, root_zoom: {c.root_zoom}, '
        f'view_size: 32, ground_size: [48, 32], decoder_layers: 1, decoder_heads: 2, '
        f'context_m: 30.0, heading_aligned: true}}\n'
        'train: {epochs: 1, batch_size: 4, val_every: 1, seed: 1}\n')
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS='1')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2',
           '--rdzv-endpoint=localhost:0', '--rdzv-backend=c10d',
           '-m', 'geozoom_ros.train.loop', '--map', str(tiles), '--data', str(csv_path),
           '-o', str(tmp_path / 'ddp'), '--config', str(cfg), '--threads', '1', '--quiet']
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, state = read_checkpoint(tmp_path / 'ddp' / 'checkpoint.safetensors')
    assert state['world_size'] == 2 and state['global_step'] == 3  # 24 rows / (2 x 4)
    model = load_model(tmp_path / 'ddp')
    assert model.kind == 'retrieval' and model.config.heading_aligned


@pytest.mark.parametrize('levels', ['last', 'all'])
def test_auxiliary_infonce_over_the_chosen_levels(world, levels):
    tiles, csv_path, _ = world
    torch.manual_seed(0)
    preset = _preset(aux_contrastive_weight=1.0, aux_levels=levels)
    data = load_data([(tiles, csv_path)], preset, progress=False)
    from geozoom_ros.model.policy import ZoomPolicy
    model = ZoomPolicy(preset.model)
    model.eval()
    batch = build_batch(data, list(range(8)), torch.Generator().manual_seed(0), 'zoom')
    loss, stats = TrainStep(model, 'zoom', preset.train)(batch)
    assert torch.isfinite(loss) and float(stats['aux']) >= 0
    # The loss is the cross-entropy plus the InfoNCE term(s) computed here by hand.
    g = model.encode_ground(batch['ground'])
    s = model.encode_map(batch['views'])
    view_idx = batch['view_idx']
    scale = model.aux_logit_scale.exp().clamp(max=100.0)
    terms = []
    for t in (range(view_idx.shape[1]) if levels == 'all' else [-1]):
        uniq, inv = torch.unique(view_idx[:, t], return_inverse=True)
        if len(uniq) > 1:
            pos = inv[:, None] == torch.arange(len(uniq))[None]
            qa, ka = model.aux_embeddings(g, s[uniq])
            terms.append(multi_positive_infonce(qa, ka, pos, scale))
    want = torch.stack(terms).mean() if terms else torch.tensor(0.0)
    assert float(stats['aux']) == pytest.approx(float(want), rel=1e-5, abs=1e-6)
    assert float(loss) == pytest.approx(float(stats['ce']) + float(want), rel=1e-5)


def test_match_head_validation_stays_inside_the_map(world):
    from geozoom_ros.model.policy import ZoomPolicy
    from geozoom_ros.train.loop import _TokenCache, greedy_zoom, validate

    tiles, csv_path, _ = world
    torch.manual_seed(0)
    preset = _preset()
    preset.model.action_head = 'match'
    data = load_data([(tiles, csv_path)], preset, progress=False)
    model = ZoomPolicy(preset.model).eval()
    w = data.worlds[0]
    metrics = validate(model, data, 'zoom', 'cpu')
    assert metrics['n'] == 4 and len(metrics['step_accuracy']) == preset.model.steps
    with torch.no_grad():
        g = torch.randn(6, preset.model.embed_dim) * 3
        tokens = _TokenCache(w, model.encode_map, preset.model.view_size, 'cpu')
        cells, logp = greedy_zoom(model, g, w.roots(preset.model.root_zoom), tokens, w.coverage)
    # Children outside the map are never chosen, so every path ends on the map.
    assert all(w.coverage(c) > 0 for c in cells)
    assert torch.isfinite(logp).all() and (logp <= 0).all()


def test_grid_shift_needs_a_match_head(world, tmp_path):
    from geozoom_ros.errors import ConfigError

    tiles, csv_path, _ = world
    with pytest.raises(ConfigError, match='action_head: match') as err:
        train([(tiles, csv_path)], tmp_path / 'm', _preset(grid_shift=0.5), progress=False)
    assert '\n' not in str(err.value)
    assert not (tmp_path / 'm').exists()


def test_shifted_grids_keep_each_sample_inside_its_path(world):
    from geozoom_ros.train.data import shifted_bounds, shifted_path, unshift

    tiles, csv_path, _ = world
    preset = _preset(grid_shift=1.0)
    preset.model.action_head = 'match'
    cfg = preset.model
    data = load_data([(tiles, csv_path)], preset, progress=False)
    w = data.worlds[0]
    zs = cfg.root_zoom + (cfg.steps - 1) * cfg.levels_per_step
    for s in w.samples[:6]:
        for shift in [(0, 0), (1, 0), (3, 2), (15, 15)]:
            cells, actions = shifted_path(s, shift, zs, cfg.root_zoom, cfg.steps, cfg.grid_k)
            assert len(actions) == cfg.steps and len(cells) == cfg.steps + 1
            for c in cells:
                west, south, east, north = shifted_bounds(c, shift, zs)
                assert west <= s.lon <= east and south <= s.lat <= north
            # The finest levels are the map's own cells: the terminal cell is the sample's.
            assert unshift(cells[-1], shift, zs) == s.cells[-1]
            if shift != (0, 0):
                assert cells[0] != s.cells[0] or actions != s.actions
    batch = build_batch(data, list(range(8)), torch.Generator().manual_seed(1), 'zoom')
    kids, idx = batch['child_idx'], batch['view_idx']
    true = kids.gather(2, batch['actions'][..., None]).squeeze(2)
    assert torch.equal(true[:, :-1], idx[:, 1:])
    assert batch['mask'].gather(2, batch['actions'][..., None]).all()
    # Shifted coarse squares are new views: more distinct views than the map grid offers.
    plain = build_batch(data, list(range(8)), torch.Generator().manual_seed(1), 'zoom',
                        train=False)
    assert batch['views'].shape[0] > plain['views'].shape[0]
