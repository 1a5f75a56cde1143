"""Helpers shared by several test modules: commands run in real processes (reliability, many
hosts, gs://), the tiny training config, the plain data config, preemption by SIGTERM, arrays
saved split over devices, and random timm (PyTorch) weights."""

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'
# Fashion-MNIST's normalisation (configs/fashion_mnist.py).
MEAN, STD = 0.2860, 0.3530


# A driver for `python -c` that runs `python -m avit_jax.main` with orbax's atomic
# finalisation (the rename of the temporary step directory) of step $STALL_STEP stalled,
# after every array is written, and a marker file ($STALL_MARKER) left: the test kills a
# process there, the worst moment for a checkpoint.
STALL_FINALIZE = '''
import asyncio, os, sys
from orbax.checkpoint._src.path import atomicity
original = atomicity.AtomicRenameTemporaryPath.finalize
async def finalize(self):
  if self.get_final().name == os.environ['STALL_STEP']:
    with open(os.environ['STALL_MARKER'], 'w') as f:
      f.write(str(self.get()))
    await asyncio.sleep(3600)
  return await original(self)
atomicity.AtomicRenameTemporaryPath.finalize = finalize
from avit_jax import main
sys.argv = ['avit_jax.main'] + sys.argv[1:]
main.run()
'''


class CommandRun:
  """A command in its own process (default `python -m avit_jax.main ARGS`), its merged
  stdout and stderr read by a thread into `lines`. Every wait has a deadline that kills the
  process and fails the test; leaving a `with` block kills it if it still runs."""

  def __init__(self, args, *, env: dict, start=None, name: str = 'run'):
    start = start or [sys.executable, '-m', 'avit_jax.main']
    self.name = name
    self.proc = subprocess.Popen([*start, *map(str, args)], cwd=REPO, env=env,
                                 stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
    self.lines: list[str] = []
    self._queue: queue.Queue = queue.Queue()
    threading.Thread(target=self._read, daemon=True).start()

  def __enter__(self):
    return self

  def __exit__(self, *exc_info):
    self.kill()

  def _read(self):
    for line in self.proc.stdout:
      self._queue.put(line)
    self._queue.put(None)

  def _drain(self, timeout: float) -> bool:
    """Reads output for up to `timeout` s; False once it has ended."""
    try:
      line = self._queue.get(timeout=timeout)
    except queue.Empty:
      return True
    if line is None:
      return False
    self.lines.append(line)
    return True

  @property
  def output(self) -> str:
    return ''.join(self.lines)

  def fail(self, why: str):
    self.kill()
    raise AssertionError(f'{self.name}: {why}; output:\n{self.output[-4000:]}')

  def wait_for(self, pattern: str, timeout: float = 300) -> None:
    """Until a line matches the regular expression `pattern`."""
    deadline = time.monotonic() + timeout
    while not any(re.search(pattern, line) for line in self.lines):
      if not self._drain(1.0):
        self.fail(f'ended without printing {pattern!r}')
      if time.monotonic() > deadline:
        self.fail(f'no {pattern!r} within {timeout} s')

  def wait_for_file(self, path: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
      if time.monotonic() > deadline or self.proc.poll() is not None:
        self.fail(f'{path} never appeared')
      self._drain(0.05)

  def signal(self, sig: int) -> None:
    os.kill(self.proc.pid, sig)

  def finish(self, timeout: float = 300) -> int:
    """The exit status, once the process ended and all its output is read."""
    deadline = time.monotonic() + timeout
    while self._drain(1.0):
      if time.monotonic() > deadline:
        self.fail(f'still running after {timeout} s')
    return self.proc.wait()

  def kill(self) -> None:
    if self.proc.poll() is None:
      self.proc.kill()
      self.proc.wait(timeout=30)


# -- configs ------------------------------------------------------------------------------


def tiny_config(**overrides):
  """The Fashion-MNIST config shrunk to a model that trains 8 steps in seconds; `overrides`
  are {'a.b': value}."""
  from configs import fashion_mnist
  config = fashion_mnist.get_config()
  config.model.dim = 32
  config.model.depth = 3
  config.model.heads = 2
  config.model.patch = 7
  config.loss.prior_target_depth = 2
  config.batch_size = 32
  config.eval_batch_size = 64
  config.num_train_steps = 8
  config.num_eval_images = 256
  config.log_every_steps = 4
  config.eval_every_steps = 8
  config.checkpoint_every_steps = 4
  config.write_depth_maps = False
  config.optimizer.warmup_epochs = 0.0
  config.optimizer.lr = 3e-2  # scaled by 32 / 512: a visible drop in 8 steps
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


# A tiny run as command-line overrides (`--config.KEY=VALUE`), for the tests that start
# `python -m avit_jax.main` in processes.
TINY_FLAGS = {
    'model.dim': 32, 'model.depth': 2, 'model.heads': 2, 'model.patch': 7,
    'loss.prior_target_depth': 2, 'batch_size': 32, 'eval_batch_size': 64,
    'num_train_steps': 12, 'num_eval_images': 128, 'log_every_steps': 1,
    'eval_every_steps': 12, 'checkpoint_every_steps': 2, 'keep_checkpoints': 100,
    'write_depth_maps': False, 'optimizer.warmup_epochs': 0.0, 'optimizer.lr': 3e-2,
}


def data_config(data_dir=FASHION_MNIST_DIR, source='fashion_mnist', plain=True):
  """The input pipeline's config: small batches, eval of the stored 28 x 28 pixels, and
  (`plain`) no augmentation, so train images are the stored pixels."""
  from configs import fashion_mnist
  config = fashion_mnist.get_config()
  config.data.source = source
  config.data.data_dir = str(data_dir)
  if source != 'fashion_mnist':
    config.data.eval_split = 'validation'
  config.data.crop_pct = 1.0  # eval sees the stored 28 x 28 pixels
  config.batch_size = 6
  config.eval_batch_size = 8
  if plain:
    config.aug.pad_and_crop = 0
    config.aug.hflip = False
  return config


def gray_pixels(images):
  """Normalised float32 [B, H, W, 3] -> uint8 [B, H, W] (asserting the 3 channels agree)."""
  pixels = np.round((images * STD + MEAN) * 255).astype(np.int32)
  np.testing.assert_array_equal(pixels[..., 0], pixels[..., 1])
  np.testing.assert_array_equal(pixels[..., 0], pixels[..., 2])
  assert pixels.min() >= 0 and pixels.max() <= 255
  return pixels[..., 0]


def sigterm_at(monkeypatch, step: int) -> None:
  """The training data sends this process SIGTERM while it fetches the batch of `step`
  (0-based): the run then stops as a preempted one does, right after that step."""
  from avit_jax.data import pipeline
  real = pipeline.train_iterator

  def iterator(config, *, start_step=0, **kwargs):
    for s, batch in enumerate(real(config, start_step=start_step, **kwargs), start_step):
      if s == step:
        os.kill(os.getpid(), signal.SIGTERM)
      yield batch
  monkeypatch.setattr(pipeline, 'train_iterator', iterator)


# -- arrays saved split over devices (checkpoint integrity, in one process and in two) ----


def fsdp_mesh():
  """Every device on the fsdp axis (the 8 fake CPU devices, or 4 on each of 2 processes)."""
  from avit_jax.training import sharding
  return sharding.make_mesh(tiny_config(**{'mesh.fsdp': 8}).mesh)


def split_trees(step: int) -> tuple[dict, dict]:
  """(params, opt_state) of random int32 values for step `step`: incompressible, so each
  shard's bytes lie as they are in the OCDBT data file, where a test can flip one of them."""
  r = np.random.default_rng(step)
  return ({'w': r.integers(-2**31, 2**31 - 1, (64, 512), dtype=np.int32),
           'b': r.standard_normal(10).astype(np.float32)},
          {'count': np.int32(step), 'mu': r.integers(-2**31, 2**31 - 1, (1024,), dtype=np.int32)})


def abstract_tree(tree, mesh):
  """ShapeDtypeStructs of `tree` carrying the fsdp shardings of `mesh`."""
  import jax
  from avit_jax.training import sharding
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, sharding.tree_shardings(mesh, tree))


def flip_in_shard(step_dir: str, value: np.ndarray, bounds) -> np.ndarray:
  """Inverts one byte in the middle of the stored data of `value`'s shard `bounds` (its
  bytes found in the step's data files); returns `value` as it now reads."""
  box = tuple(slice(a, b) for a, b in bounds)
  piece = np.array(value[box], order='C')
  data = piece.tobytes()
  found = []
  for folder, _, names in os.walk(step_dir):
    for name in names:
      with open(os.path.join(folder, name), 'rb') as f:
        blob = f.read()
      found += [(os.path.join(folder, name), blob.find(data))] * blob.count(data)
  assert len(found) == 1, found  # exactly one stored copy of the shard
  path, at = found[0]
  with open(path, 'r+b') as f:
    f.seek(at + len(data) // 2)
    byte = f.read(1)[0]
    f.seek(at + len(data) // 2)
    f.write(bytes([byte ^ 0xFF]))
  piece.reshape(-1).view(np.uint8)[len(data) // 2] ^= 0xFF
  damaged = value.copy()
  damaged[box] = piece
  return damaged


# -- timm (PyTorch) weights for the conversion tests ---------------------------------------


def model_config(size='tiny', *, depth=None, image_size=224, num_classes=1000, halting=False):
  from avit_jax import config_lib
  c = config_lib.model_config(size, halting=halting)
  c.depth = depth or c.depth
  c.image_size = image_size
  c.num_classes = num_classes
  return c


def random_timm(seed, c, *, image_size=None, num_classes=None, depth=None):
  """Random timm state dict (torch layouts) with non-trivial norms and biases."""
  rng = np.random.default_rng(seed)
  image_size = image_size or c.image_size
  num_classes = num_classes or c.num_classes
  d, hidden = c.dim, int(c.dim * c.mlp_ratio)
  tokens = (image_size // c.patch) ** 2 + 1

  def w(*shape):
    return rng.normal(0.0, 0.02, shape).astype(np.float32)

  def b(n):
    return rng.normal(0.0, 0.1, (n,)).astype(np.float32)

  def scale(n):
    return rng.normal(1.0, 0.1, (n,)).astype(np.float32)

  sd = {'cls_token': rng.normal(0, 0.1, (1, 1, d)).astype(np.float32),
        'pos_embed': rng.normal(0, 0.1, (1, tokens, d)).astype(np.float32),
        'patch_embed.proj.weight': w(d, c.in_chans, c.patch, c.patch),
        'patch_embed.proj.bias': b(d)}
  for i in range(depth or c.depth):
    p = f'blocks.{i}.'
    sd.update({p + 'norm1.weight': scale(d), p + 'norm1.bias': b(d),
               p + 'attn.qkv.weight': w(3 * d, d), p + 'attn.qkv.bias': b(3 * d),
               p + 'attn.proj.weight': w(d, d), p + 'attn.proj.bias': b(d),
               p + 'norm2.weight': scale(d), p + 'norm2.bias': b(d),
               p + 'mlp.fc1.weight': w(hidden, d), p + 'mlp.fc1.bias': b(hidden),
               p + 'mlp.fc2.weight': w(d, hidden), p + 'mlp.fc2.bias': b(d)})
  sd.update({'norm.weight': scale(d), 'norm.bias': b(d),
             'head.weight': w(num_classes, d), 'head.bias': b(num_classes)})
  return sd


def timm_to_hf(sd, *, old_names=False):
  """Independent timm -> Hugging Face mapping (transformers 5 modules, or hub-file names)."""
  out = {}
  for k, v in sd.items():
    parts = k.split('.')
    if k == 'cls_token':
      out['vit.embeddings.cls_token'] = v
    elif k == 'pos_embed':
      out['vit.embeddings.position_embeddings'] = v
    elif k.startswith('patch_embed.proj.'):
      out['vit.embeddings.patch_embeddings.projection.' + parts[-1]] = v
    elif k.startswith('norm.'):
      out['vit.layernorm.' + parts[-1]] = v
    elif k.startswith('head.'):
      out['classifier.' + parts[-1]] = v
    else:
      i, module, leaf = parts[1], '.'.join(parts[2:-1]), parts[-1]
      if old_names:
        p = f'vit.encoder.layer.{i}.'
        names = {'norm1': 'layernorm_before', 'norm2': 'layernorm_after',
                 'attn.proj': 'attention.output.dense', 'mlp.fc1': 'intermediate.dense',
                 'mlp.fc2': 'output.dense'}
        qkv = ('attention.attention.query', 'attention.attention.key', 'attention.attention.value')
      else:
        p = f'vit.layers.{i}.'
        names = {'norm1': 'layernorm_before', 'norm2': 'layernorm_after',
                 'attn.proj': 'attention.o_proj', 'mlp.fc1': 'mlp.fc1', 'mlp.fc2': 'mlp.fc2'}
        qkv = ('attention.q_proj', 'attention.k_proj', 'attention.v_proj')
      if module == 'attn.qkv':
        for name, chunk in zip(qkv, np.split(v, 3, axis=0)):
          out[f'{p}{name}.{leaf}'] = chunk
      else:
        out[f'{p}{names[module]}.{leaf}'] = v
  return out


def hf_model(model_class, config_class, c, hf_state_dict):
  """A Hugging Face ViT / DeiT model of config.model `c`'s geometry (timm's LayerNorm eps and
  exact GELU), in eval mode, holding `hf_state_dict` (Hugging Face names, numpy arrays)."""
  import torch
  config = config_class(hidden_size=c.dim, num_hidden_layers=c.depth, num_attention_heads=c.heads,
                        intermediate_size=int(c.dim * c.mlp_ratio), image_size=c.image_size,
                        patch_size=c.patch, num_channels=c.in_chans, layer_norm_eps=1e-6,
                        hidden_act='gelu', qkv_bias=True, num_labels=c.num_classes)
  model = model_class(config).eval()
  model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v))
                         for k, v in hf_state_dict.items()}, strict=True)
  return model


def save_pth(path, sd, wrap=True):
  import torch
  tensors = {k: torch.from_numpy(v) for k, v in sd.items()}
  torch.save({'model': tensors} if wrap else tensors, path)
  return str(path)


def params_of(model):
  from flax import nnx
  from avit_jax import config_lib
  return config_lib.flatten(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


# --- small models for inference, export and benchmark tests ----------------------------------

INFERENCE_DEPTH = 4


def small_config(**overrides):
  """A 4-layer A-ViT on 32 x 32 images (65 tokens) as a config.model; `overrides` are fields."""
  from avit_jax import config_lib
  c = config_lib.model_config('tiny')
  c.update(dict(image_size=32, patch=4, dim=64, depth=INFERENCE_DEPTH, heads=4, num_classes=10,
                drop_path_rate=0.1, gate_scale=10.0, gate_center=5.0))
  c.update(overrides)
  return c


def varied_model(seed: int, shift: float = 0.3, spread: float = 20.0, **overrides):
  """Random weights whose halting neuron (channel 0) varies by token: depths spread over 1..L."""
  from avit_jax import models
  model = models.create(small_config(**overrides), seed=seed)
  for block in model.blocks:
    block.mlp.fc2.bias[...] = block.mlp.fc2.bias[...].at[0].add(shift)
    block.mlp.fc2.kernel[...] = block.mlp.fc2.kernel[...].at[:, 0].multiply(spread)
  return model


def small_images(batch: int, seed: int = 0):
  """Normal random float32 images [batch, 32, 32, 3] for `small_config` models."""
  import jax
  import jax.numpy as jnp
  return jax.random.normal(jax.random.key(100 + seed), (batch, 32, 32, 3), jnp.float32)
