"""The interface every inference backend of the zoom policy implements.

A backend runs the two learned parts of a query: the ground encoder (once per camera frame) and
one decoder step (once per zoom level, batched over the beam). It takes and returns numpy
arrays, so the search and the localizer never see the backend's framework. Map views are
encoded offline (``encode_map``), once per map and model, into a bundle.
"""

import abc

import numpy as np

from geozoom_ros.errors import InputError


class PolicyBackend(abc.ABC):
    """Abstract zoom-policy backend.

    Attributes set by implementations:
        name: short backend name ('torch', 'onnxruntime', 'tensorrt').
        config: the policy's configuration; at least ``grid_k``, ``steps``, ``root_zoom``,
            ``embed_dim``, ``view_size``, ``ground_size`` and ``heading_input``.
        model_hash: the content hash of the model file (as ``model.io.model_hash``), used to
            check that a map bundle belongs to this model.
        map_hash: the hash of the model's map side (as ``model.io.map_hash``): a bundle built
            for another model with the same map side (e.g. a distilled decoder's teacher) is
            accepted too.
    """

    name = 'abstract'
    config = None
    model_hash = None
    map_hash = None

    @abc.abstractmethod
    def encode_ground(self, images, headings=None):
        """Encode camera frames.

        Args:
            images: list of uint8 RGB arrays ``[H, W, 3]`` (any size; the backend resizes).
            headings: optional list of camera headings in degrees clockwise from north (or
                None entries); used only when ``config.heading_input`` is set.

        Returns:
            float32 array ``[B, D]``.
        """

    @abc.abstractmethod
    def step_logits(self, g, sat, actions):
        """Return next-action logits of one decoder step.

        Args:
            g: float32 ``[B, D]`` ground tokens.
            sat: float32 ``[B, t + 1, D]`` tokens of the views visited so far (root first).
            actions: int64 ``[B, t]`` actions taken so far (``t`` may be 0).

        Returns:
            float32 ``[B, step_dim]``: for a linear action head the logits of the action at
            step ``t`` (``k * k``, row-major, north-west first); for a match head
            (``config.action_head == 'match'``) the scaled query whose dot products with the
            children's keys (held in the map bundle) are those logits.
        """

    def start_decoding(self, g, sat, actions):
        """Begin decoding paths of one frame; return ``(state, outputs of the first step)``.

        ``g`` float32 ``[D]`` or ``[1, D]`` is the frame's ground token, shared by every path;
        ``sat`` ``[n, t + 1, D]`` and ``actions`` ``[n, t]`` the prefixes of ``n`` paths (views
        from the root, actions so far; ``t`` > 0 when a prior starts the search below the
        root). The outputs are :meth:`step_logits`'s for those prefixes, and ``state.step``
        (:class:`DecodingState`) feeds the following steps. Backends with a key/value cache
        override this to keep it between steps.
        """
        state = DecodingState(self, g, sat, actions)
        return state, state.first()

    def encode_map(self, images):
        """Encode north-up overhead views (uint8 RGB ``[S, S, 3]``) into float32 ``[B, D]``."""
        raise NotImplementedError(f'backend {self.name!r} cannot encode map views; build map '
                                  'bundles with the torch backend')

    @property
    def grid_k(self):
        """Grid size k of the k x k zoom grid."""
        return int(self.config.grid_k)

    @property
    def step_dim(self):
        """Width of one decoder step's output (k*k logits, or a match head's query)."""
        return int(self.config.step_dim)

    @property
    def uses_children(self):
        """True when step outputs are queries to be matched with the children's keys."""
        return getattr(self.config, 'action_head', 'linear') == 'match'

    @property
    def steps(self):
        """Number of zoom steps from a root to a terminal cell."""
        return int(self.config.steps)

    @property
    def embed_dim(self):
        """Token dimension D."""
        return int(self.config.embed_dim)

    def __repr__(self):
        hash8 = (self.model_hash or '?')[:8]
        return f'{type(self).__name__}(name={self.name!r}, model={hash8})'


class DecodingState:
    """The paths of one frame being decoded, one zoom step per :meth:`step` call.

    This generic form keeps each path's prefix and runs :meth:`PolicyBackend.step_logits` on
    it; a backend with a key/value cache keeps the cache instead (same outputs).
    """

    def __init__(self, backend, g, sat, actions):
        self.backend = backend
        self.g = np.asarray(g, np.float32).reshape(1, -1)
        self.sat = np.asarray(sat, np.float32)
        self.actions = np.asarray(actions, np.int64).reshape(len(self.sat), -1)

    def first(self):
        """Return the outputs of the prefixes the state was started with."""
        return self._run()

    def step(self, sat_t, action, parents):
        """Extend paths by one step; return their outputs ``[n, step_dim]``.

        ``parents`` int ``[n]``: the path of the previous step that each new path extends;
        ``action`` int ``[n]``: the child each took; ``sat_t`` ``[n, D]``: that child's view.
        """
        parents = np.asarray(parents, np.int64)
        self.sat = np.concatenate([self.sat[parents], np.asarray(sat_t, np.float32)[:, None]],
                                  axis=1)
        self.actions = np.concatenate([self.actions[parents],
                                       np.asarray(action, np.int64)[:, None]], axis=1)
        return self._run()

    def _run(self):
        return self.backend.step_logits(np.repeat(self.g, len(self.sat), axis=0), self.sat,
                                        self.actions)


def check_images(images, what='image'):
    """Validate a list of camera frames; raise InputError naming the first bad one.

    Each image must be a non-empty uint8 array of shape ``[H, W, 3]`` (RGB) with H, W >= 8.
    """
    if isinstance(images, np.ndarray):
        images = [images]
    if len(images) == 0:
        raise InputError(f'no {what} given; pass at least one uint8 RGB array [H, W, 3]')
    for i, im in enumerate(images):
        label = what if len(images) == 1 else f'{what} {i}'
        if not isinstance(im, np.ndarray):
            raise InputError(f'{label} is a {type(im).__name__}, not a numpy array; pass a '
                             'uint8 RGB array [H, W, 3]')
        if im.dtype != np.uint8:
            raise InputError(f'{label} has dtype {im.dtype}; convert it to uint8 RGB [H, W, 3]')
        if im.ndim != 3 or im.shape[2] != 3:
            raise InputError(f'{label} has shape {tuple(im.shape)}; expected an RGB array '
                             '[H, W, 3]')
        if im.shape[0] < 8 or im.shape[1] < 8:
            raise InputError(f'{label} is {im.shape[1]}x{im.shape[0]} pixels; need at least '
                             '8x8')
    return list(images)
