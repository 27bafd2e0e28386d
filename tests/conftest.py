"""Shared fixtures: tiny, seeded, randomly initialized transformers models of six architectures.

Every model has hidden size 64, 2 layers, 4 query heads of 16 channels and a vocabulary of 128,
so a whole forward pass costs well under a millisecond of arithmetic. The architectures cover the
attention layouts the cache must handle: GQA (Llama 4/2, Gemma 4/2), MQA (Qwen2 4/1), and full
multi-head attention with learned positions (GPT-2) or partial rotary embeddings (GPT-NeoX).
Gemma 3 (4/1) adds what its real models have: a sliding-window layer (a window of 8, shorter than
the tests' sequences) beside a full one, query/key norms and a query scale that is not
``head_dim ** -0.5``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
import torch

# Without a GPU the Triton kernels run under Triton's interpreter (tests/test_kernels_interpreter.py).
# Triton reads the variable as it defines its functions, and headq_core imports Triton (through
# torch's compiler) when Triton is installed: so before anything below.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from transformers import (
    AutoModelForCausalLM,
    DynamicCache,
    Gemma3TextConfig,
    GemmaConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    PreTrainedConfig,
    PreTrainedModel,
    Qwen2Config,
)

import headq_core  # noqa: F401  (registers the "headq" attention function)
from headq_core import get_registry
from headq_core.compat import cache_kwargs

ARCHS = ("llama", "qwen2", "gpt2", "gpt_neox", "gemma", "gemma3")
VOCAB = 128
HIDDEN = 64
LAYERS = 2
HEADS = 4
HEAD_DIM = 16
SLIDING_WINDOW = 8  # Gemma 3's sliding layer: shorter than the sequences the tests run
# Wider than transformers' 0.02 so attention is far from uniform and quantization error shows.
INIT_RANGE = 0.2

# Tiny tensors gain nothing from intra-op threads, and spinning threads stall on a busy machine;
# HEADQ_TEST_THREADS=2 runs the suite with two (no test may depend on the reduction order).
torch.set_num_threads(int(os.environ.get("HEADQ_TEST_THREADS", "1")))

_COMMON: dict[str, Any] = {
    "vocab_size": VOCAB,
    "initializer_range": INIT_RANGE,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": None,  # generation runs its full length
    "tie_word_embeddings": False,
}


def tiny_config(arch: str, **overrides: Any) -> PreTrainedConfig:
    """The config of a tiny model of ``arch`` (one of :data:`ARCHS`)."""
    rope: dict[str, Any] = {
        "hidden_size": HIDDEN,
        "intermediate_size": 2 * HIDDEN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "max_position_embeddings": 512,
        **_COMMON,
    }
    if arch == "llama":
        cfg: PreTrainedConfig = LlamaConfig(**rope, num_key_value_heads=2, head_dim=HEAD_DIM)
    elif arch == "qwen2":
        cfg = Qwen2Config(**rope, num_key_value_heads=1)
    elif arch == "gemma":
        cfg = GemmaConfig(**rope, num_key_value_heads=2, head_dim=HEAD_DIM)
    elif arch == "gemma3":
        cfg = Gemma3TextConfig(
            **rope,
            num_key_value_heads=1,
            head_dim=HEAD_DIM,
            sliding_window=SLIDING_WINDOW,
            layer_types=["sliding_attention", "full_attention"],
            query_pre_attn_scalar=24,
        )
    elif arch == "gpt_neox":
        cfg = GPTNeoXConfig(**rope, rotary_pct=0.5, attention_dropout=0.0, hidden_dropout=0.0)
    elif arch == "gpt2":
        cfg = GPT2Config(
            n_embd=HIDDEN,
            n_layer=LAYERS,
            n_head=HEADS,
            n_positions=512,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **_COMMON,
        )
    else:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(ARCHS)}")
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def tiny_model(
    arch: str,
    *,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    attn: str = "sdpa",
    **overrides: Any,
) -> PreTrainedModel:
    """A freshly initialized tiny model in eval mode; the same arguments give the same weights."""
    config = tiny_config(arch, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    return model.eval()


def random_ids(batch: int, length: int, *, seed: int = 0) -> torch.Tensor:
    """(batch, length) token ids, never the pad id 0."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (batch, length), generator=gen)


def dynamic_cache_nll(model: PreTrainedModel, ids: torch.Tensor, prefix: int) -> float:
    """The model's own NLL of ``ids[:, prefix:]``: prefill, then one token at a time through
    transformers' ``DynamicCache`` and SDPA."""
    model.set_attn_implementation("sdpa")
    try:
        with torch.no_grad():
            cache = DynamicCache(config=model.config)
            logits = [model(ids[:, :prefix], **cache_kwargs(model, cache), logits_to_keep=1).logits]
            for i in range(prefix, ids.shape[1] - 1):
                logits.append(model(ids[:, i : i + 1], **cache_kwargs(model, cache)).logits)
    finally:
        model.set_attn_implementation("headq")
    logprobs = torch.log_softmax(torch.cat(logits, dim=1).double(), dim=-1)
    return -logprobs.gather(-1, ids[:, prefix:, None]).sum().item()


@pytest.fixture(params=ARCHS)
def arch(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def make_model() -> Callable[..., PreTrainedModel]:
    """Factory: ``make_model(arch, dtype=..., seed=..., attn=...)``."""
    return tiny_model


@pytest.fixture
def make_ids() -> Callable[..., torch.Tensor]:
    """Factory: ``make_ids(batch, length, seed=...)``."""
    return random_ids


@pytest.fixture
def no_grad() -> Any:
    """Run the test without autograd (use with ``pytestmark = pytest.mark.usefixtures("no_grad")``)."""
    with torch.no_grad():
        yield


@pytest.fixture(autouse=True, scope="session")
def _fresh_registry() -> Any:
    """Load plugins once from the installed environment, and leave a clean registry behind."""
    get_registry(reload=True)
    yield
    get_registry(reload=True)
