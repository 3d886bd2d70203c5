"""The paired bootstrap of `experiments.stats` against references computed another way: pass@k against the binomial
formula, the interval against the exact bootstrap distribution enumerated over every resample of a small case, and
against the normal closed form for a mean of many independent problems; verdicts on intervals that must and must not
exclude 0."""

import itertools
import math

import numpy as np
import pytest

from experiments import stats
from jaxstages.evaluation import pass_at_k


def cell(correct, n, ids=None) -> stats.Cell:
  correct = np.atleast_2d(np.asarray(correct))
  return stats.Cell(n=n, correct=correct, ids=tuple(ids or (f"p{i}" for i in range(correct.shape[1]))))


@pytest.mark.parametrize("n,k", [(1, 1), (8, 1), (8, 3), (16, 16), (64, 4)])
def test_pass_at_k_table_is_the_binomial_formula(n, k):
  table = stats.pass_at_k_table(n, k)
  for c in range(n + 1):
    assert table[c] == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-12)
    assert table[c] == pytest.approx(pass_at_k(n, c, k), abs=1e-12)


def exact_distribution(va, vb):
  """Every equally likely resample of a paired bootstrap (problems and seeds each drawn with replacement, the same
  draw for both arms): the sorted differences."""
  seeds, problems = va.shape
  out = []
  for ss in itertools.product(range(seeds), repeat=seeds):
    for ps in itertools.product(range(problems), repeat=problems):
      out.append(np.mean([va[s, p] - vb[s, p] for s in ss for p in ps]))
  return np.sort(np.round(out, 12))  # one value per atom, whatever the order of the sums


def test_interval_matches_the_enumerated_bootstrap_distribution():
  # 2 seeds x 4 problems, 8 samples each: 4 seed draws x 256 problem draws, every one equally likely
  a = np.array([[5, 4, 5, 8], [2, 7, 6, 0]])
  b = np.array([[3, 7, 4, 0], [6, 6, 7, 1]])
  exact = exact_distribution(a / 8, b / 8)
  result = stats.bootstrap([cell(a, 8)], [cell(b, 8)], "pass@1", resamples=200_000, seed=3)
  assert result["estimate"] == pytest.approx((a - b).mean() / 8)
  for q, got in ((0.025, result["low"]), (0.975, result["high"])):
    want = np.quantile(exact, q, method="inverted_cdf")
    # the exact quantile sits inside an atom of the distribution, away from its edges, so the sampled one must be it
    atom = exact == want
    below, through = np.mean(exact < want), np.mean(exact <= want)
    assert atom.any() and below < q - 0.004 and through > q + 0.004
    assert got == pytest.approx(want, abs=1e-12)
  # b's problems in another order with their ids are paired back; without them, mispaired: another interval
  shuffled = stats.bootstrap([cell(a, 8)], [cell(b[:, ::-1], 8, ids=["p3", "p2", "p1", "p0"])], "pass@1",
                             resamples=200_000, seed=3)
  assert (shuffled["low"], shuffled["high"]) == (result["low"], result["high"])
  mispaired = stats.bootstrap([cell(a, 8)], [cell(b[:, ::-1], 8)], "pass@1", resamples=200_000, seed=3)
  assert (mispaired["low"], mispaired["high"]) != (result["low"], result["high"])


def test_interval_of_many_problems_matches_the_normal_closed_form():
  rng = np.random.default_rng(0)
  a = rng.integers(0, 2, size=(1, 600))
  b = np.where(rng.random((1, 600)) < 0.7, a, 1 - a)  # agree on 70% of the problems
  d = (a - b)[0].astype(float)
  se = d.std() / math.sqrt(d.size)  # the bootstrap's variance of a mean: the population variance over P
  result = stats.bootstrap([cell(a, 1)], [cell(b, 1)], "pass@1", resamples=20_000)
  assert result["estimate"] == pytest.approx(d.mean())
  assert result["high"] - result["low"] == pytest.approx(2 * 1.959964 * se, rel=0.05)
  assert (result["low"] + result["high"]) / 2 == pytest.approx(d.mean(), abs=0.1 * se)


def test_seeds_are_resampled_with_the_problems():
  # every problem the same within a seed, seeds far apart: the spread is the seeds', which a problems-only
  # bootstrap would miss
  a = np.array([[8] * 50, [0] * 50, [8] * 50, [0] * 50])
  result = stats.bootstrap([cell(a, 8)], None, "pass@1", resamples=20_000)
  # the mean of 4 seeds drawn with replacement from {1, 0, 1, 0}: Binomial(4, 1/2) / 4, whose 2.5% and 97.5%
  # quantiles are 0 and 1 (each with probability 1/16 > 2.5%)
  assert result["estimate"] == 0.5 and (result["low"], result["high"]) == pytest.approx((0.0, 1.0))
  base = cell([[4] * 50], 8)  # a start model: one row, the same in every draw
  versus = stats.bootstrap([cell(a, 8)], [base], "pass@1", resamples=20_000)
  assert (versus["low"], versus["high"]) == pytest.approx((-0.5, 0.5)) and versus["seeds"] == [4, 1]


def test_a_clear_difference_excludes_zero_and_a_null_one_includes_it():
  rng = np.random.default_rng(1)
  n = 16
  better = [cell(rng.binomial(n, 0.6, size=(3, 128)), n) for _ in range(2)]  # two ops, three seeds
  worse = [cell(rng.binomial(n, 0.4, size=(3, 128)), n) for _ in range(2)]
  same = [cell(rng.binomial(n, 0.6, size=(3, 128)), n) for _ in range(2)]
  for metric in ("pass@1", "pass@4"):
    clear = stats.bootstrap(better, worse, metric)
    assert clear["low"] > 0 and clear["problems"] == [128, 128] and clear["seeds"] == [3, 3]
    assert stats.verdict(clear, +1) == "supported" and stats.verdict(clear, -1) == "contradicted"
    assert stats.verdict(clear, 0) == "contradicted"
  null = stats.bootstrap(better, same, "pass@1")
  assert null["low"] < 0 < null["high"]
  assert stats.verdict(null, +1) == stats.verdict(null, -1) == "inconclusive"
  assert stats.verdict(null, 0) == "inconclusive"
  assert stats.verdict(null, 0, margin=0.05) == "supported"
  # deterministic given the seed
  assert stats.bootstrap(better, same, "pass@1") == null
  assert stats.bootstrap(better, same, "pass@1", seed=1) != null


def test_bad_inputs_say_what_is_wrong():
  with pytest.raises(ValueError, match="share no evaluation problem"):
    stats.bootstrap([cell([[1, 2]], 2)], [cell([[1, 2]], 2, ids=["x", "y"])], "pass@1")
  with pytest.raises(ValueError, match="strict pass@k"):
    stats.bootstrap([cell([[1, 2]], 2)], None, "answer@1")
  with pytest.raises(ValueError, match=r"\[0, n=2\]"):
    cell([[3, 2]], 2)
