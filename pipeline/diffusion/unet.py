"""A time-conditioned U-Net that predicts the noise ``e`` added to ``x_t`` (epsilon-prediction).

The layout follows DDPM (Ho et al., 2020) as re-implemented in score_sde_pytorch: residual blocks with
GroupNorm + SiLU, the time embedding added inside every block, optional self-attention at chosen resolutions,
strided-conv downsampling and nearest-neighbour upsampling. Widths and depths come from :class:`NetConfig`
(validated as :data:`UNetConfig` in config files and checkpoints), so the same code builds the 0.6M-parameter
CPU demo priors and the ~9M-parameter networks of the paper's 64x64 RGB setting. The layers themselves are
plain torch, in :mod:`pipeline.diffusion.nets` (importable without pydantic), and re-exported here. """

from __future__ import annotations

from pipeline.diffusion.nets import (
    MAX_WIDTH,
    AttnBlock,
    NetConfig,
    ResBlock,
    UNet,
    check_channels,
    count_parameters,
    timestep_embedding,
)
from pipeline.settings import pydantic_model

__all__ = ["MAX_WIDTH", "AttnBlock", "NetConfig", "ResBlock", "UNet", "UNetConfig", "check_channels",
           "count_parameters", "timestep_embedding"]


UNetConfig = pydantic_model(NetConfig, "UNetConfig", __name__)
"""The validated :class:`NetConfig` (config files, checkpoints' ``config.json``): the same fields, defaults
and bounds, unknown keys refused; ``settings()`` returns the :class:`NetConfig`."""
