"""Multi-task conversation rows for gate training (``TrainConfig.composite_fraction``).

MeteoRA trains its gates on single-task sequences only, so a gate never sees a token whose task differs from
the one before it. In a composite prompt that is every turn after the first, and on the BIG-bench study the
gates kept routing a short strategyqa turn to the question_selection turn before it (benchmarks/RESULTS.md,
session 7). A conversation row joins a training example with examples of other tasks as later turns, in the
exact text ``eval.composite``'s ``turns`` protocol writes (``render_turns``), and gives every token its own
turn's task as the gate target.

Layout of a row of examples ``e1, e2, ...``: ``e1``'s own tokens (BOS, templated prompt, response), then for
each later example its *tail* -- the text a conversation puts after an answer when that example's prompt is
the next user turn (closing of the answer, turn separator, user turn, reply cue) -- and its response. EOS
ends only the last response: between turns the tail carries the template's own closing. Tails are
tokenised once per example, as prompts and responses are (separately, so the masks are exact).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from meteora_jax.errors import MeteoraInputError

# Placeholder turns: a first user turn and its answer, rendered only to find where the next turn starts.
_FIRST_PROMPT, _FIRST_ANSWER = "Q0", "A0"


def turn_tail_text(tokenizer, template: str) -> Callable[[str], str]:  # noqa: ANN001 (a transformers tokenizer)
    """``tail(prompt)``: what follows an answer when ``prompt`` is the next user turn, as ``render_turns``
    writes a conversation (the user turn is stripped there, as here). The first turn is rendered once."""
    from meteora_jax.eval.composite import render_turns

    user = lambda text: {"role": "user", "content": text}  # noqa: E731
    first = render_turns(tokenizer, [user(_FIRST_PROMPT)], template)

    def tail(prompt: str) -> str:
        conv = render_turns(
            tokenizer,
            [user(_FIRST_PROMPT), {"role": "assistant", "content": _FIRST_ANSWER}, user(prompt.strip())],
            template,
        )
        at = conv.find(_FIRST_ANSWER, len(first)) if conv.startswith(first) else -1
        if at < 0:
            raise MeteoraInputError(
                f"composite_fraction: prompt_template={template!r} does not render a conversation as its first "
                "turn followed by more turns, so conversation rows cannot be built; use chat_no_system, meteora "
                "or plain, or --set composite_fraction=0."
            )
        return conv[at + len(_FIRST_ANSWER) :]

    return tail


def conversation_groups(data, step: int, idx: Sequence[int], *, seed: int, fraction: float, max_turns: int):  # noqa: ANN001, ANN201
    """Each example of ``idx`` as a 1-tuple, or -- for about ``fraction`` of them -- followed by examples of
    1..``max_turns`` - 1 other, distinct tasks, as many as fit ``data.max_len``. A pure function of
    (seed, step, idx), like the batch order, so resuming stays exact."""
    rng = np.random.default_rng([seed, 2, step])
    tasks = np.unique(data.task)
    groups = []
    for i in idx:
        group, length = [int(i)], len(data.ids[i])
        if len(tasks) > 1 and rng.random() < fraction:
            turns = int(rng.integers(2, max_turns + 1))
            others = [int(t) for t in rng.permutation(tasks) if t != data.task[i]][: turns - 1]
            for t in others:
                pool = data.indices_of_task(t)
                j = int(pool[rng.integers(len(pool))])
                extra = len(data.tail_ids[j]) + len(data.ids[j]) - int(data.prompt_len[j])
                if length + extra > data.max_len:
                    break
                group.append(j)
                length += extra
        groups.append(tuple(group))
    return groups


def join_turns(data, group: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # noqa: ANN001
    """(token ids, gate target task per token, 1 = response token) of one conversation row."""
    ids, task, resp = [], [], []

    def add(piece: np.ndarray, t: int, is_response: bool) -> None:
        ids.append(piece)
        task.append(np.full(len(piece), t, np.int32))
        resp.append(np.full(len(piece), int(is_response), np.int32))

    for n, j in enumerate(group):
        t, plen = int(data.task[j]), int(data.prompt_len[j])
        add(data.ids[j][:plen] if n == 0 else data.tail_ids[j], t, False)
        response = data.ids[j][plen:]
        if n < len(group) - 1 and data.eos_id is not None and len(response) and response[-1] == data.eos_id:
            response = response[:-1]  # the next tail closes this answer in the template's own way
        add(response, t, True)
    return np.concatenate(ids), np.concatenate(task), np.concatenate(resp)
