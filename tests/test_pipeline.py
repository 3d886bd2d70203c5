"""Data pipelines: packing, SFT loss masks, multi-process sharding, checkpoint restore, mixtures and schedules, RL
and preference batches, config validation.

Runs against a character-level stand-in tokenizer (exact decode, so every check can compare text), and the checks
that depend on tokenization also against the real task tokenizer.
"""

import json
import re

import grain
import numpy as np
import pytest

from jaxstages.config import HASH_NEUTRAL, ConfigError
from jaxstages.data import pipeline as pl
from jaxstages.data import tasks


class CharTokenizer:
  """One token per character; the chat template and specials of the real tokenizer."""

  SPECIALS = ("<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")

  def __init__(self):
    self.pad_id, self.eos_id, self.im_start_id, self.im_end_id, self.think_open_id, self.think_close_id = range(6)
    self.vocab_size = 6 + 0x3000  # covers the r context's operator symbols
    self._split = re.compile("(" + "|".join(re.escape(s) for s in self.SPECIALS) + ")")

  def encode(self, text):
    ids = []
    for part in self._split.split(text):
      ids.extend([self.SPECIALS.index(part)] if part in self.SPECIALS else [6 + ord(c) for c in part])
    return ids

  def decode(self, ids):
    return "".join(self.SPECIALS[i] if i < 6 else chr(i - 6) for i in ids)

  def encode_chat(self, messages, add_generation_prompt=False):
    ids, mask = [], []
    for m in messages:
      head = [self.im_start_id] + self.encode(m["role"] + "\n")
      body = self.encode(m["content"]) + [self.im_end_id]
      ids += head + body + self.encode("\n")
      mask += [0] * len(head) + [int(m["role"] == "assistant")] * len(body) + [0]
    if add_generation_prompt:
      ids += [self.im_start_id] + self.encode("assistant\n")
      mask += [0] * (len(ids) - len(mask))
    return ids, mask


TASK = dict(surface="symbolic", contexts="pqr-uniform", op_range=(1, 3), distractors=(0, 1))


@pytest.fixture(scope="module")
def tok():
  return CharTokenizer()


@pytest.fixture(scope="module", params=["char", "task"])
def any_tok(request, tok):
  """The stand-in, and the real task tokenizer."""
  if request.param == "char":
    return tok
  from jaxstages.data import tokenizer  # an import error fails the tests that use it, never skips them
  return tokenizer.task_tokenizer(tasks.TaskConfig(**TASK), n_samples=300, seed=0)


def take(it, n):
  return [next(it) for _ in range(n)]


def segments(row):
  """`[(start, stop)]` of each segment of a packed row, checking each is one contiguous run."""
  seg = row["segment_ids"]
  out = []
  for s in range(1, seg.max() + 1):
    idx = np.flatnonzero(seg == s)
    assert len(idx) and (np.diff(idx) == 1).all(), f"segment {s} is not contiguous: {idx}"
    out.append((idx[0], idx[-1] + 1))
  assert (seg[out[-1][1]:] == 0).all() if out else (seg == 0).all(), "padding must follow the last segment"
  return out


def unbatch(batch):
  n = len(next(iter(batch.values())))
  return [{k: v[i] for k, v in batch.items()} for i in range(n)]


# -- packing --------------------------------------------------------------------------------------------------------


def test_pack_documents_segments_targets_and_padding(tok):
  seq_len = 96
  cfg = tasks.TaskConfig(**TASK)
  docs = [pl.lm_document(tok, tasks.pretrain_document(tasks.generate(cfg, 0, "train", i)))["tokens"].tolist()
          for i in range(24)]
  docs += [[7, 8, 9], [10]]  # tiny documents: a one-token document has no target at all
  assert max(map(len, docs)) > seq_len > min(map(len, docs))  # splitting and sharing rows both happen
  rows = list(pl.pack_documents(docs, seq_len, num_bins=4, overflow="split"))

  # expected pieces: each document cut every seq_len tokens; as a multiset, since rows reorder them
  expected = sorted((tuple(d[o:o + seq_len]), i, o) for i, d in enumerate(docs) for o in range(0, len(d), seq_len))
  found = []
  for row in rows:
    assert {k: row[k].dtype for k in row} == {"tokens": np.int32, "targets": np.int32, "segment_ids": np.int32,
                                               "positions": np.int32, "loss_mask": np.float32}
    for start, stop in segments(row):
      piece = tuple(row["tokens"][start:stop].tolist())
      match = [(i, o) for p, i, o in expected if p == piece]
      assert match, f"a segment is not one contiguous piece of one document: {tok.decode(piece)!r}"
      i, o = match[0]
      doc = docs[i]
      np.testing.assert_array_equal(row["positions"][start:stop], np.arange(stop - start))
      # targets: the document's next tokens, across a split cut too; the document's last token has none
      nxt = doc[o + 1:o + 1 + stop - start]
      np.testing.assert_array_equal(row["targets"][start:start + len(nxt)], nxt)
      want_mask = np.zeros(stop - start)
      want_mask[:len(nxt)] = 1
      np.testing.assert_array_equal(row["loss_mask"][start:stop], want_mask)
      found.append((piece, i, o))
    pad = row["segment_ids"] == 0
    for key in ("tokens", "targets", "positions", "loss_mask"):
      assert (row[key][pad] == 0).all(), key
  assert sorted(found) == expected, "every piece packed exactly once"
  assert sum(r["loss_mask"].sum() for r in rows) == sum(len(d) - 1 for d in docs)


@pytest.mark.parametrize("overflow", ["truncate", "drop"])
def test_pack_documents_overflow(tok, overflow):
  docs = [list(range(10, 30)), list(range(40, 45))]
  rows = list(pl.pack_documents(docs, 8, num_bins=2, overflow=overflow))
  pieces = [tuple(r["tokens"][a:b]) for r in rows for a, b in segments(r)]
  if overflow == "truncate":
    assert sorted(pieces) == [tuple(range(10, 18)), tuple(range(40, 45))]
    assert sum(r["loss_mask"].sum() for r in rows) == 8 + 4  # the cut's last token still has its real target
  else:
    assert pieces == [tuple(range(40, 45))]


def test_pretrain_pipeline_rows_come_from_the_task_documents(any_tok):
  cfg = pl.data_config(dict(kind="pretrain", task=TASK, seq_len=256, batch_size=4, seed=3))
  batches = take(pl.make_pipeline(cfg, any_tok, 0, 1), 3)
  docs = [pl.lm_document(any_tok, tasks.pretrain_document(tasks.generate(cfg.task, 3, "train", i)))["tokens"]
          for i in range(200)]
  doc_index = {tuple(d.tolist()): i for i, d in enumerate(docs)}
  used = []
  for batch in batches:
    assert batch["tokens"].shape == (4, 256) and batch["source"].tolist() == [0] * 4
    for row in unbatch(batch):
      for start, stop in segments(row):
        piece = tuple(row["tokens"][start:stop].tolist())
        assert piece in doc_index, "task documents here are shorter than seq_len: each segment is a whole one"
        assert piece[-1] == any_tok.eos_id and row["loss_mask"][stop - 1] == 0
        used.append(doc_index[piece])
  # first-fit packing reorders documents only within one set of bins; no document is lost or repeated
  assert sorted(used) == list(range(len(used)))


def test_pretrain_loss_on_solution_trains_exactly_the_solution_and_answer(tok):
  """`loss_on="solution"`: the trained targets of each packed document decode to its solution, answer line and
  end-of-document token, and nothing of the problem."""
  cfg = pl.data_config(dict(kind="pretrain", task=TASK, seq_len=256, batch_size=4, seed=3, loss_on="solution"))
  solutions = {}
  for i in range(200):
    p = tasks.generate(cfg.task, 3, "train", i)
    solutions[tuple(pl.lm_document(tok, tasks.pretrain_document(p))["tokens"].tolist())] = p.solution()
  n = 0
  for batch in take(pl.make_pipeline(cfg, tok, 0, 1), 2):
    for row in unbatch(batch):
      for start, stop in segments(row):
        trained = row["targets"][start:stop][row["loss_mask"][start:stop] > 0]
        solution = solutions[tuple(row["tokens"][start:stop].tolist())]
        assert trained[-1] == tok.eos_id and tok.decode(trained[:-1].tolist()) == solution
        n += 1
  assert n >= 8


def test_recall_drills_replace_that_share_of_solutions_with_each_constant_by_name(tok):
  """`task.recall_drills=0.5`: about half the documents train a line of `name value` pairs, one per constant of the
  problem (each pair read back against the problem's own constants), and the other half the usual solution."""
  cfg = pl.data_config(dict(kind="pretrain", task=dict(TASK, recall_drills=0.5), seq_len=256, batch_size=4, seed=3,
                            loss_on="solution"))
  problems = {}
  for i in range(300):
    p = tasks.generate(cfg.task, 3, "train", i)
    text = tasks.recall_document(p) if tasks.is_recall_drill(p, 0.5) else tasks.pretrain_document(p)
    problems[tuple(pl.lm_document(tok, text)["tokens"].tolist())] = p
  drills = solutions = 0
  for batch in take(pl.make_pipeline(cfg, tok, 0, 1), 4):
    for row in unbatch(batch):
      for start, stop in segments(row):
        p = problems[tuple(row["tokens"][start:stop].tolist())]
        trained = tok.decode(row["targets"][start:stop][row["loss_mask"][start:stop] > 0][:-1].tolist()).strip()
        if trained == p.solution():
          solutions += 1
          continue
        constants = {p.names[n]: p.nodes[n].value for n in p.order if p.nodes[n].kind == "const"}
        pairs = dict((name, int(value)) for name, value in (pair.split() for pair in trained.split(" ; ")))
        assert pairs == constants
        # a drill is asked by its own question line, never by the problem's question (which asks for a solution)
        text = tok.decode(row["tokens"][start:stop].tolist())
        assert tasks.RECALL_QUESTION in text and p.question() not in text
        drills += 1
  assert drills >= 4 and solutions >= 4, (drills, solutions)
  assert tasks.TaskConfig().recall_drills == 0.0 and "recall_drills" in HASH_NEUTRAL


# -- SFT ------------------------------------------------------------------------------------------------------------


def sft_lookup(tokenizer, task_cfg, seed, n):
  """Token ids of every chat the SFT pipeline may produce for indices < n -> its messages."""
  out = {}
  for i in range(n):
    p = tasks.generate(task_cfg, seed, "train", i)
    for think in (True, False, None):
      messages = tasks.sft_messages(p, think=think)
      out[tuple(tokenizer.encode_chat(messages)[0])] = messages
  return out


def test_sft_loss_mask_is_exactly_the_assistant_turns(any_tok):
  cfg = pl.data_config(dict(kind="sft", task=TASK, seq_len=512, batch_size=2, seed=5, overflow="drop",
                            think_mix=(0.4, 0.3, 0.3)))
  lookup = sft_lookup(any_tok, cfg.task, 5, 60)
  end_of_turn = any_tok.decode([any_tok.im_end_id])
  seen_think = set()
  for batch in take(pl.make_pipeline(cfg, any_tok, 0, 1), 2):
    for row in unbatch(batch):
      for start, stop in segments(row):
        messages = lookup[tuple(row["tokens"][start:stop].tolist())]
        trained = row["targets"][start:stop][row["loss_mask"][start:stop] > 0]
        assert any_tok.decode(trained.tolist()) == messages[1]["content"] + end_of_turn
        seen_think.add(messages[0]["content"].split()[-1])
  assert {tasks.THINK_FLAG, tasks.NO_THINK_FLAG} <= seen_think, "the think mix yields think and no-think chats"


def test_sft_loss_on_all_covers_every_real_token(tok):
  cfg = dict(kind="sft", task=TASK, seq_len=512, batch_size=2, seed=5, overflow="drop", loss_on="all")
  for batch in take(pl.make_pipeline(cfg, tok, 0, 1), 2):
    seg = batch["segment_ids"]
    # every real token is a trained target except each chat's first one (the last position has no successor)
    same_next = np.zeros_like(seg, bool)
    same_next[:, :-1] = (seg[:, :-1] == seg[:, 1:]) & (seg[:, :-1] > 0)
    np.testing.assert_array_equal(batch["loss_mask"] > 0, same_next)


# -- multi-process sharding and restore -----------------------------------------------------------------------------


@pytest.mark.parametrize("num_examples", [12, 10])
def test_two_processes_split_a_finite_set_disjointly_and_completely(tok, num_examples):
  cfg = dict(kind="rl", task=TASK, num_examples=num_examples, epochs=1, batch_size=4, prompt_len=200, seed=1)
  single = [e for b in pl.make_pipeline(cfg, tok, 0, 1) for e in unbatch(b)]
  per_process = [[e for b in pl.make_pipeline(cfg, tok, p, 2) for e in unbatch(b)] for p in range(2)]
  assert len(per_process[0]) == len(per_process[1]) == len(single) // 2, "equal batch counts on every process"
  index = lambda es: [int(e["index"]) for e in es if e["valid"]]
  assert sorted(index(single)) == list(range(num_examples))
  a, b = (set(index(es)) for es in per_process)
  assert not a & b and a | b == set(index(single))
  by_index = {int(e["index"]): e for e in single if e["valid"]}
  for e in per_process[0] + per_process[1]:
    if e["valid"]:
      np.testing.assert_array_equal(e["prompt_tokens"], by_index[int(e["index"])]["prompt_tokens"])


def test_per_process_batch_and_indivisible_batch(tok):
  batch = next(pl.make_pipeline(dict(kind="pretrain", task=TASK, seq_len=128, batch_size=6), tok, 1, 3))
  assert batch["tokens"].shape == (2, 128)
  with pytest.raises(ConfigError, match="not divisible"):
    pl.make_pipeline(dict(kind="pretrain", task=TASK, seq_len=128, batch_size=6), tok, 0, 4)


RESTORE_CASES = {
    "mixture": dict(kind="pretrain", task=TASK, seq_len=128, batch_size=2, seed=2,
                    sources=[dict(name="a", weight=0.5), dict(name="b", weight=0.5, format="instruction",
                                                              task=dict(contexts="q"))]),
    "sft-prefetch": dict(kind="sft", task=TASK, seq_len=256, batch_size=2, think_mix=(0.5, 0.0, 0.5), prefetch=2),
    "rl-epochs": dict(kind="rl", task=TASK, num_examples=5, batch_size=2, prompt_len=200),  # crosses epochs
}


@pytest.mark.parametrize("case", sorted(RESTORE_CASES))
def test_restored_iterator_continues_with_the_next_batch(tok, case):
  cfg = RESTORE_CASES[case]
  it = pl.make_pipeline(cfg, tok, 0, 1)
  take(it, 4)
  state = json.loads(json.dumps(it.get_state()))  # a checkpoint is plain JSON
  expected = take(it, 2)
  fresh = pl.make_pipeline(cfg, tok, 0, 1)
  fresh.set_state(state)
  for want, got in zip(expected, take(fresh, 2)):
    assert want.keys() == got.keys()
    for k in want:
      np.testing.assert_array_equal(want[k], got[k], err_msg=k)


def test_finite_sets_reshuffle_each_epoch(tok):
  cfg = dict(kind="rl", task=TASK, num_examples=8, batch_size=8, prompt_len=200, seed=4)
  epochs = [b["index"].tolist() for b in take(pl.make_pipeline(cfg, tok, 0, 1), 3)]
  assert all(sorted(e) == list(range(8)) for e in epochs)
  assert len({tuple(e) for e in epochs}) == 3
  ordered = next(pl.make_pipeline(dict(cfg, shuffle=False), tok, 0, 1))
  assert ordered["index"].tolist() == list(range(8))


# -- mixtures -------------------------------------------------------------------------------------------------------


def test_mixture_weights_hold_statistically():
  weights = (0.2, 0.5, 0.3)
  parents = [grain.MapDataset.range(10_000).map(lambda i, k=k: {"x": np.int32(i), "k": np.int32(k)}).to_iter_dataset()
             for k in range(3)]
  ds = pl.MixIterDataset(parents, pl.MixtureSchedule(((0, weights),)), rows_per_step=8, seed=(0,))
  n = 6000
  rows = [e for _, e in zip(range(n), ds)]
  counts = np.bincount([int(e["source"]) for e in rows], minlength=3)
  assert all(int(e["source"]) == int(e["k"]) for e in rows)
  sigma = np.sqrt(n * np.asarray(weights) * (1 - np.asarray(weights)))
  assert (np.abs(counts - n * np.asarray(weights)) < 4 * sigma).all(), counts
  # each source is read in order, so it is consumed exactly as often as it is chosen
  for k in range(3):
    assert [int(e["x"]) for e in rows if e["k"] == k] == list(range(counts[k]))


def test_pipeline_mixture_and_step_schedule(tok):
  sources = [dict(name="p", task=dict(contexts="p")), dict(name="q", task=dict(contexts="q"))]
  cfg = dict(kind="rl", task=TASK, sources=sources, batch_size=8, prompt_len=200,
             schedule=((0, dict(p=1.0)), (3, dict(p=0.25, q=0.75)), (6, dict(q=1.0))))
  batches = take(pl.make_pipeline(cfg, tok, 0, 1), 7)
  for step, batch in enumerate(batches):
    contexts = {pl.CONTEXTS[c] for c in batch["context"]}
    assert contexts == {"pq"[s] for s in batch["source"]}, "a row's source decides its data"
    if step < 3:
      assert set(batch["source"].tolist()) == {0}, step
    elif step >= 6:
      assert set(batch["source"].tolist()) == {1}, step
  middle = np.concatenate([b["source"] for b in batches[3:6]])
  assert 0 < middle.mean() < 1  # both sources while the 0.25 / 0.75 weights hold
  # a pipeline that starts at step 6 (step_offset) is already past the switch
  late = next(pl.make_pipeline(dict(cfg, step_offset=6), tok, 0, 1))
  assert set(late["source"].tolist()) == {1}


def test_linear_schedule_interpolates():
  s = pl.MixtureSchedule(((10, (1.0, 0.0)), (20, (0.0, 1.0))), "linear")
  np.testing.assert_allclose(s.weights_at(0), [1, 0])
  np.testing.assert_allclose(s.weights_at(15), [0.5, 0.5])
  np.testing.assert_allclose(s.weights_at(25), [0, 1])
  assert pl.MixtureSchedule(s.breakpoints, "constant").weights_at(19).tolist() == [1.0, 0.0]


# -- RL, eval and preference batches --------------------------------------------------------------------------------


def test_rl_batches_are_left_padded_with_matching_metadata(any_tok):
  task = dict(TASK, op_range=(3, 4))
  cfg = pl.data_config(dict(kind="rl", task=task, num_examples=16, batch_size=4, prompt_len=256, seed=7))
  for batch in take(pl.make_pipeline(cfg, any_tok, 0, 1), 2):
    assert batch["prompt_tokens"].shape == (4, 256) and batch["prompt_tokens"].dtype == np.int32
    for row in unbatch(batch):
      mask = row["prompt_mask"]
      n = int(mask.sum())
      assert (mask[:256 - n] == 0).all() and (mask[256 - n:] == 1).all(), "left padding"
      assert (row["prompt_tokens"][:256 - n] == any_tok.pad_id).all()
      p = tasks.generate(cfg.task, 7, "train", int(row["index"]))
      ids, _ = any_tok.encode_chat(tasks.rl_prompt(p)["messages"], add_generation_prompt=True)
      assert row["prompt_tokens"][256 - n:].tolist() == ids
      assert (int(row["answer"]), int(row["op"]), pl.CONTEXTS[int(row["context"])]) == (p.answer, p.op, p.context)
      assert 3 <= row["op"] <= 4 and row["valid"] == 1


def test_rl_document_prompts_are_the_problem_text(any_tok):
  """`prompt="document"`: RL straight from a pre-trained base sees the problem as in pre-training (text, newline)."""
  cfg = pl.data_config(dict(kind="rl", task=TASK, num_examples=8, batch_size=4, prompt_len=256, seed=7,
                            prompt="document"))
  for row in unbatch(next(iter(pl.make_pipeline(cfg, any_tok, 0, 1)))):
    n = int(row["prompt_mask"].sum())
    p = tasks.generate(cfg.task, 7, "train", int(row["index"]))
    assert row["prompt_tokens"][256 - n:].tolist() == any_tok.encode(p.text() + "\n")
  with pytest.raises(ConfigError, match="prompt='story' is not one of"):
    pl.data_config(dict(kind="rl", task=TASK, prompt="story"))


def test_eval_grid_is_covered_once_and_padded(tok):
  cfg = pl.data_config(dict(kind="eval", task=TASK, eval_ops=(2, 3), eval_contexts=("p", "r"), eval_per_cell=3,
                            batch_size=4, prompt_len=200))
  batches = list(pl.make_pipeline(cfg, tok, 0, 1))
  assert len(batches) == 3  # 12 problems in 4-row batches
  got = [(int(b["op"][r]), pl.CONTEXTS[int(b["context"][r])], int(b["index"][r]))
         for b in batches for r in range(4) if b["valid"][r]]
  assert got == [(op, c, i) for c in ("p", "r") for op in (2, 3) for i in range(3)]
  p = tasks.eval_set(cfg.task, 3, "r", 3)[1]
  assert p.answer == int(batches[2]["answer"][0])  # the cell (3, r), problem 1


def test_preference_pairs(tok):
  cfg = dict(kind="preference", task=TASK, batch_size=2, seq_len=400, prompt_len=200, seed=1)
  batch = next(pl.make_pipeline(cfg, tok, 0, 1))
  for row in unbatch(batch):
    pair = tasks.preference_pair(tasks.generate(tasks.TaskConfig(**TASK), 1, "train", int(row["index"])))
    for side in ("chosen", "rejected"):
      real = row[f"{side}_segment_ids"] > 0
      assert real[:real.sum()].all(), "right padding"
      response = row[f"{side}_tokens"][row[f"{side}_mask"] > 0].tolist()
      assert tok.decode(response) == pair[side][0]["content"] + "<|im_end|>"
    assert tok.decode(row["prompt_tokens"][row["prompt_mask"] > 0].tolist()).endswith("assistant\n")
  with pytest.raises(ValueError, match="does not fit"):
    next(pl.make_pipeline(dict(cfg, seq_len=50), tok, 0, 1))


def test_show_marks_untrained_tokens_and_segments(tok):
  text = pl.show(dict(kind="sft", task=TASK, seq_len=512, batch_size=2, overflow="drop"), tok, n=2)
  assert text.count("=== example") == 2 and "--- segment 2" in text
  assert "[[<|im_start|>user\n" in text and "answer:" in text


# -- config ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config, key", [
    (dict(kind="sft", seq_lenn=5), "seq_lenn"),
    (dict(kind="sft", task=dict(op_rang=(1, 2))), "op_rang"),
    (dict(kind="pretrain", sources=[dict(name="a", weight=1.0, wieght=1.0)]), "wieght"),
    (dict(kind="rl", sources=[dict(name="a"), dict(name="b")], schedule=((0, dict(a=0.5, c=0.5)),)), "c"),
])
def test_unknown_config_key_is_named(config, key):
  with pytest.raises(ConfigError, match=f"unknown key '{key}'"):
    pl.data_config(config)


def test_config_errors_and_named_configs():
  with pytest.raises(ConfigError, match="sum to 1"):
    pl.data_config(dict(kind="pretrain", sources=[dict(name="a", weight=0.5), dict(name="b", weight=0.4)]))
  with pytest.raises(ConfigError, match="kind"):
    pl.data_config(dict(kind="dpo"))
  with pytest.raises(ConfigError, match="cannot feed"):
    pl.data_config(dict(kind="rl", sources=[dict(name="a", weight=1.0, format="pretrain")]))
  for name in ("pretrain-symbolic", "pretrain-story", "midtrain-symbolic", "sft-symbolic", "preference-symbolic",
               "rl-symbolic", "eval-symbolic"):
    cfg = pl.data_config(name)
    assert cfg.kind == name.split("-")[0]
  mid = pl.data_config("configs/data.py:midtrain-symbolic")
  assert [s.name for s in mid.source_configs] == ["midtrain", "replay"]
  np.testing.assert_allclose(mid.mixture.weights_at(100), [0.5, 0.5])
