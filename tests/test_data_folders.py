"""folder:DIR read in one pass, in worker processes, and cached: the cache's keys, invalidation, bounds and
concurrency; a folder without train/ and test/ and its held-out test split; reading only the split a
command needs; scoring any folder (`--split all`, a folder of test photos)."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from cnnkit.data import cache, imagefolder, load_dataset, scoring_test_files, split_for_model
from cnnkit.data.imagefolder import ALL_TEST, HELD_OUT_MAX, ImageFile, held_out_files
from cnnkit.errors import CheckpointError, DatasetError, FileError
from cnnkit.record import ModelRecord


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Each test with its own empty cache folder, and the cache on (whatever the environment says)."""
    monkeypatch.setenv("CNNKIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("CNNKIT_CACHE_MB", raising=False)
    monkeypatch.delenv("CNNKIT_DATA_WORKERS", raising=False)
    return tmp_path / "cache" / "folders"


def make_folder(root, counts, size=(6, 5), mode="RGB", seed=0):
    """root/[SPLIT/]CLASS/i.png of random pixels for {"train/cat": n, ...} or {"cat": n, ...}, their
    modification times an hour ago (a file modified a moment ago is not cached: see imagefolder.RACY_NS)."""
    rng = np.random.default_rng(seed)
    channels = {"L": (), "RGB": (3,)}[mode]
    for folder, n in counts.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            pixels = rng.integers(0, 256, (*size, *channels)).astype(np.uint8)
            Image.fromarray(pixels, mode).save(root / folder / f"{i}.png")
    age(root)
    return root


def age(root, seconds=3600):
    then = time.time() - seconds
    for path in root.rglob("*"):
        os.utime(path, (then, then))


def entries(folder):
    return sorted(p.name for p in folder.glob("*.npy"))


def decoded_paths(monkeypatch):
    """The files decoded from now on in this process (CNNKIT_DATA_WORKERS=1: no worker processes)."""
    monkeypatch.setenv("CNNKIT_DATA_WORKERS", "1")
    seen = []
    real = imagefolder.read_image_and_shape

    def spy(path, min_size=None):
        seen.append(str(path))
        return real(path, min_size)

    monkeypatch.setattr(imagefolder, "read_image_and_shape", spy)
    return seen


def same(a, b):
    assert a.class_names == b.class_names and a.notes == b.notes
    for x, y in zip(a.splits, b.splits, strict=True):
        assert x.name == y.name
        np.testing.assert_array_equal(x.images, y.images)
        np.testing.assert_array_equal(x.labels, y.labels)


# --- one pass, in processes ---


def test_worker_processes_decode_exactly_what_one_process_does(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "d", {"train/a": 30, "train/b": 25, "test/a": 7, "test/b": 6}, (9, 7))
    monkeypatch.setenv("CNNKIT_CACHE_MB", "0")
    monkeypatch.setenv("CNNKIT_DATA_WORKERS", "1")
    serial = load_dataset(f"folder:{root}", image_size=(5, 4))
    monkeypatch.setenv("CNNKIT_DATA_WORKERS", "2")
    monkeypatch.setattr(imagefolder, "MAX_CHUNK_FILES", 4)  # many tasks, finishing in any order
    same(serial, load_dataset(f"folder:{root}", image_size=(5, 4)))
    assert serial.image_shape == (3, 5, 4) and len(serial.train) == 55 and len(serial.test) == 13


def test_each_file_is_opened_once(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "d", {"a": 4, "b": 3})
    opened = []
    real = Image.open
    monkeypatch.setattr(Image, "open", lambda fp, *a, **k: opened.append(str(fp)) or real(fp, *a, **k))
    monkeypatch.setenv("CNNKIT_DATA_WORKERS", "1")
    monkeypatch.setenv("CNNKIT_CACHE_MB", "0")
    load_dataset(f"folder:{root}", image_size=(6, 5), channels=3)
    assert sorted(opened) == sorted(str(p) for p in root.rglob("*.png"))


def test_a_wrong_guess_of_the_default_size_or_channels_is_decoded_again(tmp_path, monkeypatch):
    # Most images are 8x8 and one is color, but every header sampled says 4x4 gray.
    root = tmp_path / "d"
    (root / "a").mkdir(parents=True)
    for i in range(8):
        Image.new("RGB" if i == 7 else "L", (4, 4) if i < 2 else (8, 8), 90 + i).save(root / "a" / f"{i}.png")
    monkeypatch.setattr(imagefolder, "image_shape", lambda path: (4, 4, 1))
    monkeypatch.setenv("CNNKIT_CACHE_MB", "0")
    ds = load_dataset(f"folder:{root}", test_files=())
    assert ds.image_shape == (3, 8, 8)
    assert (
        ds.notes[0] == "images resized to 8x8 (height x width): the most common size, that of 6 of 8 images"
    )
    assert sorted(int(image[0, 4, 4]) for image in ds.train.images) == [90 + i for i in range(8)]


def test_a_progress_bar_counts_the_images_on_request(tmp_path, capsys, monkeypatch):
    root = make_folder(tmp_path / "d", {"a": 3, "b": 3})
    monkeypatch.setenv("CNNKIT_CACHE_MB", "0")
    load_dataset(f"folder:{root}", progress=True)
    err = capsys.readouterr().err
    assert f"decoding folder:{root} train: " in err and "/4 images" in err
    load_dataset(f"folder:{root}")  # not a terminal: no bar
    assert "decoding" not in capsys.readouterr().err


def test_an_unreadable_image_in_a_worker_is_one_error_naming_it(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "d", {"a": 20, "b": 20})
    (root / "b" / "7.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    monkeypatch.setenv("CNNKIT_DATA_WORKERS", "2")
    monkeypatch.setattr(imagefolder, "MAX_CHUNK_FILES", 3)
    with pytest.raises(FileError, match=r"b/7\.png: ") as info:
        load_dataset(f"folder:{root}")
    assert info.value.__cause__ is None and "\n" not in str(info.value)


def test_a_worker_that_dies_is_one_error_not_a_hang(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "d", {"a": 6, "b": 6})
    real = imagefolder.read_image_and_shape

    def dies_on_one(path, min_size=None):  # the workers are forked: they run this too
        if str(path).endswith("b/3.png"):
            os._exit(9)
        return real(path, min_size)

    monkeypatch.setattr(imagefolder, "read_image_and_shape", dies_on_one)
    monkeypatch.setenv("CNNKIT_DATA_WORKERS", "2")
    monkeypatch.setattr(imagefolder, "MAX_CHUNK_FILES", 2)
    with pytest.raises(FileError, match="ended unexpectedly"):
        load_dataset(f"folder:{root}", test_files=())


def test_bad_worker_counts_are_refused(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "d", {"a": 2, "b": 2})
    for value in ("0", "two", "-1"):
        monkeypatch.setenv("CNNKIT_DATA_WORKERS", value)
        with pytest.raises(DatasetError, match=f"CNNKIT_DATA_WORKERS={value!r}"):
            load_dataset(f"folder:{root}")


# --- the cache ---


def test_a_second_load_reads_the_cache_and_decodes_nothing(tmp_path, monkeypatch, own_cache):
    root = make_folder(tmp_path / "d", {"train/a": 5, "train/b": 4, "test/a": 2, "test/b": 2})
    first = load_dataset(f"folder:{root}")
    assert len(entries(own_cache)) == 2 and len(list(own_cache.glob("*.json"))) == 1
    seen = decoded_paths(monkeypatch)
    same(first, load_dataset(f"folder:{root}"))
    assert seen == []
    assert any(str(own_cache) in note for note in first.notes)


def test_the_cache_is_keyed_by_size_channels_and_every_files_path_size_and_mtime(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "d", {"a": 5, "b": 5})
    load_dataset(f"folder:{root}", test_files=())
    seen = decoded_paths(monkeypatch)

    def reads():
        seen.clear()
        return load_dataset(f"folder:{root}", test_files=()), len(seen)

    assert reads()[1] == 0
    assert load_dataset(f"folder:{root}", test_files=(), image_size=(3, 3)).image_shape == (3, 3, 3)
    assert len(seen) == 10  # another size: decoded
    seen.clear()
    assert load_dataset(f"folder:{root}", test_files=(), channels=1).image_shape == (1, 6, 5)
    assert len(seen) == 10
    Image.new("RGB", (5, 6), (255, 0, 0)).save(root / "a" / "0.png")  # rewritten: other bytes, mtime
    age(root)
    changed, count = reads()
    assert count == 10 and {tuple(image[:, 0, 0]) for image in changed.train.images} >= {(255, 0, 0)}
    assert reads()[1] == 0
    os.utime(root / "b" / "1.png", (time.time() - 60, time.time() - 60))  # touched, not changed
    assert reads()[1] == 10
    Image.new("RGB", (5, 6)).save(root / "b" / "new.png")
    os.utime(root / "b" / "new.png", (time.time() - 60, time.time() - 60))
    grown, count = reads()
    assert count == 11 and len(grown.train) == 11
    (root / "b" / "new.png").unlink()
    assert reads()[1] == 0  # back to the listing of before: its entry is still there


def test_a_folder_modified_a_moment_ago_is_read_but_not_cached(tmp_path, own_cache):
    root = make_folder(tmp_path / "d", {"a": 3, "b": 3})
    Image.new("RGB", (5, 6)).save(root / "a" / "0.png")  # just now: could change again in the same tick
    load_dataset(f"folder:{root}", test_files=())
    assert entries(own_cache) == []
    age(root)
    load_dataset(f"folder:{root}", test_files=())
    assert len(entries(own_cache)) == 1


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: data[: len(data) // 2],  # truncated
        lambda data: b"",  # empty
        lambda data: b"garbage" * 100,  # not .npy
        lambda data: data[:6] + b"\x09" + data[7:],  # another format version
        lambda data: data.replace(b"'shape': (", b"'shape': (1, ", 1),  # another shape: too short
        lambda data: data + b"\0" * 64,  # too long
    ],
)
def test_a_damaged_cache_entry_is_decoded_again_and_replaced(tmp_path, monkeypatch, own_cache, damage):
    root = make_folder(tmp_path / "d", {"a": 4, "b": 4})
    first = load_dataset(f"folder:{root}", test_files=())
    (entry,) = own_cache.glob("*.npy")
    entry.write_bytes(damage(entry.read_bytes()))
    seen = decoded_paths(monkeypatch)
    same(first, load_dataset(f"folder:{root}", test_files=()))
    assert len(seen) == 8
    seen.clear()
    same(first, load_dataset(f"folder:{root}", test_files=()))
    assert seen == []  # replaced by a good entry


def test_a_damaged_size_memo_is_ignored(tmp_path, own_cache):
    root = make_folder(tmp_path / "d", {"a": 4, "b": 4})
    first = load_dataset(f"folder:{root}", test_files=())
    for text in ("{", "[]", '{"image_size": [0, 5], "channels": 3, "note": null}', '{"channels": 2}'):
        (memo,) = own_cache.glob("*.json")
        memo.write_text(text)
        same(first, load_dataset(f"folder:{root}", test_files=()))


def test_a_read_only_or_missing_cache_folder_leaves_loading_working(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "d", {"a": 3, "b": 3})
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("CNNKIT_CACHE_DIR", str(blocker))  # CACHE_DIR/folders cannot be made
    assert len(load_dataset(f"folder:{root}", test_files=()).train) == 6


def test_the_cache_is_bounded_and_evicts_the_least_recently_used(tmp_path, monkeypatch, own_cache):
    # Each folder's entry holds 40 images of 3 x 64 x 64 = 480 KiB; the cache may hold 1 MiB: two.
    folders = [make_folder(tmp_path / f"d{i}", {"a": 20, "b": 20}, (64, 64), seed=i) for i in range(3)]
    monkeypatch.setenv("CNNKIT_CACHE_MB", "1")
    known = set()
    for i, root in enumerate(folders[:2]):
        load_dataset(f"folder:{root}", test_files=())
        for path in set(own_cache.iterdir()) - known:  # an older use for older entries, whatever the clock
            os.utime(path, (time.time() - 100 + i, time.time() - 100 + i))
            known.add(path)
    first_entry = min(own_cache.glob("*.npy"), key=lambda p: p.stat().st_mtime)
    load_dataset(f"folder:{folders[0]}", test_files=())  # used again: now the newest
    load_dataset(f"folder:{folders[2]}", test_files=())
    held = sum(p.stat().st_size for p in own_cache.iterdir())
    assert held <= 2**20 and first_entry.exists() and len(entries(own_cache)) == 2
    seen = decoded_paths(monkeypatch)
    load_dataset(f"folder:{folders[1]}", test_files=())
    assert len(seen) == 40  # evicted: decoded again


def test_cache_mb_0_turns_the_cache_off(tmp_path, monkeypatch, own_cache):
    root = make_folder(tmp_path / "d", {"a": 3, "b": 3})
    monkeypatch.setenv("CNNKIT_CACHE_MB", "0")
    ds = load_dataset(f"folder:{root}", test_files=())
    assert not own_cache.exists() and not any("cached" in note for note in ds.notes)
    monkeypatch.setenv("CNNKIT_CACHE_MB", "lots")
    with pytest.raises(DatasetError, match="CNNKIT_CACHE_MB='lots'"):
        load_dataset(f"folder:{root}")


def test_eviction_removes_temporary_files_a_killed_writer_left(own_cache):
    own_cache.mkdir(parents=True)
    stale, fresh = own_cache / ".x.npy.123.tmp", own_cache / ".y.npy.456.tmp"
    for path in (stale, fresh):
        path.write_bytes(b"half an entry")
    os.utime(stale, (time.time() - 2 * cache.STALE_TEMP_SECONDS,) * 2)
    cache.evict()
    assert not stale.exists() and fresh.exists()


def test_a_second_process_during_a_cache_write_sees_no_half_entry(tmp_path, monkeypatch, own_cache):
    """A writer in the middle of writing (its temporary file beside the entry) and a truncated entry of
    the same name (a copy cut short): a reader decodes, and replaces the entry with a complete one."""
    root = make_folder(tmp_path / "d", {"a": 5, "b": 5})
    first = load_dataset(f"folder:{root}", test_files=())
    (entry,) = own_cache.glob("*.npy")
    data = entry.read_bytes()
    (own_cache / f".{entry.name}.writing.tmp").write_bytes(data[: len(data) // 3])
    entry.write_bytes(data[: len(data) // 2])
    same(first, load_dataset(f"folder:{root}", test_files=()))
    assert entry.read_bytes() == data


_LOAD = """
import sys, numpy as np
from cnnkit.data import load_dataset
ds = load_dataset("folder:" + sys.argv[1])
np.save(sys.argv[2], ds.train.images)
"""


@pytest.mark.slow
def test_two_processes_loading_one_folder_at_once_both_end_with_a_valid_cache(tmp_path, own_cache):
    root = make_folder(tmp_path / "d", {"a": 300, "b": 300}, (32, 32))
    env = {**os.environ, "CNNKIT_CACHE_DIR": str(own_cache.parent), "CNNKIT_DATA_WORKERS": "2"}
    outs = [tmp_path / f"out{i}.npy" for i in range(2)]
    children = [
        subprocess.Popen([sys.executable, "-c", _LOAD, str(root), str(out)], env=env, stderr=subprocess.PIPE)
        for out in outs
    ]
    for child in children:
        assert child.wait(timeout=120) == 0, child.stderr.read()
    np.testing.assert_array_equal(np.load(outs[0]), np.load(outs[1]))
    assert not list(own_cache.glob("*.tmp")) and len(entries(own_cache)) == 2  # train and test
    cached = load_dataset(f"folder:{root}")
    np.testing.assert_array_equal(cached.train.images, np.load(outs[0]))


# --- a folder without train/ and test/: its held-out test split ---


def files(counts):
    return [
        ImageFile(f"/x/{c}/{i}.png", f"{c}/{i}.png", 1, 1, label)
        for label, (c, n) in enumerate(counts.items())
        for i in range(n)
    ]


def test_the_held_out_split_is_a_sixth_of_each_class_chosen_by_a_seeded_hash():
    listing = files({"cat": 60, "dog": 30, "owl": 2, "emu": 1})
    chosen = held_out_files(listing)
    per_class = {c: sum(p.startswith(f"{c}/") for p in chosen) for c in ("cat", "dog", "owl", "emu")}
    assert per_class == {"cat": 10, "dog": 5, "owl": 0, "emu": 0}
    assert held_out_files(list(reversed(listing))) == chosen
    grown = held_out_files(files({"cat": 66, "dog": 30, "owl": 2, "emu": 1}))
    assert {p for p in grown if p.startswith("dog/")} == {p for p in chosen if p.startswith("dog/")}


def test_a_large_folder_holds_out_at_most_held_out_max():
    chosen = held_out_files(files({"a": 40_000, "b": 35_000}))
    assert abs(len(chosen) - HELD_OUT_MAX) <= 1
    assert abs(sum(p.startswith("a/") for p in chosen) - HELD_OUT_MAX * 40 / 75) <= 1


def test_a_flat_folder_holds_out_a_test_split_and_lists_it(tmp_path):
    root = make_folder(tmp_path / "d", {"cat": 12, "dog": 6})
    ds = load_dataset(f"folder:{root}")
    assert len(ds.test) == 3 and len(ds.train) == 15 and sorted(ds.test.labels.tolist()) == [0, 0, 1]
    assert len(ds.test_files) == 3 and all(f.startswith(("cat/", "dog/")) for f in ds.test_files)
    assert any("held out as the test split" in note for note in ds.notes)
    everything = load_dataset(f"folder:{root}", test_files=ALL_TEST)
    assert everything.train is None and len(everything.test) == 18 and everything.test_files is None
    old = load_dataset(f"folder:{root}", test_files=())
    assert old.test is None and len(old.train) == 18


def test_recorded_test_files_stay_the_test_split_when_the_folder_changes(tmp_path):
    root = make_folder(tmp_path / "d", {"cat": 12, "dog": 6})
    recorded = load_dataset(f"folder:{root}").test_files
    make_folder(root, {"cat": 30}, seed=1)  # 18 more cats (0..11 rewritten, 12..29 new)
    gone = recorded[0]
    (root / gone).unlink()
    ds = load_dataset(f"folder:{root}", test_files=recorded)
    assert ds.test_files == recorded[1:] and len(ds.test) == 2 and len(ds.train) == 30 + 6 - 3
    assert any("1 of the 3 images held out" in note and gone in note for note in ds.notes)


def test_the_split_to_score_another_flat_folder_on():
    assert scoring_test_files("folder:/a", "folder:/a", ["x/1.png"]) == ("x/1.png",)
    assert scoring_test_files("folder:/a", "folder:/a", None) == ()  # a model from before: all training data
    assert scoring_test_files("folder:/b", "folder:/a", ["x/1.png"]) == ALL_TEST
    assert scoring_test_files("folder:/b", "folder:/a", None, "all") == ALL_TEST
    assert scoring_test_files("folder:/b", "folder:/a", None, "valid") == ()


# --- reading only the split a command needs, and --split all ---


def test_the_test_split_alone_decodes_no_training_photo(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "d", {"train/a": 6, "train/b": 6, "test/a": 2, "test/b": 3})
    seen = decoded_paths(monkeypatch)
    data, split = split_for_model(f"folder:{root}", (3, 6, 5), ["a", "b"], 2, "test")
    assert data.train is None and len(split) == 5
    assert seen and all("/test/" in path for path in seen)
    seen.clear()
    _, valid = split_for_model(f"folder:{root}", (3, 6, 5), ["a", "b"], 2, "valid")
    assert len(valid) == 2 and seen and all("/train/" in path for path in seen)


def test_split_all_scores_every_image(tmp_path):
    root = make_folder(tmp_path / "d", {"train/a": 6, "train/b": 6, "test/a": 2, "test/b": 3})
    _, every = split_for_model(f"folder:{root}", (3, 6, 5), ["b", "a"], 2, "all")
    assert every.name == "all" and len(every) == 17 and sorted(every.labels.tolist()) == [0] * 9 + [1] * 8
    _, digits = split_for_model("mnist-5k", (1, 28, 28), [str(d) for d in range(10)], 0, "all")
    assert len(digits) == 5000


def test_a_missing_split_says_how_to_score_another(tmp_path):
    root = make_folder(tmp_path / "d", {"train/a": 3, "train/b": 3})
    with pytest.raises(DatasetError, match=r"has no test split; try --split valid.*--split all"):
        split_for_model(f"folder:{root}", (3, 6, 5), ["a", "b"], 1, "test")
    flat = make_folder(tmp_path / "flat", {"a": 3, "b": 3})
    with pytest.raises(DatasetError, match="has no training images"):
        load_dataset(f"folder:{flat}", test_files=ALL_TEST, splits=("train",))


# --- through the command line and the record ---


@pytest.fixture(scope="module")
def flat_run(tmp_path_factory):
    """A tiny network trained 1 epoch on a folder of 20x20 gray pictures without train/ or test/: a
    horizontal bar, a vertical bar or a dot on noise, 18 of each."""
    from conftest import TINY

    from cnnkit.recipes import TrainConfig
    from cnnkit.runs import start_run

    root = tmp_path_factory.mktemp("flat") / "pictures"
    cache_dir = tmp_path_factory.mktemp("cache")
    rng = np.random.default_rng(0)
    shapes = {"bar-h": np.s_[9:11, 2:18], "bar-v": np.s_[2:18, 9:11], "dot": np.s_[8:12, 8:12]}
    for name, where in shapes.items():
        (root / name).mkdir(parents=True)
        for i in range(18):
            image = rng.integers(0, 60, (20, 20)).astype(np.uint8)
            image[where] = 230
            Image.fromarray(image).save(root / name / f"{i}.png")
    run = tmp_path_factory.mktemp("runs") / "flat"
    config = TrainConfig(epochs=1, seed=0, learning_rate=1e-3)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CNNKIT_CACHE_DIR", str(cache_dir))
        start_run(f"folder:{root}", config, run, architecture=TINY, valid_size=6, log=lambda line: None)
    return root, run


@pytest.mark.slow
def test_a_flat_folder_run_records_its_test_files_and_is_scored_on_them(cli, flat_run, tmp_path):
    from cnnkit.checkpoint import load_checkpoint

    root, run = flat_run
    record = load_checkpoint(run).record
    assert len(record.test_files) == 9 and record.valid_size == 6
    numbers = json.loads(cli("evaluate", run, "--json", "--precision", "fp32").out)
    assert numbers["split"] == "test" and numbers["n"] == 9
    assert json.loads(cli("evaluate", run, "--json", "--split", "all").out)["n"] == 54
    assert json.loads(cli("evaluate", run, "--json", "--split", "valid").out)["n"] == 6
    # A folder of test photos (class folders, no train/ or test/) is scored whole.
    photos = tmp_path / "photos"
    for name in ("dot", "bar-v"):
        (photos / name).mkdir(parents=True)
        for i in range(3):
            (photos / name / f"{i}.png").write_bytes((root / name / f"{i}.png").read_bytes())
    other = json.loads(cli("evaluate", run, "--dataset", f"folder:{photos}", "--json").out)
    assert other["split"] == "test" and other["n"] == 6
    report = cli("report", run, "--out", tmp_path / "report")
    assert report.code == 0 and "on 9 test images" in report.out, report.err


@pytest.mark.slow
def test_a_flat_folder_run_resumes_without_training_on_its_test_files(flat_run, tmp_path, monkeypatch):
    from cnnkit.checkpoint import load_checkpoint
    from cnnkit.runs import resume_run

    _, run = flat_run
    recorded = load_checkpoint(run).record.test_files
    seen, real = [], imagefolder._decode_into

    def spy(out, files, *args):
        seen.extend(f.relative for f in files)
        return real(out, files, *args)

    monkeypatch.setattr(imagefolder, "_decode_into", spy)
    resume_run(run, epochs=2, run_dir=tmp_path / "more", log=lambda line: None)
    assert load_checkpoint(tmp_path / "more").record.test_files == recorded
    assert len(seen) == 45 and not set(seen) & set(recorded)


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        (["cat/1.png"], "test_files must be an object"),
        ({"cat": "1.png"}, "must be a list of file names"),
        ({"../../etc": ["passwd"]}, "expected a path inside the dataset's folder"),
        ({"/etc": ["passwd"]}, "expected a path inside"),
        ({"": ["1.png"]}, "expected a path inside"),
        ({"cat": ["../1.png"]}, "expected a file name"),
        ({"cat": [".."]}, "expected a file name"),
        ({"cat": [1]}, "must be a list of file names"),
    ],
)
def test_a_malformed_test_files_field_is_one_error_naming_it(value, fragment):
    from test_record import tiny_record

    meta = {**tiny_record().to_dict(), "test_files": value}
    with pytest.raises(CheckpointError, match="checkpoint metadata field test_files") as info:
        ModelRecord.from_dict(meta, "m.safetensors")
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_test_files_round_trip_grouped_by_folder(tmp_path):
    from test_record import _saved, tiny_record

    from cnnkit.checkpoint import load_checkpoint

    record = tiny_record(test_files=("dog/b.png", "cat/x/1.png", "cat/2.png"))
    meta = record.to_dict()
    assert meta["test_files"] == {"cat": ["2.png"], "cat/x": ["1.png"], "dog": ["b.png"]}
    _saved(tmp_path, record)
    assert load_checkpoint(tmp_path).record.test_files == ("cat/2.png", "cat/x/1.png", "dog/b.png")
    assert ModelRecord.from_dict({**meta, "test_files": None}, "m").test_files is None


def test_one_opening_gives_the_pixels_and_the_full_size_shape(tmp_path):
    from cnnkit.images import image_shape, read_image, read_image_and_shape

    exif = Image.Exif()
    exif[0x0112] = 6  # stored on its side
    Image.new("RGB", (400, 200), (10, 20, 30)).save(tmp_path / "side.jpg", exif=exif)
    Image.new("LA", (90, 60)).save(tmp_path / "gray-alpha.png")
    for name in ("side.jpg", "gray-alpha.png"):
        pixels, shape = read_image_and_shape(tmp_path / name, min_size=(20, 20))
        assert shape == image_shape(tmp_path / name)
        np.testing.assert_array_equal(pixels, read_image(tmp_path / name, min_size=(20, 20)))
    assert image_shape(tmp_path / "side.jpg") == (400, 200, 3)
