"""The smallest dense model: what the tests train.

Usage: python -m train.train --config=configs/tiny.py --workdir=/tmp/tiny
Hardware: any CPU; about 20 s on 2 cores.
Expected: the loss falls from ~5.9 (uniform over 384) within 20 steps.
"""

from configs import base


def get_config(arg: str | None = None):
  base.check_variant('configs/tiny.py', arg)  # already tiny; accepts `:tiny` like every experiment
  return base.make_tiny(base.get_config())
