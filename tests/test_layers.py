"""The import graph goes one way: each folder of lmtrain imports only its own layer or those below it, and no
command imports another. A new folder takes its place in LAYERS (bottom first)."""

import ast
from pathlib import Path

import lmtrain

LAYERS = [
    {"core"},  # errors, dtypes, safe file writes, devices, process groups
    {"config", "data", "model"},  # typed configs; corpora, tokenizers, chat formatting; the Transformer
    {"hf"},  # Hugging Face folders, one module per family
    {"checkpoint"},  # the checkpoint format, its checks, loading for use, export
    {"train"},  # the loop and what it is built from: optimizers, schedules, losses, run dir, sinks
    {"tasks", "evals", "analysis"},  # finetuning tasks; benchmark suites; plan estimates, interpretation, plots
    {"commands"},
    {"cli", "torchrun", "__main__"},
]
ROOT = Path(lmtrain.__file__).parent


def unit(module: str) -> str:
    """lmtrain.data.tokens -> data; lmtrain.commands.plan -> commands; lmtrain.train.build -> runs."""
    return module.split(".")[1] if "." in module else module


def layer(module: str) -> int:
    name = unit(module)
    for index, members in enumerate(LAYERS):
        if name in members:
            return index
    raise AssertionError(f"lmtrain.{name} has no place in tests/test_layers.py LAYERS")


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lmtrain"):
            if node.module == "lmtrain":
                found |= {f"lmtrain.{alias.name}" for alias in node.names}
            else:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("lmtrain")}
    return found


def test_no_module_imports_a_higher_layer_or_another_command():
    problems = []
    for path in sorted(ROOT.rglob("*.py")):
        relative = path.relative_to(ROOT.parent).with_suffix("")
        module = ".".join(relative.parts)
        if path.name == "__init__.py" or module == "lmtrain.configs":
            continue
        for target in imports(path):
            if target in ("lmtrain", "lmtrain.configs"):
                continue
            if layer(target) > layer(module):
                problems.append(f"{module} imports {target}, a higher layer")
            if unit(module) == unit(target) == "commands" and target != module:
                problems.append(f"{module} imports another command, {target}")
    assert not problems, "\n".join(problems)


MAX_MODULE_LINES = 390  # 10 under the project's 400: the limit is met with room, not by squeezing
MAX_FUNCTION_LINES = 50  # 10 under the project's 60


def test_no_module_over_390_lines_or_function_over_50():
    long = []
    for path in sorted(ROOT.rglob("*.py")):
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            long.append(f"{path.relative_to(ROOT)}: {len(text.splitlines())} lines")
        functions = [n for n in ast.walk(ast.parse(text)) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
        for node in functions:
            size = node.end_lineno - node.lineno + 1
            if size > MAX_FUNCTION_LINES:
                long.append(f"{path.relative_to(ROOT)}: {node.name} has {size} lines")
    assert not long, "\n".join(long)
