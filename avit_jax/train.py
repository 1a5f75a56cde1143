"""A-ViT / DeiT training: state, pure jitted steps, the loop and `train_and_evaluate`.

One `jax.jit` train step over a mesh of all devices: the batch is sharded on the batch
axes, parameters and optimizer state are replicated (or fsdp-sharded). The data order and
every random key are functions of (config.seed, step), so a resumed run replays exactly
what an uninterrupted one would have done.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx, struct

from avit_jax import (augment, checkpoints, config_lib, evaluation, flops, input_pipeline, losses,
                      models, optim, sharding)
from avit_jax.metric_writer import MetricWriter
from avit_jax.workdir import Workdir, write_json

EVAL_FILE = 'eval.json'


class NonFiniteLossError(FloatingPointError):
  pass


class Preempted(RuntimeError):
  """SIGTERM stopped training after a checkpoint was written; rerun the command to resume."""


@struct.dataclass
class TrainState:
  step: jax.Array          # int32 []
  params: nnx.State
  opt_state: Any
  ema_params: nnx.State | None
  nonfinite_steps: jax.Array   # int32 [], steps whose loss or gradient was not finite
  first_nonfinite: jax.Array   # int32 [], first such step (-1: none)
  nonfinite_terms: jax.Array   # float32 [3], (ce, ponder, prior) at that step


@dataclasses.dataclass(frozen=True)
class Graphs:
  """Static halves of the model for nnx.merge: train- and eval-mode graphdefs, other state."""
  train: Any
  eval: Any
  rest: Any


def split_model(model) -> tuple[Graphs, nnx.State]:
  model.train()
  train_def, params, rest = nnx.split(model, nnx.Param, ...)
  model.eval()
  eval_def = nnx.split(model, nnx.Param, ...)[0]
  return Graphs(train_def, eval_def, rest), params


def loss_terms(out, targets, config: ml_collections.ConfigDict, prior_target) -> dict:
  """Soft-target CE + ponder + distributional prior (the latter two only with halting)."""
  ce = losses.soft_target_cross_entropy(out.logits, targets)
  if not config.model.halting:
    zero = jnp.zeros((), jnp.float32)
    return {'ce': ce, 'ponder_loss': zero, 'prior_loss': zero}
  return {
      'ce': ce,
      'ponder_loss': losses.ponder_loss(out.ponder, config.loss.ponder_weight),
      'prior_loss': losses.prior_loss(out.halting_mean, prior_target, config.loss.prior_weight),
  }


def train_step(state: TrainState, batch: dict, *, graphs: Graphs, tx, lr_schedule,
               config: ml_collections.ConfigDict, prior_target) -> tuple[TrainState, dict]:
  """One optimizer step on a global batch {images [B,H,W,3], labels [B]}; pure."""
  key = jax.random.fold_in(jax.random.key(config.seed), state.step)
  mix_key, dropout_key = jax.random.split(key)
  images, targets = augment.mix_targets(mix_key, batch['images'], batch['labels'],
                                        config.model.num_classes, config.aug)

  def loss_fn(params):
    # Fresh copies of the RNG variables, so reseeding mutates only this trace's copies.
    model = nnx.merge(graphs.train, params, jax.tree.map(jnp.asarray, graphs.rest))
    nnx.reseed(model, dropout=dropout_key)
    out = model(images)
    terms = loss_terms(out, targets, config, prior_target)
    return sum(terms.values()), (terms, out)

  (loss, (terms, out)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  grad_norm = optax.tree.norm(grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema = state.ema_params
  if ema is not None:
    decay = config.optimizer.ema_decay
    ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, ema, params)

  # A non-finite step is never applied: the state keeps its last good values.
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  terms_vec = jnp.stack([terms['ce'], terms['ponder_loss'], terms['prior_loss']])
  first_bad = (state.first_nonfinite < 0) & ~finite
  new_state = TrainState(
      step=state.step + 1,
      params=keep(params, state.params),
      opt_state=keep(opt_state, state.opt_state),
      ema_params=keep(ema, state.ema_params) if ema is not None else None,
      nonfinite_steps=state.nonfinite_steps + (~finite).astype(jnp.int32),
      first_nonfinite=jnp.where(first_bad, state.step, state.first_nonfinite),
      nonfinite_terms=jnp.where(first_bad, terms_vec, state.nonfinite_terms))
  used = flops.gflops_per_image(out.token_depth, config.model).mean()
  metrics = dict(terms, loss=loss, lr=lr_schedule(state.step), grad_norm=grad_norm,
                 mean_token_depth=out.token_depth.mean(),
                 remaining_compute=used / flops.dense_gflops(config.model))
  return new_state, metrics


def eval_step(params, batch: dict, *, graphs: Graphs, model_config) -> dict:
  model = nnx.merge(graphs.eval, params, graphs.rest)
  out = model(batch['images'])
  return evaluation.eval_sums(out, batch['labels'], batch['mask'], model_config)


def init_params_from(model, config: ml_collections.ConfigDict) -> None:
  """Loads `config.init_from` parameters (converted DeiT / A-ViT, or a trainer step).

  Goes through the conversion table, so the fine-tuning rules apply: a head with another
  number of classes is re-initialised and pos_embed is resampled to the image size.
  """
  from avit_jax import convert

  params, _ = checkpoints.load_params(config.init_from)
  try:
    source = convert.from_torch(convert.to_torch_state_dict(params), config.model,
                                seed=config.seed)
  except convert.ConvertError as e:  # say which file: the message lists only names
    raise convert.ConvertError(f'config.init_from={config.init_from!r}: {e}') from None
  checkpoints.assign_params(model, nnx.to_pure_dict(nnx.state(source, nnx.Param)),
                            f'init_from checkpoint {config.init_from}')
  logging.info('initialised parameters from %s', config.init_from)


def _steps(config, train_examples: int) -> tuple[int, int]:
  steps_per_epoch = max(train_examples // config.batch_size, 1)
  total = (config.num_train_steps if config.num_train_steps > 0
           else int(math.ceil(config.num_epochs * steps_per_epoch)))
  return steps_per_epoch, total


class _Preemption:
  """Turns SIGTERM into a flag the loop checks every step (TPU preemption notice)."""

  def __init__(self):
    self.requested = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning('SIGTERM received: saving a checkpoint before exiting')
    self.requested = True

  def restore(self):
    signal.signal(signal.SIGTERM, self._previous)


def metadata(config: ml_collections.ConfigDict) -> dict:
  return {'model': checkpoints.metadata_json(config.model),
          'data': {'mean': list(config.data.mean), 'std': list(config.data.std),
                   'source': config.data.source},
          'loss': checkpoints.metadata_json(config.loss)}


class Trainer:
  """Everything a run holds: mesh, model halves, jitted steps, state and checkpoints."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, devices=None):
    self.config = config
    self.workdir = workdir
    self.is_chief = jax.process_index() == 0
    self.mesh = sharding.make_mesh(config.mesh, devices)
    model = models.create(config.model, seed=config.seed)
    if config.init_from and config.mode == 'train':
      init_params_from(model, config)
    self.graphs, params = split_model(model)
    self.train_examples = input_pipeline.num_examples(config, config.data.train_split)
    self.steps_per_epoch, self.total_steps = _steps(config, self.train_examples)
    self.lr_schedule = optim.schedule(config.optimizer, config.batch_size, self.total_steps,
                                      self.steps_per_epoch)
    self.tx = optim.make_optimizer(config.optimizer, self.lr_schedule)
    ema = jax.tree.map(jnp.copy, params) if config.optimizer.ema_decay > 0 else None
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                       opt_state=self.tx.init(params), ema_params=ema,
                       nonfinite_steps=jnp.zeros((), jnp.int32),
                       first_nonfinite=jnp.full((), -1, jnp.int32),
                       nonfinite_terms=jnp.zeros((3,), jnp.float32))
    self.state_shardings = self._shardings(state)
    self.state = jax.device_put(state, self.state_shardings)
    prior = (losses.prior_target(config.model.depth, config.loss.prior_target_depth,
                                 config.loss.prior_std) if config.model.halting else None)
    step_fn = functools.partial(train_step, graphs=self.graphs, tx=self.tx,
                                lr_schedule=self.lr_schedule, config=config, prior_target=prior)
    batch_sharding = sharding.batch_sharding(self.mesh)
    self.train_step = jax.jit(step_fn, in_shardings=(self.state_shardings, batch_sharding),
                              out_shardings=(self.state_shardings, sharding.replicated(self.mesh)),
                              donate_argnums=0)
    self.eval_step = jax.jit(functools.partial(eval_step, graphs=self.graphs,
                                               model_config=config.model),
                             in_shardings=(self.state_shardings.params, batch_sharding),
                             out_shardings=sharding.replicated(self.mesh))
    self.checkpoints = checkpoints.TrainCheckpoints(workdir, keep=config.keep_checkpoints)
    self._reported_nonfinite = 0

  def _shardings(self, state: TrainState):
    tree = sharding.tree_shardings(self.mesh, state)
    scalar = sharding.replicated(self.mesh)
    return tree.replace(step=scalar, nonfinite_steps=scalar, first_nonfinite=scalar,
                        nonfinite_terms=scalar)

  # -- checkpoints -------------------------------------------------------------------------

  def save(self, metrics: dict | None = None) -> int:
    """Checkpoints the current state (once per step; asynchronous)."""
    step = int(self.state.step)
    if step in self.checkpoints.manager.all_steps():
      return step
    s = self.state
    self.checkpoints.save(step, params=s.params, opt_state=s.opt_state, ema_params=s.ema_params,
                          train={'step': step, 'epoch': step / self.steps_per_epoch,
                                 'seed': self.config.seed, 'data_position': step,
                                 'nonfinite_steps': int(s.nonfinite_steps)},
                          metadata=metadata(self.config),
                          metrics={'top1': metrics['top1']} if metrics else None)
    return step

  def restore_latest(self) -> int:
    """Resumes from the newest complete checkpoint in the workdir; returns its step (0: none)."""
    step = self.checkpoints.latest_step()
    if step is None:
      return 0
    abstract = jax.tree.map(
        lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
        self.state, self.state_shardings)
    pure = lambda s: nnx.to_pure_dict(s) if s is not None else None
    params, opt_state, ema, train = self.checkpoints.restore(
        step, abstract_params=pure(abstract.params), abstract_opt_state=abstract.opt_state,
        abstract_ema=pure(abstract.ema_params))
    state_params = jax.tree.map(lambda x: x, self.state.params)
    nnx.replace_by_pure_dict(state_params, params)
    ema_state = None
    if ema is not None:
      ema_state = jax.tree.map(lambda x: x, self.state.ema_params)
      nnx.replace_by_pure_dict(ema_state, ema)
    # The skipped-step count carries over, so skip_nonfinite_steps counts over the whole run.
    self.state = self.state.replace(step=jnp.asarray(train['step'], jnp.int32),
                                    params=state_params, opt_state=opt_state,
                                    ema_params=ema_state,
                                    nonfinite_steps=jnp.asarray(train.get('nonfinite_steps', 0),
                                                                jnp.int32))
    self._reported_nonfinite = int(train.get('nonfinite_steps', 0))
    logging.info('resumed from %s', self.checkpoints.step_dir(step))
    return int(train['step'])

  # -- evaluation --------------------------------------------------------------------------

  def evaluate(self, params=None) -> dict:
    params = params if params is not None else (
        self.state.ema_params if self.state.ema_params is not None else self.state.params)
    batches = (sharding.global_batch(b, self.mesh)
               for b in input_pipeline.eval_iterator(self.config))
    metrics = evaluation.evaluate(
        lambda batch: self.eval_step(params, batch), batches,
        num_tokens=evaluation.num_tokens(self.config.model),
        dense_gflops=flops.dense_gflops(self.config.model))
    metrics['step'] = int(self.state.step)
    return metrics

  def write_eval(self, metrics: dict, writer: MetricWriter) -> None:
    if self.is_chief:
      write_json(os.path.join(self.workdir, EVAL_FILE), metrics)
    split = self.config.data.eval_split
    writer.scalars(metrics['step'], {
        f'eval/{split}/top1': metrics['top1'], f'eval/{split}/top5': metrics['top5'],
        f'eval/{split}/loss': metrics['eval_loss'],
        f'eval/{split}/mean_token_depth': metrics['mean_token_depth'],
        f'eval/{split}/gflops': metrics['gflops_per_image'],
        f'eval/{split}/images_per_second': metrics['images_per_second']})
    logging.info('eval step %d: top1 %.4f top5 %.4f loss %.4f depth %.2f/%d GFLOPs %.4f '
                 '(%.0f%% of dense) %.0f img/s', metrics['step'], metrics['top1'],
                 metrics['top5'], metrics['eval_loss'], metrics['mean_token_depth'],
                 self.config.model.depth, metrics['gflops_per_image'],
                 100 * metrics['compute_fraction'], metrics['images_per_second'])

  # -- loop --------------------------------------------------------------------------------

  def check_finite(self) -> None:
    """Raises NonFiniteLossError after a non-finite step (or, with skip_nonfinite_steps, logs
    the running count of skipped steps)."""
    bad = int(self.state.nonfinite_steps)
    if bad > self._reported_nonfinite and self.config.skip_nonfinite_steps:
      logging.warning('skipped %d non-finite step(s) so far (skip_nonfinite_steps=True); the '
                      'first in this run was step %d', bad, int(self.state.first_nonfinite))
      self._reported_nonfinite = bad
    if bad and not self.config.skip_nonfinite_steps:
      step = int(self.state.first_nonfinite)
      ce, ponder, prior = (float(v) for v in np.asarray(self.state.nonfinite_terms))
      last = self.checkpoints.latest_step()
      where = self.checkpoints.step_dir(last) if last is not None else 'none written yet'
      raise NonFiniteLossError(
          f'non-finite loss or gradient at step {step} (ce={ce:.6g}, ponder={ponder:.6g}, '
          f'prior={prior:.6g}); the step was not applied and no checkpoint was written from it. '
          f'Last good checkpoint: {where}. Rerun with --config.skip_nonfinite_steps=True to '
          'skip such steps and count them (same workdir), or lower optimizer.lr / set '
          'optimizer.grad_clip_norm in a new --workdir (--config.init_from=<a checkpoint> starts '
          'from its parameters).')

  def train(self, stop_at: int | None = None) -> dict:
    """Trains to the configured number of steps (or only to `stop_at`, as an interrupted run
    would), evaluating and checkpointing on schedule. Returns the last eval metrics."""
    config = self.config
    start = self.restore_latest()
    writer = MetricWriter(self.workdir, self.is_chief)
    eval_every = config.eval_every_steps or self.steps_per_epoch
    batches = input_pipeline.train_iterator(config, start_step=start)
    preemption = _Preemption()
    last_eval: dict = {}
    logging.info('training steps %d -> %d (%d per epoch, global batch %d, %d devices)', start,
                 self.total_steps, self.steps_per_epoch, config.batch_size, jax.device_count())
    tick, tick_step, run_start = time.perf_counter(), start, time.perf_counter()
    metrics = None
    try:
      for step in range(start, self.total_steps):
        batch = sharding.global_batch(next(batches), self.mesh)
        self.state, metrics = self.train_step(self.state, batch)
        done = step + 1
        if done % config.log_every_steps == 0 or done == self.total_steps:
          metrics = jax.device_get(metrics)
          self.check_finite()
          now = time.perf_counter()
          rate = (done - tick_step) * config.batch_size / (now - tick)
          eta = (self.total_steps - done) * config.batch_size / rate
          writer.scalars(done, {f'train/{k}': v for k, v in metrics.items()} |
                         {'train/images_per_second': rate,
                          'train/nonfinite_steps': self._reported_nonfinite})
          logging.info('step %d/%d epoch %.2f | loss %.4f (ce %.4f ponder %.5f prior %.5f) | '
                       'depth %.2f compute %.0f%% | lr %.2e | %.0f img/s | ETA %s', done,
                       self.total_steps, done / self.steps_per_epoch, metrics['loss'],
                       metrics['ce'], metrics['ponder_loss'], metrics['prior_loss'],
                       metrics['mean_token_depth'], 100 * metrics['remaining_compute'],
                       metrics['lr'], rate, time.strftime('%H:%M:%S', time.gmtime(eta)))
          tick, tick_step = now, done
        evaluate_now = done % eval_every == 0 or done == self.total_steps
        if evaluate_now:
          self.check_finite()
          last_eval = self.evaluate()
          self.write_eval(last_eval, writer)
          self.save(last_eval)
        elif done % config.checkpoint_every_steps == 0:
          self.check_finite()
          self.save()
        if preemption.requested or done == stop_at:
          self.check_finite()
          self.save()
          self.checkpoints.wait()
          logging.warning('stopped at step %d; rerun the same command to resume', done)
          if preemption.requested:
            raise Preempted(f'SIGTERM: stopped at step {done} after writing checkpoint '
                            f'{self.checkpoints.step_dir(done)}; rerun the same command to '
                            'resume')
          return last_eval
      if start >= self.total_steps:
        logging.info('nothing to train: the workdir is already at step %d', start)
        last_eval = self.evaluate()
        self.write_eval(last_eval, writer)
    finally:
      # Wait for the last save while SIGTERM is still only a flag: a kill now would waste it.
      self.checkpoints.wait()
      preemption.restore()
      writer.close()
    logging.info('trained %d steps in %.1f s', self.total_steps - start,
                 time.perf_counter() - run_start)
    if config.write_depth_maps and self.is_chief and config.model.halting:
      self.write_figures()
    return last_eval

  def write_figures(self, count: int = 64) -> list[str]:
    from avit_jax import visualize

    model = nnx.merge(self.graphs.eval, self.state.params, self.graphs.rest)
    batches = input_pipeline.eval_iterator(self.config)
    first = next(batches)
    real = first['mask'] > 0
    files = visualize.write_run_figures(
        model, np.asarray(first['images'])[real][:count], np.asarray(first['labels'])[real][:count],
        os.path.join(self.workdir, 'figures'), mean=self.config.data.mean, std=self.config.data.std,
        class_names=visualize.CLASS_NAMES.get(self.config.data.source),
        loss_config=self.config.loss.to_dict())
    logging.info('wrote %d figures under %s', len(files), os.path.join(self.workdir, 'figures'))
    return files

  def evaluate_checkpoint(self) -> dict:
    """mode='eval': evaluate config.eval_checkpoint (default: newest step in the workdir)."""
    directory = self.config.eval_checkpoint
    if not directory:
      step = self.checkpoints.latest_step()
      if step is None:
        raise checkpoints.CheckpointError(
            f'no checkpoint to evaluate in {self.checkpoints.directory}; train first or set '
            '--config.eval_checkpoint=DIR')
      directory = self.checkpoints.step_dir(step)
    params, _ = checkpoints.load_params(directory)
    model = nnx.merge(self.graphs.eval, self.state.params, self.graphs.rest)
    checkpoints.assign_params(model, params, f'checkpoint {directory}')
    params_state = jax.device_put(nnx.state(model, nnx.Param), self.state_shardings.params)
    metrics = self.evaluate(params_state)
    name = os.path.basename(os.path.normpath(directory))
    metrics['step'] = int(name) if name.isdigit() else 0
    metrics['checkpoint'] = os.path.abspath(directory)
    writer = MetricWriter(self.workdir, self.is_chief)
    self.write_eval(metrics, writer)
    writer.close()
    return metrics


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (resuming from the newest checkpoint in workdir) with periodic evaluation, or,
  with config.mode == 'eval', evaluates a checkpoint. Returns the last eval metrics, which
  are also in WORKDIR/eval.json."""
  config_lib.validate(config)
  run_dir = Workdir(workdir, config, is_chief=jax.process_index() == 0)
  try:
    trainer = Trainer(config, run_dir.path)
    try:
      if config.mode == 'eval':
        return trainer.evaluate_checkpoint()
      return trainer.train()
    finally:
      trainer.checkpoints.close()
  finally:
    run_dir.close()
