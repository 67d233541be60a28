"""Text sources and fixed-length token windows.

Offline sources: the four Project Gutenberg novels of Debian's `r-cran-tidytext`
(the same kind of text as PG-19) and any plain `.txt` file. Online sources:
`wikitext2` and `pg19` through the `datasets` package.

BOS convention (docs/method.md section 5): windows are cut from one
tokenisation of the whole text with `add_special_tokens=False`. Whether each
window starts with the BOS token is the model family's decision (its adapter's
`prepend_bos`, which `helpers.models.loading.with_bos` records on the tokenizer):
SmolLM2 windows carry no special token; Gemma 3 windows are BOS + seqlen - 1
text tokens, because Gemma 3 without its BOS is a much worse model.
"""

from __future__ import annotations

import contextlib
import itertools
import warnings
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path

import rdata
import torch

from helpers.infra.storage import DATA_DIR, write_text_atomic

GUTENBERG_BOOKS: dict[str, str] = {
    "pride-and-prejudice": "Pride and Prejudice",
    "great-expectations": "Great Expectations",
    "war-of-the-worlds": "The War of the Worlds",
    "twenty-thousand-leagues": "Twenty Thousand Leagues under the Sea",
}
ONLINE_SOURCES = ("wikitext2", "pg19")
CALIB_TEXT = "pride-and-prejudice"  # default calibration text (LR, PCA) and SB-selection text
EVAL_TEXT = "great-expectations"  # default held-out text for perplexity
BOOKS_RDA = DATA_DIR / "downloads" / "tidytext" / "usr/lib/R/site-library/tidytext/extdata/books.rda"
BOOKS_DIR = DATA_DIR / "gutenberg"
SETUP_HINT = "run `make setup` (it fetches the Debian package r-cran-tidytext into data/downloads)"


_encoding: ContextVar[str | None] = ContextVar("text_encoding", default=None)  # None: strict UTF-8


@contextlib.contextmanager
def text_encoding(name: str | None) -> Iterator[None]:
    """Decode .txt files with codec `name` inside the block (the CLI's --encoding); None: strict UTF-8."""
    token = _encoding.set(name)
    try:
        yield
    finally:
        _encoding.reset(token)


def read_text_file(path: str | Path) -> str:
    """A text file's contents: strict UTF-8 (or the `text_encoding` in force); bad bytes are an error naming
    their offset, never silently replaced."""
    data = Path(path).read_bytes()
    encoding = _encoding.get() or "utf-8"
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path} is not valid {encoding}: byte {err.start} is {data[err.start : err.start + 1]!r}; convert "
            "the file to UTF-8 or pass --encoding with its encoding (e.g. --encoding latin-1)."
        ) from None


class TextTooShortError(ValueError):
    """Raised when a text does not fill the windows asked for."""


def text_sources() -> list[str]:
    """Every name `load_text` accepts besides a path to a .txt file."""
    return ["gutenberg", *GUTENBERG_BOOKS, *ONLINE_SOURCES]


def _books_from_rda() -> dict[str, str]:
    """Read the tidytext table of lines and join it into one text per book."""
    if not BOOKS_RDA.exists():
        raise FileNotFoundError(f"Gutenberg books not found at {BOOKS_RDA}; {SETUP_HINT}.")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rdata warns about the tibble class; harmless
        table = rdata.read_rda(str(BOOKS_RDA))["books"]
    by_title = {title: slug for slug, title in GUTENBERG_BOOKS.items()}
    books: dict[str, list[str]] = {slug: [] for slug in GUTENBERG_BOOKS}
    for title, line in zip(table["title"].astype(str), table["text"].astype(str), strict=True):
        books[by_title[title]].append(line)
    return {slug: _join_paragraphs(lines) for slug, lines in books.items()}


def _join_paragraphs(lines: list[str]) -> str:
    """Join wrapped lines into paragraphs; a blank line is a paragraph break."""
    paragraphs, current = [], []
    for line in lines:
        if line.strip():
            current.append(line.strip())
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    if current:
        paragraphs.append(" ".join(current))
    return "\n\n".join(paragraphs)


def gutenberg_book(slug: str) -> str:
    """One novel as plain text, unpacked once into data/gutenberg/."""
    if slug not in GUTENBERG_BOOKS:
        raise ValueError(f"Unknown book {slug!r}; choose one of {', '.join(GUTENBERG_BOOKS)}.")
    path = BOOKS_DIR / f"{slug}.txt"
    if not path.exists():
        for name, text in _books_from_rda().items():
            write_text_atomic(BOOKS_DIR / f"{name}.txt", text)
    return path.read_text()


def _online(source: str) -> str:
    try:
        import datasets
    except ImportError as err:
        raise ImportError(f"{source!r} needs the `datasets` package and internet: pip install datasets") from err
    if source == "wikitext2":
        rows = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"]
        return "\n\n".join(rows)
    rows = datasets.load_dataset("deepmind/pg19", split="validation", streaming=True)
    return "\n\n".join(row["text"] for _, row in zip(range(10), rows, strict=False))


def load_text(source: str) -> str:
    """Return the text of a named source or a .txt file."""
    if source == "gutenberg":
        return "\n\n".join(gutenberg_book(slug) for slug in GUTENBERG_BOOKS)
    if source in GUTENBERG_BOOKS:
        return gutenberg_book(source)
    if source in ONLINE_SOURCES:
        return _online(source)
    path = Path(source).expanduser()
    if path.is_file():
        return read_text_file(path)
    raise ValueError(f"Unknown text {source!r}: use a path to a .txt file or one of {', '.join(text_sources())}.")


def bos_id(tokenizer) -> int | None:
    """The BOS id to put before every text, or None when the model family does not want one."""
    if not getattr(tokenizer, "prepend_bos", False):
        return None
    if tokenizer.bos_token_id is None:
        raise ValueError("This model's family wants a BOS token, but its tokenizer defines none.")
    return int(tokenizer.bos_token_id)


def token_windows(tokenizer, text: str, seqlen: int, n_windows: int | None = None) -> torch.Tensor:
    """Tokenise `text` once and cut it into non-overlapping windows of `seqlen` tokens.

    Returns a LongTensor (n_windows, seqlen); the tail that does not fill a
    window is dropped. Where the tokenizer is marked `prepend_bos` (see the
    module docstring), each window is the BOS followed by seqlen - 1 text tokens.
    """
    if seqlen < 2:
        raise ValueError(f"seqlen must be at least 2, got {seqlen}.")
    if n_windows is not None and n_windows < 1:
        raise ValueError(f"n_windows must be positive, got {n_windows}.")
    bos = bos_id(tokenizer)
    width = seqlen - (bos is not None)  # text tokens per window
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    available = len(ids) // width
    wanted = available if n_windows is None else n_windows
    if available == 0:
        raise TextTooShortError(
            f"The text has {len(ids)} tokens, shorter than one window of {seqlen} tokens. "
            "Use a longer text or a shorter seqlen."
        )
    if available < wanted:
        raise TextTooShortError(
            f"The text has {len(ids)} tokens: {available} window(s) of {seqlen} tokens, but {wanted} were "
            "asked for. Use a longer text, a shorter seqlen or fewer windows."
        )
    windows = torch.tensor(ids[: wanted * width], dtype=torch.long).view(wanted, width)
    if bos is not None:
        windows = torch.cat([torch.full((wanted, 1), bos, dtype=torch.long), windows], dim=1)
    return windows


def load_windows(tokenizer, source: str, seqlen: int, n_windows: int | None = None) -> torch.Tensor:
    """`token_windows` over `load_text(source)`."""
    return token_windows(tokenizer, load_text(source), seqlen, n_windows)


def load_split(tokenizer, source: str, seqlen: int, *sizes: int) -> list[torch.Tensor]:
    """Consecutive groups of windows of one text (e.g. calibration, training, validation), disjoint by construction."""
    return split_windows(load_windows(tokenizer, source, seqlen, sum(sizes)), *sizes)


def split_windows(ids: torch.Tensor, *sizes: int) -> list[torch.Tensor]:
    """Cut consecutive groups of windows (e.g. calibration, training, validation) from `ids`, in order."""
    if sum(sizes) > len(ids):
        raise ValueError(f"asked for {sum(sizes)} windows in groups {sizes}, but only {len(ids)} are available")
    return [ids[start:end] for start, end in itertools.pairwise(itertools.accumulate(sizes, initial=0))]
