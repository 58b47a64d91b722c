"""Checkpoint loading and saving: FP8, MTP, round trips, sharding, and the errors for bad checkpoints."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from duet.errors import CheckpointError, ConfigError
from duet.model import load_model, save_model
from tests.tiny_models import make_duet_checkpoint, make_hf_checkpoint, quantize_blocks


@pytest.fixture(scope="module")
def hf_ckpt(tmp_path_factory):
    return make_hf_checkpoint(tmp_path_factory.mktemp("hf"), seed=3)


@pytest.fixture(scope="module")
def mtp_ckpt(tmp_path_factory):
    return make_duet_checkpoint(tmp_path_factory.mktemp("mtp"), seed=4, n_mtp=1)


def _transformers_model(path, **config_overrides):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    cfg = DeepseekV3Config.from_pretrained(path, **config_overrides)
    return DeepseekV3ForCausalLM.from_pretrained(path, config=cfg, dtype=torch.float32).eval()


# ----------------------------------------------------------------------------- FP8


@torch.no_grad()
def test_fp8_checkpoint_matches_dequantised_reference(hf_ckpt, tmp_path):
    block = 8  # small blocks so the tiny matrices span several, with partial blocks at the edges
    fp8_dir, deq_dir = tmp_path / "fp8", tmp_path / "dequantised"
    shutil.copytree(hf_ckpt, fp8_dir)
    shutil.copytree(hf_ckpt, deq_dir)
    state = load_file(hf_ckpt / "model.safetensors")
    fp8_state, deq_state = {}, {}
    for key, w in state.items():
        if key.endswith("_proj.weight") and w.ndim == 2:
            q, s = quantize_blocks(w, block)
            fp8_state[key], fp8_state[key.replace(".weight", ".weight_scale_inv")] = q, s
            deq_state[key] = q.float() * s.repeat_interleave(block, 0)[: w.shape[0]].repeat_interleave(block, 1)[
                :, : w.shape[1]]
        else:
            fp8_state[key] = deq_state[key] = w
    assert sum(t.dtype == torch.float8_e4m3fn for t in fp8_state.values()) > 20
    save_file(fp8_state, fp8_dir / "model.safetensors")
    save_file(deq_state, deq_dir / "model.safetensors")
    cfg = json.loads((fp8_dir / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": [block, block]}
    (fp8_dir / "config.json").write_text(json.dumps(cfg))

    ours = load_model(fp8_dir)
    reference = _transformers_model(deq_dir)
    ids = torch.randint(0, ours.args.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    assert (ours(ids) - reference(ids).logits).abs().max() < 1e-4
    # and quantisation really changed the weights, so the test is not comparing the original model to itself
    original = _transformers_model(hf_ckpt)
    assert (original(ids).logits - reference(ids).logits).abs().max() > 1e-3


# ----------------------------------------------------------------------------- MTP


def _rms(x, w, eps=1e-6):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


@torch.no_grad()
def test_mtp_module_matches_hand_written_reference(mtp_ckpt):
    """enorm/hnorm/eh_proj/shared_head written out by hand from the raw tensors; the transformer block
    of the MTP layer computed by transformers' own DeepseekV3DecoderLayer loaded from the same file."""
    ours = load_model(mtp_ckpt)
    assert len(ours.mtp) == 1
    n = ours.args.num_hidden_layers
    raw = load_file(mtp_ckpt / "model.safetensors")
    p = f"model.layers.{n}."
    reference = _transformers_model(mtp_ckpt, num_hidden_layers=n + 1)  # the MTP block becomes layer n

    ids = torch.randint(0, ours.args.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    h = ours.hidden(ids[:, :-1])  # main model's final normed hidden states at positions i
    next_ids = ids[:, 1:]  # tokens i+1
    logits, _ = ours.mtp_logits(0, h, next_ids)

    emb = raw["model.embed_tokens.weight"][next_ids]
    x = torch.cat([_rms(emb, raw[p + "enorm.weight"]), _rms(h, raw[p + "hnorm.weight"])], dim=-1)
    x = x @ raw[p + "eh_proj.weight"].T
    s = x.shape[1]
    positions = torch.arange(s)[None].expand(2, -1)
    rope = reference.model.rotary_emb(x, positions)
    mask = torch.full((s, s), float("-inf")).triu(1)[None, None]
    x = reference.model.layers[n](x, attention_mask=mask, position_ids=positions, position_embeddings=rope)
    expected = _rms(x, raw[p + "shared_head.norm.weight"]) @ raw[p + "shared_head.head.weight"].T
    assert (logits - expected).abs().max() < 1e-4


def test_mtp_save_load_round_trip_is_bit_exact(mtp_ckpt, tmp_path):
    model = load_model(mtp_ckpt)
    save_model(model, tmp_path)
    first, second = load_file(mtp_ckpt / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    assert first.keys() == second.keys()
    assert any(k.startswith(f"model.layers.{model.args.num_hidden_layers}.") for k in first)
    for key in first:
        assert first[key].dtype == second[key].dtype and torch.equal(first[key], second[key]), key
    again = load_model(tmp_path)
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_checkpoint_without_mtp_weights_loads_without_mtp(hf_ckpt):
    """transformers writes num_nextn_predict_layers but no MTP weights; duet loads the main model."""
    assert json.loads((hf_ckpt / "config.json").read_text()).get("num_nextn_predict_layers", 0) >= 0
    assert len(load_model(hf_ckpt).mtp) == 0


@torch.no_grad()
def test_duet_checkpoint_loads_in_transformers(mtp_ckpt):
    ours = load_model(mtp_ckpt)
    theirs = _transformers_model(mtp_ckpt)
    ids = torch.randint(0, ours.args.vocab_size, (1, 20), generator=torch.Generator().manual_seed(2))
    assert (ours(ids) - theirs(ids).logits).abs().max() < 1e-4


@torch.no_grad()
def test_sharded_save_and_load(mtp_ckpt, tmp_path):
    model = load_model(mtp_ckpt)
    save_model(model, tmp_path, max_shard_bytes=20_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert not (tmp_path / "model.safetensors").exists()
    again = load_model(tmp_path)
    ids = torch.randint(0, model.args.vocab_size, (1, 9))
    assert torch.equal(model(ids), again(ids))


def test_bf16_load(hf_ckpt):
    model = load_model(hf_ckpt, dtype=torch.bfloat16)
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.layers[1].mlp.gate.weight.dtype == torch.float32  # routing stays fp32
    logits = model(torch.tensor([[3, 4, 5]]))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


# ----------------------------------------------------------------------------- bad checkpoints


def _copy(src, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def _rewrite_weights(path, edit):
    state = load_file(path / "model.safetensors")
    edit(state)
    save_file(state, path / "model.safetensors")


def _bad_cases():
    def missing_dir(p):
        shutil.rmtree(p)

    def a_file(p):
        shutil.rmtree(p)
        p.write_text("not a directory")

    def no_config(p):
        (p / "config.json").unlink()

    def bad_json(p):
        (p / "config.json").write_text("{ nope")

    def llama(p):
        _edit_config(p, architectures=["LlamaForCausalLM"], model_type="llama")

    def bad_scoring(p):
        _edit_config(p, scoring_func="relu")

    def bad_rope(p):
        _edit_config(p, rope_scaling={"type": "dynamic", "factor": 2.0}, rope_parameters=None)

    def bad_field_type(p):
        _edit_config(p, hidden_size="big")

    def missing_required(p):
        cfg = json.loads((p / "config.json").read_text())
        del cfg["kv_lora_rank"]
        (p / "config.json").write_text(json.dumps(cfg))

    def no_weights(p):
        (p / "model.safetensors").unlink()

    def missing_tensor(p):
        _rewrite_weights(p, lambda s: s.pop("model.layers.1.self_attn.kv_b_proj.weight"))

    def wrong_shape(p):
        _rewrite_weights(p, lambda s: s.update({"model.norm.weight": torch.ones(7)}))

    def truncated(p):
        data = (p / "model.safetensors").read_bytes()
        (p / "model.safetensors").write_bytes(data[: len(data) // 2])

    def garbage(p):
        (p / "model.safetensors").write_bytes(b"\x00\x01garbage" * 10)

    def missing_shard(p):
        (p / "model.safetensors").rename(p / "model-00001-of-00002.safetensors")
        index = {"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}
        (p / "model.safetensors.index.json").write_text(json.dumps(index))

    return {
        "missing_dir": (missing_dir, CheckpointError, "no such checkpoint directory"),
        "a_file": (a_file, CheckpointError, "not a directory"),
        "no_config": (no_config, CheckpointError, "no config.json"),
        "bad_json": (bad_json, CheckpointError, "not valid JSON"),
        "llama": (llama, ConfigError, "LlamaForCausalLM"),
        "bad_scoring": (bad_scoring, ConfigError, "scoring_func='relu'"),
        "bad_rope": (bad_rope, ConfigError, "rope_scaling type 'dynamic'"),
        "bad_field_type": (bad_field_type, ConfigError, "hidden_size='big'"),
        "missing_required": (missing_required, ConfigError, "'kv_lora_rank' is missing"),
        "no_weights": (no_weights, CheckpointError, "weights are missing"),
        "missing_tensor": (missing_tensor, CheckpointError, "model.layers.1.self_attn.kv_b_proj.weight is missing"),
        "wrong_shape": (wrong_shape, CheckpointError, "model.norm.weight has shape [7], expected [32]"),
        "truncated": (truncated, CheckpointError, "corrupt or truncated"),
        "garbage": (garbage, CheckpointError, "corrupt or truncated"),
        "missing_shard": (missing_shard, CheckpointError, "model-00002-of-00002.safetensors"),
    }


@pytest.mark.parametrize("case", list(_bad_cases()))
def test_bad_checkpoint_gives_one_clear_line(case, hf_ckpt, tmp_path):
    damage, error, words = _bad_cases()[case]
    path = _copy(hf_ckpt, tmp_path)
    damage(path)
    with pytest.raises(error) as info:
        load_model(path)
    message = str(info.value)
    assert words in message
    assert "\n" not in message


def test_num_hidden_layers_reaching_into_the_mtp_module_is_refused(mtp_ckpt, tmp_path):
    """One layer too many in config.json would load the MTP module's block as a main layer, silently."""
    path = _copy(mtp_ckpt, tmp_path)
    layers = json.loads((path / "config.json").read_text())["num_hidden_layers"]
    _edit_config(path, num_hidden_layers=layers + 1)
    with pytest.raises(CheckpointError, match=f"set num_hidden_layers to {layers}") as info:
        load_model(path)
    assert "\n" not in str(info.value)


def test_safetensors_are_memory_mapped(hf_ckpt):
    """The loader reads through safe_open (mmap); check the file really is read lazily by key."""
    with safe_open(str(hf_ckpt / "model.safetensors"), framework="pt") as f:
        assert "model.norm.weight" in f.keys()


@torch.no_grad()
def test_tied_embeddings_stay_tied_after_loading(tmp_path):
    """A checkpoint with tie_word_embeddings loads with one shared embedding/head tensor, as transformers does."""
    path = make_hf_checkpoint(tmp_path, seed=5, tie_word_embeddings=True)
    ours = load_model(path)
    assert ours.lm_head.weight is ours.embed_tokens.weight
    assert all(p.device.type == "cpu" for p in ours.parameters())
    theirs = _transformers_model(path)
    ids = torch.randint(0, ours.args.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    assert (ours(ids) - theirs(ids).logits).abs().max() < 1e-4
