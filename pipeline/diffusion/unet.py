"""A time-conditioned U-Net that predicts the noise ``e`` added to ``x_t`` (epsilon-prediction).

The layout follows DDPM (Ho et al., 2020) as re-implemented in score_sde_pytorch: residual blocks
with GroupNorm + SiLU, the time embedding added inside every block, optional self-attention at chosen
resolutions, strided-conv downsampling and nearest-neighbour upsampling. Widths and depths come from
:class:`UNetConfig`, so the same code builds the 0.6M-parameter CPU demo priors and the ~9M-parameter
networks of the paper's 64x64 RGB setting. The layers themselves are plain torch, in
:mod:`pipeline.diffusion.nets` (importable without pydantic), and re-exported here.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipeline.diffusion.nets import AttnBlock, NetConfig, ResBlock, UNet, count_parameters, timestep_embedding

MAX_WIDTH = 1024  # channels of the widest level (the paper's 64x64 RGB networks: 128); bounds what a config builds

__all__ = ["AttnBlock", "NetConfig", "ResBlock", "UNet", "UNetConfig", "check_channels", "count_parameters",
           "timestep_embedding"]


def check_channels(v: int) -> int:
    """Images are grey (1 channel) or RGB (3)."""
    if v not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {v}")
    return v


class UNetConfig(BaseModel):
    """Architecture of the score network; stored next to the weights in every checkpoint.

    Every field is bounded (and floats finite), so that a config, a training recipe's or a downloaded prior's
    ``config.json``, cannot ask for a network that does not fit in memory before its weights are compared."""

    model_config = ConfigDict(extra="forbid")

    image_size: int = Field(32, description="square input size, a power of two in [16, 256]")
    channels: int = Field(1, description="1 (grayscale) or 3 (RGB)")
    base_channels: int = Field(32, ge=8, le=MAX_WIDTH)
    channel_mults: list[Annotated[int, Field(ge=1, le=16)]] = Field(default_factory=lambda: [1, 2, 2], max_length=8)
    num_res_blocks: int = Field(1, ge=1, le=16)
    attention_resolutions: list[Annotated[int, Field(ge=1, le=256)]] = Field(default_factory=list, max_length=8)
    dropout: float = Field(0.0, ge=0.0, lt=1.0, allow_inf_nan=False)
    time_scale: float = Field(1000.0, gt=0, le=1e6, allow_inf_nan=False,
                              description="t is multiplied by this before the embedding")

    @field_validator("image_size")
    @classmethod
    def _power_of_two(cls, v: int) -> int:
        if v < 16 or v > 256 or v & (v - 1):
            raise ValueError(f"image_size must be a power of two from 16 to 256, got {v}")
        return v

    _channels = field_validator("channels")(classmethod(lambda cls, v: check_channels(v)))

    @model_validator(mode="after")
    def _depth_fits(self) -> UNetConfig:
        if not self.channel_mults:
            raise ValueError("channel_mults must name at least one level")
        smallest = self.image_size >> (len(self.channel_mults) - 1)
        if smallest < 4:
            raise ValueError(
                f"{len(self.channel_mults)} levels downsample {self.image_size}px to {smallest}px; "
                "use fewer channel_mults")
        widest = self.base_channels * max(self.channel_mults)
        if widest > MAX_WIDTH:
            raise ValueError(f"base_channels x the largest of channel_mults is {widest} channels; at most {MAX_WIDTH}")
        return self
