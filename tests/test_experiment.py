"""End-to-end smoke run of the default experiment at tiny sizes, and gin handling."""

import json
import os

import gin
import pytest

from rlx import cli

TINY = [
    'rlx.Experiment.model = "tiny"',
    "rlx.Experiment.train_problems = 200",
    "rlx.Experiment.eval_problems = 16",
    "rlx.Experiment.sft_steps = 3",
    "rlx.Experiment.sft_batch = 8",
    "rlx.Experiment.num_generations = 4",
    "rlx.Experiment.max_new_tokens = 4",
    "rlx.train.RLConfig.steps = 2",
    "rlx.train.RLConfig.prompts_per_step = 4",
    "rlx.train.RLConfig.eval_every = 0",
    "rlx.train.RLConfig.checkpoint_every = 1",
    "rlx.train.RLConfig.log_samples_every = 1",
]


@pytest.fixture(autouse=True)
def _clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()


def test_default_experiment_smoke_run_produces_outputs_and_resumes(tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    params = TINY + [f'rlx.Experiment.run_dir = "{run_dir}"']
    summary = cli.train_main(gin_params=params)
    for name in ("metrics.jsonl", "summary.json", "operative_config.gin", "samples.md",
                 "tokenizer.model", "hf_export/config.json"):
        assert os.path.exists(os.path.join(run_dir, name)), name
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    rl_rows = [r for r in rows if r["step"] > 0]
    assert [r["step"] for r in rl_rows] == [1, 2]
    assert all("loss" in r and "reward_mean" in r for r in rl_rows)
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints")))[-1] == "2"
    assert 0.0 <= summary["accuracy_after_rl"] <= 1.0
    start = [r for r in rows if r["step"] == 0]         # the curves start at the SFT policy
    assert start and start[0]["eval/accuracy"] == summary["accuracy_before_rl"]
    printed = capsys.readouterr().out
    assert "held-out accuracy" in printed
    assert printed.startswith("kernels: log-prob/entropy and ratio statistics -> ")

    # Same command with more steps: resumes at iteration 2 (SFT skipped, restored).
    gin.clear_config()
    cli.train_main(gin_params=params + ["rlx.train.RLConfig.steps = 3"])
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert [r["step"] for r in rows if r["step"] > 0] == [1, 2, 3]


def test_unknown_gin_binding_fails_before_anything_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                    # the default run_dir is relative
    with pytest.raises(ValueError, match="no_such_field"):
        cli.train_main(gin_params=["rlx.Experiment.no_such_field = 3"])
    with pytest.raises(ValueError, match="NoSuchThing"):
        cli.train_main(gin_params=["NoSuchThing.x = 1"])
    assert not os.path.exists(tmp_path / "runs")   # nothing was created


def test_missing_gin_file_is_named(tmp_path):
    with pytest.raises(ValueError, match="missing.gin"):
        cli.parse_config([str(tmp_path / "missing.gin")])


def test_unknown_objective_lists_presets():
    from rlx.recipes.components import objective_by_name
    with pytest.raises(ValueError, match="unknown objective 'grpoo'.*grpo"):
        objective_by_name("grpoo")


def test_rlx_train_help_via_cli():
    with pytest.raises(SystemExit) as err:
        cli.main(["train", "--help"])
    assert err.value.code == 0


@pytest.mark.slow     # in CI: test_shared_prefix_update_matches_naive_layout_in_the_loop[ppo]
def test_ppo_experiment_trains_a_separate_critic(tmp_path):
    run_dir = str(tmp_path / "ppo")
    params = TINY + [f'rlx.Experiment.run_dir = "{run_dir}"', 'rlx.Experiment.objective = "ppo"',
                     "rlx.Experiment.export_hf = False"]
    cli.train_main(gin_params=params)
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    rl_rows = [r for r in rows if r["step"] > 0]
    assert all("value_loss" in r and "loss" in r for r in rl_rows)


def test_user_jsonl_data_and_hf_checkpoint_path(tmp_path):
    from rlx.data.tokenizer import train_sentencepiece
    from rlx.models import api
    from rlx.models.config import model_config
    from rlx.models.convert import save_hf

    records = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(10) for b in range(6)]
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    hf = tmp_path / "hf"
    tok = train_sentencepiece([r["prompt"] + r["answer"] for r in records], vocab_size=40,
                              model_prefix=str(tmp_path / "tok"))
    cfg = model_config("tiny", vocab_size=tok.vocab_size)
    save_hf(str(hf), cfg, api.init(cfg, seed=0)[1])
    os.replace(tmp_path / "tok.model", hf / "tokenizer.model")
    run_dir = str(tmp_path / "user")
    params = TINY + [f'rlx.Experiment.run_dir = "{run_dir}"',
                     f'rlx.Experiment.hf_checkpoint = "{hf}"',
                     f'rlx.Experiment.data_file = "{data}"',
                     'rlx.Experiment.rewards = ("numeric_exact_match",)',
                     "rlx.Experiment.sft_steps = 0", "rlx.Experiment.export_hf = False"]
    summary = cli.train_main(gin_params=params)
    assert summary["rl_steps"] == 2
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert any("reward/numeric_exact_match" in r for r in rows)


def test_malformed_user_data_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": 3}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        cli.train_main(gin_params=TINY + [f'rlx.Experiment.data_file = "{bad}"',
                                                f'rlx.Experiment.run_dir = "{tmp_path}/r"'])


@pytest.mark.parametrize("name", ["grpo", "dapo", "dr_grpo", "gspo", "rloo", "reinforce_pp",
                                  "r2vpo", "bapo", "ppo"])
def test_experiment_configs_parse_and_name_a_known_objective(name):
    from rlx.recipes.components import objective_by_name
    from rlx.recipes.experiment import Experiment
    here = os.path.join(os.path.dirname(__file__), "..", "experiments", "configs")
    cli.parse_config([os.path.join(here, f"{name}.gin")])
    exp = Experiment()
    assert exp.objective == name and exp.run_dir == f"runs/{name}"
    objective_by_name(exp.objective)


@pytest.mark.parametrize("objective", [
    # GRPO's policy step in both layouts: tests/train/test_packing.py (CI); in the loop
    # the PPO case covers the same policy path plus the critic's.
    pytest.param("grpo", marks=pytest.mark.slow),
    "ppo",
])
def test_shared_prefix_update_matches_naive_layout_in_the_loop(tmp_path, objective):
    """Also (PPO): the experiment trains a separate critic (a value loss every step)."""
    losses = {}
    for layout in (False, True):
        gin.clear_config()
        run_dir = str(tmp_path / f"{objective}_{layout}")
        cli.train_main(gin_params=TINY + [
            f'rlx.Experiment.run_dir = "{run_dir}"', f'rlx.Experiment.objective = "{objective}"',
            "rlx.Experiment.export_hf = False", "rlx.train.RLConfig.steps = 1",
            f"rlx.train.RLConfig.shared_prefix_update = {layout}"])
        rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
        losses[layout] = [r for r in rows if r["step"] == 1][0]
        if objective == "ppo":
            rl_rows = [r for r in rows if r["step"] > 0]
            assert rl_rows and all("value_loss" in r and "loss" in r for r in rl_rows)
    for key in ("loss", "reward_mean", "ratio/mean") + (("value_loss",) if objective == "ppo" else ()):
        assert losses[True][key] == pytest.approx(losses[False][key], rel=1e-4, abs=1e-6), key


def test_compare_script_shares_the_sft_start_and_writes_table_and_plot(tmp_path, capsys):
    import importlib.util
    path = os.path.join(os.path.dirname(__file__), "..", "experiments", "compare.py")
    spec = importlib.util.spec_from_file_location("compare", path)
    compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare)
    out = str(tmp_path / "cmp")
    params = [p for p in TINY if "RLConfig.steps" not in p] + ["rlx.train.RLConfig.steps = 1"]
    results = compare.main(["--objectives", "grpo,rloo", "--seeds", "0", "--out", out]
                           + sum((["--gin_param", p] for p in params), []))
    assert set(results) == {"grpo", "rloo"}
    curve = results["grpo"][0]
    assert curve[0][0] == 0 and curve[-1][0] == 4 * 4        # 1 iteration × 4 prompts × G=4
    sft_a = json.load(open(os.path.join(out, "grpo_seed0", "summary.json")))
    sft_b = json.load(open(os.path.join(out, "rloo_seed0", "summary.json")))
    assert sft_a["accuracy_before_rl"] == sft_b["accuracy_before_rl"]   # same SFT start
    assert os.path.exists(os.path.join(out, "compare.png"))
    printed = capsys.readouterr().out
    assert "| grpo | 1 | 16 |" in printed and "entropy, last 5 iterations" in printed
    saved = json.load(open(os.path.join(out, "compare.json")))
    first, last = saved["entropy"]["grpo"]["0"]
    assert first > 0 and last > 0


def test_sft_batches_round_widths_and_mask_only_the_demonstration(tmp_path):
    import random

    import numpy as np

    from rlx.data.tokenizer import train_sentencepiece
    from rlx.recipes.sft import sft_batches
    from rlx.tasks import get_task
    from rlx.tasks.arithmetic import worked_solution
    task = get_task("arithmetic", digits=(1, 2), operators=("+", "-"), worked_fraction=0.5)
    problems = task.train(300, seed=0)
    rng = random.Random(0)
    tok = train_sentencepiece([q.prompt + task.demonstration(q, rng) for q in problems],
                              vocab_size=40, model_prefix=str(tmp_path / "tok"))
    batches = sft_batches(tok, task, problems, 8, seed=1)
    widths, styles = set(), set()
    for _ in range(12):
        b = next(batches)
        ids = np.asarray(b.seq.tokens)
        loss = np.asarray(b.loss_mask)
        widths.add(ids.shape[1])
        for row, m in zip(ids, loss):
            response = row[m > 0].tolist()
            assert response[-1] == tok.eos_id
            text = tok.decode(response[:-1])
            styles.add("####" in text)
            start = int(np.argmax(m > 0))
            prompt = tok.decode(row[1:start].tolist())
            q = next(q for q in problems if q.prompt == prompt)
            assert text in (q.answer, worked_solution(*q.meta["operands"], q.meta["operators"][0]))
    assert all(w % 16 == 0 for w in widths) and len(widths) <= 3
    assert styles == {True, False}                      # both styles are drawn


def test_run_sft_compiles_one_step_per_batch_shape(tmp_path, monkeypatch):
    from rlx.recipes import sft as E
    from rlx import sharding as sh
    from rlx.data.tokenizer import train_sentencepiece
    from rlx.models import api
    from rlx.models.config import model_config
    from rlx.tasks import get_task
    from rlx.train import steps as steps_lib
    task = get_task("arithmetic", digits=(1, 2), operators=("+", "-"), worked_fraction=0.5)
    problems = task.train(200, seed=0)
    tok = train_sentencepiece([q.prompt + task.demonstration(q) for q in problems] +
                              ["#### ,:()b"], vocab_size=40, model_prefix=str(tmp_path / "tok"))
    compiled = []
    real = steps_lib.jit_step
    monkeypatch.setattr(steps_lib, "jit_step", lambda *a, **k: compiled.append(1) or real(*a, **k))
    shapes = set()
    batches = E.sft_batches(tok, task, problems, 4, seed=0)
    for _ in range(8):
        shapes.add(next(batches).seq.tokens.shape)
    graphdef, params = api.init(model_config("tiny", vocab_size=tok.vocab_size), seed=0)
    E.run_sft(graphdef, params, tok, task, problems, steps=8, batch=4, lr=1e-3, seed=0,
              mesh=sh.make_mesh(None))
    assert len(compiled) == len(shapes) < 8


def test_compare_counts_every_sampling_round_as_rollouts(tmp_path):
    import importlib.util
    path = os.path.join(os.path.dirname(__file__), "..", "experiments", "compare.py")
    spec = importlib.util.spec_from_file_location("compare", path)
    compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare)
    rows = [{"step": 0, "eval/accuracy": 0.5},
            {"step": 1, "dynamic_sampling/rounds": 3.0},
            {"step": 2, "dynamic_sampling/rounds": 1.0, "eval/accuracy": 0.7},
            {"step": 0, "eval/accuracy": 0.5},                  # resumed: step 0 again
            {"step": 3}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "summary.json").write_text(json.dumps(
        {"accuracy_before_rl": 0.5, "accuracy_after_rl": 0.8, "rl_steps": 3}))
    assert compare._curve(str(tmp_path), 10) == [(0, 0.5), (40, 0.7), (50, 0.8)]


def _readme_objective_code() -> str:
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    section = readme.split("## Write an objective", 1)[1]
    return section.split("```python", 1)[1].split("```", 1)[0]


def test_readme_objective_selected_by_import_path_from_rlx_train(tmp_path, monkeypatch):
    (tmp_path / "my_objectives.py").write_text(_readme_objective_code())
    monkeypatch.syspath_prepend(str(tmp_path))
    run_dir = str(tmp_path / "custom")
    argv = ["train"] + sum((["--gin_param", p] for p in TINY + [
        f'rlx.Experiment.run_dir = "{run_dir}"', "rlx.Experiment.export_hf = False",
        "rlx.train.RLConfig.steps = 1",
        'rlx.Experiment.objective = "my_objectives.my_objective"']), [])
    assert cli.main(argv + ["--summary_json", str(tmp_path / "s.json")]) == 0
    summary = json.load(open(tmp_path / "s.json"))
    assert summary["objective"] == "my_objectives.my_objective" and summary["rl_steps"] == 1
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    step = [r for r in rows if r["step"] == 1][0]
    assert "adv/kept_groups" in step            # the README's zero-variance filter ran


def test_objective_from_a_gin_reference_to_a_configurable_factory(tmp_path, monkeypatch):
    from rlx.objectives.types import Objective
    from rlx.recipes.components import resolve_objective
    from rlx.recipes.experiment import Experiment
    (tmp_path / "gin_objectives.py").write_text(
        "import gin\nfrom rlx.objectives import presets\n\n"
        "@gin.configurable\ndef clipped(eps_high=0.28):\n"
        "    return presets.dapo(eps_high=eps_high)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cli.parse_config([], ["import gin_objectives",
                          "rlx.Experiment.objective = @gin_objectives.clipped()",
                          "gin_objectives.clipped.eps_high = 0.4"])
    resolved = resolve_objective(Experiment().objective)
    assert isinstance(resolved.objective, Objective) and resolved.label == "custom"
    assert "eps_high = 0.4" in gin.operative_config_str()


@pytest.mark.parametrize("objective, match", [
    ("grpoo", r"unknown objective 'grpoo'; known presets: \[.*'dapo'.*'grpo'"),
    ("no_such_pkg.objective", r"objective 'no_such_pkg.objective': no importable module"),
    ("json.dumps", r"objective 'json.dumps': calling it with no arguments failed"),
    ("os.getcwd", r"objective 'os.getcwd' returned a str, expected an rlx.objectives"),
    ("os.sep", r"objective 'os.sep' is a str, expected an Objective"),
])
def test_unknown_objective_fails_before_anything_is_built(tmp_path, objective, match):
    run_dir = tmp_path / "run"
    with pytest.raises(ValueError, match=match):
        cli.train_main(gin_params=[f'rlx.Experiment.objective = "{objective}"',
                                   f'rlx.Experiment.run_dir = "{run_dir}"'])
    assert not run_dir.exists()                  # no tokenizer, no SFT, nothing written


def test_task_by_import_path_builds_the_users_task(tmp_path, monkeypatch):
    from rlx.recipes import prepare
    from rlx.recipes.experiment import Experiment
    (tmp_path / "my_tasks.py").write_text(
        "from rlx.tasks import ArithmeticTask\n\n"
        "class Doubles(ArithmeticTask):\n    name = 'doubles'\n\n"
        "    def __init__(self, digits=1, **kw):\n"
        "        super().__init__(digits=digits, operators=('+',), **kw)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    planned = prepare.plan(Experiment(task="my_tasks.Doubles", task_kwargs={"digits": 2},
                                      train_problems=20, eval_problems=4))
    assert type(planned.task).__name__ == "Doubles" and planned.task.digits == (2, 2)
    assert len(planned.train) == 20 and all("+" in q.prompt for q in planned.train)
    with pytest.raises(ValueError, match=r"unknown task name 'chess'.*dotted import path"):
        prepare.plan(Experiment(task="chess"))


# --------------------------------------------------------------- pretrained mode
def _tiny_hf_folder(tmp_path):
    """A tiny Qwen2-format checkpoint with a ChatML tokenizer (no downloads)."""
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "data"))
    from hf_folders import qwen2_folder

    from rlx.models import api
    from rlx.models.config import ModelConfig
    from rlx.models.convert import save_hf

    folder = qwen2_folder(tmp_path / "qwen")
    cfg = ModelConfig(vocab_size=folder.vocab_size, hidden_size=16, intermediate_size=32,
                      num_layers=1, num_heads=2, num_kv_heads=1, qkv_bias=True,
                      tie_embeddings=True)
    save_hf(folder.path, cfg, api.init(cfg, seed=0)[1], tokenizer=folder.path, overwrite=True)
    return folder.path


def test_pretrained_mode_defaults_and_explicit_settings_win(tmp_path):
    from rlx.data.tokenizer import load_tokenizer
    from rlx.recipes import prepare
    from rlx.recipes.experiment import Experiment
    from rlx.sampling.config import SamplerConfig

    hf = _tiny_hf_folder(tmp_path)
    toy, real = Experiment().resolved(), Experiment(hf_checkpoint=hf).resolved()
    assert (toy.sft_steps, toy.sft_lr, toy.rl_lr, toy.critic_lr, toy.max_new_tokens) == \
        (600, 3e-3, 1e-4, 1e-4, 32)
    assert toy.model_overrides == {} and toy.use_chat_template is False
    assert (real.sft_steps, real.sft_lr, real.rl_lr, real.critic_lr, real.max_new_tokens) == \
        (0, 1e-5, 1e-6, 1e-5, 1024)
    assert real.model_overrides == {"dtype": "bfloat16"} and real.resolved() == real
    tok = load_tokenizer(hf)
    assert prepare.chat_template_on(real, tok) and not prepare.chat_template_on(toy, tok)
    # every explicit setting wins over its mode's default
    mine = Experiment(hf_checkpoint=hf, sft_steps=5, sft_lr=0.1, rl_lr=0.2, critic_lr=0.3,
                      max_new_tokens=16, use_chat_template=False,
                      model_overrides={"dtype": "float32", "num_layers": 1}).resolved()
    assert (mine.sft_steps, mine.sft_lr, mine.rl_lr, mine.critic_lr, mine.max_new_tokens) == \
        (5, 0.1, 0.2, 0.3, 16)
    assert mine.model_overrides == {"dtype": "float32", "num_layers": 1}
    assert not prepare.chat_template_on(mine, tok)
    assert Experiment(hf_checkpoint=hf, model_overrides={"num_layers": 1}).resolved() \
        .model_overrides == {"dtype": "bfloat16", "num_layers": 1}
    # the generation length is capped by the largest completion bucket
    capped = Experiment(hf_checkpoint=hf, sampler=SamplerConfig(completion_buckets=(16, 256)))
    assert capped.resolved().max_new_tokens == 256
    assert prepare.make_sampler(capped, tok).max_new_tokens == 256
    # the prepare steps read the resolved values
    assert prepare.make_sampler(Experiment(hf_checkpoint=hf), tok).max_new_tokens == 1024
    cfg, _, _ = prepare.build_model(Experiment(hf_checkpoint=hf), tok.vocab_size)
    assert cfg.dtype == "bfloat16" and cfg.param_dtype == "float32"


@pytest.mark.parametrize("name", ["qwen2.5", "llama3"])
def test_shipped_checkpoint_configs_build_in_pretrained_mode(tmp_path, name):
    """qwen2.5.gin / llama3.gin with an hf_checkpoint: every binding parses and is used,
    and the run is built with the pretrained defaults (lr 1e-6, 1024 tokens, bf16,
    the checkpoint's chat template, FSDP over every device)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from rlx.data.tokenizer import load_tokenizer
    from rlx.recipes import prepare
    from rlx.recipes.experiment import Experiment

    hf = _tiny_hf_folder(tmp_path)
    records = [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(12)]
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    path = os.path.join(os.path.dirname(__file__), "..", "experiments", "configs", f"{name}.gin")
    cli.parse_config([path], [f'rlx.Experiment.hf_checkpoint = "{hf}"',
                              f'rlx.Experiment.data_file = "{data}"',
                              "rlx.Experiment.eval_problems = 4",
                              f'rlx.Experiment.run_dir = "{tmp_path / "run"}"'])
    exp = Experiment().resolved()
    planned = prepare.plan(exp)
    assert dict(planned.mesh.shape) == {"data": 1, "fsdp": len(jax.devices()), "tensor": 1}
    tok = load_tokenizer(hf)
    assert prepare.make_sampler(exp, tok).max_new_tokens == 1024
    assert prepare.chat_template_on(exp, tok) and exp.sft_steps == 0
    assert exp.model_overrides["dtype"] == "bfloat16"
    tx = prepare.rl_optimizer(exp)
    params = {"w": jnp.ones((2,))}
    step, _ = tx.update({"w": jnp.asarray([1.0, -1.0])}, tx.init(params), params)
    np.testing.assert_allclose(step["w"], [-1e-6, 1e-6], rtol=1e-4)
    assert planned.objective.label == ("dapo" if name == "qwen2.5" else "grpo")


def test_rl_start_from_a_checkpoint_is_sharded_from_the_first_byte(tmp_path):
    """benchmarks/sharded_load.py at a small size, 8 simulated devices, fsdp=8: after
    loading, Adam moments, the reference and the RLTrainer, the fullest device holds
    1/8 of params + moments + reference (within the replicated norm scales), the
    trainer takes the state over without a copy, and the one-device path holds 8x."""
    import subprocess
    import sys

    out = tmp_path / "figures.json"
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "sharded_load.py")
    proc = subprocess.run([sys.executable, script, "--preset", "small", "--baseline",
                           "--dir", str(tmp_path / "ckpt"), "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sharded, baseline = json.loads(out.read_text())["results"]
    ideal = sharded["ideal_per_device"]
    phases = [p["max_device_bytes"] for p in sharded["phases"]]
    assert phases[0] <= 0.26 * ideal                            # params only
    assert phases[-1] <= 1.02 * ideal                           # + moments + reference
    assert phases[-1] <= phases[-2]                             # the trainer copied nothing
    assert baseline["phases"][-1]["max_device_bytes"] >= 7.9 * phases[-1]
    assert "RLTrainer built" in proc.stdout


def test_async_rollouts_are_used_by_rlx_train_when_async_config_is_bound(tmp_path):
    run_dir = str(tmp_path / "async")
    params = TINY + [f'rlx.Experiment.run_dir = "{run_dir}"', "rlx.Experiment.export_hf = False",
                     "rlx.train.RLConfig.steps = 3", "rlx.train.AsyncConfig.max_staleness = 1"]
    cli.train_main(gin_params=params)
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    rl_rows = [r for r in rows if r["step"] > 0]
    assert len(rl_rows) == 3 and all("async/lag_max" in r for r in rl_rows)
    assert all(r["async/lag_max"] <= 1 for r in rl_rows)
    assert any(r["async/lag_max"] == 1 for r in rl_rows)    # the producer ran ahead
