"""The `rlx` console script: registry, help, and `rlx convert` round trips."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from rlx import cli
from rlx.models import api, convert
from rlx.models.config import ModelConfig

CFG = ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_layers=1,
                  num_heads=2, num_kv_heads=1, qkv_bias=True, tie_embeddings=True)


def test_help_runs_as_a_console_script():
    """`rlx --help` through the installed entry point (module form as a fallback)."""
    exe = os.path.join(os.path.dirname(sys.executable), "rlx")
    cmd = [exe, "--help"] if os.path.exists(exe) else [sys.executable, "-m", "rlx.cli",
                                                        "--help"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "convert" in out.stdout and "usage: rlx" in out.stdout


def test_no_subcommand_prints_help_and_fails(capsys):
    assert cli.main([]) == 2
    assert "usage: rlx" in capsys.readouterr().err
    assert cli.main(["convert"]) == 2
    assert "hf-to-rlx" in capsys.readouterr().err


def test_missing_required_argument_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["convert", "hf-to-rlx", "--out", "x"])
    assert e.value.code == 2 and "--hf_dir" in capsys.readouterr().err


def test_registry_adds_subcommands(monkeypatch, capsys):
    cli.commands()  # import plugin modules first, so they register in the real registry
    monkeypatch.setattr(cli, "_REGISTRY", dict(cli._REGISTRY))
    seen = {}

    @cli.register("echo", help="print a word")
    def _configure(parser):
        parser.add_argument("--word", default="hi")
        parser.set_defaults(run=lambda args: seen.setdefault("word", args.word) and 3)

    assert "echo" in cli.commands()
    assert cli.main(["echo", "--word", "yo"]) == 3 and seen == {"word": "yo"}
    with pytest.raises(ValueError, match="already registered"):
        cli.register("echo", help="again")(lambda parser: None)


def test_convert_round_trips_hf_rlx_hf(tmp_path, capsys):
    _, params = api.init(CFG, seed=5)
    hf = tmp_path / "hf"
    convert.save_hf(hf, CFG, params)
    assert cli.main(["convert", "hf-to-rlx", "--hf_dir", str(hf),
                     "--out", str(tmp_path / "rlx")]) == 0
    assert "wrote" in capsys.readouterr().out
    meta = json.loads((tmp_path / "rlx" / "config.json").read_text())
    assert meta["rlx_format"] == convert.RLX_FORMAT and meta["kind"] == "policy"
    assert cli.main(["convert", "rlx-to-hf", "--rlx-dir", str(tmp_path / "rlx"),
                     "--out", str(tmp_path / "hf2"), "--shard_size", "2KB"]) == 0
    assert (tmp_path / "hf2" / convert.INDEX_FILE).exists()
    config, _, back = convert.load_hf(tmp_path / "hf2")
    assert config == CFG
    jax.tree.map(np.testing.assert_array_equal, back, params)


def test_convert_carries_the_tokenizer_ids_and_generation_config(tmp_path, capsys):
    """hf-to-rlx keeps the tokenizer files; rlx-to-hf writes them through save_hf: the
    Llama-3 folder's bos and its two eos ids in config.json and generation_config.json
    (with the folder's own sampling defaults kept, not overwritten by a raw copy)."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "data"))
    from hf_folders import llama3_folder

    folder = llama3_folder(tmp_path / "hf")
    cfg = ModelConfig(vocab_size=folder.vocab_size, hidden_size=16, intermediate_size=24,
                      num_layers=1, num_heads=2, num_kv_heads=1)
    convert.save_hf(folder.path, cfg, api.init(cfg, seed=1)[1], tokenizer=folder.path,
                    overwrite=True)
    assert cli.main(["convert", "hf-to-rlx", "--hf_dir", folder.path,
                     "--out", str(tmp_path / "rlx")]) == 0
    assert cli.main(["convert", "rlx-to-hf", "--rlx_dir", str(tmp_path / "rlx"),
                     "--out", str(tmp_path / "hf2")]) == 0
    assert "tokenizer files" in capsys.readouterr().out
    eos = [folder.ids["<|end_of_text|>"], folder.ids["<|eot_id|>"]]
    hf_config = json.loads((tmp_path / "hf2" / "config.json").read_text())
    generation = json.loads((tmp_path / "hf2" / "generation_config.json").read_text())
    for d in (hf_config, generation):
        assert d["bos_token_id"] == folder.ids["<|begin_of_text|>"]
        assert d["eos_token_id"] == eos
    assert generation["temperature"] == 0.6 and generation["top_p"] == 0.9
    assert (tmp_path / "hf2" / "tokenizer.json").exists()
    assert (tmp_path / "hf2" / "tokenizer_config.json").exists()


def test_convert_names_an_unreadable_tokenizer_in_one_line(tmp_path, capsys):
    _, params = api.init(CFG, seed=5)
    convert.save_rlx(tmp_path / "rlx", CFG, params)
    (tmp_path / "rlx" / "tokenizer.json").write_text("{}")
    assert cli.main(["convert", "rlx-to-hf", "--rlx_dir", str(tmp_path / "rlx"),
                     "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rlx: error: tokenizer=") and "tokenizer.json" in err
    assert len(err.splitlines()) == 1


def test_convert_writes_requested_dtype(tmp_path):
    _, params = api.init(CFG, seed=5)
    convert.save_rlx(tmp_path / "rlx", CFG, params)
    assert cli.main(["convert", "rlx-to-hf", "--rlx_dir", str(tmp_path / "rlx"),
                     "--out", str(tmp_path / "hf"), "--dtype", "bfloat16"]) == 0
    dtypes = {str(t.dtype) for t in load_file(tmp_path / "hf" / "model.safetensors").values()}
    assert dtypes == {"bfloat16"}
    assert cli.main(["convert", "hf-to-rlx", "--hf_dir", str(tmp_path / "hf"),
                     "--out", str(tmp_path / "rlx16"), "--dtype", "bfloat16"]) == 0
    assert convert.load_rlx(tmp_path / "rlx16")[0].param_dtype == "bfloat16"


@pytest.mark.parametrize("make, args, match", [
    (lambda d: None, ["hf-to-rlx", "--hf_dir", "{d}/missing"], "does not exist"),
    (lambda d: d.mkdir(), ["hf-to-rlx", "--hf_dir", "{d}"], "has no config.json"),
    (lambda d: (d.mkdir(), (d / "config.json").write_text(
        json.dumps({"architectures": ["BertModel"]}))),
     ["hf-to-rlx", "--hf_dir", "{d}"], "unsupported architecture"),
    (lambda d: (d.mkdir(), (d / "config.json").write_text(
        json.dumps({"architectures": ["LlamaForCausalLM"]}))),
     ["rlx-to-hf", "--rlx_dir", "{d}"], "looks like a Hugging Face folder"),
])
def test_convert_bad_folders_give_one_line_errors(tmp_path, capsys, make, args, match):
    src = tmp_path / "src"
    make(src)
    argv = ["convert"] + [a.format(d=src) for a in args] + ["--out", str(tmp_path / "o")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("rlx: error: ") and match in err and "Traceback" not in err


def test_convert_refuses_to_overwrite(tmp_path, capsys):
    _, params = api.init(CFG, seed=5)
    convert.save_hf(tmp_path / "hf", CFG, params)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    argv = ["convert", "hf-to-rlx", "--hf_dir", str(tmp_path / "hf"), "--out",
            str(tmp_path / "out")]
    assert cli.main(argv) == 2 and "not empty" in capsys.readouterr().err
    assert cli.main(argv + ["--overwrite"]) == 0


def test_module_form_runs_every_subcommand():
    """`python -m rlx.cli` is the same console (train, rlhf, dpo, convert)."""
    out = subprocess.run([sys.executable, "-m", "rlx.cli", "train", "--help"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--gin_param" in out.stdout
    assert {"train", "rlhf", "dpo", "convert"} <= set(cli.commands())


def test_kernel_line_names_the_dispatched_backend(monkeypatch):
    from rlx.recipes.experiment import Experiment
    monkeypatch.delenv("RLX_KERNEL_BACKEND", raising=False)
    line = cli.kernel_line(Experiment())
    assert line == ("kernels: log-prob/entropy and ratio statistics -> pure-jnp reference "
                    "(auto on cpu); attention reference (jnp); dense decode")
    monkeypatch.setenv("RLX_KERNEL_BACKEND", "gpu")
    line = cli.kernel_line(Experiment(model_overrides={"attention_backend": "block_sparse",
                                                       "decode_page_size": 16}))
    assert "Pallas GPU (Triton) in interpret mode (RLX_KERNEL_BACKEND=gpu)" in line
    assert "attention block_sparse via Pallas GPU" in line
    assert "paged decode (16-slot pages)" in line


def _run_script():
    import importlib.util
    path = os.path.join(os.path.dirname(__file__), "..", "experiments", "run.py")
    spec = importlib.util.spec_from_file_location("experiments_run", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_experiments_runner_maps_each_config_to_its_command(capsys):
    run = _run_script()
    shipped = run.names()
    assert {"grpo", "dapo", "ppo", "rlhf", "dpo", "qwen2.5"} <= set(shipped)
    assert "base" not in shipped
    for name in shipped:
        argv = run.argv_for(name, ["rlx.train.RLConfig.steps = 1"])
        expected = {"rlhf": "rlhf", "dpo": "dpo"}.get(name, "train")
        assert argv[0] == expected and argv[1].endswith(f"configs/{name}.gin"), argv
        assert argv[2] == "--gin_param=rlx.train.RLConfig.steps = 1"
    assert run.main(["--list"]) == 0 and "dapo" in capsys.readouterr().out.split()
    with pytest.raises(SystemExit, match="no config 'nope'"):
        run.argv_for("nope", [])
    # The runner goes through `rlx`: a bad binding is rlx's one-line error.
    assert run.main(["grpo", "rlx.Experiment.no_such_field = 1"]) == 2
    assert "no_such_field" in capsys.readouterr().err


def test_recipe_classes_are_reachable_under_their_gin_names():
    import rlx
    from rlx.recipes.experiment import Experiment
    from rlx.recipes.rlhf import DPOExperiment, RLHFExperiment
    assert (rlx.Experiment, rlx.RLHFExperiment, rlx.DPOExperiment) == (
        Experiment, RLHFExperiment, DPOExperiment)
    with pytest.raises(AttributeError, match="no attribute 'Experimnt'"):
        rlx.Experimnt  # noqa: B018


# ----------------------------------------------------------------- several hosts
@pytest.mark.parametrize("command", ["train", "rlhf", "dpo"])
def test_every_entry_point_starts_distributed_from_its_flags_first(monkeypatch, capsys,
                                                                    command):
    from rlx import sharding

    seen = []

    def init(address, num, pid):
        seen.append((address, num, pid))
        raise ValueError("stopped after init_distributed")

    monkeypatch.setattr(sharding, "init_distributed", init)
    assert cli.main([command, "--coordinator_address", "10.0.0.1:1234", "--num_processes",
                     "4", "--process_id", "3", "--gin_param", "no.such = 1"]) == 2
    assert seen == [("10.0.0.1:1234", 4, 3)]          # before the bad binding is parsed
    assert "stopped after init_distributed" in capsys.readouterr().err


@pytest.fixture
def fake_initialize(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    for var in list(os.environ):
        if var.startswith(("SLURM_", "OMPI_", "JAX_COORDINATOR")):
            monkeypatch.delenv(var)
    return calls


def test_init_distributed_explicit_flags(fake_initialize, monkeypatch):
    from rlx import sharding

    assert sharding.init_distributed() == 1 and fake_initialize == []      # plain process
    assert sharding.init_distributed(None, 1, 0) == 1 and fake_initialize == []
    for args, match in [((None, 2, None), "needed together"), (("h:1", None, 0), "together"),
                        (("h:1", 2, 2), r"process_id=2: must be in \[0, 2\)"),
                        (("h:1", 0, 0), "num_processes=0"),
                        ((None, 2, 1), "coordinator_address")]:
        with pytest.raises(ValueError, match=match):
            sharding.init_distributed(*args)
    assert fake_initialize == []
    sharding.init_distributed("127.0.0.1:5555", 2, 1)
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.1.1.1:9")
    sharding.init_distributed(None, 3, 0)
    assert [(c["coordinator_address"], c["num_processes"], c["process_id"])
            for c in fake_initialize] == [("127.0.0.1:5555", 2, 1), ("10.1.1.1:9", 3, 0)]


@pytest.mark.parametrize("env, count", [
    ({"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node[1-2]", "SLURM_NTASKS": "2",
      "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}, 2),
    ({"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node1", "SLURM_NTASKS": "1",
      "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}, 1),
    ({"OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://10.96.0.1:34911",
      "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "2",
      "OMPI_COMM_WORLD_LOCAL_RANK": "0"}, 4),
])
def test_init_distributed_auto_detects_the_launcher(fake_initialize, monkeypatch, env, count):
    """jax's own cluster detection finds SLURM / Open MPI; only a job of several
    processes starts the runtime (with jax reading everything from the launcher)."""
    from rlx import sharding

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    found = sharding.detect_cluster()
    assert found is not None and found[1] == count
    sharding.init_distributed()
    assert fake_initialize == ([{"initialization_timeout": 300}] if count > 1 else [])
