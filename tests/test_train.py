"""`duet train`: its data speaks the agents' protocol, its split holds, and its runs reproduce and resume.

The data is checked against independent references: code blocks are run again in a separate Python
process, answers and verdicts are read back with the agents' own parsers, and the MAWPS equations
with their original numbers must give the dataset's answers.
"""

from __future__ import annotations

import csv
import itertools
import json
import random
import re
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from duet.agents.critic import NO_ANSWER_REASON
from duet.agents.protocol import extract_final_answer, find_code_blocks, parse_verdict
from duet.answers import equivalent as answers_match
from duet.prompts import load_prompts
from duet.train.conversations import attempt_conversations, conversations
from duet.train.data import MIX, example_stream
from duet.train.sources import Sources, is_dev, load_attempts, mawps_problem, normalised
from duet.train.synthetic import synthetic_problem
from duet.train.tokenizer import train_tokenizer
from duet.train.trainer import TrainConfig, TrainError, balance_experts, encode_example, install_model, losses, train

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# A handful of rows in the two real formats, written for these tests.
MAWPS_ROWS = [
    ("Ann has number0 apples and buys number1 more . How many apples does she have ?", "4.0 7.0",
     "+ number0 number1", "11.0"),
    ("A box holds number0 pens . How many pens are in number1 boxes ?", "12.0 5.0", "* number0 number1", "60.0"),
    ("Tom had number0 cards and gave number1 away . How many are left ?", "30.0 8.0", "- number0 number1", "22.0"),
    ("number0 cookies are shared among number1 kids . How many does each get ?", "36.0 4.0",
     "/ number0 number1", "9.0"),
    ("Sue read number0 pages on Monday and number1 on Tuesday , then number2 more . How many pages in all ?",
     "10.0 15.0 5.0", "+ + number0 number1 number2", "30.0"),
    ("A farm has number0 cows and number1 pigs . How many more cows than pigs ?", "50.0 20.0",
     "- number0 number1", "30.0"),
]
# four copies of each story, told a little differently: a story told the same way in two rows is kept out of
# training when either row is in the dev split
MAWPS_ROWS = [(q.replace(" ?", f" {w} ?", 1), *rest) for w in ("", "today", "then", "again") for q, *rest in MAWPS_ROWS]
GSM8K_ROWS = [
    {"question": "Mia buys 3 packs of 6 eggs and uses 5. How many eggs are left?",
     "answer": "She has 3*6 = <<3*6=18>>18 eggs.\nLeft: 18-5 = <<18-5=13>>13.\n#### 13"},
    {"question": "A bus has 40 seats and 25 are taken. How many are free?",
     "answer": "40-25 = <<40-25=15>>15 seats.\n#### 15"},
] * 6

TINY_MODEL = {
    "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 48,
    "moe_intermediate_size": 16, "n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1,
    "n_group": 2, "topk_group": 1, "first_k_dense_replace": 1, "q_lora_rank": 16, "kv_lora_rank": 12,
    "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 8, "routed_scaling_factor": 1.0,
    "max_position_embeddings": 512, "num_nextn_predict_layers": 1,
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_data_dir(tmp_path_factory.mktemp("data"))


def write_data_dir(root: Path) -> Path:
    """A tiny shared-data folder in `root`: MAWPS_ROWS and GSM8K_ROWS in the layout of ../shared/data."""
    (root / "mawps_asdiv_a").mkdir()
    (root / "gsm8k").mkdir()
    with open(root / "mawps_asdiv_a" / "train.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Question", "Numbers", "Equation", "Answer"])
        w.writerows(MAWPS_ROWS)
    (root / "gsm8k" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in GSM8K_ROWS))
    return root


@pytest.fixture(scope="module")
def sources(data_dir) -> Sources:
    return Sources.load(data_dir)


def run_python(code: str) -> str:
    """stdout of `code` run in a fresh interpreter: an independent check of the recorded outputs."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30).stdout


# ----------------------------------------------------------------------------- data


def test_solver_examples_follow_the_protocol_with_real_outputs(sources):
    prompts = load_prompts()
    seen = set()
    for conv in itertools.islice(example_stream(sources, seed=3, prompts=prompts), 300):
        if conv.kind != "solve":
            continue
        assert [m["role"] for m in conv.messages] == ["system", "user", "assistant"]
        assert conv.messages[0]["content"] == prompts.solver_system
        text = conv.messages[-1]["content"]
        blocks = find_code_blocks(text)
        assert blocks, text
        code = "\n".join(b.code for b in blocks)
        printed = run_python(code).split()
        answer = extract_final_answer(text)
        assert answer is not None and answers_match(answer, printed[-1]), (text, printed)
        # each output block holds what that block printed
        for b in blocks:
            assert "```output\n" in text[b.end:]
        seen.add(conv.messages[1]["content"][:20])
    assert len(seen) > 10


def test_critic_examples_agree_with_right_and_reject_wrong_solutions(sources):
    rng = random.Random(0)
    prompts = load_prompts()
    kinds = set()
    for _ in range(40):
        problem = synthetic_problem(rng)
        if problem is None:
            continue
        for conv in conversations(problem, prompts, rng):
            kinds.add(conv.kind)
            if conv.kind.startswith("critique"):
                assert conv.messages[0]["content"] == prompts.critic_system
                verdict = parse_verdict(conv.messages[-1]["content"])
                assert problem.question in conv.messages[1]["content"]
                assert verdict.kind == ("agree" if conv.kind == "critique_correct" else "disagree")
                if verdict.kind == "disagree":
                    assert verdict.reason
            if conv.kind == "revise":
                roles = [m["role"] for m in conv.messages]
                assert roles == ["system", "user", "assistant", "user", "assistant"]
                wrong, fixed = extract_final_answer(conv.messages[2]["content"]), \
                    extract_final_answer(conv.messages[4]["content"])
                assert wrong is not None and fixed is not None and not answers_match(wrong, fixed)
            if conv.kind == "revise_own_solution":  # the critique shows the reference, which the revision writes
                wrong, fixed = extract_final_answer(conv.messages[2]["content"]), conv.messages[4]["content"]
                assert f"not {wrong}. My solution:\n{fixed}" in conv.messages[3]["content"]
                assert f"(the checker's answer: {extract_final_answer(fixed)})" in conv.messages[3]["content"]
            if conv.kind.startswith("judge"):  # the verifier's one-line judgement, right or wrong as labelled
                assert conv.messages[1]["content"] == prompts.verifier_request(problem.question,
                                                                              conv.messages[1]["content"].split(
                                                                                  "Solution:\n", 1)[1].rsplit(
                                                                                  "\n\nIs this", 1)[0])
                solution = conv.messages[1]["content"].split("Solution:\n", 1)[1]
                code = "\n".join(b.code for b in find_code_blocks(solution))
                right = answers_match(run_python(code).split()[-1], problem.gold or run_python(
                    "\n".join(c for _, c in problem.cells)).split()[-1])
                assert conv.messages[-1]["content"] == ("VERDICT: AGREE" if right else "VERDICT: DISAGREE")
                assert conv.kind == ("judge_right" if right else "judge_wrong")
    assert kinds == {"solve", "judge_right", "judge_wrong", "critique_correct", "critique_wrong", "revise",
                     "revise_numbers", "revise_own_solution"}


def test_dropped_numbers_are_what_the_number_check_calls_unused():
    """A given number becomes a small number the question does not give; or one operand of a product or sum is
    left out. Either way the check finds a number unused (a question, not an order)."""
    from duet.agents.number_check import check_numbers
    from duet.train.solutions import Problem, dropped_cells, solution_text

    rng = random.Random(0)
    tables = Problem("11 students sit at each of 87 tables. How many students are there?",
                     [("Multiply.", "answer = 87 * 11\nprint(answer)")], "test", "1")
    groups = Problem("Sara picked 7 stacks of 84 pears and Sally picked 10 pears. How many pears in all?",
                     [("Add.", "answer = (7 * 84) + 10\nprint(answer)")], "test", "2")
    for problem in (tables, groups):
        for _ in range(10):
            text, answer = solution_text(dropped_cells(problem, rng))
            assert answer != solution_text(problem.cells)[1]
            findings = check_numbers(problem.question, text)
            assert findings and all(f.key.startswith("unused ") for f in findings)
    assert {dropped_cells(tables, rng)[0][1].split("\n")[0] for _ in range(60)} >= {"answer = 87 * 8",
                                                                                   "answer = 2 * 11"}
    assert "answer = 84 + 10" in {dropped_cells(groups, rng)[0][1].split("\n")[0] for _ in range(40)}
    words = Problem("Tom has five apples.", [("Say.", "answer = 5\nprint(answer)")], "t", "3")
    assert dropped_cells(words, rng) is None  # nothing the question writes in digits


def test_number_check_revisions_are_what_the_live_critic_says(sources):
    """A miscopied or left-out number: the rejection is the real number check's words, the fix is the reference."""
    from duet.agents.backends import ScriptedBackend
    from duet.agents.critic import Critic
    from duet.agents.dialogue import DialogueConfig, sandbox_factory_for
    from duet.agents.turn import TurnOptions

    prompts = load_prompts()
    critic = Critic(ScriptedBackend([]), prompts)  # no replies: the model must not be asked
    options = TurnOptions(sandbox_factory_for(DialogueConfig()))
    found = 0
    for conv in itertools.islice(example_stream(sources, seed=1), 600):
        if conv.kind != "revise_numbers":
            continue
        found += 1
        question = conv.messages[1]["content"]  # the solver's prompt is the bare question
        rejected, request, fixed = (m["content"] for m in conv.messages[2:])
        check = critic.check(question, rejected, options, round=1)
        assert check.task == "number_check" and request == prompts.revise_request(check.reason)
        wrong_code = [b.code for b in find_code_blocks(rejected)]
        right_code = [b.code for b in find_code_blocks(fixed)]
        # one number differs, or one operand is left out; and the answers differ
        assert len(wrong_code) == len(right_code)
        diffs = [(w, r) for w, r in zip(wrong_code, right_code, strict=True) if w != r]
        assert len(diffs) == 1
        shape = [re.sub(r"[\d.]+", "N", code) for code in diffs[0]]
        assert shape[0] == shape[1] or shape[0].count("N") == shape[1].count("N") - 1
        assert not answers_match(extract_final_answer(rejected), extract_final_answer(fixed))
    assert found >= 5


def test_wrong_solutions_really_are_wrong():
    rng = random.Random(1)
    for _ in range(50):
        problem = synthetic_problem(rng)
        if problem is None:
            continue
        right = run_python("\n".join(code for _, code in problem.cells)).split()[-1]
        for cells in problem.wrong:
            out = run_python("\n".join(code for _, code in cells)).split()
            assert not out or not answers_match(out[-1], right)


def test_dev_split_is_held_out_by_row(sources, data_dir, tmp_path):
    train_ids = {r.index for r in sources.mawps_train}
    dev_ids = {r.index for r in sources.mawps_dev}
    assert not train_ids & dev_ids and train_ids | dev_ids <= set(range(len(MAWPS_ROWS)))
    assert all(is_dev("mawps", i) for i in dev_ids) and not any(is_dev("mawps", i) for i in train_ids)
    # a training row that tells a dev row's story (here the rows repeat) is left out, not trained on
    dev_texts = {normalised(r.question) for r in sources.mawps_dev}
    assert dev_texts and not any(normalised(r.question) in dev_texts for r in sources.mawps_train)
    paths = sources.write_dev(tmp_path)
    written = [json.loads(line)["id"] for line in paths["mawps"].read_text().splitlines()]
    assert written == [f"mawps-{i}" for i in sorted(dev_ids)]


@pytest.mark.skipif(not (SHARED_DATA / "mawps_asdiv_a" / "train.csv").is_file(), reason="no shared data")
def test_real_mawps_equations_give_the_dataset_answers():
    """With the original numbers, the generated Python must reproduce the dataset's answer."""
    real = Sources.load(SHARED_DATA)
    rows = real.mawps_train + real.mawps_dev
    solved = [p for p in (mawps_problem(r, None) for r in rows) if p is not None]
    assert len(solved) / len(rows) > 0.95
    for p in random.Random(0).sample(solved, 40):
        assert answers_match(run_python(p.cells[-1][1]).split()[-1], p.gold)
    dev_share = len(real.mawps_dev) / len(rows)
    assert 0.07 < dev_share < 0.13


def test_mix_is_validated(sources):
    with pytest.raises(ValueError, match="mix"):
        next(example_stream(sources, seed=0, mix={"wikipedia": 1.0}))
    only_synthetic = itertools.islice(example_stream(sources, seed=0, mix={"synthetic": 1.0}), 50)
    assert all("number0" not in c.messages[1]["content"] for c in only_synthetic)


# ----------------------------------------------------------------------------- tokens


@pytest.fixture(scope="module")
def tokenizer(sources):
    texts = (m["content"] for c in itertools.islice(example_stream(sources, seed=0), 400) for m in c.messages)
    return train_tokenizer(texts, vocab_size=400)


def test_tokenizer_splits_digits_and_round_trips(tokenizer):
    ids = tokenizer("x = 12345 / 7.5", add_special_tokens=False)["input_ids"]
    pieces = [tokenizer.decode([i]) for i in ids]
    assert [p for p in pieces if p.strip().isdigit()] == list("123457" "5")
    text = "Ünïcode ✓ and 12 apples\n```python\nprint(1)\n```"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


def test_only_what_the_model_writes_is_trained(tokenizer, sources):
    conv = next(c for c in example_stream(sources, seed=5) if c.kind == "revise")
    ids, mask = encode_example(tokenizer, conv)
    trained = tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if m])
    # the model writes up to the ```output stop string; duet writes the output and its closing fence
    expected = re.sub(r"```output\n.*?```\n", "```output", conv.messages[-1]["content"], flags=re.S)
    assert trained == expected + tokenizer.eos_token
    assert conv.messages[2]["content"] not in trained  # the earlier (wrong) solution is context only


# ----------------------------------------------------------------------------- losses and balancing


def _tiny_model(tokenizer):
    from duet.train.trainer import build_model

    return build_model(TrainConfig(model=TINY_MODEL), tokenizer)


def test_mtp_loss_predicts_the_token_after_next(tokenizer):
    model = _tiny_model(tokenizer)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, len(tokenizer), (2, 9), generator=g)
    mask = torch.ones_like(ids, dtype=torch.bool)
    main, mtp = losses(model, ids, mask)
    # by hand, one prefix at a time (so no position can see the future): the module's last position
    # combines the hidden state at i with the embedding of token i+1, and predicts token i+2
    h = model.hidden(ids[:, :-1])
    total, count = 0.0, 0
    for i in range(ids.shape[1] - 2):
        logits, _ = model.mtp_logits(0, h[:, :i + 1], ids[:, 1:i + 2])
        total += torch.nn.functional.cross_entropy(logits[:, -1], ids[:, i + 2], reduction="sum").item()
        count += ids.shape[0]
    assert mtp.item() == pytest.approx(total / count, rel=1e-4)
    logits = model.logits(h)
    ref = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    assert main.item() == pytest.approx(ref.item(), rel=1e-4)


def test_balancing_moves_bias_toward_underloaded_experts(tokenizer):
    from duet.model.model import MoE

    model = _tiny_model(tokenizer)
    moe = next(m for m in model.modules() if isinstance(m, MoE))
    moe.last_expert_load = torch.tensor([10.0, 2.0, 4.0, 4.0])
    before = moe.gate.e_score_correction_bias.clone()
    worst = balance_experts(model, gamma=0.01)
    step = moe.gate.e_score_correction_bias - before
    assert torch.allclose(step, torch.tensor([-0.01, 0.01, 0.01, 0.01]))
    assert worst == pytest.approx(10 / 5)


# ----------------------------------------------------------------------------- whole runs


def _config(tmp: Path, data_dir: Path, **kw) -> TrainConfig:
    base = dict(data_dir=str(data_dir), out_dir=str(tmp), steps=4, batch_size=2, seq_len=512, vocab_size=400,
                tokenizer_sample=300, model=TINY_MODEL, save_every=2, warmup=2, threads=1)
    return TrainConfig(**{**base, **kw})


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_runs_reproduce_resume_and_learn(tmp_path, data_dir):
    quiet = dict(progress=False, log=lambda *_: None)
    straight = train(_config(tmp_path / "a", data_dir), **quiet)
    again = train(_config(tmp_path / "b", data_dir), **quiet)
    wa, wb = _weights(straight), _weights(again)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)

    # stop after 2 steps, then resume to 4: the same weights as the straight run
    train(_config(tmp_path / "c", data_dir, steps=2), **quiet)
    resumed = train(_config(tmp_path / "c", data_dir), **quiet)
    wc = _weights(resumed)
    assert all(torch.equal(wa[k], wc[k]) for k in wa)
    log = [json.loads(line) for line in (tmp_path / "c" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert all(r["mtp_loss"] is not None and r["max_over_mean_load"] >= 1 for r in log)

    with pytest.raises(TrainError, match="longer than seq_len"):  # nothing fits: an error, not an endless loop
        train(_config(tmp_path / "f", data_dir, seq_len=16), **quiet)
    with pytest.raises(TrainError, match="with batch-size=2, lr=0.002; this command has batch-size=3, lr=0.5 "):
        train(_config(tmp_path / "c", data_dir, batch_size=3, lr=0.5, steps=6), **quiet)

    # the loss goes down, and a later run can start from the weights of an earlier one
    long = train(_config(tmp_path / "d", data_dir, steps=30, lr=5e-3, save_every=30), **quiet)
    losses_seen = [json.loads(line)["loss"] for line in (tmp_path / "d" / "train_log.jsonl").read_text().splitlines()]
    assert sum(losses_seen[-5:]) / 5 < 0.7 * sum(losses_seen[:5]) / 5
    logs = []
    train(_config(tmp_path / "e", data_dir, steps=1, init_from=str(long)), progress=False, log=logs.append)
    assert any("starting from" in line for line in logs)
    assert (tmp_path / "e" / "checkpoint" / "tokenizer.json").read_text() == (long / "tokenizer.json").read_text()


def test_cli_rejects_bad_options_in_one_line(tmp_path, data_dir):
    def duet_train(*args):
        return subprocess.run([sys.executable, "-m", "duet.train", *args], capture_output=True, text=True,
                              timeout=120)

    bad_mix = duet_train("--data", str(data_dir), "--out", str(tmp_path / "x"), "--mix", "wikipedia=1")
    assert bad_mix.returncode == 2 and "--mix" in bad_mix.stderr and "Traceback" not in bad_mix.stderr
    no_data = duet_train("--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "y"))
    assert no_data.returncode == 2 and "--data" in no_data.stderr and "Traceback" not in no_data.stderr
    no_gpu = duet_train("--data", str(data_dir), "--out", str(tmp_path / "w"), "--device", "cuda:7")
    assert no_gpu.returncode == 2 and "--device" in no_gpu.stderr and "Traceback" not in no_gpu.stderr
    no_model = duet_train("--data", str(data_dir), "--out", str(tmp_path / "z"), "--init-from", str(tmp_path))
    assert no_model.returncode == 2 and "--init-from" in no_model.stderr
    no_attempts = duet_train("--data", str(data_dir), "--out", str(tmp_path / "v"), "--mix", "onpolicy=1")
    assert no_attempts.returncode == 2 and "--onpolicy" in no_attempts.stderr and "Traceback" not in no_attempts.stderr
    # a user error found after the options are parsed: the same one line as `duet train`, no traceback
    bad_gsm8k = _data_copy(tmp_path / "bad", data_dir)
    bad_gsm8k.joinpath("gsm8k", "train.jsonl").write_text('{"question": "Q?", "answer": "#### 1"}\n{oops\n')
    broken = duet_train("--data", str(bad_gsm8k), "--out", str(tmp_path / "u"), "--steps", "1")
    assert broken.returncode == 1 and broken.stderr.startswith("error: ") and len(broken.stderr.splitlines()) == 1
    assert "train.jsonl:2: not JSON" in broken.stderr and not (tmp_path / "u").exists()


def _data_copy(root: Path, data_dir: Path) -> Path:
    import shutil

    shutil.copytree(data_dir, root)
    return root


@pytest.fixture
def duet_train(monkeypatch, capsys, tmp_path):
    """`duet train ARGS` in this process: (exit code, stdout, stderr); --install goes to tmp_path/installed."""
    import duet.model.embedded
    from duet.cli import main

    monkeypatch.setattr(duet.model.embedded, "EMBEDDED_DIR", tmp_path / "installed")  # never the shipped model

    def run(*args):
        with pytest.raises(SystemExit) as stop:
            main(["train", *map(str, args)])
        out, err = capsys.readouterr()
        assert "Traceback" not in err and "unexpected" not in err, err
        return stop.value.code, out, err

    return run


@pytest.mark.parametrize("args", [
    ["--steps", "0"], ["--steps", "-1"], ["--lr", "nan"], ["--lr", "0"], ["--lr", "inf"], ["--mtp-lambda", "nan"],
    ["--mtp-lambda", "-0.1"], ["--bias-gamma", "-1"], ["--bias-gamma", "inf"], ["--batch-size", "0"],
    ["--seq-len", "0"], ["--save-every", "0"], ["--threads", "-1"], ["--mix", "mawps=nan"],
    ["--mix", "mawps=inf,gsm8k=1"], ["--arch", "num_hidden_layers=0"], ["--arch", "depth=8"],
    ["--arch", "hidden_size=wide"],
])
def test_cli_rejects_bad_numbers_before_anything_loads(duet_train, tmp_path, data_dir, args):
    code, out, err = duet_train("--data", data_dir, "--out", tmp_path / "run", *args)
    assert code == 2 and f"for {args[0]}:" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "run").exists() and "checkpoint" not in out


def test_cli_checks_out_data_and_inputs_before_writing(duet_train, tmp_path, data_dir):
    afile = tmp_path / "afile"
    afile.write_text("x")
    code, _, err = duet_train("--data", data_dir, "--out", afile)
    assert code == 2 and f"--out: {afile}: exists and is not a directory" in err
    code, _, err = duet_train("--data", data_dir, "--out", afile / "run")
    assert code == 2 and "--out" in err and "is a file, not a directory" in err

    out = tmp_path / "run"
    no_csv = _data_copy(tmp_path / "no_csv", data_dir)
    (no_csv / "mawps_asdiv_a" / "train.csv").unlink()
    code, _, err = duet_train("--data", no_csv, "--out", out)
    assert code == 2 and "--data" in err and "mawps_asdiv_a/train.csv" in err
    bad_csv = _data_copy(tmp_path / "bad_csv", data_dir)
    (bad_csv / "mawps_asdiv_a" / "train.csv").write_text("Problem,Result\nTwo and two?,4\n")
    code, _, err = duet_train("--data", bad_csv, "--out", out, "--steps", "1")
    assert code == 1 and "train.csv: its header (Problem, Result) lacks the column(s) Question, Numbers" in err
    bad_jsonl = _data_copy(tmp_path / "bad_jsonl", data_dir)
    with open(bad_jsonl / "gsm8k" / "train.jsonl", "a") as f:
        f.write('{"question": "no answer"}\n')
    code, _, err = duet_train("--data", bad_jsonl, "--out", out, "--steps", "1")
    assert code == 1 and f"train.jsonl:{len(GSM8K_ROWS) + 1}: expected an object" in err

    no_tokenizer = tmp_path / "model"
    no_tokenizer.mkdir()
    (no_tokenizer / "config.json").write_text("{}")
    code, _, err = duet_train("--data", data_dir, "--out", out, "--steps", "1", "--init-from", no_tokenizer)
    assert code == 1 and "no tokenizer.json" in err

    attempts = tmp_path / "attempts.jsonl"
    code, _, err = duet_train("--data", data_dir, "--out", out, "--onpolicy", tmp_path, "--mix", "onpolicy=1")
    assert code == 2 and "is a directory" in err
    attempts.write_text("")
    code, _, err = duet_train("--data", data_dir, "--out", out, "--onpolicy", attempts, "--mix", "onpolicy=1")
    assert code == 1 and "attempts.jsonl holds no attempts" in err
    attempts.write_text('{"id": "x"}\n')
    code, _, err = duet_train("--data", data_dir, "--out", out, "--onpolicy", attempts, "--mix", "onpolicy=1")
    assert code == 1 and "attempts.jsonl:1: not an on-policy attempt" in err
    code, _, err = duet_train("--data", data_dir, "--out", out, "--onpolicy", attempts)  # the mix never draws it
    assert code == 2 and "--onpolicy" in err and "onpolicy=W" in err
    assert not out.exists() and not (tmp_path / "installed").exists()


def test_cli_resumes_only_the_same_run_and_only_forward(duet_train, tmp_path, data_dir):
    """A saved run (its trainer state, as save_checkpoint writes it) is checked before anything loads."""
    out = tmp_path / "run"
    (out / "checkpoint").mkdir(parents=True)
    saved = TrainConfig(data_dir=str(data_dir), out_dir=str(out), steps=3, batch_size=1)  # the CLI's defaults
    torch.save({"optimizer": {}, "step": 3, "config": asdict(saved)}, out / "checkpoint" / "trainer_state.pt")

    code, out_text, err = duet_train("--data", data_dir, "--out", out, "--steps", "1", "--batch-size", "1",
                                     "--install")
    assert code == 1 and f"{out} is already at step 3 of 1; nothing to train" in err
    assert "checkpoint:" not in out_text and not (tmp_path / "installed").exists()

    other_data = _data_copy(tmp_path / "other", data_dir)
    code, _, err = duet_train("--data", other_data, "--out", out, "--steps", "9", "--batch-size", "1", "--lr", "0.5",
                              "--fp32", "--mix", "mawps=1", "--mtp-lambda", "0", "--save-every", "5")
    assert code == 1 and len(err.splitlines()) == 1
    assert (f"error: {out} holds a run with data-dir={data_dir}, lr=0.002, mtp-lambda=0.3, bf16=True, "
            f"mix={','.join(f'{k}={v}' for k, v in MIX.items())}; this command has data-dir={other_data}, lr=0.5, "
            "mtp-lambda=0.0, bf16=False, mix=mawps=1 (use another --out, or the same settings to resume)") in err
    assert torch.load(out / "checkpoint" / "trainer_state.pt")["config"] == asdict(saved)  # untouched


def test_non_finite_training_is_stopped_and_never_installed(tmp_path, data_dir):
    quiet = dict(progress=False, log=lambda *_: None)
    with pytest.raises(TrainError, match="the loss became nan at step 1; stopped without saving"):
        train(_config(tmp_path / "nan", data_dir, steps=2, batch_size=1, mtp_lambda=float("nan")), **quiet)
    assert not (tmp_path / "nan" / "checkpoint").exists()

    target = tmp_path / "installed"
    with pytest.raises(TrainError, match="no trained checkpoint"):
        install_model(tmp_path / "nan" / "checkpoint", target)
    ckpt = train(_config(tmp_path / "ok", data_dir, steps=1, batch_size=1), **quiet)
    broken = _data_copy(tmp_path / "broken", ckpt)  # a copy of the checkpoint with one weight made inf
    from safetensors.torch import save_file

    weights = _weights(broken)
    name = next(iter(weights))
    weights[name] = torch.full_like(weights[name], float("inf"))
    for f in broken.glob("*.safetensors"):
        f.unlink()
    save_file(weights, broken / "model.safetensors")
    with pytest.raises(TrainError, match="not finite"):
        install_model(broken, target)
    assert not target.exists()
    assert install_model(ckpt, target) == target
    assert (target / "config.json").is_file() and not (target / "trainer_state.pt").exists()


# ----------------------------------------------------------------------------- on-policy attempts


def test_onpolicy_attempts_from_a_real_eval_run(tmp_path, data_dir):
    """problems -> `duet eval` (scripted model: one right, one wrong, one unanswered) -> build -> examples."""
    def run(*args):
        r = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        return r

    problems, run_dir, out = tmp_path / "problems.jsonl", tmp_path / "eval", tmp_path / "attempts.jsonl"
    run("-m", "duet.train.onpolicy", "problems", "--data", data_dir, "--out", problems)
    rows = [json.loads(line) for line in problems.read_text().splitlines()]
    assert rows and all(not is_dev("mawps", int(r["id"].split("-")[1])) for r in rows)
    replies = {"apples does she have": "Add them.\n\nThe answer is \\boxed{11}.",
               "pens are in": "Add them.\n\nThe answer is \\boxed{17}.",
               "cards and gave": "I am not sure."}
    (tmp_path / "replies.json").write_text(json.dumps({"replies": [], "match": replies}))
    run("-m", "duet.evaluation.cli", problems, "--backend", f"scripted:{tmp_path / 'replies.json'}",
        "--modes", "solver-only", "--out", run_dir)
    run("-m", "duet.train.onpolicy", "build", problems, run_dir, "--out", out)
    other = tmp_path / "other.jsonl"  # not the file the eval ran on
    other.write_text("".join(json.dumps({**r, "question": r["question"] + " Really?"}) + "\n" for r in rows))
    wrong_file = subprocess.run([sys.executable, "-m", "duet.train.onpolicy", "build", other, run_dir,
                                 "--out", tmp_path / "x.jsonl"], capture_output=True, text=True, timeout=60)
    assert wrong_file.returncode == 2 and "cannot join" in wrong_file.stderr and "Traceback" not in wrong_file.stderr

    attempts = load_attempts(out)
    by_kind = {("no_answer" if a.answer is None else a.correct): a for a in attempts}
    assert set(by_kind) == {True, False, "no_answer"}  # the unscripted questions were skipped
    prompts = load_prompts()
    right = list(attempt_conversations(by_kind[True], prompts))  # without rng every right attempt is judged
    assert [c.kind for c in right] == ["judge_right", "critique_correct"]
    assert right[0].messages[1]["content"] == prompts.verifier_request(by_kind[True].problem.question,
                                                                       by_kind[True].solution)
    assert right[0].messages[-1]["content"] == "VERDICT: AGREE"
    right = right[1:]
    assert by_kind[True].solution in right[0].messages[1]["content"]  # the model's own text is what is judged
    assert parse_verdict(right[0].messages[-1]["content"]).kind == "agree"

    wrong = list(attempt_conversations(by_kind[False], prompts))
    assert [c.kind for c in wrong] == ["judge_wrong", "critique_wrong", "revise", "solve"]
    assert wrong[0].messages[-1]["content"] == "VERDICT: DISAGREE"
    wrong = wrong[1:]
    check = wrong[0].messages[-1]["content"]
    assert parse_verdict(check).kind == "disagree" and extract_final_answer(check) == "60"
    assert run_python("\n".join(b.code for b in find_code_blocks(check))).split()[:2] == ["60", "False"]
    revise = wrong[1].messages
    assert revise[2]["content"] == by_kind[False].solution and "checker's answer: 60" in revise[3]["content"]
    assert extract_final_answer(revise[-1]["content"]) == "60"

    unanswered = list(attempt_conversations(by_kind["no_answer"], prompts))
    assert [c.kind for c in unanswered] == ["revise", "solve"]
    assert NO_ANSWER_REASON in unanswered[0].messages[3]["content"]

    with_attempts = Sources.load(data_dir, out)
    kinds = {c.kind for c in itertools.islice(example_stream(with_attempts, 0, prompts, {"onpolicy": 1}), 50)}
    assert kinds == {"judge_right", "judge_wrong", "critique_correct", "critique_wrong", "revise",
                     "revise_own_solution", "solve"}
    with pytest.raises(ValueError, match="--onpolicy"):
        next(example_stream(Sources.load(data_dir), 0, prompts, {"onpolicy": 1}))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(out.read_text() + "{not json\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:\d+: not an on-policy attempt"):
        load_attempts(bad)


def test_onpolicy_commands_check_their_files_and_write_whole(tmp_path, data_dir, capsys):
    from duet.train.onpolicy import main

    def onpolicy(*args):
        with pytest.raises(SystemExit) as stop:
            main([*map(str, args)])
        err = capsys.readouterr().err
        assert "Traceback" not in err and len(err.splitlines()) == 1, err
        return stop.value.code, err

    afile = tmp_path / "afile"
    afile.write_text("x")
    code, err = onpolicy("problems", "--data", data_dir, "--out", tmp_path)
    assert code == 2 and f"--out {tmp_path}: exists and is not a file" in err
    code, err = onpolicy("problems", "--data", data_dir, "--out", afile / "p.jsonl")
    assert code == 2 and "afile is a file" in err
    no_gsm8k = _data_copy(tmp_path / "no_gsm8k", data_dir)
    (no_gsm8k / "gsm8k" / "train.jsonl").unlink()
    code, err = onpolicy("problems", "--data", no_gsm8k, "--out", tmp_path / "p.jsonl")
    assert code == 2 and "no gsm8k/train.jsonl" in err and not (tmp_path / "p.jsonl").exists()

    problems, eval_dir, attempts = tmp_path / "problems.jsonl", tmp_path / "eval", tmp_path / "attempts.jsonl"
    main(["problems", "--data", str(data_dir), "--out", str(problems)])
    assert problems.read_text().count("\n") > 0
    eval_dir.mkdir()
    (eval_dir / "results.jsonl").write_text('{"line": 1}\n')  # not a solver-only result: the join fails
    attempts.write_text("earlier attempts\n")
    code, err = onpolicy("build", problems, eval_dir, "--out", attempts)
    assert code == 2 and "cannot join" in err
    assert attempts.read_text() == "earlier attempts\n" and sorted(p.name for p in tmp_path.glob("*attempts*")) == [
        "attempts.jsonl"]
    code, err = onpolicy("build", problems, eval_dir, "--out", tmp_path)
    assert code == 2 and "--out" in err and "cannot join" not in err
