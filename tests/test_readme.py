"""The README's quick start: exactly two commands, the second being what CI runs."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def quick_start_commands():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, re.S)]


def test_quick_start_has_exactly_two_one_line_commands():
    commands = quick_start_commands()
    assert len(commands) == 2
    assert all("\n" not in command for command in commands)
    setup, tests = commands
    assert (
        "torch==2.13.0" in setup and "cnnkit train --dataset mnist-5k" in setup and "cnnkit predict" in setup
    )
    assert "torch==2.13.0" in tests and tests.endswith(".venv/bin/python -m pytest")
    # Both make and use a virtual environment, so they work where pip refuses the system Python (PEP 668).
    for command in commands:
        assert command.startswith("python3 -m venv .venv && .venv/bin/pip install")
        assert " pip " not in command.replace(".venv/bin/pip install", "")


def test_ci_runs_the_quick_start_test_command():
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert quick_start_commands()[1] in ci_lines


def test_the_quick_start_images_exist():
    for path in re.findall(r"examples/\S+\.png", quick_start_commands()[0]):
        assert (ROOT / path).is_file(), path
