"""The controlled reasoning-task world: arithmetic over a random DAG of named quantities (after iGSM/GSM-Infinite and
the pre-/mid-/RL interplay study).

A problem is a DAG of *nodes*. A node is a given constant or one operation (`+`, `-`, `*`) on two earlier nodes;
arithmetic is modulo a small prime (`modulus`, default 23 as in iGSM) or, with `modulus=None`, on integers kept in
`[0, max_value]`. One node is asked for.

**Difficulty `op`** = the number of *operation* nodes the asked quantity depends on (itself included), i.e. the number
of arithmetic steps in the gold solution. Constants are given in the problem and cost no step, so they are not
counted (the reference study's count also adds the constant assignments on the path: `Problem.op_with_constants`).

**Surface and context.** The same DAG can be told on the *symbolic* surface (one token per name, digit and operator;
each context has its own disjoint name and operator tokens) or the *story* surface (GSM-Infinite style sentences about
animals in zoos, teachers in schools, films at festivals). Each context has several phrasings of every statement.

**Determinism and splits.** `generate(cfg, seed, split, index)` is a pure function: same arguments, same problem, on
any host, with no files. A problem belongs to the split chosen by the hash of its *structure* (`structure_hash`: the
asked quantity's computation as a canonical expression over its constants, blind to names, surface, phrasing and
statement order), so train and eval never share a problem however it is worded.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from functools import cached_property

import numpy as np

from jaxstages.config import ConfigError, check_keys

SPLITS = {"train": 0, "eval": 1}
# how a solution line writes one step (the verifier reads all three): "expanded" names the operands, then their
# values; "inline" writes each operand's value right after its name; "lookup" restates each operand as `name = value`
# and the result as `target = value`, the same shape as a constant's statement, so every value the model needs is
# found by the copy that already finds a statement's operands ("what follows `name =`")
SOLUTION_FORMATS = ("expanded", "inline", "lookup")
OPS = ("+", "-", "*")

# -- surfaces and contexts ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Context:
  """How one context tells a problem: its names, operator words and phrasings.

  Templates use `{y}` (the defined quantity), `{a}`, `{b}` (operands), `{v}` (a constant) and `{op}`.
  """

  name: str
  names: tuple[str, ...]  # the pool quantity names are drawn from
  op_words: dict  # "+" -> how this context writes it in statements and solutions
  constant_templates: tuple[str, ...]
  op_templates: dict  # "+" -> tuple of templates
  question_templates: tuple[str, ...]


def _symbolic_context(name: str, prefix: str, op_words: dict, let: str) -> Context:
  return Context(
      name=name,
      names=tuple(f"{prefix}{i}" for i in range(64)),
      op_words=op_words,
      constant_templates=("{y} = {v} ;", f"{let} {{y}} = {{v}} ;", "{y} := {v} ;"),
      op_templates={op: ("{y} = {a} {op} {b} ;", f"{let} {{y}} = {{a}} {{op}} {{b}} ;", "{y} := {a} {op} {b} ;")
                    for op in OPS},
      question_templates=("? {y}", "{y} = ?", "find {y}"),
  )


SYMBOLIC_CONTEXTS = {
    c.name: c for c in [
        _symbolic_context("p", "p", {"+": "+", "-": "-", "*": "*"}, "let"),
        _symbolic_context("q", "q", {"+": "plus", "-": "minus", "*": "times"}, "set"),
        _symbolic_context("r", "r", {"+": "⊕", "-": "⊖", "*": "⊗"}, "put"),
    ]
}


def _story_names(adjectives, nouns, places) -> tuple[str, ...]:
  return tuple(f"{adj} {noun} in {place}" for place in places for noun in nouns for adj in adjectives)


_STORY_OPS = {
    "+": ("The number of {y} equals the sum of the number of {a} and the number of {b}.",
          "The number of {y} is the number of {a} plus the number of {b}.",
          "There are as many {y} as {a} and {b} together."),
    "-": ("The number of {y} equals the number of {a} minus the number of {b}.",
          "The number of {y} is the difference between the number of {a} and the number of {b}.",
          "There are as many {y} as {a} less {b}."),
    "*": ("The number of {y} equals the number of {a} times the number of {b}.",
          "The number of {y} is the product of the number of {a} and the number of {b}.",
          "There are as many {y} as {a} multiplied by {b}."),
}
_STORY_CONSTANTS = ("The number of {y} equals {v}.", "There are {v} {y}.", "The number of {y} is {v}.")
_STORY_QUESTIONS = ("What is the number of {y}?", "How many {y} are there?", "Find the number of {y}.")
_STORY_OP_WORDS = {"+": "+", "-": "-", "*": "*"}

STORY_CONTEXTS = {
    "zoo": Context("zoo", _story_names(
        ("adult", "baby", "young", "old"), ("owls", "lions", "zebras", "bears", "wolves", "foxes", "deer", "hawks"),
        ("Jefferson Circus", "Bundle Ranch", "Mayer Aquarium", "Hamilton Farm", "Oakridge Zoo")),
        _STORY_OP_WORDS, _STORY_CONSTANTS, _STORY_OPS, _STORY_QUESTIONS),
    "school": Context("school", _story_names(
        ("senior", "junior", "new", "visiting"),
        ("math teachers", "art teachers", "music teachers", "science teachers", "history teachers", "coaches",
         "librarians", "counselors"),
        ("Riverside High", "Lincoln Academy", "Maple School", "Westview College", "Pine Hill School")),
        _STORY_OP_WORDS, _STORY_CONSTANTS, _STORY_OPS, _STORY_QUESTIONS),
    "festival": Context("festival", _story_names(
        ("short", "long", "silent", "foreign"),
        ("dramas", "comedies", "documentaries", "thrillers", "westerns", "musicals", "cartoons", "romances"),
        ("Cannes Festival", "Sundance Festival", "Venice Festival", "Berlin Festival", "Toronto Festival")),
        _STORY_OP_WORDS, _STORY_CONSTANTS, _STORY_OPS, _STORY_QUESTIONS),
}

SURFACES = {"symbolic": SYMBOLIC_CONTEXTS, "story": STORY_CONTEXTS}

# -- config ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ContextWeight:
  """One entry of a context mixture: `weight` of the data, optionally only at ops in `op_range` (inclusive)."""

  context: str
  weight: float
  op_range: tuple[int, int] | None = None


MIXTURE_PRESETS = {
    # symbolic surface
    "p": (("p", 1.0),),
    "pqr-uniform": (("p", 1 / 3), ("q", 1 / 3), ("r", 1 / 3)),
    # context seeding (interplay study): the new context at 1% / 0.1% / 0% of pre-training, only at op 2
    "p-seed-q-1pct": (("p", 0.99), ("q", 0.01, (2, 2))),
    "p-seed-q-0.1pct": (("p", 0.999), ("q", 0.001, (2, 2))),
    "q": (("q", 1.0),),
    # story surface
    "zoo": (("zoo", 1.0),),
    "story-uniform": (("zoo", 1 / 3), ("school", 1 / 3), ("festival", 1 / 3)),
    "zoo-seed-school-1pct": (("zoo", 0.99), ("school", 0.01, (2, 2))),
}


def parse_mixture(mixture: str | Sequence, surface: str) -> tuple[ContextWeight, ...]:
  """A preset name or a sequence of `(context, weight[, (op_lo, op_hi)])`; validated: known contexts, weights > 0
  summing to 1 (a preset that does not sum to 1 is an error, never silently renormalised)."""
  if isinstance(mixture, str):
    if mixture not in MIXTURE_PRESETS:
      check_keys([mixture], MIXTURE_PRESETS, "context mixture presets")
    mixture = MIXTURE_PRESETS[mixture]
  entries = tuple(m if isinstance(m, ContextWeight) else ContextWeight(
      m[0], float(m[1]), tuple(m[2]) if len(m) > 2 and m[2] is not None else None) for m in mixture)
  if not entries:
    raise ConfigError("context mixture is empty")
  check_keys([e.context for e in entries], SURFACES[surface], f"contexts of the {surface!r} surface")
  if any(e.weight <= 0 for e in entries):
    raise ConfigError(f"context mixture weights must be positive: {[(e.context, e.weight) for e in entries]}")
  total = sum(e.weight for e in entries)
  if abs(total - 1.0) > 1e-6:
    raise ConfigError(f"context mixture weights sum to {total:.6g}, not 1: "
                      f"{[(e.context, e.weight) for e in entries]}")
  return entries


@dataclasses.dataclass(frozen=True)
class TaskConfig:
  """The dials of the task world (all data; see the module docstring for what they mean)."""

  surface: str = "symbolic"
  contexts: str | tuple = "p"  # a MIXTURE_PRESETS name or ((context, weight[, (op_lo, op_hi)]), ...)
  op_range: tuple[int, int] = (2, 6)  # inclusive; a context's own range replaces it
  modulus: int | None = 23
  max_value: int = 99  # with modulus=None: every value stays in [0, max_value]
  constant_range: tuple[int, int] = (1, 9)
  ops: tuple[str, ...] = OPS
  distractors: tuple[int, int] = (0, 2)  # extra quantities the answer does not need (inclusive range)
  order: str = "dependency"  # or "shuffled": statements in random order (the model must plan)
  reach: str = "any"  # "any": operands from any earlier quantity; "near": one chain, each operation using the
  #                    previous one and (otherwise) a fresh constant or one of the last `near_window` quantities
  near_window: int = 3
  branch_prob: float = 0.25  # chance an operation starts a new branch instead of extending the chain
  eval_fraction: float = 0.1  # share of problem structures that belong to the eval split
  phrasings: int | None = None  # use only each context's first k phrasings of a statement (None: all of them)
  names: int | None = None  # draw quantity names from each context's first k names (None: the whole pool)
  solution_format: str = "expanded"  # a solution line: "expanded" `y = a op b = va op vb = r`, "inline"
  #                                     `y = a va op b vb = r` or "lookup" `y = a op b ; a = va ; b = vb ; y = r`
  recall_drills: float = 0.0  # share of pre-training documents whose solution is a look-up drill instead
  #                             (`recall_document`): every constant of the problem restated by name, in random order

  def __post_init__(self):
    for key, allowed in (("surface", SURFACES), ("order", ("dependency", "shuffled")), ("reach", ("any", "near")),
                         ("solution_format", SOLUTION_FORMATS)):
      if getattr(self, key) not in allowed:
        raise ConfigError(f"task {key}={getattr(self, key)!r} is not one of {list(allowed)}")
    if not set(self.ops) <= set(OPS) or not self.ops:
      raise ConfigError(f"task ops {self.ops} must be a non-empty subset of {OPS}")
    if self.op_range[0] < 1 or self.op_range[0] > self.op_range[1]:
      raise ConfigError(f"task op_range {self.op_range} must be (lo, hi) with 1 <= lo <= hi")
    if not 0 <= self.recall_drills <= 1:
      raise ConfigError(f"task recall_drills={self.recall_drills} must be in [0, 1]")
    if not 0 < self.eval_fraction < 1:
      raise ConfigError(f"eval_fraction {self.eval_fraction} must be in (0, 1)")
    for key in ("phrasings", "names"):
      if getattr(self, key) is not None and getattr(self, key) < 1:
        raise ConfigError(f"task {key}={getattr(self, key)} must be None (all) or >= 1")
    object.__setattr__(self, "op_range", tuple(self.op_range))
    object.__setattr__(self, "mixture", parse_mixture(self.contexts, self.surface))

  def op_range_of(self, context: str) -> tuple[int, int]:
    for entry in self.mixture:
      if entry.context == context and entry.op_range is not None:
        return entry.op_range
    return self.op_range

  def replace(self, **changes) -> "TaskConfig":
    values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    check_keys(changes, values, "task config")
    return TaskConfig(**{**values, **changes})


# -- problems -------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Node:
  kind: str  # "const" or "op"
  value: int
  op: str | None = None
  args: tuple[int, int] | None = None  # ids of the operand nodes (always earlier nodes)


@dataclasses.dataclass(frozen=True)
class Step:
  """One solution line: `target = a op b = va op vb = result`."""

  target: str
  op: str
  a: str
  b: str
  va: int
  vb: int
  result: int


@dataclasses.dataclass(frozen=True, eq=False)
class Problem:
  nodes: tuple[Node, ...]  # in creation order, which is topological
  names: tuple[str, ...]  # surface name of each node
  target: int  # id of the asked node
  order: tuple[int, ...]  # node ids in statement order
  phrasing: tuple[int, ...]  # template index per statement (aligned with `order`), then the question's
  context: str
  surface: str
  modulus: int | None
  seed: int
  split: str
  index: int
  pinned_op: int | None = None
  pinned_context: str | None = None
  order_kind: str = "dependency"  # how the statements were ordered: "dependency" or "shuffled"
  solution_format: str = "expanded"  # how solution lines are written (SOLUTION_FORMATS)

  @property
  def key(self) -> dict:
    """What `generate(cfg, **problem.key)` needs to make this problem again (e.g. from RL prompt metadata)."""
    return {"seed": self.seed, "split": self.split, "index": self.index, "op": self.pinned_op,
            "context": self.pinned_context}

  @property
  def ctx(self) -> Context:
    return SURFACES[self.surface][self.context]

  @property
  def answer(self) -> int:
    return self.nodes[self.target].value

  @cached_property
  def needed(self) -> tuple[int, ...]:
    """Ids of every node the answer depends on (the target included), in topological order."""
    seen, stack = set(), [self.target]
    while stack:
      n = stack.pop()
      if n not in seen:
        seen.add(n)
        stack.extend(self.nodes[n].args or ())
    return tuple(sorted(seen))

  @property
  def needed_ops(self) -> tuple[int, ...]:
    return tuple(n for n in self.needed if self.nodes[n].kind == "op")

  @cached_property
  def solution_order(self) -> tuple[int, ...]:
    """The needed operations in the order the gold solution computes them: the order their statements appear in
    when statements are in dependency order (the solution then reads the problem top to bottom, skipping what the
    answer does not need), otherwise creation order (a topological order the model must work out)."""
    if self.order_kind == "dependency":
      position = {node: k for k, node in enumerate(self.order)}
      return tuple(sorted(self.needed_ops, key=position.__getitem__))
    return self.needed_ops

  @property
  def op(self) -> int:
    """Difficulty: the number of operations on the path to the answer (= solution steps)."""
    return len(self.needed_ops)

  @property
  def op_with_constants(self) -> int:
    """The reference study's count: operations plus the constant assignments they use."""
    return len(self.needed)

  @cached_property
  def structure_hash(self) -> str:
    return structure_hash(self.nodes, self.target)

  # -- text --------------------------------------------------------------------------------------------------------

  def statements(self) -> list[str]:
    ctx, out = self.ctx, []
    for node_id, phrasing in zip(self.order, self.phrasing):
      node = self.nodes[node_id]
      y = self.names[node_id]
      if node.kind == "const":
        out.append(ctx.constant_templates[phrasing].format(y=y, v=node.value))
      else:
        a, b = (self.names[i] for i in node.args)
        out.append(ctx.op_templates[node.op][phrasing].format(y=y, a=a, b=b, op=ctx.op_words[node.op]))
    return out

  def question(self) -> str:
    return self.ctx.question_templates[self.phrasing[-1]].format(y=self.names[self.target])

  def text(self) -> str:
    """The problem as the model reads it: statements then the question."""
    return " ".join(self.statements()) + "\n" + self.question()

  def gold_steps(self) -> list[Step]:
    steps = []
    for n in self.solution_order:
      node = self.nodes[n]
      a, b = node.args
      steps.append(Step(self.names[n], node.op, self.names[a], self.names[b], self.nodes[a].value,
                        self.nodes[b].value, node.value))
    return steps

  def perturbed_steps(self, rng: np.random.Generator, error: str = "mixed") -> list[Step]:
    """The gold solution with one step made wrong and every later value recomputed from it, so the final answer
    follows from the error (a plausible wrong solution for preference pairs). `error`: "result" (off by
    1..modulus-1, or 1..9 on bounded integers), "operand" (a mis-bound operand: the value of another quantity of
    the problem read in place of the named one, the slip a small model makes most; a wrong result where no other
    value exists) or "mixed" (either, at equal odds)."""
    values = {n: self.nodes[n].value for n in self.needed}
    k = int(rng.integers(len(self.solution_order)))
    misbind = rng.random() < 0.5 if error == "mixed" else error == "operand"
    steps = []
    for i, n in enumerate(self.solution_order):
      node = self.nodes[n]
      a, b = node.args
      va, vb = values[a], values[b]
      result = apply_op(node.op, va, vb, self.modulus)
      if i == k and misbind:
        side = int(rng.integers(2))
        true = (va, vb)[side]
        others = sorted({m.value for j, m in enumerate(self.nodes) if j not in (a, b, n)} - {true})
        if others:
          wrong = others[int(rng.integers(len(others)))]
          va, vb = (wrong, vb) if side == 0 else (va, wrong)
          result = apply_op(node.op, va, vb, self.modulus)
      if i == k and (not misbind or (va, vb) == (values[a], values[b])):
        result = result + int(rng.integers(1, self.modulus or 10))
        result = result % self.modulus if self.modulus else result
      values[n] = result
      steps.append(Step(self.names[n], node.op, self.names[a], self.names[b], va, vb, result))
    return steps

  def format_step(self, step: Step) -> str:
    w = self.ctx.op_words[step.op]
    if self.solution_format == "inline":
      line = f"{step.target} = {step.a} {step.va} {w} {step.b} {step.vb} = {step.result}"
    elif self.solution_format == "lookup":
      line = (f"{step.target} = {step.a} {w} {step.b} ; {step.a} = {step.va} ; {step.b} = {step.vb} ; "
              f"{step.target} = {step.result}")
    else:
      line = f"{step.target} = {step.a} {w} {step.b} = {step.va} {w} {step.vb} = {step.result}"
    return line + ("." if self.surface == "story" else "")

  def solution(self, steps: Sequence[Step] | None = None) -> str:
    """Step-by-step solution, one operation per line, then the final-answer line."""
    steps = self.gold_steps() if steps is None else steps
    return "\n".join([self.format_step(s) for s in steps] + [answer_line(steps[-1].result)])


ANSWER_PREFIX = "answer:"


def answer_line(value: int) -> str:
  return f"{ANSWER_PREFIX} {value}"


def apply_op(op: str, a: int, b: int, modulus: int | None) -> int:
  value = a + b if op == "+" else a - b if op == "-" else a * b
  return value % modulus if modulus else value


def structure_hash(nodes: Sequence[Node], target: int) -> str:
  """Canonical hash of the computation of `target`: constants by value, operations by operator and operand hashes
  (sorted for the commutative `+` and `*`). Names, surface, phrasing, statement order and distractors do not enter."""
  memo: dict[int, str] = {}
  for i, node in enumerate(nodes[:target + 1]):
    if node.kind == "const":
      key = f"c{node.value}"
    else:
      a, b = memo[node.args[0]], memo[node.args[1]]
      if node.op in "+*":
        a, b = sorted((a, b))
      key = f"{node.op}({a},{b})"
    memo[i] = hashlib.sha1(key.encode()).hexdigest()
  return memo[target]


def split_of(structure: str, eval_fraction: float) -> str:
  return "eval" if int(structure[:12], 16) / 16**12 < eval_fraction else "train"


# -- generation -----------------------------------------------------------------------------------------------------


class _Builder:
  """Adds nodes while keeping values in range; one per attempt."""

  def __init__(self, cfg: TaskConfig, rng: np.random.Generator):
    self.cfg, self.rng = cfg, rng
    self.nodes: list[Node] = []

  def constant(self) -> int:
    lo, hi = self.cfg.constant_range
    self.nodes.append(Node("const", int(self.rng.integers(lo, hi + 1))))
    return len(self.nodes) - 1

  def window(self, ids: Sequence[int]) -> list[int]:
    if self.cfg.reach == "near":
      ids = [i for i in ids if i >= len(self.nodes) - self.cfg.near_window]
    return list(ids)

  def operation(self, a: int, b: int) -> int:
    cfg, rng = self.cfg, self.rng
    if rng.random() < 0.5:
      a, b = b, a
    ops = list(cfg.ops)
    rng.shuffle(ops)
    for op in ops:
      value = apply_op(op, self.nodes[a].value, self.nodes[b].value, cfg.modulus)
      if cfg.modulus or 0 <= value <= cfg.max_value:
        break
      if op == "-" and 0 <= -value <= cfg.max_value:  # a - b < 0: b - a is in range
        a, b, value = b, a, -value
        break
    else:
      return -1
    self.nodes.append(Node("op", value, op, (a, b)))
    return len(self.nodes) - 1

  def operand(self, exclude: set[int]) -> int:
    """A non-chain operand: a fresh constant, or an earlier quantity already used (a DAG, not a tree)."""
    pool = [i for i in self.window(range(len(self.nodes))) if i not in exclude]
    if not pool or self.rng.random() < 0.6:
      return self.constant()
    return int(self.rng.choice(pool))


def _build_needed(cfg: TaskConfig, rng: np.random.Generator, n_ops: int) -> _Builder | None:
  """The answer's computation: `n_ops` operations each of which the last one depends on."""
  bld = _Builder(cfg, rng)
  unused: list[int] = []  # operations no later operation consumes yet
  for i in range(n_ops):
    remaining = n_ops - 1 - i
    # consume c pending branches; afterwards at most `remaining + 1` may be pending, and the last step leaves one
    options = [c for c in (0, 1, 2) if c <= len(unused) and len(unused) - c <= remaining]
    if cfg.reach == "near":  # a single chain: each operation builds on the one before it
      options = [min(1, len(unused))]
    if i == n_ops - 1:
      c = len(unused)
    elif len(options) == 1:
      c = options[0]
    else:
      weights = np.array([cfg.branch_prob if c == 0 else 1.0 if c == 1 else 0.5 * cfg.branch_prob for c in options])
      c = int(rng.choice(options, p=weights / weights.sum()))
    chosen = []
    for _ in range(c):
      pick = unused[-1] if cfg.reach == "near" else unused[int(rng.integers(len(unused)))]
      unused.remove(pick)
      chosen.append(pick)
    while len(chosen) < 2:
      chosen.append(bld.operand(exclude=set(unused) | set(chosen)))
    node = bld.operation(*chosen)
    if node < 0:
      return None
    unused.append(node)
  return bld


def generate(cfg: TaskConfig, seed: int, split: str, index: int, op: int | None = None,
             context: str | None = None) -> Problem:
  """Problem `index` of `split`: a pure function of its arguments. `op`/`context` pin the difficulty / context
  (evaluation sets); otherwise both are drawn from the config's mixture."""
  if split not in SPLITS:
    raise ConfigError(f"split {split!r} is not one of {list(SPLITS)}")
  for attempt in range(10_000):
    rng = np.random.default_rng([seed, SPLITS[split], index, attempt, op or 0])
    mixture = cfg.mixture
    entry = None if context else mixture[int(rng.choice(len(mixture), p=[m.weight for m in mixture]))]
    ctx_name = context or entry.context
    # a drawn entry's own op range (a context may appear twice: ops 1-4 at 98%, a rare tail of ops 5-6 at 2%)
    lo, hi = (op, op) if op is not None else (entry.op_range if entry and entry.op_range else cfg.op_range_of(ctx_name))
    n_ops = int(rng.integers(lo, hi + 1))
    bld = _build_needed(cfg, rng, n_ops)
    if bld is None:
      continue
    target = len(bld.nodes) - 1
    if split_of(structure_hash(bld.nodes, target), cfg.eval_fraction) != split:
      continue
    for _ in range(int(rng.integers(cfg.distractors[0], cfg.distractors[1] + 1))):
      if rng.random() < 0.5:
        bld.constant()
      else:
        pool = bld.window(range(len(bld.nodes)))
        a, b = (int(x) for x in rng.choice(pool, size=2))
        bld.operation(a, b)
    return _tell(cfg, rng, bld.nodes, target, ctx_name, seed, split, index, op, context)
  raise RuntimeError(f"no problem found for split {split!r} at index {index} (op={op}): eval_fraction too small?")


def _tell(cfg, rng, nodes, target, ctx_name, seed, split, index, pinned_op, pinned_context) -> Problem:
  ctx = SURFACES[cfg.surface][ctx_name]
  pool = ctx.names[:cfg.names] if cfg.names else ctx.names
  if len(nodes) > len(pool):
    raise ConfigError(f"a problem with {len(nodes)} quantities needs more names than context {ctx_name!r} draws "
                      f"from ({len(pool)}); lower op_range or distractors, or raise names")
  names = tuple(str(n) for n in rng.choice(pool, size=len(nodes), replace=False))
  if cfg.order == "shuffled":
    order = tuple(int(i) for i in rng.permutation(len(nodes)))
  else:  # a random topological order: distractors interleave with the needed quantities
    pending = {i: set(n.args or ()) for i, n in enumerate(nodes)}
    order = []
    while pending:
      ready = sorted(i for i, deps in pending.items() if not deps)
      pick = ready[int(rng.integers(len(ready)))]
      order.append(pick)
      del pending[pick]
      for deps in pending.values():
        deps.discard(pick)
    order = tuple(order)

  def pick(templates) -> int:
    return int(rng.integers(min(len(templates), cfg.phrasings or len(templates))))

  phrasing = tuple(pick(ctx.constant_templates if nodes[i].kind == "const" else ctx.op_templates[nodes[i].op])
                   for i in order)
  phrasing += (pick(ctx.question_templates),)
  return Problem(tuple(nodes), names, target, order, phrasing, ctx_name, cfg.surface, cfg.modulus, seed, split,
                 index, pinned_op, pinned_context, cfg.order, cfg.solution_format)


# -- formats for every stage ----------------------------------------------------------------------------------------

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
THINK_FLAG, NO_THINK_FLAG = "/think", "/no_think"


def pretrain_document(p: Problem) -> str:
  """Plain text for pre-training: the problem, its solution and the answer."""
  return p.text() + "\n" + p.solution()


RECALL_QUESTION = "recall :"  # a drill's question line: a solution prompt (`find p3`) never continues as a drill


def recall_prompt(p: Problem) -> str:
  """A drill's prompt: the problem's statements, then `RECALL_QUESTION` where a solution's prompt asks its question."""
  return " ".join(p.statements()) + "\n" + RECALL_QUESTION


def recall_document(p: Problem) -> str:
  """A look-up drill for pre-training: `recall_prompt`, then one line with each of the problem's constants as
  `name value` (how the inline format writes an operand), in an order drawn from the problem's identity. It trains
  the one skill a solution cannot do without and a small model is slow to learn: a value found by its name
  (docs/learnability.md). The drill has its own question line, so sampling after a problem's question never falls
  into drill mode. The line opens with a space so its first name is the same token as in the problem (`▁p1`, not a
  bare `p1`)."""
  rng = np.random.default_rng([p.seed, SPLITS[p.split], p.index, 11])
  constants = [n for n in p.order if p.nodes[n].kind == "const"]
  pairs = [f"{p.names[n]} {p.nodes[n].value}" for n in rng.permutation(constants)]
  return recall_prompt(p) + "\n " + " ; ".join(pairs)


def is_recall_drill(p: Problem, share: float) -> bool:
  """Whether pre-training writes problem `p` as a `recall_document` (a pure function of its identity)."""
  return share > 0 and np.random.default_rng([p.seed, SPLITS[p.split], p.index, 12]).random() < share


def instruction_document(p: Problem) -> str:
  """Instruction-style text for mid-training."""
  instruction = "solve step by step :" if p.surface == "symbolic" else "Solve the problem step by step."
  return f"{instruction}\n{p.text()}\n{p.solution()}"


def sft_messages(p: Problem, think: bool | None = None, steps: Sequence[Step] | None = None) -> list[dict]:
  """A chat: the problem as the user turn and the solution as the assistant turn.

  `think=None`: the plain step-by-step solution. `think=True`: the prompt carries `/think` and the steps go inside
  `<think>…</think>` before the answer line. `think=False`: the prompt carries `/no_think`, the think block is empty
  and only the answer follows (as Qwen3 does).
  """
  steps = p.gold_steps() if steps is None else list(steps)
  user = p.text()
  if think is None:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": p.solution(steps)}]
  answer = answer_line(steps[-1].result)
  if think:
    body = "\n".join(p.format_step(s) for s in steps)
    return [{"role": "user", "content": f"{user} {THINK_FLAG}"},
            {"role": "assistant", "content": f"{THINK_OPEN}\n{body}\n{THINK_CLOSE}\n{answer}"}]
  return [{"role": "user", "content": f"{user} {NO_THINK_FLAG}"},
          {"role": "assistant", "content": f"{THINK_OPEN}\n{THINK_CLOSE}\n{answer}"}]


def rl_prompt(p: Problem, think: bool | None = None) -> dict:
  """The user turn only, with what the verifier needs: the gold answer and the problem's identity."""
  user = sft_messages(p, think)[0]
  return {"messages": [user], "answer": p.answer, "op": p.op, "context": p.context,
          "seed": p.seed, "split": p.split, "index": p.index, "key": p.key}


def preference_pair(p: Problem, rng: np.random.Generator | None = None, error: str = "mixed") -> dict:
  """Chosen = the gold solution; rejected = one perturbed step (`Problem.perturbed_steps`' `error`) and the answer
  that follows from it."""
  rng = rng or np.random.default_rng([p.seed, SPLITS[p.split], p.index, 7])
  prompt = [{"role": "user", "content": p.text()}]
  return {"prompt": prompt,
          "chosen": [{"role": "assistant", "content": p.solution()}],
          "rejected": [{"role": "assistant", "content": p.solution(p.perturbed_steps(rng, error))}],
          "op": p.op, "context": p.context}


def eval_set(cfg: TaskConfig, op: int, context: str, n: int, seed: int = 0) -> list[Problem]:
  """`n` eval-split problems at exactly `op` operations in `context`: one cell of an evaluation table."""
  check_keys([context], SURFACES[cfg.surface], f"contexts of the {cfg.surface!r} surface")
  return [generate(cfg, seed, "eval", i, op=op, context=context) for i in range(n)]
