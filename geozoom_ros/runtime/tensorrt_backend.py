"""The TensorRT backend: engines built from the exported ONNX graphs with the TensorRT API.

Engines are cached beside the ONNX files as ``<onnx dir>/trt/<key>/<graph>.engine``; the key
joins the GPU name, the TensorRT version, the model hash and the precision, so a change of any
of them builds new engines. ``tensorrt`` is imported only when this backend is chosen; where it
(or CUDA) is missing the constructor raises BackendUnavailable with one line. Buffers live in
torch CUDA tensors (torch ships with JetPack). This backend has not been run on a machine with
TensorRT's builder; only its unavailability is tested here.
"""

import hashlib
import os
from pathlib import Path
import re

import numpy as np

from geozoom_ros.runtime import BackendUnavailable
from geozoom_ros.runtime.base import PolicyBackend


def _import_trt():
    try:
        import tensorrt as trt
    except ImportError:
        raise BackendUnavailable("backend 'tensorrt' cannot load: the tensorrt Python package "
                                 'is not installed (it comes with JetPack on a Jetson)') from None
    if not hasattr(trt, 'Builder'):
        raise BackendUnavailable("backend 'tensorrt' cannot load: this tensorrt install has no "
                                 'builder (lean/dispatch runtime only); install full TensorRT')
    return trt


def engine_key(gpu_name, trt_version, model_hash, fp16):
    """Return the cache key of a set of engines (a safe folder name)."""
    gpu = re.sub(r'[^A-Za-z0-9]+', '-', gpu_name).strip('-')
    digest = hashlib.sha256(f'{gpu_name}|{trt_version}|{model_hash}|{fp16}'.encode())
    return f'{gpu}-trt{trt_version}-{model_hash[:12]}-{"fp16" if fp16 else "fp32"}-' \
        f'{digest.hexdigest()[:8]}'


def build_engine(trt, onnx_path, engine_path, fp16=True):
    """Build a serialised engine from an ONNX file and write it atomically."""
    from geozoom_ros.fileio import atomic_write_bytes

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(os.fspath(onnx_path)):
        errors = '; '.join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BackendUnavailable(f'TensorRT cannot parse {onnx_path}: {errors.splitlines()[0]}')
    config = builder.create_builder_config()
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    data = builder.build_serialized_network(network, config)
    if data is None:
        raise BackendUnavailable(f'TensorRT failed to build an engine from {onnx_path}')
    atomic_write_bytes(engine_path, bytes(data))
    return engine_path


def build_engines(onnx_dir, model_hash, fp16=True):
    """Build (or reuse) the engines of every graph in an export folder; return their paths."""
    trt = _import_trt()
    import torch

    from geozoom_ros.runtime.export import read_manifest

    if not torch.cuda.is_available():
        raise BackendUnavailable("backend 'tensorrt' cannot load: no CUDA device is available")
    manifest = read_manifest(onnx_dir)
    key = engine_key(torch.cuda.get_device_name(0), trt.__version__, model_hash, fp16)
    folder = Path(onnx_dir) / 'trt' / key
    paths = {}
    for name, fname in manifest['files'].items():
        path = folder / f'{name}.engine'
        if not path.is_file():
            build_engine(trt, Path(onnx_dir) / fname, path, fp16)
        paths[name] = path
    return paths


class _Engine:
    def __init__(self, trt, runtime, path):
        import torch

        self.engine = runtime.deserialize_cuda_engine(Path(path).read_bytes())
        self.context = self.engine.create_execution_context()
        self.buffers = {}
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            shape = tuple(self.engine.get_tensor_shape(name))
            dtype = torch.from_numpy(np.zeros(0, trt.nptype(self.engine.get_tensor_dtype(name))))
            self.buffers[name] = torch.zeros(shape, dtype=dtype.dtype, device='cuda')
            self.context.set_tensor_address(name, self.buffers[name].data_ptr())
        self.stream = torch.cuda.Stream()

    def run(self, feeds, output):
        import torch

        for name, value in feeds.items():
            self.buffers[name].copy_(torch.from_numpy(np.ascontiguousarray(value)))
        self.context.execute_async_v3(self.stream.cuda_stream)
        self.stream.synchronize()
        return self.buffers[output].float().cpu().numpy()


class TensorRTBackend(PolicyBackend):
    """A zoom policy run by TensorRT engines built from its ONNX export.

    Args:
        model_path: a model folder written by ``geozoom train``.
        fp16: build FP16 engines (default) or FP32.
        onnx_dir: folder of the stateless per-step ONNX export (default ``<model>/onnx-steps``;
            exported on first use) beside which the engines are cached.
        beam: the fixed decoder batch, as for the onnxruntime backend.
    """

    name = 'tensorrt'

    def __init__(self, model_path, fp16=True, onnx_dir=None, beam=8):
        trt = _import_trt()
        from geozoom_ros.runtime.onnx_backend import OnnxBackend

        from geozoom_ros.runtime.export import model_dir

        # The onnxruntime backend validates the model and exports the stateless per-step
        # graphs (into their own folder, so they never replace the default key/value export).
        onnx_dir = onnx_dir if onnx_dir is not None else model_dir(model_path) / 'onnx-steps'
        self._ort = OnnxBackend(model_path, providers=['CPUExecutionProvider'], threads=1,
                                onnx_dir=onnx_dir, beam=beam, decoder='per-step')
        self.config, self.model_hash = self._ort.config, self._ort.model_hash
        self.map_hash = self._ort.map_hash
        paths = build_engines(self._ort.onnx_dir, self.model_hash, fp16)
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self._engines = {name: _Engine(trt, runtime, p) for name, p in paths.items()}

    def encode_ground(self, images, headings=None):
        """Encode camera frames (uint8 RGB) into float32 ``[B, D]`` (see PolicyBackend)."""
        from geozoom_ros.runtime.onnx_backend import preprocess

        x = preprocess(images, self.config.ground_size)
        out = np.empty((len(images), self.embed_dim), np.float32)
        for i in range(len(images)):
            feeds = {'x': x[i:i + 1]}
            if self.config.heading_input:
                h = None if headings is None else headings[i]
                feeds['heading'] = np.array([np.nan if h is None else h], np.float32)
            out[i] = self._engines['encoder'].run(feeds, 'g')[0]
        return out

    def step_logits(self, g, sat, actions):
        """Return float32 ``[B, k*k]`` next-action logits (see PolicyBackend)."""
        n, t = len(g), actions.shape[1]
        out = np.empty((n, self.step_dim), np.float32)
        b = self._ort.beam
        for lo in range(0, n, b):
            m = min(b, n - lo)
            gb = np.zeros((b, self.embed_dim), np.float32)
            sb = np.zeros((b, t + 1, self.embed_dim), np.float32)
            ab = np.zeros((b, t), np.int64)
            gb[:m], sb[:m], ab[:m] = g[lo:lo + m], sat[lo:lo + m], actions[lo:lo + m]
            feeds = {'g': gb, 'sat': sb, **({'actions': ab} if t else {})}
            out[lo:lo + m] = self._engines[f'step_{t}'].run(feeds, 'logits')[:m]
        return out
