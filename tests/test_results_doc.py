"""docs/results.md is shared by several evidence commands: each replaces only its own section."""

from benchmarks import common


def test_a_section_is_replaced_and_the_others_kept(tmp_path):
  path = str(tmp_path / 'results.md')
  common.write_docs_section('ERC loss', 'first erc table', path)
  common.write_docs_section('Entropy-triggered routing', 'entropy table\n\n### a subsection', path)
  common.write_docs_section('ERC loss', 'second erc table', path)
  text = open(path).read()
  assert text.startswith('# Results\n')
  assert 'first erc table' not in text and text.count('## ERC loss') == 1
  assert 'second erc table' in text and 'entropy table\n\n### a subsection' in text
  assert text.index('## Entropy-triggered routing') < text.index('## ERC loss')
