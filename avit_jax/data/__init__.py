"""Input data: sources (Fashion-MNIST IDX, image folders, tfds), DeiT's transforms and
RandAugment as TensorFlow ops, and the per-host tf.data pipeline (pipeline.py)."""
