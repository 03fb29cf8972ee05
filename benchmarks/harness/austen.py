"""Jane Austen's six novels (public domain): text classification and language-modelling splits.

Source: the R package `janeaustenr` as Debian packages it (`r-cran-janeaustenr`, 1.6 MB). Installing
it normally pulls in R, so only download and unpack it (one command, or `fetch_austen_with_apt()`)::

    cd "$(mktemp -d)" && apt-get download r-cran-janeaustenr && \
        dpkg -x r-cran-janeaustenr_*.deb ~/.cache/mec_quant_plugin/janeaustenr

The novels are character vectors (one element per printed line) in R's lazy-load database
`data/Rdata.rdb` + `Rdata.rdx`: each value is an R XDR serialization, zlib/bzip2/xz compressed, at
an offset the (gzip-compressed, serialized) index lists. They are parsed with the pure-Python
package `rdata` (PyPI; in `benchmarks/requirements.txt`), no R needed. Also accepted: the
`data/*.rda` files of the CRAN source tarball, or six plain-text files `<key>.txt` (e.g. from
Project Gutenberg) named as in `NOVELS`.

Splits are made BY CHAPTER, per novel, so held-out passages come from chapters never seen in
training (passages of one chapter share names and scenes, which would leak across a random split).
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import random
import re
import shutil
import struct
import subprocess
import tempfile
import warnings
import zlib
from functools import lru_cache
from pathlib import Path

from .models import cache_root

# (key in janeaustenr, title), in publication order; the order defines the class labels.
NOVELS = (
    ("sensesensibility", "Sense & Sensibility"),
    ("prideprejudice", "Pride & Prejudice"),
    ("mansfieldpark", "Mansfield Park"),
    ("emma", "Emma"),
    ("northangerabbey", "Northanger Abbey"),
    ("persuasion", "Persuasion"),
)
TITLES = tuple(title for _, title in NOVELS)
ENV_DIR = "MEC_QUANT_AUSTEN_DIR"
DEBIAN_PACKAGE = "r-cran-janeaustenr"
# Where `dpkg -x DEB DIR` (or a normal install, with DIR = /) puts the data inside DIR.
R_DATA_SUBDIR = "usr/lib/R/site-library/janeaustenr/data"
SYSTEM_DIR = "/" + R_DATA_SUBDIR

# "CHAPTER I", "Chapter 1", "CHAPTER XII." (the whole line).
CHAPTER_RE = re.compile(r"^\s*chapter\s+(?:[ivxlcdm]+|\d+)\s*[.:]?\s*$", re.IGNORECASE)
# Structural lines inside the text ("VOLUME II") that are not prose.
STRUCTURE_RE = re.compile(r"^\s*(?:volume|book|part)\s+(?:[ivxlcdm]+|\d+)\s*[.:]?\s*$", re.IGNORECASE)
# End of the novel proper: what follows ("A NOTE ON THE TEXT" of Northanger Abbey) is not Austen.
END_RE = re.compile(r"^\s*(?:the\s+end|finis|a\s+note\s+on\s+the\s+text)\s*\.?\s*$", re.IGNORECASE)


class AustenNotFound(FileNotFoundError):
    """No copy of the novels was found (the message says how to get one)."""


def default_dir() -> Path:
    """Where `fetch_austen_with_apt` unpacks the Debian package by default."""
    return cache_root() / "janeaustenr"


# ---------------------------------------------------------------------------------------------
# Finding and reading the files
# ---------------------------------------------------------------------------------------------


def _source_in(folder: Path) -> tuple[str, Path] | None:
    """('rdb' | 'rda' | 'txt', folder with the files) if `folder` (or a known subfolder) has them."""
    for d in (folder, folder / R_DATA_SUBDIR, folder / "janeaustenr" / "data", folder / "data"):
        if (d / "Rdata.rdb").is_file() and (d / "Rdata.rdx").is_file():
            return "rdb", d
        if all((d / f"{key}.rda").is_file() for key, _ in NOVELS):
            return "rda", d
        if all((d / f"{key}.txt").is_file() for key, _ in NOVELS):
            return "txt", d
    return None


def _find_source(data_dir: str | os.PathLike | None) -> tuple[str, Path]:
    if data_dir is not None:
        candidates = [Path(data_dir).expanduser()]
    else:
        candidates = [Path(os.environ[ENV_DIR]).expanduser()] if os.environ.get(ENV_DIR) else []
        candidates += [default_dir(), Path(SYSTEM_DIR)]
    for folder in candidates:
        found = _source_in(folder)
        if found is not None:
            return found
    raise AustenNotFound(
        f"Jane Austen's novels were not found in {', '.join(map(str, candidates))}. Get them (1.6 MB, "
        f"no R needed) with `cd benchmarks && python -c 'from harness.austen import fetch_austen_with_apt; "
        f"fetch_austen_with_apt()'` on Debian/Ubuntu, i.e. `apt-get download {DEBIAN_PACKAGE} && dpkg -x "
        f"{DEBIAN_PACKAGE}_*.deb {default_dir()}` (run `apt-get update` first if apt cannot find it). "
        f"Or point {ENV_DIR} (or data_dir=) at a folder holding janeaustenr's data/Rdata.rdb+Rdata.rdx, "
        f"its CRAN tarball's data/*.rda, or six plain-text files "
        f"{', '.join(key + '.txt' for key, _ in NOVELS)}."
    )


def _decompress(raw: bytes) -> bytes:
    """A whole file that R compressed with gzip, bzip2 or xz (or not at all)."""
    if raw[:2] == b"\x1f\x8b":
        return gzip.decompress(raw)
    if raw[:3] == b"BZh":
        return bz2.decompress(raw)
    if raw[:6] == b"\xfd7zXZ\x00":
        return lzma.decompress(raw)
    return raw


def _decompress_rdb_chunk(chunk: bytes) -> bytes:
    """One value of a lazy-load database: 4-byte big-endian length, then the compressed bytes.

    R's compression type 1 writes a bare zlib stream; types 2 and 3 put one byte first that says
    which codec: 'Z' zlib, '2' bzip2, 'X' xz, '0' stored.
    """
    (length,) = struct.unpack(">I", chunk[:4])
    codec, body = chunk[4:5], chunk[5:]
    if codec == b"Z":
        out = zlib.decompress(body)
    elif codec == b"2":
        out = bz2.decompress(body)
    elif codec == b"X":
        out = lzma.decompress(body)
    elif codec == b"0":
        out = body
    else:
        out = zlib.decompress(chunk[4:])
    if len(out) != length:
        raise ValueError(f"Corrupt R lazy-load chunk: expected {length} bytes, got {len(out)}.")
    return out


def _rdata():
    try:
        import rdata
    except ImportError as exc:
        raise ImportError(
            "Reading the R data files of janeaustenr needs the pure-Python package `rdata`: "
            "`pip install -r benchmarks/requirements.txt` (or `pip install rdata`)."
        ) from exc
    return rdata


def _to_lines(value) -> list[str]:
    return ["" if s is None else str(s) for s in value]


def _unserialize(rdata, raw: bytes):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Unknown file type: assumed RDS" for in-memory bytes
        return rdata.conversion.convert(rdata.parser.parse_data(raw))


def _read_rdb(folder: Path) -> dict[str, list[str]]:
    rdata = _rdata()
    index = _unserialize(rdata, _decompress((folder / "Rdata.rdx").read_bytes()))
    offsets = {str(name): (int(pos[0]), int(pos[1])) for name, pos in index["variables"].items()}
    blob = (folder / "Rdata.rdb").read_bytes()
    out = {}
    for key, _ in NOVELS:
        if key not in offsets:
            raise ValueError(f"{folder / 'Rdata.rdb'} has no variable {key!r} (has {sorted(offsets)}).")
        start, size = offsets[key]
        out[key] = _to_lines(_unserialize(rdata, _decompress_rdb_chunk(blob[start : start + size])))
    return out


def _read_rda(folder: Path) -> dict[str, list[str]]:
    rdata = _rdata()
    out = {}
    for key, _ in NOVELS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            values = rdata.read_rda(folder / f"{key}.rda")
        out[key] = _to_lines(values[key] if key in values else next(iter(values.values())))
    return out


def _read_txt(folder: Path) -> dict[str, list[str]]:
    return {key: (folder / f"{key}.txt").read_text(encoding="utf-8-sig").splitlines() for key, _ in NOVELS}


@lru_cache(maxsize=4)
def _load_cached(kind: str, folder: str, mtime: float) -> tuple[tuple[str, tuple[str, ...]], ...]:
    reader = {"rdb": _read_rdb, "rda": _read_rda, "txt": _read_txt}[kind]
    by_key = reader(Path(folder))
    return tuple((title, tuple(by_key[key])) for key, title in NOVELS)


def load_austen_novels(data_dir: str | os.PathLike | None = None) -> dict[str, list[str]]:
    """The six novels as {title: list of printed lines}, titles in publication order (`TITLES`).

    Looks in `data_dir` if given, else $MEC_QUANT_AUSTEN_DIR, then ~/.cache/mec_quant_plugin/
    janeaustenr (where `fetch_austen_with_apt` unpacks; $MEC_QUANT_CACHE_DIR moves it), then
    /usr/lib/R/site-library/janeaustenr/data (an installed R package). A folder may be the
    `dpkg -x` root, janeaustenr's data folder, or a folder of `<key>.txt` files (see `NOVELS`).

    Raises:
        AustenNotFound: none of those has the files (says how to get them).
        ImportError: the R files need the `rdata` package (`benchmarks/requirements.txt`).
    """
    kind, folder = _find_source(data_dir)
    stamp = max(p.stat().st_mtime for p in folder.iterdir() if p.is_file())
    return {title: list(lines) for title, lines in _load_cached(kind, str(folder), stamp)}


def fetch_austen_with_apt(dest: str | os.PathLike | None = None, *, update: bool = False) -> str:
    """Download `r-cran-janeaustenr` with apt and unpack it (no R, no install) into `dest`.

    Runs `apt-get download r-cran-janeaustenr` in a temporary folder and `dpkg -x` into `dest`
    (default ~/.cache/mec_quant_plugin/janeaustenr, where `load_austen_novels` looks); `update`
    runs `apt-get update` first. Needs apt's package lists (and network to the Debian mirror),
    not root. Returns the data folder with Rdata.rdb.
    """
    dest = Path(dest).expanduser() if dest is not None else default_dir()
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        raise RuntimeError(
            "apt-get/dpkg are not available. Download r-cran-janeaustenr_*.deb from "
            "https://packages.debian.org/r-cran-janeaustenr and unpack it with `dpkg -x` (or "
            "`ar x` + `tar xf data.tar.xz`) into a folder, then set " + ENV_DIR + " to it."
        )
    with tempfile.TemporaryDirectory() as tmp:
        if update:
            subprocess.run(["apt-get", "update", "-qq"], check=True)
        proc = subprocess.run(["apt-get", "download", DEBIAN_PACKAGE], cwd=tmp, capture_output=True, text=True)
        debs = sorted(Path(tmp).glob(f"{DEBIAN_PACKAGE}_*.deb"))
        if proc.returncode != 0 or not debs:
            raise RuntimeError(
                f"`apt-get download {DEBIAN_PACKAGE}` failed ({proc.stderr.strip()[-300:]}); "
                "try fetch_austen_with_apt(update=True) (runs `apt-get update`)."
            )
        dest.mkdir(parents=True, exist_ok=True)
        subprocess.run(["dpkg", "-x", str(debs[-1]), str(dest)], check=True)
    found = _source_in(dest)
    if found is None:
        raise RuntimeError(f"Unpacked {debs[-1].name} into {dest} but found no Rdata.rdb in it.")
    return str(found[1])


# ---------------------------------------------------------------------------------------------
# Chapters and text
# ---------------------------------------------------------------------------------------------


def split_chapters(lines: list[str]) -> list[list[str]]:
    """The chapters of one novel, each a list of its lines (heading removed).

    A chapter starts at a line that is only a heading like "CHAPTER I", "Chapter 1" or
    "CHAPTER XII." (any case, Roman or Arabic numbers; numbering that restarts per volume, as
    in Emma, is fine). Lines before the first heading (title page, preface) are dropped, as are
    "VOLUME II"-style lines, and everything from a closing "THE END" / "FINIS" / "A NOTE ON THE
    TEXT" line on. Returns [] if the text has no chapter heading.
    """
    chapters: list[list[str]] = []
    for line in lines:
        if END_RE.match(line) and chapters:
            break
        if CHAPTER_RE.match(line):
            chapters.append([])
        elif chapters and not STRUCTURE_RE.match(line):
            chapters[-1].append(line)
    return chapters


def chapter_text(lines: list[str]) -> str:
    """Lines rejoined into prose: paragraphs (blank-line separated) on one line each, separated by
    a blank line; runs of whitespace collapsed; the transcription's `_italics_` underscores dropped
    (they mark emphasis in only some of the novels, a formatting cue a classifier should not get)."""
    paragraphs, current = [], []
    for line in lines:
        if line.strip():
            current.append(line)
        elif current:
            paragraphs.append(" ".join(" ".join(current).split()))
            current = []
    if current:
        paragraphs.append(" ".join(" ".join(current).split()))
    return "\n\n".join(paragraphs).replace("_", "")


def novel_chapters(data_dir: str | os.PathLike | None = None) -> dict[str, list[str]]:
    """{title: [text of chapter 1, chapter 2, ...]} (see `split_chapters`, `chapter_text`)."""
    out = {}
    for title, lines in load_austen_novels(data_dir).items():
        chapters = [chapter_text(c) for c in split_chapters(lines)]
        out[title] = [c for c in chapters if c]
    return out


def _test_chapters(n_chapters: int, test_fraction: float, rng: random.Random) -> set[int]:
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}.")
    if test_fraction == 0.0:
        return set()
    if n_chapters < 2:
        raise ValueError(f"Need at least 2 chapters per novel to hold some out, got {n_chapters}.")
    n_test = min(max(1, round(test_fraction * n_chapters)), n_chapters - 1)
    return set(rng.sample(range(n_chapters), n_test))


def _chapter_split(chapters: dict[str, list[str]], test_fraction: float, seed: int):
    """Yields (label, title, chapter index, text, is_test); held-out chapters drawn per novel."""
    for label, (title, texts) in enumerate(chapters.items()):
        # A string seed is hashed with SHA-512, so this is the same on every run and machine.
        held_out = _test_chapters(len(texts), test_fraction, random.Random(f"austen:{seed}:{title}"))
        for index, text in enumerate(texts):
            yield label, title, index, text, index in held_out


def _features(label_column: str):
    import datasets

    return datasets.Features(
        {
            "text": datasets.Value("string"),
            label_column: datasets.ClassLabel(names=list(TITLES)),
            "chapter": datasets.Value("int32"),
        }
    )


def austen_classification(
    passage_words: int = 128,
    test_fraction: float = 0.2,
    seed: int = 0,
    *,
    balance: bool = False,
    data_dir: str | os.PathLike | None = None,
):
    """Which-novel classification: a `datasets.DatasetDict` with 'train' and 'test'.

    Each row is a passage of `passage_words` consecutive words of one chapter (non-overlapping
    windows; a chapter's last, shorter window is kept if it has at least half as many words), with
    columns `text`, `label` (a `ClassLabel` over the 6 `TITLES`) and `chapter` (0-based index of
    the chapter in its novel). In every novel, round(test_fraction * chapters) chapters (at least
    one) are drawn with `seed` and all their passages go to 'test': no chapter is in both splits.
    Deterministic for a given seed. Rows are in novel, chapter, position order (shuffle in the
    data loader). Classes are unbalanced (Emma has ~2x the passages of Persuasion) unless
    `balance`, which subsamples each split to its rarest class's count.

    With the real data and the defaults: 4,471 train / 1,127 test passages (569k / 143k words;
    736k / 185k all-MiniLM-L6-v2 tokens, ~164 per passage, at most 232).
    """

    if passage_words < 1:
        raise ValueError(f"passage_words must be >= 1, got {passage_words}.")
    rows = {"train": [], "test": []}
    for label, _title, index, text, is_test in _chapter_split(novel_chapters(data_dir), test_fraction, seed):
        words = text.split()
        for start in range(0, len(words), passage_words):
            window = words[start : start + passage_words]
            if 2 * len(window) >= passage_words:
                rows["test" if is_test else "train"].append((" ".join(window), label, index))
    if balance:
        rng = random.Random(f"austen-balance:{seed}")
        for split, split_rows in rows.items():
            by_label = [[r for r in split_rows if r[1] == label] for label in range(len(TITLES))]
            n = min((len(b) for b in by_label if b), default=0)
            keep = {id(r) for b in by_label for r in (rng.sample(b, n) if len(b) > n else b)}
            rows[split] = [r for r in split_rows if id(r) in keep]
    return _dataset_dict(rows, "label")


def _dataset_dict(rows: dict[str, list[tuple[str, int, int]]], label_column: str):
    """(text, label, chapter) rows per split -> DatasetDict with `label_column` as a ClassLabel."""
    import datasets

    return datasets.DatasetDict(
        {
            split: datasets.Dataset.from_dict(
                {
                    "text": [r[0] for r in split_rows],
                    label_column: [r[1] for r in split_rows],
                    "chapter": [r[2] for r in split_rows],
                },
                features=_features(label_column),
            )
            for split, split_rows in rows.items()
        }
    )


def austen_language_modeling(test_fraction: float = 0.1, seed: int = 0, *, data_dir: str | os.PathLike | None = None):
    """Raw text for language modelling / perplexity: a `datasets.DatasetDict` 'train' / 'test'.

    One row per chapter: `text` (the chapter's prose, paragraphs separated by blank lines),
    `novel` (`ClassLabel` over `TITLES`) and `chapter` (0-based index in its novel). In every
    novel round(test_fraction * chapters) chapters (at least one) are held out for 'test', drawn
    with `seed` (deterministic). Tokenize and concatenate/chunk as the model needs.

    With the real data and the defaults: 242 train / 27 test chapters (643k / 74k words; 822k / 95k
    SmolLM2 tokens).
    """

    rows = {"train": [], "test": []}
    for label, _title, index, text, is_test in _chapter_split(novel_chapters(data_dir), test_fraction, seed):
        rows["test" if is_test else "train"].append((text, label, index))
    return _dataset_dict(rows, "novel")


BUILDERS = {"austen": austen_classification, "austen-lm": austen_language_modeling}


def save_austen(name: str, folder: str | os.PathLike) -> str:
    """Build the data set `name` ('austen': which-novel classification, 'austen-lm': held-out-chapter
    language modelling; default arguments) and `save_to_disk` it into `folder`, which `mec-quant
    train --dataset FOLDER` and `load_from_disk` read. Returns the folder."""
    if name not in BUILDERS:
        raise ValueError(f"unknown Austen data set {name!r}; choose one of {', '.join(BUILDERS)}.")
    BUILDERS[name]().save_to_disk(str(folder))
    return str(folder)


if __name__ == "__main__":  # cd benchmarks && python -m harness.austen austen-lm ../outputs/austen-lm
    import sys

    if len(sys.argv) != 3:
        sys.exit(f"usage: python -m harness.austen {{{','.join(BUILDERS)}}} FOLDER")
    print(save_austen(sys.argv[1], sys.argv[2]))
