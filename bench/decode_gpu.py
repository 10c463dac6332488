"""Whole-model speed on a GPU: a synthetic Llama 4 Scout-shaped checkpoint (hidden 5120, 40 query /
8 KV heads of 128, 16 experts of width 8192 top-1 plus a shared expert on every layer, vocab 202048,
untied lm_head, chunked local attention (8192) with NoPE layers as Scout interleaves them, llama3
RoPE scaling), random bf16 weights, a few layers (--layers, default 2: with fewer than 4 the last
layer is the NoPE one, so both attention kinds run), run by corral.LLM(device="cuda"). With
--weights fp8 the routed and shared experts are float8_e4m3 with float32 scales per output column,
as an fbgemm_fp8 checkpoint stores them (Meta's FP8 recipe: attention, routers and lm_head stay
bf16), and the roofline counts their bytes as such.

Measures, in one run: decode tokens/s at batch 1, 8 and 64 (each request a 128-token prompt, 64
decode steps timed as generate(max_tokens=65) minus generate(max_tokens=1) of the same prompts,
prefix caching off), prefill tokens/s (8 prompts of 2048 tokens, generate(max_tokens=1)), and
each decode batch as a fraction of the HBM roofline: the bytes one decode step must read (an
embedding row per sequence, per layer the norms, attention, router and shared expert, the distinct
routed experts the batch touches in expectation, 16 * (1 - (15/16)^B) for top-1 of 16 spread
evenly, the final norm and lm_head; plus the K/V each sequence's attention reads at that step's
context) over the step time, over the peak bandwidth: a device-to-device copy measured in this run
(cuda-python, bytes read plus written per second), else the nominal figure of the device's name.

Weights are written by tiling one random block (magnitudes 2^-8 .. 2^-4, random signs), one
safetensors shard per layer written in parallel, so that writing is bound by the file system; the
router matrices alone are fully random (tokens spread over the experts). The checkpoint goes to
/dev/shm when it has room, else $TMPDIR (or --dir), and is deleted at the end (also when a
timeout's SIGTERM ends the run: what was measured by then is still printed).

On a GPU, decode runs as CUDA graphs (one per batch size); --eager compare (the default there)
loads the model a second time with enforce_eager=True and times both, round by round alternately,
so the table has the graphs' gain side by side (--eager off: graphs only; --eager only: eager only).

Without a usable CUDA device it says why and exits 0; with too little GPU memory or disk for the
layer count it uses fewer layers. Prints each phase's time, a table and one summary line last;
exits 1 if loading or a case failed. --budget-s bounds the measuring: cases share what is left
after writing and loading and stop adding rounds when their share is spent (a case that starts
runs one round at least; one that would start after the budget is skipped).

    python bench/decode_gpu.py [--layers 2] [--batches 1,8,64] [--prompt 128] [--decode 64] [--eager compare]
    python bench/decode_gpu.py --device cpu --tiny    # the same, end to end, on a tiny CPU model
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import bf16_bits, memory_bandwidth  # noqa: E402

# Llama 4 Scout's text model (shared/docs/llama4.md, section 1.2); `layers` comes from --layers.
SCOUT = dict(vocab=202048, hidden=5120, heads=40, kv_heads=8, head_dim=128, experts=16, inter=8192, top_k=1,
             chunk=8192, bos=200000, eos=[200001, 200007, 200008], pad=200018)
# --tiny: the same layout at toy size, with a chunk that decode crosses (the KV arithmetic's edge).
TINY = dict(vocab=4096, hidden=256, heads=4, kv_heads=2, head_dim=64, experts=16, inter=512, top_k=1,
            chunk=160, bos=0, eos=[1], pad=2)
# Nominal HBM bandwidth by device name (bytes/s), when no copy can be measured. First match wins.
NOMINAL_BW = (("GH200", None), ("H200", 4.8e12), ("H100 NVL", 3.9e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12),
              ("A100-SXM4-80GB", 2.039e12), ("A100 80GB PCIe", 1.935e12), ("A100", 1.555e12))
GB = 1e9


class Terminated(BaseException):
    """SIGTERM (a timeout): unwinds so that the checkpoint is deleted and the partial table printed."""


def _on_sigterm(signum, frame):
    raise Terminated()


# ---------------------------------------------------------------------------------------------
# The checkpoint.


def rope_flags(layers: int) -> list[int]:
    """Scout's no_rope_layers (1 = RoPE, chunked; 0 = NoPE, global, temperature tuning): every
    4th layer NoPE. With fewer than 4 layers the last one is NoPE, so both attention kinds run."""
    flags = [1 if (i + 1) % 4 else 0 for i in range(layers)]
    if layers < 4:
        flags[-1] = 0
    return flags


def make_config(s: dict, layers: int) -> dict:
    return dict(
        architectures=["Llama4ForCausalLM"], model_type="llama4_text", vocab_size=s["vocab"],
        hidden_size=s["hidden"], intermediate_size=s["inter"], intermediate_size_mlp=2 * s["inter"],
        num_hidden_layers=layers, num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
        head_dim=s["head_dim"], num_local_experts=s["experts"], num_experts_per_tok=s["top_k"],
        interleave_moe_layer_step=1, moe_layers=list(range(layers)), no_rope_layers=rope_flags(layers),
        use_qk_norm=True, attention_chunk_size=s["chunk"], attn_temperature_tuning=True, floor_scale=8192,
        attn_scale=0.1, rope_theta=500000.0,
        rope_scaling=dict(rope_type="llama3", factor=16.0, low_freq_factor=1.0, high_freq_factor=1.0,
                          original_max_position_embeddings=8192),
        rms_norm_eps=1e-5, max_position_embeddings=10485760, bos_token_id=s["bos"], eos_token_id=s["eos"],
        pad_token_id=s["pad"], tie_word_embeddings=False, attention_bias=False, hidden_act="silu",
        dtype="bfloat16",
    )


def tensor_plan(s: dict, layers: int, weights: str = "bf16") -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, fill) of every tensor, fill one of tiled, ones, router (bf16), fp8 (codes) and
    scale (float32). weights "fp8": the experts' matrices fp8 with fbgemm_fp8's scale tensors."""
    H, V, E, I = s["hidden"], s["vocab"], s["experts"], s["inter"]
    q, kv = s["heads"] * s["head_dim"], s["kv_heads"] * s["head_dim"]
    fp8 = weights == "fp8"
    mlp = "fp8" if fp8 else "tiled"
    plan = [("model.embed_tokens.weight", (V, H), "tiled")]
    for i in range(layers):
        p = f"model.layers.{i}."
        f = p + "feed_forward."
        plan += [
            (p + "input_layernorm.weight", (H,), "ones"),
            (p + "post_attention_layernorm.weight", (H,), "ones"),
            (p + "self_attn.q_proj.weight", (q, H), "tiled"),
            (p + "self_attn.k_proj.weight", (kv, H), "tiled"),
            (p + "self_attn.v_proj.weight", (kv, H), "tiled"),
            (p + "self_attn.o_proj.weight", (H, q), "tiled"),
            (f + "router.weight", (E, H), "router"),
            (f + "experts.gate_up_proj", (E, H, 2 * I), mlp),
            (f + "experts.down_proj", (E, I, H), mlp),
            (f + "shared_expert.gate_proj.weight", (I, H), mlp),
            (f + "shared_expert.up_proj.weight", (I, H), mlp),
            (f + "shared_expert.down_proj.weight", (H, I), mlp),
        ]
        if fp8:  # fbgemm_fp8's scales: one float32 per output column
            plan += [(f + "experts.gate_up_proj_scale", (E, 1, 2 * I), "scale"),
                     (f + "experts.down_proj_scale", (E, H, 1), "scale")]
            plan += [(f + f"shared_expert.{m}_proj.weight_scale", (n, 1), "scale")
                     for m, n in (("gate", I), ("up", I), ("down", H))]
    plan += [("model.norm.weight", (H,), "ones"), ("lm_head.weight", (V, H), "tiled")]
    return plan


# Bytes per element of each fill.
FILL_BYTES = {"tiled": 2, "ones": 2, "router": 2, "fp8": 1, "scale": 4}
FILL_DTYPE = {"tiled": "BF16", "ones": "BF16", "router": "BF16", "fp8": "F8_E4M3", "scale": "F32"}
# fp8 weights' scale: codes of magnitude 2^-3 .. 2^1 (TiledBits) give weights of 2^-9 .. 2^-5.
FP8_SCALE = 2.0**-6


def checkpoint_bytes(s: dict, layers: int, weights: str = "bf16") -> int:
    return sum(FILL_BYTES[fill] * int(np.prod(shape)) for _, shape, fill in tensor_plan(s, layers, weights))


class TiledBits:
    """An endless stream of bf16 (or, fp8, float8_e4m3) bit patterns: one random block of `period`
    values repeated. The period is odd, so tensors (whose sizes are multiples of large powers of
    two) and the experts within one start at different phases of it and hold different values.
    Streams made with with_phase share the block."""

    def __init__(self, rng: np.random.Generator | None, period: int = (1 << 22) + 1, fp8: bool = False):
        if rng is None:
            return
        bits = rng.integers(0, 1 << 16, size=period, dtype=np.uint16)
        if fp8:  # sign, exponent field 4..7 (2^-3 .. 2^0, never the NaN codes), random mantissa
            tile = ((bits & np.uint16(0x87)) | ((np.uint16(4) + ((bits >> np.uint16(8)) & np.uint16(3))) << np.uint16(3)))
            tile = tile.astype(np.uint8)
        else:
            exponent = (np.uint16(119) + ((bits >> np.uint16(7)) & np.uint16(3))) << np.uint16(7)  # 2^-8 .. 2^-5
            tile = ((bits & np.uint16(0x807F)) | exponent).astype(np.uint16)  # random sign and mantissa
        self.buf = np.concatenate([tile, tile])
        self.period = period
        self.phase = 0

    def with_phase(self, phase: int) -> TiledBits:
        t = TiledBits(None)
        t.buf, t.period, t.phase = self.buf, self.period, phase % self.period
        return t

    def write(self, f, n: int) -> None:
        while n > 0:
            m = min(n, self.period)
            f.write(self.buf[self.phase : self.phase + m].data)  # a view: no copy
            self.phase = (self.phase + m) % self.period
            n -= m


def shard_of(name: str, layers: int) -> int:
    """Shards as published checkpoints split them: the embedding, each layer, then the final norm
    and lm_head (one file each, written in parallel)."""
    if name.startswith("model.layers."):
        return 1 + int(name.split(".")[2])
    return 0 if name.startswith("model.embed_tokens") else layers + 1


def fbgemm_fp8_config(layers: int) -> dict:
    """The quantization_config of --weights fp8: every attention projection, router and lm_head
    kept in bf16 (named one by one, as transformers' FbgemmFp8Config lists them)."""
    keep = [f"model.layers.{i}.{m}" for i in range(layers)
            for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                      "feed_forward.router")]
    return {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0, "modules_to_not_convert": keep + ["lm_head"]}


def write_checkpoint(path: Path, s: dict, layers: int, seed: int = 0, threads: int | None = None,
                     weights: str = "bf16") -> dict:
    """A Llama4ForCausalLM checkpoint (config.json, safetensors shards and their index), written
    with one thread per shard at a time (file systems serialise the writes to one file)."""
    path.mkdir(parents=True, exist_ok=True)
    config = make_config(s, layers)
    if weights == "fp8":
        config["quantization_config"] = fbgemm_fp8_config(layers)
    (path / "config.json").write_text(json.dumps(config, indent=1))
    rng = np.random.default_rng(seed)
    tiled, tiled8 = TiledBits(rng), TiledBits(rng, fp8=True)
    ones = bf16_bits(np.ones(s["hidden"], np.float32))
    shards: list[list] = [[] for _ in range(layers + 2)]
    for name, shape, fill in tensor_plan(s, layers, weights):
        # The routers: every value drawn (std 0.02 as transformers initialises them), here, in order.
        data = bf16_bits(rng.standard_normal(shape, dtype=np.float32) * 0.02) if fill == "router" else None
        shards[shard_of(name, layers)].append((name, shape, fill, data))
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]

    def write_shard(i: int) -> int:
        header, offset = {}, 0
        for name, shape, fill, _ in shards[i]:
            n = FILL_BYTES[fill] * int(np.prod(shape))
            header[name] = {"dtype": FILL_DTYPE[fill], "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        streams = {"tiled": tiled.with_phase(i * 1_000_003), "fp8": tiled8.with_phase(i * 1_000_003)}
        with open(path / files[i], "wb") as f:
            f.write(len(raw).to_bytes(8, "little"))
            f.write(raw)
            for _, shape, fill, data in shards[i]:
                if fill in streams:
                    streams[fill].write(f, int(np.prod(shape)))
                elif fill == "scale":
                    f.write(np.full(int(np.prod(shape)), FP8_SCALE, np.float32).data)
                else:
                    f.write((ones if fill == "ones" else data).data)
        return offset

    workers = max(1, min(len(shards), threads or min(8, os.cpu_count() or 1)))
    with ThreadPoolExecutor(workers) as pool:
        sizes = list(pool.map(write_shard, range(len(shards))))
    index = {"metadata": {"total_size": sum(sizes)},
             "weight_map": {name: files[i] for i, shard in enumerate(shards) for name, *_ in shard}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return config


# ---------------------------------------------------------------------------------------------
# What a decode step reads.


def expected_experts(experts: int, top_k: int, batch: int) -> float:
    """Distinct experts B tokens route to when each picks top_k of `experts` evenly at random."""
    return experts * (1.0 - (1.0 - top_k / experts) ** batch)


def weight_bytes_per_step(s: dict, layers: int, batch: int, experts_touched: float | None = None,
                          weights: str = "bf16") -> float:
    """Weight bytes one decode step of `batch` sequences reads: their embedding rows, per layer the
    two norms, q/k/v/o, the router, the shared expert and the distinct routed experts (expected,
    unless given), then the final norm and lm_head; bf16, except fp8 experts (1 byte per weight and
    a float32 scale per output column) with weights "fp8"."""
    H, V, E, I = s["hidden"], s["vocab"], s["experts"], s["inter"]
    nh, nkv, hd = s["heads"], s["kv_heads"], s["head_dim"]
    if experts_touched is None:
        experts_touched = expected_experts(E, s["top_k"], batch)
    expert = 3 * H * I * 2 if weights == "bf16" else 3 * H * I + 4 * (2 * I + H)  # one expert's bytes
    per_layer = 2 * (2 * H + (nh + 2 * nkv) * hd * H + H * nh * hd + E * H) + expert
    return 2.0 * (batch * H + H + V * H) + layers * (per_layer + experts_touched * expert)


def kv_bytes_per_step(s: dict, flags: list[int], batch: int, prompt: int, steps: int, kv_elem: int = 2) -> float:
    """K/V bytes the attention of one decode step reads, averaged over decode steps 1..steps of
    sequences with `prompt`-token prompts: step j feeds the token at position prompt + j - 1,
    which sees every key up to itself on global (NoPE) layers and the keys of its own chunk on
    chunked layers."""
    pos = np.arange(prompt, prompt + steps)
    global_keys, local_keys = pos + 1, pos % s["chunk"] + 1
    keys_per_step = sum(float(np.mean(local_keys if f else global_keys)) for f in flags)
    return batch * keys_per_step * 2 * s["kv_heads"] * s["head_dim"] * kv_elem


def decode_only(snaps: list[dict], key: str):
    """From stats() before a 1-token run, after it and after the (steps + 1)-token run of the same
    prompts: the second run's counter delta minus the first's (what its decode steps added)."""
    s0, s1, s2 = (np.asarray(s[key], np.float64) for s in snaps)
    return (s2 - s1) - (s1 - s0)


def observed_experts(snaps: list[dict], batch: int) -> float | None:
    """Distinct experts a step of `batch` tokens would touch in expectation if each token
    independently followed the routing shares of the decode steps of one round (decode_only of
    stats()' moe_expert_tokens; mean over MoE layers); None without the counters."""
    tables = [s.get("moe_expert_tokens") or {} for s in snaps]
    per_layer = []
    for layer in tables[2]:
        if not all(layer in t for t in tables):
            continue
        d = decode_only([{"c": t[layer]} for t in tables], "c")
        if d.sum() > 0:
            p = np.clip(d, 0, None) / d.sum()
            per_layer.append(float(np.sum(1.0 - (1.0 - p) ** batch)))
    return statistics.mean(per_layer) if per_layer else None


# ---------------------------------------------------------------------------------------------
# The device.


def _cudart():
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # cuda-python before 12.6
        except ImportError:
            return None
    return cudart


def _ok(cudart, result, what):
    """The values of a cuda-python call's (error, values...) tuple; RuntimeError on an error."""
    result = result if isinstance(result, tuple) else (result,)
    if result[0] != cudart.cudaError_t.cudaSuccess:
        raise RuntimeError(f"{what}: {result[0]}")
    return result[1] if len(result) == 2 else result[1:]


def device_info(index: int) -> dict:
    """name, free and total bytes of GPU `index` (made this thread's current device, for
    copy_bandwidth): cuda-python, else nvidia-smi; missing keys if neither answers."""
    info = {}
    cudart = _cudart()
    if cudart is not None:
        try:
            _ok(cudart, cudart.cudaSetDevice(index), "cudaSetDevice")
            free, total = _ok(cudart, cudart.cudaMemGetInfo(), "cudaMemGetInfo")
            prop = _ok(cudart, cudart.cudaGetDeviceProperties(index), "cudaGetDeviceProperties")
            name = prop.name
            name = name.decode(errors="replace") if isinstance(name, (bytes, bytearray)) else str(name)
            info.update(name=name.split("\x00")[0].strip(), free=int(free), total=int(total))
            return info
        except Exception as e:  # noqa: BLE001 - any failure: ask nvidia-smi
            print(f"cuda-python: {e}; asking nvidia-smi")
    try:
        query = ["nvidia-smi", "--query-gpu=name,memory.free,memory.total", "--format=csv,noheader,nounits",
                 "-i", str(index)]
        out = subprocess.run(query, capture_output=True, text=True, timeout=20)
        if out.returncode == 0:
            name, free, total = [x.strip() for x in out.stdout.strip().split(",")]
            info.update(name=name, free=int(free) * 2**20, total=int(total) * 2**20)
    except (OSError, ValueError, subprocess.TimeoutExpired):
        pass
    return info


def copy_bandwidth(nbytes: int = 1 << 30, repeats: int = 5, inner: int = 4) -> float:
    """Device-to-device cudaMemcpyAsync of nbytes between two cudaMalloc'd buffers, timed with CUDA
    events: the best of `repeats` runs of `inner` copies, as bytes read plus written per second."""
    cudart = _cudart()
    if cudart is None:
        raise RuntimeError("cuda-python is not installed")
    kind = cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice
    stream = cudart.cudaStream_t(0)  # the legacy default stream
    src = dst = start = stop = None
    try:
        src = _ok(cudart, cudart.cudaMalloc(nbytes), "cudaMalloc")
        dst = _ok(cudart, cudart.cudaMalloc(nbytes), "cudaMalloc")
        _ok(cudart, cudart.cudaMemset(src, 1, nbytes), "cudaMemset")
        start = _ok(cudart, cudart.cudaEventCreate(), "cudaEventCreate")
        stop = _ok(cudart, cudart.cudaEventCreate(), "cudaEventCreate")
        _ok(cudart, cudart.cudaMemcpy(dst, src, nbytes, kind), "cudaMemcpy")  # warm up
        best = 0.0
        for _ in range(repeats):
            _ok(cudart, cudart.cudaEventRecord(start, stream), "cudaEventRecord")
            for _ in range(inner):
                _ok(cudart, cudart.cudaMemcpyAsync(dst, src, nbytes, kind, stream), "cudaMemcpyAsync")
            _ok(cudart, cudart.cudaEventRecord(stop, stream), "cudaEventRecord")
            _ok(cudart, cudart.cudaEventSynchronize(stop), "cudaEventSynchronize")
            ms = float(_ok(cudart, cudart.cudaEventElapsedTime(start, stop), "cudaEventElapsedTime"))
            best = max(best, inner * 2 * nbytes / (ms / 1e3))
        return best
    finally:
        for e in (start, stop):
            if e is not None:
                cudart.cudaEventDestroy(e)
        for p in (src, dst):
            if p is not None:
                cudart.cudaFree(p)


def nominal_bandwidth(name: str | None) -> float | None:
    for key, bw in NOMINAL_BW:
        if name and key in name:
            return bw
    return None


def mem_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def pick_dir(requested: str | None, size: int) -> Path:
    """Where the checkpoint goes: --dir; else /dev/shm when it holds it with room to spare and the
    host keeps plenty of memory (no disk write-back to wait for); else $TMPDIR."""
    if requested:
        return Path(requested)
    shm, avail = Path("/dev/shm"), mem_available()
    if shm.is_dir() and os.access(shm, os.W_OK) and avail is not None:
        if shutil.disk_usage(shm).free > size + 2 * 2**30 and avail > 2 * size + 16 * 2**30:
            return shm
    return Path(tempfile.gettempdir())


# ---------------------------------------------------------------------------------------------
# Timing.


def run_generate(llm, corral, prompts, max_tokens, temperature) -> float:
    """Seconds of one generate() of all prompts batched; checks every output's length."""
    params = corral.SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=temperature, seed=0)
    t0 = time.perf_counter()
    out = llm.generate(prompts, params)
    dt = time.perf_counter() - t0
    for o in out:
        if len(o.outputs[0].token_ids) != max_tokens:
            raise RuntimeError(f"asked for {max_tokens} tokens, got {len(o.outputs[0].token_ids)}")
    return dt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=2, help="decoder layers (fewer if the GPU or disk lacks room)")
    ap.add_argument("--batches", default="1,8,64", help="decode batch sizes")
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens of each decode request")
    ap.add_argument("--decode", type=int, default=64, help="decode steps timed per run")
    ap.add_argument("--prefill-seqs", type=int, default=8)
    ap.add_argument("--prefill-len", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds per case at most (medians reported)")
    ap.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0: greedy)")
    ap.add_argument("--budget-s", type=float, default=110.0,
                    help="whole-run time budget: cases get fewer rounds, or are skipped, to stay within it")
    ap.add_argument("--dir", help="folder for the checkpoint (default: /dev/shm if it has room, else $TMPDIR)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint (and print where it is)")
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    ap.add_argument("--weights", choices=("bf16", "fp8"), default="bf16",
                    help="the experts' format: bf16, or fp8 as an fbgemm_fp8 checkpoint stores them")
    ap.add_argument("--eager", choices=("compare", "off", "only"), default=None,
                    help="decode with CUDA graphs and eagerly side by side (compare, the default on a GPU), "
                         "graphs only (off) or eagerly only (only, the default on the CPU, which has no graphs)")
    ap.add_argument("--tiny", action="store_true", help="a toy-sized model and short runs (checks the script on a CPU)")
    args = ap.parse_args()
    start = time.perf_counter()
    deadline = start + args.budget_s

    try:
        import corral
    except ImportError as e:  # not installed: nothing to measure
        print(f"decode_gpu: skipped: corral is not importable ({e})")
        return 0
    gpu = args.device != "cpu"
    want = args.device if ":" in args.device else "cuda:0"
    if gpu:
        if want not in corral.devices():
            from corral import _core

            why = _core.cuda_status() if _core.cuda_backend_built() else "this build has no CUDA backend"
            print(f"decode_gpu: skipped: no usable CUDA device {want} (devices: {corral.devices()}; {why})")
            return 0

    # The CPU has no graphs (enforce_eager changes nothing there): eager only, unless asked (a check
    # of this script: both columns then time the same thing).
    eager = args.eager or ("compare" if gpu else "only")
    copies = 2 if eager == "compare" else 1  # models loaded side by side
    s = dict(TINY if args.tiny else SCOUT)
    batches = [int(b) for b in args.batches.split(",")]
    prompt_len, steps = args.prompt, args.decode
    pre_seqs, pre_len = args.prefill_seqs, args.prefill_len
    if args.tiny:
        prompt_len, steps, pre_len = min(prompt_len, 128), min(steps, 48), min(pre_len, 256)
    longest = max(pre_len, prompt_len + steps + 1)
    kv_tokens = max(pre_seqs * (pre_len + 1), max(batches) * (prompt_len + steps + 1))

    # The largest layer count that fits the disk and the GPU.
    info = device_info(int(want.partition(":")[2])) if gpu else {"name": "cpu"}
    layers = args.layers
    while True:
        size = checkpoint_bytes(s, layers, args.weights)
        kv_cache = max(2**30, 3 * kv_tokens * layers * 2 * s["kv_heads"] * s["head_dim"] * 2)
        folder = pick_dir(args.dir, size)
        disk_free = shutil.disk_usage(folder).free
        gpu_need = copies * (size + kv_cache) + 8 * 2**30  # weights and KV cache per model, scratch of 8192-token steps
        fits = disk_free > size + 2**30 and (not gpu or "free" not in info or gpu_need < info["free"])
        if fits or layers == 1:
            break
        layers -= 1
    if not fits:
        print(f"decode_gpu: skipped: one layer ({size / GB:.1f} GB of checkpoint, {gpu_need / GB:.1f} GB on the GPU) "
              f"does not fit: {disk_free / GB:.1f} GB free in {folder}, GPU free {info.get('free', 0) / GB:.1f} GB")
        return 0
    if layers != args.layers:
        print(f"decode_gpu: {args.layers} layers do not fit (disk free {disk_free / GB:.1f} GB in {folder}, "
              f"GPU free {info.get('free', 0) / GB:.1f} GB): using {layers}")
    flags = rope_flags(layers)
    print(f"device: {args.device} ({info.get('name', '?')}, {info.get('free', 0) / GB:.1f} of "
          f"{info.get('total', 0) / GB:.1f} GB free)" if gpu else "device: cpu")

    # Peak bandwidth: a copy measured here (before the model takes the memory), else nominal.
    peak, peak_how = None, "none"
    nominal = nominal_bandwidth(info.get("name"))
    t0 = time.perf_counter()
    if gpu:
        try:
            peak, peak_how = copy_bandwidth(), "measured device-to-device copy, read + write"
        except Exception as e:  # noqa: BLE001 - no cuda-python, or it failed: the table's figure
            print(f"copy bandwidth not measured ({e})")
            if nominal:
                peak, peak_how = nominal, f"nominal for {info.get('name')}"
    else:
        peak, peak_how = memory_bandwidth(os.cpu_count() or 1), "measured CPU read bandwidth (numpy max)"
    print(f"peak bandwidth: {peak / GB:.0f} GB/s ({peak_how}; {time.perf_counter() - t0:.1f} s)" if peak
          else "peak bandwidth: unknown (no roofline fractions)")
    if nominal and peak_how.startswith("measured"):
        print(f"  nominal {nominal / GB:.0f} GB/s for {info.get('name')}: the copy reaches {peak / nominal:.2f} of it")

    rows, prefill, failures, notes = [], None, [], []
    signal.signal(signal.SIGTERM, _on_sigterm)  # from here on a SIGTERM unwinds: the checkpoint goes
    tmp = Path(tempfile.mkdtemp(prefix="corral-decode-gpu-", dir=folder))
    llms = {}  # label -> corral.LLM: "graphs" and/or "eager"
    try:
        # Phase 1: write the checkpoint.
        t0 = time.perf_counter()
        write_checkpoint(tmp, s, layers, weights=args.weights)
        dt = time.perf_counter() - t0
        shape = {k: v for k, v in s.items() if k not in ("bos", "eos", "pad")}
        print(f"model: {layers} layers (no_rope_layers {flags}), {args.weights} experts, {shape}")
        print(f"write: {size / GB:.1f} GB to {tmp} in {dt:.1f} s ({size / GB / dt:.1f} GB/s)", flush=True)

        # Phase 2: load.
        labels = {"compare": ["graphs", "eager"], "off": ["graphs"], "only": ["eager"]}[eager]
        t0 = time.perf_counter()
        for label in labels:
            llms[label] = corral.LLM(tmp, device=args.device, skip_tokenizer_init=True, kv_cache_bytes=int(kv_cache),
                                     enable_prefix_caching=False, max_model_len=longest + 16,
                                     max_num_seqs=max(256, max(batches), pre_seqs), max_num_batched_tokens=8192,
                                     seed=0, enforce_eager=label == "eager")
        dt = time.perf_counter() - t0
        llm = llms[labels[0]]  # prefill is timed on this one
        st = llm.stats()
        print(f"load ({' and '.join(labels)}): {dt:.1f} s ({st['weight_bytes'] / GB:.2f} GB of weights, {st['weight_format']}; KV cache "
              f"{st['kv_blocks_total']} blocks of {st['kv_block_size']} tokens, {st['kv_bytes_per_token']} "
              f"bytes/token, computed {layers * 2 * s['kv_heads'] * s['head_dim'] * 2})", flush=True)

        rng = np.random.default_rng(1)
        low, high = 3, min(s["vocab"], 200000)

        def prompts(n, length):
            return [rng.integers(low, high, size=length).tolist() for _ in range(n)]

        t0 = time.perf_counter()
        for m in llms.values():
            run_generate(m, corral, prompts(1, 16), 4, args.temperature)  # first call: kernels, libraries
        print(f"warm-up: {time.perf_counter() - t0:.1f} s ({', '.join(llms)})", flush=True)

        # Phase 3: decode, per batch size, then prefill. Each case gets its share of the time left.
        cases = [("decode", b) for b in batches] + ([("prefill", pre_seqs)] if pre_seqs > 0 else [])
        for i, (kind, batch) in enumerate(cases):
            now = time.perf_counter()
            if now > deadline:
                notes.append(f"{kind} b{batch}: over budget, not measured")
                print(f"decode_gpu: time budget spent: {kind} batch {batch} not measured", flush=True)
                continue
            case_deadline = now + (deadline - now) / (len(cases) - i)
            case_t0 = now
            try:
                if kind == "prefill":
                    ps = prompts(batch, pre_len)
                    run_generate(llm, corral, prompts(1, pre_len), 1, args.temperature)  # warm: a long prompt
                    times = []
                    try:
                        while len(times) < args.rounds:
                            t0 = time.perf_counter()
                            times.append(run_generate(llm, corral, ps, 1, args.temperature))
                            if time.perf_counter() + (time.perf_counter() - t0) > case_deadline:
                                break
                    finally:  # rounds done before a failure or a SIGTERM count too
                        if times:
                            prefill = (batch, pre_len, statistics.median(times), len(times))
                            print(f"  prefill {batch} x {pre_len}: {len(times)} rounds, "
                                  f"{batch * pre_len / prefill[2]:.0f} tok/s "
                                  f"({time.perf_counter() - case_t0:.1f} s)", flush=True)
                    continue
                ps = prompts(batch, prompt_len)
                for m in llms.values():
                    run_generate(m, corral, ps, 2, args.temperature)  # warm: this batch's shapes (graph capture)
                # Per model: times of 1-token and (steps + 1)-token runs, rounds alternating between models.
                firsts = {k: [] for k in llms}
                fulls = {k: [] for k in llms}
                snaps = []
                try:
                    while len(fulls[labels[-1]]) < args.rounds:
                        t0 = time.perf_counter()
                        for label, m in llms.items():
                            first_round = label == labels[0] and not snaps
                            if first_round:  # counters around the first round: what its decode steps computed
                                snaps.append(m.stats())
                            firsts[label].append(run_generate(m, corral, ps, 1, args.temperature))
                            if first_round:
                                snaps.append(m.stats())
                            fulls[label].append(run_generate(m, corral, ps, steps + 1, args.temperature))
                            if first_round:
                                snaps.append(m.stats())
                                decoded = int(decode_only(snaps, "decode_tokens_computed"))
                                if decoded != batch * steps:
                                    print(f"  note: batch {batch}: {decoded} decode tokens counted, "
                                          f"{batch * steps} expected")
                        if time.perf_counter() + (time.perf_counter() - t0) > case_deadline:
                            break
                finally:  # rounds done before a failure or a SIGTERM count too
                    # Decode steps only: the run of steps + 1 tokens minus the run of 1 (prefill, first token).
                    step = {k: (statistics.median(fulls[k]) - statistics.median(firsts[k])) / steps
                            for k in llms if fulls[k] and firsts[k]}
                    for k, t in list(step.items()):
                        if t <= 0:
                            print(f"  decode batch {batch} ({k}): {steps + 1} tokens took no longer than 1: not timed")
                            del step[k]
                    if labels[0] in step:
                        rows.append(dict(batch=batch, step=step[labels[0]], rounds=len(fulls[labels[0]]),
                                         eager=step.get("eager") if labels[0] == "graphs" else None,
                                         weights=weight_bytes_per_step(s, layers, batch, weights=args.weights),
                                         kv=kv_bytes_per_step(s, flags, batch, prompt_len, steps),
                                         experts=expected_experts(s["experts"], s["top_k"], batch),
                                         observed=observed_experts(snaps, batch) if len(snaps) == 3 else None))
                        print(f"  decode batch {batch}: {len(fulls[labels[0]])} rounds, " + ", ".join(
                            f"{k} step {t * 1e3:.2f} ms, {batch / t:.1f} tok/s" for k, t in step.items()) +
                            f" ({time.perf_counter() - case_t0:.1f} s)", flush=True)
            except Terminated:
                raise
            except Exception as e:  # noqa: BLE001 - report, measure the other cases
                failures.append(f"{kind} b{batch}: {type(e).__name__}: {e}")
                print(f"decode_gpu: {kind} batch {batch} FAILED: {type(e).__name__}: {e}", flush=True)
    except Terminated:
        failures.append("ended by SIGTERM (a timeout)")
        print("decode_gpu: SIGTERM: stopping, printing what was measured", flush=True)
    except Exception as e:  # noqa: BLE001 - writing or loading failed
        failures.append(f"{type(e).__name__}: {e}")
        print(f"decode_gpu: FAILED: {type(e).__name__}: {e}", flush=True)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        llm = None
        llms.clear()
        t0 = time.perf_counter()
        if args.keep:
            print(f"checkpoint kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
            print(f"checkpoint deleted ({time.perf_counter() - t0:.1f} s)")

    report(rows, prefill, peak, nominal, peak_how, prompt_len, steps)
    for n in notes + failures:
        print(f"note: {n}")
    parts = []
    if rows:
        parts.append("decode tok/s " + " ".join(f"b{r['batch']}={r['batch'] / r['step']:.0f}" for r in rows))
        if any(r["eager"] for r in rows):
            parts.append("graphs/eager " + " ".join(f"b{r['batch']}={r['eager'] / r['step']:.2f}x"
                                                    for r in rows if r["eager"]))
        if peak:
            parts.append("roofline " + " ".join(f"b{r['batch']}={(r['weights'] + r['kv']) / r['step'] / peak:.0%}"
                                                for r in rows))
    if prefill:
        parts.append(f"prefill {prefill[0] * prefill[1] / prefill[2]:.0f} tok/s")
    if failures:
        parts.append(f"FAILED {len(failures)}: {failures[0][:60]}")
    print(f"L={layers} {args.weights} " + "; ".join(parts) + f" ({time.perf_counter() - start:.0f} s)")
    return 1 if failures else 0


def report(rows, prefill, peak, nominal, peak_how, prompt_len, steps) -> None:
    if rows:
        print(f"\ndecode: {prompt_len}-token prompts, {steps} decode steps timed (context {prompt_len + 1} .. "
              f"{prompt_len + steps}); bytes per step: weights (experts in expectation) + K/V at the mean context")
        print(f"{'batch':>5}{'rounds':>7}{'step ms':>9}{'tok/s':>10}{'eager ms':>9}{'experts':>8}{'seen':>6}"
              f"{'weights GB':>11}{'KV MB':>8}{'GB/s':>8}{'of peak':>8}{'of nom.':>8}")
        for r in rows:
            bw = (r["weights"] + r["kv"]) / r["step"]
            seen = f"{r['observed']:6.1f}" if r["observed"] is not None else "     -"
            of_peak = f"{bw / peak:8.2f}" if peak else "       -"
            of_nominal = f"{bw / nominal:8.2f}" if nominal else "       -"
            eager_ms = f"{r['eager'] * 1e3:9.2f}" if r["eager"] else "        -"
            print(f"{r['batch']:>5}{r['rounds']:>7}{r['step'] * 1e3:>9.2f}{r['batch'] / r['step']:>10.1f}{eager_ms}"
                  f"{r['experts']:>8.1f}{seen}{r['weights'] / GB:>11.2f}{r['kv'] / 1e6:>8.1f}{bw / GB:>8.0f}"
                  f"{of_peak}{of_nominal}")
        print("step ms: decode with CUDA graphs on a GPU (eagerly on the CPU); eager ms: the same steps with "
              "enforce_eager=True, timed in alternate rounds of the same run.")
        print(f"experts: distinct routed experts per layer a step reads, expected for even routing (used for the "
              f"bytes); seen: the same from the routing shares observed in the run. Peak: {peak_how}.")
    if prefill:
        n, length, t, rounds = prefill
        print(f"prefill: {n} x {length} tokens, {rounds} rounds, {t:.3f} s, {n * length / t:.0f} tok/s")


if __name__ == "__main__":
    sys.exit(main())
