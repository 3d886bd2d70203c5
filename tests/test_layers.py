"""The package's layers (the table in `jaxstages/__init__.py`'s docstring), checked by parsing every module's imports
with `ast`: every module is in the table once, imports only from its own layer or below, the imports form no cycle,
and no import sits inside a function or class except of the optional heavy dependencies. The checker is also run on
a small made-up package with one of each mistake, so a passing check is not a blind one."""

import ast
import re
from pathlib import Path

import jaxstages

PACKAGE = Path(jaxstages.__file__).resolve().parent
ROW = re.compile(r"^\s+(\d+)\s+(\w+)\s+(\S.*)$")  # "  3      model       model, model.config, ..."
CONTINUATION = re.compile(r"^\s{8,}([a-z_.]+(,\s*[a-z_.]+)*,?)\s*$")


def layer_table(docstring: str) -> dict[str, int]:
  """module (relative to the package, `model.io`) -> layer number, from the docstring's table."""
  lines = docstring.splitlines()
  start = next(i for i, line in enumerate(lines) if line.split() == ["layer", "name", "modules"])
  table, layer = {}, None
  for line in lines[start + 1:]:
    if not line.strip():
      break
    row, more = ROW.match(line), CONTINUATION.match(line)
    if row:
      layer, names = int(row.group(1)), row.group(3)
    elif more and layer is not None:
      names = more.group(1)
    else:
      raise AssertionError(f"a line of the layer table that is neither a row nor its continuation: {line!r}")
    for name in filter(None, (n.strip() for n in names.split(","))):
      assert name not in table, f"{name} is in the layer table twice"
      table[name] = layer
  return table


def modules_of(package_dir: Path) -> dict[str, Path]:
  """module name relative to the package (the package itself: "") -> its file."""
  out = {}
  for path in sorted(package_dir.rglob("*.py")):
    parts = list(path.relative_to(package_dir).with_suffix("").parts)
    if parts[-1] == "__init__":
      parts = parts[:-1]
    out[".".join(parts)] = path
  return out


def imports_of(path: Path, module: str, package: str, modules: set[str]) -> tuple[list, list]:
  """(edges, nested): the package modules `module` imports, as (target, line), and every import inside a function or
  class body, as (imported top-level name, line)."""
  edges, nested = [], []
  is_package = path.name == "__init__.py"

  def resolve(dotted: str) -> str | None:
    """A dotted import path -> the package module it loads (the longest prefix that is one), or None if outside."""
    if dotted != package and not dotted.startswith(package + "."):
      return None
    rel = dotted[len(package) + 1:]
    while rel not in modules:
      rel = rel.rpartition(".")[0]
    return rel

  def targets(node) -> list[str]:
    """The dotted names an import statement loads: `from a import b` loads `a.b` where that is a module, else `a`."""
    if isinstance(node, ast.Import):
      return [a.name for a in node.names]
    base = node.module or ""
    if node.level:  # relative: from the module's own package, `level - 1` packages up
      here = [package, *module.split(".")] if module else [package]
      here = here if is_package else here[:-1]
      base = ".".join(here[:len(here) - node.level + 1] + ([base] if base else []))
    is_module = lambda dotted: dotted.startswith(package + ".") and dotted[len(package) + 1:] in modules
    return [f"{base}.{a.name}" if is_module(f"{base}.{a.name}") else base for a in node.names]

  def visit(node, inside: bool):
    for child in ast.iter_child_nodes(node):
      if isinstance(child, (ast.Import, ast.ImportFrom)):
        for target in targets(child):
          if inside:
            nested.append((target.split(".")[0], child.lineno))
          if (resolved := resolve(target)) is not None:  # nested ones too: a cycle is one wherever it hides
            edges.append((resolved, child.lineno))
      else:
        visit(child, inside or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)))

  visit(ast.parse(path.read_text()), False)
  return list(dict.fromkeys(edges)), nested


def _path_around(graph: dict[str, set[str]], component: set[str]) -> list[str]:
  """A shortest import path from the component's first module back to itself, within the component."""
  start = min(component)
  paths, seen = [[start]], set()
  while paths:
    path = paths.pop(0)
    for w in sorted(graph.get(path[-1], ())):
      if w == start:
        return path + [start]
      if w in component and w not in seen:
        seen.add(w)
        paths.append(path + [w])
  raise AssertionError("a strongly connected component without a cycle")


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The import cycles of `graph` (module -> modules it imports): a path around each strongly connected
  component."""
  index, low, stack, on_stack, found = {}, {}, [], set(), []

  def connect(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph.get(v, ())):
      if w not in index:
        connect(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1 or v in graph.get(v, ()):
        found.append(_path_around(graph, set(component)))

  for v in sorted(graph):
    if v not in index:
      connect(v)
  return found


def problems(package_dir: Path, package: str, optional: tuple[str, ...]) -> list[str]:
  """Everything wrong with the package's layering, as messages (empty: none)."""
  files = modules_of(package_dir)
  root_doc = ast.get_docstring(ast.parse(files[""].read_text()), clean=False) or ""
  table = layer_table(root_doc)
  out = [f"{package}.{m}: not in the layer table of {package}/__init__.py" for m in files if m and m not in table]
  out += [f"{m}: in the layer table but no such module" for m in table if m not in files]
  graph = {}
  for module, path in files.items():
    edges, nested = imports_of(path, module, package, set(files))
    graph[module] = {target for target, _ in edges if target != module}
    name = lambda m: f"{package}.{m}" if m else package
    for top, line in nested:
      if top not in optional:
        out.append(f"{name(module)}:{line}: imports {top} inside a function or class (only {', '.join(optional)} "
                   "may wait until used)")
    for target, line in edges:
      if module and target and table.get(target, 0) > table.get(module, 99):
        out.append(f"{name(module)}:{line}: imports {name(target)} (layer {table[target]}) from layer "
                   f"{table[module]}")
      if module and not target:  # the root package re-exports the model: its own layer is its imports' highest
        top = max((table.get(t, 0) for t in graph.get("", ())), default=0)
        if top > table.get(module, 99):
          out.append(f"{name(module)}:{line}: imports {package} (which imports layer {top}) from layer "
                     f"{table[module]}")
  for cycle in cycles(graph):
    out.append("import cycle: " + " -> ".join(f"{package}.{m}" if m else package for m in cycle))
  return out


def test_jaxstages_imports_only_point_down_without_cycles_or_imports_in_functions():
  assert problems(PACKAGE, "jaxstages", jaxstages.OPTIONAL_IMPORTS) == []


def test_the_check_finds_a_cycle_an_upward_import_and_an_import_in_a_function(tmp_path):
  """A made-up package: `low` imports `high` (upward, and a cycle with `high`, which imports `low`), `mid` imports
  `json` inside a function and matplotlib inside another (allowed), `extra` is not in the table; relative imports
  and a table row continued on the next line are read too."""
  pkg = tmp_path / "toypkg"
  (pkg / "sub").mkdir(parents=True)
  (pkg / "__init__.py").write_text('"""Layers.\n\n  layer  name   modules\n  1      low    low\n'
                                   '  2      mid    mid, sub,\n                sub.leaf\n  3      high   high\n"""\n')
  (pkg / "low.py").write_text("from toypkg import high\n")
  (pkg / "mid.py").write_text("import toypkg.low\n\n\ndef f():\n  import json\n\n\ndef g():\n"
                              "  import matplotlib\n")
  (pkg / "high.py").write_text("from toypkg.sub.leaf import x\nfrom toypkg import low\n")
  (pkg / "sub" / "__init__.py").write_text("")
  (pkg / "sub" / "leaf.py").write_text("from . import __name__ as x\nfrom .. import low\n")
  (pkg / "extra.py").write_text("")
  found = problems(pkg, "toypkg", ("matplotlib",))
  assert found == ["toypkg.extra: not in the layer table of toypkg/__init__.py",
                   "toypkg.low:1: imports toypkg.high (layer 3) from layer 1",
                   "toypkg.mid:5: imports json inside a function or class (only matplotlib may wait until used)",
                   "import cycle: toypkg.high -> toypkg.low -> toypkg.high"], found


def test_experiments_import_at_the_top():
  """The experiment scripts sit above the package: they import jaxstages and each other at the top of the file, only
  matplotlib (for a plot) waits until used."""
  folder = PACKAGE.parent / "experiments"
  modules = modules_of(folder)
  found = []
  for module, path in modules.items():
    _, nested = imports_of(path, module, "experiments", set(modules))
    found += [f"experiments.{module}:{line}: imports {top} inside a function" for top, line in nested
              if top != "matplotlib"]
  assert found == []
