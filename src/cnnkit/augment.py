"""Data augmentation: a fresh random transform of every training image, every epoch: an affine transform
(`random_affine`), or a random crop of the image padded at its border (`random_crop`), each with an
optional left-right mirror.

Transforms are drawn batch by batch from a generator seeded by (seed, epoch) alone, so a run and its
resume see the same images, and applied to the whole batch at once on its device (one `affine_grid`
and one `grid_sample`), not image by image. The random draws never touch torch's global generator:
dropout masks stay what they are without augmentation.
"""

import numpy as np
import torch
import torch.nn.functional as F

from cnnkit.recipes import TrainConfig

_NO_AFFINE = TrainConfig(rotate=0, shift=0, scale_low=1, scale_high=1, shear=0)


def epoch_generator(seed: int, epoch: int, rank: int = 0, device="cpu") -> torch.Generator:
    """The generator that draws epoch `epoch`'s transforms: a function of (seed, epoch) alone, and of
    the rank in a distributed run (rank 0's is the single process's)."""
    entropy = [seed, epoch, 0xA11E] + ([rank] if rank else [])
    state = np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> 1
    return torch.Generator(device=device).manual_seed(int(state))


def augment(images: torch.Tensor, config, generator: torch.Generator) -> torch.Tensor:
    """The transform `config.augment` names ("crop" or "affine"; "none": flips only, if `config.flip`)."""
    if config.augment == "crop":
        return random_crop(images, config, generator)
    return random_affine(images, config, generator)


def random_crop(images: torch.Tensor, config, generator: torch.Generator) -> torch.Tensor:
    """A randomly cropped copy of `images` (N, C, H, W): each image padded by `config.pad` pixels on every
    side (mirrored, so no black frame is learned) and cut back to H x W at a random offset, then mirrored
    left-right with probability 1/2 where `config.flip`. Pixels move whole: no interpolation."""
    n, _, height, width = images.shape
    pad = min(config.pad, height - 1, width - 1)  # reflection needs pad < size
    draw = torch.randint(0, 2 * pad + 1, (n, 2), generator=generator, device=generator.device).to(
        images.device
    )
    mirror = torch.rand(n, generator=generator, device=generator.device).to(images.device) < 0.5
    padded = F.pad(images, (pad, pad, pad, pad), mode="reflect") if pad > 0 else images
    rows = draw[:, 0, None] + torch.arange(height, device=images.device)  # (N, H)
    cols = draw[:, 1, None] + torch.arange(width, device=images.device)  # (N, W)
    if config.flip:
        cols = torch.where(mirror[:, None], cols.flip(1), cols)
    batch = torch.arange(n, device=images.device)[:, None, None]
    # (N, H, W, C) from advanced indexing on dims 0, 2, 3 -> back to (N, C, H, W)
    return (
        padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]
        .permute(0, 3, 1, 2)
        .contiguous(
            memory_format=torch.channels_last
            if images.is_contiguous(memory_format=torch.channels_last)
            else torch.contiguous_format
        )
    )


def random_affine(images: torch.Tensor, config, generator: torch.Generator) -> torch.Tensor:
    """A randomly transformed copy of `images` (N, C, H, W), one transform per image.

    `config` is a TrainConfig: its augment, rotate, shift, scale_low, scale_high, shear and flip
    (see there) say which transforms and how strong; with augment "none" only `flip` applies.

    Pixels that come from outside the image repeat its border (the background, for digits and most
    photos), so the standardized values stay in the range of real data. Bilinear interpolation.
    """
    n, _, height, width = images.shape
    draw = torch.rand(n, 6, generator=generator, device=generator.device, dtype=torch.float32).to(
        images.device
    )
    centred = 2 * draw - 1  # uniform in [-1, 1)
    ranges = config if config.augment == "affine" else _NO_AFFINE
    angle = torch.deg2rad(ranges.rotate * centred[:, 0])
    shear = torch.deg2rad(ranges.shear * centred[:, 1])
    scale = ranges.scale_low + (ranges.scale_high - ranges.scale_low) * draw[:, 2]
    shift_x, shift_y = ranges.shift * centred[:, 3], ranges.shift * centred[:, 4]
    mirror = torch.where((draw[:, 5] < 0.5) & config.flip, -1.0, 1.0)

    # The transform in pixel units, about the image's centre: rotate(angle) @ shear_x(shear) @ scale,
    # after an optional mirror. grid_sample needs its inverse (where each output pixel comes from).
    cos, sin, tan = torch.cos(angle), torch.sin(angle), torch.tan(shear)
    forward = torch.stack(
        [
            torch.stack([cos * scale * mirror, (cos * tan - sin) * scale], dim=1),
            torch.stack([sin * scale * mirror, (sin * tan + cos) * scale], dim=1),
        ],
        dim=1,
    )
    inverse = torch.linalg.inv(forward)
    shift = torch.stack([shift_x, shift_y], dim=1)[:, :, None]
    # normalized coordinates ([-1, 1] across each side) -> pixels: x * (W / 2), y * (H / 2)
    half = torch.tensor([width / 2, height / 2], device=images.device)
    theta = torch.empty(n, 2, 3, device=images.device)
    theta[:, :, :2] = inverse * half[None, None, :] / half[None, :, None]
    theta[:, :, 2:] = -(inverse @ shift) / half[None, :, None]
    grid = F.affine_grid(theta, (n, 1, height, width), align_corners=False)
    return F.grid_sample(
        images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False
    ).to(images.dtype)
