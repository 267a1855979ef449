"""Domain discriminators, one per modality (docs/method.md section 4)."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp


class Discriminator(nn.Module):
  """MLP `[B, E] -> [B]` logits (source = positive). ReLU between hidden layers.

  `init_scheme="reference"` draws weights and biases from N(0, init_std) as the reference does;
  `init_scheme="default"` uses lecun-normal weights and zero biases.
  """

  hidden: Sequence[int] = (512, 64)
  init_scheme: str = "reference"
  init_std: float = 0.01

  @nn.compact
  def __call__(self, x):
    if self.init_scheme == "reference":
      kinit = nn.initializers.normal(self.init_std)
      binit = nn.initializers.normal(self.init_std)
    else:
      kinit, binit = nn.initializers.lecun_normal(), nn.initializers.zeros
    for i, width in enumerate(self.hidden):
      x = nn.relu(nn.Dense(width, kernel_init=kinit, bias_init=binit, name=f"hidden_{i}")(x))
    return nn.Dense(1, kernel_init=kinit, bias_init=binit, name="out")(x)[..., 0]


class Discriminators(nn.Module):
  """The image and caption discriminators: `(img [B,E], cap [B,E]) -> (z_img, z_cap)`."""

  hidden: Sequence[int] = (512, 64)
  init_scheme: str = "reference"
  init_std: float = 0.01

  @nn.compact
  def __call__(self, pooled_images, pooled_captions):
    z_img = Discriminator(self.hidden, self.init_scheme, self.init_std, name="image")(pooled_images)
    z_cap = Discriminator(self.hidden, self.init_scheme, self.init_std, name="caption")(pooled_captions)
    return z_img.astype(jnp.float32), z_cap.astype(jnp.float32)
