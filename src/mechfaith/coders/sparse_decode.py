"""Sparse decoding: decode only the active latents, forward and backward.

A TopK coder with k = 32 of n = 4608 latents uses 0.7 % of the decoder per row, yet a dense
``f W_dec`` and its backward (``f^T g`` for grad W_dec, ``g W_dec^T`` for grad f) cost three
[B, n] x [n, d] matmuls, and the encoder's backward ``x^T g_pre`` a fourth. With the active latents
held as a CSR matrix ``S`` [B, n] (row b: the latents active in input b and their values):

    forward   y            = S W_dec + b_dec                     (sparse x dense, B k d MACs)
    backward  grad values  = (g_y W_dec^T) sampled at S's entries (SDDMM, B k d)
              grad W_dec   = S^T g_y                              (transposed sparse x dense)
              grad W_enc   = (G^T x)^T  with G = grad of the pre-activations at S's entries
              grad b_enc   = G summed over rows (index_add)

so after the encoder's forward matmul ``x W_enc`` (needed to choose the top k) everything costs
O(B k d) instead of O(B n d). Only ``torch.sparse`` CSR kernels are used (MKL on CPU, cuSPARSE on
GPU); no [B k, d] temporaries (gathering decoder rows per entry, as ``embedding_bag``'s CPU
backward does, costs as much as a dense matmul here).

- :func:`sparse_decode`: ``y = S W_dec (+ b_dec)`` for any CSR pattern, with gradients for the
  values, W_dec and b_dec. Entries may hold 0 (e.g. JumpReLU's band near the threshold, where the
  threshold's straight-through gradient needs ``d loss / d f``).
- :class:`SparseTopKFn`: the whole coder pass of a TopK or BatchTopK coder (encoder matmul, top-k,
  sparse decode), with the encoder's backward sparse as well.
- :class:`SparseDecodeCoder`: a :class:`SparseCoder` whose ``forward_full`` takes these paths while
  gradients are on (TopK, BatchTopK: :class:`SparseTopKFn`; JumpReLU: dense encoder, sparse
  decoder); ``enable_sparse_decode(coder)`` switches an existing coder in place. The dense latents
  ``f`` and ``mask`` of its output are built only when read.

Tests check values and every gradient against the dense coder.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from mechfaith.coders import activations as acts
from mechfaith.coders.coder import CoderOutput, SparseCoder
from mechfaith.coders.sparse_jvp import transpose_pattern


def _csr(crow: Tensor, col: Tensor, val: Tensor, rows: int, cols: int) -> Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "CSR support is in beta state"
        return torch.sparse_csr_tensor(crow, col, val, size=(rows, cols), check_invariants=False)


def _transpose(crow: Tensor, col: Tensor, n_cols: int) -> tuple[Tensor, Tensor, Tensor]:
    """CSR structure of the transpose: (order, crow_t [n_cols + 1], col_t).

    ``order`` permutes the entries (row-major) into column-major order; ``col_t`` holds each
    entry's row (:func:`~mechfaith.coders.sparse_jvp.transpose_pattern`, whose sort runs in numpy on
    CPU: torch's CPU sort with 2 threads took 160-180 ms for 32k keys when another process held a
    core, against 1-2 ms in numpy, and a 30-layer set sorts 30 times a step).
    """
    rows = crow.numel() - 1
    row = torch.repeat_interleave(torch.arange(rows, device=crow.device), crow.diff())
    return transpose_pattern(col, row, n_cols)


def _sddmm(crow: Tensor, col: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``(a @ b)`` at the entries of the CSR pattern (values in the pattern's order) [nnz]."""
    pattern = _csr(crow, col, torch.zeros(col.numel(), dtype=a.dtype, device=a.device), a.shape[0], b.shape[1])
    return torch.sparse.sampled_addmm(pattern, a, b, beta=0.0).values()


def _spmm(crow: Tensor, col: Tensor, val: Tensor, rows: int, cols: int, dense: Tensor) -> Tensor:
    return torch.mm(_csr(crow, col, val, rows, cols), dense)


class SparseDecodeFn(torch.autograd.Function):
    """``(crow, col, val, W_dec, b_dec) -> S W_dec (+ b_dec)``; see :func:`sparse_decode`."""

    @staticmethod
    def forward(ctx: Any, crow: Tensor, col: Tensor, val: Tensor, W_dec: Tensor,
                b_dec: Tensor | None) -> Tensor:
        B = crow.numel() - 1
        y = _spmm(crow, col, val, B, W_dec.shape[0], W_dec)
        if b_dec is not None:
            y.add_(b_dec)
        ctx.save_for_backward(crow, col, val, W_dec)
        ctx.has_bias = b_dec is not None
        return y

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        crow, col, val, W_dec = ctx.saved_tensors
        need = ctx.needs_input_grad
        g = g.contiguous()
        g_val = _sddmm(crow, col, g, W_dec.T) if need[2] else None
        g_W = None
        if need[3]:
            order, crow_t, col_t = _transpose(crow, col, W_dec.shape[0])
            g_W = _spmm(crow_t, col_t, val[order], W_dec.shape[0], g.shape[0], g)
        g_b = g.sum(dim=0) if ctx.has_bias and need[4] else None
        return None, None, g_val, g_W, g_b


def sparse_decode(crow: Tensor, col: Tensor, val: Tensor, W_dec: Tensor, b_dec: Tensor | None = None) -> Tensor:
    """``y [B, d] = S W_dec (+ b_dec)`` for the CSR matrix ``S`` [B, n] = (crow [B + 1], col, val).

    Differentiable in ``val`` [nnz], ``W_dec`` [n, d] and ``b_dec`` [d]; the gradient of ``val`` is
    ``d loss / d S`` at every listed entry (zeros included), never at unlisted ones.
    Column indices must be sorted within each row.
    """
    return SparseDecodeFn.apply(crow, col, val, W_dec, b_dec)


def topk_pattern(pre: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """The top-k entries of each row as CSR: (crow [B + 1], col [B k] sorted per row, pre values)."""
    B = pre.shape[0]
    _, idx = pre.topk(k, dim=-1, sorted=False)
    idx, _ = idx.sort(dim=-1)
    vals = pre.gather(1, idx)
    crow = torch.arange(0, B * k + 1, k, device=pre.device)
    return crow, idx.reshape(-1), vals.reshape(-1)


def batchtopk_pattern(pre: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """The ``k * B`` largest entries of the batch as CSR (row-major order)."""
    B, n = pre.shape
    flat = pre.reshape(-1)
    _, pos = flat.topk(min(k * B, flat.numel()), sorted=False)
    pos, _ = pos.sort()
    row = torch.div(pos, n, rounding_mode="floor")
    crow = torch.zeros(B + 1, dtype=torch.long, device=pre.device)
    torch.cumsum(torch.bincount(row, minlength=B), 0, out=crow[1:])
    return crow, pos - row * n, flat[pos]


class SparseTopKFn(torch.autograd.Function):
    """``(x, W_enc, b_enc, W_dec, b_dec, W_skip, k, batch) -> (y_hat, act, crow, col, pre)``.

    x [B, d_in]; ``batch``: BatchTopK (top ``k B`` of the batch) instead of TopK (top k per row).
    act [nnz] = ReLU of the selected pre-activations, (crow, col) their CSR pattern,
    pre [B, n] the pre-activations. Gradients reach x (when needed), the weights and biases,
    through y_hat, act and pre (a gradient arriving at pre, e.g. from AuxK, takes a dense matmul).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, b_dec: Tensor,
                W_skip: Tensor | None, k: int, batch: bool) -> tuple[Tensor, ...]:
        pre = torch.addmm(b_enc, x, W_enc)  # [B, n]
        crow, col, vals = (batchtopk_pattern if batch else topk_pattern)(pre, k)
        act = vals.clamp_min(0)  # [nnz]
        y = _spmm(crow, col, act, x.shape[0], W_enc.shape[1], W_dec)
        y.add_(b_dec)
        if W_skip is not None:
            y.addmm_(x, W_skip)
        ctx.save_for_backward(x, W_enc, W_dec, W_skip, crow, col, act)
        ctx.mark_non_differentiable(crow, col)
        ctx.set_materialize_grads(False)
        return y, act, crow, col, pre

    @staticmethod
    def backward(ctx: Any, g_y: Tensor | None, g_act: Tensor | None, _gc: Any, _gcol: Any,
                 g_pre: Tensor | None) -> tuple[Tensor | None, ...]:
        x, W_enc, W_dec, W_skip, crow, col, act = ctx.saved_tensors
        need = ctx.needs_input_grad
        B, n = x.shape[0], W_enc.shape[1]
        grad_x = grad_W_enc = grad_b_enc = grad_W_dec = grad_b_dec = grad_W_skip = None
        g_val = torch.zeros_like(act) if g_act is None else g_act.clone()  # d loss / d act [nnz]
        order = crow_t = col_t = None
        if g_y is not None:
            g_y = g_y.contiguous()
            g_val += _sddmm(crow, col, g_y, W_dec.T)
            if need[3]:
                order, crow_t, col_t = _transpose(crow, col, n)
                grad_W_dec = _spmm(crow_t, col_t, act[order], n, B, g_y)
            if need[4]:
                grad_b_dec = g_y.sum(dim=0)
            if W_skip is not None and need[5]:
                grad_W_skip = x.T @ g_y
        g_val = g_val * (act > 0)  # ReLU on the selected values; d loss / d pre at the entries
        if need[1]:
            if order is None:
                order, crow_t, col_t = _transpose(crow, col, n)
            assert crow_t is not None and col_t is not None  # set together with order
            grad_W_enc = _spmm(crow_t, col_t, g_val[order], n, B, x).T  # [d_in, n]
            if g_pre is not None:
                grad_W_enc = grad_W_enc + x.T @ g_pre
        if need[2]:
            grad_b_enc = torch.zeros(n, dtype=act.dtype, device=act.device).index_add_(0, col, g_val)
            if g_pre is not None:
                grad_b_enc += g_pre.sum(dim=0)
        if need[0]:
            grad_x = _spmm(crow, col, g_val, B, n, W_enc.T.contiguous())
            if g_pre is not None:
                grad_x += g_pre @ W_enc.T
            if W_skip is not None and g_y is not None:
                grad_x += g_y @ W_skip.T
        return grad_x, grad_W_enc, grad_b_enc, grad_W_dec, grad_b_dec, grad_W_skip, None, None


class SparseCoderOutput(CoderOutput):
    """A :class:`CoderOutput` whose dense latents ``f`` and ``mask`` are built only when read.

    ``act`` [nnz] with the CSR pattern (``crow`` [B + 1], ``col``) holds the active latents; ``f``
    (from ``act`` by a differentiable scatter, so penalties on it reach the weights) and ``mask``
    are [B, n] like the dense path's.
    """

    def __init__(self, y_hat: Tensor, pre: Tensor, act: Tensor, crow: Tensor, col: Tensor) -> None:
        self.y_hat, self.pre, self.act, self.crow, self.col = y_hat, pre, act, crow, col
        self._f: Tensor | None = None
        self._mask: Tensor | None = None

    @property
    def rows(self) -> Tensor:
        """The row of each entry [nnz]."""
        return torch.repeat_interleave(torch.arange(self.pre.shape[0], device=self.pre.device),
                                       self.crow.diff())

    @property
    def f(self) -> Tensor:  # type: ignore[override]
        if self._f is None:
            flat = self.rows * self.pre.shape[1] + self.col
            dense = torch.zeros(self.pre.numel(), dtype=self.act.dtype, device=self.act.device)
            self._f = dense.index_put((flat,), self.act).view(self.pre.shape)
        return self._f

    @property
    def mask(self) -> Tensor:  # type: ignore[override]
        if self._mask is None:
            flat = self.rows * self.pre.shape[1] + self.col
            m = torch.zeros(self.pre.numel(), dtype=torch.bool, device=self.pre.device)
            self._mask = m.index_put_((flat,), self.act.detach() > 0).view(self.pre.shape)
        return self._mask


class SparseDecodeCoder(SparseCoder):
    """A :class:`SparseCoder` that trains through the sparse paths of this module.

    ``forward_full`` with gradients on: TopK and BatchTopK (in training mode) go through
    :class:`SparseTopKFn`; JumpReLU runs the dense encoder and decodes only the active latents
    plus those within the kernel's band of the threshold (whose threshold gradient needs
    ``d loss / d f``). Everything else (ReLU: half the latents are active, the dense fused path
    is faster; eval mode; no gradients; forward_with_jvp) is the dense coder's.
    Same parameters and files as :class:`SparseCoder` (``save_coder`` / ``load_coder`` work).
    """

    def _use_sparse(self, x: Tensor) -> bool:
        if not (torch.is_grad_enabled() and x.ndim == 2 and x.shape[0] > 0):
            return False
        if x.dtype not in (torch.float32, torch.float64):
            return False
        a = self.cfg.activation
        return a == "topk" or a == "jumprelu" or (a == "batchtopk" and self.training)

    def forward_full(self, x: Tensor) -> CoderOutput:
        if not self._use_sparse(x):
            return super().forward_full(x)
        a = self.cfg.activation
        if a in ("topk", "batchtopk"):
            y, act, crow, col, pre = SparseTopKFn.apply(x, self.W_enc, self.b_enc, self.W_dec, self.b_dec,
                                                        self.W_skip, self.cfg.k, a == "batchtopk")
            out = SparseCoderOutput(y, pre, act, crow, col)
            if a == "batchtopk":
                self._update_batchtopk_threshold_sparse(act)
            return out
        return self._jumprelu(x)

    @torch.no_grad()
    def _update_batchtopk_threshold_sparse(self, act: Tensor) -> None:
        big = torch.finfo(act.dtype).max
        low = torch.where(act > 0, act, big).amin().to(self.batchtopk_threshold.dtype)
        thr = self.batchtopk_threshold
        m = self.cfg.batchtopk_momentum
        new = torch.where(thr < 0, low, thr + m * (low - thr))
        self.batchtopk_threshold.copy_(torch.where(low < big, new, thr))

    def _jumprelu(self, x: Tensor) -> CoderOutput:
        pre = self.encode_pre(x)  # [B, n], dense (autograd)
        theta = self.threshold()
        eps = self.cfg.jumprelu_bandwidth
        with torch.no_grad():
            keep = (pre > theta) | ((pre - theta).abs() < eps / 2)  # active or in the band
            row, col = keep.nonzero(as_tuple=True)  # row-major: CSR order
            crow = torch.zeros(pre.shape[0] + 1, dtype=torch.long, device=pre.device)
            torch.cumsum(torch.bincount(row, minlength=pre.shape[0]), 0, out=crow[1:])
        vals = acts._JumpReLUFn.apply(pre[row, col], theta[col], eps)  # [nnz], 0 in the band
        y = sparse_decode(crow, col, vals, self.W_dec, self.b_dec)
        if self.W_skip is not None:
            y = torch.addmm(y, x, self.W_skip)
        out = SparseCoderOutput(y, pre, vals, crow, col)
        return out


def enable_sparse_decode(coder: SparseCoder) -> SparseDecodeCoder:
    """Switch ``coder`` (same object, same parameters) to the sparse training paths; returns it."""
    if not isinstance(coder, SparseCoder):
        raise TypeError(f"enable_sparse_decode needs a SparseCoder, got {type(coder).__name__}")
    coder.__class__ = SparseDecodeCoder
    return coder  # type: ignore[return-value]


def _flat_rows(K: int, B: int, n: int, keep: Tensor, device: torch.device) -> Tensor:
    """For each kept entry (row-major), the offset ``(i B + b) n`` of its row in pre [K, B, n] flattened."""
    rows = torch.arange(K * B, device=device).view(K, B, 1).expand_as(keep)
    return rows[keep] * n


def _member_offset(col: Tensor, n: int) -> Tensor:
    """``i n`` for block columns ``i n + latent``."""
    return torch.div(col, n, rounding_mode="floor") * n


class StackedSparseTopKFn(torch.autograd.Function):
    """K TopK coders sharing one input (a sweep), sparse like :class:`SparseTopKFn`.

    ``(x [B, d_in], W_enc [K, d_in, n], b_enc [K, n], W_dec [K, n, d_out], b_dec [K, d_out],
    k_mask [K, k_max], width_mask [K, n]) -> (y_hat [K, B, d_out], act [nnz], col [nnz], pre)``.
    Member i keeps its ``k_i`` largest pre-activations among its first ``width_i`` latents: every
    row selects ``k_max`` entries and ``k_mask`` zeroes ranks ``>= k_i`` (value and gradient). The K
    members form one block-diagonal CSR matrix [K B, K n] (row ``i B + b``, column ``i n + latent``,
    ``col`` holds these), so each sparse product runs once for all members.
    No gradient for x (a sweep trains on fixed activations). ``bf16``: the encoder's matmul (the
    only dense one) runs in bfloat16 (mixed precision); everything else in the weights' dtype.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, b_dec: Tensor,
                k_mask: Tensor, width_mask: Tensor, bf16: bool = False) -> tuple[Tensor, ...]:
        K, B, n, k_max = W_enc.shape[0], x.shape[0], W_enc.shape[2], k_mask.shape[1]
        xs = x.unsqueeze(0).expand(K, B, x.shape[1])
        if bf16:
            pre = torch.bmm(xs.bfloat16(), W_enc.bfloat16()).to(W_enc.dtype).add_(b_enc.unsqueeze(1))
        else:
            pre = torch.baddbmm(b_enc.unsqueeze(1), xs, W_enc)  # [K, B, n]
        masked = pre.masked_fill(width_mask.unsqueeze(1) == 0, float("-inf"))
        _, idx = masked.topk(k_max, dim=-1, sorted=True)  # [K, B, k_max], ranks in order
        keep = k_mask.bool().unsqueeze(1).expand(K, B, k_max)  # member i keeps ranks < k_i
        # CSR: the kept columns of each row, sorted (dropped ranks pushed to the end, then cut)
        idx, _ = idx.masked_fill(~keep, n).sort(dim=-1)
        idx = idx + (torch.arange(K, device=x.device) * n).view(K, 1, 1)
        col = idx[keep]  # [nnz], row-major
        act = pre.reshape(-1).gather(0, _flat_rows(K, B, n, keep, x.device) + col - _member_offset(col, n)).clamp_min(0)
        per_row = k_mask.sum(dim=1).to(torch.long).repeat_interleave(B)  # [K B]
        crow = torch.zeros(K * B + 1, dtype=torch.long, device=x.device)
        torch.cumsum(per_row, 0, out=crow[1:])
        y = _spmm(crow, col, act, K * B, K * n, W_dec.reshape(K * n, -1)).view(K, B, -1)
        y.add_(b_dec.unsqueeze(1))
        ctx.save_for_backward(x, W_enc, W_dec, crow, col, act)
        ctx.mark_non_differentiable(col)
        ctx.set_materialize_grads(False)
        return y, act, col, pre

    @staticmethod
    def backward(ctx: Any, g_y: Tensor | None, g_act: Tensor | None, _gcol: Any,
                 g_pre: Tensor | None) -> tuple[Tensor | None, ...]:
        x, W_enc, W_dec, crow, col, act = ctx.saved_tensors
        K, B, n = W_enc.shape[0], x.shape[0], W_enc.shape[2]
        need = ctx.needs_input_grad
        grad_W_enc = grad_b_enc = grad_W_dec = grad_b_dec = None
        g_val = torch.zeros_like(act) if g_act is None else g_act.clone()
        order, crow_t, row_t = _transpose(crow, col, K * n)
        if g_y is not None:
            g2 = g_y.reshape(K * B, -1).contiguous()
            g_val += _sddmm(crow, col, g2, W_dec.reshape(K * n, -1).T)
            if need[3]:
                grad_W_dec = _spmm(crow_t, row_t, act[order], K * n, K * B, g2).view_as(W_dec)
            if need[4]:
                grad_b_dec = g_y.sum(dim=1)
        g_val = g_val * (act > 0)
        if need[1]:
            # G^T [K n, B] @ x: the entry of row i B + b multiplies x[b]
            grad_W_enc = _spmm(crow_t, row_t % B, g_val[order], K * n, B, x).view(K, n, -1).transpose(1, 2)
            if g_pre is not None:
                grad_W_enc = grad_W_enc + torch.matmul(x.T, g_pre)
        if need[2]:
            grad_b_enc = torch.zeros(K * n, dtype=act.dtype, device=act.device).index_add_(0, col, g_val).view(K, n)
            if g_pre is not None:
                grad_b_enc += g_pre.sum(dim=1)
        return None, grad_W_enc, grad_b_enc, grad_W_dec, grad_b_dec, None, None, None
