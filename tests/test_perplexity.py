"""Perplexity through Corral (the API and `corral perplexity`) against transformers' on the same
checkpoint and windows."""

import inspect
import json
import re

import numpy as np
import pytest
import torch

import corral
import tiny_tokenizer as tt
from corral.perplexity import windows
from test_cli import corral_cli
from tiny_models import build, load_reference


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tt.save(build("chunked", "causal", torch.float32, tmp_path_factory.mktemp("chunked_ppl")))


TEXT = inspect.getdoc(json.dumps) + "\n\n" + inspect.getdoc(np.linspace)


def reference_perplexity(model_dir, text, window):
    """transformers' model over the same windows; log-softmax in float64."""
    ids = corral.Tokenizer(model_dir).encode(text)
    return transformers_perplexity(load_reference(model_dir, "causal"), ids, window)


def token_nll(logits, targets):
    """-log softmax(logits[i])[targets[i]] per row, in float64."""
    z = logits.astype(np.float64)
    top = z.max(axis=1, keepdims=True)
    log_total = np.log(np.exp(z - top).sum(axis=1)) + top[:, 0]
    return log_total - z[np.arange(len(targets)), np.asarray(targets)]


def transformers_perplexity(model, ids, window):
    """(perplexity, tokens predicted) of token ids under a transformers model, over corral's windows."""
    total, count = 0.0, 0
    for piece in windows(ids, window):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([piece])).logits[0].numpy()
        total += token_nll(logits[:-1], piece[1:]).sum()
        count += len(piece) - 1
    return float(np.exp(total / count)), count


def test_windows_predict_every_token_once():
    ids = list(range(23))
    for w in (2, 5, 22, 23, 40):
        pieces = windows(ids, w)
        assert all(2 <= len(p) <= w for p in pieces)
        assert [t for p in pieces for t in p[1:]] == ids[1:]
        assert all(a[-1] == b[0] for a, b in zip(pieces, pieces[1:]))


@pytest.mark.parametrize("window", [48, 1000])
def test_perplexity_matches_transformers(model_dir, window):
    got = corral.perplexity(corral.LLM(model_dir), TEXT, window=window)
    want, count = reference_perplexity(model_dir, TEXT, window)
    assert got.tokens == count > 200
    assert got.perplexity == pytest.approx(want, rel=1e-5)
    assert got.mean_nll == pytest.approx(np.log(want), rel=1e-5)


def test_perplexity_cli(model_dir, tmp_path):
    file = tmp_path / "text.txt"
    file.write_text(TEXT, encoding="utf-8")
    r = corral_cli("perplexity", model_dir, file, "--window", 48)
    assert r.returncode == 0, r.stderr
    m = re.fullmatch(r"perplexity ([\d.]+) over (\d+) tokens \(([\d.]+) nats/token; a uniform model: (\d+)\)\n", r.stdout)
    assert m, r.stdout
    want, count = reference_perplexity(model_dir, TEXT, 48)
    assert float(m.group(1)) == pytest.approx(want, rel=1e-4) and int(m.group(2)) == count
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9".encode("latin-1"))
    r = corral_cli("perplexity", model_dir, bad)
    assert r.returncode == 1 and "not UTF-8" in r.stderr and "Traceback" not in r.stderr
