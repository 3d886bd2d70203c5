"""Evaluation metrics against brute force, and the evaluation loop's bookkeeping against a scripted sampler."""

import itertools
import json

import jax.numpy as jnp
import numpy as np
import pytest

from jaxstages import evaluation
from jaxstages.data import tasks
from jaxstages.data.tokenizer import task_tokenizer
from jaxstages.evaluation import EvalConfig, evaluate, majority_correct, markdown_table, pass_at_k
from jaxstages.model import create_model, model_config
from jaxstages.sampling import Samples

TASK = tasks.TaskConfig(contexts="pqr-uniform", op_range=(1, 3), phrasings=1)


@pytest.mark.parametrize("n,c", [(1, 0), (1, 1), (4, 0), (4, 2), (5, 3), (6, 6), (7, 1)])
def test_pass_at_k_equals_brute_force_over_k_subsets(n, c):
  outcomes = [1] * c + [0] * (n - c)
  for k in range(1, n + 1):
    subsets = list(itertools.combinations(outcomes, k))
    brute = np.mean([any(s) for s in subsets])
    assert abs(pass_at_k(n, c, k) - brute) < 1e-12, (n, c, k)


def test_majority_vote():
  assert majority_correct([3, 3, 5], 3)
  assert not majority_correct([5, 3, 5], 3)
  assert majority_correct([None, None, 4], 4)  # unparseable answers do not vote
  assert majority_correct([7, 4, 4, 7], 7)  # a tie goes to the answer seen first
  assert not majority_correct([None, None], 1)


@pytest.fixture(scope="module")
def tokenizer():
  return task_tokenizer(TASK, n_samples=300)


def test_evaluate_scores_each_cell_from_its_samples(tokenizer, monkeypatch):
  """A scripted sampler answers problem i of a cell with `i % (n + 1)` gold solutions out of n (the rest wrong in
  one step), so every cell's pass@k, maj@n and answer@1 have a known value."""
  n = 3
  cfg = EvalConfig(ops=(1, 2), contexts=("p", "q"), problems=8, n=n, ks=(1, 2, 3), temperature=1.0, batch_size=5)
  problems = {}
  for context in cfg.contexts:
    for op in cfg.ops:
      for i, p in enumerate(tasks.eval_set(TASK, op=op, context=context, n=cfg.problems)):
        problems[tuple(evaluation.eval_prompt(p, tokenizer, cfg))] = (i, p)

  def scripted_sample(model, prompts, scfg, seed=0, mesh=None):
    rows = []
    for prompt in prompts:
      i, p = problems[tuple(prompt)]
      for j in range(scfg.n):
        steps = p.gold_steps() if j < i % (n + 1) else p.perturbed_steps(np.random.default_rng(0))
        rows.append(tokenizer.encode(p.solution(steps)) + [tokenizer.eos_id])
    width = scfg.max_new_tokens
    assert max(map(len, rows)) <= width, "max_new_tokens must leave room for the gold solution"
    tokens = np.zeros((len(rows), width), np.int32)
    mask = np.zeros((len(rows), width), np.float32)
    for r, row in enumerate(rows):
      tokens[r, :len(row)], mask[r, :len(row)] = row, 1
    z = jnp.zeros(tokens.shape)
    return Samples(jnp.asarray(tokens), z, z, jnp.asarray(mask), jnp.asarray(mask.sum(1), jnp.int32), z)

  monkeypatch.setattr(evaluation, "sample", scripted_sample)
  result = evaluate(None, tokenizer, TASK, cfg, show_progress=False)
  assert [(c["context"], c["op"]) for c in result["cells"]] == [("p", 1), ("p", 2), ("q", 1), ("q", 2)]
  correct = [i % (n + 1) for i in range(cfg.problems)]
  for cell in result["cells"]:
    for k in cfg.ks:
      assert cell[f"pass@{k}"] == pytest.approx(np.mean([pass_at_k(n, c, k) for c in correct]))
    # majority: the wrong rows all carry the same wrong answer, so gold wins with 2 or 3 of 3
    assert cell["maj@3"] == pytest.approx(np.mean([c >= 2 for c in correct]))
    assert cell["answer@1"] == pytest.approx(np.mean(correct) / n)
    assert cell["correct"] == correct
    # problems are named by their text: the cell's own, distinct, and the same for the same problems
    names = [evaluation.problem_id(p) for p in tasks.eval_set(TASK, op=cell["op"], context=cell["context"],
                                                               n=cfg.problems)]
    assert cell["problem_ids"] == names and len(set(names)) == cfg.problems
    # each problem's samples hashed: the scripted ones differ from problem to problem
    assert len(set(cell["sample_hashes"])) == cfg.problems and all(0 <= h < 2 ** 20 for h in cell["sample_hashes"])
  ids = [c["problem_ids"] for c in result["cells"]]
  assert len({i for cell_ids in ids for i in cell_ids}) == sum(map(len, ids))  # no problem named twice
  table = markdown_table(result)
  assert "| p | pass@2 |" in table and "op 2" in table
  json.dumps(result)


def test_evaluate_runs_the_real_sampler_end_to_end(tokenizer):
  model = create_model(model_config("tiny", vocab_size=tokenizer.vocab_size), seed=0)
  cfg = EvalConfig(ops=(1,), contexts=("p",), problems=4, n=2, ks=(1, 2), temperature=1.0, max_new_tokens=8)
  cell = evaluate(model, tokenizer, TASK, cfg, show_progress=False)["cells"][0]
  assert cell["pass@1"] == 0.0 and cell["samples"] == 2  # an untrained model solves nothing
  assert 1 <= cell["mean_length"] <= 8


def test_eval_config_errors():
  with pytest.raises(Exception, match="k <= n"):
    EvalConfig(n=2, ks=(4,), temperature=1.0)
  with pytest.raises(Exception, match="temperature > 0"):
    EvalConfig(n=4)
  with pytest.raises(Exception, match="did you mean 'problems'"):
    EvalConfig.from_config({"problem": 3})
