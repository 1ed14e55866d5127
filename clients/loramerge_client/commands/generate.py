"""``loramerge generate``: text from the inference service with no adapter, one adapter, a merged
set (merged on demand by the services), or an adapter already loaded (``--merge-key``)."""

from __future__ import annotations

import argparse
import sys

from loramerge.errors import InvalidArgument
from loramerge.v1 import inference_pb2
from loramerge_client.commands.connection import add_connection_options, inference_client
from loramerge_client.commands.output import EXIT_OK, add_json_option, command, print_json
from loramerge_client.commands.spec_options import (
    add_spec_options,
    has_spec,
    merge_flags_given,
    spec_from_args,
)
from loramerge_client.types import Adapter, AdapterChoice, SamplingParams, to_json


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "generate",
        help="generate text, optionally with a merged set of adapters",
        description="Generate text. One --adapter without merge flags uses that adapter (LoRAX style); "
        "several, or any merge flag, ask the services to merge them first.",
    )
    p.add_argument("prompt", help="the prompt; - reads it from stdin")
    add_spec_options(p)
    p.add_argument("--merge-key", default="", help="use an adapter already loaded under this merge key")
    s = p.add_argument_group("sampling")
    s.add_argument("-n", "--max-tokens", type=int, default=0, help="tokens to generate [16]")
    s.add_argument("-t", "--temperature", type=float, default=0.0, help="0 is greedy [0]")
    s.add_argument("--top-p", type=float, default=0.0, help="nucleus cut [1.0]")
    s.add_argument("--top-k", type=int, default=0, help="top-k cut [off]")
    s.add_argument("--seed", type=int, help="sampling seed")
    s.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    s.add_argument("--repetition-penalty", type=float, default=0.0)
    s.add_argument("--presence-penalty", type=float, default=0.0)
    s.add_argument("--frequency-penalty", type=float, default=0.0)
    s.add_argument("--min-tokens", type=int, default=0)
    s.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--stream", action="store_true", help="print text as tokens are produced")
    p.add_argument("--request-id", default="", help="id echoed in the server's logs")
    p.add_argument("-v", "--verbose", action="store_true", help="print adapter and token usage on stderr")
    add_json_option(p)
    add_connection_options(p, merge=False, inference=True)
    p.set_defaults(func=run)
    return p


def sampling_from_args(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=tuple(args.stop),
        repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        min_tokens=args.min_tokens,
        ignore_eos=args.ignore_eos,
    )


def adapter_from_args(args: argparse.Namespace) -> AdapterChoice:
    if args.merge_key and has_spec(args):
        raise InvalidArgument("give --merge-key or adapters, not both", field="--merge-key")
    if not has_spec(args):
        return None
    if len(args.adapter) == 1 and not args.merge and not merge_flags_given(args):
        return Adapter.parse(args.adapter[0], args.source, args.revision)
    return spec_from_args(args)


def _usage_line(usage, prompt_tokens: int, completion_tokens: int, finish: int) -> str:
    parts = [
        f"{prompt_tokens} prompt + {completion_tokens} completion tokens, "
        f"finish {inference_pb2.FinishReason.Name(finish).lower()}"
    ]
    if usage is not None and usage.name:
        if usage.already_loaded:
            how = "already loaded"
        else:
            how = "merge cache hit" if usage.merge_cache_hit else "merged"
        parts.append(
            f"adapter {usage.name} (merge key {usage.merge_key[:12]}, rank {usage.rank}, {how}; "
            f"merge {usage.merge_ms:.0f} ms, transfer {usage.transfer_ms:.0f} ms, "
            f"load {usage.load_ms:.0f} ms)"
        )
    return "; ".join(parts)


@command
def run(args: argparse.Namespace) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    adapter = adapter_from_args(args)
    sampling = sampling_from_args(args)
    kwargs = {"merge_key": args.merge_key, "request_id": args.request_id}
    with inference_client(args) as client:
        if not args.stream:
            resp = client.generate(prompt, adapter, sampling, **kwargs)
            if args.json:
                print_json(resp)
            else:
                print(resp.text, flush=True)
            if args.verbose:
                usage = resp.adapter if resp.HasField("adapter") else None
                line = _usage_line(usage, resp.prompt_tokens, resp.completion_tokens, resp.finish_reason)
                print(line, file=sys.stderr)
            return EXIT_OK
        usage, last = None, None
        for msg in client.generate_stream(prompt, adapter, sampling, **kwargs):
            if msg.HasField("adapter"):
                usage = msg.adapter
            last = msg
            if args.json:
                print_json(to_json(msg), indent=None)
            else:
                sys.stdout.write(msg.text)
                sys.stdout.flush()
        if not args.json:
            print(flush=True)
        if args.verbose and last is not None:
            line = _usage_line(usage, last.prompt_tokens, last.completion_tokens, last.finish_reason)
            print(line, file=sys.stderr)
    return EXIT_OK
