"""Imports go downward only: configs/, data/ and model/ at the bottom, train/ above them, eval/ and
benchmarks/ on top. Static (every import statement, those inside functions too); no jax."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS = ('configs', 'data', 'model', 'train', 'eval', 'benchmarks')
# Layer -> the layers it may not import. Among the bottom three anything goes (configs.schema
# builds on model.config); eval/ and benchmarks/ may import everything below them.
FORBIDDEN = {
  'configs': {'train', 'eval', 'benchmarks'},
  'data': {'train', 'eval', 'benchmarks'},
  'model': {'train', 'eval', 'benchmarks'},
  'train': {'eval', 'benchmarks'},
}


def imported_modules(tree: ast.AST, package: str) -> list[tuple[int, str]]:
  """(line, absolute module name) of every import in `tree`, a module of `package`: `import`,
  `from M import x` (as `M.x`; relative ones resolved) and `importlib.import_module('...')` /
  `__import__('...')` with a literal name, at any depth."""
  out = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out += [(node.lineno, alias.name) for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      parts = package.split('.')
      base = parts[: len(parts) - node.level + 1] if node.level else []
      module = base + ([node.module] if node.module else [])
      out += [(node.lineno, '.'.join(module + [alias.name])) for alias in node.names]
    elif (
      isinstance(node, ast.Call)
      and node.args
      and isinstance(node.args[0], ast.Constant)
      and isinstance(node.args[0].value, str)
      and (
        (isinstance(node.func, ast.Attribute) and node.func.attr == 'import_module')
        or (isinstance(node.func, ast.Name) and node.func.id == '__import__')
      )
    ):
      out.append((node.lineno, node.args[0].value))
  return sorted(out)


def violations_in(source: str, path: str) -> list[str]:
  """`path:line imports X (layer A may not import layer B)` for each upward import in `source`,
  the text of the file `path` (relative to the repository root)."""
  parts = path.replace(os.sep, '/').split('/')
  layer, package = parts[0], '.'.join(parts[:-1])
  out = []
  for line, name in imported_modules(ast.parse(source, path), package):
    target = name.split('.')[0]
    if target in FORBIDDEN.get(layer, ()):
      out.append(f'{path}:{line} imports {name} (layer {layer} may not import layer {target})')
  return out


def _python_files() -> list[str]:
  out = []
  for layer in LAYERS:
    for directory, _, files in os.walk(os.path.join(ROOT, layer)):
      out += [os.path.relpath(os.path.join(directory, f), ROOT) for f in files if f.endswith('.py')]
  return sorted(out)


def test_imports_go_downward_only():
  files = _python_files()
  assert {f.split(os.sep)[0] for f in files} == set(LAYERS)
  found = []
  for path in files:
    with open(os.path.join(ROOT, path), encoding='utf-8') as f:
      found += violations_in(f.read(), path)
  assert not found, 'upward imports:\n' + '\n'.join(found)


def test_the_check_sees_nested_relative_and_dynamic_imports():
  source = (
    'import os\n'
    'from model import axes\n'
    'def f():\n'
    '  from eval import evaluate\n'
    '  import benchmarks.common\n'
    'class C:\n'
    '  def g(self):\n'
    '    importlib.import_module("eval.sample")\n'
    'from .. import eval as e\n'
    'from . import step\n'
  )
  assert violations_in(source, os.path.join('train', 'x.py')) == [
    'train/x.py:4 imports eval.evaluate (layer train may not import layer eval)',
    'train/x.py:5 imports benchmarks.common (layer train may not import layer benchmarks)',
    'train/x.py:8 imports eval.sample (layer train may not import layer eval)',
    'train/x.py:9 imports eval (layer train may not import layer eval)',  # `from .. import eval`
  ]
  assert violations_in('from train.step import make_step_fns\n', 'model/x.py') == [
    'model/x.py:1 imports train.step.make_step_fns (layer model may not import layer train)'
  ]
  assert violations_in('from model import axes\nfrom train import step\n', 'eval/x.py') == []
