"""tinysr: 4x image and video super-resolution with TinySR, a pruned one-step diffusion model."""

__version__ = "0.1.0"
