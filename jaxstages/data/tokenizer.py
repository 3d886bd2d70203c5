"""Tokenizers: a sentencepiece model trained on the task world, or an imported model's own tokenizer.

`Tokenizer` wraps a sentencepiece model (ours from `train_tokenizer`/`task_tokenizer`, or any existing `.model`
file); `HFTokenizer` wraps a Hugging Face `tokenizer.json` (Qwen, Llama, ...) through the `tokenizers` library.
Both have the same public methods, so the data pipeline does not care which one it holds; `load_tokenizer(path)`
picks the class from what is on disk.

**Exact round trip.** Our sentencepiece settings make `decode(encode(t)) == t` for every text (newlines, runs of
spaces, leading spaces, unicode operators like `⊕`): identity normalisation, no whitespace clean-up, no dummy
prefix, byte fallback for characters never seen in training, and `"\\n"` as a user-defined symbol (sentencepiece
would otherwise treat it as whitespace). The one text that cannot round-trip is one holding the literal character
`▁` (U+2581), which sentencepiece uses for the space: it decodes as a space.

**Special tokens** are single ids: `<pad>` (0, padding; never produced by `encode`), `<unk>` (1), then the
user-defined symbols `<|endoftext|>` (end of document, `eos_id`), `<|im_start|>`, `<|im_end|>` (chat turns),
`<think>`, `</think>`. They are user-defined symbols, not control symbols, so a text holding them (a rendered chat)
encodes them to their one id and `decode` writes them back; the flip side is that a user text containing the literal
string `<|im_end|>` is read as the special token (no escaping, as in ChatML tokenizers).

**Chat template** (Qwen / ChatML): `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message; a generation prompt
appends `<|im_start|>assistant\\n`. No default system message is added. `encode_chat` encodes each segment on its
own and concatenates, so its `assistant_mask` is exact; for our sentencepiece models this gives the same ids as
encoding the rendered string, because every segment boundary is a user-defined symbol (`<|im_start|>`, `\\n`,
`<|im_end|>`) and no piece can span one. For an HF tokenizer the two can differ where its pre-tokenizer would join
the header's `\\n` with the start of the content (e.g. content that itself starts with a newline).

**Task tokenizers.** `task_tokenizer` trains on the task corpus of one surface (every context of it, whatever the
config's mixture, so every mixture of a surface shares one vocabulary and a context seeded at 0% still has its
tokens). On the symbolic surface every name (`p0..p63`, `q0..q63`, `r0..r63`), operator word, template keyword and
digit is a user-defined symbol, both bare (`p44`, at the start of a line) and with the space merged in front
(`▁p44`), so each symbol of `p44 = p11 * p13 = 6 * 1 = 6` is exactly one token (11 tokens) and the model never sees a
separate space token there. Numbers are one token per digit (`12` -> `▁1`, `2`) on both surfaces.
"""

from __future__ import annotations

import collections
import io
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import sentencepiece as spm

from jaxstages.config import ConfigError
from jaxstages.data import tasks

PAD, UNK = "<pad>", "<unk>"
EOS, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
THINK_OPEN, THINK_CLOSE = tasks.THINK_OPEN, tasks.THINK_CLOSE
# role -> token text; the order is the id order of a trained tokenizer (after <pad> = 0 and <unk> = 1)
SPECIAL_TOKENS = {"eos": EOS, "im_start": IM_START, "im_end": IM_END, "think_open": THINK_OPEN,
                  "think_close": THINK_CLOSE}
SPACE = "\u2581"  # sentencepiece's escaped space
# one token each in every trained tokenizer: the newline (which sentencepiece would otherwise drop as whitespace)
# and the thinking-mode flags of the task world's prompts (which follow the problem after a space)
CHAT_SYMBOLS = ("\n", tasks.THINK_FLAG, tasks.NO_THINK_FLAG, SPACE + tasks.THINK_FLAG, SPACE + tasks.NO_THINK_FLAG)
DIGITS = tuple("0123456789")
# words of the symbolic templates besides names and operators (also taken from the templates by `symbolic_symbols`)
SYMBOLIC_KEYWORDS = ("let", "set", "put", ":=", "=", ";", "?", "find", "answer:", "solve", "step", "by", ":")
MODEL_FILE, HF_FILE, SPECIALS_FILE = "tokenizer.model", "tokenizer.json", "special_tokens.json"
MODEL_TYPES = ("bpe", "unigram")
# Upper bounds: sentencepiece stops when no merge is left, well before both. Symbolic: 716 fixed pieces (<pad>,
# <unk>, 10 special/chat symbols, 448 symbolic symbols, 256 bytes) + 32 characters and merges (chat roles) = 748.
# Story (BPE): ~1160, where every word of the three contexts is one piece (the story world has only ~230 distinct
# words, so the usual 2k-4k cannot be filled); unigram keeps only the pieces it uses, ~450.
DEFAULT_VOCAB_SIZES = {"symbolic": 1024, "story": 2048}

# -- chat template --------------------------------------------------------------------------------------------------


def _check_messages(messages: Sequence[Mapping[str, Any]]) -> Sequence[Mapping[str, Any]]:
  for i, m in enumerate(messages):
    if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
      raise ValueError(f"chat message {i} must be a dict with string 'role' and 'content', got {m!r}")
  return messages


def render_chat(messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False) -> str:
  """The ChatML text of `messages` (`[{"role", "content"}, ...]`): what `encode_chat` encodes."""
  text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in _check_messages(messages))
  return text + (f"{IM_START}assistant\n" if add_generation_prompt else "")


class _ChatMixin:
  """The chat template on top of `encode` and the special-token ids (shared by both tokenizer classes)."""

  im_start_id: int | None
  im_end_id: int | None

  def encode(self, text: str) -> list[int]:
    raise NotImplementedError

  def render_chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False) -> str:
    return render_chat(messages, add_generation_prompt)

  def encode_chat(self, messages: Sequence[Mapping[str, Any]],
                  add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
    """Token ids of the rendered chat and an `assistant_mask` of the same length: 1 on the tokens of every assistant
    message's content and on its closing `<|im_end|>` (the model must learn to stop), 0 on role headers, other
    turns, the newlines between turns and the generation prompt."""
    if self.im_start_id is None or self.im_end_id is None:
      raise ValueError(f"this tokenizer has no {IM_START} / {IM_END} tokens, so it cannot encode ChatML chats")
    ids: list[int] = []
    mask: list[int] = []

    def add(tokens: list[int], m: int) -> None:
      ids.extend(tokens)
      mask.extend([m] * len(tokens))

    newline = self.encode("\n")
    for msg in _check_messages(messages):
      train = int(msg["role"] == "assistant")
      add([self.im_start_id] + self.encode(f"{msg['role']}\n"), 0)
      add(self.encode(msg["content"]) + [self.im_end_id], train)
      add(newline, 0)
    if add_generation_prompt:
      add([self.im_start_id] + self.encode("assistant\n"), 0)
    return ids, mask


def _write_folder(folder: str | os.PathLike, model_file: str, model_bytes: bytes, kind: str,
                  special_tokens: Mapping[str, str]) -> Path:
  """Writes a tokenizer folder: the model file and `special_tokens.json` (which class reads it back, and its
  special tokens). A new folder is written aside and renamed into place, so a run killed meanwhile never leaves
  half a tokenizer where a resume would find it."""
  folder = Path(folder)
  target = folder
  if not folder.exists():
    folder = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(folder, ignore_errors=True)
  folder.mkdir(parents=True, exist_ok=True)
  (folder / model_file).write_bytes(model_bytes)
  (folder / SPECIALS_FILE).write_text(json.dumps({"kind": kind, "special_tokens": special_tokens}, indent=2) + "\n")
  if folder != target:
    os.replace(folder, target)
  return target


def _read_specials(folder: Path) -> dict:
  path = folder / SPECIALS_FILE
  return json.loads(path.read_text()) if path.exists() else {}


# -- sentencepiece --------------------------------------------------------------------------------------------------


class Tokenizer(_ChatMixin):
  """A sentencepiece model with the special-token ids as attributes (`None` where the model lacks the token).

  `pad_id` is 0 in our models; for an existing model without `<pad>` it falls back to the model's own pad id, then
  `eos_id`, then 0 (padding is masked out, so any valid id serves).
  """

  def __init__(self, model_proto: bytes, special_tokens: Mapping[str, str] | None = None):
    self.model_proto = bytes(model_proto)
    self.sp = spm.SentencePieceProcessor(model_proto=self.model_proto)
    self.special_tokens = {**SPECIAL_TOKENS, "pad": PAD, **(special_tokens or {})}
    get = lambda role: self._maybe_id(self.special_tokens[role])  # noqa: E731
    self.eos_id = get("eos")
    if self.eos_id is None and self.sp.eos_id() >= 0:  # e.g. Llama's `</s>`
      self.eos_id = self.sp.eos_id()
    self.im_start_id, self.im_end_id = get("im_start"), get("im_end")
    self.think_open_id, self.think_close_id = get("think_open"), get("think_close")
    pad = get("pad")
    self.pad_id = next(i for i in (pad, self.sp.pad_id(), self.eos_id, 0) if i is not None and i >= 0)

  # pickled as the model bytes (data-loader worker processes receive the tokenizer this way)
  def __getstate__(self) -> dict:
    return {"model_proto": self.model_proto, "special_tokens": self.special_tokens}

  def __setstate__(self, state: dict) -> None:
    self.__init__(state["model_proto"], state["special_tokens"])

  def __repr__(self) -> str:
    return f"Tokenizer(vocab_size={self.vocab_size}, pad_id={self.pad_id}, eos_id={self.eos_id})"

  def _maybe_id(self, piece: str) -> int | None:
    i = self.sp.piece_to_id(piece)
    # piece_to_id answers unk for an unknown piece
    return i if self.sp.id_to_piece(i) == piece else None

  @property
  def vocab_size(self) -> int:
    """Number of ids; the model's embedding needs at least this many rows (it may pad to a round number)."""
    return self.sp.get_piece_size()

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, no BOS/EOS added."""
    return self.sp.encode(text, out_type=int)

  def encode_batch(self, texts: Sequence[str], num_threads: int = -1) -> list[list[int]]:
    """`encode` of every text, on `num_threads` threads (-1: all cores)."""
    return self.sp.encode(list(texts), out_type=int, num_threads=num_threads)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """The text of `ids` (a 1-D sequence); `<pad>` decodes to nothing, and so do ids beyond the vocabulary (the
    model's embedding is rounded up, and a sampled completion may pick one of those untrained rows)."""
    n = self.vocab_size
    return self.sp.decode([int(i) for i in ids if 0 <= int(i) < n])

  def token_to_id(self, piece: str) -> int:
    i = self._maybe_id(piece)
    if i is None:
      raise KeyError(f"{piece!r} is not a piece of this tokenizer")
    return i

  def id_to_token(self, i: int) -> str:
    if not 0 <= int(i) < self.vocab_size:
      raise KeyError(f"id {i} is outside the vocabulary [0, {self.vocab_size})")
    return self.sp.id_to_piece(int(i))

  def save(self, folder: str | os.PathLike) -> Path:
    """Writes `tokenizer.model` and `special_tokens.json` into `folder` (created); returns the folder."""
    return _write_folder(folder, MODEL_FILE, self.model_proto, "sentencepiece", self.special_tokens)

  @classmethod
  def load(cls, path: str | os.PathLike) -> "Tokenizer":
    """From a folder written by `save` or holding a `tokenizer.model`, or from any sentencepiece `.model` file."""
    path = Path(path)
    model = path / MODEL_FILE if path.is_dir() else path
    if not model.exists():
      raise FileNotFoundError(f"no sentencepiece model at {model}")
    return cls(model.read_bytes(), _read_specials(model.parent).get("special_tokens"))


def _one_piece_symbols(symbols: Iterable[str]) -> list[str]:
  """Each symbol bare and with the space merged in front, so it is one token at a line start and after a space."""
  out = []
  for s in symbols:
    out += [s, SPACE + s]
  return out


def symbolic_symbols() -> list[str]:
  """The words of the symbolic surface that must be one token each: every context's names and operator words, the
  template keywords (the fixed list plus every word of the templates, so a new template word is picked up) and the
  digits; bare and space-prefixed."""
  words: list[str] = []
  for ctx in tasks.SYMBOLIC_CONTEXTS.values():
    words += list(ctx.names) + list(ctx.op_words.values())
    templates = (*ctx.constant_templates, *(t for ts in ctx.op_templates.values() for t in ts),
                 *ctx.question_templates)
    words += [w for t in templates for w in t.split() if "{" not in w]
  words += list(SYMBOLIC_KEYWORDS) + list(DIGITS)
  return _one_piece_symbols(dict.fromkeys(words))


def train_tokenizer(texts: Iterable[str], vocab_size: int, model_type: str = "bpe",
                    user_symbols: Sequence[str] = (), num_threads: int | None = None) -> Tokenizer:
  """Trains a sentencepiece model in memory on `texts` (each a whole document; newlines inside are kept).

  Ids: `<pad>` 0, `<unk>` 1, then `SPECIAL_TOKENS`, `CHAT_SYMBOLS`, `user_symbols` in order (each one piece, matched
  before anything else; longest match wins, so `p11` is never `p1` + `1`), then the byte pieces and learnt pieces.
  `vocab_size` is an upper bound: sentencepiece stops when no merge is left, and raises (as `ConfigError`) when
  the required pieces alone do not fit.
  """
  if model_type not in MODEL_TYPES:
    raise ConfigError(f"tokenizer model_type {model_type!r} is not one of {list(MODEL_TYPES)}")
  symbols = list(dict.fromkeys([*SPECIAL_TOKENS.values(), *CHAT_SYMBOLS, *user_symbols]))
  if any(not s or s in (PAD, UNK) for s in symbols):
    raise ConfigError(f"user symbols must be non-empty and not {PAD} / {UNK}")
  # a lone space: without it `▁` would be a piece only where training texts have one before a non-symbol, and a
  # space anywhere else would fall back to the bytes of `▁` and decode as that character, not as a space
  texts = [*texts, " "] if model_type == "unigram" else (t for it in (texts, [" "]) for t in it)
  options = dict(
      model_type=model_type, vocab_size=vocab_size, normalization_rule_name="identity",
      remove_extra_whitespaces=False, add_dummy_prefix=False, split_digits=True, byte_fallback=True,
      allow_whitespace_only_pieces=True, character_coverage=1.0, hard_vocab_limit=False,
      user_defined_symbols=symbols, pad_id=0, pad_piece=PAD, unk_id=1, unk_piece=UNK, bos_id=-1, eos_id=-1,
      max_sentence_length=1 << 20, num_threads=num_threads or min(os.cpu_count() or 1, 16), minloglevel=2)
  writer = io.BytesIO()
  with tempfile.TemporaryDirectory() as tmp:
    if model_type == "unigram":
      options["seed_sentencepieces_file"] = _write_unigram_seeds(texts, symbols, Path(tmp) / "seeds.tsv")
    try:
      spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=writer, **options)
    except RuntimeError as e:
      raise ConfigError(f"sentencepiece training failed (vocab_size={vocab_size}, model_type={model_type}): "
                        f"{e}") from e
  return Tokenizer(writer.getvalue())


def _write_unigram_seeds(texts: Sequence[str], symbols: Sequence[str], path: Path, max_len: int = 16) -> str:
  """Seed pieces for unigram training, written as `piece<TAB>score` to `path`: every substring (2..`max_len`
  characters, a space only at its start) of every word between user symbols, scored count x length.

  Why: sentencepiece seeds unigram with the *maximal repeats* of the corpus, and in templated text a word never is
  one (`▁number` always sits inside `The▁number▁of`, which is dropped for crossing a space), so it is left with
  ~200 short pieces and tokenizes words letter by letter. Explicit seeds give it the words back.
  """
  split_symbols = re.compile("|".join(re.escape(s) for s in sorted(symbols, key=len, reverse=True)))
  words = collections.Counter(w.replace(" ", SPACE) for t in texts for chunk in split_symbols.split(t)
                              for w in re.split(r"(?= )", chunk) if w)
  seeds: collections.Counter = collections.Counter()
  for w, count in words.items():
    for i in range(len(w)):
      for j in range(i + 2, min(len(w), i + max_len) + 1):
        if SPACE not in w[i + 1:j] and not {"\t", "\n", "\r"} & set(w[i:j]):  # tabs/newlines break the TSV
          seeds[w[i:j]] += count * (j - i)
  path.write_text("".join(f"{s}\t{c}\n" for s, c in seeds.most_common()), encoding="utf-8")
  return str(path)


def corpus_config(surface: str) -> tasks.TaskConfig:
  """The task config `task_tokenizer` samples its corpus from: default dials, every context of `surface` at equal
  weight. Only the surface of a stage's config matters, so pre-training (`p-seed-q-1pct`, ops 2-6) and SFT
  (`pqr-uniform`, other ops) get the same tokenizer: ids must not change between stages. Numbers need no coverage
  (digits are user symbols), and a context at 0% of a mixture still gets its tokens."""
  contexts = list(tasks.SURFACES[surface])
  return tasks.TaskConfig(surface=surface, contexts=tuple((c, 1 / len(contexts)) for c in contexts))


def task_texts(task_cfg: tasks.TaskConfig, n_samples: int, seed: int = 0) -> list[str]:
  """The training corpus of `task_tokenizer`: `n_samples` train-split problems of `corpus_config(task_cfg.surface)`,
  round robin over the contexts, each in every format (pre-training, instruction, SFT chats with think None / True /
  False)."""
  cfg = corpus_config(task_cfg.surface)
  contexts = list(tasks.SURFACES[cfg.surface])
  texts = []
  for i in range(n_samples):
    p = tasks.generate(cfg, seed, "train", i, context=contexts[i % len(contexts)])
    texts += [tasks.pretrain_document(p), tasks.instruction_document(p)]
    texts += [render_chat(tasks.sft_messages(p, think)) for think in (None, True, False)]
  return texts


def task_tokenizer(task_cfg: tasks.TaskConfig, vocab_size: int | None = None, n_samples: int = 2000, seed: int = 0,
                   model_type: str = "bpe") -> Tokenizer:
  """A tokenizer for the task world of `task_cfg.surface` (`DEFAULT_VOCAB_SIZES` when `vocab_size` is None).

  A pure function of (surface, vocab_size, n_samples, seed, model_type); the rest of `task_cfg` is ignored (see
  `corpus_config`). Save it next to the checkpoints rather than retrain it in another environment: a different
  sentencepiece version may order merges differently.
  """
  symbols = symbolic_symbols() if task_cfg.surface == "symbolic" else _one_piece_symbols(DIGITS)
  return train_tokenizer(task_texts(task_cfg, n_samples, seed), vocab_size or DEFAULT_VOCAB_SIZES[task_cfg.surface],
                         model_type, symbols)


# -- reports --------------------------------------------------------------------------------------------------------


def token_stats(tokenizer, task_cfg: tasks.TaskConfig, ops: Sequence[int], n: int,
                seed: int = 0) -> dict[int, dict[str, float]]:
  """Per op, over `n` train problems of `task_cfg` at that op: mean tokens of the `pretrain_document` (problem,
  solution, answer) as `"problem"`, and of one solution line (`p44 = p11 * p13 = 6 * 1 = 6`, no newline) as
  `"step"`."""
  stats = {}
  for op in ops:
    problems = [tasks.generate(task_cfg, seed, "train", i, op=op) for i in range(n)]
    steps = [len(tokenizer.encode(p.format_step(s))) for p in problems for s in p.gold_steps()]
    stats[op] = {"problem": float(np.mean([len(tokenizer.encode(tasks.pretrain_document(p))) for p in problems])),
                 "step": float(np.mean(steps))}
  return stats


def tokens_per_problem_by_op(tokenizer, task_cfg: tasks.TaskConfig, ops: Sequence[int], n: int,
                             seed: int = 0) -> dict[int, float]:
  """Mean tokens of `pretrain_document` (problem, solution, answer) over `n` train problems at each op."""
  return {op: s["problem"] for op, s in token_stats(tokenizer, task_cfg, ops, n, seed).items()}


def token_table(tokenizer, task_cfg: tasks.TaskConfig, ops: Sequence[int], n: int, seed: int = 0) -> str:
  """A Markdown table of `token_stats`: op -> mean tokens per problem and per solution step."""
  stats = token_stats(tokenizer, task_cfg, ops, n, seed)
  rows = [f"| {op} | {s['problem']:.1f} | {s['step']:.2f} |" for op, s in stats.items()]
  contexts = "+".join(dict.fromkeys(e.context for e in task_cfg.mixture))
  return "\n".join([f"{task_cfg.surface} surface, contexts {contexts}, vocab {tokenizer.vocab_size}:", "",
                    "| op | tokens per problem | tokens per solution step |", "|---:|---:|---:|", *rows])


# -- Hugging Face tokenizer.json ------------------------------------------------------------------------------------

# names an imported tokenizer may use for padding, tried in order before falling back to `eos_id`
_HF_PAD_NAMES = ("<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>")


class HFTokenizer(_ChatMixin):
  """An HF `tokenizer.json` (via the `tokenizers` library, imported here so it stays an optional dependency) with
  the same methods as `Tokenizer`. `encode` adds no BOS/EOS.

  Each special id is that of the name in `special_tokens` (default `SPECIAL_TOKENS`: `<|endoftext|>`,
  `<|im_start|>`, ...) if the vocab has it, else of the name in `fallbacks` (from the checkpoint's
  `tokenizer_config.json`: its `eos_token`, e.g. Llama 3's `<|end_of_text|>`, and `pad_token`), else `None`. `pad_id`
  is a pad token if there is one, else `eos_id`, else 0 (as Qwen pads with `<|endoftext|>`).
  """

  def __init__(self, tokenizer_json: str, special_tokens: Mapping[str, str] | None = None,
               fallbacks: Mapping[str, str] | None = None):
    from tokenizers import Tokenizer as _HFTok  # optional dependency: only needed for imported models

    self.tokenizer_json = tokenizer_json
    self.tok = _HFTok.from_str(tokenizer_json)
    names = {**SPECIAL_TOKENS, **(special_tokens or {})}
    self.special_tokens: dict[str, str] = {}  # the names found, so `save` + `load` resolve the same ids
    ids: dict[str, int | None] = {}
    for role in (*SPECIAL_TOKENS, "pad"):
      candidates = [names[role]] if role in names else list(_HF_PAD_NAMES)
      candidates += [fallbacks[role]] if fallbacks and fallbacks.get(role) else []
      found = [(name, i) for name in candidates if (i := self.tok.token_to_id(name)) is not None]
      if found:
        self.special_tokens[role], ids[role] = found[0]
    self.eos_id = ids.get("eos")
    self.im_start_id, self.im_end_id = ids.get("im_start"), ids.get("im_end")
    self.think_open_id, self.think_close_id = ids.get("think_open"), ids.get("think_close")
    self.pad_id = next(i for i in (ids.get("pad"), self.eos_id, 0) if i is not None)

  def __getstate__(self) -> dict:
    return {"tokenizer_json": self.tokenizer_json, "special_tokens": self.special_tokens}

  def __setstate__(self, state: dict) -> None:
    self.__init__(state["tokenizer_json"], state["special_tokens"])

  def __repr__(self) -> str:
    return f"HFTokenizer(vocab_size={self.vocab_size}, pad_id={self.pad_id}, eos_id={self.eos_id})"

  @property
  def vocab_size(self) -> int:
    """Number of ids with the added tokens (an HF model's embedding is often larger, padded)."""
    return self.tok.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str) -> list[int]:
    return self.tok.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str], num_threads: int = -1) -> list[list[int]]:
    del num_threads  # the tokenizers library parallelises on its own
    return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """The text of `ids`; ids beyond the vocabulary (rounded-up embedding rows) decode to nothing."""
    n = self.vocab_size
    return self.tok.decode([int(i) for i in ids if 0 <= int(i) < n], skip_special_tokens=False)

  def token_to_id(self, piece: str) -> int:
    i = self.tok.token_to_id(piece)
    if i is None:
      raise KeyError(f"{piece!r} is not a token of this tokenizer")
    return i

  def id_to_token(self, i: int) -> str:
    piece = self.tok.id_to_token(int(i))
    if piece is None:
      raise KeyError(f"id {i} is outside the vocabulary")
    return piece

  def save(self, folder: str | os.PathLike) -> Path:
    """Writes `tokenizer.json` and `special_tokens.json` into `folder` (created); returns the folder."""
    return _write_folder(folder, HF_FILE, self.tokenizer_json.encode("utf-8"), "hf", self.special_tokens)

  @classmethod
  def load(cls, path: str | os.PathLike) -> "HFTokenizer":
    """From a folder holding `tokenizer.json` (an HF checkpoint folder, or one written by `save`) or the file."""
    path = Path(path)
    file = path / HF_FILE if path.is_dir() else path
    if not file.exists():
      raise FileNotFoundError(f"no tokenizer.json at {file}")
    specials = _read_specials(file.parent).get("special_tokens")
    return cls(file.read_text(encoding="utf-8"), specials, None if specials else _hf_config_specials(file.parent))


def _hf_config_specials(folder: Path) -> dict[str, str]:
  """`eos_token` / `pad_token` of an HF checkpoint's `tokenizer_config.json` (a string or an AddedToken dict)."""
  path = folder / "tokenizer_config.json"
  config = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
  out = {}
  for role in ("eos", "pad"):
    token = config.get(f"{role}_token")
    token = token.get("content") if isinstance(token, dict) else token
    if isinstance(token, str):
      out[role] = token
  return out


def load_tokenizer(path: str | os.PathLike) -> Tokenizer | HFTokenizer:
  """The tokenizer at `path`: a `.json` file or a folder with `tokenizer.json` -> `HFTokenizer`; a sentencepiece
  file or a folder with `tokenizer.model` -> `Tokenizer`. A folder with both (HF Llama checkpoints ship both) is
  read as HF, whose `tokenizer.json` carries the added chat tokens, unless `special_tokens.json` says otherwise."""
  path = Path(path)
  if not path.exists():
    raise FileNotFoundError(f"no tokenizer at {path}")
  if not path.is_dir():
    return HFTokenizer.load(path) if path.suffix == ".json" else Tokenizer.load(path)
  kind = _read_specials(path).get("kind")
  has_model, has_json = (path / MODEL_FILE).exists(), (path / HF_FILE).exists()
  if has_model and (kind == "sentencepiece" or not has_json):
    return Tokenizer.load(path)
  if has_json:
    return HFTokenizer.load(path)
  raise FileNotFoundError(f"{path} holds neither {MODEL_FILE} nor {HF_FILE}")
