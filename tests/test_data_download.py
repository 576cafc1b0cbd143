import dataclasses
import hashlib
import os
import socket
import time

import numpy as np
import pytest

from cnnkit.data import load_dataset
from cnnkit.data.download import DownloadError, download, fetch
from cnnkit.data.idx import write_idx
from cnnkit.data.sources import FASHION_MNIST, MNIST, default_cache_dir, load_published
from cnnkit.errors import DatasetError

FILE = "train-labels-idx1-ubyte.gz"


@pytest.fixture
def fake_mnist(tmp_path):
    """Four small IDX .gz files named like MNIST's: {name: bytes}, and the arrays they hold."""
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, (12, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte.gz": rng.integers(0, 10, 12, dtype=np.uint8),
        "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (5, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte.gz": rng.integers(0, 10, 5, dtype=np.uint8),
    }
    (tmp_path / "made").mkdir()
    files = {}
    for name, array in arrays.items():
        write_idx(tmp_path / "made" / name, array)
        files[name] = (tmp_path / "made" / name).read_bytes()
    return files, arrays


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def fake_spec(files, mirrors):
    return dataclasses.replace(
        MNIST,
        checksums={n: sha256(b) for n, b in files.items()},
        sizes={n: len(b) for n, b in files.items()},
        mirrors=tuple(mirrors),
    )


def serve(server, files, prefix="/mnist/", behaviour="ok"):
    for name, body in files.items():
        server.routes[prefix + name] = (behaviour, body)


def test_download_is_verified_cached_and_reused(server, fake_mnist, tmp_path):
    files, arrays = fake_mnist
    serve(server, files)
    spec = fake_spec(files, [server.url + "/mnist/"])
    ds = load_published(spec, cache_dir=tmp_path / "cache", progress=False)
    assert ds.name == "mnist" and ds.class_names == [str(d) for d in range(10)]
    np.testing.assert_array_equal(ds.train.images[:, 0], arrays["train-images-idx3-ubyte.gz"])
    np.testing.assert_array_equal(ds.test.labels, arrays["t10k-labels-idx1-ubyte.gz"])
    assert sorted(p.name for p in (tmp_path / "cache" / "mnist").iterdir()) == sorted(files)
    assert len(server.requests) == 4
    load_published(spec, cache_dir=tmp_path / "cache", progress=False)
    assert len(server.requests) == 4


def test_corrupt_cached_file_is_downloaded_again(server, fake_mnist, tmp_path):
    files, arrays = fake_mnist
    serve(server, files)
    spec = fake_spec(files, [server.url + "/mnist/"])
    load_published(spec, cache_dir=tmp_path, progress=False)
    cached = tmp_path / "mnist" / "t10k-images-idx3-ubyte.gz"
    cached.write_bytes(cached.read_bytes()[:-1] + b"x")
    ds = load_published(spec, cache_dir=tmp_path, progress=False)
    assert server.requests[-1] == "/mnist/t10k-images-idx3-ubyte.gz" and len(server.requests) == 5
    np.testing.assert_array_equal(ds.test.images[:, 0], arrays["t10k-images-idx3-ubyte.gz"])


def test_checksum_mismatch_leaves_nothing_in_the_cache(server, fake_mnist, tmp_path):
    files, _ = fake_mnist
    server.routes["/m/" + FILE] = ("ok", files[FILE] + b"tampered")
    with pytest.raises(DownloadError, match="checksum mismatch") as err:
        download(FILE, sha256(files[FILE]), tmp_path / "cache", [server.url + "/m/"], progress=False)
    assert not err.value.unreachable
    assert list((tmp_path / "cache").iterdir()) == []


def test_connection_closed_mid_file_leaves_nothing_in_the_cache(server, fake_mnist, tmp_path):
    files, _ = fake_mnist
    server.routes["/m/" + FILE] = ("truncate", files[FILE])
    with pytest.raises(DownloadError, match="connection closed after"):
        download(FILE, sha256(files[FILE]), tmp_path / "cache", [server.url + "/m/"], progress=False)
    assert list((tmp_path / "cache").iterdir()) == []


def test_stalled_server_times_out(server, fake_mnist, tmp_path):
    files, _ = fake_mnist
    server.routes["/m/" + FILE] = ("stall", files[FILE])
    with pytest.raises(DownloadError, match="timed out"):
        download(
            FILE, sha256(files[FILE]), tmp_path / "cache", [server.url + "/m/"], progress=False, timeout=0.2
        )
    assert list((tmp_path / "cache").iterdir()) == []


@pytest.mark.parametrize("first", ["not found", "refused"])
def test_next_mirror_is_used_when_the_first_fails(server, fake_mnist, refused_url, tmp_path, first):
    files, _ = fake_mnist
    server.routes["/good/" + FILE] = ("ok", files[FILE])
    first_url = server.url + "/empty/" if first == "not found" else refused_url
    path = download(FILE, sha256(files[FILE]), tmp_path, [first_url, server.url + "/good/"], progress=False)
    assert path == tmp_path / FILE and path.read_bytes() == files[FILE]
    assert server.requests[-1] == "/good/" + FILE


def test_progress_bar_is_drawn_when_asked(server, fake_mnist, tmp_path, capsys):
    files, _ = fake_mnist
    server.routes["/m/" + FILE] = ("ok", files[FILE])
    download(FILE, sha256(files[FILE]), tmp_path, [server.url + "/m/"], progress=True)
    err = capsys.readouterr().err
    assert FILE in err and "100%" in err


def test_no_progress_bar_when_not_asked(server, fake_mnist, tmp_path, capsys):
    files, _ = fake_mnist
    server.routes["/m/" + FILE] = ("ok", files[FILE])
    download(FILE, sha256(files[FILE]), tmp_path, [server.url + "/m/"], progress=False)
    assert capsys.readouterr().err == ""


def test_file_urls_work_as_mirrors(fake_mnist, tmp_path):
    files, _ = fake_mnist
    (tmp_path / "share").mkdir()
    (tmp_path / "share" / FILE).write_bytes(files[FILE])
    path = fetch(
        FILE, sha256(files[FILE]), tmp_path / "cache", [(tmp_path / "share").as_uri()], progress=False
    )
    assert path.read_bytes() == files[FILE]


def test_no_network_says_so_in_one_line_and_names_the_alternatives(refused_url, tmp_path, monkeypatch):
    monkeypatch.setenv("CNNKIT_MNIST_MIRRORS", f"{refused_url} {refused_url}other/")
    with pytest.raises(DatasetError) as err:
        load_dataset("mnist", cache_dir=tmp_path, progress=False)
    message = str(err.value)
    assert "\n" not in message
    assert "no network" in message and "mnist-5k" in message and "idx:DIR" in message
    assert message.count("Connection refused") == 2
    assert list((tmp_path / "mnist").iterdir()) == []


def test_mirrors_environment_variable_replaces_the_default_mirrors(
    server, fake_mnist, refused_url, tmp_path, monkeypatch
):
    files, _ = fake_mnist
    serve(server, files, prefix="/override/")
    monkeypatch.setenv("CNNKIT_MNIST_MIRRORS", f"{server.url}/override/")
    ds = load_published(fake_spec(files, [refused_url]), cache_dir=tmp_path, progress=False)
    assert len(ds.train) == 12 and len(server.requests) == 4


def test_cache_folder_comes_from_cnnkit_data(monkeypatch, tmp_path):
    monkeypatch.setenv("CNNKIT_DATA", str(tmp_path / "data"))
    assert default_cache_dir() == tmp_path / "data"
    monkeypatch.delenv("CNNKIT_DATA")
    assert default_cache_dir().parts[-2:] == (".cache", "cnnkit")


# --- bounded downloads: published size, deadline, stale files, timeouts told from no network ---


def test_published_sizes_name_the_same_files_as_the_checksums():
    for spec in (MNIST, FASHION_MNIST):
        assert list(spec.sizes) == list(spec.checksums) and all(n > 1000 for n in spec.sizes.values())
    with pytest.raises(ValueError, match="same files"):
        dataclasses.replace(MNIST, sizes={FILE: 1})


def test_content_length_other_than_the_published_size_fails_that_mirror(server, fake_mnist, tmp_path):
    files, _ = fake_mnist
    server.routes["/m/" + FILE] = ("ok", files[FILE])
    size = len(files[FILE]) + 1
    with pytest.raises(
        DownloadError, match=f"announces {len(files[FILE]):,} bytes but the published file has"
    ):
        download(
            FILE, sha256(files[FILE]), tmp_path / "cache", [server.url + "/m/"], size=size, progress=False
        )
    assert list((tmp_path / "cache").iterdir()) == []


@pytest.mark.parametrize("behaviour", ["no length", "endless"])
def test_reading_stops_at_the_published_size(server, fake_mnist, tmp_path, behaviour):
    files, _ = fake_mnist
    server.routes["/m/" + FILE] = (behaviour, files[FILE] + b"and more")
    server.routes["/good/" + FILE] = ("ok", files[FILE])
    mirrors = [server.url + "/m/", server.url + "/good/"]
    path = download(FILE, sha256(files[FILE]), tmp_path, mirrors, size=len(files[FILE]), progress=False)
    assert path.read_bytes() == files[FILE]
    with pytest.raises(DownloadError, match=f"sent more than the published {len(files[FILE]):,} bytes"):
        download(
            FILE, sha256(files[FILE]), tmp_path / "2", mirrors[:1], size=len(files[FILE]), progress=False
        )


def test_a_trickling_server_is_cut_off_at_the_deadline(server, fake_mnist, tmp_path):
    files, _ = fake_mnist
    body = files[FILE] * (1 + 600 // len(files[FILE]))  # at one byte per 0.2 s: over 120 s in all
    server.routes["/m/" + FILE] = ("trickle", body)
    started = time.monotonic()
    with pytest.raises(DownloadError, match="did not finish in time") as err:
        download(
            FILE,
            sha256(files[FILE]),
            tmp_path / "cache",
            [server.url + "/m/"],
            progress=False,
            deadline=1.0,
        )
    # Cut off at the 1 s deadline, not at the end of the transfer: a bound between the two, generous
    # enough for a busy machine.
    assert time.monotonic() - started < 60
    assert err.value.timed_out and not err.value.unreachable and "no network" not in str(err.value)
    assert list((tmp_path / "cache").iterdir()) == []


def test_a_server_that_does_not_answer_is_told_apart_from_no_network(
    server, fake_mnist, refused_url, tmp_path
):
    files, _ = fake_mnist
    server.routes["/m/" + FILE] = ("stall", files[FILE])
    with pytest.raises(DownloadError) as err:
        download(
            FILE,
            sha256(files[FILE]),
            tmp_path,
            [server.url + "/m/", refused_url],
            timeout=0.2,
            progress=False,
        )
    message = str(err.value)
    assert err.value.timed_out and not err.value.unreachable
    assert "did not answer within 0.2 s" in message and "no network" not in message
    with pytest.raises(DownloadError, match="no network") as err:
        download(FILE, sha256(files[FILE]), tmp_path, [refused_url], progress=False)
    assert err.value.unreachable and not err.value.timed_out


def test_a_name_that_does_not_resolve_means_no_network(fake_mnist, tmp_path, monkeypatch):
    def no_dns(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    with pytest.raises(DownloadError, match=r"no network.*Name or service not known") as err:
        download(FILE, "sha256:00", tmp_path, ["http://mirror.example/"], progress=False)
    assert err.value.unreachable


def test_stale_temporary_files_of_a_killed_download_are_removed_at_the_next_start(
    server, fake_mnist, tmp_path
):
    files, _ = fake_mnist
    server.routes["/m/" + FILE] = ("ok", files[FILE])
    cache = tmp_path / "cache"
    cache.mkdir()
    stale = cache / f".{FILE}.k1ll3d.tmp"
    live = cache / ".t10k-images-idx3-ubyte.gz.l1v3.tmp"  # another process writing right now
    stale.write_bytes(b"half a file")
    live.write_bytes(b"growing")
    an_hour_ago = time.time() - 3600
    os.utime(stale, (an_hour_ago, an_hour_ago))
    fetch(FILE, sha256(files[FILE]), cache, [server.url + "/m/"], progress=False)
    assert sorted(p.name for p in cache.iterdir()) == sorted([FILE, live.name])
