"""The documented commands run as written: every shell block (```bash, ```sh, ```shell, ```console) of README.md
and docs/cli.md, in the order written, one bash process per document (`set -euo pipefail`), so a block can use
what an earlier block of its document made.

The scratch directory is laid out like a checkout: `tmp/repo` (the working directory) with `.venv` linking to
this venv, and `tmp/shared` linking to the `../shared` beside the checkout (CI has a copy there, with the
LibriSpeech subset), so the blocks' `source .venv/bin/activate` and `../shared/data/...` paths hold. The two
documents run at the same time, each on its own share of the CPUs (see test_documented_commands_run).

Conventions a block follows:
- A ```yaml block whose first line is `# NAME.yaml ...` is the file NAME.yaml, written into the working
  directory when the blocks before it have run (the doc shows the file a command then reads).
- In a ```console block, the `$ ` lines (and their `\\` continuations) are run; the other lines are output.
- The README's set-up block (`make demo`, `make test`) is the installation itself, what CI runs before this test
  (`.ci/run` is `make test`); its targets are checked with a dry run (`make -n`), not run.
- A synopsis with placeholders, or a command that needs what CI lacks (an S3 server), is a ```text block and
  names the test that covers it. Untagged fences are refused, so no command block can skip this test unseen.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared"
DOCS = ["README.md", "docs/cli.md"]
SHELL = {"bash", "sh", "shell", "console"}
FENCE = re.compile(r"^```([\w+-]*)[^\n]*\n(.*?)^```[ \t]*$", re.S | re.M)
MARK = "##### hff-docs-run block"
TIMEOUT_S = 900


def blocks(text: str) -> list[tuple[str, int, str]]:
    """(language, line number, body) of every fenced block of a markdown text, in order."""
    return [(m.group(1), text.count("\n", 0, m.start()) + 1, m.group(2)) for m in FENCE.finditer(text)]


def doc_blocks(doc: str) -> list[tuple[str, int, str]]:
    return blocks((ROOT / doc).read_text(encoding="utf-8"))


def console_commands(body: str) -> str:
    """The commands of a ```console block: its `$ ` lines and their continuation lines."""
    out, cont = [], False
    for line in body.splitlines():
        if cont or line.startswith("$ "):
            out.append(line if cont else line[2:])
            cont = line.rstrip().endswith("\\")
    return "\n".join(out) + "\n"


def make_targets(body: str) -> list[str] | None:
    """The targets when every command of the block is `make TARGET...`; else None."""
    lines = [ln.split("#", 1)[0].strip() for ln in body.splitlines()]
    lines = [ln for ln in lines if ln]
    if not lines or not all(ln.split()[0] == "make" for ln in lines):
        return None
    return [t for ln in lines for t in ln.split()[1:]]


def script_for(name: str, text: str) -> tuple[str, dict[int, str]]:
    """The bash script that runs a document's blocks in order, and each run block's text by number."""
    parts = ["set -euo pipefail", "PS4='+ [${SECONDS} s] '",
             f"trap 'echo \"{MARK} FAILED: line $LINENO: $BASH_COMMAND\"' ERR"]
    shown: dict[int, str] = {}
    for n, (lang, line, body) in enumerate(blocks(text)):
        if lang == "yaml" and (file := re.match(r"#\s*(\S+\.ya?ml)\b", body)):
            parts.append(f"cat > {file.group(1)} <<'HFF_DOCS_RUN_EOF'\n{body}HFF_DOCS_RUN_EOF")
            shown[n] = f"{name}:{line} (```yaml, written to {file.group(1)})\n{body}"
        elif lang in SHELL:
            if lang != "console" and make_targets(body) is not None:
                continue  # the installation itself: checked by test_setup_block_targets_exist
            parts.append(console_commands(body) if lang == "console" else body)
            shown[n] = f"{name}:{line} (```{lang})\n{body}"
        else:
            continue
        parts[-1] = (f"echo '{MARK} {n} start'; SECONDS=0; set -x\n{parts[-1]}\n"
                     f"{{ set +x; }} 2>/dev/null; echo \"{MARK} {n} done in ${{SECONDS}} s\"")
    return "\n".join(parts) + "\n", shown


def checkout(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """tmp/repo with .venv -> this venv and tmp/shared -> ../shared; the environment of a shell in it."""
    assert SHARED.is_dir(), f"the shared data folder {SHARED} (beside the checkout) is missing"
    repo = tmp_path / "repo"
    repo.mkdir(parents=True)
    (repo / ".venv").symlink_to(Path(sys.executable).parents[1], target_is_directory=True)
    (tmp_path / "shared").symlink_to(SHARED, target_is_directory=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "COV_"))}
    env["PATH"] = f"{repo / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env.pop("VIRTUAL_ENV", None)
    env.pop("PYTHONPATH", None)  # the installed package, as a user has it
    env["MPLBACKEND"] = "Agg"
    return repo, env


@dataclass
class Running:
    name: str
    text: str
    dir: Path
    shown: dict[int, str]
    proc: subprocess.Popen
    t0: float


def start_doc(name: str, text: str, tmp_path: Path, cpus: set[int] | None = None) -> Running:
    """Start a document's blocks in tmp/repo (on `cpus` only, when given). The script and its output, written as
    it runs, stay beside the repo: tmp/NAME.sh and tmp/NAME.log (to rerun: `cd tmp/repo && bash ../NAME.sh`)."""
    script, shown = script_for(name, text)
    assert shown, f"{name} has no shell block to run"
    repo, env = checkout(tmp_path)
    stem = Path(name).name
    (tmp_path / f"{stem}.sh").write_text(script)
    mask = os.sched_getaffinity(0)
    with (tmp_path / f"{stem}.log").open("w") as log:
        try:
            if cpus:
                os.sched_setaffinity(0, cpus)  # this thread only, inherited by the child
            proc = subprocess.Popen(["bash", str(tmp_path / f"{stem}.sh")], cwd=repo, env=env,
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        finally:
            os.sched_setaffinity(0, mask)
    return Running(name, text, tmp_path, shown, proc, time.perf_counter())


def finish_doc(run: Running, deadline: float) -> tuple[str | None, str]:
    """Wait for a started document (killed at `deadline`, a perf_counter time); (None, output) when every block
    passed, else (the failing block with its own output, output)."""
    try:
        rc: int | str = run.proc.wait(timeout=max(1.0, deadline - time.perf_counter()))
    except subprocess.TimeoutExpired:
        os.killpg(run.proc.pid, signal.SIGKILL)  # bash and every command it started
        run.proc.wait()
        rc = f"killed after {time.perf_counter() - run.t0:.0f} s"
    out = (run.dir / f"{Path(run.name).name}.log").read_text(errors="replace")
    took = {int(m.group(1)): int(m.group(2)) for m in re.finditer(rf"^{MARK} (\d+) done in (\d+) s$", out, re.M)}
    lines = {n: line for n, (_, line, _) in enumerate(blocks(run.text))}
    print(f"{run.name}: {len(took)}/{len(run.shown)} blocks in {time.perf_counter() - run.t0:.0f} s:",
          ", ".join(f"line {lines[n]}: {s} s" for n, s in took.items()))
    if rc == 0:
        return None, out
    started = [int(m.group(1)) for m in re.finditer(rf"^{MARK} (\d+) start$", out, re.M)]
    n = started[-1] if started else min(run.shown)
    since = out.rsplit(f"{MARK} {n} start\n", 1)[-1]
    return f"a documented block failed (exit {rc}):\n--- block {run.shown[n]}--- its output\n{since[-20000:]}", out


def run_doc(name: str, text: str, tmp_path: Path, timeout: float = TIMEOUT_S) -> tuple[str | None, str]:
    return finish_doc(start_doc(name, text, tmp_path), time.perf_counter() + timeout)


def cpu_shares(n: int) -> list[set[int] | None]:
    """n disjoint shares of the CPUs this process may use (None each when there are fewer CPUs than shares)."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < n:
        return [None] * n
    return [set(cpus[i * len(cpus) // n:(i + 1) * len(cpus) // n]) for i in range(n)]


def test_documented_commands_run(tmp_path: Path) -> None:
    """Both documents at once, each on its own share of the CPUs: the commands size torch's threads to the CPUs
    they may use (hff_cache/runtime/threads.py), so two documents never oversubscribe the cores. Oversubscribed,
    a 2-thread OpenMP team collapses: a 2-step epoch of the README's training took 290 s instead of about 35 s."""
    runs = [start_doc(doc, (ROOT / doc).read_text(encoding="utf-8"), tmp_path / Path(doc).stem, cpus)
            for doc, cpus in zip(DOCS, cpu_shares(len(DOCS)), strict=True)]
    deadline = time.perf_counter() + TIMEOUT_S
    problems = []
    for run in runs:
        failure, out = finish_doc(run, deadline)
        warned = [ln for ln in out.splitlines() if "Warning" in ln and not ln.startswith("+ ")]
        if failure:
            problems.append(f"{run.name}: {failure}")
        elif warned:
            problems.append(f"{run.name}: the documented commands print warnings (see tests/test_clean_output.py):\n"
                            + "\n".join(warned))
    if problems:
        pytest.fail("\n\n".join(problems), pytrace=False)


def test_every_fence_is_tagged() -> None:
    """An untagged fence would hide a command from test_documented_commands_run: say bash or text."""
    for doc in DOCS:
        untagged = [line for lang, line, _ in doc_blocks(doc) if not lang]
        assert not untagged, f"{doc}: untagged ``` blocks at lines {untagged} (use ```bash to run, ```text if not)"


def test_setup_block_targets_exist() -> None:
    """The README's `make` block is the installation (what CI runs): its targets exist (a dry run)."""
    targets = [t for lang, _, body in doc_blocks("README.md") if lang in SHELL - {"console"}
               for t in (make_targets(body) or [])]
    assert {"demo", "test"} <= set(targets), targets
    for t in targets:
        proc = subprocess.run(["make", "-n", "-C", str(ROOT), t], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, f"`make {t}` (dry run): {proc.stderr}"


def test_block_parser() -> None:
    text = "```console\n$ echo a \\\n  b\na b\n$ true\n```\n"
    ((lang, line, body),) = blocks(text)
    assert (lang, line) == ("console", 1) and console_commands(body) == "echo a \\\n  b\ntrue\n"
    assert make_targets("make demo   # x\nmake test\n") == ["demo", "test"]
    assert make_targets("make demo\nhff-cache info x\n") is None


def test_a_failing_block_is_named_with_its_output(tmp_path: Path) -> None:
    """State carries from block to block; the failing block is reported with its own output only."""
    text = ("```bash\necho one > f\n```\n\n```yaml\n# r.yaml: the file\nk: 1\n```\n\n```text\nfalse\n```\n\n"
            "```console\n$ cat r.yaml f\nk: 1\none\n$ ls missing-file\n```\n")
    failure, out = run_doc("doc.md", text, tmp_path, timeout=60)
    assert failure is not None and "doc.md:14 (```console)" in failure, failure
    assert "# r.yaml: the file\nk: 1\none\n" in failure and "echo one" not in failure.split("its output")[1]
    assert "FAILED: line" in failure and "ls missing-file" in failure
