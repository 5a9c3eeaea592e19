"""The repository's promises: every example complete and standalone, docs that match the code,
pins that agree, lint-clean Dockerfiles and workflows, and a CI script that is the Quickstart."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.shared.dockerfiles import pins
from tests.shared.harness import EXAMPLES, REPO

PRESENT = [example for example in EXAMPLES if (REPO / example).is_dir()]
EXAMPLE_FILES = ("handler.py", "Dockerfile", "requirements.txt", "test_input.json", "README.md", "local_run.py")


def env_vars_read(handler: Path) -> set[str]:
    source = handler.read_text()
    found = set(re.findall(r"""(?:os\.environ\.get|os\.getenv|env_[a-z]+)\(\s*["']([A-Z][A-Z0-9_]+)["']""", source))
    # A copied module's settings: its CONFIGURATION tuple (device.py, hub_cache.py; their tests check
    # that they read nothing else).
    for module in sorted(handler.parent.glob("*.py")):
        if match := re.search(r"^CONFIGURATION = (\(.*?\))", module.read_text(), re.M | re.S):
            found |= set(ast.literal_eval(match[1]))
    return found


def env_vars_documented(readme: Path) -> set[str]:
    """Names in the first column of the table under the README's "## Configuration" heading."""
    text = readme.read_text()
    section = text.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\|\s*`([A-Z][A-Z0-9_]+)`\s*\|", section, flags=re.MULTILINE))


def test_all_four_examples_exist() -> None:
    # Every test below is parametrized over PRESENT: a missing folder would silently shrink them.
    assert PRESENT == list(EXAMPLES) and len(PRESENT) == 4, PRESENT


@pytest.mark.parametrize("example", PRESENT)
def test_example_folder_is_complete(example: str) -> None:
    missing = [name for name in EXAMPLE_FILES if not (REPO / example / name).is_file()]
    assert not missing, f"{example} lacks {missing}"


@pytest.mark.parametrize("example", PRESENT)
def test_examples_import_nothing_from_other_examples(example: str) -> None:
    for source in (REPO / example).glob("*.py"):
        text = source.read_text()
        for other in EXAMPLES:
            assert other not in text.replace(example, ""), f"{source} refers to {other}"
        assert not re.search(r"^\s*(from|import)\s+tests\b", text, flags=re.MULTILINE)


@pytest.mark.parametrize("example", PRESENT)
def test_readme_documents_exactly_the_env_vars_the_handler_reads(example: str) -> None:
    read = env_vars_read(REPO / example / "handler.py")
    documented = env_vars_documented(REPO / example / "README.md")
    assert read, "the handler reads no configuration?"
    assert read - documented == set(), "read by handler.py but not in the README's Configuration table"
    assert documented - read == set(), "in the README's Configuration table but never read by handler.py"


@pytest.mark.parametrize("example", PRESENT)
def test_example_pins_agree_with_the_tested_versions(example: str) -> None:
    tested = pins(REPO / "requirements-dev.txt")
    example_pins = pins(REPO / example / "requirements.txt")
    assert example_pins, f"{example}/requirements.txt pins nothing"
    unpinned = [
        line
        for line in (REPO / example / "requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#") and "==" not in line
    ]
    assert not unpinned, f"unpinned requirements: {unpinned}"
    for package, version in example_pins.items():
        assert tested.get(package) == version, f"{package}=={version} in {example}, {tested.get(package)} in tests"


def test_torchvision_is_never_installed() -> None:
    files = [REPO / "requirements-dev.txt", *REPO.glob("0*/requirements.txt"), *REPO.glob("tests/requirements*.txt")]
    for requirements in files:
        assert "torchvision" not in pins(requirements), requirements


@pytest.mark.parametrize("example", PRESENT)
def test_dockerfile_is_hadolint_clean(example: str) -> None:
    hadolint = shutil.which("hadolint")
    assert hadolint, "hadolint missing: pip install -r requirements-dev.txt"
    run = subprocess.run([hadolint, "Dockerfile"], cwd=REPO / example, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


@pytest.mark.parametrize("example", PRESENT)
def test_dockerfile_copies_every_module_the_handler_needs(example: str) -> None:
    dockerfile = (REPO / example / "Dockerfile").read_text()
    handler = (REPO / example / "handler.py").read_text()
    siblings = {path.stem for path in (REPO / example).glob("*.py")}
    imported = set(re.findall(r"^(?:from|import) (\w+)", handler, flags=re.MULTILINE)) & siblings
    assert imported, "the handler imports none of its folder's modules?"
    for module in imported:
        assert f"{module}.py" in dockerfile, f"{module}.py is not copied into the image"
    assert 'CMD ["python", "-u", "handler.py"]' in dockerfile


def test_workflows_are_actionlint_clean() -> None:
    actionlint = shutil.which("actionlint")
    assert actionlint, "actionlint missing: pip install -r requirements-dev.txt"
    run = subprocess.run([actionlint], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def test_code_is_ruff_clean() -> None:
    for command in (["ruff", "check", "."], ["ruff", "format", "--check", "."]):
        run = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
        assert run.returncode == 0, run.stdout + run.stderr


def test_ci_runs_exactly_the_readme_quickstart() -> None:
    readme = (REPO / "README.md").read_text()
    ci_commands = [
        line.strip()
        for line in (REPO / ".ci" / "run").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith(("#", "set ", "cd "))
    ]
    assert ci_commands == [
        "pip install --require-hashes --no-deps -r requirements-dev.lock",
        "pytest -n auto",
        "bash tests/vllm_cpu.sh",
        "bash tests/openvino_cpu.sh",
        "bash tests/built_images.sh",
    ]
    quickstart = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    for command in ci_commands:
        assert command in quickstart
