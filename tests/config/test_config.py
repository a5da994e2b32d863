"""Every shipped YAML composes and validates; user mistakes are one line naming the key."""

import importlib.resources
import subprocess
import sys

import pytest
from conftest import compose, lmtrain

from lmtrain.config import ConfigError

GROUPS = ["model", "optimizer", "scheduler", "grad_accum", "loss", "data", "trainer", "task", "adapter"]
FINETUNE_ONLY = {"task", "adapter"}  # groups only the finetune schema takes
FINETUNE_OPTIONS = {("trainer", "finetune")}  # options whose nulls (derived values) only finetune fills in


def options(group: str) -> list[str]:
    folder = importlib.resources.files("lmtrain.configs") / group
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def compose_for(group: str, option: str):
    if group in FINETUNE_ONLY or (group, option) in FINETUNE_OPTIONS:
        from lmtrain.cli import check
        from lmtrain.config import FinetuneConfig

        return check("finetune", FinetuneConfig, [f"{group}={option}", "init_from=x", "data.train=x.jsonl"])
    if (group, option) == ("loss", "distill"):
        return compose("loss=distill", "loss.teacher=outputs/teacher")
    return compose(f"{group}={option}")


@pytest.mark.parametrize("group", GROUPS)
def test_every_option_composes_and_validates(group):
    """The schema is the one source of defaults: an option YAML sets only what it changes, and the composed
    group equals the schema's defaults everywhere else."""
    assert options(group), f"configs/{group}/ is empty"
    from omegaconf import OmegaConf

    from lmtrain.config.compose import IDENTITY

    for option in options(group):
        cfg = compose_for(group, option)
        shipped = OmegaConf.load(importlib.resources.files("lmtrain.configs") / group / f"{option}.yaml")
        selected = OmegaConf.structured(getattr(cfg, group))
        defaults = OmegaConf.structured(type(getattr(cfg, group)))
        for key in selected:
            # data.train (finetune) and loss.teacher (distill) must be set, so the compose sets them
            if key in ("train", "teacher"):
                continue
            if key == IDENTITY.get(group):  # the option's name: Hydra's choice fills it, the YAML never says it
                assert key not in shipped, f"{group}={option}: {key} is the option's file name; drop the line"
                assert selected[key] == option, f"{group}={option}: its {key} is {selected[key]}"
            elif key in shipped:
                assert selected[key] == shipped[key], f"{group}={option}: {key}"
                assert shipped[key] != defaults[key], f"{group}={option}: {key} restates the schema default"
            else:
                assert selected[key] == defaults[key], f"{group}={option}: {key} is not the schema default"


@pytest.mark.parametrize("command", ["pretrain", "finetune", "evaluate", "generate", "predict", "export", "inspect"])
def test_top_level_keys_come_from_the_schema(command):
    from omegaconf import OmegaConf

    shipped = OmegaConf.load(importlib.resources.files("lmtrain.configs") / f"{command}.yaml")
    for key in shipped:
        # a group's block overrides its option (finetune's lower LR), so it may equal the schema's value
        if key not in ("defaults", "hydra"):
            assert isinstance(shipped[key], type(shipped)), f"{command}.yaml restates {key}; the schema holds it"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["optimizer=adamw", "optimizer.name=sgd"], "optimizer.name: the option chosen sets it; choose optimizer=sgd"),
        (["scheduler.name=wsd"], "scheduler.name: the option chosen sets it; choose scheduler=wsd"),
        (["grad_accum.mode=global_batch"], "grad_accum.mode: the option chosen sets it; choose grad_accum=global"),
        (["loss.name=distill"], "loss.name: the option chosen sets it; choose loss=distill"),
    ],
)
def test_an_option_name_is_chosen_as_the_option(overrides, message):
    with pytest.raises(ConfigError, match=message):
        compose(*overrides)


def test_an_option_name_comes_from_the_choice():
    cfg = compose("optimizer=muon", "scheduler=wsd", "grad_accum=global_batch", "loss=distill", "loss.teacher=t")
    names = (cfg.optimizer.name, cfg.scheduler.name, cfg.grad_accum.mode, cfg.loss.name)
    assert names == ("muon", "wsd", "global_batch", "distill")
    assert compose("+experiment=shakespeare_char_fast").optimizer.name == "muon"  # chosen by an experiment


@pytest.mark.parametrize(
    "command, overrides, message",
    [
        ("pretrain", ["data=examples"], "data=examples: no such option; choose from mixture, python_stdlib"),
        ("finetune", ["data=python_stdlib"], "data=python_stdlib: finetune takes no data=... option; set its data"),
        ("finetune", ["+data=mixture"], "data=mixture: finetune takes no data=... option"),
    ],
)
def test_the_data_options_serve_pretrain_only(command, overrides, message):
    """pretrain's corpus options and finetune's records config share the key `data`, not the options."""
    from lmtrain.cli import COMMANDS, check

    config_name, schema = COMMANDS[command]
    required = ["init_from=x", "data.train=x.jsonl"] if command == "finetune" else []
    with pytest.raises(ConfigError, match=message):
        check(config_name, schema, [*required, *overrides])


def test_finetune_option_names_are_chosen_as_the_options():
    from lmtrain.cli import check
    from lmtrain.config import FinetuneConfig

    base = ["init_from=x", "data.train=x.jsonl"]
    for override, message in [("task.name=qa", "choose task=qa"), ("adapter.name=lora", "choose adapter=lora")]:
        with pytest.raises(ConfigError, match=message):
            check("finetune", FinetuneConfig, [*base, override])


@pytest.mark.parametrize(
    "command, overrides",
    [
        ("finetune", ["init_from=x", "data.train=x.jsonl", "task=seq2seq"]),
        ("evaluate", ["ckpt=x", "data.test=t.jsonl"]),
        ("predict", ["ckpt=x", "text=hello"]),
        ("generate", ["ckpt=x"]),
    ],
)
def test_other_commands_compose(command, overrides):
    from lmtrain.cli import COMMANDS, check

    config_name, schema = COMMANDS[command]
    assert isinstance(check(config_name, schema, overrides), schema)


@pytest.mark.parametrize(
    "command, overrides, message",
    [
        ("finetune", ["data.train=x.jsonl"], "init_from: missing"),
        ("finetune", ["init_from=x"], "data.train: missing"),
        ("finetune", ["init_from=x", "data.train=x", "task=translate"], "task=translate: no such option"),
        ("predict", ["ckpt=x"], "text / input: give exactly one"),
        ("evaluate", ["ckpt=x", "split=dev"], "split: 'dev' is not one of train, validation, test"),
    ],
)
def test_other_commands_reject_mistakes(command, overrides, message):
    from lmtrain.cli import COMMANDS, check

    config_name, schema = COMMANDS[command]
    with pytest.raises(ConfigError) as err:
        check(config_name, schema, overrides)
    assert message in str(err.value)


def test_experiment_composes():
    cfg = compose("+experiment=shakespeare_char", "data.train=x.txt")
    assert (cfg.model.d_model, cfg.model.max_seq_len, cfg.trainer.micro_batch_size) == (128, 64, 12)
    assert cfg.data.tokenizer == "char" and cfg.scheduler.min_lr == 1e-4


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.d_modle=3", "unknown key 'model.d_modle' (did you mean 'model.d_model'?)"),
        ("trainer.max_step=3", "did you mean 'trainer.max_steps'?"),
        ("model=tinyy", "model=tinyy: no such option; choose from"),
        ("optimizer=adamx", "did you mean 'adam"),
        ("trainer.max_steps=abc", "trainer.max_steps: Value 'abc'"),
        ("model.num_heads=3", "model.num_heads: 3 does not divide model.d_model=256"),
        ("scheduler.warmup_steps=5000", "scheduler.warmup_steps: 5000 exceeds trainer.max_steps"),
        ("optimizer.lr=0", "optimizer.lr: must be > 0"),
        ("optimizer.lr=-1", "optimizer.lr: must be > 0"),
        ("trainer.micro_batch_size=0", "trainer.micro_batch_size: must be a number > 0 or auto, got 0"),
        ("trainer.precision=fp8", "trainer.precision: 'fp8' is not one of fp32, bf16, fp16"),
        ("data.tokenizer=chars", "did you mean 'char'?"),
        ("grad_accum=global_batch grad_accum.global_batch_tokens=1000", "grad_accum.global_batch_tokens"),
    ],
)
def test_bad_override_is_rejected_with_the_key(override, message):
    with pytest.raises(ConfigError, match=None) as err:
        compose(*override.split())
    assert message in str(err.value)


def test_all_errors_reported_at_once():
    with pytest.raises(ConfigError) as err:
        compose("optimizer.lr=0", "trainer.micro_batch_size=0")
    assert "optimizer.lr" in str(err.value) and "trainer.micro_batch_size" in str(err.value)


def test_global_batch_derives_accumulation_steps():
    from lmtrain.config import accumulation_steps

    cfg = compose("grad_accum=global_batch", "grad_accum.global_batch_tokens=8192", "trainer.micro_batch_size=16")
    assert accumulation_steps(cfg.grad_accum, 16, cfg.model.max_seq_len, world_size=1) == 4
    assert accumulation_steps(cfg.grad_accum, 16, cfg.model.max_seq_len, world_size=2) == 2


def test_cli_bad_override_one_line_nonzero_exit():
    result = lmtrain("pretrain", "model.d_modle=3")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "lmtrain pretrain: error: unknown key 'model.d_modle' (did you mean 'model.d_model'?)"
    ]
    assert "Traceback" not in result.stderr + result.stdout


def test_cli_unknown_command():
    result = lmtrain("pretrian")
    assert result.returncode == 2 and "did you mean 'pretrain'?" in result.stderr


@pytest.mark.parametrize(
    "args",
    [["--help"], ["--cfg", "job"], ["model.d_modle=3"], ["--info"]],
    ids=["help", "cfg", "error", "info"],
)
def test_help_cfg_and_errors_do_not_import_torch(args):
    code = (
        "import sys\n"
        "from lmtrain.cli import main\n"
        "try:\n"
        f"    main(['pretrain', *{args!r}])\n"
        "except SystemExit:\n"
        "    pass\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_cfg_job_prints_composed_config():
    result = lmtrain("pretrain", "--cfg", "job", "model=tiny", "optimizer.lr=3e-4")
    assert result.returncode == 0, result.stderr
    assert "d_model: 64" in result.stdout and "lr: 0.0003" in result.stdout


def test_every_schema_field_has_a_doc():
    from lmtrain.config import SCHEMAS
    from lmtrain.config.docs import fields

    for command, schema in SCHEMAS.items():
        undocumented = [key for key, _, _, doc in fields(schema, schema()) if not doc]
        assert not undocumented, f"{command}: {undocumented}"


def test_help_lists_each_key_with_type_value_and_doc():
    import contextlib
    import io

    from lmtrain.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["pretrain", "--help", "optimizer", "optimizer=sgd"]) == 0
    text = out.getvalue()
    assert "optimizer: adam adamw muon *sgd" in text
    line = next(row for row in text.splitlines() if row.split()[:1] == ["optimizer.lr"])
    # sgd's own value, with the schema's type (null: finetune derives it) and doc
    assert line.split()[1:6] == ["float", "|", "None", "0.1", "peak"], line
    assert "model.d_model" not in text  # only the group asked for
    with contextlib.redirect_stdout(io.StringIO()) as full:
        assert main(["finetune", "--help"]) == 0
    assert "adapter.target_modules" in full.getvalue() and "init_from" in full.getvalue()


def test_every_bad_choice_is_reported_at_once_beside_other_type_errors():
    """Choices are checked before the typed merge and taken out of it, so each bad key is one line, once."""
    with pytest.raises(ConfigError) as err:
        compose("model.activation=rleu", "model.norm=x", "trainer.max_steps=abc")
    lines = str(err.value).splitlines()
    assert lines == [
        "model.activation: 'rleu' is not one of relu, gelu, gelu_tanh, swiglu, relu2 (did you mean 'relu'?)",
        "model.norm: 'x' is not one of layernorm, rmsnorm",
        "trainer.max_steps: Value 'abc' of type 'str' could not be converted to Integer",
    ]
