"""The onnxruntime backend: the exported policy graphs on CPU (CUDA where present).

The graphs come from :mod:`geozoom_ros.runtime.export`; a missing or stale export (other model
hash, beam batch or decoder form) is re-exported into ``<model>/onnx`` on first use, which is
the only time torch is imported. Preprocessing is numpy + OpenCV and gives the same float32
values as the torch path (``model.encoders.preprocess_images``).
"""

import json
import os
from pathlib import Path

import numpy as np

from geozoom_ros.errors import InputError
from geozoom_ros.runtime import BackendUnavailable
from geozoom_ros.runtime.base import check_images, PolicyBackend
from geozoom_ros.runtime.export import export_onnx, is_current, model_dir, read_manifest

# ImageNet statistics in [0, 255] units, computed in float32 as the torch path does.
_MEAN = np.array((0.485, 0.456, 0.406), np.float32).reshape(1, 3, 1, 1) * np.float32(255.0)
_STD = np.array((0.229, 0.224, 0.225), np.float32).reshape(1, 3, 1, 1) * np.float32(255.0)


def preprocess(images, size):
    """Resize uint8 RGB images to ``size`` = (width, height) pixels and normalise.

    Returns float32 ``[B, 3, height, width]``, ImageNet-normalised; equal to the torch
    preprocessing of the policy.
    """
    import cv2

    w, h = int(size[0]), int(size[1])
    out = np.empty((len(images), h, w, 3), dtype=np.uint8)
    for i, img in enumerate(images):
        if img.shape[:2] != (h, w):
            interp = cv2.INTER_AREA if img.shape[0] > h else cv2.INTER_LINEAR
            img = cv2.resize(img, (w, h), interpolation=interp)
        out[i] = img
    x = out.transpose(0, 3, 1, 2).astype(np.float32)
    return (x - _MEAN) / _STD


def _import_ort():
    """Return the onnxruntime module, or raise BackendUnavailable in one line."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise BackendUnavailable("backend 'onnxruntime' cannot load: the onnxruntime "
                                 'package is not installed') from None
    return ort


def _user_cache_dir(model_hash):
    """Return the export folder of a model whose own folder is read-only (an installed one)."""
    cache = Path(os.environ.get('XDG_CACHE_HOME') or Path.home() / '.cache')
    return cache / 'geozoom_ros' / 'onnx' / model_hash[:16]


def _session_options(ort, threads):
    """Return the SessionOptions of every session: ``threads`` intra-op threads, no spinning.

    Idle threads that spin between runs take the cores from the next frame's other work (a
    retrieval encoder on torch ran 145 ms instead of 8 ms beside them).
    """
    opts = ort.SessionOptions()
    if threads is not None:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    opts.add_session_config_entry('session.intra_op.allow_spinning', '0')
    return opts


def _providers(ort, providers):
    available = ort.get_available_providers()
    if providers is None:
        return [p for p in ('CUDAExecutionProvider', 'CPUExecutionProvider') if p in available]
    providers = [providers] if isinstance(providers, str) else list(providers)
    missing = [p for p in providers if p not in available]
    if missing:
        raise BackendUnavailable(f'onnxruntime provider(s) {", ".join(missing)} not available '
                                 f'here; available: {", ".join(available)}')
    return providers


class OnnxBackend(PolicyBackend):
    """A zoom policy run by onnxruntime from its exported graphs.

    Args:
        model_path: a model folder written by ``geozoom train``.
        providers: onnxruntime execution providers (default: CUDA if present, then CPU).
        threads: intra-op threads per session (None: onnxruntime's default).
        onnx_dir: export folder (default ``<model>/onnx``, or
            ``~/.cache/geozoom_ros/onnx/<hash>`` when the model folder is read-only).
        beam: the decoder batch B the graphs are built for (default 8, the default beam).
        decoder: 'kv' (default: per-step graphs with a key/value cache), 'per-step' (each step
            recomputes the prefix) or 'full'; see :mod:`geozoom_ros.runtime.export`.
    """

    name = 'onnxruntime'

    def __init__(self, model_path, providers=None, threads=None, onnx_dir=None, beam=8,
                 decoder='kv'):
        ort = _import_ort()
        from geozoom_ros.model.config import PolicyConfig
        from geozoom_ros.model.io import map_hash, model_hash, read_model_config

        mdir = model_dir(model_path)
        cfg = read_model_config(mdir, kind='zoom_policy')
        self.model_path = os.fspath(model_path)
        self.model_hash = model_hash(mdir)
        self.map_hash = map_hash(mdir)
        self.config = PolicyConfig.from_dict(cfg['config'], f'{mdir}: config')
        if onnx_dir is None:
            onnx_dir = mdir / 'onnx'
            if not is_current(onnx_dir, self.model_hash, beam, decoder) \
                    and not os.access(mdir, os.W_OK):
                # A read-only model (an installed package) exports into the user's cache.
                onnx_dir = _user_cache_dir(self.model_hash)
        self.onnx_dir = Path(onnx_dir)
        if not is_current(self.onnx_dir, self.model_hash, beam, decoder):
            export_onnx(mdir, self.onnx_dir, beam=beam, decoder=decoder)
        self.manifest = read_manifest(self.onnx_dir)
        opts = _session_options(ort, threads)
        self.providers = _providers(ort, providers)

        def session(name):
            path = self.onnx_dir / self.manifest['files'][name]
            return ort.InferenceSession(os.fspath(path), sess_options=opts,
                                        providers=self.providers)
        self._session = session
        self._search = {}

        self.beam = int(self.manifest['beam'])
        self.decoder = self.manifest['decoder']
        self._encoder = session('encoder')
        if self.decoder == 'kv':
            self._kv = [session(f'kv_{t}') for t in range(self.steps)]
            files = self.manifest['files']
            self._kv1 = [session(f'kv_{t}_b1') if f'kv_{t}_b1' in files else None
                         for t in range(self.steps)]
            self._kv_last = None
        elif self.decoder == 'per-step':
            self._steps = [session(f'step_{t}') for t in range(self.steps)]
        else:
            self._full = session('decoder_full')
        d = self.embed_dim
        self._g = np.zeros((self.beam, d), np.float32)
        self._sat = np.zeros((self.beam, self.steps, d), np.float32)
        self._act = np.zeros((self.beam, max(self.steps - 1, 0)), np.int64)
        self._heading = np.zeros(1, np.float32)

    def encode_ground(self, images, headings=None):
        """Encode camera frames (uint8 RGB) into float32 ``[B, D]`` (see PolicyBackend).

        A heading model gets NaN (its heading-free mode) for unknown headings (None).
        """
        images = check_images(images)
        use_heading = bool(self.config.heading_input)
        if headings is not None and len(headings) != len(images):
            raise InputError(f'{len(headings)} headings for {len(images)} images')
        x = preprocess(images, self.config.ground_size)
        out = np.empty((len(images), self.embed_dim), np.float32)
        for i in range(len(images)):
            feeds = {'x': x[i:i + 1]}
            if use_heading:
                h = None if headings is None else headings[i]
                self._heading[0] = np.nan if h is None else float(h)
                feeds['heading'] = self._heading
            out[i] = self._encoder.run(None, feeds)[0][0]
        return out

    def step_logits(self, g, sat, actions):
        """Return float32 ``[B, step_dim]`` step outputs (see PolicyBackend).

        Batches smaller than the exported beam batch are zero-padded, larger ones run in
        chunks. With the key/value cache, a call whose rows extend the previous call's
        prefixes (same ground token, views and actions) reuses their cache; other rows are
        recomputed from step 0, so any call order gives the same outputs. A search keeps the
        cache itself (:meth:`start_decoding`).
        """
        g = np.asarray(g, np.float32)
        sat = np.asarray(sat, np.float32)
        actions = np.asarray(actions, np.int64)
        n, t = g.shape[0], actions.shape[1]
        if sat.shape != (n, t + 1, self.embed_dim) or not 0 <= t < self.steps:
            raise InputError(f'decoder step got sat {sat.shape} and actions {actions.shape}; '
                             f'expected [B, t + 1, {self.embed_dim}] and [B, t] with t < '
                             f'{self.steps}')
        if self.decoder == 'kv':
            return self._kv_logits(g, sat, actions)
        out = np.empty((n, self.step_dim), np.float32)
        bsz = self.beam
        for lo in range(0, n, bsz):
            m = min(bsz, n - lo)
            gb, sb, ab = self._g, self._sat, self._act
            gb[:m] = g[lo:lo + m]
            sb[:m, :t + 1] = sat[lo:lo + m]
            ab[:m, :t] = actions[lo:lo + m]
            if m < bsz:
                gb[m:] = 0.0
                sb[m:] = 0.0
                ab[m:] = 0
            if self.decoder == 'per-step':
                feeds = {'g': gb, 'sat': np.ascontiguousarray(sb[:, :t + 1])}
                if t > 0:
                    feeds['actions'] = np.ascontiguousarray(ab[:, :t])
                out[lo:lo + m] = self._steps[t].run(None, feeds)[0][:m]
            else:
                # Rows after t hold stale or zero tokens; the causal decoder never reads them.
                logits = self._full.run(None, {'g': gb, 'sat': sb, 'actions': ab})[0]
                out[lo:lo + m] = logits[:m, t]
        return out

    def start_decoding(self, g, sat, actions):
        """Begin decoding paths of one frame (see PolicyBackend.start_decoding).

        With the key/value cache the state keeps each path's keys and values, so a step feeds
        the decoder only the new tokens.
        """
        if self.decoder != 'kv':
            return super().start_decoding(g, sat, actions)
        state = _KVState(self, g, sat, actions)
        return state, state.out

    def search_graph(self, width, level, starts=1):
        """Return a function running a whole zoom search in one graph, or None.

        There are graphs for searches of the exported beam width and greedy ones (width 1),
        from one start cell at any level or from up to ``export.ROOT_ROWS`` roots
        (``starts``), for linear action heads
        (:mod:`geozoom_ros.runtime.graphs`). The function takes ``(g [1, D], sat
        [R, level + 1, D], actions [R, level], start [R, 2], tokens, usable, geom)`` and
        returns ``(logp, x, y, paths, origin)``; :mod:`geozoom_ros.search` builds the
        arguments.
        """
        name = f'search_{level}_w{int(width)}' + ('' if starts == 1 else '_roots')
        if name not in self._search:
            path = self.manifest['files'].get(name)
            sess = None if path is None else self._session(name)
            self._search[name] = None if sess is None else _search_runner(sess, level)
        run = self._search[name]
        return run if run is not None and starts <= run.rows else None

    @staticmethod
    def _row_keys(g, sat, actions, t):
        return [g[i].tobytes() + sat[i, :t + 1].tobytes() + actions[i, :t].tobytes()
                for i in range(len(g))]

    def _kv_prefix(self, g, sat, actions):
        """Run cached steps 0..t over whole prefixes; return (outputs, keys, values)."""
        t = actions.shape[1]
        out, keys, values = self._kv_run(0, g, sat[:, 0], None, None, None)
        for s in range(1, t + 1):
            out, keys, values = self._kv_run(s, g, sat[:, s], actions[:, s - 1], keys, values)
        return out, keys, values

    def _kv_logits(self, g, sat, actions):
        t = actions.shape[1]
        past = None
        if t > 0 and self._kv_last is not None and self._kv_last[0] == t - 1:
            lt, lg, lsat, lact, keys, values = self._kv_last
            index = {key: i for i, key in enumerate(self._row_keys(lg, lsat, lact, lt))}
            rows = [index.get(key) for key in self._row_keys(g, sat, actions, t - 1)]
            if all(r is not None for r in rows):
                past = keys[:, rows], values[:, rows]
        if past is None:
            logits, keys, values = self._kv_prefix(g, sat, actions)
        else:
            logits, keys, values = self._kv_run(t, g, sat[:, t], actions[:, t - 1], *past)
        self._kv_last = (t, g.copy(), sat[:, :t + 1].copy(), actions[:, :t].copy(), keys,
                         values)
        return logits

    def _kv_feeds(self, t, g, sat_t, action, past_k, past_v, lo, m, rows):
        """Return the feeds of rows lo .. lo + m of cached step t, zero-padded to ``rows``."""
        def pad(a, axis=0):
            part = a[lo:lo + m] if axis == 0 else a[:, lo:lo + m]
            if m == rows:
                return np.ascontiguousarray(part)
            shape = list(part.shape)
            shape[axis] = rows
            full = np.zeros(shape, part.dtype)
            full[(slice(None),) * axis + (slice(0, m),)] = part
            return full
        if t == 0:
            return {'g': pad(g), 'sat': pad(sat_t)}
        return {'sat': pad(sat_t), 'action': pad(action), 'past_k': pad(past_k, 1),
                'past_v': pad(past_v, 1)}

    def _kv_session(self, t, m):
        if m == 1 and self._kv1[t] is not None:
            return self._kv1[t], 1
        return self._kv[t], self.beam

    def _kv_run(self, t, g, sat_t, action, past_k, past_v):
        """Run cached step ``t`` over all rows (in chunks of the beam batch).

        Returns (outputs [n, step_dim], keys, values [layers, n, heads, tokens, D / heads]).
        """
        n = len(sat_t)
        parts = []
        for lo in range(0, n, self.beam):
            m = min(self.beam, n - lo)
            sess, rows = self._kv_session(t, m)
            out, keys, values = sess.run(None, self._kv_feeds(t, g, sat_t, action, past_k,
                                                              past_v, lo, m, rows))
            parts.append((out[:m], keys[:, :m], values[:, :m]))
        if len(parts) == 1:  # one batch (a search's steps): its arrays as they are
            return parts[0]
        return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts], 1),
                np.concatenate([p[2] for p in parts], 1))


def _search_runner(sess, level):
    names = ['logp', 'x', 'y', 'paths', 'origin']
    inputs = [i.name for i in sess.get_inputs()]
    shapes = {i.name: i.shape for i in sess.get_inputs()}
    # The roots graph takes a fixed number of start rows: fewer roots are padded with rows
    # whose log-probability is -inf (they never survive).
    rows = int(shapes['sat'][0])
    padded = 'logp0' in shapes
    full = np.zeros(rows, np.float32)  # logp0 of as many roots as rows: no padding

    def run(g, sat, actions, start, tokens, usable, geom):
        # The arrays come as the search builds them: C-contiguous, float32 g and sat, int64
        # actions, start and geom, so they are fed as they are.
        given = {'g': g, 'sat': sat, 'actions': actions, 'start': start, 'tokens': tokens,
                 'usable': usable, 'geom': geom}
        if padded:
            n = len(sat)
            given['logp0'] = full
            if n < rows:
                given['logp0'] = np.full(rows, -np.inf, np.float32)
                given['logp0'][:n] = 0.0
                pad = np.zeros((rows - n,) + sat.shape[1:], np.float32)
                given['sat'] = np.concatenate([sat, pad])
                given['start'] = np.concatenate([start, np.repeat(start[:1], rows - n, 0)])
        # A graph that starts at the last token level never reads tokens or masks: the
        # export drops inputs nothing uses.
        return sess.run(names, {name: given[name] for name in inputs})
    run.rows = rows
    return run


class _KVState:
    """Decoding state of the key/value cache: the keys and values of every live path."""

    def __init__(self, backend, g, sat, actions):
        self.backend = backend
        sat = np.asarray(sat, np.float32)
        actions = np.asarray(actions, np.int64).reshape(len(sat), -1)
        self.t = actions.shape[1]
        g = np.repeat(np.asarray(g, np.float32).reshape(1, -1), len(sat), axis=0)
        self.out, self.keys, self.values = backend._kv_prefix(g, sat, actions)

    def step(self, sat_t, action, parents):
        """Extend paths by one step; return their outputs (see base.DecodingState.step)."""
        self.t += 1
        self.out, self.keys, self.values = self.backend._kv_run(
            self.t, None, np.asarray(sat_t, np.float32), np.asarray(action, np.int64),
            self.keys[:, parents], self.values[:, parents])
        return self.out


#: The retrieval model's exported ground encoder and its record (the model's hash).
RETRIEVAL_GRAPH = 'retrieval_ground.onnx'
RETRIEVAL_RECORD = 'retrieval_ground.json'


class OnnxRetrieval:
    """A retrieval model's ground encoder on onnxruntime (the fused search's second pass).

    ``embed_ground`` returns what :class:`~geozoom_ros.runtime.torch_backend.TorchRetrieval`'s
    does (float32 ``[B, E]``, L2-normalised). The graph (``x`` float32 ``[1, 3, H, W]`` ->
    ``e`` ``[1, E]``) is exported once into ``<model>/onnx`` (the user's cache for a read-only
    model folder) and again when the model's hash changes; :meth:`scale` is the softmax scale
    read from the weights. Only the ground side: map crops are embedded once per map, by
    ``geozoom index`` with torch.
    """

    name = 'onnxruntime'

    def __init__(self, model_path, threads=None, providers=None):
        ort = _import_ort()
        from geozoom_ros.fileio import atomic_write_json
        from geozoom_ros.model.config import PolicyConfig
        from geozoom_ros.model.io import model_hash, read_model_config

        mdir = model_dir(model_path)
        cfg = read_model_config(mdir, kind='retrieval')
        self.config = PolicyConfig.from_dict(cfg['config'], f'{mdir}: config')
        self.model_hash = model_hash(mdir)
        self.model_path = os.fspath(model_path)
        out = mdir / 'onnx' if os.access(mdir, os.W_OK) else _user_cache_dir(self.model_hash)
        graph, record = out / RETRIEVAL_GRAPH, out / RETRIEVAL_RECORD
        try:
            current = json.loads(record.read_text()).get('model_hash') == self.model_hash
        except (OSError, ValueError, AttributeError):
            current = False
        if not (current and graph.is_file()):
            out.mkdir(parents=True, exist_ok=True)
            _export_retrieval_ground(mdir, graph)
            atomic_write_json(record, {'model_hash': self.model_hash,
                                       'ground_size': list(self.config.ground_size)})
        self._session = ort.InferenceSession(os.fspath(graph),
                                             sess_options=_session_options(ort, threads),
                                             providers=_providers(ort, providers))
        self._scale = _retrieval_scale(mdir)

    def embed_ground(self, images, headings=None):
        """Return float32 ``[B, E]`` ground embeddings of uint8 RGB frames (no heading)."""
        images = check_images(images)
        x = preprocess(images, self.config.ground_size)
        return np.concatenate([self._session.run(None, {'x': x[i:i + 1]})[0]
                               for i in range(len(images))]).astype(np.float32)

    def scale(self):
        """Return the inverse softmax temperature the model learned (at most 100)."""
        return self._scale


def _retrieval_scale(mdir):
    """Return ``min(exp(logit_scale), 100)`` of a retrieval model's weights (as its scale())."""
    from safetensors import safe_open

    with safe_open(os.fspath(Path(mdir) / 'model.safetensors'), 'np') as st:
        return float(min(np.exp(float(st.get_tensor('logit_scale'))), 100.0))


def _export_retrieval_ground(mdir, path):
    """Export a retrieval model's ground embedding at batch 1 to ``path`` (atomically)."""
    import torch

    from geozoom_ros.model.io import load_model
    from geozoom_ros.runtime.export import _export

    model = load_model(mdir).eval()

    class Ground(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, x):
            return self.m.embed_ground(x)

    w, h = model.config.ground_size
    _export(Ground().eval(), (torch.zeros(1, 3, h, w),), ['x'], ['e'], path)
