"""Plugin discovery through entry points, with throwaway distributions installed into a temporary
folder on ``sys.path`` exactly as pip lays them out (a module plus a ``*.dist-info`` directory)."""

from __future__ import annotations

import importlib
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from headq_core import PluginError, QuantizedKVCache, SpecError, get_registry
from headq_core.compat import cache_kwargs
from headq_core.registry import DISABLE_ENV
from headq_core.testing import check_key_quantizer

pytestmark = pytest.mark.usefixtures("no_grad")

# A real, if crude, key quantizer: one sign bit per element and a per-token magnitude.
SIGN_PLUGIN = '''
from __future__ import annotations

import attrs
import torch

from headq_core import KeyQuantizer, MethodConfig, hookimpl
from headq_core.layouts import AffineBlock
from headq_kernels import pack_codes


@attrs.frozen
class SignConfig(MethodConfig):
    pass


class SignKeys(KeyQuantizer):
    """keys (b, h, t, d) -> sign bits packed along channels, fp16 mean |k| per token."""

    name = "{name}"
    config_class = SignConfig
    summary = "one sign bit per element, one magnitude per token"

    def encode(self, keys: torch.Tensor, layer_idx: int) -> AffineBlock:
        mag = keys.float().abs().mean(dim=-1, keepdim=True).to(torch.float16)
        codes = pack_codes((keys > 0).to(torch.uint8), 1)
        return AffineBlock(
            tokens=keys.shape[-2], codes=codes, scale=2 * mag, zero=-mag, bits=1, group=keys.shape[-1], axis="channels"
        )

    def nominal_bits(self, head_dim: int) -> dict[str, float]:
        words = -(-head_dim // 32)  # sign bits fill whole 32-bit words per token
        return {{"payload": 32.0 * words / head_dim, "scales": 32.0 / head_dim}}


@hookimpl
def register_key_quantizers(registry) -> None:
    registry.add_key_quantizer(SignKeys)
'''

BROKEN_IMPORT = """
raise ImportError("the frobnicator backend is not installed")
"""

MISSPELLED_HOOK = """
from headq_core import hookimpl

@hookimpl
def register_key_quantizer(registry):  # the hook is register_key_quantizers
    pass
"""

REJECTS_DEFAULTS = """
from __future__ import annotations

import attrs

from headq_core import MethodConfig, hookimpl
from headq_core.builtin import ExactKeys, ExactValues


class GoodKeys(ExactKeys):
    name = "goodkeys"


class GoodValues(ExactValues):
    name = "goodvalues"


def _even(instance, attribute, value):
    if value % 2:
        raise ValueError(f"{attribute.name} must be even, got {value}")


@attrs.frozen
class OddConfig(MethodConfig):
    bits: int = attrs.field(default=3, validator=_even)


class BadKeys(ExactKeys):
    name = "badkeys"
    config_class = OddConfig


@hookimpl
def register_value_policies(registry):
    registry.add_value_policy(GoodValues)


@hookimpl
def register_key_quantizers(registry):
    registry.add_key_quantizer(GoodKeys)
    registry.add_key_quantizer(BadKeys)
"""


class Site:
    """A temporary site-packages folder on ``sys.path``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.modules: list[str] = []

    def install(self, dist: str, entry_points: dict[str, str], modules: dict[str, str]) -> None:
        """Lay out distribution ``dist`` as an installer would: modules plus ``*.dist-info``."""
        for module, source in modules.items():
            (self.root / f"{module}.py").write_text(textwrap.dedent(source))
            self.modules.append(module)
        info = self.root / f"{dist.replace('-', '_')}-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
        lines = "".join(f"{name} = {target}\n" for name, target in entry_points.items())
        (info / "entry_points.txt").write_text(f"[headq]\n{lines}")
        importlib.invalidate_caches()

    def install_sign(
        self, dist: str = "headq-sign", *, name: str = "sign", module: str = "headq_sign_plugin"
    ) -> None:
        self.install(dist, {name: module}, {module: SIGN_PLUGIN.format(name=name)})


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    root = tmp_path / "site-packages"
    root.mkdir()
    sys.path.insert(0, str(root))
    importlib.invalidate_caches()
    site = Site(root)
    try:
        yield site
    finally:
        sys.path.remove(str(root))
        for module in site.modules:
            sys.modules.pop(module, None)
        importlib.invalidate_caches()
        get_registry(reload=True)


def test_a_third_party_plugin_is_found_and_used_by_name(site: Site, make_model: Callable[..., Any]) -> None:
    site.install_sign()
    assert "sign" not in get_registry().names("key")  # discovery is explicit, not at install time
    assert "headq_sign_plugin" not in sys.modules
    registry = get_registry(reload=True)
    assert "headq_sign_plugin" in sys.modules
    assert "sign" in registry.names("key")
    entry = registry.entry("key", "sign")
    assert (entry.source.distribution, entry.source.version, entry.source.plugin) == (
        "headq-sign",
        "1.0",
        "sign",
    )
    assert "kivi" in registry.names("key") and "fp16" in registry.names("key")

    model = make_model("llama")
    model.set_attn_implementation("headq")
    cache = QuantizedKVCache("sign", "fp16", config=model.config)
    assert type(cache.key_method).__name__ == "SignKeys"
    ids = torch.randint(1, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    logits = model(ids[:, :8], **cache_kwargs(model, cache)).logits
    logits = model(ids[:, 8:9], **cache_kwargs(model, cache)).logits
    assert torch.isfinite(logits).all()
    keys, _ = cache.quantized_layers()[0].decoded()
    # every key now has the form +-m per token: one magnitude per (batch, head, token)
    assert torch.equal(keys.abs(), keys.abs().amax(dim=-1, keepdim=True).expand_as(keys))
    # 16 sign bits per token still take a whole 32-bit word: the count includes the padding
    assert cache.bits_per_element()["keys"]["payload"] == pytest.approx(2.0)


def test_a_third_party_plugin_passes_the_conformance_kit(site: Site) -> None:
    site.install_sign()
    get_registry(reload=True)
    check_key_quantizer("sign")


def test_headq_list_shows_the_plugin(site: Site) -> None:
    cli = pytest.importorskip("headq_core.cli")
    from typer.testing import CliRunner

    site.install_sign(name="signbit")
    get_registry(reload=True)
    result = CliRunner().invoke(cli.app, ["list"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "signbit" in result.output
    assert "headq-sign" in result.output
    assert "kivi" in result.output
    # where each distribution is installed: the shipped plugins from their source trees, editable
    rows = {line.split("│")[1].strip(): line for line in result.output.splitlines() if line.count("│") == 5}
    kivi = Path(__import__("headq_kivi").__file__).parents[1]
    assert str(kivi) in rows["headq-kivi"] and rows["headq-kivi"].rstrip("│ ").endswith("yes")
    assert "headq-sign" in rows and rows["headq-sign"].rstrip("│ ").endswith("no")


def test_a_plugin_that_fails_to_import_is_reported_and_others_work(site: Site) -> None:
    site.install("headq-frob", {"frob": "headq_frob_plugin"}, {"headq_frob_plugin": BROKEN_IMPORT})
    site.install_sign()
    registry = get_registry(reload=True)
    [broken] = [b for b in registry.broken if b.plugin == "frob"]
    assert broken.distribution == "headq-frob"
    assert "ImportError" in broken.error and "frobnicator backend" in broken.error
    assert "Traceback" in broken.detail
    assert {"sign", "kivi", "fp16"} <= set(registry.names("key"))
    registry.key_quantizer("sign")
    with pytest.raises(SpecError, match=r"(?s)unknown key quantizer 'frob'.*headq-frob.*frobnicator"):
        registry.key_quantizer("frob")


def test_a_misspelled_hook_is_reported(site: Site) -> None:
    site.install("headq-typo", {"typo": "headq_typo_plugin"}, {"headq_typo_plugin": MISSPELLED_HOOK})
    registry = get_registry(reload=True)
    [broken] = [b for b in registry.broken if b.plugin == "typo"]
    assert broken.distribution == "headq-typo"
    assert "register_key_quantizer" in broken.error


def test_two_plugins_claiming_one_name_is_an_error_naming_both(site: Site) -> None:
    site.install_sign("headq-twin-a", name="twin", module="headq_twin_a")
    site.install_sign("headq-twin-b", name="twin", module="headq_twin_b")
    site.install_sign("headq-fake-exact", name="fp16", module="headq_fake_exact")
    registry = get_registry(reload=True)
    assert "twin" in registry.names("key")
    with pytest.raises(PluginError, match="'twin' is registered by both") as info:
        registry.key_quantizer("twin")
    assert "headq-twin-a" in str(info.value) and "headq-twin-b" in str(info.value)
    with pytest.raises(PluginError, match="'fp16' is registered by both") as info:
        QuantizedKVCache("fp16", "fp16")
    assert "headq-core" in str(info.value) and "headq-fake-exact" in str(info.value)
    registry.value_policy("fp16")  # the value side has no clash
    registry.key_quantizer("kivi")


@pytest.mark.parametrize("disable", ["sign", "headq-sign", "other, sign", "all"])
def test_plugins_can_be_disabled_by_environment(
    site: Site, disable: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    site.install_sign()
    with monkeypatch.context() as patch:
        patch.setenv(DISABLE_ENV, disable)
        registry = get_registry(reload=True)
    assert "sign" not in registry.names("key")
    assert "headq_sign_plugin" not in sys.modules  # never even imported
    assert "sign (headq-sign)" in registry.disabled
    assert "fp16" in registry.names("key")  # the core's own methods cannot be disabled
    assert ("kivi" in registry.names("key")) == (disable != "all")
    assert "sign" in get_registry(reload=True).names("key")  # back once the variable is gone


def test_a_plugin_whose_config_rejects_its_defaults_leaves_nothing_behind(site: Site) -> None:
    site.install("headq-odd", {"odd": "headq_odd_plugin"}, {"headq_odd_plugin": REJECTS_DEFAULTS})
    site.install_sign()
    registry = get_registry(reload=True)
    [broken] = [b for b in registry.broken if b.plugin == "odd"]
    assert broken.distribution == "headq-odd"
    assert "rejects its own defaults" in broken.error and "must be even" in broken.error
    for kind in ("key", "value"):
        assert not {"goodkeys", "goodvalues", "badkeys"} & set(registry.names(kind))
    assert "sign" in registry.names("key")


def test_the_registry_is_clean_after_plugin_tests() -> None:
    registry = get_registry()
    assert not {"sign", "signbit", "twin", "frob", "goodkeys"} & set(registry.names("key"))
    assert not any(b.distribution.startswith("headq-") and b.plugin != "kivi" for b in registry.broken)


def test_list_names_a_clash_and_check_fails_on_it(site: Site) -> None:
    """A third-party method named like a shipped one: before, ``kivi`` vanished from ``headq list``
    without a line why; now both owners and the fix are named, and ``headq check`` exits 1."""
    from typer.testing import CliRunner

    from headq_core import cli

    assert CliRunner().invoke(cli.app, ["check"]).exit_code == 0
    site.install_sign("headq-kivi-clone", name="kivi", module="headq_kivi_clone")
    get_registry(reload=True)
    listed = CliRunner().invoke(cli.app, ["list"], env={"COLUMNS": "300"})
    assert listed.exit_code == 0
    assert "key quantizer 'kivi' is registered by both" in listed.output
    assert "headq-kivi-clone" in listed.output and "HEADQ_DISABLE_PLUGINS=" in listed.output
    checked = CliRunner().invoke(cli.app, ["check"], env={"COLUMNS": "300"})
    assert checked.exit_code == 1 and "1 problem" in checked.output


def test_check_fails_on_a_broken_plugin(site: Site) -> None:
    from typer.testing import CliRunner

    from headq_core import cli

    site.install("headq-frob", {"frob": "headq_frob_plugin"}, {"headq_frob_plugin": BROKEN_IMPORT})
    get_registry(reload=True)
    checked = CliRunner().invoke(cli.app, ["check"], env={"COLUMNS": "300"})
    assert checked.exit_code == 1 and "plugin frob (headq-frob) failed to load" in checked.output
