"""``duet doctor``: what this installation has and uses, one check per line.

Python, torch, transformers and triton versions; the device (CUDA and its GPUs); the kernel backend
(``duet.kernels.describe()``); each sandbox isolation layer (``describe_isolation()``); the embedded
model (path, size from the safetensors headers, architecture from config.json); the config file and
the data paths. Exit code 0, or 1 when something duet needs is broken (torch or the sandbox).
"""

from __future__ import annotations

import json
import platform
import struct
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from duet.app.settings import config_path, data_dir, history_path, log_path


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def safetensors_parameters(directory: Path) -> int:
    """Distinct parameters from the safetensors headers (no weights are read). The MTP modules' stored copies
    of the shared embedding and output head are not counted, as `duet.model.count_parameters` does not."""
    total = 0
    for file in sorted(directory.glob("*.safetensors")):
        with file.open("rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        for name, info in header.items():
            if name == "__metadata__" or name.endswith(("weight_scale_inv", "e_score_correction_bias")):
                continue
            if name.startswith("model.layers.") and name.endswith((".embed_tokens.weight", ".shared_head.head.weight")):
                continue  # an MTP module's copy of a shared tensor
            count = 1
            for dim in info.get("shape", []):
                count *= dim
            total += count
    return total


def human_count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def checks() -> list[dict[str, Any]]:
    """Every check: ``{"section", "name", "ok" (True/False/None: informational), "detail"}``."""
    out: list[dict[str, Any]] = []

    def add(section: str, name: str, ok: bool | None, detail: str) -> None:
        out.append({"section": section, "name": name, "ok": ok, "detail": detail})

    from duet import __version__
    from duet.app.settings import load_settings

    settings = load_settings(errors=[])  # a bad value is `duet config`'s to report; here it stays as given
    add("versions", "duet", None, __version__)
    add("versions", "python", None, f"{platform.python_version()} ({sys.executable})")
    torch = None
    try:
        import torch as _torch

        torch = _torch
        add("versions", "torch", True, torch.__version__)
    except Exception as error:  # a broken install must still give a report
        add("versions", "torch", False, f"cannot import torch: {error}")
    for package in ("transformers", "triton"):
        version = _version(package)
        add("versions", package, None if version else (None if package == "triton" else False),
            version or "not installed")

    if torch is not None:
        if torch.cuda.is_available():
            names = [f"{torch.cuda.get_device_name(i)} (sm_{''.join(map(str, torch.cuda.get_device_capability(i)))})"
                     for i in range(torch.cuda.device_count())]
            add("device", "cuda", True, f"CUDA {torch.version.cuda}: " + ", ".join(names))
        else:
            add("device", "cuda", None, "no CUDA device: the local runtime runs on the CPU")
        try:
            from duet import kernels

            add("device", "kernels", None, kernels.describe())
        except Exception as error:
            add("device", "kernels", False, f"cannot load duet.kernels: {error}")

    try:
        from duet.sandbox import describe_isolation

        layers = describe_isolation()
        for layer in layers:
            state = "used" if layer["used"] else "available, not used" if layer["available"] else "unavailable"
            add("sandbox", layer["name"], bool(layer["used"]) if layer["available"] else None,
                f"{state}: {layer['detail']}")
        if not any(layer["used"] for layer in layers):
            add("sandbox", "isolation", False, "no isolation layer is usable here")
        if settings.sandbox != "auto":
            add("sandbox", "setting", None, f"{settings.sandbox} ({settings.sources['sandbox']}): duet runs code at "
                "that level, not at the one above, which is what auto would use")
    except Exception as error:
        add("sandbox", "sandbox", False, f"cannot probe the sandbox: {error}")

    try:
        from duet.model.embedded import EMBEDDED_DIR, default_model_path

        path = Path(settings.model).expanduser() if settings.model else default_model_path()
        embedded = path.resolve() == EMBEDDED_DIR.resolve()
        source = f" ({settings.sources['model']})" if settings.model else ""
        add("model", "embedded" if embedded else "model", None, f"{path}{source}")
        try:
            from duet.model import load_config

            args = load_config(path)
            params = safetensors_parameters(path)
            add("model", "parameters", True if params else False,
                f"{human_count(params)} ({params:,})" if params else "no *.safetensors weights found")
            add("model", "architecture", None,
                f"{args.num_hidden_layers} layers, hidden {args.hidden_size}, {args.n_routed_experts} routed experts "
                f"({args.num_experts_per_tok} active), vocab {args.vocab_size}, MTP modules "
                f"{args.num_nextn_predict_layers}")
        except Exception as error:
            add("model", "checkpoint", False, " ".join(str(error).split()))
    except Exception as error:  # CheckpointError: not installed yet
        add("model", "embedded", False, " ".join(str(error).split()))

    config = config_path()
    add("paths", "config file", None, f"{config}" + ("" if config.is_file() else " (not created)"))
    add("paths", "data dir", None, f"{data_dir()}" + ("" if data_dir().is_dir() else " (not created)"))
    db = log_path()
    add("paths", "log database", None, f"{db}" + (f" ({_count(db)})" if db.exists() else " (not created)"))
    add("paths", "history", None, f"{history_path()}" + ("" if history_path().is_file() else " (not created)"))
    return out


def _count(db: Path) -> str:
    try:
        from duet.app.store import Store

        store = Store(db)
        conn = store.connect()
        n = conn.execute("SELECT COUNT(*) FROM exchanges").fetchone()[0]
        r = conn.execute("SELECT COUNT(*) FROM ratings").fetchone()[0]
        store.close()
        return f"{n} exchanges, {r} ratings"
    except Exception as error:
        return f"unreadable: {' '.join(str(error).split())}"


def run_doctor(as_json: bool = False) -> int:
    """Print the report; exit code 1 when torch or the sandbox is broken."""
    from rich.status import Status

    from duet.terminal import SafeConsole

    console = SafeConsole(highlight=False)
    status = Status("checking ...", console=SafeConsole(stderr=True)) if sys.stderr.isatty() and not as_json else None
    if status is not None:
        status.start()
    try:
        results = checks()
    finally:
        if status is not None:
            status.stop()
    broken = any(r["ok"] is False and r["section"] in ("versions", "sandbox") for r in results)
    if as_json:
        sys.stdout.write(json.dumps({"checks": results, "ok": not broken}, indent=2) + "\n")
        return 1 if broken else 0
    from rich.table import Table
    from rich.text import Text

    table = Table(show_header=False, show_edge=False, pad_edge=False, box=None, padding=(0, 2, 0, 0))
    table.add_column(no_wrap=True)
    table.add_column(no_wrap=True)
    table.add_column(no_wrap=True)
    table.add_column(overflow="fold")
    section = None
    for r in results:
        mark = {True: "[green]✔[/]", False: "[red]✘[/]", None: "[dim]·[/]"}[r["ok"]]
        table.add_row(Text(r["section"] if r["section"] != section else "", style="bold"), mark, Text(r["name"]),
                      Text(r["detail"]))
        section = r["section"]
    console.print(table)
    return 1 if broken else 0
