#!/usr/bin/env python3
"""Compiles every ```cpp block of README.md against procpool's headers.

Users copy these snippets: each must compile against the real API. A snippet
is a fragment that uses names the user would define (load_vocab, Parser,
records, ...). Its prelude, a file of its own in tests/readme/preludes/,
declares them and says where the fragment goes:

    // snippet: procpool::Pool pool({.processes = 4}, [] {
    #include <procpool/procpool.hpp>
    struct Parser { ... };
    void snippet() {
      // @snippet
    }

`// snippet:` lines name the snippet by how its text starts (whitespace
runs count as one space; several such lines are joined by a space), never by
its line number: the start must match exactly one snippet. `// @snippet` is
where its text goes (file scope or a function body). The file compiled is
the prelude with the snippet in place, with #line directives so that errors
in the snippet point to README.md's lines.

The check fails when a snippet has no prelude, when a prelude names no
snippet (or several), and when a snippet does not compile:

    <cxx> -std=c++20 -fsyntax-only -Wall -Wextra -Werror -I<source>/include <flags>

A snippet that includes <procpool/mpi.hpp> is compiled with MPI's flags
(--mpi-include, or `mpicxx --showme:compile`), and skipped, saying so, when
there is no MPI (--no-mpi, or no mpicxx found).
"""

import argparse
import concurrent.futures
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

MARKER = "// @snippet"
KEY_PREFIX = "// snippet:"
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[^`]*?)\s*$")
# Other names a C++ block could be fenced with: refused, so that no C++ block
# goes unchecked for want of the one name this checks.
OTHER_CPP = {"c++", "cxx", "cc", "hpp", "h++", "c"}


@dataclass
class Snippet:
    line: int  # README line of its first line of code (1-based)
    text: str  # the code, with the fence's indentation removed
    prelude: "Prelude | None" = None

    def key(self):
        return normalize(self.text)

    def head(self, lines=3):
        shown = [l for l in self.text.splitlines() if l.strip()][:lines]
        return "\n".join("    | " + l for l in shown)

    def describe(self):
        return f"README.md line {self.line}:\n{self.head()}"


@dataclass
class Prelude:
    path: str
    key: str
    marker_line: int  # 1-based
    lines: list = field(default_factory=list)
    snippets: list = field(default_factory=list)


def normalize(text):
    return " ".join(text.split())


def extract_snippets(readme):
    """Every ```cpp block of the README (indented ones in lists too)."""
    snippets = []
    with open(readme, encoding="utf-8") as f:
        lines = f.read().splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, lang = m.group("indent"), m.group("lang")
        start = i + 1
        i += 1
        while i < len(lines) and not re.match(r"^[ \t]*```\s*$", lines[i]):
            i += 1
        if i == len(lines):
            sys.exit(f"README.md line {start}: a ``` block that never ends")
        if lang != "cpp" and (lang.lower() in OTHER_CPP or lang.lower().startswith("cpp")):
            sys.exit(f"README.md line {start}: a ```{lang} block; C++ is fenced ```cpp here, "
                     "so that tests/readme/check_snippets.py compiles it")
        if lang == "cpp":
            body = [l[len(indent):] if l.startswith(indent) else l.lstrip() for l in lines[start:i]]
            snippets.append(Snippet(line=start + 1, text="\n".join(body) + "\n"))
        i += 1
    return snippets


def read_prelude(path):
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    keys = [l.strip()[len(KEY_PREFIX):].strip() for l in lines if l.strip().startswith(KEY_PREFIX)]
    markers = [n for n, l in enumerate(lines, 1) if l.strip() == MARKER]
    problems = []
    if not keys:
        problems.append(f"{path}: no `{KEY_PREFIX} <how the snippet starts>` line")
    if len(markers) != 1:
        problems.append(f"{path}: needs exactly one `{MARKER}` line (where the snippet goes), "
                        f"has {len(markers)}")
    prelude = Prelude(path=path, key=normalize(" ".join(keys)),
                      marker_line=markers[0] if markers else 0, lines=lines)
    return prelude, problems


def compose(snippet, readme_path):
    """The prelude with the snippet in place of its marker, with #line directives."""
    prelude = snippet.prelude
    indent = re.match(r"\s*", prelude.lines[prelude.marker_line - 1]).group(0)
    out = [f'#line 1 "{prelude.path}"']
    out += prelude.lines[:prelude.marker_line - 1]
    out.append(f'#line {snippet.line} "{readme_path}"')
    out += [(indent + l) if l.strip() else l for l in snippet.text.splitlines()]
    out.append(f'#line {prelude.marker_line + 1} "{prelude.path}"')
    out += prelude.lines[prelude.marker_line:]
    return "\n".join(out) + "\n"


def needs_mpi(source):
    return re.search(r"#\s*include\s*[<\"]procpool/mpi\.hpp[>\"]", source) is not None


def mpi_flags_from_mpicxx():
    """What `mpicxx --showme:compile` (Open MPI) says, or None without MPI."""
    for wrapper in ("mpicxx", "mpic++", "mpiCC"):
        path = shutil.which(wrapper)
        if not path:
            continue
        for ask in (["--showme:compile"], ["-compile_info"]):  # Open MPI, MPICH
            try:
                got = subprocess.run([path] + ask, capture_output=True, text=True, timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                continue
            if got.returncode == 0 and got.stdout.strip():
                words = shlex.split(got.stdout)
                if ask == ["-compile_info"]:
                    words = words[1:]  # the compiler's name first
                return [w for w in words if w.startswith(("-I", "-isystem", "-D", "-pthread"))]
    return None


def compile_one(snippet, args, mpi_flags, workdir):
    source = compose(snippet, args.readme_shown)
    name = os.path.join(workdir, f"snippet_{snippet.line}.cpp")
    with open(name, "w", encoding="utf-8") as f:
        f.write(source)
    command = [args.cxx, "-std=c++20", "-fsyntax-only", "-Wall", "-Wextra", "-Werror",
               f"-I{os.path.join(args.source_dir, 'include')}"] + args.flag
    if needs_mpi(source):
        if mpi_flags is None:
            return snippet, "skipped", ("no MPI here (PROCPOOL_MPI=OFF, --no-mpi, or no mpicxx): "
                                          "procpool/mpi.hpp's snippet is not compiled"), 0.0
        command += mpi_flags
    command.append(name)
    began = time.monotonic()
    got = subprocess.run(command, capture_output=True, text=True, cwd=args.source_dir)
    took = time.monotonic() - began
    if got.returncode != 0:
        shown = " ".join(shlex.quote(c) for c in command)
        errors = (got.stdout + got.stderr).splitlines()
        if len(errors) > args.max_error_lines:
            left = len(errors) - args.max_error_lines
            errors = errors[:args.max_error_lines] + [f"... ({left} more lines)"]
        return snippet, "failed", "$ " + shown + "\n" + "\n".join(errors), took
    return snippet, "ok", "", took


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cxx", default=os.environ.get("CXX", "c++"), help="the compiler")
    here = os.path.dirname(os.path.abspath(__file__))
    parser.add_argument("--source-dir", default=os.path.dirname(os.path.dirname(here)),
                        help="procpool's source tree (README.md and include/ under it)")
    parser.add_argument("--preludes", help="the preludes' folder (default tests/readme/preludes)")
    parser.add_argument("--flag", action="append", default=[],
                        help="one more compiler flag for every snippet (repeatable)")
    mpi = parser.add_mutually_exclusive_group()
    mpi.add_argument("--mpi", action="store_true",
                     help="MPI is there: compile the MPI snippet with --mpi-include's folders")
    mpi.add_argument("--no-mpi", action="store_true", help="no MPI: skip the MPI snippet")
    parser.add_argument("--mpi-include", action="append", default=[],
                        help="an include folder of MPI's (repeatable; implies --mpi)")
    parser.add_argument("--max-error-lines", type=int, default=100,
                        help="a failed snippet's compiler output shown (default 100 lines)")
    parser.add_argument("--only", action="append", default=[], metavar="TEXT",
                        help="compile only the snippets whose code holds TEXT (repeatable; "
                        "the preludes are still all checked)")
    parser.add_argument("--jobs", type=int, default=2, help="compilers at once (default 2)")
    args = parser.parse_args()

    args.source_dir = os.path.abspath(args.source_dir)
    preludes_dir = os.path.abspath(args.preludes or os.path.join(here, "preludes"))
    readme = os.path.join(args.source_dir, "README.md")
    args.readme_shown = readme
    began = time.monotonic()

    if args.no_mpi:
        mpi_flags = None
    elif args.mpi or args.mpi_include:
        mpi_flags = [f for d in args.mpi_include for f in ("-isystem", d)]
    else:
        mpi_flags = mpi_flags_from_mpicxx()

    snippets = extract_snippets(readme)
    problems = []
    preludes = []
    for entry in sorted(os.listdir(preludes_dir)):
        if entry.endswith(".cpp"):
            prelude, wrong = read_prelude(os.path.join(preludes_dir, entry))
            problems += wrong
            if not wrong:
                preludes.append(prelude)

    for prelude in preludes:
        prelude.snippets = [s for s in snippets if s.key().startswith(prelude.key)]
        if not prelude.snippets:
            problems.append(f"{prelude.path}: names a snippet that is not in README.md "
                            f"(none starts with `{prelude.key}`): was it edited or removed? "
                            "Update the `// snippet:` line, or delete the prelude.")
        elif len(prelude.snippets) > 1:
            where = "\n".join(s.describe() for s in prelude.snippets)
            problems.append(f"{prelude.path}: `{prelude.key}` starts {len(prelude.snippets)} "
                            f"snippets; add `// snippet:` lines until one is left:\n{where}")
        else:
            snippet = prelude.snippets[0]
            if snippet.prelude is not None:
                problems.append(f"{prelude.path} and {snippet.prelude.path} both name the "
                                f"snippet at {snippet.describe()}")
            else:
                snippet.prelude = prelude
    for snippet in snippets:
        if snippet.prelude is None and not any(snippet in p.snippets for p in preludes):
            problems.append(f"no prelude for the snippet at {snippet.describe()}\n"
                            f"  add {preludes_dir}/<name>.cpp declaring what it uses, with "
                            f"`{KEY_PREFIX} <its first line>` and `{MARKER}` where it goes")

    if problems:
        for p in problems:
            print(f"FAIL: {p}\n")
        print(f"README snippets: {len(problems)} problem(s) with the preludes; nothing compiled")
        return 1

    count = len(snippets)
    if args.only:
        snippets = [s for s in snippets if any(t in s.text for t in args.only)]
        if not snippets:
            print(f"FAIL: no snippet holds {' or '.join(args.only)}")
            return 1
    print(f"README snippets: {count} ```cpp blocks, compiling {len(snippets)} with {args.cxx}, "
          f"{args.jobs} at a time", flush=True)
    failed = skipped = 0
    with tempfile.TemporaryDirectory(prefix="readme_snippets_") as workdir:
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            jobs = [pool.submit(compile_one, s, args, mpi_flags, workdir) for s in snippets]
            results = [j.result() for j in jobs]
    for snippet, status, message, took in sorted(results, key=lambda r: r[0].line):
        prelude = os.path.relpath(snippet.prelude.path, args.source_dir)
        first = snippet.head(1).strip().lstrip("| ")
        first = first if len(first) <= 60 else first[:57] + "..."
        if status == "ok":
            print(f"  ok      README.md:{snippet.line:<5} {took:5.1f} s  {prelude}  ({first})")
        elif status == "skipped":
            skipped += 1
            print(f"  SKIPPED README.md:{snippet.line:<5} {prelude}: {message}")
        else:
            failed += 1
            print(f"  FAILED  README.md:{snippet.line:<5} {took:5.1f} s  {prelude}", flush=True)
            print(f"FAIL: the snippet at {snippet.describe()}\ndoes not compile (with its "
                  f"prelude {prelude}):\n{message}", flush=True)
    total = time.monotonic() - began
    print(f"README snippets: {len(snippets) - failed - skipped} compiled, {failed} failed, "
          f"{skipped} skipped, in {total:.1f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
