"""Root shortlist: keep the zoom search's cost flat as the map grows.

A map larger than one root cell (zoom ``root_zoom``, about 6-10 km wide) has many roots, and
the zoom policy's first step would score every one of them with the decoder: at 10 000 km^2
that is some 256 decoder rows before the first zoom, several times the cost of the whole
search on a one-root map. The shortlist ranks the roots instead with the policy's own
cross-view embedding (the auxiliary contrastive heads trained with the decoder,
``aux_ground`` and ``aux_map``), and only the best ``max_roots`` roots enter the beam.

The map side is computed once per bundle: every cell of one token level (level 1 by default,
16 cells per root) is projected through ``aux_map`` and L2-normalised. A frame costs one
``[D, D]`` projection of its ground token and one inner product per cell of that level, a
root's score being the best of its cells'. At level 1 this is about 4 000 cells at
10 000 km^2 (a fraction of a millisecond); level 2 ranks finer but costs 16 times more.

Nothing here imports torch: the weights are read from the model's safetensors file.
"""

from pathlib import Path

import numpy as np

from geozoom_ros.errors import InputError
from geozoom_ros.search import MIN_COVERAGE

#: Names of the auxiliary projection tensors in a zoom policy's model.safetensors.
AUX_KEYS = ('aux_ground.weight', 'aux_ground.bias', 'aux_map.weight', 'aux_map.bias')


def load_aux_weights(model_path):
    """Return ``{name: float32 array}`` of the auxiliary projections of a zoom policy.

    ``model_path`` is a model folder (``model.safetensors`` inside) or the file itself.
    Raises InputError when the file lacks them (a retrieval model, or an old policy).
    """
    from safetensors import safe_open

    p = Path(model_path)
    f = p / 'model.safetensors' if p.is_dir() else p
    if not f.is_file():
        raise InputError(f'model file {f} does not exist; pass a zoom policy folder')
    with safe_open(str(f), 'np') as st:
        missing = [k for k in AUX_KEYS if k not in st.keys()]
        if missing:
            raise InputError(f'model {f} has no {", ".join(missing)}: it is not a zoom policy '
                             'with auxiliary heads; search every root (max_roots 0)')
        return {k: np.asarray(st.get_tensor(k), np.float32) for k in AUX_KEYS}


def _normalise(x):
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(n, 1e-12)


class RootShortlist:
    """Rank a bundle's roots for one ground token by cross-view similarity.

    Args:
        bundle: a loaded :class:`~geozoom_ros.bundle.Bundle`.
        weights: ``{name: array}`` from :func:`load_aux_weights` (``[D, D]`` matrices in
            torch's ``Linear`` layout, ``out x in``, and ``[D]`` biases).
        level: the token level whose cells stand for their roots (1 .. steps - 1).
        chunk: rows projected at a time while building (bounds the memory of the build).
    """

    def __init__(self, bundle, weights, level=1, chunk=65536):
        level = int(level)
        if not 0 <= level < bundle.steps:
            raise InputError(f'shortlist level {level} must be between 0 and '
                             f'{bundle.steps - 1} (a token level of bundle {bundle.path})')
        d = bundle.embed_dim
        for key in AUX_KEYS:
            want = (d, d) if key.endswith('weight') else (d,)
            if tuple(weights[key].shape) != want:
                raise InputError(f'auxiliary tensor {key} has shape '
                                 f'{tuple(weights[key].shape)}; the bundle needs {want}')
        self.level = level
        self._wg, self._bg = weights['aux_ground.weight'], weights['aux_ground.bias']
        lv = bundle.levels[level]
        xs, ys = lv.cell_arrays()
        rows = np.arange(lv.count, dtype=np.int64) + lv.offset
        if bundle.coverage is not None:
            keep = np.asarray(bundle.coverage[rows], np.float32) >= MIN_COVERAGE
            xs, ys, rows = xs[keep], ys[keep], rows[keep]
        shift = level * int(round(np.log2(bundle.k)))
        root_ids = np.array([bundle.root_index.get((int(x) >> shift, int(y) >> shift), -1)
                             for x, y in zip(xs, ys)], np.int64)
        keep = root_ids >= 0
        rows, root_ids = rows[keep], root_ids[keep]
        # Cells grouped by root: a root's score is then one segment maximum (reduceat).
        order = np.argsort(root_ids, kind='stable')
        rows, self.root_ids = rows[order], root_ids[order]
        self._starts = np.flatnonzero(np.r_[True, self.root_ids[1:] != self.root_ids[:-1]]) \
            if len(rows) else np.zeros(0, np.int64)
        #: Roots that have cells with imagery, ascending.
        self.scored_roots = self.root_ids[self._starts]
        wm, bm = weights['aux_map.weight'], weights['aux_map.bias']
        emb = np.empty((len(rows), d), np.float32)
        for lo in range(0, len(rows), chunk):
            tok = np.asarray(bundle.tokens[rows[lo:lo + chunk]], np.float32)
            emb[lo:lo + chunk] = _normalise(tok @ wm.T + bm)
        self.embeddings = emb
        self.num_roots = len(bundle.roots)

    def __len__(self):
        return len(self.root_ids)

    def query(self, g):
        """Return the L2-normalised cross-view query ``[D]`` of a ground token ``g``."""
        g = np.asarray(g, np.float32).reshape(-1)
        return _normalise(self._wg @ g + self._bg)

    def root_scores(self, g):
        """Return ``[num_roots]`` scores (best cosine of a root's cells; -inf: no imagery)."""
        scores = np.full(self.num_roots, -np.inf, np.float32)
        if len(self._starts):
            sims = self.embeddings @ self.query(g)
            scores[self.scored_roots] = np.maximum.reduceat(sims, self._starts)
        return scores

    def select(self, g, count, among=None):
        """Return indices (into ``bundle.roots``) of the ``count`` best roots for ``g``.

        Best first; ``among`` (root indices) restricts the choice; roots without imagery are
        left out.
        """
        scores = self.root_scores(g)
        cand = self.scored_roots if among is None else np.asarray(among, np.int64)
        cand = cand[np.isfinite(scores[cand])]
        return cand[np.argsort(-scores[cand], kind='stable')[:max(1, int(count))]]
