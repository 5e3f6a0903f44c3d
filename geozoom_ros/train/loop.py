"""`geozoom train`: the training loop of the zoom policy and of the retrieval baseline.

Zoom policy: teacher forcing over ``[g, s0, a0, ..., s_{T-1}]``, cross-entropy with label
smoothing over the children that may enter the softmax (children holding only held-out rows are
left out), plus an optional symmetric InfoNCE between the ground token and the token of the
deepest cell view on the path (it teaches the encoder cross-view matching directly; the decoder
sees no cell identifiers, so it cannot win by memorising cells). Retrieval: symmetric InfoNCE
between ground images and ``context_m`` crops centred on the terminal cell.

The encoder is fine-tuned end to end (batch-norm statistics frozen) at ``lr * encoder_lr_mult``;
AdamW, linear warm-up then cosine decay to ``final_lr_frac``, gradient clipping, bf16/fp16
autocast on CUDA. Every batch is a pure function of (seed, epoch, batch number, rank): the data
order (DistributedSampler), the augmentation draws and the cell views, so ``--resume`` from a
checkpoint (written atomically each epoch, and when ``max_minutes``/``max_steps`` stop a run)
continues to the same parameters as an uninterrupted run.

Data-parallel: ``torchrun --nproc_per_node=N -m geozoom_ros.train.loop ARGS`` (same arguments
as ``geozoom train``) runs DistributedDataParallel (NCCL on CUDA, gloo on CPU); rank 0 writes.
"""

import json
import math
import os
from pathlib import Path
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from geozoom_ros import geo
from geozoom_ros.errors import ConfigError, GeoZoomError, InputError
from geozoom_ros.model.config import load_preset, TrainPreset
from geozoom_ros.model.encoders import freeze_early_layers, normalise
from geozoom_ros.model.io import atomic_write_bytes, atomic_write_json, save_model, \
    tensors_to_bytes
from geozoom_ros.model.retrieval import multi_positive_infonce
from geozoom_ros.search import MIN_COVERAGE
from geozoom_ros.train.data import (decode_image, load_world, NO_SHIFT, shifted_mask,
                                    shifted_path, softmax_mask, square_id)

CHECKPOINT_FILE = 'checkpoint.safetensors'
LOG_FILE = 'train_log.json'
#: Ground images are kept this much larger than the training size, so random crops keep detail.
GROUND_MARGIN = 1.15
#: Heading-aligned retrieval crops are cached per bin of this many degrees; the residual
#: rotation is applied when augmenting.
HEADING_BIN_DEG = 10.0
#: Validation of a heading-aligned retrieval model embeds candidates at this many headings.
VAL_HEADING_BINS = 8


# --------------------------------------------------------------------------------------------
# Data preparation

class TrainData:
    """Worlds, the train/val sample lists and the ground images kept in memory."""

    def __init__(self, worlds, reports, preset):
        self.worlds = worlds
        self.reports = reports
        self.preset = preset
        cfg, tc = preset.model, preset.train
        self.train = [(w, i) for w, world in enumerate(worlds)
                      for i, s in enumerate(world.samples) if s.split == tc.train_split]
        self.val = [(w, i) for w, world in enumerate(worlds)
                    for i, s in enumerate(world.samples) if s.split == tc.val_split]
        if len(self.train) < tc.batch_size:
            raise InputError(f'only {len(self.train)} training rows (split '
                             f'{tc.train_split!r}) for batch_size {tc.batch_size}; add data or '
                             'lower train.batch_size')
        rng = np.random.default_rng(tc.seed)
        if len(self.val) > tc.val_max_queries:
            keep = np.sort(rng.choice(len(self.val), tc.val_max_queries, replace=False))
            self.val = [self.val[i] for i in keep]
        w, h = cfg.ground_size
        self.store_size = (int(round(w * GROUND_MARGIN)), int(round(h * GROUND_MARGIN)))
        self.bank = None
        if tc.preload:
            self.bank = self._load_bank(self.train, self.store_size, 'loading training images')
        self.val_bank = self._load_bank(self.val, (w, h), 'loading validation images') \
            if self.val else None

    def sample(self, key):
        w, i = key
        return self.worlds[w].samples[i]

    def _load_bank(self, keys, size, desc):
        from tqdm import tqdm

        bank = np.empty((len(keys), size[1], size[0], 3), dtype=np.uint8)
        for j, key in enumerate(tqdm(keys, desc=desc, unit='img', leave=False,
                                     disable=_rank() != 0)):
            img = decode_image(self.sample(key).path, size)
            if img is None:
                raise InputError(f'{self.sample(key).path}: became unreadable during loading')
            bank[j] = img
        return bank

    def ground_train(self, j):
        if self.bank is not None:
            return self.bank[j]
        img = decode_image(self.sample(self.train[j]).path, self.store_size)
        if img is None:
            raise InputError(f'{self.sample(self.train[j]).path}: became unreadable')
        return img


def load_data(pairs, preset, progress=True, stores=None, renderers=None):
    """Load every (map, data) pair into a :class:`TrainData`; print the load reports."""
    cfg = preset.model
    need_heading = cfg.heading_input or (preset.method == 'retrieval' and cfg.heading_aligned)
    worlds, reports = [], []
    for w, (map_path, data_path) in enumerate(pairs):
        store = stores[w] if stores else None
        rv, rc = renderers[w] if renderers else (None, None)
        world, report = load_world(map_path, data_path, cfg, preset.train, w, store=store,
                                   render_view=rv, render_crop=rc, need_heading=need_heading,
                                   progress=progress and _rank() == 0)
        if progress and _rank() == 0:
            print(report.summary(), file=sys.stderr)
            n_roots = len(world.roots(cfg.root_zoom))
            if n_roots > 1:
                print(f'note: {map_path} spans {n_roots} root cells at root_zoom '
                      f'{cfg.root_zoom}; paths are ranked across roots by their probability, '
                      'which the decoder calibrates poorly: a root_zoom (with more steps) whose '
                      'one cell covers the map localises better', file=sys.stderr)
        worlds.append(world)
        reports.append(report)
    return TrainData(worlds, reports, preset)


# --------------------------------------------------------------------------------------------
# Augmentation (torch, batched; every draw comes from an explicit generator)

def _u(gen, n, lo, hi):
    return lo + (hi - lo) * torch.rand(n, generator=gen)


def _warp(x, theta, out_hw, padding='reflection'):
    grid = F.affine_grid(theta, (x.shape[0], 3, out_hw[0], out_hw[1]), align_corners=False)
    return F.grid_sample(x, grid, mode='bilinear', padding_mode=padding, align_corners=False)


def _colour(x, gen, p, strength):
    """Random brightness/contrast/saturation on a [B, 3, H, W] tensor in 0..255."""
    n = x.shape[0]
    on = (torch.rand(n, generator=gen) < p).float()
    b = 1 + on * _u(gen, n, -strength, strength)
    c = 1 + on * _u(gen, n, -strength, strength)
    s = 1 + on * _u(gen, n, -strength * 1.2, strength * 1.2)
    x = x * b.view(-1, 1, 1, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * c.view(-1, 1, 1, 1) + mean
    gray = (0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
    x = (x - gray) * s.view(-1, 1, 1, 1) + gray
    return x.clamp(0, 255)


def _blur(x, gen, p):
    n = x.shape[0]
    on = torch.rand(n, generator=gen) < p
    if not on.any():
        return x
    k1 = torch.exp(-torch.arange(-2, 3, dtype=torch.float32) ** 2 / 2.0)
    k1 = k1 / k1.sum()
    kern = (k1[:, None] * k1[None]).expand(3, 1, 5, 5)
    blurred = F.conv2d(F.pad(x[on], (2, 2, 2, 2), mode='reflect'), kern, groups=3)
    x = x.clone()
    x[on] = blurred
    return x


def augment_ground(imgs, size, gen, tc, train=True):
    """Random resized crop, slight rotation, colour jitter, blur; returns normalised floats.

    ``imgs`` uint8 [B, H, W, 3]; ``size`` (w, h) of the output.
    """
    x = torch.from_numpy(np.ascontiguousarray(imgs)).permute(0, 3, 1, 2).float()
    n = x.shape[0]
    out_hw = (size[1], size[0])
    if train:
        a = torch.sqrt(_u(gen, n, tc.aug_crop_min, 1.0))
        tx = _u(gen, n, -1, 1) * (1 - a)
        ty = _u(gen, n, -1, 1) * (1 - a)
        rot = torch.deg2rad(_u(gen, n, -3.0, 3.0))
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0] = a * torch.cos(rot)
        theta[:, 0, 1] = -a * torch.sin(rot)
        theta[:, 1, 0] = a * torch.sin(rot)
        theta[:, 1, 1] = a * torch.cos(rot)
        theta[:, 0, 2], theta[:, 1, 2] = tx, ty
        x = _warp(x, theta, out_hw)
        x = _colour(x, gen, tc.aug_color, 0.4)
        x = _blur(x, gen, tc.aug_blur)
    elif tuple(x.shape[2:]) != out_hw:
        x = F.interpolate(x, size=out_hw, mode='bilinear', antialias=True, align_corners=False)
    return normalise(x)


def augment_map(imgs, gen, tc, extra_rot_deg=None, train=True):
    """Small rotation/shift/scale and colour jitter of square views; normalised floats.

    ``extra_rot_deg`` [U] rotates the content counter-clockwise (a heading residual).
    """
    x = torch.from_numpy(np.ascontiguousarray(imgs)).permute(0, 3, 1, 2).float()
    if not train:
        return normalise(x)
    n = x.shape[0]
    rot = _u(gen, n, -tc.aug_map_rot_deg, tc.aug_map_rot_deg)
    if extra_rot_deg is not None:
        rot = rot + extra_rot_deg
    rot = torch.deg2rad(rot)
    sc = _u(gen, n, 0.95, 1.05)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = sc * torch.cos(rot)
    theta[:, 0, 1] = -sc * torch.sin(rot)
    theta[:, 1, 0] = sc * torch.sin(rot)
    theta[:, 1, 1] = sc * torch.cos(rot)
    theta[:, 0, 2] = _u(gen, n, -2, 2) * tc.aug_map_shift
    theta[:, 1, 2] = _u(gen, n, -2, 2) * tc.aug_map_shift
    x = _warp(x, theta, x.shape[2:])
    x = _colour(x, gen, tc.aug_map_color, 0.2)
    return normalise(x)


# --------------------------------------------------------------------------------------------
# Batches

def _batch_seed(seed, epoch, batch, rank):
    return (seed * 1_000_003 + epoch * 10_007 + batch * 101 + rank) % (2 ** 62)


class BatchSource(torch.utils.data.Dataset):
    """Global batch number -> a ready batch; the order within an epoch is DistributedSampler's.

    ``start``/``end`` are global batch numbers (epoch * batches_per_epoch + batch).
    """

    def __init__(self, data, method, start, end, rank=0, world_size=1):
        self.data, self.method = data, method
        self.start, self.end = start, end
        self.rank, self.world_size = rank, world_size
        self.cfg, self.tc = data.preset.model, data.preset.train
        self.sampler = torch.utils.data.DistributedSampler(
            range(len(data.train)), num_replicas=world_size, rank=rank, shuffle=True,
            seed=self.tc.seed, drop_last=True)
        self.per_epoch = len(self.sampler) // self.tc.batch_size
        self._order_epoch, self._order = None, None

    def __len__(self):
        return self.end - self.start

    def order(self, epoch):
        if self._order_epoch != epoch:
            self.sampler.set_epoch(epoch)
            self._order = list(self.sampler)
            self._order_epoch = epoch
        return self._order

    def __getitem__(self, i):
        gb = self.start + i
        epoch, b = divmod(gb, self.per_epoch)
        bs = self.tc.batch_size
        idx = self.order(epoch)[b * bs:(b + 1) * bs]
        gen = torch.Generator().manual_seed(_batch_seed(self.tc.seed, epoch, b, self.rank))
        return build_batch(self.data, idx, gen, self.method, train=True)


def _worker_init(worker_id):
    info = torch.utils.data.get_worker_info()
    torch.set_num_threads(1)
    for world in info.dataset.data.worlds:
        world.reopen()


def build_batch(data, idx, gen, method, train=True):
    """Assemble one batch of training samples ``idx`` (indices into ``data.train``)."""
    cfg, tc = data.preset.model, data.preset.train
    keys = [data.train[j] for j in idx]
    samples = [data.sample(k) for k in keys]
    imgs = np.stack([data.ground_train(j) for j in idx])
    batch = {'ground': augment_ground(imgs, cfg.ground_size, gen, tc, train)}
    heading = torch.tensor([s.heading for s in samples], dtype=torch.float32)
    if train and tc.heading_noise_deg > 0:
        heading = heading + torch.randn(len(samples), generator=gen) * tc.heading_noise_deg
    batch['heading'] = torch.nan_to_num(heading % 360.0, nan=0.0)
    if method == 'zoom':
        t = cfg.steps
        match = cfg.action_head == 'match'
        # A match head may train on shifted grids (TrainConfig.grid_shift); whole cells of the
        # level above the terminal one, so the finest two levels stay on the map's grid.
        shift_zoom = cfg.root_zoom + (t - 1) * cfg.levels_per_step
        paths = []
        for s in samples:
            shift = NO_SHIFT
            if match and train and tc.grid_shift > 0 \
                    and float(torch.rand(1, generator=gen)) < tc.grid_shift:
                shift = tuple(int(v) for v in torch.randint(0, cfg.num_actions, (2,),
                                                            generator=gen))
            cells, actions = shifted_path(s, shift, shift_zoom, cfg.root_zoom, t, cfg.grid_k)
            paths.append((cells, actions, shift))
        uniq, views = {}, []

        def view_index(w, cell, shift):
            key = (w, square_id(cell, shift, shift_zoom))
            if key not in uniq:
                uniq[key] = len(views)
                views.append(data.worlds[w].shifted_view(cell, shift, shift_zoom,
                                                         cfg.view_size))
            return uniq[key]

        view_idx = np.array([[view_index(s.world, cells[i], shift) for i in range(t)]
                             for s, (cells, _, shift) in zip(samples, paths)], dtype=np.int64)
        if match:
            # A match head scores every child by its own view: render all k*k of each step.
            batch['child_idx'] = torch.tensor([
                [[view_index(s.world, c, shift) for c in geo.children(cells[i], cfg.grid_k)]
                 for i in range(t)] for s, (cells, _, shift) in zip(samples, paths)])
        batch['views'] = augment_map(np.stack(views), gen, tc, train=train)
        batch['view_idx'] = torch.from_numpy(view_idx)
        batch['actions'] = torch.tensor([a for _, a, _ in paths], dtype=torch.long)
        if match:
            masks = [shifted_mask(data.worlds[s.world], cells, actions, shift, shift_zoom,
                                  cfg.grid_k, MIN_COVERAGE)
                     for s, (cells, actions, shift) in zip(samples, paths)]
        else:
            masks = [softmax_mask(s, data.worlds[s.world], cfg.grid_k)
                     if tc.mask_heldout_cells else np.ones((t, cfg.num_actions), bool)
                     for s in samples]
        batch['mask'] = torch.from_numpy(np.stack(masks))
    else:
        uniq, crops, resid, crop_idx, cell_of = {}, [], [], [], []
        for b, s in enumerate(samples):
            term = s.cells[-1]
            lat, lon = geo.cell_center(term)
            h, hbin = 0.0, 0.0
            if cfg.heading_aligned:
                h = float(batch['heading'][b])
                hbin = (round(h / HEADING_BIN_DEG) * HEADING_BIN_DEG) % 360.0
            key = (s.world, term, hbin)
            if key not in uniq:
                uniq[key] = len(crops)
                crops.append(data.worlds[s.world].crop(lat, lon, cfg.context_m, cfg.view_size,
                                                       hbin, key=(term, hbin)))
                resid.append(((h - hbin + 180.0) % 360.0) - 180.0)
                cell_of.append((s.world, term))
            crop_idx.append(uniq[key])
        batch['views'] = augment_map(np.stack(crops), gen, tc,
                                     torch.tensor(resid, dtype=torch.float32), train=train)
        cells_b = [(s.world, s.cells[-1]) for s in samples]
        batch['pos'] = torch.tensor([[cb == cu for cu in cell_of] for cb in cells_b])
    return batch


# --------------------------------------------------------------------------------------------
# Loss

def smoothed_masked_ce(logits, target, mask, smoothing):
    """Cross-entropy with label smoothing over the allowed classes only.

    ``logits`` [..., K], ``target`` [...] long, ``mask`` [..., K] bool (True = in the softmax;
    the target must be allowed). Smoothing spreads ``smoothing`` over the allowed classes.
    """
    logp = torch.log_softmax(logits.float().masked_fill(~mask, float('-inf')), dim=-1)
    nll = -logp.gather(-1, target[..., None]).squeeze(-1)
    smooth = -logp.masked_fill(~mask, 0.0).sum(-1) / mask.sum(-1).clamp(min=1)
    return ((1 - smoothing) * nll + smoothing * smooth).mean()


class TrainStep(torch.nn.Module):
    """The whole forward pass and loss as one module, so DDP sees every parameter's use."""

    def __init__(self, model, method, tc):
        super().__init__()
        self.model, self.method, self.tc = model, method, tc

    def forward(self, batch):
        m, tc = self.model, self.tc
        if self.method == 'retrieval':
            q = m.embed_ground(batch['ground'])
            k = m.embed_map(batch['views'])
            loss = multi_positive_infonce(q, k, batch['pos'], m.scale())
            return loss, {'loss': loss.detach()}
        heading = batch['heading'] if m.config.heading_input else None
        g = m.encode_ground(batch['ground'], heading)
        s = m.encode_map(batch['views'])
        view_idx, actions = batch['view_idx'], batch['actions']
        children = s[batch['child_idx']] if 'child_idx' in batch else None
        logits = m.child_logits(m(g, s[view_idx], actions), children)
        ce = smoothed_masked_ce(logits, actions, batch['mask'], tc.label_smoothing)
        loss = ce
        stats = {'ce': ce.detach(),
                 'acc': (logits.argmax(-1) == actions).float().mean().detach()}
        if tc.aux_contrastive_weight > 0:
            levels = range(view_idx.shape[1]) if tc.aux_levels == 'all' else [-1]
            scale = m.aux_logit_scale.exp().clamp(max=100.0)
            terms = []
            for t in levels:
                # Queries that share a view (same cell) are all positives of it.
                uniq, inv = torch.unique(view_idx[:, t], return_inverse=True)
                if len(uniq) < 2:
                    continue  # one view (e.g. a single root): nothing to contrast
                pos = inv[:, None] == torch.arange(len(uniq), device=inv.device)[None]
                qa, ka = m.aux_embeddings(g, s[uniq])
                terms.append(multi_positive_infonce(qa, ka, pos, scale))
            aux = torch.stack(terms).mean() if terms else g.sum() * 0.0
            loss = loss + tc.aux_contrastive_weight * aux
            stats['aux'] = aux.detach()
        stats['loss'] = loss.detach()
        return loss, stats


# --------------------------------------------------------------------------------------------
# Validation

class _TokenCache:
    """Encoded (unaugmented) cell views of one world for one validation pass."""

    def __init__(self, world, encode, size, device, batch=64):
        self.world, self.encode, self.size, self.device = world, encode, size, device
        self.batch, self.tokens = batch, {}

    def __call__(self, cells):
        todo = [c for c in dict.fromkeys(cells) if c not in self.tokens]
        for i in range(0, len(todo), self.batch):
            chunk = todo[i:i + self.batch]
            imgs = np.stack([self.world.view(c, self.size) for c in chunk])
            x = normalise(torch.from_numpy(imgs).permute(0, 3, 1, 2)).to(self.device)
            for c, tok in zip(chunk, self.encode(x).float()):
                self.tokens[c] = tok
        return torch.stack([self.tokens[c] for c in cells])


def _step_logits(model, g, sat, actions, cells, tokens, covers):
    """Return logits [B, k*k] of the next step from ``cells``.

    A match head's children outside the map are masked, as the search masks children without
    imagery.
    """
    out = model.step_logits(g, sat, actions)
    if not model.uses_children:
        return out.float()
    k = model.config.grid_k
    kids = [c for cell in cells for c in geo.children(cell, k)]
    child_tok = tokens(kids).view(len(cells), k * k, -1)
    logits = model.child_logits(out, child_tok.to(out.dtype)).float()
    ok = torch.tensor([covers(c) >= MIN_COVERAGE for c in kids], device=logits.device)
    return logits.masked_fill(~ok.view(len(cells), k * k), -float('inf'))


def _children_tokens(model, paths, tokens):
    """Tokens [B, T, k*k, D] of the children of each step's cell (match head), else None."""
    if not model.uses_children:
        return None
    k, t = model.config.grid_k, model.config.steps
    kids = [c for cells in paths for cell in cells[:t] for c in geo.children(cell, k)]
    return tokens(kids).view(len(paths), t, k * k, -1)


def greedy_zoom(model, g, roots, tokens, covers=None):
    """Greedy decode from every root; keep each query's most probable path.

    ``g`` [B, D] ground tokens; ``tokens(cells) -> [n, D]``; ``covers(cell) -> 0..1`` the
    fraction of a cell inside the map (needed by a match head). Returns (terminal cells,
    log-probs [B], per-query chosen root).
    """
    cfg = model.config
    k, b = cfg.grid_k, g.shape[0]
    best_lp = torch.full((b,), -float('inf'))
    best_cells = [None] * b
    for root in roots:
        cells = [root] * b
        sat = tokens(cells)[:, None]
        actions = torch.zeros((b, 0), dtype=torch.long, device=g.device)
        lp = torch.zeros(b)
        for _ in range(cfg.steps):
            logp = torch.log_softmax(_step_logits(model, g, sat, actions, cells, tokens,
                                                  covers), -1).cpu()
            a = logp.argmax(-1)
            lp += logp.gather(1, a[:, None]).squeeze(1)
            cells = [geo.child(c, int(ai), k) for c, ai in zip(cells, a)]
            actions = torch.cat((actions, a[:, None].to(g.device)), dim=1)
            if actions.shape[1] < cfg.steps:
                sat = torch.cat((sat, tokens(cells)[:, None]), dim=1)
        better = lp > best_lp
        best_lp = torch.where(better, lp, best_lp)
        best_cells = [c if bt else o for c, o, bt in zip(cells, best_cells, better.tolist())]
    return best_cells, best_lp


def _recall(errors):
    e = np.asarray(errors, dtype=float)
    if e.size == 0:
        return {}
    return {'n': int(e.size), 'recall@25m': float(np.mean(e <= 25)),
            'recall@50m': float(np.mean(e <= 50)), 'recall@100m': float(np.mean(e <= 100)),
            'median_error_m': float(np.median(e))}


@torch.no_grad()
def validate(model, data, method, device, amp_dtype=None):
    """Return validation metrics (Recall@1 within 25/50/100 m, median error, step accuracy)."""
    cfg = model.config
    was_training = model.training
    model.eval()
    errors, step_hits, n_steps = [], np.zeros(cfg.steps), 0
    ctx = torch.autocast('cuda', dtype=amp_dtype) if amp_dtype else _nullctx()
    try:
        with ctx:
            for w, world in enumerate(data.worlds):
                rows = [j for j, key in enumerate(data.val) if key[0] == w]
                if not rows:
                    continue
                samples = [data.sample(data.val[j]) for j in rows]
                if method == 'zoom':
                    errs, hits = _validate_zoom(model, world, samples, data.val_bank[rows],
                                                device)
                    step_hits += hits
                    n_steps += len(samples)
                else:
                    errs = _validate_retrieval(model, world, samples, data.val_bank[rows],
                                               device)
                errors.extend(errs)
    finally:
        model.train(was_training)
    out = _recall(errors)
    if method == 'zoom' and n_steps:
        out['step_accuracy'] = (step_hits / n_steps).tolist()
    return out


class _nullctx:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _ground_tensor(imgs, device):
    return normalise(torch.from_numpy(np.ascontiguousarray(imgs)).permute(0, 3, 1, 2)).to(device)


def _validate_zoom(model, world, samples, imgs, device, chunk=64):
    cfg = model.config
    tokens = _TokenCache(world, model.encode_map, cfg.view_size, device)
    roots = world.roots(cfg.root_zoom)
    errors, hits = [], np.zeros(cfg.steps)
    for i in range(0, len(samples), chunk):
        ss = samples[i:i + chunk]
        heading = torch.tensor([s.heading for s in ss], dtype=torch.float32, device=device)
        g = model.encode_ground(_ground_tensor(imgs[i:i + chunk], device),
                                heading if cfg.heading_input else None)
        cells, _ = greedy_zoom(model, g, roots, tokens, world.coverage)
        for s, c in zip(ss, cells):
            lat, lon = geo.cell_center(c)
            errors.append(geo.geodesic_distance_m(lat, lon, s.lat, s.lon))
        # Step accuracy given the correct path so far (teacher forcing).
        sat = torch.stack([tokens(list(s.cells[:cfg.steps])) for s in ss])
        actions = torch.tensor([s.actions for s in ss], dtype=torch.long, device=device)
        children = _children_tokens(model, [s.cells for s in ss], tokens)
        pred = model.child_logits(model(g, sat, actions), children).argmax(-1)
        hits += (pred == actions).float().sum(0).cpu().numpy()
    return errors, hits


def _validate_retrieval(model, world, samples, imgs, device, chunk=64):
    cfg = model.config
    cands = sorted({s.cells[-1] for s in world.samples})
    centres = [geo.cell_center(c) for c in cands]
    bins = [0.0]
    if cfg.heading_aligned:
        bins = [i * 360.0 / VAL_HEADING_BINS for i in range(VAL_HEADING_BINS)]
    emb = {}
    for hb in bins:
        out = []
        for i in range(0, len(cands), chunk):
            crops = np.stack([world.crop(lat, lon, cfg.context_m, cfg.view_size, hb,
                                         key=(c, hb))
                              for c, (lat, lon) in zip(cands[i:i + chunk],
                                                       centres[i:i + chunk])])
            out.append(model.embed_map(_ground_tensor(crops, device)).float())
        emb[hb] = torch.cat(out)
    errors = []
    width = 360.0 / len(bins)
    for i in range(0, len(samples), chunk):
        ss = samples[i:i + chunk]
        q = model.embed_ground(_ground_tensor(imgs[i:i + chunk], device)).float()
        for s, qv in zip(ss, q):
            hb = bins[int(round((s.heading % 360.0) / width)) % len(bins)] \
                if cfg.heading_aligned else 0.0
            j = int((emb[hb] @ qv).argmax())
            lat, lon = centres[j]
            errors.append(geo.geodesic_distance_m(lat, lon, s.lat, s.lon))
    return errors


# --------------------------------------------------------------------------------------------
# Optimiser, schedule, checkpoints

def param_groups(model, tc):
    """Return AdamW groups: encoder vs the rest, weight decay only on matrices/kernels."""
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        enc = name.startswith('encoder.')
        decay = p.ndim >= 2 and not name.endswith(('type_embed.weight', 'action_embed.weight'))
        key = (enc, decay)
        groups.setdefault(key, []).append(p)
    out = []
    for (enc, decay), params in sorted(groups.items()):
        lr = tc.lr * (tc.encoder_lr_mult if enc else 1.0)
        out.append({'params': params, 'lr': lr, 'base_lr': lr,
                    'weight_decay': tc.weight_decay if decay else 0.0})
    return out


def lr_factor(step, total, warmup_frac, final_frac):
    """Linear warm-up over ``warmup_frac`` of the steps, then cosine to ``final_frac``."""
    warm = max(1, int(round(total * warmup_frac)))
    if step < warm:
        return (step + 1) / warm
    p = min(1.0, (step - warm) / max(1, total - warm))
    return final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * p))


def save_checkpoint(path, model, optimizer, scaler, state):
    """Write model, optimizer, RNG and loop state to one safetensors file, atomically."""
    tensors = {'model.' + k: v for k, v in model.state_dict().items()}
    osd = optimizer.state_dict()
    extra = {}
    for pid, st in osd['state'].items():
        for name, v in st.items():
            if torch.is_tensor(v):
                tensors[f'optim.{pid}.{name}'] = v
            else:
                extra.setdefault(str(pid), {})[name] = v
    tensors['rng.torch'] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors['rng.cuda'] = torch.cuda.get_rng_state()
    groups = [{k: v for k, v in g.items() if k != 'params'} | {'params': g['params']}
              for g in osd['param_groups']]
    meta = dict(state)
    meta['param_groups'] = groups
    meta['optim_extra'] = extra
    meta['scaler'] = scaler.state_dict() if scaler is not None else None
    atomic_write_bytes(path, tensors_to_bytes(tensors, metadata={'state': json.dumps(meta)}))


def read_checkpoint(path):
    """Return (tensors, state) of a checkpoint file."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), 'pt') as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
        state = json.loads(meta['state'])
    except Exception as exc:  # noqa: B902 - any failure means the file is not ours/complete
        raise InputError(f'{path}: not a readable training checkpoint ({exc.__class__.__name__})'
                         '; start a new run without --resume') from None
    return tensors, state


def restore_checkpoint(tensors, state, model, optimizer, scaler):
    """Load model/optimizer/scaler/RNG state saved by :func:`save_checkpoint`."""
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith('model.')})
    opt_state = {}
    for k, v in tensors.items():
        if k.startswith('optim.'):
            _, pid, name = k.split('.', 2)
            opt_state.setdefault(int(pid), {})[name] = v
    for pid, st in state.get('optim_extra', {}).items():
        opt_state.setdefault(int(pid), {}).update(st)
    optimizer.load_state_dict({'state': opt_state, 'param_groups': state['param_groups']})
    if scaler is not None and state.get('scaler'):
        scaler.load_state_dict(state['scaler'])
    torch.set_rng_state(tensors['rng.torch'])
    if 'rng.cuda' in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors['rng.cuda'])


# --------------------------------------------------------------------------------------------
# Distributed helpers

def _rank():
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _world_size():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _setup_distributed(device_arg):
    """Initialise torch.distributed when launched by torchrun; return the device."""
    ws = int(os.environ.get('WORLD_SIZE', '1'))
    cuda = torch.cuda.is_available() and device_arg in (None, 'auto', 'cuda')
    if ws > 1 and not dist.is_initialized():
        dist.init_process_group(backend='nccl' if cuda else 'gloo')
    if cuda:
        local = int(os.environ.get('LOCAL_RANK', '0'))
        torch.cuda.set_device(local)
        return torch.device('cuda', local)
    if device_arg not in (None, 'auto', 'cpu'):
        raise ConfigError(f'--device {device_arg}: not available here; use cpu or auto')
    return torch.device('cpu')


def _amp_dtype(tc, device):
    if device.type != 'cuda' or tc.amp == 'off':
        return None
    if tc.amp == 'fp16':
        return torch.float16
    if tc.amp == 'bf16' or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


# --------------------------------------------------------------------------------------------
# The run

def _to(batch, device):
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def train(pairs, out_dir, preset=None, resume=False, epochs=None, max_minutes=None,
          max_steps=None, device=None, progress=True, stores=None, renderers=None):
    """Train a zoom policy or retrieval model; return the model folder.

    ``pairs``: list of (map path, data path). ``preset``: :class:`TrainPreset` (default: the
    built-in defaults). ``max_minutes`` / ``max_steps`` stop this invocation early with a
    resumable checkpoint. ``stores``/``renderers`` inject tile stores and view renderers per
    world (tests, in-memory maps).
    """
    from geozoom_ros.model.policy import ZoomPolicy
    from geozoom_ros.model.retrieval import RetrievalModel

    out_dir = Path(out_dir)
    ckpt_path = out_dir / CHECKPOINT_FILE
    device = _setup_distributed(device)
    rank, ws = _rank(), _world_size()
    ckpt = None
    if resume:
        if not ckpt_path.is_file():
            raise InputError(f'{ckpt_path}: no checkpoint to resume from; run without --resume')
        ckpt = read_checkpoint(ckpt_path)
        preset = _preset_from_state(ckpt[1])
    elif ckpt_path.exists():
        raise InputError(f'{out_dir} already holds a training run ({CHECKPOINT_FILE}); pass '
                         '--resume to continue it or choose another -o folder')
    preset = preset or TrainPreset()
    if epochs is not None:
        preset.train.epochs = int(epochs)
    if max_minutes is not None:
        preset.train.max_minutes = float(max_minutes)
    preset.train.validate()
    cfg, tc, method = preset.model, preset.train, preset.method
    if tc.grid_shift > 0 and (method != 'zoom' or cfg.action_head != 'match'):
        raise ConfigError(f'train.grid_shift={tc.grid_shift} needs a zoom policy with '
                          'model.action_head: match; set grid_shift to 0 or use a match head')
    if tc.threads > 0:
        torch.set_num_threads(tc.threads)
    torch.manual_seed(tc.seed)

    data = load_data(pairs, preset, progress=progress, stores=stores, renderers=renderers)
    model = (ZoomPolicy if method == 'zoom' else RetrievalModel)(cfg, pretrained=ckpt is None)
    freeze_early_layers(model.encoder, tc.encoder_frozen_blocks)
    model.to(device)
    step_module = TrainStep(model, method, tc)
    optimizer = torch.optim.AdamW(param_groups(model, tc), betas=(0.9, 0.999))
    amp_dtype = _amp_dtype(tc, device)
    scaler = torch.amp.GradScaler('cuda') if amp_dtype == torch.float16 else None

    state = {'global_step': 0, 'best_metric': None, 'best_epoch': None, 'history': [],
             'preset': {'method': method, 'model': cfg.to_dict(), 'train': tc.to_dict()},
             'data': [[str(m), str(d)] for m, d in pairs], 'world_size': ws}
    if ckpt is not None:
        restore_checkpoint(ckpt[0], ckpt[1], model, optimizer, scaler)
        for key in ('global_step', 'best_metric', 'best_epoch', 'history'):
            state[key] = ckpt[1][key]
        if ckpt[1].get('world_size', 1) != ws:
            raise InputError(f'{ckpt_path} was written by a {ckpt[1]["world_size"]}-process run'
                             f'; resume it with the same number of processes, not {ws}')
        state['preset']['train']['epochs'] = tc.epochs
    ddp = step_module
    if ws > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(
            step_module, device_ids=[device.index] if device.type == 'cuda' else None,
            find_unused_parameters=(method == 'zoom' and tc.aux_contrastive_weight == 0))

    source = BatchSource(data, method, 0, 0, rank, ws)
    per_epoch = source.per_epoch
    if per_epoch < 1:
        raise InputError(f'{len(data.train)} training rows over {ws} processes give no full '
                         f'batch of {tc.batch_size}; lower train.batch_size')
    total = tc.epochs * per_epoch
    source.start, source.end = state['global_step'], total
    loader = torch.utils.data.DataLoader(source, batch_size=None, shuffle=False,
                                         num_workers=tc.num_workers,
                                         persistent_workers=tc.num_workers > 0,
                                         # Its own generator: creating the iterator must not
                                         # draw from the global RNG (dropout) on resume.
                                         generator=torch.Generator().manual_seed(tc.seed),
                                         worker_init_fn=_worker_init)
    out_dir.mkdir(parents=True, exist_ok=True)
    if rank == 0 and progress:
        print(f'training {method} on {len(data.train)} rows ({len(data.val)} validating), '
              f'{per_epoch} batches of {tc.batch_size} per epoch x {tc.epochs} epochs, '
              f'{ws} process(es) on {device}', file=sys.stderr)

    t0 = time.monotonic()
    step = state['global_step']
    stopped = False
    bar = None
    if rank == 0 and progress:
        from tqdm import tqdm
        bar = tqdm(total=total, initial=step, unit='batch', dynamic_ncols=True)
    model.train()
    running = {}
    for batch in (loader if step < total else []):
        epoch, b = divmod(step, per_epoch)
        fac = lr_factor(step, total, tc.warmup_frac, tc.final_lr_frac)
        for g in optimizer.param_groups:
            g['lr'] = g['base_lr'] * fac
        batch = _to(batch, device)
        ctx = torch.autocast('cuda', dtype=amp_dtype) if amp_dtype else _nullctx()
        with ctx:
            loss, stats = ddp(batch)
        if not torch.isfinite(loss):
            raise GeoZoomError(f'training diverged at step {step} (loss {float(loss)}); lower '
                               'train.lr or check the data')
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            optimizer.step()
        step += 1
        state['global_step'] = step
        for k, v in stats.items():
            running[k] = running.get(k, 0.0) * 0.9 + float(v) * 0.1 if k in running \
                else float(v)
        if bar is not None:
            bar.update(1)
            bar.set_postfix({k: f'{v:.3f}' for k, v in running.items()} | {'ep': epoch})
        epoch_end = step % per_epoch == 0
        if epoch_end:
            _end_epoch(step // per_epoch, model, data, method, device, amp_dtype, state,
                       optimizer, scaler, ckpt_path, out_dir, running, progress)
        limit = (tc.max_minutes > 0 and time.monotonic() - t0 > tc.max_minutes * 60) or \
            (max_steps is not None and step - (ckpt[1]['global_step'] if ckpt else 0)
             >= max_steps)
        if ws > 1 and tc.max_minutes > 0:
            flag = torch.tensor([1.0 if limit else 0.0], device=device)
            dist.all_reduce(flag)
            limit = bool(flag.item() > 0)
        if limit and step < total:
            if not epoch_end and rank == 0:
                save_checkpoint(ckpt_path, model, optimizer, scaler, state)
            stopped = True
            break
    if bar is not None:
        bar.close()
    if rank == 0:
        if not stopped and state['best_metric'] is None:
            _save_final(model, out_dir, state, data)
        if stopped and progress:
            print(f'stopped at step {step}/{total}; continue with --resume', file=sys.stderr)
    if ws > 1:
        dist.barrier()
    return out_dir


def _end_epoch(epoch, model, data, method, device, amp_dtype, state, optimizer, scaler,
               ckpt_path, out_dir, running, progress):
    """Validate (rank 0), keep the best model, write the checkpoint and the log."""
    tc = data.preset.train
    rank = _rank()
    record = {'epoch': epoch, 'step': state['global_step']} | \
        {f'train_{k}': round(v, 5) for k, v in running.items()}
    if rank == 0:
        if tc.val_every and data.val and epoch % tc.val_every == 0:
            metrics = validate(model, data, method, device, amp_dtype)
            record |= {f'val_{k}': v for k, v in metrics.items()}
            r50 = metrics.get('recall@50m', 0.0)
            if state['best_metric'] is None or r50 > state['best_metric']:
                state['best_metric'], state['best_epoch'] = r50, epoch
                _save_final(model, out_dir, state, data, metrics)
            if progress:
                print(f'epoch {epoch}: ' + ', '.join(
                    f'{k}={v:.3f}' if isinstance(v, float) else f'{k}={v}'
                    for k, v in record.items() if k != 'val_step_accuracy'), file=sys.stderr)
        state['history'].append(record)
        save_checkpoint(ckpt_path, model, optimizer, scaler, state)
        atomic_write_json(out_dir / LOG_FILE, state['history'])
    if _world_size() > 1:
        dist.barrier()


def _save_final(model, out_dir, state, data, metrics=None):
    meta = {'method': state['preset']['method'], 'train': state['preset']['train'],
            'data': state['data'], 'step': state['global_step'],
            'train_rows': len(data.train), 'val_rows': len(data.val)}
    if metrics:
        meta['val'] = metrics
        meta['best_epoch'] = state['best_epoch']
    save_model(model, out_dir, extra_meta=meta)


def _preset_from_state(state):
    from geozoom_ros.model.config import PolicyConfig, TrainConfig

    p = state['preset']
    return TrainPreset(method=p['method'], model=PolicyConfig.from_dict(p['model']),
                       train=TrainConfig.from_dict(p['train']))


# --------------------------------------------------------------------------------------------
# Entry points

def map_data_pairs(args):
    """Return the (map, data) pairs of parsed ``--map``/``--data`` arguments, checked."""
    maps, datas = args.map or [], args.data or []
    if not maps or len(maps) != len(datas):
        raise InputError(f'--map and --data must come in pairs (got {len(maps)} --map and '
                         f'{len(datas)} --data)')
    for m in maps:
        if not Path(m).exists():
            raise InputError(f'--map {m}: no such file or folder; pass an MBTiles file or XYZ '
                             'tile folder')
    return list(zip(maps, datas))


def run_from_args(args):
    """Run ``geozoom train`` from parsed arguments; return an exit status."""
    pairs = map_data_pairs(args)
    preset = load_preset(args.config) if args.config else TrainPreset()
    if args.method:
        preset.method = args.method
    if args.batch_size:
        preset.train.batch_size = args.batch_size
        preset.train.validate('--batch-size')
    if args.threads:
        preset.train.threads = args.threads
    out = train(pairs, args.output, preset, resume=args.resume,
                epochs=args.epochs, max_minutes=args.max_minutes, max_steps=args.max_steps,
                device=args.device, progress=not args.quiet)
    if _rank() == 0 and not args.quiet:
        print(out)
    return 0


def main(argv=None):
    """Entry point for ``python -m geozoom_ros.train.loop`` (and torchrun)."""
    import argparse

    from geozoom_ros.model.cli import add_train_arguments

    parser = argparse.ArgumentParser(prog='geozoom train',
                                     description='Train a zoom policy or retrieval baseline.')
    add_train_arguments(parser)
    args = parser.parse_args(argv)
    try:
        status = run_from_args(args)
    except GeoZoomError as exc:
        print(f'geozoom train: error: {exc}', file=sys.stderr)
        status = 2
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return status


if __name__ == '__main__':
    sys.exit(main())
