"""The causal zoom decoder: a small pre-norm transformer with RoPE, RMSNorm and SwiGLU.

The sequence is ``[g, s0, a0, s1, a1, ..., s_t]``: the ground token, the token of each visited
cell view and an embedding of each action taken. Each token gets a learned *type* embedding
(ground, satellite, action) and its place in the sequence enters only through rotary position
embeddings: there is no cell identifier anywhere, so the decoder can only choose a child from
what the images show, never from which cell it is in. The ``fused`` layout carries the same
information in one token per step, ``[g, s0, s1 + a0, s2 + a1, ...]``: each action's embedding
is added to the token of the view it led to. A search then feeds the decoder half the tokens.

Two read-outs score the k*k children of a step. ``linear`` (the paper's) maps the decoder state
to k*k logits, one per child slot. ``match`` maps it to a unit query scaled by a learned
temperature; each child gets a unit key made from its own view token (:meth:`match_keys`), and a
child's logit is the dot product. A linear head can learn which slot held the training images of
a cell it recognises; a match head has to compare the camera with each child's view, the
cross-view signal that carries over to places never trained on.
"""

import math

import torch
from torch import nn
import torch.nn.functional as F

TYPE_GROUND, TYPE_SAT, TYPE_ACTION = 0, 1, 2


def rope_tables(seq_len, head_dim, device, dtype=torch.float32, base=10000.0):
    """Return (cos, sin) tables of shape [seq_len, head_dim / 2] for rotary embeddings."""
    inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32)
                          / head_dim))
    t = torch.arange(seq_len, device=device, dtype=torch.float32)
    ang = torch.outer(t, inv)
    return ang.cos().to(dtype), ang.sin().to(dtype)


def apply_rope(x, cos, sin):
    """Rotate pairs of channels of ``x`` [B, H, L, Dh] by position-dependent angles."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out1 = x1 * cos - x2 * sin
    out2 = x1 * sin + x2 * cos
    return torch.stack((out1, out2), dim=-1).flatten(-2)


class RMSNorm(nn.Module):
    """Root-mean-square layer norm, written out so every ONNX opset can export it."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.to(x.dtype) * self.weight.to(x.dtype)


class SwiGLU(nn.Module):
    def __init__(self, dim, hidden, dropout):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden, bias=False)
        self.w3 = nn.Linear(hidden, dim, bias=False)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.drop(self.w3(F.silu(a) * b))


class CausalSelfAttention(nn.Module):
    def __init__(self, dim, heads, dropout):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.dropout = dropout
        self.drop = nn.Dropout(dropout)

    def forward(self, x, cos, sin):
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.drop(self.proj(y.transpose(1, 2).reshape(b, n, d)))


class Block(nn.Module):
    def __init__(self, dim, heads, dropout):
        super().__init__()
        self.norm1 = RMSNorm(dim)
        self.attn = CausalSelfAttention(dim, heads, dropout)
        self.norm2 = RMSNorm(dim)
        self.mlp = SwiGLU(dim, int(round(8 * dim / 3 / 8)) * 8, dropout)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.norm1(x), cos, sin)
        return x + self.mlp(self.norm2(x))


class ZoomDecoder(nn.Module):
    """Causal transformer over ``[g, s0, a0, s1, a1, ...]`` giving next-action logits.

    ``dim`` is the token width, ``num_actions`` the number of children per step (k*k).
    ``action_head`` is 'linear' or 'match' (module docstring); ``match_dim`` the query width;
    ``tokens`` the sequence layout, 'interleaved' or 'fused' (module docstring).
    """

    def __init__(self, dim, num_actions, layers=6, heads=8, dropout=0.1, action_head='linear',
                 match_dim=64, tokens='interleaved'):
        super().__init__()
        self.dim, self.heads, self.num_actions = dim, heads, num_actions
        self.action_head = action_head
        self.fused = tokens == 'fused'
        self.type_embed = nn.Embedding(3, dim)
        self.action_embed = nn.Embedding(num_actions, dim)
        self.in_norm = RMSNorm(dim)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(dim, heads, dropout) for _ in range(layers))
        self.norm = RMSNorm(dim)
        if action_head == 'match':
            self.head = nn.Linear(dim, match_dim)
            self.key_norm = RMSNorm(dim)
            self.key = nn.Linear(dim, match_dim)
            self.match_logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        else:
            self.head = nn.Linear(dim, num_actions)
        nn.init.normal_(self.type_embed.weight, std=0.02)
        nn.init.normal_(self.action_embed.weight, std=0.02)

    def readout(self, x):
        """Map final-normed decoder states [..., D] to step outputs.

        Linear head: k*k logits. Match head: the unit query times the logit scale, so that
        ``readout(x) @ match_keys(child_tokens).T`` are the children's logits.
        """
        if self.action_head != 'match':
            return self.head(x)
        scale = self.match_logit_scale.exp().clamp(max=100.0)
        return F.normalize(self.head(x), dim=-1) * scale.to(x.dtype)

    def match_keys(self, tokens):
        """Return unit keys [..., match_dim] of child view tokens [..., D] (match head only)."""
        return F.normalize(self.key(self.key_norm(tokens)), dim=-1)

    def tokens_through(self, t):
        """Return how many tokens the sequence holds up to and including view ``s_t``."""
        return t + 2 if self.fused else 2 * t + 2

    def view_token(self, sat_t, prev_action=None):
        """Return the decoder input of view tokens [..., D] (fused: plus their actions).

        ``prev_action`` (long [...]) is the action that led to the view; the fused layout adds
        its embedding, the interleaved one gives it a token of its own (:meth:`action_token`).
        """
        s = self.in_norm(sat_t) + self.type_embed.weight[TYPE_SAT]
        if self.fused and prev_action is not None:
            s = s + self.action_embed(prev_action)
        return s

    def action_token(self, action):
        """Return the interleaved layout's token [..., D] of actions (long [...])."""
        return self.action_embed(action) + self.type_embed.weight[TYPE_ACTION]

    def sequence(self, g, sat, actions):
        """Build the token sequence of the layout.

        Interleaved: ``[g, s0, a0, ..., s_{T-1}]`` (+ ``a_{T-1}`` if len(actions) = T); fused:
        ``[g, s0, s1 + a0, ..., s_{T-1} + a_{T-2}]`` (a trailing ``a_{T-1}`` has no view to join
        and no later token reads it, so it is left out). ``g`` [B, D], ``sat`` [B, T, D],
        ``actions`` [B, A] with A in {T-1, T}. Returns the token tensor [B, L, D] and the
        positions of the satellite tokens (list of T ints).
        """
        b, t, d = sat.shape
        a = actions.shape[1]
        if a not in (t - 1, t):
            raise ValueError(f'{t} satellite tokens need {t - 1} or {t} actions, got {a}')
        g = self.in_norm(g) + self.type_embed.weight[TYPE_GROUND]
        if self.fused:
            s = self.view_token(sat)
            if t > 1:
                s = torch.cat((s[:, :1], s[:, 1:] + self.action_embed(actions[:, :t - 1])),
                              dim=1)
            return torch.cat((g[:, None], s), dim=1), list(range(1, t + 1))
        s = self.view_token(sat)
        tokens = [g[:, None]]
        sat_pos = []
        for i in range(t):
            sat_pos.append(len(tokens))
            tokens.append(s[:, i:i + 1])
            if i < a:
                tokens.append(self.action_token(actions[:, i])[:, None])
        return torch.cat(tokens, dim=1), sat_pos

    def forward(self, g, sat, actions):
        """Return step outputs [B, T, k*k or match_dim] read at every satellite position."""
        x, sat_pos = self.sequence(g, sat, actions)
        cos, sin = rope_tables(x.shape[1], self.dim // self.heads, x.device, x.dtype)
        x = self.drop(x)
        for blk in self.blocks:
            x = blk(x, cos, sin)
        return self.readout(self.norm(x[:, sat_pos]))
