"""Decode steps as CUDA graphs (EngineOptions::enforce_eager = False, the default on a GPU): the
same tokens and bit-identical log-probabilities as running every step kernel by kernel
(enforce_eager=True), as the decode batch shrinks (a graph per size), after a large prefill has
grown the model's buffers (graphs captured anew), and for n > 1 samples (forked sequences).
Every test needs a usable CUDA device; without one they are skipped (conftest)."""

import pytest
import torch

import corral
from test_model import prompt
from tiny_models import build

pytestmark = pytest.mark.cuda


@pytest.fixture(scope="module")
def scout(tmp_path_factory):
    return build("scout", "causal", torch.bfloat16, tmp_path_factory.mktemp("scout-graphs"))


def run(path, enforce_eager, calls, **options):
    """The outputs of each (prompts, params) call in turn on one LLM: tokens and log-probabilities."""
    llm = corral.LLM(path, device="cuda", enforce_eager=enforce_eager, **options)
    return [
        [[(s.token_ids, s.logprobs) for s in o.outputs] for o in llm.generate(prompts, params)]
        for prompts, params in calls
    ]


def test_decode_graphs_equal_eager_as_the_batch_shrinks_cuda(scout):
    """Six prompts of different lengths with different max_tokens: the decode batch goes 6, 5, .., 1
    (a graph per size, each captured at its second step); tokens and logprobs equal eager's bits."""
    prompts = [prompt(40 + i, n) for i, n in enumerate((3, 17, 40, 9, 64, 25))]
    params = [corral.SamplingParams(max_tokens=4 + 3 * i, ignore_eos=True, logprobs=2) for i in range(6)]
    calls = [(prompts, params)] * 2  # the second call replays the graphs the first captured
    assert run(scout, False, calls) == run(scout, True, calls)


def test_graphs_recaptured_after_a_large_prefill_cuda(scout):
    """Decode graphs are captured, then a 1,500-token prompt (in pieces, decode rows beside them)
    grows every activation buffer: the graphs are captured anew, and still give eager's bits."""
    short = [prompt(60 + i, 10 + 7 * i) for i in range(3)]
    params = corral.SamplingParams(max_tokens=12, ignore_eos=True, logprobs=1)
    calls = [(short, params), ([prompt(70, 1500)] + short, params), (short, params)]
    options = dict(max_num_batched_tokens=1024)
    assert run(scout, False, calls, **options) == run(scout, True, calls, **options)


def test_graphs_with_forked_samples_cuda(scout):
    """n = 3 seeded samples per prompt (forks sharing blocks copy-on-write, then each its own
    table row): graphs give eager's tokens and logprobs."""
    prompts = [prompt(80 + i, 20 + 13 * i) for i in range(2)]
    params = corral.SamplingParams(n=3, max_tokens=10, temperature=0.8, seed=5, ignore_eos=True, logprobs=1)
    assert run(scout, False, [(prompts, params)]) == run(scout, True, [(prompts, params)])
