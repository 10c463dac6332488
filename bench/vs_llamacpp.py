"""Corral against llama.cpp on the CPU, side by side, on a synthetic Llama 4 (random bf16 weights).

First run only (into --cache, outside the repository; about 15 minutes on 2 cores): downloads the
llama-cpp-python sdist from PyPI and builds the llama.cpp it vendors (llama-bench, native CPU
flags), copies its HF -> GGUF converter (patched to accept our tokenizer's pre-tokenizer, which it
does not know by hash) and builds bench/read_bandwidth.c. Every run: writes the seeded checkpoint
of --preset (numpy weights, a BPE tokenizer trained on the Python standard library), converts it
to GGUF, then runs --rounds rounds; each measures decode, prefill and decode after a long context
on llama-bench and on Corral (a fresh process, public API only) back to back, with the machine's
read bandwidth read before and after the decode pair. Both run the same prompt and generation
lengths and thread count. Prints a table and the last line

    vs-llamacpp: decode_ratio=R prefill_ratio=R decode_depth4096_ratio=R decode_roofline_fraction=F

(medians over rounds of each engine's best of --reps repetitions, as the bandwidth probe takes
the best of its passes: on a shared machine noise only ever slows a run down; the roofline is the
bytes of weights one decoded token reads divided by the read bandwidth measured around the decode
pair).

    python bench/vs_llamacpp.py --rounds 3 [--preset bench] [--threads 2]

Needs the test extras (torch and transformers: the converter imports them): pip install ".[test]".
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tarfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tools"))
from common import llama4_tensors, write_safetensors  # noqa: E402

LLAMA_CPP_PYTHON = "0.3.36"  # the sdist whose vendored llama.cpp is built

# Llama 4 shapes, CPU-sized. llama.cpp's llama4 loader hard-codes chunk 8192, floor_scale 8192 and
# attn_scale 0.1 whatever the config says, and enables QK norm for every expert count but 128: the
# presets use those values so that both run the same model.
PRESETS = {
    # 1.07B parameters, 569.5 MB read per decoded token: the shape of the issue's measurement.
    "bench": dict(hidden=1024, layers=16, heads=16, kv_heads=8, head_dim=64, experts=16, top_k=1, moe_step=2,
                  inter=2048, inter_mlp=4096, vocab=32000, qk_norm=True),
    # Scout's pattern (MoE on every layer, GQA 5, head_dim 128), narrower.
    "scout": dict(hidden=1280, layers=12, heads=10, kv_heads=2, head_dim=128, experts=16, top_k=1, moe_step=1,
                  inter=1024, inter_mlp=2048, vocab=32000, qk_norm=True),
    # Maverick's pattern (128 experts on every other layer, dense MLPs between, no QK norm), narrower.
    "maverick": dict(hidden=1024, layers=12, heads=8, kv_heads=2, head_dim=128, experts=128, top_k=1, moe_step=2,
                     inter=512, inter_mlp=4096, vocab=32000, qk_norm=False),
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(cmd, **kw) -> str:
    p = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return p.stdout


# ---- the tools, built once ----------------------------------------------------------------------


def build_tools(cache: Path) -> dict:
    cache.mkdir(parents=True, exist_ok=True)
    bench = cache / "llama-build" / "bin" / "llama-bench"
    convert = cache / "llama-convert" / "convert_hf_to_gguf.py"
    source = (HERE / "read_bandwidth.c").read_bytes()
    probe = cache / f"read_bandwidth-{hashlib.sha256(source).hexdigest()[:12]}"  # rebuilt when it changes
    if not bench.exists() or not convert.exists():
        sdist = cache / "sdist"
        name = f"llama_cpp_python-{LLAMA_CPP_PYTHON}"
        if not (sdist / f"{name}.tar.gz").exists():
            log(f"downloading llama-cpp-python {LLAMA_CPP_PYTHON} (sdist) from PyPI")
            run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                 f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", str(sdist)])
        with tarfile.open(sdist / f"{name}.tar.gz") as t:
            t.extractall(sdist, filter="data")
        src = sdist / name / "vendor" / "llama.cpp"
        log("building llama-bench (about 15 minutes on 2 cores)")
        run(["cmake", "-S", str(src), "-B", str(cache / "llama-build"), "-DCMAKE_BUILD_TYPE=Release",
             "-DGGML_NATIVE=ON", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
             "-DLLAMA_OPENSSL=OFF", "-DLLAMA_CURL=OFF", "-DBUILD_SHARED_LIBS=OFF"])
        run(["cmake", "--build", str(cache / "llama-build"), "-j", str(os.cpu_count() or 2), "--target", "llama-bench"])
        shutil.rmtree(cache / "llama-convert", ignore_errors=True)
        (cache / "llama-convert").mkdir()
        for part in ("convert_hf_to_gguf.py", "conversion", "gguf-py"):
            p = src / part
            if p.is_dir():
                shutil.copytree(p, cache / "llama-convert" / part)
            elif p.exists():
                shutil.copy(p, cache / "llama-convert" / part)
        patch_converter(cache / "llama-convert")
    if not probe.exists():
        run(["cc", "-O3", "-march=native", "-fopenmp", str(HERE / "read_bandwidth.c"), "-o", str(probe)])
    return dict(bench=bench, convert=convert, probe=probe)


def patch_converter(folder: Path) -> None:
    """The converter refuses a BPE tokenizer whose pre-tokenizer hash it does not know (any freshly
    trained one): name it "llama4" instead (the same split regex as ours)."""
    needle = "        if res is None:\n            logger.warning(\"\\n\")\n"
    for path in [folder / "conversion" / "base.py", folder / "convert_hf_to_gguf.py"]:
        if path.exists() and "def get_vocab_base_pre" in path.read_text():
            text = path.read_text()
            assert text.count(needle) == 1, f"{path}: the pre-tokenizer check moved"
            path.write_text(text.replace(needle, "        if res is None:\n            res = \"llama4\"\n" + needle, 1))
            return
    raise RuntimeError("llama.cpp's converter: get_vocab_base_pre not found")


# ---- the model ----------------------------------------------------------------------------------


def stdlib_texts(max_chars: int) -> list[str]:
    texts, total = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        if "site-packages" in path.parts or "test" in path.parts:
            continue
        try:
            texts.append(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
        total += len(texts[-1])
        if total >= max_chars:
            break
    return texts


def write_model(path: Path, p: dict, seed: int = 0) -> dict:
    """A seeded random Llama 4 (bf16) with its tokenizer; returns its bytes read per decoded token."""
    from transformers import Llama4TextConfig

    import llama4_tokenizer

    path.mkdir(parents=True, exist_ok=True)
    H, L, V, E, I, D = p["hidden"], p["layers"], p["vocab"], p["experts"], p["inter"], p["inter_mlp"]
    nh, nkv, hd = p["heads"], p["kv_heads"], p["head_dim"]
    moe_layers = list(range(p["moe_step"] - 1, L, p["moe_step"]))
    cfg = Llama4TextConfig(
        hidden_size=H, num_hidden_layers=L, num_attention_heads=nh, num_key_value_heads=nkv, head_dim=hd,
        num_local_experts=E, num_experts_per_tok=p["top_k"], interleave_moe_layer_step=p["moe_step"],
        intermediate_size=I, intermediate_size_mlp=D, vocab_size=V, attention_chunk_size=8192, floor_scale=8192,
        attn_scale=0.1, attn_temperature_tuning=True, no_rope_layer_interval=4, use_qk_norm=p["qk_norm"],
        max_position_embeddings=131072, rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    cfg.architectures = ["Llama4ForCausalLM"]
    cfg.dtype = "bfloat16"
    assert list(cfg.moe_layers) == moe_layers, (cfg.moe_layers, moe_layers)
    cfg.save_pretrained(path)
    if not (path / "tokenizer.json").exists():
        llama4_tokenizer.save(llama4_tokenizer.train_bpe(stdlib_texts(24_000_000), V), path)

    t, decode_bytes = llama4_tensors(vocab=V, hidden=H, layers=L, heads=nh, kv_heads=nkv, head_dim=hd, experts=E,
                                     inter=I, inter_mlp=D, moe_layers=moe_layers, top_k=p["top_k"], seed=seed)
    write_safetensors(path / "model.safetensors", t)
    info = dict(params=int(sum(a.size for a in t.values())), decode_bytes=decode_bytes)
    (path / "bench_info.json").write_text(json.dumps(info))
    return info


# ---- the measurements ---------------------------------------------------------------------------


def bandwidth(probe: Path, threads: int) -> float:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OMP_PROC_BIND="spread")
    return float(run([str(probe), "1024", "10"], env=env)) * 1e9


METRICS = ("decode", "prefill", "decode_deep")


def llama_bench(tools: dict, gguf: Path, a, metric: str) -> float:
    """pp{prompt}, tg{gen}, or tg{gen} after a {depth}-token context: tokens/s, the best of --reps."""
    args = {"prefill": ["-p", str(a.prompt), "-n", "0"], "decode": ["-p", "0", "-n", str(a.gen)],
            "decode_deep": ["-p", "0", "-n", str(a.gen), "-d", str(a.depth)]}[metric]
    rows = json.loads(run([str(tools["bench"]), "-m", str(gguf), "-t", str(a.threads), "-r", str(a.reps),
                           "-o", "json", *args]))
    return max(float(t) for t in rows[0]["samples_ts"])


def corral_worker(a) -> None:
    """One Corral measurement in this process, as llama-bench measures it: prefill = a prompt of
    --prompt tokens to its first token; decode = --gen tokens after a 1-token prompt (decode_deep:
    after a --depth-token one, its K/V already cached, as llama-bench fills the context before it
    times): (gen - 1) / (time of all - time to the first token). The best of --reps."""
    import corral

    deep = a.metric == "decode_deep"
    llm = corral.LLM(a.model, num_threads=a.threads, enable_prefix_caching=deep,
                     max_num_batched_tokens=max(a.prompt, a.depth))
    rng = np.random.default_rng(0)
    context = rng.integers(100, 30000, size=a.depth).tolist()

    def timed(n_prompt, n_gen):
        prompt = context if deep else rng.integers(100, 30000, size=n_prompt).tolist()
        sp = corral.SamplingParams(temperature=0.0, max_tokens=n_gen, ignore_eos=True)
        t = time.perf_counter()
        out = llm.generate([prompt], sp)
        assert len(out[0].outputs[0].token_ids) == n_gen
        return time.perf_counter() - t

    timed(a.prompt, 4)  # warm-up (decode_deep: fills the cache with the context)
    if a.metric == "prefill":
        rates = [a.prompt / timed(a.prompt, 1) for _ in range(a.reps)]
    else:
        n = a.depth if a.metric == "decode_deep" else 1
        rates = []
        for _ in range(a.reps):
            first = timed(n, 1)
            rates.append((a.gen - 1) / (timed(n, a.gen) - first))
    print(json.dumps(max(rates)))


def corral(a, metric: str) -> float:
    cmd = [sys.executable, __file__, "--worker", "--metric", metric, "--model", str(a.model), "--threads",
           str(a.threads), "--prompt", str(a.prompt), "--gen", str(a.gen), "--depth", str(a.depth), "--reps",
           str(a.reps)]
    return float(run(cmd, cwd="/tmp").strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="bench")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--depth", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=5, help="repetitions per measurement (the best counts)")
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                    / "corral-bench")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--metric", choices=METRICS, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return corral_worker(a)

    tools = build_tools(a.cache)
    a.model = a.cache / "models" / a.preset
    info_path = a.model / "bench_info.json"
    if not info_path.exists():
        log(f"writing the {a.preset} model to {a.model}")
        write_model(a.model, PRESETS[a.preset])
    info = json.loads(info_path.read_text())
    gguf = a.cache / "models" / f"{a.preset}-bf16.gguf"
    if not gguf.exists():
        log("converting to GGUF")
        run([sys.executable, str(tools["convert"]), str(a.model), "--outtype", "bf16", "--outfile", str(gguf)])

    print(f"model: preset {a.preset} {PRESETS[a.preset]}, {info['params'] / 1e9:.2f}B parameters, "
          f"{info['decode_bytes'] / 1e6:.1f} MB read per decoded token (bf16); {a.threads} threads, "
          f"prompt {a.prompt}, {a.gen} new tokens, depth {a.depth}")
    rows = []
    for r in range(a.rounds):
        # Each metric is measured on both engines back to back (the machine's speed drifts within
        # minutes), the first engine alternating between rounds; the decode pair is bracketed by
        # bandwidth readings, whose mean its roofline uses.
        lc, co, bw = {}, {}, [bandwidth(tools["probe"], a.threads)]
        for metric in METRICS:
            for engine in (("llama.cpp", "corral") if r % 2 == 0 else ("corral", "llama.cpp")):
                if engine == "corral":
                    co[metric] = corral(a, metric)
                else:
                    lc[metric] = llama_bench(tools, gguf, a, metric)
            if metric == "decode":
                bw.append(bandwidth(tools["probe"], a.threads))
        bw_decode = statistics.mean(bw)
        rows.append(dict(bw=bw_decode, lc=lc, co=co, roof=co["decode"] * info["decode_bytes"] / bw_decode,
                         lc_roof=lc["decode"] * info["decode_bytes"] / bw_decode))
        log(f"round {r + 1}: {json.dumps(rows[-1])}")

    print(f"| round | read GB/s | llama.cpp pp{a.prompt} / tg{a.gen} / tg{a.gen}@d{a.depth} | "
          f"Corral prefill / decode / decode@d{a.depth} | Corral / llama.cpp | roofline Corral, llama.cpp |")
    print("|---|---|---|---|---|---|")
    for i, r in enumerate(rows):
        lc, co = r["lc"], r["co"]
        print(f"| {i + 1} | {r['bw'] / 1e9:.1f} | {lc['prefill']:.0f} / {lc['decode']:.1f} / {lc['decode_deep']:.1f} | "
              f"{co['prefill']:.0f} / {co['decode']:.1f} / {co['decode_deep']:.1f} | "
              f"{co['prefill'] / lc['prefill']:.2f} / {co['decode'] / lc['decode']:.2f} / "
              f"{co['decode_deep'] / lc['decode_deep']:.2f} | {r['roof']:.2f}, {r['lc_roof']:.2f} |")

    def med(f):
        return statistics.median(f(r) for r in rows)

    print("vs-llamacpp: decode_ratio=%.3f prefill_ratio=%.3f decode_depth4096_ratio=%.3f decode_roofline_fraction=%.3f"
          % (med(lambda r: r["co"]["decode"] / r["lc"]["decode"]), med(lambda r: r["co"]["prefill"] / r["lc"]["prefill"]),
             med(lambda r: r["co"]["decode_deep"] / r["lc"]["decode_deep"]), med(lambda r: r["roof"])))


if __name__ == "__main__":
    main()
