"""The house: how rissole_jax's modules may use each other, read from the code
with `ast` (nothing is imported or run, so this file takes well under a second).

1. No import cycle among the package's modules. Imports inside functions count,
   and so do the packages an import passes through: `import a.b.c` imports
   a, a.b and a.b.c; `from a.b import y` imports a, a.b and, when y is a
   submodule, a.b.y. A module always imports its own ancestor packages first
   (Python does), so passing through one of them on the way to a submodule is
   no edge: that is the trivial loop of a package __init__ that re-exports its
   children, and the only loop allowed. Importing a name that an __init__
   defines (`from pkg import NAME`, `import pkg` for pkg.NAME) is an edge like
   any other. (Stricter than ../shared/tools/house_check.py, which sees neither
   the packages an import passes through nor `importlib.import_module("...")`.)
2. Nothing outside rissole_jax/benchmarks/ imports rissole_jax.benchmarks.
3. No `_private` name (one leading underscore) of one module used by another:
   imported (`from m import _x`), reached on a module (`import m; m._x`), or
   reached on an object (`sampler._decoder`): `expr._x` in module M, with expr
   not `self`/`cls`, is an offence unless M itself defines `_x` (as
   `self._x`/`cls._x`, a class attribute or dataclass field, a method, a
   literal setattr/__slots__ name, or an absl flag it DEFINEs). Third-party private names the project must
   use are in ALLOWED below, each with why; nothing else is let through.

Every offence is reported as path:line. The `test_planted_*` tests build small
package trees in tmp_path and show that each check fails on a violation.
"""
from __future__ import annotations

import ast
import dataclasses
import textwrap
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "rissole_jax"

# Private names of other projects that rissole_jax must use: "module.attr" (a
# dotted prefix of an import or attribute chain) or "*._attr" (on any object).
ALLOWED = {
    "*._replace": "namedtuple's public API (underscored so it cannot clash with a field)",
    "*._asdict": "namedtuple's public API",
    "*._fields": "namedtuple's public API",
    "*._make": "namedtuple's public API",
}
# (None of another project's private modules or functions is used today; one
# that must be goes here as "module.attr", e.g. "jax._src", with why.)


def private(name: str) -> bool:
  return name.startswith("_") and not name.startswith("__")


@dataclasses.dataclass
class Module:
  name: str          # dotted, e.g. rissole_jax.stages.workdir (a package: its __init__)
  path: Path         # from the package's parent folder: rissole_jax/stages/workdir.py
  is_package: bool
  tree: ast.Module


@dataclasses.dataclass(frozen=True)
class Edge:
  source: str
  target: str
  where: str         # path:line of the import
  passage: bool      # imported only on the way to one of its submodules


def load(root: Path) -> tuple[dict[str, Module], set[str]]:
  """The modules under package folder `root` by dotted name, and the names of
  all its packages (namespace packages, without an __init__, included)."""
  root = Path(root)
  modules, packages = {}, set()
  for path in sorted(root.rglob("*.py")):
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    if is_package:
      parts = parts[:-1]
    name = ".".join(parts)
    rel = path.relative_to(root.parent)
    modules[name] = Module(name, rel, is_package, ast.parse(path.read_text(), str(rel)))
    packages.update(".".join(parts[:i]) for i in range(1, len(parts)))
    if is_package:
      packages.add(name)
  return modules, packages


def where(module: Module, node: ast.AST) -> str:
  return f"{module.path}:{node.lineno}"


def absolute(module: Module, node: ast.ImportFrom) -> str:
  """The module a `from X import ...` reads from, relative levels resolved."""
  if not node.level:
    return node.module or ""
  base = module.name.split(".")
  if not module.is_package:
    base = base[:-1]
  base = base[:len(base) - node.level + 1]
  return ".".join(base + ([node.module] if node.module else []))


def literal_import(node: ast.AST) -> str | None:
  """The module of `importlib.import_module("a.b")` / `__import__("a.b")`."""
  if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
      and isinstance(node.args[0].value, str):
    f = node.func
    if (isinstance(f, ast.Attribute) and f.attr == "import_module") or \
        (isinstance(f, ast.Name) and f.id in ("import_module", "__import__")):
      return node.args[0].value
  return None


def imports(module: Module, modules: dict[str, Module], packages: set[str]) -> list[Edge]:
  """Every module of the package that `module` imports, anywhere in its code."""
  known = modules.keys() | packages
  edges = []

  def chain(dotted: str, node, final_passage: bool):
    bits = dotted.split(".")
    for i in range(1, len(bits) + 1):
      target = ".".join(bits[:i])
      if target in known:
        passage = i < len(bits) or final_passage
        edges.append(Edge(module.name, target, where(module, node), passage))

  for node in ast.walk(module.tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        chain(alias.name, node, False)
    elif isinstance(node, ast.ImportFrom):
      base = absolute(module, node)
      subs = [a.name for a in node.names if f"{base}.{a.name}" in known]
      chain(base, node, final_passage=len(subs) == len(node.names))
      for s in subs:
        chain(f"{base}.{s}", node, False)
    elif literal_import(node):
      chain(literal_import(node), node, False)
  # Only code is imported (not a namespace package); a module's own ancestors
  # are imported before it, so passing through them is no edge.
  return [e for e in edges if e.target in modules and e.target != module.name
          and not (e.passage and module.name.startswith(e.target + "."))]


def import_graph(root: Path) -> tuple[dict[str, Module], dict[str, dict[str, Edge]]]:
  modules, packages = load(root)
  graph = {m: {} for m in modules}
  for m, module in modules.items():
    for e in imports(module, modules, packages):
      graph[m].setdefault(e.target, e)       # the first line that imports it
  return modules, graph


def strongly_connected(graph: dict[str, dict[str, Edge]]) -> list[list[str]]:
  """Tarjan's components with more than one module (iterative)."""
  index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
  for start in sorted(graph):
    if start in index:
      continue
    work = [(start, iter(sorted(graph[start])))]
    index[start] = low[start] = counter[0]; counter[0] += 1
    stack.append(start); on.add(start)
    while work:
      v, it = work[-1]
      w = next(it, None)
      if w is not None:
        if w not in index:
          index[w] = low[w] = counter[0]; counter[0] += 1
          stack.append(w); on.add(w)
          work.append((w, iter(sorted(graph[w]))))
        elif w in on:
          low[v] = min(low[v], index[w])
        continue
      work.pop()
      if work:
        low[work[-1][0]] = min(low[work[-1][0]], low[v])
      if low[v] == index[v]:
        comp = []
        while True:
          w = stack.pop(); on.discard(w); comp.append(w)
          if w == v:
            break
        if len(comp) > 1:
          out.append(sorted(comp))
  return sorted(out)


def shortest_cycle(graph, component: list[str]) -> list[Edge]:
  """A shortest import loop through the component's first module."""
  inside, start = set(component), component[0]
  came, frontier = {start: None}, [start]
  while frontier:
    nxt = []
    for v in frontier:
      for w in sorted(graph[v]):
        if w == start:
          path, e = [graph[v][w]], v
          while came[e] is not None:
            path.append(graph[came[e]][e]); e = came[e]
          return path[::-1]
        if w in inside and w not in came:
          came[w] = v; nxt.append(w)
    frontier = nxt
  raise AssertionError("not a cycle")


def import_cycles(root: Path) -> list[str]:
  """One message per import cycle: its modules, then each import of a loop."""
  _, graph = import_graph(root)
  out = []
  for comp in strongly_connected(graph):
    loop = shortest_cycle(graph, comp)
    lines = [f"  {e.where}: {e.source} imports {e.target}"
             + (" (passing through its __init__)" if e.passage else "") for e in loop]
    out.append(f"cycle among {', '.join(comp)}:\n" + "\n".join(lines))
  return out


def benchmark_imports(root: Path) -> list[str]:
  modules, graph = import_graph(root)
  bench = f"{Path(root).name}.benchmarks"
  mine = lambda m: m == bench or m.startswith(bench + ".")
  return sorted(f"{e.where}: {m} imports {t}" for m in modules if not mine(m)
                for t, e in graph[m].items() if mine(t))


def defined_private(tree: ast.Module) -> set[str]:
  """The private attribute names a module defines for its own objects."""
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.ClassDef):
      for item in node.body:
        if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
          names.add(item.name)
        targets = item.targets if isinstance(item, ast.Assign) else \
            [item.target] if isinstance(item, (ast.AnnAssign, ast.AugAssign)) else []
        for t in targets:
          for n in ast.walk(t):
            if isinstance(n, ast.Name):
              names.add(n.id)
            elif isinstance(n, ast.Constant) and isinstance(n.value, str):
              names.add(n.value)            # __slots__ = ("_x", ...)
        if isinstance(item, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__slots__" for t in item.targets):
          names.update(n.value for n in ast.walk(item.value)
                       if isinstance(n, ast.Constant) and isinstance(n.value, str))
    elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) \
        and isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
      names.add(node.attr)
    elif isinstance(node, ast.Call) and len(node.args) >= 2 \
        and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str) \
        and isinstance(node.args[0], ast.Name) and node.args[0].id in ("self", "cls") and (
            (isinstance(node.func, ast.Name) and node.func.id == "setattr")
            or (isinstance(node.func, ast.Attribute) and node.func.attr == "__setattr__")):
      names.add(node.args[1].value)
    elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
        and node.func.attr.startswith("DEFINE_") and node.args \
        and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
      names.add(node.args[0].value)         # its own absl flag: FLAGS._x
  return {n for n in names if private(n)}


def dotted(node: ast.AST) -> str | None:
  if isinstance(node, ast.Name):
    return node.id
  if isinstance(node, ast.Attribute):
    base = dotted(node.value)
    return base and f"{base}.{node.attr}"
  return None


def allowed(path: str) -> bool:
  """Whether a dotted use (e.g. "jax._src.xla_bridge") starts with an ALLOWED entry."""
  return any(path == a or path.startswith(a + ".") for a in ALLOWED if not a.startswith("*."))


def private_uses(root: Path) -> list[str]:
  modules, packages = load(root)
  known = modules.keys() | packages
  out = []
  for m, module in modules.items():
    own = defined_private(module.tree)
    bound = {}                               # local name -> package module it is
    for node in ast.walk(module.tree):
      if isinstance(node, ast.Import):
        for a in node.names:
          if a.asname and a.name in known:
            bound[a.asname] = a.name
          elif not a.asname and a.name.split(".")[0] in known:
            bound[a.name.split(".")[0]] = a.name.split(".")[0]
      elif isinstance(node, ast.ImportFrom):
        base = absolute(module, node)
        for a in node.names:
          if f"{base}.{a.name}" in known:
            bound[a.asname or a.name] = f"{base}.{a.name}"

    def module_of(expr) -> str | None:
      if isinstance(expr, ast.Name):
        return bound.get(expr.id)
      if isinstance(expr, ast.Attribute):
        base = module_of(expr.value)
        return f"{base}.{expr.attr}" if base and f"{base}.{expr.attr}" in known else None
      return None

    def offence(node, what):
      out.append(f"{where(module, node)}: {what}")

    for node in ast.walk(module.tree):
      if isinstance(node, ast.Import):
        for a in node.names:
          bits = a.name.split(".")
          for i, b in enumerate(bits):
            if private(b) and not allowed(".".join(bits[:i + 1])):
              offence(node, f"imports private module {a.name}")
              break
      elif isinstance(node, ast.ImportFrom):
        base = absolute(module, node)
        bits = base.split(".")
        if any(private(b) for b in bits) and not allowed(base):
          offence(node, f"imports from private module {base}")
        for a in node.names:
          if private(a.name) and not allowed(f"{base}.{a.name}"):
            offence(node, f"imports {a.name} from {base}")
      elif isinstance(node, (ast.Attribute, ast.Call)):
        if isinstance(node, ast.Attribute):
          attr, value = node.attr, node.value
        elif isinstance(node.func, ast.Name) and node.func.id in (
            "getattr", "hasattr", "setattr", "delattr") and len(node.args) >= 2 \
            and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str):
          attr, value = node.args[1].value, node.args[0]
        else:
          continue
        if not private(attr):
          continue
        owner = module_of(value)
        if owner is not None:
          if owner != m:
            offence(node, f"uses {attr} of module {owner}")
          continue
        if isinstance(value, ast.Name) and value.id in ("self", "cls"):
          continue
        if attr in own or f"*.{attr}" in ALLOWED:
          continue
        path = dotted(value)
        if path and allowed(f"{path}.{attr}"):
          continue
        offence(node, f"uses {(path or ast.unparse(value))}.{attr}, which {m} does not define")
  return sorted(set(out), key=lambda s: (s.split(":")[0], int(s.split(":")[1])))


# --- the checks on rissole_jax ---

def test_no_import_cycles():
  cycles = import_cycles(PACKAGE)
  if cycles:
    pytest.fail(f"{len(cycles)} import cycle(s):\n" + "\n".join(cycles), pytrace=False)


def test_only_benchmarks_import_benchmarks():
  found = benchmark_imports(PACKAGE)
  if found:
    pytest.fail("library modules importing rissole_jax.benchmarks:\n" + "\n".join(found),
                pytrace=False)


def test_no_private_names_across_modules():
  found = private_uses(PACKAGE)
  if found:
    pytest.fail(f"{len(found)} private name(s) used across modules:\n" + "\n".join(found),
                pytrace=False)


# --- each check fails on a planted violation ---

def plant(tmp_path: Path, files: dict[str, str]) -> Path:
  """A package tree named rissole_jax under tmp_path; returns its folder."""
  for rel, text in files.items():
    p = tmp_path / "rissole_jax" / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(textwrap.dedent(text))
  return tmp_path / "rissole_jax"


def test_planted_cycle_through_a_function_level_import(tmp_path):
  root = plant(tmp_path, {
      "__init__.py": "",
      "a.py": "from rissole_jax import b\n",
      "b.py": "import os\n\ndef f():\n  from rissole_jax.a import g\n"})
  (msg,) = import_cycles(root)
  assert "rissole_jax/a.py:1: rissole_jax.a imports rissole_jax.b" in msg
  assert "rissole_jax/b.py:4: rissole_jax.b imports rissole_jax.a" in msg
  with pytest.raises(AssertionError, match=r"b\.py:4"):
    assert not import_cycles(root), "\n".join(import_cycles(root))


def test_planted_cycle_through_a_package_init(tmp_path):
  # x reaches q.r through q/__init__, which imports x: a loop the reference
  # tool misses (it sees only the edge x -> q.r).
  root = plant(tmp_path, {
      "__init__.py": "",
      "x.py": "from rissole_jax.q.r import f\n",
      "q/__init__.py": "from rissole_jax.x import g\n",
      "q/r.py": ""})
  (msg,) = import_cycles(root)
  assert "rissole_jax.q, rissole_jax.x" in msg and "passing through its __init__" in msg
  # ... and `import a.b.c` imports a.b too.
  (root / "x.py").write_text("def f():\n  import rissole_jax.q.r\n")
  (msg,) = import_cycles(root)
  assert "rissole_jax/x.py:2" in msg


def test_a_package_reexporting_its_children_is_the_allowed_loop(tmp_path):
  root = plant(tmp_path, {
      "__init__.py": "from rissole_jax.stages import workdir\n",
      "stages/__init__.py": "from rissole_jax.stages.workdir import run\nREGISTRY = {}\n",
      "stages/workdir.py": "from rissole_jax.stages import context\nimport rissole_jax.stages.context\n",
      "stages/context.py": "from . import other\n",
      "stages/other.py": "import rissole_jax.errors\n",
      "errors.py": ""})
  assert import_cycles(root) == []
  # A child that reads a name the __init__ defines is a real loop.
  (root / "stages" / "context.py").write_text("from rissole_jax.stages import REGISTRY\n")
  (msg,) = import_cycles(root)
  assert "rissole_jax/stages/context.py:1" in msg


def test_planted_benchmark_import(tmp_path):
  root = plant(tmp_path, {
      "__init__.py": "",
      "quantize.py": "import importlib\n\ndef f():\n  from rissole_jax.benchmarks.solvers import load\n"
                     "  importlib.import_module('rissole_jax.benchmarks.deploy')\n",
      "benchmarks/__init__.py": "",
      "benchmarks/solvers.py": "from rissole_jax.benchmarks import deploy\nfrom rissole_jax import quantize\n",
      "benchmarks/deploy.py": ""})
  found = benchmark_imports(root)
  assert found == [
      "rissole_jax/quantize.py:4: rissole_jax.quantize imports rissole_jax.benchmarks",
      "rissole_jax/quantize.py:4: rissole_jax.quantize imports rissole_jax.benchmarks.solvers",
      "rissole_jax/quantize.py:5: rissole_jax.quantize imports rissole_jax.benchmarks.deploy"]


def test_planted_private_uses(tmp_path):
  root = plant(tmp_path, {
      "__init__.py": "",
      "lib.py": """\
          class Decoder:
            _cache = None
            def __init__(self):
              self._model = 1
            def _step(self):
              return self._model
          def _helper():
            pass
          """,
      "user.py": """\
          import sys
          import rissole_jax.lib
          from rissole_jax import lib as ll
          from rissole_jax.lib import _helper
          from rissole_jax.lib import Decoder

          class Sampler:
            def __init__(self, other):
              self._decoder = Decoder()
              self._x = other._x                    # fine: Sampler defines _x
              self._decoder._step()                 # offence: Decoder's
              other._asdict()                       # allowed: namedtuple
              other._replace(a=1)                   # allowed: namedtuple
              self.__dict__                         # dunder
              rissole_jax.lib._helper()             # offence: on the module
              ll._helper                            # offence: on the module
              getattr(other, "_model")              # offence: Decoder's
              sys._current_frames()                 # offence: not allowed

          def flag(flags, FLAGS):
            flags.DEFINE_string("_job", None, "internal")
            return FLAGS._job                       # fine: its own absl flag
          """})
  u = "rissole_jax/user.py"
  assert private_uses(root) == [
      f"{u}:4: imports _helper from rissole_jax.lib",
      f"{u}:11: uses self._decoder._step, which rissole_jax.user does not define",
      f"{u}:15: uses _helper of module rissole_jax.lib",
      f"{u}:16: uses _helper of module rissole_jax.lib",
      f"{u}:17: uses other._model, which rissole_jax.user does not define",
      f"{u}:18: uses sys._current_frames, which rissole_jax.user does not define"]
