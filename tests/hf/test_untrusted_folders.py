"""Hugging Face model folders are untrusted input (docs/untrusted-inputs.md): tampered copies of a tiny random
model, each passed where users pass model folders (ckpt=, init_from=, loss.teacher=), through the real CLI under
an address-space limit and a CPU-time limit. Each case ends in one error line (exit 2) or a correct run; none
reads a file outside its folder (a canary file outside proves it: it is never opened, echoed or copied) and
none runs code from the folder (a pickle that would write a marker file)."""

import json
import pickle
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_jsonl
from hf_models import build

pytest.importorskip("transformers")

CANARY = "CANARY-a81c5e-outside-the-folder"
GIB = 1 << 30


def edit_json(name: str, **changes):
    def tamper(folder: Path, outside: Path) -> None:
        values = json.loads((folder / name).read_text()) if (folder / name).exists() else {}
        values.update(changes)
        (folder / name).write_text(json.dumps(values))

    return tamper


def link_out(name: str):
    def tamper(folder: Path, outside: Path) -> None:
        (folder / name).unlink(missing_ok=True)
        (folder / name).symlink_to(outside / "secret.txt")

    return tamper


def link_in(name: str):
    """`name` moved into a subfolder and linked back: a link that stays inside the folder."""

    def tamper(folder: Path, outside: Path) -> None:
        (folder / "sub").mkdir()
        (folder / name).rename(folder / "sub" / name)
        (folder / name).symlink_to(Path("sub") / name)

    return tamper


def huge(name: str):
    def tamper(folder: Path, outside: Path) -> None:
        (folder / name).unlink(missing_ok=True)
        with open(folder / name, "wb") as f:
            f.truncate(4 * GIB)  # sparse: costs no disk

    return tamper


def index_entry(path_of):
    """Shard the weights in an index whose first entry points at `path_of(outside)`."""

    def tamper(folder: Path, outside: Path) -> None:
        weights = folder / "model.safetensors"
        weights.rename(folder / "model-00001-of-00001.safetensors")
        from safetensors import safe_open

        with safe_open(str(folder / "model-00001-of-00001.safetensors"), "pt") as f:
            names = list(f.keys())
        weight_map = dict.fromkeys(names, "model-00001-of-00001.safetensors")
        weight_map[names[0]] = path_of(outside)
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))

    return tamper


def template(text: str, chat_task: bool = False):
    def tamper(folder: Path, outside: Path) -> None:
        (folder / "chat_template.jinja").write_text(text)
        if chat_task:  # as a chat finetune's task.json says
            (folder / "task.json").write_text(json.dumps({"name": "chat", "fields": {"messages": "messages"}}))

    return tamper


def header(length: int | None = None, shape: list | None = None):
    """model.safetensors with its header length, or its first tensor's shape, rewritten."""

    def tamper(folder: Path, outside: Path) -> None:
        data = (folder / "model.safetensors").read_bytes()
        (n,) = struct.unpack("<Q", data[:8])
        head = json.loads(data[8 : 8 + n])
        if shape is not None:
            first = next(k for k in head if k != "__metadata__")
            head[first]["shape"] = shape
        body = json.dumps(head).encode().ljust(n)
        (folder / "model.safetensors").write_bytes(struct.pack("<Q", length or len(body)) + body + data[8 + n :])

    return tamper


class Payload:
    """Unpickling this writes the marker file: a pickle that runs code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


def pickle_only(folder: Path, outside: Path) -> None:
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Payload(outside / "marker")))


def peft_folder(folder: Path, outside: Path) -> None:
    for name in ("config.json", "model.safetensors"):
        (folder / name).unlink()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 10**12}))
    (folder / "adapter_model.safetensors").write_bytes(b"\xff" * 16)
    (folder / "adapter_model.bin").write_bytes(pickle.dumps(Payload(outside / "marker")))


def hf_cache_layout(folder: Path, outside: Path) -> None:
    """Move every file to `../../blobs/<name>` and link it back, as the Hugging Face cache lays a snapshot out."""
    blobs = folder.parent.parent / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    for path in sorted(folder.iterdir()):
        blob = blobs / f"{folder.name}-{path.name}"
        path.rename(blob)
        path.symlink_to(Path("../../blobs") / blob.name)


GEN = ["generate", "ckpt={folder}", "prompt=the quick", "max_new_tokens=4", "device=cpu"]
CHAT = [*GEN, "chat=true"]
FT = ["finetune", "init_from={folder}", "task=lm", "data.train={text}", "epochs=null", "trainer.max_steps=1"]
FT += ["trainer.micro_batch_size=2", "trainer.device=cpu", "trainer.progress_bar=false", "hydra.run.dir={run}"]
TEACHER = [*FT[:1], "init_from={good}", *FT[2:], "loss=distill", "loss.teacher={folder}"]
CHAT_FT = ["finetune", "init_from={folder}", "task=chat", "data.train={chats}", *FT[4:]]
EVAL = ["evaluate", "ckpt={folder}", "data.test={chats}", "device=cpu", "hydra.run.dir={run}"]
LOOPS = "{% for a in range(99999) %}{% for b in range(99999) %}{% endfor %}{% endfor %}"
OK = None  # the run succeeds

# (name, tamper, command line, text the one error line holds, or OK)
CASES = [
    # files outside the folder
    ("index ../..", index_entry(lambda o: "../../etc/passwd"), GEN, "which lies outside the folder"),
    ("index absolute", index_entry(lambda o: "/etc/passwd"), GEN, "which lies outside the folder"),
    ("index other model", index_entry(lambda o: str(o / "other" / "model.safetensors")), GEN, "lies outside"),
    ("template symlink", link_out("chat_template.jinja"), CHAT, "chat_template.jinja' leads outside its folder"),
    ("template symlink init_from", link_out("chat_template.jinja"), FT, "chat_template.jinja' leads outside"),
    ("config symlink", link_out("config.json"), GEN, "config.json' leads outside its folder"),
    ("tokenizer symlink", link_out("tokenizer.json"), GEN, "tokenizer.json' leads outside its folder"),
    ("tokenizer_config symlink", link_out("tokenizer_config.json"), GEN, "tokenizer_config.json' leads outside"),
    ("generation_config symlink", link_out("generation_config.json"), FT, "generation_config.json' leads outside"),
    ("weights symlink", link_out("model.safetensors"), GEN, "model.safetensors' leads outside its folder"),
    ("hf cache layout", hf_cache_layout, GEN, OK),
    ("symlink inside", link_in("config.json"), GEN, OK),
    ("tokenizer not UTF-8", lambda f, o: (f / "tokenizer.json").write_bytes(b"\xff\xfe"), GEN, "not UTF-8 text"),
    # unbounded reads
    ("huge config.json", huge("config.json"), GEN, "config.json' is larger than 4,194,304 bytes"),
    ("huge tokenizer.json", huge("tokenizer.json"), GEN, "tokenizer.json' is larger than"),
    ("huge tokenizer_config.json", huge("tokenizer_config.json"), GEN, "tokenizer_config.json' is larger than"),
    ("huge generation_config.json", huge("generation_config.json"), GEN, "generation_config.json' is larger than"),
    ("huge chat template", huge("chat_template.jinja"), CHAT, "chat_template.jinja' is larger than"),
    ("huge index", huge("model.safetensors.index.json"), GEN, "index.json' is larger than"),
    # sizes checked before allocation
    ("layers 1e6 ckpt", edit_json("config.json", num_hidden_layers=10**6), GEN, "2 blocks; config.json says"),
    ("layers 1e6 teacher", edit_json("config.json", num_hidden_layers=10**6), TEACHER, "1000000 blocks"),
    ("layers 1e6 init_from", edit_json("config.json", num_hidden_layers=10**6), FT, "1000000 blocks"),
    ("vocab 1e12", edit_json("config.json", vocab_size=10**12), GEN, "vocab_size must be an integer in 1.."),
    ("vocab 1e9", edit_json("config.json", vocab_size=10**9), GEN, "config.json says [1000000000, 64]"),
    ("hidden 1e9", edit_json("config.json", hidden_size=2**30), GEN, "config.json says [320, 1073741824]"),
    ("positions 1e12", edit_json("config.json", max_position_embeddings=1e12), GEN, "max_position_embeddings must"),
    ("heads string", edit_json("config.json", num_attention_heads="4"), GEN, "num_attention_heads must be an"),
    ("kv heads", edit_json("config.json", num_key_value_heads=3), GEN, "do not split into 3 key/value heads"),
    ("intermediate", edit_json("config.json", intermediate_size=97), GEN, "config.json implies [97, 64]"),
    ("rope factor", edit_json("config.json", rope_parameters={"rope_type": "llama3", "factor": -1}), GEN, "factor"),
    ("header length", header(length=2**62), GEN, "is damaged (its header claims"),
    ("header shape", header(shape=[10**9, 10**9]), GEN, "has a malformed entry"),
    (
        "index names a list",
        lambda f, o: (f / "model.safetensors.index.json").write_text('{"weight_map": {"a": []}}'),
        GEN,
        "which is not a file name",
    ),
    ("config nested", lambda f, o: (f / "config.json").write_text("[" * 100000 + "]" * 100000), GEN, "not JSON"),
    ("config NaN", edit_json("config.json", rms_norm_eps=float("nan")), GEN, "rms_norm_eps must be a number > 0"),
    ("named templates", edit_json("tokenizer_config.json", chat_template=[{"name": ["x"]}, 5]), CHAT, OK),
    ("eos id", edit_json("generation_config.json", eos_token_id=10**9), GEN, "is beyond the tokenizer's"),
    ("eos id type", edit_json("config.json", eos_token_id="x"), FT, "a token id must be an integer"),
    # templates are programs
    ("template big string", template("{{ 'a' * 10**10 }}"), CHAT, "the sandbox forbids: '*' would build"),
    (
        "template doubling",
        template(
            "{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s }}"
        ),
        CHAT,
        "'+' would build",
    ),
    ("template loops", template(LOOPS), CHAT, "the chat template ran for more than 2 s"),
    ("template loops finetune", template(LOOPS), CHAT_FT, "ran for more than 2 s"),
    ("template loops evaluate", template(LOOPS, chat_task=True), EVAL, "ran for more than 2 s"),
    (
        "template range",
        template("{% for i in range(10**10) %}x{% endfor %}"),
        CHAT,
        "the chat template did what the sandbox forbids",
    ),
    ("template escape", template("{{ ''.__class__.__mro__[1].__subclasses__() }}"), CHAT, "unsafe"),
    ("template power", template("{{ 10 ** 100000 }}"), CHAT, "'**' would build"),
    ("template ljust", template("{{ 'a'.ljust(10**10) }}"), CHAT, "a call's arguments ask for more than"),
    ("template center", template("{{ 'a'|center(10**10) }}"), CHAT, "a filter's arguments ask for more than"),
    ("template % width", template("{{ '%10000000000s' % 'a' }}"), CHAT, "'%' would build"),
    ("template format width", template("{{ '{:>10000000000}'.format('a') }}"), CHAT, "a format string asks"),
    (
        "template ~ doubling",
        template(
            "{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}"
        ),
        CHAT,
        "'~' would build",
    ),
    ("template lipsum", template("{{ lipsum(10**5) }}"), CHAT, "failed: 'lipsum' is undefined"),
    ("template syntax", template("{% for %}"), CHAT, "the chat template does not compile"),
    ("template raises", template("{{ raise_exception('no ' ~ messages[0]['role']) }}"), CHAT, "failed: no user"),
    # generation_config.json values
    ("top_k string", edit_json("generation_config.json", top_k="abc"), GEN, "top_k must be an integer >= 0"),
    ("temperature < 0", edit_json("generation_config.json", temperature=-1), GEN, "temperature must be a number"),
    ("top_p 2", edit_json("generation_config.json", top_p=2), GEN, "top_p must be a number in (0, 1]"),
    (
        "max_new_tokens 1e12",
        edit_json("generation_config.json", max_new_tokens=10**12),
        ["generate", "ckpt={folder}", "prompt=the", "device=cpu"],
        OK,
    ),
    # folders of other kinds
    ("peft folder", peft_folder, GEN, "no complete checkpoint at"),
    ("pickle weights", pickle_only, GEN, "has only pickle weights (pytorch_model.bin), which lmtrain never loads"),
    ("untampered", lambda folder, outside: None, GEN, OK),
]


@pytest.fixture(scope="module")
def places(tmp_path_factory):
    root = tmp_path_factory.mktemp("untrusted")
    outside = root / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text(json.dumps({"model_type": "llama", "secret": CANARY}) + "\n")
    good = build("llama", root / "good", chat_template="{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
    shutil.copytree(good, outside / "other")
    text = write_jsonl(root / "text.jsonl", [{"text": f"the quick brown fox {i} jumps"} for i in range(8)])
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "the quick fox"}]
    chats = write_jsonl(root / "chats.jsonl", [{"messages": chat}] * 4)
    return {"root": root, "outside": outside, "good": good, "text": text, "chats": chats}


def run_limited(cases: list[list[str]], cwd: Path, watch: Path) -> list[dict]:
    runner = Path(__file__).parents[1] / "fork_cli.py"
    given = {"cases": cases, "memory": 3 * GIB, "cpu_seconds": 60, "watch": str(watch.resolve())}
    result = subprocess.run(
        [sys.executable, str(runner)], input=json.dumps(given), capture_output=True, text=True, cwd=cwd, timeout=900
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.parametrize("part", [0, 1])  # two halves, for two test workers
def test_tampered_model_folders_fail_with_one_line(places, tmp_path, part):
    assert len(CASES) >= 60
    lines = []
    for i, (name, tamper, args, expected) in list(enumerate(CASES))[part::2]:
        folder = tmp_path / "hub" / "models--org--m" / "snapshots" / f"case{i}"
        if tamper is not hf_cache_layout:
            folder = tmp_path / f"case{i}"
        shutil.copytree(places["good"], folder)
        tamper(folder, places["outside"])
        fill = {**places, "folder": folder, "run": tmp_path / f"run{i}"}
        lines.append((name, [a.format(**fill) for a in args], expected))
    untouched = [a.format(**{**places, "folder": places["good"]}) for a in GEN]
    results = run_limited([argv for _, argv, _ in lines] + [untouched], tmp_path, places["outside"])
    assert results[-1]["rc"] == 0, results[-1]["stderr"]
    failures = []
    for (name, argv, expected), result in zip(lines, results, strict=False):
        stderr = [line for line in result["stderr"].splitlines() if line.strip()]
        if expected is OK:
            good = result["rc"] == 0 and "Traceback" not in result["stderr"]
        else:
            good = (
                result["rc"] == 2
                and len(stderr) == 1
                and stderr[0].startswith(f"lmtrain {argv[0]}: error: ")
                and expected in stderr[0]
            )
        good = good and CANARY not in result["stderr"] + result["stdout"] and "OPENED" not in result["stderr"]
        if not good:
            failures.append(
                f"{name}: {' '.join(argv)}\n  rc {result['rc']}, want {expected!r}, got:\n{result['stderr'][-2000:]}"
            )
    print({name: round(r["seconds"], 1) for (name, _, _), r in zip(lines, results, strict=False)})
    assert not failures, "\n".join(failures)
    assert not (places["outside"] / "marker").exists(), "a pickle in a model folder ran"
    copied = [
        p
        for p in tmp_path.rglob("*")
        if p.is_file() and not p.is_symlink() and p.stat().st_size < GIB and CANARY.encode() in p.read_bytes()
    ]
    assert not copied, f"the canary was copied into {copied}"
    # a correct run is the untampered model's run (the last command line: the untouched folder)
    for (name, argv, expected), result in zip(lines, results, strict=False):
        if expected is OK and argv[1:] == [a.format(**{**places, "folder": argv[1][5:]}) for a in GEN[1:]]:
            assert result["stdout"] == results[-1]["stdout"], name
