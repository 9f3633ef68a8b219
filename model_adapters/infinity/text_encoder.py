"""The Infinity text path: prompts -> the packed Flan-T5 features the transformer reads.

The official inference (FoundationVision/Infinity, ``tools/run_infinity.py``: ``load_tokenizer`` and
``encode_prompt``) tokenizes every prompt to exactly 512 tokens (``padding="max_length"``, ``truncation=True``;
a T5 tokenizer appends ``</s>`` and pads with ``<pad>`` on the right), runs the T5 *encoder* with the attention
mask, takes ``last_hidden_state`` in float32 and keeps only the unpadded rows of each prompt, concatenated:

    (kv_compact (sum(lens), C) float32, lens list[int], cu_seqlens int32 [0, l0, l0+l1, ...], max(lens))

which is the ``text`` tuple :func:`model_adapters.infinity.sampler.generate` takes. :func:`encode_prompts`
reproduces that for a batch; :func:`load_text_encoder` loads a local Flan-T5 folder (the official model is
google/flan-t5-xl, 2048 channels, for Infinity-2B and -8B) and :func:`random_text_encoder` builds a small seeded
stand-in for the built-in test configs, whose features carry no meaning (images made from them are noise).
See docs/infinity_text.md.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence, Union

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast, T5Config, T5EncoderModel

from graphsurgeon.checkpoint_io import check_finite_tensors, check_weights_file, shard_map
from graphsurgeon.errors import CheckpointError, ConfigError, InputError

# Every prompt is padded/truncated to this many tokens (``encode_prompt``'s ``max_length=512``); it is also the
# transformer's ``text_maxlen``, so a packed prompt can never be longer than the model accepts.
TEXT_MAXLEN = 512

# ``aug_with_positive_prompt`` in tools/run_infinity.py: a plain substring test (so "woman", "human" and
# "mandarin" all contain "man"), first match wins, the suffix is added once.
_PERSON_WORDS = ("man", "woman", "men", "women", "boy", "girl", "child", "person", "human", "adult", "teenager",
                 "employee", "employer", "worker", "mother", "father", "sister", "brother", "grandmother",
                 "grandfather", "son", "daughter")
_POSITIVE_SUFFIX = ". very smooth faces, good looking faces, face to the camera, perfect facial features"

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "spiece.model")

# T5's special-token layout, which the random stand-in keeps so that it pads, ends and masks like Flan-T5.
_T5_SPECIALS = {"<pad>": 0, "</s>": 1, "<unk>": 2}


class TextEncoder:
    """A tokenizer and a T5 encoder that together turn prompts into features ``width`` channels wide.

    ``source`` says where they came from (a folder, or the random stand-in and its seed) so that a command line
    can tell the user which text features an image was made from.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, model: T5EncoderModel, source: str) -> None:
        # The packing keeps the first ``len`` rows of each prompt: only right padding puts the pads at the end.
        if tokenizer.padding_side != "right":
            raise ConfigError(f"text tokenizer of {source} pads on the {tokenizer.padding_side}; the Infinity "
                              "packing needs right padding (as T5's tokenizer does)")
        if tokenizer.pad_token_id is None:
            raise ConfigError(f"text tokenizer of {source} has no pad token; every prompt is padded to "
                              f"{TEXT_MAXLEN} tokens")
        self.tokenizer = tokenizer
        self.model = model.eval().requires_grad_(False)
        self.source = source

    @property
    def width(self) -> int:
        """Feature channels per token: must equal the transformer's ``text_channels``."""
        return int(self.model.config.d_model)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        """The encoder's compute precision (Flan-T5 in float16 keeps its ``wo`` projections in float32)."""
        return self.model.dtype

    def __repr__(self) -> str:
        return f"TextEncoder({self.source}, width={self.width}, device={self.device}, dtype={self.dtype})"


def check_text_encoder_folder(folder: Union[str, Path]) -> Path:
    """Check that ``folder`` holds a loadable T5 encoder and tokenizer, before anything heavy is loaded.

    Raises :class:`ConfigError` naming the folder and everything that is missing. Weights must be safetensors
    (``model.safetensors`` or a sharded ``model.safetensors.index.json`` whose shards are ``.safetensors`` files
    inside the folder): pickled ``pytorch_model*.bin`` files are refused rather than unpickled. Every weight file's
    header is read (a truncated download is refused) and its tensors must cover the encoder that ``config.json``
    describes (``from_pretrained`` would fill missing ones with random values without a word).
    """
    path = Path(folder).expanduser()
    if not path.exists():
        raise ConfigError(f"text encoder folder {path} does not exist; pass a local Flan-T5 folder "
                          "(the official Infinity-2B/8B text encoder is google/flan-t5-xl)")
    if not path.is_dir():
        raise ConfigError(f"text encoder path {path} is a file; pass the Flan-T5 folder that holds config.json, "
                          "the safetensors weights and tokenizer.json")
    problems = [*_config_problems(path), *_weight_problems(path)]
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        problems.append(f"no tokenizer file (one of {', '.join(_TOKENIZER_FILES)})")
    if not problems:
        problems = _key_problems(path, _weight_files(path))
    if problems:
        raise ConfigError(f"text encoder folder {path} is not usable: {'; '.join(problems)}")
    return path


def _config_problems(path: Path) -> list[str]:
    config = path / "config.json"
    if not config.is_file():
        return ["no config.json"]
    try:
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as error:
        return [f"config.json is not a readable JSON object ({error})"]
    if model_type != "t5":
        return [f"config.json has model_type {model_type!r}; Infinity's text encoder is a T5 (flan-t5-xl)"]
    return []


def _weight_files(path: Path) -> list[Path]:
    """The safetensors files holding the weights (after :func:`_weight_problems` found none)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return [path / name for name in sorted(set(shard_map(index).values()))]
    return [path / "model.safetensors"]


def _weight_problems(path: Path) -> list[str]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(shard_map(index).values()))  # names inside the folder, as strings
        except CheckpointError as error:
            return [str(error)]
        pickled = [name for name in shards if not name.endswith(".safetensors")]
        if pickled:
            return [f"{index.name} lists shard(s) that are not .safetensors files ({', '.join(pickled[:3])}); pickled "
                    "weights are never unpickled: download the model's .safetensors shards"]
        missing = [name for name in shards if not (path / name).is_file()]
        return [f"{index.name} lists shard(s) that are absent: {', '.join(missing)}"] if missing else []
    if (path / "model.safetensors").is_file():
        return []
    if any(path.glob("pytorch_model*.bin")):
        return [("only pickled pytorch_model*.bin weights, which are not unpickled; download the model's "
                 ".safetensors files or convert the folder once with transformers' save_pretrained")]
    return [f"no weights file (one of {', '.join(_WEIGHT_FILES)})"]


def _key_problems(path: Path, files: list[Path]) -> list[str]:
    """The weight files' headers against the encoder ``config.json`` describes: unreadable (truncated) files, then
    missing or misshapen tensors. Tensors the encoder does not use (a full T5's decoder) are fine."""
    from safetensors import SafetensorError, safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        try:
            check_weights_file(file, "weights file")
            with safe_open(str(file), framework="pt") as handle:
                shapes.update({key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()})
        except CheckpointError as error:
            return [str(error)]
        except (SafetensorError, OSError) as error:
            return [f"{file.name} is not a readable safetensors file ({error}); the download may be incomplete"]
    try:
        config = T5Config.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as error:
        return [f"config.json does not describe a T5 encoder ({error})"]
    with torch.device("meta"):
        expected = T5EncoderModel(config)
    names: dict[int, list[str]] = {}  # tied tensors (the shared embedding) are stored under one of their names
    for name, tensor in [*expected.named_parameters(remove_duplicate=False), *expected.named_buffers()]:
        names.setdefault(id(tensor), []).append(name)
    missing = [group[0] for group in names.values() if not any(n in shapes for n in group)]
    state = expected.state_dict()
    wrong = [f"{n}: file {shapes[n]} vs config {tuple(state[n].shape)}" for n in state
             if n in shapes and shapes[n] != tuple(state[n].shape)]
    problems = []
    if missing:
        problems.append(f"the weights lack {len(missing)} of the encoder's {len(names)} tensors, e.g. {missing[:3]} "
                        "(an incomplete download?)")
    if wrong:
        problems.append(f"{len(wrong)} tensor(s) do not have the shape config.json gives, e.g. {wrong[:2]}")
    return problems


def _device(device: Union[str, torch.device]) -> torch.device:
    """Check the device before a model is loaded onto it, so that a bad one costs no loading time."""
    try:
        checked = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ConfigError(f"text encoder device {device!r} is not a torch device ({error})") from error
    if checked.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"text encoder device {checked} asked for, but CUDA is not available here")
    return checked


def load_text_encoder(folder: Union[str, Path], device: Union[str, torch.device] = "cpu",
                      dtype: torch.dtype = torch.float32) -> TextEncoder:
    """Load the T5 encoder and tokenizer of a local Flan-T5 folder, offline (``local_files_only``).

    The official inference loads google/flan-t5-xl as ``T5EncoderModel`` in float16 on CUDA; ``dtype`` is passed
    to ``from_pretrained`` (not applied afterwards) so that float16 keeps T5's ``wo`` projections in float32 as
    the official load does. The features are float32 whatever ``dtype`` is (see :func:`encode_prompts`).
    """
    path = check_text_encoder_folder(folder)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ConfigError(f"text encoder dtype must be a floating torch.dtype, got {dtype!r}")
    device = _device(device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = T5EncoderModel.from_pretrained(path, local_files_only=True, use_safetensors=True, dtype=dtype)
    except (OSError, ValueError, ImportError, RuntimeError) as error:
        raise ConfigError(f"text encoder folder {path} could not be loaded: {error}") from error
    # NaN weights would turn every prompt's features into NaN
    check_finite_tensors(model.state_dict(), path, remedy="download the folder again")
    return TextEncoder(tokenizer, model.to(device), source=str(path))


def augment_positive_prompt(prompt: str) -> str:
    """The official ``enable_positive_prompt`` rewrite: prompts that mention a person get a face-quality suffix."""
    if any(word in prompt for word in _PERSON_WORDS):
        return prompt + _POSITIVE_SUFFIX
    return prompt


@torch.no_grad()
def encode_prompts(encoder: TextEncoder, prompts: Sequence[str], *, positive_prompt: bool = False) -> tuple:
    """The official ``text_cond_tuple`` for a batch of prompts: ``(kv_compact, lens, cu_seqlens, max_len)``.

    Each prompt is tokenized to ``TEXT_MAXLEN`` tokens (padded, or truncated keeping the final ``</s>``) and
    encoded with its attention mask, so its features do not depend on the other prompts of the batch; the
    official code encodes one prompt per call and this equals that per prompt. ``positive_prompt`` applies
    :func:`augment_positive_prompt` first (the official default is off; it never applies to negative prompts).
    """
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
        raise InputError(f"prompts must be a list of strings, got {type(prompts).__name__}")
    if not prompts:
        raise InputError("prompts is empty: encode at least one prompt")
    not_str = [i for i, prompt in enumerate(prompts) if not isinstance(prompt, str)]
    if not_str:
        raise InputError(f"prompts must be strings; prompt(s) {not_str} are not")
    if positive_prompt:
        prompts = [augment_positive_prompt(prompt) for prompt in prompts]
    tokens = encoder.tokenizer(list(prompts), max_length=TEXT_MAXLEN, padding="max_length", truncation=True,
                               return_tensors="pt")
    mask = tokens.attention_mask.to(encoder.device)
    features = encoder.model(input_ids=tokens.input_ids.to(encoder.device), attention_mask=mask)
    features = features.last_hidden_state.float()
    per_prompt = mask.sum(dim=-1)
    lens = per_prompt.tolist()
    empty = [i for i, n in enumerate(lens) if n == 0]
    if empty:
        raise InputError(f"prompt(s) {empty} produced no tokens with the text tokenizer of {encoder.source}")
    not_finite = [i for i, (rows, n) in enumerate(zip(features, lens)) if not bool(torch.isfinite(rows[:n]).all())]
    if not_finite:
        raise InputError(f"the text encoder {encoder.source} gave NaN/Inf features for prompt(s) {not_finite} (its "
                         "weights, or an overflow in float16)")
    cu_seqlens = F.pad(per_prompt.to(torch.int32).cumsum(0, dtype=torch.int32), (1, 0))
    kv_compact = torch.cat([rows[:n] for rows, n in zip(features, lens)])
    return kv_compact, lens, cu_seqlens, max(lens)


def _byte_level_t5_tokenizer() -> PreTrainedTokenizerFast:
    """A tokenizer made in code with T5's conventions (``<pad>`` 0, ``</s>`` 1 appended, ``<unk>`` 2, right
    padding) over the 256 byte symbols, so that any text tokenizes and different prompts give different ids."""
    vocab = dict(_T5_SPECIALS)
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", _T5_SPECIALS["</s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>", model_max_length=TEXT_MAXLEN, padding_side="right")


def random_text_encoder(width: int, seed: int = 0, device: Union[str, torch.device] = "cpu") -> TextEncoder:
    """A seeded random 2-layer T5 encoder ``width`` channels wide with a byte-level tokenizer: no files, no download.

    It stands in for Flan-T5 when a built-in config runs without a text encoder: the packing, lengths and
    shapes are the official ones but the features mean nothing, so generated images are noise. The same
    ``seed`` gives the same weights (drawn on the CPU without touching the global RNG state).
    """
    if isinstance(width, bool) or not isinstance(width, int) or width <= 0:
        raise ConfigError("random text encoder width must be a positive int (the model's text_channels), "
                          f"got {width!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"random text encoder seed must be an int, got {seed!r}")
    device = _device(device)
    tokenizer = _byte_level_t5_tokenizer()
    config = T5Config(vocab_size=len(tokenizer), d_model=width, d_kv=16, d_ff=width, num_layers=2, num_heads=4,
                      feed_forward_proj="gated-gelu", dropout_rate=0.0, is_encoder_decoder=False, use_cache=False,
                      pad_token_id=_T5_SPECIALS["<pad>"], eos_token_id=_T5_SPECIALS["</s>"],
                      decoder_start_token_id=_T5_SPECIALS["<pad>"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = T5EncoderModel(config)
    return TextEncoder(tokenizer, model.to(device), source=f"random T5 stand-in (seed {seed}, width {width})")
