"""The LLM decoder of GTS-LUM (paper section 3.2 "Target-aware Modeling"): any Hugging Face model.

    decoder, info = build_decoder(DecoderConfig())                        # small Llama from a config
    decoder, info = build_decoder(DecoderConfig(pretrained="/models/TinyLlama-1.1B"))  # from_pretrained

The decoder only ever reads `inputs_embeds` (behaviour embeddings from the Q-former, descriptors,
[SEP], ...), so its own token table serves one purpose: embedding the interval descriptors' words when
it is a pretrained LLM (`word_embedder`). As in the paper a pretrained decoder is frozen (the Q-former
and projections train around it), optionally with LoRA adapters (peft); the from-config default knows
no words and no language, so it is trained with the rest.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)


@dataclass
class LoraSettings:
    enabled: bool = False
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])


@dataclass
class DecoderConfig:
    pretrained: str = ""  # a local Hugging Face folder (TinyLlama in production); "" = Llama from this config
    # from-config Llama (ignored with `pretrained`)
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 384
    max_positions: int = 2048
    rope_theta: float = 10_000.0
    # None: frozen when pretrained, trained when built from the config (it has learned nothing yet)
    freeze: bool | None = None
    lora: LoraSettings = field(default_factory=LoraSettings)
    attn_implementation: str = "sdpa"
    # dropout while training on each block's attention and MLP outputs (before the residual add), as
    # SASRec / HSTU regularise: a from-scratch decoder over a few hundred users' histories overfits them
    # within a few epochs without it. Any decoder whose blocks name their parts `self_attn` and `mlp`
    # (the Llama family); 0: none
    dropout: float = 0.0
    # dropout on the attention weights (from-config decoder): a (batch, heads, L, L) random mask a layer,
    # which on CPU cost as much as the rest of a phase-II step (BENCHMARKS.md "Phase II at HSTU's pace")
    attention_dropout: float = 0.0
    # torch.compile the decoder for passes without gradients (scoring, validation): inductor fuses the
    # element-wise work (RMSNorm, RoPE, SiLU, masks) that outweighs the matrix products at small widths
    # on CPU (BENCHMARKS.md "target-aware scoring throughput"). Compiles once, on first use (28 s at the default
    # width on 2 CPU threads), for any batch and length (dynamic shapes); training passes stay eager.
    compile: bool = False

    def __post_init__(self) -> None:
        for name in ("dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"DecoderConfig.{name} must be in [0, 1), got {getattr(self, name)}")
        if not self.pretrained and self.hidden_size % self.num_heads:
            raise ValueError(f"DecoderConfig: hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")


@dataclass
class DecoderInfo:
    hidden_size: int
    pretrained: bool
    frozen: bool
    lora: bool
    trainable_parameters: int
    total_parameters: int


def small_llama(
    vocab_size: int, hidden_size: int, num_layers: int, num_heads: int, intermediate_size: int, max_positions: int, **extra
) -> nn.Module:
    """A fresh Llama-architecture base model of these sizes (offline, random weights; no special tokens,
    since every caller feeds its own ids or `inputs_embeds`). `extra`: further `LlamaConfig` fields."""
    from transformers import LlamaConfig, LlamaModel

    return LlamaModel(
        LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_heads,
            intermediate_size=intermediate_size,
            max_position_embeddings=max_positions,
            bos_token_id=None,
            eos_token_id=None,
            pad_token_id=None,
            **extra,
        )
    )


def add_block_dropout(model: nn.Module, p: float) -> int:
    """Dropout on the output of every `self_attn` and `mlp` module (a forward hook: the Hugging Face code
    stays as it is), active in training mode only. Returns how many modules got it."""

    def hook(module: nn.Module, inputs, output):
        if not module.training:
            return output
        if isinstance(output, tuple):  # attention: (hidden states, weights)
            return (nn.functional.dropout(output[0], p, True), *output[1:])
        return nn.functional.dropout(output, p, True)

    parts = [m for name, m in model.named_modules() if name.rsplit(".", 1)[-1] in ("self_attn", "mlp")]
    if not parts:
        raise ValueError("DecoderConfig.dropout: the decoder has no `self_attn` / `mlp` modules to put dropout on")
    for module in parts:
        module.register_forward_hook(hook)
    return len(parts)


def build_decoder(cfg: DecoderConfig) -> tuple[nn.Module, DecoderInfo]:
    """The decoder's base model (hidden states out, no LM head), frozen / LoRA-wrapped as configured."""
    from transformers import AutoModel

    if cfg.pretrained:
        folder = Path(cfg.pretrained).expanduser()
        if not (folder / "config.json").exists():
            raise FileNotFoundError(f"DecoderConfig.pretrained: {folder} is not a local Hugging Face model folder (nothing is downloaded)")
        model = AutoModel.from_pretrained(str(folder), dtype=torch.float32, attn_implementation=cfg.attn_implementation)
    else:
        model = small_llama(
            2,  # inputs_embeds only: the token table is never read
            cfg.hidden_size,
            cfg.num_layers,
            cfg.num_heads,
            cfg.intermediate_size,
            cfg.max_positions,
            rope_theta=cfg.rope_theta,
            attn_implementation=cfg.attn_implementation,
            attention_dropout=cfg.attention_dropout,
        )
    if cfg.dropout > 0:
        add_block_dropout(model, cfg.dropout)
    frozen = bool(cfg.pretrained) if cfg.freeze is None else cfg.freeze
    if frozen:
        for p in model.parameters():
            p.requires_grad_(False)
    if cfg.lora.enabled:
        from peft import LoraConfig, get_peft_model

        lora = cfg.lora
        model = get_peft_model(
            model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.target_modules))
        )
    info = DecoderInfo(
        hidden_size=int(model.config.hidden_size),
        pretrained=bool(cfg.pretrained),
        frozen=frozen,
        lora=cfg.lora.enabled,
        trainable_parameters=sum(p.numel() for p in model.parameters() if p.requires_grad),
        total_parameters=sum(p.numel() for p in model.parameters()),
    )
    log.info("decoder: %s", dataclasses.asdict(info) | {"source": cfg.pretrained or "LlamaConfig"})
    return model, info


def compiled_for_inference(decoder):
    """`torch.compile(decoder)` (a module or a function of one) sharing its parameters (reads them live:
    training may go on between uses)."""
    import shutil

    if not any(shutil.which(c) for c in ("g++", "clang++", "c++")):
        raise RuntimeError(
            "DecoderConfig.compile: torch.compile on CPU needs a C++ compiler (g++ or clang++) on PATH; install one or set compile: false"
        )
    return torch.compile(decoder, dynamic=True)


def runs_last_layer_at_last_token(decoder: nn.Module) -> bool:
    """Whether `last_hidden_states` runs this decoder's last layer for the last token only: a plain Llama
    model (a subclass or another family may change a layer's parts) in eval mode."""
    from transformers import LlamaModel

    return not decoder.training and type(decoder) is LlamaModel


def last_hidden_states(
    decoder: nn.Module,
    inputs_embeds: torch.Tensor,  # (N, T, H)
    attention_mask: torch.Tensor | None,  # (N, T) 1 = real token; None: none padded
    position_ids: torch.Tensor,  # (N, T)
    last: torch.Tensor,  # (N,) column of each row's last real token
) -> torch.Tensor:
    """The decoder's final hidden state at each row's last real token, (N, H).

    A Llama model (the from-config default, TinyLlama) runs its last layer for that one query: keys and
    values still come from every position, but the query, attention output, MLP and final norm of the
    other T - 1 positions are never read, and in a scoring pass (one pass per target, the target in
    front) they were about half of the decoder's work. Any other decoder (or one wrapped by peft) runs
    whole, and so does any decoder in training mode (its dropouts act inside the layers' parts). Exact
    either way (same weights, same causal and padding masks)."""
    from transformers import DynamicCache
    from transformers.masking_utils import create_causal_mask
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    rows = torch.arange(len(last), device=last.device)
    if not runs_last_layer_at_last_token(decoder):
        hidden = decoder(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state
        return hidden[rows, last]
    *lower, top = decoder.layers[: decoder.config.num_hidden_layers]
    # as the whole model builds it (with its default empty cache): an empty cache also keeps transformers
    # from reading positions that skip (explicit positions, events sharing a time) as packed sequences
    causal = create_causal_mask(
        config=decoder.config,
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        past_key_values=DynamicCache(config=decoder.config),
        position_ids=position_ids,
    )
    cos, sin = decoder.rotary_emb(inputs_embeds, position_ids=position_ids)  # (N, T, head_dim) each
    hidden = inputs_embeds
    for layer in lower:
        hidden = layer(hidden, attention_mask=causal, position_embeddings=(cos, sin), position_ids=position_ids)
    attn = top.self_attn
    n, t, _ = hidden.shape
    normed = top.input_layernorm(hidden)
    query = attn.q_proj(normed[rows, last][:, None]).view(n, 1, -1, attn.head_dim).transpose(1, 2)  # (N, heads, 1, d)
    key = attn.k_proj(normed).view(n, t, -1, attn.head_dim).transpose(1, 2)  # (N, kv heads, T, d)
    value = attn.v_proj(normed).view(n, t, -1, attn.head_dim).transpose(1, 2)
    query = apply_rotary_pos_emb(query, query, cos[rows, last][:, None], sin[rows, last][:, None])[0]
    key = apply_rotary_pos_emb(key, key, cos, sin)[0]
    # the last token sees every real token up to itself
    visible = torch.arange(t, device=last.device)[None] <= last[:, None]
    if attention_mask is not None:
        visible = visible & attention_mask.bool()
    out = nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=visible[:, None, None], scale=attn.scaling, enable_gqa=attn.num_key_value_groups > 1
    )  # (N, heads, 1, d)
    state = hidden[rows, last] + attn.o_proj(out.transpose(1, 2).reshape(n, -1))
    state = state + top.mlp(top.post_attention_layernorm(state))
    return decoder.norm(state)


def compiled_last_hidden_states(decoder: nn.Module):
    """`last_hidden_states` for this decoder, compiled (see `compiled_for_inference`)."""
    return compiled_for_inference(functools.partial(last_hidden_states, decoder))


@torch.no_grad()
def word_embedder(cfg: DecoderConfig, decoder: nn.Module):
    """texts -> (N, hidden) with a pretrained decoder's own tokenizer and input embeddings (mean over tokens).

    A descriptor such as "weekday evening rush hour" becomes one decoder token carrying what the LLM
    knows of those words. None for the from-config decoder: it knows no words (use the sentence encoder).
    """
    if not cfg.pretrained:
        return None
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(Path(cfg.pretrained).expanduser()))
    table = decoder.get_input_embeddings()

    def embed(texts: list[str]) -> torch.Tensor:
        rows = []
        for text in texts:
            ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
            rows.append(table(ids.to(table.weight.device)).float().mean(0))
        return torch.stack(rows)

    return embed
