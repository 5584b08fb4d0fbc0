"""Newton-Schulz orthogonalization, the heart of Muon.

Muon replaces a matrix update ``G = U S V^T`` by (approximately) ``U V^T``: every direction the
gradient moves in gets the same step size, whatever its singular value. Computing the SVD is too slow,
so Muon runs a few steps of an odd matrix polynomial that pushes every singular value towards 1:

    X <- G / ||G||_F                           (all singular values now in (0, 1])
    repeat `steps` times:  X <- a X + (b A + c A A) X,   A = X X^T

Because ``X X^T X = U S^3 V^T``, each step maps every singular value ``s`` through the scalar quintic
``p(s) = a s + b s^3 + c s^5`` and leaves ``U`` and ``V`` alone. Keller Jordan's coefficients
``(3.4445, -4.7750, 2.0315)`` make ``p'(0) = a`` large, so that small singular values grow fast, at the
price of not converging exactly to 1: after 5 steps every singular value that started at
``s / ||G||_F >= 0.01`` ends in ``[0.6818, 1.1344]`` (iterate ``p`` on a grid to see it; the tests do).

The iteration works on the wide orientation (rows <= columns) so that ``A`` is the smaller Gram matrix.
"""

from __future__ import annotations

import torch
from einops import rearrange

__all__ = ["NS_COEFFICIENTS", "default_ns_dtype", "newton_schulz", "ns_singular_value_map"]

# (a, b, c) of the quintic; the values Muon, Moonlight, K2 and torch.optim.Muon all use.
NS_COEFFICIENTS: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)


def default_ns_dtype(device: torch.device | str) -> torch.dtype:
    """bfloat16 on CUDA (fast there, and what K2 / torch.optim.Muon use), float32 elsewhere.

    On CPUs without native bf16 a bf16 matmul is many times slower than float32; float32 also keeps
    CPU runs (tests, notebooks) close to exact arithmetic.
    """
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def newton_schulz(
    G: torch.Tensor,
    steps: int = 5,
    eps: float = 1e-7,
    dtype: torch.dtype | None = None,
    coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
) -> torch.Tensor:
    """Approximately orthogonalize the last two dims of ``G`` ([..., A, B]); a pure function.

    Leading dims are a batch: a stack of experts ``[E, A, B]`` is orthogonalized expert by expert in one
    batched matmul chain. The result has ``G``'s shape and ``dtype`` (default: ``default_ns_dtype``);
    the caller decides how to round it back.

    In half precision the numerics follow ``torch.optim.Muon`` op for op (cast, transpose when A > B,
    divide by ``max(||X||_F, eps)``, ``addmm`` for ``b A + c A A`` and for ``a X + B X``), so that with
    ``dtype=torch.bfloat16`` a 2-D input reproduces torch's result bit for bit. In float32/64 the last
    product is computed as ``(B + a I) X`` (same math, one pass fewer).
    """
    if G.ndim < 2:
        raise ValueError(f"newton_schulz needs a matrix or a stack of matrices [..., A, B], got shape {tuple(G.shape)}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps!r}")
    a, b, c = coefficients
    dtype = default_ns_dtype(G.device) if dtype is None else dtype

    X = G.to(dtype)
    tall = G.size(-2) > G.size(-1)
    if tall:
        X = X.mT  # (..., B, A): iterate on the wide side, the Gram matrix is min(A, B) square
    norm = torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True)
    X = X / norm.clamp(min=eps)  # spectral norm <= Frobenius norm <= 1

    batch_shape = X.shape[:-2]
    if X.ndim > 3:
        X = rearrange(X, "... a b -> (...) a b")
    addmm = torch.addmm if X.ndim == 2 else torch.baddbmm  # fused beta * input + alpha * (m1 @ m2)
    # the product matmul dispatches to, called directly: matmul's broadcasting (expand, reshape) costs ~6 ops a call
    mm = torch.mm if X.ndim == 2 else torch.bmm
    # a X + B X = (B + a I) X. Folding a into B's small diagonal saves a full-size pass over X per
    # step (addmm first copies its input into the output), ~30% of the time on CPU. Half precision
    # keeps torch's addmm form: there a + B_ii would be rounded to 8 bits, and we match torch exactly.
    if dtype in (torch.float32, torch.float64):
        # Products go into buffers allocated once: a fresh multi-MB tensor per product costs the
        # allocator an mmap and page faults each time, which on CPU took as long as the matmuls.
        gram = X.shape[:-1] + X.shape[-2:-1]
        A, B = X.new_empty(gram), X.new_empty(gram)
        Y = torch.empty(X.shape, dtype=X.dtype, device=X.device)
        for _ in range(steps):
            mm(X, X.mT, out=A)  # (..., min, min) Gram matrix
            addmm(A, A, A, beta=b, alpha=c, out=B)  # b A + c A^2
            B.diagonal(dim1=-2, dim2=-1).add_(a)
            mm(B, X, out=Y)
            # the old X becomes the next output buffer, unless it is the caller's transposed view
            X, Y = Y, (X if X.is_contiguous() else torch.empty_like(Y))
    else:
        for _ in range(steps):
            A = X @ X.mT
            B = addmm(A, A, A, beta=b, alpha=c)
            X = addmm(X, B, X, beta=a)
    X = X.reshape(*batch_shape, *X.shape[-2:])

    return X.mT if tall else X


def ns_singular_value_map(
    s: torch.Tensor, steps: int = 5, coefficients: tuple[float, float, float] = NS_COEFFICIENTS
) -> torch.Tensor:
    """Where ``newton_schulz`` sends a normalized singular value ``s = sigma / ||G||_F`` (exact arithmetic)."""
    a, b, c = coefficients
    for _ in range(steps):
        s = a * s + b * s**3 + c * s**5
    return s
