"""Data recipe for the embedded default model: which CPython standard-library sources go where.

The text is the standard library of the Python interpreter that runs the script (PSF licence, present
on every Python install, so nothing is downloaded). The split is by *module*, never by position inside a
file, so held-out and calibration text come from modules the model never saw during training. Module
lists and their order are fixed here so a rebuild on the same Python version reads the same bytes.
"""
from __future__ import annotations

import sys
import sysconfig
from pathlib import Path

# Held-out evaluation modules (~300 KB on CPython 3.11): never used for the tokenizer or training.
HELDOUT_MODULES = [
    "argparse.py", "difflib.py", "calendar.py", "fractions.py", "heapq.py",
    "textwrap.py", "shlex.py", "csv.py",
]
# Calibration modules (~200 KB): for GPTQ / Wanda / block-pruning statistics; also never trained on.
CALIBRATION_MODULES = [
    "configparser.py", "statistics.py", "sched.py", "queue.py", "contextlib.py", "functools.py",
]
# Modules left out entirely: not representative source code (rot13 text, a web-browser joke, data tables).
EXCLUDED_MODULES = ["this.py", "antigravity.py", "__phello__.foo.py"]
# Packages whose sources are added to the training split after the top-level modules (sorted paths).
TRAIN_PACKAGES = [
    "asyncio", "collections", "concurrent", "email", "html", "http", "importlib", "json",
    "logging", "multiprocessing", "unittest", "urllib", "xml", "xmlrpc", "wsgiref", "zoneinfo",
]
# Size of the training sample shipped in the package (SDFT recovery data at run time).
TRAIN_SAMPLE_BYTES = 1_500_000


def stdlib_dir() -> Path:
    """Directory holding the pure-Python standard library of the running interpreter."""
    path = Path(sysconfig.get_paths()["stdlib"])
    if not (path / "argparse.py").is_file():
        raise FileNotFoundError(f"standard library sources not found under {path}")
    return path


def _read(path: Path) -> str:
    # A few stdlib files carry latin-1 bytes in comments; replace rather than fail.
    return path.read_text(encoding="utf-8", errors="replace")


def _join(docs: list[tuple[str, str]]) -> str:
    # A header line names each file so a reader of the shipped text knows where it came from.
    return "".join(f"# ---- file: {name} ----\n{text.rstrip()}\n\n" for name, text in docs)


def train_documents(root: Path | None = None) -> list[tuple[str, str]]:
    """(relative path, text) for every training document, in the fixed order."""
    root = root or stdlib_dir()
    skip = set(HELDOUT_MODULES) | set(CALIBRATION_MODULES) | set(EXCLUDED_MODULES)
    docs = [(p.name, _read(p)) for p in sorted(root.glob("*.py")) if p.name not in skip]
    for pkg in TRAIN_PACKAGES:
        for p in sorted((root / pkg).rglob("*.py")):
            rel = p.relative_to(root).as_posix()
            if "/test" in rel or "/tests/" in rel:
                continue
            docs.append((rel, _read(p)))
    return docs


def split_texts(root: Path | None = None) -> dict[str, object]:
    """The three splits: 'train_docs' (list of texts), 'heldout', 'calibration', 'train_sample' (str)."""
    root = root or stdlib_dir()
    train = train_documents(root)
    heldout = _join([(m, _read(root / m)) for m in HELDOUT_MODULES])
    calibration = _join([(m, _read(root / m)) for m in CALIBRATION_MODULES])
    sample, size = [], 0
    for name, text in train:  # the first modules, whole, until the byte budget is used
        if size + len(text) > TRAIN_SAMPLE_BYTES:
            continue
        sample.append((name, text))
        size += len(text)
    return {
        "train_docs": [text for _, text in train],
        "train_names": [name for name, _ in train],
        "heldout": heldout,
        "calibration": calibration,
        "train_sample": _join(sample),
        "python_version": sys.version.split()[0],
        "stdlib_dir": str(root),
    }
