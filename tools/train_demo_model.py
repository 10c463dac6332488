#!/usr/bin/env python3
"""Trains Corral's demo model: a small but real Llama 4-architecture mixture-of-experts model.

Steps, in the order `main` runs them:
1. Corpus: English text every Python installation carries: the docstrings of the standard library
   (modules, classes, functions, methods), the comment paragraphs of its source files, and the
   language reference that `help()` shows (pydoc_data.topics). A few whole modules are held out:
   their text is written to --heldout and never trained on.
2. Tokenizer: tools/llama4_tokenizer.py's byte-level BPE (Llama 4's regex, special tokens and their
   ids, BOS post-processor, chat template), trained on the training text.
3. Model: transformers' Llama4ForCausalLM, scaled down: 16 experts with top-1 routing plus the
   shared expert, dense MLP layers between the MoE layers, chunked attention with RoPE and QK norm,
   and every 4th layer global attention without RoPE (NoPE) with attention temperature tuning.
4. Training: AdamW, linear warmup then cosine decay over --steps, on sequences packed from
   the training documents (each one <|begin_of_text|> ... <|end_of_text|>).
5. Saving a Hugging Face checkpoint in bf16 to --out, then reloading it with transformers to report
   held-out perplexity and a generated sample.

Run from the repository root (about an hour on 2 cores of a 2024 server CPU):
    python tools/train_demo_model.py [--steps 1300] [--threads 2]
A fixed number of steps (not a time budget) keeps the run reproducible: same seed, same model.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import io
import math
import os
import pkgutil
import random
import sys
import time
import tokenize
import types
import warnings
from pathlib import Path

# Idle OpenMP threads sleep rather than spin: on a 2-core machine shared with other work, spinning
# threads take the CPU from the thread they wait for (3x slower training when another process runs).
# It must be set before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402
from transformers import (  # noqa: E402
    AutoTokenizer,
    GenerationConfig,
    Llama4ForCausalLM,
    Llama4TextConfig,
)
from transformers.models.llama4.modeling_llama4 import Llama4TextMoe  # noqa: E402

import llama4_tokenizer  # noqa: E402  (tools/, beside this script)
from llama4_tokenizer import BOS, END_OF_TEXT, PAD, SPECIAL_TOKENS, STOP_TOKENS  # noqa: E402

SEED = 0

# --- Corpus -------------------------------------------------------------------------------------

# Modules not read: importing them has side effects (opens a browser, prints, needs a display,
# runs tests), they are tests rather than documentation, or (pydoc_data) they are read separately.
SKIPPED_MODULES = {
    "__hello__", "__phello__", "antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo",
    "readline", "test", "tests", "idle_test", "lib2to3", "pydoc_data", "__main__",
}  # fmt: skip
# Whole modules held out for evaluation (about 50 KB of text). They are pure Python with no C or
# Python twin elsewhere in the standard library that would repeat their docstrings.
HELDOUT_MODULES = ("calendar", "fractions", "graphlib", "shlex", "statistics", "textwrap")
# Comment paragraphs shorter than this are mostly notes on the next line of code, not prose.
MIN_COMMENT_CHARS = 80

VOCAB_SIZE = 8192

# --- Model and training -------------------------------------------------------------------------

SEQ_LEN = 512  # tokens per training sequence; also the window of the held-out evaluation
BATCH_SIZE = 8
CHUNK_SIZE = 128  # attention_chunk_size: RoPE layers attend within 128-token chunks
PEAK_LR = 2e-3
MIN_LR_FRACTION = 0.1  # the cosine decays to this fraction of PEAK_LR
WARMUP_STEPS = 100
WEIGHT_DECAY = 0.1
# Weight of the load-balancing loss: without it, routing collapses onto a few of the 16 experts.
BALANCE_LOSS_WEIGHT = 0.01
LOG_EVERY_STEPS = 20
EVAL_EVERY_SECONDS = 300
SAMPLE_PROMPT = "The file object"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("python/corral/demo_model"),
                        help="checkpoint directory to write (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=1300,
                        help="optimizer steps of %d x %d tokens (default: %%(default)s)" % (BATCH_SIZE, SEQ_LEN))
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: %(default)s)")
    parser.add_argument("--heldout", type=Path, default=Path("tests/data/heldout.txt"),
                        help="where to write the held-out text (default: %(default)s)")
    return parser.parse_args()  # fmt: skip


# --- 1. Corpus ----------------------------------------------------------------------------------


def is_skipped(module_name: str) -> bool:
    return any(part in SKIPPED_MODULES or part.startswith(("_test", "xx")) for part in module_name.split("."))


def import_quietly(name: str) -> types.ModuleType | None:
    """The module, or None where it cannot be imported here (other platforms, missing libraries).
    Whatever importing prints or warns is swallowed."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            return importlib.import_module(name)
        except Exception:
            return None


def stdlib_modules() -> list[types.ModuleType]:
    """The importable standard-library modules and their submodules, sorted by name."""
    names = set()
    for top in sorted(sys.stdlib_module_names):
        if is_skipped(top) or (package := import_quietly(top)) is None:
            continue
        names.add(top)
        if hasattr(package, "__path__"):
            # walk_packages imports the subpackages (not the modules) to list what they hold.
            for info in pkgutil.walk_packages(package.__path__, top + ".", onerror=lambda _: None):
                if not is_skipped(info.name):
                    names.add(info.name)
    return [module for name in sorted(names) if (module := import_quietly(name)) is not None]


def docstrings(module: types.ModuleType) -> list[str]:
    """The docstrings of a module and of the classes, functions and methods it defines."""
    docs = [inspect.getdoc(module)]
    for _, obj in sorted(vars(module).items()):
        if not (inspect.isclass(obj) or inspect.isroutine(obj)) or getattr(obj, "__module__", None) != module.__name__:
            continue  # imported from elsewhere: documented with its own module
        docs.append(inspect.getdoc(obj))
        if inspect.isclass(obj):
            members = sorted(vars(obj).items())
            docs += [inspect.getdoc(m) for _, m in members if inspect.isroutine(m) or isinstance(m, property)]
    return [doc.strip() for doc in docs if doc and doc.strip()]


def comment_paragraphs(module: types.ModuleType) -> list[str]:
    """The runs of whole-line comments in a module's source file, as paragraphs of prose."""
    try:
        path = inspect.getsourcefile(module)
        with tokenize.open(path) as source:
            tokens = list(tokenize.generate_tokens(source.readline))
    except (TypeError, OSError, SyntaxError, tokenize.TokenError):
        return []  # a built-in or extension module, or a file tokenize cannot read
    paragraphs, lines, last_row = [], [], -1
    for tok in tokens:
        if tok.type != tokenize.COMMENT or not tok.line.lstrip().startswith("#"):
            continue
        if tok.start[0] != last_row + 1 and lines:
            paragraphs.append("\n".join(lines))
            lines = []
        lines.append(tok.string.lstrip("#").strip())
        last_row = tok.start[0]
    paragraphs.append("\n".join(lines))
    return [p for p in paragraphs if len(p) >= MIN_COMMENT_CHARS and is_prose(p)]


def is_prose(text: str) -> bool:
    """Mostly letters and spaces: tells prose from commented-out code and ASCII art."""
    return sum(c.isalpha() or c.isspace() for c in text) >= 0.8 * len(text)


def reference_topics() -> list[str]:
    """The language reference sections that `help('topic')` shows."""
    from pydoc_data.topics import topics

    return [topics[name].strip() for name in sorted(topics)]


def build_corpus() -> dict[str, list[str]]:
    """Documents by module name, in a deterministic order, each text kept only where it first appears."""
    corpus, seen = {}, set()
    sources = [(m.__name__, docstrings(m) + comment_paragraphs(m)) for m in stdlib_modules()]
    sources.append(("pydoc_data.topics", reference_topics()))
    for name, docs in sources:
        unique = [doc for doc in docs if doc not in seen]
        seen.update(unique)
        if unique:
            corpus[name] = unique
    return corpus


def split_corpus(corpus: dict[str, list[str]]) -> tuple[list[str], list[str]]:
    """(training documents, held-out documents): the held-out ones are those of HELDOUT_MODULES.
    Since build_corpus keeps every text once, no held-out text is also a training text."""
    missing = [name for name in HELDOUT_MODULES if name not in corpus]
    assert not missing, f"held-out modules not found: {missing}"
    train = [doc for name, docs in corpus.items() if name not in HELDOUT_MODULES for doc in docs]
    heldout = [doc for name in HELDOUT_MODULES for doc in corpus[name]]
    return train, heldout


# --- 2. Tokenizer -------------------------------------------------------------------------------


def encode_documents(tok: Tokenizer, docs: list[str]) -> list[list[int]]:
    """Each document as <|begin_of_text|> ... <|end_of_text|> (the post-processor adds the BOS)."""
    return [enc.ids + [END_OF_TEXT] for enc in tok.encode_batch(docs)]


# --- 3. Model -----------------------------------------------------------------------------------


def model_config(vocab_size: int) -> Llama4TextConfig:
    """Llama 4's text architecture at about 14M parameters (about 6M of them active per token)."""
    return Llama4TextConfig(
        vocab_size=vocab_size,
        hidden_size=256,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=32,
        num_local_experts=16,
        num_experts_per_tok=1,
        intermediate_size=128,  # each routed expert's width, and the shared expert's
        interleave_moe_layer_step=2,  # MoE in layers 1, 3, 5, 7; dense MLPs in layers 0, 2, 4, 6
        intermediate_size_mlp=512,  # the dense MLPs' width
        use_qk_norm=True,
        attention_chunk_size=CHUNK_SIZE,
        # transformers derives no_rope_layers (and from them layer_types) from this interval: layers
        # 3 and 7 are NoPE with global attention, the others RoPE with chunked attention.
        no_rope_layer_interval=4,
        # Llama 4 sets floor_scale to its chunk size: the NoPE layers' temperature tuning then starts
        # one chunk in, which the training sequences reach.
        attn_temperature_tuning=True,
        floor_scale=CHUNK_SIZE,
        attn_scale=0.1,
        # Llama 3-style RoPE scaling, as Llama 4 Scout, extending the training length 8 times.
        rope_parameters=dict(
            rope_type="llama3",
            rope_theta=500000.0,
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=SEQ_LEN,
        ),
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        initializer_range=0.02,
        tie_word_embeddings=False,
        bos_token_id=BOS,
        eos_token_id=STOP_TOKENS,
        pad_token_id=PAD,
    )


def routed_moe_forward(self: Llama4TextMoe, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama4TextMoe.forward, running each expert only on the tokens routed to it.

    transformers runs all 16 experts on every token, the inputs of the experts a token is not routed
    to scaled by sigmoid(-inf) = 0; an expert (no biases) maps 0 to 0, so those terms add exactly
    nothing. Skipping them gives the same outputs and gradients with 16 times less expert work."""
    x = hidden_states.reshape(-1, self.hidden_dim)
    router_scores, router_logits = self.router(x)  # scores: sigmoid of the chosen logits, 0 elsewhere
    chosen = torch.topk(router_logits, self.top_k, dim=1).indices.reshape(-1)
    tokens = torch.arange(x.shape[0]).repeat_interleave(self.top_k)
    # (token, expert) pairs sorted by expert, so that each expert's inputs are one contiguous slice.
    order = chosen.argsort(stable=True)
    tokens, chosen = tokens[order], chosen[order]
    routed_in = x[tokens] * router_scores[tokens, chosen].unsqueeze(1)
    counts = torch.bincount(chosen, minlength=self.num_experts).tolist()
    experts = self.experts
    routed_out = []
    for e, expert_in in enumerate(routed_in.split(counts)):
        gate, up = (expert_in @ experts.gate_up_proj[e]).chunk(2, dim=-1)
        routed_out.append((up * experts.act_fn(gate)) @ experts.down_proj[e])
    out = self.shared_expert(x).index_add(0, tokens, torch.cat(routed_out))
    return out, router_logits


def use_routed_experts(model: Llama4ForCausalLM) -> None:
    """Switches the model's MoE layers to routed_moe_forward, after checking that it gives the
    logits of transformers' own forward (the saved weights are those of the transformers model)."""
    probe = torch.randint(len(SPECIAL_TOKENS), model.config.vocab_size, (2, 2 * CHUNK_SIZE))
    with torch.no_grad():
        expected = model(input_ids=probe).logits
        for module in model.modules():
            if isinstance(module, Llama4TextMoe):
                module.forward = types.MethodType(routed_moe_forward, module)
        actual = model(input_ids=probe).logits
    assert torch.allclose(actual, expected, atol=1e-5), (actual - expected).abs().max()


def describe_layers(config: Llama4TextConfig) -> str:
    return "  ".join(
        f"{i}:{'moe' if i in config.moe_layers else 'dense'}/{'rope-chunked' if config.no_rope_layers[i] else 'nope-global'}"
        for i in range(config.num_hidden_layers)
    )


# --- 4. Training --------------------------------------------------------------------------------


def epoch_batches(docs: list[list[int]], rng: random.Random) -> list[torch.Tensor]:
    """One pass over the documents, shuffled, concatenated and cut into BATCH_SIZE x SEQ_LEN batches."""
    order = list(range(len(docs)))
    rng.shuffle(order)
    stream = torch.tensor([token for i in order for token in docs[i]])
    sequences = stream[: len(stream) // SEQ_LEN * SEQ_LEN].view(-1, SEQ_LEN)
    return list(sequences.split(BATCH_SIZE))[: len(sequences) // BATCH_SIZE]


def balance_loss(router_logits: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Switch Transformer's load-balancing loss, averaged over the MoE layers: the number of experts
    times the sum over experts of (share of tokens routed to it) x (its mean softmax router
    probability). 1 when routing is uniform, up to the number of experts when it collapses."""
    losses = []
    for logits in router_logits:
        num_experts = logits.shape[-1]
        routed_share = F.one_hot(logits.argmax(-1), num_experts).float().mean(0)
        mean_probability = logits.float().softmax(-1).mean(0)
        losses.append(num_experts * (routed_share * mean_probability).sum())
    return torch.stack(losses).mean()


def learning_rate(step: int, steps: int) -> float:
    """Linear warmup over the first steps, then cosine decay to MIN_LR_FRACTION at the last step."""
    warmup = min(1.0, (step + 1) / WARMUP_STEPS)
    cosine = MIN_LR_FRACTION + (1 - MIN_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * step / steps))
    return PEAK_LR * warmup * cosine


def make_optimizer(model: torch.nn.Module) -> torch.optim.AdamW:
    """AdamW with weight decay on the weight matrices only (not on norms)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": WEIGHT_DECAY},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=PEAK_LR, betas=(0.9, 0.95))


@torch.no_grad()
def perplexity(model: Llama4ForCausalLM, ids: list[int]) -> float:
    """exp(mean next-token loss) over consecutive windows of SEQ_LEN tokens (the trained context)."""
    was_training = model.training
    model.eval()
    total_loss, count = 0.0, 0
    for start in range(0, len(ids) - 1, SEQ_LEN):
        window = torch.tensor([ids[start : start + SEQ_LEN]])
        if window.shape[1] < 2:
            break
        logits = model(input_ids=window).logits[0, :-1].float()
        total_loss += F.cross_entropy(logits, window[0, 1:], reduction="sum").item()
        count += window.shape[1] - 1
    model.train(was_training)
    return math.exp(total_loss / count)


def expert_load(model: Llama4ForCausalLM, ids: list[int]) -> str:
    """Per MoE layer, the fewest and most tokens (in %) any expert gets on a held-out window:
    shows whether routing collapsed onto a few experts."""
    window = torch.tensor([ids[:SEQ_LEN]])
    with torch.no_grad():
        router_logits = model(input_ids=window, output_router_logits=True).router_logits
    loads = []
    for logits in router_logits:
        counts = torch.bincount(logits.argmax(-1), minlength=model.config.num_local_experts)
        share = 100 * counts / counts.sum()
        loads.append(f"{share.min():.0f}-{share.max():.0f}%")
    return " ".join(loads)


def train(model: Llama4ForCausalLM, docs: list[list[int]], heldout_ids: list[int], steps: int) -> int:
    """Trains for `steps` optimizer steps; returns the number of tokens trained on."""
    optimizer = make_optimizer(model)
    rng = random.Random(SEED)
    start = last_log = last_eval = time.monotonic()
    step, tokens, epoch, log_loss, log_tokens = 0, 0, 0, 0.0, 0
    model.train()
    while True:
        epoch += 1
        for batch in epoch_batches(docs, rng):
            if step == steps:
                return tokens
            lr = learning_rate(step, steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            output = model(input_ids=batch, labels=batch, output_router_logits=True)
            (output.loss + BALANCE_LOSS_WEIGHT * balance_loss(output.router_logits)).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens += batch.numel()
            log_loss += output.loss.item()
            log_tokens += batch.numel()
            now = time.monotonic()
            if step % LOG_EVERY_STEPS == 0:
                print(
                    f"step {step:5d}  epoch {epoch}  {(now - start) / 60:5.1f} min  lr {lr:.2e}  "
                    f"loss {log_loss / LOG_EVERY_STEPS:.3f}  {log_tokens / (now - last_log):5.0f} tokens/s  "
                    f"{tokens / 1e6:.2f}M tokens",
                    flush=True,
                )
                last_log, log_loss, log_tokens = now, 0.0, 0
            if now - last_eval >= EVAL_EVERY_SECONDS:
                print(
                    f"  held-out perplexity {perplexity(model, heldout_ids):.1f}  "
                    f"expert load min-max per MoE layer: {expert_load(model, heldout_ids)}",
                    flush=True,
                )
                last_log += time.monotonic() - now  # evaluation time does not count in training speed
                last_eval = time.monotonic()


# --- 5. Saving and report -----------------------------------------------------------------------


def save_checkpoint(model: Llama4ForCausalLM, tok: Tokenizer, out: Path) -> None:
    """config.json, model.safetensors (bf16), generation_config.json and the tokenizer files."""
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(out)  # transformers 5 writes safetensors only
    # Sampling defaults as Llama 4's instruct checkpoints ship them.
    GenerationConfig(bos_token_id=BOS, eos_token_id=STOP_TOKENS, pad_token_id=PAD, do_sample=True, temperature=0.6,
                     top_p=0.9).save_pretrained(out)
    llama4_tokenizer.save(tok, out)


def report(out: Path, heldout_path: Path, tokens_trained: int) -> None:
    """Reloads the saved checkpoint with transformers and prints what it achieves."""
    model = Llama4ForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    heldout_ids = tokenizer(heldout_path.read_text(encoding="utf-8")).input_ids
    size_mb = (out / "model.safetensors").stat().st_size / 1e6
    print(f"parameters: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M ({size_mb:.1f} MB in bf16)")
    print(f"tokens trained: {tokens_trained / 1e6:.2f}M")
    print(f"held-out perplexity (float32 from the saved bf16 weights): {perplexity(model, heldout_ids):.2f}")
    print(f"uniform-model perplexity (vocabulary size): {model.config.vocab_size}")
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    print(f"chat template: {chat!r}")
    inputs = tokenizer(SAMPLE_PROMPT, return_tensors="pt")
    torch.manual_seed(SEED)
    for name, options in [("greedy", dict(do_sample=False)), ("sampled", dict(do_sample=True, temperature=0.8, top_p=0.95))]:
        output = model.generate(**inputs, max_new_tokens=80, **options)
        print(f"--- {name} ---\n{tokenizer.decode(output[0], skip_special_tokens=True)}")


def main() -> None:
    args = parse_args()
    torch.manual_seed(SEED)
    torch.set_num_threads(args.threads)

    corpus = build_corpus()
    train_docs, heldout_docs = split_corpus(corpus)
    heldout_text = "\n\n".join(heldout_docs) + "\n"
    args.heldout.parent.mkdir(parents=True, exist_ok=True)
    args.heldout.write_text(heldout_text, encoding="utf-8")
    print(
        f"corpus: {len(corpus)} modules; training {len(train_docs)} documents, "
        f"{sum(map(len, train_docs)) / 1e6:.2f}M characters; held-out {len(heldout_docs)} documents "
        f"from {', '.join(HELDOUT_MODULES)}, {len(heldout_text) / 1e3:.1f}K characters -> {args.heldout}",
        flush=True,
    )

    tok = llama4_tokenizer.train_bpe(train_docs, VOCAB_SIZE)
    train_ids = encode_documents(tok, train_docs)
    heldout_ids = tok.encode(heldout_text).ids
    print(
        f"tokenizer: vocabulary {tok.get_vocab_size()}; training {sum(map(len, train_ids)) / 1e6:.2f}M tokens, "
        f"held-out {len(heldout_ids) / 1e3:.1f}K tokens",
        flush=True,
    )

    config = model_config(tok.get_vocab_size())
    model = Llama4ForCausalLM(config)
    use_routed_experts(model)
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; layers {describe_layers(config)}")
    print(f"training for {args.steps} steps on {args.threads} threads, batches of {BATCH_SIZE} x {SEQ_LEN} tokens", flush=True)

    tokens_trained = train(model, train_ids, heldout_ids, args.steps)
    save_checkpoint(model, tok, args.out)
    print(f"saved {args.out}", flush=True)
    report(args.out, args.heldout, tokens_trained)


if __name__ == "__main__":
    main()
