"""Export a zoom policy to ONNX: the ground encoder and the decoder, with static shapes.

Files written into the export folder (default ``<model>/onnx/``)::

    encoder.onnx     x float32 [1, 3, H, W] (ImageNet-normalised, H x W = ground_size)
                     (+ heading float32 [1], degrees clockwise from north, NaN = unknown,
                     when the model has ``heading_input``) -> g float32 [1, D]
    kv_<t>.onnx      (decoder='kv', the default) decoder step t = 0 .. steps - 1 with a
                     key/value cache at a fixed beam batch B: t = 0 takes g [B, D] and
                     sat [B, D] (the root view); t > 0 takes sat [B, D] (the view s_t),
                     action int64 [B] (a_{t-1}) and past_k, past_v float32
                     [layers, B, heads, P, D / heads], the P tokens before step t (2t for
                     the interleaved layout, t + 1 for the fused one); each returns logits
                     [B, step_dim] and the keys/values of all tokens so far.
                     ``kv_<t>_b1.onnx``: the same at batch 1 (greedy search, a single
                     root), when B > 1.
    search_<t>_w<W>.onnx  (decoder='kv', linear action heads) a whole zoom search of width
                     W (B and 1) from one start cell at level t, in one graph; inputs and
                     outputs in :mod:`geozoom_ros.runtime.graphs`. The map's arrays
                     (tokens, usable) are its only inputs without a static shape.
                     ``search_0_w<W>_roots.onnx``: the same from up to ROOT_ROWS (4)
                     roots, padded.
    step_<t>.onnx    (decoder='per-step') one stateless step per t: g [B, D],
                     sat [B, t + 1, D] (+ actions int64 [B, t] for t > 0) -> logits [B, k * k]
    decoder_full.onnx  (decoder='full') the fixed-length decoder: g [B, D],
                     sat [B, steps, D], actions int64 [B, steps - 1] -> logits [B, steps, k*k];
                     step t reads row t. The decoder is causal, so the padding after step t
                     cannot change row t and no mask is needed.
    manifest.json    model hash, opset, shapes and files (written last, atomically)

Every graph except the search graphs' map inputs has static shapes (what TensorRT compiles
best) and is checked with ``onnx.checker``. Smaller batches are padded to B; larger
ones run in chunks of B.

Which decoder: measured with onnxruntime on the 2-core CPU, one thread, the CPU recipe's
decoder (embed 256, 4 layers, 8 heads, 4 steps of a 4 x 4 grid), B = 8, while a training job
loaded the machine, the four decoder calls of one beam search took (median of 50) 8.5 ms with
the key/value cache, 13.4 ms with stateless per-step graphs and 16.4 ms with the fixed-length
full-sequence graph (which pays for all 8 tokens at every step). The cache is the default; the
stateless per-step graphs are what the TensorRT backend compiles.
"""

import json
import os
from pathlib import Path
import warnings

from geozoom_ros.errors import InputError
from geozoom_ros.fileio import atomic_write, atomic_write_json

MANIFEST = 'manifest.json'
FORMAT = 'geozoom-onnx'
FORMAT_VERSION = 7  # 2: lean rotary embedding in the key/value steps; 3: search graphs;
# 4: fewer operators per decoder block (stacked rotation, additive causal mask); 5: search
# graphs of widths above k*k keep every path they should; 6: single-token decoder blocks in the
# search graphs (rotation folded into the projection); 7: search graphs take each level's
# strides and offsets (geom of 8 columns) and skip the origin with one start path
OPSET = 17
DECODERS = ('kv', 'per-step', 'full')
#: Root rows of the padded roots search graphs: the default shortlist (``max_roots``) of the
#: localizer and the node. Searches over more roots run step by step.
ROOT_ROWS = 4


def model_dir(model_path):
    """Return the folder of a model (a model folder or a file inside one)."""
    path = Path(model_path)
    if not path.exists():
        raise InputError(f'model {path} does not exist; train one with geozoom train or pass '
                         'the folder of a model')
    return path if path.is_dir() else path.parent


def default_dir(model_path):
    """Return the default export folder ``<model>/onnx``."""
    return model_dir(model_path) / 'onnx'


def read_manifest(out_dir):
    """Return the parsed manifest.json of an export folder, or None if there is none."""
    f = Path(out_dir) / MANIFEST
    if not f.is_file():
        return None
    try:
        manifest = json.loads(f.read_text())
    except (OSError, ValueError):
        return None
    return manifest if manifest.get('format') == FORMAT else None


def is_current(out_dir, model_hash, beam=None, decoder=None):
    """Return whether ``out_dir`` holds a complete export of the model with this hash."""
    manifest = read_manifest(out_dir)
    if manifest is None or manifest.get('model_hash') != model_hash:
        return False
    if int(manifest.get('format_version', 0)) != FORMAT_VERSION:
        return False  # exported by another version of this package: export again
    if beam is not None and int(manifest['beam']) != int(beam):
        return False
    if decoder is not None and manifest['decoder'] != decoder:
        return False
    return all((Path(out_dir) / f).is_file() for f in manifest['files'].values())


def _check(path):
    import onnx

    onnx.checker.check_model(os.fspath(path))


def _export(module, args, names, outputs, path, dynamic=None):
    import onnx
    import torch

    with torch.no_grad():
        result = module(*args)
    shapes = [list(r.shape) for r in (result if isinstance(result, tuple) else (result,))]

    def write(tmp):
        with warnings.catch_warnings():
            # The graphs are traced at fixed shapes on purpose: the tracer's warnings that a
            # shape became a constant, and skipped folding of strided slices, do not apply.
            warnings.simplefilter('ignore', torch.jit.TracerWarning)
            warnings.filterwarnings('ignore', message='Constant folding')
            # The TorchScript exporter is chosen on purpose (static traces, opset 17).
            warnings.simplefilter('ignore', DeprecationWarning)
            torch.onnx.export(module, args, tmp, dynamo=False, opset_version=OPSET,
                              input_names=names, output_names=outputs, do_constant_folding=True,
                              dynamic_axes=dynamic)
        # Reshapes through -1 leave the tracer's output shape symbolic; the shape is static.
        graph = onnx.load(tmp)
        for output, shape in zip(graph.graph.output, shapes):
            for dim, value in zip(output.type.tensor_type.shape.dim, shape):
                dim.Clear()
                dim.dim_value = int(value)
        onnx.save(graph, tmp)
        _check(tmp)
    atomic_write(path, write)


def _search_jobs(model, beam):
    """Return export jobs of the whole-search graphs: every start level, widths beam and 1."""
    import torch

    from geozoom_ros.runtime.graphs import SearchGraph

    cfg = model.config
    d, k, steps = cfg.embed_dim, cfg.grid_k, cfg.steps
    jobs = []
    for width in sorted({int(beam), 1}):
        # One start path at every level (a root, or a prior's start cell), and up to
        # ROOT_ROWS roots at level 0 (padded): static shapes keep the graph free of shape
        # arithmetic.
        for t, roots in [(t, False) for t in range(steps)] + [(0, True)]:
            # An example map: the start cell's descendants, every view with imagery.
            rows, offset = [], 0
            for lv in range(t, steps):
                side = k ** (lv + 1 - t)
                rows.append([1, side, offset, 0, 0, 0, side - 1, side - 1])
                offset += side * side if lv + 1 < steps else 0
            r = ROOT_ROWS if roots else 1
            args = [torch.zeros(1, d), torch.zeros(r, t + 1, d)]
            names = ['g', 'sat']
            if t > 0:
                args.append(torch.zeros(r, t, dtype=torch.long))
                names.append('actions')
            args.append(torch.zeros(r, 2, dtype=torch.long))
            names.append('start')
            if roots:
                args.append(torch.zeros(r))
                names.append('logp0')
            args += [torch.zeros(max(offset, 1), d).half(),
                     torch.ones(max(offset, 1), dtype=torch.bool), torch.tensor(rows)]
            names += ['tokens', 'usable', 'geom']
            name = f'search_{t}_w{width}' + ('_roots' if roots else '')
            jobs.append((name, SearchGraph(model, t, width, roots), tuple(args), names,
                         ['logp', 'x', 'y', 'paths', 'origin'],
                         {'tokens': {0: 'rows'}, 'usable': {0: 'cells'}}))
    return jobs


def export_onnx(model_path, out_dir=None, beam=8, decoder='kv', progress=False):
    """Export the policy at ``model_path`` to ONNX in ``out_dir``; return the manifest dict.

    Args:
        model_path: a model folder written by ``geozoom train``.
        out_dir: export folder (default ``<model>/onnx``); files are replaced atomically and
            manifest.json is written last.
        beam: the fixed decoder batch B (the beam width the graphs are built for).
        decoder: 'per-step' (one graph per zoom step) or 'full' (one fixed-length graph).
    """
    import torch

    from geozoom_ros.model.io import load_model, model_hash
    from geozoom_ros.runtime.graphs import KVStep

    if decoder not in DECODERS:
        raise InputError(f'decoder {decoder!r} is unknown; use one of {", ".join(DECODERS)}')
    beam = int(beam)
    if beam < 1:
        raise InputError(f'beam batch {beam} must be >= 1')
    mdir = model_dir(model_path)
    digest = model_hash(mdir)
    model = load_model(mdir).eval()
    if not hasattr(model, 'step_logits'):
        raise InputError(f'model {mdir} is a {type(model).__name__}, not a zoom policy; pass a '
                         'ZoomPolicy model folder')
    cfg = model.config
    out_dir = Path(out_dir) if out_dir is not None else mdir / 'onnx'
    out_dir.mkdir(parents=True, exist_ok=True)
    d, kk, steps = cfg.embed_dim, cfg.step_dim, cfg.steps
    w, h = cfg.ground_size
    heading = bool(cfg.heading_input)

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, x, heading_deg=None):
            if heading:
                return self.m.encode_ground(x, heading_deg)
            return self.m.encode_ground(x)

    class Step(Encoder):
        def __init__(self, t):
            super().__init__()
            self.t = t

        def forward(self, g, sat, actions=None):
            if actions is None:
                actions = torch.zeros((g.shape[0], 0), dtype=torch.long)
            return self.m.step_logits(g, sat, actions)

    class Full(Encoder):
        def forward(self, g, sat, actions):
            return self.m.decoder(g, sat, actions)

    jobs = []
    x = torch.zeros(1, 3, h, w)
    if heading:
        jobs.append(('encoder', Encoder(), (x, torch.zeros(1)), ['x', 'heading'], ['g']))
    else:
        jobs.append(('encoder', Encoder(), (x,), ['x'], ['g']))
    g = torch.zeros(beam, d)
    if decoder == 'per-step':
        for t in range(steps):
            sat = torch.zeros(beam, t + 1, d)
            if t == 0:
                jobs.append((f'step_{t}', Step(t), (g, sat), ['g', 'sat'], ['logits']))
            else:
                acts = torch.zeros(beam, t, dtype=torch.long)
                jobs.append((f'step_{t}', Step(t), (g, sat, acts), ['g', 'sat', 'actions'],
                             ['logits']))
    elif decoder == 'kv':
        layers, heads = cfg.decoder_layers, cfg.decoder_heads
        # Batch-1 graphs too: greedy search and a single root at step 0 run one row, and
        # padding it to B would cost B times the work.
        for bsz in sorted({beam, 1}):
            suffix = '' if bsz == beam else '_b1'
            for t in range(steps):
                sat_t = torch.zeros(bsz, d)
                if t == 0:
                    args, names = (torch.zeros(bsz, d), sat_t), ['g', 'sat']
                else:
                    past = torch.zeros(layers, bsz, heads, model.decoder.tokens_through(t - 1),
                                       d // heads)
                    args = (sat_t, torch.zeros(bsz, dtype=torch.long), past, past.clone())
                    names = ['sat', 'action', 'past_k', 'past_v']
                jobs.append((f'kv_{t}{suffix}', KVStep(model, t), args, names,
                             ['logits', 'keys', 'values']))
        if cfg.action_head == 'linear':
            jobs += _search_jobs(model, beam)
    else:
        acts = torch.zeros(beam, steps - 1, dtype=torch.long)
        jobs.append(('decoder_full', Full(), (g, torch.zeros(beam, steps, d), acts),
                     ['g', 'sat', 'actions'], ['logits']))

    files = {}
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(jobs), desc='export onnx', unit='graph')
    with torch.no_grad():
        for name, module, args, inputs, outputs, *dynamic in jobs:
            files[name] = f'{name}.onnx'
            _export(module.eval(), args, inputs, outputs, out_dir / files[name], *dynamic)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    manifest = {
        'format': FORMAT,
        'format_version': FORMAT_VERSION,
        'model_hash': digest,
        'opset': OPSET,
        'decoder': decoder,
        'beam': beam,
        'steps': steps,
        'grid_k': cfg.grid_k,
        'embed_dim': d,
        'ground_size': [w, h],
        'heading_input': heading,
        'config': cfg.to_dict(),
        'shapes': {
            'encoder': {'x': [1, 3, h, w], **({'heading': [1]} if heading else {}),
                        'g': [1, d]},
            'step': {'g': [beam, d], 'sat': [beam, 't+1', d], 'actions': [beam, 't'],
                     'logits': [beam, kk]},
            'full': {'g': [beam, d], 'sat': [beam, steps, d], 'actions': [beam, steps - 1],
                     'logits': [beam, steps, kk]},
        },
        'files': files,
    }
    atomic_write_json(out_dir / MANIFEST, manifest)
    return manifest
