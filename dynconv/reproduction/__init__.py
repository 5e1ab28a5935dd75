"""The papers' tables as data (`tables/*.yaml`) and the tools around them: count a row's model, collect runs,
show a table beside the paper, launch its runs (scripts/reproduce.py; docs/reproduction.md)."""
