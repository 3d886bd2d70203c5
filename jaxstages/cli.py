"""`jaxstages` command line.

  jaxstages smoke                                  the model's end-to-end smoke run (CPU-sized)
  jaxstages train --config C --workdir D [--config.KEY=VALUE ...]   train one stage (resumable)
  jaxstages plan --config C                        parameters, FLOPs and compiled memory of a stage (any kind) or of
                                                   each stage of a pipeline
  jaxstages run --config P [--workdir D]           a pipeline of stages and its report card (resumable)
  jaxstages eval RUN_DIR --ops 1,2,3 --n 8 --k 1,8   pass@k / maj@k by op and context
  jaxstages sample --checkpoint RUN_DIR             look at samples
  jaxstages data show --config C --n 5             decoded examples of a data pipeline, loss mask visible
  jaxstages convert import HF_DIR OUT_DIR          HF safetensors checkpoint -> jaxstages params folder
  jaxstages convert export PARAMS_DIR HF_DIR       jaxstages params folder -> HF safetensors checkpoint
  jaxstages data show --config configs/data.py:sft-symbolic [--n 5] [--tokenizer DIR]   decoded examples of a pipeline
"""

from __future__ import annotations

import argparse
import json
import sys

import jax

from jaxstages import smoke
from jaxstages.checkpoint import BrokenCheckpointError, CheckpointMismatchError
from jaxstages.config import ConfigError, apply_overrides, load_config
from jaxstages.data import pipeline, tasks, tokenizer
from jaxstages.data.pipeline import data_config
from jaxstages.evaluation import EvalConfig, evaluate_run, markdown_table, prompt_for
from jaxstages.metrics import quiet_libraries
from jaxstages.model import hf, io
from jaxstages.model.io import load_stage
from jaxstages.rewards import verify
from jaxstages.runfolder import RunFolderError
from jaxstages.sampling import SamplingConfig, sample, stop_ids
from jaxstages.schedule import load_pipeline, plan_pipeline, report_markdown, run_pipeline
from jaxstages.sharding import initialize_distributed
from jaxstages.train import PREEMPTED_EXIT_CODE, NonFiniteError, Preempted, plan_stage, run_stage


def _convert(args: argparse.Namespace) -> None:
  initialize_distributed()
  if args.direction == "import":
    overrides = {"param_dtype": args.param_dtype} if args.param_dtype else {}
    model = hf.import_hf(args.src, **overrides)
    io.save_params(model, args.dst)
  else:
    model = io.load_params(args.src)
    hf.export_hf(model, args.dst, dtype=args.dtype)
  print(f"wrote {args.dst}")


def _smoke(args: argparse.Namespace) -> None:
  smoke.main(steps=args.steps, out_dir=args.out)


def _data(args: argparse.Namespace) -> None:
  cfg = pipeline.data_config(args.config)
  if args.tokenizer:
    tok = tokenizer.load_tokenizer(args.tokenizer)
  else:  # a small task tokenizer is seconds to train and matches the config's surface
    tok = tokenizer.task_tokenizer(cfg.task, n_samples=args.tokenizer_samples)
  ansi = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
  sources = ", ".join(f"{s.name} ({s.format}, contexts {s.task.contexts!r}, weight {w:.3g} at step 0)"
                      for s, w in zip(cfg.source_configs, cfg.mixture.weights_at(cfg.step_offset)))
  print(f"{args.config}: kind {cfg.kind}, batch {cfg.batch_size}, seq_len {cfg.seq_len}, vocab {tok.vocab_size}"
        + (f"; sources: {sources}" if cfg.kind != "eval" else f"; eval grid {len(pipeline.eval_cells(cfg))} cells"))
  print("tokens outside the loss are " + ("dimmed" if ansi else "in [[...]]") + "\n")
  print(pipeline.show(cfg, tok, n=args.n, ansi=ansi))


def _stage_config(args: argparse.Namespace):
  return apply_overrides(load_config(args.config), args.overrides)


def _say(text: str) -> None:
  """Prints on process 0 only: every process of a multi-host run computes the same result."""
  if jax.process_index() == 0:
    print(text)


def _train(args: argparse.Namespace) -> None:
  _say(json.dumps(run_stage(_stage_config(args), args.workdir), indent=2))


def _run(args: argparse.Namespace) -> None:
  config = load_pipeline(args.config, args.overrides)
  report = run_pipeline(config, args.workdir or f"runs/{config.get('name', 'pipeline')}", force=args.force)
  _say(report_markdown(report))
  _say(f"written to {report['run_dir']}/report.json and report.md")


def _plan(args: argparse.Namespace) -> None:
  config = load_config(args.config)
  if "stages" in config:  # a pipeline: each stage as the run would configure it
    config = apply_overrides(config, args.overrides)
    plans = plan_pipeline(config, f"runs/{config.get('name', 'pipeline')}")
  else:
    plans = [plan_stage(apply_overrides(config, args.overrides))]
  for plan in plans:
    _print_plan(plan)


def _print_plan(plan: dict) -> None:
  mib = lambda b: f"{b / 2**20:,.1f} MiB"
  mem = plan["memory_per_device_bytes"]
  print(f"stage {plan['stage']} ({plan['kind']}) on mesh {plan['mesh']}")
  print(f"  parameters        {plan['params']:,}")
  print(f"  tokens per step   {plan['tokens_per_step']:,}  x {plan['steps']:,} steps")
  print(f"  FLOPs per step    {plan['flops_per_step']:.3e} (model), {plan['xla_flops_per_step_per_device']:.3e} "
        "(XLA, per device)")
  print(f"  total FLOPs       {plan['flops_per_step'] * plan['steps']:.3e}")
  print(f"  memory per device arguments {mib(mem['argument'])}, outputs {mib(mem['output'])} "
        f"(aliased {mib(mem['alias'])}), temporaries {mib(mem['temp'])}; peak ~{mib(mem['peak_estimate'])}")
  if "logprobs_memory_per_device_bytes" in plan:  # RL: the update above, the rollout's log-prob pass apart
    lp = plan["logprobs_memory_per_device_bytes"]
    print(f"  log-prob pass     arguments {mib(lp['argument'])}, outputs {mib(lp['output'])}, temporaries "
          f"{mib(lp['temp'])}; peak ~{mib(lp['peak_estimate'])}")
    print(f"  float32 [.., vocab] buffers: update {', '.join(plan['update_vocab_buffers']) or 'none'}; log-prob "
          f"pass {', '.join(plan['logprobs_vocab_buffers']) or 'none'}")
  print(f"  compiled in       {plan['compile_s']:.1f} s")
  for note in (plan["memory_note"], plan["flops_note"]):
    if note:
      print(f"  note: {note}")


def _ints(text: str) -> tuple[int, ...]:
  return tuple(int(x) for x in text.split(",") if x)


def _eval(args: argparse.Namespace) -> None:
  cfg = EvalConfig(ops=_ints(args.ops), contexts=tuple(args.contexts.split(",")) if args.contexts else None,
                   problems=args.problems, n=args.n, ks=_ints(args.k) if args.k else (1,),
                   temperature=args.temperature if args.temperature is not None else (0.0 if args.n == 1 else 1.0),
                   top_p=args.top_p, prompt=args.prompt,
                   think={"on": True, "off": False, "none": None}[args.think], think_budget=args.think_budget,
                   seed=args.seed)
  result = evaluate_run(args.run, cfg, step=args.step, out_dir=args.out)
  how = "as asked" if args.prompt else "the model's stage kind's (--prompt to change)"
  _say(f"{result['config']['prompt']} prompts, {how}\n" + markdown_table(result))
  _say(f"written to {args.out or args.run.rstrip('/') + '/eval'}/eval.json and eval.md")


def _sample(args: argparse.Namespace) -> None:
  model, tokenizer, config = load_stage(args.checkpoint, args.step)
  chat = args.chat if args.chat is not None else prompt_for(config) == "chat"
  if args.prompt is None:  # an eval-split problem of the run's task world
    if config is None:
      raise ConfigError(f"{args.checkpoint} records no training config, so no task world to draw a problem from: "
                        "give --prompt")
    task_cfg = data_config(config["data"]).task
    problem = tasks.eval_set(task_cfg, op=args.op, context=args.context or task_cfg.mixture[0].context, n=1,
                             seed=args.seed)[0]
    text = problem.text() + "\n"
    print(f"problem (op {problem.op}, gold answer {problem.answer}):\n{text}")
  else:
    problem, text = None, args.prompt.replace("\\n", "\n")
  if chat:
    ids = tokenizer.encode_chat([{"role": "user", "content": text.rstrip()}], add_generation_prompt=True)[0]
  else:
    ids = tokenizer.encode(text)
  stops = stop_ids(tokenizer)
  cfg = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                       top_k=args.top_k, n=args.n, stop_tokens=stops)
  out = sample(model, [ids], cfg, seed=args.seed)
  for j, toks in enumerate(out.completions()):
    completion = tokenizer.decode([t for t in toks if t not in stops])
    lp = float(out.logprobs[j].sum())
    line = f"--- sample {j} ({len(toks)} tokens, log-prob {lp:.2f})"
    if problem is not None:
      v = verify(problem, completion)
      line += f", answer {v.answer}, strict {'correct' if v.strict_correct else 'wrong'}"
    print(line + " ---\n" + completion)


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="jaxstages", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)

  p = sub.add_parser("smoke", help="train the toy model briefly, check cached decoding and HF round trip")
  p.add_argument("--steps", type=int, default=150)
  p.add_argument("--out", default="runs/smoke")
  p.set_defaults(func=_smoke)

  p = sub.add_parser("convert", help="convert between HF safetensors checkpoints and jaxstages params")
  p.add_argument("direction", choices=["import", "export"])
  p.add_argument("src")
  p.add_argument("dst")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                 help="export: dtype of the written tensors")
  p.add_argument("--param-dtype", default=None, choices=["float32", "bfloat16"],
                 help="import: dtype to store the parameters in (default: float32)")
  p.set_defaults(func=_convert)

  p = sub.add_parser("data", help="inspect data pipelines")
  p.add_argument("action", choices=["show"])
  p.add_argument("--config", required=True, help="a data config, e.g. configs/data.py:sft-symbolic")
  p.add_argument("--n", type=int, default=5, help="examples (rows) to print")
  p.add_argument("--tokenizer", default=None, help="tokenizer folder; default: train a task tokenizer on the fly")
  p.add_argument("--tokenizer-samples", type=int, default=300, help="problems to train the on-the-fly tokenizer on")
  p.add_argument("--color", default="auto", choices=["auto", "always", "never"],
                 help="dim the tokens outside the loss with ANSI codes (else mark them [[...]])")
  p.set_defaults(func=_data)

  for name, func, text in (("train", _train, "train one stage (resumes when its workdir has checkpoints)"),
                           ("plan", _plan, "size a stage without training: params, FLOPs, compiled memory"),
                           ("run", _run, "run a pipeline of stages and write its report card (resumes)")):
    p = sub.add_parser(name, help=text, description=text + ". Override any config key with --config.KEY=VALUE.")
    p.add_argument("--config", required=True, help="e.g. configs/train.py:pretrain-toy or "
                   "configs/pipelines/quickstart.py")
    if name == "train":
      p.add_argument("--workdir", required=True, help="the stage's folder: checkpoints, metrics, tokenizer")
    if name == "run":
      p.add_argument("--workdir", default=None, help="the run's folder (default runs/NAME)")
      p.add_argument("--force", action="store_true", help="re-run a stage whose config changed since it ran (and "
                     "the stages after it; their old folders move to RUN/replaced/) instead of refusing")
    p.set_defaults(func=func)

  p = sub.add_parser("eval", help="pass@k, maj@k and lengths by op and context of a trained stage")
  p.add_argument("run", help="a model folder: a stage's workdir, a params folder (experiments/artifacts/NAME)")
  p.add_argument("--ops", default="1,2,3,4,5,6")
  p.add_argument("--contexts", default=None, help="comma-separated; default: the contexts of the run's task mixture")
  p.add_argument("--problems", type=int, default=64, help="eval-split problems per (op, context) cell")
  p.add_argument("--n", type=int, default=1, help="samples per problem")
  p.add_argument("--k", default=None, help="pass@k for these k (comma-separated, each <= n); default 1")
  p.add_argument("--temperature", type=float, default=None, help="default: 0 (greedy) for n=1, else 1")
  p.add_argument("--top-p", type=float, default=1.0)
  p.add_argument("--prompt", default=None, choices=["document", "chat"],
                 help="document: problem text + newline (pre-trained bases); chat: the user turn (SFT/RL models); "
                 "default: the one the model's own stage kind calls for")
  p.add_argument("--think", default="none", choices=["on", "off", "none"], help="chat prompts: /think, /no_think")
  p.add_argument("--think-budget", type=int, default=None,
                 help="close the think block after this many thinking tokens, so the answer follows")
  p.add_argument("--step", type=int, default=None, help="checkpoint step; default: the latest")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=None, help="folder for eval.json / eval.md; default RUN/eval")
  p.set_defaults(func=_eval)

  p = sub.add_parser("sample", help="print samples of a trained stage for a prompt (or an eval problem)")
  p.add_argument("--checkpoint", required=True, help="a model folder: a stage's workdir, a params folder, hf:FOLDER")
  p.add_argument("--step", type=int, default=None)
  p.add_argument("--prompt", default=None, help="text (\\n for newlines); default: an eval problem at --op")
  p.add_argument("--op", type=int, default=2)
  p.add_argument("--context", default=None)
  p.add_argument("--chat", action="store_true", default=None,
                 help="wrap the prompt as a user turn of the chat template (default for SFT and later stages)")
  p.add_argument("--document", dest="chat", action="store_false",
                 help="the prompt as a plain document (default for pretrain / midtrain models)")
  p.add_argument("--n", type=int, default=1)
  p.add_argument("--temperature", type=float, default=0.0)
  p.add_argument("--top-p", type=float, default=1.0)
  p.add_argument("--top-k", type=int, default=0)
  p.add_argument("--max-new-tokens", type=int, default=128)
  p.add_argument("--seed", type=int, default=0)
  p.set_defaults(func=_sample)
  for p in sub.choices.values():
    p.add_argument("--verbose", action="store_true", help="full tracebacks, and the libraries' info logs")
  return parser


def _join_spaced(args: list[str]) -> list[str]:
  """absl's space-separated form `--config.KEY VALUE` as `--config.KEY=VALUE`."""
  out, i = [], 0
  while i < len(args):
    a = args[i]
    if a.startswith("--config.") and "=" not in a and i + 1 < len(args) and not args[i + 1].startswith("--"):
      out.append(f"{a}={args[i + 1]}")
      i += 2
    else:
      out.append(a)
      i += 1
  return out


# errors a user can act on (a config, a folder, a checkpoint, a lock): one line on the command line, the traceback
# behind --verbose
USER_ERRORS = (ConfigError, FileNotFoundError, BrokenCheckpointError, CheckpointMismatchError, NonFiniteError,
               RunFolderError)


def main(argv: list[str] | None = None) -> None:
  """The command line. Run as the `jaxstages` script (no `argv`), an error a user can act on (`USER_ERRORS`) prints
  as one line and exits 1 (`--verbose`: with its traceback); called with `argv` (tests, scripts), it raises."""
  parser = build_parser()
  args, rest = parser.parse_known_args(argv)
  rest = _join_spaced(rest)
  overrides = [a.removeprefix("--config.") for a in rest if a.startswith("--config.")]
  unknown = [a for a in rest if not a.startswith("--config.")]
  if unknown or (overrides and args.command not in ("train", "plan", "run")):
    parser.error(f"unrecognized arguments: {' '.join(unknown or rest)}")
  args.overrides = overrides
  quiet_libraries(args.verbose)
  try:
    args.func(args)
  except Preempted as e:  # a checkpoint is saved: the same command resumes
    print(e, file=sys.stderr)
    sys.exit(PREEMPTED_EXIT_CODE)
  except USER_ERRORS as e:
    if argv is not None or args.verbose:
      raise
    print(f"jaxstages {args.command}: error: {e}".replace("\n", " "), file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  main()
