"""What `pip install` puts in site-packages: the avit_jax package alone (its configs inside it,
as avit_jax.configs), no top-level `configs` that would shadow a user's own."""

import glob
import os
import subprocess
import sys
import zipfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_wheel_holds_avit_jax_only(tmp_path):
  subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation',
                  '-q', '-w', str(tmp_path), REPO], check=True, capture_output=True, timeout=300)
  (wheel,) = glob.glob(str(tmp_path / '*.whl'))
  names = zipfile.ZipFile(wheel).namelist()
  assert {n.split('/')[0] for n in names if '.dist-info/' not in n} == {'avit_jax'}
  assert {'avit_jax/configs/tiny.py', 'avit_jax/configs/small.py', 'avit_jax/configs/base.py',
          'avit_jax/configs/fashion_mnist.py'} <= set(names)
