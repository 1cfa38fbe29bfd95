"""Grouped LoRA: y[t] = sum_j w[t, j] * scaling[e] * (x[t] @ A[e]) @ B[e], e = expert_ids[t, j]."""
