import gzip

import numpy as np
import pytest

from cnnkit.data import read_idx
from cnnkit.data.idx import read_idx_pair, write_idx
from cnnkit.errors import FileError

IMAGES = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
LABELS = np.array([7, 1], dtype=np.uint8)


def idx_bytes(array, magic=None):
    header = magic if magic is not None else bytes([0, 0, 8, array.ndim])
    dims = b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + dims + array.tobytes()


@pytest.mark.parametrize("name", ["train-images-idx3-ubyte", "train-images-idx3-ubyte.gz"])
def test_write_then_read_gives_the_same_array(tmp_path, name):
    write_idx(tmp_path / name, IMAGES)
    images = read_idx(tmp_path / name)
    assert images.dtype == np.uint8 and images.shape == (2, 3, 4)
    np.testing.assert_array_equal(images, IMAGES)
    assert images.flags.writeable


def test_gzip_is_detected_by_content_not_by_name(tmp_path):
    (tmp_path / "gzipped-without-suffix").write_bytes(gzip.compress(idx_bytes(IMAGES)))
    (tmp_path / "raw-with-suffix.gz").write_bytes(idx_bytes(IMAGES))
    np.testing.assert_array_equal(read_idx(tmp_path / "gzipped-without-suffix"), IMAGES)
    np.testing.assert_array_equal(read_idx(tmp_path / "raw-with-suffix.gz"), IMAGES)


def test_pair_gives_images_with_a_channel_axis_and_int64_labels(tmp_path):
    write_idx(tmp_path / "images", IMAGES)
    write_idx(tmp_path / "labels", LABELS)
    images, labels = read_idx_pair(tmp_path / "images", tmp_path / "labels")
    assert images.shape == (2, 1, 3, 4) and labels.dtype == np.int64
    np.testing.assert_array_equal(labels, [7, 1])


MALFORMED = {
    "wrong magic": (b"\x08\x03\x00\x00" + idx_bytes(IMAGES)[4:], "not an IDX file"),
    "text file": (b"hello world, not idx", "not an IDX file"),
    "empty file": (b"", "not an IDX file"),
    "int32 type code": (idx_bytes(IMAGES, magic=bytes([0, 0, 0x0C, 3])), "type code 0x0c"),
    "header cut short": (idx_bytes(IMAGES)[:10], "header"),
    "data cut short": (
        idx_bytes(IMAGES)[:-5],
        "need 24 bytes of data but the file has 19; is the file truncated",
    ),
    "data too long": (idx_bytes(IMAGES) + b"\0\0", "need 24 bytes of data but the file has 26"),
    "truncated gzip": (gzip.compress(idx_bytes(IMAGES))[:-12], "corrupt or truncated gzip"),
    "gzip with bad crc": (gzip.compress(idx_bytes(IMAGES))[:-8] + b"\0" * 8, "corrupt or truncated gzip"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_file_raises_one_line_file_error_naming_the_file(tmp_path, case):
    data, message = MALFORMED[case]
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(data)
    with pytest.raises(FileError) as err:
        read_idx(path)
    assert str(path) in str(err.value) and message in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_file_is_a_file_error(tmp_path):
    with pytest.raises(FileError, match="does not exist"):
        read_idx(tmp_path / "nope-idx1-ubyte")


def test_pair_with_different_counts_names_both_files(tmp_path):
    write_idx(tmp_path / "images", IMAGES)
    write_idx(tmp_path / "labels", np.zeros(3, np.uint8))
    with pytest.raises(FileError, match=r"images holds 2 images but .*labels holds 3 labels"):
        read_idx_pair(tmp_path / "images", tmp_path / "labels")


def test_pair_with_files_swapped_says_which_kind_was_expected(tmp_path):
    write_idx(tmp_path / "images", IMAGES)
    write_idx(tmp_path / "labels", LABELS)
    with pytest.raises(FileError, match=r"expected images .*00000803"):
        read_idx_pair(tmp_path / "labels", tmp_path / "images")
    with pytest.raises(FileError, match=r"expected labels .*00000801"):
        read_idx_pair(tmp_path / "images", tmp_path / "images")
