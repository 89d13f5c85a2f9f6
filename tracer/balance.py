"""How even a reuseport group's deliveries are: max/min share, coefficient
of variation, and Pearson's chi-square test against an even split, whose
p-value says whether the differences are more than noise. Pure arithmetic,
no kernel: the regularized incomplete gamma function is computed here so
that no statistics package is needed on a production host."""

from __future__ import annotations

import math
from dataclasses import dataclass

# A p-value under this says "not noise" (1%: one false alarm in 100 reads
# of a perfectly even group).
ALPHA = 0.01
VERDICTS = ("even", "uneven", "insufficient", "single", "idle")
# Pearson's chi-square needs about 5 expected per member to be trusted.
MIN_EXPECTED = 5.0



def chi_square_sf(x: float, dof: int) -> float:
    """P(X >= x) for a chi-square variable with ``dof`` degrees of freedom:
    the regularized upper incomplete gamma function Q(dof/2, x/2)."""
    if dof <= 0:
        raise ValueError("degrees of freedom must be positive")
    if x <= 0:
        return 1.0
    return gamma_q(dof / 2.0, x / 2.0)


def gamma_q(a: float, x: float) -> float:
    """Regularized upper incomplete gamma Q(a, x), a > 0, x >= 0: a series
    below a + 1, Lentz's continued fraction above (Numerical Recipes 6.2)."""
    if x <= 0:
        return 1.0
    log_prefix = -x + a * math.log(x) - math.lgamma(a)
    if x < a + 1.0:
        term = total = 1.0 / a
        n = a
        for _ in range(10_000):
            n += 1.0
            term *= x / n
            total += term
            if abs(term) < abs(total) * 1e-15:
                break
        return max(0.0, 1.0 - total * math.exp(log_prefix))
    tiny = 1e-300
    b = x + 1.0 - a
    c = 1.0 / tiny
    d = 1.0 / b
    h = d
    for i in range(1, 10_000):
        an = -i * (i - a)
        b += 2.0
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1.0 / d
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return min(1.0, math.exp(log_prefix) * h)


@dataclass(frozen=True)
class Imbalance:
    """How far a group's split is from even, over ``seconds``."""

    members: int
    total: int  # deliveries in the window
    seconds: float
    max_min: float | None  # max share / min share; None: a member got none
    cv: float | None  # coefficient of variation of the counts
    chi2: float | None
    dof: int
    p_value: float | None  # chance of a split at least this uneven if it were even
    verdict: str  # even, uneven, insufficient (too little traffic), single, idle
    most: int | None = None  # index of the member that got the most (first of equals)
    least: int | None = None  # and of the one that got the least

    def to_json(self) -> dict[str, object]:
        return {
            "members": self.members, "total": self.total, "seconds": round(self.seconds, 3),
            "max_min": round_or_none(self.max_min, 4), "cv": round_or_none(self.cv, 4),
            "chi2": round_or_none(self.chi2, 4), "dof": self.dof,
            "p_value": None if self.p_value is None else float(f"{self.p_value:.4g}"),
            "verdict": self.verdict, "most": self.most, "least": self.least,
        }

    @classmethod
    def from_json(cls, d: object) -> "Imbalance | None":
        """The inverse of :meth:`to_json` (None stays None); ValueError when damaged."""
        if d is None:
            return None
        if not isinstance(d, dict) or d.get("verdict") not in VERDICTS:
            raise ValueError("an imbalance is not an object with a verdict")

        def number(key: str) -> float | None:
            v = d.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise ValueError(f"imbalance {key!r} is not a number")
            return None if v is None else float(v)

        counts = [d.get(k, 0) for k in ("members", "total", "dof")]
        if not all(type(c) is int for c in counts):
            raise ValueError("an imbalance's counts are not whole numbers")
        most, least = d.get("most"), d.get("least")
        return cls(counts[0], counts[1], number("seconds") or 0.0, number("max_min"),
                   number("cv"), number("chi2"), counts[2], number("p_value"), d["verdict"],
                   most if type(most) is int else None, least if type(least) is int else None)

    def text(self) -> str:
        if self.verdict in ("single", "idle"):
            return {"single": "one member: nothing to balance",
                    "idle": "no deliveries yet"}[self.verdict]
        ratio = "inf" if self.max_min is None else f"{self.max_min:.2f}"
        parts = [f"max/min {ratio}", f"cv {self.cv:.3f}"]
        if self.chi2 is not None and self.p_value is not None:
            parts.append(f"chi-square {self.chi2:.2f} ({self.dof} dof), p={self.p_value:.3g}")
        meaning = {
            "even": "even (the differences are noise)",
            "uneven": f"uneven (p < {ALPHA}: not noise)",
            "insufficient": "too little traffic to tell noise from imbalance",
        }[self.verdict]
        return f"over {self.seconds:.1f} s: " + ", ".join(parts) + f": {meaning}"


def imbalance(counts: list[int], seconds: float) -> Imbalance:
    """Imbalance statistics of one group's per-member counts."""
    k = len(counts)
    total = sum(counts)
    if k < 2 or total == 0:
        verdict = "single" if k < 2 else "idle"
        return Imbalance(k, total, seconds, None, None, None, max(k - 1, 0), None, verdict)
    mean = total / k
    cv = math.sqrt(sum((c - mean) ** 2 for c in counts) / k) / mean
    low = min(counts)
    max_min = max(counts) / low if low else None
    chi2 = sum((c - mean) ** 2 for c in counts) / mean
    p = chi_square_sf(chi2, k - 1)
    if mean < MIN_EXPECTED:
        verdict = "insufficient"
    else:
        verdict = "uneven" if p < ALPHA else "even"
    most = max(range(k), key=lambda i: counts[i])
    least = min(range(k), key=lambda i: counts[i])
    return Imbalance(k, total, seconds, max_min, cv, chi2, k - 1, p, verdict, most, least)


def round_or_none(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)
