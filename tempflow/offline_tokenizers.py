"""Tokenizers and a text-encoder config built offline, for ShapesWorld's pipeline and the test pipelines: the real
CLIP BPE tokenizer from the vocabulary open-clip ships, a T5-style word-level Unigram tokenizer trained on
nothing (one token per given word, characters as the fallback), and a Qwen2 byte-level BPE tokenizer (Qwen's own
pre-tokenizer) whose small vocabulary is trained in-process on Qwen-Image's prompt template and a word list."""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import string
import tempfile
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors, trainers
from tokenizers.models import BPE, Unigram
from transformers import CLIPTokenizer, Qwen2Tokenizer, T5Config, T5TokenizerFast

_CLIP_MERGES = 49152 - 256 - 2  # the merges open-clip's SimpleTokenizer keeps
_T5_MAX_LENGTH = 512
_T5_SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2 as in T5
_DEFAULT_T5_WORDS = (
    "a an the of and with on in to next above below left right top bottom photo picture image "
    "one two three four five six seven eight nine ten "
    "red green blue yellow orange purple pink black white gray brown "
    "square circle triangle star hexagon rectangle cube sphere cat dog"
).split()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    others = [b for b in range(256) if b not in printable]
    return {b: chr(c) for b, c in zip(printable + others, printable + [256 + i for i in range(len(others))])}


@functools.cache
def _clip_vocab_dir() -> tempfile.TemporaryDirectory:
    """``vocab.json`` + ``merges.txt`` built, as open-clip does, from the BPE file open-clip ships."""
    package_dir = importlib.util.find_spec("open_clip").submodule_search_locations[0]
    with gzip.open(Path(package_dir) / "bpe_simple_vocab_16e6.txt.gz") as f:
        merges = f.read().decode("utf-8").split("\n")[1 : _CLIP_MERGES + 1]
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + [m.replace(" ", "") for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    directory = tempfile.TemporaryDirectory(prefix="tempflow-clip-tokenizer-")
    (Path(directory.name) / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (Path(directory.name) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return directory


def build_clip_tokenizer(max_length: int = 77) -> CLIPTokenizer:
    """The real CLIP tokenizer (49408 tokens, bos 49406, eos = pad 49407), padding to ``max_length``."""
    return CLIPTokenizer.from_pretrained(_clip_vocab_dir().name, model_max_length=max_length)


def _t5_backend(words: tuple[str, ...]) -> Tokenizer:
    """A SentencePiece-style Unigram tokenizer: one piece per word, characters as the fallback."""
    pieces = [(t, 0.0) for t in _T5_SPECIAL_TOKENS] + [("▁", -5.0)]
    pieces += [("▁" + w, -1.0) for w in dict.fromkeys(words)]
    pieces += [(c, -10.0) for c in string.ascii_letters + string.digits + string.punctuation]
    backend = Tokenizer(Unigram(pieces, unk_id=_T5_SPECIAL_TOKENS.index("<unk>")))
    metaspace = {"replacement": "▁", "prepend_scheme": "always", "split": True}
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(**metaspace)]
    )
    backend.decoder = decoders.Metaspace(**metaspace)
    eos_id = _T5_SPECIAL_TOKENS.index("</s>")
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", eos_id)]
    )
    return backend


def build_t5_tokenizer(
    vocab_words: list[str] | None = None, model_max_length: int = _T5_MAX_LENGTH
) -> T5TokenizerFast:
    """A T5-style tokenizer (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2) whose vocabulary is ``vocab_words``, each one
    token, plus single ASCII characters; defaults to colours, shapes, counts and spatial words."""
    words = tuple(vocab_words) if vocab_words is not None else tuple(_DEFAULT_T5_WORDS)
    pad, eos, unk = _T5_SPECIAL_TOKENS
    return T5TokenizerFast(
        tokenizer_object=_t5_backend(words),
        pad_token=pad,
        eos_token=eos,
        unk_token=unk,
        extra_ids=0,
        model_max_length=model_max_length,
    )


def tiny_t5_config(tokenizer: T5TokenizerFast, d_model: int) -> T5Config:
    """A two-layer T5 encoder config sized by ``d_model`` (shared by the test pipelines and ShapesWorld)."""
    return T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=d_model // 4,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )


QWEN_IMAGE_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
"""``QwenImagePipeline.prompt_template_encode`` (diffusers 0.42), whose first 34 tokens the pipeline drops."""
_QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
QWEN_VISION_TOKENS = ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>")
"""The special tokens around an image in Qwen2.5-VL's prompts (the processor expands ``<|image_pad|>`` to one token
per merged image patch)."""
QWEN_IMAGE_EDIT_TEMPLATE = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a new image "
    "that meets the user's requirements while maintaining consistency with the original input where appropriate."
    "<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{}<|im_end|>\n<|im_start|>assistant\n"
)
"""``QwenImageEditPipeline.prompt_template_encode`` (diffusers 0.42), whose first 64 tokens the pipeline drops."""


def build_qwen_tokenizer(vocab_words: list[str] | None = None, vision: bool = False) -> Qwen2Tokenizer:
    """A ``Qwen2Tokenizer`` (Qwen's pre-tokenizer regex and byte-level BPE) with a BPE vocabulary trained on
    :data:`QWEN_IMAGE_TEMPLATE` and ``vocab_words`` (default: colours, shapes, counts, spatial words): every word
    of the template is one token, as with Qwen's real vocabulary, so the template's prefix is the 34 tokens that
    ``QwenImagePipeline`` drops; other text falls back to bytes. ``vision``: also the image tokens and the edit
    pipeline's template (Qwen-Image-Edit). Deterministic."""
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    words = list(vocab_words) if vocab_words is not None else list(_DEFAULT_T5_WORDS)
    backend = Tokenizer(BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    specials = _QWEN_SPECIAL_TOKENS + (QWEN_VISION_TOKENS if vision else ())
    trainer = trainers.BpeTrainer(vocab_size=4096, min_frequency=1, special_tokens=list(specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    texts = [" ".join(words), "\n".join(words)]
    for template in (QWEN_IMAGE_TEMPLATE, *((QWEN_IMAGE_EDIT_TEMPLATE,) if vision else ())):
        for special in specials:
            template = template.replace(special, "\n")
        texts.insert(0, template.format(" ".join(words)))
    backend.train_from_iterator(texts, trainer)
    model = json.loads(backend.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return Qwen2Tokenizer(vocab=model["vocab"], merges=merges, additional_special_tokens=list(specials[1:]))
