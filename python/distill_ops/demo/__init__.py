"""`distill-ops demo`: a teacher distilled into students through every kind of target,
measured end to end on a real corpus (the standard library's own source).

- :mod:`.data`: the corpus, its byte-level BPE tokenizer, windows and the small GPT.
- :mod:`.run`: the teacher, its stores of targets, the students and their evaluation.
- :mod:`.report`: the table, ``demo.json`` and the plots.
"""

from .run import FULL, QUICK, RUNS, Config, run_demo

__all__ = ["FULL", "QUICK", "RUNS", "Config", "run_demo"]
