"""Weight conversion between PyTorch (DeiT / timm / Hugging Face / A-ViT `.pth` files) and
avit_jax checkpoints, through one name table (weights.py); file formats in torch_io.py.

  python -m avit_jax.convert --src deit_tiny_patch16_224-a1311bcf.pth --config configs/tiny.py \\
      --out ckpt/deit_tiny                       # then --config.init_from=ckpt/deit_tiny
  python -m avit_jax.convert --to torch --src ckpt/deit_tiny --out deit_tiny.safetensors
"""

from avit_jax.convert.weights import (ConvertError, convert_file, export_file, from_torch,
                                      hf_to_timm, resample_pos_embed, to_torch_state_dict,
                                      torch_to_params)

__all__ = ['ConvertError', 'convert_file', 'export_file', 'from_torch', 'hf_to_timm',
           'resample_pos_embed', 'to_torch_state_dict', 'torch_to_params']
