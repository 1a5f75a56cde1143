"""DeiT / ViT backbone with timm's structure, names and numerics (flax.nnx, NHWC).

Attribute names follow timm (`patch_embed.proj`, `cls_token`, `pos_embed`,
`blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}`, `norm`, `head`; a distilled
DeiT adds `dist_token` and `head_dist`), so weight conversion is a rename-and-transpose table. Every block takes an optional token mask:
with a mask, halted tokens are zeroed around both LayerNorms and removed as attention
keys, which is what A-ViT's halting needs; without one it is plain DeiT.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

LAYER_NORM_EPS = 1e-6
_trunc_normal = nnx.initializers.truncated_normal(stddev=0.02, lower=-2.0 / 0.02, upper=2.0 / 0.02)
_zeros = nnx.initializers.zeros_init()


def _linear(din: int, dout: int, dtype, rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(din, dout, kernel_init=_trunc_normal, bias_init=_zeros,
                    dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


def gelu(x: jax.Array) -> jax.Array:
  """Exact GELU written as PyTorch computes it, x / 2 * (1 + erf(x / sqrt(2))).

  The same function as jax.nn.gelu(approximate=False), which goes through erfc: XLA on CPU
  computes erf much more cheaply than erfc, and the MLP's GELU is a visible share of every
  forward and training step.
  """
  return 0.5 * x * (1.0 + jax.lax.erf(x * 2 ** -0.5))


def _layer_norm(dim: int, dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
  return nnx.LayerNorm(dim, epsilon=LAYER_NORM_EPS, dtype=dtype,
                       param_dtype=jnp.float32, rngs=rngs)


class PatchEmbed(nnx.Module):
  """Non-overlapping patches -> tokens: `float32[B, H, W, C] -> [B, H/p * W/p, D]`."""

  def __init__(self, patch: int, in_chans: int, dim: int, *, dtype, rngs: nnx.Rngs):
    self.patch = patch
    # timm initialises the patch conv like a linear layer over the flattened patch.
    self.proj = nnx.Conv(in_chans, dim, kernel_size=(patch, patch), strides=(patch, patch),
                         padding='VALID', kernel_init=nnx.initializers.lecun_normal(),
                         bias_init=_zeros, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)

  def __call__(self, images: jax.Array) -> jax.Array:
    x = self.proj(images)
    return x.reshape(x.shape[0], -1, x.shape[-1])


class Attention(nnx.Module):
  """Multi-head self-attention with one fused qkv projection (timm `Attention`)."""

  def __init__(self, dim: int, heads: int, *, attn_drop: float, proj_drop: float, dtype,
               rngs: nnx.Rngs):
    self.heads = heads
    self.scale = (dim // heads) ** -0.5
    self.qkv = _linear(dim, 3 * dim, dtype, rngs)
    self.attn_drop = nnx.Dropout(attn_drop, rngs=rngs)
    self.proj = _linear(dim, dim, dtype, rngs)
    self.proj_drop = nnx.Dropout(proj_drop, rngs=rngs)

  def __call__(self, x: jax.Array, key_mask: jax.Array | None = None) -> jax.Array:
    """x: [B, N, D]; key_mask: bool/float [B, N], 0 removes that token as a key."""
    return self.proj_drop(self.proj(self.attend(self.qkv(x), key_mask)))

  def attend(self, qkv: jax.Array, key_mask: jax.Array | None = None) -> jax.Array:
    """The attention between the qkv and output projections: qkv [B, N, 3D] -> [B, N, D].

    Separate from __call__ so that every way of running the block shares this one core.
    """
    b, n, d3 = qkv.shape
    d = d3 // 3
    # Head-major [3, B, h, N, Dh] before the two matmuls: each matmul then runs over
    # contiguous [N, Dh] blocks per head, which XLA on CPU does faster than einsums over
    # [B, N, h, Dh] that transpose inside every matmul.
    qkv = qkv.reshape(b, n, 3, self.heads, d // self.heads).transpose(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    logits = jnp.einsum('bhqd,bhkd->bhqk', q * self.scale, k)
    if key_mask is not None:
      # A removed key gets exactly zero weight, as if it were not in the sequence: exp of
      # (the most negative float + a logit) underflows to 0. Added rather than selected,
      # which XLA on CPU fuses into the attention matmuls (a select would be a kernel of
      # its own over the [.., N, N] logits). A row with every key removed stays finite
      # (uniform weights).
      bias = jnp.where(key_mask.astype(bool), 0.0, jnp.finfo(logits.dtype).min)
      logits = logits + bias[:, None, None, :].astype(logits.dtype)
    # Softmax normalised after the weighted sum, exp(logits - max) @ v / sum(exp(...)): the
    # same function, but XLA on CPU can then run the whole core as one kernel for a large
    # enough layout (the one compact mode's attention groups are sized for), where dividing
    # the [.., N, N] weights first splits it into several and writes them out in between.
    logits = logits.astype(jnp.float32)
    weights = jnp.exp(logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True)))
    total = jnp.sum(weights, axis=-1, keepdims=True)
    out = jnp.einsum('bhqk,bhkd->bhqd', self.attn_drop(weights.astype(v.dtype)), v)
    out = (out.astype(jnp.float32) / total).astype(v.dtype)
    return out.transpose(0, 2, 1, 3).reshape(b, n, d)


class Mlp(nnx.Module):
  """fc1 -> exact (erf) GELU -> fc2 (timm `Mlp`)."""

  def __init__(self, dim: int, hidden: int, *, drop: float, dtype, rngs: nnx.Rngs):
    self.fc1 = _linear(dim, hidden, dtype, rngs)
    self.fc2 = _linear(hidden, dim, dtype, rngs)
    self.drop = nnx.Dropout(drop, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.drop(gelu(self.fc1(x)))
    return self.drop(self.fc2(x))


class Block(nnx.Module):
  """Pre-LayerNorm transformer block: an attention and an MLP residual branch.

  `mask` (A-ViT's masked training graph) zeroes halted tokens around both LayerNorms and
  removes them as attention keys; `key_mask` alone removes keys only (the padding of token
  removal, whose rows are never read back). The two branches are methods of their own so
  that token removal can run them on different layouts (the attention branch per image,
  the MLP on the running tokens of the whole batch); `__call__` is their composition.
  """

  def __init__(self, dim: int, heads: int, *, mlp_ratio: float, drop: float, attn_drop: float,
               drop_path: float, dtype, rngs: nnx.Rngs):
    self.norm1 = _layer_norm(dim, dtype, rngs)
    self.attn = Attention(dim, heads, attn_drop=attn_drop, proj_drop=drop, dtype=dtype, rngs=rngs)
    self.norm2 = _layer_norm(dim, dtype, rngs)
    self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop, dtype=dtype, rngs=rngs)
    # Stochastic depth: dropping whole samples is dropout broadcast over tokens and width.
    self.drop_path = nnx.Dropout(drop_path, broadcast_dims=(1, 2), rngs=rngs)

  def __call__(self, x: jax.Array, mask: jax.Array | None = None, *,
               key_mask: jax.Array | None = None) -> jax.Array:
    """x: [B, N, D]; mask: float [B, N] (1 active, 0 halted) or None for plain DeiT;
    key_mask: bool/float [B, N], keys to keep when `mask` is None."""
    return self.mlp_branch(self.attention_branch(x, mask, key_mask=key_mask), mask)

  def attention_branch(self, x: jax.Array, mask: jax.Array | None = None, *,
                       key_mask: jax.Array | None = None) -> jax.Array:
    """x + attention(norm1(x)): [B, N, D] -> [B, N, D] (see the class doc for the masks)."""
    with jax.named_scope('attention'):  # a phase of the benchmark's profile
      if mask is None:
        normed = self.norm1(x)
      else:
        m = mask[..., None].astype(x.dtype)
        normed = self.norm1(x * m) * m
      attended = self.attn.attend(self.attn.qkv(normed),
                                  mask if mask is not None else key_mask)
      # A halted token's attended values are dropped by the caller.
      return x + self.drop_path(self.attn.proj_drop(self.attn.proj(attended)))

  def mlp_branch(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """x + mlp(norm2(x)): token-wise, so in eval mode x may be any [..., D] (packed rows)."""
    with jax.named_scope('mlp'):
      if mask is None:
        return x + self.drop_path(self.mlp(self.norm2(x)))
      m = mask[..., None].astype(x.dtype)
      return x + self.drop_path(self.mlp(self.norm2(x * m) * m))


class VisionTransformer(nnx.Module):
  """DeiT without halting: `forward_features` -> final-norm tokens, `forward_head` -> logits.

  `distilled`: DeiT's distillation token after the class token, read by a second head
  (timm's VisionTransformerDistilled): in eval mode the logits are the mean of both heads,
  in training mode the class head's, with head_dist's beside them.
  """

  def __init__(self, *, image_size: int, patch: int, in_chans: int, dim: int, depth: int,
               heads: int, mlp_ratio: float, num_classes: int, drop_rate: float,
               attn_drop_rate: float, drop_path_rate: float, dtype, rngs: nnx.Rngs,
               distilled: bool = False):
    self.image_size = image_size
    self.in_chans = in_chans
    self.dtype = dtype
    self.distilled = distilled
    # Switched by model.train() / model.eval() (nnx sets `deterministic` on every module
    # that has it): which logits a distilled model returns.
    self.deterministic = False
    self.num_patches = (image_size // patch) ** 2
    self.patch_embed = PatchEmbed(patch, in_chans, dim, dtype=dtype, rngs=rngs)
    key = rngs.params()
    self.cls_token = nnx.Param(1e-6 * jax.random.normal(key, (1, 1, dim), jnp.float32))
    if distilled:
      self.dist_token = nnx.Param(_trunc_normal(rngs.params(), (1, 1, dim), jnp.float32))
    self.pos_embed = nnx.Param(_trunc_normal(rngs.params(), (1, self.num_tokens, dim),
                                             jnp.float32))
    self.pos_drop = nnx.Dropout(drop_rate, rngs=rngs)
    # Linearly increasing drop-path rate over depth, as in timm.
    rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
    self.blocks = nnx.List([
        Block(dim, heads, mlp_ratio=mlp_ratio, drop=drop_rate, attn_drop=attn_drop_rate,
              drop_path=rate, dtype=dtype, rngs=rngs) for rate in rates])
    self.norm = _layer_norm(dim, dtype, rngs)
    self.head = _linear(dim, num_classes, dtype, rngs)
    if distilled:
      self.head_dist = _linear(dim, num_classes, dtype, rngs)

  @property
  def depth(self) -> int:
    return len(self.blocks)

  @property
  def num_prefix_tokens(self) -> int:
    """The tokens before the patches: the class token (and the distillation token)."""
    return 2 if self.distilled else 1

  @property
  def num_tokens(self) -> int:
    """N: the special tokens and one token per patch."""
    return self.num_patches + self.num_prefix_tokens

  def check_images(self, images: jax.Array) -> None:
    """Raises ValueError unless images is float [B, S, S, C] for this model."""
    s, c = self.image_size, self.in_chans
    if (images.ndim != 4 or images.shape[1:] != (s, s, c)):
      raise ValueError(f'expected images of shape [B, {s}, {s}, {c}] (batch, height, width, '
                       f'channels; NHWC, normalised), got shape {tuple(images.shape)}')
    if not jnp.issubdtype(images.dtype, jnp.floating):
      raise ValueError(f'expected floating-point images (normalised float32), got dtype '
                       f'{images.dtype}; convert with images.astype(jnp.float32) after '
                       'normalising')

  def embed(self, images: jax.Array) -> jax.Array:
    """Patch embedding + class (and distillation) token + position embedding:
    [B, S, S, C] -> [B, N, D]."""
    with jax.named_scope('embed'):
      x = self.patch_embed(images.astype(self.dtype))
      tokens = [self.cls_token] + ([self.dist_token] if self.distilled else [])
      prefix = [jnp.broadcast_to(t[...].astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
                for t in tokens]
      x = jnp.concatenate([*prefix, x], axis=1) + self.pos_embed[...].astype(x.dtype)
      return self.pos_drop(x)

  def forward_features(self, images: jax.Array) -> jax.Array:
    x = self.embed(images)
    for block in self.blocks:
      x = block(x)
    return self.norm(x)

  def forward_head(self, features: jax.Array) -> jax.Array:
    """Final-norm features [B, N, D] (or of the special tokens only) -> logits float32
    [B, C] (`forward_heads`' first output)."""
    return self.forward_heads(features)[0]

  def forward_heads(self, features: jax.Array) -> tuple[jax.Array, jax.Array | None]:
    """Final-norm features [B, N, D] (or of the special tokens only) -> (logits,
    dist_logits), float32 [B, C]: the class head's logits and None, or for a distilled model
    head_dist's logits beside the mean of both heads (eval mode) or the class head's
    (training mode), as timm's distilled DeiT returns them."""
    with jax.named_scope('head'):
      logits = self.head(features[:, 0]).astype(jnp.float32)
      if not self.distilled:
        return logits, None
      dist_logits = self.head_dist(features[:, 1]).astype(jnp.float32)
      return (logits + dist_logits) / 2 if self.deterministic else logits, dist_logits

  def __call__(self, images: jax.Array) -> jax.Array:
    self.check_images(images)
    return self.forward_head(self.forward_features(images))
