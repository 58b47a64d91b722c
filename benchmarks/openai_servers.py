"""`duet eval` through a real OpenAI-compatible server against duet's own runtime: the same greedy predictions?

    python benchmarks/openai_servers.py transformers [-n 40] [--modes solver-only,solver+critic] [-j 4]
    python benchmarks/openai_servers.py llama.cpp --llama-server b/bin/llama-server --gguf duet.gguf
    python benchmarks/openai_servers.py llama.cpp --llama-server b/bin/llama-server --convert-with LLAMA_CPP_DIR
    python benchmarks/openai_servers.py url --url http://127.0.0.1:8080/v1    # a server started by hand

The server (``transformers serve`` on the embedded model, llama.cpp's ``llama-server`` on a GGUF conversion of
it, which ``--convert-with`` makes with the converter of llama.cpp's sources, or any server already running)
listens on loopback; `duet eval` runs the first N MAWPS + ASDiv-A dev problems through it and on the local
runtime (greedy, the same flags), and each problem's prediction, stop reason and turn texts are compared.
Failures must all be recorded: every problem has a result, and every failed one an error. Where the two differ
for a reason of the server's (it does not sample, or sends no log-probabilities for the critic's verifier), the
differing problems are listed with their turns' verification methods.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import typer

REPO = Path(__file__).resolve().parents[1]
DEV = REPO / "data" / "dev" / "mawps_asdiv_a_dev.jsonl"
EMBEDDED = REPO / "duet" / "assets" / "model"
FAILURES = ("backend_error", "sandbox_error", "error", "context_full")
CONVERT = """import sys
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/gguf-py"]
import conversion.base
# duet's tokenizer (digits one by one, then GPT-2's byte-level regex) is missing from the converter's table of
# known tokenizers: it is the pre-tokenizer llama.cpp calls "starcoder"
conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "starcoder"
import convert_hf_to_gguf
sys.argv = ["convert_hf_to_gguf.py", *sys.argv[2:]]
convert_hf_to_gguf.main()
"""


def results(run: Path) -> dict[tuple[str, str], dict]:
    """(mode, id) -> the record, with ``texts``: every turn's text, and ``methods``: the verifier's methods."""
    found = {}
    for line in (run / "results.jsonl").read_text().splitlines():
        record = json.loads(line)
        turns = [t for d in json.loads((run / record["transcript"]).read_text())["dialogues"] for t in d["turns"]]
        record["texts"] = [t["text"] for t in turns]
        record["methods"] = sorted({(t.get("score") or {}).get("method") for t in turns} - {None})
        found[(record["mode"], record["id"])] = record
    return found


def compare(local: Path, served: Path, expected: int) -> dict:
    """How the served run differs from the local one (``expected``: the records each run should hold)."""
    here, there = results(local), results(served)
    same = [k for k in here if k in there and (here[k]["prediction"], here[k]["stop_reason"]) == (
        there[k]["prediction"], there[k]["stop_reason"])]
    return {
        "records": len(there),
        "same_predictions": len(same),
        "same_transcripts": sum(here[k]["texts"] == there[k]["texts"] for k in here if k in there),
        "differing": [{"mode": k[0], "id": k[1], "local": [here[k]["prediction"], here[k]["stop_reason"]],
                       "served": [there[k]["prediction"], there[k]["stop_reason"]],
                       "methods": [here[k]["methods"], there[k]["methods"]]} for k in here if k not in same],
        "errors": sum(r["stop_reason"] in FAILURES for r in there.values()),
        "unrecorded_failures": expected - len(there) + sum(r["stop_reason"] in FAILURES and not r["error"]
                                                           for r in there.values()),
    }


def duet_eval(out: Path, args: list[str]) -> float:
    """Run `duet eval` (exit 0 required); its wall time in seconds."""
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "duet", "eval", *args, "-o", str(out), "--no-progress"],
                          capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"duet eval failed: {done.stderr.strip()[-600:]}")
    return time.monotonic() - started


def convert(llama_cpp: Path, out: Path) -> Path:
    """The embedded model as a GGUF file (f32), by the converter of the llama.cpp source tree ``llama_cpp``."""
    done = subprocess.run([sys.executable, "-c", CONVERT, str(llama_cpp), str(EMBEDDED), "--outfile", str(out),
                           "--outtype", "f32"], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"convert_hf_to_gguf.py failed: {done.stderr.strip()[-600:]}")
    return out


def start_server(kind: str, port: int, llama_server: Path | None, gguf: Path | None, jobs: int) -> subprocess.Popen:
    if kind == "transformers":
        command = [sys.executable, "-m", "transformers.cli.transformers", "serve", str(EMBEDDED), "--host",
                   "127.0.0.1", "--port", str(port), "--device", "cpu", "--dtype", "float32"]
    elif llama_server and gguf:
        command = [str(llama_server), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-c", "8192",
                   "-np", str(jobs), "--temp", "0"]
    else:
        raise SystemExit("llama.cpp needs --llama-server BIN and --gguf FILE")
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_up(root: str, process: subprocess.Popen, seconds: float = 180) -> None:
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with {process.returncode}")
        try:
            with urllib.request.urlopen(root + "/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"the server was not up within {seconds:g} s")


def main(kind: str = typer.Argument(..., help="transformers, llama.cpp or url"),
         n: int = typer.Option(40, "-n", help="Dev problems."),
         modes: str = typer.Option("solver-only,solver+critic", help="duet eval --modes."),
         jobs: int = typer.Option(4, "-j", help="duet eval -j (and llama-server's slots)."),
         url: str = typer.Option(None, help="With `url`: the server's API root."),
         llama_server: Path = typer.Option(None, help="With llama.cpp: the llama-server binary."),
         gguf: Path = typer.Option(None, help="With llama.cpp: the model's GGUF file."),
         convert_with: Path = typer.Option(None, help="With llama.cpp: make the GGUF file with the converter of "
                                                      "this llama.cpp source tree (vendor/llama.cpp in the sdist)."),
         extra: list[str] = typer.Option([], "--eval-arg", help="More duet eval arguments, for both runs."),
         as_json: bool = typer.Option(False, "--json", help="Print the report as JSON.")) -> None:
    common = [str(DEV), "--limit", str(n), "--modes", modes, "-j", str(jobs), *extra]
    with tempfile.TemporaryDirectory() as tmp:
        server = None
        if kind == "url" and not url:
            raise SystemExit("url needs --url http://host:port/v1")
        if kind != "url":
            if kind == "llama.cpp" and convert_with and not gguf:
                gguf = convert(convert_with, Path(tmp) / "duet.gguf")
            with socket.socket() as sock:  # a free loopback port
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            server = start_server(kind, port, llama_server, gguf, jobs)
            url = f"http://127.0.0.1:{port}/v1"
        try:
            if server is not None:
                wait_up(url.removesuffix("/v1"), server)
            served_seconds = duet_eval(Path(tmp) / "served", [*common, "--base-url", url])
            local_seconds = duet_eval(Path(tmp) / "local", [*common, "--device", "cpu"])
            report = compare(Path(tmp) / "local", Path(tmp) / "served", n * len(modes.split(",")))
        finally:
            if server is not None:
                server.terminate()
                server.wait(30)
    report.update(server=kind, problems=n, modes=modes, jobs=jobs, served_seconds=round(served_seconds, 1),
                  local_seconds=round(local_seconds, 1))
    if as_json:
        print(json.dumps(report, indent=2))
        return
    print(f"{kind}: {report['records']} results; same prediction and stop reason as the local runtime: "
          f"{report['same_predictions']}; same transcripts: {report['same_transcripts']}; errors recorded: "
          f"{report['errors']}; unrecorded failures: {report['unrecorded_failures']}; duet eval took "
          f"{report['served_seconds']} s through the server, {report['local_seconds']} s locally")
    for row in report["differing"]:
        print(f"  differs: {row['mode']} #{row['id']}: local {row['local']}, served {row['served']} "
              f"(verifier methods {row['methods'][0]} / {row['methods'][1]})")


if __name__ == "__main__":
    typer.run(main)
