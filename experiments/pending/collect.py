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

To put the runs back on a fresh machine: copy each folder (and each unfinished one) into runs/experiments/cpu/runs/
(a run with report.json is skipped by the experiment; an unfinished one resumes from its checkpoint), the evals into
runs/experiments/cpu/evals/ and each base folder into runs/experiments/cpu/ (at that path: a run's config hash holds
its start folder's absolute path)."""
import json, shutil, sys
from pathlib import Path


def keep_latest_checkpoint(folder: Path) -> None:
  """Removes every numbered checkpoint step but the latest under each `checkpoints/` below `folder`."""
  for steps in folder.glob("**/checkpoints"):
    numbered = sorted((s for s in steps.iterdir() if s.name.isdigit()), key=lambda s: int(s.name))
    for old in numbered[:-1]:
      shutil.rmtree(old)


name, unfinished = sys.argv[1], "--unfinished" in sys.argv[2:]
src, dst = Path("runs/experiments/cpu/runs"), Path("experiments/pending") / name
dst.mkdir(parents=True, exist_ok=True)
if (src.parent / "evals").exists():
  shutil.copytree(src.parent / "evals", Path("experiments/pending/evals"), dirs_exist_ok=True)
for base in sorted(src.parent.glob("base-*")) if unfinished else []:
  out = Path("experiments/pending/bases") / base.name
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
