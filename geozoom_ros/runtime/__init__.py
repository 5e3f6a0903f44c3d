"""Inference backends behind one interface (torch, onnxruntime, tensorrt).

``load_backend(kind, model_path)`` returns a :class:`~geozoom_ros.runtime.base.PolicyBackend`.
Each backend module imports its library only when that backend is chosen, so this package
imports neither torch nor onnxruntime by itself.
"""

import importlib
import inspect

from geozoom_ros.errors import ConfigError

#: kind -> (module, class). Later backends add their entry here.
BACKENDS = {
    'torch': ('geozoom_ros.runtime.torch_backend', 'TorchBackend'),
    'onnxruntime': ('geozoom_ros.runtime.onnx_backend', 'OnnxBackend'),
    'tensorrt': ('geozoom_ros.runtime.tensorrt_backend', 'TensorRTBackend'),
}

#: The order 'auto' tries backends in (fastest first where present).
AUTO_ORDER = ('tensorrt', 'onnxruntime', 'torch')


class BackendUnavailable(ConfigError):
    """A backend's library or model files cannot be loaded on this machine."""


def _backend_class(kind):
    module_name, class_name = BACKENDS[kind]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            raise BackendUnavailable(f'backend {kind!r} is not part of this install') from None
        raise BackendUnavailable(f'backend {kind!r} cannot load: Python module {exc.name!r} '
                                 'is not installed') from None
    except ImportError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BackendUnavailable(f'backend {kind!r} cannot load: {first}') from None
    return getattr(module, class_name)


def _accepted(cls, kwargs):
    """Return the keyword arguments ``cls`` takes (backends differ: device, threads, ...)."""
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return dict(kwargs)
    return {k: v for k, v in kwargs.items() if k in params}


def search_defaults(method, beam_width):
    """Return :func:`load_backend`'s ``defaults`` for searches by ``method``.

    Exported search graphs are built for one beam width: the one a beam search ('zoom-beam')
    uses. Greedy search ('zoom') needs none.
    """
    return {'beam': int(beam_width)} if method == 'zoom-beam' else None


def load_backend(kind, model_path, defaults=None, **kwargs):
    """Return a backend of ``kind`` ('torch', 'onnxruntime', 'tensorrt' or 'auto') for a model.

    'auto' takes the first backend of :data:`AUTO_ORDER` that loads. Keyword arguments go to the
    backend's constructor (e.g. ``device='cuda'`` for torch; with 'auto' each backend gets
    those its constructor takes). ``defaults`` (a dict) go to the backends whose constructor
    takes them, under ``kwargs`` (e.g. the beam width the exported search graphs are built
    for, which the torch backend does not need). A backend that cannot load raises
    :class:`BackendUnavailable` with one line saying why.
    """
    defaults = defaults or {}
    if kind == 'auto':
        reasons = []
        for candidate in AUTO_ORDER:
            try:
                cls = _backend_class(candidate)
                return cls(model_path, **_accepted(cls, {**defaults, **kwargs}))
            except BackendUnavailable as exc:
                reasons.append(str(exc))
        raise BackendUnavailable('no backend could load: ' + '; '.join(reasons))
    if kind not in BACKENDS:
        raise ConfigError(f'backend {kind!r} is unknown; choose one of '
                          f'{", ".join(["auto", *BACKENDS])}')
    cls = _backend_class(kind)
    return cls(model_path, **{**_accepted(cls, defaults), **kwargs})


def load_retrieval(model_path, backend=None, threads=None, device='cpu', bundle=None):
    """Return a retrieval model's ground encoder, to run beside ``backend`` if one is given.

    onnxruntime when the policy runs there (its exported graph, about a third of torch's time
    on the CPU), else torch on ``device``. Both give ``embed_ground(images)`` and ``scale()``.
    With a ``bundle``, first check that it holds retrieval embeddings (before loading the
    model) and then that they are this model's (one-line errors).
    """
    if bundle is not None:
        bundle.check_retrieval_model(None, model_path)
    if getattr(backend, 'name', None) == 'onnxruntime':
        from geozoom_ros.runtime.onnx_backend import OnnxRetrieval
        retr = OnnxRetrieval(model_path, threads=threads)
    else:
        from geozoom_ros.runtime.torch_backend import TorchRetrieval
        retr = TorchRetrieval(model_path, device=device)
    if bundle is not None:
        bundle.check_retrieval_model(retr.model_hash, model_path)
    return retr
