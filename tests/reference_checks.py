"""The float64 comparison every operator test makes: batched output and gradients against a per-sample
reference computed from the paper's equations."""

from __future__ import annotations

import torch

TOL = dict(rtol=0.0, atol=1e-10)


def assert_matches_reference(y, y_ref, x, x_ref, names, params):
    """y == y_ref, and the gradients w.r.t. the input and every parameter agree, for one random grad_out.

    Each reference gradient must be non-zero somewhere: a zero one would make its comparison vacuous.
    """
    assert y.shape == y_ref.shape
    torch.testing.assert_close(y, y_ref, **TOL)
    grad_out = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    grads = torch.autograd.grad(y, [x, *params], grad_out)
    grads_ref = torch.autograd.grad(y_ref, [x_ref, *params], grad_out)
    for name, g, g_ref in zip(["input", *names], grads, grads_ref):
        assert g_ref.abs().max() > 0, f"reference gradient of {name} is zero: the check would be vacuous"
        torch.testing.assert_close(g, g_ref, **TOL, msg=lambda m: f"d/d{name}: {m}")
