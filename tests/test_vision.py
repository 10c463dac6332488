"""The vision encoder and image prompts in the C++ engine, against transformers'
Llama4ForConditionalGeneration on tiny random checkpoints (several vision configs, fp32 and bf16
weights, single- and multi-tile images, several images per prompt)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tiny_vision as tv
from corral import _core
from tiny_vision import IMAGE_START, PATCH

# (height, width) of test images: 1 tile, 2x1, 2x2 with a global tile, odd sizes.
SIZES = [(30, 40), (120, 50), (70, 120), (57, 200)]


def engine(path, **options):
    o = _core.EngineOptions()
    o.block_size = 4
    o.num_threads = 2
    o.dtype = "float32"
    for k, v in options.items():
        setattr(o, k, v)
    return _core.Engine(str(path), o)


def greedy(n):
    p = _core.SamplingParams()
    p.ignore_eos = True
    p.max_tokens = n
    return p


@pytest.fixture(scope="module", params=sorted(tv.VISION_VARIANTS))
def variant(request):
    return request.param


@pytest.fixture(scope="module")
def fp32_model(variant, tmp_path_factory):
    path = tv.build(variant, tmp_path_factory.mktemp(f"vision-{variant}"))
    return variant, path, tv.load_reference(path)


def images_and_prompt(variant, sizes, seed=0, text=(5, 6, 7)):
    """Preprocessed images (reference preprocessing) and a prompt holding each image's tokens."""
    tile = tv.VISION_VARIANTS[variant]["image_size"]
    ids, pixels = [1, 3, 9, 4], []
    for i, (h, w) in enumerate(sizes):
        pv, rows, cols = tv.preprocess(tv.random_image(h, w, seed + i), tile, max_tiles=4)
        pixels.append(pv)
        ids += list(text) + tv.image_token_ids(rows, cols, tv.tokens_per_tile(variant))
    return ids + [8, 10, 11], pixels


def relative(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_image_features_match_transformers(fp32_model):
    variant, path, ref = fp32_model
    eng = engine(path)
    for h, w in SIZES:
        pv, _, _ = tv.preprocess(tv.random_image(h, w, h), tv.VISION_VARIANTS[variant]["image_size"], max_tiles=4)
        with torch.no_grad():
            want = ref.get_image_features(pixel_values=torch.from_numpy(pv)).pooler_output
        want = want.reshape(-1, want.shape[-1]).double().numpy()
        got = eng.encode_image(pv)
        assert got.shape == want.shape
        assert relative(got, want) <= 1e-4, (h, w)


@pytest.mark.parametrize("sizes", [[(30, 40)], [(70, 120)], [(120, 50), (30, 40), (57, 200)]])
def test_logits_and_greedy_match_transformers(fp32_model, sizes):
    variant, path, ref = fp32_model
    ids, pixels = images_and_prompt(variant, sizes)
    want = tv.reference(ref, ids, np.concatenate(pixels))
    eng = engine(path)
    got = eng.prompt_logits([ids], [pixels])[0]
    assert relative(got, want) <= 1e-4
    # Greedy continuation (the features are encoded in the step that reaches them).
    with torch.no_grad():
        out = ref.generate(input_ids=torch.tensor([ids]), pixel_values=torch.from_numpy(np.concatenate(pixels)),
                           attention_mask=torch.ones(1, len(ids), dtype=torch.long), do_sample=False,
                           max_new_tokens=6, min_new_tokens=6, pad_token_id=0)
    rid = eng.add_request(ids, greedy(6), pixels)
    tokens = []
    while eng.has_unfinished():
        tokens += [t for u in eng.step() if u.request_id == rid for t in u.new_token_ids]
    assert tokens == out[0, len(ids):].tolist()


@pytest.mark.cuda
@pytest.mark.parametrize("sizes", [[(70, 120)], [(120, 50), (30, 40)]])
def test_vision_on_cuda(fp32_model, sizes):
    """device="cuda": the tower, the projector and the text model on the GPU: features and logits
    within 1e-4 of transformers (fp32), and greedy tokens equal to the CPU's."""
    variant, path, ref = fp32_model
    ids, pixels = images_and_prompt(variant, sizes)
    eng = engine(path, device="cuda")
    with torch.no_grad():
        want = ref.get_image_features(pixel_values=torch.from_numpy(pixels[0])).pooler_output
    assert relative(eng.encode_image(pixels[0]), want.reshape(-1, want.shape[-1]).double().numpy()) <= 1e-4
    assert relative(eng.prompt_logits([ids], [pixels])[0], tv.reference(ref, ids, np.concatenate(pixels))) <= 1e-4

    def greedy_tokens(e):
        rid, out = e.add_request(ids, greedy(6), pixels), []
        while e.has_unfinished():
            out += [t for u in e.step() if u.request_id == rid for t in u.new_token_ids]
        return out

    assert greedy_tokens(eng) == greedy_tokens(engine(path))


def test_prompt_split_over_steps_and_batched_with_others(fp32_model):
    """A prompt whose image tokens are computed over several steps (max_num_batched_tokens), in
    the same steps as other requests with and without images, gives the same tokens as alone."""
    variant, path, _ = fp32_model
    a_ids, a_px = images_and_prompt(variant, [(70, 120)], seed=1)
    b_ids, b_px = images_and_prompt(variant, [(30, 40), (120, 50)], seed=2)
    c_ids = [1, 5, 6, 7, 8, 9]

    def run(eng, reqs):
        rids = [eng.add_request(ids, greedy(5), px) for ids, px in reqs]
        out = {r: [] for r in rids}
        while eng.has_unfinished():
            for u in eng.step():
                out[u.request_id] += list(u.new_token_ids)
        return [out[r] for r in rids]

    reqs = [(a_ids, a_px), (c_ids, []), (b_ids, b_px)]
    solo = [run(engine(path), [r])[0] for r in reqs]
    assert run(engine(path, max_num_batched_tokens=7), reqs) == solo
    assert run(engine(path, enable_prefix_caching=False), reqs) == solo


def test_prefix_cache_keys_cover_the_pixels(fp32_model):
    variant, path, _ = fp32_model
    ids, px_a = images_and_prompt(variant, [(70, 120)], seed=3)
    _, px_b = images_and_prompt(variant, [(70, 120)], seed=4)  # same size: same tokens, other pixels
    eng = engine(path)
    plain = engine(path, enable_prefix_caching=False)
    first = eng.prompt_logits([ids], [px_a])[0]
    hits = eng.stats()["prefix_cache_hit_tokens"]

    def generate(e, px):
        rid = e.add_request(ids, greedy(4), px)
        toks = []
        while e.has_unfinished():
            toks += [t for u in e.step() if u.request_id == rid for t in u.new_token_ids]
        return toks

    # Another image after the same text: only the blocks before its first image token may hit.
    got_b = generate(eng, px_b)
    hit_b = eng.stats()["prefix_cache_hit_tokens"] - hits
    assert hit_b <= ids.index(PATCH)
    assert got_b == generate(plain, px_b)
    # The same image again: its blocks hit, and the tokens are those computed without the cache.
    before = eng.stats()["prefix_cache_hit_tokens"]
    assert generate(eng, px_a) == generate(plain, px_a)
    assert eng.stats()["prefix_cache_hit_tokens"] - before > ids.index(PATCH)
    assert relative(eng.prompt_logits([ids], [px_a])[0], first) == 0.0


@pytest.mark.parametrize("variant", ["tile56", "quarter"])
def test_bf16_weights_against_fp32_transformers(variant, tmp_path):
    """bf16 weights: the features with the default products (activations rounded to bf16) within
    2e-2 of fp32 transformers on the same weights, and the logits with the exact products too.
    (With the default products the text model's logits are checked against a reference rounded
    the same way in test_model.py: a rounded input flips some tokens' top-1 expert.)"""
    path = tv.build(variant, tmp_path / "bf16", dtype=torch.bfloat16)
    ref = tv.load_reference(path)  # the bf16 weights, upcast exactly
    ids, pixels = images_and_prompt(variant, [(70, 120), (30, 40)])
    with torch.no_grad():
        features = ref.get_image_features(pixel_values=torch.from_numpy(pixels[0])).pooler_output
    features = features.reshape(-1, features.shape[-1]).double().numpy()
    assert relative(engine(path, dtype="auto").encode_image(pixels[0]), features) <= 2e-2
    want = tv.reference(ref, ids, np.concatenate(pixels))
    got = engine(path, kv_cache_dtype="float32").prompt_logits([ids], [pixels])[0]
    assert relative(got, want) <= 2e-2


def test_image_errors(fp32_model, tmp_path):
    variant, path, _ = fp32_model
    eng = engine(path)
    ids, pixels = images_and_prompt(variant, [(70, 120)])
    with pytest.raises(_core.InvalidInputError, match="image tokens"):
        eng.add_request(ids[:-6] + [8], greedy(2), pixels + pixels)  # too few <|patch|> for two images
    with pytest.raises(_core.InvalidInputError, match="image tokens"):
        eng.add_request(ids + [PATCH], greedy(2), pixels)  # one <|patch|> too many
    with pytest.raises(_core.InvalidInputError, match="pixel_values holds"):
        eng.add_request(ids, greedy(2), [pixels[0][:, :, :-1]])
    with pytest.raises(_core.ShapeError, match="dimensions"):
        eng.add_request(ids, greedy(2), [pixels[0][0]])
    bad = pixels[0].copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(_core.InvalidInputError, match="not finite"):
        eng.add_request(ids, greedy(2), [bad])
    with pytest.raises(_core.InvalidInputError, match="max_images_per_prompt 1"):
        engine(path, max_images_per_prompt=1).add_request(ids + ids[4:], greedy(2), pixels + pixels)
    no_vision = engine(path, max_images_per_prompt=0)
    assert no_vision.vision["hidden_size"] == 0
    with pytest.raises(_core.InvalidInputError, match="vision encoder is not loaded"):
        no_vision.add_request(ids, greedy(2), pixels)
    # The engine still serves other requests after refusing these.
    rid = eng.add_request(ids, greedy(2), pixels)
    done = []
    while eng.has_unfinished():
        done += [u.request_id for u in eng.step() if u.finished]
    assert done == [rid]


def test_text_only_model_refuses_images(tmp_path):
    from tiny_models import build
    path = build("scout", "causal", torch.float32, tmp_path / "text")
    eng = engine(path)
    assert eng.vision["hidden_size"] == 0
    with pytest.raises(_core.InvalidInputError, match="takes none"):
        eng.add_request([1, 2, 3], greedy(2), [np.zeros((1, 3, 8, 8), np.float32)])


def test_vision_info(fp32_model):
    variant, path, _ = fp32_model
    v = engine(path).vision
    cfg = tv.VISION_VARIANTS[variant]
    assert (v["image_size"], v["patch_size"], v["image_token_id"]) == (cfg["image_size"], cfg["patch_size"], PATCH)
    assert v["tokens_per_tile"] == tv.tokens_per_tile(variant)
    assert IMAGE_START != PATCH
