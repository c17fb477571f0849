"""Chunked PyTorch vocabulary sweeps: the default backend on CPU.

Memory: besides inputs and gradients, the sweeps hold one ``[token_chunk, vocab_chunk]``
tile of logits (two tile-sized buffers: the sweeps work in place) at a time, plus O(N)
statistics and an fp32 ``dW`` accumulator of ``V x D``. Nothing of size ``N x V`` is ever allocated.

Arithmetic is fp32 (fp64 when hidden or weight is fp64): operands are upcast tile by tile,
which for bf16/fp16 inputs gives exact products, i.e. ``precision="native"`` and ``"ieee"``
coincide here.

Online softmax state per token, over the vocabulary tiles seen so far::

    m = max_v z_v,   s = sum_v e^(z_v - m),   t = sum_v e^(z_v - m) (z_v - m)
    lse = m + log s,      H = log s - t / s,      logp_y = z_y - lse

(``t`` is kept relative to the running max, so ``H`` has no cancellation against ``m``.)
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..config import HeadConfig
from .common import compute_dtype, logits

DEFAULT_TOKEN_CHUNK = 1024
DEFAULT_VOCAB_CHUNK = 4096  # 16 MiB fp32 tiles: below glibc's 32 MiB mmap threshold
# log p below this is exp-underflow territory in fp32 and fp64 alike (p = 0 exactly there):
# clamping -inf to it keeps 0 * log p = 0 without a masked select over the tile
_LOG_FLOOR = -1e4


def _tile_stats(z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(m, s, t) of one [n, v] tile of logits; rows of all -inf give (-inf, 0, 0).

    Consumes ``z`` (it is overwritten with ``z - m``): two tile-sized buffers in all.
    """
    m = z.amax(dim=1)  # amax: no argmax indices to compute
    m_safe = torch.where(torch.isfinite(m), m, 0.0)
    z_rel = z.sub_(m_safe[:, None]).clamp_(min=_LOG_FLOOR)
    e = torch.exp(z_rel)  # 0 where z = -inf
    s = e.sum(1)
    t = e.mul_(z_rel).sum(1)
    return m, s, t


def _merge(a: tuple[Tensor, Tensor, Tensor], b: tuple[Tensor, Tensor, Tensor]):
    """Combine two online-softmax states; an empty state (s = 0) contributes nothing.

    s = sum_i s_i e^(m_i - m)  and  t = sum_i e^(m_i - m) (t_i + s_i (m_i - m)).
    """
    (m1, s1, t1), (m2, s2, t2) = a, b
    m = torch.maximum(m1, m2)
    out_s, out_t = torch.zeros_like(s1), torch.zeros_like(t1)
    for mi, si, ti in ((m1, s1, t1), (m2, s2, t2)):
        live = si > 0
        shift = torch.where(live, mi - m, 0.0)
        scale = torch.exp(shift)
        out_s = out_s + torch.where(live, scale * si, 0.0)
        out_t = out_t + torch.where(live, scale * (ti + si * shift), 0.0)
    return m, out_s, out_t


def _chunks(cfg: HeadConfig) -> tuple[int, int]:
    return cfg.token_chunk or DEFAULT_TOKEN_CHUNK, cfg.vocab_chunk or DEFAULT_VOCAB_CHUNK


def forward_sweep(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                  cfg: HeadConfig) -> tuple[Tensor, Tensor, Tensor]:
    """Log-prob of ``targets``, entropy and log-sum-exp per token.

    hidden [N, D], weight [V, D], bias [V] or None, targets [N] int64 (-1: ignored).
    Returns (logprobs, entropy, lse), each [N] in the compute dtype; logprobs and entropy
    are 0 for ignored tokens.
    """
    N, V = hidden.shape[0], weight.shape[0]
    cdt = compute_dtype(hidden, weight)
    n_chunk, v_chunk = _chunks(cfg)
    b = bias.to(cdt) if bias is not None else None
    lse = torch.empty(N, dtype=cdt, device=hidden.device)
    entropy = torch.empty_like(lse)
    target_logit = torch.zeros_like(lse)
    for n0 in range(0, N, n_chunk):
        y = targets[n0:n0 + n_chunk]
        # rows that do not count may hold anything (NaN padding): zero them before the product
        h = torch.where((y >= 0)[:, None], hidden[n0:n0 + n_chunk].to(cdt), 0.0)
        state = None
        for v0 in range(0, V, v_chunk):
            w = weight[v0:v0 + v_chunk].to(cdt)
            z = logits(h, w, b[v0:v0 + v_chunk] if b is not None else None, cfg)
            # pick the target logit when it falls in this vocabulary tile
            here = (y >= v0) & (y < v0 + w.shape[0])
            col = torch.where(here, y - v0, 0)
            picked = z.gather(1, col[:, None]).squeeze(1)
            target_logit[n0:n0 + n_chunk] += torch.where(here, picked, 0.0)
            stats = _tile_stats(z)
            state = stats if state is None else _merge(state, stats)
        m, s, t = state
        log_s = torch.log(s)
        lse[n0:n0 + n_chunk] = m + log_s
        entropy[n0:n0 + n_chunk] = log_s - t / s
    valid = targets >= 0
    logprobs = torch.where(valid, target_logit - lse, 0.0)
    entropy = torch.where(valid, entropy, 0.0)
    return logprobs, entropy, lse


def backward_sweep(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                   lse: Tensor, entropy: Tensor, grad_logprobs: Tensor, grad_entropy: Tensor,
                   cfg: HeadConfig, needs: tuple[bool, bool, bool]):
    """Gradients of hidden, weight, bias given g = dL/dlogp and e = dL/dH per token.

    Logits are recomputed tile by tile. Per logit (fp32 throughout)::

        dL/dz_v = g (1[v = y] - p_v) - e p_v (log p_v + H)
        softcap: dz/du = 1 - (z / c)^2;   temperature: du/dlogit = 1 / tau

    then ``dh = dlogit @ W``, ``dW = dlogit^T @ h``, ``db = sum_t dlogit`` (fp32 accumulators).
    ``g`` and ``e`` must already be 0 for ignored tokens; their hidden rows are zeroed, so
    nothing from a row that does not count reaches ``dW`` or ``db``. ``grad_entropy`` None:
    the entropy carries no gradient and the ``e p (log p + H)`` term is not formed.
    """
    N, D = hidden.shape
    V = weight.shape[0]
    cdt = compute_dtype(hidden, weight)
    n_chunk, v_chunk = _chunks(cfg)
    need_dh, need_dw, need_db = needs
    b = bias.to(cdt) if bias is not None else None
    g_all = grad_logprobs.to(cdt)
    e_all = grad_entropy.to(cdt) if grad_entropy is not None else None
    d_hidden = torch.zeros(N, D, dtype=cdt, device=hidden.device) if need_dh else None
    d_weight = torch.zeros(V, D, dtype=cdt, device=hidden.device) if need_dw else None
    d_bias = torch.zeros(V, dtype=cdt, device=hidden.device) if need_db else None
    for n0 in range(0, N, n_chunk):
        y = targets[n0:n0 + n_chunk]
        h = torch.where((y >= 0)[:, None], hidden[n0:n0 + n_chunk].to(cdt), 0.0)
        g = g_all[n0:n0 + n_chunk, None]
        e = e_all[n0:n0 + n_chunk, None] if e_all is not None else None
        lse_c, H = lse[n0:n0 + n_chunk, None], entropy[n0:n0 + n_chunk, None]
        for v0 in range(0, V, v_chunk):
            w = weight[v0:v0 + v_chunk].to(cdt)
            z = logits(h, w, b[v0:v0 + v_chunk] if b is not None else None, cfg)
            # softcap: dz/du = 1 - (z / c)^2 (0 for excluded tokens), before z is overwritten
            softcap_grad = None
            if cfg.softcap is not None:
                softcap_grad = torch.where(torch.isneginf(z), 0.0, 1.0 - (z / cfg.softcap) ** 2)
            log_p = z.sub_(lse_c).clamp_(min=_LOG_FLOOR)
            p = torch.exp(log_p)
            # dz = g * onehot - p * (g + e * (log p + H)), in place in p
            if e is None:
                dz = p.mul_(g).neg_()
            else:
                dz = p.mul_(log_p.add_(H).mul_(e).add_(g)).neg_()
            here = (y >= v0) & (y < v0 + w.shape[0])
            col = torch.where(here, y - v0, 0)[:, None]
            dz.scatter_add_(1, col, torch.where(here[:, None], g, 0.0))
            if softcap_grad is not None:
                dz.mul_(softcap_grad)
            if cfg.temperature != 1.0:
                dz.div_(cfg.temperature)
            if need_dh:
                d_hidden[n0:n0 + n_chunk].addmm_(dz, w)
            if need_dw:
                d_weight[v0:v0 + v_chunk].addmm_(dz.T, h)
            if need_db:
                d_bias[v0:v0 + v_chunk] += dz.sum(0)
    return d_hidden, d_weight, d_bias
