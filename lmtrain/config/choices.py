"""The fixed sets of values config keys take: one Enum per set, used as the key's type in the schema, so
OmegaConf validates it and `lmtrain <command> --help` lists it."""

from __future__ import annotations

from enum import Enum


class Choice(str, Enum):
    """A value from a fixed set, typed so OmegaConf validates it; it is its own text (`== "adamw"`, f-strings,
    JSON and YAML all see the plain string)."""

    def __str__(self) -> str:
        return self.value

    def __repr__(self) -> str:
        return repr(self.value)


class Activation(Choice):
    relu = "relu"
    gelu = "gelu"
    gelu_tanh = "gelu_tanh"
    swiglu = "swiglu"
    relu2 = "relu2"


class Norm(Choice):
    layernorm = "layernorm"
    rmsnorm = "rmsnorm"


class NormPosition(Choice):
    pre = "pre"
    post = "post"


class Position(Choice):
    learned = "learned"
    rope = "rope"


class RopeScaling(Choice):
    none = "none"
    llama3 = "llama3"


class OptimizerName(Choice):
    adamw = "adamw"
    adam = "adam"
    sgd = "sgd"
    muon = "muon"


class MuonAdjustLr(Choice):
    original = "original"
    match_rms_adamw = "match_rms_adamw"


class MuonDtype(Choice):
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"


class SchedulerName(Choice):
    cosine = "cosine"
    linear = "linear"
    constant = "constant"
    inverse_sqrt = "inverse_sqrt"
    wsd = "wsd"


class GradAccumMode(Choice):
    steps = "steps"
    global_batch = "global_batch"


class LossName(Choice):
    cross_entropy = "cross_entropy"
    distill = "distill"


class KL(Choice):
    forward = "forward"
    reverse = "reverse"


class TokenizerKind(Choice):
    char = "char"
    byte = "byte"
    bpe = "bpe"


class OnBadRecord(Choice):
    skip = "skip"
    error = "error"


class Device(Choice):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Precision(Choice):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class Strategy(Choice):
    auto = "auto"
    single = "single"
    ddp = "ddp"
    fsdp = "fsdp"


class OnNonfinite(Choice):
    stop = "stop"
    skip = "skip"


class Logger(Choice):
    jsonl = "jsonl"  # metrics.jsonl, always written
    tensorboard = "tensorboard"
    mlflow = "mlflow"
    wandb = "wandb"


class TaskName(Choice):
    lm = "lm"
    classification = "classification"
    seq2seq = "seq2seq"
    qa = "qa"
    chat = "chat"
    preference = "preference"
    rl = "rl"


class RewardExtract(Choice):
    none = "none"
    last_number = "last_number"
    boxed = "boxed"
    regex = "regex"


class RLNormalize(Choice):
    token = "token"
    sequence = "sequence"


class Seq2SeqMetric(Choice):
    bleu = "bleu"
    chrf = "chrf"
    rouge1 = "rouge1"
    rouge2 = "rouge2"
    rouge_l = "rouge_l"


class ClassWeights(Choice):
    none = "none"
    balanced = "balanced"


class Pooling(Choice):
    last = "last"
    mean = "mean"


class Decoding(Choice):
    greedy = "greedy"
    beam = "beam"
    sample = "sample"


class Overlong(Choice):
    truncate = "truncate"
    drop = "drop"


class PreferenceLoss(Choice):
    dpo = "dpo"
    ipo = "ipo"
    robust = "robust"
    hinge = "hinge"
    simpo = "simpo"
    orpo = "orpo"


class Reference(Choice):
    model = "model"
    precompute = "precompute"


class AdapterName(Choice):
    none = "none"
    lora = "lora"


class Split(Choice):
    train = "train"
    validation = "validation"
    test = "test"


class ExportFormat(Choice):
    lmtrain = "lmtrain"
    hf = "hf"


class Quantize(Choice):
    none = "none"
    int8 = "int8"


class Window(Choice):
    random = "random"
    bos_aligned = "bos_aligned"
