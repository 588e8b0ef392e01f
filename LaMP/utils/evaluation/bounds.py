"""The generalisation certificate of choosing one of N fixed adapters on a user's profile."""
from __future__ import annotations

import math

from LaMP.utils.errors import LampError


def selection_bound(support_error: float, candidates: int, support_size: int,
                    delta: float) -> float:
    """err_query <= err_support + sqrt(ln(N / delta) / (2 m)) with probability 1 - delta,
    for a loss in [0, 1] and any rule that picks one of N fixed adapters from m support
    examples drawn like the query (Hoeffding's inequality and a union bound over the N)."""
    if candidates < 1 or support_size < 1 or not 0 < delta < 1:
        raise LampError(f"the bound needs N >= 1, m >= 1 and 0 < delta < 1 (N {candidates}, "
                        f"m {support_size}, delta {delta})")
    return support_error + math.sqrt(math.log(candidates / delta) / (2 * support_size))
