"""The mask rule: dense_mask against a brute-force loop and against the authors' rule (reference notes)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_focusft.masks import MaskInputs, blocks_from_loss_mask, dense_mask


def brute_force(document_ids: list[int], loss_mask: list[int], mode: str) -> torch.Tensor:
    """The issue's rule, one (q, k) pair at a time, with per-document blocks computed independently."""
    s = len(document_ids)
    block = [0] * s
    for i in range(1, s):
        new = loss_mask[i] != loss_mask[i - 1] or document_ids[i] != document_ids[i - 1]
        block[i] = block[i - 1] + int(new)
    out = torch.zeros(s, s, dtype=torch.bool)
    for q in range(s):
        for k in range(s):
            if document_ids[q] == -1:
                out[q, k] = q == k  # padding: itself only
                continue
            if document_ids[k] != document_ids[q]:
                continue
            if mode == "causal":
                out[q, k] = k <= q
            else:
                is_context = loss_mask[q] == 0
                out[q, k] = block[k] < block[q] or (block[k] == block[q] and (is_context or k <= q))
    return out


@st.composite
def packs(draw):
    """A pack: documents of random runs of context/response tokens, then optional padding."""
    docs, lm = [], []
    for d in range(draw(st.integers(1, 4))):
        for _ in range(draw(st.integers(1, 5))):
            n = draw(st.integers(1, 5))
            value = draw(st.integers(0, 1))
            docs += [d] * n
            lm += [value] * n
    pad = draw(st.integers(0, 4))
    return docs + [-1] * pad, lm + [0] * pad


@settings(max_examples=150, deadline=None)
@given(packs(), st.sampled_from(["causal", "glm"]))
def test_dense_mask_equals_brute_force(pack, mode):
    docs, lm = pack
    got = dense_mask(torch.tensor(docs), torch.tensor(lm), mode)
    assert torch.equal(got, brute_force(docs, lm, mode))


@settings(max_examples=30, deadline=None)
@given(packs(), packs(), st.sampled_from(["causal", "glm"]))
def test_batched_rows_are_the_per_sequence_masks(a, b, mode):
    s = max(len(a[0]), len(b[0]))
    pad = [(d + [-1] * (s - len(d)), m + [0] * (s - len(m))) for d, m in (a, b)]
    docs = torch.tensor([p[0] for p in pad])
    lm = torch.tensor([p[1] for p in pad])
    batched = dense_mask(docs, lm, mode)
    assert batched.shape == (2, s, s)
    for i in range(2):
        assert torch.equal(batched[i], dense_mask(docs[i], lm[i], mode))
    info = MaskInputs(docs, lm, mode)
    assert torch.equal(info.rows(1, s), batched[:, 1:])


def test_blocks_restart_at_documents():
    lm = torch.tensor([0, 0, 1, 1, 1, 0, 0])
    docs = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    assert blocks_from_loss_mask(lm).tolist() == [0, 0, 1, 1, 1, 2, 2]
    assert blocks_from_loss_mask(lm, docs).tolist() == [0, 0, 1, 2, 2, 3, 3]


def test_bad_mode_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown mask mode 'bidir'"):
        dense_mask(torch.zeros(3, dtype=torch.long), torch.zeros(3), "bidir")


# ---- the authors' rule (shared/paper/reference-implementation-notes.md), on multi-turn tool-use samples ----

# Token-level loss masks of chat-templated agentic trajectories, per turn:
#   (role, body tokens); context turns are fully 0; an assistant turn is the header `<|im_start|>assistant\n`
#   (3 tokens, loss 0, joining the preceding context block) + body + `<|im_end|>` + `\n` (loss 1).
SAMPLES = {
    "tool_use_two_calls": [
        ("system", 9),
        ("user", 7),
        ("assistant", 6),  # tool call
        ("tool", 11),
        ("assistant", 4),  # second tool call
        ("tool", 5),
        ("assistant", 8),  # final answer
    ],
    "multi_user_turns": [("system", 4), ("user", 3), ("assistant", 2), ("user", 5), ("assistant", 1)],
    "parallel_tool_results": [
        ("system", 3),
        ("user", 2),
        ("assistant", 5),
        ("tool", 3),
        ("tool", 4),
        ("assistant", 3),
    ],
}


def render_loss_mask(turns) -> list[int]:
    lm: list[int] = []
    for role, n in turns:
        if role == "assistant":
            lm += [0] * 3 + [1] * (n + 2)
        else:
            lm += [0] * (n + 5)  # <|im_start|>role\n ... <|im_end|>\n
    return lm


def authors_mask(loss_mask: list[int], length: int) -> torch.Tensor:
    """The reference implementation's 'glm_bidir' mask for one right-padded sample (padding blocked)."""
    n = len(loss_mask)
    turn = [0] * n
    for i in range(1, n):
        turn[i] = turn[i - 1] + int(loss_mask[i] != loss_mask[i - 1])
    out = torch.zeros(length, length, dtype=torch.bool)
    for q in range(n):
        for k in range(n):
            out[q, k] = (
                turn[k] < turn[q]
                or (turn[k] == turn[q] and loss_mask[q] == 0)
                or (turn[k] == turn[q] and loss_mask[q] == 1 and k <= q)
            )
    return out


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_glm_mask_reproduces_the_authors_rule(name):
    lm = render_loss_mask(SAMPLES[name])
    length = len(lm) + 6  # right padding, as the authors pad every sample
    expected = authors_mask(lm, length)
    docs = torch.tensor([0] * len(lm) + [-1] * 6)
    got = dense_mask(docs, torch.tensor(lm + [0] * 6), "glm")
    n = len(lm)
    assert torch.equal(got[:n], expected[:n])  # real tokens: identical rows (padding keys blocked)
    # padding rows: the authors block them entirely; we keep only the diagonal (finite softmax)
    assert torch.equal(got[n:], torch.eye(length, dtype=torch.bool)[n:])
    # the same sample packed after another document gets the same mask in its own square
    other = render_loss_mask(SAMPLES["multi_user_turns"])
    packed_docs = torch.tensor([0] * len(other) + [1] * n)
    packed = dense_mask(packed_docs, torch.tensor(other + lm), "glm")
    m = len(other)
    assert torch.equal(packed[m:, m:], expected[:n, :n])
    assert not packed[m:, :m].any() and not packed[:m, m:].any()


def test_glm_is_causal_plus_a_few_nonzeros():
    lm = render_loss_mask(SAMPLES["tool_use_two_calls"])
    docs, lmt = torch.zeros(len(lm), dtype=torch.long), torch.tensor(lm)
    glm, causal = dense_mask(docs, lmt, "glm"), dense_mask(docs, lmt, "causal")
    assert torch.equal(glm & causal, causal)  # glm only adds (bidirectional context) entries
    assert not torch.triu(glm & (lmt[:, None] == 1), diagonal=1).any()  # responses stay causal
