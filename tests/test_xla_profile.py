"""benchmarks.xla_profile.op_sources: compiled HLO ops named by the source line that traced them."""

import inspect

import jax
import jax.numpy as jnp

from benchmarks import xla_profile


def _two_lines(x, w):
  y = jnp.tanh(x @ w)
  return jnp.sum(y * y)


def test_ops_are_named_by_this_files_lines():
  x, w = jnp.ones((8, 16)), jnp.ones((16, 4))
  text = jax.jit(jax.grad(_two_lines, argnums=1)).lower(x, w).compile().as_text()
  sources = xla_profile.op_sources(text)
  first = inspect.getsourcelines(_two_lines)[1] + 1  # the line of `y = jnp.tanh(x @ w)`
  here = {f'tests/test_xla_profile.py:{first}', f'tests/test_xla_profile.py:{first + 1}'}
  assert set(sources.values()) == here  # both lines made ops; no op is put anywhere else
  ops = {line.split('=')[0].split()[-1].lstrip('%') for line in text.splitlines() if ' = ' in line}
  assert set(sources) <= ops  # every named op is an op of the program


def test_text_without_frame_tables_names_nothing():
  assert xla_profile.op_sources('HloModule m\n\nENTRY %main () -> f32[] {\n}\n') == {}
