"""`reproduce.py check`: every buildable row's counting columns against the paper's rounding.

A row passes when each counting column matches, or differs with a reason recorded in the table file
(`differs: {column: reason}`); a row that has overrides but does not compose or build fails, as does a
counting column that differs with no reason.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from dynconv.reproduction.compare import RowReport, row_report
from dynconv.reproduction.counting import composer, count_rows
from dynconv.reproduction.tables import Table, check_init_from


@dataclass
class CheckResult:
    matched: int = 0  # counting cells within the paper's rounding
    total: int = 0  # counting cells with a paper value on buildable rows
    explained: int = 0  # cells that differ with a recorded reason
    failures: list[str] = field(default_factory=list)  # "<table>/<row>: why"
    reports: dict[str, list[RowReport]] = field(default_factory=dict)


def check_tables(tables: tuple[Table, ...] | list[Table], progress=None) -> CheckResult:
    result = CheckResult()
    result.failures.extend(check_init_from(tuple(tables)))
    cache: dict = {}
    with composer() as compose:
        for table in tables:
            if progress:
                progress(table)
            counts = count_rows(table, compose, cache)
            reports = []
            for row in table.rows:
                report = row_report(table, row, counts.get(row.id), {})
                reports.append(report)
                for column in table.columns:
                    cell = report.cells[column.key]
                    if not column.is_count or not row.buildable or cell.paper is None:
                        continue
                    result.total += 1
                    if cell.ok:
                        result.matched += 1
                    elif column.key in row.differs:
                        result.explained += 1
                if report.unexplained:
                    result.failures.append(f"{table.id}/{row.id}: {report.status}")
                if report.stale:
                    result.failures.append(f"{table.id}/{row.id}: a reason is recorded for {', '.join(report.stale)} "
                                           "but dynconv now matches the paper there: remove it from differs")
            result.reports[table.id] = reports
    return result


if __name__ == "__main__":  # python -m dynconv.reproduction.check [table ids]: a quick check while editing tables
    from dynconv.reproduction.tables import all_tables, load_table

    chosen = [load_table(name) for name in sys.argv[1:]] or list(all_tables())
    outcome = check_tables(chosen, progress=lambda t: print(f"-- {t.id}", file=sys.stderr))
    for table_id, reports in outcome.reports.items():
        for report in reports:
            cells = "  ".join(f"{k}={c.paper}|{c.dynconv}" for k, c in report.cells.items()
                              if c.paper is not None or c.dynconv is not None)
            print(f"{table_id}/{report.row.id:24s} {report.status[:150]}\n    {cells[:300]}")
    print(f"matched {outcome.matched}/{outcome.total} counting cells; {outcome.explained} differ with a reason")
    for failure in outcome.failures:
        print("FAIL", failure)
    sys.exit(1 if outcome.failures else 0)
