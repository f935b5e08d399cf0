"""Float32 rounding bounds shared by the parity tests (see each test for the reductions it counts)."""

from __future__ import annotations

import math

U = 2.0**-24  # unit roundoff of float32


def rounding_tolerance(reductions: int) -> float:
    """Relative bound on the float32 rounding of a network whose reductions have `reductions` terms in all.

    A length-k sum rounds by at most 6 sqrt(k) u of its terms' magnitudes, in any order, but with a
    probability of failure below 1e-8 (Higham & Mary 2019, lambda = 6); independent errors of the
    chained reductions add in quadrature. Holds on any IEEE-754 CPU: instruction sets, blocking and
    threads change the order of the sums and the last bit of exp, tanh, sin, sigmoid and the like, nothing
    else.
    """
    return 6 * U * math.sqrt(reductions)
