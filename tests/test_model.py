"""The model core against transformers' DeepseekV3ForCausalLM, an independent implementation."""

from __future__ import annotations

import pytest
import torch

from duet.model import CacheView, KVCache, load_model
from tests.tiny_models import YARN, make_hf_checkpoint

CONFIGS = {
    "dense-first_group-limited_q-lora": dict(first_k_dense_replace=1, n_group=4, topk_group=2, q_lora_rank=16),
    "q-lora-null_yarn": dict(q_lora_rank=None, rope_scaling=YARN, max_position_embeddings=128),
    "two-dense_one-group": dict(first_k_dense_replace=2, n_group=1, topk_group=1, num_hidden_layers=4),
    "top1-group_yarn_no-interleave": dict(n_group=2, topk_group=1, rope_scaling=YARN, rope_interleave=False),
}


def _reference(path):
    from transformers import DeepseekV3ForCausalLM

    return DeepseekV3ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def greedy_cached(model, prompt: torch.Tensor, n: int) -> list[int]:
    """Greedy decoding one token at a time through the absorbed path and the latent cache."""
    cache = KVCache(model.args, model.n_cache_layers, 1, prompt.shape[1] + n)
    h = model.hidden(prompt, CacheView(cache, slice(0, 1), torch.tensor([0])))
    out = [int(model.logits(h[:, -1]).argmax())]
    pos = prompt.shape[1]
    while len(out) < n:
        h = model.hidden(torch.tensor([[out[-1]]]), CacheView(cache, slice(0, 1), torch.tensor([pos])))
        out.append(int(model.logits(h[:, -1]).argmax()))
        pos += 1
    return out


@pytest.fixture(scope="module", params=list(CONFIGS), ids=list(CONFIGS))
def pair(request, tmp_path_factory):
    path = make_hf_checkpoint(tmp_path_factory.mktemp(request.param), seed=1, **CONFIGS[request.param])
    return load_model(path), _reference(path)


@torch.no_grad()
def test_logits_match_transformers(pair):
    ours, ref = pair
    ids = torch.randint(0, ours.args.vocab_size, (3, 40), generator=torch.Generator().manual_seed(0))
    a, b = ours(ids), ref(ids).logits
    assert a.shape == b.shape == (3, 40, ours.args.vocab_size)
    assert b.abs().max() > 1.0, "logits too small for the comparison to mean anything"
    assert (a - b).abs().max() < 1e-4


@torch.no_grad()
def test_routing_bias_changes_expert_choice(pair):
    """The non-zero e_score_correction_bias must matter, or the parity test would not cover it."""
    ours, _ = pair
    moe = next(layer.mlp for layer in ours.layers if hasattr(layer.mlp, "gate"))
    x = torch.randn(64, ours.args.hidden_size, generator=torch.Generator().manual_seed(3))
    _, ids_with = moe.gate(x)
    bias = moe.gate.e_score_correction_bias.clone()
    moe.gate.e_score_correction_bias.zero_()
    weights_without, ids_without = moe.gate(x)
    moe.gate.e_score_correction_bias.copy_(bias)
    assert not torch.equal(ids_with.sort(-1).values, ids_without.sort(-1).values)


@torch.no_grad()
def test_greedy_generation_matches_transformers(pair):
    ours, ref = pair
    prompt = torch.randint(2, ours.args.vocab_size, (1, 7), generator=torch.Generator().manual_seed(5))
    expected = ref.generate(prompt, max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert greedy_cached(ours, prompt, 32) == expected[0, 7:].tolist()


@torch.no_grad()
@pytest.mark.parametrize("fresh", [True, False])
def test_cached_absorbed_decoding_equals_full_forward(pair, fresh):
    """Prefill a chunk (per-head attention when marked fresh, over the latents otherwise), then feed
    tokens one at a time and in a 3-token block: every position's logits from the latent cache
    (absorbed path) equal the no-cache forward (naive path)."""
    ours, _ = pair
    ids = torch.randint(0, ours.args.vocab_size, (2, 24), generator=torch.Generator().manual_seed(2))
    full = ours(ids)
    cache = KVCache(ours.args, ours.n_cache_layers, 2, 32)
    cache.kv.fill_(float("nan"))  # stale entries of an earlier request must never be read
    cache.pe.fill_(float("nan"))
    got = [ours.logits(ours.hidden(ids[:, :10], CacheView(cache, slice(0, 2), torch.tensor([0, 0]), fresh=fresh)))]
    for t in range(10, 21):
        got.append(ours.logits(ours.hidden(ids[:, t:t + 1], CacheView(cache, slice(0, 2), torch.tensor([t, t])))))
    got.append(ours.logits(ours.hidden(ids[:, 21:24], CacheView(cache, slice(0, 2), torch.tensor([21, 21])))))
    assert (torch.cat(got, dim=1) - full).abs().max() < 1e-4


@torch.no_grad()
def test_ragged_rows_in_one_batch(pair):
    """Rows at different positions decode together; each matches its own full forward."""
    ours, _ = pair
    g = torch.Generator().manual_seed(4)
    a = torch.randint(0, ours.args.vocab_size, (1, 9), generator=g)
    b = torch.randint(0, ours.args.vocab_size, (1, 5), generator=g)
    cache = KVCache(ours.args, ours.n_cache_layers, 2, 16)
    ours.hidden(a[:, :8], CacheView(cache, slice(0, 1), torch.tensor([0])))
    ours.hidden(b[:, :4], CacheView(cache, slice(1, 2), torch.tensor([0])))
    step = torch.cat([a[:, 8:9], b[:, 4:5]])
    logits = ours.logits(ours.hidden(step, CacheView(cache, slice(0, 2), torch.tensor([8, 4]))))
    assert (logits[0, 0] - ours(a)[0, -1]).abs().max() < 1e-4
    assert (logits[1, 0] - ours(b)[0, -1]).abs().max() < 1e-4


@torch.no_grad()
def test_static_cache_view_equals_trimmed(pair):
    """The compile-friendly path (`CacheView(static=True)`: attention over every cache position, masked by
    position, no host sync) gives the trimmed path's logits and cache writes (within fp32 noise: the
    matmuls run over more positions), for ragged rows with stale NaN past each row's length."""
    ours, _ = pair
    g = torch.Generator().manual_seed(6)
    lengths = [11, 4, 7]
    caches = []
    for _ in range(2):  # one cache per path
        cache = KVCache(ours.args, ours.n_cache_layers, 3, 20)
        cache.kv.fill_(float("nan"))
        cache.pe.fill_(float("nan"))
        for row, n in enumerate(lengths):
            ids = torch.randint(0, ours.args.vocab_size, (1, n), generator=torch.Generator().manual_seed(row))
            ours.hidden(ids, CacheView(cache, slice(row, row + 1), torch.tensor([0]), fresh=True))
        caches.append(cache)
    for step in range(3):
        tokens = torch.randint(0, ours.args.vocab_size, (3, 1), generator=g)
        start = torch.tensor(lengths) + step
        trimmed, static = (ours.logits(ours.hidden(tokens, CacheView(c, slice(0, 3), start, static=s)))
                           for c, s in zip(caches, (False, True), strict=True))
        assert torch.isfinite(static).all()
        assert (trimmed - static).abs().max() < 1e-5
    main = slice(0, len(ours.layers))
    for row, n in enumerate(lengths):
        written = slice(0, n + 3)
        torch.testing.assert_close(caches[1].kv[main, row, written], caches[0].kv[main, row, written])
        torch.testing.assert_close(caches[1].pe[main, row, written], caches[0].pe[main, row, written])


@torch.no_grad()
def test_deepseek_v2_softmax_routing_matches_transformers(tmp_path):
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    from tests.tiny_models import TINY_V3, randomize_

    fields = {k: v for k, v in TINY_V3.items() if k not in ("num_nextn_predict_layers",)}
    cfg = DeepseekV2Config(**fields, topk_method="group_limited_greedy", norm_topk_prob=False)
    ref = DeepseekV2ForCausalLM(cfg).eval()
    randomize_(ref, seed=7)
    ref.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    assert ours.args.scoring_func == "softmax" and ours.args.architecture == "DeepseekV2ForCausalLM"
    ids = torch.randint(0, cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    assert (ours(ids) - ref(ids).logits).abs().max() < 1e-4
