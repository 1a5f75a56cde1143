"""A-ViT / DeiT training as the Flax examples write it: model and state, pure jitted steps,
and one `train_and_evaluate` loop.

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
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import flags, logging
from flax import nnx, struct
from jax.sharding import Mesh

from avit_jax import checkpoints, config_lib, distributed, models
from avit_jax.checkpoints import finetune
from avit_jax.data import augment, pipeline
from avit_jax.models import flops
from avit_jax.training import evaluation, losses, optim, sharding
from avit_jax.training import workdir as workdir_lib
from avit_jax.training.metric_writer import MetricWriter
from avit_jax.training.validation import validate_config
from avit_jax.training.workdir import Workdir

class NonFiniteLossError(FloatingPointError):
  """A step's loss or gradient was not finite (and skip_nonfinite_steps is off)."""


class Preempted(RuntimeError):
  """SIGTERM stopped training after a checkpoint was written; rerun the command to resume."""


# --- model and state -----------------------------------------------------------------------

def run_length(config: ml_collections.ConfigDict, train_examples: int) -> tuple[int, int]:
  """(steps per epoch, total steps): num_train_steps when > 0, else num_epochs."""
  steps_per_epoch = max(train_examples // config.batch_size, 1)
  total = (config.num_train_steps if config.num_train_steps > 0
           else int(math.ceil(config.num_epochs * steps_per_epoch)))
  return steps_per_epoch, total


@dataclasses.dataclass(frozen=True)
class ModelGraphs:
  """The static halves of the model for nnx.merge: train- and eval-mode graph definitions,
  and the state that is not a parameter (the dropout stream's key and counter)."""
  train: nnx.GraphDef
  eval: nnx.GraphDef
  non_params: nnx.State


def split_model(model: models.AViT) -> tuple[ModelGraphs, nnx.State]:
  model.train()
  train_def, params, non_params = nnx.split(model, nnx.Param, ...)
  model.eval()
  eval_def = nnx.split(model, nnx.Param, ...)[0]
  return ModelGraphs(train_def, eval_def, non_params), params


def create_model(config: ml_collections.ConfigDict) -> models.AViT:
  """config.model, initialised from config.seed or, in training, from config.init_from (a
  converted checkpoint or a trainer step, fitted to the model by finetune.adapt_params)."""
  model = models.create(config.model, seed=config.seed)
  if config.mode == 'train' and config.init_from:
    params, _ = checkpoints.load_params(config.init_from)
    template = config_lib.flatten(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    params, _ = finetune.adapt_params(config_lib.flatten(params), template, config.model)
    checkpoints.assign_params(model, params, f'config.init_from={config.init_from!r}')
    logging.info('initialised parameters from %s', config.init_from)
  return model


@struct.dataclass
class TrainState:
  step: jax.Array          # int32 []
  params: nnx.State
  opt_state: Any
  ema_params: nnx.State | None
  nonfinite_steps: jax.Array   # int32 [], steps whose loss or gradient was not finite
  first_nonfinite: jax.Array   # int32 [], first such step (-1: none)
  nonfinite_terms: jax.Array   # float32 [3], (ce, ponder, prior) at that step


def create_train_state(params: nnx.State, tx: optax.GradientTransformation, *,
                       ema: bool) -> TrainState:
  """Step 0: `params`, a fresh optimizer state and, with `ema`, a copy to average into."""
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    ema_params=jax.tree.map(jnp.copy, params) if ema else None,
                    nonfinite_steps=jnp.zeros((), jnp.int32),
                    first_nonfinite=jnp.full((), -1, jnp.int32),
                    nonfinite_terms=jnp.zeros((3,), jnp.float32))


def state_shardings(mesh: Mesh, state: TrainState) -> TrainState:
  """Arrays under the fsdp rule of sharding.py; the step and counters replicated."""
  scalar = sharding.replicated(mesh)
  return sharding.tree_shardings(mesh, state).replace(
      step=scalar, nonfinite_steps=scalar, first_nonfinite=scalar, nonfinite_terms=scalar)


def restore_or_init(manager: checkpoints.TrainCheckpoints, state: TrainState,
                    shardings: TrainState) -> TrainState:
  """The newest checkpoint of the workdir, restored with `state`'s shapes and shardings;
  `state` itself (step 0) when there is none."""
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          state, shardings)
  pure = lambda s: None if s is None else nnx.to_pure_dict(s)
  restored = manager.restore_latest(abstract_params=pure(abstract.params),
                                    abstract_opt_state=abstract.opt_state,
                                    abstract_ema=pure(abstract.ema_params))
  if restored is None:
    return state

  def into(like: nnx.State | None, values: dict | None) -> nnx.State | None:
    if like is None:
      return None
    tree = jax.tree.map(lambda x: x, like)  # a new State of the same structure
    nnx.replace_by_pure_dict(tree, values)
    return tree

  train = restored['train']
  logging.info('resumed from %s', manager.step_dir(train['step']))
  # The skipped-step count carries over, so skip_nonfinite_steps counts over the whole run.
  return state.replace(step=jnp.asarray(train['step'], jnp.int32),
                       params=into(state.params, restored['params']),
                       opt_state=restored['opt_state'],
                       ema_params=into(state.ema_params, restored['ema_params']),
                       nonfinite_steps=jnp.asarray(train.get('nonfinite_steps', 0), jnp.int32))


def save_checkpoint(manager: checkpoints.TrainCheckpoints, state: TrainState,
                    config: ml_collections.ConfigDict, steps_per_epoch: int,
                    metrics: dict | None = None) -> None:
  """Saves the state at its step (asynchronously), with its eval top-1 when given."""
  step = int(state.step)
  manager.save(step, params=state.params, opt_state=state.opt_state, ema_params=state.ema_params,
               train={'step': step, 'epoch': step / steps_per_epoch, 'seed': config.seed,
                      'nonfinite_steps': int(state.nonfinite_steps)},
               metadata=checkpoint_metadata(config),
               metrics={'top1': metrics['top1']} if metrics else None)


def save_on_failure(manager: checkpoints.TrainCheckpoints, state: TrainState,
                    config: ml_collections.ConfigDict, steps_per_epoch: int,
                    reported: int) -> None:
  """After an error in the loop: saves the last completed step unless it is saved already,
  so a rerun resumes there. Only on one process (a save is collective: the others may not
  have failed) and only from a state whose non-finite steps were all allowed; a failure of
  this save is logged, never raised over the run's own error."""
  if jax.process_count() > 1:
    return
  try:
    step = int(state.step)
    bad = int(state.nonfinite_steps)
    latest = manager.latest_step()
    if (not step or (latest is not None and step <= latest)
        or (bad > reported and not config.skip_nonfinite_steps)):
      return
    save_checkpoint(manager, state, config, steps_per_epoch)
    manager.wait()
    logging.warning('the run failed after step %d; wrote checkpoint %s (rerun the same '
                    'command to resume from it)', step, manager.step_dir(step))
  except Exception as e:  # pylint: disable=broad-except
    logging.error('the run failed and its last step could not be saved: %s: %s',
                  type(e).__name__, e)


def checkpoint_metadata(config: ml_collections.ConfigDict) -> dict:
  """What a checkpoint needs to be used without its config: model, data statistics, losses."""
  return {'model': checkpoints.metadata_json(config.model),
          'data': {'mean': list(config.data.mean), 'std': list(config.data.std),
                   'source': config.data.source},
          'loss': checkpoints.metadata_json(config.loss)}


# --- steps ---------------------------------------------------------------------------------

def loss_terms(out, targets, config: ml_collections.ConfigDict, prior_target,
               teacher_logits: jax.Array | None = None) -> dict:
  """Soft-target CE + ponder + distributional prior (the latter two only with halting).

  A distilled model weighs its two heads as DeiT does: 'ce' is (1 - alpha) x the class
  head's CE and 'distill_loss' alpha x head_dist's loss against the teacher's logits
  (losses.distillation_loss), or against the labels when there is no teacher.
  """
  zero = jnp.zeros((), jnp.float32)
  terms = {'ce': losses.soft_target_cross_entropy(out.logits, targets), 'distill_loss': zero,
           'ponder_loss': zero, 'prior_loss': zero}
  if config.model.distilled:
    d = config.distill
    distill = (losses.soft_target_cross_entropy(out.dist_logits, targets)
               if teacher_logits is None else
               losses.distillation_loss(out.dist_logits, teacher_logits, d.kind, d.tau))
    terms.update(ce=(1 - d.alpha) * terms['ce'], distill_loss=d.alpha * distill)
  if config.model.halting:
    terms.update(
        ponder_loss=losses.ponder_loss(out.ponder, config.loss.ponder_weight),
        prior_loss=losses.prior_loss(out.halting_mean, prior_target, config.loss.prior_weight))
  return terms


def train_step(state: TrainState, batch: dict, teacher_params: nnx.State | None, *,
               graphs: ModelGraphs, tx, lr_schedule, config: ml_collections.ConfigDict,
               prior_target, teacher: ModelGraphs | None = None) -> tuple[TrainState, dict]:
  """One optimizer step on a global batch {images [B,H,W,3], labels [B]}; pure. With a
  `teacher` (graphs, and its frozen `teacher_params`), the teacher's eval-mode logits on the
  same augmented images are head_dist's targets (loss_terms)."""
  key = jax.random.fold_in(jax.random.key(config.seed), state.step)
  mix_key, dropout_key = jax.random.split(key)
  targets = losses.smooth_labels(batch['labels'], config.model.num_classes,
                                 float(config.aug.label_smoothing))
  images, targets = augment.mixup_cutmix(mix_key, batch['images'], targets, config.aug)
  teacher_logits = None
  if teacher is not None:
    with jax.named_scope('teacher'):
      teacher_model = nnx.merge(teacher.eval, teacher_params, teacher.non_params)
      teacher_logits = jax.lax.stop_gradient(teacher_model(images).logits)

  def loss_fn(params):
    # Fresh copies of the RNG variables, so reseeding mutates only this trace's copies.
    model = nnx.merge(graphs.train, params, jax.tree.map(jnp.asarray, graphs.non_params))
    nnx.reseed(model, dropout=dropout_key)
    out = model(images)
    terms = loss_terms(out, targets, config, prior_target, teacher_logits)
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
  # The classification terms (labels and teacher) share the first slot.
  terms_vec = jnp.stack([terms['ce'] + terms['distill_loss'], terms['ponder_loss'],
                         terms['prior_loss']])
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


def eval_step(params, batch: dict, *, graphs: ModelGraphs, model_config) -> dict:
  """Eval-mode sums over a global batch {images, labels, mask} (evaluation.eval_sums)."""
  model = nnx.merge(graphs.eval, params, graphs.non_params)
  out = model(batch['images'])
  return evaluation.eval_sums(out, batch['labels'], batch['mask'], model_config)


def jit_eval_step(graphs: ModelGraphs, model_config, mesh: Mesh, params_shardings) -> Callable:
  return jax.jit(functools.partial(eval_step, graphs=graphs, model_config=model_config),
                 in_shardings=(params_shardings, sharding.batch_sharding(mesh)),
                 out_shardings=sharding.replicated(mesh))


def load_teacher(config: ml_collections.ConfigDict
                 ) -> tuple[ModelGraphs | None, nnx.State | None]:
  """config.distill.teacher as (graphs, parameters) in eval mode, its architecture the one
  its checkpoint recorded; (None, None) without a teacher. Logs its cost once."""
  if not (config.model.distilled and config.distill.teacher):
    return None, None
  model, metadata = models.load(config.distill.teacher)
  teacher_config = ml_collections.ConfigDict(metadata['model'])
  teacher_gflops = flops.dense_gflops(teacher_config)
  logging.info('teacher %s (%s, depth %d, width %d; %s distillation, alpha %g): %.4g GFLOPs per '
               'image forward, %.2fx the student\'s dense forward, run in every train step',
               config.distill.teacher, 'A-ViT' if teacher_config.halting else 'DeiT',
               teacher_config.depth, teacher_config.dim, config.distill.kind,
               config.distill.alpha, teacher_gflops,
               teacher_gflops / flops.dense_gflops(config.model))
  graphs, params = split_model(model)
  return graphs, params


@dataclasses.dataclass(frozen=True)
class TrainProgram:
  """What a training run compiles against (built by `prepare_training`)."""
  mesh: Mesh
  graphs: ModelGraphs
  state_shardings: TrainState
  train_step: Callable   # (state, global batch) -> (state, metrics), jitted; donates the state
  eval_step: Callable    # jitted (params, global batch) -> eval sums
  steps_per_epoch: int
  total_steps: int


def prepare_training(config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None
                     ) -> tuple[TrainProgram, TrainState]:
  """The mesh (all devices, or `devices`), the model, optimizer and jitted steps, and the
  step-0 state placed on the mesh."""
  train_examples = pipeline.num_examples(config, config.data.train_split)
  mesh = sharding.make_mesh(config.mesh, devices)
  graphs, params = split_model(create_model(config))
  steps_per_epoch, total_steps = run_length(config, train_examples)
  lr_schedule = optim.schedule(config.optimizer, config.batch_size, total_steps, steps_per_epoch)
  tx = optim.make_optimizer(config.optimizer, lr_schedule)
  state = create_train_state(params, tx, ema=config.optimizer.ema_decay > 0)
  shardings = state_shardings(mesh, state)
  prior = (losses.prior_target(config.model.depth, config.loss.prior_target_depth,
                               config.loss.prior_std) if config.model.halting else None)
  teacher, teacher_params = load_teacher(config)
  teacher_shardings = (None if teacher_params is None
                       else sharding.tree_shardings(mesh, teacher_params))
  step = jax.jit(
      functools.partial(train_step, graphs=graphs, tx=tx, lr_schedule=lr_schedule,
                        config=config, prior_target=prior, teacher=teacher),
      in_shardings=(shardings, sharding.batch_sharding(mesh), teacher_shardings),
      out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)
  if teacher_params is not None:
    teacher_params = jax.device_put(teacher_params, teacher_shardings)
  program = TrainProgram(
      mesh=mesh, graphs=graphs, state_shardings=shardings,
      # The teacher's parameters are an argument, not a constant of the compiled program.
      train_step=lambda state, batch: step(state, batch, teacher_params),
      eval_step=jit_eval_step(graphs, config.model, mesh, shardings.params),
      steps_per_epoch=steps_per_epoch, total_steps=total_steps)
  return program, jax.device_put(state, shardings)


# --- evaluation ----------------------------------------------------------------------------

def evaluate_split(eval_fn: Callable, params, config: ml_collections.ConfigDict,
                   mesh: Mesh) -> dict:
  """Exact metrics of `params` over config.data.eval_split (evaluation.evaluate)."""
  batches = (sharding.global_batch(b, mesh) for b in pipeline.eval_iterator(config))
  return evaluation.evaluate(lambda batch: eval_fn(params, batch), batches,
                             num_tokens=models.num_tokens(config.model),
                             dense_gflops=flops.dense_gflops(config.model))


def check_finite(state: TrainState, config: ml_collections.ConfigDict, reported: int,
                 manager: checkpoints.TrainCheckpoints) -> int:
  """Raises NonFiniteLossError after a non-finite step; with skip_nonfinite_steps, logs the
  running count of skipped steps instead. Returns the count reported so far."""
  bad = int(state.nonfinite_steps)
  if bad and not config.skip_nonfinite_steps:
    step = int(state.first_nonfinite)
    ce, ponder, prior = (float(v) for v in np.asarray(state.nonfinite_terms))
    # Named only after it verifies: the advice below sends the user to it.
    good = manager.last_good_step()
    if good is not None:
      where = manager.step_dir(good)
    elif manager.latest_step() is None:
      where = 'none written yet'
    else:
      where = (f'none that verifies (`{checkpoints.VERIFY_COMMAND} '
               f'{os.path.dirname(manager.directory)}` says why)')
    raise NonFiniteLossError(
        f'non-finite loss or gradient at step {step} (ce={ce:.6g}, ponder={ponder:.6g}, '
        f'prior={prior:.6g}); the step was not applied and no checkpoint was written from it. '
        f'Last good checkpoint: {where}. Rerun with --config.skip_nonfinite_steps=True to '
        'skip such steps and count them (same workdir), or lower optimizer.lr / set '
        'optimizer.grad_clip_norm in a new --workdir (--config.init_from=<a checkpoint> starts '
        'from its parameters).')
  if bad > reported:
    logging.warning('skipped %d non-finite step(s) so far (skip_nonfinite_steps=True); the '
                    'first in this run was step %d', bad, int(state.first_nonfinite))
  return bad


# --- the run -------------------------------------------------------------------------------

def evaluate_checkpoint(config: ml_collections.ConfigDict, run_dir: Workdir, *,
                        devices: Sequence[jax.Device] | None = None) -> dict:
  """mode='eval': the metrics of config.eval_checkpoint (default: the newest step of the
  workdir), written to WORKDIR/eval.json when they re-evaluate the run's own config, else to
  WORKDIR/evals/ (Workdir.evaluation_file). Builds no optimizer, reads no train data."""
  directory = config.eval_checkpoint or checkpoints.latest_step_dir(run_dir.path)
  model, _ = models.load(directory, config.model, seed=config.seed)
  graphs, params = split_model(model)
  mesh = sharding.make_mesh(config.mesh, devices)
  params_shardings = sharding.tree_shardings(mesh, params)
  eval_fn = jit_eval_step(graphs, config.model, mesh, params_shardings)
  metrics = evaluate_split(eval_fn, jax.device_put(params, params_shardings), config, mesh)
  name = os.path.basename(os.path.normpath(directory))
  metrics.update(step=int(name) if name.isdigit() else 0,
                 checkpoint=workdir_lib.resolve(directory))
  path, overrides = run_dir.evaluation_file(config, metrics['step'])
  own_result = path == os.path.join(run_dir.path, workdir_lib.EVAL_FILE)
  if not own_result:
    metrics['overrides'] = overrides
  writer = MetricWriter(run_dir.path, jax.process_index() == 0, events=own_result)
  writer.evaluation(metrics, split=config.data.eval_split, depth=config.model.depth, path=path)
  writer.close()
  logging.info('evaluation written to %s', path)
  return metrics


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       devices: Sequence[jax.Device] | None = None) -> dict:
  """Trains (resuming from the newest checkpoint in workdir) with periodic evaluation, or,
  with config.mode == 'eval', evaluates a checkpoint. Returns the last eval metrics, which
  are also in WORKDIR/eval.json.

  Raises Preempted after SIGTERM (a checkpoint of the last step is written first) and
  NonFiniteLossError after a non-finite step (unless config.skip_nonfinite_steps).
  """
  validate_config(config)
  if not flags.FLAGS.is_parsed() and logging.get_verbosity() < logging.INFO:
    # Called from Python (a notebook, a script), not the command: absl would drop the INFO
    # lines that report progress, which the command prints.
    logging.set_verbosity(logging.INFO)
  with Workdir(workdir, config, is_chief=jax.process_index() == 0) as run_dir:
    if config.mode == 'eval':
      return evaluate_checkpoint(config, run_dir, devices=devices)
    program, state = prepare_training(config, devices)
    manager = checkpoints.TrainCheckpoints(run_dir.path, keep=config.keep_checkpoints)
    writer = MetricWriter(run_dir.path, jax.process_index() == 0)
    preemption = distributed.Preemption()
    intact = False
    try:
      state = restore_or_init(manager, state, program.state_shardings)
      start, total = int(state.step), program.total_steps
      reported = int(state.nonfinite_steps)
      intact = True
      eval_every = config.eval_every_steps or program.steps_per_epoch
      eval_params = lambda s: s.ema_params if s.ema_params is not None else s.params
      batches = pipeline.train_iterator(config, start_step=start)
      logging.info('training steps %d -> %d (%d per epoch, global batch %d, %d devices)', start,
                   total, program.steps_per_epoch, config.batch_size, program.mesh.size)
      last_eval: dict = {}
      run_start = tick = time.perf_counter()
      tick_step = start
      for step in range(start, total):
        batch = sharding.global_batch(next(batches), program.mesh)
        intact = False  # the step donates the state's buffers: gone if it fails
        state, metrics = program.train_step(state, batch)
        intact = True
        done = step + 1
        # Asked once per step on every process: with several processes it is the point at
        # which all of them learn of a SIGTERM delivered to any one, at the same step.
        preempted = preemption.reached(done)
        log_now = done % config.log_every_steps == 0 or done == total
        eval_now = done % eval_every == 0 or done == total
        save_now = eval_now or done % config.checkpoint_every_steps == 0 or preempted
        if log_now or save_now:  # nothing is logged or saved from a non-finite step
          reported = check_finite(state, config, reported, manager)
        if step == start:
          # The first step compiled the program: the images/s clock starts after it.
          jax.block_until_ready(state.step)
          tick, tick_step = time.perf_counter(), done
        if log_now:
          now = time.perf_counter()
          rate = ((done - tick_step) * config.batch_size / (now - tick) if done > tick_step
                  else None)
          writer.train_step(done, total, jax.device_get(metrics),
                            epoch=done / program.steps_per_epoch, images_per_second=rate,
                            eta_seconds=(total - done) * config.batch_size / rate if rate
                            else None, nonfinite_steps=reported)
          tick, tick_step = now, done
        if eval_now:
          last_eval = evaluate_split(program.eval_step, eval_params(state), config, program.mesh)
          last_eval['step'] = done
          writer.evaluation(last_eval, split=config.data.eval_split, depth=config.model.depth)
        if save_now:
          save_checkpoint(manager, state, config, program.steps_per_epoch,
                          last_eval if eval_now else None)
        if eval_now:  # images/s counts training only: the clock restarts after the eval
          tick, tick_step = time.perf_counter(), done
        if preempted:
          manager.wait()
          logging.warning('stopped at step %d; rerun the same command to resume', done)
          raise Preempted(f'SIGTERM: stopped at step {done} after writing checkpoint '
                          f'{manager.step_dir(done)}; rerun the same command to resume')
      if start >= total:
        logging.info('nothing to train: the workdir is already at step %d', start)
        last_eval = evaluate_split(program.eval_step, eval_params(state), config, program.mesh)
        last_eval['step'] = start
        writer.evaluation(last_eval, split=config.data.eval_split, depth=config.model.depth)
    except (Preempted, NonFiniteLossError):
      raise  # each has written (or refused) its checkpoint already
    except Exception:
      if intact:
        save_on_failure(manager, state, config, program.steps_per_epoch, reported)
      raise
    finally:
      # Wait for the last save while SIGTERM is still only a flag: a kill now would waste it.
      manager.close()
      preemption.close()
      writer.close()
  logging.info('trained %d steps in %.1f s', total - start, time.perf_counter() - run_start)
  return last_eval
