"""The README's tables of flags, families, presets and datasets against the code they describe.

The README's flag table is written by hand (grouped, with the why); these tests make a flag, a
choice, a default, a range, a family, a preset or a dataset that the code gains, loses or changes show
up as a failure here instead of a README that silently drifts.
"""
import math
import re
from pathlib import Path

import pytest

from datamodules import DATASETS
from deepplain.callbacks import DIAGNOSTICS
from deepplain.cli import build_parser
from deepplain.exits import EXIT_BUG, MEANING
from deepplain.presets import PRESETS, RECIPES
from deepplain.registry import model_names
from deepplain.schema import DEFAULTS, OPTIONS, Range, flag, spellings

pytestmark = pytest.mark.fast

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def table_rows(first_cell: str) -> list[str]:
    """The README's table rows whose first cell starts with ``first_cell`` (a backquoted name)."""
    return [line for line in README.splitlines() if line.startswith("| `" + first_cell)]


def first_cell_names(rows: list[str]) -> set[str]:
    """Every backquoted name in the rows' first cells (``| `a`, `b` | ...`` gives a and b)."""
    return {name for row in rows for name in re.findall(r"`([^`]+)`", row.split("|")[1])}


def flag_rows() -> str:
    return "\n".join(table_rows("--"))


def test_every_flag_of_train_py_is_in_the_readme_flag_table():
    rows = flag_rows()
    assert rows, "the README has no flag table (rows starting with | `--)"
    parser = build_parser()
    missing = []
    for action in parser._actions:
        long_flags = [s for s in action.option_strings if s.startswith("--") and s != "--help"]
        # one spelling of each option is enough (--phase-out stands for its alias --phase-out-epochs)
        if long_flags and not any(re.search(re.escape(f) + r"(?![\w-])", rows) for f in long_flags):
            missing.append(long_flags[0])
    assert not missing, f"flags of train.py missing from the README's flag table: {missing}"


def test_no_flag_in_the_readme_table_is_unknown_to_train_py():
    known = {s for a in build_parser()._actions for s in a.option_strings}
    written = set(re.findall(r"`(--[a-z][\w-]*)", flag_rows()))
    assert written, "no flags found in the README's flag table"
    assert not written - known, f"the README's flag table names flags train.py does not have: {written - known}"


def test_the_choices_the_readme_lists_are_the_parsers():
    rows = flag_rows()
    checked = 0
    for action in build_parser()._actions:
        if not action.choices:
            continue
        for f in action.option_strings:
            m = re.search(re.escape(f) + r" \{([^}]*)\}", rows)
            if m:
                assert sorted(m.group(1).split(",")) == sorted(action.choices), f
                checked += 1
    assert checked >= 5  # model, arch, dataset, ... are written with their choices


def test_the_readme_lists_every_model_family_preset_and_dataset():
    families = first_cell_names([r for r in README.splitlines()
                                 if re.match(r"\| `(" + "|".join(model_names()) + r")` \|", r)])
    assert families == set(model_names())
    presets = first_cell_names([r for r in README.splitlines() if r.startswith("| `") and
                                any("`" + p + "`" in r.split("|")[1] for p in PRESETS)])
    assert presets == set(PRESETS), f"preset table: missing {set(PRESETS) - presets}, extra {presets - set(PRESETS)}"
    datasets = first_cell_names([r for r in README.splitlines() if r.startswith("| `") and
                                 any("`" + d + "`" in r.split("|")[1] for d in DATASETS)])
    assert datasets == set(DATASETS), f"dataset table: missing {set(DATASETS) - datasets}"


NUMBER = r"(?<![\w.])-?\d+(?:\.\d+)?(?:e-?\d+)?(?![\w.])"


def row_of(name: str) -> str:
    """The README flag-table row whose first cell names option ``name`` (any of its spellings)."""
    for row in table_rows("--"):
        first_cell = re.split(r"(?<!\\)\|", row)[1]  # "\|" inside a cell is not a column
        if any(re.search(re.escape(f) + r"(?![\w-])", first_cell) for f in spellings(name)):
            return row
    raise AssertionError(f"no README flag-table row names {flag(name)}")


def states(row: str, value) -> bool:
    """Whether a README row states ``value``: a number by value (1e-4 and 0.0001 alike), a word as a word."""
    if isinstance(value, (list, tuple)):
        return all(states(row, v) for v in value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return any(math.isclose(float(n), value) for n in re.findall(NUMBER, row))
    return re.search(r"(?<![\w-])" + re.escape(str(value)) + r"(?![\w-])", row) is not None


def test_the_readme_flag_table_states_every_default_and_range_of_the_schema():
    """Each option's default (the schema's, or each recipe's when the dataset's recipe decides) and the ends
    of its range are written in the option's README row."""
    missing = []
    for name, o in OPTIONS.items():
        if not o.on_command_line or o.switch:
            continue
        row = row_of(name)
        defaults = [DEFAULTS[name]] if DEFAULTS[name] is not None else [
            recipe[name] for recipe in RECIPES.values() if name in recipe and name != "arch"]
        missing += [f"{flag(name)} default {d}" for d in defaults if not states(row, d)]
        if isinstance(o.valid, Range) and o.valid.low is not None and o.valid.high is not None:
            missing += [f"{flag(name)} range end {end:g}" for end in (o.valid.low, o.valid.high)
                        if not states(row, end)]
    assert missing == [], f"the README's flag table does not state: {missing}"


def test_the_readme_exit_status_table_has_every_code_the_tools_use():
    lines = README.split("| exit status | meaning |", 1)[1].split("\n\n", 1)[0].splitlines()
    codes = {int(m.group(1)) for line in lines if (m := re.match(r"\| (\d+) \|", line))}
    assert codes == {EXIT_BUG, *MEANING}  # every code train.py or a tool returns, and no other


def test_the_readme_names_every_diagnostic_train_py_takes():
    first_cell = re.split(r"(?<!\\)\|", row_of("diagnostics"))[1]
    listed = re.search(r"`--diagnostics all\\\|none\\\|([a-z_,]+)`", first_cell).group(1).split(",")
    assert listed == list(DIAGNOSTICS)
