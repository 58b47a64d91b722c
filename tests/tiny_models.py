"""Tiny random DeepSeek-V3-family checkpoints for tests, made with transformers or with duet itself."""

from __future__ import annotations

from pathlib import Path

import torch

TINY_V3 = dict(
    vocab_size=97, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=2,
    n_group=4, topk_group=2, first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=12, qk_nope_head_dim=8,
    qk_rope_head_dim=4, v_head_dim=6, routed_scaling_factor=2.5, max_position_embeddings=512,
    num_nextn_predict_layers=0, bos_token_id=0, eos_token_id=1, pad_token_id=None,
)
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 32, "beta_slow": 1,
        "mscale": 1.0, "mscale_all_dim": 1.0}


def randomize_(model: torch.nn.Module, seed: int = 0, bias_scale: float = 0.3) -> None:
    """Give every weight a scale that makes logits and routing decisions clearly distinct.

    transformers initialises with std 0.02, which leaves near-uniform logits; a meaningful parity
    test needs weights of order 1/sqrt(fan_in), RMSNorm gains away from 1, and a non-zero
    `e_score_correction_bias` so the bias visibly changes which experts are chosen.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(bias_scale * torch.randn(b.shape, generator=g))


def make_hf_checkpoint(path: Path, seed: int = 0, **overrides) -> Path:
    """Save a random transformers DeepseekV3ForCausalLM to `path` (no MTP: transformers has none)."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    cfg = DeepseekV3Config(**{**TINY_V3, **overrides})
    model = DeepseekV3ForCausalLM(cfg).eval()
    randomize_(model, seed)
    model.save_pretrained(path)
    return path


def make_duet_checkpoint(path: Path, seed: int = 0, n_mtp: int = 1, **overrides) -> Path:
    """Save a random duet Transformer (with `n_mtp` MTP modules) in the HF layout."""
    from duet.model import ModelArgs, Transformer, save_model

    fields = {**TINY_V3, **overrides}
    for key in ("num_key_value_heads", "pad_token_id"):
        fields.pop(key, None)
    fields["num_nextn_predict_layers"] = n_mtp
    args = ModelArgs(**fields)
    args.validate()
    model = Transformer(args)
    randomize_(model, seed)
    save_model(model, path)
    return path


def quantize_blocks(w: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain per-block e4m3 quantisation of w [M, N], written independently of duet.kernels:
    (float8_e4m3fn [M, N], float32 scale_inv [ceil(M/block), ceil(N/block)])."""
    rows, cols = -(-w.shape[0] // block), -(-w.shape[1] // block)
    q = torch.empty_like(w, dtype=torch.float8_e4m3fn)
    scale = torch.empty(rows, cols)
    for i in range(rows):
        for j in range(cols):
            tile = w[i * block:(i + 1) * block, j * block:(j + 1) * block]
            s = tile.abs().max().clamp(min=1e-12) / 448.0
            q[i * block:(i + 1) * block, j * block:(j + 1) * block] = (tile / s).to(torch.float8_e4m3fn)
            scale[i, j] = s
    return q, scale


def make_fp8_checkpoint(source: Path, path: Path, block: int = 8, unquantised: tuple[str, ...] = ()) -> Path:
    """Copy the one-file checkpoint `source` to `path` with every projection matrix (`*_proj.weight`,
    `kv_a_proj_with_mqa.weight`) stored as FP8 with block scales, as DeepSeek's FP8 release stores them (small blocks:
    tiny matrices span several), except those whose key contains one of `unquantised` (e.g. "eh_proj")."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(source, path)
    state = {}
    for key, w in load_file(source / "model.safetensors").items():
        if key.endswith(("_proj.weight", "_proj_with_mqa.weight")) and w.ndim == 2 and not any(
                name in key for name in unquantised):
            state[key], state[key.replace(".weight", ".weight_scale_inv")] = quantize_blocks(w, block)
        else:
            state[key] = w
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": [block, block]}
    (path / "config.json").write_text(json.dumps(cfg))
    return path


CORPUS = [
    "Tom has 12 apples and buys 35 more. How many apples does he have now?",
    "```python\nprint(12 + 35)\n```\n```output\n47\n```\nThe answer is \\boxed{47}.",
    "A café sells crêpes for 3 euros; naïve coöperation, 日本語のテキスト, emoji 🙂 and ünïcödé.",
    "VERDICT: AGREE. The computation checks out.",
]


def make_tokenizer(vocab_size: int = 320):
    """duet's own BPE tokenizer, trained on a few lines (with multi-byte characters)."""
    from duet.train.tokenizer import train_tokenizer

    return train_tokenizer(CORPUS * 20, vocab_size=vocab_size, min_frequency=1)


def make_engine_checkpoint(path: Path, seed: int = 0, n_mtp: int = 1, **overrides) -> Path:
    """A random duet model with MTP plus a real trained tokenizer and chat template."""
    tok = make_tokenizer()
    fields = {"vocab_size": len(tok), "eos_token_id": tok.eos_token_id, "bos_token_id": tok.bos_token_id, **overrides}
    make_duet_checkpoint(path, seed=seed, n_mtp=n_mtp, **fields)
    tok.save_pretrained(path)
    return path
