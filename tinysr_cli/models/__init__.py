"""Pure ``nn.Module``s: no files, no devices. Weights handling lives in ``tinysr_cli.weights``."""

from tinysr_cli.models.tinysr import TinySR, TinySRConfig
from tinysr_cli.models.transformer import ModulatedTransformer, TinySRTransformer, TransformerConfig, fold_modulation
from tinysr_cli.models.vae import TinyVAE, VAEConfig

__all__ = [
    "ModulatedTransformer",
    "TinySR",
    "TinySRConfig",
    "TinySRTransformer",
    "TinyVAE",
    "TransformerConfig",
    "VAEConfig",
    "fold_modulation",
]
