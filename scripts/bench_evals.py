"""Times one multiple-choice task scored by lmtrain and by lm-evaluation-harness's HF backend, on the same random
Llama-shaped model (a Hugging Face folder built here), the same task file and data, and the same torch threads:
`python scripts/bench_evals.py [documents] [threads]`. Model loading is not timed; prompt building is.

Needs the dev extra (transformers, lm-eval). Prints both times, whether the accuracies agree, and the ratio.
"""

import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))

import torch  # noqa: E402
from hf_models import build  # noqa: E402

DOCS = int(sys.argv[1]) if len(sys.argv) > 1 else 200
THREADS = int(sys.argv[2]) if len(sys.argv) > 2 else torch.get_num_threads()
WORDS = "the quick brown fox jumps over lazy dog def f x return".split()
TASK = """task: bench_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_target: label
doc_to_choice: endings
"""


def write_task(folder: Path) -> Path:
    """HellaSwag-shaped documents: a 40-word context and 4 endings of 8-16 words."""
    rng = random.Random(0)
    with open(folder / "data.jsonl", "w") as f:
        for _ in range(DOCS):
            context = " ".join(rng.choice(WORDS) for _ in range(40))
            endings = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 16))) for _ in range(4)]
            f.write(json.dumps({"context": context, "endings": endings, "label": rng.randrange(4)}) + "\n")
    (folder / "bench_choice.yaml").write_text(TASK.format(data=folder / "data.jsonl"))
    return folder / "bench_choice.yaml"


def main() -> None:
    torch.set_num_threads(THREADS)
    folder = Path(tempfile.mkdtemp())
    task = write_task(folder)
    shape = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, max_position_embeddings=512)
    model = build("llama", folder / "model", **shape)

    from lmtrain.checkpoint.load import load_model, load_special_tokens
    from lmtrain.evals.scorer import Scorer
    from lmtrain.evals.suite import load_suite, score_suite

    lm, tokenizer = load_model(str(model), torch.device("cpu"))
    scorer = Scorer(lm, tokenizer, load_special_tokens(str(model), tokenizer), torch.device("cpu"))
    _, specs = load_suite(task)
    start = time.perf_counter()
    ours = score_suite(specs, scorer)["bench_choice"]
    lmtrain_s = time.perf_counter() - start

    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    harness = HFLM(pretrained=str(model), dtype="float32", device="cpu", batch_size=32)
    start = time.perf_counter()
    out = lm_eval.simple_evaluate(
        model=harness, tasks=["bench_choice"], task_manager=TaskManager(include_path=str(folder))
    )
    harness_s = time.perf_counter() - start
    theirs = out["results"]["bench_choice"]
    same = ours.metrics["acc"] == theirs["acc,none"] and ours.metrics["acc_norm"] == theirs["acc_norm,none"]
    print(f"{DOCS} documents x 4 choices, {THREADS} threads, model {sum(p.numel() for p in lm.parameters()):,} params")
    for name, seconds, acc, norm in [
        ("lmtrain", lmtrain_s, ours.metrics["acc"], ours.metrics["acc_norm"]),
        ("lm-evaluation-harness", harness_s, theirs["acc,none"], theirs["acc_norm,none"]),
    ]:
        print(f"{name:<22}  {seconds:7.2f} s  acc {acc:.4f}  acc_norm {norm:.4f}")
    print(f"same scores: {same}; lmtrain takes {lmtrain_s / harness_s:.2f}x lm-evaluation-harness's time")


if __name__ == "__main__":
    main()
