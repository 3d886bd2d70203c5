"""Intervals for the experiments' claims: a paired bootstrap over problems and seeds.

An arm's evaluation of one (context, op) cell is a table of strictly correct samples: `correct[seed][problem]` out of
`n` samples per problem (`jaxstages.evaluation`'s cells). Its metric is the mean over seeds and problems of a
per-problem value: `c / n` for strict pass@1, the unbiased estimator `1 - C(n-c, k) / C(n, k)` for pass@k. Over
several ops a metric is the mean of the per-op metrics (every op weighs the same, as the tables' averages).

Two arms evaluated on the same problems are compared by the difference of their metrics, and its 95% interval comes
from a bootstrap that resamples what would change in a repeat of the experiment, jointly for both arms:
- problems: drawn with replacement within each op, the same draw for both arms (problems are paired by identity, so
  a hard problem counts against both);
- seeds: drawn with replacement, the same draw for both arms on the seeds both have (seed `s` of one arm shares its
  RL prompts and sampling seed with seed `s` of the other); an arm's seeds beyond the other's are drawn among
  themselves; an arm with a single row (a start model, the base) is the same in every draw.
The interval is the percentile interval of the resampled differences. Everything is deterministic given `seed`.

`verdict` turns an interval and the sign a claim expects into supported / contradicted / inconclusive.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

RESAMPLES = 4000
LEVEL = 0.95


@dataclasses.dataclass(frozen=True)
class Cell:
  """One arm's evaluation of one (context, op) cell: `correct[seed, problem]` strictly correct samples out of `n`,
  and the problems' ids (the same problems in the same order for every seed)."""

  n: int
  correct: np.ndarray  # [seeds, problems], ints
  ids: tuple[str, ...]

  def __post_init__(self):
    correct = np.asarray(self.correct)
    if correct.ndim != 2 or correct.shape[1] != len(self.ids):
      raise ValueError(f"a cell needs correct[seeds, problems] with one id per problem; got shape {correct.shape} "
                       f"for {len(self.ids)} ids")
    if correct.min(initial=0) < 0 or correct.max(initial=0) > self.n:
      raise ValueError(f"correct counts must lie in [0, n={self.n}]; got {correct.min()}..{correct.max()}")
    object.__setattr__(self, "correct", correct.astype(np.int64))


def pass_at_k_table(n: int, k: int) -> np.ndarray:
  """The unbiased pass@k of a problem with c correct samples out of n, for every c = 0..n (Chen et al. 2021:
  1 - C(n-c, k) / C(n, k), as a stable product)."""
  if not 1 <= k <= n:
    raise ValueError(f"pass@k needs 1 <= k <= n; got k={k}, n={n}")
  table = np.ones(n + 1)
  for c in range(n - k + 1):  # c > n - k: every draw of k samples holds a correct one
    table[c] = 1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1))
  return table


def metric_k(metric: str) -> int:
  """`"pass@16"` -> 16; only strict pass@k metrics have per-problem counts to resample."""
  name, _, k = metric.partition("@")
  if name != "pass" or not k.isdigit():
    raise ValueError(f"bootstrap intervals are for strict pass@k metrics (e.g. 'pass@1'); got {metric!r}")
  return int(k)


def per_problem(cell: Cell, metric: str) -> np.ndarray:
  """The metric of every (seed, problem): `[seeds, problems]`."""
  return pass_at_k_table(cell.n, metric_k(metric))[cell.correct]


def _aligned(a: Cell, b: Cell | None) -> tuple[np.ndarray, np.ndarray | None]:
  """Column indices of the problems both cells hold, in `a`'s order (all of `a`'s without `b`)."""
  if b is None:
    return np.arange(len(a.ids)), None
  where = {pid: i for i, pid in enumerate(b.ids)}
  shared = [i for i, pid in enumerate(a.ids) if pid in where]
  if not shared:
    raise ValueError("the two arms share no evaluation problem: compare arms evaluated with the same protocol")
  return np.asarray(shared), np.asarray([where[a.ids[i]] for i in shared])


def _counts(picks: np.ndarray, size: int) -> np.ndarray:
  """How often each of `size` indices is drawn in every row of `picks` (`[resamples, draws]` -> `[resamples, size]`)."""
  rows = np.arange(picks.shape[0])[:, None] * size
  return np.bincount((rows + picks).ravel(), minlength=picks.shape[0] * size).reshape(picks.shape[0], size)


def _seed_weights(rng: np.random.Generator, rows: int, paired: int, draws: np.ndarray) -> np.ndarray:
  """Weights `[resamples, rows]` of an arm's seeds: the shared draw `draws` (`[resamples, paired]`, indices below
  `paired`) on its first `paired` seeds, its own draw on the rest; a single row weighs 1."""
  resamples = draws.shape[0]
  if rows == 1:
    return np.ones((resamples, 1))
  own = rng.integers(paired, rows, size=(resamples, rows - paired))
  return _counts(np.concatenate([draws, own], axis=1), rows) / rows


def bootstrap(a: Sequence[Cell], b: Sequence[Cell] | None, metric: str, resamples: int = RESAMPLES,
              level: float = LEVEL, seed: int = 0) -> dict:
  """The metric of arm `a` minus that of arm `b` (or of `a` alone when `b` is None), averaged over ops (`a[i]` and
  `b[i]` are the same op's cells), with its percentile bootstrap interval: `{"estimate", "low", "high", "level",
  "resamples", "problems" (paired, per op), "seeds" ([a's, b's])}`."""
  if b is not None and len(a) != len(b):
    raise ValueError(f"arms compared on different numbers of ops: {len(a)} and {len(b)}")
  if not a:
    raise ValueError("no cell to bootstrap")
  rows_a = {c.correct.shape[0] for c in a}
  rows_b = {c.correct.shape[0] for c in b} if b is not None else {1}
  if len(rows_a) > 1 or len(rows_b) > 1:
    raise ValueError(f"an arm's cells hold different numbers of seeds: {sorted(rows_a)} / {sorted(rows_b)}")
  (sa,), (sb,) = rows_a, rows_b
  paired = min(sa, sb) if b is not None and min(sa, sb) > 1 else 0  # seed indices both arms have (several each)
  rng = np.random.default_rng(seed)
  draws = rng.integers(0, max(paired, 1), size=(resamples, paired))
  wa = _seed_weights(rng, sa, paired, draws)
  wb = _seed_weights(rng, sb, paired, draws) if b is not None else None
  point, boot, problems = 0.0, np.zeros(resamples), []
  for i, cell_a in enumerate(a):
    cell_b = b[i] if b is not None else None
    ia, ib = _aligned(cell_a, cell_b)
    va = per_problem(cell_a, metric)[:, ia]
    vb = per_problem(cell_b, metric)[:, ib] if cell_b is not None else None
    p = len(ia)
    wp = _counts(rng.integers(0, p, size=(resamples, p)), p) / p
    boot += np.einsum("rs,sp,rp->r", wa, va, wp)
    point += va.mean()
    if vb is not None:
      boot -= np.einsum("rs,sp,rp->r", wb, vb, wp)
      point -= vb.mean()
    problems.append(p)
  boot = np.round(boot / len(a), 12)  # below that, the order of the sums: no difference to report
  point /= len(a)
  tail = (1 - level) / 2
  low, high = np.quantile(boot, [tail, 1 - tail])
  return {"estimate": float(point), "low": float(low), "high": float(high), "level": level, "resamples": resamples,
          "problems": problems, "seeds": [sa, sb] if b is not None else [sa]}


def verdict(interval: Mapping, sign: int, margin: float = 0.0) -> str:
  """What an interval says of a claimed difference: for `sign` +1 (a beats b) or -1 (a trails b) "supported" when
  the whole interval lies on that side of 0, "contradicted" when it lies wholly on the other side, else
  "inconclusive"; for `sign` 0 (no difference) "supported" when the interval lies within ±`margin`, "contradicted"
  when it excludes 0, else "inconclusive"."""
  low, high = interval["low"], interval["high"]
  if sign not in (-1, 0, 1):
    raise ValueError(f"a claim's sign is +1, -1 or 0; got {sign!r}")
  if sign == 0:
    if margin > 0 and -margin <= low and high <= margin:
      return "supported"
    return "contradicted" if low > 0 or high < 0 else "inconclusive"
  if (low > 0 and sign > 0) or (high < 0 and sign < 0):
    return "supported"
  if (low > 0 and sign < 0) or (high < 0 and sign > 0):
    return "contradicted"
  return "inconclusive"
