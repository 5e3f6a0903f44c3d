"""The torch backend: runs a ZoomPolicy (and the retrieval baseline) on CPU or CUDA."""

import inspect
import os
import warnings

import numpy as np
import torch

from geozoom_ros.errors import ConfigError, InputError
from geozoom_ros.runtime.base import check_images, PolicyBackend


def resolve_device(device):
    """Return the torch device named by ``device`` (auto, cpu, cuda, cuda:N), or raise."""
    if device in (None, 'auto'):
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f'device {device!r} is not a torch device; use cpu, cuda or '
                          'cuda:N') from None
    if dev.type == 'cuda' and not torch.cuda.is_available():
        raise ConfigError(f'device {device!r} asked for but CUDA is not available here; use '
                          'device=cpu')
    return dev


def _load(model_path, device):
    from geozoom_ros.model.io import load_model, model_hash

    path = os.fspath(model_path)
    if not os.path.exists(path):
        raise InputError(f'model {path} does not exist; train one with geozoom train or pass '
                         'the path of a model file')
    model = load_model(path)
    model.eval().to(device)
    return model, model_hash(path)


def _heading_kw(method):
    """Return the name of ``method``'s heading argument, or None if it takes none."""
    try:
        params = inspect.signature(method).parameters
    except (TypeError, ValueError):
        return None
    for name in ('headings', 'heading', 'heading_deg'):
        if name in params:
            return name
    return None


def _heading_args(runner, headings, n):
    """Return the heading keyword for the model ({} when it takes none).

    A heading model gets NaN for every frame whose heading is unknown (None, NaN or no
    headings at all): its heading-free mode, in which the token carries no heading term.
    """
    if not getattr(runner.config, 'heading_input', False) or not runner._heading_kw:
        return {}
    if headings is None:
        headings = [None] * n
    if len(headings) != n:
        raise InputError(f'{len(headings)} headings for {n} images')
    values = [float('nan') if h is None else float(h) for h in headings]
    return {runner._heading_kw: torch.tensor(values, dtype=torch.float32, device=runner.device)}


class _CapturedCall:
    """``fn(*inputs)`` captured once as a CUDA graph and replayed with new inputs.

    At batch 1 an encoder pass or a whole search is hundreds of small kernels, and launching
    them one by one from Python takes longer than running them; a captured graph launches them
    all at once. The inputs are copied into the graph's own tensors, so each call must give
    the shapes and dtypes of the capture. ``keep`` holds the tensors the graph reads besides
    its inputs (a bundle's arrays on the device), so their memory is not reused while the
    graph exists. The outputs are the graph's own tensors, overwritten by the next replay.
    """

    def __init__(self, fn, inputs, keep=()):
        self.inputs = [t.clone() for t in inputs]
        self.keep = tuple(keep)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # lazy initialisation and library heuristics, outside the graph
                fn(*self.inputs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = fn(*self.inputs)

    def __call__(self, *inputs):
        for dst, src in zip(self.inputs, inputs):
            dst.copy_(src)
        self.graph.replay()
        return self.outputs


class TorchBackend(PolicyBackend):
    """A ZoomPolicy run by torch under ``torch.inference_mode``.

    Args:
        model_path: a model file written by ``geozoom train`` (safetensors + JSON config).
        device: 'cpu', 'cuda', 'cuda:N' or 'auto'.
        cuda_graphs: on a CUDA device, capture the ground encoder and each search shape once
            as a CUDA graph and replay it per frame (the same kernels, launched at once).
    """

    name = 'torch'

    #: Captured graphs kept (by call and input shapes); the oldest goes first.
    MAX_CAPTURED = 32

    def __init__(self, model_path, device='cpu', cuda_graphs=True):
        self.device = resolve_device(device)
        self.cuda_graphs = bool(cuda_graphs) and self.device.type == 'cuda'
        self._captured = {}
        self.model, self.model_hash = _load(model_path, self.device)
        for attr in ('encode_ground', 'encode_map', 'step_logits'):
            if not hasattr(self.model, attr):
                raise InputError(f'model {model_path} is a {type(self.model).__name__}, not a '
                                 'zoom policy; pass a ZoomPolicy model file')
        from geozoom_ros.model.io import map_hash
        self.map_hash = map_hash(model_path)
        self.config = self.model.config
        self.model_path = os.fspath(model_path)
        self._heading_kw = _heading_kw(self.model.encode_ground)
        self._graphs = {}
        self._map_arrays = {}

    def _heading_args(self, headings, n):
        return _heading_args(self, headings, n)

    def _to(self, array, dtype):
        return torch.as_tensor(np.ascontiguousarray(array), dtype=dtype, device=self.device)

    def _call(self, name, fn, inputs, keep=()):
        """Return ``fn(*inputs)``, through a CUDA graph captured per name and input shapes."""
        if not self.cuda_graphs:
            return fn(*inputs)
        key = (name, tuple((tuple(t.shape), t.dtype) for t in inputs),
               tuple(t.data_ptr() for t in keep))
        call = self._captured.get(key)
        if call is None:
            try:
                call = _CapturedCall(fn, inputs, keep)
            except RuntimeError as exc:  # an operation CUDA graphs cannot capture
                self.cuda_graphs = False
                first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                warnings.warn(f'CUDA graph capture failed ({first}); running the kernels one '
                              'by one from now on', RuntimeWarning, stacklevel=2)
                self._captured.clear()
                return fn(*inputs)
            if len(self._captured) >= self.MAX_CAPTURED:
                self._captured.pop(next(iter(self._captured)))
            self._captured[key] = call
        return call(*inputs)

    def encode_ground(self, images, headings=None):
        """Encode camera frames (uint8 RGB) into float32 ``[B, D]`` (see PolicyBackend)."""
        images = check_images(images)
        with torch.inference_mode():
            x = self.model.preprocess_ground(images).to(self.device)
            kw = self._heading_args(headings, len(images))
            if kw:
                (name, heading), = kw.items()
                g = self._call('ground-heading',
                               lambda x, h: self.model.encode_ground(x, **{name: h}),
                               [x, heading])
            else:
                g = self._call('ground', self.model.encode_ground, [x])
            return g.float().cpu().numpy()

    def encode_map(self, images):
        """Encode north-up views (uint8 RGB) into float32 ``[B, D]`` (see PolicyBackend)."""
        with torch.inference_mode():
            x = self.model.preprocess_map(list(images)).to(self.device)
            return self.model.encode_map(x).float().cpu().numpy()

    def match_keys(self, tokens):
        """Return float32 ``[N, match_dim]`` unit keys of view tokens ``[N, D]`` (match head)."""
        with torch.inference_mode():
            return self.model.decoder.match_keys(self._to(tokens, torch.float32)).float() \
                .cpu().numpy()

    def step_logits(self, g, sat, actions):
        """Return float32 ``[B, step_dim]`` step outputs (see PolicyBackend)."""
        with torch.inference_mode():
            logits = self.model.step_logits(self._to(g, torch.float32),
                                            self._to(sat, torch.float32),
                                            self._to(actions, torch.long))
        return logits.float().cpu().numpy()

    def search_graph(self, width, level, starts=1):
        """Return a function running a whole zoom search in one module call, or None.

        The module is the one the ONNX export traces (:class:`~geozoom_ros.runtime.graphs.
        SearchGraph`), run eagerly: any width and any number of start paths (the exported
        graphs have static shapes), for linear action heads. Same arguments and results as
        ``OnnxBackend.search_graph``; the bundle's token and imagery arrays move to the device
        once per bundle.
        """
        if getattr(self.config, 'action_head', 'linear') != 'linear':
            return None
        key = (int(width), int(level))
        if key not in self._graphs:
            from geozoom_ros.runtime.graphs import SearchGraph

            self._graphs[key] = self._search_runner(SearchGraph(self.model, key[1], key[0]),
                                                    ('search',) + key)
        return self._graphs[key]

    def _search_runner(self, module, name):
        """Return ``run(g, sat, actions, start, tokens, usable, geom)`` for a search module."""
        module.eval()

        def run(g, sat, actions, start, tokens, usable, geom):
            args = [self._to(g, torch.float32), self._to(sat, torch.float32)]
            if module.t > 0:
                args.append(self._to(actions, torch.long))
            args += [self._to(start, torch.long), self._to(geom, torch.long)]
            maps = (self._map_array(tokens), self._map_array(usable))

            def whole(*a):  # the bundle's arrays are not inputs: the same for every frame
                return module(*a[:-1], *maps, a[-1])
            with torch.inference_mode():
                return tuple(out.cpu().numpy() for out in self._call(name, whole, args, maps))
        run.rows = float('inf')  # any number of start paths
        return run

    def _map_array(self, array):
        """Return a bundle's array as a tensor on the device, converted once per array.

        The cache holds the arrays too, so an address is never reused while it is a key.
        """
        key = (array.__array_interface__['data'][0], array.shape, array.dtype.str)
        hit = self._map_arrays.get(key)
        if hit is None:
            with warnings.catch_warnings():
                # A read-only memory map: the search only reads it.
                warnings.filterwarnings('ignore', message='The given NumPy array is not '
                                        'writable')
                hit = (array, torch.from_numpy(array).to(self.device))
            if len(self._map_arrays) >= 4:  # two arrays per bundle: the last two bundles
                self._map_arrays.pop(next(iter(self._map_arrays)))
            self._map_arrays[key] = hit
        return hit[1]


class TorchRetrieval:
    """The contrastive retrieval baseline (RetrievalModel) run by torch.

    ``embed_ground`` / ``embed_map`` take lists of uint8 RGB arrays and return L2-normalised
    float32 embeddings ``[B, E]``.
    """

    name = 'torch'

    def __init__(self, model_path, device='cpu'):
        self.device = resolve_device(device)
        self.model, self.model_hash = _load(model_path, self.device)
        for attr in ('embed_ground', 'embed_map'):
            if not hasattr(self.model, attr):
                raise InputError(f'model {model_path} is a {type(self.model).__name__}, not a '
                                 'retrieval model; pass a RetrievalModel file (geozoom train '
                                 '--method retrieval)')
        self.config = getattr(self.model, 'config', None)
        self.model_path = os.fspath(model_path)
        self._heading_kw = _heading_kw(self.model.embed_ground)

    def embed_ground(self, images, headings=None):
        """Return float32 ``[B, E]`` ground embeddings of uint8 RGB frames."""
        images = check_images(images)
        with torch.inference_mode():
            x = self.model.preprocess_ground(images).to(self.device)
            kwargs = _heading_args(self, headings, len(images))
            return self.model.embed_ground(x, **kwargs).float().cpu().numpy()

    def scale(self):
        """Return the inverse softmax temperature the model learned (at most 100)."""
        with torch.inference_mode():
            return float(self.model.scale().detach().cpu())

    def embed_map(self, images):
        """Return float32 ``[B, E]`` embeddings of uint8 RGB overhead crops."""
        with torch.inference_mode():
            x = self.model.preprocess_map(list(images)).to(self.device)
            return self.model.embed_map(x).float().cpu().numpy()

    def map_size(self):
        """Return the side in pixels of the overhead crops the model takes."""
        for name in ('map_size', 'view_size', 'crop_size'):
            value = getattr(self.config, name, None)
            if value:
                return int(value[0] if isinstance(value, (tuple, list)) else value)
        return 96

    def context_m(self):
        """Return the side in metres of the overhead crops the model was trained on."""
        for name in ('crop_m', 'context_m', 'map_context_m'):
            value = getattr(self.config, name, None)
            if value:
                return float(value)
        return 100.0
