"""Depth maps and per-layer plots: files, pixel sizes, and that what is drawn is the model's."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from avit_jax import checkpoints, command_line, models, visualize
from avit_jax.analysis import figures, plots
from avit_jax.data import pipeline
from avit_jax.training import losses
from configs import fashion_mnist

MEAN, STD = (0.2860, 0.2860, 0.2860), (0.3530, 0.3530, 0.3530)


def _config(gate_center=0.0):
  """Fashion-MNIST geometry (28 px, patch 4 -> 7x7 patches), tiny width, 4 layers.

  gate_center 0 with random weights makes h = sigmoid(10 y0) close to 0 or 1, so token depths
  spread over 1..L instead of all being L.
  """
  config = fashion_mnist.get_config()
  config.model.update(dim=32, depth=4, heads=2, patch=4, gate_center=gate_center)
  return config


def _model_and_images(count=6, seed=0):
  config = _config()
  model = models.create(config.model, seed=seed)
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(count, 28, 28, 3)).astype(np.float32)
  return config, model, images


@pytest.fixture(scope='module')
def tiny():
  """Config, model, 6 random images and the model's own outputs on them, as numpy."""
  from flax import nnx
  config, model, images = _model_and_images()
  out = nnx.jit(lambda m, x: m(x))(model, images)  # jit: eager dispatch takes ~20 s
  return dict(config=config, model=model, images=images,
              token_depth=np.asarray(out.token_depth),
              halting_scores=np.asarray(out.halting_scores), logits=np.asarray(out.logits))


def _png_size(path):
  with Image.open(path) as img:
    return img.size


def test_patch_grid_and_upsample_by_hand():
  depth = np.array([3, 1, 2, 3, 4], np.float32)  # class token, then a 2x2 grid row-major
  np.testing.assert_array_equal(plots.patch_grid(depth), [[1, 2], [3, 4]])
  np.testing.assert_array_equal(plots.upsample(np.array([[1, 2], [3, 4]]), 4, 4),
                                [[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]])
  # A distilled model: class and distillation tokens, then the grid.
  distilled = np.array([3, 2, 1, 2, 3, 4], np.float32)
  np.testing.assert_array_equal(plots.patch_grid(distilled), [[1, 2], [3, 4]])
  with pytest.raises(ValueError, match='1 \\+ G\\*G'):
    plots.patch_grid(np.ones(7))
  with pytest.raises(ValueError, match='multiple of the patch grid'):
    plots.upsample(np.ones((2, 2)), 5, 4)


def test_layer_statistics_by_hand():
  # One image, 4 tokens of depth 1, 2, 3, 3 in a 3-layer model: layer 1 runs all four,
  # layer 2 the three with depth > 1, layer 3 the two with depth 3.
  depth = np.array([[1, 2, 3, 3]], np.float32)
  scores = np.zeros((1, 3, 4), np.float32)
  scores[0, 0] = [1.0, 0.2, 0.0, 0.2]  # layer means 0.35, 0.15, 0.5
  scores[0, 1] = [0.0, 0.6, 0.0, 0.0]
  scores[0, 2] = [0.5, 0.5, 0.5, 0.5]
  stats = plots.layer_statistics(depth, scores)
  np.testing.assert_allclose(stats['active_fraction'], [[1.0, 0.75, 0.5]])
  np.testing.assert_allclose(stats['halting_mean'], [0.35, 0.15, 0.5], rtol=1e-6)
  np.testing.assert_allclose(stats['halting_distribution'], [0.35, 0.15, 0.5], rtol=1e-6)
  np.testing.assert_allclose(stats['mean_depth'], [2.25])


def test_depth_map_draws_the_model_token_depth(tmp_path, tiny):
  config, images, token_depth = tiny['config'], tiny['images'], tiny['token_depth']
  assert len(np.unique(token_depth)) > 1, 'test needs tokens that halt at different layers'
  for b in range(3):
    fig, drawn = plots.depth_map_figure(plots.to_display(images[b], MEAN, STD), token_depth[b],
                                        config.model.depth)
    shown = np.asarray(fig.axes[1].get_images()[0].get_array())
    np.testing.assert_array_equal(shown, drawn)
    assert shown.shape == (28, 28)
    # Patch (i, j) covers pixels [4i:4i+4, 4j:4j+4] and shows token 1 + 7 i + j.
    for i, j in [(0, 0), (0, 6), (3, 2), (6, 6)]:
      np.testing.assert_array_equal(shown[4 * i:4 * i + 4, 4 * j:4 * j + 4],
                                    token_depth[b, 1 + 7 * i + j])
    assert fig.axes[3].get_ylabel() == 'depth, 4 = full'  # the colour bar
    path = plots.save(fig, str(tmp_path / f'{b}.png'))
    assert _png_size(path) == (900, 320)


def test_depth_maps_grid_draws_each_image(tiny):
  images, token_depth = tiny['images'][:3], tiny['token_depth'][:3]
  fig, drawn = plots.depth_maps_grid_figure(plots.to_display(images, MEAN, STD), token_depth, 4,
                                            titles=['a', 'b', 'c'])
  for k in range(3):
    shown = np.asarray(fig.axes[3 + k].get_images()[0].get_array())  # bottom row
    np.testing.assert_array_equal(shown, drawn[k])
    np.testing.assert_array_equal(shown[::4, ::4], token_depth[k, 1:].reshape(7, 7))


def test_run_model_matches_direct_call_in_batches(tiny):
  got = figures.run_model(tiny['model'], tiny['images'], batch_size=4)  # 4 + 2 (padded)
  np.testing.assert_array_equal(got['token_depth'], tiny['token_depth'])
  np.testing.assert_allclose(got['halting_scores'], tiny['halting_scores'], atol=1e-5)
  np.testing.assert_allclose(got['logits'], tiny['logits'], atol=1e-4)


def test_write_run_figures_files_sizes_and_arrays(tmp_path, tiny):
  config, model, images = tiny['config'], tiny['model'], tiny['images']
  labels = np.arange(6) % 10
  written = figures.write_run_figures(
      model, images, labels, str(tmp_path), mean=MEAN, std=STD,
      class_names=figures.FASHION_MNIST_CLASSES, loss_config=config.loss.to_dict(), num_maps=3)
  names = sorted(os.path.relpath(p, tmp_path) for p in written)
  assert names == sorted([
      'depth_maps/000_eval0.png', 'depth_maps/001_eval1.png', 'depth_maps/002_eval2.png',
      'depth_maps_grid.png', 'active_tokens_per_layer.png', 'halting_per_layer.png', 'token_depth_histogram.png',
      'mean_depth_histogram.png', 'easiest_hardest.png', 'depths.npz', 'content_depth.json'])
  sizes = {n: _png_size(tmp_path / n) for n in names if n.endswith('.png')}
  assert sizes['depth_maps/000_eval0.png'] == (900, 320)
  assert sizes['active_tokens_per_layer.png'] == (600, 400)
  assert sizes['halting_per_layer.png'] == (1100, 400)
  assert sizes['token_depth_histogram.png'] == (600, 400)
  assert sizes['mean_depth_histogram.png'] == (600, 400)
  assert sizes['depth_maps_grid.png'] == (580, 360)  # 3 images: 3 x 1.6 + 1 by 2 x 1.6 + 0.4 in
  assert sizes['easiest_hardest.png'] == (480, 380)  # 3 per row: 3 x 1.6 in by 2 x 1.6 + 0.6 in
  saved = np.load(tmp_path / 'depths.npz')
  token_depth = tiny['token_depth']
  np.testing.assert_array_equal(saved['token_depth'], token_depth)
  np.testing.assert_allclose(saved['mean_depth'], token_depth.mean(-1), rtol=1e-6)
  np.testing.assert_array_equal(saved['labels'], labels)


def test_content_depths_by_hand():
  """Two 8x8 images in 4x4 patches: a patch is background with <= 5% of its pixels above 0.1,
  object with more than half; depth 1 on the object, 3 on the background."""
  images = np.zeros((2, 8, 8, 3), np.float32)
  images[0, :4, :4] = 1.0                       # patch 0 of image 0: object
  images[1, 4:, 4:] = 0.5                       # patch 3 of image 1: object
  images[1, 0, 0] = 1.0                         # patch 0 of image 1: 1/16 on: neither kind
  token_depth = np.array([[6, 1, 3, 3, 3], [6, 2, 3, 3, 1]], np.float32)  # class token first
  stats = plots.content_depths(images, token_depth)
  assert (stats['object_patches'], stats['background_patches']) == (2, 5)
  assert stats['object_depth'] == 1.0 and stats['background_depth'] == 3.0
  np.testing.assert_allclose(stats['ratio'], 3.0)
  assert stats['brightness_correlation'] < -0.8  # bright patches run shallow here


def test_layer_plots_draw_the_statistics(tiny):
  config, images = tiny['config'], tiny['images']
  token_depth, scores = tiny['token_depth'], tiny['halting_scores']
  stats = plots.layer_statistics(token_depth, scores)
  active = (token_depth[:, None, :] > np.arange(4)[None, :, None]).mean(-1)
  fig = plots.active_tokens_figure(stats['active_fraction'])
  np.testing.assert_allclose(fig.axes[0].get_lines()[0].get_ydata(), active.mean(0), rtol=1e-6)

  target = figures.prior_target(4, config.loss.to_dict())
  np.testing.assert_allclose(target, np.asarray(losses.prior_target(4, 4, 1.0)))
  fig = plots.halting_figure(scores, token_depth, target)
  bars = [p.get_height() for p in fig.axes[1].patches]
  h = scores.mean(axis=(0, 2))
  np.testing.assert_allclose(bars, h / h.sum(), rtol=1e-5)
  # Model and target on the same scale: both shares that sum to 1 (T itself need not).
  line = fig.axes[1].get_lines()[0].get_ydata()
  np.testing.assert_allclose(line, target / np.sum(target), rtol=1e-6)
  np.testing.assert_allclose(np.sum(line), np.sum(bars), rtol=1e-5)

  fig = plots.depth_histogram_figure(token_depth, 4)
  counts = [p.get_height() for p in fig.axes[0].patches]
  np.testing.assert_array_equal(counts, [(token_depth == d).sum() for d in range(1, 5)])

  fig, chosen = plots.easiest_hardest_figure(plots.to_display(images, MEAN, STD),
                                             stats['mean_depth'], count=2)
  order = np.argsort(token_depth.mean(-1), kind='stable')
  np.testing.assert_array_equal(chosen, [order[:2], order[::-1][:2]])


def _save_checkpoint(workdir, model, config, step, with_data=True):
  from flax import nnx
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  metadata = {'model': checkpoints.metadata_json(config.model)}
  if with_data:
    metadata['data'] = {'mean': list(MEAN), 'std': list(STD)}
  return checkpoints.save_params(os.path.join(workdir, 'checkpoints', str(step)), params, metadata)


def test_latest_step_dir(tmp_path):
  config, model, _ = _model_and_images()
  with pytest.raises(checkpoints.CheckpointError, match='no checkpoint under'):
    checkpoints.latest_step_dir(str(tmp_path))
  for step in (5, 10):
    _save_checkpoint(str(tmp_path), model, config, step)
  os.makedirs(tmp_path / 'checkpoints' / '12.orbax-checkpoint-tmp-1')  # save in progress
  os.makedirs(tmp_path / 'checkpoints' / '15')  # no params/: incomplete
  assert checkpoints.latest_step_dir(str(tmp_path)) == str(tmp_path / 'checkpoints' / '10')
  assert checkpoints.resolve_checkpoint(str(tmp_path)) == str(tmp_path / 'checkpoints' / '10')
  step5 = str(tmp_path / 'checkpoints' / '5')
  assert checkpoints.resolve_checkpoint(step5) == step5


def test_cli_on_image_files_draws_the_model_depth(tmp_path):
  config, model, _ = _model_and_images()
  _save_checkpoint(str(tmp_path / 'work'), model, config, 3)
  rng = np.random.default_rng(1)
  # Two images at the model's size (resizing is then the identity), one grey, one larger.
  pixels = [rng.integers(0, 256, (28, 28, 3), dtype=np.uint8),
            rng.integers(0, 256, (28, 28), dtype=np.uint8),
            rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)]
  files = []
  for i, p in enumerate(pixels):
    files.append(str(tmp_path / f'img {i}.png'))
    Image.fromarray(p).save(files[-1])
  out = tmp_path / 'figs'
  written = visualize.main(['--checkpoint', str(tmp_path / 'work'), '--images', *files,
                            '--out', str(out)])
  # maps, grid + 5 plots, depths.npz, content_depth.json, summary.json
  assert len(written) == 3 + 6 + 3
  assert _png_size(out / 'depth_maps' / '001_img_1.png') == (900, 320)
  saved = np.load(out / 'depths.npz')
  assert list(saved['names']) == ['img 0', 'img 1', 'img 2']
  # Independent preprocessing of the 28x28 files: /255, grey -> RGB, normalise.
  direct = np.stack([pixels[0], np.repeat(pixels[1][..., None], 3, -1)]).astype(np.float32)
  direct = (direct / 255.0 - np.asarray(MEAN, np.float32)) / np.asarray(STD, np.float32)
  np.testing.assert_array_equal(saved['token_depth'][:2], np.asarray(model(direct).token_depth))
  summary = json.loads((out / 'summary.json').read_text())
  assert summary['images'] == 3 and summary['depth'] == 4
  assert summary['checkpoint'] == str(tmp_path / 'work' / 'checkpoints' / '3')


def test_load_images_resizes_and_crops(tmp_path):
  # 20 x 40 (w x h) image: shorter side 20 -> 28 gives 28 x 56, centre crop keeps rows 14..41.
  top = np.zeros((20, 20, 3), np.uint8)
  middle = np.full((20, 20, 3), 255, np.uint8)
  Image.fromarray(np.concatenate([top, middle])).save(tmp_path / 'a.png')
  images = figures.load_images([str(tmp_path / 'a.png')], 28, (0.5,) * 3, (0.5,) * 3)
  assert images.shape == (1, 28, 28, 3)
  # Rows 0-13 of the crop come from resized rows 14-27 (top half, black: (0 - .5) / .5 = -1).
  np.testing.assert_allclose(images[0, :10], -1.0, atol=1e-6)
  np.testing.assert_allclose(images[0, -10:], 1.0, atol=1e-6)


def test_cli_errors_are_clear(tmp_path):
  config, model, _ = _model_and_images()
  work = str(tmp_path / 'work')
  _save_checkpoint(work, model, config, 1, with_data=False)
  with pytest.raises(SystemExit):
    visualize.main(['--checkpoint', work, '--out', str(tmp_path / 'o')])  # no image source
  Image.fromarray(np.zeros((28, 28, 3), np.uint8)).save(tmp_path / 'x.png')
  with pytest.raises(ValueError, match='no data mean/std; pass --config'):
    visualize.main(['--checkpoint', work, '--images', str(tmp_path / 'x.png'),
                    '--out', str(tmp_path / 'o')])
  with pytest.raises(checkpoints.CheckpointError, match='neither a checkpoint'):
    visualize.main(['--checkpoint', str(tmp_path), '--images', str(tmp_path / 'x.png'),
                    '--out', str(tmp_path / 'o')])
  with pytest.raises(ValueError) as e:
    command_line.load_config('configs/fashion_mnist.py', ['--config.data.nope=1'])
  assert str(e.value) == ("unknown config field 'data.nope'; did you mean data.source, data.mean, "
                          'data.prefetch? (valid fields are listed in configs/fashion_mnist.py; '
                          'see avit_jax/config_lib.py)')
  config = command_line.load_config('configs/fashion_mnist.py',
                                 ['--config.data.data_dir=gs://b/tfds', '--config.model.depth=3',
                                  '--config.data.mean=(0.1, 0.2, 0.3)', '--config.data.cache=false'])
  assert (config.data.data_dir, config.model.depth, config.data.mean, config.data.cache) == (
      'gs://b/tfds', 3, (0.1, 0.2, 0.3), False)


def test_cli_eval_split(tmp_path, fashion_mnist_dir):
  config, model, _ = _model_and_images()
  _save_checkpoint(str(tmp_path / 'work'), model, config, 2)
  out = tmp_path / 'figs'
  visualize.main(['--checkpoint', str(tmp_path / 'work'), '--config', 'configs/fashion_mnist.py',
                  '--num', '12', '--num-maps', '2', '--out', str(out),
                  f'--config.data.data_dir={fashion_mnist_dir}', '--config.eval_batch_size=8'])
  saved = np.load(out / 'depths.npz')
  assert saved['token_depth'].shape == (12, 50)
  # The first Fashion-MNIST test labels: ankle boot, pullover, trouser, trouser, shirt.
  np.testing.assert_array_equal(saved['labels'][:5], [9, 2, 1, 1, 6])
  assert sorted(os.listdir(out / 'depth_maps')) == ['000_test0.png', '001_test1.png']


def test_cli_takes_the_config_of_the_workdir(tmp_path, fashion_mnist_dir):
  config, model, _ = _model_and_images()
  work = tmp_path / 'work'
  step = _save_checkpoint(str(work), model, config, 2)
  config.data.data_dir = fashion_mnist_dir
  config.eval_batch_size = 8
  (work / 'config.json').write_text(config.to_json_best_effort())
  for checkpoint in (work, step):  # the workdir or one of its steps
    out = tmp_path / f'figs{len(str(checkpoint))}'
    visualize.main(['--checkpoint', str(checkpoint), '--num', '12', '--num-maps', '2',
                    '--out', str(out)])
    saved = np.load(out / 'depths.npz')
    np.testing.assert_array_equal(saved['labels'][:5], [9, 2, 1, 1, 6])  # its eval split
    assert saved['token_depth'].shape == (12, 50)


def test_deit_without_halting_draws_full_depth(tmp_path):
  config = _config()
  config.model.halting = False
  model = models.create(config.model, seed=0)
  images = np.random.default_rng(2).normal(size=(2, 28, 28, 3)).astype(np.float32)
  figures.write_run_figures(model, images, None, str(tmp_path), mean=MEAN, std=STD, num_maps=1)
  saved = np.load(tmp_path / 'depths.npz')
  np.testing.assert_array_equal(saved['token_depth'], np.full((2, 50), 4.0))
  np.testing.assert_array_equal(saved['active_fraction'], np.ones((2, 4)))
  assert 'labels' not in saved


def test_training_figures_come_from_the_newest_checkpoint(tmp_path, fashion_mnist_dir):
  """What `python -m avit_jax.main` writes after training: WORKDIR/figures for the first
  eval images, drawn by the newest step's model."""
  config, model, _ = _model_and_images()
  config.data.data_dir = fashion_mnist_dir
  config.eval_batch_size = 8
  _save_checkpoint(str(tmp_path), models.create(config.model, seed=9), config, 2)
  _save_checkpoint(str(tmp_path), model, config, 5)
  files = figures.write_training_figures(config, str(tmp_path), count=4)
  assert len(files) == 4 + 6 + 2  # maps, grid + 5 plots, depths.npz, content_depth.json
  assert all(f.startswith(str(tmp_path / 'figures')) for f in files)
  saved = np.load(tmp_path / 'figures' / 'depths.npz')
  np.testing.assert_array_equal(saved['labels'], [9, 2, 1, 1])  # the first test images
  images, _ = pipeline.eval_images(config, 4)
  np.testing.assert_array_equal(saved['token_depth'], np.asarray(model(images).token_depth))
