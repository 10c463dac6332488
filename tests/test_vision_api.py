"""Image prompts through the Python API (LLM.generate, logits, chat, stream): vLLM's
multi_modal_data and OpenAI content parts, against transformers on a tiny multimodal checkpoint
with the reference preprocessing and token layout of tiny_vision."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

import corral
import tiny_vision as tv

VARIANT = "tile56"
TILE = tv.VISION_VARIANTS[VARIANT]["image_size"]
PER_TILE = tv.tokens_per_tile(VARIANT)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tv.build(VARIANT, tmp_path_factory.mktemp("vision-api"))
    # The processor's settings as a v4 checkpoint saves them: tile size and max tiles.
    (path / "preprocessor_config.json").write_text(
        '{"image_processor_type": "Llama4ImageProcessorFast", "size": {"height": %d, "width": %d}, "max_patches": 4}'
        % (TILE, TILE)
    )
    return path, tv.load_reference(path)


@pytest.fixture(scope="module")
def llm(model):
    return corral.LLM(model[0], dtype="float32", kv_cache_dtype="float32", block_size=4, num_threads=2)


def encode(path, text):
    return Tokenizer.from_file(str(path / "tokenizer.json")).encode(text, add_special_tokens=False).ids


def reference_prompt(path, text, images):
    """Token ids and pixel values as transformers' processor makes them: each <|image|> replaced by
    its image's tokens, the text pieces encoded around them."""
    pieces = text.split("<|image|>")
    ids, pixels = encode(path, pieces[0]), []
    for image, piece in zip(images, pieces[1:], strict=True):
        pv, rows, cols = tv.preprocess(np.asarray(image.convert("RGB")), TILE, max_tiles=4)
        ids += tv.image_token_ids(rows, cols, PER_TILE) + encode(path, piece)
        pixels.append(pv)
    return ids, np.concatenate(pixels)


def pil(h, w, seed):
    return Image.fromarray(tv.random_image(h, w, seed))


def greedy_reference(ref, ids, pixels, n):
    with torch.no_grad():
        out = ref.generate(input_ids=torch.tensor([ids]), pixel_values=torch.from_numpy(pixels),
                           attention_mask=torch.ones(1, len(ids), dtype=torch.long), do_sample=False,
                           max_new_tokens=n, min_new_tokens=n, pad_token_id=0)
    return out[0, len(ids):].tolist()


GREEDY = corral.SamplingParams(max_tokens=6, ignore_eos=True, temperature=0)


def test_generate_with_multi_modal_data(model, llm):
    path, ref = model
    images = [pil(70, 120, 1), pil(30, 40, 2)]
    text = "<|begin_of_text|>First <|image|> then <|image|> and the end"
    ids, pixels = reference_prompt(path, text, images)
    out = llm.generate({"prompt": text, "multi_modal_data": {"image": images}}, GREEDY)[0]
    assert out.prompt_token_ids == ids
    assert out.outputs[0].token_ids == greedy_reference(ref, ids, pixels, 6)
    # The same from token ids holding one <|image|> id per image, and from already expanded ids.
    placeholders = encode(path, text)
    for prompt_ids in (placeholders, ids):
        again = llm.generate({"prompt_token_ids": prompt_ids, "multi_modal_data": {"image": images}}, GREEDY)[0]
        assert again.outputs[0].token_ids == out.outputs[0].token_ids


def test_logits_with_an_image(model, llm):
    path, ref = model
    image = pil(57, 200, 3)
    text = "<|begin_of_text|>Look: <|image|> ok"
    ids, pixels = reference_prompt(path, text, [image])
    want = tv.reference(ref, ids, pixels)
    got = llm.logits({"prompt": text, "multi_modal_data": {"image": image}})
    assert np.abs(got - want).max() / np.abs(want).max() <= 1e-4
    # Batched with a text prompt: the same rows.
    both = llm.logits([{"prompt": text, "multi_modal_data": {"image": image}}, [1, 5, 6]])
    np.testing.assert_array_equal(both[0], got)


def data_url(image, fmt="PNG"):
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def test_chat_with_image_parts_over_several_turns(model, llm, tmp_path):
    path, ref = model
    a, b = pil(70, 120, 4), pil(30, 40, 5)
    b.save(tmp_path / "b.png")
    messages = [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(a)}},
                                     {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": "A thing."},
        {"role": "user", "content": [{"type": "text", "text": "And this?"},
                                     {"type": "image_url", "image_url": {"url": f"file://{tmp_path / 'b.png'}"}}]},
    ]
    # transformers' rendering of the same conversation with {"type": "image"} parts.
    hf_tok = PreTrainedTokenizerFast.from_pretrained(path)
    hf_messages = [{**m, "content": [p if p["type"] == "text" else {"type": "image"} for p in m["content"]]}
                   if isinstance(m["content"], list) else m for m in messages]
    text = hf_tok.apply_chat_template(hf_messages, tokenize=False, add_generation_prompt=True)
    assert text.count("<|image|>") == 2
    ids, pixels = reference_prompt(path, text, [a, b])
    out = llm.chat(messages, GREEDY)[0]
    assert out.prompt_token_ids == ids
    assert out.outputs[0].token_ids == greedy_reference(ref, ids, pixels, 6)
    # {"type": "image", "image": PIL} parts are the same images.
    pil_messages = [{**m, "content": [{"type": "image", "image": img} if p["type"] == "image_url" else p
                                      for p in m["content"]]} if isinstance(m["content"], list) else m
                    for m, img in zip(messages, [a, None, b])]
    assert llm.chat(pil_messages, GREEDY)[0].outputs[0].token_ids == out.outputs[0].token_ids
    # Streaming gives the same text.
    streamed = "".join(llm.stream_chat(messages, GREEDY))
    assert streamed == out.outputs[0].text


def test_image_prompt_errors(model, llm):
    path, _ = model
    image = pil(70, 120, 6)
    with pytest.raises(corral.InvalidInputError, match="1 <\\|image\\|> placeholders for 2 images"):
        llm.generate({"prompt": "a <|image|> b", "multi_modal_data": {"image": [image, image]}})
    with pytest.raises(corral.InvalidInputError, match="image 0"):
        llm.generate({"prompt": "a <|image|> b", "multi_modal_data": {"image": b"not an image"}})
    with pytest.raises(corral.InvalidInputError, match="only 'image'"):
        llm.generate({"prompt": "a", "multi_modal_data": {"video": image}})
    small = corral.LLM(path, max_model_len=24, block_size=4, num_threads=2)
    with pytest.raises(corral.InvalidInputError, match="max_model_len 24"):
        small.generate({"prompt": "a <|image|> b", "multi_modal_data": {"image": pil(200, 200, 7)}})
    limited = corral.LLM(path, max_images_per_prompt=1, block_size=4, num_threads=2)
    with pytest.raises(corral.InvalidInputError, match="max_images_per_prompt 1"):
        limited.generate({"prompt": "<|image|><|image|>", "multi_modal_data": {"image": [image, image]}})
    text_only = corral.LLM(path, max_images_per_prompt=0, block_size=4, num_threads=2)
    with pytest.raises(corral.InvalidInputError, match="takes none"):
        text_only.generate({"prompt": "<|image|>", "multi_modal_data": {"image": image}})
    # The engine still works after the refusals.
    assert llm.generate({"prompt": "a <|image|> b", "multi_modal_data": {"image": image}}, GREEDY)[0].finished


def test_sixteen_tiles_and_many_images(tmp_path):
    """Large images at the published max of 16 tiles, and five images in one prompt."""
    path = tv.build(VARIANT, tmp_path / "m")
    ref = tv.load_reference(path)
    llm = corral.LLM(path, dtype="float32", kv_cache_dtype="float32", num_threads=2)
    images = [pil(900, 250, 8), pil(40, 40, 9), pil(200, 200, 10), pil(10, 300, 11), pil(500, 500, 12)]
    text = "<|begin_of_text|>" + " and ".join(["<|image|>"] * 5)
    pieces = text.split("<|image|>")
    ids, pixels = encode(path, pieces[0]), []
    for image, piece in zip(images, pieces[1:]):
        pv, rows, cols = tv.preprocess(np.asarray(image), TILE, max_tiles=16)
        ids += tv.image_token_ids(rows, cols, PER_TILE) + encode(path, piece)
        pixels.append(pv)
    assert max(len(p) for p in pixels) == 17  # 16 tiles and the global one
    (path / "preprocessor_config.json").write_text('{"size": {"height": %d, "width": %d}, "max_patches": 16}' % (TILE, TILE))
    llm = corral.LLM(path, dtype="float32", kv_cache_dtype="float32", num_threads=2)
    got = llm.logits({"prompt": text, "multi_modal_data": {"image": images}})
    want = tv.reference(ref, ids, np.concatenate(pixels))
    assert np.abs(got - want).max() / np.abs(want).max() <= 1e-4


def test_cli_generate_and_chat_with_images(model, llm, tmp_path):
    from test_cli import corral_cli

    path, _ = model
    a, b = pil(70, 120, 13), pil(30, 40, 14)
    a.save(tmp_path / "a.png")
    b.save(tmp_path / "b.jpg", quality=95)
    flags = ("--max-tokens", 6, "--ignore-eos", "--dtype", "float32", "--kv-cache-dtype", "float32", "--quiet")
    r = corral_cli("generate", path, "Compare <|image|> with <|image|>", "--image", tmp_path / "a.png",
                   "--image", tmp_path / "b.jpg", *flags)
    assert r.returncode == 0, r.stderr
    params = corral.SamplingParams(max_tokens=6, ignore_eos=True)
    want = llm.generate({"prompt": "Compare <|image|> with <|image|>",
                         "multi_modal_data": {"image": [str(tmp_path / "a.png"), str(tmp_path / "b.jpg")]}},
                        params)[0].outputs[0].text
    assert r.stdout == want + "\n"
    # chat: --image goes with the first turn, /image with the next one.
    r = corral_cli("chat", path, "--image", tmp_path / "a.png", *flags,
                   stdin=f"what is it\n/image {tmp_path / 'b.jpg'}\nand this\n/image {tmp_path / 'nope.png'}\n")
    assert r.returncode == 0, r.stderr
    history = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": (tmp_path / "a.png").as_uri()}},
                                            {"type": "text", "text": "what is it"}]}]
    first = llm.chat(history, params)[0].outputs[0].text
    history += [{"role": "assistant", "content": first},
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": (tmp_path / "b.jpg").as_uri()}},
                                             {"type": "text", "text": "and this"}]}]
    second = llm.chat(history, params)[0].outputs[0].text
    assert r.stdout == first + "\n" + second + "\n" + f"no such file: {tmp_path / 'nope.png'}\n"
    # A bad image file is one line of error, exit status 1.
    (tmp_path / "bad.png").write_bytes(b"not a png")
    r = corral_cli("generate", path, "x", "--image", tmp_path / "bad.png", *flags)
    assert r.returncode == 1 and "bad.png" in r.stderr and "Traceback" not in r.stderr


def test_server_chat_with_image_parts(model, llm, tmp_path):
    """corral serve takes OpenAI image_url parts (data: URLs; file:// only under
    --allowed-local-media-path) and answers as LLM.chat does; bad images are 400s."""
    import httpx
    import openai
    from server_process import ServerProcess

    path, _ = model
    a, b = pil(70, 120, 15), pil(30, 40, 16)
    (tmp_path / "media").mkdir()
    b.save(tmp_path / "media" / "b.png")
    server = ServerProcess(str(path), "--dtype", "float32", "--kv-cache-dtype", "float32", "--quiet",
                           "--allowed-local-media-path", str(tmp_path / "media"))
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
        content = [{"type": "text", "text": "Compare"}, {"type": "image_url", "image_url": {"url": data_url(a)}},
                   {"type": "image_url", "image_url": {"url": (tmp_path / "media" / "b.png").as_uri()}}]
        reply = client.chat.completions.create(model=str(path), messages=[{"role": "user", "content": content}],
                                               max_tokens=6, temperature=0)
        want = llm.chat([{"role": "user", "content": content}], corral.SamplingParams(max_tokens=6))[0]
        assert reply.choices[0].message.content == want.outputs[0].text
        assert reply.usage.prompt_tokens == len(want.prompt_token_ids)
        # Streaming: the same text.
        stream = client.chat.completions.create(model=str(path), messages=[{"role": "user", "content": content}],
                                                max_tokens=6, temperature=0, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == want.outputs[0].text

        def status(url):
            body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}],
                    "max_tokens": 2}
            r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
            return r.status_code, r.json().get("error", {}).get("message", "")

        (tmp_path / "secret.png").write_bytes((tmp_path / "media" / "b.png").read_bytes())
        code, message = status((tmp_path / "secret.png").as_uri())
        assert code == 400 and "must lie under" in message
        code, message = status("data:image/png;base64,bm90IGFuIGltYWdl")
        assert code == 400 and "image" in message
        code, message = status("ftp://example.com/a.png")
        assert code == 400 and "scheme" in message
        assert httpx.get(server.url + "/health").status_code == 200
    finally:
        server.stop()
    # Without the flag, file:// URLs are refused.
    server = ServerProcess(str(path), "--quiet")
    try:
        body = {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": (tmp_path / "media" / "b.png").as_uri()}}]}], "max_tokens": 2}
        r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 400 and "--allowed-local-media-path" in r.json()["error"]["message"]
    finally:
        server.stop()


def test_expanded_token_ids_need_no_tokenizer(model, llm):
    path, _ = model
    image = pil(70, 120, 17)
    ids, _ = reference_prompt(path, "<|begin_of_text|>see <|image|> now", [image])
    bare = corral.LLM(path, skip_tokenizer_init=True, dtype="float32", kv_cache_dtype="float32", block_size=4,
                      num_threads=2)
    prompt = {"prompt_token_ids": ids, "multi_modal_data": {"image": image}}
    np.testing.assert_array_equal(bare.logits(prompt), llm.logits(prompt))
    with pytest.raises(corral.InvalidInputError, match="tokenizer"):  # placeholders need its image tokens
        bare.logits({"prompt_token_ids": encode(path, "see <|image|>"), "multi_modal_data": {"image": image}})
