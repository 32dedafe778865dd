"""ALiBi head slopes (Press et al., "Train Short, Test Long").

Head h of n gets slope 2^(-max_bias * (h + 1) / n) when n is a power of two. For
other n, the first 2^floor(log2 n) heads take those slopes and the remaining heads
take every other slope of the next power of two (odd multiples), as BLOOM, MPT,
Falcon and Baichuan all do. The attention kernels add `slope * (kv_pos - q_pos)`.
"""

from __future__ import annotations

import math


def alibi_slopes(num_heads: int, max_bias: float = 8.0) -> tuple[float, ...]:
    closest = 2 ** math.floor(math.log2(num_heads))
    slopes = [2.0 ** (-max_bias * i / closest) for i in range(1, closest + 1)]
    extra = num_heads - closest
    slopes += [2.0 ** (-max_bias * i / (2 * closest)) for i in range(1, 2 * extra, 2)]
    return tuple(slopes)
