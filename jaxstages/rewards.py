"""Verifier and rewards for the task world. Nothing is executed: completions are parsed with regular expressions.

**Answer extraction rule.** The answer is the integer on the *first* line of the form `answer: N` (case-insensitive,
spaces around `:` tolerated, anything after the number ignored). When the completion has a think block, only the text
after the first `</think>` is searched, so reasoning inside the block never counts as the answer. Later answer lines
are ignored: a completion cannot list several answers and be credited for whichever is right.

**Process check.** Solution lines of the form `y = a op b = va op vb = r`, `y = a va op b vb = r` or
`y = a op b ; a = va ; b = vb ; y = r` (the gold formats, `tasks.SOLUTION_FORMATS`; other lines are ignored as
prose) are parsed into steps and compared with the gold dependency graph `G` (the operations the answer needs):
- *extra step*: a line defining a quantity outside `G`, or one already defined;
- *dependency error*: wrong operator or operands (order matters for `-`), or an operand used before it was computed;
- *value error*: an operand value that is not that quantity's value, or a wrong result;
- *missing step*: a quantity of `G` never defined;
- *answer error*: the extracted answer differs from the gold one (or there is none).
`score = max(0, 1 - (value + dependency + missing + min(extra, |G|) + answer) / |G|)` as in the interplay study, and a
completion is **strictly correct** when its answer is right and it has no process error at all — the
"process-verified" correctness every pass@k is reported under (with a small modulus a right answer by chance is
common).
"""

from __future__ import annotations

import dataclasses
import re
from functools import lru_cache

from jaxstages.data.tasks import THINK_CLOSE, THINK_OPEN, Problem, Step

_ANSWER = re.compile(r"^[ \t]*answer[ \t]*:[ \t]*(-?\d+)", re.IGNORECASE | re.MULTILINE)
MAX_DIGITS = 64  # a longer number is no answer and no step value (and Python will not convert 4,300+ digits)


def _number(digits: str) -> int | None:
  return int(digits) if len(digits.lstrip("-")) <= MAX_DIGITS else None


def extract_answer(completion: str) -> int | None:
  """The answer by the rule in the module docstring, or None."""
  if THINK_CLOSE in completion:
    completion = completion.split(THINK_CLOSE, 1)[1]
  match = _ANSWER.search(completion)
  return _number(match.group(1)) if match else None


@lru_cache(maxsize=None)
def _step_patterns(op_words: tuple[tuple[str, str], ...]) -> tuple[tuple[re.Pattern, ...], dict[str, str]]:
  """The line shapes of a step (tasks.SOLUTION_FORMATS): expanded `y = a op b = va op vb = r`, inline
  `y = a va op b vb = r` and lookup `y = a op b ; a = va ; b = vb ; y = r` (its restated names must repeat the
  first ones, or the line is no step)."""
  words = {word: op for op, word in op_words}
  alt = "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))
  expanded = re.compile(
      rf"^\s*(?P<y>\S.*?)\s*=\s*(?P<a>\S.*?)\s+(?P<op>{alt})\s+(?P<b>\S.*?)\s*=\s*(?P<va>-?\d+)\s+(?P<op2>{alt})\s+"
      rf"(?P<vb>-?\d+)\s*=\s*(?P<r>-?\d+)\s*\.?\s*$")
  inline = re.compile(
      rf"^\s*(?P<y>\S.*?)\s*=\s*(?P<a>\S.*?)\s+(?P<va>-?\d+)\s+(?P<op>{alt})\s+(?P<b>\S.*?)\s+(?P<vb>-?\d+)\s*=\s*"
      rf"(?P<r>-?\d+)\s*\.?\s*$")
  lookup = re.compile(
      rf"^\s*(?P<y>\S.*?)\s*=\s*(?P<a>\S.*?)\s+(?P<op>{alt})\s+(?P<b>\S.*?)\s*;\s*(?P<a2>\S.*?)\s*=\s*(?P<va>-?\d+)\s*;"
      rf"\s*(?P<b2>\S.*?)\s*=\s*(?P<vb>-?\d+)\s*;\s*(?P<y2>\S.*?)\s*=\s*(?P<r>-?\d+)\s*\.?\s*$")
  return (expanded, inline, lookup), words


def parse_steps(problem: Problem, completion: str) -> list[Step]:
  """Every line of `completion` that has the shape of a solution step (either format), in order."""
  (expanded, inline, lookup), words = _step_patterns(tuple(sorted(problem.ctx.op_words.items())))
  steps = []
  for line in completion.splitlines():
    m = expanded.match(line)
    if m and m["op"] != m["op2"]:
      m = None
    m = m or inline.match(line)
    if not m:
      m = lookup.match(line)
      if m and (m["a2"], m["b2"], m["y2"]) != (m["a"], m["b"], m["y"]):
        m = None
    values = [_number(m[k]) for k in ("va", "vb", "r")] if m else []
    if m and None not in values:
      steps.append(Step(m["y"], words[m["op"]], m["a"], m["b"], *values))
  return steps


@dataclasses.dataclass(frozen=True)
class Verdict:
  answer: int | None
  outcome_correct: bool
  value_errors: int
  dependency_errors: int
  missing_steps: int
  extra_steps: int
  process_score: float
  strict_correct: bool

  @property
  def hacked(self) -> bool:
    """Right answer, wrong steps: what outcome-only rewards cannot tell apart from a real solution."""
    return self.outcome_correct and not self.strict_correct


def verify(problem: Problem, completion: str) -> Verdict:
  """Outcome and process check of one completion against the problem's gold graph."""
  answer = extract_answer(completion)
  outcome = answer is not None and answer == problem.answer
  ids = {name: i for i, name in enumerate(problem.names)}
  gold_ops = set(problem.needed_ops)
  defined: set[int] = set()
  value_err = dep_err = extra = 0
  for step in parse_steps(problem, completion):
    node_id = ids.get(step.target)
    if node_id not in gold_ops or node_id in defined:
      extra += 1
      continue
    node = problem.nodes[node_id]
    a, b = ids.get(step.a), ids.get(step.b)
    gold_a, gold_b = node.args
    same_operands = (a, b) == (gold_a, gold_b) or (node.op != "-" and (b, a) == (gold_a, gold_b))
    computed_first = all(x is None or problem.nodes[x].kind == "const" or x in defined for x in (a, b))
    if step.op != node.op or not same_operands or not computed_first:
      dep_err += 1
    values_right = (step.result == node.value and a is not None and b is not None
                    and step.va == problem.nodes[a].value and step.vb == problem.nodes[b].value)
    if not values_right:
      value_err += 1
    defined.add(node_id)
  missing = len(gold_ops - defined)
  errors = value_err + dep_err + missing + min(extra, len(gold_ops)) + (0 if outcome else 1)
  score = max(0.0, 1.0 - errors / len(gold_ops))
  return Verdict(answer, outcome, value_err, dep_err, missing, extra, score, outcome and errors == 0)


def think_block(completion: str) -> str | None:
  """The stripped text of the think block the completion opens with (`""` for an empty one), or None when it does not
  start with `<think>` or never closes it."""
  body = completion.strip()
  if not body.startswith(THINK_OPEN) or THINK_CLOSE not in body:
    return None
  return body[len(THINK_OPEN):].split(THINK_CLOSE, 1)[0].strip()


def format_ok(completion: str, think: bool | None = None) -> bool:
  """The completion ends with exactly one answer line, after a think block when `think` is True/False."""
  body = completion.strip()
  if think is not None:
    inner = think_block(body)
    if inner is None or body.count(THINK_CLOSE) != 1 or (think is False and inner):
      return False
    body = body.split(THINK_CLOSE, 1)[1].strip()
  lines = body.splitlines()
  return bool(lines) and len(_ANSWER.findall(body)) == 1 and _ANSWER.match(lines[-1]) is not None


def outcome_reward(problem: Problem, completion: str) -> float:
  return float(verify(problem, completion).outcome_correct)


def mixed_reward(verdict: Verdict, alpha: float) -> float:
  """The interplay study's process-aware reward: `[alpha * outcome + (1 - alpha) * process] * 1[outcome correct]`."""
  if not verdict.outcome_correct:
    return 0.0
  return alpha + (1 - alpha) * verdict.process_score
