"""The CLIP tokenizer of Stable Diffusion, built offline: its vocabulary is derived from the CLIP
BPE merges file that ships inside the `open_clip_torch` package, so nothing is downloaded."""

from __future__ import annotations

import gzip
import importlib.util
import json
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch

from retrack.errors import InputError

if TYPE_CHECKING:  # transformers loads lazily: importing it costs seconds
    from transformers import CLIPTokenizer

CLIP_CONTEXT_LENGTH = 77
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# The CLIP BPE vocabulary: 256 byte symbols, their end-of-word forms, then the first
# 49152 - 256 - 2 merges of the file, then the two special tokens (49408 entries in all).
CLIP_NUM_MERGES = 49152 - 256 - 2


def open_clip_bpe_path() -> Path:
    """The BPE vocabulary file shipped in `open_clip_torch`, found without importing open_clip
    (its import pulls torchvision, which cannot be installed next to the CPU torch build here)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("open_clip_torch is not installed; install it with `pip install --no-deps open_clip_torch`")
    path = Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise InputError(f"{path} is missing from the open_clip_torch package")
    return path


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map of the 256 byte values to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def clip_vocab_from_bpe(bpe_path: str | Path | None = None) -> tuple[dict[str, int], list[str]]:
    """(vocab, merges) of the CLIP tokenizer, derived from the BPE merges file as CLIP does."""
    path = Path(bpe_path) if bpe_path is not None else open_clip_bpe_path()
    lines = gzip.open(path).read().decode("utf-8").split("\n")
    merges = lines[1 : CLIP_NUM_MERGES + 1]  # line 0 is a version header
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols]
    vocab += ["".join(m.split()) for m in merges]
    vocab += [BOS, EOS]
    return {tok: n for n, tok in enumerate(vocab)}, merges


def _write_files(out: Path, vocab: dict[str, int], merges: Sequence[str]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return out


def write_clip_tokenizer_files(out_dir: str | Path, bpe_path: str | Path | None = None) -> Path:
    """Write `vocab.json` and `merges.txt` (the files a diffusers `tokenizer/` folder holds)."""
    return _write_files(Path(out_dir), *clip_vocab_from_bpe(bpe_path))


def write_tokenizer_vocab_files(out_dir: str | Path, tokenizer: CLIPTokenizer) -> Path:
    """The same two files for a loaded tokenizer (transformers 5 saves only tokenizer.json;
    older readers need the classic files)."""
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return _write_files(Path(out_dir), model["vocab"], merges)


@lru_cache(maxsize=2)
def _cached_vocab(bpe_path: str | None) -> tuple[dict[str, int], list[str]]:
    return clip_vocab_from_bpe(bpe_path)


def clip_tokenizer(bpe_path: str | Path | None = None) -> CLIPTokenizer:
    """A real `CLIPTokenizer` (49408 tokens, 77 positions) built offline from the BPE vocabulary."""
    from transformers import CLIPTokenizer

    vocab, merges = _cached_vocab(str(bpe_path) if bpe_path is not None else None)
    return CLIPTokenizer(vocab=vocab, merges=[tuple(m.split()) for m in merges], model_max_length=CLIP_CONTEXT_LENGTH)


def tokenize(tokenizer, captions: Sequence[str]) -> torch.Tensor:
    """Token ids [N, 77]: padded and truncated to the encoder's context like SD's training."""
    out = tokenizer(
        [c or "" for c in captions],
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    return out.input_ids
