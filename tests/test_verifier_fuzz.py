"""Property-based tests of the verifier and the RL rewards: arbitrary text, huge numbers, unicode and adversarial
strings built from a problem's own names and operators never make them raise or run anything, and on generated
problems they are right (gold solutions accepted, also among noise lines; perturbed ones rejected)."""

import builtins
import contextlib
import math
import os
import subprocess

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxstages.data.tasks import THINK_CLOSE, THINK_OPEN, TaskConfig, generate
from jaxstages.rewards import extract_answer, format_ok, parse_steps, think_block, verify
from jaxstages.stages.rl import RewardConfig, completion_reward

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
WORLDS = [TaskConfig(surface="symbolic", contexts="pqr-uniform", op_range=(1, 6), distractors=(0, 2)),
          TaskConfig(surface="story", contexts="story-uniform", op_range=(1, 6), distractors=(0, 2))]


@st.composite
def problems(draw):
  return generate(WORLDS[draw(st.integers(0, 1))], draw(st.integers(0, 3)), "train", draw(st.integers(0, 10_000)))


def fragments(p):
  """Pieces of a plausible or hostile completion for problem `p`."""
  words = list(p.ctx.op_words.values()) + ["+", "-", "*", "=", ".", ":", " ", "\n", "\t", "answer:", "Answer :"]
  numbers = st.one_of(st.integers(-10**6, 10**6).map(str), st.integers(1, 6000).map(lambda n: "9" * n),
                      st.just("٣"), st.just("１２"), st.just("-"), st.just("1e9"), st.just("nan"))
  return st.one_of(st.sampled_from(list(p.names) + words + [THINK_OPEN, THINK_CLOSE, "\x00", "\u202e", "🙂"]),
                   numbers, st.text(max_size=20), st.just(p.solution()), st.just(f"answer: {p.answer}"))


@st.composite
def hostile(draw):
  p = draw(problems())
  return p, "".join(draw(st.lists(fragments(p), max_size=60)))


@contextlib.contextmanager
def nothing_runs():
  """Inside: evaluating, executing or spawning anything fails the test."""
  def refuse(*args, **kwargs):
    raise AssertionError("the verifier tried to run something")
  saved = [(builtins, n, getattr(builtins, n)) for n in ("eval", "exec", "compile")]
  saved += [(os, "system", os.system), (subprocess, "Popen", subprocess.Popen)]
  for module, name, _ in saved:
    setattr(module, name, refuse)
  try:
    yield
  finally:
    for module, name, original in saved:
      setattr(module, name, original)


def _check(p, text):
  with nothing_runs():
    _judge(p, text)


def _judge(p, text):
  answer = extract_answer(text)
  assert answer is None or (isinstance(answer, int) and abs(answer) < 10**64)
  v = verify(p, text)
  assert 0.0 <= v.process_score <= 1.0 and (not v.strict_correct or v.outcome_correct)
  assert v.outcome_correct == (answer == p.answer)
  parse_steps(p, text)
  think_block(text)
  for think in (None, True, False):
    format_ok(text, think)
  for reward in ("outcome", "process", "strict", "mixed"):
    cfg = RewardConfig(score=reward, format_weight=0.1, overlong_buffer=8)
    assert math.isfinite(completion_reward(v, text, len(text) % 80, len(text) % 7 == 0, cfg, 64))


@SETTINGS
@given(case=hostile())
def test_hostile_completions_never_raise_or_run_anything(case):
  _check(*case)


@SETTINGS
@given(p=problems(), text=st.text())
def test_arbitrary_unicode_never_raises(p, text):
  _check(p, text)


@SETTINGS
@given(p=problems(), digits=st.integers(1, 20_000))
def test_huge_numbers_are_no_answer_and_no_step(p, digits):
  """Python refuses to convert strings of more than 4,300 digits to int; such a number is simply not an answer."""
  huge = "9" * digits
  text = f"{p.names[0]} = {p.names[0]} + {p.names[0]} = {huge} + 1 = {huge}\nanswer: {huge}"
  v = verify(p, text)
  assert (v.answer is None) == (digits > 64) and not v.strict_correct


@SETTINGS
@given(p=problems(), noise=st.lists(st.text(alphabet=st.characters(blacklist_characters="=<>:\r\n\x0b\x0c\x1c\x1d\x1e"
                                                                                  "\x85\u2028\u2029"), max_size=30),
                                     max_size=4), seed=st.integers(0, 2**31 - 1))
def test_gold_accepted_among_noise_and_perturbed_rejected(p, noise, seed):
  gold = p.solution()
  assert verify(p, "\n".join(noise + [gold])).strict_correct
  perturbed = verify(p, p.solution(p.perturbed_steps(np.random.default_rng(seed))))
  assert not perturbed.strict_correct
