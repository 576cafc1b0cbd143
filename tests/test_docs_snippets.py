"""Every example in README.md and docs/*.md runs, so the documentation cannot drift from the command line.

The examples are the ```bash and ```python blocks of README.md and of every docs/*.md (found afresh at
each run, so a new page is tested as soon as it exists). A line `<!-- not run: REASON -->` just above
a block keeps it from running; REASON must say why (it installs packages, needs two machines, ...).

The quick suite:
- parses every `cnnkit` command with cnnkit's own parser (`cnnkit.cli.build_parser`): each command of
  a bash block, run or not (`cnnkit`, `.venv/bin/cnnkit`, `python -m cnnkit`, `torchrun ... -m cnnkit`),
  each `$ cnnkit ...` line of an output block, and each inline `cnnkit ...` code span that is a
  command rather than a synopsis (no `[`, `|` or `...`). An inline span, or a command of a block that
  holds a `...` word, is a mention: it may leave out arguments, but every option it names must exist
  and every value it gives must be one the option takes;
- runs the `>>>` blocks as doctests (outputs compared) and the cheap commands (`cnnkit explain`,
  `cnnkit data info` of mnist-5k or a folder) in this process, in a sandbox (below);
- checks that docs/training.md's table of options names exactly the options of `cnnkit train`, that
  relative links, images and #anchors resolve, and that each `not run` mark gives a reason.

The slow suite runs each file's blocks, in order, in a sandbox of its own: bash blocks a line at a
time with bash (with cnnkit's interpreter's bin/ first on PATH, and `.venv` linking to its
environment), python blocks in a fresh interpreter; each must exit 0 (and a `curl` must not answer
`{"error": ...}`). `cnnkit serve` runs in the background on a free port until the file's next `serve`
or its end, then gets Ctrl-C (exit 130); `http://127.0.0.1:8000` in the lines between is replaced by
the server's address.

The sandbox holds what the examples take for granted: `examples/` (the repository's), `photos/` (the
README's folder tree: train/ and test/ folders of cat, dog and fox, here drawn shapes of 20x20 pixels,
one shape per class), `my-photo.jpg`, and in the slow suite `runs/quickstart`, made once per test run
by the two cnnkit commands of the README's Quick start (which then read the two example digits).
Datasets download into, and decoded photos are cached in, the sandbox ($CNNKIT_DATA, $CNNKIT_CACHE_DIR);
the compiled kernels are the user's (its `extensions/` links to them).
"""

import argparse
import contextlib
import doctest
import fcntl
import glob
import io
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
DOC_IDS = [str(path.relative_to(ROOT)) for path in DOCS]
NOT_RUN = re.compile(r"^<!--\s*not run:(.*?)-->\s*$")
FENCE = re.compile(r"^```(\w*)\s*$")
SERVED = "http://127.0.0.1:8000"
COMMAND_TIMEOUT = 600


@dataclass
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    not_run: str | None  # the reason, for a block marked `<!-- not run: REASON -->`

    def __str__(self):
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks(path) -> list[Block]:
    """The fenced blocks of a Markdown file, in order."""
    found, lines, i = [], Path(path).read_text().splitlines(), 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
        assert end is not None, f"{path}:{i + 1}: a code block that never closes"
        above = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        mark = NOT_RUN.match(above.strip())
        text = "\n".join(lines[i + 1 : end]) + "\n"
        found.append(
            Block(Path(path), i + 1, opening.group(1), text, mark.group(1).strip() if mark else None)
        )
        i = end + 1
    return found


def prose(path) -> str:
    """A Markdown file without its fenced blocks."""
    text = Path(path).read_text()
    return re.sub(r"^```\w*\s*$.*?^```\s*$", "", text, flags=re.S | re.M)


def command_lines(block: Block) -> list[str]:
    """A bash block's commands, one per line: continuation lines joined, blank and comment lines dropped."""
    lines = block.text.replace("\\\n", " ").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def words(line: str) -> list[str]:
    """A shell line as words, its comment dropped; `&&`, `||`, `;` and `|` are words of their own."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    return list(lexer)


def cnnkit_commands(line: str) -> list[list[str]]:
    """The argument lists given to cnnkit by a shell line's commands (`a && b | c`), in order."""
    found, segment = [], []
    for word in [*words(line), ";"]:
        if word not in ("&&", "||", ";", "|", "&"):
            segment.append(word)
            continue
        argv = cnnkit_argv(segment)
        if argv is not None:
            found.append(argv)
        segment = []
    return found


def cnnkit_argv(command: list[str]) -> list[str] | None:
    """`cnnkit ARGS`, `.venv/bin/cnnkit ARGS`, `python -m cnnkit ARGS` or `torchrun ... -m cnnkit ARGS`:
    ARGS; None for any other command. Leading `NAME=value` assignments are skipped."""
    while command and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", command[0]):
        command = command[1:]
    if not command:
        return None
    program = Path(command[0]).name
    if program == "cnnkit":
        return command[1:]
    if program.startswith("python") or program == "torchrun":
        for i in range(1, len(command) - 1):
            if command[i] == "-m" and command[i + 1] == "cnnkit":
                return command[i + 2 :]
    return None


def parse_error(argv: list[str], partial: bool = False) -> str | None:
    """None if cnnkit's parser takes `argv`, else what it said. With `partial` (an inline mention such
    as `cnnkit data info`, `cnnkit train --seed` or `cnnkit train --epochs N`) required arguments and
    option values may be missing or be placeholders (a word in capitals), but every option must exist
    and every value given must be one the option takes."""
    from cnnkit.cli import build_parser

    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            build_parser().parse_args(argv)
    except SystemExit as exit:
        said = err.getvalue().strip() or f"exit {exit.code}"
        if exit.code in (0, None):
            return None
        if not partial:
            return said
        if unknown := unknown_options(argv):
            return f"no such option: {', '.join(unknown)}"
        missing = ("the following arguments are required", "expected one argument")
        placeholders = [w for w in argv if re.fullmatch(r"[A-Z][A-Z0-9_]*", w)]
        if any(m in said for m in missing) or any(f"'{w}'" in said for w in placeholders):
            return None
        return said
    return None


def unknown_options(argv: list[str]) -> list[str]:
    """The `--options` in `argv` that its (sub)command does not have."""
    from cnnkit.cli import build_parser

    parser, words = build_parser(), list(argv)
    while words:
        commands = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not commands or words[0] not in commands[0].choices:
            break
        parser = commands[0].choices[words.pop(0)]
    known = {o for a in parser._actions for o in a.option_strings}
    return [w for w in words if w.startswith("--") and w.split("=")[0] not in known]


def every_command(path) -> list[tuple[str, list[str], bool]]:
    """(where, argv, partial) for each cnnkit command a Markdown file names."""
    found = []
    for block in blocks(path):
        if block.lang == "bash":
            for line in command_lines(block):
                for argv in cnnkit_commands(line):  # `cnnkit train ...`: a sketch, checked as a mention
                    found.append((str(block), [w for w in argv if w != "..."], "..." in argv))
        elif block.lang != "python":
            for line in block.text.splitlines():
                if line.startswith("$ "):
                    found += [(str(block), argv, False) for argv in cnnkit_commands(line[2:])]
    for span in re.findall(r"`(cnnkit [^`\n]+)`", prose(path)):
        if not any(mark in span for mark in ("[", "|", "...")):
            found += [
                (f"{Path(path).relative_to(ROOT)}: `{span}`", argv, True) for argv in cnnkit_commands(span)
            ]
    return found


# --- the sandbox ---


def draw_photo(path, shape: str, size, rng: random.Random):
    """A JPEG of one dark shape (circle, square or triangle) on a light background."""
    from PIL import Image, ImageDraw

    width, height = size
    image = Image.new("RGB", size, tuple(rng.randrange(160, 256) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    r = rng.uniform(0.25, 0.4) * min(size)
    cx, cy = rng.uniform(r, width - r), rng.uniform(r, height - r)
    colour = tuple(rng.randrange(0, 110) for _ in range(3))
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=colour)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    image.save(path, quality=90)


def make_sandbox(folder: Path) -> Path:
    """examples/, photos/ (train/ and test/ of cat, dog and fox), my-photo.jpg and a `.venv` link."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copytree(ROOT / "examples", folder / "examples", dirs_exist_ok=True)
    rng = random.Random(0)
    for split, count in (("train", 12), ("test", 4)):
        for name, shape in (("cat", "circle"), ("dog", "square"), ("fox", "triangle")):
            (folder / "photos" / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(1, count + 1):
                draw_photo(folder / "photos" / split / name / f"{i:04d}.jpg", shape, (20, 20), rng)
    draw_photo(folder / "my-photo.jpg", "square", (40, 30), rng)
    if not (folder / ".venv").exists():
        (folder / ".venv").symlink_to(sys.prefix)
    # A cache folder of its own (decoded photos), sharing the user's compiled kernels (built once).
    kernels = Path(os.environ.get("CNNKIT_CACHE_DIR") or Path.home() / ".cache" / "cnnkit") / "extensions"
    kernels.mkdir(parents=True, exist_ok=True)
    (folder / ".cache").mkdir(exist_ok=True)
    if not (folder / ".cache" / "extensions").exists():
        (folder / ".cache" / "extensions").symlink_to(kernels)
    return folder


def sandbox_env(folder: Path) -> dict:
    """The environment of the sandbox's commands: cnnkit's interpreter first on PATH, and the data and
    cache folders in the sandbox (nothing downloaded or cached outside it)."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {
        **os.environ,
        "PATH": path,
        "CNNKIT_DATA": str(folder / ".data"),
        "CNNKIT_CACHE_DIR": str(folder / ".cache"),
    }


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    folder = make_sandbox(tmp_path / "sandbox")
    monkeypatch.chdir(folder)
    return folder


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory, request):
    """runs/quickstart, made by the README's Quick start's cnnkit commands; once per test run, shared
    by pytest-xdist's workers through a lock in their common temporary folder."""
    root = tmp_path_factory.getbasetemp()
    if hasattr(request.config, "workerinput"):
        root = root.parent
    folder = root / "docs-quickstart"
    with open(root / "docs-quickstart.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / "done").exists():
            make_sandbox(folder)
            setup = next(b for b in blocks(ROOT / "README.md") if b.lang == "bash")
            commands = cnnkit_commands(command_lines(setup)[0])
            assert [argv[0] for argv in commands] == ["train", "predict"], commands
            for argv in commands:
                result = subprocess.run(
                    [".venv/bin/cnnkit", *argv],
                    cwd=folder,
                    env=sandbox_env(folder),
                    capture_output=True,
                    text=True,
                    timeout=COMMAND_TIMEOUT,
                )
                assert result.returncode == 0, (argv, result.stdout[-2000:], result.stderr[-2000:])
            read = [line.split(": ")[1].split()[0] for line in result.stdout.splitlines()]
            assert read == ["7", "2"], result.stdout  # the Quick start reads examples/seven.png and two.png
            (folder / "done").write_text("ok\n")
    return folder / "runs" / "quickstart"


# --- the quick suite ---


@pytest.mark.parametrize("path", DOCS, ids=DOC_IDS)
def test_every_cnnkit_command_parses(path):
    failures = [
        f"{where}: cnnkit {shlex.join(argv)}: {said}"
        for where, argv, partial in every_command(path)
        if (said := parse_error(argv, partial)) is not None
    ]
    assert not failures, "\n".join(failures)


def test_the_commands_are_found():
    """The parser test sees the README's commands, including the Quick start's and the inline ones."""
    named = {shlex.join(argv) for _, argv, _ in every_command(ROOT / "README.md")}
    assert "train --dataset mnist-5k --out runs/quickstart --overwrite --keep 1" in named
    assert "data info folder:photos" in named and "report runs/quickstart" in named
    assert cnnkit_commands("A=1 torchrun --nproc-per-node 2 -m cnnkit train --epochs 2 # x") == [
        ["train", "--epochs", "2"]
    ]
    # An inline mention may leave values out, but not name a value or an option that does not exist.
    assert parse_error(["train", "--resume", "RUN", "--epochs", "N"], partial=True) is None
    assert "invalid choice" in parse_error(
        ["predict", "RUN", "a.png", "--preprocess", "resize-dark"], partial=True
    )
    assert "no such option" in parse_error(["train", "--no-such-option"], partial=True)


def test_every_not_run_mark_says_why():
    for path in DOCS:
        text = path.read_text()
        for mark in re.findall(r"<!--\s*not run\b(.*?)-->", re.sub(r"`[^`\n]*`", "", prose(path)), re.S):
            assert mark.startswith(":") and len(mark[1:].strip()) >= 10, f"{path}: not run{mark}"
        for n, line in enumerate(text.splitlines(), 1):
            if NOT_RUN.match(line.strip()):
                assert any(b.line > n and b.not_run for b in blocks(path)), f"{path}:{n}: marks no block"


def test_the_training_table_names_every_option_of_cnnkit_train():
    from cnnkit.cli import build_parser

    commands = next(a for a in build_parser()._actions if a.dest == "command")
    options = {o for a in commands.choices["train"]._actions for o in a.option_strings if o.startswith("--")}
    options.discard("--help")
    rows = [
        line for line in (ROOT / "docs" / "training.md").read_text().splitlines() if line.startswith("| `--")
    ]
    listed = {o for row in rows for o in re.findall(r"--[a-z][a-z0-9-]*", row.split(" | ")[0])}
    assert listed == options, (sorted(options - listed), sorted(listed - options))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_images_and_anchors_resolve():
    problems = []
    for path in DOCS:
        for target in re.findall(r"!?\[[^\]]*\]\(([^)\s]+)\)", prose(path)):
            if re.match(r"^[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            linked = (path.parent / file).resolve() if file else path
            if not linked.exists():
                problems.append(f"{path.relative_to(ROOT)}: {target}: no such file")
            elif anchor:
                headings = re.findall(r"^#+ (.*)$", prose(linked), re.M)
                if anchor not in {slug(h) for h in headings}:
                    problems.append(f"{path.relative_to(ROOT)}: {target}: no such heading")
    assert not problems, "\n".join(problems)


def test_the_screenshots_are_small():
    for name in ("report.png", "serve.png"):
        assert (ROOT / "docs" / name).stat().st_size < 300_000, name


@pytest.mark.parametrize("path", DOCS, ids=DOC_IDS)
def test_doctest_blocks_run(path):
    for block in blocks(path):
        if block.lang == "python" and block.text.lstrip().startswith(">>>") and not block.not_run:
            test = doctest.DocTestParser().get_doctest(block.text, {}, str(block), str(path), block.line)
            said = []
            result = doctest.DocTestRunner().run(test, out=said.append)
            assert result.failed == 0, "".join(said)


def cheap(argv: list[str]) -> bool:
    """A command that takes a second or two and needs neither a trained run nor a download."""
    if argv[:1] == ["explain"]:
        return True
    return argv[:2] == ["data", "info"] and len(argv) > 2 and argv[2].startswith(("mnist-5k", "folder:"))


def test_cheap_commands_run(sandbox, capsys):
    """The first cheap command of each kind (`explain conv1d`, `explain conv2d`, `explain pool`, `data
    info` of mnist-5k and of a folder), in this process; the slow suite runs them all."""
    from cnnkit.cli import main

    ran = {}
    for path in DOCS:
        for block in blocks(path):
            if block.lang == "bash" and not block.not_run:
                for line in command_lines(block):
                    for argv in filter(cheap, cnnkit_commands(line)):
                        kind = (
                            argv[0],
                            argv[1].split(":")[0] if argv[0] == "explain" else argv[2].split(":")[0],
                        )
                        if kind not in ran:
                            assert main(argv) == 0, (str(block), argv, capsys.readouterr().err[-2000:])
                            ran[kind] = argv
    assert {("explain", "conv2d"), ("data", "mnist-5k"), ("data", "folder")} <= set(ran), ran


# --- the slow suite: every block, in order ---


class Server:
    """`cnnkit serve ARGS` with --port 0, in the background."""

    def __init__(self, argv, folder):
        argv = [match for word in argv for match in (sorted(glob.glob(word, root_dir=folder)) or [word])]
        if "--port" in argv:
            argv[argv.index("--port") + 1] = "0"
        else:
            argv += ["--port", "0"]
        self.argv = argv
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cnnkit", *argv],
            cwd=folder,
            env=sandbox_env(folder),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        line = self.proc.stdout.readline()
        assert " at http://" in line, (argv, line, self.proc.poll())
        self.url = line.split(" at ")[1].split()[0].rstrip("/")
        with urllib.request.urlopen(self.url + "/api/models", timeout=60) as answer:
            assert answer.status == 200

    def stop(self):
        self.proc.send_signal(signal.SIGINT)
        _, err = self.proc.communicate(timeout=60)
        assert self.proc.returncode == 130 and "Traceback" not in err, (self.argv, err[-2000:])


def run_bash_block(block: Block, folder: Path, servers: list):
    """Run a bash block's lines; `servers` holds the `cnnkit serve` still running from an earlier line."""
    for line in command_lines(block):
        serve = [argv for argv in cnnkit_commands(line) if argv[:1] == ["serve"]]
        if serve:
            while servers:
                servers.pop().stop()
            servers.append(Server(serve[0], folder))
            continue
        if servers:
            line = line.replace(SERVED, servers[-1].url)
        started = time.monotonic()
        result = subprocess.run(
            ["bash", "-o", "pipefail", "-c", line],
            cwd=folder,
            env=sandbox_env(folder),
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
        )
        failed = result.returncode != 0 or (line.startswith("curl") and '{"error"' in result.stdout)
        assert not failed, (
            f"{block}: {line}\nexit {result.returncode} after {time.monotonic() - started:.1f} s\n"
            f"{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
        )


def run_python_block(block: Block, folder: Path):
    if block.text.lstrip().startswith(">>>"):
        test = doctest.DocTestParser().get_doctest(block.text, {}, str(block), str(block.path), block.line)
        said = []
        assert doctest.DocTestRunner().run(test, out=said.append).failed == 0, "".join(said)
        return
    script = folder / f"snippet-{block.line}.py"
    script.write_text(block.text)
    result = subprocess.run(
        [sys.executable, script.name],
        cwd=folder,
        env=sandbox_env(folder),
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
    )
    assert result.returncode == 0, f"{block}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"


def runnable(path) -> list[Block]:
    return [b for b in blocks(path) if b.lang in ("bash", "python") and not b.not_run]


RUNNABLE = [path for path in DOCS if runnable(path)]


# Minutes a page (the README's alone: 160 s on 2 cores, training both networks): `pytest -m docs`, outside
# CI's 5 minutes; CI checks every command against the parser and runs the cheap ones instead (above).
@pytest.mark.slow
@pytest.mark.docs
@pytest.mark.parametrize("path", RUNNABLE, ids=[str(path.relative_to(ROOT)) for path in RUNNABLE])
def test_every_block_runs_in_order(path, tmp_path, quickstart_run):
    folder = make_sandbox(tmp_path / "sandbox")
    shutil.copytree(quickstart_run, folder / "runs" / "quickstart", ignore=shutil.ignore_patterns(".lock"))
    servers = []
    try:
        for block in runnable(path):
            if block.lang == "bash":
                run_bash_block(block, folder, servers)
            else:
                run_python_block(block, folder)
        while servers:
            servers.pop().stop()
    finally:
        for server in servers:
            server.proc.kill()
            server.proc.communicate()
