"""Runs the example service (examples/cpp/service.cpp) on a set of concurrent requests and checks
that every sample's tokens and finish reason equal those of Corral's Python API for the same
request: greedy and seeded sampling, n > 1, penalties, the model's own sampling defaults, a
request refused by the engine, and an abort.

    python examples/cpp/compare_with_python.py --service build/corral_service [--model DIR]

Exits 1 on any difference. The model defaults to the bundled demo model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys

import numpy as np

import corral


def requests(vocab: int) -> list[dict]:
    rng = np.random.default_rng(0)

    def prompt(n: int) -> list[int]:
        return [1, *rng.integers(3, vocab, size=n - 1).tolist()]

    reqs = [
        {"id": "greedy-short", "prompt_token_ids": prompt(3), "max_tokens": 12, "temperature": 0},
        {"id": "greedy-long", "prompt_token_ids": prompt(150), "max_tokens": 40, "temperature": 0},
        {"id": "greedy-to-eos", "prompt_token_ids": [1], "max_tokens": 200, "temperature": 0},
        {"id": "sampled", "prompt_token_ids": prompt(20), "max_tokens": 16, "n": 3, "temperature": 0.9,
         "top_k": 40, "top_p": 0.95, "seed": 11},
        {"id": "penalties", "prompt_token_ids": prompt(30), "max_tokens": 24, "temperature": 0.7, "seed": 5,
         "repetition_penalty": 1.3, "presence_penalty": 0.5, "frequency_penalty": 0.2, "min_tokens": 4},
        {"id": "stop-ids", "prompt_token_ids": prompt(8), "max_tokens": 30, "temperature": 1.0, "seed": 2,
         "stop_token_ids": [int(t) for t in rng.integers(3, vocab, size=40)], "ignore_eos": True},
        # No sampling fields but a seed: the model's generation_config.json defaults.
        {"id": "defaults", "prompt_token_ids": prompt(12), "seed": 9},
    ]
    return reqs


def python_params(llm: corral.LLM, r: dict) -> corral.SamplingParams:
    fields = {k: v for k, v in r.items() if k not in ("id", "prompt_token_ids")}
    return dataclasses.replace(llm.get_default_sampling_params(), **fields)


def run_service(service: str, model: str, lines: list[dict], threads: int) -> list[dict]:
    text = "".join(json.dumps(line) + "\n" for line in lines)
    p = subprocess.run([service, model, "--threads", str(threads)], input=text, capture_output=True, text=True,
                       timeout=900)
    if p.returncode != 0:
        sys.exit(f"{service} exited with {p.returncode}:\n{p.stderr[-3000:]}")
    return [json.loads(line) for line in p.stdout.splitlines()]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--service", required=True, help="the built corral_service")
    ap.add_argument("--model", default=str(corral.demo_model_path()))
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()

    llm = corral.LLM(a.model, num_threads=a.threads)
    reqs = requests(llm.config["vocab_size"])
    refused = {"id": "refused", "prompt_token_ids": [1, llm.config["vocab_size"]], "max_tokens": 4}
    # Long enough that the abort line (read right after it) arrives while it runs.
    aborted = {"id": "aborted", "prompt_token_ids": [1, 2000, 3000], "max_tokens": 1000, "ignore_eos": True}
    lines = run_service(a.service, a.model, [*reqs, refused, aborted, {"id": "aborted", "abort": True}], a.threads)

    got: dict[tuple[str, int], list[int]] = {}
    finish: dict[tuple[str, int], str] = {}
    errors: dict[str, str] = {}
    for line in lines:
        if "index" not in line:
            errors[line["id"]] = line["error"]
        elif "token" in line:
            got.setdefault((line["id"], line["index"]), []).append(line["token"])
        else:
            finish[(line["id"], line["index"])] = line["finish_reason"]

    expected = llm.generate([r["prompt_token_ids"] for r in reqs], [python_params(llm, r) for r in reqs])
    failures = []
    for r, out in zip(reqs, expected, strict=True):
        for c in out.outputs:
            key = (r["id"], c.index)
            if got.get(key, []) != c.token_ids or finish.get(key) != c.finish_reason:
                failures.append(f"{key}: service {got.get(key)} ({finish.get(key)}), "
                                f"Python {c.token_ids} ({c.finish_reason})")
            else:
                print(f"{key}: {len(c.token_ids)} tokens equal, finish {c.finish_reason}")
    if "outside the vocabulary" not in errors.get("refused", ""):
        failures.append(f"the out-of-vocabulary prompt was not refused: {errors.get('refused')}")
    if finish.get(("aborted", 0)) != "abort" or len(got.get(("aborted", 0), [])) >= 1000:
        failures.append(f"the aborted request ended with {finish.get(('aborted', 0))}")
    if failures:
        print("MISMATCH\n" + "\n".join(failures))
        return 1
    print(f"compare-with-python: {sum(len(r.outputs) for r in expected)} samples equal; refusal and abort ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
