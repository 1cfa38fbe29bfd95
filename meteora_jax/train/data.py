"""Task data -> padded, static-shape training batches; the batch of step ``s`` is a pure function of (seed, s).

Tokenisation. Each example becomes ``[BOS] template(prompt) response [EOS]`` with the base model's tokenizer
(copied into the model directory by convert). The prompt part and the response are tokenised separately and
concatenated, so the response-only loss mask is exact (a joint tokenisation could merge a token across the
boundary). The template is MeteoRA's ``[INST] {prompt} [/INST]\\n`` by default, the tokenizer's chat
template (``chat``), plain, or any format containing ``{prompt}``. EOS is added by default; MeteoRA's original
training omits it, which is why its outputs run on past the answer.

Batches. Sequences are right-padded to the smallest length bucket that holds the batch's longest one, so a
run compiles the step once per bucket in use, not once per length. Labels are the inputs shifted by one;
``lm_weight_bt[b, t]`` says whether the prediction at position t (of token t + 1) counts in the LM loss.

Order. There is no iterator state besides the step number: the batch of step ``s`` is computed from
``(seed, s)`` alone. ``natural`` walks a seeded permutation of all examples, a fresh one each epoch;
``balanced`` draws a task uniformly per row, then an example of it. Resuming at step ``s`` is therefore
exact by construction, and so is running the same config on another mesh.
"""

from __future__ import annotations

import dataclasses
import os
import weakref
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from meteora_jax.data.tasks import Example, read_split, split_train_test
from meteora_jax.errors import MeteoraInputError
from meteora_jax.train.config import CHAT_TEMPLATES, PROMPT_TEMPLATES, TrainConfig, is_prompt_template
from meteora_jax.train.conversations import join_turns, turn_tail_text


@dataclasses.dataclass(frozen=True)
class Batch:
    """One step's input. Shapes: B rows, L = the bucket length."""

    tokens_bl: np.ndarray  # int32 [B, L], pad = pad_id
    mask_bl: np.ndarray  # int32 [B, L], 1 = real token (prompt or response)
    lm_weight_bl: np.ndarray  # float32 [B, L], 1 where the next token counts in the LM loss
    task_b: np.ndarray  # int32 [B], expert index of each row's task (its first turn's)
    response_bl: np.ndarray  # int32 [B, L], 1 = a response token (routing accuracy once the prompt is read)
    # int32 [B, L], each token's gate target: only in runs with conversation rows (train.conversations)
    task_bl: np.ndarray | None = None

    def as_dict(self) -> dict[str, np.ndarray]:
        out = {
            "tokens_bl": self.tokens_bl,
            "mask_bl": self.mask_bl,
            "lm_weight_bl": self.lm_weight_bl,
            "task_b": self.task_b,
            "response_bl": self.response_bl,
        }
        if self.task_bl is not None:
            out["task_bl"] = self.task_bl
        return out


@dataclasses.dataclass
class EncodedSet:
    """Tokenised examples of all tasks, flat. ``prompt_len[i]`` counts BOS + the templated prompt."""

    ids: list[np.ndarray]
    prompt_len: np.ndarray
    task: np.ndarray
    task_names: tuple[str, ...]
    truncated: int = 0
    # for conversation rows (train.conversations): each example's tokens as a later turn, the EOS id added
    # after responses (None: none), the longest row allowed
    tail_ids: list[np.ndarray] | None = None
    eos_id: int | None = None
    max_len: int = 0

    def __len__(self) -> int:
        return len(self.ids)

    def indices_of_task(self, t: int) -> np.ndarray:
        return np.flatnonzero(self.task == t)


# tokenizer -> (its chat template, the placeholder system turn rendered alone): the same for every prompt, and
# rendering it each time was a third of the time to load the study's 40k examples. A template may still change
# its head (one that writes today's date), so a head that no longer prefixes a render is rendered afresh.
_HEADS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _system_head(tokenizer, placeholder: list[dict[str, str]], render: Callable, fresh: bool = False) -> str:  # noqa: ANN001
    template = getattr(tokenizer, "chat_template", None)
    try:
        cached = _HEADS.get(tokenizer)
    except TypeError:  # not weak-referenceable: no cache
        return render(placeholder, False)
    if fresh or cached is None or cached[0] != template:
        cached = (template, render(placeholder, False))
        _HEADS[tokenizer] = cached
    return cached[1]


def render_chat(tokenizer, messages: Sequence[dict[str, str]], template: str = "chat") -> str:  # noqa: ANN001
    """``messages`` through the tokenizer's chat template, ending where the assistant answers.

    ``chat_no_system`` leaves out the system turn that some templates insert by themselves when none is given
    (SmolLM2: "You are a helpful AI assistant named SmolLM, ..."; Llama-3.1: a knowledge-date turn). MeteoRA's
    own task data had no system prompt, and a prefix every prompt shares is tokens whose routing cannot depend
    on the task (the 24-token SmolLM2 prefix went to one expert for all 22 BIG-bench tasks,
    benchmarks/RESULTS.md). How: render with a placeholder system turn, cut that turn off, and put back a BOS
    the template writes before it unless the turns themselves start with it (SmolLM2's BOS is its turn marker).
    """
    render = lambda msgs, gen: tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)  # noqa: E731
    if template == "chat":
        return render(list(messages), True)
    placeholder = [{"role": "system", "content": "placeholder"}]
    try:
        head, full = _system_head(tokenizer, placeholder, render), render(placeholder + list(messages), True)
    except Exception as e:  # noqa: BLE001 (jinja raises whatever the template author chose)
        raise MeteoraInputError(
            f"prompt_template=chat_no_system: this chat template does not take a system turn ({e}); use chat."
        ) from None
    if not full.startswith(head):
        head = _system_head(tokenizer, placeholder, render, fresh=True)
    if not full.startswith(head):
        raise MeteoraInputError(
            "prompt_template=chat_no_system: this chat template does not render the system turn as a prefix of "
            "the conversation, so it cannot be cut off; use chat."
        )
    rest, bos = full[len(head) :], getattr(tokenizer, "bos_token", None) or ""
    return bos + rest if bos and head.startswith(bos) and not rest.startswith(bos) else rest


class PromptFormatter:
    """Turns a raw prompt into the model's input text (see the module docstring)."""

    def __init__(self, tokenizer, template: str):  # noqa: ANN001 (a transformers tokenizer)
        self.tokenizer = tokenizer
        self.template = PROMPT_TEMPLATES.get(template, template)
        if template in CHAT_TEMPLATES and not getattr(tokenizer, "chat_template", None):
            raise MeteoraInputError(
                f"prompt_template={template}, but the model directory's tokenizer has no chat template; use "
                "--set prompt_template=meteora (MeteoRA's [INST] format) or plain."
            )

    def __call__(self, prompt: str) -> str:
        if self.template in CHAT_TEMPLATES:
            return render_chat(self.tokenizer, [{"role": "user", "content": prompt}], self.template)
        return self.template.replace("{prompt}", prompt)

    def bos_ids(self, add_bos: bool = True) -> list[int]:
        """What training puts before the formatted prompt: BOS, unless a chat template (it writes its own)."""
        bos = self.tokenizer.bos_token_id if add_bos and self.template not in CHAT_TEMPLATES else None
        return [bos] if bos is not None else []

    def ids(self, prompt: str, add_bos: bool = True) -> list[int]:
        """The prompt's token ids exactly as training builds them: ``bos_ids``, then the formatted text with no
        other special tokens."""
        return self.bos_ids(add_bos) + _encode(self.tokenizer, self(prompt))


PROMPT_TEMPLATE_HELP = (
    "how prompts are formatted before tokenising: auto (the template train-gate recorded in the model "
    "directory, else none), none (as given, with the tokenizer's special tokens), meteora, chat, "
    "chat_no_system, plain, or a format containing {prompt}"
)


def prompt_format_for(model_dir: str, choice: str) -> tuple[str | None, bool]:
    """``--prompt-template`` of ``eval`` / ``generate`` -> (template or None, add_bos). A gate trained on one
    format should be asked in that format: ``auto`` reads it from the model directory."""
    template, add_bos = trained_prompt_format(model_dir)
    if choice == "auto":
        return template, add_bos
    if choice == "none":
        return None, True
    if not is_prompt_template(choice):
        raise MeteoraInputError(
            f"--prompt-template {choice!r}: use auto, none, meteora, chat, chat_no_system, plain, or a format "
            "containing {prompt}."
        )
    return choice, add_bos


def trained_prompt_format(model_dir: str) -> tuple[str | None, bool]:
    """(prompt_template, add_bos) that ``train-gate`` recorded in ``model_dir``'s config; (None, True) for a
    model it did not write (a plain ``convert`` output): its prompts are then taken as given."""
    from meteora_jax.io import read_model_config

    training = read_model_config(model_dir).get("training") or {}
    return training.get("prompt_template"), bool(training.get("add_bos", True))


def _encode(tokenizer, text: str) -> list[int]:  # noqa: ANN001
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _encode_many(tokenizer, texts: Sequence[str]) -> list[list[int]]:  # noqa: ANN001
    """``_encode`` of each text, in ONE tokenizer call: a fast tokenizer encodes a list on all cores and skips the
    per-call overhead (with the cached system head: 2.1x on the study's 38,958 examples, scripts/bench_data_load.py)."""
    if not texts:
        return []
    return [list(x) for x in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def encode_examples(
    examples: Mapping[str, Sequence[Example]],
    tokenizer,  # noqa: ANN001
    cfg: TrainConfig,
    expert_names: Sequence[str],
    *,
    max_len: int,
    source: str = "data",
) -> EncodedSet:
    """Tokenises ``{task: examples}``; the task id of each example is its expert's index."""
    fmt = PromptFormatter(tokenizer, cfg.prompt_template)
    eos = tokenizer.eos_token_id if cfg.add_eos else None
    ids, plen, task = [], [], []
    tail_text = turn_tail_text(tokenizer, cfg.prompt_template) if cfg.composite_fraction > 0 else None
    tails: list[np.ndarray] | None = [] if tail_text else None
    truncated = 0
    bos_ids = fmt.bos_ids(cfg.add_bos)
    for name, exs in examples.items():
        t = list(expert_names).index(name)
        # one batched call per task and kind of text (fmt.ids and _encode of each example, token for token)
        prompts = _encode_many(tokenizer, [fmt(ex.prompt) for ex in exs])
        responses = _encode_many(tokenizer, [ex.response for ex in exs])
        tail_ids = _encode_many(tokenizer, [tail_text(ex.prompt) for ex in exs]) if tail_text else None
        for i in range(len(exs)):
            prompt_ids = bos_ids + prompts[i]
            resp_ids = responses[i] + ([eos] if eos is not None else [])
            seq = prompt_ids + resp_ids
            if len(seq) > max_len:
                if cfg.overlong == "error":
                    raise MeteoraInputError(
                        f"{source}/{name}: example {i + 1} is {len(seq)} tokens, longer than the context of "
                        f"{max_len} (max_seq_len / the model's max_position_embeddings). Shorten it, raise "
                        "max_seq_len, or pass --set overlong=truncate."
                    )
                seq = seq[:max_len]
                truncated += 1
            ids.append(np.asarray(seq, np.int32))
            plen.append(min(len(prompt_ids), max_len))
            task.append(t)
            if tail_ids is not None:
                tails.append(np.asarray(tail_ids[i], np.int32))
    return EncodedSet(
        ids=ids,
        prompt_len=np.asarray(plen, np.int32),
        task=np.asarray(task, np.int32),
        task_names=tuple(expert_names),
        truncated=truncated,
        tail_ids=tails,
        eos_id=eos,
        max_len=max_len,
    )


def bucket_for(length: int, buckets: Sequence[int]) -> int:
    for b in buckets:
        if length <= b:
            return b
    return buckets[-1]


def make_batch(
    data: EncodedSet,
    idx: Sequence[int],
    *,
    pad_id: int,
    buckets: Sequence[int],
    response_only: bool,
    groups: Sequence[tuple[int, ...]] | None = None,
) -> Batch:
    """Right-padded batch of examples ``idx`` at the smallest bucket holding the longest.

    ``groups`` (``train.conversations.conversation_groups`` of ``idx``): rows become conversations of their
    group's examples, and the batch carries each token's gate target (``task_bl``).
    """
    # a plain row is a conversation of one turn: join_turns gives back exactly its example's tokens
    rows = [join_turns(data, g) for g in (groups if groups is not None else [(int(i),) for i in idx])]
    length = bucket_for(max(len(ids) for ids, _, _ in rows), buckets)
    b = len(rows)
    tokens = np.full((b, length), pad_id, np.int32)
    mask = np.zeros((b, length), np.int32)
    weight = np.zeros((b, length), np.float32)
    response = np.zeros((b, length), np.int32)
    task = np.zeros((b, length), np.int32)
    first_task_b = data.task[np.asarray(idx)].astype(np.int32)
    for r, (ids, task_t, resp_t) in enumerate(rows):
        n = len(ids)
        tokens[r, :n], mask[r, :n], response[r, :n] = ids, 1, resp_t
        task[r, :n], task[r, n:] = task_t, first_task_b[r]
        # position t predicts token t + 1: every real next token, or (response_only) every response token
        weight[r, : n - 1] = resp_t[1:] if response_only else 1.0
    return Batch(tokens, mask, weight, first_task_b, response, task if groups is not None else None)


def batch_indices(data: EncodedSet, step: int, cfg: TrainConfig) -> np.ndarray:
    """Example indices of step ``step``: a pure function of (seed, step); see the module docstring."""
    n, bsz = len(data), cfg.batch_size
    if cfg.sampling == "balanced":
        rng = np.random.default_rng([cfg.seed, 1, step])
        tasks = np.unique(data.task)
        out = []
        for t in rng.choice(tasks, size=bsz):
            pool = data.indices_of_task(int(t))
            out.append(pool[rng.integers(len(pool))])
        return np.asarray(out)
    out = []
    for j in range(step * bsz, (step + 1) * bsz):
        epoch, pos = divmod(j, n)
        perm = _permutation(cfg.seed, epoch, n)
        out.append(perm[pos])
    return np.asarray(out)


_PERM_CACHE: dict[tuple[int, int, int], np.ndarray] = {}


def _permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    key = (seed, epoch, n)
    if key not in _PERM_CACHE:
        if len(_PERM_CACHE) > 4:
            _PERM_CACHE.clear()
        _PERM_CACHE[key] = np.random.default_rng([seed, 0, epoch]).permutation(n)
    return _PERM_CACHE[key]


@dataclasses.dataclass
class TaskData:
    """Train and held-out sets of a run, plus what the user should hear about them."""

    train: EncodedSet
    held_out: EncodedSet
    notes: list[str]


def load_task_data(
    data_dir: str | os.PathLike,
    tokenizer,  # noqa: ANN001
    cfg: TrainConfig,
    expert_names: Sequence[str],
    *,
    context_len: int,
) -> TaskData:
    """Reads, checks against the experts and tokenises. Tasks without ``test.jsonl`` lose a held-out share."""
    data_dir = os.fspath(data_dir)
    train = read_split(data_dir, "train")
    unknown = [t for t in train if t not in expert_names]
    if unknown:
        raise MeteoraInputError(
            f"{data_dir}: task folder(s) {unknown} match no expert of the model (experts: {list(expert_names)}). "
            "Task names are expert names: rename the folder, or add the adapter with `meteora-jax add-adapter`."
        )
    notes = []
    missing = [e for e in expert_names if e not in train]
    if missing:
        notes.append(f"experts without training data (their gate columns only learn to stay low): {missing}")
    held: dict[str, list[Example]] = {}
    for task in list(train):
        test_path = os.path.join(data_dir, task, "test.jsonl")
        if os.path.isfile(test_path):
            held[task] = read_split(data_dir, "test", tasks=[task])[task]
        elif cfg.held_out_fraction > 0 and len(train[task]) > 1:
            train[task], held[task] = split_train_test(train[task], cfg.held_out_fraction, cfg.seed)
            if not held[task]:
                del held[task]
        if cfg.eval_examples_per_task and task in held:
            held[task] = held[task][: cfg.eval_examples_per_task]
    max_len = min(cfg.max_seq_len, context_len)
    tr = encode_examples(train, tokenizer, cfg, expert_names, max_len=max_len, source=data_dir)
    ho = encode_examples(held, tokenizer, cfg, expert_names, max_len=max_len, source=data_dir)
    if tr.truncated or ho.truncated:
        notes.append(
            f"truncated {tr.truncated} training and {ho.truncated} held-out sequence(s) to {max_len} tokens "
            "(--set overlong=error refuses instead)"
        )
    return TaskData(train=tr, held_out=ho, notes=notes)


def eval_batches(data: EncodedSet, cfg: TrainConfig, *, pad_id: int, batch_size: int) -> list[Batch]:
    """The whole set in fixed order. The last batch is filled up with copies of row 0 whose masks are zero,
    so they count in no metric (every batch keeps the static shape [batch_size, bucket])."""
    out = []
    for start in range(0, len(data), batch_size):
        idx = list(range(start, min(start + batch_size, len(data))))
        real = len(idx)
        idx += [idx[0]] * (batch_size - real)
        batch = make_batch(data, idx, pad_id=pad_id, buckets=cfg.buckets, response_only=cfg.response_only)
        batch.mask_bl[real:] = 0
        batch.lm_weight_bl[real:] = 0.0
        batch.response_bl[real:] = 0
        out.append(batch)
    return out
