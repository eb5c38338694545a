"""CI runs exactly the README's test commands, and they split the suite in two."""

import shlex
from pathlib import Path

from test_docs import blocks

ROOT = Path(__file__).resolve().parents[1]


def readme_test_commands() -> list[str]:
    """The ``python -m pytest`` commands of the README's bash blocks, in order."""
    found = []
    for block in blocks((ROOT / "README.md").read_text()):
        if block.language == "bash":
            for part in block.code.replace("\\\n", " ").split("&&"):
                if part.strip().startswith("python -m pytest"):
                    found.append(part.strip())
    return found


def test_ci_runs_the_readme_test_commands():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    ran = [line.strip() for line in ci if line.strip().startswith("python -m pytest")]
    assert ran == readme_test_commands()


def test_the_commands_run_fast_then_slow_tests_once():
    """The first command deselects exactly what the second one selects."""
    markers = []
    for command in readme_test_commands():
        words = shlex.split(command)
        assert words[:4] == ["python", "-m", "pytest", "tests"], command
        markers.append(words[words.index("-m", 4) + 1])
    assert markers == ["not slow", "slow"]
