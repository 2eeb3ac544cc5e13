"""Every reference the docs make resolves: `make lint` (and so `make test`) runs `python dev/check_refs.py`.

It reads README.md, docs/*.md, Makefile, .ci/run and tests/ui/*, and checks:
- repository paths (`src/mnist_cnn/paths.py`, `tests/e2e/test_ui.py`, a link's target, `core/refusal.py`
  relative to the package): the file or folder exists, relative to the repository, the file's own folder,
  src/mnist_cnn/, src/ or tests/. A path under a pipeline output (dvc.yaml's outs, metrics and plots) or
  under OUTPUTS is what a command creates, and is accepted as such. URLs, absolute paths and placeholders
  (`<run id>`, `$VAR`, `...`) are not repository paths. A bare `name.py` or `name.md` must be some file's name.
- module paths (`mnist_cnn.x.y`, `python -m mnist_cnn...`, and in code spans `module.attr` where module is
  one of the package's modules, e.g. `files.atomic_path`): the module exists and, read with `ast`, defines the
  name. A code span that is a params key (`train.epochs`) or a name the code writes (a tag, `robustness.bf16`)
  is accepted.
- make targets (`make X`, as a command or in a code span): the Makefile defines X.
- anchors of links to .md files: the page has a heading with that GitHub anchor.
Each dangling reference is one line, `file:line: kind 'reference'`, and the exit status is 1.
"""

from __future__ import annotations

import ast
import fnmatch
import itertools
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("README.md", "docs/*.md", "Makefile", ".ci/run", "tests/ui/*")
# Created by a command rather than tracked: the environment (make setup), the MLflow store, the UI test's
# npm packages (make ui-deps). Pipeline outputs come from dvc.yaml.
OUTPUTS = (".venv", "mlruns", "tests/ui/node_modules")
# A slash-free token with one of these endings names a file that must exist somewhere in the repository.
BARE_FILES = (".py", ".md", ".mjs")
# A token with a slash is a path when its first part is a top-level entry, a package or test folder, or
# when it ends in one of these (so that prose like "on/off" or "img/s" is not taken for one).
EXTENSIONS = (".py", ".md", ".mjs", ".json", ".yaml", ".yml", ".toml", ".lock", ".csv", ".png", ".pt", ".db")

SKIPPED = ("node_modules", "__pycache__")  # folders whose file names are nobody's reference

PATH_TOKEN = re.compile(r"[\w.{},*@<>$-]*/[\w./{},*@<>$-]*(?:#[\w-]+)?")
BARE_TOKEN = re.compile(rf"(?<![\w./-])[\w-]+(?:\.[\w-]+)*\.(?:{'|'.join(e[1:] for e in BARE_FILES)})\b(?![/\w])")
MODULE_TOKEN = re.compile(r"(?<![\w./])mnist_cnn(?:\.\w+)+")
DOTTED_SPAN = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+(?:\(\))?")
MAKE_COMMAND = re.compile(r"(?:^|[;&|(`]|\bthen)\s*(?:[A-Z_]+=\S*\s+)*make\s+(?:-\S+\s+|[A-Z_]+=\S*\s+)*([a-z][\w-]*)")
LINK = re.compile(r"\]\(([^)\s]+)\)")
CODE_SPAN = re.compile(r"`([^`]+)`")
MAKE_TARGET = re.compile(r"^([A-Za-z0-9_.-]+(?:[ \t]+[A-Za-z0-9_.-]+)*)[ \t]*:(?![=:])", re.MULTILINE)


@dataclass(frozen=True)
class Dangling:
    file: str
    line: int
    kind: str
    ref: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.kind} '{self.ref}'"


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"[`*]|\]\([^)]*\)|\[", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def expand_braces(text: str) -> list[str]:
    match = re.search(r"\{([^{}]*)\}", text)
    if not match:
        return [text]
    head, tail = text[: match.start()], text[match.end() :]
    return [out for part in match.group(1).split(",") for out in expand_braces(head + part + tail)]


class Repository:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.package = root / "src" / "mnist_cnn"

    def sources(self) -> list[Path]:
        found = itertools.chain.from_iterable(sorted(self.root.glob(pattern)) for pattern in SOURCES)
        return [path for path in found if path.is_file()]

    @cached_property
    def make_targets(self) -> set[str]:
        makefile = self.root / "Makefile"
        text = makefile.read_text() if makefile.exists() else ""
        return {name for match in MAKE_TARGET.finditer(text) for name in match.group(1).split()}

    @cached_property
    def outputs(self) -> list[str]:
        """dvc.yaml's outs, metrics and plots (paths relative to the repository), and OUTPUTS."""
        dvc_yaml = self.root / "dvc.yaml"
        stages = (yaml.safe_load(dvc_yaml.read_text()) or {}).get("stages", {}) if dvc_yaml.exists() else {}
        names = [*OUTPUTS]
        for stage in stages.values():
            for key in ("outs", "metrics", "plots"):
                names += [next(iter(out)) if isinstance(out, dict) else out for out in stage.get(key, [])]
        return [name.rstrip("/") for name in names]

    @cached_property
    def file_names(self) -> set[str]:
        """The names of the repository's files (not those of hidden folders, outputs or caches)."""
        found: set[str] = set()
        for folder, dirs, files in os.walk(self.root):
            here = Path(folder).relative_to(self.root)
            skipped = [d for d in dirs if d.startswith(".") or d in SKIPPED or str(here / d) in self.outputs]
            dirs[:] = [d for d in dirs if d not in skipped]
            found |= set(files)
        return found

    @cached_property
    def roots(self) -> set[str]:
        """First parts that make a slash token a path: top-level entries, outputs, package and test folders."""
        names = {path.name for path in self.root.iterdir()} | {name.split("/")[0] for name in self.outputs}
        for base in (self.package, self.root / "tests"):
            names |= {path.name for path in base.iterdir() if path.is_dir()} if base.is_dir() else set()
        return names - {"__pycache__"}

    @cached_property
    def params(self) -> set[str]:
        """Every params.yaml key and section, dotted."""
        params_yaml = self.root / "params.yaml"
        raw = yaml.safe_load(params_yaml.read_text()) if params_yaml.exists() else {}
        keys: set[str] = set()

        def walk(node: dict, prefix: str) -> None:
            for key, value in node.items():
                keys.add(prefix + str(key))
                if isinstance(value, dict):
                    walk(value, f"{prefix}{key}.")

        walk(raw or {}, "")
        return keys

    @cached_property
    def modules(self) -> dict[str, Path]:
        """Dotted module name -> file, for every module and package under src/."""
        out: dict[str, Path] = {}
        for path in (self.root / "src").rglob("*.py"):
            parts = path.relative_to(self.root / "src").with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
        return out

    @cached_property
    def strings(self) -> set[str]:
        """Every string constant in the package: names the code writes (tags, metric and param names)."""
        found: set[str] = set()
        for path in self.package.rglob("*.py"):
            nodes = ast.walk(ast.parse(path.read_text()))
            found |= {node.value for node in nodes if isinstance(node, ast.Constant) and isinstance(node.value, str)}
        return found

    def defines(self, body: list[ast.stmt], names: list[str]) -> bool:
        """Whether a module or class body defines names[0] (and, for a class, names[1:] inside it)."""
        for node in body:
            defined: list[str] = []
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                defined = [node.name]
            elif isinstance(node, ast.Assign):
                defined = [t.id for t in node.targets if isinstance(t, ast.Name)]
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                defined = [node.target.id]
            elif isinstance(node, ast.If | ast.Try):
                defined = [names[0]] if self.defines(node.body, names[:1]) else []
            if names[0] in defined:
                if len(names) == 1:
                    return True
                return isinstance(node, ast.ClassDef) and self.defines(node.body, names[1:])
        return False

    def resolves(self, dotted: str) -> bool:
        """A module, or a module and names defined in it: mnist_cnn.files.atomic_path."""
        parts = dotted.split(".")
        for cut in range(len(parts), 0, -1):
            module = self.modules.get(".".join(parts[:cut]))
            if module is not None:
                return cut == len(parts) or self.defines(ast.parse(module.read_text()).body, parts[cut:])
        return False

    def module_named(self, dotted: str) -> bool | None:
        """A code span `module.attr` (module a short name: files, stages.train, predict); None: not one."""
        first = dotted.split(".")[0]
        candidates = [name for name in self.modules if name.split(".")[-1] == first]
        if not candidates or Path(dotted).suffix in EXTENSIONS:
            return None
        if dotted in self.params or dotted in self.strings:
            return True
        rest = dotted.split(".")[1:]
        return any(self.resolves(".".join([name, *rest])) for name in candidates)

    def is_output(self, path: str) -> bool:
        """An output, under one (a file of an output folder), above one (models/), or a pattern of some."""
        path = path.strip("/")
        return any(
            path == out or path.startswith(out + "/") or out.startswith(path + "/") or fnmatch.fnmatch(out, path)
            for out in self.outputs
        )

    def path_exists(self, ref: str, here: Path) -> bool:
        bases = (here, self.root, self.package, self.root / "src", self.root / "tests")
        for name in expand_braces(ref):
            if "*" in name:
                found = any(any(base.glob(name)) for base in bases)
            else:
                found = any((base / name).exists() for base in bases)
            if not found and not self.is_output(name) and not self.is_output(os.path.relpath(here / name, self.root)):
                return False
        return True

    def anchor_exists(self, page: Path, anchor: str) -> bool:
        if page.suffix != ".md" or not page.is_file():
            return True
        headings = [line.lstrip("#") for line in page.read_text().splitlines() if re.match(r"#{1,6} ", line)]
        return anchor.lower() in {slug(heading) for heading in headings}


def clean_path(token: str) -> str | None:
    """The repository path a slash token names, or None when it is no repository path."""
    token = token.rstrip(".,:;'\"")
    if "://" in token or token.startswith(("/", "~", "$", "-")) or any(c in token for c in "<>$@") or "..." in token:
        return None
    return re.split(r"::|:\d|#", token)[0].rstrip(".,:")


def lines(path: Path) -> Iterator[tuple[int, str, list[str]]]:
    """(line number, the line, its code: the whole line in a code block or a non-markdown file, else the spans)."""
    fenced = False
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if path.suffix != ".md":
            yield number, line, [line]
        elif line.lstrip().startswith("```"):
            fenced = not fenced
        elif fenced or line.startswith("    "):
            yield number, line, [line]
        else:
            yield number, line, CODE_SPAN.findall(line)


# A file as it was at an earlier commit (`git show 1286e00:dev/x.py`) need not exist now.
AT_REVISION = re.compile(r"\b[0-9a-f]{7,40}:[\w./-]+")


def dangling_in_line(repo: Repository, path: Path, line: str, code: list[str]) -> Iterator[tuple[str, str]]:
    """(kind, reference) of each reference in one line that does not resolve."""
    here = path.parent
    line = AT_REVISION.sub("", line)
    links = set()
    for target in LINK.findall(line):
        if "://" in target or target.startswith(("mailto:", "<")):
            continue
        links.add(target)
        file_part, _, anchor = target.partition("#")
        if file_part and not repo.path_exists(file_part, here):
            yield "path", target
        elif anchor and not repo.anchor_exists(here / file_part if file_part else path, anchor):
            yield "anchor", target
    for token in PATH_TOKEN.findall(line):
        ref = clean_path(token)
        if not ref or "/" not in ref or token.rstrip(".,:;") in links:
            continue
        named = ref.lstrip("./").split("/")[0] in repo.roots or ref.startswith("../") or ref.endswith(EXTENSIONS)
        if named and not repo.path_exists(ref, here):
            yield "path", ref
    for token in BARE_TOKEN.findall(line):
        if token not in repo.file_names and token not in links:
            yield "file", token
    for module in MODULE_TOKEN.findall(line):
        if not repo.resolves(module.rstrip(".")) and module.rstrip(".") not in repo.strings:  # a tag's name
            yield "module", module
    for segment in code:
        span = segment.strip()
        if path.suffix == ".md" and DOTTED_SPAN.fullmatch(span) and repo.module_named(span.removesuffix("()")) is False:
            yield "module", span
        for target in MAKE_COMMAND.findall(segment):
            if target not in repo.make_targets:
                yield "make target", target


def check_file(repo: Repository, path: Path) -> Iterator[Dangling]:
    name = str(path.relative_to(repo.root))
    for number, line, code in lines(path):
        for kind, ref in dict.fromkeys(dangling_in_line(repo, path, line, code)):
            yield Dangling(name, number, kind, ref)


def check(root: Path = ROOT) -> list[Dangling]:
    repo = Repository(root)
    return [found for path in repo.sources() for found in check_file(repo, path)]


def main(root: Path = ROOT) -> int:
    found = check(root)
    for item in found:
        print(item)
    if found:
        print(f"error: {len(found)} dangling reference(s) in README.md, docs/, Makefile, .ci/run or tests/ui/")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
