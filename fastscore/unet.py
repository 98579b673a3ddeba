"""A diffusers ``UNet2DModel`` as a fastscore eps-network: ``DiffusersUNet(x_t, t) -> eps_hat``.

The adapter returns the UNet's ``.sample`` (diffusers' ``UNet2DModel`` with ``prediction_type`` eps is
an eps-model: ``forward(sample, timestep).sample``), and carries what fastscore's trainer, sampler and
ensembles read: ``image_shape`` (C, H, W) and ``config`` (a ``UNetConfig``, whose ``T`` sets the
default schedule length). ``DiffusersUNet(UNetConfig(...))`` builds the small configuration used by
the theory study (``fastscore.study.theory``): ``levels`` resolution levels of ``layers_per_block``
ResNet blocks each, widths ``width * 2**level``, GroupNorm with ``norm_groups`` groups (dividing every
width), and with ``attention`` self-attention blocks (``AttnDownBlock2D`` / ``AttnUpBlock2D``) at every
level but the first and in the middle block (diffusers' default there), otherwise ``DownBlock2D`` /
``UpBlock2D`` and a middle block without attention (``add_attention=False``): no attention anywhere. Unlike ``ScoreNet``'s CNN, a UNet's
GroupNorm pools over positions and its downsampling widens the receptive field: it is a network
researchers use, not a purely local one.

diffusers is an optional extra: ``pip install "fastscore[unet]"``.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn as nn

from . import _validate

EXTRA = 'diffusers is not installed: pip install "fastscore[unet]" (or pip install diffusers) to use a UNet2DModel'


def _diffusers() -> Any:
    try:
        import diffusers
    except ImportError as e:
        raise ImportError(EXTRA) from e
    return diffusers


def norm_groups_for(width: int) -> int:
    """The largest of 32, 16, 8, 4, 2, 1 that divides ``width`` (GroupNorm's groups must divide each width;
    widths ``width * 2**level`` are then all divisible by it)."""
    _validate.positive_int("width", width)
    return next(g for g in (32, 16, 8, 4, 2, 1) if width % g == 0)


@dataclass(frozen=True)
class UNetConfig:
    """A small ``UNet2DModel`` (JSON-serialisable): images ``channels`` x ``image_size`` x ``image_size``;
    ``levels`` resolution levels (``image_size`` divisible by ``2**(levels - 1)``) of widths
    ``width * 2**level``; ``layers_per_block`` ResNet blocks per level; ``attention``: attention blocks at
    every level but the first and in the middle block (``attention_head_dim`` channels per head); ``norm_groups``: GroupNorm
    groups (None: ``norm_groups_for(width)``); ``T``: the diffusion length the network is trained for."""
    channels: int = 1
    image_size: int = 8
    width: int = 32
    levels: int = 2
    layers_per_block: int = 1
    attention: bool = False
    attention_head_dim: int = 8
    norm_groups: int | None = None
    T: int = 1000

    def __post_init__(self) -> None:
        for name in ("channels", "image_size", "width", "levels", "layers_per_block", "attention_head_dim", "T"):
            _validate.positive_int(name, getattr(self, name))
        if not isinstance(self.attention, bool):
            raise TypeError(f"attention must be a bool, got {type(self.attention).__name__}")
        if self.image_size % 2 ** (self.levels - 1):
            raise ValueError(f"image_size must be divisible by 2**(levels - 1) = {2 ** (self.levels - 1)}, "
                             f"got image_size={self.image_size}, levels={self.levels}")
        if self.norm_groups is None:
            object.__setattr__(self, "norm_groups", norm_groups_for(self.width))
        _validate.positive_int("norm_groups", self.norm_groups)
        assert self.norm_groups is not None
        if self.width % self.norm_groups:
            raise ValueError(f"norm_groups must divide width: width={self.width}, norm_groups={self.norm_groups}")

    @property
    def widths(self) -> tuple[int, ...]:
        """The channel width of each level."""
        return tuple(self.width * 2 ** i for i in range(self.levels))

    def unet_kwargs(self) -> dict[str, Any]:
        """The ``UNet2DModel`` keyword arguments of this configuration."""
        down = ["DownBlock2D"] + ["AttnDownBlock2D" if self.attention else "DownBlock2D"] * (self.levels - 1)
        up = ["AttnUpBlock2D" if self.attention else "UpBlock2D"] * (self.levels - 1) + ["UpBlock2D"]
        return dict(sample_size=self.image_size, in_channels=self.channels, out_channels=self.channels,
                    block_out_channels=self.widths, layers_per_block=self.layers_per_block,
                    down_block_types=tuple(down), up_block_types=tuple(up), norm_num_groups=self.norm_groups,
                    attention_head_dim=self.attention_head_dim, add_attention=self.attention)

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))


class DiffusersUNet(nn.Module):
    """``forward(x_t (B, C, H, W), t (B,) int) -> eps_hat``: a diffusers ``UNet2DModel``'s ``.sample``.

    ``config``: a ``UNetConfig`` (the UNet is built from it), or ``unet``: an existing ``UNet2DModel``
    (square images; ``config`` then describes its shape only and ``T`` defaults to 1000)."""

    def __init__(self, config: UNetConfig | None = None, *, unet: nn.Module | None = None) -> None:
        super().__init__()
        diffusers = _diffusers()
        if (config is None) == (unet is None):
            raise ValueError("give exactly one of config (a UNetConfig) and unet (a diffusers UNet2DModel)")
        if unet is None:
            if not isinstance(config, UNetConfig):
                raise TypeError(f"config must be a UNetConfig, got {type(config).__name__}")
            unet = diffusers.UNet2DModel(**config.unet_kwargs())
        else:
            if not isinstance(unet, diffusers.UNet2DModel):
                raise TypeError(f"unet must be a diffusers.UNet2DModel, got {type(unet).__name__}")
            c = unet.config
            size = c.sample_size if isinstance(c.sample_size, int) else c.sample_size[0]
            if c.in_channels != c.out_channels:
                raise ValueError(f"unet must map its input channels to as many outputs (an eps-model), got "
                                 f"in_channels={c.in_channels}, out_channels={c.out_channels}")
            config = UNetConfig(channels=c.in_channels, image_size=size, width=c.block_out_channels[0],
                                levels=len(c.block_out_channels), layers_per_block=c.layers_per_block,
                                attention=bool(c.get("add_attention", True)) or any(
                                    "Attn" in b for b in (*c.down_block_types, *c.up_block_types)),
                                norm_groups=c.norm_num_groups)
        self.unet = unet
        self.config = config
        self.image_shape = (config.channels, config.image_size, config.image_size)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """eps_hat for noisy images ``x`` at integer timesteps ``t`` (B,) (a scalar is broadcast)."""
        return self.unet(x, t).sample
