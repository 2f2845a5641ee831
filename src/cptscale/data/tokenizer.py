"""The shared byte-level BPE tokenizer: training on a language-balanced sample, loading, adapters.

Sampling avoids validation documents: the validation split (:mod:`cptscale.data.indexed`) takes
documents in *ascending* hash order, so the tokenizer sample takes them in *descending* hash order and
also skips a reserved low-hash region of ``valid_tokens * RESERVE_BYTES_PER_TOKEN`` bytes. The report
records the lowest sampled hash per language so the index step can prove (and report) zero overlap.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cptscale.data.keys import hash_prefix, iter_key_range, key_hex
from cptscale.data.sources import SourceError
from cptscale.util import atomic_path, file_hash, provenance, write_json

EOD = "<|endoftext|>"
PAD = "<|pad|>"
#: Upper bound on UTF-8 bytes per token, used only to reserve the validation region before the
#: tokenizer exists (byte-level BPE averages 2-5 bytes/token; CJK about 2-3).
RESERVE_BYTES_PER_TOKEN = 8


class Tokenizer:
    """What the trainer and mixer need: ``vocab_size``, ``eod``, ``pad``, ``encode``, ``decode``."""

    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        self.path = Path(path)
        try:
            self.hf = HFTokenizer.from_file(str(path))
        except Exception as exc:
            raise SourceError(f"cannot load tokenizer {path}: {exc}; give a Hugging Face tokenizer.json") from exc
        eod = self.hf.token_to_id(EOD)
        self.eod_token = EOD
        if eod is None:  # a model's own tokenizer (cptscale import-hf): its end-of-sequence token
            self.eod_token = model_eos_token(self.path) or EOD
            eod = self.hf.token_to_id(self.eod_token)
        if eod is None:
            raise SourceError(f"tokenizer {path} has no EOD token {EOD!r} and no eos_token in a tokenizer_config.json "
                              "beside it; add one of them")
        self.eod: int = eod
        pad = self.hf.token_to_id(PAD)
        self.pad: int | None = pad
        self.vocab_size: int = self.hf.get_vocab_size(with_added_tokens=True)
        self.hash = file_hash(path)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode(list(map(int, ids)), skip_special_tokens=False)

    @property
    def dtype(self) -> type[np.integer]:
        """Token dtype for .bin files: uint16 while every id fits, else int32."""
        return np.uint16 if self.vocab_size < 65500 else np.int32


def model_eos_token(tokenizer_json: str | Path) -> str | None:
    """The ``eos_token`` of the ``tokenizer_config.json`` beside a Hugging Face model's tokenizer.json
    (a string, or a dict with its ``content``), which documents end with when the study tokenizes with
    the model's own tokenizer; None without one."""
    import json

    cfg = Path(tokenizer_json).with_name("tokenizer_config.json")
    try:
        eos = json.loads(cfg.read_text()).get("eos_token")
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(eos, dict):
        eos = eos.get("content")
    return eos if isinstance(eos, str) and eos else None


def load_tokenizer(path: str | Path) -> Tokenizer:
    return Tokenizer(path)


class MegatronTokenizerAdapter:
    """Our tokenizer behind Megatron-Core's tokenizer interface: ``GPTDatasetConfig(tokenizer=...)``
    reads ``vocab_size``, ``eod``, ``pad``/``eos`` and ``unique_identifiers`` (duck-typed like
    ``MegatronLegacyTokenizer``, without its deprecation warning or a Megatron import here)."""

    def __init__(self, tok: Tokenizer | str | Path) -> None:
        import json
        from collections import OrderedDict

        self.tok = tok if isinstance(tok, Tokenizer) else Tokenizer(tok)
        self.unique_identifiers: OrderedDict[str, Any] = OrderedDict(
            [("class", type(self).__name__), ("tokenizer_hash", self.tok.hash), ("vocab_size", self.tok.vocab_size)]
        )
        self.unique_description = json.dumps(self.unique_identifiers, indent=4)

    def tokenize(self, text: str) -> np.ndarray:
        return np.asarray(self.tok.encode(text), dtype=np.int64)

    def detokenize(self, ids: np.ndarray) -> str:
        return self.tok.decode(list(ids))

    @property
    def vocab(self) -> dict[str, int]:
        return self.tok.hf.get_vocab(with_added_tokens=True)

    @property
    def inv_vocab(self) -> dict[int, str]:
        return {v: k for k, v in self.vocab.items()}

    @property
    def vocab_size(self) -> int:
        return self.tok.vocab_size

    @property
    def eod(self) -> int:
        return self.tok.eod

    @property
    def eos(self) -> int:
        return self.tok.eod

    @property
    def pad(self) -> int:
        return self.tok.pad if self.tok.pad is not None else self.tok.eod


# ----------------------------------------------------------------------------------------------------
# sampling and training


def lang_of(docs_path: str | Path) -> str:
    """``LANG=path`` or ``.../LANG/docs.parquet`` -> LANG."""
    s = str(docs_path)
    return s.split("=", 1)[0] if "=" in s else Path(s).parent.name


def _strip_lang(docs_path: str | Path) -> Path:
    s = str(docs_path)
    return Path(s.split("=", 1)[1] if "=" in s else s)


def select_sample(docs: str | Path, sample_chars: int, reserve_bytes: int) -> tuple[int | None, int, int]:
    """The tokenizer sample: documents in descending hash order, skipping the low-hash reserve, until
    ``sample_chars`` characters.

    The sample is a prefix of the descending key order, so it is exactly the documents whose key is >=
    the lowest sampled key: returns (lowest sampled key or None, chars sampled, documents sampled). Memory
    grows with the reserve and the sample, not the corpus (:func:`cptscale.data.keys.hash_prefix`)."""
    reserve = hash_prefix(docs, "bytes", reserve_bytes)
    sample = hash_prefix(docs, "chars", sample_chars, descending=True, exclude_upto=reserve.boundary)
    return sample.boundary, sample.weight, len(sample.keys)


def _iter_texts(docs: Path, lo: int | None = None, hi: int | None = None) -> Iterator[str]:
    """Texts (store order) whose key lies in [lo, hi] (either bound may be open)."""
    for _, batch in iter_key_range(docs, ["text"], lo=lo, hi=hi):
        yield from batch.column(1).to_pylist()


def _tokenizer_samples(docs: Sequence[str | Path], sample_chars_per_language: int,
                       valid_tokens: int) -> dict[str, tuple[Path, int, int, int]]:
    """Per language: (docs store, lowest key, documents, characters) of its sample, the documents above the
    reserve for validation up to ``sample_chars_per_language``; a missing store or nothing left is an error."""
    samples: dict[str, tuple[Path, int, int, int]] = {}
    for d in docs:
        lang, path = lang_of(d), _strip_lang(d)
        if not path.exists():
            raise SourceError(f"language {lang!r}: docs store {path} is missing; run `cptscale data ingest` first")
        lowest, got, n = select_sample(path, sample_chars_per_language, valid_tokens * RESERVE_BYTES_PER_TOKEN)
        if lowest is None:
            raise SourceError(
                f"language {lang!r}: no documents left for the tokenizer sample after reserving "
                f"{valid_tokens} validation tokens; add text or lower the validation size"
            )
        samples[lang] = (path, lowest, n, got)
    return samples


def _train_bpe(samples: dict[str, tuple[Path, int, int, int]], out: Path, *, vocab_size: int, min_frequency: int,
               progress: bool) -> None:
    """A byte-level BPE with the EOD and PAD tokens, trained on the samples in language order, saved to ``out``."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    def corpus() -> Iterator[str]:
        for path, lowest, _n, _got in samples.values():
            yield from _iter_texts(path, lo=lowest)

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOD, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    with atomic_path(out) as tmp:
        tok.save(str(tmp))


def train_tokenizer(
    docs: Sequence[str | Path],
    out: str | Path,
    *,
    vocab_size: int,
    sample_chars_per_language: int,
    valid_tokens: int = 0,
    min_frequency: int = 2,
    progress: bool = True,
) -> dict[str, Any]:
    """Train a byte-level BPE on an equal-character sample per language; write tokenizer.json and
    report.json (per-language fertility measured on held-out low-hash documents)."""
    if vocab_size < 300:
        raise SourceError(f"--vocab-size {vocab_size} is too small for byte-level BPE; use at least 300")
    samples = _tokenizer_samples(docs, sample_chars_per_language, valid_tokens)
    out = Path(out)
    _train_bpe(samples, out, vocab_size=vocab_size, min_frequency=min_frequency, progress=progress)
    loaded = Tokenizer(out)
    report = fertility_report(loaded, {lang: s[0] for lang, s in samples.items()})
    report.update({
        "vocab_size": loaded.vocab_size,
        "vocab_size_requested": vocab_size,
        "eod": loaded.eod,
        "pad": loaded.pad,
        "tokenizer_hash": loaded.hash,
        "trained": True,
        "sample": {
            lang: {"chars": s[3], "docs": s[2], "lowest_hash": key_hex(s[1]), "docs_hash": file_hash(s[0])}
            for lang, s in samples.items()
        },
        "reserve_bytes_per_language": valid_tokens * RESERVE_BYTES_PER_TOKEN,
        "provenance": provenance(inputs={str(s[0]): file_hash(s[0]) for s in samples.values()}),
    })
    write_json(out.parent / "report.json", report)
    return report


def check_given_tokenizer(src: str | Path, vocab_size: int | None) -> Tokenizer:
    """Load a given tokenizer.json (``tokenizer.kind: file``) and check it against the config: it must load,
    have the EOD token and, when ``vocab_size`` is given, exactly that many tokens (added tokens included),
    since the models' embedding and parameter counts are sized from the config."""
    if not Path(src).is_file():
        raise SourceError(f"tokenizer file {src} does not exist; fix tokenizer.path (a Hugging Face tokenizer.json)")
    tok = Tokenizer(src)
    if vocab_size is not None:
        check_vocab_size(tok, src, vocab_size)
    return tok


def check_vocab_size(tok: Tokenizer, src: str | Path, vocab_size: int) -> None:
    """A given tokenizer's vocabulary (added tokens included) must equal the configured ``vocab_size``."""
    if tok.vocab_size != vocab_size:
        raise SourceError(
            f"tokenizer file {src} has a vocabulary of {tok.vocab_size:,} tokens (added tokens included) but "
            f"tokenizer.vocab_size is {vocab_size:,}; set tokenizer.vocab_size: {tok.vocab_size} (models are sized "
            "from it) or give another tokenizer file"
        )


def copy_tokenizer(src: str | Path, out: str | Path, docs: Sequence[str | Path] = (),
                   vocab_size: int | None = None) -> dict[str, Any]:
    """``--from FILE``: validate a given tokenizer.json (EOD token, vocabulary size when ``vocab_size`` is
    given: see :func:`check_given_tokenizer`) and copy it, with a fertility report on ``docs``."""
    check_given_tokenizer(src, vocab_size)
    for d in docs:
        if not _strip_lang(d).exists():
            raise SourceError(f"language {lang_of(d)!r}: docs store {_strip_lang(d)} is missing; "
                              "run `cptscale data ingest` first")
    out = Path(out)
    beside = Path(src).with_name("tokenizer_config.json")  # a model's eos_token (its EOD) lives there
    if beside.is_file():
        with atomic_path(out.with_name(beside.name)) as tmp:
            shutil.copyfile(beside, tmp)
    with atomic_path(out) as tmp:
        shutil.copyfile(src, tmp)
    loaded = Tokenizer(out)
    report = fertility_report(loaded, {lang_of(d): _strip_lang(d) for d in docs})
    report.update({"vocab_size": loaded.vocab_size, "eod": loaded.eod, "pad": loaded.pad,
                   "tokenizer_hash": loaded.hash, "trained": False, "from": str(src), "sample": {}})
    write_json(out.parent / "report.json", report)
    return report


def fertility_report(tok: Tokenizer, docs: dict[str, Path], max_chars: int = 1_000_000) -> dict[str, Any]:
    """Tokens per byte, per character and per (whitespace) word on up to ``max_chars`` of each language's lowest-hash docs
    (the validation region, never in the tokenizer sample)."""
    out: dict[str, Any] = {}
    for lang, path in docs.items():
        upto = hash_prefix(path, "chars", max_chars).boundary
        n_chars = n_bytes = n_tok = n_words = 0
        for text in _iter_texts(path, hi=upto) if upto is not None else ():
            n_chars += len(text)
            n_bytes += len(text.encode("utf-8"))
            n_words += len(text.split())
            n_tok += len(tok.encode(text))
        out[lang] = {
            "chars": n_chars, "bytes": n_bytes, "tokens": n_tok, "words": n_words,
            "tokens_per_byte": n_tok / n_bytes if n_bytes else None,
            "tokens_per_char": n_tok / n_chars if n_chars else None,
            # whitespace-separated words: meaningful for languages that separate words (not zh, ja, th)
            "tokens_per_word": n_tok / n_words if n_words else None,
        }
    return {"fertility": out}


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use `cptscale data tokenizer`")
