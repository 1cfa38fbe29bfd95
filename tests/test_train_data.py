"""Batches: buckets, masks, response-only weights, determinism by (seed, step), balanced sampling."""

import numpy as np

from meteora_jax.testing.synthetic_tasks import write_tasks
from meteora_jax.testing.tiny_hf import make_tokenizer
from meteora_jax.train.config import TrainConfig
from meteora_jax.train.data import batch_indices, encode_examples, load_task_data, make_batch

TASKS = ("upper", "spell", "length")


def _set(tmp_path, **kw):
    cfg = TrainConfig.tiny(**kw)
    data = write_tasks(tmp_path / "d", TASKS, n_train=20, n_test=4)
    return cfg, load_task_data(data, make_tokenizer(), cfg, TASKS, context_len=256)


def test_encoding_template_bos_eos(tmp_path):
    tok = make_tokenizer()
    from meteora_jax.data.tasks import Example

    ex = {"spell": [Example("spell", "p", "ab")]}
    enc = encode_examples(ex, tok, TrainConfig.tiny(), TASKS, max_len=64)
    text = tok.decode(enc.ids[0].tolist())
    assert text == "<s>[INST] p [/INST]\nab</s>" and enc.task[0] == 1
    assert enc.prompt_len[0] == len(tok("<s>[INST] p [/INST]\n", add_special_tokens=False)["input_ids"])
    enc2 = encode_examples(
        ex, tok, TrainConfig.tiny(add_eos=False, prompt_template="plain"), TASKS, max_len=64
    )
    assert tok.decode(enc2.ids[0].tolist()) == "<s>p\nab"


def test_batch_masks_and_buckets(tmp_path):
    cfg, td = _set(tmp_path, response_only=True, length_buckets=(16, 40), max_seq_len=64)
    b = make_batch(td.train, [0, 1, 2], pad_id=0, buckets=cfg.buckets, response_only=True)
    assert b.tokens_bl.shape[1] in cfg.buckets
    for r, i in enumerate([0, 1, 2]):
        n, p = len(td.train.ids[i]), int(td.train.prompt_len[i])
        assert b.mask_bl[r].sum() == n and (b.tokens_bl[r, n:] == 0).all()
        # the prediction at position t is of token t + 1: response tokens p..n-1 are predicted at p-1..n-2
        assert np.flatnonzero(b.lm_weight_bl[r]).tolist() == list(range(p - 1, n - 1))
        assert np.flatnonzero(b.response_bl[r]).tolist() == list(range(p, n))
    full = make_batch(td.train, [0], pad_id=0, buckets=cfg.buckets, response_only=False)
    assert full.lm_weight_bl[0].sum() == len(td.train.ids[0]) - 1


def test_order_is_a_function_of_seed_and_step(tmp_path):
    cfg, td = _set(tmp_path, batch_size=7)
    epoch = np.concatenate([batch_indices(td.train, s, cfg) for s in range(len(td.train) // 7 + 1)])
    n = len(td.train)
    assert sorted(epoch[:n].tolist()) == list(range(n))  # natural: every example once per epoch
    assert np.array_equal(batch_indices(td.train, 5, cfg), batch_indices(td.train, 5, cfg))
    other = batch_indices(td.train, 5, cfg.replace(seed=1))
    assert not np.array_equal(other, batch_indices(td.train, 5, cfg))


def test_balanced_sampling_draws_tasks_uniformly(tmp_path):
    cfg, td = _set(tmp_path, sampling="balanced", batch_size=30)
    tasks = np.concatenate([td.train.task[batch_indices(td.train, s, cfg)] for s in range(40)])
    share = np.bincount(tasks, minlength=3) / len(tasks)
    assert np.all(np.abs(share - 1 / 3) < 0.05)


def test_held_out_from_test_jsonl(tmp_path):
    _, td = _set(tmp_path)
    assert len(td.held_out) == 12 and len(td.train) == 60
