"""Evaluation and calibration text, and the token windows the harness scores.

``load_text()`` reads a named text from the shared data folder (``HEADQ_DATA_DIR``, else
``../shared/data`` next to the repository) or any text file, and refuses to hand the WikiText
test split to calibration. :func:`tokenize` and :func:`token_windows` turn it into scoring windows.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import re
import warnings
from pathlib import Path
from typing import Any, Literal

import attrs
import torch

import headq_core
from headq_core.errors import HeadqError, suggest

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


class TextNotFoundError(HeadqError, FileNotFoundError):
    """A named text or text file that is in none of the places looked at."""


class TextError(HeadqError, ValueError):
    """Text that cannot be used as asked: the wrong split for the role, or too few tokens."""


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
