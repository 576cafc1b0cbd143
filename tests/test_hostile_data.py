"""Hostile data and image files: each one is refused by the command line with one line, in bounded memory.

Every file here is small on disk and made in a temporary folder. Run through `python -m cnnkit` in a
child process (the `cli` fixture), each must end with exit code 2, exactly one line
`cnnkit: error: ...` naming the file and what was wrong, no traceback, and a peak RSS under 1 GB.
"""

import gzip
import io
import math
import os
import struct
import warnings
import zipfile
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from cnnkit.data import MAX_CLASSES, read_idx
from cnnkit.data.idx import write_idx
from cnnkit.errors import DatasetError, FileError
from cnnkit.images import MAX_IMAGE_PIXELS, read_image

# --- making hostile files ------------------------------------------------------------------------------


def zeros_deflated(n_blocks: int, block_size: int) -> bytes:
    """A zlib stream of n_blocks * block_size zero bytes, made in milliseconds.

    After a full flush deflate starts afresh, so the compressed form of one block of zeros can be
    repeated; only the final Adler-32 checksum covers the whole stream.
    """
    block = bytes(block_size)
    c = zlib.compressobj(9)
    first = c.compress(block) + c.flush(zlib.Z_FULL_FLUSH)
    again = c.compress(block) + c.flush(zlib.Z_FULL_FLUSH)
    end = c.flush()[:-4]
    adler = 1
    for _ in range(n_blocks):
        adler = zlib.adler32(block, adler)
    return first + again * (n_blocks - 1) + end + adler.to_bytes(4, "big")


def png(width: int, height: int, color_type: int = 6, idat: bytes = b"") -> bytes:
    """A PNG file: 8-bit, `color_type` 0 (gray), 2 (RGB) or 6 (RGBA), with the given compressed pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def png_bomb(side: int) -> bytes:
    """A real side x side RGBA PNG of transparent black, a few hundred KB on disk."""
    row = side * 4 + 1  # a filter byte, then the pixels
    rows_per_block = 100
    assert side % rows_per_block == 0
    return png(side, side, 6, zeros_deflated(side // rows_per_block, row * rows_per_block))


def idx_header(dims, type_code=0x08) -> bytes:
    return bytes([0, 0, type_code, len(dims)]) + struct.pack(f">{len(dims)}I", *dims)


def gzip_bomb(header: bytes, zero_bytes: int) -> bytes:
    """`header` followed by `zero_bytes` zeros, gzipped in repeated members of 16 MiB (gzip allows many)."""
    member = gzip.compress(bytes(16 * 1024**2), compresslevel=9, mtime=0)
    return gzip.compress(header, mtime=0) + member * (zero_bytes // (16 * 1024**2))


def npy_member(header: dict | bytes, data: bytes = b"") -> bytes:
    """An .npy file (format 1.0) with the given header dict, or raw header bytes, and data."""
    text = header if isinstance(header, bytes) else repr(header).encode("latin1")
    text += b" " * ((64 - (10 + len(text) + 1) % 64) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text + data


def write_npz(path, members: dict):
    """An .npz archive holding `members`: name -> .npy bytes (or an array, saved as NumPy does)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, member in members.items():
            if isinstance(member, np.ndarray):
                with z.open(f"{name}.npy", "w") as f:
                    np.lib.format.write_array(f, member, allow_pickle=False)
            else:
                z.writestr(f"{name}.npy", member)
    return path


def small_idx_folder(folder, max_label=9):
    """A valid idx:DIR of 4 dark 28 x 28 images with a bright square."""
    folder.mkdir(parents=True, exist_ok=True)
    images = np.zeros((4, 28, 28), np.uint8)
    images[:, 8:20, 10:18] = 255
    write_idx(folder / "train-images-idx3-ubyte.gz", images)
    write_idx(folder / "train-labels-idx1-ubyte.gz", np.array([0, 1, 2, max_label], np.uint8))
    return folder


# --- npz:FILE ------------------------------------------------------------------------------------------


def test_npz_with_one_huge_label_is_the_class_limit_not_a_memory_error(cli, tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, X_train=np.zeros((1, 784), np.uint8), y_train=np.array([1_000_000_000]))
    result = cli("data", "info", f"npz:{path}")
    result.assert_one_line_error("bad.npz", "y_train", "1,000,000,000", f"limit is {MAX_CLASSES:,}")


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (np.array([np.inf]), "non-negative whole numbers"),
        (np.array([1e300]), "which would make"),
        (np.array([2**64 - 1], np.uint64), "which would make"),
    ],
)
def test_npz_labels_out_of_any_range_are_refused_without_warnings(cli, tmp_path, labels, message):
    path = tmp_path / "bad.npz"
    np.savez(path, X_train=np.zeros((1, 784), np.uint8), y_train=labels)
    cli("data", "info", f"npz:{path}").assert_one_line_error("bad.npz", message)


def test_npz_member_declaring_a_huge_array_is_refused_before_reading(cli, tmp_path):
    # 100,000 x 100,000 x 100 bytes = 1 TB declared, a few bytes stored
    huge = npy_member({"descr": "|u1", "fortran_order": False, "shape": (100_000, 100_000, 100)})
    path = write_npz(tmp_path / "bad.npz", {"X_train": huge, "y_train": np.zeros(1, np.int64)})
    result = cli("data", "info", f"npz:{path}")
    result.assert_one_line_error("bad.npz", "X_train", "1,000,000,000,000 bytes", "limit of 2 GiB")


@pytest.mark.parametrize(
    "header",
    [
        b"{'descr': '|u1', 'fortran_order': False, 'shape': (2, 784)",  # cut short
        b"{'descr': 'not a dtype', 'fortran_order': False, 'shape': (2,)}",
        b"{'descr': '|u1', 'fortran_order': False, 'shape': (-5,)}",
        b"__import__('os').system('echo pwned')",
    ],
)
def test_npz_member_with_a_malformed_npy_header_names_the_member(cli, tmp_path, header):
    path = write_npz(tmp_path / "bad.npz", {"X_train": npy_member(header), "y_train": np.zeros(2, np.int64)})
    result = cli("data", "info", f"npz:{path}")
    result.assert_one_line_error("bad.npz", "X_train.npy", "malformed .npy header")
    assert "pwned" not in result.out


def test_npz_member_that_is_not_npy_at_all(cli, tmp_path):
    path = write_npz(tmp_path / "bad.npz", {"X_train": b"PK garbage", "y_train": np.zeros(2, np.int64)})
    cli("data", "info", f"npz:{path}").assert_one_line_error("bad.npz", "X_train.npy", "malformed")


def test_npz_member_shorter_than_its_header_says(cli, tmp_path):
    short = npy_member({"descr": "|u1", "fortran_order": False, "shape": (2, 784)}, bytes(100))
    path = write_npz(tmp_path / "bad.npz", {"X_train": short, "y_train": np.zeros(2, np.int64)})
    cli("data", "info", f"npz:{path}").assert_one_line_error("bad.npz", "cannot read array X_train")


def test_npz_with_pickled_class_names_is_refused(cli, tmp_path):
    names = npy_member({"descr": "|O", "fortran_order": False, "shape": (2,)}, b"\x80\x04N.")
    path = write_npz(
        tmp_path / "bad.npz",
        {"X_train": np.zeros((2, 784), np.uint8), "y_train": np.zeros(2, np.int64), "class_names": names},
    )
    cli("data", "info", f"npz:{path}").assert_one_line_error("bad.npz", "class_names", "Python objects")


# --- idx:DIR -------------------------------------------------------------------------------------------


def test_gzip_idx_bomb_declaring_more_than_the_limit_is_refused_from_its_header(cli, tmp_path):
    folder = small_idx_folder(tmp_path / "idx")
    bomb = gzip_bomb(idx_header((100_000, 256, 256)), 64 * 1024**2)  # declares 6.5 GB
    (folder / "train-images-idx3-ubyte.gz").write_bytes(bomb)
    result = cli("data", "info", f"idx:{folder}")
    result.assert_one_line_error("train-images-idx3-ubyte.gz", "6,553,600,000 bytes", "limit of 2 GiB")


def test_gzip_idx_bomb_is_decompressed_only_as_far_as_its_header_declares(cli, tmp_path):
    folder = small_idx_folder(tmp_path / "idx")
    # declares 4 images of 28 x 28 but decompresses to 1.5 GB
    bomb = gzip_bomb(idx_header((4, 28, 28)), 1536 * 1024**2)
    assert len(bomb) < 2 * 1024**2
    (folder / "train-images-idx3-ubyte.gz").write_bytes(bomb)
    result = cli("data", "info", f"idx:{folder}")
    result.assert_one_line_error("train-images-idx3-ubyte.gz", "decompresses to more than the 3,136 bytes")


def test_raw_idx_declaring_more_than_it_holds_is_refused_before_allocating(cli, tmp_path):
    folder = small_idx_folder(tmp_path / "idx")
    (folder / "train-images-idx3-ubyte.gz").unlink()
    (folder / "train-images-idx3-ubyte").write_bytes(idx_header((60_000, 150, 150)) + bytes(1000))
    result = cli("data", "info", f"idx:{folder}")
    result.assert_one_line_error("train-images-idx3-ubyte", "need 1,350,000,000 bytes", "truncated")


def test_classes_txt_that_is_not_utf8(cli, tmp_path):
    folder = small_idx_folder(tmp_path / "idx")
    (folder / "classes.txt").write_bytes("zéro\nun\n".encode("latin-1") + b"2\n3\n4\n5\n6\n7\n8\n9\n")
    cli("data", "info", f"idx:{folder}").assert_one_line_error("classes.txt", "not UTF-8", "0xe9")


def test_classes_txt_that_is_absurdly_large(cli, tmp_path):
    folder = small_idx_folder(tmp_path / "idx")
    (folder / "classes.txt").write_bytes(b"x" * (8 * 1024**2))
    cli("data", "info", f"idx:{folder}").assert_one_line_error("classes.txt", "over 1 MiB")


def test_classes_txt_with_more_classes_than_the_limit(cli, tmp_path):
    folder = small_idx_folder(tmp_path / "idx")
    (folder / "classes.txt").write_text("".join(f"class {i}\n" for i in range(MAX_CLASSES + 1)))
    cli("data", "info", f"idx:{folder}").assert_one_line_error("classes.txt", "10,001 class names", "10,000")


def test_preprocessing_txt_with_an_unknown_word(cli, tmp_path):
    folder = small_idx_folder(tmp_path / "idx")
    (folder / "preprocessing.txt").write_text("sharpen\n")
    result = cli("data", "info", f"idx:{folder}")
    result.assert_one_line_error("preprocessing.txt", "'sharpen'", "digit, object, resize")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@example(type_code=8, dims=[0, 64, 379623555, 379626570], extra=0, gzipped=False, cut_header=False)
@given(
    type_code=st.sampled_from([0x08, 0x08, 0x08, 0x09, 0x0D]),
    dims=st.lists(st.one_of(st.integers(0, 6), st.integers(0, 2**32 - 1)), min_size=0, max_size=4),
    extra=st.integers(-30, 30),
    gzipped=st.booleans(),
    cut_header=st.booleans(),
)
def test_any_idx_header_gives_its_array_or_one_line_file_error(
    tmp_path, type_code, dims, extra, gzipped, cut_header
):
    declared = int(np.prod(dims, dtype=object)) if dims else 0
    payload_size = max(0, min(declared, 1000) + extra)
    data = idx_header(dims, type_code) + bytes(range(256)) * (payload_size // 256) + bytes(payload_size % 256)
    if cut_header:
        data = data[: len(data) // 3]
    path = tmp_path / "x-idx3-ubyte"
    path.write_bytes(gzip.compress(data, mtime=0) if gzipped else data)
    # A shape NumPy can hold, under the 2 GiB limit even when a zero dimension makes it empty:
    holdable = int(np.prod([d for d in dims if d], dtype=object)) <= 2 * 2**30
    valid = type_code == 0x08 and dims and holdable and len(data) == 4 + 4 * len(dims) + declared
    try:
        array = read_idx(path)
    except (FileError, DatasetError) as exc:  # DatasetError: over the data memory budget
        assert not valid, exc
        assert str(path) in str(exc) and "\n" not in str(exc)
    else:
        assert valid and array.shape == tuple(dims) and array.dtype == np.uint8


# --- image files, through predict ---------------------------------------------------------------------


def test_png_bomb_of_144_megapixels_is_refused_from_its_header(cli, tmp_path, tiny_run):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_bomb(12_000))
    assert path.stat().st_size < 1024**2
    result = cli("predict", tiny_run, path)
    result.assert_one_line_error(
        "bomb.png", "12000x12000 = 144 megapixels is over cnnkit's limit of 50 megapixels"
    )


def test_png_declaring_ten_gigapixels_is_refused_with_cnnkits_message(cli, tmp_path, tiny_run):
    # Pillow itself refuses this (DecompressionBombError) before cnnkit sees the size.
    path = tmp_path / "huge.png"
    path.write_bytes(png(100_000, 100_000, 6, zeros_deflated(1, 400_001)))
    result = cli("predict", tiny_run, path)
    result.assert_one_line_error("huge.png", "10,000 megapixels is over cnnkit's limit of 50 megapixels")
    assert "DecompressionBomb" not in result.err


def test_png_between_cnnkits_and_pillows_limits_gives_no_pillow_warning(cli, tmp_path, tiny_run):
    path = tmp_path / "big.png"
    path.write_bytes(png(10_000, 10_000, 0, zeros_deflated(1, 1000)))  # 100 MP: Pillow would only warn
    result = cli("predict", tiny_run, path)
    result.assert_one_line_error("big.png", "10000x10000 = 100 megapixels")


def test_image_just_under_the_pixel_limit_is_read_in_bounded_memory(cli, tmp_path, tiny_run):
    side = math.isqrt(MAX_IMAGE_PIXELS) // 100 * 100  # 7000: 49 megapixels of RGBA, 196 MB decoded
    path = tmp_path / "large.png"
    path.write_bytes(png_bomb(side))
    result = cli("predict", tiny_run, path)
    # fully transparent: nothing drawn, which predict reports; what matters is that it was decoded
    result.assert_one_line_error("large.png", "no visible digit")


def test_truncated_and_fake_images_are_one_line_errors(cli, tmp_path, tiny_run):
    (tmp_path / "cut.png").write_bytes(png(64, 64, 0, zeros_deflated(1, 65 * 64))[:60])
    (tmp_path / "fake.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    cli("predict", tiny_run, tmp_path / "cut.png").assert_one_line_error("cut.png", "cannot read image")
    cli("predict", tiny_run, tmp_path / "fake.jpg").assert_one_line_error("fake.jpg")


def test_folder_source_refuses_an_image_bomb_from_its_header(cli, tmp_path):
    (tmp_path / "cats").mkdir()
    (tmp_path / "cats" / "bomb.png").write_bytes(png_bomb(12_000))
    result = cli("data", "info", f"folder:{tmp_path}")
    result.assert_one_line_error("bomb.png", "144 megapixels is over cnnkit's limit")


def test_read_image_never_lets_pillows_bomb_warning_or_error_escape(tmp_path):
    (tmp_path / "a.png").write_bytes(png(10_000, 10_000, 0))
    (tmp_path / "b.png").write_bytes(png(100_000, 100_000, 0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in ("a.png", "b.png"):
            with pytest.raises(FileError, match=f"{name}: .* megapixels is over cnnkit's limit of 50"):
                read_image(tmp_path / name)


# --- photo folders, through the worker processes that decode them (cnnkit.data.imagefolder) -------------


def photo_folder(root, hostile_name=None, hostile=b""):
    """root/{a,b}/*.jpg: 40 small real JPEGs, and one hostile file among b's; workers get 2-file tasks."""
    rng = np.random.default_rng(0)
    for i in range(40):
        folder = root / "ab"[i % 2]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(folder / f"{i:02}.jpg")
    if hostile_name:
        (root / "b" / hostile_name).write_bytes(hostile)
    return root


def real_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
        buffer, "JPEG"
    )
    return buffer.getvalue()


PARALLEL = {"CNNKIT_DATA_WORKERS": "2"}


@pytest.mark.parametrize(
    ("name", "data", "fragments"),
    [
        ("cut.jpg", real_jpeg()[:700], ("cut.jpg", "cannot read image")),
        ("fake.png", b"\x89PNG\r\n\x1a\n not really a png", ("fake.png", "not an image file")),
        ("words.jpg", b"hello, not a photo", ("words.jpg", "not an image file")),
        ("bomb.png", png_bomb(12_000), ("bomb.png", "144 megapixels is over cnnkit's limit")),
        ("claims.png", png(100_000, 100_000, 0), ("claims.png", "10,000 megapixels is over")),
        ("empty.jpg", b"", ("empty.jpg", "not an image file")),
    ],
)
def test_a_hostile_photo_among_good_ones_is_one_line_from_the_worker_processes(
    cli, tmp_path, name, data, fragments
):
    root = photo_folder(tmp_path / "photos", name, data)
    env = {**PARALLEL, "CNNKIT_CACHE_DIR": str(tmp_path / "cache")}
    result = cli("data", "info", f"folder:{root}", env=env, timeout=120)  # a child process: no hang
    result.assert_one_line_error(*fragments)


def test_a_photo_just_under_the_pixel_limit_is_decoded_by_a_worker_in_bounded_memory(cli, tmp_path):
    side = math.isqrt(MAX_IMAGE_PIXELS) // 100 * 100  # 7000: 49 megapixels of RGBA, 196 MB decoded
    root = photo_folder(tmp_path / "photos", "large.png", png_bomb(side))
    env = {**PARALLEL, "CNNKIT_CACHE_DIR": str(tmp_path / "cache")}
    result = cli("data", "info", f"folder:{root}", env=env, timeout=120)
    assert result.code == 0 and "12x12" in result.out and result.peak_mb < 1024, result.err[-2000:]


def test_a_pipe_or_a_link_loop_in_a_photo_folder_is_skipped_without_waiting(cli, tmp_path):
    root = photo_folder(tmp_path / "photos")
    os.mkfifo(root / "a" / "pipe.jpg")  # opening it would wait for a writer
    (root / "b" / "loop").symlink_to(root / "b")  # a link to a folder is not followed
    result = cli(
        "data", "info", f"folder:{root}", env={"CNNKIT_CACHE_DIR": str(tmp_path / "cache")}, timeout=120
    )
    assert result.code == 0 and " 40" in result.out, result.err[-2000:]


# --- the data memory budget (cnnkit.data.budget) -------------------------------------------------------


def deflated_zeros(prefix: bytes, n_zeros: int) -> tuple[bytes, int, int]:
    """`prefix` then `n_zeros` zero bytes as a raw deflate stream, with its CRC-32 and length, made in well
    under a second per GB: after a full flush deflate starts afresh, so one block's bytes repeat."""
    block = bytes(16 * 1024**2)
    full, rest = divmod(n_zeros, len(block))
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = c.compress(prefix) + c.flush(zlib.Z_FULL_FLUSH)
    again = c.compress(block) + c.flush(zlib.Z_FULL_FLUSH)
    tail = c.compress(block[:rest]) + c.flush()
    crc = zlib.crc32(prefix)
    for _ in range(full):
        crc = zlib.crc32(block, crc)
    return head + again * full + tail, zlib.crc32(block[:rest], crc), len(prefix) + n_zeros


def npz_of_zeros(path, shape, labels):
    """A real .npz whose X_train is `shape` uint8 zeros, deflated (about 1 KB on disk per MB), and whose
    y_train is `labels` (uint8): NumPy reads it whole, CRC-32 included. Written by hand, as a zip of
    two deflated members, because zipfile would spend seconds compressing every zero."""
    x_header = npy_member({"descr": "|u1", "fortran_order": False, "shape": tuple(shape)})
    y_npy = npy_member({"descr": "|u1", "fortran_order": False, "shape": (len(labels),)}, labels.tobytes())
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    members = {
        "X_train.npy": deflated_zeros(x_header, math.prod(shape)),
        "y_train.npy": (c.compress(y_npy) + c.flush(), zlib.crc32(y_npy), len(y_npy)),
    }
    local, central = b"", b""
    for name, (data, crc, size) in members.items():
        # version 2.0, no flags, deflated, 1980-01-01 00:00
        fields = struct.pack("<HHHHHIII", 20, 0, 8, 0, 0x21, crc, len(data), size)
        central += b"PK\1\2" + struct.pack("<H", 20) + fields
        central += struct.pack("<HHHHHII", len(name), 0, 0, 0, 0, 0, len(local)) + name.encode()
        local += b"PK\3\4" + fields + struct.pack("<HH", len(name), 0) + name.encode() + data
    end = b"PK\5\6" + struct.pack("<HHHHIIH", 0, 0, len(members), len(members), len(central), len(local), 0)
    path.write_bytes(local + central + end)
    return path


@pytest.mark.slow  # a child process over seconds
def test_npz_that_inflates_to_1_9_gb_is_refused_by_the_default_budget_before_inflating(cli, tmp_path):
    # The file: 1.8 MB on disk, X_train 2,400,000 x 28 x 28 = 1.88 GB, under the 2 GiB per array.
    # Before the budget, `data info` peaked at 1.9 GB and `train` at 9.6 GB (the float32 copy).
    path = npz_of_zeros(
        tmp_path / "bomb.npz", (2_400_000, 28, 28), (np.arange(2_400_000) % 2).astype(np.uint8)
    )
    assert path.stat().st_size < 2 * 1024**2
    default = {"CNNKIT_MAX_DATA_MB": ""}  # unset: min(half of MemAvailable, 1 GiB)
    for command in (["data", "info"], ["train", "--out", tmp_path / "run", "--dataset"]):
        result = cli(*command, f"npz:{path}", env=default, timeout=120)
        result.assert_one_line_error(
            "bomb.npz: X_train (2400000 x 28 x 28 uint8) would take 1,794 MB",
            "data memory budget",
            "set CNNKIT_MAX_DATA_MB",
            max_mb=600,
        )
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_npz_bomb_is_a_real_archive_that_numpy_reads(tmp_path):
    path = npz_of_zeros(tmp_path / "small.npz", (3, 5, 7), np.array([0, 1, 2], np.uint8))
    with np.load(path) as archive:
        np.testing.assert_array_equal(archive["X_train"], np.zeros((3, 5, 7), np.uint8))
        np.testing.assert_array_equal(archive["y_train"], [0, 1, 2])


@pytest.mark.slow  # a child process over seconds
def test_training_refuses_a_float32_copy_over_the_budget_that_the_uint8_images_fit(cli, tmp_path):
    # 100,000 x 28 x 28 = 75 MiB of uint8 fit a 200 MiB budget; the 90,000 training images as float32 would
    # add 269 MB. `data info` needs no float32 copy, so it runs.
    path = npz_of_zeros(tmp_path / "big.npz", (100_000, 28, 28), (np.arange(100_000) % 2).astype(np.uint8))
    budget = {"CNNKIT_MAX_DATA_MB": "200"}
    info = cli("data", "info", f"npz:{path}", env=budget)
    assert info.code == 0 and "train mean   0" in info.out, info.err
    result = cli("train", "--dataset", f"npz:{path}", "--out", tmp_path / "run", env=budget, timeout=120)
    result.assert_one_line_error(
        "big.npz: the train images standardized as float32 (90000 x 1 x 28 x 28) would take 269 MB "
        "beside the 76 MB already loaded, over cnnkit's data memory budget of 200 MB",
        max_mb=600,
    )


def test_gzip_idx_within_the_array_limit_but_over_the_budget_is_refused_before_inflating(cli, tmp_path):
    folder = small_idx_folder(tmp_path / "idx")
    dims = (1_572_864, 32, 32)  # 1.5 GiB of real zeros, 1.5 MB gzipped
    bomb = gzip_bomb(idx_header(dims), math.prod(dims))
    assert len(bomb) < 2 * 1024**2
    (folder / "train-images-idx3-ubyte.gz").write_bytes(bomb)
    result = cli("data", "info", f"idx:{folder}", env={"CNNKIT_MAX_DATA_MB": ""})
    result.assert_one_line_error(
        "train-images-idx3-ubyte.gz: IDX data (1572864 x 32 x 32 uint8) would take 1,536 MB", max_mb=600
    )


def test_mnist_5k_trains_within_a_budget_of_what_it_holds_and_not_below(cli, tmp_path, mnist_5k):
    # what training holds: the uint8 images and int64 labels, and the 4,500 training and validation
    # images as float32
    needed = mnist_5k.nbytes + 4 * mnist_5k.train.images.size
    enough, short = str(math.ceil(needed / 1024**2)), str(math.floor(needed / 1024**2) - 1)
    result = cli(
        "train",
        "--dataset",
        "mnist-5k",
        "--epochs",
        1,
        "--out",
        tmp_path / "a",
        env={"CNNKIT_MAX_DATA_MB": enough},
    )
    assert result.code == 0, result.err
    assert (tmp_path / "a" / "checkpoints" / "epoch-001.safetensors").is_file()
    result = cli("train", "--dataset", "mnist-5k", "--out", tmp_path / "b", env={"CNNKIT_MAX_DATA_MB": short})
    result.assert_one_line_error("mnist-5k: the ", "images standardized as float32", f"budget of {short} MB")


def test_a_budget_variable_that_is_not_a_number_is_one_line_error(cli, tmp_path):
    path = npz_of_zeros(tmp_path / "ok.npz", (2, 28, 28), np.array([0, 1], np.uint8))
    result = cli("data", "info", f"npz:{path}", env={"CNNKIT_MAX_DATA_MB": "lots"})
    result.assert_one_line_error("CNNKIT_MAX_DATA_MB='lots': expected a positive number of megabytes")
