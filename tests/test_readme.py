"""Every README snippet runs as written: each ```python block is executed on this machine (the blocks of one
``##`` section share a namespace, in order, since later blocks continue the example), and every command in a
```bash block names a module that answers --help and flags that module's --help lists.

A python block preceded by ``<!-- readme-test: skip (REASON) -->`` is skipped with that reason; any other error
fails. Bash blocks are not run (the first two are CI's and the main job), so their commands are checked whether
marked or not.
"""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
FENCE = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)
SKIP = re.compile(r"<!-- readme-test: skip \((.+?)\) -->\s*$")
MODULE = re.compile(r"(?:^|\s)-m\s+([\w.]+)")


class Block(NamedTuple):
    """One fenced code block of the README."""

    language: str
    code: str
    line: int
    section: str
    skip: Optional[str]


def readme_blocks(text: str) -> List[Block]:
    """The fenced blocks of text with their language, first line, ``##`` section and skip reason."""
    blocks = []
    for match in FENCE.finditer(text):
        before = text[:match.start()]
        sections = re.findall(r"^## (.+)$", before, re.M)
        skip = SKIP.search(before.rstrip() + "\n")
        blocks.append(Block(match.group(1), match.group(2), before.count("\n") + 1, sections[-1] if sections else "",
                            skip.group(1) if skip else None))
    return blocks


BLOCKS = readme_blocks(README.read_text())
PYTHON = [block for block in BLOCKS if block.language == "python"]
BASH = [block for block in BLOCKS if block.language == "bash"]


def test_the_first_two_bash_blocks_install_and_run_the_main_job_then_the_tests():
    """CI runs the second bash block (.ci/run); the first is the main job."""
    first, second = (block.code.strip() for block in BASH[:2])
    assert first.endswith("python -m bench") and '".[bench]"' in first
    assert second.endswith("python -m pytest tests -q -rs") and '".[test]"' in second
    assert README.read_text().index("```bash") > README.read_text().index("4x")  # the claim comes before the commands


def test_skip_markers_are_read():
    text = "## A\n<!-- readme-test: skip (needs a GPU) -->\n```python\nx = 1\n```\n\n```python\ny = 2\n```\n"
    assert [(b.skip, b.section, b.code) for b in readme_blocks(text)] == [("needs a GPU", "A", "x = 1\n"), (None, "A", "y = 2\n")]


@lru_cache(maxsize=None)
def _section_namespace(section: str) -> Dict[str, object]:
    return {"__name__": "__readme__"}


@pytest.mark.parametrize("block", PYTHON, ids=[f"line{block.line}" for block in PYTHON])
def test_python_block_runs(block, monkeypatch, tmp_path):
    if block.skip:
        pytest.skip(block.skip)
    monkeypatch.chdir(tmp_path)  # files the snippets write or look for are local to the test
    namespace = _section_namespace(block.section)
    earlier = [b for b in PYTHON if b.section == block.section and b.line < block.line and not b.skip
               and "__done" + str(b.line) not in namespace]
    for previous in earlier:  # when run alone (-k), the earlier blocks of the section first
        exec(compile(previous.code, f"README.md:{previous.line}", "exec"), namespace)
        namespace["__done" + str(previous.line)] = True
    exec(compile(block.code, f"README.md:{block.line}", "exec"), namespace)
    namespace["__done" + str(block.line)] = True


def commands(code: str) -> List[List[str]]:
    """The commands of a bash block: continuation lines joined, split at &&, ; and &, shell syntax left out."""
    joined = re.sub(r"\\\n", " ", code)
    result = []
    for line in joined.splitlines():
        line = line.split(" #")[0].strip()
        if not line or line.startswith("#"):
            continue
        for part in re.split(r"&&|;|(?<![>&])&(?!&)", line):
            try:
                words = shlex.split(part)
            except ValueError:
                continue
            if words:
                result.append(words)
    return result


def module_invocations() -> List[tuple]:
    """(line, module, flags) of every ``python -m X`` / ``torchrun ... -m X`` / ``pytest`` command in a bash block."""
    found = []
    for block in BASH:
        for words in commands(block.code):
            if words[0] == "pytest":
                words = ["python", "-m", "pytest", *words[1:]]
            if "-m" not in words or words[0] not in ("python", "torchrun"):
                continue
            module_at = words.index("-m") + 1
            flags = sorted({word.split("=")[0] for word in words[module_at + 1:] if word.startswith("--")})
            found.append((block.line, words[module_at], tuple(flags)))
    return found


INVOCATIONS = module_invocations()


@lru_cache(maxsize=None)
def module_help(module: str) -> subprocess.CompletedProcess:
    """``python -m module --help`` run from the repository root."""
    return subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_bash_blocks_name_modules():
    modules = {module for _, module, _ in INVOCATIONS}
    assert {"bench", "pytest", "mplug.run.train", "mplug.run.evaluate"} <= modules
    assert any(block.skip and "8 GPUs" in block.skip for block in BASH)  # the 8-GPU example says why it is not run here


@pytest.mark.parametrize("line, module, flags", INVOCATIONS, ids=[f"line{line}-{module}" for line, module, _ in INVOCATIONS])
def test_bash_command_module_and_flags_exist(line, module, flags):
    result = module_help(module)
    assert result.returncode == 0, f"README.md:{line}: python -m {module} --help failed:\n{result.stderr[-2000:]}"
    missing = [flag for flag in flags if not re.search(re.escape(flag) + r"(?![\w-])", result.stdout)]
    assert not missing, f"README.md:{line}: python -m {module} --help does not list {missing}"


def test_inline_python_m_commands_answer_help():
    """`python -m X` written in the prose (outside code blocks) names a module that answers --help too."""
    prose = FENCE.sub("", README.read_text())
    modules = sorted(set(re.findall(r"`python -m ([\w.]+)", prose)) - {module for _, module, _ in INVOCATIONS})
    failed = [module for module in modules if module_help(module).returncode != 0]
    assert not failed, f"python -m X --help fails for {failed}"


def setup_extras() -> Dict[str, set]:
    """setup.py's extras_require, package names only (version specifiers dropped)."""
    import ast

    tree = ast.parse((ROOT / "setup.py").read_text())
    call = next(node for node in ast.walk(tree) if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "setup")
    extras = ast.literal_eval(next(k.value for k in call.keywords if k.arg == "extras_require"))
    return {name: {re.split(r"[<>=; ]", requirement)[0] for requirement in requirements} for name, requirements in extras.items()}


def test_extras_table_lists_what_setup_installs():
    extras = setup_extras()
    rows = re.findall(r"^\| `\[(\w+)\]` \| (.+?) \|", README.read_text(), re.M)
    assert sorted(name for name, _ in rows) == sorted(extras)
    for name, listed in rows:
        items = [item.strip() for item in listed.replace(", and", ",").split(",")]
        included = [m.group(1) for m in (re.fullmatch(r"`\[(\w+)\]`'s", item) for item in items) if m]  # another extra's
        named = {re.split(r"[<>= ]", item)[0] for item in items if not item.startswith("`[")}
        assert named.union(*(extras[extra] for extra in included)) == extras[name], name


def test_the_planted_bug_count_is_the_mutation_lists():
    """The README's "plants N known bugs" is tests/kernel_mutations.py's MUTATIONS."""
    sys.path.insert(0, str(ROOT / "tests"))
    import kernel_mutations

    claimed = re.search(r"kernel_mutations.py` plants (\d+) known bugs", README.read_text())
    assert claimed and int(claimed.group(1)) == len(kernel_mutations.MUTATIONS)
