"""The score network in plain torch (no pydantic): the time-conditioned U-Net and its settings.

:class:`NetConfig` is the one declaration of the architecture's settings (a frozen dataclass: types,
defaults, bounds); :mod:`pipeline.diffusion.unet` builds the validated ``UNetConfig`` from it and
re-exports these classes. This module exists so that code which must run with only torch and numpy
installed (``pipeline/bench/gpu.py`` on a bare GPU machine) builds exactly the product's network.

The layout follows DDPM (Ho et al., 2020) as re-implemented in score_sde_pytorch: residual blocks
with GroupNorm + SiLU, the time embedding added inside every block, optional self-attention at chosen
resolutions, strided-conv downsampling and nearest-neighbour upsampling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from pipeline.settings import check_fields

MAX_WIDTH = 1024  # channels of the widest level (the paper's 64x64 RGB networks: 128); bounds what a config builds


def _power_of_two(v: int) -> int:
    if v < 16 or v > 256 or v & (v - 1):
        raise ValueError(f"image_size must be a power of two from 16 to 256, got {v}")
    return v


def check_channels(v: int) -> int:
    """Images are grey (1 channel) or RGB (3); a noise prior of the composited overlay has 4 (RGBA: colour and
    coverage, :class:`pipeline.forward.Composite`)."""
    if v not in (1, 3, 4):
        raise ValueError(f"channels must be 1, 3 or 4 (an RGBA noise layer), got {v}")
    return v


@dataclass(frozen=True)
class NetConfig:
    """Architecture of the score network, declared once; stored next to the weights in every checkpoint.

    Every field is bounded (and floats finite), so that a config, a training recipe's or a downloaded prior's
    ``config.json``, cannot ask for a network that does not fit in memory before its weights are compared.
    The validated form for config files and checkpoints, :class:`pipeline.diffusion.unet.UNetConfig`, is
    built from this declaration (:mod:`pipeline.settings`)."""

    image_size: int = field(default=32, metadata={"check": _power_of_two,
                                                  "description": "square input size, a power of two in [16, 256]"})
    channels: int = field(default=1, metadata={"check": check_channels, "description": "1 (grayscale) or 3 (RGB)"})
    base_channels: int = field(default=32, metadata={"ge": 8, "le": MAX_WIDTH,
                                                      "description": "channels of the first level"})
    channel_mults: list[int] = field(default_factory=lambda: [1, 2, 2],
                                     metadata={"items": {"ge": 1, "le": 16}, "max_length": 8,
                                               "description": "each level's width as a multiple of base_channels; "
                                                              "one level per entry, halving the resolution"})
    num_res_blocks: int = field(default=1, metadata={"ge": 1, "le": 16,
                                                     "description": "residual blocks per level"})
    attention_resolutions: list[int] = field(default_factory=list,
                                             metadata={"items": {"ge": 1, "le": 256}, "max_length": 8,
                                                       "description": "resolutions (in pixels) with self-attention"})
    dropout: float = field(default=0.0, metadata={"ge": 0.0, "lt": 1.0, "allow_inf_nan": False,
                                                     "description": "dropout probability in the residual blocks"})
    time_scale: float = field(default=1000.0, metadata={"gt": 0, "le": 1e6, "allow_inf_nan": False,
                                                        "description": "t is multiplied by this before the embedding"})

    def __post_init__(self) -> None:
        check_fields(self)
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


def _groups(ch: int) -> int:
    for g in (8, 4, 2, 1):
        if ch % g == 0:
            return g
    return 1


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of (scaled) continuous times, as in the Transformer / DDPM."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, temb: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(cin), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.temb = nn.Linear(temb, cout)
        self.norm2 = nn.GroupNorm(_groups(cout), cout)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.norm = nn.GroupNorm(_groups(ch), ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class UNet(nn.Module):
    """``forward(x_t, t) -> e_theta`` with ``x_t`` of shape (B, C, S, S) and ``t`` of shape (B,)."""

    def __init__(self, config: NetConfig | Any):
        super().__init__()
        if not isinstance(config, NetConfig):
            config = config.settings()  # a validated UNetConfig: the plain NetConfig it describes
        self.config = config
        ch = config.base_channels
        temb = 4 * ch
        self.temb = nn.Sequential(nn.Linear(ch, temb), nn.SiLU(), nn.Linear(temb, temb))
        self.conv_in = nn.Conv2d(config.channels, ch, 3, padding=1)

        self.down = nn.ModuleList()
        skips = [ch]
        cur, res = ch, config.image_size
        for level, mult in enumerate(config.channel_mults):
            for _ in range(config.num_res_blocks):
                blocks = nn.ModuleList([ResBlock(cur, ch * mult, temb, config.dropout)])
                cur = ch * mult
                if res in config.attention_resolutions:
                    blocks.append(AttnBlock(cur))
                self.down.append(blocks)
                skips.append(cur)
            if level != len(config.channel_mults) - 1:
                self.down.append(nn.ModuleList([nn.Conv2d(cur, cur, 3, stride=2, padding=1)]))
                skips.append(cur)
                res //= 2

        self.mid = nn.ModuleList([ResBlock(cur, cur, temb, config.dropout), AttnBlock(cur),
                                  ResBlock(cur, cur, temb, config.dropout)])
        if res not in config.attention_resolutions:
            self.mid = nn.ModuleList([self.mid[0], self.mid[2]])

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(config.channel_mults))):
            for _ in range(config.num_res_blocks + 1):
                blocks = nn.ModuleList([ResBlock(cur + skips.pop(), ch * mult, temb, config.dropout)])
                cur = ch * mult
                if res in config.attention_resolutions:
                    blocks.append(AttnBlock(cur))
                self.up.append(blocks)
            if level != 0:
                self.up.append(nn.ModuleList([nn.Upsample(scale_factor=2, mode="nearest"),
                                              nn.Conv2d(cur, cur, 3, padding=1)]))
                res *= 2
        self.norm_out = nn.GroupNorm(_groups(cur), cur)
        self.conv_out = nn.Conv2d(cur, config.channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        emb = self.temb(timestep_embedding(t * self.config.time_scale, self.config.base_channels).to(x.dtype))
        h = self.conv_in(x)
        hs = [h]
        for blocks in self.down:
            h = _run(blocks, h, emb)
            hs.append(h)
        h = _run(self.mid, h, emb)
        for blocks in self.up:
            if isinstance(blocks[0], ResBlock):
                h = torch.cat([h, hs.pop()], dim=1)
            h = _run(blocks, h, emb)
        return self.conv_out(F.silu(self.norm_out(h)))


def _run(blocks: nn.ModuleList, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    for block in blocks:
        h = block(h, emb) if isinstance(block, ResBlock) else block(h)
    return h


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
