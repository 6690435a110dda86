"""Rich tables of evaluation results in the layout of the SHREC'21 paper.

- `localization_table`: table 3 (RR TP FP FN MH RO AD Recall Precision Miss rate F1),
- `class_f1_table`: table 4 (one F1 column per class),
- `size_group_table`: table 6 (mean F1 per size group of table 5),
- `per_class_table` and `confusion_table`: the detail behind table 4.
Each table takes a mapping row label -> result so that several methods or
tomograms can share one table (e.g. `pick` and `demo` print theirs the same way).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from rich import box
from rich.console import Console
from rich.table import Table

LOCALIZATION_COLUMNS = (
    ("RR", "RR"), ("TP", "TP"), ("FP", "FP"), ("FN", "FN"), ("MH", "MH"), ("RO", "RO"),
    ("AD", "AD"), ("recall", "Recall"), ("precision", "Precision"),
    ("miss_rate", "Miss rate"), ("f1", "F1"),
)


def _table(title: str) -> Table:
    # Light rules keep SHREC's wide tables readable in an 80-column terminal.
    return Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 0))


def _number(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return str(value)
    return f"{value:.3f}"


def localization_table(rows: Mapping[str, Mapping], title: str = "Localization") -> Table:
    """One row per method/tomogram; values from `result["localization"]`."""
    table = _table(title)
    table.add_column("", overflow="fold")
    for _, header in LOCALIZATION_COLUMNS:
        table.add_column(header, justify="right")
    for label, loc in rows.items():
        table.add_row(label, *(_number(loc.get(key)) for key, _ in LOCALIZATION_COLUMNS))
    return table


def _class_order(rows: Mapping[str, Mapping]) -> list[str]:
    order: dict[str, None] = {}
    for per_class in rows.values():
        order.update(dict.fromkeys(per_class))
    return list(order)


def class_f1_table(
    rows: Mapping[str, Mapping], classes: Sequence[str] | None = None, title: str = "Classification F1"
) -> Table:
    """SHREC'21 table 4: F1 per class; `rows` maps a label to `classification["per_class"]`."""
    classes = list(classes) if classes is not None else _class_order(rows)
    table = _table(title)
    table.add_column("")
    for name in classes:
        table.add_column(name, justify="right")
    for label, per_class in rows.items():
        table.add_row(
            label, *(_number(per_class[c]["f1"]) if c in per_class else "-" for c in classes)
        )
    return table


def size_group_table(rows: Mapping[str, Mapping], title: str = "F1 per size group") -> Table:
    """SHREC'21 table 6: mean F1 per size group; `rows` maps a label to `classification["size_groups"]`."""
    groups: dict[str, None] = {}
    for size_groups in rows.values():
        groups.update(dict.fromkeys(size_groups))
    table = _table(title)
    table.add_column("")
    for group in groups:
        table.add_column(group.capitalize(), justify="right")
    for label, size_groups in rows.items():
        table.add_row(
            label, *(_number(size_groups[g]["f1"]) if g in size_groups else "-" for g in groups)
        )
    return table


def per_class_table(per_class: Mapping[str, Mapping], title: str = "Per class") -> Table:
    """Precision, recall, F1 and number of true particles for each class."""
    table = _table(title)
    for header in ("class", "n true", "precision", "recall", "F1"):
        table.add_column(header, justify="left" if header == "class" else "right")
    for name, values in per_class.items():
        table.add_row(
            name, str(values.get("n_true", "-")), _number(values["precision"]),
            _number(values["recall"]), _number(values["f1"]),
        )
    return table


def confusion_table(confusion: Mapping, title: str = "Confusion (rows: true, columns: assigned)") -> Table:
    labels = list(confusion["labels"])
    table = _table(title)
    table.add_column("")
    for label in labels:
        table.add_column(label, justify="right")
    for label, row in zip(labels, confusion["matrix"], strict=True):
        if label == "background":  # never a true class: the row is always empty
            continue
        table.add_row(label, *(str(v) if v else "." for v in row))
    return table


def print_evaluation(console: Console, result: Mapping, label: str = "vpdetect") -> None:
    """Everything `vpdetect evaluate` shows for one result of `evaluate_picks`."""
    console.print(localization_table({label: result["localization"]}))
    classification = result.get("classification")
    if not classification:
        console.print("no classes in the predictions: classification not evaluated")
        return
    console.print(per_class_table(classification["per_class"]))
    console.print(class_f1_table({label: classification["per_class"]}))
    if classification.get("size_groups"):
        console.print(size_group_table({label: classification["size_groups"]}))
    if len(classification["confusion"]["labels"]) <= 16:
        console.print(confusion_table(classification["confusion"]))
