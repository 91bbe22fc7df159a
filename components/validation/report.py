"""The validation report shared by every task: checks, what failed where, and its Markdown form.

A Check is one rule on one split (a great-expectations expectation or a kubetune check) with the
count of failing rows and a few examples `(row, value)`; `Report.describe` turns it into the line a
user reads: the file, the column, how many rows, what is wrong, and where (line or row; with the
file's name when a split is a folder of files).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from kubetune.storage import formats

SPLITS = ("train", "eval", "test")
EXAMPLES = 5  # example rows quoted per failed check


@dataclass
class Check:
    split: str
    name: str  # the GE expectation type, or a kubetune check name
    column: str  # the user's column name
    severity: str  # critical | warning
    success: bool
    description: str  # what the failing rows are, e.g. "are empty or whitespace-only"
    unexpected_count: int = 0
    element_count: int = 0
    examples: list = field(default_factory=list)  # [(row, value)]
    unit: str = "rows"  # what element_count counts


@dataclass
class Report:
    sources: dict  # split -> the URI given for it
    formats: dict  # split -> file format
    checks: list
    ge_results: dict = field(default_factory=dict)
    files: dict = field(default_factory=dict)  # split -> [(file URI, row offset)] when a split is several files

    @property
    def passed(self) -> bool:
        return not any(c.severity == "critical" and not c.success for c in self.checks)

    def failures(self, severity: str) -> list[Check]:
        return [c for c in self.checks if c.severity == severity and not c.success]

    def describe(self, c: Check, examples: int = EXAMPLES) -> str:
        count = f"{c.unexpected_count} of {c.element_count} {c.unit} " if c.element_count else ""
        examples = ", ".join(f"{self.where(c.split, row)}: {_short(v)}" for row, v in c.examples[:examples])
        return f"{self.sources[c.split]}: column {c.column!r}: {count}{c.description}" + (f"; e.g. {examples}" if examples else "")

    def where(self, split: str, row: int) -> str:
        """'line 9', or 'part-00001.csv line 9' for a split read from several files."""
        unit = formats.unit(self.formats.get(split, "csv"))
        files = self.files.get(split) or []
        if len(files) <= 1:
            return f"{unit} {row}"
        uri, offset = next((f for f in reversed(files) if f[1] < row), files[0])
        return f"{uri.rsplit('/', 1)[-1]} {unit} {row - offset}"

    def rows(self, split: str) -> int | None:
        """The rows the checks saw in a split."""
        return next((c.element_count for c in self.checks if c.split == split and c.element_count), None)

    def error_message(self) -> str:
        lines = [self.describe(c) for c in self.failures("critical")]
        return "input rejected by validation:\n  - " + "\n  - ".join(lines)

    def to_json(self) -> dict:
        return {
            "passed": self.passed,
            "sources": self.sources,
            "checks": [asdict(c) for c in self.checks],
            "great_expectations": self.ge_results,
        }

    def markdown(self, meta: dict | None = None) -> str:
        status = "PASSED" if self.passed else "FAILED"
        out = [f"# Data validation: {status}", ""]
        out += ["| split | source | rows |", "|---|---|---|"]
        for split, src in self.sources.items():
            out.append(f"| {split} | `{src}` | {self.rows(split) or ''} |")
        for severity, title in (("critical", "Errors"), ("warning", "Warnings")):
            failed = self.failures(severity)
            if failed:
                out += ["", f"## {title}", ""] + [f"- {self.describe(c)}" for c in failed]
        out += ["", "## Checks", "", "| split | check | column | severity | result | failing rows |", "|---|---|---|---|---|---|"]
        for c in self.checks:
            out.append(f"| {c.split} | {c.name} | {c.column} | {c.severity} | {'ok' if c.success else 'FAIL'} | {c.unexpected_count} |")
        if meta:
            out += ["", "## Splits used for training", "", "| split | rows | " + " | ".join(meta["labels"]) + " |",
                    "|---|---|" + "---|" * len(meta["labels"])]
            for split in SPLITS:
                counts = meta["splits"][split]["class_counts"]
                out.append(f"| {split} | {meta['splits'][split]['rows']} | " + " | ".join(str(counts.get(lab, 0)) for lab in meta["labels"]) + " |")
        return "\n".join(out) + "\n"


def _short(value, n: int = 60) -> str:
    s = repr(value)
    return s if len(s) <= n else s[: n - 3] + "..."
