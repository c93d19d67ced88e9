"""Reference importance scoring and token selection in NumPy.

* ``probe_positions``: the ``ceil(recent·L)`` most recent positions plus ``ceil(random·L)``
  distinct random earlier ones (a partial Fisher-Yates shuffle driven by SplitMix64, so the
  choice is reproducible across the core and this reference).
* ``probe_scores``: causal softmax of the probe rows only; ``acc[b, h, j]`` sums the
  probability token ``j`` received over probe rows and the query heads of kv-head ``h``'s
  GQA group; ``count[b, h, j]`` is the number of probe rows that can see ``j`` (``exact``)
  or ``L - j`` (``full_matrix``, ZipCache's public code).
* ``top_k``: indices of the ``k`` largest scores, ties to the higher index (more recent).
* ``heavy_and_recent``: H2O/MiKV's important set — the most recent tokens plus the
  best-scored of the rest, within a budget.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

F32 = np.float32
MASK64 = (1 << 64) - 1


def _splitmix64(state: int) -> tuple[int, int]:
    state = (state + 0x9E3779B97F4A7C15) & MASK64
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return state, z ^ (z >> 31)


def probe_positions(
    length: int, recent: float = 0.05, random: float = 0.05, seed: int = 0
) -> list[int]:
    n_recent = min(max(int(np.ceil(recent * length)), 1 if length > 0 else 0), length)
    earlier = length - n_recent
    n_random = min(int(np.ceil(random * length)), earlier)
    pool = list(range(earlier))
    state = seed
    for i in range(n_random):
        state, z = _splitmix64(state)
        j = i + z % (earlier - i)
        pool[i], pool[j] = pool[j], pool[i]
    return sorted(pool[:n_random] + list(range(earlier, length)))


def probe_scores(
    q: npt.ArrayLike,
    k: npt.ArrayLike,
    probes: list[int],
    scale: float,
    first_valid: list[int] | None = None,
    count_mode: str = "exact",
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    q = np.asarray(q, dtype=F32)
    k = np.asarray(k, dtype=F32)
    b, hq, length, _ = q.shape
    hk = k.shape[1]
    rep = hq // hk
    first_valid = first_valid or [0] * b
    acc = np.zeros((b, hk, length), F32)
    count = np.zeros((b, hk, length), F32)
    for bi in range(b):
        start = first_valid[bi]
        rows = [p for p in probes if p >= start]
        for h in range(hk):
            for r in range(rep):
                for p in rows:
                    logits = (k[bi, h, start : p + 1] @ q[bi, h * rep + r, p]) * F32(scale)
                    w = np.exp(logits - logits.max())
                    acc[bi, h, start : p + 1] += w / w.sum()
            j = np.arange(start, length)
            if count_mode == "exact":
                count[bi, h, start:] = [sum(p >= jj for p in probes) for jj in j]
            else:
                count[bi, h, start:] = length - j
    return acc, count


def normalized(acc: npt.ArrayLike, count: npt.ArrayLike) -> npt.NDArray[np.float32]:
    acc = np.asarray(acc, dtype=F32)
    count = np.asarray(count, dtype=F32)
    out: npt.NDArray[np.float32] = np.divide(acc, count, out=np.zeros_like(acc), where=count > 0)
    return out


def top_k(scores: npt.ArrayLike, k: int) -> list[int]:
    s = np.nan_to_num(np.asarray(scores, dtype=F32), nan=-np.inf)
    # Sort by score descending, then index descending (ties to the more recent token).
    order = sorted(range(len(s)), key=lambda i: (-s[i], -i))
    return sorted(order[:k])


def heavy_and_recent(
    positions: npt.ArrayLike,
    scores: npt.ArrayLike,
    valid: npt.ArrayLike,
    budget: int,
    n_recent: int,
) -> npt.NDArray[np.bool_]:
    """Boolean mask of the important tokens among candidates."""
    positions = np.asarray(positions)
    scores = np.asarray(scores, dtype=F32)
    valid = np.asarray(valid, dtype=bool)
    important = np.zeros(len(positions), dtype=bool)
    cand = [i for i in np.argsort(-positions, kind="stable") if valid[i]]
    n_recent = min(n_recent, budget, len(cand))
    important[cand[:n_recent]] = True
    rest = sorted(cand[n_recent:], key=lambda i: positions[i])  # oldest first
    for j in top_k(scores[rest], budget - n_recent):
        important[rest[j]] = True
    return important
