"""The `lmtrain` commands of README.md and of every docs/*.md page run as printed, and the pages hold together.

A command is a line of a fenced code block that starts with `lmtrain ` (after an optional `$ ` prompt and
`VAR=value` environment settings; a trailing `\\` continues it on the next line, `  # ...` is a comment).
Each one composes, validates and finds its paths through the real CLI with `--cfg job`, which stops before
any compute (forked children of one process, tests/fork_cli.py); a `--help` line prints its help; a sweep (`-m`)
goes through the multirun pre-check (every job's group options exist, the first job composes); the lines shown
under a `$ lmtrain ...` example are exactly the errors it prints. `lmtrain plan` lines compose the pretrain or
finetune config they plan (what plan prints is tested in tests/analysis/test_plan.py), and `torchrun ... -m lmtrain ...`
lines the config each of their processes composes (the processes themselves: tests/core/test_distributed.py).
`lmtrain report` lines are left out: they need finished runs, and tests/analysis/test_sweep.py runs the
command. The hints lmtrain prints run too: USAGE's examples compose and the end-of-run hint really generates.

A new page needs nothing here unless its commands name files the sandbox lacks: add those to TEXT_FILES,
RECORD_FILES or CHECKPOINTS. The pages' relative links resolve, docs/index.md links every page, each test a page
names exists, and no page holds an issue number or a path outside the repository."""

import re
import shlex
from pathlib import Path

import pytest
from conftest import lmtrain_many, make_corpus, write_jsonl

from lmtrain.cli import COMMANDS, USAGE
from lmtrain.commands.pretrain import HINT
from lmtrain.config.compose import check, first_values, group_options, literal_strings

ROOT = Path(__file__).parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
OWN_TESTS = ("lmtrain report",)  # commands whose output needs finished runs: tested in their own files

# The pages' relative paths, made real in the sandbox the commands run in.
TEXT_FILES = ["path/to/corpus.txt", "corpus/part-0.txt", "corpus/tasks.txt", "wiki.txt", "input.txt"]
TEXT_FILES += ["data/sums/sums.txt"]
LABELLED = [{"text": "good", "label": 1}, {"text": "bad", "label": 0}]
PAIR = [{"source": "a", "target": "b"}]
CHAT = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
RECORD_FILES = {
    **{f"reviews/{split}.jsonl": LABELLED for split in ("train", "validation", "test")},
    **{f"sentiment/{split}.jsonl": LABELLED for split in ("train", "validation")},
    **{f"translation/{split}.jsonl": PAIR for split in ("train", "validation")},
    "train.jsonl": LABELLED,
    "en-fr/train.jsonl": [{"en": "cat", "fr": "chat"}],
    "chat.jsonl": [{"prompt": "hi", "response": "hello"}],
    "instructions.jsonl": [{"prompt": "hi", "response": "hello"}],
    "chats.jsonl": CHAT,
    "squad-like.jsonl": [{"context": "c", "question": "q", "answer": "a"}],
    **{
        f"prefs/{split}.jsonl": [{"prompt": "q", "chosen": "yes", "rejected": "no"}]
        for split in ("train", "val", "test")
    },
    "problems.jsonl": [{"prompt": "1+2=", "answer": "3"}],
    **{f"data/sums/sums_{part}.jsonl": [{"prompt": "1+2=", "answer": "3"}] for part in ("rl", "val")},
    "data/sums/sums_sft.jsonl": [{"prompt": "1+2=", "response": "3"}],
}
# path -> tiny run it stands for: open models are stand-ins (lmtrain checkpoints), outputs/run has best and latest
CHECKPOINTS = {
    **{f"models/{name}": "lm/checkpoints/latest" for name in ("Qwen2.5-0.5B", "SmolLM2-135M", "Llama-3.2-1B", "gpt2")},
    "outputs/run": "classifier",
    "outputs/x": "lm",
    "outputs/sft": "classifier",
    "outputs/pref": "classifier",
    "models/SmolLM2-135M-Instruct": "lm/checkpoints/latest",
    **{f"runs/{name}": "lm/checkpoints/latest" for name in ("sums", "sums_sft")},
}


def sandbox(root: Path, runs: dict) -> Path:
    """A working dir in which the pages' relative paths exist: text, records and checkpoints (links to tiny runs)."""
    work = root / "work"
    for name in [*TEXT_FILES, *RECORD_FILES, *CHECKPOINTS]:
        (work / name).parent.mkdir(parents=True, exist_ok=True)
    for name in TEXT_FILES:
        make_corpus(work / name, 50)
    for name, records in RECORD_FILES.items():
        write_jsonl(work / name, records)
    for name, run in CHECKPOINTS.items():
        (work / name).symlink_to(runs["root"] / run)
    (work / "corpus_saved").mkdir()  # a `datasets` save_to_disk folder (only its path is checked)
    (work / "corpus_saved" / "state.json").write_text("{}")
    (work / "prompt.txt").write_text("def ")
    reward = "def score(prompt, completion, record):\n    return float(len(completion) < 5)\n"
    (work / "my_rewards.py").write_text(reward)
    (work / "sample.txt").write_text("the cat sat")
    (work / "configs").mkdir()  # the example benchmark suites, as in a checkout
    (work / "configs" / "eval").symlink_to(ROOT / "configs" / "eval")
    (work / "my_tasks.yaml").write_text((ROOT / "configs" / "eval" / "tiny_choice.yaml").read_text())
    return work


def code_lines(page: Path) -> list[list[tuple[int, str]]]:
    """The lines of each fenced code block of a page, with the page's line numbers; `\\` continuations joined."""
    blocks: list[list[tuple[int, str]]] = []
    block, continued = None, None
    for number, line in enumerate(page.read_text().splitlines(), 1):
        if line.startswith("```"):
            block = [] if block is None else None
            blocks += [block] if block is not None else []
        elif block is not None:
            if continued:
                number, line = continued[0], f"{continued[1]} {line.strip()}"
            continued = (number, line[:-1].rstrip()) if line.endswith("\\") else None
            if not continued:
                block.append((number, line))
    return blocks


def page_commands(page: Path) -> list[tuple[str, str, list[str]]]:
    """(where: "page:line", command line, the error lines shown under it for a `$ ` example) of a page."""
    found = []
    for lines in code_lines(page):
        for i, (number, line) in enumerate(lines):
            command = re.sub(r"^(\$ )?([A-Z_]+=\S+ )*(torchrun .*-m (?=lmtrain ))?", "", line).split("  #")[0].strip()
            if not command.startswith("lmtrain ") or command.startswith(OWN_TESTS):
                continue
            if re.match(r"lmtrain [\w ()0-9]+: error: ", command):  # output shown under a `$ ` example
                continue
            errors = []
            for _, after in lines[i + 1 :] if line.startswith("$ ") else []:
                if after.startswith("$ "):
                    break
                errors.append(after)
            found.append((f"{page.relative_to(ROOT)}:{number}", command, errors))
    return found


def placed(command: str) -> list[str]:
    """The command's arguments with the pages' placeholders pointing into the sandbox."""
    command = re.sub(r"outputs/<[^>]+>(/<[^>]+>)?", "outputs/run", command)
    for key in ("init_from", "ckpt", "loss.teacher"):
        command = command.replace(f"{key}=...", f"{key}=outputs/run")
    return shlex.split(command)[1:]


def planned(argv: list[str]) -> list[str]:
    """`lmtrain plan [finetune] overrides --flags` as the command whose config it plans."""
    words, flags_with_values = [], {"--device", "--format", "--steps"}
    for i, word in enumerate(argv[1:], 1):
        if not word.startswith("--") and argv[i - 1] not in flags_with_values:
            words.append(word)
    return words if words and words[0] == "finetune" else ["pretrain", *words]


def all_commands() -> list[tuple[str, str, list[str]]]:
    return [command for page in PAGES for command in page_commands(page)]


def test_docs_commands_run_as_printed(tiny_runs, tmp_path, monkeypatch):
    work = sandbox(tmp_path, tiny_runs)
    commands = all_commands()
    assert len(commands) >= 60 and {where.split(":")[0] for where, _, _ in commands} >= {"README.md"}
    usage = [line.strip() for line in USAGE.splitlines() if line.strip().startswith("lmtrain ")]
    shown = [(where, line, errors) for where, line, errors in commands if " -m " not in line]
    shown += [("lmtrain's usage", line, []) for line in usage if not line.startswith(OWN_TESTS)]
    places: dict[tuple, list[str]] = {}  # a command shown on several pages runs once
    for where, line, errors in shown:
        argv = placed(line)
        places.setdefault((tuple(planned(argv) if argv[0] == "plan" else argv), tuple(errors)), []).append(where)
    single = [(", ".join(where), list(argv), list(errors)) for (argv, errors), where in places.items()]
    as_is = {"--cfg", "--help"}  # printed, not run: these already stop before compute
    # `lmtrain launch` runs as printed: it checks the training command and writes its job file into the sandbox
    cases = [
        argv + ([] if errors or as_is & set(argv) or argv[0] == "launch" else ["--cfg", "job"])
        for _, argv, errors in single
    ]
    hint = shlex.split(HINT % (tiny_runs["lm"] / "checkpoints" / "latest"))[1:]
    results = lmtrain_many([*cases, [*hint, "max_new_tokens=5", "device=cpu"]], cwd=work)
    failed = []
    for (where, argv, errors), result in zip(single, results, strict=False):
        ok = result["rc"] == 2 and result["stderr"].splitlines() == errors if errors else result["rc"] == 0
        if not ok or (not errors and result["stderr"]):
            failed.append(f"{where}: lmtrain {shlex.join(argv)}\n    {result['stderr'].strip() or result['rc']}")
    assert not failed, "commands in the docs that do not run as printed:\n" + "\n".join(failed)
    for argv, result in zip(cases, results, strict=False):
        if argv[0] == "generate" and "prompt=def " in argv:
            assert "prompt: 'def '" in result["stdout"]  # the space the pages' quotes protect
    # the tiny corpus has no 'f' (warned about); the prompt's space survives into the sample
    warning, sample = results[-1]["stdout"].splitlines()[:2]
    assert results[-1]["rc"] == 0 and "no entry for 'f'" in warning and sample.startswith("de "), results[-1]

    monkeypatch.chdir(work)
    for where, line, _ in commands:
        if " -m " in line:  # a sweep's pre-check: every job's group options exist, the first job composes
            argv = [a for a in placed(line) if a != "-m"]
            name, schema = COMMANDS[argv[0]]
            try:
                check(name, schema, first_values(literal_strings(schema, argv[1:], multirun=True)), check_values=False)
            except Exception as error:
                pytest.fail(f"{where}: {line}\n    {error}")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_resolve_and_the_index_lists_every_page():
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            page_text = linked.read_text() if linked.suffix == ".md" and linked.is_file() else ""
            anchors = [slug(heading) for heading in re.findall(r"^#+ (.*)$", page_text, re.M)]
            if not linked.exists() or (anchor and anchor not in anchors):
                broken.append(f"{page.relative_to(ROOT)}: ({target})")
    assert not broken, "links that lead nowhere:\n" + "\n".join(broken)
    index = (ROOT / "docs" / "index.md").read_text()
    unlisted = [p.name for p in PAGES[1:] if p.name != "index.md" and f"]({p.name})" not in index]
    assert not unlisted, f"docs/index.md does not link these pages: {unlisted}"


def test_named_tests_exist():
    sources = {path.name: path.read_text() for path in (ROOT / "tests").rglob("test_*.py")}
    missing = []
    for page in PAGES:
        prose = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # code blocks hold configs, not test names
        for file, name in re.findall(r"(?:(test_\w+\.py)::)?\b(test_\w+)\b(?!\.py)", prose):
            where = [sources[file]] if file in sources else [] if file else sources.values()
            if not any(re.search(rf"^def {name}\(", text, re.M) for text in where):
                missing.append(f"{page.relative_to(ROOT)}: {file + '::' if file else ''}{name}")
    assert not missing, "tests named in the docs that do not exist:\n" + "\n".join(missing)


def test_pages_hold_no_lab_notes():
    """User pages: no issue numbers, no paths outside the repository."""
    notes = []
    for page in PAGES:
        for number, line in enumerate(page.read_text().splitlines(), 1):
            ups = re.findall(r"(?:\.\./)+[\w.-]*", line)
            outside = [up for up in ups if ROOT not in (page.parent / up).resolve().parents]
            if outside or re.search(r"\bissue #?\d+|(^|[\s=`])/(shared|work|home)/", line):
                notes.append(f"{page.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not notes, "lines for developers, not users:\n" + "\n".join(notes)


def test_the_group_table_lists_each_groups_options():
    """docs/configuration.md's table of groups names exactly the options under configs/<group>/."""
    rows = re.findall(r"^\| `(\w+)`[^|]* \| ([^|]+) \|", (ROOT / "docs" / "configuration.md").read_text(), re.M)
    assert len(rows) >= 9
    for group, options in rows:
        assert sorted(re.findall(r"`(\w+)`", options)) == group_options(group), group
