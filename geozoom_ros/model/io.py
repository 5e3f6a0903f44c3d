"""Model files: ``model.safetensors`` (weights) + ``config.json`` (kind, config, metadata).

No pickle anywhere: tensors go through safetensors, everything else through JSON. Both files
are written to temporary names in the target folder and renamed into place; the weights first,
then the config that names their sha256, so a reader never pairs a config with other weights.
"""

import hashlib
import json
from pathlib import Path

from geozoom_ros.errors import InputError, MismatchError
from geozoom_ros.fileio import atomic_write_bytes, atomic_write_json

MODEL_FILE = 'model.safetensors'
CONFIG_FILE = 'config.json'
FORMAT_VERSION = 1


def _model_dir(path):
    path = Path(path)
    if path.is_dir():
        return path
    if path.name in (MODEL_FILE, CONFIG_FILE):
        return path.parent
    raise InputError(f'{path}: not a model folder (expected a folder holding {MODEL_FILE} and '
                     f'{CONFIG_FILE}); pass the folder written by `geozoom train`')


def tensors_to_bytes(tensors, metadata=None):
    """Serialise a dict of tensors with safetensors (contiguous CPU copies)."""
    from safetensors.torch import save

    clean = {k: v.detach().to('cpu').contiguous() for k, v in tensors.items()}
    return save(clean, metadata=metadata)


def file_sha256(path):
    """Return the sha256 hex digest of a file."""
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    return h.hexdigest()


def model_hash(path):
    """Return the sha256 (hex) of a model's ``model.safetensors`` (folder or file path)."""
    f = _model_dir(path) / MODEL_FILE
    if not f.is_file():
        raise InputError(f'{f}: model weights file is missing; pass a folder written by '
                         '`geozoom train`')
    return file_sha256(f)


#: Tensors a map bundle's contents are made from: the image encoder and the map head (the
#: tokens), and a match head's key projection (the keys).
MAP_SIDE_PREFIXES = ('encoder.', 'map_head.', 'decoder.key.', 'decoder.key_norm.')
#: Settings a map bundle's contents depend on.
MAP_SIDE_CONFIG = ('encoder', 'embed_dim', 'view_size', 'map_pool', 'grid_k', 'steps',
                   'root_zoom', 'action_head', 'match_dim')


def map_hash(path):
    """Return the sha256 (hex) of what a map bundle made with this zoom policy depends on.

    That is the map side of the model (:data:`MAP_SIDE_PREFIXES` tensors, names, shapes and
    bytes, and the :data:`MAP_SIDE_CONFIG` settings), not its decoder: two models that share
    it, such as a decoder distilled with ``geozoom distill`` and its teacher, make the same
    bundle, so a bundle built for one serves the other.
    """
    from safetensors import safe_open

    d = _model_dir(path)
    cfg = read_model_config(d).get('config', {})
    h = hashlib.sha256(json.dumps({k: cfg.get(k) for k in MAP_SIDE_CONFIG},
                                  sort_keys=True).encode())
    f = d / MODEL_FILE
    try:
        with safe_open(str(f), framework='numpy') as st:
            for name in sorted(st.keys()):
                if name.startswith(MAP_SIDE_PREFIXES):
                    t = st.get_tensor(name)
                    h.update(f'{name}|{t.dtype}|{t.shape}'.encode())
                    h.update(t.tobytes())
    except Exception as exc:  # noqa: B902 - safetensors raises its own error types
        raise InputError(f'{f}: not a readable safetensors file ({exc}); re-train or re-copy '
                         'the model') from None
    return h.hexdigest()


def save_model(model, out_dir, extra_meta=None):
    """Save ``model`` (ZoomPolicy or RetrievalModel) into ``out_dir``; return the folder.

    ``extra_meta`` (JSON-serialisable dict) is stored under ``meta`` in config.json.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    data = tensors_to_bytes(state, metadata={'kind': model.kind})
    atomic_write_bytes(out_dir / MODEL_FILE, data)
    cfg = {
        'format_version': FORMAT_VERSION,
        'kind': model.kind,
        'config': model.config.to_dict(),
        'model_sha256': hashlib.sha256(data).hexdigest(),
        'meta': dict(extra_meta or {}),
    }
    atomic_write_json(out_dir / CONFIG_FILE, cfg)
    return out_dir


#: What a model of each kind is called in errors, and what to pass instead.
_KIND_NAMES = {'zoom_policy': ('a zoom policy', 'pass a ZoomPolicy model folder'),
               'retrieval': ('a retrieval model', 'pass a RetrievalModel folder (geozoom train '
                                                  '--method retrieval)')}


def read_model_config(path, kind=None):
    """Return the parsed config.json of a model folder (kind, config, meta, model_sha256).

    With ``kind`` ('zoom_policy' or 'retrieval'), a model of the other kind is a one-line
    InputError.
    """
    d = _model_dir(path)
    f = d / CONFIG_FILE
    if not f.is_file():
        raise InputError(f'{f}: missing; a model folder holds {MODEL_FILE} and {CONFIG_FILE}')
    try:
        cfg = json.loads(f.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f'{f}: unreadable JSON ({exc}); re-export the model') from None
    if cfg.get('kind') not in ('zoom_policy', 'retrieval'):
        raise InputError(f'{f}: unknown model kind {cfg.get("kind")!r}; '
                         'expected zoom_policy or retrieval')
    if kind is not None and cfg['kind'] != kind:
        name, hint = _KIND_NAMES[kind]
        raise InputError(f'model {d} is a {cfg["kind"]} model, not {name}; {hint}')
    return cfg


def load_model(path, map_location='cpu'):
    """Load a saved model (dispatching on config.json's ``kind``) in eval mode."""
    from safetensors.torch import load_file

    from geozoom_ros.model.config import PolicyConfig

    d = _model_dir(path)
    cfg = read_model_config(d)
    weights = d / MODEL_FILE
    if not weights.is_file():
        raise InputError(f'{weights}: missing; a model folder holds {MODEL_FILE} and '
                         f'{CONFIG_FILE}')
    want = cfg.get('model_sha256')
    if want and file_sha256(weights) != want:
        raise MismatchError(f'{weights}: sha256 differs from the one in {CONFIG_FILE}; the '
                            'folder mixes files of two models: copy both files of one model')
    config = PolicyConfig.from_dict(cfg['config'], f'{d / CONFIG_FILE}: config')
    if cfg['kind'] == 'zoom_policy':
        from geozoom_ros.model.policy import ZoomPolicy
        model = ZoomPolicy(config, pretrained=False)
    else:
        from geozoom_ros.model.retrieval import RetrievalModel
        model = RetrievalModel(config, pretrained=False)
    try:
        state = load_file(str(weights), device=str(map_location))
    except Exception as exc:  # noqa: B902 - safetensors raises its own error types
        raise InputError(f'{weights}: not a readable safetensors file ({exc}); re-train or '
                         're-copy the model') from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise MismatchError(f'{weights}: weights do not fit the architecture in {CONFIG_FILE} '
                            f'(missing {missing[:3]}, unexpected {unexpected[:3]})')
    model.to(map_location)
    model.meta = cfg.get('meta', {})
    return model.eval()
