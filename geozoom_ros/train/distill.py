"""`geozoom distill`: a smaller zoom decoder trained on a trained model's frozen encoders.

The encoders are what the cross-view task spends its training on; the decoder is small, and a
search runs it ``steps x beam`` times per frame, so its depth sets the search's cost on board.
Distillation keeps the teacher's encoders unchanged (so its map tokens stay the same numbers)
and trains a student decoder of fewer layers on them:

1. every training view is encoded by the frozen ground encoder under ``passes`` draws of the
   training augmentation (the first pass unaugmented), and every cell view on a training or
   validation path by the frozen map encoder, once;
2. the student starts from the teacher's embeddings, read-out and first ``layers`` blocks, and
   is trained on those cached tokens with the training loss (cross-entropy with label
   smoothing over the children allowed in the softmax, :func:`smoothed_masked_ce`) plus
   ``kd_weight`` times the KL divergence from the teacher's teacher-forced step distributions;
3. the teacher's and the student's greedy recall on the validation split are printed side by
   side and stored in the student's ``config.json`` (``meta.distill``).

With tokens cached, a step touches only the decoder, so a run takes minutes on a CPU. The
student is a complete model folder (the teacher's encoders and heads, the new decoder). Its map
side is the teacher's (:func:`geozoom_ros.model.io.map_hash`), so a map bundle built for the
teacher serves it without encoding the map again; its calibration must be fitted again
(``geozoom calibrate``), since its scores are its own.
"""

import copy
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from geozoom_ros.errors import ConfigError, InputError
from geozoom_ros.model.config import TrainConfig, TrainPreset
from geozoom_ros.model.io import CONFIG_FILE, load_model, model_hash, save_model
from geozoom_ros.train.data import softmax_mask
from geozoom_ros.train.loop import (augment_ground, augment_map, CHECKPOINT_FILE, load_data,
                                    map_data_pairs, smoothed_masked_ce, validate)

#: Images encoded per forward pass while caching tokens.
CACHE_BATCH = 128


def _teacher_train_config(teacher, batch_size, seed):
    """Return the teacher's training settings (augmentation, masks) to cache its inputs with."""
    stored = dict(teacher.meta.get('train') or {})
    known = set(TrainConfig.__dataclass_fields__)
    tc = TrainConfig.from_dict({k: v for k, v in stored.items() if k in known},
                               'teacher config.json: meta.train')
    tc.batch_size, tc.seed, tc.num_workers, tc.preload = batch_size, seed, 0, True
    return tc


def cache_tokens(model, data, passes, gen, progress=True):
    """Encode what decoder training reads, once, with the frozen encoders (on their device).

    Returns a dict: ``ground`` [passes, N, D] tokens of the N training views (pass 0
    unaugmented, the others under the training augmentation), ``cells`` [C, D] unaugmented
    tokens of every cell on a training or validation path, ``paths`` [N, T] and ``val_paths``
    [V, T] rows into ``cells``, ``actions`` [N, T] and ``val_actions`` [V, T], ``masks``
    [N, T, k*k] the training softmax masks, and ``val_ground`` [V, D].
    """
    cfg, tc = model.config, data.preset.train
    t = cfg.steps
    index = {}
    for key in data.train + data.val:
        s = data.sample(key)
        for c in s.cells[:t]:
            index.setdefault((s.world, c), len(index))
    keys = list(index)
    out = {'cells': torch.empty(len(keys), cfg.embed_dim)}
    dev = next(model.parameters()).device
    started = time.time()
    with torch.inference_mode():
        for i in range(0, len(keys), CACHE_BATCH):
            chunk = keys[i:i + CACHE_BATCH]
            imgs = np.stack([data.worlds[w].view(c, cfg.view_size) for w, c in chunk])
            out['cells'][i:i + len(chunk)] = model.encode_map(
                augment_map(imgs, gen, tc, train=False).to(dev)).float().cpu()
        n = len(data.train)
        out['ground'] = torch.empty(passes, n, cfg.embed_dim)
        for p in range(passes):
            for i in range(0, n, CACHE_BATCH):
                rows = range(i, min(n, i + CACHE_BATCH))
                imgs = np.stack([data.ground_train(j) for j in rows])
                x = augment_ground(imgs, cfg.ground_size, gen, tc, train=p > 0)
                out['ground'][p, i:i + len(rows)] = model.encode_ground(x.to(dev)).float().cpu()
            if progress:
                print(f'distill: ground tokens, pass {p + 1}/{passes} '
                      f'({time.time() - started:.0f} s)', file=sys.stderr)
        vimgs = data.val_bank if data.val else np.zeros((0, 1, 1, 3), np.uint8)
        out['val_ground'] = torch.cat(
            [model.encode_ground(augment_ground(vimgs[i:i + CACHE_BATCH], cfg.ground_size,
                                                gen, tc, train=False).to(dev)).float().cpu()
             for i in range(0, len(vimgs), CACHE_BATCH)]) if len(vimgs) else \
            torch.empty(0, cfg.embed_dim)

    def rows(keyset):
        return torch.tensor([[index[(data.sample(k).world, c)]
                              for c in data.sample(k).cells[:t]] for k in keyset],
                            dtype=torch.long).view(len(keyset), t)

    def actions(keyset):
        return torch.tensor([list(data.sample(k).actions[:t]) for k in keyset],
                            dtype=torch.long).view(len(keyset), t)

    out['paths'], out['actions'] = rows(data.train), actions(data.train)
    out['val_paths'], out['val_actions'] = rows(data.val), actions(data.val)
    masks = [softmax_mask(data.sample(k), data.worlds[data.sample(k).world], cfg.grid_k)
             if tc.mask_heldout_cells else np.ones((t, cfg.num_actions), bool)
             for k in data.train]
    out['masks'] = torch.from_numpy(np.stack(masks))
    return out


def student_decoder(teacher, layers):
    """Return a decoder of ``layers`` blocks initialised from the teacher's first ones."""
    cfg = teacher.config
    from geozoom_ros.model.decoder import ZoomDecoder

    student = ZoomDecoder(cfg.embed_dim, cfg.num_actions, layers, cfg.decoder_heads,
                          cfg.dropout, cfg.action_head, cfg.match_dim, cfg.decoder_tokens)
    own = student.state_dict()
    student.load_state_dict({k: v for k, v in teacher.decoder.state_dict().items()
                             if k in own and own[k].shape == v.shape}, strict=False)
    return student


def step_accuracy(decoder, tokens, ground, paths, actions):
    """Teacher-forced accuracy of each step [T] over the given rows (no gradient)."""
    if len(ground) == 0:
        return [float('nan')] * paths.shape[1]
    was = decoder.training
    decoder.eval()
    with torch.no_grad():
        logits = decoder(ground, tokens[paths], actions[:, :-1])
    decoder.train(was)
    return (logits.argmax(-1) == actions).float().mean(0).tolist()


def _lr_factor(step, total, warmup=0.03, final=0.05):
    w = max(1, int(warmup * total))
    if step < w:
        return (step + 1) / w
    p = (step - w) / max(1, total - w)
    return final + (1 - final) * 0.5 * (1 + np.cos(np.pi * p))


def distill(teacher_path, pairs, out_dir, layers=1, passes=6, steps=3000, batch_size=256,
            lr=1e-3, kd_weight=1.0, seed=0, threads=0, progress=True, device='cpu'):
    """Train a ``layers``-block student decoder on the teacher's frozen encoders; save it.

    ``pairs``: (map, data) pairs as for training, with the teacher's train/val splits.
    ``device`` (cpu, cuda, auto) encodes the cached tokens and runs validation; the student
    trains on the CPU (its steps touch only the small decoder).
    Returns ``(out_dir, report)`` where the report holds the settings and the teacher's and
    student's validation figures (also stored in ``config.json`` under ``meta.distill``).
    """
    if threads:
        torch.set_num_threads(threads)
    for name, value, low in (('--layers', layers, 1), ('--passes', passes, 1),
                             ('--steps', steps, 1), ('--batch-size', batch_size, 1)):
        if value < low:
            raise ConfigError(f'{name} {value}: must be at least {low}')
    if not lr > 0 or not kd_weight >= 0:
        raise ConfigError(f'--lr {lr} must be > 0 and --kd-weight {kd_weight} >= 0')
    from geozoom_ros.runtime.torch_backend import resolve_device
    dev = resolve_device(device)
    teacher = load_model(teacher_path)
    if teacher.kind != 'zoom_policy':
        raise InputError(f'{teacher_path}: a retrieval model has no decoder to distil; pass a '
                         'zoom-policy model folder')
    cfg = teacher.config
    if cfg.action_head != 'linear':
        raise InputError(f'{teacher_path}: distillation supports linear action heads, this '
                         f'model has {cfg.action_head!r}')
    if cfg.heading_input:
        raise InputError(f'{teacher_path}: distillation does not cache headings; this model '
                         'was trained with heading_input')
    if layers > cfg.decoder_layers:
        raise ConfigError(f'--layers {layers}: the teacher has {cfg.decoder_layers}; a student '
                          'starts from the teacher\'s first blocks, so it cannot have more')
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    preset = TrainPreset(method='zoom', model=copy.deepcopy(cfg),
                         train=_teacher_train_config(teacher, batch_size, seed))
    data = load_data(pairs, preset, progress=progress)
    started = time.time()
    c = cache_tokens(teacher.to(dev), data, passes, gen, progress)
    cache_s = time.time() - started
    teacher.cpu()

    student = student_decoder(teacher, layers)
    tdec = teacher.decoder.eval()
    for p in tdec.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.05)
    smoothing = preset.train.label_smoothing
    n_pass, n = c['ground'].shape[:2]
    student.train()
    t0 = time.time()
    for step in range(steps):
        for group in opt.param_groups:
            group['lr'] = lr * _lr_factor(step, steps)
        p = torch.randint(0, n_pass, (batch_size,), generator=gen)
        i = torch.randint(0, n, (batch_size,), generator=gen)
        g, sat, a, m = c['ground'][p, i], c['cells'][c['paths'][i]], c['actions'][i], \
            c['masks'][i]
        logits = student(g, sat, a[:, :-1])
        loss = smoothed_masked_ce(logits, a, m, smoothing)
        if kd_weight > 0:
            with torch.no_grad():
                target = torch.log_softmax(tdec(g, sat, a[:, :-1]).float()
                                           .masked_fill(~m, -1e4), -1)
            logp = torch.log_softmax(logits.float().masked_fill(~m, -1e4), -1)
            kd = F.kl_div(logp, target, log_target=True, reduction='batchmean')
            loss = loss + kd_weight * kd / logits.shape[1]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        if progress and (step % 500 == 0 or step == steps - 1):
            acc = step_accuracy(student, c['cells'], c['val_ground'], c['val_paths'],
                                c['val_actions'])
            print(f'distill: step {step + 1}/{steps} loss {loss.item():.3f} val step acc '
                  + ' / '.join(f'{v:.2f}' for v in acc) + f' ({time.time() - t0:.0f} s)',
                  file=sys.stderr)
    train_s = time.time() - t0

    model = copy.deepcopy(teacher)
    model.config.decoder_layers = layers
    model.decoder = student.eval()
    report = {'teacher': {'path': str(teacher_path), 'hash': model_hash(teacher_path),
                          'decoder_layers': cfg.decoder_layers},
              'layers': layers, 'passes': passes, 'steps': steps, 'batch_size': batch_size,
              'lr': lr, 'kd_weight': kd_weight, 'seed': seed,
              'cache_seconds': round(cache_s, 1), 'train_seconds': round(train_s, 1)}
    if data.val:
        report['teacher_val'] = validate(teacher.to(dev), data, 'zoom', dev)
        report['val'] = validate(model.to(dev), data, 'zoom', dev)
        model.cpu()
    meta = copy.deepcopy(teacher.meta)
    meta['distill'] = report
    if 'val' in report:
        meta['val'] = report['val']
    save_model(model, out_dir, extra_meta=meta)
    return out_dir, report


def run_from_args(args):
    """Run ``geozoom distill`` from parsed arguments; return an exit status."""
    from pathlib import Path

    pairs = map_data_pairs(args)
    if Path(args.output).resolve() == Path(args.teacher).resolve():
        raise InputError(f'-o {args.output}: is the teacher\'s folder; write the student to '
                         'another one')
    for name in (CONFIG_FILE, CHECKPOINT_FILE):
        if (Path(args.output) / name).exists():
            raise InputError(f'-o {args.output}: already holds a model or training run '
                             f'({name}); choose another folder')
    out, report = distill(args.teacher, pairs, args.output, args.layers,
                          args.passes, args.steps, args.batch_size, args.lr, args.kd_weight,
                          args.seed, args.threads, progress=not args.quiet,
                          device=args.device)
    if not args.quiet:
        for name in ('teacher_val', 'val'):
            v = report.get(name)
            if v:
                who = 'teacher' if name == 'teacher_val' else 'student'
                print(f'{who}: val R@25/50/100 m '
                      f'{100 * v["recall@25m"]:.1f} / {100 * v["recall@50m"]:.1f} / '
                      f'{100 * v["recall@100m"]:.1f} %, step accuracy '
                      + ' / '.join(f'{100 * a:.0f}' for a in v.get('step_accuracy', [])))
        print(out)
    return 0
