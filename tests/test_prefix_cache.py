"""The engine's prefix cache: greedy output token for token the same with and without it (shared system
prompts, continuations, batches, MTP drafting, eviction), prefill logits equal to a full prefill, and the
block tree's bookkeeping (LRU eviction, pinned blocks, bounded memory)."""

from __future__ import annotations

import random
import shutil
import threading

import pytest
import torch

from duet.engine import Engine, SamplingParams
from duet.engine.prefix_cache import PrefixCache
from duet.model import CacheView, KVCache
from tests.tiny_models import make_engine_checkpoint

SYSTEM = ("You are a careful solver. Think step by step, run code when it helps, and put the final answer "
          "in a box. Tom has 12 apples and buys 35 more. How many apples does he have now? ")
QUESTIONS = ["A café sells crêpes", "VERDICT: AGREE.", "```python\nprint(12 + 35)\n```", "How many apples"]
GREEDY = SamplingParams(max_new_tokens=24, stop_at_eos=False)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_engine_checkpoint(tmp_path_factory.mktemp("prefix"), seed=11)


@pytest.fixture(scope="module")
def off(ckpt):
    """The reference: no prefix cache, no MTP."""
    return Engine.load(ckpt, max_batch=3, use_mtp=False, prefix_cache_mb=0)


def cached(ckpt, **kwargs) -> Engine:
    """An engine with a prefix cache of small blocks (short prompts span several)."""
    kwargs.setdefault("use_mtp", False)
    kwargs.setdefault("prefix_block", 4)
    return Engine.load(ckpt, max_batch=3, **kwargs)


def prompts(engine: Engine) -> list[list[int]]:
    system = engine.encode(SYSTEM)
    return [system + engine.encode(q) for q in QUESTIONS]


def ids(results) -> list[list[int]]:
    return [r.token_ids for r in results]


def test_off_means_no_cache(off):
    assert off.prefix_cache is None and off.prefix_cache_stats() is None


def test_shared_system_prompt(ckpt, off):
    on = cached(ckpt)
    p = prompts(on)
    first, second = on.generate(p[:1], GREEDY)[0], on.generate(p[1:2], GREEDY)[0]
    assert first.cached_tokens == 0
    system = len(on.encode(SYSTEM))
    assert second.cached_tokens >= system - 4  # whole blocks of the system prompt, at least
    assert [first.token_ids, second.token_ids] == [r.token_ids for r in (off.generate(p[:1], GREEDY)[0],
                                                                         off.generate(p[1:2], GREEDY)[0])]
    stats = on.prefix_cache_stats()
    assert stats["requests"] == 2 and stats["hits"] == 1 and stats["reused_tokens"] == second.cached_tokens
    assert 0 < stats["hit_rate"] < 1 and stats["held_bytes"] == stats["blocks"] * on.prefix_cache.block_bytes > 0


def test_continuation_of_a_previous_request(ckpt, off):
    """A follow-up turn: the previous prompt, its whole completion and a few new tokens."""
    on = cached(ckpt)
    p = prompts(on)[0]
    [a] = on.generate([p], GREEDY)
    follow = p + a.token_ids + on.encode("```output\n47\n```")
    [b] = on.generate([follow], GREEDY)
    # everything the first request verified (its prompt and completion but the newest token), in whole blocks
    assert b.cached_tokens >= (len(p) + len(a.token_ids) - 1) // 4 * 4
    assert b.token_ids == off.generate([follow], GREEDY)[0].token_ids
    # and the same text again reuses all of it but its last token
    [c] = on.generate([follow], GREEDY)
    assert c.cached_tokens == len(follow) - 1 and c.token_ids == b.token_ids


def test_a_prefix_ending_inside_a_cached_block(ckpt, off):
    on = cached(ckpt, prefix_block=16)
    p = prompts(on)[0]
    on.generate([p[:40]], SamplingParams(max_new_tokens=10, stop_at_eos=False))  # 3 blocks: 48 positions
    shared = 37  # two whole blocks and 5 tokens into the third
    other = p[:shared] + [(t + 1) % on.model.args.vocab_size for t in p[shared:44]]
    [r] = on.generate([other], GREEDY)
    assert r.cached_tokens == shared
    assert r.token_ids == off.generate([other], GREEDY)[0].token_ids


def test_batched_concurrent_requests_sharing_prefixes(ckpt, off):
    """More prompts than rows (refills), duplicates, requests admitted while others decode."""
    on = cached(ckpt)
    p = prompts(on)
    batch = p + [p[0], p[1][:30], p[2] + on.encode(" again")]
    params = [SamplingParams(max_new_tokens=n, stop_at_eos=False) for n in (20, 7, 31, 12, 5, 18, 9)]
    got = on.generate(batch, params)
    assert ids(got) == ids(off.generate(batch, params))
    assert sum(r.cached_tokens for r in got) > len(batch[0])
    # and from many threads at once
    results: dict[int, list[int]] = {}

    def call(i: int) -> None:
        results[i] = on.submit(batch[i], params[i]).token_ids

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(batch))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[i] for i in range(len(batch))] == ids(got)


@pytest.mark.parametrize("depth", [1, 2])
def test_mtp_drafting_with_rejections(ckpt, off, depth):
    """MTP entries are one position off; rejected drafts are never cached: still plain greedy's tokens, for
    first requests, shared prefixes and continuations."""
    on = cached(ckpt, use_mtp=True, mtp_depth=depth)
    uncached = Engine.load(ckpt, max_batch=3, mtp_depth=depth, prefix_cache_mb=0)
    p = prompts(on)
    params = SamplingParams(max_new_tokens=30, stop_at_eos=False)
    first = on.generate(p, params)
    assert ids(first) == ids(off.generate(p, params))
    follow = [q + r.token_ids + on.encode(" so") for q, r in zip(p, first, strict=True)]
    again = on.generate(follow, params)
    assert ids(again) == ids(off.generate(follow, params))
    assert all(r.cached_tokens >= len(q) for q, r in zip(p, again, strict=True))
    drafted, accepted = sum(r.drafted for r in first + again), sum(r.accepted for r in first + again)
    assert 0 < accepted < drafted  # drafts were accepted and rejected
    # the MTP module drafted exactly what it drafts without the cache: its cached entries are right
    def drafting(results):
        return [(r.drafted, r.accepted, r.forward_passes) for r in results]

    assert drafting(again) == drafting(uncached.generate(follow, params))


def test_mtp_on_and_off_never_share_blocks(ckpt, off):
    """Blocks stored without MTP entries are dropped when MTP is switched on (and the reverse)."""
    on = cached(ckpt, use_mtp=True)
    p = prompts(on)
    on.set_mtp_depth(0)
    on.generate(p[:2], GREEDY)
    on.set_mtp_depth(1)
    assert on.prefix_cache.blocks == 0
    assert ids(on.generate(p[:2], GREEDY)) == ids(off.generate(p[:2], GREEDY))


def test_eviction_under_a_tiny_budget(ckpt, off):
    """A budget of a few blocks: evictions all along, output unchanged, memory within the budget."""
    probe = cached(ckpt, use_mtp=True)
    block = probe.prefix_cache.block_bytes
    on = cached(ckpt, use_mtp=True, prefix_cache_mb=12 * block / 2**20)  # 12 blocks of 4 positions
    assert on.prefix_cache.capacity == 12
    p = prompts(on)
    # the shared system prompt alone needs 30 blocks: the rows' paths are cut short where the budget ends;
    # prompts of their own (without it) fill and turn over what is left
    own = [on.encode(q) * 3 for q in QUESTIONS]
    batch = [p[0], own[0], own[1], p[1], own[2], p[0] + on.encode(" more"), own[3], own[0]]
    params = SamplingParams(max_new_tokens=16, stop_at_eos=False)
    for _ in range(2):
        assert ids(on.generate(batch, params)) == ids(off.generate(batch, params))
    stats = on.prefix_cache_stats()
    assert stats["evicted_blocks"] > 0 and stats["blocks"] <= 12 and stats["allocated_bytes"] <= 12 * block
    assert all(blk.refs == 0 for blk in on.prefix_cache._lru)  # every row released its blocks


def test_seeded_sampling_is_reproducible_with_the_cache(ckpt):
    on = cached(ckpt, use_mtp=True)
    p = prompts(on)
    params = SamplingParams(max_new_tokens=20, temperature=1.0, top_p=0.9, seed=3, stop_at_eos=False)
    a = on.generate([p[0]], params)[0]
    b = on.generate([p[0]], params)[0]
    assert b.cached_tokens > 0 and a.token_ids == b.token_ids


@torch.inference_mode()
def test_prefix_cached_prefill_logits_match_a_full_prefill(ckpt):
    """Main and MTP logits of a prefill that starts from cached entries against one over the whole prompt."""
    engine = Engine.load(ckpt, max_batch=2, prefix_cache_mb=0)
    model = engine.model
    args = model.args
    prompt = prompts(engine)[0]
    n, head = len(prompt), 29  # the cached part: a prompt that ends inside a block
    cache = KVCache(args, model.n_cache_layers, 2, n + 8)
    prefix = PrefixCache(len(model.layers), len(model.mtp), args.kv_lora_rank, args.qk_rope_head_dim,
                         block_size=8, budget_bytes=1 << 20, mtp=True, device=torch.device("cpu"),
                         dtype=torch.float32)

    def view(row: int, start: int) -> CacheView:
        return CacheView(cache, slice(row, row + 1), torch.tensor([start]), fresh=start == 0)

    # the full prefill (row 0), as the engine runs it, MTP included
    full = model.hidden(torch.tensor([prompt]), view(0, 0))
    full_mtp, _ = model.mtp_logits(0, full[:, :-1], torch.tensor([prompt[1:]]), view(0, 0))
    # an earlier request with the first `head` tokens, then a different continuation, stored (row 1)
    other = prompt[:head] + [(t + 7) % args.vocab_size for t in prompt[head:]]
    h = model.hidden(torch.tensor([other]), view(1, 0))
    model.mtp_logits(0, h[:, :-1], torch.tensor([other[1:]]), view(1, 0))
    prefix.release(prefix.store(other, n, n - 1, cache.kv[:, 1], cache.pe[:, 1]))
    cache.kv[:, 1].fill_(float("nan"))  # nothing of the earlier row may be read but what the cache copies
    cache.pe[:, 1].fill_(float("nan"))
    r = prefix.load(prompt, cache.kv[:, 1], cache.pe[:, 1])
    assert r == head - 1  # the MTP entry at `head - 1` would need token `head`, which differs
    rest = model.hidden(torch.tensor([prompt[r:]]), view(1, r))
    rest_mtp, _ = model.mtp_logits(0, rest[:, :-1], torch.tensor([prompt[r + 1:]]), view(1, r))
    torch.testing.assert_close(model.logits(rest), model.logits(full[:, r:]), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(rest_mtp, full_mtp[:, r:], rtol=1e-4, atol=1e-4)


def small_cache(block_size: int, capacity: int) -> PrefixCache:
    """2 main layers and 1 MTP layer of latents [4] and rotary keys [2], `capacity` blocks."""
    block_bytes = 3 * block_size * (4 + 2) * 4
    pc = PrefixCache(2, 1, 4, 2, block_size=block_size, budget_bytes=capacity * block_bytes, mtp=True,
                     device=torch.device("cpu"), dtype=torch.float32)
    assert pc.capacity == capacity
    return pc


def test_blocks_in_use_are_never_evicted():
    pc = small_cache(block_size=2, capacity=6)
    kv, pe = torch.randn(3, 32, 4), torch.randn(3, 32, 2)
    pinned = pc.store(list(range(8)), 8, 8, kv, pe)  # 4 blocks, held by a decoding row
    assert len(pinned) == 4
    for start in range(10):  # others come and go: only the 2 free slots turn over
        tokens = [100 + start] * 8
        pc.release(pc.store(tokens, 8, 8, kv, pe))
        assert pc.blocks <= 6
        assert pc.match(list(range(8)))[1] == 8  # still all there
    assert pc.stats.evicted_blocks > 0
    # every slot pinned: storing stops, nothing breaks
    more = pc.store([200] * 8, 8, 8, kv, pe)
    assert len(more) == 2 and pc.store([300] * 8, 8, 8, kv, pe) == []
    pc.release(more)
    pc.release(pinned)
    pc.release(pc.store([300] * 8, 8, 8, kv, pe))
    assert pc.match([300] * 8)[1] == 8


def test_ten_thousand_requests_leave_memory_bounded():
    pc = small_cache(block_size=4, capacity=50)
    kv, pe = torch.randn(3, 64, 4), torch.randn(3, 64, 2)
    rng = random.Random(0)
    system = [rng.randrange(50) for _ in range(12)]
    for _ in range(10_000):
        tokens = system + [rng.randrange(50) for _ in range(rng.randrange(1, 40))]
        pc.load(tokens, kv, pe)
        pc.release(pc.store(tokens, len(tokens), len(tokens), kv, pe))
    assert pc.blocks <= 50 and pc.kv.shape[1] == 50
    assert len(_tree(pc.root)) == pc.blocks  # every block reachable, none leaked
    assert pc.summary()["hit_rate"] > 0.2  # the shared system prompt stays


def _tree(node) -> list:
    out = []
    for child in node.children.values():
        out += [child, *_tree(child)]
    return out


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")),
                    reason="torch.compile on a CPU needs a C++ compiler")
def test_compiled_decoding_with_the_prefix_cache(ckpt, off):
    on = cached(ckpt, compile=True)
    p = prompts(on)
    params = SamplingParams(max_new_tokens=12, stop_at_eos=False)
    got = on.generate(p, params)
    follow = [q + r.token_ids for q, r in zip(p, got, strict=True)]
    again = on.generate(follow, params)
    assert ids(got) == ids(off.generate(p, params)) and ids(again) == ids(off.generate(follow, params))
    assert all(r.cached_tokens >= len(q) - 4 for q, r in zip(p, again, strict=True))


def test_requests_arriving_together_prefill_in_one_pass_and_compute_a_shared_prompt_once(ckpt, off):
    """Three prompts that share a system prompt, admitted at once: the first is prefilled alone and stored,
    the other two reuse its prompt and are prefilled together (ragged rests, padded): two prefill passes,
    the same tokens as without the cache, with MTP or without."""
    for depth in (0, 1):
        on = cached(ckpt, use_mtp=depth > 0)
        on.set_prefix_cache(True, clear=True)
        p = prompts(on)[:3]
        passes = count_prefills(on)
        try:
            got = on.generate(p, GREEDY)
        finally:
            del on.model.hidden
        assert ids(got) == ids(off.generate(p, GREEDY))
        assert passes == [1, 2]
        system = len(on.encode(SYSTEM))
        assert [r.cached_tokens > 0 for r in got] == [False, True, True]
        assert all(r.cached_tokens >= system - 2 * 4 for r in got[1:])


def count_prefills(engine: Engine) -> list[int]:
    """Make `engine.model.hidden` record the rows of every prefill pass (more tokens than a decoding step)."""
    passes: list[int] = []
    hidden = engine.model.hidden

    def counting(tokens, cache=None):
        if tokens.shape[1] > 1 + engine.mtp_depth:
            passes.append(tokens.shape[0])
        return hidden(tokens, cache)

    engine.model.hidden = counting
    return passes
