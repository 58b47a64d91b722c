"""`duet serve`: the command. Imports FastAPI, uvicorn and torch only when it runs.

Safe by default: it binds the loopback interface; binding any other address needs an API key (it refuses to
start without one). Device, dtype, MTP, compile, and the dialogue's settings (rounds, tokens, sandbox limits)
come from duet's settings (config file, ``DUET_*``; ``duet config``), never from a request. SIGTERM (or Ctrl-C)
stops accepting connections, lets the requests in flight finish (up to ``--drain-timeout`` seconds; then they
are cancelled) and exits.
"""

from __future__ import annotations

import ipaddress
import os
import sys
from typing import Annotated, Any, Optional

import typer

LOOPBACK_NAMES = ("localhost",)


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def serve_command(
    model: Annotated[Optional[str], typer.Option("--model", "-m", metavar="DIR",
                     help="Checkpoint directory [default: the embedded model].")] = None,
    host: Annotated[str, typer.Option("--host", help="Address to bind; other than loopback needs --api-key.")]
    = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="Port (0: any free one).")] = 8000,
    api_key: Annotated[Optional[str], typer.Option("--api-key", metavar="KEY", envvar="DUET_SERVE_API_KEY",
                       help="Clients must send 'Authorization: Bearer KEY' (env DUET_SERVE_API_KEY).")] = None,
    max_batch: Annotated[int, typer.Option("--max-batch", min=1, metavar="N",
                         help="Generations decoded together in the engine's batch.")] = 16,
    max_queue: Annotated[int, typer.Option("--max-queue", min=0, metavar="N",
                         help="Generations waiting beyond the batch; more are refused with 429.")] = 256,
    max_tokens_limit: Annotated[int, typer.Option("--max-tokens-limit", min=1, metavar="N",
                                help="The largest max_tokens a request may ask for.")] = 4096,
    max_request_kb: Annotated[int, typer.Option("--max-request-kb", min=1, metavar="KB",
                              help="Largest request body.")] = 1024,
    max_dialogues: Annotated[int, typer.Option("--max-dialogues", min=1, metavar="N",
                             help="Dialogues (models duet, duet:solver-only) running at once.")] = 4,
    drain_timeout: Annotated[float, typer.Option("--drain-timeout", min=0, metavar="SECONDS",
                             help="On SIGTERM, how long requests in flight may take to finish.")] = 30.0,
    device: Annotated[Optional[str], typer.Option("--device", metavar="DEV",
                      help="auto, cpu, cuda, cuda:N, mps [default: auto].")] = None,
    dtype: Annotated[Optional[str], typer.Option("--dtype", metavar="TYPE",
                     help="auto, float32, bfloat16, float16 [default: auto].")] = None,
    mtp: Annotated[Optional[bool], typer.Option("--mtp/--no-mtp", show_default=False,
                   help="Speculative decoding with the model's MTP module [default: on].")] = None,
    compile: Annotated[Optional[bool], typer.Option("--compile/--no-compile", show_default=False,
                       help="torch.compile the decode steps [default: off].")] = None,
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API, and the solver-critic dialogue as the model 'duet'.

    \b
    Endpoints: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health, GET /metrics.
    Models: the checkpoint; duet (the dialogue: answer, explanation, transcript in duet_transcript);
    duet:solver-only.
    """
    from duet.app.errors import UsageProblem, describe, is_user_error

    try:
        if os.environ.get("WORLD_SIZE", "1").strip() not in ("", "0", "1"):
            raise UsageProblem("duet serve does not run under torchrun yet (it scores prompts outside the engine's "
                               "loop); serve a model split over GPUs with vLLM or SGLang")
        if not is_loopback(host) and not api_key:
            raise UsageProblem(f"--host {host} is not a loopback address: refusing to serve without --api-key KEY "
                               "(or DUET_SERVE_API_KEY)")
        server = build_server(model=model, host=host, port=port, api_key=api_key, max_batch=max_batch,
                              max_queue=max_queue, max_tokens_limit=max_tokens_limit,
                              max_request_bytes=max_request_kb * 1024, max_dialogues=max_dialogues,
                              drain_timeout=drain_timeout, flags={"device": device, "dtype": dtype, "mtp": mtp,
                                                                  "compile": compile, "model": model})
    except Exception as error:
        if is_user_error(error) and not os.environ.get("DUET_DEBUG"):
            message, code = describe(error)
            print(f"error: {message}", file=sys.stderr)
            raise typer.Exit(code) from None
        raise
    server.run()


def build_server(*, model: str | None, host: str, port: int, api_key: str | None, max_batch: int,
                 max_queue: int, max_tokens_limit: int, max_request_bytes: int, max_dialogues: int,
                 drain_timeout: float, flags: dict[str, Any]) -> Any:
    """Load the engine and return a ready `uvicorn.Server` (not yet running)."""
    from pathlib import Path

    import torch
    import uvicorn

    from duet.app.backends import dialogue_config, resolve_local
    from duet.app.settings import load_settings
    from duet.engine import Engine
    from duet.model.embedded import EMBEDDED_DIR, default_model_path
    from duet.serve.app import create_app
    from duet.serve.service import Limits, Service

    settings = load_settings(flags)
    mtp = settings.mtp if settings.sources.get("mtp", "default") != "default" else "auto"
    options = resolve_local({"device": settings.device, "dtype": settings.dtype, "mtp": mtp,
                             "compile": settings.compile}, settings.where("device"))
    directory = Path(settings.model).expanduser() if settings.model else default_model_path()
    dtype = getattr(torch, {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(options["dtype"],
                                                                                         options["dtype"]))
    engine = Engine.load(directory, device=options["device"], dtype=dtype, use_mtp=options["mtp"],
                         fp8_weights=settings.fp8_weights, max_batch=max_batch, compile=options["compile"]).start()
    model_id = "embedded" if directory.resolve() == EMBEDDED_DIR.resolve() else directory.resolve().name
    limits = Limits(max_queue=max_queue, max_tokens=max_tokens_limit,
                    default_max_tokens=min(1024, max_tokens_limit), max_request_bytes=max_request_bytes,
                    max_dialogues=max_dialogues)
    service = Service(engine, model_id, limits=limits, dialogue_config=dialogue_config(settings))
    app = create_app(service, api_key=api_key)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=drain_timeout, lifespan="off")
    server = _Server(config, service)
    return server


def _server_class() -> type:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, announcing its address once it listens."""

        def __init__(self, config: Any, service: Any) -> None:
            super().__init__(config)
            self.service = service

        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets)
            if self.started:
                bound = [s.getsockname() for server in self.servers for s in server.sockets]
                host, port = bound[0][:2] if bound else (self.config.host, self.config.port)
                where = f"[{host}]" if ":" in str(host) else host
                print(f"duet serve: http://{where}:{port}/v1 (models: {self.service.model_id}, duet, "
                      f"duet:solver-only); SIGTERM or Ctrl-C drains and stops", file=sys.stderr, flush=True)

        async def shutdown(self, sockets: Any = None) -> None:
            await super().shutdown(sockets)
            self.service.shutdown()

    return Server


def _Server(config: Any, service: Any) -> Any:  # noqa: N802 (a class made on first use: uvicorn loads late)
    return _server_class()(config, service)
