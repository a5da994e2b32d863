"""Typed schemas for every config group: one dataclass per group, each field with its type, its default
and a one-line doc. The YAML options under configs/ fill them in; `lmtrain.config.checks` validates them.

Importing this package must not import torch: `--help`, `--cfg job` and config errors answer at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lmtrain.config.choices import (
    KL,
    Activation,
    AdapterName,
    ClassWeights,
    Decoding,
    Device,
    ExportFormat,
    GradAccumMode,
    Logger,
    LossName,
    MuonAdjustLr,
    MuonDtype,
    Norm,
    NormPosition,
    OnBadRecord,
    OnNonfinite,
    OptimizerName,
    Overlong,
    Pooling,
    Position,
    Precision,
    PreferenceLoss,
    Quantize,
    Reference,
    RewardExtract,
    RLNormalize,
    RopeScaling,
    SchedulerName,
    Seq2SeqMetric,
    Split,
    Strategy,
    TaskName,
    TokenizerKind,
    Window,
)


@dataclass
class ModelConfig:
    d_model: int = 256  # width of the residual stream
    num_heads: int = 4  # attention heads; must divide d_model
    num_layers: int = 4  # Transformer blocks
    max_seq_len: int = 128  # context length in tokens
    num_kv_heads: int | None = None  # key/value heads (grouped-query attention; 1: multi-query); null: num_heads
    head_dim: int | None = None  # width of each head; null: d_model / num_heads
    d_ff: int | None = None  # FFN hidden width; null: 4*d_model (8/3*d_model for swiglu)
    dropout: float = 0.0  # embedding, attention and residual dropout
    activation: Activation = Activation.gelu  # the FFN's (gelu_tanh: GPT-2's; swiglu: Llama's; relu2: Primer's)
    norm: Norm = Norm.layernorm  # the normalization layer
    norm_eps: float = 1e-5  # epsilon of every norm
    norm_position: NormPosition = NormPosition.pre  # norm before each sublayer (pre) or after its residual sum (post)
    position: Position = Position.learned  # learned absolute embeddings or rotary (RoPE)
    rope_theta: float = 10000.0  # RoPE base frequency
    rope_scaling: RopeScaling = RopeScaling.none  # llama3: Llama 3.1's long-context RoPE frequency scaling
    rope_scaling_factor: float = 8.0  # llama3: factor long wavelengths are stretched by
    rope_low_freq_factor: float = 1.0  # llama3: wavelengths above original/low are fully scaled
    rope_high_freq_factor: float = 4.0  # llama3: wavelengths below original/high are kept
    rope_original_max_seq_len: int = 8192  # llama3: the context the model was first trained with
    tie_embeddings: bool = True  # share the token embedding with the LM head
    bias: bool = False  # biases in every linear layer and LayerNorm
    qkv_bias: bool = False  # biases on the query/key/value projections only (Qwen2)
    qk_norm: bool = False  # RMSNorm of each head's queries and keys before RoPE (Qwen3)
    init_std: float = 0.02  # std of the normal init; residual projections are scaled by 1/sqrt(2*num_layers)
    zero_init_residual: bool = False  # start the projections into the residual stream (attn.proj, ffn.down) at 0
    logit_softcap: float | None = None  # LM logits become cap * tanh(logits / cap) (Gemma 2); null: off


@dataclass
class OptimizerConfig:
    name: OptimizerName = OptimizerName.adamw  # the option chosen (optimizer=...; Hydra fills it in)
    lr: float | None = 1e-3  # peak learning rate (muon: of the AdamW parameters); finetune null: derived
    weight_decay: float = 0.1  # applied to matrices only, never to norms, biases or embeddings
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])  # Adam(W) betas
    eps: float = 1e-8  # Adam(W) epsilon
    momentum: float = 0.9  # SGD (and Muon) momentum
    muon_lr: float = 0.02  # muon: peak learning rate of the matrices (the schedule scales it as it scales lr)
    muon_adjust_lr_fn: MuonAdjustLr = MuonAdjustLr.original  # muon: original scales by sqrt(max(1, rows/cols))
    muon_dtype: MuonDtype = MuonDtype.auto  # muon: Newton-Schulz dtype; auto: bf16 on GPU or native-bf16 CPU, else fp32
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping


@dataclass
class SchedulerConfig:
    name: SchedulerName = SchedulerName.cosine  # the option chosen (scheduler=...; Hydra fills it in)
    warmup_steps: int = 50  # linear warmup from 0 to optimizer.lr
    min_lr: float = 0.0  # floor the schedule never goes below
    decay_fraction: float = 0.2  # wsd only: fraction of max_steps spent in the final decay


@dataclass
class GradAccumConfig:
    mode: GradAccumMode = GradAccumMode.steps  # the option chosen (grad_accum=...; Hydra fills it in)
    steps: int = 1  # micro-batches per optimizer step (mode=steps)
    global_batch_tokens: int | None = None  # tokens per optimizer step over all processes (mode=global_batch)


@dataclass
class LossConfig:
    name: LossName = LossName.cross_entropy  # the option chosen (loss=...; Hydra fills it in)
    label_smoothing: float = 0.0  # mass spread uniformly over the vocabulary
    z_loss: float = 0.0  # weight of the squared log-partition penalty (PaLM); 0 disables
    ignore_index: int = -100  # target id that carries no loss (padding, prompt tokens)
    teacher: str | None = None  # distill: the teacher checkpoint (same tokenizer; any size)
    temperature: float = 2.0  # distill: softmax temperature T of both distributions
    alpha: float = 0.5  # distill: weight of T^2 * KL; (1 - alpha) weighs the hard-label cross-entropy
    kl: KL = KL.forward  # distill: forward = KL(teacher || student); reverse = KL(student || teacher)


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
    tokenizer: TokenizerKind = TokenizerKind.bpe  # characters, bytes, or a byte-level BPE trained on train
    vocab_size: int = 4096  # bpe only: size of the trained vocabulary
    max_chars: int | None = None  # read at most this many characters of train (null: all)
    seq_len: int | None = None  # training window in tokens (null: model.max_seq_len, or init_from's)
    document_masking: bool = False  # attention never crosses an end-of-text into another document
    cache_dir: str = "${oc.env:LMTRAIN_CACHE,'~/.cache/lmtrain'}"  # where token files are cached (env LMTRAIN_CACHE)
    on_bad_record: OnBadRecord = OnBadRecord.skip  # a record whose text is missing, null or not text
    tokenizer_sample_chars: int | None = 200_000_000  # bpe: train on the first N characters of train (null: all)
    num_workers: int | None = None  # threads that encode text while preparing tokens (null: every core)
    shard_tokens: int = 1 << 26  # tokens per token-shard file of a prepared corpus
    window: Window = Window.random  # where training windows start: anywhere, or at a document start (bos_aligned)
    sources: list[SourceConfig] = field(default_factory=list)  # data=mixture: corpora and weights (replace train)
    streaming: bool = False  # read train (a save_to_disk folder or `datasets` name) as a stream, tokenized on the fly


@dataclass
class TrainerConfig:
    max_steps: int | None = 300  # optimizer steps (finetune: a cap on epochs; null: none)
    # sequences per forward pass; auto (pretrain, grad_accum=global_batch): the largest that fits the device;
    # finetune null: derived from train's size
    micro_batch_size: Any = 16
    eval_every: int | None = 100  # validate every N steps (and at the end); finetune null: evals_per_epoch
    eval_batches: int = 20  # micro-batches of fixed validation windows per evaluation
    log_every: int = 10  # write a metrics.jsonl record every N steps
    checkpoint_every: int = 100  # checkpoint every N steps (and at the end)
    keep_last: int = 2  # keep this many step checkpoints; 0 keeps all
    seed: int = 1337  # seeds init, dropout and data order
    device: Device = Device.auto  # auto: CUDA when present, else CPU
    precision: Precision = Precision.fp32  # autocast dtype of the matmuls; the weights stay fp32
    compile: bool = False  # torch.compile the training step: pays on a GPU over long runs, rarely on a CPU
    compile_eval: bool = False  # also compile evaluation (a second graph); false: evaluate eagerly
    resume: Any = False  # false | true (this run dir's latest) | path to a checkpoint or run dir
    progress_bar: bool = True  # tqdm bar on a terminal
    tensorboard: bool = False  # also log scalars to <run dir>/tensorboard (the same as tensorboard in loggers)
    loggers: list[Logger] = field(default_factory=list)  # sinks beside metrics.jsonl: tensorboard, mlflow, wandb
    run_name: str | None = None  # the run's name in a tracker (null: the run dir's last two folders)
    experiment: str = "lmtrain"  # MLflow experiment / W&B project the runs go to
    strategy: Strategy = Strategy.auto  # auto: ddp under torchrun with several processes
    nproc: int = 1  # > 1: lmtrain starts torchrun with this many local processes itself
    dist_timeout_s: float = 600.0  # a collective waiting longer on a peer fails the run instead of hanging
    dist_join_timeout_s: float = 60.0  # joining the process group and its first barrier: a peer that never starts
    activation_checkpointing: bool = False  # recompute each block's activations in backward: less memory
    on_nonfinite: OnNonfinite = OnNonfinite.stop  # a non-finite loss: stop (last finite checkpoint stays) or skip
    ema_decay: float | None = None  # keep an exponential moving average of the weights, validated and saved
    early_stopping_patience: int | None = None  # stop after this many validations without a new best; null: off
    eval_suite: str | None = None  # benchmark task or group YAML scored at validations (docs/benchmarks.md)
    eval_suite_every: int | None = None  # score it at validations whose step is a multiple of N; null: every one
    eval_suite_limit: int | None = None  # score the first N documents of each task; null: all
    eval_suite_num_fewshot: int | None = None  # examples in each prompt; null: the task file's
    eval_suite_metric: str | None = None  # e.g. suite_core: the main metric (higher is better) for best and stopping


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
    # the option chosen (task=...; Hydra fills it in): lm, classification, seq2seq, qa, chat or a registered task
    name: str = TaskName.classification.value
    class_weights: ClassWeights = ClassWeights.none  # classification: balanced weighs classes by inverse frequency
    pooling: Pooling = Pooling.last  # classification: the head reads the last token or the mean of all
    decoding: Decoding = Decoding.greedy  # how seq2seq/qa evaluation generates
    num_beams: int = 4  # decoding=beam
    temperature: float = 1.0  # decoding=sample
    top_k: int | None = None  # decoding=sample
    max_new_tokens: int = 64  # longest generated answer or translation
    metric: Seq2SeqMetric = Seq2SeqMetric.bleu  # seq2seq: the score that picks checkpoints/best (rouge_l: summaries)
    # validate on the first N examples (null: N = trainer.eval_batches × trainer.micro_batch_size)
    max_eval_examples: int | None = None
    overlong: Overlong = Overlong.truncate  # chat: an overlong conversation is truncated (counted) or dropped
    loss: PreferenceLoss = PreferenceLoss.dpo  # preference: dpo, ipo, robust, hinge, simpo, orpo (docs/preference.md)
    beta: float = 0.1  # preference: the loss's beta (inverse temperature; ORPO's odds-ratio weight)
    gamma: float = 0.5  # preference, simpo: the target reward margin
    label_smoothing: float = 0.0  # preference, dpo/robust/simpo: the assumed share of flipped labels
    reference: Reference = Reference.model  # preference: a frozen reference model, or its log-probs precomputed
    reward: Any = "exact_match"  # rl: a reward name or a list: exact_match, format, length, python:FILE:FUNCTION
    reward_weights: list[float] | None = None  # rl: one weight per reward (null: all 1.0)
    extract: RewardExtract = RewardExtract.none  # rl, exact_match: the answer is the text, last_number, boxed or regex
    answer_pattern: str | None = None  # rl, extract=regex: the regular expression whose group 1 is the answer
    answer_field: str = "answer"  # rl, exact_match: the record field holding the answer
    format_pattern: str | None = None  # rl, reward format: the regular expression a well-formed completion holds
    group_size: int = 8  # rl: completions sampled per prompt
    top_p: float | None = None  # rl: nucleus sampling of completions (null: off)
    scale_rewards: bool = False  # rl: divide advantages by the group's reward std (GRPO) or not (Dr. GRPO)
    normalize: RLNormalize = RLNormalize.token  # rl: token (TRL loss_type dapo) or sequence (TRL grpo)
    epsilon: float = 0.2  # rl: the policy ratio is clipped to [1 - epsilon, 1 + epsilon_high]
    epsilon_high: float | None = None  # rl: the upper clip (null: epsilon; DAPO's clip-higher uses 0.28)
    kl_beta: float = 0.0  # rl: weight of the KL penalty to the reference (0: none, no reference loaded)


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
    response_field: str = "response"  # lm instruction tuning: the trained part of a prompt/response record
    question_field: str = "question"  # qa
    context_field: str = "context"  # qa: the passage the answer is in
    answer_field: str = "answer"  # qa: the answer
    messages_field: str = "messages"  # chat: a list of {role: system|user|assistant, content}
    chosen_field: str = "chosen"  # preference: the preferred answer (text, or assistant messages)
    rejected_field: str = "rejected"  # preference: the dispreferred answer
    on_bad_record: OnBadRecord = OnBadRecord.skip  # a record missing a field: skipped (counted) or an error


@dataclass
class AdapterConfig:
    name: AdapterName = AdapterName.none  # the option chosen (adapter=...; Hydra fills it in; none trains every weight)
    rank: int = 16  # lora: rank r of the update B A
    alpha: float = 32.0  # lora: the update is scaled by alpha / rank
    dropout: float = 0.0  # lora: dropout on the adapter's input
    # lora: the layers to adapt: qkv, proj, up, gate, down (lmtrain's names) or attention | mlp | all_linear
    target_modules: list[str] = field(default_factory=lambda: ["all_linear"])


@dataclass
class FinetuneConfig:
    init_from: str | None = None  # checkpoint (or run dir) whose weights and tokenizer start the run
    freeze_embeddings: bool = False  # keep token/position embeddings (and a tied LM head) fixed
    freeze_blocks: int = 0  # keep the first k Transformer blocks fixed
    dropout: float | None = None  # the model's dropout for finetuning (null: as pretrained)
    epochs: float | None = None  # passes over train, at most trainer.max_steps steps (null: from train's size)
    # validations per epoch when trainer.eval_every is null; null (or trainer.eval_every given): trainer.eval_every
    evals_per_epoch: int | None = 2
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

    train: str | None = None  # records file for split=train
    validation: str | None = None  # records file for split=validation
    test: str | None = None  # records file for split=test
    text_field: str | None = None  # null: the checkpoint's data.text_field
    label_field: str | None = None  # null: the checkpoint's data.label_field
    source_field: str | None = None  # null: the checkpoint's data.source_field
    target_field: str | None = None  # null: the checkpoint's data.target_field
    prompt_field: str | None = None  # null: the checkpoint's data.prompt_field
    response_field: str | None = None  # null: the checkpoint's data.response_field
    question_field: str | None = None  # null: the checkpoint's data.question_field
    context_field: str | None = None  # null: the checkpoint's data.context_field
    answer_field: str | None = None  # null: the checkpoint's data.answer_field
    messages_field: str | None = None  # null: the checkpoint's data.messages_field
    chosen_field: str | None = None  # null: the checkpoint's data.chosen_field
    rejected_field: str | None = None  # null: the checkpoint's data.rejected_field
    on_bad_record: OnBadRecord = OnBadRecord.skip  # a record missing a field: skipped (counted) or an error


@dataclass
class SuiteConfig:
    """Benchmark tasks in lm-evaluation-harness's YAML format (docs/benchmarks.md)."""

    path: str | None = None  # a task or group YAML (`suite=<file>` sets it); null: evaluate scores a split instead
    limit: int | None = None  # score the first N documents of each task (lm_eval --limit N); null: all
    num_fewshot: int | None = None  # examples in each prompt; null: the task file's (a file's 0 stays 0, as lm_eval)
    batch_size: int = 32  # prompts per generation batch
    precision: Precision = Precision.fp32  # autocast dtype of the matmuls while scoring


@dataclass
class EvaluateConfig:
    ckpt: str | None = None  # checkpoint (or run dir) to evaluate
    suite: SuiteConfig = field(default_factory=SuiteConfig)
    split: Split = Split.test  # which data.<split> file to score
    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    batch_size: int = 32  # examples per forward pass
    decoding: Decoding | None = None  # null: as the checkpoint's task config
    num_beams: int | None = None  # null: as the checkpoint's task config
    max_new_tokens: int | None = None  # null: as the checkpoint's task config
    max_examples: int | None = None  # score at most this many examples (null: all)
    seed: int = 1337  # for decoding=sample
    device: Device = Device.auto  # auto: CUDA when present, else CPU


@dataclass
class PredictConfig:
    ckpt: str | None = None  # a classification checkpoint
    text: str | None = None  # one line of text to classify
    input: str | None = None  # or a .txt (one text per line) / jsonl / csv / parquet file
    output: str | None = None  # write predictions as jsonl here (default: print them)
    text_field: str | None = None  # field of `input` holding the text (null: the checkpoint's)
    on_bad_record: OnBadRecord = OnBadRecord.skip  # a record missing a field: skipped (counted) or an error
    batch_size: int = 64  # texts per forward pass
    device: Device = Device.auto  # auto: CUDA when present, else CPU


@dataclass
class ExportConfig:
    ckpt: str | None = None  # checkpoint (or run dir, or Hugging Face folder) to export
    format: ExportFormat = ExportFormat.lmtrain  # hf: a transformers model folder
    dtype: Precision = Precision.fp32  # the dtype of the weights that are not int8
    max_shard_mb: float = 5000.0  # format=hf: weights above this size are split into shards with an index
    merge_adapter: bool = False  # adapters folded into the weights (else format=hf writes them alone, PEFT layout)
    quantize: Quantize = Quantize.none  # int8: weight-only int8 of the linear layers, one scale per output channel
    out: str | None = None  # export folder (default: <run dir>/export-<dtype or int8>)
    score: bool = True  # score the validation data before and after export (false: size only)
    eval_batches: int = 20  # validation batches for that score: of 16 windows, or of 32 examples of a task
    device: Device = Device.auto  # auto: CUDA when present, else CPU


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
    device: Device = Device.auto  # auto: CUDA when present, else CPU
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
    device: Device = Device.auto  # auto: CUDA when present, else CPU
