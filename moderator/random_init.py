"""Randomly initialized CLIP checkpoints (``moderator random-checkpoint``): for tests, demos and benchmarks.

Model weights cannot be downloaded everywhere moderator runs or is tested, so this builds a real
``transformers`` CLIP checkpoint of a named architecture (or a tiny one) with random weights and a
small byte-level BPE tokenizer, saves it with ``save_pretrained``, and marks it: a marker file next to
the weights makes every result of it say ``random-init`` in its model fingerprint. It loads through
exactly the production loading path. Everything is deterministic under ``seed``.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

try:  # the Pillow-backed image processor, as the reference pipeline resizes; releases without it have one class
    from transformers import CLIPImageProcessorPil as _ImageProcessor
except ImportError:  # pragma: no cover (transformers releases before the Pillow/torchvision split)
    # (one name for two classes across releases: mypy sees both)
    from transformers import CLIPImageProcessor as _ImageProcessor  # type: ignore[assignment]

# Marker written next to the weights: a checkpoint made here is random, and every result says so.
RANDOM_INIT_MARKER = "moderator_random_init.json"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte-level alphabet: every byte maps to one printable unicode character."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


# Words that are single tokens (mostly: BPE merges of different words can interfere) in the test
# tokenizer, as common words are in real CLIP vocabularies: prompts made of them tokenize to about
# as many tokens as with a real checkpoint, which keeps text-tower costs (and benchmarks) realistic.
# Other text falls back to one token per character.
_WORDS = """
    a activity address after an and arm as assault at attempting baby background bandage bath beach beaten
    beer being birthday blood board body book bottles boxing breastfeeding buddhist buds burning by candy
    card cartoon cat character child children church cigarette city classical classroom climbing clinic
    combat comedy containing controller cooking counter cross cuts cutting dead decoration diagram dog
    drawing drill drug drugs event explicit exposed extremist fake family fighting flag flour food for
    friends from game genitals glass gore graphic green group gun handgun handwritten harm hateful held
    herbs hindu history home horror hospital human identity illegal image in inject injury interior
    joints juice kitchen knife landscape lines liquor made makeup marble marijuana match medical medicine
    minor monster mother movie mutilation naked national noose nudity number of on operating or page paint
    paraphernalia park party passport people person pet pharmacy phone photo picture pillows pistol plastic
    plate play playing pointing powder power prescription product red religious revealing rifle room rope
    s scars scary school scrape screenshot self selfie sexual showing sky slapstick smiling smoking
    splattered sports statue stitches street sugar suicide supremacist surgery swastika swimsuit sword
    symbols syringe table tattoo temple text textbook the theatrical to toy trees underwear used
    vaccination video wall water weapon white with wrist this is
    bottle car crowd desk garden man woman night indoors outdoors close up blurry dark bright old new
    small large on top next under near holding wearing sitting standing lying floor bed window beside
    pills needle bruise fist protest sign banner cigar smoke fire knives bullets ammunition shotgun
    tank soldier uniform police officer crime scene bathtub shower lingerie bikini kiss hug couple
    teenager toddler infant stroller playground parade concert stage painting sketch comic meme poster
    magazine newspaper website logo text tablet laptop keyboard mirror camera street store market
    restaurant bar club beach pool lake forest mountain road highway bridge train bus truck bicycle
    fight kissing
"""
VOCABULARY_WORDS: tuple[str, ...] = tuple(sorted(set(_WORDS.split())))


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding of one word: merge the adjacent pair of lowest rank until none applies."""
    while len(symbols) > 1:
        candidates = [(ranks[p], i) for i, p in enumerate(itertools.pairwise(symbols)) if p in ranks]
        if not candidates:
            break
        _, i = min(candidates)
        symbols = [*symbols[:i], symbols[i] + symbols[i + 1], *symbols[i + 2 :]]
    return symbols


def build_tokenizer(max_length: int = 77, words: Iterable[str] = VOCABULARY_WORDS) -> CLIPTokenizer:
    """A byte-level CLIP tokenizer in which each of ``words`` is one token; any other text splits
    into one token per character.

    The merges are built word by word: while BPE with the merges so far leaves a word in pieces,
    a merge of its first two pieces is appended. An appended merge ranks after every earlier one,
    so it never changes how an earlier word (already one token) is merged.

    Real CLIP vocabularies put ``<|startoftext|>`` and ``<|endoftext|>`` last (49406, 49407); this
    one does too, so both pooling rules of ``CLIPTextTransformer`` (argmax of ids, or the first eos)
    pick the same position.
    """
    chars = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for ch in chars:
        vocab[ch] = len(vocab)
    for ch in chars:
        vocab[ch + "</w>"] = len(vocab)
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        while len(pieces := _bpe([*word[:-1], word[-1] + "</w>"], ranks)) > 1:
            ranks[(pieces[0], pieces[1])] = len(ranks)
            vocab.setdefault(pieces[0] + pieces[1], len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    merges = [pair for pair, _ in sorted(ranks.items(), key=lambda item: item[1])]
    # transformers types ``merges`` as strings, but its tokenizers backend takes (left, right) pairs.
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)  # type: ignore[arg-type]


# Architectures by name: (vision: hidden, layers, heads, mlp, patch, image size;
#                          text: hidden, layers, heads, mlp; projection dim)
ARCHITECTURES: dict[str, dict[str, int]] = {
    "tiny": dict(
        v_hidden=32,
        v_layers=2,
        v_heads=4,
        v_mlp=64,
        patch=8,
        image=32,
        t_hidden=32,
        t_layers=2,
        t_heads=4,
        t_mlp=64,
        proj=16,
    ),
    "ViT-B/32": dict(
        v_hidden=768,
        v_layers=12,
        v_heads=12,
        v_mlp=3072,
        patch=32,
        image=224,
        t_hidden=512,
        t_layers=12,
        t_heads=8,
        t_mlp=2048,
        proj=512,
    ),
    "ViT-B/16": dict(
        v_hidden=768,
        v_layers=12,
        v_heads=12,
        v_mlp=3072,
        patch=16,
        image=224,
        t_hidden=512,
        t_layers=12,
        t_heads=8,
        t_mlp=2048,
        proj=512,
    ),
    "ViT-L/14": dict(
        v_hidden=1024,
        v_layers=24,
        v_heads=16,
        v_mlp=4096,
        patch=14,
        image=224,
        t_hidden=768,
        t_layers=12,
        t_heads=12,
        t_mlp=3072,
        proj=768,
    ),
}


def build_clip_checkpoint(
    out_dir: str | Path,
    architecture: str = "tiny",
    seed: int = 0,
    *,
    crop_size: int | None = None,
    shortest_edge: int | None = None,
    image_mean: Sequence[float] = OPENAI_CLIP_MEAN,
    image_std: Sequence[float] = OPENAI_CLIP_STD,
) -> Path:
    """Write a randomly initialized CLIP checkpoint (model, tokenizer, image processor) to ``out_dir``.

    ``crop_size`` defaults to the architecture's image size; ``shortest_edge`` to ``crop_size``.
    """
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; known: {', '.join(ARCHITECTURES)}")
    a = ARCHITECTURES[architecture]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    vocab_size = len(tokenizer.get_vocab())
    bos, eos = (tokenizer.convert_tokens_to_ids(t) for t in ("<|startoftext|>", "<|endoftext|>"))
    config = CLIPConfig(
        text_config=dict(
            vocab_size=vocab_size,
            hidden_size=a["t_hidden"],
            intermediate_size=a["t_mlp"],
            num_hidden_layers=a["t_layers"],
            num_attention_heads=a["t_heads"],
            max_position_embeddings=77,
            projection_dim=a["proj"],
            bos_token_id=bos,
            eos_token_id=eos,
            pad_token_id=eos,
        ),
        vision_config=dict(
            hidden_size=a["v_hidden"],
            intermediate_size=a["v_mlp"],
            num_hidden_layers=a["v_layers"],
            num_attention_heads=a["v_heads"],
            image_size=a["image"],
            patch_size=a["patch"],
            projection_dim=a["proj"],
        ),
        projection_dim=a["proj"],
    )
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    crop = crop_size or a["image"]
    image_processor = _ImageProcessor(
        size={"shortest_edge": shortest_edge or crop},
        crop_size={"height": crop, "width": crop},
        image_mean=list(image_mean),
        image_std=list(image_std),
    )
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    (out / RANDOM_INIT_MARKER).write_text(json.dumps({"architecture": architecture, "seed": seed}) + "\n")
    return out


def cached_random_checkpoint(cache_dir: str | Path, architecture: str, seed: int = 0) -> Path:
    """A random-init checkpoint of ``architecture`` under ``cache_dir``, built on first use.

    Built in a private directory and renamed into place, so concurrent callers never see half a
    checkpoint. The name carries a format number: a change of what this module builds (such as the
    tokenizer's vocabulary) gets a new directory instead of a stale one.
    """
    target = Path(cache_dir) / f"random-init-{architecture.replace('/', '-')}-seed{seed}-v3"
    if (target / RANDOM_INIT_MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    build_clip_checkpoint(partial, architecture, seed=seed)
    try:
        partial.rename(target)
    except OSError:  # another process finished first: use its copy
        shutil.rmtree(partial, ignore_errors=True)
    return target


def is_random_init(model_dir: str | Path) -> dict[str, object] | None:
    """The marker of a checkpoint built here, or None for a real one."""
    marker = Path(model_dir) / RANDOM_INIT_MARKER
    if not marker.is_file():
        return None
    data = json.loads(marker.read_text())
    return data if isinstance(data, dict) else {}
