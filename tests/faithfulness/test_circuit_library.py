"""The circuit-library decomposition and its non-negative lasso solver, on known answers."""

from __future__ import annotations

import pytest
import torch

from mechfaith.errors import ConfigError, InputError
from mechfaith.faithfulness.circuit_library import CircuitLibrary, decompose, nonneg_lasso
from mechfaith.toy.data import datapoint
from mechfaith.toy.library import abs_library, library_sample
from tests.faithfulness.test_memorization import D, ideal_coder, plant_datapoint


def _kkt_ok(A, v, c, alpha, tol=1e-6):
    """Optimality of argmin_{c>=0} 1/2||Ac-v||^2 + alpha||v|| sum c (independent of the solver)."""
    grad = A.T @ (A @ c - v) + alpha * v.norm()
    on = c > 1e-9
    return bool((grad[on].abs() < tol).all()) and bool((grad[~on] > -tol).all())


def test_nonneg_lasso_satisfies_kkt_and_matches_nnls():
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(40, 6, generator=gen, dtype=torch.float64)
    V = torch.randn(40, 5, generator=gen, dtype=torch.float64)
    for alpha in (0.0, 0.05):
        C = nonneg_lasso(A, V, alpha=alpha, max_iter=5000, tol=1e-12)
        assert bool((C >= 0).all())
        for k in range(V.shape[1]):
            assert _kkt_ok(A, V[:, k], C[:, k], alpha)
    scipy_opt = pytest.importorskip("scipy.optimize")
    C0 = nonneg_lasso(A, V, alpha=0.0, max_iter=5000, tol=1e-12)
    for k in range(V.shape[1]):
        ref, _ = scipy_opt.nnls(A.numpy(), V[:, k].numpy())
        torch.testing.assert_close(C0[:, k], torch.from_numpy(ref), atol=1e-6, rtol=1e-6)


def test_nonneg_lasso_recovers_planted_sparse_combination():
    gen = torch.Generator().manual_seed(1)
    A = torch.randn(60, 8, generator=gen, dtype=torch.float64)
    c_true = torch.tensor([0, 2.0, 0, 0, 0.5, 0, 0, 0], dtype=torch.float64)
    C = nonneg_lasso(A, (A @ c_true).unsqueeze(1), alpha=0.0, max_iter=5000, tol=1e-12)
    torch.testing.assert_close(C[:, 0], c_true, atol=1e-6, rtol=0)


def test_nonneg_lasso_rejects_bad_shapes():
    with pytest.raises(InputError):
        nonneg_lasso(torch.ones(3, 2), torch.ones(4, 1))
    with pytest.raises(InputError, match="all-zero column"):
        nonneg_lasso(torch.zeros(3, 2), torch.ones(3, 1))


def test_ideal_coder_maps_each_feature_to_its_own_circuit():
    p = datapoint(D)
    lib = abs_library(p)
    c = ideal_coder()
    dec = decompose(c, lib, library_sample(p, 3000, 0.3))
    live = 2 * D
    assert dec.names[-1] == "residual" and len(dec.names) == 2 * D + 2
    assert dec.alive[:live].all() and not bool(dec.alive[live])
    # latent i <-> "+x{i+1}" (row i), latent d+i <-> "-x{i+1}" (row d+i)
    assert dec.best()[:live].tolist() == list(range(live))
    diag = dec.share[torch.arange(live), torch.arange(live)]
    assert float(diag.min()) > 0.99
    assert float(dec.residual()[:live].max()) < 0.01
    off = dec.share[:-1, :live].clone()
    off[torch.arange(live), torch.arange(live)] = 0
    assert float(off.max()) < 1e-3
    assert dec.order()[:live] == list(range(live)) and dec.order()[-1] == live
    assert int(dec.best()[live]) == -1


def test_planted_datapoint_feature_is_found_by_the_decomposition():
    p = datapoint(D)
    lib = abs_library(p)
    c = ideal_coder()
    plant_datapoint(c, p, scale=0.5, bias=-2.0)  # exactly 0.5 x the library's datapoint circuit
    dec = decompose(c, lib, library_sample(p, 3000, 0.3))
    k = lib.names.index("datapoint")
    assert int(dec.best()[-1]) == k
    assert float(dec.share[k, -1]) > 0.99 and float(dec.residual()[-1]) < 0.01
    torch.testing.assert_close(dec.coef[k, -1] / torch.linalg.vector_norm(lib.matrix(
        library_sample(p, 3000, 0.3))[:, k]), torch.tensor(0.5), atol=5e-3, rtol=0)


def test_unexplained_feature_lands_in_the_residual():
    p = datapoint(D)
    c = ideal_coder()
    with torch.no_grad():  # reads x1 and writes -e2: no library circuit writes negative outputs
        c.W_enc[:, -1] = torch.eye(D)[0]
        c.b_enc[-1] = 0.0
        c.W_dec[-1] = -torch.eye(D)[1]
    dec = decompose(c, abs_library(p), library_sample(p, 2000, 0.3))
    assert float(dec.residual()[-1]) > 0.99


def test_library_validation():
    with pytest.raises(ConfigError):
        CircuitLibrary(["a"], [])
    p = datapoint(D)
    sample = torch.zeros(10, D)  # no input ever activates any circuit
    with pytest.raises(InputError, match="never contribute"):
        decompose(ideal_coder(), abs_library(p), sample)
