"""Every citation in the repository resolves inside it.

Scanned: docs/ and every other Markdown file, the notebooks' sources, and the text (comments, docstrings,
messages) of nemo_scratch/, kernels_cuda/, tests/, bench/ and tools/.

- "spec N", "spec section N.M", "spec sections 3-7", "spec 3.1-3.3", "spec.md sections 1 and 8" name
  headings of docs/spec.md;
- "pitfall N" (and "pitfalls 7-8") names a pitfall docs/spec.md defines (``<a id="pitfall-N">`` followed by
  **Pitfall N**), exactly once, and where docs/spec.md first mentions it;
- a repository path (``tests/test_mtp.py``, ``ops/ssd.py``, ``kernels_cuda/ssd.cu``) names a file that exists,
  from the root or from inside the package; paths of other projects' repositories are recognised by their
  top folder (``src/transformers/...``, ``vllm/...``);
- a Markdown link to a file of the repository exists, and its ``#anchor`` names a heading or an ``<a id>``;
- nothing cites files outside the repository (the design notes it was planned from), and no work-tracker
  label ("issue 8", "FIX 1") appears; another project's issue is written with the project's name
  ("cupy issue #9046", "transformers PR #47513").
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "docs" / "spec.md"
SELF = Path(__file__).resolve()

CODE_DIRS = ("nemo_scratch", "kernels_cuda", "tests", "bench", "tools")
CODE_SUFFIXES = {".py", ".cu", ".cuh", ".h"}
SKIP_PARTS = {".venv", "__pycache__", ".git", ".hypothesis", ".pytest_cache", "build", "dist"}

NUMBERS = r"(\d+(?:\.\d+)?(?:\s*(?:-|–|,|and|to|or)\s*\d+(?:\.\d+)?)*)"
SPEC_CITE = re.compile(r"\bspec(?:ification)?(?:\.md)?(?:'s)?,?\s+(?:sections?\s+|§\s*)?" + NUMBERS, re.I)
PITFALL_CITE = re.compile(r"\bpitfalls?\s+" + NUMBERS, re.I)
PATH = re.compile(r"(?<![\w/.:-])((?:[\w-]+/)+[\w-]+\.(?:py|md|cu|cuh|toml|json|yml|ipynb))\b")
LINK = re.compile(r"\]\(([^)\s]+)\)")
# top folders of OTHER projects' repositories, cited as "owner/repo path/to/file.py"
EXTERNAL_PREFIXES = ("src/transformers/", "transformers/", "vllm/", "mamba_ssm/", "modelopt/", "modelopt_recipes/",
                     "megatron/", "zamba2/", "bamba/", "mamba2/", "deepseek_v3/", "nemotron_h/", "numba_cuda/numba/",
                     "cupy/")
OUTSIDE = re.compile(r"shared/[\w./-]+|\breference/[\w-]+\.md|nemotron3-architecture\.md|performance-anchors"
                     r"|style-anchors|multigpu\.md|\bDESIGN\.md|\bCONVENTIONS\.md")
TRACKER = re.compile(r"(?<![\w.-])(\w[\w.-]*\s+)?\bissues?\s+#?\d+|\bFIX\s+\d+\b")
PROJECTS = {"cupy", "numba", "numba-cuda", "transformers", "vllm", "llama.cpp", "mlx-lm", "mamba", "torch",
            "pytorch", "jax", "modelopt", "model-optimizer", "megatron", "megatron-lm", "nbmake", "jupytext",
            "hypothesis", "safetensors", "numpy"}


def scanned_files():
    files = [p for p in ROOT.rglob("*.md") if not SKIP_PARTS & set(p.relative_to(ROOT).parts)]
    files += sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.py"))
    for folder in CODE_DIRS:
        files += [p for p in (ROOT / folder).rglob("*") if p.suffix in CODE_SUFFIXES and p.is_file()
                  and not SKIP_PARTS & set(p.relative_to(ROOT).parts)]
    return sorted({p for p in files if p.resolve() != SELF})


FILES = scanned_files()


def lines(path):
    return path.read_text(encoding="utf-8").splitlines()


def numbers(text):
    """'3-7' -> 3..7, '3.1-3.3' -> 3.1, 3.3, '1 and 8' -> 1, 8."""
    out = []
    parts = re.split(r"\s*(-|–|,|and|to|or)\s*", text)
    for i in range(0, len(parts), 2):
        out.append(parts[i])
        if i >= 2 and parts[i - 1] in ("-", "–", "to") and "." not in parts[i] and "." not in parts[i - 2]:
            out += [str(n) for n in range(int(parts[i - 2]) + 1, int(parts[i]))]
    return out


def spec_sections():
    found = set()
    for line in lines(SPEC):
        if m := re.match(r"#{2,3} (\d+(?:\.\d+)?)[.\s]", line):
            found.add(m.group(1))
    return found


def spec_pitfalls():
    text = SPEC.read_text()
    return {int(n) for n in re.findall(r'<a id="pitfall-(\d+)"></a>\*\*Pitfall \1\*\*', text)}


def slug(heading):
    """GitHub's anchor of a Markdown heading."""
    return re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", heading.strip().lower()))


def anchors(path):
    text = path.read_text()
    return ({slug(h) for h in re.findall(r"^#+ (.+)$", text, flags=re.M)}
            | set(re.findall(r'<a id="([\w-]+)"', text)))


# paths that stand for a kind of file, not a file: templates and example locations
PLACEHOLDER = re.compile(r"\bNN_|^(?:ckpt|path/to|out|my_checkpoint)/")


def resolve(path, source):
    """A cited repository path: from the root, from inside the package, or from a folder above the citing file."""
    inside = [folder for folder in source.parents if ROOT in folder.parents]
    for base in (ROOT, ROOT / "nemo_scratch", *inside):
        if (base / path).exists():
            return base / path
    return None


def offenders(check):
    """['file:line: text'] for every line where ``check(line, path)`` yields a complaint."""
    out = []
    for path in FILES:
        for no, line in enumerate(lines(path), 1):
            for complaint in check(line, path):
                out.append(f"{path.relative_to(ROOT)}:{no}: {complaint}: {line.strip()[:140]}")
    return out


def report(found, what):
    assert not found, f"{len(found)} {what}:\n" + "\n".join(found)


# --------------------------------------------------------------------------------------------- docs/spec.md

def test_spec_has_every_section_and_pitfall_the_repo_uses():
    sections = spec_sections()
    missing = {str(n) for n in range(12)} - sections
    assert not missing, f"docs/spec.md lacks sections {sorted(missing)}"
    assert {"3.1", "3.2", "3.3", "9.1", "9.2", "9.3"} <= sections
    assert spec_pitfalls() == set(range(1, 11))


def test_each_pitfall_is_defined_once_where_the_spec_first_mentions_it():
    text = SPEC.read_text()
    for n in range(1, 11):
        definition = f'<a id="pitfall-{n}"></a>**Pitfall {n}**'
        assert text.count(definition) == 1, f"pitfall {n} is defined {text.count(definition)} times"
        first = re.search(rf"\bpitfall[-\s]{n}\b", text, flags=re.I)
        assert first.start() >= text.index(definition), (
            f"docs/spec.md mentions pitfall {n} before defining it: {text[first.start() - 60:first.end()]!r}")


# --------------------------------------------------------------------------------------------- the checks
# Each takes one line and the file it is in, and yields a complaint per bad citation.

SECTIONS, PITFALLS = spec_sections(), spec_pitfalls()


def spec_problems(line, path):
    for m in SPEC_CITE.finditer(line):
        for n in numbers(m.group(1)):
            if n not in SECTIONS:
                yield f"'spec {n}' is no heading of docs/spec.md"
    for m in PITFALL_CITE.finditer(line):
        for n in numbers(m.group(1)):
            if "." in n or int(n) not in PITFALLS:
                yield f"'pitfall {n}' is not defined in docs/spec.md"


def path_problems(line, path):
    for m in PATH.finditer(line):
        cited = m.group(1)
        if cited.startswith(EXTERNAL_PREFIXES) or PLACEHOLDER.search(cited) or OUTSIDE.search(cited):
            continue                                 # another project's file, a template, or outside_problems
        if resolve(cited, path) is None:
            yield f"'{cited}' is not a file of the repository"


def link_problems(line, path):
    if path.suffix != ".md":
        return
    for m in LINK.finditer(line):
        target = m.group(1)
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        dest = path if not file else (path.parent / file)
        if not dest.exists():
            yield f"link to '{file}', which does not exist"
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            yield f"link to '#{anchor}', no such heading or anchor in {dest.relative_to(ROOT)}"


def outside_problems(line, path):
    for m in OUTSIDE.finditer(line):
        yield f"'{m.group(0)}' is outside the repository"


def tracker_problems(line, path):
    for m in TRACKER.finditer(line):
        project = (m.group(1) or "").strip().lower()
        if m.group(0).startswith("FIX") or project not in PROJECTS:
            yield f"'{m.group(0).strip()}' reads as a work-tracker label (name the project, or say what it is)"


def test_the_checks_catch_bad_citations():
    here = ROOT / "docs" / "architecture.md"
    good = ["spec section 3.1", "spec sections 3-7", "(spec 3.1-3.3)", "pitfalls 7-8",
            "docs/spec.md sections 1 and 8",
            "`ops/ssd.py`", "`tests/test_mtp.py`", "huggingface/transformers `src/transformers/models/x.py`",
            "[spec](spec.md#pitfall-4)", "[s](spec.md#31-prefill-the-whole-sequence-at-once)", "cupy issue #9046",
            "transformers PR #47513"]
    bad = {"spec section 12": spec_problems, "spec 3.4": spec_problems, "spec sections 9-13": spec_problems,
           "pitfall 11": spec_problems, "see `model/params.py`": path_problems, "`docs/nothing.md`": path_problems,
           "[x](spec.md#no-such-anchor)": link_problems, "[x](missing.md)": link_problems,
           "from shared/DESIGN.md": outside_problems, "(issue 8)": tracker_problems, "(FIX 1)": tracker_problems,
           "see issue #12": tracker_problems}
    checks = (spec_problems, path_problems, link_problems, outside_problems, tracker_problems)
    for line in good:
        assert not [c for check in checks for c in check(line, here)], line
    for line, check in bad.items():
        assert list(check(line, here)), line
    assert numbers("3-7") == ["3", "7", "4", "5", "6"] and numbers("3.1-3.3") == ["3.1", "3.3"]


# --------------------------------------------------------------------------------------------- the repository

def test_spec_and_pitfall_citations_resolve():
    report(offenders(spec_problems), "citations of docs/spec.md that resolve nowhere")


def test_cited_repository_paths_exist():
    report(offenders(path_problems), "cited paths that do not exist")


def test_markdown_links_resolve():
    report(offenders(link_problems), "Markdown links that resolve nowhere")


def test_nothing_cites_files_outside_the_repository():
    report(offenders(outside_problems), "citations of files outside the repository")


def test_no_work_tracker_labels():
    report(offenders(tracker_problems), "work-tracker labels")


def test_the_scan_covers_the_repository():
    names = {p.relative_to(ROOT).as_posix() for p in FILES}
    for must in ("docs/architecture.md", "docs/spec.md", "README.md", "notebooks/01_selective_scan.py",
                 "nemo_scratch/ops/ssd.py", "kernels_cuda/ssd.cu", "tests/test_mtp.py", "tools/train_tiny.py"):
        assert must in names, must
    assert "tests/test_citations.py" not in names
