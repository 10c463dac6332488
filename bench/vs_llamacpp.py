"""Corral against llama.cpp on the CPU, side by side, on a synthetic Llama 4 (random bf16 weights).

First run only (into --cache, outside the repository; about 15 minutes on 2 cores): downloads the
llama-cpp-python sdist from PyPI and builds the llama.cpp it vendors (llama-bench and
llama-quantize, native CPU flags), copies its HF -> GGUF converter (patched to accept our
tokenizer's pre-tokenizer, which it does not know by hash) and builds bench/read_bandwidth.c.
Every run: writes the seeded checkpoint of --preset (numpy weights, a BPE tokenizer trained on the
Python standard library), converts it to GGUF, then runs --rounds rounds; each measures decode,
prefill and decode after a long context on llama-bench and on Corral (a fresh process, public API
only) back to back, with the machine's read bandwidth read before and after the decode pair. Both
run the same prompt and generation lengths and thread count. Prints a table and the last line

    vs-llamacpp: decode_ratio=R prefill_ratio=R decode_depth4096_ratio=R decode_roofline_fraction=F

(medians over rounds of each engine's best of --reps repetitions, as the bandwidth probe takes
the best of its passes: on a shared machine noise only ever slows a run down; the roofline is
decoded tokens/s times the bytes of weights one decoded token reads, divided by the read bandwidth
measured around the decode pair).

--weights int8 / int4 runs Corral with quantization="int8" / "int4" and llama.cpp on a Q8_0 / Q4_0
GGUF that a plain `llama-quantize` (built alongside llama-bench) makes of the bf16 one, cached as
{preset}-q8_0.gguf / -q4_0.gguf; the tensor types it chose are printed (it keeps the norms and the
router F32 and, for Q4_0, makes output Q6_K). Both rooflines then use the bytes a decoded token
reads in Corral's packed layout of that format (common.decode_bytes), and the last line reads
`vs-llamacpp[int8]: ...`. --metrics decode (a comma list of decode, prefill, decode_deep) measures
only those; the fields of the others are left out of the last line.

    python bench/vs_llamacpp.py --rounds 3 [--preset bench] [--threads 2] [--weights int8] [--metrics decode]

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
from common import decode_bytes, llama4_tensors, write_safetensors  # noqa: E402

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
    build = cache / "llama-build"
    bench = build / "bin" / "llama-bench"
    quantize = build / "bin" / "llama-quantize"
    convert = cache / "llama-convert" / "convert_hf_to_gguf.py"
    source = (HERE / "read_bandwidth.c").read_bytes()
    probe = cache / f"read_bandwidth-{hashlib.sha256(source).hexdigest()[:12]}"  # rebuilt when it changes
    if not bench.exists() or not convert.exists():
        src = llama_cpp_source(cache, fresh=True)
        log("building llama-bench (about 15 minutes on 2 cores)")
        configure_llama_cpp(src, build)
        run(["cmake", "--build", str(build), "-j", str(os.cpu_count() or 2), "--target", "llama-bench"])
        shutil.rmtree(cache / "llama-convert", ignore_errors=True)
        (cache / "llama-convert").mkdir()
        for part in ("convert_hf_to_gguf.py", "conversion", "gguf-py"):
            p = src / part
            if p.is_dir():
                shutil.copytree(p, cache / "llama-convert" / part)
            elif p.exists():
                shutil.copy(p, cache / "llama-convert" / part)
        patch_converter(cache / "llama-convert")
    if not quantize.exists():  # added after llama-bench: built on its own in a build folder that may have only that
        src = llama_cpp_source(cache)
        log("building llama-quantize (a few minutes on 2 cores when llama-bench is already built)")
        if not (build / "CMakeCache.txt").exists():
            configure_llama_cpp(src, build)
        run(["cmake", "--build", str(build), "-j", str(os.cpu_count() or 2), "--target", "llama-quantize"])
    if not probe.exists():
        run(["cc", "-O3", "-march=native", "-fopenmp", str(HERE / "read_bandwidth.c"), "-o", str(probe)])
    return dict(bench=bench, quantize=quantize, convert=convert, probe=probe)


def llama_cpp_source(cache: Path, fresh: bool = False) -> Path:
    """The llama.cpp that llama-cpp-python's sdist vendors, downloaded and unpacked into the cache
    (unpacked again when `fresh` or missing)."""
    sdist = cache / "sdist"
    name = f"llama_cpp_python-{LLAMA_CPP_PYTHON}"
    src = sdist / name / "vendor" / "llama.cpp"
    if not (sdist / f"{name}.tar.gz").exists():
        log(f"downloading llama-cpp-python {LLAMA_CPP_PYTHON} (sdist) from PyPI")
        run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
             f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", str(sdist)])
    if fresh or not (src / "CMakeLists.txt").exists():
        with tarfile.open(sdist / f"{name}.tar.gz") as t:
            t.extractall(sdist, filter="data")
    return src


def configure_llama_cpp(src: Path, build: Path) -> None:
    run(["cmake", "-S", str(src), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
         "-DGGML_NATIVE=ON", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
         "-DLLAMA_OPENSSL=OFF", "-DLLAMA_CURL=OFF", "-DBUILD_SHARED_LIBS=OFF"])


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


# --weights: the GGUF type llama-quantize makes of the bf16 GGUF, and Corral's `quantization=`.
GGUF_TYPES = {"bf16": None, "int8": "Q8_0", "int4": "Q4_0"}
CORRAL_QUANTIZATION = {"bf16": None, "int8": "int8", "int4": "int4"}


def quantized_gguf(tools: dict, bf16: Path, gguf_type: str) -> Path:
    """{preset}-bf16.gguf made {preset}-q8_0.gguf / -q4_0.gguf by a plain `llama-quantize in out
    TYPE` (no imatrix), cached next to it."""
    out = bf16.with_name(bf16.name.replace("-bf16.gguf", f"-{gguf_type.lower()}.gguf"))
    if not out.exists():
        log(f"quantizing {bf16.name} to {gguf_type}")
        tmp = out.with_name(out.name + ".part")
        run([str(tools["quantize"]), str(bf16), str(tmp), gguf_type])
        tmp.rename(out)
    return out


GGUF_SUMMARY = r"""
import json, re, sys
from gguf import GGUFReader
r = GGUFReader(sys.argv[1])
top_k, experts = int(sys.argv[2]), int(sys.argv[3])
kinds, read = {}, 0
for t in r.tensors:
    kind = re.sub(r"^blk\.\d+\.", "", t.name)
    kinds.setdefault(kind, set()).add(t.tensor_type.name)
    if kind.endswith("_exps.weight"):
        read += t.n_bytes * top_k // experts
    elif kind == "token_embd.weight":
        read += t.n_bytes // int(t.shape[-1])
    else:
        read += int(t.n_bytes)
print(json.dumps(dict(types={k: sorted(v) for k, v in kinds.items()}, decode_bytes=read)))
"""


def gguf_summary(tools: dict, gguf: Path, p: dict) -> dict:
    """The tensor types a GGUF holds by tensor kind (blk.N. dropped), read with the gguf-py of the
    vendored llama.cpp, and the bytes of it one decoded token reads (an embedding row, top_k of the
    experts, all else)."""
    env = dict(os.environ, PYTHONPATH=str(tools["convert"].parent / "gguf-py"))
    return json.loads(run([sys.executable, "-c", GGUF_SUMMARY, str(gguf), str(p["top_k"]), str(p["experts"])],
                          env=env))


def types_line(types: dict) -> str:
    """kind:TYPE for every kind, kinds of the same types grouped: 'Q8_0: attn_q, ...; F32: ...'."""
    groups: dict[str, list[str]] = {}
    for kind, ts in sorted(types.items()):
        groups.setdefault("/".join(ts), []).append(kind.removesuffix(".weight"))
    return "; ".join(f"{t}: {', '.join(kinds)}" for t, kinds in sorted(groups.items(), key=lambda g: -len(g[1])))


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
    q = CORRAL_QUANTIZATION[a.weights]
    # bf16: no keyword, as before (and so still runnable on a Corral without `quantization=`).
    llm = corral.LLM(a.model, num_threads=a.threads, enable_prefix_caching=deep,
                     max_num_batched_tokens=max(a.prompt, a.depth), **({} if q is None else dict(quantization=q)))
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
           str(a.reps), "--weights", a.weights]
    return float(run(cmd, cwd="/tmp").strip().splitlines()[-1])


def parse_metrics(text: str) -> list[str]:
    chosen = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in chosen if m not in METRICS]
    if bad or not chosen:
        raise argparse.ArgumentTypeError(f"{text!r}: a comma list of {', '.join(METRICS)}")
    return [m for m in METRICS if m in chosen]  # in the usual order, once each


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="bench")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--depth", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=5, help="repetitions per measurement (the best counts)")
    ap.add_argument("--weights", choices=sorted(GGUF_TYPES), default="bf16",
                    help="weight format: bf16 (both engines as written), int8 (llama.cpp Q8_0, Corral "
                         "quantization='int8') or int4 (llama.cpp Q4_0, Corral quantization='int4')")
    ap.add_argument("--metrics", type=parse_metrics, default=list(METRICS),
                    help=f"comma list of {','.join(METRICS)} (default all)")
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                    / "corral-bench")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--metric", choices=METRICS, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return corral_worker(a)

    tools = build_tools(a.cache)
    p = PRESETS[a.preset]
    a.model = a.cache / "models" / a.preset
    info_path = a.model / "bench_info.json"
    if not info_path.exists():
        log(f"writing the {a.preset} model to {a.model}")
        write_model(a.model, p)
    info = json.loads(info_path.read_text())
    if decode_bytes(p, "bf16") != info["decode_bytes"]:
        raise RuntimeError(f"{info_path}: {info['decode_bytes']} bytes a decoded token, common.decode_bytes "
                           f"counts {decode_bytes(p, 'bf16')}: the preset or the count changed")
    gguf = a.cache / "models" / f"{a.preset}-bf16.gguf"
    if not gguf.exists():
        log("converting to GGUF")
        run([sys.executable, str(tools["convert"]), str(a.model), "--outtype", "bf16", "--outfile", str(gguf)])
    gguf_type = GGUF_TYPES[a.weights]
    if gguf_type is not None:
        gguf = quantized_gguf(tools, gguf, gguf_type)
    read = decode_bytes(p, a.weights)  # by both rooflines: Corral's packed format

    fmt = a.weights if gguf_type is None else f"{a.weights} (Corral quantization={a.weights!r}, llama.cpp {gguf_type})"
    print(f"model: preset {a.preset} {p}, {info['params'] / 1e9:.2f}B parameters; weights {fmt}: "
          f"{read / 1e6:.1f} MB read per decoded token in Corral's {a.weights} layout"
          + ("" if a.weights == "bf16" else f" (bf16: {info['decode_bytes'] / 1e6:.1f} MB)")
          + f"; {a.threads} threads, prompt {a.prompt}, {a.gen} new tokens, depth {a.depth}")
    lc_name = "llama.cpp"
    if gguf_type is not None:
        g = gguf_summary(tools, gguf, p)
        print(f"llama.cpp reads {gguf.name} (`llama-quantize in out {gguf_type}`): {g['decode_bytes'] / 1e6:.1f} MB "
              f"per decoded token; tensor types by kind: {types_line(g['types'])}")
        # llama-quantize keeps some tensors in other types (F32 norms and router; Q4_0: output Q6_K).
        other = [f"{k.removesuffix('.weight')} {'/'.join(t)}" for k, t in sorted(g["types"].items())
                 if set(t) - {gguf_type, "F32"}]
        lc_name = f"llama.cpp {gguf_type}" + (f" ({', '.join(other)})" if other else "")
    rows = []
    for r in range(a.rounds):
        # Each metric is measured on both engines back to back (the machine's speed drifts within
        # minutes), the first engine alternating between rounds; the decode pair is bracketed by
        # bandwidth readings, whose mean its roofline uses.
        lc, co, bw = {}, {}, [bandwidth(tools["probe"], a.threads)]
        for metric in a.metrics:
            for engine in (("llama.cpp", "corral") if r % 2 == 0 else ("corral", "llama.cpp")):
                if engine == "corral":
                    co[metric] = corral(a, metric)
                else:
                    lc[metric] = llama_bench(tools, gguf, a, metric)
            if metric == "decode":
                bw.append(bandwidth(tools["probe"], a.threads))
        bw_decode = statistics.mean(bw)
        row = dict(bw=bw_decode, lc=lc, co=co)
        if "decode" in a.metrics:
            row.update(roof=co["decode"] * read / bw_decode, lc_roof=lc["decode"] * read / bw_decode)
        rows.append(row)
        log(f"round {r + 1}: {json.dumps(rows[-1])}")

    def cells(d: dict, spec: str | dict) -> str:  # prefill / decode / decode_deep, "-" where not measured
        order = ("prefill", "decode", "decode_deep")
        return " / ".join(format(d[m], spec if isinstance(spec, str) else spec[m]) if m in d else "-" for m in order)

    rate = dict(prefill=".0f", decode=".1f", decode_deep=".1f")
    print(f"| round | read GB/s | {lc_name} pp{a.prompt} / tg{a.gen} / tg{a.gen}@d{a.depth} | "
          f"Corral {a.weights} prefill / decode / decode@d{a.depth} | Corral / llama.cpp | "
          f"roofline Corral, llama.cpp ({read / 1e6:.1f} MB/token, Corral's {a.weights}) |")
    print("|---|---|---|---|---|---|")
    for i, r in enumerate(rows):
        lc, co = r["lc"], r["co"]
        roof = f"{r['roof']:.2f}, {r['lc_roof']:.2f}" if "roof" in r else "-"
        print(f"| {i + 1} | {r['bw'] / 1e9:.1f} | {cells(lc, rate)} | {cells(co, rate)} | "
              f"{cells({m: co[m] / lc[m] for m in co}, '.2f')} | {roof} |")

    def med(f):
        return statistics.median(f(r) for r in rows)

    # The metrics not measured (--metrics) are left out of the line.
    fields = [(name, lambda r, m=m: r["co"][m] / r["lc"][m]) for name, m in
              (("decode_ratio", "decode"), ("prefill_ratio", "prefill"), ("decode_depth4096_ratio", "decode_deep"))
              if m in a.metrics]
    if "decode" in a.metrics:
        fields.append(("decode_roofline_fraction", lambda r: r["roof"]))
    prefix = "vs-llamacpp" if a.weights == "bf16" else f"vs-llamacpp[{a.weights}]"
    print(f"{prefix}: " + " ".join(f"{name}={med(f):.3f}" for name, f in fields))


if __name__ == "__main__":
    main()
