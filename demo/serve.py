"""``make serve`` / ``python -m demo.serve``: both services in the foreground on the demo assets.

The merge service serves the demo adapters (ids: facts, upper, reverse, sort) and the inference
service runs vLLM on the demo base model. Ctrl-C (or SIGTERM) stops both.
"""

from __future__ import annotations

import argparse
import json
import shlex
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from demo.assets import BASE_MODEL_NAME, REPO_ROOT, VARIANTS
from demo.cache import ensure_assets
from demo.services import running


def usage_lines(merge_addr: str, inference_addr: str, suite: Path) -> list[str]:
    tasks = {t["name"]: t for t in json.loads(suite.read_text())["tasks"]}
    fact = tasks["facts"]["prompts"][0]["prompt"]
    return [
        f"merge service      {merge_addr}",
        f"inference service  {inference_addr}   (base model name: {BASE_MODEL_NAME})",
        "",
        "try:",
        f"  loramerge --help; export INFERENCE_ADDR={inference_addr} MERGE_ADDR={merge_addr}",
        "  loramerge generate 'up: hello =' --adapter upper -n 12",
        f"  loramerge generate {shlex.quote(fact)} --adapter facts:1.2 --adapter upper --strategy linear",
        "  loramerge eval " + shlex.quote(str(suite)) + " --grid facts,upper "
        "--strategies linear,ties,dare_ties --spaces delta,factors --weights 1,1 --weights 1.2,1 "
        "--own-tasks --out out/eval",
        f'  grpcurl -plaintext -d \'{{"prompt": "rev: hello =", "adapter_id": "reverse"}}\' '
        f"{inference_addr} loramerge.v1.InferenceService/Generate",
        "",
        "Ctrl-C stops both services.",
    ]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m demo.serve", description=__doc__.split("\n")[0])
    ap.add_argument("--variant", choices=sorted(VARIANTS), default="full", help="asset variant [%(default)s]")
    ap.add_argument("--merge-listen", default="127.0.0.1:50061", help="merge service host:port [%(default)s]")
    ap.add_argument(
        "--inference-listen", default="127.0.0.1:50051", help="inference service host:port [%(default)s]"
    )
    ap.add_argument(
        "--http-listen", default="127.0.0.1:8000", help="inference OpenAI/LoRAX HTTP host:port [%(default)s]"
    )
    ap.add_argument("--merge-metrics-port", type=int, default=9461, help="0 turns /metrics off [%(default)s]")
    ap.add_argument("--inference-metrics-port", type=int, default=9451, help="[%(default)s]")
    ap.add_argument("--work-dir", type=Path, default=REPO_ROOT / "out" / "serve", help="logs [%(default)s]")
    args = ap.parse_args(argv)

    interrupt_on_sigterm()

    def say(text: str) -> None:
        print(text, flush=True)

    say(f"demo assets ({args.variant}) ...")
    assets = ensure_assets(args.variant, log=say)
    say(f"assets: {assets.root}\nstarting the services (logs in {args.work_dir}) ...")
    status = 0
    try:
        with running(
            assets,
            args.work_dir,
            progress=say,
            merge_listen=args.merge_listen,
            inference_listen=args.inference_listen,
            http_listen=args.http_listen,
            merge_metrics_port=args.merge_metrics_port,
            inference_metrics_port=args.inference_metrics_port,
        ) as services:
            for line in usage_lines(services.merge.address, services.inference.address, assets.suite_path):
                say(line)
            say(f"OpenAI/LoRAX HTTP: {services.inference.http_url} (recipe facts-upper served as a model)")
            while status == 0:
                time.sleep(1.0)
                for svc in services.services:
                    if svc.proc is not None and svc.proc.poll() is not None:
                        say(f"{svc.name} exited with {svc.proc.returncode}; see {svc.log_path}")
                        status = 1
            say("stopping ...")
    except KeyboardInterrupt:
        say("\nstopping ...")
    say("stopped")
    return status


def interrupt_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, so the services (in their own sessions) are always stopped."""

    def handler(_sig: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


if __name__ == "__main__":
    sys.exit(main())
