"""Notebooks print, in the cells nbval checks, only what every machine agrees on (issue 10).

`pytest --nbval` re-executes a notebook and compares each checked cell's text output, character
for character, with the committed one. A number that depends on the CPU passes on the machine
that executed the notebook and fails on a learner's: an error magnitude printed as `1.1e-15` on
one machine was `1.0e-15` on an AMD machine (floating-point rounding follows the BLAS and SIMD
paths), and a time or a rate differs on every run. Re-executing under other SIMD paths does not
reproduce every such difference, so this test checks the rule itself, on the committed .ipynb
JSON; it executes nothing.

A cell is checked unless nbval is told to ignore or skip it (`# NBVAL_IGNORE_OUTPUT`,
`# NBVAL_SKIP`, or the matching cell tags). In a checked cell's text outputs (streams and every
text MIME type nbval compares, after tests/nbval_sanitize.cfg is applied), these are flagged:

  e-notation      a float in e-notation (`1.1e-15`), unless it is a stated tolerance: a round
                  number (one significant digit) right after "within", "to", "<", "<=", ">",
                  "than", "tolerance", "atol", "rtol", "below", "under", "above", "over" or
                  "exceeds" (`within 1e-6: True`, `changed by more than 1e-4`)
  error value     any other non-integer number on a line that reports an error or a difference
                  ("error", "diff", "deviation", "residual", "|a - b|"): print the comparison
                  against its tolerance instead
  time or rate    a number followed by a unit of time (ns, µs, us, ms, s, min) or a per-second
                  unit (tok/s, GB/s, TFLOP/s, ...), unless the printed line or a comment line of the
                  cell names where its numbers come from: a committed file under data/bench/ or a
                  datasheet (numbers read from a file, or computed from constants, are the same
                  everywhere)
  past tolerance  digits finer than a tolerance stated on the same line (`0.0001234 within 1e-3`), unless
                  the numbers are read from a named committed file (then the "tolerance" is a goal)
  digits          a non-integer number with 6 or more significant digits (float32 keeps about 7)
  clock           a checked cell whose source reads a clock (perf_counter, time.time, timeit,
                  do_bench, ...): what it prints depends on the run
  run-dependent   a checked cell (with output) that uses a value computed from a run-dependent
                  source, in that cell or an earlier one: a clock, sampling at temperature > 0
                  (`temperature=0.8`, `do_sample=True`, or a `SamplingParams` without a temperature:
                  vLLM's default is 1.0; a last-bit difference in the logits changes the sampled
                  text on another CPU), or concurrent work (`await`, threads, tasks: what a poll sees
                  while requests run, or how many steps an engine took, depends on timing). The
                  source is followed through assignments, loops and `if`s whose condition uses it,
                  and functions that contain it. Such a cell passes only if a comment line in it
                  says why what it prints is the same on every run: `# same on every run: <why>`.

Exact integers, byte counts, booleans, and values rounded to well inside their tolerance pass.
The rules apply to the chapters (notebooks/NN_*.ipynb) and the exercises (notebooks/exercises/).
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
from nbval.plugin import find_comment_markers, find_metadata_tags, get_sanitize_patterns

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
EXERCISES = sorted((ROOT / "notebooks" / "exercises").glob("*.ipynb"))
NOTEBOOKS = CHAPTERS + EXERCISES
SANITIZE = get_sanitize_patterns((ROOT / "tests" / "nbval_sanitize.cfg").read_text())

# Checked cells that failed this check when a rule was added, until their notebook is fixed.
# strict: once the cell is fixed, the test passes, xfail turns that into a failure, and the
# entry must go. Each entry says what was found.
KNOWN_FAILURES: dict[str, str] = {}

NUMBER = re.compile(r"(?<![\w.])\d[\d,]*(?:\.\d+)?(?:[eE][-+]?\d+)?(?!\.\d)")
TOLERANCE_WORDS = re.compile(r"(?:\bwithin|\bto|<=?|>=?|≤|≥|\btol(?:erance)?|\batol|\brtol|\bbelow|\bunder|\babove|"
                             r"\bover|\bthan|\bexceeds?)\s*[:=]?\s*$", re.IGNORECASE)
ROUND = re.compile(r"[1-9](?:\.0*)?(?:[eE][-+]?\d+)?$")           # one significant digit: 1e-6, 5e-3, 0.001
ERROR_WORDS = re.compile(r"\b(?:errors?|err|diffs?|difference|deviation|residual)\b|\|[^|\n]*\s-\s[^|\n]*\|",
                         re.IGNORECASE)
TIME_UNIT = re.compile(r"\s?(?:ns|µs|us|ms|s|sec|seconds?|min)\b(?!/)"
                       r"|\s?(?:[kMGTP]?i?B|[kMGTP]?FLOP|tok(?:ens)?|req(?:uests)?|it|seqs?)/s\b")
CLOCK = re.compile(r"perf_counter|process_time|monotonic\(|time\.time\(|\btimeit\b|do_bench|Stopwatch")
SOURCE_NAMED = re.compile(r"^\s*#.*(?:data/bench/|datasheet)", re.MULTILINE | re.IGNORECASE)
LINE_NAMES_SOURCE = re.compile(r"data/bench/|datasheet", re.IGNORECASE)


def checked_cells(nb: dict):
    """(label, source, outputs) of the code cells nbval compares; the label gives the cell's index in
    the notebook and nbval's number for it (nbval counts code cells only, from 0)."""
    code_cells = [i for i, cell in enumerate(nb["cells"]) if cell["cell_type"] == "code"]
    for n, i in enumerate(code_cells):
        cell = nb["cells"][i]
        source = "".join(cell["source"])
        options = dict(find_comment_markers(source))
        options.update(dict(find_metadata_tags(cell.get("metadata", {})) or ()))
        if options.get("skip") or options.get("check") is False:
            continue
        yield f"{i} (nbval Cell {n})", source, cell.get("outputs", [])


def output_texts(outputs) -> list[str]:
    """The text nbval compares: streams and text MIME types (not images or widget model ids), sanitized."""
    texts = []
    for out in outputs:
        if out["output_type"] == "stream":
            texts.append("".join(out["text"]))
        for mime, value in out.get("data", {}).items():
            if mime.startswith("text/") or mime == "application/json":
                texts.append(value if isinstance(value, str) else "".join(value))
    for regex, replace in SANITIZE:
        texts = [re.sub(regex, replace, t) for t in texts]
    return texts


def significant_digits(number: str) -> int:
    mantissa = re.split(r"[eE]", number.replace(",", ""))[0]
    return len(mantissa.replace(".", "").lstrip("0"))


def place_value(number: str) -> float:
    """The value of the last printed digit: 0.0123 -> 1e-4, 1.5e-3 -> 1e-4."""
    mantissa, _, exponent = number.replace(",", "").lower().partition("e")
    decimals = len(mantissa.partition(".")[2])
    return 10.0 ** (int(exponent or 0) - decimals)


def line_hazards(line: str, source_named: bool) -> list[str]:
    """What in one printed line would differ between machines (empty: nothing)."""
    found, tolerances, values = [], [], []
    for m in NUMBER.finditer(line):
        text, before, after = m.group(), line[: m.start()], line[m.end():]
        is_float = "." in text or "e" in text.lower()
        if TOLERANCE_WORDS.search(before) and ROUND.match(text.replace(",", "")):
            tolerances.append(float(text.replace(",", "")))
            continue
        if "e" in text.lower() and not text.replace(",", "").isdigit():
            found.append(f"e-notation {text!r}")
        elif is_float and ERROR_WORDS.search(line):
            found.append(f"error value {text!r}")
        elif is_float and significant_digits(text) >= 6:
            found.append(f"digits {text!r} ({significant_digits(text)} significant)")
        if not (source_named or LINE_NAMES_SOURCE.search(line)) and TIME_UNIT.match(after):
            found.append(f"time or rate {text + TIME_UNIT.match(after).group()!r}")
        if is_float:
            values.append(text)
    if tolerances and not (source_named or LINE_NAMES_SOURCE.search(line)):   # a goal beside committed numbers
        finest = min(tolerances)
        found += [f"past tolerance {v!r} (tolerance {finest:g})" for v in values if place_value(v) < finest / 10]
    return found


def notebook_hazards(path: Path) -> list[str]:
    """Every hazard in the checked cells of one notebook, as 'cell N: what: the line'."""
    nb = json.loads(path.read_text())
    problems = []
    for i, source, outputs in checked_cells(nb):
        named = bool(SOURCE_NAMED.search(source))
        if CLOCK.search(source):
            problems.append(f"cell {i}: clock: the source reads a clock, "
                            f"{CLOCK.search(source).group()!r} (mark it # NBVAL_IGNORE_OUTPUT)")
        for text in output_texts(outputs):
            for line in text.splitlines():
                for hazard in line_hazards(line, named):
                    problems.append(f"cell {i}: {hazard}: {line.strip()[:160]}")
    problems += run_dependent_cells(nb)
    return problems


# ---- values that depend on the run: clocks, sampling, concurrency ---------------------------------

CLOCK_CALLS = {"perf_counter", "perf_counter_ns", "process_time", "monotonic", "monotonic_ns", "timeit", "do_bench"}
CONCURRENT_CALLS = {"Thread", "ThreadPoolExecutor", "ProcessPoolExecutor", "create_task"}
ASYNCIO_CALLS = {"gather", "to_thread", "ensure_future", "run", "wait", "wait_for", "as_completed"}
SAME_EVERY_RUN = re.compile(r"^\s*#\s*same on every run:\s*\S", re.MULTILINE | re.IGNORECASE)
MUTATORS = {"append", "extend", "update", "add", "insert", "setdefault", "__setitem__"}


def _parse(source: str):
    """The cell's code as an AST (IPython magics and shell lines dropped; top-level await allowed), or None."""
    code = "\n".join("" if line.lstrip().startswith(("%", "!")) else line for line in source.splitlines())
    try:
        return compile(code, "<cell>", "exec", flags=ast.PyCF_ONLY_AST | ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    except SyntaxError:
        return None


def _call_name(call: ast.Call) -> str:
    f = call.func
    return f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""


def _samples(call: ast.Call) -> bool:
    """A call that samples at temperature > 0: temperature=<not 0>, do_sample=True, or SamplingParams() without a
    temperature (its default, as vLLM's, is 1.0)."""
    kw = {k.arg: k.value for k in call.keywords if k.arg}
    if "temperature" in kw:
        v = kw["temperature"]
        return not (isinstance(v, ast.Constant) and v.value == 0)
    if isinstance(kw.get("do_sample"), ast.Constant) and kw["do_sample"].value is True:
        return True
    return _call_name(call) == "SamplingParams"


class _RunDependence:
    """Follows run-dependent values through a notebook's cells, in order (names only, as a reader would)."""

    def __init__(self):
        self.tainted: dict[str, str] = {}          # name -> what made it run-dependent
        self.functions: dict[str, str] = {}        # function name -> the source inside it
        self.uses: list[str] = []                  # in the current cell: what run-dependent values it used

    def source(self, node) -> str | None:
        """What in an expression (or statement) makes it run-dependent, or None."""
        local = {t.id for n in ast.walk(node) if isinstance(n, ast.comprehension)       # [x for x in ...]: its own x
                 for t in ast.walk(n.target) if isinstance(t, ast.Name)}
        local |= {a.arg for n in ast.walk(node) if isinstance(n, ast.Lambda) for a in n.args.args}
        for n in ast.walk(node):
            if isinstance(n, ast.Await):
                return "an await (concurrent work)"
            if isinstance(n, ast.Call):
                name = _call_name(n)
                if name in CLOCK_CALLS or (name == "time" and isinstance(n.func, ast.Attribute)
                                           and isinstance(n.func.value, ast.Name) and n.func.value.id == "time"):
                    return f"a clock ({name})"
                owner = n.func.value.id if isinstance(n.func, ast.Attribute) and isinstance(n.func.value, ast.Name) \
                    else None
                if name in CONCURRENT_CALLS or (name in ASYNCIO_CALLS and owner == "asyncio"):
                    return f"concurrent work ({name})"
                if _samples(n):
                    return f"sampling ({name}, temperature > 0)"
                if name in self.functions:
                    return f"{name}(), which uses {self.functions[name]}"
            if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load) and n.id in self.tainted and n.id not in local:
                return f"{n.id!r} ({self.tainted[n.id]})"
        return None

    def _taint(self, target, why: str | None) -> None:
        """Bind an assignment's targets: names become run-dependent (why) or clean again (why None); a
        subscript or attribute target (xs[i] = ..., obj.x = ...) taints its base name, never cleans it."""
        if isinstance(target, ast.Name):
            if why:
                self.tainted[target.id] = why
            else:
                self.tainted.pop(target.id, None)
        elif isinstance(target, (ast.Tuple, ast.List)):
            for t in target.elts:
                self._taint(t, why)
        elif isinstance(target, ast.Starred):
            self._taint(target.value, why)
        elif why:
            base = target
            while isinstance(base, (ast.Subscript, ast.Attribute)):
                base = base.value
            if isinstance(base, ast.Name):
                self.tainted[base.id] = why

    def _use(self, node, control: str | None) -> str | None:
        why = control or self.source(node)
        if why:
            self.uses.append(f"line {getattr(node, 'lineno', '?')} uses {why}")
        return why

    def visit(self, stmts, control: str | None = None) -> None:
        for s in stmts:
            if isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef)):
                inner = self.source(s)
                if inner:
                    self.functions[s.name] = inner
                else:
                    self.functions.pop(s.name, None)
            elif isinstance(s, ast.ClassDef):
                continue
            elif isinstance(s, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                why = self._use(s.value, control) if s.value is not None else control
                if isinstance(s.value, ast.Lambda) and self.source(s.value):
                    self.functions.update({t.id: self.source(s.value) for t in getattr(s, "targets", [])
                                           if isinstance(t, ast.Name)})
                for t in getattr(s, "targets", None) or [s.target]:
                    self._taint(t, why)
            elif isinstance(s, (ast.For, ast.AsyncFor)):
                why = control or self.source(s.iter) or ("an async for (concurrent work)"
                                                          if isinstance(s, ast.AsyncFor) else None)
                self._taint(s.target, why)
                self.visit(s.body, why)
                self.visit(s.orelse, why)
            elif isinstance(s, (ast.While, ast.If)):
                why = self._use(s.test, control)
                self.visit(s.body, why)
                self.visit(s.orelse, why)
            elif isinstance(s, (ast.With, ast.AsyncWith)):
                why = control
                for item in s.items:
                    why = why or self.source(item.context_expr)
                    if item.optional_vars is not None:
                        self._taint(item.optional_vars, why)
                self.visit(s.body, why)
            elif isinstance(s, ast.Try):
                for block in (s.body, *[h.body for h in s.handlers], s.orelse, s.finalbody):
                    self.visit(block, control)
            elif isinstance(s, ast.Expr):
                why = self._use(s.value, control)
                call = s.value
                if why and isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) \
                        and call.func.attr in MUTATORS and isinstance(call.func.value, ast.Name):
                    self.tainted[call.func.value.id] = why        # xs.append(run-dependent) taints xs
            else:
                self._use(s, control)


def run_dependent_cells(nb: dict) -> list[str]:
    """Checked cells with output that use a run-dependent value (see the module docstring)."""
    checked = {label.split(" ")[0]: label for label, _, _ in checked_cells(nb)}
    flow, problems = _RunDependence(), []
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "code":
            continue
        source = "".join(cell["source"])
        tree = _parse(source)
        if tree is None:
            continue
        flow.uses = []
        flow.visit(tree.body)
        label = checked.get(str(i))
        printed = output_texts([o for o in cell.get("outputs", []) if "image/png" not in o.get("data", {})])
        if label and flow.uses and any(t.strip() for t in printed) and not SAME_EVERY_RUN.search(source):
            problems.append(f"cell {label}: run-dependent: {flow.uses[0]}; print it in a # NBVAL_IGNORE_OUTPUT "
                            f"cell, or say why it is the same on every run ('# same on every run: ...')")
    return problems


def _id(path: Path) -> str:
    return path.relative_to(ROOT / "notebooks").as_posix()       # 07_continuous_batching.ipynb, exercises/...


@pytest.mark.parametrize("path", [
    pytest.param(p, id=_id(p), marks=[pytest.mark.xfail(reason=KNOWN_FAILURES[_id(p)], strict=True)]
                 if _id(p) in KNOWN_FAILURES else [])
    for p in NOTEBOOKS
])
def test_checked_cells_print_only_machine_independent_numbers(path):
    problems = notebook_hazards(path)
    assert not problems, (
        f"{path.name}: checked cells print numbers that differ between machines. Print exact integers, "
        f"booleans against a tolerance ('within 1e-6: True') or values rounded well inside their tolerance; "
        f"put timings and raw error magnitudes in a cell marked # NBVAL_IGNORE_OUTPUT.\n  " + "\n  ".join(problems))


def test_every_notebook_is_checked():
    assert [p.name[:2] for p in CHAPTERS] == [f"{i:02d}" for i in range(1, len(CHAPTERS) + 1)]
    assert len(CHAPTERS) >= 8
    chapters = {p.name for p in CHAPTERS}
    assert all(p.name in chapters for p in EXERCISES), "an exercise notebook is named after its chapter"


# ---- the rule itself, on lines that passed or failed on a second machine -------------------------

@pytest.mark.parametrize("line", [
    "online softmax vs softmax: max |diff| = 1.1e-15",          # 06 cell 13 (then numbered 6): 1.0e-15 on AMD
    "num_heads 8, num_kv_heads 2 (group 4): kernel vs reference rel. error 1.2e-07",
    "  float16     4      128    16      5    6.7e-06  True",    # a table row: no keyword, still e-notation
    "max |kvlab - HF| = 0.00031",                               # an error magnitude without e-notation
    "max |kvlab - HF| = 0.0000001 (within 1e-3)",               # digits below the stated tolerance
    "prefill 128 tokens in 41.3 ms",
    "decode: 11.8 tok/s",
    "copy 3002 GB/s",
    "took 2.1 s",
    "logit 12.345678",                                          # 8 significant digits
    "within 1.1e-15: True",                                     # a 'tolerance' that is itself a measurement
])
def test_rule_flags_machine_dependent_lines(line):
    assert line_hazards(line, source_named=False), line


@pytest.mark.parametrize("line", [
    "max |kvlab - HF| < 1e-3: True  same greedy tokens: True",
    "last token + cache == whole sequence (logits to 1e-4): True",
    "reference vs contiguous SDPA within 1e-6: True",
    "  float16     4      128    16      5   tolerance 2e-3   True",
    "per token:                     524,288 bytes = 512.00 KiB",
    "max-reserve: tokens  22.8%  reserved  15.9%  | batch  6.98 (peak 7)  0.0207 req/step",
    "smollm2-135m GQA 30 3 64 23,040 69,120 3.0x",
    "torch 2.13.0+cpu, triton 3.9.0; 2026-11-27",
    "   ' a'             p = 0.40",
    "12 GiB of KV cache = 15,728 token slots; 3 splits",
    "token 20 replaced; positions whose output changed by more than 1e-4: [20, 21]",
    "H100 SXM5 80GB: 989.4 TFLOP/s / 3.35 TB/s = ridge 295 FLOP/B (NVIDIA H100 datasheet)",
])
def test_rule_passes_machine_independent_lines(line):
    assert line_hazards(line, source_named=False) == [], line


def test_times_from_committed_files_pass_when_the_cell_names_them():
    line = "ceiling: 1 GiB device-to-device copy 3002 GB/s, 357.7 us"
    assert len(line_hazards(line, source_named=False)) == 2
    assert line_hazards(line, source_named=True) == []
    goal = "median ITL 8.0 vs 4.5 ms -> +3.5 ms (<= 5: True)"      # notebook 08: committed figures against a goal
    assert line_hazards(goal, source_named=False) and line_hazards(goal, source_named=True) == []
    assert SOURCE_NAMED.search("x = 1\n# numbers from data/bench/paged_attention_h100.json (H100, 2026-11-27)\n")
    assert not SOURCE_NAMED.search("print('data/bench/x.json')")   # a comment, not code, names the source


def test_ignored_and_skipped_cells_are_not_checked():
    out = [{"output_type": "stream", "name": "stdout", "text": ["max |diff| = 1.1e-15\n"]}]
    cells = [{"cell_type": "code", "metadata": {}, "source": src, "outputs": out}
             for src in ("# NBVAL_IGNORE_OUTPUT\nprint(x)", "# NBVAL_SKIP\nprint(x)", "print(x)")]
    cells.append({"cell_type": "code", "metadata": {"tags": ["nbval-ignore-output"]}, "source": "print(x)",
                  "outputs": out})
    cells.insert(0, {"cell_type": "markdown", "metadata": {}, "source": "# title"})
    assert [label for label, _, _ in checked_cells({"cells": cells})] == ["3 (nbval Cell 2)"]


# ---- the run-dependence rule, on hand-made notebooks ---------------------------------------------

def _notebook(*cells) -> dict:
    """Code cells from (source, printed text) pairs; a source starting with # NBVAL_IGNORE_OUTPUT is ignored."""
    return {"cells": [{"cell_type": "code", "metadata": {}, "source": src,
                       "outputs": [{"output_type": "stream", "name": "stdout", "text": out}] if out else []}
                      for src, out in cells]}


@pytest.mark.parametrize("cells", [
    # sampled text (07's quick-start at temperature 0.8), and a SamplingParams left at its default temperature 1.0
    [("outs = llm.generate(prompts, SamplingParams(temperature=0.8, top_p=0.95))\nprint(outs[0].text)", "x\n")],
    [("params = SamplingParams(top_p=0.95)\n", ""), ("print(llm.generate(p, params)[0].text)", "x\n")],
    [("out = model.generate(ids, do_sample=True)\nprint(tok.decode(out[0]))", "x\n")],
    # a boolean from a burst polled while it runs (08's /metrics burst)
    [("# NBVAL_IGNORE_OUTPUT\ntokens, samples = await burst()\nwaiting = [m['w'] for _, m in samples]", ""),
     ("print('some had to wait:', max(waiting) > 0)", "some had to wait: True\n")],
    # a value read in a loop that a clock ends (08's abort check), then compared in a checked cell
    [("# NBVAL_IGNORE_OUTPUT\ndeadline = time.monotonic() + 30\nwhile time.monotonic() < deadline:\n"
      "    after = scrape(url)\nsteps = after['steps']", ""), ("print(steps < 100)", "True\n")],
    # a function that reads a clock, called later; a list appended to under a thread
    [("def timed():\n    t0 = time.perf_counter()\n    return work()\n", ""), ("r = timed()\nprint(r > 0)", "True\n")],
    [("xs = []\nfor t in [threading.Thread(target=f)]:\n    xs.append(t.name)\n", ""), ("print(len(xs))", "1\n")],
])
def test_run_dependent_values_in_checked_cells_are_flagged(cells):
    assert run_dependent_cells(_notebook(*cells)), cells


@pytest.mark.parametrize("cells", [
    # greedy decoding, SamplingParams(temperature=0) and do_sample=False are the same on every run
    [("outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8))\nprint(outs[0].text)", "x\n")],
    [("out = model.generate(ids, do_sample=False)\nprint(tok.decode(out[0]))", "x\n")],
    # a run-dependent value printed only in an ignored cell; a checked cell that prints nothing
    [("# NBVAL_IGNORE_OUTPUT\nt0 = time.perf_counter()\nprint(t0)", "1.0\n"), ("dt = t0 * 2", "")],
    # a name reassigned from a run-independent value, a comprehension's own variable, kvlab's cache.gather
    [("# NBVAL_IGNORE_OUTPUT\nt = time.perf_counter()", ""), ("t = 3\nprint(t)", "3\n")],
    [("# NBVAL_IGNORE_OUTPUT\nfor t in [threading.Thread(target=f)]:\n    t.start()", ""),
     ("print([t for t in 'ab'])", "['a', 'b']\n")],
    [("k = cache.gather(0, table, 4)\nprint(k.shape)", "(4,)\n")],
    # the author says why it holds on every run
    [("# NBVAL_IGNORE_OUTPUT\ntokens = await burst()", ""),
     ("# same on every run: ignore_eos makes every request generate exactly max_tokens\nprint(set(tokens))", "{32}\n")],
    # a figure's repr is not compared as a measurement
    [("# NBVAL_IGNORE_OUTPUT\nruns = await sweep()", "")] + [("plot(runs)", "")],
])
def test_run_independent_cells_pass(cells):
    assert run_dependent_cells(_notebook(*cells)) == [], cells
