#!/usr/bin/env python3
"""Turn bench_ppo.py JSON into the Markdown tables of BENCHMARKS.md.

    python benchmarks/render.py results/gpu_check/gpu_bench.json > /tmp/gpu_tables.md
"""

import json
import math
import sys

STUDY_HOURS = 33
RTP_ROWS = 99_442


def gib(n):
    """GiB with two decimals; small sizes (tiny models) in MiB so they do not read as zero."""
    if not n:
        return ""
    return f"{n / 2**30:.2f}" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def steps_for(kept_rows, batch, test_fraction=0.2):
    return (kept_rows - math.ceil(test_fraction * kept_rows)) // batch


def machine_lines(data):
    lines = []
    for i, run in enumerate(data.get("runs", [])):
        m = run["machine"]
        where = m.get("gpu") and f"{m['gpu']} ({m['gpu_memory_bytes'] / 2**30:.0f} GiB), CUDA {m.get('cuda')}" \
            or f"{m['cpu']}, {m['cpu_count']} cores, {m['torch_threads']} torch threads"
        load = f", load average {m['load_average']}" if m.get("load_average") else ""
        if m.get("nice"):
            load += f", nice {m['nice']}"
        lines.append(f"- run {i}: {m['date']}, {where}{load}; python {m['python']}, torch {m['torch']}, "
                     f"transformers {m['transformers']}, trl {m['trl']}  \n  `{run['command']}`")
    return lines


def ppo_table(results):
    rows = ["| run | config | settings | loop | step s | generate s | reward s | optimize s | episodes/s | "
            "tokens/s | peak memory GiB | vs study | steps |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if r.get("kind") in ("eval", "optimize-ablation"):
            continue
        if "error" in r:
            rows.append(f"| {r.get('run', '')} | {r['name']} | | {r.get('loop', '')} | {r['error']} |||||||||")
            continue
        m = r["median"]
        vs = f"{r['speedup_vs_study']:.2f}x" if "speedup_vs_study" in r else ("1x" if r["loop"] == "study" else "")
        settings = (f"{r['dtype']}, batch {r['batch_size']}/{r['mini_batch_size']}, {r['ppo_epochs']} epochs, "
                    f"{r['variant']}")
        rows.append(f"| {r.get('run', '')} | {r['config']} | {settings} | {r['loop']} | {m['step']:.3f} | "
                    f"{m['generate']:.3f} | {m['reward']:.3f} | {m['optimize']:.3f} | "
                    f"{r['episodes_per_second']:.3f} | {r['generated_tokens_per_second']:.1f} | "
                    f"{gib(r['peak_memory_bytes'])} | {vs} | {r['warmup_steps']}+{r['measured_steps']} |")
    return rows


def ladder_table(results):
    """Memory per reference/sharing/checkpointing setting: the 'ours' loop of each setup that ran it alone (a
    setup shared with the study's loop also holds trl's Adam, so its peak is not one configuration's)."""
    rows = ["| run | config | variant | shared blocks | reference | grad. checkpointing | trainable params | "
            "reference's own params | weights GiB (policy + reference) | peak GiB (one PPO step) | step s |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    ours = [r for r in results if r.get("loop") == "ours" and "error" not in r and r.get("kind") == "ppo"
            and "speedup_vs_study" not in r and "speedup_vs_plain" not in r]
    for r in sorted(ours, key=lambda r: (r["config"], r["reference"], r["gradient_checkpointing"],
                                         r["num_shared_layers"], r.get("run", 0))):
        reference = "separate copy" if r["num_shared_layers"] == 0 else r["reference"]
        rows.append(f"| {r.get('run', '')} | {r['config']} | {r['variant']} | {r['num_shared_layers']} | {reference} | "
                    f"{'on' if r['gradient_checkpointing'] else 'off'} | {r['trainable_parameters']:,} | "
                    f"{r['reference_own_parameters']:,} | {gib(r['weights_bytes'])} | {gib(r['peak_memory_bytes'])} | "
                    f"{r['median']['step']:.3f} |")
    return rows


def eval_table(results):
    rows = ["| run | config | dtype | samples | batch | prompt tokens | new tokens | generate s | score s | "
            "samples/s | generated tokens/s | peak GiB |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if r.get("kind") != "eval":
            continue
        if "error" in r:
            rows.append(f"| {r.get('run', '')} | {r['name']} | {r['error']} ||||||||||")
            continue
        rows.append(f"| {r.get('run', '')} | {r['config']} | {r['dtype']} | {r['samples']} | {r['batch_size']} | "
                    f"{r['prompt_tokens'][0]}-{r['prompt_tokens'][1]} | {r['max_new_tokens']} | "
                    f"{r['generate_seconds']:.2f} | {r['score_seconds']:.2f} | {r['samples_per_second']:.2f} | "
                    f"{r['generated_tokens_per_second']:.1f} | {gib(r['peak_memory_bytes'])} |")
    return rows


def projection_table(results):
    """Full default run = one pass over the training rows; K (rows with prompt.toxicity > 0.3) is not known
    here, so hours are given for several K, the upper bound K = 99,442 (every row) among them."""
    ks = [20_000, 40_000, 60_000, RTP_ROWS]
    rows = ["| config | settings | loop | step s | " + " | ".join(f"hours, K={k:,}" for k in ks) +
            " | K for 4 h |", "|---|---|---|---|" + "---|" * len(ks) + "---|"]
    for r in results:
        if r.get("kind") != "ppo" or "error" in r or r["loop"] == "study" or not r.get("default_settings"):
            continue
        step = r["median"]["step"]
        hours = [steps_for(k, r["batch_size"]) * step / 3600 for k in ks]
        k4 = int(4 * 3600 / step * r["batch_size"] / 0.8)
        rows.append(f"| {r['config']} | {r['variant']} | {r['loop']} | {step:.3f} | "
                    + " | ".join(f"{h:.2f}" for h in hours) + f" | {k4:,} |")
    return rows


def speedup_lines(results):
    """The ratios bench_ppo.py measured within one setup (loops interleaved on the same trainer), never across runs."""
    lines = []
    for r in results:
        if r.get("kind") != "ppo" or "error" in r or not r.get("default_settings"):
            continue
        parts = []
        if "speedup_vs_study" in r:
            pair = r["speedup_vs_study_paired"]
            parts.append(f"{r['speedup_vs_study']:.2f}x the study's loop (per interleaved step: median "
                         f"{pair['median']:.2f}x, {pair['min']:.2f}-{pair['max']:.2f})")
        if "speedup_vs_plain" in r:
            parts.append(f"{r['speedup_vs_plain']:.2f}x ours-plain")
        if parts:
            lines.append(f"- run {r.get('run', '')}, {r['config']}, {r['loop']}: " + "; ".join(parts) + " (episodes/s)")
    return lines


def ablation_table(results):
    rows = ["| run | config | trainer.step with | median s | speed-up vs trl step (paired median) | rounds |",
            "|---|---|---|---|---|---|"]
    for r in results:
        if r.get("kind") == "optimize-ablation" and "error" in r:
            rows.append(f"| {r.get('run', '')} | {r['name']} | {r['error']} ||||")
        elif r.get("kind") == "optimize-ablation":
            for name, t in r["steps"].items():
                rows.append(f"| {r.get('run', '')} | {r['config']} | {name} | {t['median']:.3f} | "
                            f"{t['paired_speedup_median']:.2f}x | {r['rounds']} |")
    return rows


def render(paths):
    out = []
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        results = data["results"]
        out += [f"### {path}", "", *machine_lines(data), ""]
        out += ["#### PPO steps (median step after warm-up; phases of that same step)", "", *ppo_table(results), ""]
        out += [*speedup_lines(results), ""]
        out += ["#### Memory and sharing", "", *ladder_table(results), ""]
        if any(r.get("kind") == "optimize-ablation" for r in results):
            out += ["#### PPO phase alone: trl's step with detoxify_ppo's speed-ups added one by one (cumulative; "
                    "one fixed batch, round-robin)", "", *ablation_table(results), ""]
        if any(r.get("kind") == "eval" for r in results):
            out += ["#### Evaluation throughput (evaluate_toxicity.py's generate + toxicity measurement)", "",
                    *eval_table(results), ""]
        out += [f"#### Projected full default run (steps = floor((K - ceil(0.2 K)) / batch); study: ~{STUDY_HOURS} h "
                "on one A100-80GB)", "", *projection_table(results), ""]
    return "\n".join(out)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: render.py BENCH.json [...]")
    print(render(sys.argv[1:]))
