"""Every option composes and validates; bad values fail at start-up naming the value and choices."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from speft import registry
from speft.config import Budget, validate
from speft.registry import ConfigError

from .conftest import CONF, ROOT, compose_cfg

GROUPS = ["model", "task", "method", "metric", "mask", "trainer", "logger"]


def option_files(group: str) -> list[str]:
    """Option names of a group's YAML files, nested ones included: conf/task/glue/rte.yaml -> glue/rte."""
    return sorted(p.relative_to(CONF / group).with_suffix("").as_posix() for p in (CONF / group).rglob("*.yaml"))


OPTIONS = [(g, o) for g in GROUPS for o in [*option_files(g), *registry.aliases(g)]]


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_and_validates(group, option, monkeypatch):
    monkeypatch.setenv("HF_ALLOW_CODE_EVAL", "1")  # task=code validates only with the user's opt-in
    cfg = compose_cfg(f"{group}={option}")
    spec = validate(cfg)
    node = getattr(spec, group)
    # one string everywhere: CLI option = YAML file = registry name; an alias selects its canonical option
    assert node.name == registry.aliases(group).get(option, option)


@pytest.mark.parametrize("extra", [[], ["task=gsm8k"], ["experiment=mini_study"], ["experiment=gsm8k_gemma2_2b"]])
def test_debug_fast_sets_the_keys_that_own_each_number_after_any_preset(extra):
    plain, fast = validate(compose_cfg(*extra)), validate(compose_cfg("debug=fast", *extra))
    gsm8k = fast.task.name == "gsm8k"  # conf/debug_task/fast_gsm8k.yaml: SmolLM2 in under a minute on CPU
    assert (fast.task.max_train_examples, fast.trainer.max_steps, fast.metric.num_score_examples) == (
        256, 5, 4 if gsm8k else 32)
    assert fast.task.max_eval_examples == (2 if gsm8k else 64) and fast.debug_run is True
    if gsm8k:
        assert (fast.task.max_new_tokens, fast.task.max_length, fast.task.num_fewshot) == (32, 128, 1)
        assert (fast.trainer.batch_size, fast.trainer.grad_accum_steps) == (2, 1)
    assert fast.resolved().keys() == plain.resolved().keys()  # nothing but values changed
    assert fast.model == plain.model and fast.method == plain.method


@pytest.mark.parametrize("group", ["task", "method", "metric", "mask", "logger"])
def test_registry_and_config_files_match(group):
    files = set(option_files(group))
    assert files == set(registry.names(group))  # aliases are options without a file (stored by the registry)


def _error(*overrides):
    from hydra.errors import HydraException

    with pytest.raises((ConfigError, HydraException, OmegaConfBaseException)) as info:
        validate(compose_cfg(*overrides))
    return str(info.value)


@pytest.mark.parametrize(
    "override,expected",
    [
        ("metric=nope", ["nope", "grad"]),
        ("mask=nope", ["nope", "static"]),
        ("task=nope", ["nope", "rotten_tomatoes"]),
        ("metric.nope=1", ["nope"]),
        ("trainer.lr=fast", ["fast", "lr"]),
        ("trainer.batch_size=0", ["batch_size=0"]),
        ("mask.selection=everywhere", ["everywhere", "global", "local"]),
        ("logger.mode=loud", ["loud", "offline", "disabled"]),
        ("method.name=qlora", ["qlora", "sparse", "lora"]),
        ("model.family=t5", ["t5", "bert", "llama"]),
        ("density=0", ["density=0", "fraction"]),
        ("density=2.0", ["density=2.0", "(0, 1]"]),
        ("density=-0.5", ["density=-0.5"]),
        ("density=lora:0", ["lora:0", "lora:<r>"]),
        ("density=half", ["half", "lora:<r>"]),
        ("trainer.warmup_ratio=1.5", ["warmup_ratio=1.5"]),
    ],
)
def test_bad_values_fail_with_a_clear_message(override, expected):
    message = _error(override)
    for part in expected:
        assert part in message, message


SHAPES = {f"l{i}.{p}": (384, 384) for i in range(6) for p in "qkvo"}


@pytest.mark.parametrize(
    "raw,entries",
    [("lora:8", 8 * 768 * 24), (0.5, 384 * 384 * 12), (1, 384 * 384 * 24), (1.0, 384 * 384 * 24), (1000, 1000)],
)
def test_budget_resolves(raw, entries):
    assert Budget.parse(raw).resolve(SHAPES) == entries


@pytest.mark.parametrize("raw", [2, 23, 384 * 384 * 24 + 1, "lora:193"])
def test_budget_out_of_range_for_targets(raw):
    with pytest.raises(ConfigError, match="density"):
        Budget.parse(raw).resolve(SHAPES)


def test_defaults_are_the_documented_default_run():
    cfg = compose_cfg()
    assert (cfg.model.name, cfg.task.name, cfg.method.name, cfg.metric.name, cfg.mask.name) == (
        "minilm", "rotten_tomatoes", "sparse", "grad", "static")
    assert cfg.density == "lora:8" and cfg.mask.selection == "global" and cfg.logger.name == "wandb"
    assert OmegaConf.select(cfg, "method.train_head") is True


def _run_cli(tmp_path, *args):
    env = {**os.environ, "WANDB_MODE": "disabled"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), f"hydra.run.dir={tmp_path}/run", *args],
                          capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    return proc, time.perf_counter() - t0


@pytest.mark.parametrize("args,expected", [
    (["density=2"], "density=2"),
    (["metric=snipp"], "Did you mean metric=snip? Valid choices for metric:"),
    (["trainer.lr=abc"], "trainer.lr"),
])
def test_cli_rejects_bad_config_quickly_and_writes_nothing(tmp_path, args, expected):
    proc, _ = _run_cli(tmp_path, *args)
    assert proc.returncode != 0
    assert expected in proc.stderr + proc.stdout
    assert not (tmp_path / "run").exists()  # rejected before Hydra creates the run folder


EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
OWN_SEEDS = {"gsm8k_llama32_3b_peft": 0, "mini_study": 1,  # the PEFT benchmark's seed; the mini-study's
             "mmlu_gemma2_2b": 242, "mmlu_gemma2_2b_lora": 242,  # run_sparse_mmlu.sh / run_lora_mmlu.sh --seed=242
             "mmlu_gemma2_2b_pissa": 242}  # run_pissa_mmlu.sh --seed=242


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_preset_composes_and_validates(name):
    opt_in = ["task.allow_code_execution=true"] if name.startswith("code_") else []  # the user's, never a preset's
    spec = validate(compose_cfg(f"experiment={name}", *opt_in))
    assert spec.seed == OWN_SEEDS.get(name, 42)  # the study's seed, unless the preset follows another protocol


def test_the_study_glue_preset_has_its_hyperparameters():
    spec = validate(compose_cfg("experiment=glue_opt350m"))
    names = (spec.model.name, spec.method.name, spec.metric.name, spec.mask.name)
    assert names == ("opt_350m", "sparse", "grad", "static")
    assert spec.budget.resolve({f"l{i}.{p}": (1024, 1024) for i in range(24) for p in "qkv"}) == 1_179_648
    t = spec.trainer
    assert (t.lr, t.weight_decay, t.scheduler, t.warmup_ratio, t.batch_size, t.grad_accum_steps, t.epochs) == (
        5e-5, 0.0, "linear", 0.0, 32, 2, 30)
    assert spec.method.targets == "qkv"
    assert t.max_grad_norm is None and spec.method.train_head is False  # the released loop: no clipping, frozen head
    assert spec.model.dtype == "float32"
    sst2 = validate(compose_cfg("experiment=glue_opt350m", "task=glue/sst2")).task
    assert (sst2.max_length, sst2.eval_batch_size) == (196, 128)
    lora = validate(compose_cfg("experiment=glue_opt350m_lora")).method
    assert (lora.name, lora.rank, lora.alpha, lora.dropout) == ("lora", 8, 8, 0.05)
    pissa = validate(compose_cfg("experiment=glue_opt350m_pissa")).method
    assert pissa.svd_niter == 4
    assert not lora.train_head and not pissa.train_head  # the released GLUE baselines keep the head frozen too
    assert t.group_by_length is False  # the released GLUE training shuffles
    pissa_cls = registry.get("method", "pissa").obj
    assert pissa_cls(pissa).peft_options == {"init_lora_weights": "pissa_niter_4"}  # sparse_peft.py's fast SVD
    assert pissa_cls(validate(compose_cfg("method=pissa")).method).peft_options == {"init_lora_weights": "pissa"}


def test_every_experiment_value_cites_its_source():
    """Each value line of a study preset carries a comment (the released script and line, or why)."""
    import re

    value = re.compile(r"^\s*[\w.]+:\s*[^\s#]")  # "key: value" (not a section header, not a defaults entry)
    missing = [f"{path.name}:{n}: {line.strip()}" for path in sorted((CONF / "experiment").glob("*.yaml"))
               for n, line in enumerate(path.read_text().splitlines(), 1) if value.match(line) and "#" not in line]
    assert not missing, "values without a source comment:\n" + "\n".join(missing)


def test_the_released_code_task_and_baseline_presets():
    """Issue 20: the code scripts' values, the LLM baselines' sparse_args.py defaults (r 64, α 16, dropout
    0.05), RoBERTa-base on query/value for the GLUE baselines, PiSSA LLM presets with the fast SVD."""
    code = validate(compose_cfg("experiment=code_gemma2_2b", "task.allow_code_execution=true"))
    t = code.trainer
    assert (code.model.name, code.task.name, code.task.benchmark, code.task.template, code.task.max_length) == (
        "gemma2_2b", "code", "humaneval", "pissa", 512)
    assert (t.epochs, t.lr, t.batch_size, t.grad_accum_steps, t.warmup_ratio, t.scheduler) == (1, 2e-5, 4, 4, 0.03,
                                                                                                "cosine")
    assert (code.budget.kind, code.budget.value) == ("count", 25_559_040) and code.mask.selection == "global"
    for name in ("gsm8k_gemma2_2b_lora", "mmlu_gemma2_2b_lora", "gsm8k_gemma2_2b_pissa", "mmlu_gemma2_2b_pissa",
                 "code_llama3_8b_lora", "code_llama3_8b_pissa"):
        opt_in = ["task.allow_code_execution=true"] if name.startswith("code_") else []
        m = validate(compose_cfg(f"experiment={name}", *opt_in)).method
        assert (m.rank, m.alpha, m.dropout) == (64, 16.0, 0.05), name
        assert getattr(m, "svd_niter", 4) == 4, name
    for name in ("glue_roberta_base_lora", "glue_roberta_base_pissa"):
        spec = validate(compose_cfg(f"experiment={name}"))
        assert (spec.model.name, spec.method.targets, spec.method.rank, spec.method.train_head) == (
            "roberta_base", "qv", 8, False)
        assert spec.budget.resolve({f"l{i}.{p}": (768, 768) for i in range(12) for p in "qv"}) == 294_912


def test_the_released_llm_recipes():
    math = validate(compose_cfg("experiment=gsm8k_gemma2_2b"))
    t = math.trainer
    assert (t.scheduler, t.max_grad_norm, t.group_by_length, t.lr, t.warmup_ratio) == ("linear", 1.0, False, 2e-5, 0.03)
    assert math.model.dtype == "float32" and math.seed == 42
    assert validate(compose_cfg("experiment=gsm8k_gemma2_2b_lora")).trainer.scheduler == "cosine"
    mmlu = validate(compose_cfg("experiment=mmlu_gemma2_2b"))
    assert (mmlu.seed, mmlu.trainer.scheduler, mmlu.trainer.max_steps, mmlu.trainer.lr) == (242, "linear", 2000, 1e-5)


def test_the_qwen2_7b_math_preset_budget_on_a_meta_model():
    """run_sparse_math.sh: sparse_k=40370176 on Qwen2-7B, which is LoRA r64 on q/k/v/o."""

    from speft.models.architectures import meta_causal_lm
    from speft.models.loading import find_targets, target_shapes

    spec = validate(compose_cfg("experiment=gsm8k_qwen2_7b"))
    assert spec.model.name_or_path == "Qwen/Qwen2-7B" and spec.method.targets == "attention"
    model = meta_causal_lm("qwen2_7b", vocab_size=256)  # Qwen2-7B's shapes (a small vocabulary)
    shapes = target_shapes(find_targets(model, spec.model.family, spec.method.targets, None))
    assert len(shapes) == 4 * 28
    assert spec.budget.resolve(shapes) == 40_370_176 == Budget.parse("lora:64").resolve(shapes)


def test_a_hub_only_model_that_cannot_load_says_so_in_one_line(tmp_path):
    from speft.config import ModelConfig
    from speft.models.loading import hub_only_hint

    cfg = ModelConfig(name="qwen2_7b", name_or_path="Qwen/Qwen2-7B", family="llama")
    with pytest.raises(ConfigError, match=r"model=qwen2_7b: Qwen/Qwen2-7B .*HF_HOME.*model.name_or_path") as e:
        with hub_only_hint(cfg, "Qwen/Qwen2-7B"):
            raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")
    assert "\n" not in str(e.value)
    with pytest.raises(OSError):  # a local folder's own error is kept as it is
        with hub_only_hint(cfg, str(tmp_path)):
            raise OSError("config.json missing")


COMPONENT_FILES = sorted(p for g in ("method", "metric", "mask", "task", "model", "trainer", "logger")
                         for p in (CONF / g).rglob("*.yaml"))


@pytest.mark.parametrize("path", COMPONENT_FILES, ids=lambda p: p.relative_to(CONF).as_posix())
def test_each_default_has_one_home_the_yaml_sets_only_what_differs_from_its_schema(path):
    """A YAML value equal to the schema's default would be a second home for it: change the default in the code
    and the file would silently keep the old one."""
    import yaml
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    raw = yaml.safe_load(path.read_text())
    schema = next(d for d in raw["defaults"] if isinstance(d, str) and d.startswith("/schema/"))
    group, _, name = schema.split("@")[0][1:].rpartition("/")
    node = ConfigStore.instance().load(f"{group}/{name}.yaml").node
    for key, value in raw.items():
        if key == "defaults":
            continue
        assert key in node or OmegaConf.is_missing(node, key), f"{path.name}: {key} is not a schema field"
        if not OmegaConf.is_missing(node, key):
            default = OmegaConf.to_container(node, resolve=False)[key]
            same = default == value and (type(default) is type(value) or isinstance(default, float))
            assert not same, f"{path.name}: {key}: {value!r} restates the schema's default; remove it from the file"
