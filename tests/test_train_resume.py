"""SIGKILL a training subprocess at a random step, resume: the final gates equal an uninterrupted run's."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

import meteora_jax as mj
from meteora_jax.errors import MeteoraInputError
from meteora_jax.testing.synthetic_tasks import make_tiny_meteora_dir, write_tasks
from meteora_jax.train.loop import train_gates

TASKS = ("upper", "reverse", "length")
STEPS = 60
SETS = [
    f"steps={STEPS}",
    "checkpoint_every=4",
    "log_every=1",
    "batch_size=4",
    "max_seq_len=48",
    "length_buckets=[48]",
    "progress=false",
    "learning_rate=1e-2",
]


def _config(extra=()):
    from meteora_jax.train.config import load_config

    return load_config(None, [*SETS, *extra])


def _gates(out_dir, suffixes=("gate_de",)):
    w = load_file(os.path.join(out_dir, "model.safetensors"))
    return {k: v for k, v in w.items() if k.endswith(suffixes)}


def test_sigkill_then_resume_is_bitwise_identical(tmp_path):
    model = make_tiny_meteora_dir(tmp_path / "model", TASKS, max_positions=64)
    data = write_tasks(tmp_path / "data", TASKS, n_train=16, n_test=4)
    cfg = _config()

    # the interrupted run, in a subprocess killed with SIGKILL once it has logged a random number of steps
    out = tmp_path / "killed"
    kill_after = random.Random().randint(5, 40)
    cmd = [
        sys.executable,
        "-m",
        "meteora_jax.cli",
        "train-gate",
        "--model",
        model,
        "--data",
        data,
        "--out",
        str(out),
    ] + [a for s in SETS for a in ("--set", s)]
    env = dict(os.environ, PYTHONPATH=os.getcwd(), JAX_PLATFORMS="cpu")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = tmp_path / "killed.train" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and sum(1 for _ in open(metrics)) >= kill_after:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    rc = proc.wait(timeout=60)
    assert rc == -signal.SIGKILL, f"the run was not killed mid-way (rc={rc}): {proc.stderr.read()[-2000:]}"
    assert not out.exists()

    # without --resume the leftover checkpoints are refused, not overwritten
    with pytest.raises(MeteoraInputError, match="pass --resume"):
        train_gates(model, data, out, cfg, log=lambda s: None)
    resumed = train_gates(model, data, out, cfg, resume=True, log=lambda s: None)
    steps_logged = [json.loads(line)["step"] for line in open(out / "metrics.jsonl")]
    assert steps_logged == list(range(1, STEPS + 1))

    straight = train_gates(model, data, tmp_path / "straight", cfg, log=lambda s: None)
    a, b = _gates(resumed.out_dir), _gates(straight.out_dir)
    assert a.keys() == b.keys() and len(a) == 14
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert mj.load(resumed.out_dir).expert_names == list(TASKS)


@pytest.mark.parametrize(
    "extra",
    [(), ("mode=gate_and_experts", "expert_learning_rate=1e-3")],
    ids=["gate", "gate_and_experts"],
)
def test_deadline_stop_then_resume_is_bitwise_identical(tmp_path, extra):
    """A run stopped by ``deadline`` (checkpointed at the step it reached, off the checkpoint grid) and resumed
    ends with the same gates as an uninterrupted run; in gate_and_experts mode with its own expert rate (a
    two-part optimizer state), the same LoRA factors too."""
    model = make_tiny_meteora_dir(tmp_path / "model", TASKS, max_positions=64)
    data = write_tasks(tmp_path / "data", TASKS, n_train=16, n_test=4)
    cfg = _config(extra).replace(steps=10)
    out, quiet = tmp_path / "stopped", lambda s: None

    # a deadline already past: every call does exactly one step, checkpoints it and returns
    first = train_gates(model, data, out, cfg, deadline=time.time() - 1, log=quiet)
    assert first.final_step == 1 and not out.exists()
    assert train_gates(model, data, out, cfg, resume=True, stop_after=4, log=quiet).final_step == 4
    logs = []
    fifth = train_gates(model, data, out, cfg, resume=True, deadline=time.time() - 1, log=logs.append)
    assert fifth.final_step == 5 and any("deadline reached at step 5/10" in line for line in logs)
    resumed = train_gates(model, data, out, cfg, resume=True, deadline=time.time() + 3600, log=quiet)
    assert resumed.final_step == 10 and resumed.held_out
    steps_logged = [json.loads(line)["step"] for line in open(out / "metrics.jsonl")]
    assert steps_logged == list(range(1, 11))

    straight = train_gates(model, data, tmp_path / "straight", cfg, log=quiet)
    suffixes = ("gate_de", "lora_a_edr", "lora_b_ero") if extra else ("gate_de",)
    a, b = _gates(resumed.out_dir, suffixes), _gates(straight.out_dir, suffixes)
    assert a.keys() == b.keys() and len(a) == 14 * len(suffixes)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
