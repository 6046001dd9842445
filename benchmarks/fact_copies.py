"""Count the literal copies of facts that have a home elsewhere (issue #40), and the longest functions.

Reads the installed code (``deepplain/``, ``callbacks/``, ``datamodules/``, ``train.py``; not the tests,
docs or benchmarks) with ``ast``, so docstrings and comments are left out: only string constants the
code uses count, and f-strings count by their literal parts.

* **tags**: a constant that starts with a diagnostic's TensorBoard section and a slash (``saturation/``,
  ``condition/``, ``grad_flow/``, ``max_norm/``, ``alpha/``, ``overview/``, ...), anywhere but in the
  callback's own ``prefix`` declaration (every tag should derive from it);
* **flags**: a constant that names one of train.py's flags (``--depth``, ``--diag-every``), outside
  ``schema.py``, where each option is declared, and not one the file declares itself (a tool's own
  ``--epochs``); split into the tools that build train.py command lines (``sweep``, ``experiments``,
  ``comparisons``, ``verdicts``) and everything else (messages);
* **run-folder paths**: a constant naming a file or folder of a run or sweep folder (``config.json``,
  ``summary.json``, ``checkpoints``, ``last.ckpt``, ``.lock``, ``results.csv``, ``run.json``,
  ``train.log``), outside ``rundir.py``;
* **defaults**: a help text that restates a default (``(default 0.1)``, ``default runs``), and a literal
  default of a function parameter that another function of the package repeats for a parameter of the
  same name (each repetition after the first counts).

    python benchmarks/fact_copies.py            # totals, per fact and per file
    python benchmarks/fact_copies.py --list     # every copy, with its file and line
"""
from __future__ import annotations

import argparse
import ast
import re
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ["deepplain", "callbacks", "datamodules", "train.py"]
TAG_SECTIONS = ("saturation", "condition", "grad_flow", "max_norm", "alpha", "overview", "layer_outputs", "costs",
                "verdict")
RUN_FOLDER_NAMES = ("config.json", "summary.json", "checkpoints", "last.ckpt", ".lock", "results.csv", "run.json",
                    "train.log")
TOOLS = ("sweep.py", "experiments.py", "comparisons.py", "verdicts/")
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
RESTATED_DEFAULT = re.compile(r"\(default [^:){%]|\bdefault [0-9a-z<-]")


def python_files():
    for source in SOURCES:
        path = ROOT / source
        yield from ([path] if path.is_file() else sorted(path.rglob("*.py")))


def train_flags() -> set[str]:
    """train.py's flags, read from the parser the CLI builds (so a new option counts at once)."""
    from deepplain.cli import build_parser
    return {s for action in build_parser()._actions for s in action.option_strings if s.startswith("--")}


def docstring_nodes(tree) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


def constants(tree):
    """(node, text) of every string constant the code uses (docstrings left out)."""
    skip = docstring_nodes(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            yield node, node.value


def prefix_declarations(tree) -> set[int]:
    """The constants of ``prefix = "..."`` class attributes: a section's home."""
    return {id(node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "prefix" for t in node.targets)
            and isinstance(node.value, ast.Constant)}


def help_text(node) -> str:
    """A help text's literal parts; a formatted value (derived, not restated) reads as ``{}``."""
    if isinstance(node, ast.JoinedStr):
        return "".join(p.value if isinstance(p, ast.Constant) else "{}" for p in node.values)
    if isinstance(node, ast.BinOp):
        return help_text(node.left) + help_text(node.right)
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else "{}"


def tool_flags(tree) -> set[str]:
    """The flags a file declares itself (``add_argument("--out", ...)``): a tool's own ``--dataset`` or
    ``--epochs`` is its own, not a copy of train.py's."""
    return {a.value for node in ast.walk(tree) if isinstance(node, ast.Call)
            and getattr(node.func, "attr", "") == "add_argument" for a in node.args
            if isinstance(a, ast.Constant) and isinstance(a.value, str) and a.value.startswith("--")}


def count(listing: bool) -> dict:
    flags = train_flags()
    copies: dict[str, list] = defaultdict(list)
    parameter_defaults: dict[str, list] = defaultdict(list)
    longest = []
    for path in python_files():
        rel = path.relative_to(ROOT).as_posix()
        tree = ast.parse(path.read_text(), filename=rel)
        homes = prefix_declarations(tree)
        own_flags = tool_flags(tree)
        for node, text in constants(tree):
            where = (rel, node.lineno, text[:70])
            if id(node) not in homes and any(text.startswith(f"{s}/") for s in TAG_SECTIONS):
                copies["tags"].append(where)
            if not rel.endswith("schema.py") and any(f in flags and f not in own_flags for f in FLAG.findall(text)):
                copies["flags in tools" if any(t in rel for t in TOOLS) else "flags in messages"].append(where)
            if not rel.endswith("rundir.py") and any(name in text for name in RUN_FOLDER_NAMES):
                copies["run-folder paths"].append(where)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and any(k.arg == "help" for k in node.keywords) or (
                    isinstance(node, ast.Call) and getattr(node.func, "id", "") == "option" and len(node.args) > 1):
                helps = [k.value for k in node.keywords if k.arg == "help"] + list(node.args[1:2])
                for h in helps:
                    text = help_text(h)
                    if RESTATED_DEFAULT.search(text):
                        copies["defaults restated in help"].append((rel, h.lineno, text[:70]))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                longest.append((node.end_lineno - node.lineno + 1, f"{rel}:{node.lineno} {node.name}"))
                args = node.args.posonlyargs + node.args.args
                pairs = list(zip(args[len(args) - len(node.args.defaults):], node.args.defaults)) + [
                    (a, d) for a, d in zip(node.args.kwonlyargs, node.args.kw_defaults) if d is not None]
                for arg, default in pairs:
                    if isinstance(default, ast.Constant) and default.value is not None and not isinstance(
                            default.value, bool):
                        parameter_defaults[(arg.arg, repr(default.value))].append((rel, node.lineno, node.name))
    for (name, value), places in parameter_defaults.items():
        for rel, line, function in places[1:]:
            copies["parameter defaults repeated"].append((rel, line, f"{name}={value} in {function}"))
    longest.sort(reverse=True)
    facts = ("tags", "flags in tools", "flags in messages", "run-folder paths", "defaults restated in help",
             "parameter defaults repeated")
    totals = {fact: len(copies[fact]) for fact in facts}
    for fact in facts:
        found = copies[fact]
        by_file = Counter(rel for rel, _, _ in found)
        print(f"{fact}: {len(found)}  ({', '.join(f'{f} {n}' for f, n in by_file.most_common())})")
        if listing:
            for rel, line, text in found:
                print(f"    {rel}:{line}  {text!r}")
    print(f"total literal copies: {sum(totals.values())}")
    print("longest functions: " + "; ".join(f"{where} ({n} lines)" for n, where in longest[:3]))
    return totals


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--list", action="store_true", help="print every copy with its file and line")
    count(parser.parse_args().list)
