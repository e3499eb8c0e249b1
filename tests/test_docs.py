"""The documentation works: the examples of README.md, data/README.md and docs/*.md are checked.

(a) Python: every ```python block, and every `python - <<'EOF'` heredoc inside a ```bash block, runs
    in a subprocess whose working folder is a temporary one holding ten small synthetic phantoms in
    data/SYNTH (the project is on PYTHONPATH). A block that cannot run here (real data, a GPU, a long
    training) is listed in SKIPPED_BLOCKS with its reason; every other block, a new one included, runs.
(b) Shell: every command line of a ```bash block is checked by its own command, without running it:
    - `python training.py|validation.py ... with ...`: the same with `print_config -l WARNING`
      (all of one script's lines in one process: Sacred's own command-line parsing, ~20 ms each);
      each validation line (without evaluation.checkpoint=) has a training line in its document with
      the same exp_name and training fingerprint, since validation.py evaluates only such a training;
    - `python -m <module> ...`: the line's arguments go through the module's argparse parser, which
      is stopped once they are parsed; a synopsis line ([optional] parts, <placeholders>, a|b
      choices, ...) gets `--help` instead, and each --option it names must be in that help; every
      module also answers `--help`; `scripts.sweep` lines also run with `--dry-run` (the plan only);
    - scripts/*.sh: `bash -n`, then the line itself with PYTHON set to a stub that records the commands
      the script would run (and, for validation.py, makes an empty evaluation run folder); the
      training.py/validation.py commands it records get print_config as above, and the
      `scripts.collect_results` call of val.sh must name exactly the runs it evaluated;
    - `make X`: X is a target of the Makefile; `. .venv/bin/activate`: the Makefile's environment.
    A line of any other form fails test_docs_bash_lines_are_checked: teach this file how to check it.
(c) Every relative link [text](path) and every backticked project path (`configs/base.yaml`,
    `scripts/val.sh`, `configs/methods/*.yaml`, ...) exists; every `python -m <module>` named in
    the prose is a module of the project.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from glob import glob
from pathlib import Path

import pytest

from tests.conftest import PROJECT_ROOT

ROOT = PROJECT_ROOT
DOCS = [ROOT / "README.md", ROOT / "data" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# Python blocks that are not run, keyed by (document, the block's first line that is not blank, a
# comment or an import), with the reason. Every key must match a block (test_docs_skip_list_is_current).
SKIPPED_BLOCKS: dict[tuple[str, str], str] = {
    # ("README.md", "model = train_on_real_data()"): "needs the real CHAOS-T2 data and hours of training",
}

# Backticked paths that look like project paths but name files of other code bases, with the reason.
NOT_PROJECT_PATHS: dict[tuple[str, str], str] = {
    ("docs/rpt.md", "models/attention.py"): "a file of the released RPT code (YazhouZhu19/RPT)",
    ("docs/rpt.md", "dataloaders/datasets.py"): "a file of the released RPT code (YazhouZhu19/RPT)",
}

# The project's top level: a backticked path starting with one of these is a project path.
PROJECT_ENTRIES = {"configs", "data", "dataloaders", "docs", "evaluation", "launch", "models", "scripts", "tests",
                   "training.py", "validation.py", "Makefile", "README.md", "requirements.txt", "pytest.ini"}
PYTHONS = {"python", "python3", ".venv/bin/python"}
SACRED_SCRIPTS = ("training.py", "validation.py")
TIMEOUT = 300


# ---------------------------------------------------------------------------------------------------
# Reading the documents
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Block:
    doc: str          # path relative to the project root
    line: int         # line number of the block's first content line
    lang: str
    text: str


@dataclass(frozen=True)
class Snippet:
    doc: str
    line: int
    text: str

    @property
    def key(self) -> tuple[str, str]:
        for line in self.text.splitlines():
            s = line.strip()
            if s and not s.startswith("#") and not re.match(r"(from \S+ )?import ", s):
                return self.doc, s
        return self.doc, ""


@dataclass
class Command:
    doc: str
    line: int
    text: str                          # as written (continuation lines joined), variables expanded
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}: {self.text}"

    @property
    def kind(self) -> str | None:
        w = self.argv
        if w[0] == "make":
            return "make"
        if w[0] in (".", "source"):
            return "source"
        if w[0] in PYTHONS and len(w) > 1:
            if w[1] == "-":
                return "heredoc"
            if w[1] == "-m" and len(w) > 2:
                return "module"
            if w[1] in SACRED_SCRIPTS:
                return "sacred"
        if re.fullmatch(r"(\./)?scripts/\w+\.sh", w[0]) or (w[0] == "bash" and len(w) > 1
                                                            and re.fullmatch(r"(\./)?scripts/\w+\.sh", w[1])):
            return "script"
        return None

    @property
    def synopsis(self) -> bool:
        """A usage synopsis (optional parts, placeholders, choices) rather than a command to type."""
        return bool(re.search(r"[\[\]<>|]|\.\.\.", self.text))


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


@lru_cache(maxsize=None)
def blocks() -> tuple[Block, ...]:
    found = []
    for doc in DOCS:
        text = doc.read_text()
        for m in re.finditer(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", text, re.M | re.S):
            found.append(Block(rel(doc), text[:m.start()].count("\n") + 2, m.group(1), m.group(2)))
    return tuple(found)


@lru_cache(maxsize=None)
def parsed_bash() -> tuple[tuple[Command, ...], tuple[Snippet, ...], tuple[str, ...]]:
    """Every command line of the ```bash blocks, the python heredocs, and what could not be read."""
    commands, snippets, problems = [], [], []
    for block in blocks():
        if block.lang not in ("bash", "sh", "shell", "console"):
            continue
        lines = block.text.split("\n")
        variables: dict[str, str] = {}
        i = 0
        while i < len(lines):
            start, text = i, lines[i]
            while text.rstrip().endswith("\\") and i + 1 < len(lines):
                i += 1
                text = text.rstrip()[:-1] + " " + lines[i].strip()
            i += 1
            where = f"{block.doc}:{block.line + start}"
            heredoc = re.search(r"<<-?\s*(['\"]?)(\w+)\1", text)
            if heredoc:
                try:
                    end = lines.index(heredoc.group(2), i)
                except ValueError:
                    problems.append(f"{where}: heredoc without its {heredoc.group(2)} line")
                    break
                if text[:heredoc.start()].split()[:2] in ([py, "-"] for py in PYTHONS):
                    snippets.append(Snippet(block.doc, block.line + i, "\n".join(lines[i:end]) + "\n"))
                else:
                    problems.append(f"{where}: a heredoc that is not python's")
                text, i = text[:heredoc.start()], end + 1
            stripped = text.strip()
            if not stripped or stripped.startswith("#") or stripped in ("done", "fi", "else"):
                continue
            loop = re.fullmatch(r"for (\w+) in ([^;]+); do", stripped)
            if loop:                                   # the loop body is checked with the first value
                variables[loop.group(1)] = loop.group(2).split()[0]
                continue
            expanded = re.sub(r"\$\{?(\w+)\}?", lambda m: variables.get(m.group(1), m.group(0)), stripped)
            try:
                words = shlex.split(expanded, comments=True)
            except ValueError as err:
                problems.append(f"{where}: cannot split {stripped!r} ({err})")
                continue
            env = {}
            while words and re.fullmatch(r"[A-Za-z_]\w*=.*", words[0]):
                key, value = words.pop(0).split("=", 1)
                env[key] = value
            if not words:                              # an assignment: used by the lines below
                variables.update(env)
                continue
            unknown = sorted({m for w in words for m in re.findall(r"\$\{?(\w+)", w)})
            if unknown:
                problems.append(f"{where}: {stripped!r} uses ${', $'.join(unknown)}, set nowhere in its block")
                continue
            commands.append(Command(block.doc, block.line + start, expanded.split(" #")[0].strip(), words, env))
    for block in blocks():
        if block.lang == "python":
            snippets.append(Snippet(block.doc, block.line, block.text))
    return tuple(commands), tuple(snippets), tuple(problems)


def commands_of(kind: str) -> list[Command]:
    return [c for c in parsed_bash()[0] if c.kind == kind]


def snippet_params():
    return [pytest.param(s, id=f"{s.doc}:{s.line}") for s in parsed_bash()[1]]


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_driver(code: str, args: list[str], jobs: list, cwd: Path) -> list[dict]:
    """Run one of the drivers below on `jobs` (JSON on stdin); its results (one per job)."""
    proc = subprocess.run([sys.executable, "-c", code, *args], input=json.dumps(jobs), capture_output=True,
                          text=True, cwd=cwd, env=child_env(), timeout=TIMEOUT)
    found = [line for line in proc.stdout.splitlines() if line.startswith("DOCS-RESULT ")]
    assert proc.returncode == 0 and found, f"driver failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n" \
                                           f"{proc.stderr[-3000:]}"
    results = json.loads(found[-1][len("DOCS-RESULT "):])
    assert len(results) == len(jobs)
    return results


# Sacred's own command line, in one process per script: argv[1] is the script, stdin a JSON list of
# argument lists (print_config included); prints one result per list.
SACRED_DRIVER = r"""
import contextlib, importlib.util, io, json, sys
from data.core.run_folder import config_fingerprint
script = sys.argv[1]
jobs = json.load(sys.stdin)
sys.argv = [script]
spec = importlib.util.spec_from_file_location("documented_command", script)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
results = []
for argv in jobs:
    out = io.StringIO()
    ok, config = False, {}
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            run = module.ex.run_commandline([script, *argv])
            ok = run is not None
            config = json.loads(json.dumps(run.config, default=str)) if ok else {}
        except SystemExit as err:
            print(f"exit status {err.code}")
        except Exception as err:
            print(f"{type(err).__name__}: {err}")
    results.append({"ok": ok, "output": out.getvalue()[-4000:], "exp_name": config.get("exp_name"),
                    "log_dir": config.get("log_dir"),
                    "train_fingerprint": config_fingerprint(config, "train") if ok else None})
print("DOCS-RESULT " + json.dumps(results))
"""

# `python -m` commands in one process: each job is {"module", "argv", "mode"}; mode "parse" stops the
# module's argparse parser once it has parsed the arguments, "help" expects --help's exit 0, "run"
# runs main(argv) and expects 0 (the sweep's --dry-run).
MODULE_DRIVER = r"""
import argparse, contextlib, importlib, io, json, sys
class Parsed(Exception):
    pass
original = argparse.ArgumentParser.parse_args
def parse_only(self, args=None, namespace=None):
    original(self, args, namespace)
    raise Parsed
results = []
for job in json.load(sys.stdin):
    out = io.StringIO()
    ok = False
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            main = importlib.import_module(job["module"]).main
            if job["mode"] == "parse":
                argparse.ArgumentParser.parse_args = parse_only
            try:
                code = main(job["argv"])
                ok = job["mode"] == "run" and code == 0
                if not ok:
                    print(f"main returned {code}")
            finally:
                argparse.ArgumentParser.parse_args = original
        except Parsed:
            ok = True
        except SystemExit as err:
            ok = job["mode"] == "help" and err.code in (0, None)
            print(f"exit status {err.code}")
        except Exception as err:
            print(f"{type(err).__name__}: {err}")
    results.append({"ok": ok, "output": out.getvalue()[-6000:]})
print("DOCS-RESULT " + json.dumps(results))
"""

# Stands in for PYTHON in the shell scripts: records each command, one file per call; for
# validation.py makes an empty evaluation run folder under its log_dir and prints a table line.
STUB = r"""#!/usr/bin/env bash
call=$(mktemp "$DOCS_STUB_CALLS/call.XXXXXX")
printf '%s\n' "$@" > "$call"
if [ "${1:-}" = validation.py ]; then
  log_dir=./runs
  for a in "$@"; do case "$a" in log_dir=*) log_dir=${a#log_dir=} ;; esac; done
  mkdir -p "$log_dir/test/stub" && mktemp -d "$log_dir/test/stub/run.XXXXXX" > /dev/null
  echo "mean 0.0000 (stub)"
fi
"""


# ---------------------------------------------------------------------------------------------------
# Fixtures: a working folder, phantoms, the shell scripts run with the stub
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("docs_workspace")


@pytest.fixture(scope="module")
def phantom_workspace(workspace) -> Path:
    """The working folder with data/SYNTH: ten phantoms of 12 x 64 x 64 (no supervoxels)."""
    from data.phantoms import generate_phantoms
    generate_phantoms(workspace / "data" / "SYNTH", n_scans=10, size=64, slices=12, progress=False,
                      supervoxels=False)
    return workspace


@dataclass
class ScriptRun:
    command: Command
    returncode: int
    output: str
    calls: list[list[str]]


@pytest.fixture(scope="module")
def script_runs(tmp_path_factory) -> list[ScriptRun]:
    """Each documented shell-script line, run with the stub as PYTHON and every log_dir in a
    temporary folder."""
    root = tmp_path_factory.mktemp("docs_scripts")
    stub = root / "python_stub"
    stub.write_text(STUB)
    stub.chmod(0o755)
    runs = []
    for n, cmd in enumerate(commands_of("script")):
        calls_dir, log_dir = root / f"calls{n}", root / f"logs{n}"
        calls_dir.mkdir()
        argv = [f"log_dir={log_dir}" if a.startswith("log_dir=") else a for a in cmd.argv]
        env = {**child_env(), **cmd.env, "PYTHON": str(stub), "LOG_DIR": str(log_dir),
               "DOCS_STUB_CALLS": str(calls_dir)}
        proc = subprocess.run(argv if argv[0] == "bash" else ["bash", *argv], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=60)
        calls = [p.read_text().splitlines() for p in sorted(calls_dir.iterdir())]
        runs.append(ScriptRun(cmd, proc.returncode, proc.stdout + proc.stderr, calls))
    return runs


def sacred_job(argv: list[str]) -> list[str]:
    """`[print_config] [-l X] with ...` -> print_config with -l WARNING (unless a level is given)."""
    rest = [a for a in argv if a != "print_config"]
    return ["print_config", *([] if "-l" in rest or "--loglevel" in rest else ["-l", "WARNING"]), *rest]


def make_custom_datasets(argv: list[str], cwd: Path) -> None:
    """A `dataset=X data_dir=Y` line with X not built in needs Y/dataset.json: a minimal one is written
    (print_config reads nothing else)."""
    from data.core.specs import builtin_names
    updates = dict(a.split("=", 1) for a in argv if re.fullmatch(r"(dataset|data_dir)=\S+", a))
    name, data_dir = updates.get("dataset"), updates.get("data_dir")
    if name and data_dir and name.upper() not in builtin_names() and not Path(data_dir).is_absolute():
        description = cwd / data_dir / "dataset.json"
        if not description.exists():
            description.parent.mkdir(parents=True, exist_ok=True)
            description.write_text(json.dumps({"name": name, "modality": "MR",
                                               "labels": {"background": 0, "organ": 1}}))


# ---------------------------------------------------------------------------------------------------
# (a) Python blocks
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("snippet", snippet_params())
def test_docs_python_blocks_run(snippet: Snippet, phantom_workspace):
    if snippet.key in SKIPPED_BLOCKS:
        pytest.skip(SKIPPED_BLOCKS[snippet.key])
    proc = subprocess.run([sys.executable, "-"], input=snippet.text, capture_output=True, text=True,
                          cwd=phantom_workspace, env=child_env(), timeout=TIMEOUT)
    assert proc.returncode == 0, f"{snippet.doc}:{snippet.line}: the block failed\n{proc.stdout[-3000:]}\n" \
                                 f"{proc.stderr[-3000:]}"


def test_docs_skip_list_is_current():
    keys = {s.key for s in parsed_bash()[1]}
    stale = [k for k in SKIPPED_BLOCKS if k not in keys]
    assert not stale, f"SKIPPED_BLOCKS names blocks that are not in the docs: {stale}"


def test_docs_json_blocks_parse(tmp_path):
    """Every ```json block is JSON; one that describes a dataset is a valid dataset.json."""
    from data.core.specs import load_generic_spec
    found = [b for b in blocks() if b.lang == "json"]
    for block in found:
        value = json.loads(block.text)
        if isinstance(value, dict) and {"name", "labels"} <= value.keys():
            folder = tmp_path / f"{block.line}"
            folder.mkdir()
            (folder / "dataset.json").write_text(block.text)
            assert load_generic_spec(folder).name == value["name"], f"{block.doc}:{block.line}"


# ---------------------------------------------------------------------------------------------------
# (b) Shell lines
# ---------------------------------------------------------------------------------------------------
def test_docs_bash_lines_are_checked():
    commands, _, problems = parsed_bash()
    unknown = [c.where for c in commands if c.kind is None]
    assert not problems and not unknown, (
        "bash lines this test cannot read or does not know how to check (teach tests/test_docs.py):\n"
        + "\n".join([*problems, *unknown]))
    assert commands_of("sacred") and commands_of("module") and commands_of("script")


def test_docs_make_targets_exist():
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([\w.-]+)\s*:(?!=)", makefile, re.M))
    for cmd in commands_of("make"):
        for target in cmd.argv[1:] or ["all"]:
            assert target in targets, f"{cmd.where}: no target {target!r} in the Makefile ({sorted(targets)})"


def test_docs_sourced_files_are_the_makefile_environment():
    venv = re.search(r"^VENV\s*:?=\s*(\S+)", (ROOT / "Makefile").read_text(), re.M).group(1)
    for cmd in commands_of("source"):
        assert cmd.argv[1:] == [f"{venv}/bin/activate"], f"{cmd.where}: sources something make does not create"


@dataclass
class SacredResult:
    doc: str
    where: str
    script: str                        # training.py or validation.py
    argv: list[str]
    from_script: bool                  # run by a shell script (log_dir set by the test)
    ok: bool
    output: str
    exp_name: str | None
    train_fingerprint: str | None      # data.core.run_folder.config_fingerprint(config, "train")
    log_dir: str | None


@pytest.fixture(scope="module")
def sacred_results(workspace, script_runs) -> list[SacredResult]:
    """print_config of every documented training.py/validation.py line and of every one the shell
    scripts would run (one process per script)."""
    items = [(cmd.doc, cmd.where, cmd.argv[1], cmd.argv[2:], False) for cmd in commands_of("sacred")]
    for run in script_runs:
        for call in run.calls:
            if call and call[0] in SACRED_SCRIPTS:
                items.append((run.command.doc, f"{run.command.where} -> {' '.join(call)}", call[0], call[1:], True))
    results = []
    for script in SACRED_SCRIPTS:
        mine = [item for item in items if item[2] == script]
        for item in mine:
            make_custom_datasets(item[3], workspace)
        answers = run_driver(SACRED_DRIVER, [str(ROOT / script)], [sacred_job(item[3]) for item in mine], workspace)
        results += [SacredResult(*item, a["ok"], a["output"], a["exp_name"], a["train_fingerprint"], a["log_dir"])
                    for item, a in zip(mine, answers)]
    return results


def test_docs_sacred_commands_parse(sacred_results):
    """print_config accepts every documented training.py/validation.py line and every one the shell
    scripts would run; a run folder named in a command (.../train/<exp_name>/...) is a training's."""
    failures = [f"{r.where}\n{r.output}" for r in sacred_results if not r.ok]
    assert not failures, "print_config refused:\n\n" + "\n\n".join(failures)
    exp_names: dict[str, set[str]] = {}
    for r in sacred_results:
        if r.script == "training.py":
            exp_names.setdefault(r.doc, set()).add(r.exp_name)
    for cmd in parsed_bash()[0]:
        for word in cmd.argv:
            for name in re.findall(r"/train/([^/<>*]+)/", word):
                assert name in exp_names.get(cmd.doc, set()), (
                    f"{cmd.where}: names the run folder of {name!r}, but the trainings of {cmd.doc} are "
                    f"{sorted(exp_names.get(cmd.doc, []))}")


def test_docs_validation_lines_evaluate_a_documented_training(sacred_results):
    """validation.py evaluates only a training of its own configuration (the training fingerprint):
    each documented evaluation (without evaluation.checkpoint=) has, in the same document, a training
    with the same exp_name, training fingerprint and log_dir (a shell script's: the same exp_name and
    fingerprint from a training script)."""
    def key(r: SacredResult):
        return (r.exp_name, r.train_fingerprint, None if r.from_script else r.log_dir)

    trainings = {(r.doc, r.from_script, key(r)) for r in sacred_results if r.ok and r.script == "training.py"}
    unmatched = [r.where for r in sacred_results
                 if r.ok and r.script == "validation.py" and not any(a.startswith("evaluation.checkpoint=") for a in r.argv)
                 and (r.doc, r.from_script, key(r)) not in trainings]
    assert not unmatched, ("evaluations whose training (same exp_name and training configuration) is not "
                           "documented beside them; validation.py would refuse them:\n" + "\n".join(unmatched))


def test_docs_module_commands_parse(workspace, script_runs):
    """Each `python -m` line through its argparse parser (synopses: --help and their options), every
    module's --help, the sweep's lines with --dry-run, and val.sh's collect_results call."""
    jobs, labels, synopses = [], [], []

    def add(label, module, argv, mode):
        jobs.append({"module": module, "argv": argv, "mode": mode})
        labels.append(label)

    for cmd in commands_of("module"):
        module, argv = cmd.argv[2], cmd.argv[3:]
        if cmd.synopsis:
            synopses.append((cmd, len(jobs)))
            add(cmd.where + "  [--help]", module, ["--help"], "help")
        else:
            add(cmd.where, module, argv, "parse")
            if module == "scripts.sweep":
                add(cmd.where + "  [--dry-run]", module, argv if "--dry-run" in argv else [*argv, "--dry-run"],
                    "run")
    for module in sorted({c.argv[2] for c in commands_of("module")}):
        add(f"python -m {module} --help", module, ["--help"], "help")
    for run in script_runs:
        for call in run.calls:
            if call[:1] == ["-m"]:
                add(f"{run.command.where} -> {' '.join(call)}", call[1], call[2:], "parse")
    results = run_driver(MODULE_DRIVER, [], jobs, workspace)
    failures = [f"{label}\n{r['output']}" for label, r in zip(labels, results) if not r["ok"]]
    assert not failures, "refused:\n\n" + "\n\n".join(failures)
    for cmd, index in synopses:
        help_text = results[index]["output"]
        for option in re.findall(r"(?<![\w-])--[a-z][\w-]*", cmd.text):
            assert option in help_text, f"{cmd.where}: {option} is not an option of {cmd.argv[2]}"


def test_docs_shell_scripts_parse_and_run_with_a_stub(script_runs):
    """bash -n on every script; every documented script line runs (with the stub) and makes the runs
    its arguments ask for; val.sh's table is collected from exactly the runs it evaluated."""
    for script in sorted((ROOT / "scripts").glob("*.sh")):
        proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert proc.returncode == 0, f"{rel(script)}: {proc.stderr}"
    for run in script_runs:
        where = run.command.where
        script = next(a for a in run.command.argv if a.endswith(".sh"))
        assert os.access(ROOT / script, os.X_OK), f"{where}: {script} is not executable"
        assert run.returncode == 0, f"{where}: exit status {run.returncode}\n{run.output[-3000:]}"
        commands = [c for c in run.calls if c and c[0] in SACRED_SCRIPTS]
        assert commands, f"{where}: the script ran no training.py or validation.py\n{run.output[-3000:]}"
        if Path(script).name == "val.sh":
            collect = [c for c in run.calls if c[:2] == ["-m", "scripts.collect_results"]]
            assert len(collect) == 1, f"{where}: val.sh should end with one scripts.collect_results call"
            folders = collect[0][2:collect[0].index("--out")]
            assert len(folders) == len(commands), f"{where}: {len(commands)} runs evaluated, {folders} collected"


def test_docs_scripts_list_every_method():
    """The scripts' comments name every method of configs/methods/."""
    methods = sorted(p.stem for p in (ROOT / "configs" / "methods").glob("*.yaml"))
    for script in sorted((ROOT / "scripts").glob("*.sh")):
        for line in script.read_text().splitlines():
            if re.match(r"METHOD=", line):
                listed = sorted(re.findall(r"\w+", line.split("#", 1)[1]))
                assert listed == methods, f"{rel(script)}: the comment lists {listed}, the methods are {methods}"


def test_readme_documents_every_shell_script():
    readme = (ROOT / "README.md").read_text()
    for script in sorted((ROOT / "scripts").glob("*.sh")):
        assert f"scripts/{script.name}" in readme, f"README.md does not mention scripts/{script.name}"
    for variable in ("DATA_DIR", "FOLDS", "GPUS", "LOG_DIR", "PYTHON", "GROUPS_S2"):
        assert f"`{variable}`" in readme, f"README.md does not document the scripts' {variable}"


# ---------------------------------------------------------------------------------------------------
# (c) Links and paths
# ---------------------------------------------------------------------------------------------------
def prose(doc: Path) -> str:
    """The document without its fenced blocks (lines kept, so that positions still count lines)."""
    return re.sub(r"^```.*?^```", lambda m: "\n" * m.group(0).count("\n"), doc.read_text(), flags=re.M | re.S)


def test_docs_relative_links_exist():
    missing = []
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", prose(doc)):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            if not (doc.parent / target.split("#")[0]).exists():
                missing.append(f"{rel(doc)}: [..]({target})")
    assert not missing, "links to nothing:\n" + "\n".join(missing)


def project_path_candidates(doc: Path):
    """Backticked words that look like paths of this project (see PROJECT_ENTRIES); data/<NAME> folders
    (the datasets, git-ignored) are not project paths, data/*.py and data/core are."""
    here = {p.name for p in doc.parent.iterdir()} if doc.parent != ROOT else set()
    for span in re.findall(r"`([^`\n]+)`", prose(doc)):
        for word in re.split(r"[\s,;()=]+", span):
            word = word.rstrip(":.").removeprefix("./")
            if not word or word.startswith(("../", "$", "<", "-")):
                continue
            parts = word.split("/")
            looks_like_file = "/" in word or re.search(r"\.(py|sh|yaml|md|csv)$", word)
            if not looks_like_file:
                continue
            if parts[0] in PROJECT_ENTRIES:
                if parts[0] == "data" and len(parts) > 1 and parts[1] and not (
                        parts[1] == "core" or re.search(r"\.(py|md)$", parts[1])):
                    continue
                yield word, [ROOT]
            elif here & {"__init__.py"} and (parts[0] in here or (len(parts) == 1 and word.endswith(".py"))):
                yield word, [doc.parent, ROOT]           # data/README.md: `pipeline.py`, `core/io.py`


def expand(pattern: str) -> list[str]:
    """{a,b} alternatives and <placeholders> (as *) of a documented path, as glob patterns."""
    pattern = re.sub(r"<[^<>]*>", "*", pattern)
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    return [p for alt in m.group(1).split(",") for p in expand(pattern[:m.start()] + alt + pattern[m.end():])]


def test_docs_project_paths_exist():
    missing = []
    for doc in DOCS:
        for word, bases in project_path_candidates(doc):
            if (rel(doc), word) in NOT_PROJECT_PATHS:
                continue
            for pattern in expand(word):
                if not any(glob(str(base / pattern)) for base in bases):
                    missing.append(f"{rel(doc)}: `{word}`")
    assert not missing, "paths the docs name that do not exist:\n" + "\n".join(sorted(set(missing)))


def test_docs_not_project_paths_are_current():
    named = {(rel(doc), word) for doc in DOCS for word, _ in project_path_candidates(doc)}
    stale = [k for k in NOT_PROJECT_PATHS if k not in named]
    assert not stale, f"NOT_PROJECT_PATHS names paths the docs no longer mention: {stale}"


def test_docs_named_modules_exist():
    """Every `python -m <module>` of the prose and of the blocks names a module of the project."""
    import importlib.util
    missing = []
    for doc in DOCS:
        for module in set(re.findall(r"python -m ([A-Za-z_][\w.]*)", doc.read_text())):
            if module.split(".")[0] in ("data", "scripts", "evaluation", "models", "launch", "configs"):
                if importlib.util.find_spec(module) is None:
                    missing.append(f"{rel(doc)}: python -m {module}")
    assert not missing, "no such module:\n" + "\n".join(missing)


def test_docs_dotted_names_resolve():
    """A backticked dotted name of the project (`data.pipeline.prepare_scan`, `models.engine.checkpoints`)
    is a module, or an attribute of one."""
    import importlib
    import importlib.util
    import yaml
    packages = ("data", "dataloaders", "models", "evaluation", "configs", "launch", "scripts")
    base = yaml.safe_load((ROOT / "configs" / "base.yaml").read_text())
    config_keys = {f"{section}.{key}" for section, keys in base.items() if isinstance(keys, dict) for key in keys}
    missing = []
    for doc in DOCS:
        for span in set(re.findall(r"`([^`\n]+)`", prose(doc))):
            name = span.split("(")[0].rstrip(":.")
            if not re.fullmatch(r"(%s)(\.\w+)+" % "|".join(packages), name) or name in config_keys:
                continue                                 # `evaluation.amp`, `data.n_sv`: config keys
            parts = name.split(".")
            for cut in range(len(parts), 0, -1):
                module = ".".join(parts[:cut])
                try:
                    if importlib.util.find_spec(module) is not None:
                        break
                except ModuleNotFoundError:            # a parent is a module, not a package
                    continue
            value = importlib.import_module(module)
            try:
                for attribute in parts[cut:]:
                    value = getattr(value, attribute)
            except AttributeError:
                missing.append(f"{rel(doc)}: `{span}`")
    assert not missing, "names that are neither a module nor an attribute of one:\n" + "\n".join(missing)
