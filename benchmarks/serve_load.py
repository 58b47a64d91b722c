"""Load benchmark of `duet serve`: N concurrent streaming clients on loopback for a bounded time.

    python benchmarks/serve_load.py [--clients 64] [--seconds 30] [--max-tokens 64] [--max-batch 16] [--model DIR]

The server runs in this process (uvicorn in a thread, the engine's batch of --max-batch rows); the clients run in
a child process (asyncio, one task per client, each sending streamed chat completions back to back with
``ignore_eos`` so every request generates --max-tokens tokens). Reported: requests/s, generated tokens/s, p50/p99
time to first token and latency, failed requests, and the ratio of served tokens/s to the engine's offline
tokens/s: the same prompts and sampling through `Engine.generate` with as many requests as clients, measured
in the same run before and after the load (their mean), on the same loaded model.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPTS = [
    "A baker has 23 loaves and bakes 4 trays of 12 more. How many loaves does he have?",
    "Sam has 45 stickers and gives 17 to a friend. How many are left?",
    "A train travels at 60 km per hour for 3 hours. How far does it travel?",
    "There are 8 boxes with 15 apples in each box. How many apples are there?",
]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def client_process(url: str, clients: int, seconds: float, max_tokens: int, model: str, out) -> None:
    """The load: `clients` tasks, each streaming requests until the deadline; one JSON line per request."""
    try:
        import httpx2 as httpx
    except ImportError:
        import httpx

    async def one(client, i: int, records: list) -> None:
        body = {"model": model, "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                "max_tokens": max_tokens, "temperature": 0, "stream": True, "ignore_eos": True,
                "stream_options": {"include_usage": True}}
        started = time.perf_counter()
        first, tokens, ok, error = None, 0, False, None
        try:
            async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
                if r.status_code != 200:
                    error = f"HTTP {r.status_code}"
                else:
                    async for line in r.aiter_lines():
                        if not line.startswith("data: "):
                            continue
                        data = line[6:]
                        if data == "[DONE]":
                            ok = True
                            break
                        chunk = json.loads(data)
                        if chunk.get("usage"):
                            tokens = chunk["usage"]["completion_tokens"]
                        elif first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                            first = time.perf_counter() - started
        except Exception as e:  # a failed request is counted, not fatal
            error = f"{type(e).__name__}: {e}"
        records.append({"ok": ok and error is None, "ttft": first, "latency": time.perf_counter() - started,
                        "tokens": tokens, "error": error, "end": time.perf_counter()})

    async def worker(client, i: int, deadline: float, records: list) -> None:
        while time.perf_counter() < deadline:
            await one(client, i, records)

    async def main() -> None:
        records: list = []
        limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)
        async with httpx.AsyncClient(timeout=300, limits=limits) as client:
            start = time.perf_counter()
            await asyncio.gather(*[worker(client, i, start + seconds, records) for i in range(clients)])
            out.send({"records": records, "start": start, "elapsed": time.perf_counter() - start})

    asyncio.run(main())


def offline(engine, clients: int, max_tokens: int) -> float:
    """Generated tokens/s of `clients` requests through Engine.generate (the same prompts and sampling)."""
    from duet.engine import SamplingParams

    prompts = [engine.encode_chat([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]) for i in range(clients)]
    params = SamplingParams(max_new_tokens=max_tokens, stop_at_eos=False)
    started = time.perf_counter()
    results = engine.generate(prompts, params)
    return sum(r.completion_tokens for r in results) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--model", default=None, help="checkpoint directory [default: the embedded model]")
    parser.add_argument("--no-mtp", action="store_true")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()

    import uvicorn

    from duet.engine import Engine
    from duet.model.embedded import default_model_path
    from duet.serve.app import create_app
    from duet.serve.service import Limits, Service

    engine = Engine.load(args.model or default_model_path(), max_batch=args.max_batch,
                         use_mtp=not args.no_mtp).start()
    offline(engine, min(args.clients, args.max_batch), 8)  # warm-up
    before = offline(engine, args.clients, args.max_tokens)

    service = Service(engine, "model", limits=Limits(max_queue=max(args.clients, 256)))
    server = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=0, log_level="warning",
                                           lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    receive, send = multiprocessing.get_context("spawn").Pipe(duplex=False)
    proc = multiprocessing.get_context("spawn").Process(
        target=client_process, args=(url, args.clients, args.seconds, args.max_tokens, "model", send))
    proc.start()
    report = receive.recv()
    proc.join()
    server.should_exit = True
    thread.join(10)
    after = offline(engine, args.clients, args.max_tokens)

    records, elapsed = report["records"], report["elapsed"]
    done = [r for r in records if r["ok"]]
    failed = [r for r in records if not r["ok"]]
    served = sum(r["tokens"] for r in done) / elapsed
    offline_tok_s = (before + after) / 2
    result = {
        "clients": args.clients, "seconds": round(elapsed, 1), "max_tokens": args.max_tokens,
        "max_batch": args.max_batch, "mtp": engine.use_mtp,
        "requests": len(records), "failed": len(failed), "requests_per_s": round(len(done) / elapsed, 2),
        "tokens_per_s": round(served, 1),
        "ttft_p50_s": round(percentile([r["ttft"] for r in done if r["ttft"] is not None], 0.5), 3),
        "ttft_p99_s": round(percentile([r["ttft"] for r in done if r["ttft"] is not None], 0.99), 3),
        "latency_p50_s": round(percentile([r["latency"] for r in done], 0.5), 3),
        "latency_p99_s": round(percentile([r["latency"] for r in done], 0.99), 3),
        "offline_tokens_per_s": round(offline_tok_s, 1),
        "offline_before_after": [round(before, 1), round(after, 1)],
        "served_over_offline": round(served / offline_tok_s, 3) if offline_tok_s else None,
        "errors": sorted({r["error"] for r in failed if r["error"]})[:5],
    }
    if args.json:
        print(json.dumps(result))
        return
    for key, value in result.items():
        print(f"{key:22} {value}")
    if failed:
        print(f"median latency of failed: {statistics.median(r['latency'] for r in failed):.3f} s")


if __name__ == "__main__":
    main()
