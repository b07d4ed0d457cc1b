r"""What a comparison can resolve: its noise, the smallest paired difference it could detect, and the budget that
would detect a given one.

A comparison of method m against a reference on one task measures, for each seed s and test example i, the paired
difference d_si = y_m(s, i) - y_ref(s, i) of a per-example outcome (1 right, 0 wrong). Its mean d over S seeds and
N examples estimates the effect. The model (two-way random effects, no replication):

    d_si = effect + a_s + b_i + e_si,     Var(a) = var_seed, Var(b) = var_example, Var(e) = var_residual

a_s is seed-to-seed noise (training randomness, the same on every example), b_i example-to-example noise (which
examples the test set happens to hold), e_si their interaction. Then

    SE^2(S, N) = var_seed / S + var_example / N + var_residual / (S N)

estimated from the pilot's S x N table by the usual mean squares: Vs, the variance over seeds of the seeds' mean
differences (what the tables' "± 95% CI" are made of), Vi, the variance over examples of the examples' mean
differences, and MSr, the residual mean square; var_residual = MSr, var_seed = max(0, Vs - MSr / N), var_example =
max(0, Vi - MSr / S) (so SE^2(S, N) = Vs / S + Vi / N - MSr / (S N) where neither is clipped).

The minimum detectable paired difference at two-sided level alpha = 0.05 with power 1 - beta = 0.8:

    MDE(S, N) = (t_{1 - alpha/2, S-1} + t_{1 - beta, S-1}) * SE(S, N)

with Student's t on S - 1 degrees of freedom (the seeds are the scarce replicate; 2.80 * SE as S grows). A paired
difference is "resolved" when |d| > t_{0.975, S-1} * SE(S, N): unlike the tables' CI, which holds the test set fixed,
this also counts the test examples as a sample of the task. The average over T tasks is treated the same way, its
seed part from the seeds' mean differences over tasks, its example parts the tasks' (each task's examples are its own):
SE_avg^2 = var_seed_avg / S + sum_t (var_example_t / N_t + var_residual_t / (S N_t)) / T^2.

The planner (`plan`) finds, for each number of seeds S', the fewest test examples per task N' with
MDE(S', N') <= effect, from the pilot's components; none when the seeds' part alone exceeds it. Where the two methods
agreed on every seed and example (every d_si = 0), the noise is not estimable: MDE None, and no plan.
A metric without per-example outcomes (the held-out loss) gets the seed part only: its MDE is for this test set.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from statistics import NormalDist

from .stats import t_quantile_975

ALPHA = 0.05
POWER = 0.8


def t_quantile(p: float, dof: int) -> float:
    """Student's t quantile t_{p, dof} for p in [0.5, 1): exact for 1 and 2 degrees of freedom, the table for
    p = 0.975, else the Cornish-Fisher expansion to 1/dof^4 (Abramowitz & Stegun 26.7.5; within 2e-3 from 3 dof for p
    up to 0.95, within 2e-4 for the power's 0.8)."""
    if dof < 1:
        raise ValueError(f"dof: expected >= 1, got {dof}")
    if not 0.5 <= p < 1:
        raise ValueError(f"p: expected a probability in [0.5, 1), got {p}")
    if dof == 1:
        return math.tan(math.pi * (p - 0.5))
    if dof == 2:
        return (2 * p - 1) / math.sqrt(2 * p * (1 - p))
    if abs(p - 0.975) < 1e-12:
        return t_quantile_975(dof)
    z = NormalDist().inv_cdf(p)
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    g4 = (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160
    return z + g1 / dof + g2 / dof**2 + g3 / dof**3 + g4 / dof**4


def detect_factor(seeds: int, alpha: float = ALPHA, power: float = POWER) -> float:
    """t_{1 - alpha/2, S-1} + t_{power, S-1}: the MDE in standard errors."""
    return t_quantile(1 - alpha / 2, seeds - 1) + t_quantile(power, seeds - 1)


def _var(values: Sequence[float]) -> float:
    mean = sum(values) / len(values)
    return sum((v - mean) ** 2 for v in values) / (len(values) - 1)


@dataclass(frozen=True)
class Noise:
    """The noise of one paired difference (a task's, or the average's) and what the pilot's budget resolves.

    `seed_sd`: the standard deviation over seeds of the paired difference (on this test set); `example_sd`: over the
    test examples of the per-example difference (mean over seeds), None without per-example outcomes. `var_*`: the
    components of the model in the module docstring. `se`, `mde`: for the pilot's own seeds and examples."""

    seeds: int
    examples: int  # per task (the average: their mean)
    mean: float
    seed_sd: float
    example_sd: float | None
    var_seed: float
    var_example: float  # for the average: sum_t var_example_t / T^2, per example of each task
    var_residual: float  # likewise
    se: float
    mde: float | None  # None: SE 0, no paired difference anywhere, the noise not estimable
    resolved: bool

    def mde_for(self, seeds: int, examples: int, alpha: float = ALPHA, power: float = POWER) -> float:
        """The MDE with `seeds` seeds and `examples` test examples per task."""
        se2 = self.var_seed / seeds
        if self.var_example or self.var_residual:  # measured per example
            se2 += self.var_example / examples + self.var_residual / (seeds * examples)
        return detect_factor(seeds, alpha, power) * math.sqrt(se2)

    def to_dict(self) -> dict:
        return asdict(self)


def task_noise(differences: Sequence[Sequence[float]] | None, seed_means: Sequence[float]) -> Noise | None:
    """The noise of one task's paired difference: `differences` the S x N per-example differences (None: not
    measured, the seed part only), `seed_means` the S per-seed differences of the task's metric. None under 2 seeds."""
    s = len(seed_means)
    if s < 2:
        return None
    vs = _var(seed_means)
    if differences is None:
        se = math.sqrt(vs / s)
        mean = sum(seed_means) / s
        return _noise(s, 0, mean, math.sqrt(vs), None, vs, 0.0, 0.0, se)
    n = len(differences[0])
    rows = [sum(row) / n for row in differences]  # per seed
    cols = [sum(row[i] for row in differences) / s for i in range(n)]  # per example
    grand = sum(rows) / s
    vr, vi = _var(rows), (_var(cols) if n > 1 else 0.0)
    ms_res = (
        sum((differences[j][i] - rows[j] - cols[i] + grand) ** 2 for j in range(s) for i in range(n))
        / ((s - 1) * (n - 1))
        if n > 1
        else 0.0
    )
    var_seed, var_example = max(0.0, vr - ms_res / n), max(0.0, vi - ms_res / s)
    se = math.sqrt(var_seed / s + var_example / n + ms_res / (s * n))
    return _noise(s, n, grand, math.sqrt(vr), math.sqrt(vi), var_seed, var_example, ms_res, se)


def average_noise(tasks: Sequence[Noise], seed_means: Sequence[float]) -> Noise | None:
    """The noise of the average over tasks' paired difference: `tasks` each task's `Noise`, `seed_means` the S
    per-seed differences of the average. Each task's examples are its own, so their parts add up, over T^2."""
    s = len(seed_means)
    if s < 2 or not tasks:
        return None
    t2 = len(tasks) ** 2
    measured = all(n.example_sd is not None for n in tasks)
    vs = _var(seed_means)
    residual_share = sum(n.var_residual / n.examples for n in tasks if n.examples) / t2  # in vs: sum_t MSr_t/N_t/T^2
    var_seed = max(0.0, vs - residual_share) if measured else vs
    n_mean = round(sum(n.examples for n in tasks) / len(tasks))
    example_part = sum(n.var_example / n.examples for n in tasks if n.examples) / t2
    se = math.sqrt(var_seed / s + example_part + residual_share / s)
    var_example = sum(n.var_example for n in tasks) / t2 if measured else 0.0  # per example of every task
    var_residual = sum(n.var_residual for n in tasks) / t2 if measured else 0.0
    example_sd = math.sqrt(sum(n.example_sd**2 for n in tasks) / t2) if measured else None
    return _noise(s, n_mean, sum(seed_means) / s, math.sqrt(vs), example_sd, var_seed, var_example, var_residual, se)


def _noise(s, n, mean, seed_sd, example_sd, var_seed, var_example, var_residual, se) -> Noise:
    """A `Noise`; where every paired difference was 0 (SE 0: the two methods agreed on every seed and example), the
    pilot says nothing about the noise: MDE None, not resolved."""
    mde = detect_factor(s) * se if se > 0 else None
    resolved = se > 0 and abs(mean) > t_quantile(1 - ALPHA / 2, s - 1) * se
    return Noise(s, n, mean, seed_sd, example_sd, var_seed, var_example, var_residual, se, mde, resolved)


def needed_examples(noise: Noise, seeds: int, effect: float, alpha: float = ALPHA, power: float = POWER) -> int | None:
    """The fewest test examples per task N with MDE(seeds, N) <= `effect` (> 0); None when the seeds' part alone,
    var_seed / seeds, already exceeds it."""
    room = (effect / detect_factor(seeds, alpha, power)) ** 2 - noise.var_seed / seeds
    if room <= 0:
        return None
    need = noise.var_example + noise.var_residual / seeds
    return max(1, math.ceil(need / room - 1e-12))


def plan(noise: Noise, effect: float, seeds: Sequence[int] = (2, 3, 4, 5, 6, 8, 10, 15, 20)) -> list[dict]:
    """For each number of seeds, the test examples per task that resolve `effect` (None: no number does), and the
    MDE with the pilot's examples."""
    return [
        {
            "seeds": s,
            "examples": needed_examples(noise, s, effect),
            "mde_at_pilot_examples": noise.mde_for(s, max(1, noise.examples)),
        }
        for s in seeds
    ]
