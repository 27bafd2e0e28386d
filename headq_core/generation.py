"""Generation loops whose decode steps run in static mode (:class:`~headq_core.graphs.StaticDecode`,
CUDA graphs on CUDA): ``generate``'s own loop, through ``custom_generate=static_generate``, and
a plain greedy loop without ``generate``'s machinery. Both run the prompt eagerly first."""

from __future__ import annotations

from typing import Any

import torch

from headq_core.compat import cache_kwargs
from headq_core.errors import CacheStateError
from headq_core.graphs import StaticDecode


def _prompt_logits(
    model: Any, cache: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
) -> torch.Tensor:
    """The last logits (b, vocab) of an eager pass over ``input_ids``, the tokens after what
    ``cache`` holds; ``attention_mask`` covers every token, held and new, and places left-padded
    rows as generate does."""
    positions = None
    if attention_mask is not None:
        positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
        positions = positions[:, -input_ids.shape[1] :]
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=positions,
        use_cache=True,
        **cache_kwargs(model, cache),
    )
    return out.logits[:, -1]  # type: ignore[no-any-return]


@torch.no_grad()
def greedy(
    model: Any,
    cache: Any,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    attention_mask: torch.Tensor | None = None,
    graphs: bool | None = None,
) -> torch.Tensor:
    """Greedy decoding with the decode steps in static mode: the prompt runs eagerly (after what
    the cache may hold already: ``attention_mask`` then covers every token, held and new), then
    ``max_new_tokens`` tokens come from :class:`StaticDecode` (CUDA graphs on CUDA).
    Returns (b, prompt + max_new_tokens) ids, as ``generate(do_sample=False)`` would."""
    token = _prompt_logits(model, cache, input_ids, attention_mask).argmax(-1, keepdim=True)
    tokens = [input_ids, token]
    if max_new_tokens > 1:  # the last token is returned, never stored
        capacity = cache.get_seq_length() + max_new_tokens - 1
        with StaticDecode(
            model, cache, capacity=capacity, attention_mask=attention_mask, graphs=graphs
        ) as run:
            for _ in range(max_new_tokens - 1):
                token = run.step(token).argmax(-1, keepdim=True)
                tokens.append(token)
    return torch.cat(tokens, dim=1)


@torch.no_grad()
def static_generate(
    model: Any,
    input_ids: torch.Tensor,
    logits_processor: Any = None,
    stopping_criteria: Any = None,
    generation_config: Any = None,
    synced_gpus: bool = False,
    streamer: Any = None,
    **model_kwargs: Any,
) -> torch.Tensor:
    """The decoding loop of ``model.generate(..., custom_generate=static_generate)``: generate
    prepares the inputs, processors and stopping criteria as usual, then this loop runs the prompt
    eagerly and every later step on :class:`StaticDecode` (CUDA graphs on CUDA). Greedy or sampled
    (``do_sample``), with the logits processors, ``eos_token_id`` and ``max_new_tokens``/
    ``max_length`` applied as generate's own loop does; it returns the ids (no output dict).
    """
    cache = model_kwargs.get("cache", model_kwargs.get("past_key_values"))
    if cache is None or getattr(cache, "quantized_layers", None) is None:
        raise CacheStateError("static_generate needs a QuantizedKVCache: pass **cache_kwargs(model, cache)")
    if synced_gpus or (generation_config is not None and generation_config.return_dict_in_generate):
        raise ValueError(
            "static_generate returns the ids only, on one device (no synced_gpus, no output dict)"
        )
    attention_mask = model_kwargs.get("attention_mask")
    logits = _prompt_logits(model, cache, input_ids[:, cache.get_seq_length() :], attention_mask)
    pad = getattr(generation_config, "_pad_token_tensor", None)
    sample = bool(getattr(generation_config, "do_sample", False))
    unfinished = torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    max_length = getattr(generation_config, "max_length", None) or input_ids.shape[1] + 20
    run = None
    try:
        while True:
            scores = logits_processor(input_ids, logits.float()) if logits_processor is not None else logits
            if sample:
                token = torch.multinomial(scores.softmax(-1), 1).squeeze(1)
            else:
                token = scores.argmax(-1)
            if pad is not None:
                token = torch.where(unfinished, token, pad.to(token.device))
            input_ids = torch.cat([input_ids, token[:, None]], dim=1)
            if streamer is not None:
                streamer.put(token.cpu())
            if stopping_criteria is not None:
                unfinished &= ~stopping_criteria(input_ids, scores)
            if not bool(unfinished.any()) or input_ids.shape[1] >= max_length:
                break
            if run is None:
                run = StaticDecode(model, cache, capacity=max_length - 1, attention_mask=attention_mask)
            logits = run.step(token[:, None])
    finally:
        if run is not None:
            run.close()
    if streamer is not None:
        streamer.end()
    return input_ids
