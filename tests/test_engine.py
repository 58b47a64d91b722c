"""The generation engine: exactness of greedy and MTP decoding, sampling statistics, batching, streaming."""

from __future__ import annotations

import math
import shutil
import threading

import pytest
import torch

from duet.engine import Engine, SamplingParams
from duet.engine.detokenize import TextStream
from duet.engine.sampling import accept_draft, probabilities
from tests.tiny_models import make_engine_checkpoint, make_tokenizer


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_engine_checkpoint(tmp_path_factory.mktemp("engine"), seed=11)


@pytest.fixture(scope="module")
def engine(ckpt):
    return Engine.load(ckpt, max_batch=3)


@pytest.fixture(scope="module")
def plain(ckpt):
    return Engine.load(ckpt, max_batch=3, use_mtp=False)


PROMPTS = ["Tom has 12 apples", "A café", "```python\nprint(", "VERDICT:", "How many apples does he have now? " * 3]


@torch.no_grad()
def reference_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding by full forward passes, no cache at all."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def test_greedy_equals_uncached_reference(plain):
    prompt = plain.encode(PROMPTS[0])
    params = SamplingParams(max_new_tokens=24, stop_at_eos=False)
    [result] = plain.generate([prompt], params)
    assert result.token_ids == reference_greedy(plain.model, prompt, 24)
    assert result.finish_reason == "length" and result.completion_tokens == 24


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_mtp_greedy_is_token_for_token_plain_greedy(ckpt, plain, depth):
    """Five prompts of different lengths through 3 rows: continuous batching with refills; drafts of
    `depth` tokens (depth > 1 chains the one MTP module)."""
    engine = Engine.load(ckpt, max_batch=3, mtp_depth=depth)
    params = SamplingParams(max_new_tokens=40, stop_at_eos=False)
    with_mtp = engine.generate(PROMPTS, params)
    without = plain.generate(PROMPTS, params)
    for a, b in zip(with_mtp, without, strict=True):
        assert a.token_ids == b.token_ids
        assert a.text == b.text
    assert sum(r.drafted for r in with_mtp) > 0 and sum(r.accepted for r in with_mtp) > 0
    assert all(r.drafted == 0 for r in without)
    # fewer main-model passes than tokens whenever a draft was accepted
    for r in with_mtp:
        assert r.forward_passes == r.completion_tokens - r.accepted
        assert r.drafted == depth * (r.forward_passes - 1)  # the prefill pass verifies nothing


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")),
                    reason="torch.compile on a CPU needs a C++ compiler")
def test_compiled_decoding_is_token_for_token_eager(ckpt, plain, tmp_path):
    """`Engine(compile=True)`: five prompts of different lengths through 3 rows (refills, and the row count
    going 3 -> 1 as rows finish) give the eager engine's greedy tokens; the cache is read past 64
    positions, so the compiled step meets several lengths. One graph for one row and one for several:
    rows coming and going and the context growing recompile nothing."""
    import torch._dynamo.utils as dynamo_utils

    compiled = Engine.load(ckpt, max_batch=3, use_mtp=False, compile=True)
    params = [SamplingParams(max_new_tokens=n, stop_at_eos=False) for n in (70, 20, 45, 9, 30)]
    before = dynamo_utils.counters["stats"]["unique_graphs"]
    got = compiled.generate(PROMPTS, params)
    expected = plain.generate(PROMPTS, params)
    for a, b in zip(got, expected, strict=True):
        assert a.token_ids == b.token_ids
    assert dynamo_utils.counters["stats"]["unique_graphs"] - before <= 2
    # another model of the same shapes in the same process reuses the graphs with its own weights
    other_ckpt = make_engine_checkpoint(tmp_path / "other", seed=12)
    other = Engine.load(other_ckpt, max_batch=3, use_mtp=False, compile=True)
    want = Engine.load(other_ckpt, max_batch=3, use_mtp=False).generate(PROMPTS[:3], params[:3])
    assert [r.token_ids for r in other.generate(PROMPTS[:3], params[:3])] == [r.token_ids for r in want]
    assert [r.token_ids for r in want] != [r.token_ids for r in expected[:3]]


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")),
                    reason="torch.compile on a CPU needs a C++ compiler")
def test_compiled_mtp_decoding_is_token_for_token_plain(ckpt, plain):
    """MTP verification and drafting compiled too, through 3 rows with refills: still plain greedy's
    tokens, and rows coming and going compile a bounded number of graphs (per step: one row, the row
    counts whose tokens the MoE gathers, and the rest)."""
    import torch._dynamo.utils as dynamo_utils

    compiled = Engine.load(ckpt, max_batch=3, compile=True)
    assert compiled.use_mtp
    params = [SamplingParams(max_new_tokens=n, stop_at_eos=False) for n in (40, 12, 25, 9, 30)]
    before = dynamo_utils.counters["stats"]["unique_graphs"]
    got = compiled.generate(PROMPTS, params)
    assert [r.token_ids for r in got] == [r.token_ids for r in plain.generate(PROMPTS, params)]
    assert dynamo_utils.counters["stats"]["unique_graphs"] - before <= 6
    assert all(r.drafted == r.forward_passes - 1 for r in got)  # every step verified a draft


@torch.no_grad()
def reference_top_logprobs(engine: Engine, prompt: list[int], out: list[int], k: int) -> list[dict[int, float]]:
    """The top-k log-softmax of a full forward pass (no cache) at every generated position: token id -> value."""
    logp = engine.model(torch.tensor([prompt + out]))[0, len(prompt) - 1: -1].float().log_softmax(-1)
    values, ids = logp.topk(k)
    return [dict(zip(row_ids, row_values, strict=True)) for row_ids, row_values in zip(ids.tolist(), values.tolist(),
                                                                                      strict=True)]


def test_top_logprobs_are_the_target_models_with_and_without_mtp_and_prefix_cache(ckpt, plain):
    """Greedy with logprobs=5: the emitted token is each position's likeliest, the values are log-probabilities of
    the main model (MTP's verify logits, not its drafts) and match a full forward pass; the same with MTP (depths
    1 and 2), without it, and with the prefix cache cold, warm, and off."""
    params = SamplingParams(max_new_tokens=20, stop_at_eos=False, logprobs=5)
    engines = [plain, Engine.load(ckpt, max_batch=3, prefix_cache_mb=0), Engine.load(ckpt, max_batch=3, mtp_depth=2)]
    runs = [e.generate(PROMPTS, params) for e in engines] + [engines[2].generate(PROMPTS, params)]  # warm cache
    assert engines[2].prefix_cache_stats()["reused_tokens"] > 0
    assert plain.generate(PROMPTS[:1], SamplingParams(max_new_tokens=4))[0].top_logprobs is None  # not asked
    for prompt, *results in zip(PROMPTS, *runs, strict=True):
        ids = plain.encode(prompt)
        expected = reference_top_logprobs(plain, ids, results[0].token_ids, 5)
        for r in results:
            assert r.token_ids == results[0].token_ids and len(r.top_logprobs) == len(r.token_ids) == 20
            for token, pairs, ref in zip(r.token_ids, r.top_logprobs, expected, strict=True):
                top = dict(pairs)
                assert pairs[0][0] == token and len(pairs) == 5  # greedy: the likeliest, first
                assert [v for _, v in pairs] == sorted(top.values(), reverse=True)
                assert all(v <= 0 for v in top.values()) and sum(math.exp(v) for v in top.values()) <= 1 + 1e-6
                assert top.keys() == ref.keys()
                assert all(abs(top[t] - ref[t]) < 1e-4 for t in ref)


def test_token_logprobs_are_each_emitted_tokens_under_a_full_forward_pass(ckpt, plain):
    """Every result carries the log-probability of each token it emitted (asked or not, greedy or sampled, with
    MTP or without): the main model's, as a full forward pass without cache gives it."""
    sampled = SamplingParams(max_new_tokens=16, temperature=1.3, seed=4, stop_at_eos=False)
    greedy = SamplingParams(max_new_tokens=16, stop_at_eos=False)
    for engine in (plain, Engine.load(ckpt, max_batch=3, mtp_depth=2)):
        for params in (greedy, sampled):
            for prompt, r in zip(PROMPTS, engine.generate(PROMPTS, params), strict=True):
                ids = plain.encode(prompt)
                with torch.no_grad():
                    logits = plain.model(torch.tensor([ids + r.token_ids]))[0, len(ids) - 1: -1]
                want = logits.float().log_softmax(-1).gather(-1, torch.tensor(r.token_ids)[:, None])[:, 0]
                assert len(r.token_logprobs) == len(r.token_ids) == 16
                assert torch.allclose(torch.tensor(r.token_logprobs), want, atol=1e-4)


def test_sampled_tokens_are_in_their_top_logprobs(engine):
    params = SamplingParams(max_new_tokens=20, temperature=1.5, seed=3, stop_at_eos=False, logprobs=1)
    [r] = engine.generate([PROMPTS[1]], params)
    for token, top in zip(r.token_ids, r.top_logprobs, strict=True):
        assert token in dict(top) and 1 <= len(top) <= 2  # the likeliest, and the sampled one if it is not


def test_batched_equals_one_at_a_time(plain):
    params = SamplingParams(max_new_tokens=16, stop_at_eos=False)
    together = plain.generate(PROMPTS, params)
    for prompt, result in zip(PROMPTS, together, strict=True):
        assert plain.generate([prompt], params)[0].token_ids == result.token_ids


def test_seeded_sampling_is_reproducible(engine):
    params = [SamplingParams(max_new_tokens=20, temperature=1.0, top_p=0.9, top_k=50, seed=s, stop_at_eos=False)
              for s in (1, 1, 2)]
    a, b, c = engine.generate([PROMPTS[0]] * 3, params)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids
    # batching does not change a seeded row
    [alone] = engine.generate([PROMPTS[0]], params[0])
    assert alone.token_ids == a.token_ids


def test_stop_strings_cut_text_and_stream_matches(plain):
    params = SamplingParams(max_new_tokens=60, stop_at_eos=False)
    [free] = plain.generate([PROMPTS[2]], params)
    assert len(free.text) > 8
    stop = free.text[5:8]
    chunks: list[str] = []
    [cut] = plain.generate([PROMPTS[2]], SamplingParams(max_new_tokens=60, stop=[stop], stop_at_eos=False),
                           on_text=lambda i, t: chunks.append(t))
    assert cut.finish_reason == "stop" and cut.stop_string == stop
    assert cut.text == free.text[: free.text.find(stop)]
    assert "".join(chunks) == cut.text


def test_eos_ends_a_row_without_the_eos_token(plain):
    params = SamplingParams(max_new_tokens=20, stop_at_eos=False)
    [free] = plain.generate([PROMPTS[1]], params)
    eos = free.token_ids[4]
    first = free.token_ids.index(eos)
    saved = plain.eos_ids
    plain.eos_ids = {eos}
    try:
        [stopped] = plain.generate([PROMPTS[1]], SamplingParams(max_new_tokens=20))
    finally:
        plain.eos_ids = saved
    assert stopped.finish_reason == "eos"
    assert stopped.token_ids == free.token_ids[:first]


def test_streaming_is_multibyte_safe():
    tok = make_tokenizer()
    text = "A café, 日本語 and 🙂 ünïcödé."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text) // 3
    stream, chunks = TextStream(tok), []
    for t in ids:
        delta, _ = stream.add([t])
        chunks.append(delta)
    chunks.append(stream.finish())
    assert all("\ufffd" not in c for c in chunks)
    assert "".join(chunks) == text


def test_stream_holds_back_a_possible_stop_string():
    tok = make_tokenizer()
    stream = TextStream(tok, stop=["```output"])
    released = ""
    for t in tok("x = 1\n```output\n1", add_special_tokens=False)["input_ids"]:
        delta, stopped = stream.add([t])
        released += delta
        if stopped:
            break
    assert stopped and released == "x = 1\n" and stream.text == "x = 1\n"


def test_streamed_text_equals_result_text(engine):
    chunks: dict[int, list[str]] = {0: [], 1: []}
    params = SamplingParams(max_new_tokens=30, temperature=0.8, seed=3, stop_at_eos=False)
    results = engine.generate(PROMPTS[:2], params, on_text=lambda i, t: chunks[i].append(t))
    for i, r in enumerate(results):
        assert "".join(chunks[i]) == r.text


def test_cancel_stops_generation(plain):
    cancel = threading.Event()
    seen = []

    def on_text(i, t):
        seen.append(t)
        if len(seen) >= 3:
            cancel.set()

    [r] = plain.generate([PROMPTS[0]], SamplingParams(max_new_tokens=200, stop_at_eos=False), on_text, cancel)
    assert r.finish_reason == "cancelled" and r.completion_tokens < 200


def test_chat_template_and_continuation(engine):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    opened = engine.tokenizer.decode(engine.encode_chat(messages))
    assert opened.endswith("<|assistant|>")
    partial = messages + [{"role": "assistant", "content": "Let me compute"}]
    continued = engine.tokenizer.decode(engine.encode_chat(partial))
    assert continued.endswith("<|assistant|>Let me compute")


def test_context_limits(ckpt):
    small = Engine.load(ckpt, max_seq_len=16, use_mtp=False)
    with pytest.raises(ValueError, match="context holds 16"):
        small.generate([list(range(3, 30))], SamplingParams(max_new_tokens=4))
    [r] = small.generate([list(range(3, 10))], SamplingParams(max_new_tokens=100, stop_at_eos=False))
    assert r.finish_reason == "length" and r.prompt_tokens + r.completion_tokens <= 16


# ----------------------------------------------------------------------------- speculative sampling statistics


def test_accept_draft_preserves_the_target_distribution():
    """Emitted tokens follow p exactly whatever the draft distribution q (tiny vocabulary, many samples)."""
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=1.0)
    p_logits = torch.tensor([2.0, 1.0, 0.5, -1.0, 0.0])
    q_logits = torch.tensor([-1.0, 2.0, 0.0, 1.5, -0.5])
    p, q = probabilities(p_logits, params), probabilities(q_logits, params)
    n = 20000
    counts = torch.zeros(5)
    accepted = 0
    for _ in range(n):
        d = int(torch.multinomial(q, 1, generator=g))
        ok, t = accept_draft(p_logits, q_logits, d, params, g)
        accepted += ok
        counts[t] += 1
    empirical = counts / n
    assert (empirical - p).abs().max() < 0.015
    expected_acceptance = torch.minimum(p, q).sum()
    assert abs(accepted / n - expected_acceptance) < 0.015
    # with q the emitted distribution would have been visibly different
    assert (q - p).abs().max() > 0.2


@torch.no_grad()
@pytest.mark.parametrize("depth", [1, 2])
def test_mtp_sampling_matches_exact_distribution_end_to_end(tmp_path, depth):
    """The last of `depth + 1` generated tokens (all but the first go through draft acceptance) is
    distributed as the exact model marginal sum over t1..tk of p(t1) p(t2 | t1) ..., computed by full
    forward passes. A 4-token model vocabulary keeps the exact distribution small and gives the
    random MTP drafts real overlap."""
    ckpt = make_engine_checkpoint(tmp_path, seed=5, vocab_size=4, num_hidden_layers=1)
    eng = Engine.load(ckpt, max_batch=64, mtp_depth=depth)
    params = SamplingParams(max_new_tokens=depth + 1, temperature=1.0, stop_at_eos=False)
    prompt = [1, 3, 0, 2]
    model = eng.model

    def marginal(prefix: list[int], steps: int) -> torch.Tensor:
        p = probabilities(model(torch.tensor([prompt + prefix]))[0, -1], params)
        if steps == 1:
            return p
        return sum(p[t] * marginal(prefix + [t], steps - 1) for t in p.nonzero().flatten().tolist())

    exact = marginal([], depth + 1)
    n = 800
    results = eng.generate([prompt] * n, [SamplingParams(**{**params.__dict__, "seed": s}) for s in range(n)])
    counts = torch.zeros_like(exact)
    for r in results:
        counts[r.token_ids[depth]] += 1
    tv = 0.5 * (counts / n - exact).abs().sum()
    accepted = sum(r.accepted for r in results)
    assert 0 < accepted < n * depth, "both acceptance and rejection must occur for this test to mean something"
    assert tv < 0.07, f"total variation {tv:.3f}"


def test_concurrent_callers_share_the_batch(plain):
    """Threads submitting at once (as eval's dialogues do) get the same results as one at a time."""
    from concurrent.futures import ThreadPoolExecutor

    params = SamplingParams(max_new_tokens=12, stop_at_eos=False)
    expected = [plain.submit(p, params).token_ids for p in PROMPTS]
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        got = list(pool.map(lambda p: plain.submit(p, params).token_ids, PROMPTS))
    assert got == expected


def test_small_models_decode_on_one_thread_on_cpu(ckpt):
    """The decoding loop of a small model runs one torch thread (faster: see the Engine's comment);
    an explicit thread count wins; generation still works and the caller's thread count is restored."""
    before = torch.get_num_threads()
    auto = Engine.load(ckpt)
    assert auto.threads == 1
    explicit = Engine.load(ckpt, threads=2).start()
    assert explicit.threads == 2
    out = explicit.generate([[3, 4, 5]], SamplingParams(max_new_tokens=3, stop_at_eos=False))[0]
    assert out.completion_tokens == 3
    torch.set_num_threads(before)


def test_duet_bench_reports_every_configuration_as_json(ckpt):
    """`duet bench --json` end to end on a tiny checkpoint: one row per configuration, figures that
    add up (acceptance in [0, 1], at most depth + 1 tokens per forward pass), transformers included."""
    import json
    import subprocess
    import sys

    code = "import sys; from duet.cli import main; sys.argv = ['duet', *sys.argv[1:]]; main()"
    r = subprocess.run([sys.executable, "-c", code, "bench", "--model", str(ckpt), "--batch", "1", "--batch", "2",
                        "--new-tokens", "8", "--mtp-depth", "1", "--mtp-depth", "2", "--vs-transformers", "--json",
                        "--repeats", "2"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    names = [(row["name"], row["batch"]) for row in report["rows"]]
    configs = ["duet", "duet + MTP", "duet + MTP depth 2", "transformers generate"]
    assert names == [(n, b) for b in (1, 2) for n in configs]  # one row per configuration, medians of 2 runs
    assert report["repeats"] == 2
    for row in report["rows"]:
        assert row["decode_tok_s"] > 0 and row["prefill_tok_s"] > 0
        if "MTP" in row["name"]:
            depth = 2 if "depth 2" in row["name"] else 1
            assert 0 <= row["acceptance"] <= 1 and 1 <= row["tokens_per_forward"] <= depth + 1
    assert report["peak_memory_mb"] > 0


def test_bench_repeats_report_each_figures_median():
    from duet.bench import Row, _median_row

    runs = [Row("duet + MTP", 1, 40, 900.0, 210.0, 0.9, 1.9), Row("duet + MTP", 1, 40, 300.0, 150.0, 0.8, 1.8),
            Row("duet + MTP", 1, 40, 600.0, 400.0, 1.0, 2.0)]
    assert _median_row(runs) == Row("duet + MTP", 1, 40, 600.0, 210.0, 0.9, 1.9)
    plain = [Row("duet", 1, 40, 10.0, 5.0), Row("duet", 1, 40, 30.0, 7.0)]
    assert _median_row(plain) == Row("duet", 1, 40, 20.0, 6.0, None, None)


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")),
                    reason="torch.compile on a CPU needs a C++ compiler")
def test_bench_compiled_rows(ckpt):
    """`duet bench --compile` (in process, batch 1: the graphs the compiled tests above already built)."""
    from duet.bench import run_bench

    report = run_bench(ckpt, [1], [None], 8, False, "cpu", "float32", ["Tom has 12 apples"], mtp_depths=(1,),
                       compile=True)
    assert [r["name"] for r in report["rows"]] == ["duet", "duet + MTP", "duet compiled", "duet compiled + MTP"]
    assert report["compile_seconds"] >= 0 and all(r["decode_tok_s"] > 0 for r in report["rows"])


def test_context_scaling_benchmark_runs():
    """benchmarks/context_scaling.py (part of `make bench`) still runs against duet.bench, on tiny settings."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "context_scaling.py"
    r = subprocess.run([sys.executable, str(script), "--context", "16", "--batch", "1", "--new-tokens", "2",
                        "--threads", "1"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "decode tok/s" in r.stdout and "1.00x" in r.stdout


def test_mtp_bound_benchmark_runs(tmp_path):
    """benchmarks/mtp_bound.py (part of `make bench`) still runs, on a tiny random checkpoint and few repeats."""
    import subprocess
    import sys
    from pathlib import Path

    ckpt = make_engine_checkpoint(tmp_path / "tiny", seed=3)
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "mtp_bound.py"
    r = subprocess.run([sys.executable, str(script), "--model", str(ckpt), "--context", "16", "--repeats", "2"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "main model, 2 token(s)" in r.stdout and "upper bound on the MTP speed-up: depth 1" in r.stdout
    assert "bound with verification free" in r.stdout


def test_weights_read_matches_deepseek_v3s_published_active_parameters():
    """mtp_bound.py's count of the weights a token's pass reads gives DeepSeek-V3's published 37B activated
    parameters (technical report) when run on V3's arguments on the meta device."""
    import importlib.util
    from pathlib import Path

    from duet.model import Transformer
    from duet.model.config import ModelArgs

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "mtp_bound.py"
    spec = importlib.util.spec_from_file_location("mtp_bound", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    with torch.device("meta"):
        main, mtp = bench.weights_read(Transformer(ModelArgs(), n_mtp=1))
    assert 36e9 < main < 38e9
    # the MTP module: one MoE block (8 of 256 routed experts + 1 shared), eh_proj and the shared head
    assert 1.4e9 < mtp < 1.8e9


def test_a_checkpoint_without_tokenizer_json_says_so(tmp_path):
    """tokenizer_config.json alone is not a tokenizer: one line naming the missing file, not transformers' error."""
    from duet.engine.engine import load_tokenizer
    from duet.errors import CheckpointError

    ckpt = make_engine_checkpoint(tmp_path / "ckpt", seed=2)
    assert (ckpt / "tokenizer_config.json").is_file()
    (ckpt / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="no tokenizer.json") as info:
        load_tokenizer(ckpt)
    assert "\n" not in str(info.value)
