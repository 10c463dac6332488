"""The `corral` command: generate, chat and bench from the command line.

    corral generate "The file object"                 # the bundled demo model
    corral generate MODEL "Once upon a time" --max-tokens 64
    corral chat MODEL --system "You are terse."
    corral bench MODEL --input-len 128 --output-len 32 --batch-sizes 1 4 16
    corral perplexity MODEL held_out.txt
    corral serve MODEL --port 8000 --api-key KEY       # an OpenAI-compatible server (like vllm serve)

MODEL is a Hugging Face checkpoint folder; without it the bundled demo model runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import jinja2
import numpy as np

from corral import _core
from corral.llm import LLM, demo_model_path
from corral.multimodal import PLACEHOLDER
from corral.perplexity import perplexity
from corral.sampling_params import SamplingParams
from corral.tokenizer import has_tokenizer

DEFAULT_MAX_TOKENS = 256
DEMO_MODEL_NAME = "corral-demo"  # what `corral serve` calls the bundled demo model
_SAMPLING_FLAGS = (
    # (flag, SamplingParams field, type, help)
    ("--temperature", "temperature", float, "0: greedy (default: generation_config.json's, else 0)"),
    ("--top-p", "top_p", float, "nucleus sampling: keep the most likely tokens up to this probability"),
    ("--top-k", "top_k", int, "keep the k most likely tokens (0 or -1: all)"),
    ("--min-p", "min_p", float, "keep tokens at least this fraction as likely as the most likely"),
    ("--repetition-penalty", "repetition_penalty", float, "penalize tokens of the prompt and output (> 1)"),
    ("--presence-penalty", "presence_penalty", float, "subtract from tokens already in the output"),
    ("--frequency-penalty", "frequency_penalty", float, "subtract per occurrence in the output"),
    ("--max-tokens", "max_tokens", int, f"tokens to generate at most (default {DEFAULT_MAX_TOKENS})"),
    ("--min-tokens", "min_tokens", int, "tokens to generate before eos or a stop may end the answer"),
    ("--seed", "seed", int, "seed of the sampler (reproducible sampling)"),
)


class CliError(Exception):
    """An error to report in one line (exit status 1, or 2 for usage errors)."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def _size(text: str) -> int:
    """A byte count: 1073741824, 512M, 8G, 1.5GiB ..."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 8G, 512M, 1073741824)")
    return int(float(m.group(1)) * 1024 ** "_kmgt".index(m.group(2).lower() or "_"))


def _common_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument(
        "model",
        nargs="?",
        metavar="MODEL",
        help="Hugging Face checkpoint folder (config.json, safetensors weights, tokenizer.json); "
        "default: the bundled demo model",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or log messages")
    p.add_argument("-v", "--verbose", action="store_true", help="log what was loaded and which kernels run")
    e = p.add_argument_group("engine options")
    e.add_argument("--device", default="cpu", metavar="DEVICE",
                   help="cpu (default), cuda or cuda:N: where the model runs")
    e.add_argument("--tokenizer", metavar="DIR", help="tokenizer folder (default: MODEL)")
    e.add_argument("--kv-cache-dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16", "fp8"))
    e.add_argument("--quantization", default=None, choices=("int8", "int4"),
                   help="quantize 16/32-bit weights at load (quantized checkpoints load as published)")
    e.add_argument("--dtype", default="auto", choices=("auto", "float32"),
                   help="what products multiply bf16 weights with: bf16-rounded (auto) or float32 activations")
    e.add_argument("--kv-cache-bytes", type=_size, metavar="SIZE", help="KV cache memory, e.g. 8G")
    e.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block (default 16)")
    e.add_argument("--max-model-len", type=int, help="longest sequence, prompt plus output")
    e.add_argument("--max-num-seqs", type=int, default=256, help="sequences batched in one step")
    e.add_argument("--max-num-batched-tokens", type=int, default=8192, help="tokens in one step")
    e.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    e.add_argument("--no-prefix-caching", action="store_true", help="do not reuse the KV cache of earlier prompts")
    e.add_argument("--enforce-eager", action="store_true",
                   help="on a GPU, run decode steps kernel by kernel, not as CUDA graphs")
    e.add_argument("--max-images-per-prompt", type=int, metavar="N",
                   help="images one prompt may carry (default: any; 0: do not load the vision encoder)")
    return p


def _sampling_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    s = p.add_argument_group("sampling")
    for flag, _, kind, help in _SAMPLING_FLAGS:
        s.add_argument(flag, type=kind, help=help)
    s.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop before this text (repeatable)")
    s.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-turn tokens")
    s.add_argument(
        "--skip-special-tokens",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="leave special tokens out of the text (default: yes)",
    )
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="corral", description="Run Llama 4 models from their Hugging Face checkpoints."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common, sampling = _common_parser(), _sampling_parser()

    g = sub.add_parser(
        "generate",
        parents=[common, sampling],
        help="complete a prompt, streaming the text to stdout",
        description="Complete PROMPT, streaming the text to stdout as it is generated.",
    )
    g.add_argument("prompt", metavar="PROMPT", help="the text to complete ('-': read it from stdin)")
    g.add_argument("--chat", action="store_true", help="send PROMPT as a user message through the chat template")
    g.add_argument("--system", help="with --chat: a system message")
    g.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="an image file for the prompt (repeatable); PROMPT's <|image|> marks where each goes "
                   "(without one, the images come first)")
    g.set_defaults(func=_generate)

    c = sub.add_parser(
        "chat",
        parents=[common, sampling],
        help="talk with the model: user turns from stdin, answers streamed to stdout",
        description="Chat: reads user turns from stdin (one per line) until EOF or /exit and streams each answer. "
        "/reset clears the history; on a terminal, Ctrl-C cancels the answer being written.",
    )
    c.add_argument("--system", help="a system message opening the conversation")
    c.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="an image file sent with the first user turn (repeatable); '/image PATH' adds one to the next turn")
    c.set_defaults(func=_chat)

    b = sub.add_parser(
        "bench",
        parents=[common],
        help="prefill and decode throughput at several batch sizes",
        description="Measure prefill and decode tokens/s on random prompts at several batch sizes.",
    )
    b.add_argument("--input-len", type=int, default=128, help="prompt tokens (default 128)")
    b.add_argument("--output-len", type=int, default=32, help="generated tokens per request (default 32)")
    b.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16], metavar="N", help="default: 1 4 16")
    b.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    b.set_defaults(func=_bench)

    p = sub.add_parser(
        "perplexity",
        parents=[common],
        help="perplexity of a text file under the model",
        description="Perplexity of FILE (UTF-8 text) under the model: windows of --window tokens overlapping by "
        "one, every token after the first predicted once.",
    )
    p.add_argument("file", metavar="FILE", help="the text ('-': read it from stdin)")
    p.add_argument("--window", type=int, help="tokens per window (default: the model's max_model_len)")
    p.set_defaults(func=_perplexity)

    v = sub.add_parser(
        "serve",
        parents=[common],
        help="an OpenAI-compatible HTTP server (a drop-in for vllm serve)",
        description="Serve the model over HTTP with OpenAI's API: /v1/chat/completions, /v1/completions, "
        "/v1/models, /tokenize, /detokenize, /health, /metrics. SIGTERM or Ctrl-C drains: new requests get "
        "503, those in flight may finish for --shutdown-timeout seconds, then the rest are aborted.",
    )
    v.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    v.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    v.add_argument("--api-key", nargs="+", action="extend", metavar="KEY",
                   help="accept only requests bearing one of these keys (Authorization: Bearer KEY or "
                   "X-Api-Key: KEY); default: $CORRAL_API_KEY if set, else no key needed. /health stays open")
    v.add_argument("--served-model-name", nargs="+", metavar="NAME",
                   help="the model's names in the API (the first in replies); default: MODEL as given, "
                   f"or {DEMO_MODEL_NAME!r}")
    v.add_argument("--max-pending", type=int, default=1024, metavar="N",
                   help="requests in flight (running or queued) beyond which new ones get 429 (default 1024)")
    v.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="S",
                   help="on SIGTERM, seconds requests in flight may take to finish before they are aborted "
                   "(default 30)")
    v.add_argument("--chat-template", metavar="FILE", help="a Jinja chat template to use instead of the model's")
    v.add_argument("--allowed-local-media-path", metavar="DIR",
                   help="let clients send file:// image URLs of files below DIR (default: refused)")
    v.add_argument("--max-logprobs", type=int, default=20, metavar="N",
                   help="most top_logprobs (chat) or logprobs (completions) a request may ask for (default 20)")
    v.add_argument("--max-body-bytes", type=_size, default=32 << 20, metavar="SIZE",
                   help="largest request body, e.g. 32M (default); larger ones get 413")
    v.set_defaults(func=_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose and not args.quiet else logging.WARNING,
        format="corral: %(message)s",
        stream=sys.stderr,
    )
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader (`| head`) went away: stop quietly, and keep Python from complaining at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except CliError as e:
        return _fail(str(e), e.status)
    except (_core.CorralError, OSError, ValueError, NotImplementedError, jinja2.TemplateError) as e:
        return _fail(str(e))


def _fail(message: str, status: int = 1) -> int:
    print(f"corral: error: {' '.join(message.split())}", file=sys.stderr)
    return status


# Loading.


def _load(args, need_tokenizer: bool) -> LLM:
    model = demo_model_path() if args.model is None else Path(args.model)
    if not model.is_dir():
        raise CliError(f"model folder {model} does not exist")
    tokenizer_dir = Path(args.tokenizer) if args.tokenizer else model
    if need_tokenizer and not has_tokenizer(tokenizer_dir):
        raise CliError(f"{tokenizer_dir / 'tokenizer.json'} not found: {args.command} needs the model's tokenizer")
    options = dict(
        tokenizer=args.tokenizer,
        skip_tokenizer_init=not need_tokenizer,
        block_size=args.block_size,
        kv_cache_bytes=args.kv_cache_bytes,
        kv_cache_dtype=args.kv_cache_dtype,
        dtype=args.dtype,
        quantization=args.quantization,
        enable_prefix_caching=not args.no_prefix_caching,
        enforce_eager=args.enforce_eager,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        num_threads=args.threads,
        max_images_per_prompt=args.max_images_per_prompt,
        device=args.device,
    )
    show = not args.quiet and sys.stderr.isatty()
    if not show:
        return LLM(model, **options)
    from tqdm import tqdm

    files = _weight_files(model)
    total = sum(f.stat().st_size for f in files)
    with tqdm(
        total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"loading {model.name} ({weights_format(model, args.quantization)})", file=sys.stderr
    ) as bar:
        # The engine memory-maps the weights, which are read on first use: read them now (into
        # the page cache) so the bar shows the loading, unless they would crowd out memory.
        if total < _available_memory() // 2:
            for f in files:
                with open(f, "rb", buffering=0) as fh:
                    while chunk := fh.read(64 << 20):
                        bar.update(len(chunk))
        llm = LLM(model, **options)
        bar.update(total - bar.n)
    return llm


def weights_format(model: Path, quantization: str | None) -> str:
    """What the weights are, for the load progress bar: the checkpoint's quantization method and
    scheme, or its dtype and the quantization at load."""
    try:
        cfg = json.loads((model / "config.json").read_text())
    except (OSError, ValueError):
        return "?"  # the engine reports what is wrong with it
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}
    qc = cfg.get("quantization_config") or text.get("quantization_config")
    if isinstance(qc, dict):
        schemes = []
        for group in (qc.get("config_groups") or {}).values():
            w = (group or {}).get("weights") or {}
            kind = "fp8" if w.get("type") == "float" else f"int{w.get('num_bits')}"
            schemes.append(f"{kind} {w.get('strategy')}" + (f" {w['group_size']}" if w.get("group_size") else ""))
        return " ".join([str(qc.get("quant_method")), *schemes])
    dtype = cfg.get("torch_dtype") or cfg.get("dtype") or text.get("torch_dtype") or text.get("dtype") or "?"
    return f"{dtype} -> {quantization} at load" if quantization else str(dtype)


def _weight_files(model: Path) -> list[Path]:
    index = model / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, AttributeError):
            return []  # the engine reports what is wrong with it
        return [model / n for n in names if (model / n).is_file()]
    single = model / "model.safetensors"
    return [single] if single.is_file() else []


def _available_memory() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def _sampling_params(args, llm: LLM) -> SamplingParams:
    defaults = llm.get_default_sampling_params()
    overrides = {name: getattr(args, name) for _, name, _, _ in _SAMPLING_FLAGS if getattr(args, name) is not None}
    if "max_tokens" not in overrides and "max_new_tokens" not in llm.generation_config:
        overrides["max_tokens"] = DEFAULT_MAX_TOKENS
    overrides.update(stop=args.stop, ignore_eos=args.ignore_eos, skip_special_tokens=args.skip_special_tokens)
    return dataclasses.replace(defaults, **overrides)


# Commands.


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _generate(args) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if args.system and not args.chat:
        raise CliError("--system needs --chat", status=2)
    llm = _load(args, need_tokenizer=True)
    params = _sampling_params(args, llm)
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": _user_content(prompt, args.image)}
        ]
        deltas = llm.stream_chat(messages, params)
    elif args.image:
        if PLACEHOLDER not in prompt:
            prompt = PLACEHOLDER * len(args.image) + prompt
        deltas = llm.stream({"prompt": prompt, "multi_modal_data": {"image": args.image}}, params)
    else:
        deltas = llm.stream(prompt, params)
    for delta in deltas:
        _write(delta)
    _write("\n")
    return 0


def _user_content(text: str, images: list[str]) -> str | list[dict]:
    """A user turn's content: the text, after image parts for the image files if any."""
    if not images:
        return text
    return [{"type": "image_url", "image_url": {"url": Path(i).resolve().as_uri()}} for i in images] + [
        {"type": "text", "text": text}
    ]


def _chat(args) -> int:
    llm = _load(args, need_tokenizer=True)
    params = _sampling_params(args, llm)
    opening = [{"role": "system", "content": args.system}] if args.system else []
    history = list(opening)
    images = list(args.image)  # for the next user turn
    interactive = sys.stdin.isatty()
    while True:
        try:
            line = input("> ") if interactive else sys.stdin.readline()
        except EOFError:
            line = ""
        if not line:  # EOF
            if interactive:
                _write("\n")
            return 0
        text = line.rstrip("\r\n")
        command = text.strip()
        if command in ("/exit", "/quit"):
            return 0
        if command == "/reset":
            history = list(opening)
            images = []
            continue
        if command.startswith("/image "):
            path = command[len("/image "):].strip()
            if not Path(path).is_file():
                _write(f"no such file: {path}\n")
            else:
                images.append(path)
            continue
        if not command:
            continue
        history.append({"role": "user", "content": _user_content(text, images)})
        images = []
        answer = []
        try:
            for delta in llm.stream_chat(history, params):
                answer.append(delta)
                _write(delta)
        except KeyboardInterrupt:
            if not interactive:
                raise
            history.pop()  # Ctrl-C cancels this answer (and its question, images too), not the chat
            _write("\n")
            continue
        except _core.InvalidInputError as e:  # e.g. an unreadable image: this turn fails, not the chat
            history.pop()
            _write(f"error: {e}\n")
            continue
        _write("\n")
        history.append({"role": "assistant", "content": "".join(answer)})


def _bench(args) -> int:
    if args.input_len < 1 or args.output_len < 1 or min(args.batch_sizes) < 1:
        raise CliError("--input-len, --output-len and --batch-sizes must be >= 1", status=2)
    llm = _load(args, need_tokenizer=False)
    engine = llm._engine
    vocab = llm.config["vocab_size"]
    params = SamplingParams(max_tokens=args.output_len, ignore_eos=True)._to_core()
    rng = np.random.default_rng(args.seed)
    _run_batch(engine, rng.integers(0, vocab, size=(1, min(args.input_len, 16))).tolist(), params)  # warm up
    rows = []
    for batch in args.batch_sizes:
        prompts = rng.integers(0, vocab, size=(batch, args.input_len)).tolist()
        prefill_s, decode_s = _run_batch(engine, prompts, params)
        decode_tokens = batch * (args.output_len - 1)
        rows.append(
            (
                batch,
                prefill_s,
                batch * args.input_len / prefill_s,
                decode_s,
                decode_tokens / decode_s if decode_tokens else float("nan"),
            )
        )
    print(
        f"model {llm.model_path}: {args.input_len} prompt tokens, {args.output_len} output tokens per request, "
        f"{_core.num_threads()} threads, CPU kernels {_core.ops.cpu_isa()}"
    )
    print(f"{'batch':>5}  {'prefill s':>10}  {'prefill tok/s':>13}  {'decode s':>10}  {'decode tok/s':>12}")
    for batch, ps, ptps, ds, dtps in rows:
        print(f"{batch:>5}  {ps:>10.4f}  {ptps:>13.1f}  {ds:>10.4f}  {dtps:>12.1f}")
    return 0


def _perplexity(args) -> int:
    if args.file == "-":
        text = sys.stdin.read()
    else:
        try:
            text = Path(args.file).read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise CliError(f"{args.file} is not UTF-8 text: {e}") from None
    if args.window is not None and args.window < 2:
        raise CliError("--window must be >= 2", status=2)
    llm = _load(args, need_tokenizer=True)
    result = perplexity(llm, text, args.window)
    print(
        f"perplexity {result.perplexity:.4f} over {result.tokens} tokens "
        f"({result.mean_nll:.4f} nats/token; a uniform model: {llm.config['vocab_size']})"
    )
    return 0


def _serve(args) -> int:
    import asyncio

    # The server's modules (fastapi, uvicorn) load only for this command.
    from corral.server.serve import serve
    from corral.server.state import ServerConfig

    for name, low in (("max_pending", 1), ("max_logprobs", 0), ("shutdown_timeout", 0), ("port", 0)):
        if getattr(args, name) < low:
            raise CliError(f"--{name.replace('_', '-')} must be >= {low}", status=2)
    template = None
    if args.chat_template:
        try:
            template = Path(args.chat_template).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise CliError(f"--chat-template: cannot read {args.chat_template}: {e}") from None
    api_keys = args.api_key or ([os.environ["CORRAL_API_KEY"]] if os.environ.get("CORRAL_API_KEY") else [])
    llm = _load(args, need_tokenizer=True)
    config = ServerConfig(
        served_model_names=args.served_model_name or [args.model or DEMO_MODEL_NAME],
        api_keys=api_keys,
        max_pending=args.max_pending,
        max_logprobs=args.max_logprobs,
        max_num_seqs=args.max_num_seqs,
        max_body_bytes=args.max_body_bytes,
        chat_template=template,
        allowed_local_media_path=args.allowed_local_media_path,
    )
    log_level = "warning" if args.quiet else "debug" if args.verbose else "info"
    logging.getLogger("corral.server").setLevel(log_level.upper())  # the drain's messages, like uvicorn's
    asyncio.run(serve(llm, config, args.host, args.port, args.shutdown_timeout, log_level))
    return 0


def _run_batch(engine, prompts: list[list[int]], params) -> tuple[float, float]:
    """Runs the prompts as one batch: (seconds until every request has its first token,
    seconds for the rest). Prefill is the first phase, decode the second."""
    pending = set()
    start = time.perf_counter()
    for p in prompts:
        pending.add(engine.add_request(p, params))
    try:
        waiting_first = set(pending)
        while waiting_first:
            for u in engine.step():
                if u.new_token_ids:
                    waiting_first.discard(u.request_id)
                if u.finished:
                    pending.discard(u.request_id)
        prefilled = time.perf_counter()
        while pending:
            for u in engine.step():
                if u.finished:
                    pending.discard(u.request_id)
        end = time.perf_counter()
    finally:
        for rid in pending:
            engine.abort(rid)
    return prefilled - start, end - prefilled


if __name__ == "__main__":
    sys.exit(main())
