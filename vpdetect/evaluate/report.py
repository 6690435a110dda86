"""Rich tables of evaluation results that read in an 80-column terminal.

SHREC'21 paper layouts, with classes as rows so that full class names fit:
- `localization_table`: table 3 (RR TP FP FN MH RO AD Recall Precision Miss rate F1),
  one row per tomogram (or method) plus their total,
- `per_class_table`: table 4 turned on its side (precision, recall, F1 per class),
- `size_group_table`: table 6 (mean F1 per size group of table 5),
- `confusion_table`: rows are numbered true classes, columns the assigned classes by
  the same numbers (the full matrix is in `confusion_csv` and the PNG of `plots`).
CZII: `czii_table` (one class a row) and `czii_tomogram_table` (one tomogram a row).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping

from rich import box
from rich.console import Console
from rich.table import Table

from vpdetect.evaluate.shrec import BACKGROUND

LOCALIZATION_COLUMNS = (
    ("RR", "RR"), ("TP", "TP"), ("FP", "FP"), ("FN", "FN"), ("MH", "MH"), ("RO", "RO"),
    ("AD", "AD"), ("recall", "Recall"), ("precision", "Precision"),
    ("miss_rate", "Miss rate"), ("f1", "F1"),
)
TOTAL = "total"


def _table(title: str, caption: str | None = None) -> Table:
    # Light rules and no padding keep SHREC's wide tables inside 80 columns.
    # The box draws one space between columns; no padding, so that wide tables fit.
    return Table(title=title, caption=caption, box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 0))


def _name_column(table: Table, header: str, names) -> None:
    # Names are never cut: the column is as wide as the longest one.
    width = max([len(str(n)) for n in names] + [len(header)])
    table.add_column(header, justify="left", no_wrap=True, min_width=width)


def _number(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return str(value)
    return f"{value:.3f}"


def _number_columns(table: Table, headers, cells) -> None:
    # Numbers are never cut either; headers of two words may wrap.
    for i, header in enumerate(headers):
        width = max([len(row[i]) for row in cells] + [max(len(w) for w in header.split() or [""])])
        table.add_column(header, justify="right", min_width=width)


def localization_table(rows: Mapping[str, Mapping], title: str = "Localization") -> Table:
    """One row per tomogram/method; values from `result["localization"]`."""
    table = _table(title)
    # Long tomogram names fold onto a second line rather than squeeze the numbers.
    table.add_column("", overflow="fold")
    cells = [[_number(loc.get(key)) for key, _ in LOCALIZATION_COLUMNS] for loc in rows.values()]
    _number_columns(table, [header for _, header in LOCALIZATION_COLUMNS], cells)
    for label, row in zip(rows, cells, strict=True):
        if label == TOTAL and len(rows) > 1:
            table.add_section()
        table.add_row(label, *row)
    return table


def per_class_table(per_class: Mapping[str, Mapping], title: str = "Classification per class") -> Table:
    """Number of true particles, precision, recall and F1 of each class (SHREC'21 table 4)."""
    table = _table(title)
    _name_column(table, "class", per_class)
    for header in ("n true", "precision", "recall", "F1"):
        table.add_column(header, justify="right")
    for name, values in per_class.items():
        table.add_row(
            name, str(values.get("n_true", "-")), _number(values["precision"]),
            _number(values["recall"]), _number(values["f1"]),
        )
    return table


def size_group_table(rows: Mapping[str, Mapping], title: str = "F1 per size group") -> Table:
    """SHREC'21 table 6: mean F1 per size group; `rows` maps a label to `classification["size_groups"]`."""
    groups: dict[str, None] = {}
    for size_groups in rows.values():
        groups.update(dict.fromkeys(size_groups))
    table = _table(title)
    _name_column(table, "", rows)
    for group in groups:
        table.add_column(group.capitalize(), justify="right")
    for label, size_groups in rows.items():
        table.add_row(
            label, *(_number(size_groups[g]["f1"]) if g in size_groups else "-" for g in groups)
        )
    return table


def _numbered(confusion: Mapping) -> tuple[list[str], dict[str, str]]:
    """The labels with true particles (the rows) and a short number for every label."""
    labels = list(confusion["labels"])
    # Background and classes only ever assigned have empty rows: not shown as rows.
    rows = [label for label, row in zip(labels, confusion["matrix"], strict=True)
            if label != BACKGROUND and sum(row)]
    others = [label for label in labels if label not in rows and label != BACKGROUND]
    numbers = {label: str(i) for i, label in enumerate(rows + others, start=1)}
    numbers[BACKGROUND] = "bg"
    return rows, numbers


def confusion_table(confusion: Mapping, title: str = "Confusion matrix") -> Table:
    """Rows: true classes, numbered and named; columns: assigned classes by number (`confusion_legend`)."""
    rows, numbers = _numbered(confusion)
    table = _table(title)
    _name_column(table, "true \\ assigned", [f"{numbers[r]:>2} {r}" for r in rows])
    for label in confusion["labels"]:
        table.add_column(numbers[label], justify="right")
    for label, row in zip(confusion["labels"], confusion["matrix"], strict=True):
        if label in rows:
            table.add_row(f"{numbers[label]:>2} {label}", *(str(v) if v else "." for v in row))
    return table


def confusion_legend(confusion: Mapping) -> str:
    """What the column numbers of `confusion_table` stand for."""
    rows, numbers = _numbered(confusion)
    legend = "columns: the assigned class (first hit), numbered as the rows; bg: background"
    others = [f"{numbers[label]} {label}" for label in confusion["labels"]
              if label not in rows and label != BACKGROUND]
    if others:
        legend += "\nassigned but never true: " + ", ".join(others)
    return legend


def confusion_csv(confusion: Mapping) -> str:
    """The whole matrix with full class names: a header row of assigned classes, one row per true class."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["true \\ assigned", *confusion["labels"]])
    for label, row in zip(confusion["labels"], confusion["matrix"], strict=True):
        writer.writerow([label, *row])
    return buffer.getvalue()


def czii_table(czii: Mapping, title: str | None = None) -> Table:
    """One class a row: radius, weight, TP FP FN, precision, recall, F-beta."""
    beta = czii.get("beta", 4)
    title = title or f"CZII metric (F-beta, beta {beta:g})"
    caption = f"a prediction matches within {czii.get('distance_multiplier', 0.5):g} x the radius"
    table = _table(title, caption=caption)
    per_class = czii["per_class"]
    _name_column(table, "class", per_class)
    for header in ("radius A", "weight", "TP", "FP", "FN", "precision", "recall", f"F{beta:g}"):
        table.add_column(header, justify="right")
    radii, weights = czii.get("radius_angstrom", {}), czii.get("weight", {})
    for name, v in per_class.items():
        table.add_row(
            name, f"{radii[name]:.1f}" if name in radii else "-", f"{weights[name]:g}" if name in weights else "-",
            str(v["tp"]), str(v["fp"]), str(v["fn"]), _number(v["precision"]), _number(v["recall"]),
            _number(v["fbeta"]),
        )
    return table


def czii_tomogram_table(rows: Mapping[str, Mapping], title: str = "CZII metric per tomogram") -> Table:
    """One tomogram a row: TP, FP, FN over its classes and its score; the total last."""
    table = _table(title)
    _name_column(table, "tomogram", rows)
    for header in ("TP", "FP", "FN", "score"):
        table.add_column(header, justify="right")
    for label, czii in rows.items():
        if label == TOTAL and len(rows) > 1:
            table.add_section()
        sums = [sum(v[k] for v in czii["per_class"].values()) for k in ("tp", "fp", "fn")]
        table.add_row(label, *map(str, sums), _number(czii["score"]))
    return table


def _with_total(per_tomogram: Mapping[str, Mapping], total: Mapping) -> dict[str, Mapping]:
    rows = dict(per_tomogram)
    if len(rows) != 1:
        rows[TOTAL] = total
    return rows


def print_shrec(console: Console, per_tomogram: Mapping[str, Mapping], total: Mapping) -> None:
    """Localization of each tomogram and the total; classification of the total."""
    rows = _with_total(per_tomogram, total)
    console.print(localization_table({k: v["localization"] for k, v in rows.items()}))
    classification = total.get("classification")
    if not classification:
        console.print("no classes in the predictions: classification not evaluated")
        return
    console.print(per_class_table(classification["per_class"]))
    if classification.get("size_groups"):
        label = TOTAL if len(per_tomogram) != 1 else next(iter(per_tomogram))
        console.print(size_group_table({label: classification["size_groups"]}))
    console.print(confusion_table(classification["confusion"]))
    console.print(confusion_legend(classification["confusion"]))


def print_czii(console: Console, per_tomogram: Mapping[str, Mapping], total: Mapping) -> None:
    """Each tomogram's counts and score (when there are several), then the total per class."""
    if len(per_tomogram) > 1:
        console.print(czii_tomogram_table(_with_total({k: v["czii"] for k, v in per_tomogram.items()},
                                                      total["czii"])))
    console.print(czii_table(total["czii"]))
    beta = total["czii"].get("beta", 4)
    console.print(f"CZII score (mean F{beta:g}, weighted by class): {total['czii']['score']:.3f}")
    unscored = total["czii"].get("unscored_predictions")
    if unscored:
        listed = ", ".join(f"{name} {n}" for name, n in unscored.items())
        console.print(f"predictions of classes the truth does not hold (not scored): {listed}")
