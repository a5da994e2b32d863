"""Typed schemas for every config group: one dataclass per group, each field with its type, its default
and a one-line doc. The YAML options under configs/ fill them in; `lmtrain.config.checks` validates them.

Importing this package must not import torch: `--help`, `--cfg job` and config errors answer at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ModelConfig:
    d_model: int = 128  # width of the residual stream
    num_heads: int = 4  # attention heads; must divide d_model
    num_layers: int = 4  # Transformer blocks
    max_seq_len: int = 128  # context length in tokens
    num_kv_heads: int | None = None  # key/value heads (grouped-query attention; 1: multi-query); null: num_heads
    head_dim: int | None = None  # width of each head; null: d_model / num_heads
    d_ff: int | None = None  # FFN hidden width; null: 4*d_model (8/3*d_model for swiglu)
    dropout: float = 0.0  # embedding, attention and residual dropout
    activation: str = "gelu"  # relu | gelu | gelu_tanh (GPT-2) | swiglu
    norm: str = "layernorm"  # layernorm | rmsnorm
    norm_eps: float = 1e-5  # epsilon of every norm
    norm_position: str = "pre"  # pre | post
    position: str = "learned"  # learned | rope
    rope_theta: float = 10000.0  # RoPE base frequency
    rope_scaling: str = "none"  # none | llama3 (Llama 3.1 long-context scaling of the RoPE frequencies)
    rope_scaling_factor: float = 8.0  # llama3: factor long wavelengths are stretched by
    rope_low_freq_factor: float = 1.0  # llama3: wavelengths above original/low are fully scaled
    rope_high_freq_factor: float = 4.0  # llama3: wavelengths below original/high are kept
    rope_original_max_seq_len: int = 8192  # llama3: the context the model was first trained with
    tie_embeddings: bool = True  # share the token embedding with the LM head
    bias: bool = False  # biases in every linear layer and LayerNorm
    qkv_bias: bool = False  # biases on the query/key/value projections only (Qwen2)
    qk_norm: bool = False  # RMSNorm of each head's queries and keys before RoPE (Qwen3)
    init_std: float = 0.02  # std of the normal init; residual projections are scaled by 1/sqrt(2*num_layers)


@dataclass
class OptimizerConfig:
    name: str = "adamw"  # adamw | adam | sgd
    lr: float = 1e-3  # peak learning rate
    weight_decay: float = 0.1  # applied to matrices only, never to norms, biases or embeddings
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])  # Adam(W) betas
    eps: float = 1e-8  # Adam(W) epsilon
    momentum: float = 0.9  # SGD momentum
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping


@dataclass
class SchedulerConfig:
    name: str = "cosine"  # cosine | linear | constant | inverse_sqrt | wsd
    warmup_steps: int = 100  # linear warmup from 0 to optimizer.lr
    min_lr: float = 0.0  # floor the schedule never goes below
    decay_fraction: float = 0.2  # wsd only: fraction of max_steps spent in the final decay


@dataclass
class GradAccumConfig:
    mode: str = "steps"  # steps | global_batch
    steps: int = 1  # micro-batches per optimizer step (mode=steps)
    global_batch_tokens: int | None = None  # tokens per optimizer step over all processes (mode=global_batch)


@dataclass
class LossConfig:
    name: str = "cross_entropy"  # cross_entropy | distill
    label_smoothing: float = 0.0  # mass spread uniformly over the vocabulary
    z_loss: float = 0.0  # weight of the squared log-partition penalty (PaLM); 0 disables
    ignore_index: int = -100  # target id that carries no loss (padding, prompt tokens)
    teacher: str | None = None  # distill: the teacher checkpoint (same tokenizer; any size)
    temperature: float = 2.0  # distill: softmax temperature T of both distributions
    alpha: float = 0.5  # distill: weight of T^2 * KL; (1 - alpha) weighs the hard-label cross-entropy
    kl: str = "forward"  # distill: forward = KL(teacher || student); reverse = KL(student || teacher)


@dataclass
class SourceConfig:
    path: str = "python-stdlib"  # one corpus of a mixture: file, folder or `datasets` name
    weight: float = 1.0  # its share of training windows (weights are normalised to sum to 1)
    name: str | None = None  # in metrics (val_<name>_loss, epochs_<name>); null: the path's stem


@dataclass
class DataConfig:
    train: str = "python-stdlib"  # file, folder, `datasets` name, or python-stdlib (embedded)
    validation: str | None = None  # held-out file; null: the last val_fraction of train
    val_fraction: float = 0.1  # share of train tokens held out when validation is null
    text_field: str = "text"  # column holding the text in jsonl/csv/parquet
    tokenizer: str = "bpe"  # char | byte | bpe
    vocab_size: int = 4096  # bpe only: size of the trained vocabulary
    max_chars: int | None = None  # read at most this many characters of train (null: all)
    seq_len: int | None = None  # training window in tokens (null: model.max_seq_len, or init_from's)
    document_masking: bool = False  # attention never crosses an end-of-text into another document
    cache_dir: str = "~/.cache/lmtrain"  # where packed token files are cached
    on_bad_record: str = "skip"  # skip | error: a record whose text is missing, null or not text
    tokenizer_sample_chars: int | None = 200_000_000  # bpe: train on the first N characters of train (null: all)
    num_workers: int | None = None  # threads that encode text while preparing tokens (null: every core)
    shard_tokens: int = 1 << 26  # tokens per token-shard file of a prepared corpus
    window: str = "random"  # random | bos_aligned: training windows start anywhere, or at a document start
    sources: list[SourceConfig] = field(default_factory=list)  # data=mixture: corpora and weights (replace train)
    streaming: bool = False  # read train (a save_to_disk folder or `datasets` name) as a stream, tokenized on the fly


@dataclass
class TrainerConfig:
    max_steps: int = 1000  # optimizer steps
    micro_batch_size: int = 16  # sequences per forward pass
    eval_every: int = 200  # validate every N steps (and at the end)
    eval_batches: int = 20  # micro-batches of fixed validation windows per evaluation
    log_every: int = 10  # write a metrics.jsonl record every N steps
    checkpoint_every: int = 500  # checkpoint every N steps (and at the end)
    keep_last: int = 2  # keep this many step checkpoints; 0 keeps all
    seed: int = 1337  # seeds init, dropout and data order
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "fp32"  # fp32 | bf16 | fp16
    compile: bool = False  # torch.compile the training step (compiled once; its time is logged)
    compile_eval: bool = False  # also compile evaluation (a second graph); false: evaluate eagerly
    resume: Any = False  # false | true (this run dir's latest) | path to a checkpoint or run dir
    progress_bar: bool = True  # tqdm bar on a terminal
    tensorboard: bool = False  # also log scalars to <run dir>/tensorboard (needs the tensorboard package)
    strategy: str = "auto"  # auto | single | ddp | fsdp (auto: ddp under torchrun with several processes)
    nproc: int = 1  # > 1: lmtrain starts torchrun with this many local processes itself
    dist_timeout_s: float = 600.0  # a collective waiting longer on a peer fails the run instead of hanging
    activation_checkpointing: bool = False  # recompute each block's activations in backward: less memory
    # a non-finite loss or grad norm: stop (exit non-zero, the last finite checkpoint stays latest) or skip
    # the step (no update; counted in metrics.jsonl as skipped_steps)
    on_nonfinite: str = "stop"


@dataclass
class PretrainConfig:
    init_from: str | None = None  # checkpoint or Hugging Face folder to continue from (replaces model, tokenizer)
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    grad_accum: GradAccumConfig = field(default_factory=GradAccumConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


@dataclass
class TaskConfig:
    name: str = "classification"  # lm | classification | seq2seq | qa | chat
    class_weights: str = "none"  # classification: none | balanced (inverse class frequency)
    decoding: str = "greedy"  # seq2seq/qa evaluation: greedy | beam | sample
    num_beams: int = 4  # decoding=beam
    temperature: float = 1.0  # decoding=sample
    top_k: int | None = None  # decoding=sample
    max_new_tokens: int = 64  # longest generated answer or translation
    max_eval_examples: int | None = None  # validate on at most this many examples (null: all)
    overlong: str = "truncate"  # chat: a conversation longer than the context is truncated (counted) | dropped


@dataclass
class ExampleDataConfig:
    train: str | None = None  # jsonl/csv/parquet file (or a `datasets` name) of training records
    validation: str | None = None  # null: hold out val_fraction of train
    test: str | None = None  # for `lmtrain evaluate split=test`
    val_fraction: float = 0.1  # share of train records held out when validation is null
    packing: bool = False  # pack examples into full rows; attention stays within each example (not classification)
    pack_len: int | None = None  # tokens per packed row (null: the model's max_seq_len)
    text_field: str = "text"  # lm (plain text) and classification input
    label_field: str = "label"  # classification target (ints or strings)
    source_field: str = "source"  # seq2seq input
    target_field: str = "target"  # seq2seq output
    prompt_field: str = "prompt"  # lm instruction tuning: records with this field train on the response only
    response_field: str = "response"
    question_field: str = "question"  # qa
    context_field: str = "context"
    answer_field: str = "answer"
    messages_field: str = "messages"  # chat: a list of {role: system|user|assistant, content}
    on_bad_record: str = "skip"  # skip (counted in the log and metrics.jsonl) | error: a missing/null/mistyped field


@dataclass
class AdapterConfig:
    name: str = "none"  # none (train every weight) | lora
    rank: int = 16  # lora: rank r of the update B A
    alpha: float = 32.0  # lora: the update is scaled by alpha / rank
    dropout: float = 0.0  # lora: dropout on the adapter's input
    # lora: layers to adapt by lmtrain's names (qkv, proj, up, gate, down) or attention | mlp | all_linear
    target_modules: list[str] = field(default_factory=lambda: ["all_linear"])


@dataclass
class FinetuneConfig:
    init_from: str | None = None  # checkpoint (or run dir) whose weights and tokenizer start the run
    freeze_embeddings: bool = False  # keep token/position embeddings (and a tied LM head) fixed
    freeze_blocks: int = 0  # keep the first k Transformer blocks fixed
    dropout: float | None = None  # the model's dropout for finetuning (null: as pretrained)
    epochs: float | None = 3.0  # passes over train; sets trainer.max_steps (null: trainer.max_steps decides)
    evals_per_epoch: int = 2  # validations per epoch when epochs is set (else trainer.eval_every)
    task: TaskConfig = field(default_factory=TaskConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    grad_accum: GradAccumConfig = field(default_factory=GradAccumConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: ExampleDataConfig = field(default_factory=ExampleDataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


@dataclass
class EvalDataConfig:
    """Where evaluate/predict read records; a null field falls back to the checkpoint's own data config."""

    train: str | None = None
    validation: str | None = None
    test: str | None = None
    text_field: str | None = None
    label_field: str | None = None
    source_field: str | None = None
    target_field: str | None = None
    prompt_field: str | None = None
    response_field: str | None = None
    question_field: str | None = None
    context_field: str | None = None
    answer_field: str | None = None
    messages_field: str | None = None
    on_bad_record: str = "skip"  # skip (counted in eval.json) | error: a record with a missing/null/mistyped field


@dataclass
class EvaluateConfig:
    ckpt: str | None = None  # checkpoint (or run dir) to evaluate
    split: str = "test"  # train | validation | test: which data.<split> file to score
    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    batch_size: int = 32  # examples per forward pass
    decoding: str | None = None  # greedy | beam | sample; null: as the checkpoint's task config
    num_beams: int | None = None  # null: as the checkpoint's task config
    max_new_tokens: int | None = None  # null: as the checkpoint's task config
    max_examples: int | None = None  # score at most this many examples (null: all)
    seed: int = 1337  # for decoding=sample
    device: str = "auto"  # auto | cpu | cuda


@dataclass
class PredictConfig:
    ckpt: str | None = None  # a classification checkpoint
    text: str | None = None  # one line of text to classify
    input: str | None = None  # or a .txt (one text per line) / jsonl / csv / parquet file
    output: str | None = None  # write predictions as jsonl here (default: print them)
    text_field: str | None = None  # field of `input` holding the text (null: the checkpoint's)
    on_bad_record: str = "skip"  # skip (with a warning) | error: an input record whose text is missing or null
    batch_size: int = 64
    device: str = "auto"


@dataclass
class ExportConfig:
    ckpt: str | None = None  # checkpoint (or run dir, or Hugging Face folder) to export
    format: str = "lmtrain"  # lmtrain (generate/evaluate/predict load it) | hf (a transformers model folder)
    dtype: str = "fp32"  # fp32 | bf16 | fp16: the dtype of the weights that are not int8
    max_shard_mb: float = 5000.0  # format=hf: weights above this size are split into shards with an index
    merge_adapter: bool = False  # an adapter checkpoint: fold the adapters into the weights (else format=hf writes
    # the adapters alone in PEFT's layout)
    quantize: str = "none"  # none | int8: weight-only int8 of the linear layers, one scale per output channel
    out: str | None = None  # export folder (default: <run dir>/export-<dtype or int8>)
    eval_batches: int = 20  # validation batches for the before/after score
    device: str = "auto"  # auto | cpu | cuda


@dataclass
class GenerateConfig:
    ckpt: str | None = None  # checkpoint dir (or run dir) to load
    prompt: str = ""  # text to continue
    prompt_file: str | None = None  # read the prompt from this file instead
    # null: the model's generation_config.json, else the default named here
    max_new_tokens: int | None = None  # tokens to sample (200)
    temperature: float | None = None  # 0 means greedy (0.8)
    top_k: int | None = None  # keep the k most likely tokens; 0: all (50)
    top_p: float | None = None  # nucleus sampling mass; 1: off (1)
    num_samples: int = 1  # independent samples
    seed: int = 1337  # sampling seed
    device: str = "auto"  # auto | cpu | cuda
    context: str | None = None  # qa checkpoints: the passage the prompt (a question) is about
    chat: bool = False  # the prompt is a user turn, rendered with the model's chat template (a chat checkpoint: always)
    system: str | None = None  # chat: a system message before the user turn


@dataclass
class InspectConfig:
    ckpt: str | None = None  # checkpoint, run dir or export to inspect
    text: str | None = None  # the text to inspect
    text_file: str | None = None  # or read it from this file
    views: list[str] | None = None  # loss | attention | logit_lens | contribution (null: all that apply)
    layers: list[int] | None = None  # layers whose attention maps are drawn (null: all)
    heads: list[int] | None = None  # heads drawn in each of those layers (null: all)
    device: str = "auto"  # auto | cpu | cuda
