"""cnnkit.augment: random affine transforms, drawn from (seed, epoch), applied to a whole batch."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from cnnkit.augment import epoch_generator, random_affine
from cnnkit.recipes import TrainConfig

NONE = TrainConfig(augment="affine", rotate=0, shift=0, scale_low=1, scale_high=1, shear=0)
AFFINE = TrainConfig(augment="affine")


def blobs(count: int, rng) -> np.ndarray:
    """A 28x28 image with `count` separate 4x4 squares, at random places in the middle 16x16."""
    image = np.zeros((28, 28), np.float32)
    cells = rng.choice(9, size=count, replace=False)
    for cell in cells:
        row, col = 6 + 6 * (cell // 3), 6 + 6 * (cell % 3)
        image[row : row + 4, col : col + 4] = 1.0
    return image


def test_the_same_seed_and_epoch_give_the_same_images_and_another_epoch_others():
    images = torch.rand(16, 1, 28, 28)
    first = random_affine(images, AFFINE, epoch_generator(7, 3))
    again = random_affine(images, AFFINE, epoch_generator(7, 3))
    other = random_affine(images, AFFINE, epoch_generator(7, 4))
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)
    assert not torch.allclose(first, images)


def test_zero_ranges_leave_images_as_they_are():
    images = torch.rand(4, 3, 20, 17)
    np.testing.assert_allclose(random_affine(images, NONE, epoch_generator(0, 1)), images, atol=1e-5)


def test_a_shift_moves_the_image_by_at_most_that_many_pixels():
    image = torch.zeros(64, 1, 28, 28)
    image[:, :, 14, 14] = 1.0
    moved = random_affine(
        image,
        TrainConfig(augment="affine", rotate=0, shift=2.5, scale_low=1, scale_high=1, shear=0),
        epoch_generator(1, 1),
    )
    rows, cols = np.nonzero(moved.numpy()[:, 0].sum(axis=0) > 1e-6)
    assert rows.min() >= 14 - 3 and rows.max() <= 14 + 3 and cols.min() >= 11 and cols.max() <= 17
    assert len(set(rows)) > 3  # and it does move them, to several places


def test_flip_mirrors_about_half_of_the_images_and_only_when_asked():
    image = torch.zeros(200, 1, 8, 8)
    image[:, :, :, :2] = 1.0  # a bar on the left
    flipped = random_affine(image, TrainConfig(flip=True), epoch_generator(2, 1))
    right = flipped[:, 0, :, 6:].mean(dim=(1, 2)) > 0.9
    assert 70 < int(right.sum()) < 130
    assert torch.equal(flipped[right], torch.flip(image[right], dims=[3]))
    assert not (random_affine(image, NONE, epoch_generator(2, 1))[:, 0, :, 6:] > 0.5).any()


def test_the_default_transform_keeps_a_shape_whose_class_is_how_many_squares_it_has():
    rng = np.random.default_rng(0)
    counts = rng.integers(1, 4, size=300)
    images = torch.from_numpy(np.stack([blobs(c, rng) for c in counts]))[:, None]
    out = random_affine(images, AFFINE, epoch_generator(3, 1)).numpy()[:, 0]
    found = [ndimage.label(image > 0.5)[1] for image in out]
    np.testing.assert_array_equal(found, counts)


@pytest.mark.parametrize(
    ("ranges", "message"),
    [
        (dict(rotate=-1), "rotate"),
        (dict(rotate=200), "rotate"),
        (dict(shear=85), "shear"),
        (dict(scale_low=1.2, scale_high=1.1), "scale"),
        (dict(scale_low=0), "scale"),
        (dict(shift=float("nan")), "shift"),
    ],
)
def test_impossible_ranges_are_refused_naming_the_range(ranges, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(augment="affine", **ranges)
