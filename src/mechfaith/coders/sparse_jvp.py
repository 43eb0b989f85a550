"""The coder's Jacobian-vector product through the active latents only (TopK, BatchTopK).

The coder's JVP at x is ``J v = W_dec^T (m * (W_enc^T v)) (+ W_skip^T v)`` with ``m`` the derivative
mask of the latents. A TopK coder keeps k of n latents per row (BatchTopK: k B of the batch's
n B), so with the mask held as a CSR matrix ``M`` [B, n] (row b: the latents active at x_b):

    forward   t        = (v W_enc) sampled at M's entries        (SDDMM, [nnz], B k d MACs)
              J v      = T W_dec (+ v W_skip)                    (T = CSR(M's pattern, t), spmm)
    backward  g_t      = (g_jv W_dec^T) sampled at M's entries   (SDDMM)
              grad W_dec = T^T g_jv                              (transposed pattern, spmm)
              grad W_enc = (G^T v)^T,  G = CSR(M's pattern, g_t)  (transposed pattern, spmm)
              grad v     = G W_enc^T (+ g_jv W_skip^T)           (spmm; only when v needs it)
              grad W_skip = v^T g_jv                             (dense, as in the dense path)

Everything but the skip costs O(B k d) instead of the dense path's O(B n d): for 576 -> 4608 with
k = 32 about 144x fewer FLOPs in the tangent branch; measured (2-core CPU, float32, batch 4096)
33 ms vs 604 ms for the JVP's forward + backward (benchmarks/README.md). The mask is piecewise constant in x and the
weights, so (as in the dense path) nothing reaches x or b_enc through ``J v``.

The gather-dots (SDDMM) run as ``torch.sparse.sampled_addmm`` on the CSR pattern, the sparse x dense
products as weighted ``embedding_bag`` sums (faster than CSR ``mm`` on CPU); no [nnz, d] gathers of
weight rows are materialised. :func:`sparse_jvp` is what :meth:`SparseCoder.forward_with_jvp` calls for
coders with ``coder.sparse_jvp = True`` (the default for TopK and BatchTopK); tests compare values
and every gradient with the dense path and with ``torch.func.jvp`` (tests/test_sparse_jvp.py).
It supports first-order reverse mode only (no double backward, no ``torch.func`` transforms).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def _csr(crow: Tensor, col: Tensor, val: Tensor, rows: int, cols: int) -> Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Sparse CSR tensor support is in beta state"
        return torch.sparse_csr_tensor(crow, col, val, size=(rows, cols), check_invariants=False)


def mask_pattern(mask: Tensor, n_probes: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    """CSR pattern of a bool mask [B, n], repeated for p probes: ``(crow [p B + 1], col, row)``.

    ``col`` and ``row`` [p nnz] are each entry's column and row, row-major (columns sorted within a
    row); row ``q B + b`` has the pattern of row b.
    """
    B = mask.shape[0]
    nz = mask.nonzero()  # [nnz, 2], row-major
    row, col = nz[:, 0], nz[:, 1]
    if n_probes > 1:
        offsets = torch.arange(n_probes, device=mask.device).repeat_interleave(row.numel()) * B
        row = row.repeat(n_probes) + offsets
        col = col.repeat(n_probes)
    bounds = torch.arange(n_probes * B + 1, device=mask.device)
    crow = torch.searchsorted(row, bounds)  # no bincount / mask.sum: cheaper on a busy CPU
    return crow, col.contiguous(), row.contiguous()


def stable_argsort(keys: Tensor) -> Tensor:
    """Stable argsort of a 1-D integer tensor.

    On CPU via numpy: torch 2.13's CPU ``sort`` took 280 ms for 131k int64 keys with 2 threads on
    the shared 2-core machine, vs 1.5 ms with 1 thread and 11 ms for numpy's stable sort.
    """
    if keys.device.type == "cpu":
        return torch.from_numpy(np.argsort(keys.numpy(), kind="stable"))
    return torch.sort(keys, stable=True).indices


def transpose_pattern(col: Tensor, row: Tensor, n_cols: int) -> tuple[Tensor, Tensor, Tensor]:
    """CSR structure of the transposed pattern: ``(order, crow_t [n_cols + 1], col_t)``.

    ``order`` permutes the entries (row-major) into column-major order (a stable sort by column:
    rows stay ascending within a column); ``col_t`` is each of those entries' row.
    """
    order = stable_argsort(col)
    bounds = torch.arange(n_cols + 1, device=col.device)
    crow_t = torch.searchsorted(col[order], bounds)
    return order, crow_t, row[order]


def _sddmm(crow: Tensor, col: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``(a @ b)`` at the entries of the CSR pattern, in the pattern's order [nnz]."""
    if col.numel() == 0:
        return a.new_zeros(0)
    pattern = _csr(crow, col, a.new_zeros(col.numel()), a.shape[0], b.shape[1])
    return torch.sparse.sampled_addmm(pattern, a, b, beta=0.0).values()


def _spmm(crow: Tensor, col: Tensor, val: Tensor, rows: int, dense: Tensor) -> Tensor:
    """CSR(crow, col, val) [rows, dense.shape[0]] @ dense -> [rows, d].

    As a weighted ``embedding_bag`` (sum of the listed rows of ``dense`` per output row): measured
    12 ms vs 56 ms for MKL's CSR x dense ``mm`` at 4096 x 4608 (k = 32 per row) x 576 float32.
    """
    if col.numel() == 0:
        return dense.new_zeros(rows, dense.shape[1])
    return F.embedding_bag(col, dense, crow, mode="sum", per_sample_weights=val,
                           include_last_offset=True)


class SparseJvpFn(torch.autograd.Function):
    """``(v, crow, col, row, W_enc, W_dec, W_skip) -> J v`` [rows, d_out] on a fixed CSR mask pattern.

    v [rows, d_in] (probes stacked along the batch, the pattern repeated to match); (crow, col, row)
    the pattern of the derivative mask (entries where it is 1, see :func:`mask_pattern`);
    W_skip may be None.
    """

    @staticmethod
    def forward(ctx: Any, v: Tensor, crow: Tensor, col: Tensor, row: Tensor, W_enc: Tensor,
                W_dec: Tensor, W_skip: Tensor | None) -> Tensor:
        rows, _n = v.shape[0], W_enc.shape[1]
        v = v.contiguous()
        t = _sddmm(crow, col, v, W_enc)  # [nnz] latents' tangent at the active entries
        jv = _spmm(crow, col, t, rows, W_dec)  # [rows, d_out]
        if W_skip is not None:
            jv.addmm_(v, W_skip)
        ctx.save_for_backward(v, crow, col, row, W_enc, W_dec, W_skip, t)
        return jv

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        v, crow, col, row, W_enc, W_dec, W_skip, t = ctx.saved_tensors
        need = ctx.needs_input_grad
        rows, n = v.shape[0], W_enc.shape[1]
        g = g.contiguous()
        grad_v = grad_W_enc = grad_W_dec = grad_W_skip = None
        g_t = _sddmm(crow, col, g, W_dec.T) if (need[0] or need[4]) else None  # [nnz]
        if need[4] or need[5]:
            order, crow_t, col_t = transpose_pattern(col, row, n)
            if need[5]:
                grad_W_dec = _spmm(crow_t, col_t, t[order], n, g)  # [n, d_out]
            if need[4]:
                assert g_t is not None  # computed above when need[4]
                grad_W_enc = _spmm(crow_t, col_t, g_t[order], n, v).T  # [d_in, n]
        if need[0]:
            assert g_t is not None  # computed above when need[0]
            grad_v = _spmm(crow, col, g_t, rows, W_enc.T.contiguous())
            if W_skip is not None:
                grad_v.addmm_(g, W_skip.T)
        if W_skip is not None and need[6]:
            grad_W_skip = torch.mm(v.T, g)
        return grad_v, None, None, None, grad_W_enc, grad_W_dec, grad_W_skip


def sparse_jvp(mask: Tensor, v: Tensor, W_enc: Tensor, W_dec: Tensor,
               W_skip: Tensor | None = None) -> Tensor:
    """``J v`` of a coder whose derivative mask at x is ``mask`` [B, n] (bool), through its entries.

    ``v`` is [B, d_in] or [n_probes, B, d_in]; returns [B, d_out] or [n_probes, B, d_out],
    differentiable in v, W_enc, W_dec and W_skip (never in the mask).
    """
    B = mask.shape[0]
    p = v.shape[0] if v.ndim == 3 else 1
    crow, col, row = mask_pattern(mask, p)
    jv = SparseJvpFn.apply(v.reshape(p * B, v.shape[-1]), crow, col, row, W_enc, W_dec, W_skip)
    return jv.view(p, B, -1) if v.ndim == 3 else jv
