"""The path a user takes, end to end through the ``rlx`` command line: their own Hugging
Face checkpoint (written here with ``transformers``; its tokenizer built with
``tokenizers``), their JSON Lines prompts of varied lengths and their own reward module,
trained with DAPO and dynamic sampling, killed with SIGKILL after the first checkpoint,
resumed by running the same command again, and the export loaded back with
``transformers``, whose generation stops at the checkpoint's eos.

Two checkpoint formats (the kill and resume, format-independent, run with the Qwen2
folder in CI and with both under ``-m slow``): a Qwen2 folder (byte-level BPE without a bos token, a ChatML
template, eos ``<|im_end|>`` and generation_config eos [<|im_end|>, <|endoftext|>]) and a
Llama-3 folder (``<|begin_of_text|>`` bos written by the template, eos
``<|end_of_text|>`` and generation_config eos [<|end_of_text|>, <|eot_id|>]).

Sizes: a 2-layer, 32-wide model; 40 SFT steps at lr 1e-2 (asked for explicitly: the
pretrained mode's default is no SFT) teach it "a number, then eos", so that the
exported model really does stop; 4 RL steps of 2 prompts x 4 completions of at most 8
tokens, one prompt bucket (128) so few programs compile.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "data"))
from hf_folders import llama3_folder, qwen2_folder  # noqa: E402

RUN_TIMEOUT_S = 300
STEPS = 4
MAX_NEW = 8

REWARD_MODULE = '''\
"""The user's reward: the answer in the completion, plus a little for its length
(so that groups differ). While the file "slow" exists next to this module each call
takes 0.2 s, so that the test can kill the run between two checkpoints."""
import os
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def score(completion, problem):
    with open(os.path.join(HERE, "reward_pids.txt"), "a") as f:
        f.write(f"{os.getpid()}\\n")
    if os.path.exists(os.path.join(HERE, "slow")):
        time.sleep(0.2)
    return float(problem.answer in completion) + 0.1 * (len(completion) % 3)
'''


def _checkpoint(root, kind):
    """A tiny random checkpoint saved by transformers, with the tokenizer folder's files
    (tokenizer.json, tokenizer_config.json with the chat template, and its
    generation_config.json) next to it. Returns (folder, tokenizer Folder)."""
    import shutil

    import torch
    import transformers

    tok = (qwen2_folder if kind == "qwen2" else llama3_folder)(root / "tokenizer")
    sizes = dict(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 max_position_embeddings=512)
    torch.manual_seed(0)
    if kind == "qwen2":
        config = transformers.Qwen2Config(
            **sizes, tie_word_embeddings=True, bos_token_id=None,
            eos_token_id=tok.ids["<|im_end|>"], pad_token_id=tok.ids["<|endoftext|>"])
        model = transformers.Qwen2ForCausalLM(config)
    else:
        config = transformers.LlamaConfig(
            **sizes, tie_word_embeddings=False,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 128},
            bos_token_id=tok.ids["<|begin_of_text|>"],
            eos_token_id=[tok.ids["<|end_of_text|>"], tok.ids["<|eot_id|>"]])
        model = transformers.LlamaForCausalLM(config)
    folder = root / "checkpoint"
    model.save_pretrained(folder, safe_serialization=True)
    for name in os.listdir(tok.path):           # the tokenizer's generation_config wins
        shutil.copy(os.path.join(tok.path, name), folder)
    return folder, tok


def _user_files(root):
    """train.jsonl (40 prompts of 1 to 3 sentences) and my_rewards.py."""
    rows = [{"prompt": f"What is {i % 5} + {(3 * i) % 4}?" + " Answer with one number." * (i % 3),
             "answer": str(i % 5 + (3 * i) % 4)} for i in range(40)]
    (root / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (root / "my_rewards.py").write_text(REWARD_MODULE)
    return root / "train.jsonl"


def _command(root, checkpoint, data):
    bindings = [
        f'rlx.Experiment.hf_checkpoint = "{checkpoint}"',
        f'rlx.Experiment.data_file = "{data}"',
        f'rlx.Experiment.run_dir = "{root / "runs" / "user"}"',
        'rlx.Experiment.rewards = ("my_rewards.score",)',
        'rlx.Experiment.objective = "dapo"',
        "rlx.train.RLConfig.dynamic_sampling = True",
        "rlx.Experiment.eval_problems = 4",
        "rlx.Experiment.sft_steps = 40",
        "rlx.Experiment.sft_lr = 1e-2",
        "rlx.Experiment.sft_batch = 16",
        "rlx.Experiment.num_generations = 4",
        f"rlx.Experiment.max_new_tokens = {MAX_NEW}",
        "SamplerConfig.prompt_buckets = (128,)",
        f"rlx.objectives.dapo.max_length = {MAX_NEW}",
        "rlx.objectives.dapo.overlong_buffer = 2",
        f"rlx.train.RLConfig.steps = {STEPS}",
        "rlx.train.RLConfig.prompts_per_step = 2",
        "rlx.train.RLConfig.eval_every = 0",
        "rlx.train.RLConfig.log_samples_every = 2",
        "rlx.train.RLConfig.checkpoint_every = 1",
    ]
    return [sys.executable, "-m", "rlx.cli", "train", *[f"--gin_param={b}" for b in bindings]]


def _env(root):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    env["JAX_PLATFORMS"] = "cpu"
    env.pop("XLA_FLAGS", None)
    return env


def _kill_after_first_checkpoint(cmd, env, root, log_path) -> int:
    """Starts the run, SIGKILLs its whole process group (reward workers included) as soon
    as checkpoint 1 is complete (orbax renames the step folder when it is); returns the
    exit code."""
    step_dir = root / "runs" / "user" / "checkpoints" / "1"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=root, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        deadline = time.monotonic() + RUN_TIMEOUT_S
        try:
            while not step_dir.is_dir():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"no checkpoint 1 (rc {proc.poll()}):\n"
                                         + log_path.read_text()[-3000:])
                time.sleep(0.05)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode


@pytest.mark.parametrize("kind, killed", [
    ("qwen2", True),
    ("llama3", False),     # the kill and resume are format-independent: once is enough
    pytest.param("llama3", True, marks=pytest.mark.slow),
])
def test_user_checkpoint_data_and_reward_module_train_resume_and_export(tmp_path, kind,
                                                                        killed):
    import torch
    import transformers

    checkpoint, tok = _checkpoint(tmp_path, kind)
    data = _user_files(tmp_path)
    cmd, env = _command(tmp_path, checkpoint, data), _env(tmp_path)
    run_dir = tmp_path / "runs" / "user"
    source_generation = json.loads((checkpoint / "generation_config.json").read_text())

    if killed:
        # 1. killed with SIGKILL after its first checkpoint
        (tmp_path / "slow").touch()
        rc = _kill_after_first_checkpoint(cmd, env, tmp_path, tmp_path / "first.log")
        assert rc == -signal.SIGKILL, (rc, (tmp_path / "first.log").read_text()[-3000:])
        assert not (run_dir / "summary.json").exists()          # it did not get to the end
        assert not (run_dir / "checkpoints" / str(STEPS)).exists()
        (tmp_path / "slow").unlink()
        (tmp_path / "reward_pids.txt").unlink()

    # 2. the same command resumes (or, not killed, runs) and finishes
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        printed, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, printed[-4000:]
    assert ("resumed from checkpoint step" in printed) == killed
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rl = [r for r in rows if r["step"] > 0]
    assert {r["step"] for r in rl} == set(range(1, STEPS + 1)) and rl[-1]["step"] == STEPS
    assert all("reward/my_rewards.score" in r and "dynamic_sampling/rounds" in r for r in rl)
    assert any(r["step"] < 0 and "sft_loss" in r for r in rows)          # SFT was asked for
    # The user's reward ran in worker processes, never in the training process.
    pids = set((tmp_path / "reward_pids.txt").read_text().split())
    assert pids and str(proc.pid) not in pids
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["objective"] == "dapo" and summary["rl_steps"] == STEPS

    # 3. the export, loaded and run by transformers, stops at the checkpoint's eos
    export = run_dir / "hf_export"
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(export))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(export))
    eos = source_generation["eos_token_id"]
    assert isinstance(eos, list) and len(eos) == 2
    assert model.generation_config.eos_token_id == eos
    assert model.config.bos_token_id == source_generation.get("bos_token_id")
    if kind == "qwen2":
        assert hf_tok.bos_token is None and model.config.pad_token_id == tok.ids["<|endoftext|>"]
    stopped = 0
    for prompt in ("What is 2 + 3?",
                   "What is 1 + 1? Answer with one number. Answer with one number."):
        ids = hf_tok.apply_chat_template([{"role": "user", "content": prompt}],
                                         add_generation_prompt=True, return_tensors="pt",
                                         return_dict=True)
        first = ids["input_ids"][0].tolist()
        if kind == "llama3":      # one bos, written by the template
            assert first[0] == tok.ids["<|begin_of_text|>"] and first.count(first[0]) == 1
        with torch.no_grad():
            gen = model.generate(**ids, max_new_tokens=4 * MAX_NEW, do_sample=False)
        new = gen[0, len(first):].tolist()
        assert new, "generated nothing"
        if new[-1] in eos and len(new) < 4 * MAX_NEW:
            stopped += 1
            assert not any(t in eos for t in new[:-1])
    assert stopped == 2, "the exported model did not stop at its eos"


def test_readme_user_path_block_is_short_and_its_pieces_parse(tmp_path):
    """The README's section: at most 15 lines; its reward module scores a problem; its
    gin file and bindings parse (the checkpoint path is the reader's own)."""
    import re
    from types import SimpleNamespace

    import gin

    from rlx import cli

    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    section = readme.split("## Your checkpoint, data and reward", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    assert len(block.splitlines()) <= 15
    reward = block.split("<<'PY'", 1)[1].split("\nPY\n", 1)[0].split("\n", 1)[1]
    namespace: dict = {}
    exec(compile(reward, "my_rewards.py", "exec"), namespace)     # noqa: S102 - our README
    problem = SimpleNamespace(prompt="What is 12 + 7?", answer="19")
    assert namespace["score"]("it is 19", problem) == 1.0
    assert namespace["score"]("it is 18", problem) == 0.0
    files = re.findall(r"--gin_file=(\S+)", block)
    params = re.findall(r"--gin_param='([^']+)'", block)
    assert files == ["experiments/configs/qwen2.5.gin"] and len(params) == 3
    root = os.path.join(os.path.dirname(__file__), "..")
    gin.clear_config()
    try:
        cli.parse_config([os.path.join(root, files[0])], params)
        from rlx.recipes.experiment import Experiment
        exp = Experiment()
        assert exp.rewards == ("my_rewards.score",) and exp.objective == "dapo"
        assert exp.hf_checkpoint and exp.data_file == "train.jsonl"
    finally:
        gin.clear_config()
