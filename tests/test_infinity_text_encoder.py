"""The Infinity text path: folder checks, offline loading, the official packing of T5 features, the random stand-in.

A small random T5 encoder and a word-level tokenizer with T5's conventions are made here and saved with
``save_pretrained`` (safetensors), so nothing is downloaded. The official behaviour the packing is checked
against (FoundationVision/Infinity ``tools/run_infinity.py``: ``encode_prompt``) is re-computed here one prompt
at a time, as the official code calls it.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

from graphsurgeon import get_adapter
from graphsurgeon.errors import ConfigError, InputError
from model_adapters.infinity import build_infinity, get_scale_schedule
from model_adapters.infinity.sampler import check_text
from model_adapters.infinity.text_encoder import (TEXT_MAXLEN, TextEncoder, augment_positive_prompt,
                                                  check_text_encoder_folder, encode_prompts, load_text_encoder,
                                                  random_text_encoder)

WIDTH = 256  # infinity-tiny's text_channels
WORDS = ["a", "dog", "cat", "on", "the", "red", "sofa", "photo", "of", "man", "woman", "in", "snow"]
LONG_PROMPT = " ".join(["dog", "on", "the", "sofa"] * 150)  # 600 words: more than the 512 tokens kept
PROMPTS = ["a dog", "A photo of a red cat on the sofa in the snow", LONG_PROMPT, "zebra"]


def t5_style_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level, lower-cased, with T5's ids: <pad> 0, </s> 1 (appended to every prompt), <unk> 2."""
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{word: 3 + i for i, word in enumerate(WORDS)}}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>", model_max_length=TEXT_MAXLEN)


@pytest.fixture(scope="module")
def parts() -> tuple[PreTrainedTokenizerFast, T5EncoderModel]:
    tokenizer = t5_style_tokenizer()
    config = T5Config(vocab_size=len(tokenizer), d_model=WIDTH, d_kv=32, d_ff=384, num_layers=2, num_heads=4,
                      feed_forward_proj="gated-gelu", dropout_rate=0.0, is_encoder_decoder=False,
                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    torch.manual_seed(123)
    return tokenizer, T5EncoderModel(config).eval()


@pytest.fixture(scope="module")
def folder(parts, tmp_path_factory):
    tokenizer, model = parts
    path = tmp_path_factory.mktemp("flan-t5-small-random")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def encoder(parts) -> TextEncoder:
    tokenizer, model = parts
    return TextEncoder(tokenizer, model, source="in-memory test T5")


@pytest.fixture(scope="module")
def tiny():
    return build_infinity("infinity-tiny", seed=0)


@torch.no_grad()
def official_reference(tokenizer, model, prompts: list[str]) -> tuple:
    """The official text_cond_tuple, one prompt per encoder call, assembled by hand: 512-token max-length
    padding with truncation, masked encoder, float32 last_hidden_state, the unpadded rows of each prompt."""
    rows, lens = [], []
    for prompt in prompts:
        tokens = tokenizer(text=[prompt], max_length=512, padding="max_length", truncation=True, return_tensors="pt")
        assert tokens.input_ids.shape == (1, 512)
        n = int(tokens.attention_mask.sum())
        hidden = model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)["last_hidden_state"]
        rows.append(hidden.float()[0, :n])
        lens.append(n)
    offsets = [0]
    for n in lens:
        offsets.append(offsets[-1] + n)
    return torch.cat(rows), lens, torch.tensor(offsets, dtype=torch.int32), max(lens)


def copy_of(folder, tmp_path):
    target = tmp_path / "t5"
    shutil.copytree(folder, target)
    return target


# -- folder checks ---------------------------------------------------------------------------------------------------

def test_check_accepts_a_saved_folder(folder):
    assert check_text_encoder_folder(folder) == folder
    assert check_text_encoder_folder(str(folder)) == folder


def test_check_missing_folder_and_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist.*flan-t5-xl"):
        check_text_encoder_folder(tmp_path / "nowhere")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        check_text_encoder_folder(tmp_path / "file")


@pytest.mark.parametrize("removed, message", [
    (["config.json"], "no config.json"),
    (["model.safetensors"], "no weights file"),
    (["tokenizer.json"], "no tokenizer file"),
    (["config.json", "tokenizer.json"], "no config.json; .*no tokenizer file"),
])
def test_check_names_what_is_missing(folder, tmp_path, removed, message):
    path = copy_of(folder, tmp_path)
    for name in removed:
        (path / name).unlink()
    with pytest.raises(ConfigError, match=message) as caught:
        check_text_encoder_folder(path)
    assert str(path) in str(caught.value)


def test_check_refuses_pickled_weights_and_other_models(folder, tmp_path):
    path = copy_of(folder, tmp_path)
    (path / "model.safetensors").rename(path / "pytorch_model.bin")
    with pytest.raises(ConfigError, match="pickled pytorch_model.*bin"):
        check_text_encoder_folder(path)
    (path / "pytorch_model.bin").rename(path / "model.safetensors")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(dict(config, model_type="bert")))
    with pytest.raises(ConfigError, match="model_type 'bert'"):
        check_text_encoder_folder(path)


def test_check_sharded_index(folder, tmp_path):
    path = copy_of(folder, tmp_path)
    (path / "model.safetensors").rename(path / "model-00001-of-00002.safetensors")
    weight_map = {"shared.weight": "model-00001-of-00002.safetensors", "x": "model-00002-of-00002.safetensors"}
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ConfigError, match="absent: model-00002-of-00002.safetensors"):
        check_text_encoder_folder(path)


def test_load_refuses_bad_dtype(folder):
    with pytest.raises(ConfigError, match="dtype"):
        load_text_encoder(folder, dtype=torch.int64)


# -- loading and packing ---------------------------------------------------------------------------------------------

def test_load_round_trip_equals_in_memory(folder, encoder):
    loaded = load_text_encoder(folder)
    assert (loaded.width, loaded.device, loaded.dtype) == (WIDTH, torch.device("cpu"), torch.float32)
    assert loaded.source == str(folder)
    ours, theirs = encode_prompts(loaded, PROMPTS), encode_prompts(encoder, PROMPTS)
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[2], theirs[2])
    assert ours[1] == theirs[1] and ours[3] == theirs[3]


def test_load_in_float16_keeps_features_float32(folder):
    half = load_text_encoder(folder, dtype=torch.float16)
    assert half.dtype == torch.float16
    kv = encode_prompts(half, ["a dog"])[0]
    assert kv.dtype == torch.float32 and kv.shape == (3, WIDTH)


def test_packing_equals_the_official(encoder, parts):
    kv, lens, cu, max_len = encode_prompts(encoder, PROMPTS)
    ref_kv, ref_lens, ref_cu, ref_max = official_reference(*parts, PROMPTS)
    # "a dog" + </s>; 12 words + </s> ("A" is lower-cased); 511 words + </s> (truncated); "zebra" is <unk> + </s>.
    assert lens == ref_lens == [3, 13, 512, 2]
    assert all(type(n) is int for n in lens)
    assert cu.dtype == torch.int32 and cu.tolist() == ref_cu.tolist() == [0, 3, 16, 528, 530]
    assert max_len == ref_max == 512
    assert kv.dtype == torch.float32 and kv.shape == (530, WIDTH)
    torch.testing.assert_close(kv, ref_kv, rtol=1e-5, atol=1e-5)


def test_truncation_keeps_511_tokens_and_the_end_token(encoder, parts):
    model = parts[1]
    words = LONG_PROMPT.split()[:511]
    ids = torch.tensor([[3 + WORDS.index(word) for word in words] + [1]])
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[0]
    kv, lens, _, _ = encode_prompts(encoder, [LONG_PROMPT])
    assert lens == [512]
    torch.testing.assert_close(kv, expected, rtol=1e-5, atol=1e-5)


def test_prompt_features_do_not_depend_on_the_batch(encoder):
    kv, lens, cu, _ = encode_prompts(encoder, PROMPTS)
    alone = encode_prompts(encoder, [PROMPTS[1]])
    torch.testing.assert_close(kv[int(cu[1]):int(cu[2])], alone[0], rtol=1e-5, atol=1e-5)
    assert alone[1] == [lens[1]] and alone[3] == lens[1]


def test_encode_rejects_bad_prompts(encoder):
    with pytest.raises(InputError, match="empty"):
        encode_prompts(encoder, [])
    with pytest.raises(InputError, match="list of strings, got str"):
        encode_prompts(encoder, "a dog")
    with pytest.raises(InputError, match=r"\[1\] are not"):
        encode_prompts(encoder, ["a dog", 3])


def test_positive_prompt_is_the_official_rewrite(encoder):
    suffix = ". very smooth faces, good looking faces, face to the camera, perfect facial features"
    assert augment_positive_prompt("a dog") == "a dog"
    assert augment_positive_prompt("a woman") == "a woman" + suffix  # once, though "woman" also contains "man"
    assert augment_positive_prompt("a mandarin tree") == "a mandarin tree" + suffix  # substring test, as official
    plain = encode_prompts(encoder, ["a man"])
    positive = encode_prompts(encoder, ["a man"], positive_prompt=True)
    assert plain[1] == [3] and positive[1][0] > 3


# -- the Infinity model reads the tuple ------------------------------------------------------------------------------

def test_tuple_passes_check_text_and_generates(encoder, tiny):
    text = encode_prompts(encoder, ["a dog", "a photo of a cat on the sofa"])
    _, lens, cu, max_len = check_text(text, tiny.Ct5, tiny.text_maxlen, tiny.pos_start.device, tiny.pos_start.dtype)
    assert lens == text[1] and max_len == max(text[1]) and cu.dtype == torch.int32
    schedule = get_scale_schedule(1.0, "0.06M")
    out = get_adapter("infinity").generate(tiny, text=text, scale_schedule=schedule, cfg=3.0, seed=0)
    _, h, w = schedule[-1]
    assert out.summed_codes.shape[0] == 2 and tuple(out.summed_codes.shape[-2:]) == (h, w)
    assert torch.isfinite(out.summed_codes).all()


def test_random_stand_in_runs_the_model(tiny):
    text = encode_prompts(random_text_encoder(tiny.Ct5), ["a dog on a sofa", LONG_PROMPT])
    assert text[1][1] == 512 and text[3] == 512
    check_text(text, tiny.Ct5, tiny.text_maxlen, tiny.pos_start.device, tiny.pos_start.dtype)
    out = get_adapter("infinity").generate(tiny, text=text, scale_schedule=get_scale_schedule(1.0, "0.06M"),
                                           cfg=3.0, seed=0)
    assert torch.isfinite(out.summed_codes).all()


# -- the random stand-in ---------------------------------------------------------------------------------------------

def test_random_text_encoder_is_seeded_and_as_wide_as_asked():
    state = torch.random.get_rng_state()
    first, again, other = (random_text_encoder(WIDTH, seed=seed) for seed in (0, 0, 1))
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is left alone
    assert first.width == WIDTH and "seed 0" in first.source
    prompts = ["a dog", "an astronaut riding a horse"]
    a, b, c = (encode_prompts(enc, prompts) for enc in (first, again, other))
    assert torch.equal(a[0], b[0]) and a[1] == b[1] == c[1]
    assert not torch.allclose(a[0], c[0])
    assert a[1] == [len("a dog") + 1, len("an astronaut riding a horse") + 1]  # one token per byte, plus </s>
    assert a[0].shape == (sum(a[1]), WIDTH)
    assert random_text_encoder(48).width == 48


def test_random_text_encoder_rejects_bad_width():
    for width in (0, -3, 2.5, True):
        with pytest.raises(ConfigError, match="width"):
            random_text_encoder(width)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised where CUDA is absent")
def test_cuda_device_without_cuda_is_a_config_error(folder):
    with pytest.raises(ConfigError, match="CUDA is not available"):
        random_text_encoder(8, device="cuda")
    with pytest.raises(ConfigError, match="CUDA is not available"):
        load_text_encoder(folder, device="cuda")
