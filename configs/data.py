"""Named data pipelines. `get_config("sft-symbolic")` etc.; `jaxstages.data.pipeline.data_config(name)` loads them.

Every key is a field of `jaxstages.data.pipeline.DataConfig` (unknown keys are rejected); `task` holds keys of
`jaxstages.data.tasks.TaskConfig`. Batch sizes are global (all processes together). Lengths are in tokens of the task
tokenizer (`jaxstages.data.tokenizer.task_tokenizer`), which writes a symbolic problem in roughly one token per name,
number and operator.
"""

import ml_collections

# toy-scale symbolic world: one phrasing per statement, at most one distractor, pre-training at ops 1-4 (the toy
# model learns these in minutes on a CPU; docs/learnability.md); stages that need harder problems set op_range
SYMBOLIC = dict(surface="symbolic", contexts="p-seed-q-1pct", op_range=(1, 4), distractors=(0, 1), phrasings=1)
STORY = dict(surface="story", contexts="zoo-seed-school-1pct", op_range=(2, 6))

CONFIGS = {
    # pre-training: context p at ops 1-4, the new context q seeded at 1% (op 2 only), as in the interplay study
    "pretrain-symbolic": dict(kind="pretrain", task=SYMBOLIC, seq_len=512, batch_size=32, seed=0),
    "pretrain-story": dict(kind="pretrain", task=STORY, seq_len=1024, batch_size=16, seed=0),
    # mid-training: instruction-style q documents ramped in over 200 batches, with replay of the pre-training data
    # (same seed as pre-training: the replayed problems are the ones pre-training began with)
    "midtrain-symbolic": dict(
        kind="midtrain", task=SYMBOLIC, seq_len=512, batch_size=32, seed=1,
        sources=[dict(name="midtrain", format="instruction", task=dict(contexts="q")),
                 dict(name="replay", format="pretrain", seed=0)],
        schedule=((0, dict(midtrain=0.2, replay=0.8)), (200, dict(midtrain=0.8, replay=0.2))),
        schedule_interp="linear"),
    # SFT: chats in all three contexts; 40% think, 20% no-think, 40% plain; loss on the assistant turns only
    "sft-symbolic": dict(kind="sft", task=dict(SYMBOLIC, contexts="pqr-uniform"), seq_len=512, batch_size=16,
                         seed=2, think_mix=(0.4, 0.2, 0.4), loss_on="assistant", overflow="drop"),
    # DPO pairs: the gold solution vs. one perturbed step (ops 1-4 chats fit in 160 tokens, prompts in 96)
    "preference-symbolic": dict(kind="preference", task=dict(SYMBOLIC, contexts="pqr-uniform"), seq_len=160,
                                prompt_len=96, batch_size=16, seed=3),
    # RL: a fixed set of prompts revisited every epoch (reshuffled), harder than pre-training
    "rl-symbolic": dict(kind="rl", task=dict(SYMBOLIC, contexts="q", op_range=(3, 8)), num_examples=4096,
                        prompt_len=160, batch_size=64, seed=4),
    # RL at toy scale: context p at op 1, where the toy SFT model is right about a third of the time (greedy, strict);
    # an endless prompt stream (set num_examples / epochs for a finite set revisited over epochs)
    "rl-toy": dict(kind="rl", task=dict(SYMBOLIC, contexts="p", op_range=(1, 1)), prompt_len=48, batch_size=16,
                   seed=4),
    # the interplay study's RL sets on the story surface: op 11-14 is its "edge of competence" range (op 7-10
    # in-distribution, 17-20 too hard); 1024 prompts per step (shared REFERENCES)
    "rl-interplay": dict(kind="rl", task=dict(STORY, op_range=(11, 14)), prompt_len=1024, batch_size=1024, seed=4),
    # the interplay study's pre-training and mid-training (CPT) streams on the story surface: op 2-10, and 80% op
    # 11-14 with 20% replay of the pre-training stream; 2048-token rows, 512k tokens a step
    "pretrain-interplay": dict(kind="pretrain", task=dict(STORY, contexts="story-uniform", op_range=(2, 10)),
                               seq_len=2048, batch_size=256, seed=0),
    "midtrain-interplay": dict(
        kind="midtrain", task=dict(STORY, contexts="story-uniform", op_range=(2, 10)), seq_len=2048,
        batch_size=256, seed=1,
        sources=[dict(name="midtrain", format="pretrain", task=dict(op_range=(11, 14))),
                 dict(name="replay", format="pretrain", seed=0)],
        schedule=((0, dict(midtrain=0.8, replay=0.2)),)),
    # evaluation grid: 64 eval-split problems per (op, context) cell, one pass, padded with valid=0
    "eval-symbolic": dict(kind="eval", task=dict(SYMBOLIC, contexts="pqr-uniform"), eval_ops=(2, 3, 4, 5, 6, 8, 10),
                          eval_per_cell=64, prompt_len=192, batch_size=64, seed=0),
}


def get_config(name: str = "pretrain-symbolic") -> ml_collections.ConfigDict:
  if name not in CONFIGS:
    import difflib
    close = difflib.get_close_matches(name, CONFIGS, n=3, cutoff=0.3)
    raise KeyError(f"unknown data config {name!r}; did you mean {close}? Known: {sorted(CONFIGS)}")
  return ml_collections.ConfigDict(CONFIGS[name])
