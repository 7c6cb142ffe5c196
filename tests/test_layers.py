"""The package's import graph, read from the code: no circle, and no import that runs up
the layers (models <- sampling / sandbox / data <- prm / rl <- stages / pipeline).

Every import counts, those inside functions included: a lazy import still ties the two
modules together.
"""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "psgpo_jax"
# (importer, what it must never import), by module prefix.
NEVER = [("models", "rl"), ("models", "prm"), ("models", "sandbox"), ("models", "sampling"),
         ("models", "pipeline"), ("models", "stages"), ("sandbox", "models"), ("sandbox", "rl"),
         ("sandbox", "prm"), ("sandbox", "sampling"), ("sandbox", "pipeline"),
         ("data", "rl"), ("data", "prm"), ("data", "pipeline"), ("data", "stages"),
         ("prm", "rl"), ("prm", "pipeline"), ("prm", "stages"),
         ("rl", "pipeline"), ("rl", "stages"), ("sampling", "rl"), ("sampling", "prm")]


def _modules():
  """{dotted module name: path} of every module of the package."""
  out = {}
  for dirpath, _, files in os.walk(os.path.join(ROOT, PACKAGE)):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(dirpath, name)
        dotted = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
        out[dotted[:-len(".__init__")] if dotted.endswith(".__init__") else dotted] = path
  return out


def import_graph():
  """{module: set of package modules it imports}; importing a package's own face
  (`from psgpo_jax.models import X` in psgpo_jax.models.heads) is not an edge."""
  modules = _modules()

  def resolve(name):
    while name and name not in modules:
      name = name.rpartition(".")[0]
    return name or None

  edges = {m: set() for m in modules}
  for module, path in modules.items():
    is_package = path.endswith("__init__.py")
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          parts = module.split(".") if is_package else module.split(".")[:-1]
          parts = parts[:len(parts) - (node.level - 1)]
          base = ".".join(parts + ([base] if base else []))
        targets = [base] + [f"{base}.{a.name}" for a in node.names]
      else:
        continue
      for target in map(resolve, targets):
        if target and target != module and not module.startswith(target + "."):
          edges[module].add(target)
  return edges


def circles(edges):
  """Strongly connected sets of two or more modules (Tarjan), each sorted."""
  index, low, stack, on_stack, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in edges[v]:
      if w not in index:
        visit(w)
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
      if len(component) > 1:
        out.append(sorted(component))

  for v in edges:
    if v not in index:
      visit(v)
  return out


def _under(module, prefix):
  name = f"{PACKAGE}.{prefix}"
  return module == name or module.startswith(name + ".")


@pytest.fixture(scope="module")
def graph():
  return import_graph()


def test_the_graph_is_read_from_every_module(graph):
  assert len(graph) > 60
  assert "psgpo_jax.rl.learn" in graph["psgpo_jax.rl.trainer"]
  assert "psgpo_jax.sandbox" in graph["psgpo_jax.rl.trainer"]       # a package's face


def test_circles_are_found():
  assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
  assert circles({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_another_that_imports_it_back(graph):
  assert circles(graph) == []


def test_no_import_runs_up_the_layers(graph):
  upward = sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets
                  for low, high in NEVER if _under(a, low) and _under(b, high))
  assert not upward, upward
