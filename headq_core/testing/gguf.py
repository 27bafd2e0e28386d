"""A tiny GGUF model file, for tests and examples of ``--model path/to/model.gguf``.

:func:`write_tiny_gguf` writes a randomly initialized Llama-architecture model (the tensor names
and metadata keys llama.cpp's converter writes) with a byte-level BPE tokenizer (GPT-2's
printable stand-ins for the 256 bytes, one merge, an end-of-text token), so that any text
tokenizes and transformers loads it as it loads a real GGUF build. It needs the ``gguf`` package.
"""

from __future__ import annotations

from pathlib import Path

import torch

_PARTS = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
_TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}


def byte_tokens() -> list[str]:
    """The 256 byte tokens of a GPT-2 style byte-level BPE, in byte order."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    stand_in = {b: chr(b) for b in printable}
    spare = 256
    for b in range(256):
        if b not in stand_in:
            stand_in[b], spare = chr(spare), spare + 1
    return [stand_in[b] for b in range(256)]


def write_tiny_gguf(
    path: str | Path,
    *,
    layers: int = 2,
    hidden: int = 128,
    heads: int = 4,
    kv_heads: int = 2,
    seed: int = 0,
) -> Path:
    """Write a tiny random Llama model as a GGUF file at ``path`` (head_dim ``hidden // heads``)."""
    import gguf
    from transformers import LlamaConfig, LlamaForCausalLM

    tokens = [*byte_tokens(), "Ġt", "<|endoftext|>"]
    end = len(tokens) - 1
    config = LlamaConfig(
        vocab_size=len(tokens), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4096,
        tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    path = Path(path)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(path.stem)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * len(tokens))
    writer.add_token_merges(["Ġ t"])
    writer.add_bos_token_id(end)
    writer.add_eos_token_id(end)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            out = "output.weight"
        elif name.startswith("model.layers."):
            _, _, layer, *rest = name.split(".")
            out = f"blk.{layer}.{_PARTS['.'.join(rest[:-1])]}.weight"
        else:
            out = _TOP[name]
        writer.add_tensor(out, tensor.float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
