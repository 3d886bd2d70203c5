"""Tokenizers: exact round trips, one token per symbol, special tokens, chat masks, save/load, HF tokenizer.json.

Each task tokenizer is trained once per module on a small corpus (`N_TRAIN` problems x 5 formats, under a second);
the texts checked are other problems (another seed, both splits, ops beyond the training range).
"""

import json
import pickle
import runpy
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from jaxstages.config import ConfigError
from jaxstages.data import tasks
from jaxstages.data import tokenizer as tk
from tests.stage_runs import TOY_TOKENIZER

N_TRAIN = 300
SURFACES = {"symbolic": "pqr-uniform", "story": "story-uniform"}
REPORT_OPS = (2, 3, 4, 5, 6, 8)
ODD_TEXTS = ("", " ", "  two leading, two trailing  ", "\n", "\n\nblank lines\n\n\n", "tab\there", "x  =  y   ;",
             "⊕⊖⊗ über 日本 🙂", "0123456789 007", "<|im_end|> <think></think>", "p1p11 p63q0", "<pad> <unk>",
             "a\r\nb", "answer:answer: ::=")


@pytest.fixture(scope="module")
def toks():
  """surface -> its task tokenizer at the default vocab size."""
  return {s: tk.task_tokenizer(tasks.TaskConfig(surface=s, contexts=c), n_samples=N_TRAIN) for s, c in
          SURFACES.items()}


def chats(p):
  return [tasks.sft_messages(p, think) for think in (None, True, False)]


def corpus(surface, n=60, seed=7):
  """Unseen texts of every format: train and eval problems at ops 1-8 (training used ops 2-6), SFT chats with
  and without a generation prompt, preference pairs with a perturbed (possibly larger-valued) solution."""
  cfg = tasks.TaskConfig(surface=surface, contexts=SURFACES[surface], op_range=(1, 8))
  texts = []
  for i in range(n):
    p = tasks.generate(cfg, seed, "eval" if i % 4 == 0 else "train", i)
    texts += [tasks.pretrain_document(p), tasks.instruction_document(p)]
    texts += [tk.render_chat(m) for m in chats(p)] + [tk.render_chat(tasks.rl_prompt(p)["messages"], True)]
    texts.append(tk.render_chat(tasks.preference_pair(p)["prompt"] + tasks.preference_pair(p)["rejected"]))
  return texts


# -- round trip ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("surface", SURFACES)
def test_round_trip_is_exact(toks, surface):
  tok = toks[surface]
  texts = corpus(surface) + list(ODD_TEXTS)
  # integers up to 99 instead of modulo 23: more, longer numbers than in training
  bounded = tasks.TaskConfig(surface=surface, contexts=SURFACES[surface], modulus=None)
  texts += [tasks.pretrain_document(tasks.generate(bounded, 3, "train", i)) for i in range(30)]
  bad = [t for t in texts if tok.decode(tok.encode(t)) != t]
  assert not bad, f"{len(bad)} of {len(texts)} texts do not round-trip, e.g. {bad[0]!r}"
  assert all(tok.decode(ids) == t for ids, t in zip(tok.encode_batch(texts[:50]), texts[:50]))
  assert tok.decode(np.asarray(tok.encode(texts[0]))) == texts[0]  # arrays of ids as well as lists
  # ids of the model's rounded-up, untrained embedding rows (a sampler may pick one) decode to nothing
  ids = tok.encode(texts[0])
  assert tok.decode(ids[:1] + [tok.vocab_size, tok.vocab_size + 100] + ids[1:]) == texts[0]


def test_unigram_round_trip_and_words_whole(toks):
  """The unigram model (with the seed-piece workaround) is exact too, and as compact as BPE on the story text."""
  for surface in SURFACES:
    uni = tk.task_tokenizer(tasks.TaskConfig(surface=surface, contexts=SURFACES[surface]), n_samples=100,
                            model_type="unigram")
    texts = corpus(surface, n=20) + list(ODD_TEXTS)
    assert all(uni.decode(uni.encode(t)) == t for t in texts)
    docs = texts[:40:6]
    n_uni, n_bpe = (sum(len(t.encode(d)) for d in docs) for t in (uni, toks[surface]))
    assert n_uni <= 1.05 * n_bpe, (surface, n_uni, n_bpe)


# -- symbolic surface: one token per symbol ----------------------------------------------------------------------


def test_symbolic_symbols_are_one_token(toks):
  tok = toks["symbolic"]
  words = [w for ctx in tasks.SYMBOLIC_CONTEXTS.values() for w in (*ctx.names, *ctx.op_words.values())]
  words += list(tk.SYMBOLIC_KEYWORDS) + list(tk.DIGITS) + [tasks.THINK_FLAG, tasks.NO_THINK_FLAG]
  for w in words:
    assert tok.encode(w) == [tok.token_to_id(w)], w  # at a line start
    if w not in (tasks.THINK_FLAG, tasks.NO_THINK_FLAG):
      assert tok.encode(" " + w) == [tok.token_to_id(tk.SPACE + w)], w  # after a space: the space merged in
  # names whose digits are not split off, and numbers that are
  assert [tok.id_to_token(i) for i in tok.encode("p11 q63 r0")] == ["p11", "▁q63", "▁r0"]
  assert [tok.id_to_token(i) for i in tok.encode("12 = 12")] == ["1", "2", "▁=", "▁1", "2"]


def test_symbolic_text_is_one_token_per_symbol(toks):
  """Every whitespace-separated word of every format costs one token, a number one per digit; spaces are free."""
  tok = toks["symbolic"]
  step = "p44 = p11 * p13 = 6 * 1 = 6"
  assert len(tok.encode(step)) == 11  # 11 symbols
  for text in corpus("symbolic", n=30):
    for line in text.split("\n"):
      body = line.replace(tk.IM_START, "").replace(tk.IM_END, "")
      expected = sum(len(w) if w.isdigit() else 1 for w in body.split())
      expected += line.count(tk.IM_START) + line.count(tk.IM_END)
      assert len(tok.encode(line)) == expected, line


# -- special tokens and the chat template ------------------------------------------------------------------------


@pytest.mark.parametrize("surface", SURFACES)
def test_special_tokens_are_single_ids(toks, surface):
  tok = toks[surface]
  ids = {name: getattr(tok, f"{name}_id") for name in ("pad", "eos", "im_start", "im_end", "think_open",
                                                        "think_close")}
  assert ids == {"pad": 0, "eos": 2, "im_start": 3, "im_end": 4, "think_open": 5, "think_close": 6}
  assert tok.id_to_token(0) == "<pad>" and tok.decode([0]) == ""
  for name, piece in tk.SPECIAL_TOKENS.items():
    assert tok.encode(piece) == [ids[name]] and tok.decode([ids[name]]) == piece
    assert tok.token_to_id(piece) == ids[name]
  assert tok.encode("\n\n") == [tok.token_to_id("\n")] * 2
  assert all(0 not in tok.encode(t) for t in corpus(surface, n=10))  # padding never comes out of encode
  with pytest.raises(KeyError):
    tok.token_to_id("no such piece")
  with pytest.raises(KeyError):
    tok.id_to_token(tok.vocab_size)


def check_chat(tok, messages, exact_full_string=True):
  """encode_chat against the rendered text: same ids (where promised), masked tokens = assistant turns + <|im_end|>."""
  ids, mask = tok.encode_chat(messages)
  text = tok.render_chat(messages)
  assert len(ids) == len(mask) and set(mask) <= {0, 1}
  assert tok.decode(ids) == text
  if exact_full_string:
    assert ids == tok.encode(text)
  trained = [i for i, m in zip(ids, mask) if m]
  assert tok.decode(trained) == "".join(m["content"] + tk.IM_END for m in messages if m["role"] == "assistant")
  # everything else, in order, is the rest of the text: headers, user/system turns, newlines between turns
  untrained = tok.decode([i for i, m in zip(ids, mask) if not m])
  rest = "".join(f"{tk.IM_START}{m['role']}\n" + ("" if m["role"] == "assistant" else m["content"] + tk.IM_END)
                 + "\n" for m in messages)
  assert untrained == rest
  # the mask is one contiguous run per assistant turn, ending on its <|im_end|>
  runs = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])))
  assert len(runs) == 2 * sum(m["role"] == "assistant" for m in messages)
  assert all(ids[end - 1] == tok.im_end_id for end in runs[1::2])


@pytest.mark.parametrize("surface", SURFACES)
def test_encode_chat_masks_and_generation_prompt(toks, surface):
  tok = toks[surface]
  cfg = tasks.TaskConfig(surface=surface, contexts=SURFACES[surface])
  for i in range(8):
    p = tasks.generate(cfg, 11, "train", i)
    for messages in chats(p):
      check_chat(tok, messages)
    # a system turn and two assistant turns
    steps = p.solution().split("\n")
    check_chat(tok, [{"role": "system", "content": "you solve problems ."}, *chats(p)[0][:1],
                     {"role": "assistant", "content": steps[0]}, {"role": "user", "content": "go on"},
                     {"role": "assistant", "content": "\n".join(steps[1:])}])
    user = tasks.rl_prompt(p, think=True)["messages"]
    ids, mask = tok.encode_chat(user, add_generation_prompt=True)
    header = tok.encode_chat(user)[0]
    assert ids == tok.encode(tok.render_chat(user, add_generation_prompt=True))
    assert ids[:len(header)] == header and not any(mask)
    assert ids[len(header):] == [tok.im_start_id] + tok.encode("assistant\n")
    assert tok.decode(ids).endswith("<|im_start|>assistant\n")
  with pytest.raises(ValueError, match="role"):
    tok.encode_chat([{"role": "user"}])


# -- save / load -------------------------------------------------------------------------------------------------


def test_save_load_round_trip(toks, tmp_path):
  tok = toks["symbolic"]
  folder = tok.save(tmp_path / "tok")
  assert sorted(p.name for p in folder.iterdir()) == ["special_tokens.json", "tokenizer.model"]
  texts = corpus("symbolic", n=10)
  for loaded in (tk.Tokenizer.load(folder), tk.Tokenizer.load(folder / "tokenizer.model"),
                 tk.load_tokenizer(folder), tk.load_tokenizer(folder / "tokenizer.model")):
    assert isinstance(loaded, tk.Tokenizer) and loaded.vocab_size == tok.vocab_size
    assert [loaded.encode(t) for t in texts] == [tok.encode(t) for t in texts]
    assert (loaded.pad_id, loaded.eos_id, loaded.im_end_id) == (tok.pad_id, tok.eos_id, tok.im_end_id)
  clone = pickle.loads(pickle.dumps(tok))  # how data-loader workers receive it
  assert [clone.encode(t) for t in texts] == [tok.encode(t) for t in texts] and clone.eos_id == tok.eos_id
  with pytest.raises(FileNotFoundError):
    tk.load_tokenizer(tmp_path / "missing")


def test_load_existing_sentencepiece_model(tmp_path):
  """A foreign .model (sentencepiece defaults, Llama-like: <unk> 0, <s> 1, </s> 2, no pad, no chat tokens)."""
  lines = [f"the number {i} of owls is {i % 7} ." for i in range(200)]
  spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(tmp_path / "foreign"),
                                 vocab_size=40, minloglevel=2)
  tok = tk.load_tokenizer(tmp_path / "foreign.model")
  assert isinstance(tok, tk.Tokenizer)
  assert tok.eos_id == 2 and tok.pad_id == 2 and tok.im_start_id is None and tok.think_open_id is None
  assert tok.decode(tok.encode("the owls")) == "the owls"
  with pytest.raises(ValueError, match="im_start"):
    tok.encode_chat([{"role": "user", "content": "hi"}])


def hf_tokenizer_json(texts, specials=tuple(tk.SPECIAL_TOKENS.values())):
  """A tiny byte-level BPE tokenizer.json (Qwen-like: ChatML tokens as special added tokens, no pad token)."""
  import tokenizers  # a dependency of transformers (dev extras): missing, the test fails
  from tokenizers import decoders, models, pre_tokenizers, trainers

  hf = tokenizers.Tokenizer(models.BPE())
  hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  hf.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=list(specials),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  hf.train_from_iterator(texts, trainer)
  return hf.to_str()


def test_hf_tokenizer(toks, tmp_path):
  texts = corpus("symbolic", n=20)
  folder = tmp_path / "hf"
  folder.mkdir()
  (folder / "tokenizer.json").write_text(hf_tokenizer_json(texts))
  tok = tk.load_tokenizer(folder)
  assert isinstance(tok, tk.HFTokenizer)
  assert (tok.eos_id, tok.im_start_id, tok.im_end_id, tok.think_open_id, tok.think_close_id) == (0, 1, 2, 3, 4)
  assert tok.pad_id == tok.eos_id  # no pad token: padding falls back to <|endoftext|>, as for Qwen
  for t in texts + list(ODD_TEXTS):
    assert tok.decode(tok.encode(t)) == t
  for piece, i in zip(tk.SPECIAL_TOKENS.values(), range(5)):
    assert tok.encode(piece) == [i] and tok.token_to_id(piece) == i and tok.id_to_token(i) == piece
  p = tasks.generate(tasks.TaskConfig(contexts="pqr-uniform"), 5, "train", 0)
  for messages in chats(p):
    check_chat(tok, messages, exact_full_string=False)
  prompt, mask = tok.encode_chat(chats(p)[0][:1], add_generation_prompt=True)
  assert tok.decode(prompt).endswith("<|im_start|>assistant\n") and not any(mask)
  # save / load, by folder and by file
  saved = tok.save(tmp_path / "hf_saved")
  for loaded in (tk.load_tokenizer(saved), tk.load_tokenizer(saved / "tokenizer.json"), tk.HFTokenizer.load(saved)):
    assert isinstance(loaded, tk.HFTokenizer) and loaded.vocab_size == tok.vocab_size
    assert [loaded.encode(t) for t in texts] == [tok.encode(t) for t in texts]
  assert pickle.loads(pickle.dumps(tok)).encode_chat(chats(p)[1]) == tok.encode_chat(chats(p)[1])
  # an HF folder with both files (as Llama ships) is read as HF; ours with both stays sentencepiece
  (folder / "tokenizer.model").write_bytes(toks["symbolic"].model_proto)
  assert isinstance(tk.load_tokenizer(folder), tk.HFTokenizer)
  ours = toks["symbolic"].save(tmp_path / "ours")
  (ours / "tokenizer.json").write_text((folder / "tokenizer.json").read_text())
  assert isinstance(tk.load_tokenizer(ours), tk.Tokenizer)


def test_hf_tokenizer_config_fallbacks(tmp_path):
  """Llama-3-like: no <|endoftext|> or ChatML tokens; eos and pad come from tokenizer_config.json."""
  folder = tmp_path / "llama"
  folder.mkdir()
  (folder / "tokenizer.json").write_text(hf_tokenizer_json(
      ["the owls are 12 ."] * 20, ("<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>")))
  tok = tk.load_tokenizer(folder)
  assert (tok.eos_id, tok.pad_id, tok.im_start_id) == (None, 2, None)  # a known pad name, but no eos
  (folder / "tokenizer_config.json").write_text(json.dumps(
      {"eos_token": {"content": "<|end_of_text|>", "special": True}, "pad_token": None}))
  tok = tk.load_tokenizer(folder)
  assert (tok.eos_id, tok.pad_id) == (1, 2)
  reloaded = tk.load_tokenizer(tok.save(tmp_path / "saved"))  # the resolved names travel in special_tokens.json
  assert (reloaded.eos_id, reloaded.pad_id) == (1, 2)
  with pytest.raises(ValueError, match="im_start"):
    tok.encode_chat([{"role": "user", "content": "hi"}])


# -- training options ------------------------------------------------------------------------------------------


def test_train_tokenizer_checks_and_determinism(toks):
  with pytest.raises(ConfigError, match="model_type"):
    tk.train_tokenizer(["a b"], 300, model_type="wordpiece")
  with pytest.raises(ConfigError, match="vocab_size"):
    tk.task_tokenizer(tasks.TaskConfig(), vocab_size=500, n_samples=10)  # 716 pieces are required
  # the stage's mixture and dials do not matter: every stage of a surface gets the same ids
  other = tk.task_tokenizer(tasks.TaskConfig(contexts="p-seed-q-0.1pct", op_range=(1, 3)), n_samples=N_TRAIN)
  assert other.model_proto == toks["symbolic"].model_proto


def test_the_committed_toy_tokenizer_is_the_one_a_symbolic_stage_trains():
  """A stage given no tokenizer trains `task_tokenizer` on its surface (2,000 problems); the committed toy base's
  tokenizer is that one byte for byte, so the stage tests read it instead (tests/stage_runs.TOY_TOKENIZER)."""
  trained = tk.task_tokenizer(tasks.TaskConfig(contexts="p-seed-q-1pct", op_range=(2, 6)))
  assert tk.load_tokenizer(TOY_TOKENIZER).model_proto == trained.model_proto


def test_cli(tmp_path, capsys):
  script = runpy.run_path(str(Path(__file__).resolve().parent.parent / "tools" / "train_tokenizer.py"))
  script["main"](["--surface", "symbolic", "--contexts", "p", "--samples", "30", "--ops", "2,3", "--report-n", "5",
                  "--out", str(tmp_path / "cli")])
  out = capsys.readouterr().out
  assert "vocab size 748" in out and "| 3 |" in out
  assert isinstance(tk.load_tokenizer(tmp_path / "cli"), tk.Tokenizer)


# -- report ----------------------------------------------------------------------------------------------------


def test_tokens_per_problem_grow_with_op(toks):
  tables = []
  for surface, contexts in SURFACES.items():
    cfg = tasks.TaskConfig(surface=surface, contexts=contexts)
    means = tk.tokens_per_problem_by_op(toks[surface], cfg, REPORT_OPS, 40)
    assert all(means[a] < means[b] for a, b in zip(REPORT_OPS, REPORT_OPS[1:])), means
    tables.append(tk.token_table(toks[surface], cfg, REPORT_OPS, 40))
  print("\n\n" + "\n\n".join(tables))
