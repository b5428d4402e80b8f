"""Exercises: the learner writes the core pieces, and kvlab's own engine checks them.

Each chapter of the course has an exercise notebook (notebooks/exercises/NN_*.ipynb) with 2-4
exercises of rising difficulty. An exercise is a stub the learner fills in (a function, a class,
a Triton kernel), and a check that runs it on randomized and edge cases against kvlab's own
implementation (the model, the allocator, the kernels, the scheduler) and prints a verdict:

    from kvlab.exercises import ch01 as ex
    ex.check_attention_head(attention_head)
    # ✓ 01.1 attention_head: passed. 11 cases agree with kvlab's causal attention within 1e-5: ...
    # ✗ 01.1 attention_head: failed on case 2: random, T = 2, D = 4.
    #     ... expected / got / hint: "Your output equals attention with no causal mask: ..."

    chNN            the checks of chapter NN (check_<name>(fn) -> Verdict)
    harness         cases, comparisons, diagnoses, the Verdict
    models          the models the checks run (SmolLM2-135M, tiny-llama-random), loaded once
    scheduler_adapter   the one place that drives kvlab's Scheduler for chapter 07's check
    solutions.chNN  the solutions, apart, for when a learner chooses to look: show_solution(name)

Every check runs on a laptop CPU in under about 2 seconds once its model is loaded, and never
needs a GPU (chapter 06's Triton exercise runs in Triton's interpreter).
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass


@dataclass(frozen=True)
class Exercise:
    id: str                    # "01.1"
    names: tuple[str, ...]     # what the stub cell defines (and the solution module provides)
    check: str                 # the check function in kvlab.exercises.chNN
    title: str
    section: str               # the chapter section it practises

    @property
    def chapter(self) -> str:
        return self.id.split(".")[0]

    @property
    def module(self) -> str:
        return f"kvlab.exercises.ch{self.chapter}"

    @property
    def solution_module(self) -> str:
        return f"kvlab.exercises.solutions.ch{self.chapter}"


EXERCISES = [
    Exercise("01.1", ("attention_head",), "check_attention_head", "one causal attention head",
             "01 §2 One block, by hand"),
    Exercise("01.2", ("attention_heads",), "check_attention_heads", "every head of a layer, with GQA",
             "01 §2 One block, by hand"),
    Exercise("01.3", ("ffn",), "check_ffn", "the FFN, one token at a time", "01 §5 The FFN is per token"),
    Exercise("02.1", ("KVCache",), "check_kv_cache", "a KV cache you manage yourself",
             "02 §5 The past_key_values lesson"),
    Exercise("02.2", ("greedy_decode",), "check_greedy_decode", "greedy decoding through your cache",
             "02 §1 A greedy continuation, §4 Decoding without a KV cache"),
    Exercise("03.1", ("kv_bytes_per_token",), "check_kv_bytes_per_token", "KV bytes per token: MHA, GQA, MQA, MLA",
             "03 §1 What the cache stores, §3 MHA, GQA, MQA, MLA"),
    Exercise("03.2", ("max_requests",), "check_max_requests", "how many requests fit on a GPU",
             "03 §4 How many requests fit on a GPU"),
    Exercise("03.3", ("kv_bytes_per_token_tp",), "check_kv_bytes_per_token_tp", "one GPU's share under tensor "
             "parallelism", "03 §4 Tensor parallelism"),
    Exercise("04.1", ("slots_held",), "check_slots_held", "slots a request holds under each policy",
             "04 §1 The classic problem, §7 Block size"),
    Exercise("04.2", ("breakdown",), "check_breakdown", "one step's memory, by category", "04 §2 A memory map"),
    Exercise("04.3", ("lifetime_shares",), "check_lifetime_shares", "a request's memory over its life",
             "04 §3 Figure 2, in the paper's setting"),
    Exercise("05.1", ("slot_mapping",), "check_slot_mapping", "where a token's K/V live", "05 §1 One slab per request "
             "vs blocks"),
    Exercise("05.2", ("prefix_block_hashes",), "check_prefix_block_hashes", "the chained hash of a prompt's blocks",
             "05 §4 Prefix caching"),
    Exercise("05.3", ("cached_prompt_tokens",), "check_cached_prompt_tokens", "what the prefix cache supplies",
             "05 §4 Prefix caching"),
    Exercise("05.4", ("Allocator",), "check_allocator", "a block allocator with reference counts and copy-on-write",
             "05 §2 The allocator, stepped through, §5 Copy-on-write"),
    Exercise("06.1", ("paged_attention",), "check_paged_attention", "paged attention in torch, through a block table",
             "06 §1 The reference, §4 Loading K/V through the block table, §6 GQA"),
    Exercise("06.2", ("merge_splits",), "check_merge_splits", "the split-K merge of partial softmaxes",
             "06 §5 The online softmax, §7 Split-K"),
    Exercise("06.3", ("paged_attention_kernel",), "check_paged_attention_kernel", "a Triton decode kernel, blanks "
             "filled", "06 §3-5 and §8 The kernel, live"),
    Exercise("07.1", ("static_steps", "continuous_steps"), "check_batching_steps", "static vs continuous batching, "
             "in steps", "07 §2 Static against continuous batching"),
    Exercise("07.2", ("schedule_step",), "check_schedule_step", "one scheduler step",
             "07 §3 The scheduler's loop, step by step"),
    Exercise("08.1", ("stream_text",), "check_stream_text", "a client that reads a server-sent-events stream",
             "08 §2 One request, then the same request streamed"),
    Exercise("08.2", ("stream_latencies",), "check_stream_latencies", "TTFT and inter-token latency from a stream",
             "08 §5 Load: latency against request rate"),
]


def exercise(key: str) -> Exercise:
    """An exercise by id ("05.4") or by a name its stub defines ("Allocator")."""
    for ex in EXERCISES:
        if key == ex.id or key in ex.names:
            return ex
    raise ValueError(f"no exercise {key!r}; ids: {', '.join(e.id for e in EXERCISES)}")


def list_exercises() -> list[str]:
    return [f"{e.id}  {', '.join(e.names):<34} {e.title}  (chapter {e.section})" for e in EXERCISES]


def solution_source(key: str) -> str:
    """The source of an exercise's solution (every name its stub defines)."""
    ex = exercise(key)
    module = importlib.import_module(ex.solution_module)
    parts = []
    for name in ex.names:
        obj = getattr(module, name)
        src = getattr(obj, "src", None)                     # a Triton JITFunction keeps its source in .src
        parts.append(inspect.getsource(getattr(obj, "fn", obj)) if src is None else src)
    return "\n\n".join(p.strip("\n") for p in parts)


def show_solution(key: str) -> None:
    """Print the solution of an exercise (by id or name). Try first: the check's hint usually suffices."""
    print(f"# solution to {exercise(key).id} (kvlab/exercises/solutions/ch{exercise(key).chapter}.py)\n")
    print(solution_source(key))
