"""The package's import layout, read from the source with `ast` (nothing is imported).

- The modules' imports form no cycle, counting those inside functions (as scans.py <-> dicom.py once did): each
  module can be read, and imported, after its dependencies.
- No module imports another module's private name (`from x import _y`, `x._y`).
- An import inside a function (or under `if __name__ == "__main__":`) says why on its line or just above.
"""

from __future__ import annotations

import ast
import dataclasses
import io
import pathlib
import re
import tokenize

PACKAGE = "resdense_jax"
ROOT = pathlib.Path(__file__).resolve().parents[1] / PACKAGE

# Imports left out of the cycle check, as (importing module, imported module); each must still exist. A lazy
# import that breaks a cycle on purpose would go here; none does.
ALLOWED_CYCLE_EDGES: set[tuple[str, str]] = set()


@dataclasses.dataclass(frozen=True)
class Import:
  module: str  # the importing module
  line: int
  end_line: int
  target: str  # the module imported (a resdense_jax module, or the third-party / stdlib module named)
  names: tuple[str, ...]  # for `from x import a, b`: ("a", "b"); for `import x`: ()
  local: bool  # inside a function or the __main__ guard: runs when called, not on import
  typing_only: bool  # under `if TYPE_CHECKING:`
  first_of_group: int  # first line of the run of consecutive import statements this one belongs to


def module_files() -> dict[str, pathlib.Path]:
  files = {}
  for path in sorted(ROOT.rglob("*.py")):
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    if parts[-1] == "__init__":
      parts = parts[:-1]
    files[".".join(parts)] = path
  return files


MODULES = module_files()


def _is_package(name: str) -> bool:
  return MODULES[name].name == "__init__.py"


def _absolute(module: str, node: ast.ImportFrom) -> str:
  if not node.level:
    return node.module or ""
  base = module.split(".")
  base = base if _is_package(module) else base[:-1]
  base = base[:len(base) - (node.level - 1)]
  return ".".join(base + ([node.module] if node.module else []))


def _is_type_checking(test: ast.expr) -> bool:
  return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
      isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _is_main_guard(test: ast.expr) -> bool:
  return (isinstance(test, ast.Compare) and isinstance(test.left, ast.Name) and test.left.id == "__name__"
          and any(isinstance(c, ast.Constant) and c.value == "__main__" for c in test.comparators))


def _statements(body, *, local: bool, typing_only: bool):
  """(statement, local, typing_only, previous statement in the same block) for every statement, recursively."""
  previous = None
  for node in body:
    yield node, local, typing_only, previous
    previous = node
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      yield from _statements(node.body, local=True, typing_only=typing_only)
    elif isinstance(node, ast.If):
      yield from _statements(node.body, local=local or _is_main_guard(node.test),
                             typing_only=typing_only or _is_type_checking(node.test))
      yield from _statements(node.orelse, local=local, typing_only=typing_only)
    else:
      for field in ("body", "orelse", "finalbody", "handlers"):
        block = getattr(node, field, None)
        if isinstance(block, list) and block and isinstance(block[0], ast.AST):
          yield from _statements(block, local=local, typing_only=typing_only)


def _tree(module: str) -> ast.Module:
  return ast.parse(MODULES[module].read_text(), str(MODULES[module]))


def imports_of(module: str) -> list[Import]:
  found = []
  group_start = {}
  for node, local, typing_only, previous in _statements(_tree(module).body, local=False, typing_only=False):
    if not isinstance(node, (ast.Import, ast.ImportFrom)):
      continue
    adjacent = (isinstance(previous, (ast.Import, ast.ImportFrom)) and previous.end_lineno == node.lineno - 1)
    first = group_start.get(previous.lineno, previous.lineno) if adjacent else node.lineno
    group_start[node.lineno] = first
    common = dict(module=module, line=node.lineno, end_line=node.end_lineno, local=local, typing_only=typing_only,
                  first_of_group=first)
    if isinstance(node, ast.Import):
      found.extend(Import(target=alias.name, names=(), **common) for alias in node.names)
      continue
    source = _absolute(module, node)
    submodules = [a.name for a in node.names if f"{source}.{a.name}" in MODULES]
    names = tuple(a.name for a in node.names if f"{source}.{a.name}" not in MODULES)
    found.extend(Import(target=f"{source}.{name}", names=(), **common) for name in submodules)
    if names or not submodules:
      found.append(Import(target=source, names=names, **common))
  return found


ALL_IMPORTS = [imp for module in MODULES for imp in imports_of(module)]


def _private(name: str) -> bool:
  return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One cycle of `graph` as [a, b, ..., a], or None."""
  state: dict[str, int] = {}  # 1: on the current path, 2: done
  path: list[str] = []

  def visit(node):
    state[node] = 1
    path.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == 1:
        return path[path.index(nxt):] + [nxt]
      if nxt not in state:
        cycle = visit(nxt)
        if cycle:
          return cycle
    path.pop()
    state[node] = 2
    return None

  for node in sorted(graph):
    if node not in state:
      cycle = visit(node)
      if cycle:
        return cycle
  return None


def module_graph(*, allowed=frozenset()) -> dict[str, set[str]]:
  """module -> the package's modules it imports, at its top or in its functions, less the `allowed` edges."""
  graph = {module: set() for module in MODULES}
  for imp in ALL_IMPORTS:
    if not imp.typing_only and imp.target in MODULES and imp.target != imp.module:
      graph[imp.module].add(imp.target)
  for module, target in allowed:
    graph.get(module, set()).discard(target)
  return graph


def test_the_scan_finds_the_package():
  assert {"resdense_jax.data.scans", "resdense_jax.data.dicom", "resdense_jax.predict"} <= set(MODULES)
  graph = module_graph()
  assert {"resdense_jax.data.dicom", "resdense_jax.data.nifti"} <= graph["resdense_jax.data.scans"]
  assert "resdense_jax.data.common" in graph["resdense_jax.data.dicom"]


def test_find_cycle_names_the_cycle():
  assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
  assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_imports_have_no_cycle():
  cycle = _find_cycle(module_graph(allowed=ALLOWED_CYCLE_EDGES))
  assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_allowed_cycle_edges_still_exist():
  graph = module_graph()
  stale = sorted((m, t) for m, t in ALLOWED_CYCLE_EDGES if t not in graph.get(m, ()))
  assert not stale, f"remove from ALLOWED_CYCLE_EDGES in {__file__} (gone): {stale}"


def test_no_private_names_across_modules():
  offences = []
  for imp in ALL_IMPORTS:
    if imp.target.startswith(PACKAGE):
      if any(_private(part) for part in imp.target.split(".")):
        offences.append(f"{imp.module}:{imp.line} imports the private module {imp.target}")
      offences += [f"{imp.module}:{imp.line} imports {imp.target}.{name}" for name in imp.names if _private(name)]
  for module in MODULES:
    offences += _private_attributes(module)
  assert not offences, "private names used across modules:\n" + "\n".join(offences)


def _private_attributes(module: str) -> list[str]:
  """`alias._name` where `alias` is another resdense_jax module this module imported."""
  tree = _tree(module)
  aliases = {}
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for a in node.names:
        aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
    elif isinstance(node, ast.ImportFrom):
      source = _absolute(module, node)
      for a in node.names:
        if f"{source}.{a.name}" in MODULES:
          aliases[a.asname or a.name] = f"{source}.{a.name}"
  offences = []
  for node in ast.walk(tree):
    if not isinstance(node, ast.Attribute):
      continue
    parts, value = [node.attr], node.value
    while isinstance(value, ast.Attribute):
      parts.insert(0, value.attr)
      value = value.value
    if not isinstance(value, ast.Name) or value.id not in aliases:
      continue
    dotted = aliases[value.id]
    for part in parts:
      if dotted in MODULES and dotted != module and _private(part):
        offences.append(f"{module}:{node.lineno} uses {dotted}.{part}")
        break
      dotted = f"{dotted}.{part}"
  return offences


def _comments(module: str) -> dict[int, str]:
  """line -> comment text, with pylint and noqa directives removed (they say what, not why)."""
  comments = {}
  source = MODULES[module].read_text()
  for token in tokenize.generate_tokens(io.StringIO(source).readline):
    if token.type == tokenize.COMMENT:
      text = re.sub(r"pylint:\s*disable=[\w,-]+|noqa(:\s*[\w,]+)?", "", token.string.lstrip("#"))
      comments[token.start[0]] = text.strip(" ()")
  return comments


def _has_reason(imp: Import, comments: dict[int, str]) -> bool:
  if any(comments.get(line) for line in range(imp.first_of_group, imp.end_line + 1)):
    return True
  line = imp.first_of_group - 1  # the comment block just above the group of imports
  while line in comments:
    if comments[line]:
      return True
    line -= 1
  return False


def test_local_imports_say_why():
  comments = {module: _comments(module) for module in MODULES}
  offences = [f"{MODULES[imp.module]}:{imp.line}: `import {imp.target}` inside a function, with no comment saying "
              "why (move it to the top, or say what importing it late saves or which cycle it breaks)"
              for imp in ALL_IMPORTS if imp.local and not _has_reason(imp, comments[imp.module])]
  assert not offences, "\n".join(offences)
