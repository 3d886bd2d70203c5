"""Copies an experiment's finished runs (without checkpoints) from runs/experiments/cpu/runs into
experiments/pending/NAME, so a later session on a fresh machine can put them back instead of re-running them, and
writes the table of each run's strict pass@1 / pass@64 per evaluated op into experiments/pending/NAME/README.md (below
the line `<!-- runs -->`; the text above it is kept). Run from the repository root:

  python experiments/pending/collect.py edge_of_competence

With --unfinished it also copies the runs still in progress, with their latest checkpoint only, into
experiments/pending/NAME/unfinished/ (a session that stops mid-run commits them; the next resumes them exactly).

Every call also copies the start models' cached evaluations (runs/experiments/cpu/evals/*.json) into
experiments/pending/evals/ and, with --unfinished, the experiments' own bases (runs/experiments/cpu/base-<hash>, e.g.
context_seeding's seeded ones) with their latest checkpoint into experiments/pending/bases/.

To put the runs back on a fresh machine (at the same checkout path: a run's config hash holds its start folder's
absolute path):

  python experiments/pending/collect.py --restore

copies each kept run (and each unfinished one) into runs/experiments/cpu/runs/ (a run with report.json is skipped by
the experiment; an unfinished one resumes from its checkpoint), the evals into runs/experiments/cpu/evals/ and each
base folder into runs/experiments/cpu/; what is already there is left as it is (it may be further along)."""
import json, shutil, sys
from pathlib import Path

PENDING, WORK = Path("experiments/pending"), Path("runs/experiments/cpu")


def keep_latest_checkpoint(folder: Path) -> None:
  """Removes every numbered checkpoint step but the latest under each `checkpoints/` below `folder`."""
  for steps in folder.glob("**/checkpoints"):
    numbered = sorted((s for s in steps.iterdir() if s.name.isdigit()), key=lambda s: int(s.name))
    for old in numbered[:-1]:
      shutil.rmtree(old)


def restore() -> None:
  """Puts every kept run, evaluation and base back under runs/experiments/cpu/, leaving what is there alone."""
  experiments = [e for e in sorted(PENDING.iterdir()) if e.is_dir() and e.name not in ("bases", "evals")]
  kept = [run for e in experiments for run in [*e.iterdir(), *(e / "unfinished").glob("*")]
          if (run / "config.json").exists()]
  for src, dst in [*((run, WORK / "runs" / run.name) for run in kept),
                   *((base, WORK / base.name) for base in sorted((PENDING / "bases").glob("base-*"))),
                   *((ev, WORK / "evals" / ev.name) for ev in sorted((PENDING / "evals").glob("*.json")))]:
    if dst.exists():
      continue
    dst.parent.mkdir(parents=True, exist_ok=True)
    (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst)
    print(f"restored: {dst}")


if sys.argv[1:] == ["--restore"]:
  restore()
  sys.exit(0)
name, unfinished = sys.argv[1], "--unfinished" in sys.argv[2:]
src, dst = WORK / "runs", PENDING / name
dst.mkdir(parents=True, exist_ok=True)
if (WORK / "evals").exists():
  shutil.copytree(WORK / "evals", PENDING / "evals", dirs_exist_ok=True)
for base in sorted(WORK.glob("base-*")) if unfinished else []:
  out = PENDING / "bases" / base.name
  if out.exists():
    shutil.rmtree(out)
  shutil.copytree(base, out, ignore=shutil.ignore_patterns("tensorboard", ".jaxstages.lock"))
  keep_latest_checkpoint(out)
  print(f"base: {base.name}")
if (dst / "unfinished").exists():
  shutil.rmtree(dst / "unfinished")
rows = []
for run in sorted(src.iterdir()):
  cfg = json.loads((run / "config.json").read_text())
  if not cfg["name"].startswith(name + "-"):
    continue
  if not (run / "report.json").exists():
    if unfinished:  # every stage folder, each with its latest checkpoint step only
      out = dst / "unfinished" / run.name
      shutil.copytree(run, out, ignore=shutil.ignore_patterns("tensorboard", ".jaxstages.lock"))
      keep_latest_checkpoint(out)
      print(f"unfinished: {run.name} ({cfg['name']})")
    continue
  out = dst / run.name
  if out.exists():
    shutil.rmtree(out)
  shutil.copytree(run, out, ignore=shutil.ignore_patterns("checkpoints", "tensorboard", ".jaxstages.lock"))
  ev = json.loads((run / "report.json").read_text())["stages"][-1]["eval"]
  cells = ev if isinstance(ev, list) else ev["cells"]
  rows.append((cfg["name"].removeprefix(name + "-"), run.name, cells))
rows.sort()
ops = sorted({c["op"] for _, _, cells in rows for c in cells})  # runs may evaluate different ops (rl_efficiency)
base = json.loads(Path("experiments/results/base/results.json").read_text())
base_cells = {c["op"]: c for c in base["bases"][base["base"]]["eval"]["cells"]}
pct = lambda c: f"{100 * c['pass@1']:.1f} / {100 * c['pass@64']:.1f}"
table = ["| run (arm-seed) | folder | " + " | ".join(f"op {o}" for o in ops) + " |",
         "| --- | --- | " + " | ".join("---:" for _ in ops) + " |",
         "| base | `experiments/artifacts/base-cpu` | " + " | ".join(pct(base_cells[o]) for o in ops) + " |",
         *(f"| {arm} | `{folder}` | " + " | ".join(pct(by_op[o]) if o in by_op else "" for o in ops) + " |"
           for arm, folder, by_op in ((a, f, {c["op"]: c for c in cells}) for a, f, cells in rows))]
readme = dst / "README.md"
head = readme.read_text().split("<!-- runs -->")[0] if readme.exists() else f"# {name}: finished runs\n\n"
readme.write_text(head + "<!-- runs -->\n\nStrict pass@1 / pass@64 (%) per op; one seed per row (no intervals until "
                  "the experiment's own results).\n\n" + "\n".join(table) + "\n")
print(readme.read_text())
