"""cnnkit.images: reading image files exactly, and preparing a drawn digit the way MNIST's were made."""

import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw, ImageOps
from scipy import ndimage

from cnnkit.errors import FileError
from cnnkit.images import (
    image_shape,
    load_digit,
    prepare_digit,
    prepare_for_model,
    prepare_object,
    read_image,
    read_image_for_model,
    resize_image,
)

# --- read_image ----------------------------------------------------------------------------------------


def pixels(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


@pytest.mark.parametrize(
    ("mode", "shape"),
    [("L", (13, 17)), ("RGB", (13, 17, 3)), ("RGBA", (13, 17, 4)), ("RGBA", (252, 221, 4))],
)
def test_read_image_returns_png_pixels_exactly_as_h_w_c(tmp_path, mode, shape):
    array = pixels(shape)
    path = tmp_path / "image.png"
    Image.fromarray(array, mode=mode).save(path)
    out = read_image(path)
    assert out.dtype == np.uint8
    assert out.shape == (*shape[:2], 1 if mode == "L" else shape[2])
    assert np.array_equal(out, array.reshape(out.shape))


def test_read_image_expands_a_palette_png_to_rgb(tmp_path):
    palette_image = Image.fromarray(pixels((9, 11, 3))).quantize(colors=16)
    path = tmp_path / "palette.png"
    palette_image.save(path)
    expected = np.asarray(palette_image.convert("RGB"))
    out = read_image(path)
    assert out.shape == (9, 11, 3)
    assert np.array_equal(out, expected)


def test_read_image_gives_rgba_for_a_palette_png_with_transparency(tmp_path):
    palette_image = Image.fromarray(pixels((9, 11, 3))).quantize(colors=8)
    palette_image.info["transparency"] = 0
    path = tmp_path / "palette-alpha.png"
    palette_image.save(path, transparency=0)
    out = read_image(path)
    assert out.shape == (9, 11, 4)
    index = np.asarray(palette_image)
    assert np.array_equal(out[..., 3], np.where(index == 0, 0, 255))
    assert np.array_equal(out[..., :3], np.asarray(palette_image.convert("RGB")))


@pytest.mark.parametrize(("mode", "channels"), [("L", 1), ("RGB", 3)])
def test_read_image_decodes_jpeg_as_pillow_does(tmp_path, mode, channels):
    shape = (20, 30) if mode == "L" else (20, 30, 3)
    path = tmp_path / "photo.jpg"
    Image.fromarray(pixels(shape), mode=mode).save(path, quality=90)
    out = read_image(path)
    assert out.shape == (20, 30, channels)
    with Image.open(path) as img:
        assert np.array_equal(out, np.asarray(img).reshape(out.shape))


def test_read_image_reports_a_missing_file(tmp_path):
    path = tmp_path / "nope.png"
    with pytest.raises(FileError, match=re.escape(str(path)) + ": does not exist"):
        read_image(path)


def test_read_image_reports_a_directory(tmp_path):
    with pytest.raises(FileError, match=re.escape(str(tmp_path)) + ": is a directory"):
        read_image(tmp_path)


def test_read_image_reports_a_file_that_is_not_an_image(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is not a PNG\n")
    with pytest.raises(FileError, match=re.escape(str(path)) + ": not an image file"):
        read_image(path)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_read_image_reports_a_truncated_file(tmp_path, fmt):
    whole = tmp_path / f"whole.{fmt.lower()}"
    Image.fromarray(pixels((64, 64, 3))).save(whole, fmt)
    data = whole.read_bytes()
    half = tmp_path / f"half.{fmt.lower()}"
    half.write_bytes(data[: len(data) // 2])
    with pytest.raises(FileError, match=re.escape(str(half)) + ": cannot read image .*truncated"):
        read_image(half)


# --- prepare_digit -------------------------------------------------------------------------------------


def draw_digit(shape="0", canvas=(120, 100), box=(30, 20, 70, 100), width=9, ink=0, paper=255, mode="L"):
    """A Pillow drawing of a digit in `box` = (left, top, right, bottom), as read_image would return it."""
    img = Image.new(mode, canvas[::-1], paper)
    pen = ImageDraw.Draw(img)
    left, top, right, bottom = box
    if shape == "0":
        pen.ellipse(box, outline=ink, width=width)
    elif shape == "1":
        middle = (left + right) // 2
        pen.line([(middle, top), (middle, bottom)], fill=ink, width=width)
    elif shape == "7":
        pen.line([(left, top), (right, top), (left + (right - left) // 3, bottom)], fill=ink, width=width)
    array = np.asarray(img)
    return array[..., None] if array.ndim == 2 else array


def center_of_mass(digit):
    return np.array(ndimage.center_of_mass(digit))


def check_mnist_like(digit, centered_box=True):
    """The properties every prepared digit must have, as in MNIST."""
    assert digit.shape == (28, 28) and digit.dtype == np.float32
    assert digit.min() >= 0 and digit.max() == pytest.approx(255, abs=0.5)
    assert np.all(np.abs(center_of_mass(digit) - 14) <= 1.0)
    rows, cols = np.nonzero(digit > 0)
    height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    assert max(height, width) in (20, 21)  # the long side fills the 20x20 box (+1 for resampling's halo)
    if centered_box:
        assert rows.min() >= 4 - 1 and rows.max() <= 23 + 1 and cols.min() >= 4 - 1 and cols.max() <= 23 + 1
    # the background is black: the frame outside the digit's box holds no ink
    outside = np.ones_like(digit, dtype=bool)
    outside[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1] = False
    assert np.all(digit[outside] == 0)


@pytest.mark.parametrize("shape", ["0", "1", "7"])
def test_prepare_digit_makes_a_centered_mnist_digit(shape):
    digit = prepare_digit(draw_digit(shape))
    check_mnist_like(digit, centered_box=shape != "7")


def test_prepare_digit_inverts_dark_ink_on_light_paper_to_light_on_dark():
    dark_on_light = prepare_digit(draw_digit("7", ink=0, paper=255))
    light_on_dark = prepare_digit(draw_digit("7", ink=255, paper=0))
    assert dark_on_light.max() == 255 and dark_on_light[0, 0] == 0
    np.testing.assert_allclose(dark_on_light, light_on_dark, atol=1e-3)


def test_prepare_digit_handles_colored_ink_and_paper_in_either_polarity():
    blue_on_cream = prepare_digit(draw_digit("0", ink=(20, 40, 160), paper=(250, 240, 200), mode="RGB"))
    cream_on_blue = prepare_digit(draw_digit("0", ink=(250, 240, 200), paper=(20, 40, 160), mode="RGB"))
    check_mnist_like(blue_on_cream)
    np.testing.assert_allclose(blue_on_cream, cream_on_blue, atol=1e-2)
    np.testing.assert_allclose(blue_on_cream, prepare_digit(draw_digit("0")), atol=1e-2)


@pytest.mark.parametrize("transparent", [(0, 0, 0, 0), (255, 255, 255, 0), (0, 255, 0, 0)])
@pytest.mark.parametrize("ink", [(0, 0, 0, 255), (255, 255, 255, 255)])
def test_prepare_digit_treats_a_transparent_canvas_as_background(transparent, ink):
    # a black digit on transparent black (0, 0, 0, 0) is all black once alpha is dropped: it must still work
    drawn = draw_digit("1", ink=ink, paper=transparent, mode="RGBA")
    reference = prepare_digit(draw_digit("1", ink=0, paper=255))
    np.testing.assert_allclose(prepare_digit(drawn), reference, atol=1e-2)


def test_prepare_digit_keeps_the_aspect_ratio():
    wide_zero = prepare_digit(draw_digit("0", canvas=(100, 200), box=(20, 30, 180, 70), width=6))
    rows, cols = np.nonzero(wide_zero)
    assert cols.max() - cols.min() + 1 in (20, 21)
    assert 4 <= rows.max() - rows.min() + 1 <= 7  # 40 x 160 scaled to 5 x 20, plus resampling's halo


def test_prepare_digit_survives_jpeg_noise(tmp_path):
    path = tmp_path / "digit.jpg"
    Image.fromarray(draw_digit("7")[..., 0]).save(path, quality=40)
    digit = load_digit(path)
    check_mnist_like(digit, centered_box=False)
    # JPEG ringing can widen the crop by a pixel, which moves edges; on average the digits agree closely
    assert np.abs(digit - prepare_digit(draw_digit("7"))).mean() < 12


def test_prepare_digit_ignores_faint_noise_and_specks():
    clean = draw_digit("1", canvas=(200, 200), box=(80, 40, 120, 160))
    noise = np.random.default_rng(5).integers(-15, 16, clean.shape)
    noisy = np.clip(clean.astype(int) + noise, 0, 255)
    noisy[5:9, 5:9] = 220  # a faint smudge in the corner, 14% of the ink's contrast
    digit = prepare_digit(noisy.astype(np.uint8))
    check_mnist_like(digit)
    assert np.abs(digit - prepare_digit(clean)).mean() < 5


def test_load_digit_reads_and_prepares_a_file(tmp_path):
    path = tmp_path / "seven.png"
    Image.fromarray(draw_digit("7", mode="RGBA", ink=(0, 0, 0, 255), paper=(0, 0, 0, 0))).save(path)
    np.testing.assert_array_equal(load_digit(path), prepare_digit(read_image(path)))
    with pytest.raises(FileError, match=r"missing\.png: does not exist"):
        load_digit(tmp_path / "missing.png")


@settings(max_examples=30, deadline=None)
@given(
    shape=st.sampled_from("017"),
    left=st.integers(0, 150),
    top=st.integers(0, 150),
    width=st.integers(12, 100),
    height=st.integers(12, 100),
    stroke=st.integers(2, 12),
    light_paper=st.booleans(),
)
def test_prepare_digit_centers_any_size_and_position(shape, left, top, width, height, stroke, light_paper):
    ink, paper = (0, 255) if light_paper else (255, 0)
    drawn = draw_digit(shape, canvas=(260, 260), box=(left, top, left + width, top + height), width=stroke,
                       ink=ink, paper=paper)  # fmt: skip
    check_mnist_like(prepare_digit(drawn), centered_box=False)


@pytest.mark.parametrize(
    "image",
    [
        np.full((40, 40, 1), 255, np.uint8),
        np.zeros((40, 40, 3), np.uint8),
        np.zeros((40, 40, 4), np.uint8),  # fully transparent
        np.clip(200 + np.random.default_rng(0).integers(-6, 7, (40, 40, 1)), 0, 255).astype(np.uint8),
    ],
    ids=["white", "black", "transparent", "noisy-gray"],
)
def test_prepare_digit_rejects_a_blank_image(image):
    with pytest.raises(ValueError, match=r"image has no visible digit \(blank\)"):
        prepare_digit(image)


def test_prepare_digit_rejects_bad_shapes_and_sizes():
    with pytest.raises(ValueError, match=r"image must have shape \(H, W\) or \(H, W, C\)"):
        prepare_digit(np.zeros((4, 4, 5), np.uint8))
    with pytest.raises(ValueError, match=r"1 <= box <= size"):
        prepare_digit(draw_digit("1"), size=28, box=30)


# --- prepare_object, resize_image, prepare_for_model ----------------------------------------------------


def draw_shirt(canvas=(90, 160), paper=255, ink=30, mode="L"):
    """A wide, shirt-like blob with a faint stripe: an object, not a digit."""
    img = Image.new(mode, canvas[::-1], paper)
    pen = ImageDraw.Draw(img)
    pen.rectangle((40, 20, 120, 70), fill=ink)
    pen.rectangle((20, 20, 140, 35), fill=ink)
    pen.line((40, 50, 120, 50), fill=(ink + paper) // 2, width=2)
    array = np.asarray(img)
    return array[..., None] if array.ndim == 2 else array


def test_prepare_object_fills_the_field_along_its_longest_side_centered():
    out = prepare_object(draw_shirt(), (28, 28))
    assert out.shape == (28, 28) and out.dtype == np.float32 and out.max() == pytest.approx(255)
    rows, cols = np.nonzero(out > 10)
    assert cols.min() <= 1 and cols.max() >= 26  # 120 px wide: the width fills the field
    assert rows.max() - rows.min() + 1 < 20  # 50 px tall keeps its aspect ratio
    assert abs((rows.min() + rows.max()) / 2 - 13.5) <= 1  # centered
    assert out[0].max() == 0 and out[-1].max() == 0  # background stays black


def test_prepare_object_reads_both_polarities_alike():
    dark_on_light = prepare_object(draw_shirt(paper=255, ink=30))
    light_on_dark = prepare_object(draw_shirt(paper=0, ink=225))
    assert np.abs(dark_on_light - light_on_dark).max() < 2


def test_resize_image_converts_channels_and_size():
    rgba = np.zeros((10, 20, 4), np.uint8)
    rgba[..., 3] = 0  # fully transparent: composited over white
    gray = resize_image(rgba, (5, 8), 1)
    assert gray.shape == (5, 8, 1) and np.all(gray == 255)
    rgb = resize_image(np.full((4, 4, 1), 7, np.uint8), (4, 4), 3)
    assert rgb.shape == (4, 4, 3) and np.all(rgb == 7)


@pytest.mark.parametrize(
    ("style", "shape"),
    [("digit", (1, 28, 28)), ("digit", (3, 32, 32)), ("object", (1, 28, 28)), ("resize", (3, 16, 24))],
)
def test_prepare_for_model_gives_the_networks_input_shape(style, shape):
    out = prepare_for_model(draw_digit("7", mode="RGB", ink=(0, 0, 0), paper=(255, 255, 255)), shape, style)
    assert out.shape == shape and out.dtype == np.float32
    assert out.min() >= 0 and out.max() <= 255
    if shape[0] == 3 and style != "resize":
        assert np.array_equal(out[0], out[1]) and np.array_equal(out[1], out[2])


def test_prepare_for_model_refuses_an_unknown_style():
    with pytest.raises(ValueError, match="style"):
        prepare_for_model(draw_digit(), (1, 28, 28), "sketch")


def test_load_for_model_names_the_file_of_a_blank_image(tmp_path):
    path = tmp_path / "blank.png"
    Image.new("L", (40, 40), 255).save(path)
    with pytest.raises(FileError, match=r"blank\.png.*no visible digit"):
        read_image_for_model(path, (1, 28, 28), "digit")


# --- orientation, reduced decoding and the header ------------------------------------------------------


@pytest.mark.parametrize("orientation", range(1, 9))
def test_read_image_applies_the_exif_orientation_as_pillow_does(tmp_path, orientation):
    stored = np.zeros((24, 40, 3), np.uint8)
    stored[:8, :12] = (250, 30, 30)  # a red top-left corner shows where each transposition puts it
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "phone.jpg"
    Image.fromarray(stored).save(path, exif=exif, quality=95)
    with Image.open(path) as img:
        expected = np.asarray(ImageOps.exif_transpose(img))
    out = read_image(path)
    assert out.shape == expected.shape and np.array_equal(out, expected)
    assert image_shape(path) == out.shape
    assert out.shape[:2] == ((40, 24) if orientation >= 5 else (24, 40))


def test_read_image_with_min_size_decodes_a_jpeg_reduced_but_no_smaller(tmp_path):
    path = tmp_path / "big.jpg"
    Image.fromarray(pixels((1200, 1600, 3))).save(path)
    out = read_image(path, min_size=(100, 150))
    assert out.shape == (150, 200, 3)  # 1/8 scale in the decoder; any further factor would go below 100 x 150


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P"])
def test_read_image_with_min_size_reduces_by_a_whole_factor_averaging_blocks(tmp_path, mode):
    base = np.kron(pixels((10, 15, 3)), np.ones((40, 40, 1), np.uint8))  # 400 x 600, blocks of 40
    image = Image.fromarray(base).convert(mode, dither=Image.Dither.NONE)
    path = tmp_path / "big.png"
    image.save(path)
    out = read_image(path, min_size=(100, 100))
    assert out.shape[:2] == (100, 150)  # 400 // 100 = 4, the largest factor keeping both sides >= 100
    full = read_image(path)
    assert np.array_equal(out, full[::4, ::4])  # blocks of 40 pixels are uniform, so averaging keeps them


def test_image_shape_reads_the_header_without_decoding(tmp_path):
    path = tmp_path / "cut.png"
    Image.fromarray(pixels((64, 48, 3))).save(path)
    path.write_bytes(path.read_bytes()[:200])  # pixel data cut off: decoding would fail
    assert image_shape(path) == (64, 48, 3)
    with pytest.raises(FileError, match="truncated"):
        read_image(path)


def test_resize_style_keeps_the_polarity_of_the_photo():
    photo = draw_digit("7", ink=0, paper=255)  # dark on light
    out = prepare_for_model(photo, (1, 28, 28), "resize")
    assert out[0, 0, 0] > 200 and out.min() < 60
    inverted = prepare_for_model(photo, (1, 28, 28), "object")
    assert inverted[0, 0, 0] == 0


def test_load_for_model_reads_a_large_photo_reduced_like_the_full_one(tmp_path):
    photo = draw_digit("7", canvas=(2400, 2000), box=(700, 400, 1500, 1700), width=150)
    path = tmp_path / "large.png"
    Image.fromarray(photo[..., 0]).save(path)
    reduced = read_image_for_model(path, (1, 28, 28), "digit")
    full = prepare_for_model(read_image(path), (1, 28, 28), "digit")
    assert np.abs(reduced - full).mean() < 8


def test_resize_dark_inverts_a_photo_on_paper_and_keeps_size_and_place():
    # A small dark dot near the top-left of a light page, for a model trained on light-on-dark shapes.
    page = np.full((40, 40, 3), 245, np.uint8)
    page[4:12, 4:12] = 10
    prepared = prepare_for_model(page, (1, 20, 20), "resize-dark")[0]
    assert prepared.shape == (20, 20)
    assert prepared[2:6, 2:6].mean() > 200 and prepared[10:, 10:].max() < 30  # bright dot, dark field
    on_dark = 255 - page
    np.testing.assert_allclose(prepare_for_model(on_dark, (1, 20, 20), "resize-dark")[0], prepared, atol=1)


def test_image_bytes_are_read_and_prepared_as_the_same_file_with_its_errors(tmp_path):
    from cnnkit.images import ImageBytes

    path = tmp_path / "seven.png"
    Image.fromarray(pixels((40, 30))).save(path)
    data = ImageBytes(path.read_bytes(), "upload.png")
    assert np.array_equal(read_image(data), read_image(path))
    assert image_shape(data) == image_shape(path)
    shape = (1, 28, 28)
    assert np.array_equal(
        read_image_for_model(data, shape, "resize"), read_image_for_model(path, shape, "resize")
    )
    with pytest.raises(FileError, match=r"^upload\.png: not an image file"):
        read_image(ImageBytes(b"hello", "upload.png"))
    with pytest.raises(FileError, match=r"^upload\.png: .*truncated"):
        read_image(ImageBytes(path.read_bytes()[:200], "upload.png"))
