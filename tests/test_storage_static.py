"""No module but the storage layer (data/storage.py, data/gcs.py) touches the file system directly: every user path (workdir, data
dir, sweep root, eval output, export folder) goes through the storage layer, so it works on gs://.
A line that touches a path that can only be local (the interpreter's own files, a temporary
directory, a process-local cache) says so with a `# local: why` comment."""

import pathlib
import re

_ROOT = pathlib.Path(__file__).resolve().parent.parent
_PACKAGES = ('train', 'data', 'eval', 'configs')
_EXEMPT = {'data/storage.py', 'data/gcs.py'}  # the storage layer and its Cloud Storage client
_DIRECT = re.compile(
  r'(?<![\w.])(?<!def )open\(|\bos\.(path|makedirs|replace|rename|remove|unlink|listdir|walk|stat|scandir|'
  r'mkdir|rmdir)\b|\bshutil\.|\bnp\.(load|save|savez\w*|memmap)\(|\bglob\.glob\(|\bpathlib\b|'
  r'\bepath\b|\.savefig\('
)


def _direct_uses() -> list[str]:
  found = []
  for package in _PACKAGES:
    for file in sorted((_ROOT / package).rglob('*.py')):
      rel = file.relative_to(_ROOT).as_posix()
      if rel in _EXEMPT:
        continue
      for number, line in enumerate(file.read_text().splitlines(), 1):
        code = line.split('#', 1)[0]
        if _DIRECT.search(code) and '# local:' not in line:
          found.append(f'{rel}:{number}: {line.strip()}')
  return found


def test_user_paths_go_through_the_storage_layer():
  uses = _direct_uses()
  assert not uses, (
    'direct file-system calls outside data/storage.py (use data.storage, or mark a path that can '
    'only be local with "# local: why"):\n' + '\n'.join(uses)
  )
