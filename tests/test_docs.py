"""The docs: the README stays a short front page, the MkDocs site builds offline with --strict (a
broken link or nav entry fails), the params reference is generated from the config models, and the
paths and make targets the pages name exist."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

from aigc.config import flatten, load_params
from tests.conftest import ROOT

# Paths a run creates (outputs, stores, caches): named in the docs, not in the repository.
OUTPUTS = ("data/", "reports/", "models/", "mlflow.db", "mlartifacts", ".cache/", ".services/", ".prefect/", "site/",
           ".venv", ".vendor/", "mlruns", "aigc_bench/.work", "aigc_bench/.work", ".dvc/")


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def test_readme_is_a_short_front_page():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; the reference belongs in docs/"
    assert not re.search(r"\b20\d\d-\d\d-\d\d\b", "\n".join(lines)), "dated figures belong in aigc_bench/README.md"


def test_every_make_target_the_docs_name_exists():
    targets = set(re.findall(r"(?m)^([a-z][a-z-]*):", (ROOT / "Makefile").read_text()))
    named = {t for p in pages() for t in re.findall(r"`make ([a-z][a-z-]*)", p.read_text(encoding="utf-8"))}
    assert named and not named - targets, f"make targets named but missing: {sorted(named - targets)}"


def test_every_repository_path_the_docs_name_exists():
    missing = []
    for page in pages():
        for span in re.findall(r"`([^`\s]+)`", page.read_text(encoding="utf-8")):
            path = span.split("::")[0].rstrip(".,:;)")
            if "/" not in path or any(c in path for c in "<>*{}$=~@") or "..." in path or path.startswith(
                    ("/", "http", "s3:", "ssh:", "models:", "sqlite:", "file:", "-")) or path.startswith(OUTPUTS):
                continue
            top = path.split("/")[0]  # a path into one of the repository's own folders (not an MLflow key)
            if (ROOT / top).is_dir() and re.fullmatch(r"[a-z_.]+(/[A-Za-z0-9_.-]+)+/?", path) and not (ROOT / path).exists():
                missing.append(f"{page.relative_to(ROOT)}: {path}")
    assert not missing, missing


def _hook():
    spec = importlib.util.spec_from_file_location("params_reference", ROOT / "docs/hooks/params_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_params_reference_lists_every_key_of_params_yaml_with_its_default():
    page = _hook().reference()
    for key, value in flatten(load_params(ROOT / "params.yaml")).items():
        row = next((line for line in page.splitlines() if line.startswith(f"| `{key}` |")), None)
        assert row is not None, f"{key} is not in the params reference"
        assert f"`{yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}`" in row \
            or f"`{__import__('json').dumps(value)}`" in row, (key, row)


def test_the_site_builds_offline_with_strict(tmp_path: Path):
    res = subprocess.run([sys.executable, "-m", "aigc.environment", sys.executable, "-m", "mkdocs", "build",
                          "--strict", "-d", str(tmp_path / "site")], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    html = (tmp_path / "site" / "reference" / "params" / "index.html").read_text(encoding="utf-8")
    assert "runtime.threads" in html and "fonts.googleapis.com" not in html


# --- Pointers: every "see X, section Y" in the code, the config files and the docs leads somewhere -----------------

# The files whose comments, docstrings and prose point at the docs (this file names broken pointers on purpose).
SOURCES = ("aigc", "pipeline", "aigc_bench", "tests")
CONFIGS = ("params.yaml", "dvc.yaml", "Makefile", "prefect.yaml", "pyproject.toml", ".gitignore", "README.md",
           "aigc_bench/README.md")


def pointer_files() -> list[Path]:
    code = [p for top in SOURCES for p in sorted((ROOT / top).rglob("*.py")) if p != Path(__file__).resolve()]
    return [*code, *(ROOT / name for name in CONFIGS), *sorted((ROOT / "docs").rglob("*.md"))]


def _headings(text: str) -> list[str]:
    """The headings of a markdown text (fenced code left out), markdown marks stripped."""
    text = re.sub(r"(?ms)^```.*?^```", "", text)
    return [re.sub(r"[`*_]", "", h).strip() for h in re.findall(r"(?m)^#{1,6}\s+(.+?)\s*#*\s*$", text)]


def _leads(text: str) -> list[str]:
    """The bold leads of paragraphs and list items: ``**Resume after a kill.** ...``."""
    return [m.strip().rstrip(".:") for m in re.findall(r"(?m)^(?:[-*]\s+|\d+\.\s+)?\*\*([^*\n]+)\*\*", text)]


def slug(heading: str) -> str:
    """MkDocs' anchor of a heading (Python-Markdown's toc slugify, as the strict build names them)."""
    import unicodedata

    value = unicodedata.normalize("NFKD", heading).encode("ascii", "ignore").decode("ascii")
    value = re.sub(r"[^\w\s-]", "", value).strip().lower()
    return re.sub(r"[-\s]+", "-", value)


_Q = r"""(?:"([^"\n]+)"|'([^'\n]+)'|“([^”\n]+)”)"""  # a quoted section name, in "", '' or “”
_DOC = r"`?(docs/[\w/-]+\.md)`?"
_README = r"(?<![\w/.-])`?README(?:\.md)?`?"
POINTERS = {  # kind: a pattern; the quoted group is the section, a docs/ group the page
    "README section": re.compile(_README + r"(?:'s)?,?\s+(?:section\s+)?" + _Q
                                 + r"|section\s+" + _Q + r"\s+of\s+(?:the\s+)?" + _README + r"(?![\w/.-]*/)"),
    "aigc_bench/README.md section": re.compile(
        r"`?aigc_bench/README\.md`?,?\s+(?:\(?(?:the\s+)?section\s+)?" + _Q + r"|section\s+" + _Q
        + r"\s+of\s+`?aigc_bench/README\.md"),
    "docs page section": re.compile(_DOC + r",?\s+(?:\(?(?:the\s+)?section\s+)?" + _Q
                                    + r"|section\s+" + _Q + r"\s+of\s+" + _DOC),
}
# Documents that were never in the repository (notes, design files of the people who wrote it).
OUTSIDE = re.compile(r"\.\./shared\b|(?<![\w-])shared/tools\b|(?<![\w/-])(?:stack|design|findings|style|notes)\.md\b")


def _flat(text: str) -> str:
    """One line per file: comment marks and indentation at line starts dropped, so a pointer may wrap."""
    return re.sub(r"\n[ \t]*(?:#+|//|\*)?[ \t]*", " ", text)


def broken_pointers(text: str, where: str = "<text>") -> list[str]:
    """Every pointer in ``text`` that leads nowhere, as ``where: kind: pointer``."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    bench = (ROOT / "aigc_bench/README.md").read_text(encoding="utf-8")
    flat, broken = _flat(text), []

    def starts(section: str, page: str, leads: bool) -> bool:
        names = _headings(page) + (_leads(page) if leads else [])
        section = re.sub(r"[`*_]", "", section).strip().rstrip(".").lower()
        return any(n.lower().startswith(section) for n in names)

    for kind, pattern in POINTERS.items():
        for m in pattern.finditer(flat):
            groups = [g for g in m.groups() if g]
            doc = next((g for g in groups if g.startswith("docs/")), None)
            section = next(g for g in groups if not g.startswith("docs/"))
            if doc:
                ok = (ROOT / doc).is_file() and starts(section, (ROOT / doc).read_text(encoding="utf-8"), True)
            else:
                ok = starts(section, bench if kind.startswith("aigc_bench") else readme, False)
            if not ok:
                broken.append(f"{where}: {kind}: {m.group(0)}")
    for doc in re.findall(r"(?<![\w/.-])docs/[\w/-]+\.md\b", flat):
        if not (ROOT / doc).is_file():
            broken.append(f"{where}: docs page: {doc}")
    for m in OUTSIDE.finditer(text):
        broken.append(f"{where}: a document outside the repository: {m.group(0)}")
    return broken


def count_pointers() -> dict[str, int]:
    counts = dict.fromkeys([*POINTERS, "docs page"], 0)
    for path in pointer_files():
        flat = _flat(path.read_text(encoding="utf-8"))
        for kind, pattern in POINTERS.items():
            counts[kind] += len(pattern.findall(flat))
        counts["docs page"] += len(re.findall(r"(?<![\w/.-])docs/[\w/-]+\.md\b", flat))
    return counts


def test_every_pointer_leads_to_a_file_and_a_section_that_exist():
    broken = [b for p in pointer_files()
              for b in broken_pointers(p.read_text(encoding="utf-8"), str(p.relative_to(ROOT)))]
    assert not broken, "\n".join(broken)
    counts = count_pointers()
    assert all(counts.values()), counts  # each kind is found: a pattern that matches nothing checks nothing
    print(counts)


def broken_links(page: Path) -> list[str]:
    """The relative links of a page outside the site (README.md, aigc_bench/README.md) that lead to no file, or to
    no heading of a markdown file (``#anchor``: its MkDocs slug, as GitHub names it too)."""
    broken = []
    for target, anchor in re.findall(r"\]\(([^)#\s:]*)(?:#([^)\s]+))?\)", page.read_text(encoding="utf-8")):
        file = (page.parent / target).resolve() if target else page
        if not file.is_file():
            broken.append(f"{page.relative_to(ROOT)}: {target}")
        elif anchor and anchor not in {slug(h) for h in _headings(file.read_text(encoding="utf-8"))}:
            broken.append(f"{page.relative_to(ROOT)}: {target}#{anchor}")
    return broken


def broken_links_in(text: str) -> list[str]:
    """``broken_links`` of a text as if it were README.md."""
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".md", dir=ROOT, delete=True) as tmp:
        tmp.write(text)
        tmp.flush()
        return [b.split(": ", 1)[1] for b in broken_links(Path(tmp.name))]


def test_the_readmes_links_lead_to_files_and_headings_that_exist():
    links = [link for page in ("README.md", "aigc_bench/README.md")
             for link in re.findall(r"\]\(([^)\s:]+)\)", (ROOT / page).read_text(encoding="utf-8"))]
    assert len(links) > 20 and any("#" in link for link in links)
    assert not broken_links(ROOT / "README.md") + broken_links(ROOT / "aigc_bench/README.md")


def test_a_broken_pointer_is_found():
    """The checks can fail: a planted pointer of each kind that leads nowhere is reported."""
    planted = [
        'see README, "No such section"',
        "the section 'Nowhere' of the README",
        'aigc_bench/README.md, section "Not measured"',
        "docs/faults.md, 'Resume after a crash of the moon'",
        'the section "Gone" of docs/team.md',
        "docs/no-such-page.md",
        "# as stack" + ".md says",
        "../sha" + "red/notes",
    ]
    for text in planted:
        assert broken_pointers(text), text
    assert not broken_pointers('README, "Training time" and docs/faults.md, "Resume after a kill"')
    assert slug("Files that are refused, before they're read") == "files-that-are-refused-before-theyre-read"
    assert slug("Speed and what the orchestration costs") == "speed-and-what-the-orchestration-costs"
    assert broken_links_in("[x](docs/own-data.md#no-such-heading) [y](docs/gone.md)") == [
        "docs/own-data.md#no-such-heading", "docs/gone.md"]


# --- docs/development.md's Layout: the tree as it is ---------------------------------------------------------------

def layout() -> list[tuple[str, str, str]]:
    """The Layout block's entries: (folder it sits in, names column, description incl. continuation lines)."""
    text = (ROOT / "docs/development.md").read_text(encoding="utf-8")
    block = re.search(r"(?ms)^## Layout\s*\n+```\n(.*?)^```", text).group(1)
    entries: list[list[str]] = []
    parent = ""
    for line in block.splitlines():
        indent = len(line) - len(line.lstrip())
        names, _, desc = line.strip().partition("  ")
        if indent >= 8 or not names:  # a continuation of the entry above
            entries[-1][2] += " " + line.strip()
            continue
        if indent == 0:
            parent = names if names.endswith("/") else ""
        entries.append([parent if indent else "", names, desc.strip()])
    return [tuple(e) for e in entries]


def misplaced(entries: list[tuple[str, str, str]]) -> list[str]:
    """Paths the Layout names that are not where it puts them."""
    modules = {p.stem: p for p in (ROOT / "aigc").rglob("*.py") if p.stem != "__init__"}
    wrong = []
    for parent, names, desc in entries:
        for name in re.split(r",\s*", names):
            if not (ROOT / parent / name).exists():
                wrong.append(f"{parent}{name}")
        if names.endswith("/") and "," not in names:  # one folder: the files its description names are in it
            folder = ROOT / parent / names
            for file in re.findall(r"\b(\w+\.py)\b", desc):
                if not (folder / file).exists():
                    wrong.append(f"{parent}{names}{file}")
            for word in set(re.findall(r"\b[a-z_]+\b", desc)) & set(modules) if parent == "aigc/" else ():
                if not (folder / f"{word}.py").exists() and f"{word}.py" not in desc:
                    wrong.append(f"{parent}{names}{word} (it is {modules[word].relative_to(ROOT)})")
    return wrong


def test_the_layout_names_paths_that_exist_where_it_puts_them():
    entries = layout()
    assert len(entries) > 10, entries
    assert not misplaced(entries), misplaced(entries)
    assert misplaced([("aigc/", "privacy/", "dp.py; encryption.py"), ("aigc/", "metrics/", "fid, likelihood"),
                      ("", "pipeline/", "serve.py"), ("aigc/", "nowhere.py", "")]) == [
        "aigc/privacy/encryption.py", "aigc/metrics/likelihood (it is aigc/training/likelihood.py)",
        "pipeline/serve.py", "aigc/nowhere.py"]


def test_the_layout_lists_every_module_and_package_of_aigc():
    listed = {name for parent, names, _ in layout() if parent == "aigc/" for name in re.split(r",\s*", names)}
    tree = {p.name for p in (ROOT / "aigc").glob("*.py") if p.name != "__init__.py"} | {
        p.name + "/" for p in (ROOT / "aigc").iterdir() if p.is_dir() and not p.name.startswith("__")}
    assert not tree - listed, f"in aigc/ but not in docs/development.md's Layout: {sorted(tree - listed)}"


# --- The commands of the docs' sh blocks: the offline ones that take seconds run; the others are marked, with why ----

def documented_commands() -> list[tuple[str, str]]:
    """(page, command) for every command line of the ```sh blocks of README.md and docs/, in page order:
    continuation lines joined, comments and blank lines dropped."""
    commands = []
    for page in pages():
        for block in re.findall(r"(?ms)^```(?:sh|bash|shell)\s*\n(.*?)^```", page.read_text(encoding="utf-8")):
            block = re.sub(r"\\\n\s*", " ", block)
            for line in block.splitlines():
                command = re.sub(r"\s+#\s.*$", "", line).strip()
                if command and not command.startswith("#"):
                    commands.append((str(page.relative_to(ROOT)), command))
    return commands


# Run in a copy of the repository's files (a fresh checkout, committed in a throwaway git repository), in page
# order, HOME a folder of their own: each exits with the code given (doctor: 1 where the machine lacks something).
RUN = {
    "aigc doctor": (0, 1),
    "aigc example-data ": (0,),
    "aigc keygen --out ~/": (0,),
    "dvc exp show": (0,),
    "dvc metrics show": (0,),
    "dvc metrics diff": (0,),
    "dvc plots show": (0,),
    "dvc queue status": (0,),
    "dvc status": (0,),
    "dvc remote add ": (0,),
    "dvc remote modify ": (0,),
}
# Not run here: each with the reason.
MARKED = {
    "make run": "trains (minutes)", "make test": "the whole test suite", "make retrain": "trains",
    "make schedule": "runs until Ctrl-C", "make ui": "starts a server", "make serve": "starts a server",
    "make services": "starts servers (PostgreSQL, MLflow, Prefect)", "make services-down": "needs make services",
    "make bench": "benchmarks (minutes)", "make docs": "installs, then builds: test_the_site_builds_offline_with_strict",
    "make install": "installs the venv (network)", "AIGC_TLS_CA=": "starts servers with a team's certificates",
    "dvc repro": "trains", "dvc exp run": "trains", "dvc queue start": "trains the queued experiments",
    "dvc exp apply <name>": "needs an experiment", "dvc push": "needs a remote (network)",
    "dvc pull": "needs a remote (network)", "git clone <repo>": "a placeholder: the team's repository",
    "cp ~/mnist/": "the reader's own files", "source ": "the reader's shell (activates a venv or sets variables)",
    "export ": "the reader's shell: sets variables", "aigc generate ": "needs a trained model",
    "aigc report": "needs a trained run in MLflow", ".venv/bin/pytest": "the test suite",
    "python -m aigc_bench": "benchmarks (minutes)", "python -m pipeline.retrain": "trains",
    "prefect server start": "starts a server", "prefect work-pool ": "needs a Prefect server",
    "prefect --no-prompt deploy": "needs a Prefect server", "prefect worker start": "needs a Prefect server",
    "prefect deployment run": "needs a Prefect server", "mlflow server": "starts a server",
    "mlflow models serve": "starts a server (and needs a registered model)", "curl ": "needs a running server",
    "torchrun ": "trains on GPUs",
}


def _kind(command: str) -> str | None:
    return next((p for p in RUN if command.startswith(p)), None) or next(
        (p for p in MARKED if command.startswith(p)), None)


def test_every_documented_command_is_run_or_marked():
    commands = documented_commands()
    assert len(commands) > 50
    unknown = [f"{page}: {c}" for page, c in commands if _kind(c) is None]
    assert not unknown, "a new command in the docs: add it to RUN (offline, seconds) or MARKED (why not):\n" + \
        "\n".join(unknown)
    assert _kind("dvc frobnicate --now") is None


def test_the_offline_documented_commands_run(tmp_path: Path):
    project, home = tmp_path / "aigc", tmp_path / "home"
    home.mkdir()
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for name in filter(None, files.split("\0")):
        if (ROOT / name).is_file():
            (project / name).parent.mkdir(parents=True, exist_ok=True)
            (project / name).write_bytes((ROOT / name).read_bytes())
    git = ["git", "-c", "user.name=aigc", "-c", "user.email=aigc@localhost"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "a fresh checkout"]):
        subprocess.run(git + args, cwd=project, check=True, capture_output=True)
    env = os.environ | {"HOME": str(home), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    ran: list[str] = []
    seen: set[str] = set()
    for page, command in documented_commands():
        kind = _kind(command)
        if kind not in RUN or command in seen:  # the README's commands are the docs' too: each runs once
            continue
        seen.add(command)
        res = subprocess.run(["bash", "-c", command], cwd=project, env=env, capture_output=True, text=True,
                             timeout=120)
        out = res.stdout + res.stderr
        assert res.returncode in RUN[kind] and "Traceback" not in out, \
            f"{page}: {command} -> {res.returncode}\n{out[-3000:]}"
        ran.append(command)
    assert {k for k in RUN if any(c.startswith(k) for c in ran)} == set(RUN), ran  # every entry of RUN is used
    assert (home / ".config/aigc/data.key").stat().st_mode & 0o777 == 0o600
    assert len(list((project / "data/source/photos32").rglob("*.png"))) == 2000
