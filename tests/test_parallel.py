"""Tensor and expert parallelism (duet.model.parallel) on the CPU: real processes joined by gloo, each loading its
part of a tiny random V3 checkpoint (dense first layer, group-limited routing, an MTP module), against the
one-process model; the memory each rank holds; and a rank that dies or hangs."""

from __future__ import annotations

import os
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from duet.errors import DuetError
from duet.model import CacheView, KVCache, load_config, load_model
from duet.model.checkpoint import _TensorIndex
from duet.model.parallel import World, init_from_env, load_parallel_model, parallelize, split
from duet.model.plan import make_plan, meta_model
from tests.processes import free_port, run_ranks
from tests.tiny_models import make_duet_checkpoint, make_fp8_checkpoint

V3_CONFIG = Path(__file__).parent / "data" / "deepseek_v3_config.json"
WAIT = 60.0  # seconds a test waits for its ranks (a loaded machine starts 4 Python processes slowly)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    # TINY_V3: 4 heads and 8 routed experts (4 groups of 2, top-2 groups) split over 2 or 4 ranks; a vocabulary of
    # 97, which 4 ranks split unevenly (25, 24, 24, 24)
    return make_duet_checkpoint(tmp_path_factory.mktemp("v3"), seed=5, n_mtp=1)


@pytest.fixture(scope="module")
def fp8_ckpt(tmp_path_factory):
    """FP8 with 8x8 blocks, which 2 ranks split off the block boundaries (kv_b_proj's 56 rows, o_proj's 24 columns
    into 28 and 12); no q_lora (q_proj); the embedding tied to the head."""
    base = make_duet_checkpoint(tmp_path_factory.mktemp("base"), seed=6, n_mtp=1, q_lora_rank=None,
                                tie_word_embeddings=True)
    return make_fp8_checkpoint(base, tmp_path_factory.mktemp("fp8") / "ckpt", block=8)


# ----------------------------------------------------------------------------- what both models run


@torch.no_grad()
def _run(model) -> dict[str, torch.Tensor]:
    """The same calls on the one-process and on a parallel model: a full forward, the MTP module, and a prefill
    (naive attention) followed by decode steps over the latent cache (absorbed attention), with MTP after each."""
    ids = torch.randint(0, model.args.vocab_size, (2, 13), generator=torch.Generator().manual_seed(0))
    out = {"forward": model(ids)}
    out["mtp"] = model.mtp_logits(0, model.hidden(ids[:, :-1]), ids[:, 1:])[0]
    cache = KVCache(model.args, model.n_cache_layers, batch_size=2, max_seq_len=16)
    start = 0
    for step, width in enumerate((6, 1, 1, 3, 1)):
        positions = torch.full((2,), start)
        h = model.hidden(ids[:, start:start + width], CacheView(cache, slice(0, 2), positions, fresh=start == 0))
        out[f"step{step}"] = model.logits(h)
        view = CacheView(cache, slice(0, 2), positions, fresh=start == 0)
        out[f"mtp{step}"] = model.mtp_logits(0, h, ids[:, start + 1:start + width + 1], view)[0]
        start += width
    out["cache_kv"], out["cache_pe"] = cache.kv, cache.pe  # every rank holds the whole latent cache
    return out


# ----------------------------------------------------------------------------- running ranks


def _rank_main(rank: int, size: int, port: int, out: Path, timeout: float, job, args: tuple) -> None:
    """One rank: join the group as torchrun would have it join, run `job(world, *args)`, save what it returns."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(size),
                      LOCAL_RANK=str(rank), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    try:
        # start together, so that a short `timeout` is not spent waiting for a slow sibling to start
        (out / f"ready{rank}").touch()
        while not all((out / f"ready{r}").exists() for r in range(size)):
            time.sleep(0.01)
        world = init_from_env("cpu", timeout=timeout)
        result = job(world, *args)
        torch.save(result, out / f"rank{rank}.pt")
    except BaseException:
        (out / f"rank{rank}.err").write_text(traceback.format_exc())
        os._exit(1)
    if result.get("error") is not None:
        os._exit(0)  # after a failed collective: no goodbye to the others
    dist.barrier()
    dist.destroy_process_group()


def _launch(size: int, out: Path, job, *args, timeout: float = 30.0, wait: tuple[int, ...] | None = None) -> list:
    """Run `job` on `size` spawned ranks; wait for the ranks in `wait` (default: all), stop the others (the ones
    a test makes hang); return what each rank's job returned (None for a rank that saved nothing)."""
    port = free_port()
    run_ranks(_rank_main, [(r, size, port, out, timeout, job, args) for r in range(size)],
              range(size) if wait is None else wait, WAIT, out)
    return [torch.load(out / f"rank{r}.pt") if (out / f"rank{r}.pt").exists() else None for r in range(size)]


def _compare_job(world: World, path: str) -> dict:
    model = load_parallel_model(path, dtype=torch.float32, world=world)
    out = _run(model)
    out["numel"] = {name: p.numel() for name, p in model.named_parameters()}
    out["n_heads"] = model.layers[0].self_attn.n_heads
    return out


def _check_equal(results: list[dict], reference: dict) -> None:
    """Every rank's outputs equal the one-process model's within fp32 noise (the all-reduces add in another
    order), and each other's exactly: all ranks route alike and would sample alike."""
    for rank, out in enumerate(results):
        assert all(torch.equal(out[name], results[0][name]) for name in reference), rank
        for name, want in reference.items():
            torch.testing.assert_close(out[name], want, atol=1e-5, rtol=0,
                                       msg=lambda m, rank=rank, name=name: f"rank {rank}, {name}: {m}")


# ----------------------------------------------------------------------------- tests


def test_four_ranks_equal_one_process_and_each_holds_a_quarter(ckpt, tmp_path):
    results = _launch(4, tmp_path, _compare_job, str(ckpt))
    one = load_model(ckpt)
    _check_equal(results, _run(one))
    assert [r["n_heads"] for r in results] == [1, 1, 1, 1]

    whole = {name: p.numel() for name, p in one.named_parameters()}
    split_names = set()
    for name, n in whole.items():
        parts = [r["numel"][name] for r in results]
        if parts != [n] * 4:  # not replicated: split four ways, as evenly as whole heads, experts, rows allow
            assert sum(parts) == n and max(parts) / min(parts) < 1.1, (name, parts)
            split_names.add(name)
    assert {"embed_tokens.weight", "lm_head.weight", "layers.0.mlp.down_proj.weight",
            "layers.1.mlp.experts.gate_proj", "layers.1.mlp.shared_experts.up_proj.weight",
            "mtp.0.self_attn.kv_b_proj.weight", "mtp.0.self_attn.o_proj.weight"} <= split_names
    assert not any(part in name for name in split_names
                   for part in ("norm", ".gate.", "q_a_proj", "kv_a_proj_with_mqa", "eh_proj"))
    # about 1/4 of the split parts per rank; rank 0 holds the largest shard of each, which is what `duet plan` counts
    split_total = sum(whole[name] for name in split_names)
    for r in results:
        assert sum(r["numel"][name] for name in split_names) == pytest.approx(split_total / 4, rel=0.01)
    plan = make_plan(one.args, device_memory=10**12, nproc=4, dtype="fp32")
    assert sum(results[0]["numel"].values()) == sum(g.rank_parameters for g in plan.groups)


def test_two_ranks_fp8_split_off_block_boundaries(fp8_ckpt, tmp_path):
    results = _launch(2, tmp_path, _compare_job, str(fp8_ckpt))
    _check_equal(results, _run(load_model(fp8_ckpt)))


def _stalling_job(world: World, path: str, how: str) -> dict:
    model = load_parallel_model(path, world=world)
    if world.rank == 1:
        if how == "dies":
            os._exit(3)
        time.sleep(WAIT)  # hangs: never joins the next collective
    start = time.monotonic()
    try:
        _run(model)
    except Exception as e:  # what the survivors see
        return {"error": f"{type(e).__name__}: {e}", "seconds": time.monotonic() - start}
    return {"error": None}


@pytest.mark.parametrize("how", ["dies", "hangs"])
def test_a_rank_that_dies_or_hangs_makes_the_others_fail_within_the_timeout(ckpt, tmp_path, how):
    begin = time.monotonic()
    survivor, _ = _launch(2, tmp_path, _stalling_job, str(ckpt), how, timeout=3.0, wait=(0,))
    assert survivor["error"], survivor
    # a dead rank's closed connection is seen at once; a hung one after the process-group timeout, not the test's
    assert (survivor["seconds"] < 3.0 + 10.0) and (how == "dies" or survivor["seconds"] > 2.5), survivor
    assert time.monotonic() - begin < 40


def test_a_rank_reads_only_its_own_slices(ckpt, monkeypatch):
    """Rank 2 of 4 (loading needs no communication): every split tensor is read as a slice, only experts 4 and 5
    are read at all, and what the rank holds is exactly its slices of the whole model."""
    reads = []
    get = _TensorIndex.get

    def spy(self, key, part=None):
        reads.append((key, part))
        return get(self, key, part)

    monkeypatch.setattr(_TensorIndex, "get", spy)
    model = load_parallel_model(ckpt, world=World(2, 4))
    whole_reads = {key for key, part in reads if part is None}
    split_tensors = ("embed_tokens", "lm_head", "q_b_proj", "kv_b_proj", "o_proj", "mlp.down_proj", "shared_experts")
    assert not any(name in key for key in whole_reads for name in split_tensors)
    assert {int(key.split(".experts.")[1].split(".")[0]) for key in whole_reads if ".experts." in key} == {4, 5}

    whole = dict(load_model(ckpt).named_parameters())
    parts = parallelize(meta_model(model.args, "fp32", n_mtp=1), World(2, 4))
    converted = load_model(ckpt)  # parallelize on a model with weights: the same slices
    parallelize(converted, World(2, 4))
    converted = dict(converted.named_parameters())
    for name, p in model.named_parameters():
        want = parts[name].of(whole[name]) if name in parts else whole[name]
        assert torch.equal(p, want) and torch.equal(converted[name], want), name
    assert parts["embed_tokens.weight"].start == 49 and parts["layers.0.self_attn.o_proj.weight"].dim == 1


def test_v3_splits_as_duet_plan_counts_on_block_boundaries():
    """DeepSeek-V3 over 8 ranks on the meta device: every rank's parameters are what `duet plan` counts, and every
    split of an FP8 matrix falls on the 128 boundaries of its scale blocks (no block is dequantised twice)."""
    args = load_config(V3_CONFIG)
    plan = make_plan(args, device_memory=10**13, nproc=8, dtype="bf16")
    for rank in (0, 7):
        model = meta_model(args)
        parts = parallelize(model, World(rank, 8))
        assert sum(p.numel() for p in model.parameters()) == sum(g.rank_parameters for g in plan.groups)
        for name, part in parts.items():
            if ".experts." not in name and not name.startswith(("embed_tokens", "lm_head")):
                assert part.start % 128 == 0 and part.stop % 128 == 0, (name, part)
        assert model.layers[0].self_attn.n_heads == 16
        assert parts["layers.3.mlp.experts.down_proj"].size == 32


def test_split_deals_evenly_in_whole_units():
    assert split(97, 4) == [(0, 25), (25, 49), (49, 73), (73, 97)]
    assert split(4 * 12, 2, unit=12) == [(0, 24), (24, 48)]
    with pytest.raises(ValueError):
        split(3 * 12, 4, unit=12)  # 3 heads cannot give 4 ranks one each
    with pytest.raises(ValueError):
        split(50, 2, unit=12)


def test_init_from_env_names_what_torchrun_should_have_set(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(DuetError, match="RANK, WORLD_SIZE.*torchrun"):
        init_from_env("cpu")
