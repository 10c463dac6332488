"""What serving over HTTP costs: the same batch generated offline (LLM.generate) and by
`corral serve` for as many concurrent streaming clients, side by side in one run, on the bundled
demo model (tiny: the server's per-token work weighs most there) and on a synthetic Llama 4 MoE
(Scout's layout scaled down, as in bench/decode.py, with the demo model's tokenizer).

    python bench/serve.py [--clients 16] [--max-tokens 64] [--threads 2] [--models demo synthetic]

The clients run in this process (httpx, SSE parsed per chunk) on the same cores as the server, as
a load generator on the serving machine would: their share of the CPU counts against the server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from common import synthetic_llama4  # noqa: E402

import corral  # noqa: E402

SYNTHETIC = dict(vocab=32768, hidden=1024, layers=8, heads=8, kv_heads=2, head_dim=128, experts=16, inter=1024)


def prompts_for(tokenizer, clients: int) -> list[list[int]]:
    texts = [f"Question {i}: what does the file object do when it is closed twice?" for i in range(clients)]
    return [tokenizer.encode(t) for t in texts]


def offline(path: str, prompts, max_tokens: int, threads: int) -> dict:
    llm = corral.LLM(path, num_threads=threads, tokenizer=corral.demo_model_path())
    params = corral.SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    llm.generate(prompts[:2], corral.SamplingParams(max_tokens=4))  # warm up
    t0 = time.perf_counter()
    out = llm.generate(prompts, params)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "tokens": sum(len(o.outputs[0].token_ids) for o in out),
            "texts": [o.outputs[0].text for o in out]}


async def stream_one(client: httpx.AsyncClient, prompt: list[int], max_tokens: int) -> dict:
    body = {"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0, "stream": True}
    t0 = time.perf_counter()
    arrivals, text = [], []
    async with client.stream("POST", "/v1/completions", json=body) as reply:
        reply.raise_for_status()
        async for line in reply.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["text"]:
                arrivals.append(time.perf_counter())
                text.append(chunk["choices"][0]["text"])
    return {"ttft": arrivals[0] - t0, "itl": [b - a for a, b in zip(arrivals, arrivals[1:])], "text": "".join(text)}


def served(path: str, prompts, max_tokens: int, threads: int) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "corral", "serve", path, "--tokenizer", str(corral.demo_model_path()),
           "--port", str(port), "--threads", str(threads), "--quiet"]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(1200):
            try:
                if httpx.get(base + "/health").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        else:
            raise RuntimeError("the server did not start")

        async def run() -> tuple[float, list[dict]]:
            limits = httpx.Limits(max_connections=len(prompts) + 1)
            async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as client:
                await stream_one(client, prompts[0][:8], 4)  # warm up
                t0 = time.perf_counter()
                results = await asyncio.gather(*[stream_one(client, p, max_tokens) for p in prompts])
                return time.perf_counter() - t0, results

        seconds, results = asyncio.run(run())
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    itl = [x for r in results for x in r["itl"]]
    return {"seconds": seconds, "tokens": len(prompts) * max_tokens, "texts": [r["text"] for r in results],
            "ttft_p50": statistics.median(r["ttft"] for r in results), "itl_p50": statistics.median(itl)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--models", nargs="+", default=["demo", "synthetic"], choices=["demo", "synthetic"])
    args = ap.parse_args()
    tokenizer = corral.Tokenizer(corral.demo_model_path())
    prompts = prompts_for(tokenizer, args.clients)
    print(f"{args.clients} clients x {args.max_tokens} tokens, greedy, {args.threads} threads")
    print(f"{'model':<10} {'offline tok/s':>14} {'served tok/s':>13} {'ratio':>6} {'TTFT p50':>9} {'ITL p50':>8}  same text")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            path = str(corral.demo_model_path())
            if name == "synthetic":
                path = os.path.join(tmp, "synthetic")
                synthetic_llama4(Path(path), **SYNTHETIC)
            off = offline(path, prompts, args.max_tokens, args.threads)
            srv = served(path, prompts, args.max_tokens, args.threads)
            a, b = off["tokens"] / off["seconds"], srv["tokens"] / srv["seconds"]
            print(f"{name:<10} {a:14.1f} {b:13.1f} {b / a:6.2f} {srv['ttft_p50'] * 1e3:7.0f}ms "
                  f"{srv['itl_p50'] * 1e3:6.1f}ms  {off['texts'] == srv['texts']}")


if __name__ == "__main__":
    main()
