"""Ordering the rows of a similarity matrix so that alike rows sit side by side (for clustered heatmaps).

Hierarchical clustering from `scipy.cluster.hierarchy` (needs the [lab] extra): average linkage on the
distance `max(similarity) - similarity`, leaves in scipy's optimal order (adjacent leaves as alike as the
tree allows). The core library does not depend on scipy; only the notebooks' figures use this.
"""

from __future__ import annotations

import numpy as np

__all__ = ["cluster_order"]


def cluster_order(similarity, *, method: str = "average", nan: float | None = None) -> np.ndarray:
    """Leaf order (an index array) of a hierarchical clustering of a symmetric similarity matrix.

    similarity: (n, n) array-like (numpy or torch), larger = more alike; e.g. a co-activation lift or its
        log. It is symmetrized; the diagonal is ignored.
    method: the linkage rule of `scipy.cluster.hierarchy.linkage` that works on any distance
        ("average", "complete", "single", "weighted").
    nan: what a NaN entry counts as (None: the least similar finite value, e.g. pairs of an unused expert).
    Deterministic for a given matrix. Returns an int64 permutation of range(n).
    """
    from scipy.cluster.hierarchy import leaves_list, linkage
    from scipy.spatial.distance import squareform

    if method not in ("average", "complete", "single", "weighted"):
        raise ValueError(f"method {method!r}: use average, complete, single or weighted (any-distance rules)")
    s = np.array(similarity.detach().cpu() if hasattr(similarity, "detach") else similarity, dtype=np.float64)
    if s.ndim != 2 or s.shape[0] != s.shape[1]:
        raise ValueError(f"similarity must be a square matrix, got shape {s.shape}")
    n = s.shape[0]
    if n < 3:
        return np.arange(n, dtype=np.int64)
    off = ~np.eye(n, dtype=bool)
    finite = s[off & np.isfinite(s)]
    fill = nan if nan is not None else (finite.min() if finite.size else 0.0)
    s = np.where(np.isfinite(s), s, fill)
    s = (s + s.T) / 2
    d = s[off].max() - s
    np.fill_diagonal(d, 0.0)
    tree = linkage(squareform(d, checks=False), method=method, optimal_ordering=True)
    return leaves_list(tree).astype(np.int64)
