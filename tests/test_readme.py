"""The README's `lmtrain` commands and the hints lmtrain prints run as printed: each composes, validates and
finds its paths (`--cfg job`, which stops before compute; sweeps through the multirun pre-check), the shown
errors are the errors printed, and the end-of-run hint really generates. `lmtrain report`, `lmtrain plan` and
torchrun lines are left to tests/test_sweep.py, tests/test_plan.py and tests/test_distributed.py."""

import re
import shlex
from pathlib import Path

from conftest import lmtrain_many, make_corpus, write_jsonl

from lmtrain.cli import COMMANDS, USAGE
from lmtrain.commands.pretrain import HINT
from lmtrain.config.compose import check, first_values, literal_strings

README = Path(__file__).parent.parent / "README.md"


def readme_commands() -> list[tuple[str, list[str]]]:
    """(command line, the error lines shown under it for a `$ ` example) from README code blocks."""
    found = []
    for block in re.findall(r"```\n(.*?)```", README.read_text(), re.S):
        lines = block.replace("\\\n", " ").splitlines()
        for i, line in enumerate(lines):
            shown = line.startswith("$ lmtrain ")
            printed = re.match(r"lmtrain [\w ()0-9]+: error: ", line)  # output shown under a `$ ` example
            command = line.removeprefix("$ ")
            own_parser = command.startswith(("lmtrain report", "lmtrain plan"))  # tested in their own files
            if command.startswith("lmtrain ") and not printed and not own_parser:
                errors = []
                for after in lines[i + 1 :] if shown else []:
                    if after.startswith("$ "):
                        break
                    errors.append(after)
                found.append((line.removeprefix("$ ").split("  #")[0].strip(), errors))
    return found


def sandbox(root: Path, runs: dict) -> Path:
    """The README's relative paths, made real: data files and checkpoints (links to tiny runs)."""
    work = root / "work"
    for folder in ("path/to", "reviews", "en-fr", "outputs", "../shared/data/tiny_shakespeare", "models", "corpus"):
        (work / folder).mkdir(parents=True, exist_ok=True)
    for model in ("Qwen2.5-0.5B", "SmolLM2-135M", "Llama-3.2-1B", "gpt2"):  # open models: stand-ins
        (work / "models" / model).symlink_to(runs["lm"] / "checkpoints" / "latest")
    make_corpus(work / "corpus/part-0.txt", 50)
    make_corpus(work / "wiki.txt", 50)
    (work / "corpus_saved").mkdir()  # a `datasets` save_to_disk folder (only its path is checked)
    (work / "corpus_saved" / "state.json").write_text("{}")
    write_jsonl(work / "instructions.jsonl", [{"prompt": "hi", "response": "hello"}])
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    write_jsonl(work / "chats.jsonl", [{"messages": chat}])
    make_corpus(work / "path/to/corpus.txt", 50)
    make_corpus(work / "../shared/data/tiny_shakespeare/input.txt", 50)
    for split in ("train", "validation", "test"):
        write_jsonl(work / f"reviews/{split}.jsonl", [{"text": "good", "label": 1}, {"text": "bad", "label": 0}])
    write_jsonl(work / "en-fr/train.jsonl", [{"en": "cat", "fr": "chat"}])
    write_jsonl(work / "chat.jsonl", [{"prompt": "hi", "response": "hello"}])
    write_jsonl(work / "squad-like.jsonl", [{"context": "c", "question": "q", "answer": "a"}])
    make_corpus(work / "corpus/tasks.txt", 50)
    for task, record in (("sentiment", {"text": "good", "label": 1}), ("translation", {"source": "a", "target": "b"})):
        (work / "../shared/data" / task).mkdir(parents=True, exist_ok=True)
        for split in ("train", "validation"):
            write_jsonl(work / f"../shared/data/{task}/{split}.jsonl", [record])
    (work / "prompt.txt").write_text("def ")
    (work / "sample.txt").write_text("the cat sat")
    (work / "outputs" / "run").symlink_to(runs["classifier"])  # has checkpoints/latest and best
    (work / "outputs" / "x").symlink_to(runs["lm"])
    return work


def placed(line: str) -> list[str]:
    line = re.sub(r"outputs/<[^>]+>(/<[^>]+>)?", "outputs/run", line)
    line = line.replace("init_from=...", "init_from=outputs/run").replace("ckpt=...", "ckpt=outputs/run")
    return shlex.split(line)[1:]


def test_readme_and_hints_run_as_printed(tiny_runs, tmp_path, monkeypatch):
    work = sandbox(tmp_path, tiny_runs)
    commands = readme_commands()
    assert len(commands) >= 20
    usage = [line.strip() for line in USAGE.splitlines() if line.strip().startswith("lmtrain ")]
    single = [(placed(line), errors) for line, errors in commands if " -m " not in line]
    single += [(placed(line), []) for line in usage if not line.startswith(("lmtrain report", "lmtrain plan"))]
    cases = [argv + (["--cfg", "job"] if not errors and "--cfg" not in argv else []) for argv, errors in single]
    hint = shlex.split(HINT % (tiny_runs["lm"] / "checkpoints" / "latest"))[1:]
    results = lmtrain_many([*cases, [*hint, "max_new_tokens=5", "device=cpu"]], cwd=work)
    for (argv, errors), result in zip(single, results, strict=False):
        if errors:
            assert result["rc"] == 2 and result["stderr"].splitlines() == errors, (argv, result["stderr"])
        else:
            assert result["rc"] == 0 and not result["stderr"], (argv, result["stderr"])
    for argv, result in zip(cases, results, strict=False):
        if argv[0] == "generate" and "prompt=def " in argv:
            assert "prompt: 'def '" in result["stdout"]  # the space the README's quotes protect
    # the tiny corpus has no 'f' (warned about); the prompt's space survives into the sample
    warning, sample = results[-1]["stdout"].splitlines()[:2]
    assert results[-1]["rc"] == 0 and "no entry for 'f'" in warning and sample.startswith("de "), results[-1]

    monkeypatch.chdir(work)
    for line, _ in commands:
        if " -m " in line:  # a sweep's pre-check: every job's group options exist, the first job composes
            argv = [a for a in placed(line) if a != "-m"]
            name, schema = COMMANDS[argv[0]]
            check(name, schema, first_values(literal_strings(schema, argv[1:], multirun=True)), check_values=False)
