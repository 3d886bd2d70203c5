"""The verifier: accepts every gold solution, rejects every perturbed one, reads answers from messy completions."""

import numpy as np
import pytest

from jaxstages.data.tasks import TaskConfig, generate, sft_messages
from jaxstages.rewards import extract_answer, format_ok, mixed_reward, parse_steps, verify


@pytest.mark.parametrize("solution_format", ["expanded", "inline", "lookup"])
@pytest.mark.parametrize("surface,contexts", [("symbolic", "pqr-uniform"), ("story", "story-uniform")])
def test_gold_accepted_and_perturbed_rejected(surface, contexts, solution_format):
  cfg = TaskConfig(surface=surface, contexts=contexts, op_range=(1, 10), distractors=(0, 3), order="shuffled",
                   solution_format=solution_format)
  for i in range(400):
    p = generate(cfg, 3, "train", i)
    gold = verify(p, p.solution())
    assert gold.strict_correct and gold.process_score == 1.0 and not gold.hacked
    think = sft_messages(p, think=True)[1]["content"]
    assert verify(p, think).strict_correct and format_ok(think, think=True)
    perturbed = verify(p, p.solution(p.perturbed_steps(np.random.default_rng(i))))
    assert not perturbed.strict_correct and perturbed.value_errors >= 1


def test_inline_and_lookup_step_lines_parse_to_the_same_steps():
  """The inline line `y = a va op b vb = r` and the lookup line `y = a op b ; a = va ; b = vb ; y = r` are read as
  the expanded `y = a op b = va op vb = r` (hand-written lines, story names with spaces included)."""
  from jaxstages.data.tasks import Step
  p = generate(TaskConfig(op_range=(2, 2)), 0, "train", 0)
  assert parse_steps(p, "p3 = p1 4 * p2 5 = 20\np9 = p3 20 - p0 1 = 19") == [
      Step("p3", "*", "p1", "p2", 4, 5, 20), Step("p9", "-", "p3", "p0", 1 * 20, 1, 19)]
  assert parse_steps(p, "p3 = p1 4 * p2 5 = 20") == parse_steps(p, "p3 = p1 * p2 = 4 * 5 = 20") == \
      parse_steps(p, "p3 = p1 * p2 ; p1 = 4 ; p2 = 5 ; p3 = 20")
  assert parse_steps(p, "p3 = p1 * p2 ; p1 = 4 ; p5 = 5 ; p3 = 20") == []  # a restated name must repeat the first
  story = generate(TaskConfig(surface="story", contexts="zoo", op_range=(1, 1)), 0, "train", 0)
  line = "adult owls in Oakridge Zoo = baby owls in Oakridge Zoo 3 + old deer in Hamilton Farm 4 = 7."
  assert parse_steps(story, line) == [Step("adult owls in Oakridge Zoo", "+", "baby owls in Oakridge Zoo",
                                            "old deer in Hamilton Farm", 3, 4, 7)]


def test_solution_format_is_hash_neutral_at_its_default():
  """The key added with the inline format leaves the hashes of configs written before it unchanged."""
  from jaxstages.config import config_hash
  old = {"data": {"task": {"op_range": [1, 4]}}}
  assert config_hash({"data": {"task": {"op_range": [1, 4], "solution_format": "expanded"}}}) == config_hash(old)
  assert config_hash({"data": {"task": {"op_range": [1, 4], "solution_format": "inline"}}}) != config_hash(old)


def test_answer_extraction_rule():
  assert extract_answer("answer: 12") == 12
  assert extract_answer("some prose first\n  Answer :  7 because reasons\nanswer: 9") == 7  # the first counts
  assert extract_answer("I think the answer is 5") is None  # only an `answer:` line counts
  assert extract_answer("x = 3\nanswer:4.") == 4
  assert extract_answer("<think>\nanswer: 1\n</think>\nanswer: 2") == 2  # never from inside the think block
  assert extract_answer("<think>\nanswer: 1\n</think>\nno answer line") is None
  assert extract_answer("answer: -3") == -3
  assert extract_answer("") is None


def _problem():
  cfg = TaskConfig(op_range=(3, 3), distractors=(2, 2))
  for i in range(100):
    p = generate(cfg, 0, "train", i)
    nodes = [p.nodes[n] for n in p.needed_ops]
    if len({n.op for n in nodes}) >= 1 and any(p.nodes[n].kind == "op" and n not in p.needed for n in
                                                range(len(p.nodes))):
      return p
  raise AssertionError("no problem with an op distractor")


def test_process_errors_are_counted_by_kind():
  p = _problem()
  steps = p.gold_steps()
  lines = [p.format_step(s) for s in steps]
  answer = f"answer: {p.answer}"

  # right answer, first step skipped: a "hack" under outcome-only reward. The skipped quantity is missing, and the
  # step that uses it uses something never computed (a dependency error).
  v = verify(p, "\n".join(lines[1:] + [answer]))
  assert v.outcome_correct and not v.strict_correct and v.hacked
  assert (v.missing_steps, v.dependency_errors, v.value_errors, v.extra_steps) == (1, 1, 0, 0)
  assert v.process_score == pytest.approx(1 - 2 / 3)

  # an extra step (a distractor computed) is an error even with everything else right
  distractor = next(n for n in range(len(p.nodes)) if p.nodes[n].kind == "op" and n not in p.needed)
  node = p.nodes[distractor]
  a, b = node.args
  w = p.ctx.op_words[node.op]
  extra = (f"{p.names[distractor]} = {p.names[a]} {w} {p.names[b]} = {p.nodes[a].value} {w} {p.nodes[b].value} = "
           f"{node.value}")
  v = verify(p, "\n".join([extra] + lines + [answer]))
  assert v.extra_steps == 1 and v.outcome_correct and not v.strict_correct

  # steps out of order: an operand used before it was computed is a dependency error
  v = verify(p, "\n".join(list(reversed(lines)) + [answer]))
  assert v.dependency_errors >= 1 and not v.strict_correct

  # messy but correct: prose around the steps, the answer repeated afterwards
  v = verify(p, "Let me solve it.\n" + "\n".join(lines) + f"\nso\n{answer}\nanswer: {p.answer + 1}\n")
  assert v.strict_correct

  # wrong answer line only
  v = verify(p, "\n".join(lines) + f"\nanswer: {(p.answer + 1) % 23}")
  assert not v.outcome_correct and mixed_reward(v, 0.5) == 0.0
  assert mixed_reward(verify(p, p.solution()), 0.5) == 1.0


def test_parse_steps_reads_each_contexts_operators():
  cfg = TaskConfig(contexts="pqr-uniform", op_range=(4, 4))
  for i in range(30):
    p = generate(cfg, 0, "train", i)
    parsed = parse_steps(p, p.solution())
    assert [(s.target, s.op, s.result) for s in parsed] == [(s.target, s.op, s.result) for s in p.gold_steps()]


def test_format_check():
  assert format_ok("x = 1 + 2 = 1 + 2 = 3\nanswer: 3")
  assert not format_ok("answer: 3\nanswer: 3")
  assert not format_ok("answer: 3\nmore text")
  assert format_ok("<think>\n</think>\nanswer: 4", think=False)
  assert not format_ok("<think>\nx = 1\n</think>\nanswer: 4", think=False)
  assert not format_ok("answer: 4", think=True)
