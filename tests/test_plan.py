"""`duet plan` and the local backend's memory check: counts from duet's module tree on the meta device,
checked against DeepSeek-V3's published figures (tests/data/deepseek_v3_config.json is its config.json)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from duet.cli import main
from duet.model import load_config
from duet.model.plan import make_plan, parse_memory

V3_CONFIG = Path(__file__).parent / "data" / "deepseek_v3_config.json"
GB = 10**9
H200 = 141 * GB  # "141 GB" of HBM3e, as NVIDIA quotes it


@pytest.fixture(scope="module")
def v3():
    return load_config(V3_CONFIG)


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """Run `duet ARGS` in this process: (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as info:
        main(list(args))
    out, err = capsys.readouterr()
    return info.value.code, out, err


# ------------------------------------------------------------------------------------------- V3's numbers


def test_v3_parameters_match_the_published_figures(v3):
    """671B in the main model; 685B as published with the MTP module, whose checkpoint tensors include its own
    copies of the embedding and head (13.5B: the "14B" of the model card); 37B activated per token."""
    plan = make_plan(v3, device_memory=H200)
    assert plan.parameters_main == pytest.approx(671e9, rel=0.01)
    assert plan.parameters_main + plan.parameters_mtp_stored == pytest.approx(685e9, rel=0.01)
    assert 13e9 < plan.parameters_mtp_stored < 14.5e9
    # in memory the MTP module shares the main model's embedding and head: one MoE block and eh_proj
    assert 11e9 < plan.parameters_mtp < 12e9
    # 36.6B: DeepSeek's "37B" (the embedding counted as the one row a token reads; see activated_parameters)
    assert 36.5e9 <= plan.activated < 37.5e9


def test_fp8_v3_fits_eight_h200s_and_bf16_needs_sixteen(v3):
    fp8 = make_plan(v3, nproc=1, dtype="fp8", device_memory=10**13)
    assert 680 * GB < fp8.weight_bytes < 695 * GB  # e4m3 weights, float32 block scales, bf16 embedding and head
    assert make_plan(v3, nproc=1, dtype="bf16", device_memory=10**13).weight_bytes > 1.3e12

    assert make_plan(v3, nproc=8, dtype="fp8", device_memory=H200).fits  # one full-context sequence of cache
    eight = make_plan(v3, nproc=8, dtype="bf16", device_memory=H200)
    assert not eight.fits and not eight.weights_fit and eight.cache_tokens == 0
    sixteen = make_plan(v3, nproc=16, dtype="bf16", device_memory=H200)
    assert sixteen.fits and sixteen.cache_tokens > sixteen.max_seq_len


def test_the_latent_cache_is_kv_lora_rank_plus_rope_per_layer_on_every_rank(v3):
    for nproc in (1, 8):
        plan = make_plan(v3, nproc=nproc, dtype="fp8", device_memory=H200, max_batch=4, max_seq_len=1000)
        assert plan.cache_layers == 61 + 1  # the MTP layer caches too
        assert plan.cache_bytes_per_token == 62 * (512 + 64) * 2  # bf16, not split by the heads' TP
        assert plan.cache_bytes == 4 * 1000 * plan.cache_bytes_per_token
        left = plan.device_memory - plan.weight_bytes - plan.margin_bytes
        assert plan.cache_tokens == max(left, 0) // plan.cache_bytes_per_token
        assert plan.free_bytes == left - plan.cache_bytes


def test_routed_experts_are_split_by_expert_and_the_router_is_replicated(v3):
    one, eight = (make_plan(v3, nproc=n, dtype="fp8", device_memory=H200) for n in (1, 8))
    groups = {g.name: g for g in eight.groups}
    assert groups["routed experts"].rank_parameters * 8 == groups["routed experts"].parameters
    assert groups["embedding + head"].rank_parameters * 8 == groups["embedding + head"].parameters
    assert groups["router"].rank_parameters == groups["router"].parameters
    assert eight.weight_bytes < one.weight_bytes / 7.5  # almost everything is split


def test_memory_sizes_parse():
    assert parse_memory("141GiB") == 141 * 2**30
    assert parse_memory("141GB") == parse_memory("141 gb") == 141 * 10**9
    assert parse_memory("512MiB") == 512 * 2**20 and parse_memory("1.5TiB") == int(1.5 * 2**40)
    assert parse_memory("4096") == 4096
    for bad in ("lots", "141 GiBs", "-1GB", "0GiB", ""):
        with pytest.raises(ValueError):
            parse_memory(bad)


# ------------------------------------------------------------------------------------------- the command


def test_plan_json(capsys):
    code, out, err = cli(capsys, "plan", "--model", str(V3_CONFIG), "--nproc", "8", "--device-memory", "141GB",
                         "--max-batch", "2", "--max-seq-len", "4096", "--json")
    assert code == 0 and not err
    plan = json.loads(out)
    assert plan["model"] == str(V3_CONFIG) and plan["nproc"] == 8 and plan["device_memory"] == H200
    assert plan["dtype"] == "fp8"  # the checkpoint's own quantisation by default
    assert plan["fits"] is True and plan["weights_fit"] is True
    assert plan["cache_bytes"] == 2 * 4096 * 62 * 576 * 2
    assert {g["name"] for g in plan["groups"]} >= {"attention", "routed experts", "shared experts", "embedding + head"}
    assert sum(g["rank_bytes"] for g in plan["groups"]) == plan["weight_bytes"]


def test_plan_table_says_whether_it_fits(capsys):
    code, out, _ = cli(capsys, "plan", "-m", str(V3_CONFIG), "-n", "8", "--dtype", "bf16",
                       "--device-memory", "141GB")
    assert code == 0 and "routed experts" in out and "latent cache (62 layers)" in out
    assert "fits: no (not even the weights)" in out


def test_the_embedded_model_fits_one_process(capsys):
    code, out, _ = cli(capsys, "plan", "--json")
    plan = json.loads(out)
    assert code == 0 and plan["fits"] and plan["nproc"] == 1
    assert 7e6 < plan["parameters_main"] + plan["parameters_mtp"] < 9e6  # the 7.9M-parameter model


@pytest.mark.parametrize(("args", "message"), [
    (["--model", "{tmp}/nowhere"], "--model': {tmp}/nowhere: no such checkpoint directory"),
    (["--model", "{tmp}/bad.json"], "not valid JSON"),
    (["--model", "{tmp}/llama.json"], "LlamaForCausalLM"),
    (["--dtype", "int4"], "'--dtype': 'int4' is not one of fp8, bf16, fp16, fp32"),
    (["--device-memory", "lots"], "'--device-memory': 'lots' is not an amount of memory"),
    (["--nproc", "3", "--model", str(V3_CONFIG)], "3 processes cannot split the model's num_attention_heads=128"),
    (["--nproc", "0"], "'--nproc'"),
])
def test_bad_input_is_one_line_and_exit_code_2(capsys, tmp_path, args, message):
    (tmp_path / "bad.json").write_text("{")
    (tmp_path / "llama.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    code, out, err = cli(capsys, "plan", *(a.format(tmp=tmp_path) for a in args))
    assert code == 2 and not out
    assert err.startswith("error: ") and err.count("\n") == 1 and message.format(tmp=tmp_path) in err, err


def test_plan_help_does_not_import_torch():
    code = ("import sys; from duet.cli import main\ntry:\n    main(['plan', '--help'])\nexcept SystemExit as e:\n"
            "    assert e.code == 0\nassert 'torch' not in sys.modules, 'torch was imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "--nproc" in r.stdout


# ------------------------------------------------------------------------------------------- duet solve's check


def test_the_local_backend_refuses_a_model_that_cannot_fit_before_reading_weights(tmp_path, monkeypatch):
    """A checkpoint with a config and no weights: the refusal comes first (else: "the weights are missing")."""
    from duet.agents.backends import BackendError, make_backend
    from duet.model import plan
    from tests.tiny_models import make_engine_checkpoint

    ckpt = make_engine_checkpoint(tmp_path / "tiny", seed=1)
    for weights in ckpt.glob("*.safetensors"):
        weights.unlink()
    monkeypatch.setattr(plan, "available_memory", lambda device: 64 * 2**10)  # 64 KiB free
    with pytest.raises(BackendError) as info:
        make_backend(f"local:{ckpt}")
    message = str(info.value)
    assert "its weights need" in message and "64.0 KiB free" in message and "--dtype bfloat16" in message
    assert "duet plan" in message and "\n" not in message

    monkeypatch.setattr(plan, "available_memory", lambda device: None)  # unknown: no check, the loader's error
    with pytest.raises(BackendError, match="weights are missing"):
        make_backend(f"local:{ckpt}")


def test_duet_solve_refuses_v3_in_fp32_on_this_machine(tmp_path):
    """End to end: V3's config without weights; 2.7 TB of fp32 weights exceed this machine's memory."""
    duet = Path(sys.executable).with_name("duet")
    if not duet.exists():  # pragma: no cover - an install without the console script next to python
        duet = Path(shutil.which("duet") or "duet")
    model = tmp_path / "v3"
    model.mkdir()
    shutil.copy(V3_CONFIG, model / "config.json")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DUET_", "XDG_"))}
    env.update(HOME=str(tmp_path), XDG_CONFIG_HOME=str(tmp_path / "config"), XDG_DATA_HOME=str(tmp_path / "data"))
    r = subprocess.run([str(duet), "solve", "--model", str(model), "--device", "cpu", "--no-log", "What is 2+2?"],
                       capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert r.returncode == 1, r.stderr
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert "its weights need 2," in r.stderr and "in fp32" in r.stderr and "weights are missing" not in r.stderr
