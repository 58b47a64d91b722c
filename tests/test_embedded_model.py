"""The embedded default model that ships with duet: found without flags, within its size budget, real."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from duet.model import count_parameters, load_model
from duet.model.embedded import EMBEDDED_DIR, default_model_path

DUET = Path(sys.executable).with_name("duet")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model():
    return load_model(default_model_path())


def test_default_path_is_the_packaged_model(monkeypatch):
    monkeypatch.delenv("DUET_MODEL", raising=False)
    assert default_model_path() == EMBEDDED_DIR
    monkeypatch.setenv("DUET_MODEL", "/somewhere/else")
    assert default_model_path() == Path("/somewhere/else")


def test_is_a_small_deepseek_v3_with_mtp(model):
    config = json.loads((EMBEDDED_DIR / "config.json").read_text())
    assert config["architectures"] == ["DeepseekV3ForCausalLM"]
    assert count_parameters(model) <= 25_000_000
    assert len(model.mtp) == 1
    assert model.args.scoring_func == "sigmoid" and model.args.n_group > 1 and model.args.n_shared_experts == 1
    assert (EMBEDDED_DIR / "MODEL_CARD.md").is_file()
    biases = [m.mlp.gate.e_score_correction_bias for m in model.layers if hasattr(m.mlp, "gate")]
    assert biases and all(b.abs().sum() > 0 for b in biases), "auxiliary-loss-free balancing left no trace"


@torch.no_grad()
def test_loads_in_transformers_with_the_same_logits(model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(EMBEDDED_DIR)
    assert len(tok) == model.args.vocab_size and tok.chat_template
    theirs = AutoModelForCausalLM.from_pretrained(EMBEDDED_DIR, dtype=torch.float32).eval()
    text = tok.apply_chat_template([{"role": "user", "content": "Tom has 3 apples."}], tokenize=False,
                                   add_generation_prompt=True)
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    assert (model(ids) - theirs(ids).logits).abs().max() < 1e-3


def test_duet_solve_runs_on_it_without_flags(tmp_path):
    env = {**os.environ, "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path / "c"),
           "XDG_DATA_HOME": str(tmp_path / "d")}
    env.pop("DUET_MODEL", None)
    r = subprocess.run([str(DUET), "solve", "--json", "--no-log",
                        "Tom has 12 apples and buys 35 more. How many apples does he have now?"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode in (0, 3), r.stderr
    result = json.loads(r.stdout)
    assert result["solver_model"] == "local:embedded"
    assert result["answer"], "the embedded model gave no answer"
    assert result["turns"][0]["steps"], "the solver wrote no code"


def test_make_demos_two_step_question_is_answered_right_and_agreed(tmp_path):
    """The front door: `make demo` asks a two-step question no training source tells (tests/test_variations.py
    checks that) and the embedded model must answer it right, with its critic agreeing."""
    question = re.search(r'duet solve "([^"]+)"', (REPO / "Makefile").read_text()).group(1)
    env = {**os.environ, "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path / "c"),
           "XDG_DATA_HOME": str(tmp_path / "d")}
    env.pop("DUET_MODEL", None)
    r = subprocess.run([str(DUET), "solve", "--json", "--no-log", question], capture_output=True, text=True,
                       env=env, timeout=300)
    result = json.loads(r.stdout)
    assert (r.returncode, result["answer"], result["agreed"]) == (0, "180", True), result["stop_reason"]
