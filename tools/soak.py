"""Soak test: many random request lifecycles through one LLM from several threads at once.

Each lifecycle is a generate() call (1-3 prompts, n up to 3) or a stream() closed after a random
number of deltas (an abort mid-generation), with random lengths, shared prefixes (prefix-cache
hits) and random sampling parameters, always seeded so that a request's tokens do not depend on
what else runs. The KV budget is small, so requests are preempted and recomputed. At the end:
  - no KV block is leaked (every block free or evictable, no request left);
  - a sample of completed requests, run again alone, give the same tokens;
  - resident memory grew less than --max-rss-growth after the warm-up (the first tenth).
Prints the figures; exits 1 when a check fails.

    python tools/soak.py [--lifecycles 10000] [--threads 4] [--model PATH] [--seed 0]
"""

from __future__ import annotations

import argparse
import random
import sys
import threading
import time

import corral


def read_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


class Soak:
    def __init__(self, llm: corral.LLM, args: argparse.Namespace) -> None:
        self.llm, self.args = llm, args
        vocab = llm.config["vocab_size"]
        rng = random.Random(args.seed)
        self.prefixes = [[rng.randrange(3, vocab) for _ in range(rng.randrange(8, 80))] for _ in range(6)]
        self.vocab = vocab
        self.lock = threading.Lock()
        self.started = 0
        self.done = 0
        self.aborted = 0
        self.tokens = 0
        self.samples: list[tuple[list[int], corral.SamplingParams, list[list[int]]]] = []
        self.errors: list[str] = []
        self.warm_rss = 0
        self.warm_event = threading.Event()

    def random_request(self, rng: random.Random) -> tuple[list[int], corral.SamplingParams]:
        prefix = rng.choice(self.prefixes) if rng.random() < 0.6 else []
        prompt = [1] + prefix + [rng.randrange(3, self.vocab) for _ in range(rng.randrange(1, 60))]
        greedy = rng.random() < 0.4
        params = corral.SamplingParams(
            n=1 if greedy else rng.choice([1, 1, 2, 3]),
            temperature=0.0 if greedy else rng.uniform(0.3, 1.5),
            top_k=rng.choice([0, 0, 5, 50]),
            top_p=rng.choice([1.0, 0.9, 0.5]),
            min_p=rng.choice([0.0, 0.0, 0.05]),
            repetition_penalty=rng.choice([1.0, 1.0, 1.2]),
            presence_penalty=rng.choice([0.0, 0.5]),
            frequency_penalty=rng.choice([0.0, 0.3]),
            max_tokens=rng.randrange(1, 40),
            seed=rng.randrange(2**31),
            logprobs=rng.choice([None, None, 0, 3]),
            stop_token_ids=rng.sample(range(3, self.vocab), rng.choice([0, 0, 2])),
            detokenize=False,
        )
        params.min_tokens = rng.randrange(0, params.max_tokens + 1) if rng.random() < 0.2 else 0
        return prompt, params

    def take(self) -> int | None:
        with self.lock:
            if self.started >= self.args.lifecycles:
                return None
            self.started += 1
            return self.started

    def finish(self, outputs: list | None, aborted: bool) -> None:
        with self.lock:
            self.done += 1
            self.aborted += aborted
            if outputs:
                self.tokens += sum(len(o.token_ids) for r in outputs for o in r.outputs)
            if self.done == max(1, self.args.lifecycles // 10):
                self.warm_rss = read_rss()
                self.warm_event.set()

    def worker(self, index: int) -> None:
        rng = random.Random(self.args.seed * 1000 + index)
        try:
            while (number := self.take()) is not None:
                if self.llm.tokenizer is not None and rng.random() < 0.25:
                    prompt, params = self.random_request(rng)
                    params.n, params.detokenize = 1, True
                    stream = self.llm.stream(prompt, params)
                    for _ in zip(range(rng.randrange(0, 8)), stream):
                        pass
                    stream.close()  # aborts the request if it is still running
                    self.finish(None, True)
                    continue
                requests = [self.random_request(rng) for _ in range(rng.choice([1, 1, 2, 3]))]
                outputs = self.llm.generate([p for p, _ in requests], [q for _, q in requests])
                self.finish(outputs, False)
                if number % self.args.check_every == 0:
                    with self.lock:
                        self.samples.append((requests[0][0], requests[0][1], [o.token_ids for o in outputs[0].outputs]))
        except Exception as e:  # noqa: BLE001 - every failure is reported
            self.errors.append(f"thread {index}: {type(e).__name__}: {e}")

    def run(self) -> int:
        llm, args = self.llm, self.args
        t0 = time.perf_counter()
        threads = [threading.Thread(target=self.worker, args=(i,), daemon=True) for i in range(args.threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.perf_counter() - t0
        end_rss = read_rss()
        stats = llm.stats()

        failures = list(self.errors)
        leaked = stats["kv_blocks_total"] - stats["kv_blocks_free"]
        if leaked or stats["requests_running"] or stats["requests_waiting"]:
            failures.append(
                f"leak: {leaked} KV blocks held, {stats['requests_running']} running, "
                f"{stats['requests_waiting']} waiting after every call returned"
            )
        mismatches = 0
        for prompt, params, want in self.samples:
            got = [o.token_ids for o in llm.generate([prompt], params)[0].outputs]
            mismatches += got != want
        if mismatches:
            failures.append(f"{mismatches} of {len(self.samples)} sampled requests differ from their solo runs")
        growth = (end_rss - self.warm_rss) / self.warm_rss if self.warm_rss else 0.0
        if growth > args.max_rss_growth:
            failures.append(f"resident memory grew {growth:.1%} after warm-up (limit {args.max_rss_growth:.0%})")

        print(
            f"soak: {self.done} lifecycles ({self.aborted} aborted streams) from {args.threads} threads in "
            f"{seconds:.1f} s, {self.tokens} tokens generated; preemptions {stats['preemptions']}, "
            f"prefix-cache hit tokens {stats['prefix_cache_hit_tokens']}; KV blocks {stats['kv_blocks_free']}/"
            f"{stats['kv_blocks_total']} free at the end; {len(self.samples)} requests rerun alone, "
            f"{mismatches} differ; RSS {self.warm_rss / 2**20:.1f} MiB after warm-up, {end_rss / 2**20:.1f} MiB "
            f"at the end ({growth:+.2%})"
        )
        for f in failures:
            print("FAIL:", f)
        return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lifecycles", type=int, default=10_000)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--model", default=None, help="model folder (default: the bundled demo model)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kv-blocks", type=int, default=48, help="KV budget in blocks: small, to force preemption")
    ap.add_argument("--check-every", type=int, default=50, help="rerun every Nth generate() request alone")
    ap.add_argument("--max-rss-growth", type=float, default=0.05)
    args = ap.parse_args(argv)
    probe = corral.LLM(args.model, kv_cache_bytes=1 << 20, num_threads=2)
    block_bytes = probe.stats()["kv_block_bytes"]
    del probe
    llm = corral.LLM(args.model, kv_cache_bytes=args.kv_blocks * block_bytes, num_threads=2, max_num_seqs=16)
    return Soak(llm, args).run()


if __name__ == "__main__":
    sys.exit(main())
