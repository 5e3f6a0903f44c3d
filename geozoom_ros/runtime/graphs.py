"""Torch modules traced into the exported ONNX graphs of the zoom policy's decoder.

- :func:`cached_blocks` runs the decoder's blocks over new tokens, attending to the cached
  keys and values of the earlier ones (rotary embedding as ``x * C + (x @ R) * S`` with
  constant tables: four operators instead of the slices, stacks and reshapes of
  ``decoder.apply_rope``, same values).
- :func:`token_blocks` runs them over one new token per row at a known position (the fused
  layout's later steps in a search graph): the rotation and the attention scale are folded
  into the q/k/v projection (:func:`rotated_qkv`), and the token stays 2-D, so a block needs
  about a quarter fewer operators.
- :class:`KVStep`: one zoom step with a key/value cache (``kv_<t>.onnx``).
- :class:`SearchGraph`: a whole zoom search from one start cell in one graph
  (``search_<t>_w<W>.onnx``): every step's decoder pass, the children's masks, the
  log-softmax, the selection of the ``W`` best paths (top-k) and the gathers of their view
  tokens and caches. The search in Python calls it once per frame instead of once per step,
  which removes the per-step calls and the numpy work between them.

Inputs of a search graph (static shapes except the map's arrays):
    g float32 [1, D]; sat float32 [R, t + 1, D] (for each of R start paths, its views from
    the root to its start cell: R = 1, a root or a prior's start cell below it; or R = 4
    roots at t = 0, padded); actions int64 [R, t] (the actions from the root; absent when
    t = 0); start int64 [R, 2] (x, y of the start cells at level t); logp0 float32 [R] (the
    roots graph only: 0 for a root, -inf for padding); tokens float16 [N, D] (the bundle's
    view tokens); usable bool [M] (which cells of each token level hold imagery, levels one
    after another); geom int64 [steps - t, 8], one row per child level t + 1 .. steps: (1,
    nx, u, r, first allowed x, first allowed y, last allowed x, last allowed y), where a
    cell (x, y) of the level is ``usable[x + nx * y + u]`` and its token row is that index
    plus r, and the allowed cells are the level's grid cut to a prior's box.
Outputs: logp float32 [W] (path log-probabilities, best first; -inf marks no path), x, y int64
[W] (terminal cells), paths int64 [W, steps] (actions from the root), origin int64 [W] (the
start path each came from). The W best paths are chosen over all start paths together (beam
search); greedy search over several roots keeps one path per root and is not a graph.
"""

import functools

import torch

from geozoom_ros.model.decoder import rope_tables, TYPE_GROUND


@functools.lru_cache(maxsize=8)
def _pair_swap(dh, dtype, device):
    """Return the [dh, dh] matrix taking channel pairs (x1, x2) to (-x2, x1), made once.

    Made once per device (not per call), so that a call inside a CUDA graph capture does no
    host-to-device copy.
    """
    with torch.inference_mode(False):  # a plain tensor, usable by an export's trace as well
        rot = torch.zeros(dh, dh, dtype=dtype, device=device)
        idx = torch.arange(0, dh, 2, device=device)
        rot[idx + 1, idx] = -1.0  # out[2i] = -x[2i + 1]
        rot[idx, idx + 1] = 1.0   # out[2i + 1] = x[2i]
    return rot


def cached_blocks(dec, x, length, past_k=None, past_v=None):
    """Run the blocks over new tokens ``x`` [B, n, D] ending at position ``length - 1``.

    ``past_k`` / ``past_v``: per layer, the earlier tokens' keys and values [B, heads,
    length - n, D / heads] (None when there are none). Returns ``(x, keys, values)``, the
    lists of every layer's keys and values of all ``length`` tokens.
    """
    new, heads = x.shape[1], dec.heads
    dh = dec.dim // heads
    cos, sin = rope_tables(length, dh, x.device, x.dtype)
    cos_i = cos[length - new:].repeat_interleave(2, dim=-1)
    sin_i = sin[length - new:].repeat_interleave(2, dim=-1)
    # q, k and v stay stacked [3, B, heads, n, dh]; the tables rotate q and k and leave v
    # (C = 1, S = 0): one rotation for all three.
    c = torch.stack((cos_i, cos_i, torch.ones_like(cos_i)))[:, None, None]
    s = torch.stack((sin_i, sin_i, torch.zeros_like(sin_i)))[:, None, None]
    rot = _pair_swap(dh, x.dtype, x.device)
    # Causal mask as an additive constant (large, finite and negative); a single new token
    # sees every cached one and needs none.
    bias = None
    if new > 1:
        allowed = torch.ones(new, length, dtype=torch.bool, device=x.device) \
            .tril(diagonal=length - new)
        bias = torch.zeros(new, length, dtype=x.dtype, device=x.device).masked_fill(~allowed, -1e9)
    keys, values = [], []
    for i, blk in enumerate(dec.blocks):
        b, n, dim = x.shape
        qkv = blk.attn.qkv(blk.norm1(x)).view(b, n, 3, heads, dh).permute(2, 0, 3, 1, 4)
        qkv = qkv * c + (qkv @ rot) * s
        q, k, v = qkv.unbind(0)
        if past_k is not None:
            k = torch.cat((past_k[i], k), dim=2)
            v = torch.cat((past_v[i], v), dim=2)
        keys.append(k)
        values.append(v)
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        x = x + blk.attn.proj(y.transpose(1, 2).reshape(b, n, dim))
        x = x + blk.mlp(blk.norm2(x))
    return x, keys, values


def rotated_qkv(dec, position):
    """Return each block's q/k/v weight [3 D, D] with the rotary embedding of ``position``.

    The rotation of a token at a fixed position is a fixed linear map of its queries and keys,
    so it folds into the projection: ``x @ W_p.T`` equals the rotated ``x @ W.T`` (values are
    not rotated). The attention scale 1 / sqrt(D / heads) folds into the query rows.
    """
    heads = dec.heads
    dh = dec.dim // heads
    cos, sin = rope_tables(position + 1, dh, dec.blocks[0].attn.qkv.weight.device)
    c = cos[position].view(1, 1, dh // 2, 1, 1)
    s = sin[position].view(1, 1, dh // 2, 1, 1)
    out = []
    for blk in dec.blocks:
        w = blk.attn.qkv.weight.detach().float().view(3, heads, dh // 2, 2, dec.dim)
        even, odd = w[:, :, :, :1], w[:, :, :, 1:]
        # Channel pair (2i, 2i + 1) of q and k: (x1 cos - x2 sin, x1 sin + x2 cos).
        rot = torch.cat((even * c - odd * s, even * s + odd * c), dim=3)
        rot[0] *= dh ** -0.5
        out.append(torch.cat((rot[:2], w[2:]), dim=0).reshape(3 * dec.dim, dec.dim))
    return out


def token_blocks(dec, x, weights, past_k, past_v):
    """Run the blocks over one new token per row, ``x`` [B, D] (after ``past_k``/``past_v``).

    ``weights``: :func:`rotated_qkv` at the token's position. With a single query per row the
    attention needs no mask, no rotation and no transposes: 2-D tokens, heads as a reshape.
    Returns ``(x [B, D], keys, values)`` as :func:`cached_blocks`.
    """
    b, dim = x.shape
    heads = dec.heads
    dh = dim // heads
    keys, values = [], []
    for i, blk in enumerate(dec.blocks):
        # [B, 3 heads, 1, dh] splits into q, k, v [B, heads, 1, dh] in one operator.
        qkv = torch.nn.functional.linear(blk.norm1(x), weights[i]).view(b, 3 * heads, 1, dh)
        q, k, v = qkv.split(heads, dim=1)
        k = torch.cat((past_k[i], k), dim=2)
        v = torch.cat((past_v[i], v), dim=2)
        keys.append(k)
        values.append(v)
        # A positive axis: the exporter turns -1 into a wrong axis when it cannot see the rank.
        att = torch.softmax(q @ k.transpose(2, 3), dim=3)
        x = x + blk.attn.proj((att @ v).reshape(b, dim))
        x = x + blk.mlp(blk.norm2(x))
    return x, keys, values


def _first_tokens(dec, g, sat_0):
    """Return the tokens of step 0: the ground token and the root view, [B, 2, D]."""
    first = dec.in_norm(g) + dec.type_embed.weight[TYPE_GROUND]
    return torch.stack((first, dec.view_token(sat_0)), dim=1)


def _step_tokens(dec, sat_t, action):
    """Return the new tokens of a later step: ``s_t + a_{t-1}`` (fused) or ``a_{t-1}, s_t``."""
    if dec.fused:
        return dec.view_token(sat_t, action)[:, None]
    return torch.stack((dec.action_token(action), dec.view_token(sat_t)), dim=1)


class KVStep(torch.nn.Module):
    """Decoder step ``t`` with a key/value cache.

    Step 0 takes ``(g, sat)``; a later step ``(sat, action, past_k, past_v)``. Returns the
    step output and the keys/values of all tokens so far.
    """

    def __init__(self, model, t):
        super().__init__()
        self.m, self.t = model, t

    def forward(self, *inputs):
        dec, t = self.m.decoder, self.t
        if t == 0:
            x, past = _first_tokens(dec, *inputs), (None, None)
        else:
            sat_t, action, past_k, past_v = inputs
            x, past = _step_tokens(dec, sat_t, action), (past_k.unbind(0), past_v.unbind(0))
        x, keys, values = cached_blocks(dec, x, dec.tokens_through(t), *past)
        return dec.readout(dec.norm(x[:, x.shape[1] - 1])), torch.stack(keys), \
            torch.stack(values)


class SearchGraph(torch.nn.Module):
    """A zoom search of width ``width`` from a start cell at level ``t`` (module docstring).

    Masked children (outside the allowed rectangle of their level or without imagery) never
    enter the softmax; a path whose children are all masked dies (log-probability -inf).
    Ties between equal path probabilities go to the lower (parent, child) index, as in the
    Python search. Linear action heads only.
    """

    def __init__(self, model, t, width, roots=False):
        super().__init__()
        self.m, self.t, self.width, self.roots = model, t, width, roots
        self.k = model.config.grid_k
        self.steps = model.config.steps
        dec = model.decoder
        # Fused layout: one new token per path and step, at a position fixed by its level.
        self.qkv = {lv: rotated_qkv(dec, dec.tokens_through(lv) - 1)
                    for lv in range(t + 1, self.steps)} if dec.fused else {}

    def forward(self, g, sat, *rest):
        dev = sat.device
        logp = torch.zeros(sat.shape[0], device=dev)
        if self.roots:
            start, logp, tokens, usable, geom = rest
            actions = torch.zeros((sat.shape[0], 0), dtype=torch.long, device=dev)
        elif self.t > 0:
            actions, start, tokens, usable, geom = rest
        else:
            start, tokens, usable, geom = rest
            actions = torch.zeros((sat.shape[0], 0), dtype=torch.long, device=dev)
        dec, k, kk = self.m.decoder, self.k, self.k * self.k
        x = _first_tokens(dec, g.expand(sat.shape[0], -1), sat[:, 0])
        x, keys, values = cached_blocks(dec, x, dec.tokens_through(0))
        for s in range(1, self.t + 1):
            x = _step_tokens(dec, sat[:, s], actions[:, s - 1])
            x, keys, values = cached_blocks(dec, x, dec.tokens_through(s), keys, values)
        ar = torch.arange(kk, device=dev)
        offsets = torch.stack((ar % k, ar // k), dim=1)  # child (dx, dy), row-major
        xy = start
        # One start path: every surviving path comes from it (no gathers of the origin).
        origin = torch.arange(start.shape[0], device=dev) if start.shape[0] > 1 else None
        paths = actions
        last = x.squeeze(1) if x.shape[1] == 1 else x[:, x.shape[1] - 1]
        for i, lv in enumerate(range(self.t, self.steps)):
            logits = dec.readout(dec.norm(last))
            cxy = xy[:, None] * k + offsets  # [B, k*k, 2]
            row = geom[i]
            lo, hi = row[4:6], row[6:8]
            valid = torch.minimum(cxy - lo, hi - cxy).amin(dim=-1) >= 0
            if lv + 1 < self.steps:
                # Index in ``usable`` (0, a safe index, for cells outside the allowed range).
                local = torch.where(valid, (cxy * row[0:2]).sum(-1) + row[2], 0)
                valid = valid & usable[local]
            neg = torch.full_like(logits, float('-inf'))
            lsm = torch.log_softmax(torch.where(valid, logits, neg), dim=1)
            cand = torch.where(valid, logp[:, None] + lsm, neg).reshape(-1)
            # The graph's shapes are static, so the number of candidates is a constant here.
            logp, pick = torch.topk(cand, min(self.width, cand.shape[0]), dim=0)
            parent, act = pick // kk, pick % kk
            if origin is not None:
                origin = origin[parent]
            xy = cxy.reshape(-1, 2)[pick]
            paths = torch.cat((paths[parent], act[:, None]), dim=1)
            if lv + 1 < self.steps:
                view = tokens[local.reshape(-1)[pick] + row[3]].float()
                keys = [kk_[parent] for kk_ in keys]
                values = [vv[parent] for vv in values]
                if dec.fused:
                    last, keys, values = token_blocks(dec, dec.view_token(view, act),
                                                      self.qkv[lv + 1], keys, values)
                else:
                    x, keys, values = cached_blocks(dec, _step_tokens(dec, view, act),
                                                    dec.tokens_through(lv + 1), keys, values)
                    last = x[:, x.shape[1] - 1]
        if origin is None:
            origin = torch.zeros_like(pick)
        return logp, xy[:, 0], xy[:, 1], paths, origin
