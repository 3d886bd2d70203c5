"""The task world: answers and op counts against independent evaluation, determinism, leakage-free splits,
context weights and templates, options."""

import collections
import re

import numpy as np
import pytest

from jaxstages.config import ConfigError
from jaxstages.data.tasks import (OPS, STORY_CONTEXTS, SYMBOLIC_CONTEXTS, TaskConfig, apply_op, eval_set, generate,
                                  instruction_document, preference_pair, pretrain_document, rl_prompt, sft_messages)


def evaluate_symbolic_text(text: str, modulus: int) -> dict[str, int]:
  """Evaluates the *text* of a symbolic problem (any order of statements) by repeated substitution."""
  statements = [s.strip() for s in text.split("\n")[0].split(";") if s.strip()]
  words = {w: op for c in SYMBOLIC_CONTEXTS.values() for op, w in c.op_words.items()}
  defs = {}
  for s in statements:
    s = re.sub(r"^(let|set|put)\s+", "", s).replace(":=", "=")
    lhs, rhs = (x.strip() for x in s.split("="))
    defs[lhs] = rhs.split()
  values = {}
  while len(values) < len(defs):
    progress = False
    for name, rhs in defs.items():
      if name in values:
        continue
      if len(rhs) == 1:
        values[name] = int(rhs[0])
        progress = True
      elif rhs[0] in values and rhs[2] in values:
        a, b, op = values[rhs[0]], values[rhs[2]], words[rhs[1]]
        values[name] = {"+": a + b, "-": a - b, "*": a * b}[op] % modulus
        progress = True
    assert progress, f"cyclic or dangling statements: {text}"
  return values


def asked_name(p) -> str:
  q = p.question()
  return next(tok for tok in q.replace("?", " ").split() if tok in p.names)


def ops_on_path(p) -> int:
  """Breadth-first search over operands, independent of `Problem.needed`."""
  seen, frontier = set(), [p.target]
  while frontier:
    node = frontier.pop()
    if node in seen:
      continue
    seen.add(node)
    if p.nodes[node].args:
      frontier.extend(p.nodes[node].args)
  return sum(p.nodes[n].kind == "op" for n in seen)


@pytest.mark.parametrize("order", ["dependency", "shuffled"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gold_answer_and_op_against_independent_evaluation(seed, order):
  cfg = TaskConfig(contexts="pqr-uniform", op_range=(1, 12), distractors=(0, 3), order=order)
  for i in range(150):
    p = generate(cfg, seed, "train", i)
    values = evaluate_symbolic_text(p.text(), cfg.modulus)
    assert values[asked_name(p)] == p.answer
    assert p.op == ops_on_path(p) == len(p.gold_steps())
    assert 1 <= p.op <= 12
    assert p.op_with_constants == p.op + sum(p.nodes[n].kind == "const" for n in p.needed)


def test_bounded_integer_arithmetic_stays_in_range():
  cfg = TaskConfig(modulus=None, max_value=50, op_range=(3, 8), distractors=(1, 2))
  for i in range(200):
    p = generate(cfg, 0, "train", i)
    assert all(0 <= n.value <= 50 for n in p.nodes)
    assert p.answer == p.gold_steps()[-1].result


def test_dependency_order_defines_before_use_and_near_reach_stays_near():
  cfg = TaskConfig(order="dependency", reach="near", near_window=3, op_range=(4, 10), distractors=(0, 0))
  for i in range(200):
    p = generate(cfg, 0, "train", i)
    position = {node: k for k, node in enumerate(p.order)}
    for node_id, node in enumerate(p.nodes):
      for arg in node.args or ():
        assert position[arg] < position[node_id]
        assert node_id - arg <= 3 + 2  # the window, plus the constants created for this very operation


def test_same_arguments_same_problem_and_splits_share_no_structure():
  cfg = TaskConfig(op_range=(2, 4), distractors=(0, 2))
  a, b = generate(cfg, 5, "train", 17), generate(cfg, 5, "train", 17)
  assert a.text() == b.text() and a.solution() == b.solution()
  assert generate(cfg, 5, "train", 18).text() != a.text()
  assert generate(cfg, 6, "train", 17).text() != a.text()

  def canonical(p, node=None):  # the test's own canonical form: an expression string
    node = p.target if node is None else node
    n = p.nodes[node]
    if n.kind == "const":
      return str(n.value)
    x, y = canonical(p, n.args[0]), canonical(p, n.args[1])
    if n.op in "+*":
      x, y = sorted((x, y))
    return f"({x}{n.op}{y})"

  train = {canonical(generate(cfg, 0, "train", i)) for i in range(3000)}
  evals = [generate(cfg, 0, "eval", i) for i in range(300)]
  assert all(p.split == "eval" for p in evals)
  assert not train & {canonical(p) for p in evals}
  # the same holds for the eval sets of the tables, pinned to an op and a context
  assert not train & {canonical(p) for p in eval_set(cfg, 3, "p", 100)}


def test_context_weights_hold_and_op_range_per_context():
  cfg = TaskConfig(contexts="p-seed-q-1pct", op_range=(2, 2), distractors=(0, 0))
  counts = collections.Counter(generate(cfg, 0, "train", i).context for i in range(20_000))
  share = counts["q"] / 20_000
  assert abs(share - 0.01) < 0.003  # 4.3 standard deviations of a binomial(20000, 0.01)
  cfg = TaskConfig(contexts="p-seed-q-1pct", op_range=(3, 6))
  seen_q = [generate(cfg, 1, "train", i) for i in range(3000)]
  assert all(p.op == 2 for p in seen_q if p.context == "q")
  assert {p.op for p in seen_q if p.context == "p"} == {3, 4, 5, 6}


def test_a_context_listed_twice_draws_each_entrys_own_op_range():
  """A rare tail of deeper problems in one context: ops 1-4 at 95%, ops 5-6 at 5% (the edge lever of the base)."""
  cfg = TaskConfig(contexts=(("p", 0.95, (1, 4)), ("p", 0.05, (5, 6))), distractors=(0, 0))
  ops = collections.Counter(generate(cfg, 0, "train", i).op for i in range(8000))
  assert set(ops) == {1, 2, 3, 4, 5, 6}
  tail = (ops[5] + ops[6]) / 8000
  assert abs(tail - 0.05) < 0.01  # 4.1 standard deviations of a binomial(8000, 0.05)
  assert abs(ops[5] - ops[6]) < 0.3 * (ops[5] + ops[6])  # the tail's ops drawn uniformly within it


@pytest.mark.parametrize("surface,contexts", [("symbolic", "pqr-uniform"), ("story", "story-uniform")])
def test_every_template_of_every_context_appears(surface, contexts):
  cfg = TaskConfig(surface=surface, contexts=contexts, op_range=(2, 6), distractors=(1, 3))
  used = collections.defaultdict(set)
  for i in range(600):
    p = generate(cfg, 0, "train", i)
    for node_id, phrasing in zip(p.order, p.phrasing):
      node = p.nodes[node_id]
      used[(p.context, node.kind, node.op)].add(phrasing)
    used[(p.context, "question", None)].add(p.phrasing[-1])
  contexts_of = SYMBOLIC_CONTEXTS if surface == "symbolic" else STORY_CONTEXTS
  for name, ctx in contexts_of.items():
    assert used[(name, "const", None)] == set(range(len(ctx.constant_templates)))
    assert used[(name, "question", None)] == set(range(len(ctx.question_templates)))
    for op in OPS:
      assert used[(name, "op", op)] == set(range(len(ctx.op_templates[op])))


def test_phrasings_and_names_knobs_narrow_the_surface_only():
  wide = TaskConfig(contexts="pqr-uniform", op_range=(2, 5), distractors=(1, 2))
  narrow = wide.replace(phrasings=1, names=12)
  for i in range(200):
    p, q = generate(wide, 0, "train", i), generate(narrow, 0, "train", i)
    assert set(q.phrasing) == {0}
    pool = SYMBOLIC_CONTEXTS[q.context].names[:12]
    assert set(q.names) <= set(pool)
    # the same computation, only told differently
    assert (p.nodes, p.target, p.answer) == (q.nodes, q.target, q.answer)
  with pytest.raises(ConfigError, match="names"):
    generate(wide.replace(names=3, op_range=(4, 4)), 0, "train", 0)
  with pytest.raises(ConfigError, match="phrasings"):
    wide.replace(phrasings=0)


def test_symbolic_contexts_use_disjoint_names_and_operators():
  contexts = list(SYMBOLIC_CONTEXTS.values())
  for i, a in enumerate(contexts):
    for b in contexts[i + 1:]:
      assert not set(a.names) & set(b.names)
      assert not set(a.op_words.values()) & set(b.op_words.values())


def test_mixtures_are_validated():
  with pytest.raises(ConfigError, match="sum to 0.9"):
    TaskConfig(contexts=(("p", 0.5), ("q", 0.4)))
  with pytest.raises(ConfigError, match="unknown key 'zoo'"):
    TaskConfig(surface="symbolic", contexts="zoo")
  with pytest.raises(ConfigError, match="did you mean 'p-seed-q-1pct'"):
    TaskConfig(contexts="p-seed-q-1pc")
  with pytest.raises(ConfigError, match="order='random'"):
    TaskConfig(order="random")
  with pytest.raises(ConfigError, match="unknown key 'op_rang'"):
    TaskConfig().replace(op_rang=(1, 2))


def test_formats_for_every_stage_come_from_one_problem():
  p = generate(TaskConfig(op_range=(3, 3)), 0, "train", 0)
  solution = p.solution()
  assert pretrain_document(p) == p.text() + "\n" + solution
  assert instruction_document(p).endswith(solution)
  assert solution.splitlines()[-1] == f"answer: {p.answer}" and len(solution.splitlines()) == 4
  think = sft_messages(p, think=True)
  assert think[0]["content"].endswith("/think")
  assert think[1]["content"].startswith("<think>\n") and think[1]["content"].endswith(f"</think>\nanswer: {p.answer}")
  no_think = sft_messages(p, think=False)
  assert no_think[0]["content"].endswith("/no_think")
  assert no_think[1]["content"] == f"<think>\n</think>\nanswer: {p.answer}"
  prompt = rl_prompt(p)
  assert prompt["answer"] == p.answer and len(prompt["messages"]) == 1
  again = generate(TaskConfig(op_range=(3, 3)), **prompt["key"])
  assert again.text() == p.text()
  pair = preference_pair(p)
  chosen, rejected = pair["chosen"][0]["content"], pair["rejected"][0]["content"]
  assert chosen == solution and rejected != solution
  differing = [i for i, (x, y) in enumerate(zip(chosen.splitlines(), rejected.splitlines())) if x != y]
  assert differing and differing[-1] == 3  # the perturbed step and what follows, down to the answer line
  cell = eval_set(TaskConfig(contexts="pqr-uniform"), op=5, context="r", n=20)
  assert all(q.op == 5 and q.context == "r" and q.split == "eval" for q in cell)


def test_gold_solution_reads_dependency_ordered_statements_top_to_bottom():
  cfg = TaskConfig(op_range=(3, 8), distractors=(1, 3))
  for i in range(100):
    p = generate(cfg, 0, "train", i)
    position = {node: k for k, node in enumerate(p.order)}
    steps = [position[n] for n in p.solution_order]
    assert steps == sorted(steps) and set(p.solution_order) == set(p.needed_ops)


def test_perturbation_kinds_make_the_error_they_name():
  """`result`: one step's operands are right and its result is wrong; `operand`: one step reads another quantity's
  value for an operand and computes correctly from it; later steps follow from the error either way."""
  cfg = TaskConfig(op_range=(1, 4), distractors=(0, 2))
  kinds = {"result": 0, "operand": 0}
  for i in range(200):
    p = generate(cfg, 5, "train", i)
    gold = p.gold_steps()
    values = {q: n.value for q, n in zip(p.names, p.nodes)}
    for error in ("result", "operand", "mixed"):
      steps = p.perturbed_steps(np.random.default_rng(i), error)
      first = next(j for j, (s, g) in enumerate(zip(steps, gold)) if s != g)
      s, g = steps[first], gold[first]
      operands_right = (s.va, s.vb) == (g.va, g.vb)
      if error == "result" or (error == "operand" and operands_right):  # no other value to mis-read: a result error
        assert operands_right and s.result != g.result
      elif error == "operand":
        assert {s.va, s.vb} - {g.va, g.vb} <= set(values.values()) and s.result == apply_op(s.op, s.va, s.vb,
                                                                                            p.modulus)
      if error != "mixed":
        kinds[error] += not operands_right
      for later in steps[first + 1:]:  # every later step computes from the values before it
        assert later.result == apply_op(later.op, later.va, later.vb, p.modulus)
  assert kinds["result"] == 0 and kinds["operand"] > 150
