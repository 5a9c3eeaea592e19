"""The tiny models' on-disk cache (tests/shared/tiny_models/cache.py): its key, hits, and builds
that fail or race; and the package's command line."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.shared import tiny_models
from tests.shared.harness import REPO
from tests.shared.tiny_models import cache


def test_the_key_covers_the_package_sources_and_the_library_versions(tmp_path: Path) -> None:
    assert tiny_models.cache_key() == cache.cache_key(cache.source_files(), cache.library_versions())
    assert {path.name for path in cache.source_files()} >= {"__init__.py", "cache.py", "text.py", "image.py"}
    sources = []
    for path in cache.source_files():
        (tmp_path / path.name).write_bytes(path.read_bytes())
        sources.append(tmp_path / path.name)
    versions = cache.library_versions()
    key = cache.cache_key(sources, versions)
    assert key == tiny_models.cache_key()

    (tmp_path / "text.py").write_text((tmp_path / "text.py").read_text() + "\n# a builder changed\n")
    assert cache.cache_key(sources, versions) != key
    (tmp_path / "text.py").write_bytes((cache.PACKAGE / "text.py").read_bytes())
    assert cache.cache_key(sources, versions) == key

    assert cache.cache_key(sources, versions | {"transformers": "0.0.1"}) != key
    assert cache.cache_key(sources, versions | {"peft": "absent"}) != cache.cache_key(sources, versions | {"peft": "1"})
    assert cache.cache_key(sources, versions | {"python": "3.99.0"}) != key


def test_a_missing_library_is_absent_in_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cache, "LIBRARIES", ("torch", "no-such-distribution-here"))
    versions = cache.library_versions()
    assert versions["no-such-distribution-here"] == "absent" and versions["torch"] not in ("", "absent")
    assert set(versions) == {"python", "torch", "no-such-distribution-here"}


def test_the_cache_lives_where_tiny_models_cache_says(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TINY_MODELS_CACHE", str(tmp_path))
    assert cache.cache_root() == tmp_path
    monkeypatch.delenv("TINY_MODELS_CACHE")
    assert cache.cache_root() == Path.home() / ".cache" / "runpod-workers" / "tiny-models"


def counting_builder(calls: list[str]) -> Callable[[str, Path], Path]:
    def build(kind: str, out: Path) -> Path:
        calls.append(kind)
        (out / "config.json").write_text(f'{{"kind": "{kind}"}}')
        return out

    return build


def test_the_second_request_is_a_hit_without_building(tmp_path: Path) -> None:
    calls: list[str] = []
    build = counting_builder(calls)
    first = cache.cached("llama", root=tmp_path, key="k", build=build)
    assert first == tmp_path / "k" / "llama" and (first / "config.json").read_text() == '{"kind": "llama"}'
    assert cache.cached("llama", root=tmp_path, key="k", build=build) == first
    assert calls == ["llama"]
    assert cache.cached("llama", root=tmp_path, key="other", build=build) == tmp_path / "other" / "llama"
    assert calls == ["llama", "llama"]  # another key: another build
    assert not list((tmp_path / "k" / ".partial").iterdir())


def test_an_interrupted_build_leaves_no_model_behind(tmp_path: Path) -> None:
    def interrupted(kind: str, out: Path) -> Path:
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt  # as Ctrl-C half way through writing the weights

    with pytest.raises(KeyboardInterrupt):
        cache.cached("sd15", root=tmp_path, key="k", build=interrupted)
    assert not (tmp_path / "k" / "sd15").exists()
    assert not list((tmp_path / "k" / ".partial").iterdir())
    calls: list[str] = []
    assert (cache.cached("sd15", root=tmp_path, key="k", build=counting_builder(calls)) / "config.json").exists()
    assert calls == ["sd15"]


def _die_half_way(root: Path) -> None:
    def killed(kind: str, out: Path) -> Path:
        (out / "model.safetensors").write_bytes(b"half")
        os._exit(9)  # no cleanup runs, as when the machine kills the process

    cache.cached("clip", root=root, key="k", build=killed)


def test_a_killed_build_leaves_no_model_and_the_next_build_clears_its_remains(tmp_path: Path) -> None:
    process = multiprocessing.get_context("fork").Process(target=_die_half_way, args=(tmp_path,))
    process.start()
    process.join(60)
    assert process.exitcode == 9
    assert not (tmp_path / "k" / "clip").exists()
    assert list((tmp_path / "k" / ".partial" / "clip").iterdir())  # what the killed build wrote
    calls: list[str] = []
    folder = cache.cached("clip", root=tmp_path, key="k", build=counting_builder(calls))
    assert calls == ["clip"] and [path.name for path in folder.iterdir()] == ["config.json"]
    assert not (tmp_path / "k" / ".partial" / "clip").exists()


def _slow_build(root: Path, log: Path) -> None:
    def build(kind: str, out: Path) -> Path:
        with open(log, "a") as calls:
            calls.write(f"{os.getpid()}\n")
        time.sleep(1)
        (out / "config.json").write_text("{}")
        return out

    cache.cached("qwen3", root=root, key="k", build=build)


def test_concurrent_sessions_build_a_kind_once(tmp_path: Path) -> None:
    log = tmp_path / "calls"
    context = multiprocessing.get_context("fork")
    processes = [context.Process(target=_slow_build, args=(tmp_path, log)) for _ in range(3)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(60)
    assert [process.exitcode for process in processes] == [0, 0, 0]
    assert len(log.read_text().splitlines()) == 1
    assert (tmp_path / "k" / "qwen3" / "config.json").exists()


def test_listing_sees_a_file_written_added_or_removed(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.json").write_text("{}")
    before = cache.listing(tmp_path)
    assert set(before) == {"sub/a.json"}
    (tmp_path / "sub" / "a.json").write_text('{"x": 1}')
    assert cache.listing(tmp_path) != before
    (tmp_path / "b").write_text("")
    assert set(cache.listing(tmp_path)) == {"sub/a.json", "b"}


def test_unknown_kinds_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown kind 'gpt-17'; choose one of: sentence-transformer"):
        tiny_models.build("gpt-17", tmp_path)


def test_the_command_line_builds_what_the_cache_holds(tiny_model, tmp_path: Path) -> None:
    """`python -m tests.shared.tiny_models KIND FOLDER`, as the READMEs show it, writes the same
    files as the cache holds (llama: seeded weights, a byte-level BPE that trains the same each time)."""
    run = subprocess.run(
        [sys.executable, "-m", "tests.shared.tiny_models", "llama", str(tmp_path / "llama")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == str(tmp_path / "llama")
    built, held = tmp_path / "llama", tiny_model("llama")
    assert sorted(cache.listing(built)) == sorted(cache.listing(held))
    for name in cache.listing(held):
        assert (built / name).read_bytes() == (held / name).read_bytes(), name


def test_the_wordpiece_vocabulary_is_the_same_on_every_build() -> None:
    """03's tiny encoders share one WordPiece vocabulary, learnt in each build: `tokenizers`'
    trainer learnt a different one in each process (its ties are broken in hash-map order)."""
    code = "import json, tests.shared.tiny_models.vocabularies as v; print(json.dumps(v.train_wordpiece([])))"
    builds = {
        subprocess.run(
            [sys.executable, "-c", code],
            cwd=REPO,
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in ("1", "2")
    }
    assert len(builds) == 1 and len(json.loads(builds.pop())) == 400
