import socket

import numpy as np

from cnnkit.cli import main
from cnnkit.data import Dataset, Split, info_table


def test_cli_data_info_prints_the_mnist_5k_table(capsys):
    assert main(["data", "info", "mnist-5k"]) == 0
    out = capsys.readouterr().out
    assert "dataset      mnist-5k" in out
    assert "1 x 28 x 28 (channels x height x width), uint8" in out
    assert "classes      10" in out
    assert "train mean   33.54" in out and "train std    78.74" in out
    rows = out.splitlines()
    assert rows[rows.index("class  train  test  total") + 1] == "0        449    51    500"
    assert rows[-1] == "total  4,500   500  5,000"


def test_cli_data_info_with_a_bad_source_exits_2_with_one_line(capsys):
    assert main(["data", "info", "no-such-dataset"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("cnnkit: error: unknown dataset 'no-such-dataset'")
    assert captured.err.count("\n") == 1


def test_cli_data_info_without_network_exits_2_with_one_line(capsys, monkeypatch, tmp_path):
    # A port held bound but not listening refuses connections, and no other process can take it
    # meanwhile (as it could a number released before use).
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        port = held.getsockname()[1]
        monkeypatch.setenv("CNNKIT_DATA", str(tmp_path))
        monkeypatch.setenv("CNNKIT_MNIST_MIRRORS", f"http://127.0.0.1:{port}/")
        assert main(["data", "info", "mnist"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no network" in err and "mnist-5k" in err and "idx:DIR" in err


def test_table_names_labels_shows_every_split_and_per_channel_statistics():
    images = np.zeros((6, 3, 2, 2), np.uint8)
    images[:, 1] = 10
    images[:, 2, 0] = 200
    ds = Dataset(
        "colors",
        ["red things", "blue"],
        train=Split(images[:4], [0, 0, 0, 1], "train"),
        valid=Split(images[4:5], [1], "valid"),
        test=Split(images[5:], [0], "test"),
    )
    lines = info_table(ds).splitlines()
    assert "train mean   0, 10, 100  (per channel)" in lines
    assert "train std    1, 1, 100" in lines
    assert lines[-4:] == [
        "label  class       train  valid  test  total",
        "    0  red things      3      0     1      4",
        "    1  blue            1      1     0      2",
        "       total           4      1     1      6",
    ]


def test_table_without_a_training_split_says_so():
    ds = Dataset("t", ["0", "1"], test=Split(np.zeros((2, 1, 2, 2), np.float32), [0, 1], "test"))
    text = info_table(ds)
    assert "no training split" in text and "float32 already scaled" in text


def test_table_says_how_predict_prepares_photos_and_how_the_data_was_loaded():
    split = Split(np.zeros((2, 1, 2, 2), np.uint8), [0, 1], "test")
    ds = Dataset("t", ["0", "1"], test=split, preprocessing="object", notes=("images are 2x2", "second"))
    lines = info_table(ds).splitlines()
    assert "preprocess   object (how cnnkit predict prepares a photo)" in lines
    assert "note         images are 2x2" in lines and "note         second" in lines
